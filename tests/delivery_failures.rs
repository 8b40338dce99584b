//! Delivery when things go wrong: broken TLS, a connection dropped in DATA, a silent server,
//! an operator's bounce, delay warnings, and SIGKILL in the middle of delivering 1,000 messages.

mod common;

use std::collections::HashMap;

use common::delivery::{options, shared_port, submit};
use common::dns::{TestDns, Zone};
use common::sink::Sink;
use common::Client;
use common::Relay;
use tokio::net::TcpStream;

fn example_zone(ip: &str) -> Zone {
    Zone::new()
        .mx("example.test", 10, "mx1.example.test")
        .a("mx1.example.test", ip)
        .mx("clinic.test", 10, "mx.clinic.test")
        .a("mx.clinic.test", "127.0.0.5")
}

fn event(e: &serde_json::Value, name: &str, id: &str) -> bool {
    e["event"] == name && e["queue_id"] == id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_tls_handshake_falls_back_to_plaintext() {
    let port = shared_port();
    let sink = Sink::builder()
        .broken_tls()
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let dns = TestDns::start(example_zone("127.0.0.2")).await;
    let relay = Relay::start(options(&dns, port, ""));
    let id = submit(
        &relay,
        "app@clinic.test",
        &["pat@example.test"],
        "broken-tls",
    )
    .await;
    let got = sink.wait_messages(1).await;
    assert!(!got[0].tls);
    let attempt = relay.wait_event("delivery.attempt", &id).await;
    assert!(attempt["tls"].is_null(), "{attempt}");
    assert!(
        attempt["tls_fallback"].as_str().is_some(),
        "the fallback is recorded: {attempt}"
    );
    relay.wait_event("delivery.delivered", &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_dropped_in_data_is_deferred() {
    let port = shared_port();
    let _sink = Sink::builder()
        .drop_in_data()
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let dns = TestDns::start(example_zone("127.0.0.2")).await;
    let relay = Relay::start(options(&dns, port, "retry_schedule = [\"1h\"]"));
    let id = submit(&relay, "app@clinic.test", &["pat@example.test"], "drop").await;
    let deferred = relay.wait_event("delivery.deferred", &id).await;
    assert!(
        deferred["reason"].as_str().unwrap().starts_with("4.4.2"),
        "{deferred}"
    );
    assert_eq!(deferred["attempts"], 1);
    let queue = relay.queue_json();
    let r = &queue.iter().find(|m| m["id"] == id.as_str()).unwrap()["recipients"][0];
    assert_eq!(r["status"], "deferred");
    assert!(r["next_attempt"].as_str().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_times_out_and_is_deferred() {
    let port = shared_port();
    let _sink = Sink::builder()
        .hang()
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let dns = TestDns::start(example_zone("127.0.0.2")).await;
    let extra = "retry_schedule = [\"1h\"]\n\n[delivery.timeouts]\ngreeting = \"1s\"";
    let relay = Relay::start(options(&dns, port, extra));
    let id = submit(&relay, "app@clinic.test", &["pat@example.test"], "hang").await;
    let deferred = relay.wait_event("delivery.deferred", &id).await;
    let reason = deferred["reason"].as_str().unwrap();
    assert!(
        reason.contains("timeout") && reason.contains("greeting"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_bounce_fails_recipients_and_tells_the_sender() {
    let port = shared_port();
    let _busy = Sink::builder()
        .mail_reply("451 4.3.2 busy")
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let sender_mx = Sink::builder().start_on(format!("127.0.0.5:{port}")).await;
    let dns = TestDns::start(example_zone("127.0.0.2")).await;
    let relay = Relay::start(options(&dns, port, "retry_schedule = [\"1h\"]"));
    let id = submit(&relay, "app@clinic.test", &["pat@example.test"], "bounce").await;
    relay.wait_event("delivery.deferred", &id).await;
    let out = relay.cli(&["queue", "bounce", &id, "--config", "sealpost.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dsn = sender_mx.wait_messages(1).await;
    let text = String::from_utf8_lossy(&dsn[0].body);
    assert!(
        text.contains("Final-Recipient: rfc822; pat@example.test"),
        "{text}"
    );
    assert!(text.contains("administrator"), "{text}");
    let admin = relay
        .wait_audit("admin.queue", |e| {
            e["event"] == "admin.queue" && e["action"] == "bounce"
        })
        .await;
    assert_eq!(admin["queue_id"], id.as_str());
    let queue = relay.queue_json();
    let m = queue.iter().find(|m| m["id"] == id.as_str()).unwrap();
    assert_eq!(m["recipients"][0]["status"], "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_delay_warning_while_retrying() {
    let port = shared_port();
    let _busy = Sink::builder()
        .mail_reply("451 4.3.2 busy")
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let sender_mx = Sink::builder().start_on(format!("127.0.0.5:{port}")).await;
    let dns = TestDns::start(example_zone("127.0.0.2")).await;
    let relay = Relay::start(options(&dns, port, "delay_warning = \"1s\""));
    let id = submit(&relay, "app@clinic.test", &["pat@example.test"], "delay").await;
    // Retries every second; after the first second a "delayed" DSN goes out, once.
    let warning = sender_mx.wait_messages(1).await;
    let text = String::from_utf8_lossy(&warning[0].body);
    assert!(text.contains("Action: delayed"), "{text}");
    relay
        .wait_audit("third attempt", |e| {
            event(e, "delivery.deferred", &id) && e["attempts"] == 4
        })
        .await;
    assert_eq!(sender_mx.messages().len(), 1, "only one delay warning");
}

/// Submits `count` messages with distinct Message-IDs over one session.
async fn submit_many(addr: std::net::SocketAddr, from: usize, count: usize) {
    let mut c = Client::new(TcpStream::connect(addr).await.unwrap());
    c.expect("220").await;
    c.cmd("EHLO app.test", "250").await;
    for n in from..from + count {
        c.send(&format!(
            "MAIL FROM:<app@clinic.test>\r\nRCPT TO:<p{n}@example.test>\r\nDATA\r\n\
             Message-ID: <crash-{n}@test>\r\nSubject: x\r\n\r\nx\r\n.\r\n"
        ))
        .await;
        for prefix in ["250", "250", "354", "250"] {
            c.expect(prefix).await;
        }
    }
}

fn message_ids(sink: &Sink) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in sink.messages() {
        let body = String::from_utf8_lossy(&m.body);
        if let Some(line) = body.lines().find(|l| l.starts_with("Message-ID: ")) {
            *seen.entry(line.to_string()).or_insert(0) += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_delivering_loses_nothing() {
    let port = shared_port();
    let sink = Sink::builder()
        .pipelining()
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let dns = TestDns::start(example_zone("127.0.0.2")).await;
    let relay = Relay::start(options(&dns, port, ""));
    let mut sessions = tokio::task::JoinSet::new();
    for s in 0..10 {
        sessions.spawn(submit_many(relay.smtp, s * 100, 100));
    }
    while let Some(done) = sessions.join_next().await {
        done.unwrap();
    }
    sink.wait_messages(100).await;
    let relay = relay.restart(); // SIGKILL mid-delivery, then start again on the same data
                                 // The queue is the event: every recipient ends delivered (the restarted node took back
                                 // its leases). Polled, as it lives in another process.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let queue = relay.queue_json();
        let open: Vec<_> = queue
            .iter()
            .filter(|m| m["recipients"][0]["status"] != "delivered")
            .collect();
        if queue.len() == 1000 && open.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} undelivered 60s after the restart: {:#?}",
            open.len(),
            queue.len(),
            open.iter().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let seen = message_ids(&sink);
    assert_eq!(seen.len(), 1000, "every message reached the sink");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!("SIGKILL during delivery of 1,000 messages: all delivered, {duplicates} duplicate(s)");
}
