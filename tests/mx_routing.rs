//! MX routing against a real DNS server on loopback (tests/common/dns.rs): preference order,
//! shuffling, implicit MX, null MX, NXDOMAIN, SERVFAIL, IPv6, hosts without addresses, and the
//! relay host and per-domain routes that bypass MX.

mod common;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::dns::{TestDns, Zone};
use hickory_server::proto::rr::RecordType;
use sealpost::config;
use sealpost::delivery::mx::{hops, Hop, HopSource, MxError, Routes};
use sealpost::dns::Dns;

const MX_PORT: u16 = 2526;

fn dns_for(server: &TestDns) -> Dns {
    Dns::new(&config::Dns {
        nameservers: vec![server.addr],
        timeout: Duration::from_millis(500),
        attempts: 1,
    })
    .expect("resolver")
}

fn no_routes() -> Routes {
    Routes::from_config(&config::Delivery::default()).expect("no routes")
}

fn routes(relay_host: Option<&str>, routes: &[(&str, &str)]) -> Routes {
    let cfg = config::Delivery {
        relay_host: relay_host.map(str::to_string),
        routes: routes
            .iter()
            .map(|(domain, next_hop)| config::Route {
                domain: domain.to_string(),
                next_hop: next_hop.to_string(),
            })
            .collect(),
        ..config::Delivery::default()
    };
    Routes::from_config(&cfg).expect("valid routes")
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn mx_hop(host: &str, preference: u16, addrs: &[&str]) -> Hop {
    Hop {
        host: host.to_string(),
        preference,
        addrs: addrs.iter().map(|a| ip(a)).collect(),
        port: MX_PORT,
        source: HopSource::Mx,
    }
}

async fn route(dns: &Dns, domain: &str) -> Result<Vec<Hop>, MxError> {
    hops(dns, &no_routes(), domain, MX_PORT).await
}

#[tokio::test]
async fn mx_hosts_in_preference_order() {
    let server = TestDns::start(
        Zone::new()
            .mx("example.test", 30, "mx3.example.test")
            .mx("example.test", 10, "mx1.example.test")
            .mx("example.test", 20, "mx2.example.test")
            .a("mx1.example.test", "127.0.0.11")
            .a("mx2.example.test", "127.0.0.12")
            .a("mx3.example.test", "127.0.0.13"),
    )
    .await;
    let dns = dns_for(&server);
    let got = route(&dns, "Example.TEST").await.unwrap();
    assert_eq!(
        got,
        vec![
            mx_hop("mx1.example.test", 10, &["127.0.0.11"]),
            mx_hop("mx2.example.test", 20, &["127.0.0.12"]),
            mx_hop("mx3.example.test", 30, &["127.0.0.13"]),
        ]
    );
}

#[tokio::test]
async fn equal_preference_is_shuffled_and_answers_are_cached() {
    let server = TestDns::start(
        Zone::new()
            .mx("eq.test", 10, "a.eq.test")
            .mx("eq.test", 10, "b.eq.test")
            .mx("eq.test", 20, "c.eq.test")
            .a("a.eq.test", "127.0.0.21")
            .a("b.eq.test", "127.0.0.22")
            .a("c.eq.test", "127.0.0.23"),
    )
    .await;
    let dns = dns_for(&server);
    let mut orders = HashSet::new();
    for _ in 0..64 {
        let got = route(&dns, "eq.test").await.unwrap();
        let hosts: Vec<String> = got.iter().map(|h| h.host.clone()).collect();
        assert_eq!(hosts.len(), 3);
        assert_eq!(hosts[2], "c.eq.test", "preference 20 always last");
        orders.insert(hosts);
    }
    // Each order has probability 1/2; missing one in 64 tries is a 2^-63 event.
    assert_eq!(orders.len(), 2, "both orders of the equal-preference hosts");
    // RFC 5321 order comes from our shuffle, not from new queries: hickory's cache answers.
    assert_eq!(server.query_count_of("eq.test", RecordType::MX), 1);
    assert_eq!(server.query_count_of("a.eq.test", RecordType::A), 1);
}

#[tokio::test]
async fn implicit_mx_when_no_mx_records() {
    let server = TestDns::start(Zone::new().a("implicit.test", "127.0.0.31")).await;
    let dns = dns_for(&server);
    let got = route(&dns, "implicit.test").await.unwrap();
    assert_eq!(
        got,
        vec![Hop {
            host: "implicit.test".to_string(),
            preference: 0,
            addrs: vec![ip("127.0.0.31")],
            port: MX_PORT,
            source: HopSource::ImplicitMx,
        }]
    );
}

#[tokio::test]
async fn null_mx_is_permanent() {
    let server = TestDns::start(
        Zone::new()
            .null_mx("nomail.test")
            .a("nomail.test", "127.0.0.41"),
    )
    .await;
    let dns = dns_for(&server);
    let err = route(&dns, "nomail.test").await.unwrap_err();
    assert_eq!(err, MxError::NullMx("nomail.test".to_string()));
    assert!(err.is_permanent());
    assert_eq!(err.enhanced(), "5.1.10");
}

#[tokio::test]
async fn nxdomain_is_no_such_domain() {
    let server = TestDns::start(Zone::new().a("other.test", "127.0.0.1")).await;
    let dns = dns_for(&server);
    let err = route(&dns, "missing.test").await.unwrap_err();
    assert_eq!(err, MxError::NoSuchDomain("missing.test".to_string()));
    assert!(err.is_permanent());
    assert_eq!(err.enhanced(), "5.1.2");
}

#[tokio::test]
async fn no_mx_and_no_address_is_no_addresses() {
    let server = TestDns::start(Zone::new().txt("empty.test", "v=spf1 -all")).await;
    let dns = dns_for(&server);
    let err = route(&dns, "empty.test").await.unwrap_err();
    assert_eq!(err, MxError::NoAddresses("empty.test".to_string()));
    assert!(err.is_permanent());
}

#[tokio::test]
async fn servfail_is_temporary() {
    let server = TestDns::start(Zone::new().servfail("broken.test")).await;
    let dns = dns_for(&server);
    let err = route(&dns, "broken.test").await.unwrap_err();
    assert!(
        matches!(&err, MxError::Temporary { domain, .. } if domain == "broken.test"),
        "{err:?}"
    );
    assert!(!err.is_permanent());
    assert_eq!(err.enhanced(), "4.4.3");
}

#[tokio::test]
async fn timeout_is_temporary() {
    let server = TestDns::start(Zone::new().silent("slow.test")).await;
    let dns = dns_for(&server);
    let started = Instant::now();
    let err = route(&dns, "slow.test").await.unwrap_err();
    assert!(matches!(err, MxError::Temporary { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn ipv6_addresses_come_first() {
    let server = TestDns::start(
        Zone::new()
            .mx("v6.test", 10, "mx.v6.test")
            .a("mx.v6.test", "127.0.0.51")
            .aaaa("mx.v6.test", "::1"),
    )
    .await;
    let dns = dns_for(&server);
    let got = route(&dns, "v6.test").await.unwrap();
    assert_eq!(got, vec![mx_hop("mx.v6.test", 10, &["::1", "127.0.0.51"])]);

    let only_v6 = TestDns::start(
        Zone::new()
            .mx("v6only.test", 10, "mx.v6only.test")
            .aaaa("mx.v6only.test", "::1"),
    )
    .await;
    let dns = dns_for(&only_v6);
    let got = route(&dns, "v6only.test").await.unwrap();
    assert_eq!(got, vec![mx_hop("mx.v6only.test", 10, &["::1"])]);
}

#[tokio::test]
async fn mx_host_without_addresses_is_skipped() {
    let server = TestDns::start(
        Zone::new()
            .mx("skip.test", 10, "dead.skip.test")
            .mx("skip.test", 20, "noaddr.skip.test")
            .mx("skip.test", 30, "live.skip.test")
            .txt("noaddr.skip.test", "exists without addresses")
            .a("live.skip.test", "127.0.0.61"),
    )
    .await;
    let dns = dns_for(&server);
    let got = route(&dns, "skip.test").await.unwrap();
    assert_eq!(got, vec![mx_hop("live.skip.test", 30, &["127.0.0.61"])]);
}

#[tokio::test]
async fn no_mx_host_with_addresses() {
    let server = TestDns::start(
        Zone::new()
            .mx("gone.test", 10, "a.gone.test")
            .mx("gone.test", 20, "b.gone.test")
            .txt("b.gone.test", "no addresses here")
            .mx("flaky.test", 10, "a.flaky.test")
            .mx("flaky.test", 20, "b.flaky.test")
            .servfail("b.flaky.test"),
    )
    .await;
    let dns = dns_for(&server);
    // Every MX host definitely has no address (NXDOMAIN, NODATA): permanent.
    let err = route(&dns, "gone.test").await.unwrap_err();
    assert_eq!(err, MxError::NoAddresses("gone.test".to_string()));
    // One host could not be looked up: maybe later.
    let err = route(&dns, "flaky.test").await.unwrap_err();
    assert!(
        matches!(&err, MxError::Temporary { domain, .. } if domain == "flaky.test"),
        "{err:?}"
    );
}

#[tokio::test]
async fn relay_host_overrides_mx() {
    let server = TestDns::start(
        Zone::new()
            .mx("example.test", 10, "mx1.example.test")
            .a("mx1.example.test", "127.0.0.11")
            .mx("relay.test", 10, "not-this.test")
            .a("relay.test", "127.0.0.71")
            .aaaa("relay.test", "::1"),
    )
    .await;
    let dns = dns_for(&server);
    let routes = routes(Some("Relay.Test:2600"), &[]);
    let got = hops(&dns, &routes, "example.test", MX_PORT).await.unwrap();
    assert_eq!(
        got,
        vec![Hop {
            host: "relay.test".to_string(),
            preference: 0,
            addrs: vec![ip("::1"), ip("127.0.0.71")],
            port: 2600,
            source: HopSource::RelayHost,
        }]
    );
    assert_eq!(server.query_count_of("example.test", RecordType::MX), 0);
    assert_eq!(server.query_count_of("relay.test", RecordType::MX), 0);
}

#[tokio::test]
async fn route_overrides_relay_host_and_mx() {
    let server = TestDns::start(
        Zone::new()
            .mx("example.test", 10, "mx1.example.test")
            .a("mx1.example.test", "127.0.0.11")
            .a("relay.test", "127.0.0.71")
            .a("smarthost.test", "127.0.0.81"),
    )
    .await;
    let dns = dns_for(&server);
    let routes = routes(
        Some("relay.test"),
        &[
            ("Example.Test", "[127.0.0.9]:2601"),
            ("named.test", "smarthost.test"),
        ],
    );
    let got = hops(&dns, &routes, "EXAMPLE.test", MX_PORT).await.unwrap();
    assert_eq!(
        got,
        vec![Hop {
            host: "127.0.0.9".to_string(),
            preference: 0,
            addrs: vec![ip("127.0.0.9")],
            port: 2601,
            source: HopSource::Route,
        }]
    );
    let got = hops(&dns, &routes, "named.test", MX_PORT).await.unwrap();
    assert_eq!(got[0].addrs, vec![ip("127.0.0.81")]);
    assert_eq!((got[0].port, got[0].source), (25, HopSource::Route));
    // Other domains go to the relay host.
    let got = hops(&dns, &routes, "elsewhere.test", MX_PORT)
        .await
        .unwrap();
    assert_eq!(got[0].source, HopSource::RelayHost);
    assert_eq!((got[0].host.as_str(), got[0].port), ("relay.test", 25));
    assert!(server.queries().iter().all(|(_, t)| *t != RecordType::MX));
}

#[tokio::test]
async fn unresolvable_route_host_is_temporary() {
    let server = TestDns::start(Zone::new().a("other.test", "127.0.0.1")).await;
    let dns = dns_for(&server);
    let routes = routes(None, &[("example.test", "typo.test:2525")]);
    let err = hops(&dns, &routes, "example.test", MX_PORT)
        .await
        .unwrap_err();
    assert!(matches!(err, MxError::Temporary { .. }), "{err:?}");
}

#[test]
fn bad_next_hops_are_reported_with_their_keys() {
    let route = |domain: &str, next_hop: &str| config::Route {
        domain: domain.to_string(),
        next_hop: next_hop.to_string(),
    };
    let cfg = config::Delivery {
        relay_host: Some("relay.test:0".to_string()),
        routes: vec![
            route("a.test", "[::1]x"),
            route("b.test", "ok.test"),
            route("B.Test.", "other.test"),
        ],
        ..config::Delivery::default()
    };
    let errors = Routes::from_config(&cfg).unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 3, "{text:?}");
    assert!(text[0].starts_with("delivery.relay_host"), "{text:?}");
    assert!(
        text[1].starts_with("delivery.route[0].next_hop"),
        "{text:?}"
    );
    assert!(text[2].starts_with("delivery.route[2].domain"), "{text:?}");
}

#[tokio::test]
async fn utf8_domains_are_looked_up_as_a_labels() {
    let server = TestDns::start(
        Zone::new()
            .mx("bücher.test", 10, "mx.xn--bcher-kva.test")
            .a("mx.xn--bcher-kva.test", "127.0.0.91"),
    )
    .await;
    let dns = dns_for(&server);
    let got = route(&dns, "Bücher.test").await.unwrap();
    assert_eq!(
        got,
        vec![mx_hop("mx.xn--bcher-kva.test", 10, &["127.0.0.91"])]
    );
}
