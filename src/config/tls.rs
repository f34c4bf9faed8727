//! The ingress listener's TLS: certificate chain and key read from PEM files
//! when the config is built, so a reload serves a renewed certificate.
//! Reads files; opens no socket.

use std::path::Path;
use std::sync::Arc;

/// Reads `server.tls`: the certificate chain and key, PEM. Errors name the
/// file, for a config problem at `server.tls.cert` or `server.tls.key`.
pub fn load_tls(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, (&'static str, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| {
            (
                "cert",
                format!("cannot read certificates from {}: {e}", cert.display()),
            )
        })?;
    if chain.is_empty() {
        return Err(("cert", format!("{} holds no PEM certificate", cert.display())));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        (
            "key",
            format!("cannot read a private key from {}: {e}", key.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("cert", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| {
            (
                "key",
                format!("the key does not fit the certificate in {}: {e}", cert.display()),
            )
        })?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}
