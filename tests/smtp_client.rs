//! The outbound SMTP client against recording sinks on 127.0.0.x: STARTTLS and what it records,
//! the certificate checks, opportunistic fallback, pipelining, dot-stuffing, pre-checks,
//! connection reuse, refusals and time limits.

mod common;

use std::time::Duration;

use common::sink::{Sink, SinkCert, TestCa};
use sealpost::config::ClientTimeouts;
use sealpost::delivery::client::{ClientError, Connection, Outgoing};
use sealpost::delivery::tls::{TlsClients, TlsRequirement, Verify};
use sealpost::policy::TlsFloor;

fn timeouts(secs: u64) -> ClientTimeouts {
    let d = Duration::from_secs(secs);
    ClientTimeouts {
        connect: d,
        greeting: d,
        ehlo: d,
        mail: d,
        rcpt: d,
        data_init: d,
        data_block: d,
        data_term: d,
    }
}

fn required(verify: Verify) -> TlsRequirement {
    TlsRequirement {
        required: true,
        verify,
        min_version: TlsFloor::Tls12,
    }
}

fn no_roots() -> TlsClients {
    TlsClients::new(&[]).unwrap()
}

async fn open_with(
    sink: &Sink,
    mx_host: &str,
    tls: &TlsRequirement,
    clients: &TlsClients,
) -> Result<Connection, ClientError> {
    Connection::open(
        sink.addr(),
        mx_host,
        "relay.test",
        tls,
        clients,
        &timeouts(10),
    )
    .await
}

async fn open(sink: &Sink) -> Connection {
    open_with(
        sink,
        "mx1.test",
        &TlsRequirement::opportunistic(),
        &no_roots(),
    )
    .await
    .unwrap()
}

fn rcpts(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn message<'a>(recipients: &'a [String], body: &'a [u8]) -> Outgoing<'a> {
    Outgoing {
        sender: "app@sender.test",
        recipients,
        body,
        smtputf8: false,
        eight_bit: false,
    }
}

const BODY: &[u8] = b"Subject: hi\r\n\r\nhello\r\n";

#[tokio::test]
async fn starttls_records_an_unverified_self_signed_certificate() {
    let cert = SinkCert::self_signed(&["mx1.test"]);
    let sink = Sink::builder()
        .certificate(cert.clone())
        .start_on("127.0.0.2:0")
        .await;
    let mut conn = open(&sink).await;
    let report = conn.tls().expect("STARTTLS used").clone();
    assert_eq!(report.version, "TLSv1.3");
    assert!(report.cipher.starts_with("TLS13_"), "{}", report.cipher);
    assert!(!report.verified);
    let reason = report.verify_error.as_deref().unwrap();
    assert!(reason.contains("UnknownIssuer"), "{reason}");
    assert_eq!(
        report.fingerprint_sha256.as_deref(),
        Some(hex::encode(cert.fingerprint()).as_str())
    );
    assert!(report.subject.as_deref().unwrap().contains("mx1.test"));
    assert!(report.not_after.is_some());
    assert!(conn.tls_fallback().is_none());
    assert!(conn.capabilities().esmtp && !conn.capabilities().starttls);

    let to = rcpts(&["a@dest.test"]);
    let tx = conn.send(&message(&to, BODY)).await.unwrap();
    assert_eq!(tx.data.unwrap().code, 250);
    conn.quit().await;
    let got = sink.wait_messages(1).await;
    assert!(got[0].tls && sink.sessions()[0].tls);
    assert_eq!(got[0].body, BODY);
}

#[tokio::test]
async fn certificate_from_an_extra_root_verifies_for_its_name() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let clients = TlsClients::new(&[ca.write_pem(dir.path())]).unwrap();
    let sink = Sink::builder()
        .starttls(&ca, "mx1.test")
        .start_on("127.0.0.2:0")
        .await;

    let conn = open_with(&sink, "mx1.test", &required(Verify::Pkix), &clients)
        .await
        .unwrap();
    let report = conn.tls().unwrap();
    assert!(report.verified, "{report:?}");
    assert_eq!(report.verify_error, None);
    assert!(report
        .issuer
        .as_deref()
        .unwrap()
        .contains("sealpost test CA"));
    conn.quit().await;

    // Same chain, another name: examined and recorded, not refused.
    let conn = open_with(
        &sink,
        "mx2.test",
        &TlsRequirement::opportunistic(),
        &clients,
    )
    .await
    .unwrap();
    let report = conn.tls().unwrap();
    assert!(!report.verified);
    assert!(
        report.verify_error.as_deref().unwrap().contains("mx2.test"),
        "{report:?}"
    );
}

#[tokio::test]
async fn pkix_refuses_an_untrusted_certificate() {
    let sink = Sink::builder()
        .certificate(SinkCert::self_signed(&["mx1.test"]))
        .start_on("127.0.0.3:0")
        .await;
    let err = open_with(&sink, "mx1.test", &required(Verify::Pkix), &no_roots())
        .await
        .err()
        .unwrap();
    match err {
        ClientError::TlsRequired(msg) => {
            assert!(msg.contains("certificate did not verify"), "{msg}")
        }
        other => panic!("expected TlsRequired, got {other:?}"),
    }
    assert_eq!(sink.connections(), 1, "never downgraded to plaintext");
}

#[tokio::test]
async fn pinned_fingerprint_must_match() {
    let cert = SinkCert::self_signed(&["mx1.test"]);
    let sink = Sink::builder()
        .certificate(cert.clone())
        .start_on("127.0.0.3:0")
        .await;
    let pinned = required(Verify::Pinned(vec![[7u8; 32], cert.fingerprint()]));
    let conn = open_with(&sink, "mx1.test", &pinned, &no_roots()).await;
    assert!(conn.unwrap().tls().is_some());

    let wrong = required(Verify::Pinned(vec![[7u8; 32]]));
    let err = open_with(&sink, "mx1.test", &wrong, &no_roots()).await;
    assert!(
        matches!(&err, Err(ClientError::TlsRequired(m)) if m.contains("pin")),
        "{:?}",
        err.err()
    );
}

#[tokio::test]
async fn broken_handshake_falls_back_to_a_new_plaintext_connection() {
    let sink = Sink::builder().broken_tls().start_on("127.0.0.4:0").await;
    let mut conn = open(&sink).await;
    assert!(conn.tls().is_none());
    let reason = conn.tls_fallback().expect("fallback recorded");
    assert!(reason.contains("handshake"), "{reason}");
    let to = rcpts(&["a@dest.test"]);
    conn.send(&message(&to, BODY)).await.unwrap();
    let got = sink.wait_messages(1).await;
    assert!(!got[0].tls);
    let sessions = sink.sessions();
    assert_eq!(sessions.len(), 2);
    assert!(sessions[0].commands.iter().any(|c| c == "STARTTLS"));
    assert!(!sessions[1].commands.iter().any(|c| c == "STARTTLS"));
    assert_eq!(got[0].session, 1);
}

#[tokio::test]
async fn broken_handshake_fails_when_tls_is_required() {
    let sink = Sink::builder().broken_tls().start_on("127.0.0.4:0").await;
    let err = open_with(&sink, "mx1.test", &required(Verify::Examine), &no_roots()).await;
    assert!(
        matches!(err, Err(ClientError::TlsHandshake(_))),
        "{:?}",
        err.err()
    );
    assert_eq!(sink.connections(), 1);
}

#[tokio::test]
async fn required_tls_without_starttls_is_refused() {
    let sink = Sink::start_on("127.0.0.5:0").await;
    let err = open_with(&sink, "mx1.test", &required(Verify::Examine), &no_roots()).await;
    match err {
        Err(ClientError::TlsRequired(msg)) => assert_eq!(msg, "STARTTLS not offered"),
        other => panic!("expected TlsRequired, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn tls_floor_is_honoured() {
    let sink = Sink::builder()
        .certificate(SinkCert::self_signed(&["mx1.test"]))
        .tls12_only()
        .start_on("127.0.0.5:0")
        .await;
    let conn = open(&sink).await;
    assert_eq!(conn.tls().unwrap().version, "TLSv1.2");
    conn.quit().await;

    let mut tls13 = required(Verify::Examine);
    tls13.min_version = TlsFloor::Tls13;
    let err = open_with(&sink, "mx1.test", &tls13, &no_roots()).await;
    assert!(
        matches!(err, Err(ClientError::TlsHandshake(_))),
        "{:?}",
        err.err()
    );
}

#[tokio::test]
async fn pipelined_transaction_with_one_refused_recipient() {
    let sink = Sink::builder()
        .pipelining()
        .reject_rcpt("b@dest.test")
        .start_on("127.0.0.6:0")
        .await;
    let mut conn = open(&sink).await;
    assert!(conn.capabilities().pipelining);
    let to = rcpts(&["a@dest.test", "b@dest.test", "c@dest.test"]);
    let tx = conn.send(&message(&to, BODY)).await.unwrap();
    let codes: Vec<u16> = tx.rcpt.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 550, 250]);
    assert_eq!(tx.rcpt[1].enhanced.as_deref(), Some("5.1.1"));
    assert_eq!(tx.data.unwrap().code, 250);
    let got = sink.wait_messages(1).await;
    assert_eq!(got[0].rcpt_to, ["a@dest.test", "c@dest.test"]);
    assert_eq!(got[0].mail_from, "app@sender.test");
    assert!(
        sink.sessions()[0].pipelined,
        "MAIL, RCPT and DATA sent together"
    );
}

#[tokio::test]
async fn no_accepted_recipient_sends_no_message_and_keeps_the_connection_in_sync() {
    for pipelining in [true, false] {
        let builder = Sink::builder().reject_rcpt("b@dest.test");
        let builder = if pipelining {
            builder.pipelining()
        } else {
            builder
        };
        let sink = builder.start_on("127.0.0.6:0").await;
        let mut conn = open(&sink).await;
        let bad = rcpts(&["b@dest.test"]);
        let tx = conn.send(&message(&bad, BODY)).await.unwrap();
        assert_eq!(tx.rcpt[0].code, 550);
        assert!(tx.data.is_none());
        conn.reset().await.unwrap();
        let good = rcpts(&["a@dest.test"]);
        let tx = conn.send(&message(&good, BODY)).await.unwrap();
        assert_eq!(tx.data.unwrap().code, 250);
        assert_eq!(sink.wait_messages(1).await.len(), 1);
        assert!(!sink.sessions()[0].pipelined || pipelining);
    }
}

#[tokio::test]
async fn dot_stuffing_round_trip() {
    let sink = Sink::start_on("127.0.0.7:0").await;
    let mut conn = open(&sink).await;
    let body = b".starts with a dot\r\nmiddle\r\n..two dots\r\n.\r\n. space\r\nlast line".to_vec();
    let to = rcpts(&["a@dest.test"]);
    conn.send(&message(&to, &body)).await.unwrap();
    let got = sink.wait_messages(1).await;
    let mut expected = body.clone();
    expected.extend_from_slice(b"\r\n");
    assert_eq!(
        String::from_utf8_lossy(&got[0].body),
        String::from_utf8_lossy(&expected)
    );
    let big: Vec<u8> = b".line\r\n".repeat(40_000);
    conn.reset().await.unwrap();
    conn.send(&message(&to, &big)).await.unwrap();
    assert_eq!(sink.wait_messages(2).await[1].body, big);
}

#[tokio::test]
async fn size_limit_is_checked_before_sending() {
    let sink = Sink::builder().size(100).start_on("127.0.0.8:0").await;
    let mut conn = open(&sink).await;
    assert_eq!(conn.capabilities().size, Some(100));
    let to = rcpts(&["a@dest.test"]);
    let body = vec![b'x'; 198];
    let err = conn.send(&message(&to, &body)).await.err().unwrap();
    assert!(
        matches!(
            err,
            ClientError::TooBig {
                size: 200,
                limit: 100
            }
        ),
        "{err:?}"
    );
    conn.send(&message(&to, BODY)).await.unwrap();
    let got = sink.wait_messages(1).await;
    assert_eq!(got[0].mail_params, format!("SIZE={}", BODY.len()));
    assert_eq!(
        sink.commands()
            .iter()
            .filter(|c| c.starts_with("MAIL"))
            .count(),
        1
    );
}

#[tokio::test]
async fn smtputf8_must_be_offered_when_needed() {
    let sink = Sink::start_on("127.0.0.8:0").await;
    let mut conn = open(&sink).await;
    let to = rcpts(&["jörg@dest.test"]);
    let mut msg = message(&to, BODY);
    msg.smtputf8 = true;
    let err = conn.send(&msg).await.err().unwrap();
    assert!(matches!(err, ClientError::NeedsSmtpUtf8), "{err:?}");
    assert!(!sink.commands().iter().any(|c| c.starts_with("MAIL")));

    let sink = Sink::builder().smtputf8().start_on("127.0.0.8:0").await;
    let mut conn = open(&sink).await;
    msg.eight_bit = true;
    conn.send(&msg).await.unwrap();
    let got = sink.wait_messages(1).await;
    assert_eq!(got[0].mail_params, "BODY=8BITMIME SMTPUTF8");
    assert_eq!(got[0].rcpt_to, ["jörg@dest.test"]);
}

#[tokio::test]
async fn one_connection_carries_two_messages() {
    let sink = Sink::builder().pipelining().start_on("127.0.0.9:0").await;
    let mut conn = open(&sink).await;
    let to = rcpts(&["a@dest.test"]);
    conn.send(&message(&to, b"first\r\n")).await.unwrap();
    conn.reset().await.unwrap();
    conn.send(&message(&to, b"second\r\n")).await.unwrap();
    conn.quit().await;
    let got = sink.wait_messages(2).await;
    assert_eq!(got[0].body, b"first\r\n");
    assert_eq!(got[1].body, b"second\r\n");
    assert_eq!(sink.connections(), 1);
    assert_eq!(sink.sessions()[0].commands.last().unwrap(), "QUIT");
}

#[tokio::test]
async fn refused_greeting() {
    let sink = Sink::builder()
        .greeting("451 4.3.2 Try again later")
        .start_on("127.0.0.10:0")
        .await;
    let err = open_with(
        &sink,
        "mx1.test",
        &TlsRequirement::opportunistic(),
        &no_roots(),
    )
    .await;
    match err {
        Err(ClientError::Rejected { stage, reply }) => {
            assert_eq!(stage, "greeting");
            assert_eq!(reply.code, 451);
            assert_eq!(reply.enhanced.as_deref(), Some("4.3.2"));
        }
        other => panic!("expected Rejected, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn silent_server_times_out() {
    let sink = Sink::builder().hang().start_on("127.0.0.10:0").await;
    let err = Connection::open(
        sink.addr(),
        "mx1.test",
        "relay.test",
        &TlsRequirement::opportunistic(),
        &no_roots(),
        &timeouts(1),
    )
    .await;
    assert!(
        matches!(err, Err(ClientError::Timeout { stage: "greeting" })),
        "{:?}",
        err.err()
    );
}

#[tokio::test]
async fn refused_mail_keeps_a_pipelined_connection_in_sync() {
    let sink = Sink::builder()
        .pipelining()
        .mail_reply("451 4.3.0 Try later")
        .start_on("127.0.0.11:0")
        .await;
    let mut conn = open(&sink).await;
    let to = rcpts(&["a@dest.test", "b@dest.test"]);
    match conn.send(&message(&to, BODY)).await {
        Err(ClientError::Rejected { stage, reply }) => {
            assert_eq!((stage, reply.code), ("MAIL", 451));
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    conn.reset().await.unwrap();
}

#[tokio::test]
async fn refused_data_and_dropped_data() {
    let sink = Sink::builder()
        .data_reply("451 4.3.0 Not now")
        .start_on("127.0.0.12:0")
        .await;
    let mut conn = open(&sink).await;
    let to = rcpts(&["a@dest.test"]);
    let tx = conn.send(&message(&to, BODY)).await.unwrap();
    assert_eq!(tx.rcpt[0].code, 250);
    assert_eq!(tx.data.unwrap().code, 451);

    let sink = Sink::builder()
        .drop_in_data()
        .start_on("127.0.0.12:0")
        .await;
    let mut conn = open(&sink).await;
    let err = conn.send(&message(&to, BODY)).await.err().unwrap();
    assert!(matches!(err, ClientError::Io { .. }), "{err:?}");
}

#[tokio::test]
async fn data_accepted_after_every_recipient_failed_is_ended_with_a_bare_dot() {
    // RFC 2920 §3.1: a server may answer a pipelined DATA with 354 although no RCPT succeeded;
    // the client must then send only the terminating dot.
    let sink = Sink::builder()
        .pipelining()
        .reject_rcpt("b@dest.test")
        .data_reply("354 Go ahead anyway")
        .start_on("127.0.0.13:0")
        .await;
    let mut conn = open(&sink).await;
    let bad = rcpts(&["b@dest.test"]);
    let tx = conn.send(&message(&bad, BODY)).await.unwrap();
    assert!(tx.data.is_none());
    conn.reset().await.unwrap();
    let commands = sink.commands();
    let data = commands.iter().position(|c| c == "DATA").unwrap();
    assert_eq!(commands[data + 1..], [".", "RSET"]);
}

#[tokio::test]
async fn ip_literal_mx_host_is_examined_without_sni() {
    let sink = Sink::builder()
        .certificate(SinkCert::self_signed(&["mx1.test"]))
        .start_on("127.0.0.13:0")
        .await;
    let conn = open_with(
        &sink,
        "127.0.0.13",
        &TlsRequirement::opportunistic(),
        &no_roots(),
    )
    .await
    .unwrap();
    let report = conn.tls().unwrap();
    assert!(!report.verified);
    assert!(report.verify_error.is_some());
}
