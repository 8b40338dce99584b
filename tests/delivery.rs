//! Delivery end to end: the real binary, a real DNS server and real SMTP sinks, all on
//! 127.0.0.0/8. sealpost dials `[testing] mx_port` for every MX host, so each sink listens on
//! its own loopback address (127.0.0.2, .3, …) on one shared port.

mod common;

use common::delivery::{options, shared_port, submit};
use common::dns::{TestDns, Zone};
use common::sink::{Sink, TestCa};
use common::{Client, Options, Relay};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_over_starttls_to_the_preferred_mx() {
    let port = shared_port();
    let ca = TestCa::new();
    let sink = Sink::builder()
        .starttls(&ca, "mx1.example.test")
        .pipelining()
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let dns = TestDns::start(
        Zone::new()
            .mx("example.test", 10, "mx1.example.test")
            .a("mx1.example.test", "127.0.0.2"),
    )
    .await;
    let relay = Relay::start(options(&dns, port, ""));
    let id = submit(&relay, "app@clinic.test", &["pat@example.test"], "tls-1").await;

    let got = sink.wait_messages(1).await;
    assert_eq!(got[0].mail_from, "app@clinic.test");
    assert_eq!(got[0].rcpt_to, ["pat@example.test"]);
    assert!(got[0].tls, "STARTTLS was used");
    let body = String::from_utf8_lossy(&got[0].body);
    assert!(
        body.contains("\r\n.line starting with a dot\r\n"),
        "dot-stuffing round trip: {body}"
    );
    assert!(body.contains("Received: from app.test"));

    let delivered = relay.wait_event("delivery.delivered", &id).await;
    assert_eq!(delivered["recipient"], "pat@example.test");
    assert_eq!(delivered["mx_host"], "mx1.example.test");
    let attempt = relay.wait_event("delivery.attempt", &id).await;
    let tls = &attempt["tls"];
    assert!(
        tls["version"].as_str().unwrap().starts_with("TLSv1."),
        "{attempt}"
    );
    assert_eq!(tls["verified"], false, "the test CA is not a WebPKI root");
    assert!(tls["verify_error"].as_str().is_some(), "{attempt}");
    assert_eq!(tls["fingerprint_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(attempt["ip"], "127.0.0.2");
    assert!(
        attempt["reply"].as_str().unwrap().starts_with("250"),
        "{attempt}"
    );
    let queue = relay.queue_json();
    let m = queue.iter().find(|m| m["id"] == id.as_str()).unwrap();
    assert_eq!(m["recipients"][0]["status"], "delivered");
    assert_eq!(m["recipients"][0]["attempts"], 1);
    // Delivered everywhere: the queue keeps the envelope, not the content.
    let out = relay.cli(&["queue", "show", &id, "--body", "--config", "sealpost.toml"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("erased"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_moves_on_to_the_next_mx() {
    let port = shared_port();
    // Nothing listens on 127.0.0.3: connection refused.
    let sink = Sink::builder().start_on(format!("127.0.0.4:{port}")).await;
    let dns = TestDns::start(
        Zone::new()
            .mx("example.test", 10, "mx1.example.test")
            .mx("example.test", 20, "mx2.example.test")
            .a("mx1.example.test", "127.0.0.3")
            .a("mx2.example.test", "127.0.0.4"),
    )
    .await;
    let relay = Relay::start(options(&dns, port, ""));
    let id = submit(&relay, "app@clinic.test", &["pat@example.test"], "next-mx").await;
    let got = sink.wait_messages(1).await;
    assert!(
        !got[0].tls,
        "the sink offers no STARTTLS: plaintext is allowed for opportunistic"
    );
    relay
        .wait_audit("delivered via mx2", |e| {
            e["event"] == "delivery.delivered"
                && e["queue_id"] == id.as_str()
                && e["mx_host"] == "mx2.example.test"
        })
        .await;
    let refused = relay
        .audit_events()
        .into_iter()
        .find(|e| e["event"] == "delivery.attempt" && e["mx_host"] == "mx1.example.test")
        .expect("the attempt on mx1 is audited");
    assert!(
        refused["reply"].as_str().unwrap().contains("connect"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_recipient_fails_with_a_dsn_the_others_are_delivered() {
    let port = shared_port();
    let sink = Sink::builder()
        .pipelining()
        .reject_rcpt("nobody@example.test")
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let sender_mx = Sink::builder().start_on(format!("127.0.0.5:{port}")).await;
    let dns = TestDns::start(
        Zone::new()
            .mx("example.test", 10, "mx1.example.test")
            .a("mx1.example.test", "127.0.0.2")
            .mx("clinic.test", 10, "mx.clinic.test")
            .a("mx.clinic.test", "127.0.0.5"),
    )
    .await;
    let relay = Relay::start(options(&dns, port, ""));
    let rcpts = ["a@example.test", "nobody@example.test", "b@example.test"];
    let id = submit(&relay, "app@clinic.test", &rcpts, "dsn-1").await;

    let got = sink.wait_messages(1).await;
    assert_eq!(got[0].rcpt_to, ["a@example.test", "b@example.test"]);
    let dsn = sender_mx.wait_messages(1).await;
    assert_eq!(dsn[0].mail_from, "", "DSNs come from the null sender");
    assert_eq!(dsn[0].rcpt_to, ["app@clinic.test"]);
    let parsed = mail_parser::MessageParser::new()
        .parse(&dsn[0].body)
        .unwrap();
    let text = String::from_utf8_lossy(&dsn[0].body);
    assert_eq!(
        parsed.parts.len(),
        4,
        "multipart/report with three parts: {text}"
    );
    assert!(text.contains("multipart/report"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@example.test"),
        "{text}"
    );
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("Remote-MTA: dns; mx1.example.test"), "{text}");
    assert!(
        text.contains("Subject: results"),
        "original headers are included: {text}"
    );
    assert!(
        !text.contains("body dsn-1"),
        "never the original body: {text}"
    );

    let failed = relay.wait_event("delivery.failed", &id).await;
    assert_eq!(failed["recipient"], "nobody@example.test");
    assert!(failed["enhanced"].as_str().unwrap().starts_with('5'));
    relay
        .wait_audit("dsn.queued", |e| {
            e["event"] == "dsn.queued" && e["original"] == id.as_str()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_mx_fails_at_once_and_a_dsn_is_never_bounced() {
    let port = shared_port();
    let dns = TestDns::start(Zone::new().null_mx("nomail.test")).await;
    let relay = Relay::start(options(&dns, port, ""));
    // From the null sender: the failure must not produce a DSN.
    let id = submit(&relay, "", &["x@nomail.test"], "nullmx").await;
    let failed = relay.wait_event("delivery.failed", &id).await;
    assert_eq!(failed["enhanced"], "5.1.10");
    let queue = relay.queue_json();
    assert_eq!(
        queue.len(),
        1,
        "no DSN was queued for a message from <>: {queue:?}"
    );
    assert!(!relay
        .audit_events()
        .iter()
        .any(|e| e["event"] == "dsn.queued"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failure_is_deferred_then_retried() {
    let port = shared_port();
    let busy = Sink::builder()
        .mail_reply("451 4.3.2 try again later")
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let healthy = Sink::builder().start_on(format!("127.0.0.3:{port}")).await;
    // TTL 0: the resolver asks again on the retry and sees the MX move.
    let dns = TestDns::start(
        Zone::new()
            .ttl(0)
            .mx("example.test", 10, "mx1.example.test")
            .a("mx1.example.test", "127.0.0.2"),
    )
    .await;
    let relay = Relay::start(options(&dns, port, ""));
    let id = submit(&relay, "app@clinic.test", &["pat@example.test"], "retry").await;
    let deferred = relay.wait_event("delivery.deferred", &id).await;
    assert!(
        deferred["reason"].as_str().unwrap().contains("4.3.2"),
        "{deferred}"
    );
    assert_eq!(deferred["attempts"], 1);
    assert!(busy.connections() >= 1);
    // The MX moves; the retry (1s schedule) finds the healthy host.
    dns.set_zone(
        Zone::new()
            .ttl(0)
            .mx("example.test", 10, "mx2.example.test")
            .a("mx2.example.test", "127.0.0.3"),
    );
    let got = healthy.wait_messages(1).await;
    assert_eq!(got[0].rcpt_to, ["pat@example.test"]);
    relay.wait_event("delivery.delivered", &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_defers_with_a_temporary_dns_code() {
    let port = shared_port();
    let dns = TestDns::start(Zone::new().servfail("broken.test")).await;
    let relay = Relay::start(options(&dns, port, ""));
    let id = submit(&relay, "app@clinic.test", &["x@broken.test"], "servfail").await;
    let deferred = relay.wait_event("delivery.deferred", &id).await;
    assert!(
        deferred["reason"].as_str().unwrap().starts_with("4.4.3"),
        "{deferred}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_for_one_destination() {
    let port = shared_port();
    let sink = Sink::builder()
        .pipelining()
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let dns = TestDns::start(
        Zone::new()
            .mx("example.test", 10, "mx1.example.test")
            .a("mx1.example.test", "127.0.0.2"),
    )
    .await;
    let relay = Relay::start(options(&dns, port, "max_connections_per_destination = 2"));
    let mut c: Client<TcpStream> = relay.connect().await;
    c.cmd("EHLO app.test", "250").await;
    for i in 0..50 {
        c.cmd("MAIL FROM:<app@clinic.test>", "250").await;
        c.cmd(&format!("RCPT TO:<p{i}@example.test>"), "250").await;
        c.cmd("DATA", "354").await;
        c.send("Subject: reuse\r\n\r\nx\r\n").await;
        c.cmd(".", "250").await;
    }
    sink.wait_messages(50).await;
    let connections = sink.connections();
    assert!(
        connections <= 10,
        "50 messages used {connections} connections"
    );
    let resets = sink
        .commands()
        .iter()
        .filter(|c| c.starts_with("RSET"))
        .count();
    assert!(
        resets >= 40,
        "connections were reused with RSET between messages ({resets})"
    );
}

/// Sends `count` bulk messages over one session, each pipelined in one write.
async fn submit_bulk(addr: std::net::SocketAddr, count: usize, rcpt: String) {
    let mut c = Client::new(TcpStream::connect(addr).await.unwrap());
    c.expect("220").await;
    c.cmd("EHLO bulk.test", "250").await;
    let one = format!(
        "MAIL FROM:<news@clinic.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n\
         X-Sealpost-Lane: bulk\r\nSubject: newsletter\r\n\r\nhello\r\n.\r\n"
    );
    for _ in 0..count {
        c.send(&one).await;
        c.expect("250").await;
        c.expect("250").await;
        c.expect("354").await;
        c.expect("250 2.0.0 Ok: queued as").await;
    }
    c.cmd("QUIT", "221").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_mail_never_waits_behind_a_bulk_backlog() {
    let port = shared_port();
    // The bulk destination accepts connections and never answers: every bulk worker is stuck.
    let slow = Sink::builder()
        .hang()
        .start_on(format!("127.0.0.2:{port}"))
        .await;
    let fast = Sink::builder().start_on(format!("127.0.0.3:{port}")).await;
    let dns = TestDns::start(
        Zone::new()
            .mx("bulk.test", 10, "mx.bulk.test")
            .a("mx.bulk.test", "127.0.0.2")
            .mx("example.test", 10, "mx.example.test")
            .a("mx.example.test", "127.0.0.3"),
    )
    .await;
    let relay = Relay::start(options(&dns, port, "bulk_workers = 2"));
    let mut sessions = tokio::task::JoinSet::new();
    for _ in 0..10 {
        sessions.spawn(submit_bulk(relay.smtp, 500, "list@bulk.test".to_string()));
    }
    while let Some(done) = sessions.join_next().await {
        done.unwrap();
    }
    slow.wait_connections(1).await;

    let started = std::time::Instant::now();
    let mut c: Client<TcpStream> = relay.connect().await;
    c.cmd("EHLO app.test", "250").await;
    c.cmd("MAIL FROM:<app@clinic.test>", "250").await;
    c.cmd("RCPT TO:<pat@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send("X-Sealpost-Lane: transactional\r\nSubject: lab result\r\n\r\nready\r\n")
        .await;
    c.cmd(".", "250").await;
    let got = fast.wait_messages(1).await;
    println!(
        "transactional delivered {:?} after submission, behind 5,000 bulk",
        started.elapsed()
    );
    let body = String::from_utf8_lossy(&got[0].body);
    assert!(
        !body.to_ascii_lowercase().contains("x-sealpost-lane"),
        "lane header stripped: {body}"
    );
    assert_eq!(
        slow.messages().len(),
        0,
        "the bulk destination never answered"
    );
    let bulk_open = relay
        .queue_json()
        .iter()
        .filter(|m| m["lane"] == "bulk" && m["recipients"][0]["status"] == "queued")
        .count();
    assert!(bulk_open >= 4_990, "bulk backlog still queued: {bulk_open}");
}

#[tokio::test]
async fn unknown_lane_is_refused_at_intake() {
    let relay = Relay::start(Options::default());
    let mut c: Client<TcpStream> = relay.connect().await;
    c.cmd("EHLO app.test", "250").await;
    c.cmd("MAIL FROM:<app@clinic.test>", "250").await;
    c.cmd("RCPT TO:<pat@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send("X-Sealpost-Lane: urgent\r\nSubject: x\r\n\r\nx\r\n")
        .await;
    let reply = c.cmd(".", "550 5.6.0").await;
    assert!(reply.contains("\"urgent\""), "{reply}");
    assert!(relay.queue_json().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_to_an_ipv6_only_mx() {
    let port = shared_port();
    let Ok(probe) = std::net::TcpListener::bind(("::1", port)) else {
        println!("skipped: no IPv6 loopback on this machine");
        return;
    };
    drop(probe);
    let sink = Sink::builder().start_on(format!("[::1]:{port}")).await;
    let dns = TestDns::start(
        Zone::new()
            .mx("example.test", 10, "mx6.example.test")
            .aaaa("mx6.example.test", "::1"),
    )
    .await;
    let relay = Relay::start(options(&dns, port, ""));
    let id = submit(&relay, "app@clinic.test", &["pat@example.test"], "v6").await;
    sink.wait_messages(1).await;
    let attempt = relay.wait_event("delivery.attempt", &id).await;
    assert_eq!(attempt["ip"], "::1");
}
