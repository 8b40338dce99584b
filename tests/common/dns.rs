//! A real DNS server on 127.0.0.1 (UDP and TCP on one port) for tests, built on hickory-server.
//!
//! It answers authoritatively from a [`Zone`]: a flat table of records for any names, so one
//! server can hold several test domains. A name that has records (or names below it) exists:
//! other types get NOERROR with no answer (NODATA); unknown names get NXDOMAIN. Negative answers
//! carry an SOA so the resolver caches them as a real server's would. Names can be made to
//! answer SERVFAIL or never answer (a timeout). Every query is counted.
//!
//! ```ignore
//! let dns = TestDns::start(
//!     Zone::new()
//!         .mx("example.test", 10, "mx1.example.test")
//!         .a("mx1.example.test", "127.0.0.2")
//!         .null_mx("nomail.test")
//!         .servfail("broken.test"),
//! )
//! .await;
//! // [dns] nameservers = [dns.addr]
//! ```
//! The server runs on the test's tokio runtime and stops when the `TestDns` is dropped.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, MX, SOA, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;

/// TTL of every record served (seconds).
pub const TTL: u32 = 300;

/// The records a [`TestDns`] serves.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    records: HashMap<(String, RecordType), Vec<RData>>,
    servfail: HashSet<String>,
    silent: HashSet<String>,
    /// TTL of positive answers; [`TTL`] unless set with [`Zone::ttl`].
    ttl: Option<u32>,
}

/// ASCII (IDNA A-labels), lower case, no trailing dot.
fn key(name: &str) -> String {
    let name = name.trim_end_matches('.');
    let ascii = Name::from_str_relaxed(name)
        .map(|n| n.to_ascii())
        .unwrap_or_else(|_| name.to_string());
    ascii.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    let mut n = Name::from_str_relaxed(key(name)).expect("valid test DNS name");
    n.set_fqdn(true);
    n
}

impl Zone {
    pub fn new() -> Zone {
        Zone::default()
    }

    /// Serves positive answers with this TTL (0: resolvers must not cache them).
    pub fn ttl(mut self, secs: u32) -> Zone {
        self.ttl = Some(secs);
        self
    }

    /// Any record.
    pub fn record(mut self, name: &str, data: RData) -> Zone {
        self.records
            .entry((key(name), data.record_type()))
            .or_default()
            .push(data);
        self
    }

    pub fn mx(self, name: &str, preference: u16, exchange: &str) -> Zone {
        let exchange = if exchange == "." {
            Name::root()
        } else {
            fqdn(exchange)
        };
        self.record(name, RData::MX(MX::new(preference, exchange)))
    }

    /// RFC 7505 null MX: `name MX 0 .`
    pub fn null_mx(self, name: &str) -> Zone {
        self.mx(name, 0, ".")
    }

    pub fn a(self, name: &str, ip: &str) -> Zone {
        let ip = ip.parse().expect("IPv4 address");
        self.record(name, RData::A(A(ip)))
    }

    pub fn aaaa(self, name: &str, ip: &str) -> Zone {
        let ip = ip.parse().expect("IPv6 address");
        self.record(name, RData::AAAA(AAAA(ip)))
    }

    /// A or AAAA, whichever `ip` is.
    pub fn addr(self, name: &str, ip: IpAddr) -> Zone {
        match ip {
            IpAddr::V4(v4) => self.record(name, RData::A(A(v4))),
            IpAddr::V6(v6) => self.record(name, RData::AAAA(AAAA(v6))),
        }
    }

    pub fn txt(self, name: &str, text: &str) -> Zone {
        self.record(name, RData::TXT(TXT::new(vec![text.to_string()])))
    }

    /// Every query for `name` (any type) gets SERVFAIL.
    pub fn servfail(mut self, name: &str) -> Zone {
        self.servfail.insert(key(name));
        self
    }

    /// Every query for `name` (any type) goes unanswered, so the client times out.
    pub fn silent(mut self, name: &str) -> Zone {
        self.silent.insert(key(name));
        self
    }

    /// True when `name` or a name below it has records.
    fn exists(&self, name: &str) -> bool {
        let suffix = format!(".{name}");
        self.records
            .keys()
            .any(|(n, _)| n == name || n.ends_with(&suffix))
    }

    fn answer(&self, name: &str, rtype: RecordType) -> Answer {
        if self.silent.contains(name) {
            return Answer::Silent;
        }
        if self.servfail.contains(name) {
            return Answer::Code(ResponseCode::ServFail);
        }
        match self.records.get(&(name.to_string(), rtype)) {
            Some(data) => Answer::Records(
                data.iter()
                    .map(|d| Record::from_rdata(fqdn(name), self.ttl.unwrap_or(TTL), d.clone()))
                    .collect(),
            ),
            None if self.exists(name) => Answer::Code(ResponseCode::NoError),
            None => Answer::Code(ResponseCode::NXDomain),
        }
    }
}

enum Answer {
    Records(Vec<Record>),
    /// No records, with this code (NOERROR = NODATA, NXDOMAIN, SERVFAIL).
    Code(ResponseCode),
    Silent,
}

/// Shared between the server task and the test.
#[derive(Default)]
struct State {
    zone: Mutex<Zone>,
    log: Mutex<Vec<(String, RecordType)>>,
}

struct Handler {
    state: Arc<State>,
}

/// A running DNS server; stops when dropped.
pub struct TestDns {
    /// UDP and TCP address, e.g. for `[dns] nameservers`.
    pub addr: SocketAddr,
    state: Arc<State>,
    server: Server<Handler>,
}

impl TestDns {
    /// Binds UDP and TCP on the same free port of 127.0.0.1 and serves `zone`.
    pub async fn start(zone: Zone) -> TestDns {
        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().expect("udp local addr");
        let state = Arc::new(State {
            zone: Mutex::new(zone),
            log: Mutex::default(),
        });
        let mut server = Server::new(Handler {
            state: state.clone(),
        });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(10), 32);
        TestDns {
            addr,
            state,
            server,
        }
    }

    /// Replaces the records served from now on (the resolver's cache may still hold old ones).
    pub fn set_zone(&self, zone: Zone) {
        *self.state.zone.lock().unwrap() = zone;
    }

    /// Every query received so far: (name in lower case without trailing dot, type).
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.state.log.lock().unwrap().clone()
    }

    /// How many queries for `name` (any type) arrived.
    pub fn query_count(&self, name: &str) -> usize {
        let name = key(name);
        self.queries().iter().filter(|(n, _)| *n == name).count()
    }

    /// How many queries for `name` and `rtype` arrived.
    pub fn query_count_of(&self, name: &str, rtype: RecordType) -> usize {
        let name = key(name);
        self.queries()
            .iter()
            .filter(|(n, t)| *n == name && *t == rtype)
            .count()
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        // Stops the accept loops; dropping `server` then aborts its tasks.
        self.server.shutdown_token().cancel();
    }
}

/// A UDP socket and a TCP listener on the same 127.0.0.1 port.
async fn bind_pair() -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    for _ in 0..50 {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind udp");
        let addr = udp.local_addr().expect("udp local addr");
        if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let (name, rtype) = match request.request_info() {
            Ok(info) => (key(&info.query.name().to_ascii()), info.query.query_type()),
            Err(_) => return respond_code(request, response_handle, ResponseCode::FormErr).await,
        };
        self.state.log.lock().unwrap().push((name.clone(), rtype));
        let answer = self.state.zone.lock().unwrap().answer(&name, rtype);
        let records = match answer {
            Answer::Silent => return silent_info(request),
            Answer::Code(code)
                if code != ResponseCode::NoError && code != ResponseCode::NXDomain =>
            {
                return respond_code(request, response_handle, code).await;
            }
            Answer::Code(code) => return respond_negative(request, response_handle, code).await,
            Answer::Records(records) => records,
        };
        let edns = response_edns(request);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let response = builder.build(
            answer_metadata(request, ResponseCode::NoError),
            records.iter(),
            None.iter(),
            None.iter(),
            None.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => silent_info(request),
        }
    }
}

fn answer_metadata(request: &Request, code: ResponseCode) -> Metadata {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = code != ResponseCode::ServFail;
    metadata.recursion_available = true;
    metadata.response_code = code;
    metadata
}

/// RFC 6891 §6.1.1: answer a request with OPT with OPT.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut edns = Edns::new();
        edns.set_max_payload(req.max_payload().max(512));
        edns
    })
}

/// NXDOMAIN or NODATA, with an SOA (owner: the root, which is above every test name).
async fn respond_negative<R: ResponseHandler>(
    request: &Request,
    mut response_handle: R,
    code: ResponseCode,
) -> ResponseInfo {
    let soa = Record::from_rdata(
        Name::root(),
        TTL,
        RData::SOA(SOA::new(
            fqdn("ns.test"),
            fqdn("hostmaster.test"),
            1,
            3600,
            600,
            86400,
            60,
        )),
    );
    let edns = response_edns(request);
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let response = builder.build(
        answer_metadata(request, code),
        None.iter(),
        None.iter(),
        std::iter::once(&soa),
        None.iter(),
    );
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(_) => silent_info(request),
    }
}

/// An error code with no records (SERVFAIL, FORMERR).
async fn respond_code<R: ResponseHandler>(
    request: &Request,
    mut response_handle: R,
    code: ResponseCode,
) -> ResponseInfo {
    let response = MessageResponseBuilder::from_message_request(request)
        .build_no_records(answer_metadata(request, code));
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(_) => silent_info(request),
    }
}

/// What the server logs when nothing was sent.
fn silent_info(request: &Request) -> ResponseInfo {
    ResponseInfo::from(Header {
        metadata: answer_metadata(request, ResponseCode::ServFail),
        counts: HeaderCounts::default(),
    })
}
