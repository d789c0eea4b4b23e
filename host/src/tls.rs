//! HTTPS as Poseidon serves it: TLS 1.3 only, certificate and key from PEM files.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Errors reading the certificate or key (they name the configuration key).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be used.
    #[error("server.tls.certfile {path}: {message}")]
    Certificate {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The key file could not be used.
    #[error("server.tls.keyfile {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// A rustls server configuration offering only TLS 1.3 and HTTP/1.1 (for WebSocket upgrades).
pub fn server_config(cert: &str, key: &str) -> Result<rustls::ServerConfig, TlsError> {
    let cert_error = |message: String| TlsError::Certificate {
        path: cert.into(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.into(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cert_error(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Key {
            path: key.into(),
            message: e.to_string(),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
