//! The SMTP session end to end against the real binary: EHLO keywords per TLS state, PIPELINING,
//! relay access, AUTH and its throttle, SMTP smuggling, STARTTLS command injection, and command
//! sequencing. Limits live in `smtp_limits.rs`.

mod common;

use common::{Client, Options, Relay};
use rustls::pki_types::ServerName;
use sealpost::listener::auth::encode_b64;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

type TlsClient = Client<TlsStream<TcpStream>>;

const EHLO: &str = "EHLO client.test";
const GREETS: &str = "250-relay.test greets client.test";
const BASE_KEYWORDS: [&str; 5] = [
    "PIPELINING",
    "SIZE 26214400",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
];

/// The EHLO keywords: every line after the first, without `250-` / `250 `.
fn keywords(reply: &str) -> Vec<&str> {
    reply.lines().skip(1).map(|l| &l[4..]).collect()
}

fn with(extra: &str) -> Vec<&str> {
    let mut all = BASE_KEYWORDS.to_vec();
    all.push(extra);
    all
}

/// An AUTH PLAIN initial response.
fn plain(user: &str, password: &str) -> String {
    encode_b64(format!("\0{user}\0{password}").as_bytes())
}

/// Connects on the smtp listener, EHLO, STARTTLS, handshake; EHLO is still to be sent.
async fn starttls(relay: &Relay) -> TlsClient {
    let mut c = relay.connect().await;
    c.cmd(EHLO, GREETS).await;
    c.cmd("STARTTLS", "220 2.0.0 Ready to start TLS").await;
    common::upgrade(relay, c).await
}

/// Connects on the implicit-TLS listener and reads the greeting.
async fn implicit_tls(relay: &Relay) -> TlsClient {
    common::init();
    let tcp = TcpStream::connect(relay.tls).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = relay.tls_connector().connect(name, tcp).await.unwrap();
    let mut c = Client::new(tls);
    c.expect("220 ").await;
    c
}

/// Sends one message (MAIL, RCPT…, DATA) and returns its queue id.
async fn send_message<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    from: &str,
    to: &[&str],
    marker: &str,
) -> String {
    c.cmd(&format!("MAIL FROM:<{from}>"), "250 2.1.0").await;
    for rcpt in to {
        c.cmd(&format!("RCPT TO:<{rcpt}>"), "250 2.1.5").await;
    }
    c.cmd("DATA", "354 ").await;
    c.send(&common::message(from, to[0], marker)).await;
    let reply = c.cmd(".", "250 2.0.0 Ok: queued as ").await;
    reply["250 2.0.0 Ok: queued as ".len()..].to_string()
}

fn events(relay: &Relay, name: &str) -> Vec<Value> {
    relay
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
}

#[tokio::test]
async fn ehlo_keywords_follow_the_tls_state() {
    let relay = Relay::start(Options::default());

    let mut c = relay.connect().await;
    let before = c.cmd(EHLO, GREETS).await;
    assert_eq!(keywords(&before), with("STARTTLS"), "plain EHLO: {before}");
    c.cmd("STARTTLS", "220 2.0.0 Ready to start TLS").await;
    let mut c = common::upgrade(&relay, c).await;
    let after = c.cmd(EHLO, GREETS).await;
    assert_eq!(
        keywords(&after),
        with("AUTH PLAIN LOGIN"),
        "EHLO after STARTTLS: {after}"
    );
    c.cmd("STARTTLS", "503 5.5.1 TLS already active").await;

    let mut t = implicit_tls(&relay).await;
    let implicit = t.cmd(EHLO, GREETS).await;
    assert_eq!(
        keywords(&implicit),
        with("AUTH PLAIN LOGIN"),
        "implicit TLS EHLO: {implicit}"
    );

    let mut h = relay.connect().await;
    let helo = h.cmd("HELO client.test", "250 ").await;
    assert!(
        !helo.contains('\n'),
        "HELO reply must be one line: {helo:?}"
    );
    assert!(helo.contains("relay.test"), "{helo:?}");
}

/// RFC 2034 §4: enhanced status codes appear in every reply "other than initial greeting and any
/// response to HELO or EHLO"; RFC 5321 §4.2 / §4.1.1.1: those replies start with the server's
/// domain (`220 SP Domain`, `250 SP Domain`), which clients log and compare.
#[tokio::test]
async fn greeting_and_helo_reply_start_with_the_domain() {
    let relay = Relay::start(Options::default());
    let mut c = Client::new(TcpStream::connect(relay.smtp).await.unwrap());
    assert_eq!(c.reply().await, "220 relay.test ESMTP sealpost");
    assert_eq!(c.cmd("HELO client.test", "250 ").await, "250 relay.test");
}

#[tokio::test]
async fn pipelined_transaction_is_queued_with_every_recipient() {
    let relay = Relay::start(Options::default());
    let mut c = relay.connect().await;
    c.cmd(EHLO, GREETS).await;
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
        .await;
    assert_eq!(c.reply().await, "250 2.1.0 Sender ok");
    assert_eq!(c.reply().await, "250 2.1.5 Recipient ok");
    assert_eq!(c.reply().await, "250 2.1.5 Recipient ok");
    assert_eq!(c.reply().await, "354 End data with <CR><LF>.<CR><LF>");
    let message = common::message("a@example.org", "b@example.net", "pipe1");
    c.send(&message).await;
    let reply = c.cmd(".", "250 2.0.0 Ok: queued as ").await;
    let id = reply["250 2.0.0 Ok: queued as ".len()..].to_string();
    assert!(!id.is_empty() && !id.contains(' '), "{reply:?}");

    let queue = relay.queue_json();
    assert_eq!(queue.len(), 1, "{queue:?}");
    let m = &queue[0];
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["sender"], "a@example.org");
    let rcpts: Vec<(&str, &str)> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rcpts,
        [("b@example.net", "queued"), ("c@example.net", "queued")]
    );

    let received = events(&relay, "message.received");
    let ev = received.iter().find(|e| e["queue_id"] == id.as_str());
    let ev = ev.unwrap_or_else(|| panic!("no message.received for {id}: {received:?}"));
    assert_eq!(ev["sender"], "a@example.org");
    assert_eq!(ev["recipients"].as_array().unwrap().len(), 2);
    let header = message.split("Message-ID: <").nth(1).unwrap();
    assert_eq!(ev["message_id"], header.split('>').next().unwrap());
}

#[tokio::test]
async fn relay_needs_trusted_network_or_auth() {
    let relay = Relay::start(Options {
        trusted: "[]".to_string(),
        ..Options::default()
    });
    let mut c = relay.connect().await;
    c.cmd(EHLO, GREETS).await;
    c.cmd("MAIL FROM:<a@example.org>", "250 2.1.0").await;
    let denied = c.cmd("RCPT TO:<b@example.net>", "554 5.7.1").await;
    assert_eq!(
        denied,
        "554 5.7.1 Relay access denied; authenticate or send from a trusted network"
    );
    c.cmd("DATA", "554 5.5.1 No valid recipients").await;
    let rejected = events(&relay, "message.rejected");
    assert!(
        rejected.iter().any(|e| e["stage"] == "rcpt"
            && e["code"] == 554
            && e["enhanced"] == "5.7.1"
            && e["recipient"] == "b@example.net"
            && e["sender"] == "a@example.org"),
        "{rejected:?}"
    );

    let mut c = starttls(&relay).await;
    c.cmd(EHLO, GREETS).await;
    let auth = format!("AUTH PLAIN {}", plain("app", "s3cret-pass"));
    c.cmd(&auth, "235 2.7.0 Authentication successful").await;
    let id = send_message(&mut c, "a@example.org", &["b@example.net"], "authed").await;
    let received = events(&relay, "message.received");
    let ev = received
        .iter()
        .find(|e| e["queue_id"] == id.as_str())
        .unwrap();
    assert_eq!(ev["auth_user"], "app");
    assert!(ev["tls"].as_str().unwrap().starts_with("TLSv1."), "{ev}");
}

#[tokio::test]
async fn auth_needs_tls_and_never_logs_the_password() {
    let relay = Relay::start(Options::default());
    let mut c = relay.connect().await;
    c.cmd(EHLO, GREETS).await;
    let good = format!("AUTH PLAIN {}", plain("app", "s3cret-pass"));
    let plaintext = c.cmd(&good, "538 5.7.11").await;
    assert_eq!(
        plaintext,
        "538 5.7.11 Encryption required for requested authentication mechanism"
    );

    let mut c = starttls(&relay).await;
    c.cmd(EHLO, GREETS).await;
    let wrong = format!("AUTH PLAIN {}", plain("app", "wrong-horse-battery"));
    let failed = c.cmd(&wrong, "535 5.7.8").await;
    assert_eq!(failed, "535 5.7.8 Authentication credentials invalid");
    let auths = events(&relay, "session.auth");
    assert!(
        auths
            .iter()
            .any(|e| e["user"] == "app" && e["mechanism"] == "PLAIN" && e["success"] == false),
        "{auths:?}"
    );

    c.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.cmd(&encode_b64(b"app"), "334 UGFzc3dvcmQ6").await;
    c.cmd(
        &encode_b64(b"s3cret-pass"),
        "235 2.7.0 Authentication successful",
    )
    .await;
    c.cmd(&good, "503 5.5.1 Already authenticated").await;
    let auths = events(&relay, "session.auth");
    assert!(
        auths
            .iter()
            .any(|e| e["user"] == "app" && e["mechanism"] == "LOGIN" && e["success"] == true),
        "{auths:?}"
    );

    let audit = std::fs::read_to_string(relay.path("data/audit.jsonl")).unwrap();
    for secret in [
        "wrong-horse-battery",
        "s3cret-pass",
        &plain("app", "wrong-horse-battery"),
        &encode_b64(b"s3cret-pass"),
    ] {
        assert!(!audit.contains(secret), "audit log contains {secret:?}");
    }
}

#[tokio::test]
async fn auth_failures_lock_the_address_out() {
    let relay = Relay::start(Options {
        auth: "max_failures = 2\nlockout = \"10m\"".to_string(),
        ..Options::default()
    });
    let mut c = starttls(&relay).await;
    c.cmd(EHLO, GREETS).await;
    let wrong = format!("AUTH PLAIN {}", plain("app", "nope"));
    c.cmd(&wrong, "535 5.7.8").await;
    c.cmd(&wrong, "535 5.7.8").await;
    assert_eq!(
        c.reply().await,
        "421 4.7.0 Too many failed authentications from your address, try again later"
    );
    assert!(c.closed().await, "session must close after the lockout");

    // A new connection from the locked-out address is refused before the greeting.
    let mut again = Client::new(TcpStream::connect(relay.smtp).await.unwrap());
    again
        .expect("421 4.7.0 Too many failed authentications")
        .await;
    assert!(again.closed().await);
}

/// Sends `data` after DATA and asserts it gets exactly one 550 and nothing else.
async fn refused_whole<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, data: &str) {
    c.cmd("MAIL FROM:<a@example.org>", "250 2.1.0").await;
    c.cmd("RCPT TO:<b@example.net>", "250 2.1.5").await;
    c.cmd("DATA", "354 ").await;
    c.send(data).await;
    assert_eq!(
        c.reply().await,
        "550 5.5.2 Message refused: bare <LF> or <CR> in message data (lines must end with <CR><LF>)",
        "data {data:?}"
    );
    // Had the smuggled transaction run, its replies would come before this one.
    assert_eq!(c.cmd("NOOP", "250").await, "250 2.0.0 Ok", "data {data:?}");
}

#[tokio::test]
async fn smuggled_transactions_are_refused_whole() {
    let relay = Relay::start(Options::default());
    let mut c = relay.connect().await;
    c.cmd(EHLO, GREETS).await;
    let smuggled = "MAIL FROM:<evil@x>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n";
    for end in ["\n.\n", "\n.\r\n", "\r.\r"] {
        let data = format!("Subject: x\r\n\r\nhello{end}{smuggled}");
        refused_whole(&mut c, &data).await;
    }
    assert!(relay.queue_json().is_empty(), "{:?}", relay.queue_json());
    let rejected = events(&relay, "message.rejected");
    let data_rejections = rejected
        .iter()
        .filter(|e| e["stage"] == "data" && e["code"] == 550)
        .count();
    assert_eq!(data_rejections, 3, "{rejected:?}");
    assert!(events(&relay, "message.received").is_empty());

    // A bare LF ends no command either: `RSET\nMAIL …\r\n` is one invalid line, so the
    // smuggled MAIL is never executed.
    c.send("RSET\nMAIL FROM:<evil@x>\r\n").await;
    assert_eq!(
        c.reply().await,
        "500 5.5.2 Bare <LF> or <CR> received; lines must end with <CR><LF>"
    );
    // No transaction was opened by the smuggled MAIL.
    assert_eq!(
        c.cmd("RCPT TO:<v@example.com>", "503").await,
        "503 5.5.1 Need MAIL command first"
    );
}

#[tokio::test]
async fn commands_pipelined_after_starttls_are_discarded() {
    let relay = Relay::start(Options::default());
    let mut c = relay.connect().await;
    c.cmd(EHLO, GREETS).await;
    c.send("STARTTLS\r\nRSET\r\n").await;
    c.expect("220 2.0.0 Ready to start TLS").await;
    let mut c = common::upgrade(&relay, c).await;
    c.send(&format!("{EHLO}\r\n")).await;
    let first = c.reply().await;
    assert!(
        first.starts_with(GREETS),
        "first reply inside TLS must answer EHLO, got {first:?}"
    );
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    c.cmd("QUIT", "221 2.0.0 Bye").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn command_sequencing() {
    let relay = Relay::start(Options::default());
    let mut c = relay.connect().await;
    let r = c.cmd("MAIL FROM:<a@example.org>", "503").await;
    assert_eq!(r, "503 5.5.1 Send EHLO or HELO first");
    let r = c.cmd("RCPT TO:<b@example.net>", "503").await;
    assert_eq!(r, "503 5.5.1 Need MAIL command first");
    c.cmd(EHLO, GREETS).await;
    c.cmd(
        "RCPT TO:<b@example.net>",
        "503 5.5.1 Need MAIL command first",
    )
    .await;
    c.cmd("DATA", "503 5.5.1 Need MAIL command first").await;
    c.cmd("VRFY app", "252 2.5.0").await;
    c.cmd("EXPN staff", "502 5.5.1 EXPN not supported").await;
    c.cmd("MAIL FROM:<a@example.org>", "250 2.1.0").await;
    c.cmd("MAIL FROM:<a@example.org>", "503 5.5.1 Nested MAIL command")
        .await;
    c.cmd("DATA", "554 5.5.1 No valid recipients").await;
    assert_eq!(c.cmd("RSET", "250").await, "250 2.0.0 Ok");
    // RSET ended the transaction.
    c.cmd(
        "RCPT TO:<b@example.net>",
        "503 5.5.1 Need MAIL command first",
    )
    .await;
    assert_eq!(c.cmd("QUIT", "221").await, "221 2.0.0 Bye");
    assert!(c.closed().await);
}

#[tokio::test]
async fn null_sender_and_recipient_syntax() {
    let relay = Relay::start(Options::default());
    let mut c = relay.connect().await;
    c.cmd(EHLO, GREETS).await;
    c.cmd("MAIL FROM:<>", "250 2.1.0 Sender ok").await;
    let r = c.cmd("RCPT TO:<user>", "501").await;
    assert_eq!(r, "501 5.1.3 Bad recipient address syntax");
    c.cmd("RCPT TO:<b@example.net>", "250 2.1.5").await;
    c.cmd("DATA", "354 ").await;
    c.send(&common::message("", "b@example.net", "bounce"))
        .await;
    let reply = c.cmd(".", "250 2.0.0 Ok: queued as ").await;
    let id = &reply["250 2.0.0 Ok: queued as ".len()..];
    let queue = relay.queue_json();
    let m = queue.iter().find(|m| m["id"] == id).expect("queued");
    assert_eq!(m["sender"], "");
    assert_eq!(m["recipients"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn stored_body_is_unstuffed_and_stamped() {
    let relay = Relay::start(Options {
        trusted: "[]".to_string(),
        ..Options::default()
    });
    let mut c = implicit_tls(&relay).await;
    c.cmd(EHLO, GREETS).await;
    let auth = format!("AUTH PLAIN {}", plain("app", "s3cret-pass"));
    c.cmd(&auth, "235 2.7.0").await;
    c.cmd("MAIL FROM:<a@example.org>", "250 2.1.0").await;
    c.cmd("RCPT TO:<b@example.net>", "250 2.1.5").await;
    c.cmd("DATA", "354 ").await;
    c.send("Subject: dots\r\n\r\n..leading dot\r\n..\r\n.\r\n")
        .await;
    let reply = c.expect("250 2.0.0 Ok: queued as ").await;
    let id = &reply["250 2.0.0 Ok: queued as ".len()..];

    let out = relay.cli(&["queue", "show", id, "--body", "--config", "sealpost.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let body = stdout.split_once("---\n").expect("body separator").1;
    let stamp = "Received: from client.test ([127.0.0.1])\r\n\t(using TLSv1.3 with cipher ";
    assert!(body.starts_with(stamp), "{body:?}");
    let by = format!(
        ")\r\n\tby relay.test (sealpost) with ESMTPSA id {id}\r\n\tfor <b@example.net>;\r\n\t"
    );
    assert!(body.contains(&by), "{body:?}");
    assert!(
        body.ends_with("\r\nSubject: dots\r\n\r\n.leading dot\r\n.\r\n"),
        "{body:?}"
    );
}

/// Data whose first line starts with white space would continue our own `Received:` header.
#[tokio::test]
async fn data_cannot_fold_into_the_received_header() {
    let relay = Relay::start(Options::default());
    let mut c = relay.connect().await;
    c.cmd(EHLO, GREETS).await;
    c.cmd("MAIL FROM:<a@example.org>", "250").await;
    c.cmd("RCPT TO:<b@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(" forged-hop (attacker)\r\nSubject: x\r\n\r\nx\r\n")
        .await;
    assert_eq!(
        c.cmd(".", "550").await,
        "550 5.6.0 Message starts with a folded header line"
    );
    assert!(relay.queue_json().is_empty());
}
