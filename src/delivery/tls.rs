//! Outbound TLS: rustls (TLS 1.2 and 1.3 only), the requirement a decision puts on a
//! connection, and the facts every attempt records about the peer's certificate.

use serde::Serialize;

use crate::policy::Decision;

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

    /// The requirement a recipient's decision asks for.
    pub fn from_decision(_decision: &Decision) -> TlsRequirement {
        todo!()
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

/// Client TLS configurations built once at start.
pub struct TlsClients {}

impl TlsClients {
    /// `extra_roots`: PEM files trusted in addition to the WebPKI roots (`[testing]`).
    pub fn new(_extra_roots: &[std::path::PathBuf]) -> Result<TlsClients, String> {
        todo!()
    }
}
