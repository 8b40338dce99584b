//! Durability and secrecy at rest: SIGKILL right after the 250 loses nothing, no plaintext
//! reaches the data directory, and SIGTERM lets a session in DATA finish.

mod common;

use common::{message, Client, Options, Relay};

/// Submits one message over a raw session; returns the queue id from the 250.
async fn submit<S>(c: &mut Client<S>, marker: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    c.cmd("MAIL FROM:<app@clinic.example>", "250 2.1.0").await;
    c.cmd("RCPT TO:<pat@hospital.example>", "250 2.1.5").await;
    c.cmd("DATA", "354").await;
    c.send(&message(
        "app@clinic.example",
        "pat@hospital.example",
        marker,
    ))
    .await;
    let reply = c.cmd(".", "250 2.0.0 Ok: queued as ").await;
    reply.rsplit(' ').next().unwrap().to_string()
}

fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            hits.extend(files_containing(&path, needle));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test]
async fn sigkill_after_250_loses_nothing() {
    let relay = Relay::start(Options::default());
    let mut c = relay.connect().await;
    c.cmd("EHLO app.test", "250").await;
    let id = submit(&mut c, "crash-marker-1").await;
    let relay = relay.restart(); // SIGKILL, then start again on the same data directory
    let queue = relay.queue_json();
    assert!(queue.iter().any(|m| m["id"] == id.as_str()), "{queue:?}");
    let received = relay
        .audit_events()
        .into_iter()
        .any(|e| e["event"] == "message.received" && e["queue_id"] == id.as_str());
    assert!(received, "message.received survived the crash");
    let out = relay.cli(&["audit", "verify", "--config", "sealpost.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = relay.cli(&["queue", "show", &id, "--body", "--config", "sealpost.toml"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("body crash-marker-1"));
}

#[tokio::test]
async fn bodies_never_reach_disk_in_plaintext() {
    let mut relay = Relay::start(Options::default());
    let marker = "PHI-MARKER-7f3a9c21e5";
    let mut c = relay.connect().await;
    c.cmd("EHLO app.test", "250").await;
    for _ in 0..3 {
        submit(&mut c, marker).await;
    }
    // While running (WAL and shared memory files included) and after a clean stop.
    assert_eq!(
        files_containing(&relay.path("data"), marker.as_bytes()),
        Vec::<String>::new()
    );
    c.cmd("QUIT", "221").await;
    assert_eq!(relay.terminate(), Some(0));
    assert_eq!(
        files_containing(&relay.path("data"), marker.as_bytes()),
        Vec::<String>::new()
    );
    // The key file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(relay.path("data/keys/k1.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let created = relay
        .audit_events()
        .into_iter()
        .any(|e| e["event"] == "key.created");
    assert!(created, "creating the key was audited");
}

#[tokio::test]
async fn sigterm_lets_a_session_in_data_finish() {
    let mut relay = Relay::start(Options::default());
    let mut busy = relay.connect().await;
    busy.cmd("EHLO busy.test", "250").await;
    busy.cmd("MAIL FROM:<app@clinic.example>", "250").await;
    busy.cmd("RCPT TO:<pat@hospital.example>", "250").await;
    busy.cmd("DATA", "354").await;
    busy.send("Subject: in flight\r\n\r\nfirst half\r\n").await;
    let mut idle = relay.connect().await;
    idle.cmd("EHLO idle.test", "250").await;

    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(relay.child.as_ref().unwrap().id() as i32, libc::SIGTERM) };
    // The idle session is told first; that proves shutdown has begun.
    idle.expect("421 4.3.2").await;
    busy.send("second half\r\n").await;
    let reply = busy.cmd(".", "250 2.0.0 Ok: queued as ").await;
    let id = reply.rsplit(' ').next().unwrap().to_string();
    let mut child = relay.child.take().unwrap();
    assert!(child.wait().unwrap().success());
    let relay = Relay::spawn_in(
        std::mem::replace(&mut relay.dir, tempfile::tempdir().unwrap()),
        relay.cert.clone(),
    );
    assert!(relay.queue_json().iter().any(|m| m["id"] == id.as_str()));
    let stopped = relay
        .audit_events()
        .into_iter()
        .any(|e| e["event"] == "service.stopped");
    assert!(stopped);
}
