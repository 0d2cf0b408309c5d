//! The network front: connections that never send an A-ASSOCIATE-RQ (idle sockets, load balancer
//! health checks, port scans) and the PROXY protocol v2 header a Network Load Balancer writes in
//! front of each connection, with DCMTK's echoscu as the real client.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::*;
use dicom_ul::pdu::{AssociationRJResult, Pdu};

/// A gateway on a local store whose listener logs at DEBUG (every connection accepted and closed).
fn gateway(extra: &[&str]) -> (Gateway, tempfile::TempDir) {
    let store = tempfile::tempdir().unwrap();
    let mut args = vec!["--store-dir", store.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    let gw = Gateway::start(
        &args,
        &[(
            "DICOM_GATEWAY_LOG_LEVEL",
            "info,dicom_gateway::listener=debug",
        )],
    );
    (gw, store)
}

fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).unwrap()
}

/// Waits until `needle` appears `n` times in the gateway's log; returns the log.
fn wait_for_count(gw: &Gateway, needle: &str, n: usize) -> String {
    eventually(
        &format!("{n} × '{needle}' in the gateway log"),
        Duration::from_secs(20),
        || {
            let log = gw.log_text();
            if log.matches(needle).count() >= n {
                Ok(log)
            } else {
                Err(log)
            }
        },
    )
}

/// The log line containing `needle` (panics if none).
fn line<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with '{needle}' in:\n{log}"))
}

fn assert_no_warnings(log: &str) {
    assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{log}");
}

/// A PROXY protocol v2 header (haproxy's proxy-protocol.txt §2.2) for a TCP connection from
/// `client` to 10.0.0.1:11112, as an NLB with `proxy_protocol_v2.enabled` sends it, with AWS's
/// VPC endpoint TLV (type 0xEA) after the addresses.
fn proxy_v2(client: SocketAddr) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    let mut body = Vec::new();
    match client {
        SocketAddr::V4(c) => {
            out.extend([0x21, 0x11]);
            body.extend(c.ip().octets());
            body.extend([10, 0, 0, 1]);
        }
        SocketAddr::V6(c) => {
            out.extend([0x21, 0x21]);
            body.extend(c.ip().octets());
            body.extend(std::net::Ipv6Addr::LOCALHOST.octets());
        }
    }
    body.extend(client.port().to_be_bytes());
    body.extend(11112u16.to_be_bytes());
    body.extend([0xEA, 0x00, 0x09, 0x01]);
    body.extend(b"vpce-test");
    out.extend((body.len() as u16).to_be_bytes());
    out.extend(body);
    out
}

/// The header of the load balancer's own connections (health checks): command LOCAL, no address.
const PROXY_V2_LOCAL: [u8; 16] = *b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

/// What a Network Load Balancer with proxy protocol v2 does, in miniature: accepts on its own port,
/// connects to the gateway's `target` port, writes a PROXY v2 header naming `client`, then relays
/// bytes both ways. Lets DCMTK's echoscu (which knows nothing of the header) be the real client.
struct ProxyRelay {
    port: u16,
}

impl ProxyRelay {
    fn start(target: u16, client: SocketAddr) -> ProxyRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // The thread lives until the test binary exits, like the load balancer it stands for.
        std::thread::spawn(move || {
            for downstream in listener.incoming() {
                let Ok(downstream) = downstream else { continue };
                let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                if upstream.write_all(&proxy_v2(client)).is_err() {
                    continue;
                }
                for (mut from, mut to) in [
                    (
                        downstream.try_clone().unwrap(),
                        upstream.try_clone().unwrap(),
                    ),
                    (upstream, downstream),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        ProxyRelay { port }
    }
}

#[test]
fn idle_connections_do_not_keep_a_sender_out_and_closing_them_is_not_a_warning() {
    let (gw, _store) = gateway(&["--max-associations", "2"]);
    let idle: Vec<TcpStream> = (0..64).map(|_| connect(gw.port)).collect();
    wait_for_count(&gw, "connection accepted", 64);
    // Before pending connections had their own bound, these 64 held every association slot and
    // the echo got A-ASSOCIATE-RJ (local-limit-exceeded).
    let out = echoscu(gw.port, AE, "ECHOSCU");
    assert!(out.status.success(), "{}", text(&out));
    gw.wait_for_log("association released");
    // A connect-and-close (a TCP health check, a port scan) is a DEBUG line, not a warning.
    drop(idle);
    let log = wait_for_count(&gw, "connection closed before an A-ASSOCIATE-RQ", 64);
    assert!(
        line(&log, "connection closed before an A-ASSOCIATE-RQ").contains("DEBUG"),
        "{log}"
    );
    assert_no_warnings(&log);
}

#[test]
fn over_the_pending_bound_the_oldest_pending_connection_is_closed() {
    let (gw, _store) = gateway(&["--max-pending-connections", "4"]);
    let mut idle: Vec<TcpStream> = (0..4).map(|_| connect(gw.port)).collect();
    wait_for_count(&gw, "connection accepted", 4);
    idle.push(connect(gw.port));
    // The oldest sees the end of the stream; the newest is still open.
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(idle[0].read(&mut [0u8; 1]).unwrap(), 0);
    let log = gw.wait_for_log("--max-pending-connections reached");
    assert!(line(&log, "--max-pending-connections reached").contains("id=1 "));
    // A sender still gets in (it evicts the next oldest idle socket on its way).
    let out = echoscu(gw.port, AE, "ECHOSCU");
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn behind_the_proxy_protocol_the_client_it_names_is_checked_against_the_allow_list_and_logged() {
    // The socket's peer is 127.0.0.1, outside the allow-list: only the header's address can pass.
    let (gw, _store) = gateway(&["--proxy-protocol", "--peer-allow", "10.0.0.0/8"]);

    let mut inside = RawScu::connect(gw.port);
    inside.send_raw(&proxy_v2("10.1.2.3:4444".parse().unwrap()));
    inside.send_pdu(&RawScu::request(AE));
    assert!(matches!(inside.read(), Some(Pdu::AssociationAC(_))));
    inside.release();
    let log = gw.wait_for_log("association released");
    let accepted = line(&log, "association accepted");
    assert!(
        accepted.contains("peer=10.1.2.3:4444") && accepted.contains("via=127.0.0.1:"),
        "{accepted}"
    );

    let mut outside = RawScu::connect(gw.port);
    outside.send_raw(&proxy_v2("192.0.2.10:5555".parse().unwrap()));
    outside.send_pdu(&RawScu::request(AE));
    match outside.read() {
        Some(Pdu::AssociationRJ(rj)) => assert_eq!(rj.result, AssociationRJResult::Permanent),
        other => panic!("expected A-ASSOCIATE-RJ, got {other:?}"),
    }
    let log = gw.wait_for_log("peer address not in --peer-allow");
    assert!(
        line(&log, "peer address not in --peer-allow").contains("peer=192.0.2.10:5555"),
        "{log}"
    );

    // An IPv6 client is named too (and is outside the IPv4 allow-list).
    let mut v6 = RawScu::connect(gw.port);
    v6.send_raw(&proxy_v2("[2001:db8::7]:6000".parse().unwrap()));
    v6.send_pdu(&RawScu::request(AE));
    assert!(matches!(v6.read(), Some(Pdu::AssociationRJ(_))));
    wait_for_count(&gw, "peer address not in --peer-allow", 2);
}

#[test]
fn behind_the_proxy_protocol_a_connection_without_the_header_is_refused() {
    let (gw, _store) = gateway(&["--proxy-protocol"]);
    // echoscu connects directly, as a sender bypassing the load balancer would.
    let out = echoscu(gw.port, AE, "ECHOSCU");
    assert!(!out.status.success(), "{}", text(&out));
    let log = gw.wait_for_log("PROXY protocol header missing or malformed");
    let refused = line(&log, "PROXY protocol header missing or malformed");
    assert!(
        refused.contains("WARN") && refused.contains("no PROXY protocol header"),
        "{refused}"
    );
    assert!(!log.contains("association accepted"), "{log}");

    // A truncated header is refused too.
    let mut truncated = connect(gw.port);
    truncated
        .write_all(&proxy_v2("10.1.2.3:1".parse().unwrap())[..20])
        .unwrap();
    truncated.shutdown(Shutdown::Write).unwrap();
    wait_for_count(&gw, "PROXY protocol header truncated", 1);
}

#[test]
fn the_load_balancers_health_checks_are_quiet_and_echoscu_through_it_is_served() {
    let (gw, _store) = gateway(&["--proxy-protocol", "--peer-allow", "10.0.0.0/8"]);
    // A TCP health check with proxy protocol on: a LOCAL header, then close. Its address (the
    // socket's) is outside the allow-list, which does not matter: no request, nothing to reject.
    let mut check = connect(gw.port);
    check.write_all(&PROXY_V2_LOCAL).unwrap();
    drop(check);
    drop(connect(gw.port));
    wait_for_count(&gw, "connection closed before an A-ASSOCIATE-RQ", 1);
    wait_for_count(&gw, "connection closed before sending anything", 1);

    let relay = ProxyRelay::start(gw.port, "10.9.8.7:1234".parse().unwrap());
    let out = echoscu(relay.port, AE, "ECHOSCU");
    assert!(out.status.success(), "{}", text(&out));
    let log = gw.wait_for_log("association released");
    assert!(
        line(&log, "association accepted").contains("peer=10.9.8.7:1234"),
        "{log}"
    );
    assert_no_warnings(&log);
}

/// A self-signed certificate for 127.0.0.1 in `dir` (server.crt, server.key).
fn self_signed(dir: &Path) {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.crt",
        ])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl runs (scripts/test.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_proxy_protocol_header_comes_before_the_tls_handshake() {
    let pki = tempfile::tempdir().unwrap();
    self_signed(pki.path());
    let tls_port = free_port();
    let p = |f: &str| pki.path().join(f).to_str().unwrap().to_string();
    let listen = format!("127.0.0.1:{tls_port}");
    let (cert, key) = (p("server.crt"), p("server.key"));
    let (gw, _store) = gateway(&[
        "--proxy-protocol",
        "--peer-allow",
        "10.0.0.0/8",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-listen",
        &listen,
    ]);
    let relay = ProxyRelay::start(tls_port, "10.9.8.7:2345".parse().unwrap());
    let out = dcmtk(
        "echoscu",
        &[
            "+tla",
            "+cf",
            &cert,
            "-aec",
            AE,
            "-aet",
            "ECHOSCU",
            "127.0.0.1",
            &relay.port.to_string(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let log = gw.wait_for_log("association released");
    let accepted = line(&log, "association accepted");
    assert!(
        accepted.contains("peer=10.9.8.7:2345") && accepted.contains("tls=true"),
        "{accepted}"
    );
    // A health check on the TLS port (LOCAL header, then close) is no failed handshake.
    let mut check = connect(tls_port);
    check.write_all(&PROXY_V2_LOCAL).unwrap();
    drop(check);
    let log = wait_for_count(&gw, "connection closed before sending anything", 1);
    assert_no_warnings(&log);
}

/// An HTTP GET on `port` after `prefix` (a PROXY header or nothing): the status code, or `None`
/// when the gateway closes the connection without answering.
fn http_get_after(port: u16, prefix: &[u8], path: &str) -> Option<u16> {
    let mut s = connect(port);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(prefix).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok())
}

#[test]
fn behind_the_proxy_protocol_the_health_port_reads_the_header_too() {
    // The NLB sends the PROXY header on its HTTP health checks as well, when proxy protocol v2 is
    // enabled on the target group: /healthz must still answer, or every target goes unhealthy.
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let (gw, _store) = gateway(&["--proxy-protocol", "--metrics-listen", &metrics]);
    gw.wait_for_log("health and metrics on");
    assert_eq!(
        http_get_after(metrics_port, &PROXY_V2_LOCAL, "/healthz"),
        Some(200)
    );
    let client = proxy_v2("10.1.2.3:4444".parse().unwrap());
    assert_eq!(http_get_after(metrics_port, &client, "/healthz"), Some(200));
    assert_eq!(
        http_get_after(metrics_port, b"", "/healthz"),
        None,
        "without the header, the connection is closed"
    );
}
