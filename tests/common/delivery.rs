//! Helpers for delivery tests: a shared sink port, a config pointing at the test DNS server,
//! and a submission that returns the queue id.

use super::dns::TestDns;
use super::{Client, Options, Relay};
use tokio::net::TcpStream;

/// A free port on 127.0.0.2 that the sinks of one test share.
pub fn shared_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// `[delivery]` gets a fast test schedule (1s retries, 200ms polling) unless `extra_delivery`
/// sets those keys itself; `extra_delivery` may end with further tables such as
/// `[delivery.timeouts]`.
pub fn options(dns: &TestDns, port: u16, extra_delivery: &str) -> Options {
    let defaults = [
        ("retry_schedule", "[\"1s\"]"),
        ("max_retry_interval", "\"1s\""),
        ("poll_interval", "\"200ms\""),
    ];
    let mut delivery = String::new();
    for (key, value) in defaults {
        if !extra_delivery.contains(key) {
            delivery.push_str(&format!("{key} = {value}\n"));
        }
    }
    Options {
        extra: format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\nattempts = 1\n\n\
             [delivery]\n{delivery}{extra_delivery}\n\n[testing]\nmx_port = {port}\n",
            dns.addr
        ),
        ..Options::default()
    }
}

/// Submits one message from `sender` to `rcpts`; returns its queue id.
pub async fn submit(relay: &Relay, sender: &str, rcpts: &[&str], marker: &str) -> String {
    let mut c: Client<TcpStream> = relay.connect().await;
    c.cmd("EHLO app.test", "250").await;
    c.cmd(&format!("MAIL FROM:<{sender}>"), "250").await;
    for r in rcpts {
        c.cmd(&format!("RCPT TO:<{r}>"), "250").await;
    }
    c.cmd("DATA", "354").await;
    c.send(&format!(
        "From: <{sender}>\r\nSubject: results\r\nMessage-ID: <{marker}-id@test>\r\n\r\n..line starting with a dot\r\nbody {marker}\r\n"
    ))
    .await;
    let reply = c.cmd(".", "250 2.0.0 Ok: queued as ").await;
    c.cmd("QUIT", "221").await;
    reply.rsplit(' ').next().unwrap().to_string()
}
