//! Certificates for sinks: a test CA and server certificates made with rcgen.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::SupportedProtocolVersion;
use tokio_rustls::TlsAcceptor;

/// A test certificate authority that issues sink certificates.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub cert_pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sealpost test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` signed by this CA.
    pub fn issue(&self, names: &[&str]) -> SinkCert {
        let (params, key) = leaf_params(names);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        SinkCert::new(cert, key)
    }

    /// Writes the CA certificate as PEM into `dir` (for `TlsClients::new` / `extra_roots`).
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, &self.cert_pem).unwrap();
        path
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

fn leaf_params(names: &[&str]) -> (rcgen::CertificateParams, rcgen::KeyPair) {
    let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(sans).unwrap();
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, *first);
    }
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    (params, rcgen::KeyPair::generate().unwrap())
}

/// A server certificate and its key.
#[derive(Clone)]
pub struct SinkCert {
    pub der: CertificateDer<'static>,
    pub cert_pem: String,
    key_der: Vec<u8>,
}

impl SinkCert {
    fn new(cert: rcgen::Certificate, key: rcgen::KeyPair) -> SinkCert {
        SinkCert {
            der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_der: key.serialize_der(),
        }
    }

    /// A self-signed certificate for `names` (trusted by nobody).
    pub fn self_signed(names: &[&str]) -> SinkCert {
        let (params, key) = leaf_params(names);
        let cert = params.self_signed(&key).unwrap();
        SinkCert::new(cert, key)
    }

    /// SHA-256 of the certificate (DER).
    pub fn fingerprint(&self) -> [u8; 32] {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.der);
        digest.as_ref().try_into().unwrap()
    }
}

pub(super) fn acceptor(cert: &SinkCert, tls12_only: bool) -> TlsAcceptor {
    let versions: &[&'static SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.der.clone()], key)
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}
