//! DICOM over TLS (PS3.15 Annex B), in process with rustls.
//!
//! Only TLS 1.3 and 1.2 with rustls's default (forward-secret, AEAD) cipher suites are offered.
//! With a client CA bundle, clients must present a certificate it signed (mutual TLS), and
//! `--tls-ae-binding` can tie a calling AE title to the certificate's subject common name. The
//! certificate, key and CA bundle are read again on SIGHUP: new associations use the new files,
//! running ones are untouched, and a bad file keeps the previous configuration.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

#[derive(Debug, Error)]
pub(crate) enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

/// Where the TLS material comes from.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Builds the server configuration from the files.
pub(crate) fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| read_err(&files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&files.cert, e))?;
    if certs.is_empty() {
        return Err(read_err(&files.cert, "no PEM certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| read_err(&files.key, e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| read_err(ca, e))? {
                roots
                    .add(cert.map_err(|e| read_err(ca, e))?)
                    .map_err(|e| read_err(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(format!("client CA bundle {}: {e}", ca.display())))?;
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
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
            client_ca: None,
        };
        let e = server_config(&files).unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
        std::fs::write(dir.path().join("empty.pem"), "not pem").unwrap();
        let files = TlsFiles {
            cert: dir.path().join("empty.pem"),
            ..files
        };
        assert!(
            server_config(&files)
                .unwrap_err()
                .to_string()
                .contains("no PEM certificate")
        );
    }
}
