//! Resolver construction: hickory-resolver with the nameservers of `[dns]` (tests point it at a
//! DNS server on loopback), or the system configuration when none are given.
//!
//! Every DNS failure is classified here, once, into [`LookupError`]: a definite negative answer
//! (NXDOMAIN, or NOERROR without records of the asked type) or a temporary failure (SERVFAIL,
//! REFUSED, timeout, network). Callers decide what a negative answer means for them
//! (see `delivery::mx`).

use std::net::IpAddr;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::{DnsError as NetDnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;

use crate::config;

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The system resolver configuration could not be read.
    #[error("cannot read the system DNS configuration: {0}; set [dns] nameservers")]
    System(String),
    /// hickory refused the configuration.
    #[error("cannot build the DNS resolver: {0}; check [dns]")]
    Build(String),
}

/// The outcome of one failed lookup, classified once for every caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The name does not exist (NXDOMAIN): a definite, permanent answer.
    #[error("no such domain (NXDOMAIN)")]
    NxDomain,
    /// The name exists but has no record of the asked type (NOERROR/NODATA): definite.
    #[error("no records of the requested type")]
    NoRecords,
    /// The text cannot be a DNS name (bad characters, label too long): definite.
    #[error("not a valid DNS name: {0}")]
    InvalidName(String),
    /// SERVFAIL, REFUSED, timeout, network or protocol error: try again later.
    #[error("{0}")]
    Temporary(String),
}

impl LookupError {
    /// True for NXDOMAIN, NODATA and invalid names: asking again will give the same answer.
    pub fn is_definite(&self) -> bool {
        !matches!(self, LookupError::Temporary(_))
    }

    /// The one place where hickory's errors are sorted into definite and temporary.
    pub fn classify(err: &NetError) -> LookupError {
        match err {
            NetError::Dns(NetDnsError::NoRecordsFound(none)) => match none.response_code {
                ResponseCode::NXDomain => LookupError::NxDomain,
                ResponseCode::NoError => LookupError::NoRecords,
                code => LookupError::Temporary(format!("DNS error response: {code}")),
            },
            other => LookupError::Temporary(other.to_string()),
        }
    }
}

/// One MX record (RFC 5321 §5.1): lower preference is tried first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    /// Exchange host, lower case, without the trailing dot; `""` for the root (RFC 7505 null MX).
    pub exchange: String,
}

/// The shared resolver (answers are cached by TTL inside hickory).
#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").finish_non_exhaustive()
    }
}

impl Dns {
    /// Builds the resolver: exactly `cfg.nameservers` (UDP, and TCP on the same port) when given,
    /// else the system configuration (/etc/resolv.conf). `timeout` and `attempts` apply to both.
    pub fn new(cfg: &config::Dns) -> Result<Dns, DnsError> {
        let mut builder = if cfg.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| DnsError::System(e.to_string()))?
        } else {
            let provider = hickory_resolver::net::runtime::TokioRuntimeProvider::default();
            let mut builder = TokioResolver::builder_with_config(explicit_config(cfg), provider);
            // Only the configured servers are asked; /etc/hosts would bypass them.
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        };
        apply_options(builder.options_mut(), cfg);
        let resolver = builder
            .build()
            .map_err(|e| DnsError::Build(e.to_string()))?;
        Ok(Dns { resolver })
    }

    /// The underlying hickory resolver, for lookups not wrapped here.
    pub fn resolver(&self) -> &TokioResolver {
        &self.resolver
    }

    /// MX records of `domain`, in the order received (callers sort by preference).
    pub async fn mx(&self, domain: &str) -> Result<Vec<MxRecord>, LookupError> {
        let lookup = self.lookup(domain, RecordType::MX).await?;
        let records: Vec<MxRecord> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some(MxRecord {
                    preference: mx.preference,
                    exchange: host_text(&mx.exchange),
                }),
                _ => None,
            })
            .collect();
        non_empty(records)
    }

    /// A and AAAA addresses of `host`, IPv6 first, then IPv4, each family in the order received.
    ///
    /// Both families are asked at once. Addresses of one family are returned even when the
    /// other family's lookup failed; with no address at all, the error is the more hopeful one:
    /// temporary if either lookup failed temporarily, else NXDOMAIN if either said so, else
    /// NODATA.
    pub async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, LookupError> {
        let (v6, v4) = tokio::join!(
            self.addresses(host, RecordType::AAAA),
            self.addresses(host, RecordType::A)
        );
        match (v6, v4) {
            (Ok(mut v6), Ok(v4)) => {
                v6.extend(v4);
                non_empty(v6)
            }
            (Ok(addrs), Err(e)) | (Err(e), Ok(addrs)) => non_empty(addrs).map_err(|_| e),
            (Err(a), Err(b)) => Err(more_hopeful(a, b)),
        }
    }

    /// TXT records of `name`, each record's character-strings joined (RFC 7208 §3.3 style).
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, LookupError> {
        let lookup = self.lookup(name, RecordType::TXT).await?;
        let texts: Vec<String> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s))
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect();
        non_empty(texts)
    }

    async fn addresses(&self, host: &str, kind: RecordType) -> Result<Vec<IpAddr>, LookupError> {
        let lookup = self.lookup(host, kind).await?;
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect())
    }

    async fn lookup(
        &self,
        name: &str,
        kind: RecordType,
    ) -> Result<hickory_resolver::lookup::Lookup, LookupError> {
        let name = fqdn(name)?;
        self.resolver
            .lookup(name, kind)
            .await
            .map_err(|e| LookupError::classify(&e))
    }
}

/// One name server entry per configured address, UDP and TCP on its port; no search domains.
fn explicit_config(cfg: &config::Dns) -> ResolverConfig {
    let servers = cfg
        .nameservers
        .iter()
        .map(|addr| {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
        })
        .collect();
    ResolverConfig::from_name_servers(servers)
}

fn apply_options(opts: &mut ResolverOpts, cfg: &config::Dns) {
    opts.timeout = cfg.timeout;
    // `[dns] attempts` counts tries; hickory's `attempts` counts retries after the first.
    opts.attempts = cfg.attempts.saturating_sub(1);
}

/// `name` as an absolute DNS name (IDNA for UTF-8, underscores allowed as in `_mta-sts`).
fn fqdn(name: &str) -> Result<Name, LookupError> {
    let trimmed = name.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(LookupError::InvalidName(name.to_string()));
    }
    let mut parsed = Name::from_str_relaxed(trimmed)
        .map_err(|e| LookupError::InvalidName(format!("{name}: {e}")))?;
    parsed.set_fqdn(true);
    Ok(parsed)
}

/// `name` in its ASCII (IDNA A-label) form, lower case, without trailing dot: the form DNS
/// answers use, and the one certificates name.
pub fn ascii_host(name: &str) -> Result<String, LookupError> {
    fqdn(name).map(|n| host_text(&n))
}

/// A host name as text: lower case, no trailing dot; the root becomes `""`.
fn host_text(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

fn non_empty<T>(items: Vec<T>) -> Result<Vec<T>, LookupError> {
    if items.is_empty() {
        Err(LookupError::NoRecords)
    } else {
        Ok(items)
    }
}

/// Of two failures for the same name, the one that leaves the most hope.
fn more_hopeful(a: LookupError, b: LookupError) -> LookupError {
    match (&a, &b) {
        (LookupError::Temporary(_), _) => a,
        (_, LookupError::Temporary(_)) => b,
        (LookupError::NxDomain, _) => a,
        (_, LookupError::NxDomain) => b,
        _ => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_absolute() {
        assert_eq!(fqdn("Example.TEST").unwrap().to_ascii(), "example.test.");
        assert!(fqdn("example.test.").unwrap().is_fqdn());
        assert!(fqdn("_mta-sts.example.test").is_ok());
        assert!(matches!(fqdn(""), Err(LookupError::InvalidName(_))));
        assert!(matches!(fqdn("."), Err(LookupError::InvalidName(_))));
    }

    #[test]
    fn idna_names_become_ascii() {
        assert_eq!(
            ascii_host("Bücher.Example.").unwrap(),
            "xn--bcher-kva.example"
        );
        assert!(ascii_host("a b.test").is_err());
    }

    #[test]
    fn root_exchange_is_empty() {
        assert_eq!(host_text(&Name::root()), "");
        let name = Name::from_ascii("MX1.Example.Test.").unwrap();
        assert_eq!(host_text(&name), "mx1.example.test");
    }

    #[test]
    fn temporary_wins_over_negative() {
        let t = LookupError::Temporary("x".into());
        assert_eq!(more_hopeful(LookupError::NxDomain, t.clone()), t);
        assert_eq!(
            more_hopeful(LookupError::NoRecords, LookupError::NxDomain),
            LookupError::NxDomain
        );
        assert!(!t.is_definite());
    }
}
