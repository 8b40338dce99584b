//! Session limits end to end against the real binary: message size, recipients, line lengths,
//! timeouts, connection caps and the bad-command counter.

mod common;

use common::{Client, Options, Relay};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

const EHLO: &str = "EHLO client.test";

fn relay_with(limits: &str) -> Relay {
    Relay::start(Options {
        limits: limits.to_string(),
        ..Options::default()
    })
}

/// A connected client after EHLO.
async fn ready(relay: &Relay) -> Client<TcpStream> {
    let mut c = relay.connect().await;
    c.cmd(EHLO, "250-relay.test greets").await;
    c
}

/// MAIL, one RCPT and DATA up to the 354.
async fn start_data(c: &mut Client<TcpStream>) {
    c.cmd("MAIL FROM:<a@example.org>", "250 2.1.0").await;
    c.cmd("RCPT TO:<b@example.net>", "250 2.1.5").await;
    c.cmd("DATA", "354 ").await;
}

/// Connects without expecting a greeting.
async fn raw(relay: &Relay) -> Client<TcpStream> {
    Client::new(TcpStream::connect(relay.smtp).await.unwrap())
}

/// Connects until the greeting is 220 again (a freed slot is released just after its socket
/// closes); panics when it never is.
async fn greeted_again(relay: &Relay) -> Client<TcpStream> {
    for _ in 0..50 {
        let mut c = raw(relay).await;
        if c.reply().await.starts_with("220 ") {
            return c;
        }
    }
    panic!("connection slot never released");
}

#[tokio::test]
async fn message_size_is_enforced_at_mail_and_after_data() {
    let relay = relay_with("max_message_size = 2048");
    let mut c = relay.connect().await;
    let ehlo = c.cmd(EHLO, "250-").await;
    assert!(ehlo.lines().any(|l| l == "250-SIZE 2048"), "{ehlo}");

    let r = c.cmd("MAIL FROM:<a@example.org> SIZE=100000", "552").await;
    assert_eq!(
        r,
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    // The refused MAIL opened no transaction.
    c.cmd("RCPT TO:<b@example.net>", "503 5.5.1").await;

    start_data(&mut c).await;
    let line = format!("{}\r\n", "y".repeat(98));
    c.send(&format!("Subject: big\r\n\r\n{}", line.repeat(50)))
        .await;
    assert_eq!(
        c.cmd(".", "552").await,
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    assert!(relay.queue_json().is_empty());
    let rejected: Vec<_> = relay
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "message.rejected")
        .collect();
    let stages: Vec<_> = rejected
        .iter()
        .map(|e| (e["stage"].clone(), e["code"].clone()))
        .collect();
    assert_eq!(
        stages,
        [("mail".into(), 552.into()), ("data".into(), 552.into())]
    );

    // The session goes on, and a message that fits is taken.
    c.cmd("MAIL FROM:<a@example.org> SIZE=2048", "250 2.1.0")
        .await;
    c.cmd("RCPT TO:<b@example.net>", "250 2.1.5").await;
    c.cmd("DATA", "354 ").await;
    c.send("Subject: small\r\n\r\nfits\r\n").await;
    c.cmd(".", "250 2.0.0 Ok: queued as ").await;
    assert_eq!(relay.queue_json().len(), 1);
}

#[tokio::test]
async fn recipients_per_message_are_capped() {
    let relay = relay_with("max_recipients = 2");
    let mut c = ready(&relay).await;
    c.cmd("MAIL FROM:<a@example.org>", "250 2.1.0").await;
    c.cmd("RCPT TO:<b@example.net>", "250 2.1.5").await;
    c.cmd("RCPT TO:<c@example.net>", "250 2.1.5").await;
    let r = c.cmd("RCPT TO:<d@example.net>", "452").await;
    assert_eq!(r, "452 4.5.3 Too many recipients");
    c.cmd("DATA", "354 ").await;
    c.send(&common::message("a@example.org", "b@example.net", "two"))
        .await;
    c.cmd(".", "250 2.0.0 Ok: queued as ").await;
    let queue = relay.queue_json();
    let rcpts: Vec<_> = queue[0]["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(rcpts, ["b@example.net", "c@example.net"]);
}

#[tokio::test]
async fn long_command_line_is_refused_and_session_goes_on() {
    let relay = relay_with("max_command_line = 600");
    let mut c = ready(&relay).await;
    let r = c.cmd(&format!("NOOP {}", "x".repeat(995)), "500").await;
    assert_eq!(r, "500 5.5.2 Line too long");
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    // Exactly the limit, CRLF included, is fine.
    c.cmd(&format!("NOOP {}", "x".repeat(600 - 7)), "250 2.0.0 Ok")
        .await;
    c.cmd(
        &format!("NOOP {}", "x".repeat(600 - 6)),
        "500 5.5.2 Line too long",
    )
    .await;
}

#[tokio::test]
async fn long_data_line_refuses_the_message() {
    let relay = Relay::start(Options::default());
    let mut c = ready(&relay).await;
    start_data(&mut c).await;
    c.send(&format!("Subject: long\r\n\r\n{}\r\n", "z".repeat(1200)))
        .await;
    let r = c.cmd(".", "500").await;
    assert_eq!(
        r,
        "500 5.5.2 Message line too long (see RFC 5321 4.5.3.1.6); wrap lines or use a transfer encoding"
    );
    assert!(relay.queue_json().is_empty());

    // 998 octets before the CRLF is the most RFC 5321 allows, and is accepted.
    start_data(&mut c).await;
    c.send(&format!("Subject: edge\r\n\r\n{}\r\n", "z".repeat(998)))
        .await;
    c.cmd(".", "250 2.0.0 Ok: queued as ").await;
    assert_eq!(relay.queue_json().len(), 1);
}

#[tokio::test]
async fn idle_command_wait_times_out() {
    let relay = relay_with("command_timeout = \"1s\"");
    let mut c = ready(&relay).await;
    let start = std::time::Instant::now();
    assert_eq!(
        c.reply().await,
        "421 4.4.2 Timeout exceeded, closing connection"
    );
    assert!(c.closed().await);
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test]
async fn stalled_data_times_out() {
    let relay = relay_with("data_timeout = \"1s\"");
    let mut c = ready(&relay).await;
    start_data(&mut c).await;
    c.send("Subject: stalled\r\n\r\nhalf a mess").await;
    assert_eq!(
        c.reply().await,
        "421 4.4.2 Timeout exceeded, closing connection"
    );
    assert!(c.closed().await);
    assert!(relay.queue_json().is_empty());
    let events = relay.audit_events();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "message.rejected" && e["stage"] == "data" && e["code"] == 421),
        "{events:?}"
    );
}

#[tokio::test]
async fn connections_per_ip_are_capped() {
    let relay = relay_with("max_connections_per_ip = 2");
    let mut a = relay.connect().await;
    let mut b = relay.connect().await;
    let mut third = raw(&relay).await;
    assert_eq!(
        third.reply().await,
        "421 4.7.0 Too many connections from your address, try again later"
    );
    assert!(third.closed().await);
    b.cmd("NOOP", "250 2.0.0 Ok").await;
    a.cmd("QUIT", "221").await;
    assert!(a.closed().await);
    let mut again = greeted_again(&relay).await;
    again.cmd(EHLO, "250-").await;
}

/// RFC 8314 §3.3: on an implicit-TLS port the TLS handshake comes first, so a refusal must be
/// sent inside TLS; plaintext `421` bytes reach the client as a TLS protocol error instead.
#[tokio::test]
async fn implicit_tls_refusal_is_sent_inside_tls() {
    let relay = relay_with("max_connections_per_ip = 1");
    let _held = relay.connect().await;
    common::init();
    let tcp = TcpStream::connect(relay.tls).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = relay.tls_connector().connect(name, tcp).await;
    let tls = tls.expect("TLS handshake before the refusal");
    let mut c = Client::new(tls);
    assert_eq!(
        c.reply().await,
        "421 4.7.0 Too many connections from your address, try again later"
    );
    assert!(c.closed().await);
}

#[tokio::test]
async fn total_connections_are_capped() {
    let relay = relay_with("max_connections = 1");
    let mut a = relay.connect().await;
    let mut second = raw(&relay).await;
    assert_eq!(
        second.reply().await,
        "421 4.7.0 Too many connections, try again later"
    );
    assert!(second.closed().await);
    a.cmd("QUIT", "221").await;
    assert!(a.closed().await);
    greeted_again(&relay).await;
}

#[tokio::test]
async fn too_many_bad_commands_close_the_session() {
    let relay = relay_with("max_bad_commands = 3");
    let mut c = ready(&relay).await;
    for _ in 0..3 {
        c.cmd("XYZZY", "500 5.5.1 Command unrecognized").await;
    }
    assert_eq!(
        c.cmd("XYZZY", "421").await,
        "421 4.7.0 Too many errors, closing connection"
    );
    assert!(c.closed().await);
}
