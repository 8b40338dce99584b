//! Submissions with lettre as a real SMTP client: plain from a trusted network, STARTTLS + AUTH
//! PLAIN and LOGIN, and implicit TLS. The queue then holds exactly what was sent.

mod common;

use common::{Options, Relay};
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

fn tls_params(relay: &Relay) -> TlsParameters {
    TlsParameters::builder("localhost".to_string())
        .add_root_certificate(Certificate::from_pem(relay.cert.cert_pem.as_bytes()).unwrap())
        .build_rustls()
        .unwrap()
}

fn email(to: &str, marker: &str) -> Message {
    Message::builder()
        .from("Clinic App <app@clinic.example>".parse().unwrap())
        .to(to.parse().unwrap())
        .subject("appointment")
        .header(ContentType::TEXT_PLAIN)
        .body(format!("Body with marker {marker}\n"))
        .unwrap()
}

/// Sends one message and returns the queue id from the 250 reply.
async fn send(mailer: AsyncSmtpTransport<Tokio1Executor>, msg: Message) -> String {
    let response = mailer.send(msg).await.expect("relay accepted the message");
    assert_eq!(response.code().to_string(), "250");
    let text = response.message().collect::<Vec<_>>().join(" ");
    text.rsplit(' ').next().unwrap().to_string()
}

/// Asserts the queue holds exactly `id` for `rcpt`, with `marker` in the decrypted body.
fn assert_queued(relay: &Relay, id: &str, rcpt: &str, marker: &str, auth_user: Option<&str>) {
    let queue = relay.queue_json();
    let m = queue
        .iter()
        .find(|m| m["id"] == id)
        .expect("message in queue");
    assert_eq!(m["sender"], "app@clinic.example");
    assert_eq!(m["recipients"].as_array().unwrap().len(), 1);
    assert_eq!(m["recipients"][0]["address"], rcpt);
    assert_eq!(m["recipients"][0]["status"], "queued");
    assert_eq!(m["recipients"][0]["decision"]["mode"], "opportunistic");
    assert_eq!(m["recipients"][0]["decision"]["rule"], "default");
    assert_eq!(m["auth_user"].as_str(), auth_user);
    let out = relay.cli(&["queue", "show", id, "--body", "--config", "sealpost.toml"]);
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!("Body with marker {marker}")),
        "{shown}"
    );
    assert!(shown.contains("Received: from "), "{shown}");
    assert!(shown.contains("by relay.test (sealpost)"), "{shown}");
    let viewed = relay
        .audit_events()
        .into_iter()
        .any(|e| e["event"] == "admin.body_viewed" && e["queue_id"] == id);
    assert!(viewed, "queue show --body was audited");
}

#[tokio::test]
async fn plain_from_trusted_network() {
    let relay = Relay::start(Options::default());
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(relay.smtp.port())
        .build();
    let id = send(mailer, email("pat@hospital.example", "plain-1")).await;
    assert_queued(&relay, &id, "pat@hospital.example", "plain-1", None);
    let received = relay
        .audit_events()
        .into_iter()
        .find(|e| e["event"] == "message.received")
        .unwrap();
    assert_eq!(received["queue_id"], id.as_str());
    assert_eq!(received["sender"], "app@clinic.example");
    assert_eq!(received["recipients"][0]["rule"], "default");
    assert_eq!(received["client_ip"], "127.0.0.1");
}

#[tokio::test]
async fn starttls_with_auth_plain_and_login() {
    let relay = Relay::start(Options {
        trusted: "[]".to_string(),
        ..Options::default()
    });
    for (mech, marker) in [
        (Mechanism::Plain, "auth-plain"),
        (Mechanism::Login, "auth-login"),
    ] {
        let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(relay.smtp.port())
            .tls(Tls::Required(tls_params(&relay)))
            .credentials(Credentials::new("app".into(), "s3cret-pass".into()))
            .authentication(vec![mech])
            .build();
        let id = send(mailer, email("doc@hospital.example", marker)).await;
        assert_queued(&relay, &id, "doc@hospital.example", marker, Some("app"));
    }
    let events = relay.audit_events();
    let tls = events.iter().find(|e| e["event"] == "session.tls").unwrap();
    assert!(tls["version"].as_str().unwrap().starts_with("TLSv1."));
    let auths: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "session.auth")
        .collect();
    assert_eq!(auths.len(), 2);
    assert!(auths
        .iter()
        .all(|e| e["success"] == true && e["user"] == "app"));
    let raw = std::fs::read_to_string(relay.path("data/audit.jsonl")).unwrap();
    assert!(
        !raw.contains("s3cret-pass"),
        "password must never reach the audit log"
    );
}

#[tokio::test]
async fn wrong_password_is_refused() {
    let relay = Relay::start(Options {
        trusted: "[]".to_string(),
        ..Options::default()
    });
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(relay.smtp.port())
        .tls(Tls::Required(tls_params(&relay)))
        .credentials(Credentials::new("app".into(), "wrong".into()))
        .authentication(vec![Mechanism::Plain])
        .build();
    let err = mailer
        .send(email("doc@hospital.example", "x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("535"), "{err}");
    assert!(relay.queue_json().is_empty());
}

#[tokio::test]
async fn implicit_tls() {
    let relay = Relay::start(Options::default());
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(relay.tls.port())
        .tls(Tls::Wrapper(tls_params(&relay)))
        .credentials(Credentials::new("app".into(), "s3cret-pass".into()))
        .authentication(vec![Mechanism::Plain])
        .build();
    let id = send(mailer, email("lab@hospital.example", "implicit-1")).await;
    assert_queued(
        &relay,
        &id,
        "lab@hospital.example",
        "implicit-1",
        Some("app"),
    );
    let out = relay.cli(&["queue", "show", &id, "--body", "--config", "sealpost.toml"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("with ESMTPSA"), "{shown}");
    assert!(
        shown.contains("(using TLSv1.3 with cipher TLS13_"),
        "{shown}"
    );
}
