//! Routing: which hosts to try for a recipient domain, in order (RFC 5321 §5.1, RFC 7505).

use std::net::IpAddr;

use crate::dns::Dns;

/// How a hop was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HopSource {
    Mx,
    ImplicitMx,
    Route,
    RelayHost,
}

/// One host to try, with its addresses (IPv6 and IPv4) in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// MX host name (or the route's host); the name a certificate is checked against.
    pub host: String,
    pub preference: u16,
    pub addrs: Vec<IpAddr>,
    pub port: u16,
    pub source: HopSource,
}

/// Why no hop could be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MxError {
    /// RFC 7505 null MX: the domain accepts no mail. Permanent, 5.1.10.
    #[error("{0} publishes a null MX: it accepts no mail")]
    NullMx(String),
    /// The domain does not exist. Permanent, 5.1.2.
    #[error("{0}: no such domain (NXDOMAIN)")]
    NoSuchDomain(String),
    /// No MX and no address records. Permanent, 5.1.2.
    #[error("{0} has no MX and no A/AAAA records")]
    NoAddresses(String),
    /// SERVFAIL, timeout, refused, network: try again later. 4.4.3.
    #[error("DNS lookup for {domain} failed temporarily: {reason}")]
    Temporary { domain: String, reason: String },
}

/// Static routes from the config.
#[derive(Debug, Clone, Default)]
pub struct Routes {}

impl Routes {
    pub fn from_config(_cfg: &crate::config::Delivery) -> Routes {
        todo!()
    }
}

/// The hops for `domain`: a route or the relay host when configured, else MX records by
/// preference (random among equal preference), else the implicit MX. `port` is the SMTP port
/// dialled for MX hosts (25, or `[testing] mx_port`).
pub async fn hops(_dns: &Dns, _routes: &Routes, _domain: &str, _port: u16) -> Result<Vec<Hop>, MxError> {
    todo!()
}
