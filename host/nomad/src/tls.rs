//! TLS towards Nomad (`nomad.tls.*`): the cluster's CA, and a client certificate for mutual TLS.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::api::NomadError;
use crate::config::TlsConfig;

fn invalid(key: &str, path: &str, e: impl std::fmt::Display) -> NomadError {
    NomadError::Unreachable(format!("nomad.tls.{key} {path}: {e}"))
}

/// A rustls client configuration for the HTTP API and the exec WebSocket. Without `cafile` the
/// public web PKI roots are trusted.
pub fn client_config(tls: &TlsConfig) -> Result<Arc<rustls::ClientConfig>, NomadError> {
    let mut roots = rustls::RootCertStore::empty();
    if tls.cafile.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    } else {
        for cert in CertificateDer::pem_file_iter(&tls.cafile)
            .map_err(|e| invalid("cafile", &tls.cafile, e))?
        {
            let cert = cert.map_err(|e| invalid("cafile", &tls.cafile, e))?;
            roots
                .add(cert)
                .map_err(|e| invalid("cafile", &tls.cafile, e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("active", "", e))?
        .with_root_certificates(roots);
    let config = match (tls.certfile.is_empty(), tls.keyfile.is_empty()) {
        (true, true) => builder.with_no_client_auth(),
        (false, false) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.certfile)
                .map_err(|e| invalid("certfile", &tls.certfile, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| invalid("certfile", &tls.certfile, e))?;
            let key = PrivateKeyDer::from_pem_file(&tls.keyfile)
                .map_err(|e| invalid("keyfile", &tls.keyfile, e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| invalid("keyfile", &tls.keyfile, e))?
        }
        _ => return Err(invalid("certfile", "", "certfile and keyfile go together")),
    };
    Ok(Arc::new(config))
}
