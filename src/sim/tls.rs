//! The simulator's TLS: a CA and a `localhost` / `127.0.0.1` certificate generated at
//! start, so tests drive the proxy's real rustls client with an extra CA file.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use super::SimError;

/// A TLS acceptor and the PEM of the CA that signed its certificate.
pub fn acceptor() -> Result<(TlsAcceptor, String), SimError> {
    let err = |e: &dyn std::fmt::Display| SimError::Tls(e.to_string());
    let ca_key = KeyPair::generate().map_err(|e| err(&e))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "klaviyo-proxy simulator CA");
    let ca = ca_params.self_signed(&ca_key).map_err(|e| err(&e))?;
    let key = KeyPair::generate().map_err(|e| err(&e))?;
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).map_err(|e| err(&e))?;
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(|e| err(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| err(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), ca.pem()))
}
