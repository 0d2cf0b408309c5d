//! DICOM over TLS with DCMTK storescu (+tls), certificates made with openssl at test time.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl runs (scripts/test.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req`: a new RSA key `{name}.key` for subject `/CN={cn}`, and either a self-signed
/// certificate `{name}.crt` (a CA) or a certificate signing request `{name}.csr`.
fn new_key(dir: &Path, name: &str, cn: &str, self_signed: bool) {
    let key = format!("{name}.key");
    let out = format!("{name}.{}", if self_signed { "crt" } else { "csr" });
    let subject = format!("/CN={cn}");
    let mut args = vec![
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &out, "-subj", &subject,
    ];
    if self_signed {
        args.extend(["-x509", "-days", "2"]);
    }
    openssl(dir, &args);
}

/// A CA, a server certificate for 127.0.0.1, client certificates (CN=modality1 and CN=modality2)
/// from that CA, and a client certificate from an untrusted CA.
fn make_pki(dir: &Path) {
    new_key(dir, "ca", "Test CA", true);
    new_key(dir, "rogue-ca", "Rogue CA", true);
    let issue = |name: &str, cn: &str, ca: &str, ext: &str| {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        new_key(dir, name, cn, false);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    };
    let server_ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n";
    let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
    issue("server", "localhost", "ca", server_ext);
    issue("client", "modality1", "ca", client_ext);
    issue("client2", "modality2", "ca", client_ext);
    issue("rogue", "modality1", "rogue-ca", client_ext);
}

/// A gateway on a local store with a TLS listener on the returned port, using `pki`'s server
/// certificate; `extra` options added.
fn tls_gateway(pki: &Path, extra: &[&str]) -> (Gateway, tempfile::TempDir, u16) {
    let tls_port = free_port();
    let p = |f: &str| pki.join(f).to_str().unwrap().to_string();
    let (cert, key, listen) = (
        p("server.crt"),
        p("server.key"),
        format!("127.0.0.1:{tls_port}"),
    );
    let mut args = vec![
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
        "--tls-listen",
        listen.as_str(),
    ];
    args.extend_from_slice(extra);
    let (gw, store) = local_gateway(&args);
    (gw, store, tls_port)
}

/// storescu over TLS as `calling`, with the client key/certificate `client` (None: anonymous TLS).
fn storescu_tls(pki: &Path, port: u16, calling: &str, client: Option<&str>) -> String {
    let p = |f: &str| pki.join(f).to_str().unwrap().to_string();
    let port = port.to_string();
    let file = testdata("ct-implicit-le.dcm");
    let mut args: Vec<String> = vec!["-v".into()];
    match client {
        Some(c) => args.extend([
            "+tls".into(),
            p(&format!("{c}.key")),
            p(&format!("{c}.crt")),
        ]),
        None => args.push("+tla".into()),
    }
    args.extend([
        "+cf".into(),
        p("ca.crt"),
        "-aec".into(),
        AE.into(),
        "-aet".into(),
        calling.into(),
        "-xi".into(),
        "127.0.0.1".into(),
        port,
        file.to_str().unwrap().into(),
    ]);
    text(&dcmtk(
        "storescu",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
}

#[test]
fn storescu_over_tls_stores_and_the_plain_port_keeps_working() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let (gw, store, tls_port) = tls_gateway(pki.path(), &[]);
    let out = storescu_tls(pki.path(), tls_port, "STORESCU", Some("client"));
    assert!(
        out.contains("Received Store Response (Success)"),
        "{out}\n{}",
        gw.log_text()
    );
    assert_eq!(stored_objects(store.path()).len(), 1);
    // The plain listener is still there beside the TLS one.
    assert!(echoscu(gw.port, AE, "ECHOSCU").status.success());
    assert!(gw.log_text().contains("tls=true"));
}

#[test]
fn mutual_tls_accepts_trusted_client_certificates_only() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let ca = pki.path().join("ca.crt");
    let (gw, store, tls_port) = tls_gateway(
        pki.path(),
        &["--tls-client-ca", ca.to_str().unwrap(), "--tls-only"],
    );
    let ok = storescu_tls(pki.path(), tls_port, "STORESCU", Some("client"));
    assert!(ok.contains("Received Store Response (Success)"), "{ok}");

    let anonymous = storescu_tls(pki.path(), tls_port, "STORESCU", None);
    assert!(
        !anonymous.contains("Received Store Response"),
        "no client certificate must be refused: {anonymous}"
    );
    let untrusted = storescu_tls(pki.path(), tls_port, "STORESCU", Some("rogue"));
    assert!(
        !untrusted.contains("Received Store Response"),
        "an untrusted client certificate must be refused: {untrusted}"
    );
    assert_eq!(stored_objects(store.path()).len(), 1);
    assert!(
        gw.log_text().contains("TLS handshake failed"),
        "{}",
        gw.log_text()
    );
    // --tls-only: no plain listener.
    assert!(!echoscu(gw.port, AE, "ECHOSCU").status.success());
}

#[test]
fn a_calling_ae_title_bound_to_a_certificate_is_refused_with_another_certificate() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let ca = pki.path().join("ca.crt");
    let (gw, _store, tls_port) = tls_gateway(
        pki.path(),
        &[
            "--tls-client-ca",
            ca.to_str().unwrap(),
            "--tls-ae-binding",
            "CT1=modality1",
        ],
    );
    let ok = storescu_tls(pki.path(), tls_port, "CT1", Some("client"));
    assert!(ok.contains("Received Store Response (Success)"), "{ok}");
    let wrong = storescu_tls(pki.path(), tls_port, "CT1", Some("client2"));
    assert!(wrong.contains("Calling AE Title Not Recognized"), "{wrong}");
    let unbound = storescu_tls(pki.path(), tls_port, "MR1", Some("client2"));
    assert!(
        unbound.contains("Received Store Response (Success)"),
        "AE titles without a binding are unaffected: {unbound}"
    );
    assert!(
        gw.log_text()
            .contains("calling AE title not bound to the client certificate")
    );
}

#[test]
fn sighup_reloads_the_certificate_for_new_associations() {
    let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make_pki(old.path());
    make_pki(new.path()); // another CA
    let live = tempfile::tempdir().unwrap();
    for f in [
        "server.crt",
        "server.key",
        "ca.crt",
        "client.key",
        "client.crt",
    ] {
        std::fs::copy(old.path().join(f), live.path().join(f)).unwrap();
    }
    let (gw, _store, tls_port) = tls_gateway(live.path(), &[]);
    assert!(storescu_tls(old.path(), tls_port, "STORESCU", Some("client")).contains("(Success)"));
    // Not trusted yet: the gateway still presents the old certificate.
    assert!(!storescu_tls(new.path(), tls_port, "STORESCU", Some("client")).contains("(Success)"));

    for f in ["server.crt", "server.key"] {
        std::fs::copy(new.path().join(f), live.path().join(f)).unwrap();
    }
    Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    gw.wait_for_log("TLS certificate and key reloaded");
    assert!(
        storescu_tls(new.path(), tls_port, "STORESCU", Some("client")).contains("(Success)"),
        "{}",
        gw.log_text()
    );
}

#[test]
fn certificate_and_key_from_environment_variables_as_ecs_passes_secrets() {
    // TLS pass-through in infra/gateway.yaml hands the Secrets Manager secrets to the container as
    // DICOM_GATEWAY_TLS_CERT_PEM / _KEY_PEM / _CLIENT_CA_PEM: PEM text, not file paths.
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let read = |f: &str| std::fs::read_to_string(pki.path().join(f)).unwrap();
    let (cert, key, ca) = (read("server.crt"), read("server.key"), read("ca.crt"));
    let tls_port = free_port();
    let listen = format!("127.0.0.1:{tls_port}");
    let store = tempfile::tempdir().unwrap();
    let gw = Gateway::start(
        &[
            "--store-dir",
            store.path().to_str().unwrap(),
            "--tls-listen",
            &listen,
        ],
        &[
            ("DICOM_GATEWAY_TLS_CERT_PEM", &cert),
            ("DICOM_GATEWAY_TLS_KEY_PEM", &key),
            ("DICOM_GATEWAY_TLS_CLIENT_CA_PEM", &ca),
        ],
    );
    let out = storescu_tls(pki.path(), tls_port, "STORESCU", Some("client"));
    assert!(
        out.contains("Received Store Response (Success)"),
        "{out}\n{}",
        gw.log_text()
    );
    assert_eq!(stored_objects(store.path()).len(), 1);
    let anonymous = storescu_tls(pki.path(), tls_port, "STORESCU", None);
    assert!(
        !anonymous.contains("Received Store Response (Success)"),
        "the client CA from the environment requires a client certificate: {anonymous}"
    );
    assert!(
        !gw.log_text().contains("BEGIN"),
        "no PEM material in the log"
    );
}
