//! Outbound TLS: rustls (TLS 1.2 and 1.3 only), the requirement a decision puts on a
//! connection, and the facts every attempt records about the peer's certificate.
//!
//! Every handshake goes through [`RecordingVerifier`]: it always runs the WebPKI check (WebPKI
//! roots plus `[testing] extra_roots`, for the MX host name) and records the result, then
//! decides by [`Verify`] whether a failure ends the handshake. Handshake signatures are checked
//! in every mode, so a peer must prove possession of its certificate's key even when the chain
//! is only examined (RFC 7435 opportunistic security still records what it saw).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, ProtocolVersion, RootCertStore,
    SignatureScheme,
};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::policy::{CertCheck, Decision, Mode, TlsFloor};

/// How the peer certificate must check out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Examine and record only; never refuse (opportunistic, RFC 7435).
    Examine,
    /// Must verify against the WebPKI roots (plus `[testing] extra_roots`) for the MX host name.
    Pkix,
    /// SHA-256 fingerprint of the end-entity certificate must be one of these.
    Pinned(Vec<[u8; 32]>),
}

/// The TLS requirement of one delivery attempt. The policy can only tighten it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsRequirement {
    /// No plaintext: STARTTLS must be offered and succeed.
    pub required: bool,
    pub verify: Verify,
    /// Lowest acceptable protocol version.
    pub min_version: crate::policy::TlsFloor,
}

impl TlsRequirement {
    /// STARTTLS when offered, certificate examined, plaintext if the handshake fails.
    pub fn opportunistic() -> TlsRequirement {
        TlsRequirement {
            required: false,
            verify: Verify::Examine,
            min_version: crate::policy::TlsFloor::Tls12,
        }
    }

    /// The requirement a recipient's decision asks for. `portal` mail is not delivered by SMTP
    /// (the caller escalates it); should it reach a connection anyway, it is treated like
    /// `require-tls`, never like opportunistic.
    pub fn from_decision(decision: &Decision) -> TlsRequirement {
        let required = match decision.mode {
            Mode::Opportunistic => false,
            Mode::RequireTls | Mode::TlsExclusive | Mode::Portal => true,
        };
        let verify = match decision.certificate {
            CertCheck::Pkix => Verify::Pkix,
            CertCheck::Examine => Verify::Examine,
        };
        TlsRequirement {
            required,
            verify,
            min_version: decision.tls_floor,
        }
    }
}

/// What one TLS session looked like, recorded with every delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsReport {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    pub subject: Option<String>,
    pub issuer: Option<String>,
    /// Hex SHA-256 of the end-entity certificate (DER).
    pub fingerprint_sha256: Option<String>,
    /// RFC 3339 `notAfter` of the end-entity certificate.
    pub not_after: Option<String>,
    /// Verified against the WebPKI roots for the MX host name.
    pub verified: bool,
    /// Why not, when it did not verify.
    pub verify_error: Option<String>,
}

/// Client TLS configurations built once at start: the crypto provider and the WebPKI verifier
/// (WebPKI roots plus any extra roots). Cheap to clone.
#[derive(Debug, Clone)]
pub struct TlsClients {
    provider: Arc<CryptoProvider>,
    webpki: Arc<WebPkiServerVerifier>,
}

impl TlsClients {
    /// `extra_roots`: PEM files trusted in addition to the WebPKI roots (`[testing]`).
    pub fn new(extra_roots: &[PathBuf]) -> Result<TlsClients, String> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for path in extra_roots {
            for cert in load_pem_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: not a usable trust anchor: {e}", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("building the certificate verifier failed: {e}"))?;
        Ok(TlsClients { provider, webpki })
    }

    /// A client config for one connection: its own verifier records into `record`.
    fn config(
        &self,
        req: &TlsRequirement,
        record: Arc<Mutex<Option<Examined>>>,
    ) -> Result<ClientConfig, rustls::Error> {
        let versions: &[&'static rustls::SupportedProtocolVersion] = match req.min_version {
            TlsFloor::Tls13 => &[&rustls::version::TLS13],
            TlsFloor::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let verifier = RecordingVerifier {
            webpki: self.webpki.clone(),
            algorithms: self.provider.signature_verification_algorithms,
            verify: req.verify.clone(),
            record,
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        // A resumed session skips certificate verification; every attempt must record what it saw.
        config.resumption = Resumption::disabled();
        Ok(config)
    }
}

fn load_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    if certs.is_empty() {
        return Err(err(&"no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// What the verifier saw during one handshake.
#[derive(Debug, Clone)]
struct Examined {
    /// The WebPKI result for the MX host name (`Err` holds the reason).
    pkix: Result<(), String>,
    /// Set when [`Verify`] refused the certificate (the handshake was aborted).
    refused: Option<String>,
}

/// Runs the WebPKI check in every mode, records it, and refuses only when [`Verify`] says so.
#[derive(Debug)]
struct RecordingVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
    verify: Verify,
    record: Arc<Mutex<Option<Examined>>>,
}

impl RecordingVerifier {
    /// The refusal for this certificate under `self.verify`, as (reason, error for rustls).
    fn refusal(
        &self,
        end_entity: &CertificateDer<'_>,
        pkix: &Result<(), rustls::Error>,
    ) -> Option<(String, rustls::Error)> {
        match &self.verify {
            Verify::Examine => None,
            Verify::Pkix => pkix.as_ref().err().map(|e| (e.to_string(), e.clone())),
            Verify::Pinned(pins) => {
                let fingerprint = sha256(end_entity);
                (!pins.contains(&fingerprint)).then(|| {
                    (
                        format!(
                            "end-entity fingerprint {} matches no pin",
                            hex::encode(fingerprint)
                        ),
                        rustls::Error::InvalidCertificate(
                            CertificateError::ApplicationVerificationFailure,
                        ),
                    )
                })
            }
        }
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pkix = self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map(|_| ());
        let refusal = self.refusal(end_entity, &pkix);
        let examined = Examined {
            pkix: pkix.map_err(|e| e.to_string()),
            refused: refusal.as_ref().map(|(reason, _)| reason.clone()),
        };
        *self.record.lock().unwrap_or_else(|p| p.into_inner()) = Some(examined);
        match refusal {
            Some((_, error)) => Err(error),
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Why a STARTTLS handshake did not produce a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TlsFailure {
    /// The certificate check of [`Verify::Pkix`] or [`Verify::Pinned`] refused the peer. Never
    /// downgraded to plaintext.
    Refused(String),
    /// The handshake itself failed (protocol, alert, signature, connection closed, bad name).
    Handshake(String),
    /// No handshake within the time limit.
    Timeout,
}

/// Runs the client handshake on `tcp` for `mx_host` under `req`, within `limit`. SNI is sent
/// for a host name and left out for an IP literal.
pub(crate) async fn handshake(
    clients: &TlsClients,
    req: &TlsRequirement,
    mx_host: &str,
    tcp: TcpStream,
    limit: Duration,
) -> Result<(TlsStream<TcpStream>, TlsReport), TlsFailure> {
    let name = server_name(mx_host)?;
    let record = Arc::new(Mutex::new(None));
    let config = clients
        .config(req, record.clone())
        .map_err(|e| TlsFailure::Handshake(format!("client configuration: {e}")))?;
    let connect = TlsConnector::from(Arc::new(config)).connect(name, tcp);
    let result = tokio::time::timeout(limit, connect).await;
    let examined = record.lock().unwrap_or_else(|p| p.into_inner()).take();
    let stream = match result {
        Err(_) => return Err(TlsFailure::Timeout),
        Ok(Err(e)) => {
            return Err(match examined.and_then(|x| x.refused) {
                Some(reason) => TlsFailure::Refused(reason),
                None => TlsFailure::Handshake(e.to_string()),
            })
        }
        Ok(Ok(stream)) => stream,
    };
    let report = report(stream.get_ref().1, examined);
    Ok((stream, report))
}

fn server_name(mx_host: &str) -> Result<ServerName<'static>, TlsFailure> {
    let host = mx_host.trim_end_matches('.');
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string())
        .map_err(|e| TlsFailure::Handshake(format!("{mx_host:?} is not a usable TLS name: {e}")))
}

/// The facts of an established session.
fn report(conn: &rustls::ClientConnection, examined: Option<Examined>) -> TlsReport {
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| {
            let suite = s.suite();
            suite
                .as_str()
                .map_or_else(|| format!("{suite:?}"), str::to_string)
        })
        .unwrap_or_else(|| "unknown".to_string());
    let end_entity = conn.peer_certificates().and_then(|c| c.first());
    let facts = end_entity.map(|c| cert_facts(c)).unwrap_or_default();
    let (verified, verify_error) = match examined.map(|x| x.pkix) {
        Some(Ok(())) => (true, None),
        Some(Err(reason)) => (false, Some(reason)),
        None => (false, Some("no certificate was examined".to_string())),
    };
    TlsReport {
        version,
        cipher,
        subject: facts.subject,
        issuer: facts.issuer,
        fingerprint_sha256: end_entity.map(|c| hex::encode(sha256(c))),
        not_after: facts.not_after,
        verified,
        verify_error,
    }
}

#[derive(Default)]
struct CertFacts {
    subject: Option<String>,
    issuer: Option<String>,
    not_after: Option<String>,
}

fn cert_facts(der: &CertificateDer<'_>) -> CertFacts {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return CertFacts::default();
    };
    let not_after = chrono::DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    CertFacts {
        subject: Some(cert.subject().to_string()),
        issuer: Some(cert.issuer().to_string()),
        not_after,
    }
}

fn sha256(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(mode: Mode, certificate: CertCheck, tls_floor: TlsFloor) -> Decision {
        Decision {
            mode,
            tls_floor,
            certificate,
            on_failure: crate::policy::FailureAction::Defer,
            rule: "t".to_string(),
        }
    }

    #[test]
    fn requirement_from_decision() {
        let d = decision(Mode::Opportunistic, CertCheck::Examine, TlsFloor::Tls12);
        assert_eq!(
            TlsRequirement::from_decision(&d),
            TlsRequirement::opportunistic()
        );
        for mode in [Mode::RequireTls, Mode::TlsExclusive, Mode::Portal] {
            let r =
                TlsRequirement::from_decision(&decision(mode, CertCheck::Pkix, TlsFloor::Tls13));
            assert!(r.required);
            assert_eq!(r.verify, Verify::Pkix);
            assert_eq!(r.min_version, TlsFloor::Tls13);
        }
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("192.0.2.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[2001:db8::1]"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("mx.example.com."),
            Ok(ServerName::DnsName(n)) if n.as_ref() == "mx.example.com"
        ));
    }

    #[test]
    fn extra_roots_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "nothing here").unwrap();
        let err = TlsClients::new(&[path]).unwrap_err();
        assert!(err.contains("no CERTIFICATE"), "{err}");
        assert!(TlsClients::new(&[]).is_ok());
    }
}
