//! A TCP proxy that delays every byte by a fixed time in each direction: a long link between the
//! gateway and its S3 endpoint, for `scripts/bench.sh` (issue 11: direct and edge mode over a
//! 20 ms link). Only latency is added; bandwidth is whatever the two local ends manage. Given a
//! certificate and key, it also terminates TLS, so a plain-HTTP S3 server can be reached over
//! HTTPS the way the gateway reaches S3 in production (what TLS costs the gateway shows).
//!
//! ```sh
//! cargo run --release --example latency_proxy -- LISTEN_PORT TARGET_HOST:PORT DELAY_MS [CERT_PEM KEY_PEM]
//! ```

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};

/// The most one read takes off a socket; each read becomes one delayed write (under glibc's
/// mmap threshold, so a chunk's allocation is reused rather than mapped afresh).
const READ_SIZE: usize = 64 * 1024;

/// The proxy's command line: where it listens, where it forwards, the one-way delay, and the
/// TLS certificate chain and key files when it terminates TLS.
struct Args {
    listen_port: u16,
    target: String,
    delay: Duration,
    tls: Option<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: latency_proxy LISTEN_PORT TARGET_HOST:PORT DELAY_MS [CERT_PEM KEY_PEM]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (port, target, delay, tls) = match args.as_slice() {
        [port, target, delay] => (port, target, delay, None),
        [port, target, delay, cert, key] => {
            (port, target, delay, Some((cert.clone(), key.clone())))
        }
        _ => return Err(usage.into()),
    };
    Ok(Args {
        listen_port: port.parse().map_err(|_| usage.to_string())?,
        target: target.clone(),
        delay: Duration::from_millis(delay.parse().map_err(|_| usage.to_string())?),
        tls,
    })
}

/// A TLS acceptor for the certificate chain and key in the two PEM files.
fn tls_acceptor(cert: &str, key: &str) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let acceptor = match &args.tls {
        None => None,
        Some((cert, key)) => match tls_acceptor(cert, key) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("TLS: {e}");
                std::process::exit(2);
            }
        },
    };
    let listener = match TcpListener::bind(("127.0.0.1", args.listen_port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{}: {e}", args.listen_port);
            std::process::exit(1);
        }
    };
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let (target, delay, acceptor) = (args.target.clone(), args.delay, acceptor.clone());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            match acceptor {
                None => link(client, server, delay).await,
                Some(acceptor) => {
                    if let Ok(client) = acceptor.accept(client).await {
                        link(client, server, delay).await;
                    }
                }
            }
        });
    }
}

/// Relays both directions of one connection until both have ended.
async fn link(
    client: impl AsyncRead + AsyncWrite,
    server: impl AsyncRead + AsyncWrite,
    delay: Duration,
) {
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    tokio::join!(
        relay(client_read, server_write, delay),
        relay(server_read, client_write, delay)
    );
}

/// Copies `from` to `to`, each chunk written `delay` after it was read. Reading goes on while
/// earlier chunks wait, so the link is delayed, not slowed.
async fn relay(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; READ_SIZE];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // Dropping `tx` tells the writer the stream ended, after what is queued.
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(delay).await;
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
