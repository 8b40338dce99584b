//! Routing: which hosts to try for a recipient domain, in order
//! ([RFC 5321 §5.1](https://www.rfc-editor.org/rfc/rfc5321#section-5.1),
//! [RFC 7505](https://www.rfc-editor.org/rfc/rfc7505)).
//!
//! Order of decisions for one domain:
//! 1. a `[[delivery.route]]` for exactly that domain (case-insensitive);
//! 2. else `[delivery] relay_host`;
//! 3. else the domain's MX records, by preference, shuffled among equal preference;
//! 4. else, when the domain has no MX records (NOERROR/NODATA), the implicit MX: the domain's
//!    own A/AAAA records with preference 0.
//!
//! Route and relay hosts are resolved with A/AAAA only, never MX (like Postfix's `[host]`).
//! Addresses of a hop are IPv6 first, then IPv4, each family in the order the server sent
//! (hickory's default `Ipv6AndIpv4`); the client tries them in that order.
//!
//! Failures and how they are classified (the only place they are):
//! - NXDOMAIN for the domain → [`MxError::NoSuchDomain`] (permanent, 5.1.2);
//! - a null MX → [`MxError::NullMx`] (permanent, 5.1.10);
//! - no MX and no A/AAAA → [`MxError::NoAddresses`] (permanent, 5.1.2);
//! - MX hosts none of which has an address: permanent [`MxError::NoAddresses`] only when every
//!   host got a definite negative answer (NXDOMAIN or NODATA, as Postfix treats both as "host
//!   not found"); if any host's lookup failed temporarily, [`MxError::Temporary`];
//! - a route or relay host that does not resolve → [`MxError::Temporary`]: it is the
//!   operator's configuration, so mail waits for a fix instead of bouncing;
//! - SERVFAIL, REFUSED, timeouts, network errors → [`MxError::Temporary`] (4.4.3).

use std::collections::HashMap;
use std::net::IpAddr;

use ring::rand::{SecureRandom, SystemRandom};

use crate::dns::{Dns, LookupError, MxRecord};

/// At most this many MX hosts are resolved (lowest preference first); the rest are ignored so
/// one domain with a long list of dead hosts cannot hold a worker for long.
pub const MAX_MX_HOSTS: usize = 10;

/// Default SMTP port of a route or relay host given without one.
pub const DEFAULT_NEXT_HOP_PORT: u16 = 25;

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
    /// No MX and no address records, or no MX host with an address. Permanent, 5.1.2.
    #[error("{0} has no usable MX host and no A/AAAA records")]
    NoAddresses(String),
    /// SERVFAIL, timeout, refused, network: try again later. 4.4.3.
    #[error("DNS lookup for {domain} failed temporarily: {reason}")]
    Temporary { domain: String, reason: String },
}

impl MxError {
    /// True when retrying cannot help: the recipient fails with a DSN.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, MxError::Temporary { .. })
    }

    /// The RFC 3463 enhanced status code for this failure.
    pub fn enhanced(&self) -> &'static str {
        match self {
            // RFC 7505 §4.2
            MxError::NullMx(_) => "5.1.10",
            MxError::NoSuchDomain(_) | MxError::NoAddresses(_) => "5.1.2",
            MxError::Temporary { .. } => "4.4.3",
        }
    }

    fn temporary(domain: &str, reason: impl std::fmt::Display) -> MxError {
        MxError::Temporary {
            domain: domain.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// A `host`, `host:port`, IP literal or `[host]:port` that mail is sent to without MX lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// Lower-case host name or IP address text, without brackets or trailing dot.
    pub host: String,
    pub port: u16,
}

/// A `relay_host` or route `next_hop` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "{key} = {value:?}: {reason}; use \"host\", \"host:port\", \"1.2.3.4:25\" or \"[::1]:25\""
    )]
    InvalidNextHop {
        /// Config key path, e.g. `delivery.route[1].next_hop`.
        key: String,
        value: String,
        reason: &'static str,
    },
    #[error("{key} = {domain:?}: a route for this domain is already defined; keep one")]
    DuplicateDomain { key: String, domain: String },
    #[error("{key} = {domain:?}: not a domain name")]
    InvalidDomain { key: String, domain: String },
}

/// Static routes from the config.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    relay: Option<NextHop>,
    /// Lower-case domain (no trailing dot) → next hop.
    domains: HashMap<String, NextHop>,
}

impl Routes {
    /// Parses `relay_host` and every `[[delivery.route]]`; every problem is reported with its
    /// key path (config validation can call this to report them at `check` time).
    pub fn from_config(cfg: &crate::config::Delivery) -> Result<Routes, Vec<RouteError>> {
        let mut errors = Vec::new();
        let relay = cfg.relay_host.as_deref().and_then(|value| {
            NextHop::parse(value, "delivery.relay_host")
                .map_err(|e| errors.push(e))
                .ok()
        });
        let mut domains = HashMap::new();
        for (i, route) in cfg.routes.iter().enumerate() {
            match parse_route(i, route, &domains) {
                Ok((domain, hop)) => {
                    domains.insert(domain, hop);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(Routes { relay, domains })
        } else {
            Err(errors)
        }
    }

    /// The configured next hop for `domain`, if any: its route, else the relay host.
    pub fn next_hop(&self, domain: &str) -> Option<(&NextHop, HopSource)> {
        let key = normalize_domain(domain);
        if let Some(hop) = self.domains.get(&key) {
            return Some((hop, HopSource::Route));
        }
        self.relay.as_ref().map(|hop| (hop, HopSource::RelayHost))
    }
}

fn parse_route(
    i: usize,
    route: &crate::config::Route,
    seen: &HashMap<String, NextHop>,
) -> Result<(String, NextHop), RouteError> {
    let key = format!("delivery.route[{i}].domain");
    let domain = normalize_domain(&route.domain);
    if !is_host_name(&domain) {
        return Err(RouteError::InvalidDomain {
            key,
            domain: route.domain.clone(),
        });
    }
    if seen.contains_key(&domain) {
        return Err(RouteError::DuplicateDomain {
            key,
            domain: route.domain.clone(),
        });
    }
    let hop = NextHop::parse(&route.next_hop, &format!("delivery.route[{i}].next_hop"))?;
    Ok((domain, hop))
}

impl NextHop {
    /// Parses `host`, `host:port`, `1.2.3.4`, `1.2.3.4:port`, `::1`, `[::1]:port` or
    /// `[host]:port` (Postfix style); the port defaults to 25. `key` names the setting in errors.
    pub fn parse(value: &str, key: &str) -> Result<NextHop, RouteError> {
        let invalid = |reason| RouteError::InvalidNextHop {
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        let text = value.trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(NextHop {
                host: ip.to_string(),
                port: DEFAULT_NEXT_HOP_PORT,
            });
        }
        let (host, port) = split_host_port(text).map_err(invalid)?;
        let port = match port {
            None => DEFAULT_NEXT_HOP_PORT,
            Some(p) => parse_port(p).map_err(invalid)?,
        };
        Ok(NextHop {
            host: check_host(host).map_err(invalid)?,
            port,
        })
    }

    /// The host as an IP address, when it is an address literal.
    fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

/// Splits `host[:port]` or `[host][:port]` without judging the parts.
fn split_host_port(text: &str) -> Result<(&str, Option<&str>), &'static str> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("missing ']'")?;
        return match after {
            "" => Ok((host, None)),
            _ => after
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or("unexpected text after ']'"),
        };
    }
    match text.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => {
            Err("write an IPv6 address with a port as [addr]:port")
        }
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((text, None)),
    }
}

fn parse_port(text: &str) -> Result<u16, &'static str> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err("the port must be a number from 1 to 65535"),
        Ok(port) => Ok(port),
    }
}

/// An IP literal (as text) or a lower-case host name.
fn check_host(host: &str) -> Result<String, &'static str> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let name = normalize_domain(host);
    if is_host_name(&name) {
        Ok(name)
    } else {
        Err("not a host name or IP address")
    }
}

fn normalize_domain(domain: &str) -> String {
    domain.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Letters, digits, `-`, `_` in labels of 1..=63 bytes, 253 bytes at most (UTF-8 is allowed as
/// the resolver converts it with IDNA).
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        })
}

/// The hops for `domain`: a route or the relay host when configured, else MX records by
/// preference (random among equal preference), else the implicit MX. `port` is the SMTP port
/// dialled for MX hosts (25, or `[testing] mx_port`); routes and the relay host use their own.
pub async fn hops(
    dns: &Dns,
    routes: &Routes,
    domain: &str,
    port: u16,
) -> Result<Vec<Hop>, MxError> {
    if let Some((next, source)) = routes.next_hop(domain) {
        return next_hop(dns, next, source).await.map(|hop| vec![hop]);
    }
    let Ok(domain) = crate::dns::ascii_host(domain) else {
        return Err(MxError::NoSuchDomain(domain.to_string()));
    };
    match dns.mx(&domain).await {
        Ok(records) => mx_hops(dns, &domain, records, port).await,
        Err(LookupError::NoRecords) => implicit_mx(dns, &domain, port).await,
        Err(LookupError::NxDomain | LookupError::InvalidName(_)) => {
            Err(MxError::NoSuchDomain(domain))
        }
        Err(LookupError::Temporary(reason)) => Err(MxError::temporary(&domain, reason)),
    }
}

/// A route or relay host: its A/AAAA records (or its IP literal), never MX.
async fn next_hop(dns: &Dns, next: &NextHop, source: HopSource) -> Result<Hop, MxError> {
    let addrs = match next.ip() {
        Some(ip) => vec![ip],
        None => dns.ips(&next.host).await.map_err(|e| {
            MxError::temporary(&next.host, format_args!("configured next hop: {e}"))
        })?,
    };
    Ok(Hop {
        host: next.host.clone(),
        preference: 0,
        addrs,
        port: next.port,
        source,
    })
}

/// RFC 5321 §5.1: "If an empty list of MXs is returned, the address is treated as if it was
/// associated with an implicit MX RR, with a preference of 0, pointing to that host."
async fn implicit_mx(dns: &Dns, domain: &str, port: u16) -> Result<Vec<Hop>, MxError> {
    match dns.ips(domain).await {
        Ok(addrs) => Ok(vec![Hop {
            host: domain.to_string(),
            preference: 0,
            addrs,
            port,
            source: HopSource::ImplicitMx,
        }]),
        Err(LookupError::NoRecords) => Err(MxError::NoAddresses(domain.to_string())),
        Err(LookupError::NxDomain | LookupError::InvalidName(_)) => {
            Err(MxError::NoSuchDomain(domain.to_string()))
        }
        Err(LookupError::Temporary(reason)) => Err(MxError::temporary(domain, reason)),
    }
}

/// Explicit MX records: null MX check, order, then each host's addresses.
async fn mx_hops(
    dns: &Dns,
    domain: &str,
    records: Vec<MxRecord>,
    port: u16,
) -> Result<Vec<Hop>, MxError> {
    // RFC 7505 §3: a null MX is a single MX with preference 0 and exchange ".". Records with
    // the root as exchange name no host, so they are skipped among others; if every record is
    // one, the domain has declared it takes no mail.
    if records.iter().all(|r| r.exchange.is_empty()) {
        return Err(MxError::NullMx(domain.to_string()));
    }
    let ordered = order_by_preference(records);
    let mut hops = Vec::new();
    let mut temporary = None;
    for record in ordered.into_iter().take(MAX_MX_HOSTS) {
        match dns.ips(&record.exchange).await {
            Ok(addrs) => hops.push(Hop {
                host: record.exchange,
                preference: record.preference,
                addrs,
                port,
                source: HopSource::Mx,
            }),
            Err(LookupError::Temporary(reason)) => {
                temporary = Some(format!("MX host {}: {reason}", record.exchange));
            }
            Err(_) => {} // definite: this host has no address; try the others
        }
    }
    match (hops.is_empty(), temporary) {
        (false, _) => Ok(hops),
        (true, Some(reason)) => Err(MxError::temporary(domain, reason)),
        (true, None) => Err(MxError::NoAddresses(domain.to_string())),
    }
}

/// RFC 5321 §5.1: sort by preference (lowest first); among equal preference, "the sender-SMTP
/// MUST randomize them to spread the load". Root exchanges and repeated hosts are dropped
/// (a host listed twice keeps its lowest preference).
pub fn order_by_preference(mut records: Vec<MxRecord>) -> Vec<MxRecord> {
    records.retain(|r| !r.exchange.is_empty());
    shuffle(&mut records);
    // Stable sort after the shuffle: random order within each preference.
    records.sort_by_key(|r| r.preference);
    let mut seen = std::collections::HashSet::new();
    records.retain(|r| seen.insert(r.exchange.clone()));
    records
}

/// Fisher–Yates with the system CSPRNG (ring); on the (theoretical) RNG failure the order is
/// left as received, which is still a valid MX order.
fn shuffle<T>(items: &mut [T]) {
    let rng = SystemRandom::new();
    for i in (1..items.len()).rev() {
        let mut buf = [0u8; 4];
        if rng.fill(&mut buf).is_err() {
            return;
        }
        let j = (u32::from_le_bytes(buf) as usize) % (i + 1);
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(host: &str, port: u16) -> NextHop {
        NextHop {
            host: host.to_string(),
            port,
        }
    }

    #[test]
    fn next_hop_syntax() {
        let p = |s| NextHop::parse(s, "k");
        assert_eq!(p("Mail.Example.COM."), Ok(hop("mail.example.com", 25)));
        assert_eq!(
            p("mail.example.com:2525"),
            Ok(hop("mail.example.com", 2525))
        );
        assert_eq!(
            p("[mail.example.com]:587"),
            Ok(hop("mail.example.com", 587))
        );
        assert_eq!(p("[mail.example.com]"), Ok(hop("mail.example.com", 25)));
        assert_eq!(p("127.0.0.1"), Ok(hop("127.0.0.1", 25)));
        assert_eq!(p("127.0.0.1:2526"), Ok(hop("127.0.0.1", 2526)));
        assert_eq!(p("::1"), Ok(hop("::1", 25)));
        assert_eq!(p("[::1]:2526"), Ok(hop("::1", 2526)));
        for bad in [
            "",
            "host:",
            "host:0",
            "host:99999",
            "::1:x",
            "[::1",
            "[::1]x",
            "a b",
            "a..b",
        ] {
            assert!(p(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn equal_preferences_are_shuffled_and_sorted() {
        let rec = |p, h: &str| MxRecord {
            preference: p,
            exchange: h.to_string(),
        };
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..64 {
            let out = order_by_preference(vec![
                rec(20, "c"),
                rec(10, "a"),
                rec(10, "b"),
                rec(30, "a"),
                rec(5, ""),
            ]);
            let hosts: Vec<_> = out.iter().map(|r| r.exchange.as_str()).collect();
            assert_eq!(hosts.len(), 3);
            assert_eq!(hosts[2], "c");
            firsts.insert(hosts[0].to_string());
        }
        assert_eq!(firsts.len(), 2);
    }

    #[test]
    fn classification() {
        assert_eq!(MxError::NullMx("d".into()).enhanced(), "5.1.10");
        assert!(MxError::NoSuchDomain("d".into()).is_permanent());
        let t = MxError::temporary("d", "x");
        assert!(!t.is_permanent());
        assert_eq!(t.enhanced(), "4.4.3");
    }
}
