//! Inbound TLS: rustls server config (TLS 1.2 and 1.3 only) from PEM files, or a self-signed
//! certificate generated at start when the config allows it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config;

/// Why inbound TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("tls.key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("generating the self-signed certificate failed: {0}")]
    SelfSigned(String),
    #[error("certificate and key do not form a usable TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider of the crate (ring), installed once per process.
pub fn install_crypto_provider() {
    // Err means another part of the process already installed one; that is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the acceptor, or `None` when the config gives no certificate and no self-signing.
pub fn acceptor(cfg: &config::Tls, hostname: &str) -> Result<Option<TlsAcceptor>, TlsError> {
    let (chain, key) = match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => (load_chain(cert)?, load_key(key)?),
        _ if cfg.self_signed => self_signed(hostname)?,
        _ => return Ok(None),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    server.alpn_protocols.clear();
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Cert {
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if chain.is_empty() {
        return Err(err("no CERTIFICATE block found".to_string()));
    }
    Ok(chain)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn self_signed(
    hostname: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let ck = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    let key = PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
    Ok((vec![ck.cert.der().clone()], PrivateKeyDer::Pkcs8(key)))
}

/// Protocol facts of an established TLS session, for `Received:` and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`.
    pub version: String,
    /// IANA-style suite name, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

impl TlsInfo {
    pub fn of(conn: &rustls::ServerConnection) -> TlsInfo {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(other) => format!("{other:?}"),
            None => "unknown".to_string(),
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_else(|| "unknown".to_string());
        TlsInfo { version, cipher }
    }
}
