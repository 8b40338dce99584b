//! The command line as an operator uses it: check, serve refusing a bad config, keygen,
//! hash-password, audit verify on a tampered log.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::bin;

fn run(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

const BAD_CONFIG: &str = r#"[server]
hostname = "relay.test"
policy = "policy.toml"

[limits]
max_recipients = "ten"

[[listener]]
address = "127.0.0.1:0"

[[listener]]
address = "not-an-address"

[smtpd]
x = 1

[encryption]
active_key = "k9"

[[encryption.key]]
id = "k1"
file = "k1.key"
"#;

#[test]
fn check_reports_every_problem_and_serve_refuses() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        "[defaults]\nmode = \"opportunistic\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("bad.toml"), BAD_CONFIG).unwrap();
    let out = run(dir.path(), &["check", "--config", "bad.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "bad.toml:6:",
        "limits.max_recipients",
        "bad.toml:12:",
        "listener[1].address",
        "smtpd",
        "encryption.active_key",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    let serve = run(dir.path(), &["serve", "--config", "bad.toml"]);
    assert_eq!(serve.status.code(), Some(1));
    let serve_err = String::from_utf8_lossy(&serve.stderr);
    for line in err.lines().filter(|l| l.starts_with("error:")) {
        assert!(serve_err.contains(line), "serve did not report {line:?}");
    }
    assert!(!dir.path().join("data").exists(), "serve created nothing");
}

#[test]
fn shipped_config_passes_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = run(
        std::path::Path::new(root),
        &["check", "--config", "config/sealpost.toml"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok:"));
}

#[test]
fn keygen_writes_a_private_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["keygen", "k.key"]);
    assert!(out.status.success());
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir.path().join("k.key")).unwrap();
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let again = run(dir.path(), &["keygen", "k.key"]);
    assert!(!again.status.success(), "keygen must never overwrite a key");
}

#[test]
fn hash_password_prints_an_argon2_phc_string() {
    let mut child = Command::new(bin())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("correct horse"));
}

#[test]
fn audit_verify_names_the_tampered_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let audit = sealpost::audit::AuditLog::open(&log).await.unwrap();
        for i in 0..5 {
            audit
                .record(sealpost::audit::AuditEvent::ServiceStopped {
                    reason: format!("r{i}"),
                })
                .await
                .unwrap();
        }
        audit.close().await;
    });
    let ok = run(dir.path(), &["audit", "verify", "audit.jsonl"]);
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok: 5 record(s)"));

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "edited",
            {
                let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                l[2] = l[2].replace("r2", "rX");
                l
            },
            "line 3",
        ),
        (
            "deleted",
            {
                let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                l.remove(3);
                l
            },
            "line 4",
        ),
        (
            "swapped",
            {
                let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                l.swap(1, 2);
                l
            },
            "line 2",
        ),
    ];
    for (name, tampered, expected) in cases {
        std::fs::write(&log, tampered.join("\n") + "\n").unwrap();
        let out = run(dir.path(), &["audit", "verify", "audit.jsonl"]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(expected),
            "{name}: expected {expected}: {stdout}"
        );
    }
}

#[test]
fn serve_refuses_a_key_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cert = common::TestCert::localhost();
    common::write_config(dir.path(), &common::Options::default(), &cert);
    std::fs::create_dir_all(dir.path().join("data/keys")).unwrap();
    assert!(run(dir.path(), &["keygen", "data/keys/k1.key"])
        .status
        .success());
    let key = dir.path().join("data/keys/k1.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(dir.path(), &["serve", "--config", "sealpost.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("readable by group or others"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
}
