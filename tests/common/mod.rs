//! Shared test support: start the real `sealpost` binary on 127.0.0.1 with port 0, a raw SMTP
//! client over TCP or TLS, and test certificates made with rcgen.
#![allow(dead_code)]
pub mod delivery;
pub mod dns;
pub mod sink;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Once};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader as TokioBufReader,
};
use tokio::net::TcpStream;

/// A certificate for `localhost` and its key, as PEM.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCert {
    pub fn localhost() -> TestCert {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        TestCert {
            cert_pem: ck.cert.pem(),
            key_pem: ck.signing_key.serialize_pem(),
        }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()
    }
}

/// What to put in the test config besides the defaults.
#[derive(Clone)]
pub struct Options {
    /// Extra TOML appended to `[limits]`.
    pub limits: String,
    /// `trusted_networks` value.
    pub trusted: String,
    /// (user, password) pairs.
    pub users: Vec<(String, String)>,
    /// Extra TOML for `[auth]` (e.g. `max_failures = 2`).
    pub auth: String,
    pub shutdown_grace: String,
    /// Extra TOML appended to the config (e.g. `[dns]`, `[delivery]`, `[testing]`).
    pub extra: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: String::new(),
            trusted: r#"["127.0.0.0/8"]"#.to_string(),
            users: vec![("app".to_string(), "s3cret-pass".to_string())],
            auth: String::new(),
            shutdown_grace: "10s".to_string(),
            // Intake-only by default: nothing leaves, and DNS points at a closed loopback port
            // so no test ever queries a resolver off this machine.
            extra: "[delivery]\nenabled = false\n\n[dns]\nnameservers = [\"127.0.0.1:9\"]\n"
                .to_string(),
        }
    }
}

/// A running relay process with its own data directory.
pub struct Relay {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub smtp: SocketAddr,
    pub tls: SocketAddr,
    pub cert: Arc<TestCert>,
    pub stdout: Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sealpost")
}

fn hash(password: &str) -> String {
    sealpost::listener::auth::hash_password(password).unwrap()
}

/// Writes the config, policy and certificate into `dir`.
pub fn write_config(dir: &Path, opts: &Options, cert: &TestCert) -> PathBuf {
    std::fs::write(dir.join("cert.pem"), &cert.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &cert.key_pem).unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[defaults]\nmode = \"opportunistic\"\n",
    )
    .unwrap();
    let users: String = opts
        .users
        .iter()
        .map(|(u, p)| {
            format!(
                "\n[[auth.user]]\nname = \"{u}\"\npassword_hash = \"{}\"\n",
                hash(p)
            )
        })
        .collect();
    let config = format!(
        r#"[server]
hostname = "relay.test"
data_dir = "data"
policy = "policy.toml"
shutdown_grace = "{grace}"

[limits]
{limits}

[tls]
cert = "cert.pem"
key = "key.pem"

[[listener]]
address = "127.0.0.1:0"
kind = "smtp"

[[listener]]
address = "127.0.0.1:0"
kind = "implicit-tls"

[relay]
trusted_networks = {trusted}

[auth]
{auth}
{users}
[queue]
path = "data/queue.sqlite"

[encryption]
active_key = "k1"
create_if_missing = true

[[encryption.key]]
id = "k1"
file = "data/keys/k1.key"

[audit]
path = "data/audit.jsonl"

{extra}
"#,
        grace = opts.shutdown_grace,
        limits = opts.limits,
        trusted = opts.trusted,
        auth = opts.auth,
        users = users,
        extra = opts.extra,
    );
    let path = dir.join("sealpost.toml");
    std::fs::write(&path, config).unwrap();
    path
}

impl Relay {
    pub fn start(opts: Options) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let cert = Arc::new(TestCert::localhost());
        write_config(dir.path(), &opts, &cert);
        Relay::spawn_in(dir, cert)
    }

    /// Starts the binary in `dir` (which holds sealpost.toml) and waits for its listeners.
    pub fn spawn_in(dir: tempfile::TempDir, cert: Arc<TestCert>) -> Relay {
        let mut child = Command::new(bin())
            .args(["serve", "--config", "sealpost.toml"])
            .current_dir(dir.path())
            .env("SEALPOST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut addrs = Vec::new();
        while addrs.len() < 2 {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("relay printed its listeners");
            if let Some(rest) = line.strip_prefix("sealpost: listening on ") {
                let addr = rest
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse::<SocketAddr>()
                    .unwrap();
                addrs.push((addr, rest.contains("implicit-tls")));
            }
        }
        let smtp = addrs.iter().find(|a| !a.1).unwrap().0;
        let tls = addrs.iter().find(|a| a.1).unwrap().0;
        Relay {
            child: Some(child),
            dir,
            smtp,
            tls,
            cert,
            stdout: lines,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap().code()
    }

    /// Restarts the relay on the same data directory (new ports).
    pub fn restart(mut self) -> Relay {
        self.kill9();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let cert = self.cert.clone();
        Relay::spawn_in(dir, cert)
    }

    /// Runs a CLI subcommand against this relay's config.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(args)
            .current_dir(self.dir.path())
            .env("SEALPOST_LOG", "warn")
            .output()
            .unwrap()
    }

    /// `queue list --json`, parsed.
    pub fn queue_json(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["queue", "list", "--json", "--config", "sealpost.toml"]);
        assert!(
            out.status.success(),
            "queue list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The audit log, parsed.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.path("data/audit.jsonl")).unwrap_or_default();
        // The relay may be appending right now: a torn last line is skipped, not an error.
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (polling the file every 20 ms, at most 30 s) for an audit event matching `pred`.
    /// The relay is another process: its audit log is the event we can observe.
    pub async fn wait_audit(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(e) = self.audit_events().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no audit event {what} within 30s; log: {:#?}",
                self.audit_events()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for audit event `event` about message `queue_id`.
    pub async fn wait_event(&self, event: &str, queue_id: &str) -> serde_json::Value {
        self.wait_audit(event, |e| e["event"] == event && e["queue_id"] == queue_id)
            .await
    }

    pub async fn connect(&self) -> Client<TcpStream> {
        let stream = TcpStream::connect(self.smtp).await.unwrap();
        let mut c = Client::new(stream);
        c.expect("220").await;
        c
    }

    pub fn tls_connector(&self) -> tokio_rustls::TlsConnector {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der()).unwrap();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Ensures the rustls provider exists in the test process.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A raw SMTP client that reads whole (multi-line) replies.
pub struct Client<S> {
    pub io: TokioBufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S) -> Client<S> {
        Client {
            io: TokioBufReader::new(stream),
        }
    }

    pub async fn send(&mut self, text: &str) {
        self.io.get_mut().write_all(text.as_bytes()).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    /// One whole reply (all its lines joined by `\n`), or "" at EOF.
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.io.read_line(&mut line))
                .await
                .expect("reply within 30s")
                .unwrap_or(0);
            if n == 0 {
                return all;
            }
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            let done = line.as_bytes().get(3) == Some(&b' ');
            all.push_str(line.trim_end());
            if done {
                return all;
            }
            all.push('\n');
        }
    }

    /// Reads a reply and asserts it starts with `prefix`; returns it.
    pub async fn expect(&mut self, prefix: &str) -> String {
        let r = self.reply().await;
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    /// Sends a command and expects a reply prefix.
    pub async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.expect(prefix).await
    }

    /// True when the server has closed the connection.
    pub async fn closed(&mut self) -> bool {
        let mut buf = String::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(30), self.io.read_line(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    pub fn into_inner(self) -> S {
        self.io.into_inner()
    }
}

/// Upgrades a plain client with STARTTLS (already acknowledged with 220) to TLS.
pub async fn upgrade(
    relay: &Relay,
    client: Client<TcpStream>,
) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = relay.tls_connector();
    let tls = connector
        .connect(
            ServerName::try_from("localhost").unwrap(),
            client.into_inner(),
        )
        .await
        .unwrap();
    Client::new(tls)
}

/// A small message with a header block and `marker` in the body.
/// The marker appears only in the body (the Message-ID is recorded in the queue and audit log).
pub fn message(from: &str, to: &str, marker: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: test\r\nMessage-ID: <msg-{n}@test>\r\n\r\nbody {marker}\r\n"
    )
}
