//! DICOM over TLS (PS3.15 Annex B), in process with rustls.
//!
//! Only TLS 1.3 and 1.2 with rustls's default (forward-secret, AEAD) cipher suites are offered.
//! With a client CA bundle, clients must present a certificate it signed (mutual TLS), and
//! `--tls-ae-binding` can tie a calling AE title to the certificate's subject common name. The
//! certificate, key and CA bundle are read again on SIGHUP: new associations use the new files,
//! running ones are untouched, and a bad file keeps the previous configuration. The material can also
//! come inline from environment variables (`DICOM_GATEWAY_TLS_CERT_PEM`, ...), which is how ECS passes
//! Secrets Manager secrets to a container (TLS pass-through in `infra/gateway.yaml`); inline material
//! cannot change, so a reload re-reads only files.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

/// Why the TLS material could not be loaded (a reload then keeps the previous one).
#[derive(Debug, Error)]
pub(crate) enum TlsError {
    #[error("cannot read {source_name}: {message}")]
    Read {
        source_name: String,
        message: String,
    },
    #[error("{0}")]
    Config(String),
}

/// One piece of PEM material: a file (re-read on SIGHUP), or text given inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pem {
    File(PathBuf),
    /// The PEM text itself, and the environment variable it came from (for messages).
    Inline {
        text: String,
        from: &'static str,
    },
}

impl Pem {
    /// Where it comes from, for error messages (never the material itself).
    fn source_name(&self) -> String {
        match self {
            Pem::File(path) => path.display().to_string(),
            Pem::Inline { from, .. } => from.to_string(),
        }
    }

    fn read(&self) -> Result<Vec<u8>, TlsError> {
        match self {
            Pem::File(path) => std::fs::read(path).map_err(|e| self.error(e)),
            Pem::Inline { text, .. } => Ok(text.as_bytes().to_vec()),
        }
    }

    fn error(&self, e: impl std::fmt::Display) -> TlsError {
        TlsError::Read {
            source_name: self.source_name(),
            message: e.to_string(),
        }
    }

    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let pem = self.read()?;
        CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| self.error(e))
    }
}

/// Where the TLS material comes from.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub cert: Pem,
    pub key: Pem,
    pub client_ca: Option<Pem>,
}

/// Builds the server configuration from the material.
pub(crate) fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = files.cert.certificates()?;
    if certs.is_empty() {
        return Err(files.cert.error("no PEM certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_slice(&files.key.read()?).map_err(|e| files.key.error(e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in ca.certificates()? {
                roots.add(cert).map_err(|e| ca.error(e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| {
                    TlsError::Config(format!("client CA bundle {}: {e}", ca.source_name()))
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Config(format!(
            "certificate and key do not form a usable pair: {e}"
        ))
    })
}

/// The current acceptor, replaced on reload.
pub(crate) struct TlsSwitch {
    files: TlsFiles,
    current: RwLock<TlsAcceptor>,
}

impl TlsSwitch {
    pub(crate) fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let config = server_config(&files)?;
        Ok(Arc::new(TlsSwitch {
            current: RwLock::new(TlsAcceptor::from(Arc::new(config))),
            files,
        }))
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the files again; on error the previous configuration stays in use.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) =
            TlsAcceptor::from(Arc::new(config));
        Ok(())
    }
}

/// The subject common name of a DER certificate.
pub(crate) fn subject_cn(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: Pem::File(dir.path().join("nope.pem")),
            key: Pem::File(dir.path().join("nope.key")),
            client_ca: None,
        };
        let e = server_config(&files).unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
        std::fs::write(dir.path().join("empty.pem"), "not pem").unwrap();
        let files = TlsFiles {
            cert: Pem::File(dir.path().join("empty.pem")),
            ..files
        };
        assert!(
            server_config(&files)
                .unwrap_err()
                .to_string()
                .contains("no PEM certificate")
        );
        let inline = TlsFiles {
            cert: Pem::Inline {
                text: "not pem".into(),
                from: "DICOM_GATEWAY_TLS_CERT_PEM",
            },
            ..files
        };
        let e = server_config(&inline).unwrap_err().to_string();
        assert!(e.contains("DICOM_GATEWAY_TLS_CERT_PEM"), "{e}");
        assert!(
            !e.contains("not pem"),
            "the material itself is never echoed: {e}"
        );
    }
}
