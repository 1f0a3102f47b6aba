//! Optional TLS for the API: when the state directory holds `api.crt` (PEM, the chain) and
//! `api.key` (PEM), the API speaks HTTPS only, with rustls.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;
use vnf_core::{Error, Result};

pub const CERTIFICATE_FILE: &str = "api.crt";
pub const KEY_FILE: &str = "api.key";

/// The TLS configuration from the state directory; None when it holds neither file.
pub fn acceptor(state_dir: &Path) -> Result<Option<TlsAcceptor>> {
    let (certificate, key) = (state_dir.join(CERTIFICATE_FILE), state_dir.join(KEY_FILE));
    let invalid = |path: &Path, reason: String| Error::invalid("TLS file", path.display(), reason);
    match (certificate.exists(), key.exists()) {
        (false, false) => return Ok(None),
        (true, true) => {}
        (has_certificate, _) => {
            let (present, missing) = if has_certificate {
                (&certificate, &key)
            } else {
                (&key, &certificate)
            };
            return Err(invalid(
                present,
                format!(
                    "{} is missing: give both (PEM) for HTTPS, or neither for plain HTTP",
                    missing.display()
                ),
            ));
        }
    }
    let chain = CertificateDer::pem_file_iter(&certificate)
        .and_then(|certificates| certificates.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| invalid(&certificate, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(&certificate, "holds no certificate".into()));
    }
    let private_key = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| invalid(&key, format!("not a PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(chain, private_key)
        })
        .map_err(|e| {
            invalid(
                &key,
                format!("does not go with {}: {e}", certificate.display()),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}
