//! End-to-end delivery: N messages of 10 KB are submitted over S concurrent loopback sessions to
//! the real `sealpost` binary (release build, durability on) and delivered over STARTTLS to a
//! sink in this process. Reports messages per second from the first submission to the sink's
//! N-th message, and the relay's CPU seconds per 1,000 messages.
//!
//! ```sh
//! cargo bench --bench delivery
//! ```
//!
//! Environment:
//! - `SEALPOST_BENCH_MESSAGES` (default 10000), `SEALPOST_BENCH_SESSIONS` (default 50),
//!   `SEALPOST_BENCH_SIZE` (bytes per message, default 10240).
//! - `SEALPOST_BENCH_LOAD`: `builtin` (default; pipelined MAIL/RCPT/DATA, like the intake bench)
//!   or `smtp-source` (Postfix's load generator: `smtp-source -d -s S -m N -l SIZE`, one session
//!   per connection, no pipelining).
//! - `SEALPOST_BENCH_TARGET=host:port`: do not start sealpost; submit to the MTA already
//!   listening there (Postfix, see `benches/compare-postfix.sh`), which must relay
//!   `@bench.test` to the sink. `SEALPOST_BENCH_TARGET_PID` names its master process for the
//!   CPU figure (the process and its children); `SEALPOST_BENCH_TARGET_NAME` names it in the
//!   output (default `target`).
//! - `SEALPOST_BENCH_SINK`: the sink's address (default `127.0.0.2:0`, any free port).
//!
//! The sink advertises PIPELINING and STARTTLS (self-signed rcgen certificate), counts messages
//! and bytes without keeping bodies, and records which sessions used TLS. Everything (load,
//! relay, sink) shares the machine's cores.
//!
//! Output: a `delivery:` summary line and a machine-readable line
//! `RESULT <mta>_msgs_per_sec=<x> cpu_per_1000=<y> tls_messages=<t> messages=<n>`.

mod support;

use std::net::SocketAddr;
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

const SENDER: &str = "app@clinic.test";
const RECIPIENT: &str = "pat@bench.test";
/// Longest the bench waits for the sink to have every message.
const DEADLINE: Duration = Duration::from_secs(1800);

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The sink
// ---------------------------------------------------------------------------------------------

/// What the sink has seen; shared by its sessions.
struct SinkStats {
    expected: usize,
    messages: AtomicUsize,
    tls_messages: AtomicUsize,
    /// Body bytes (up to, not including, the final dot line).
    bytes: AtomicUsize,
    connections: AtomicUsize,
    tls_connections: AtomicUsize,
    /// When the `expected`-th message was acknowledged.
    done_at: OnceLock<Instant>,
    done: Notify,
}

impl SinkStats {
    fn message(&self, bytes: usize, tls: bool) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if tls {
            self.tls_messages.fetch_add(1, Ordering::Relaxed);
        }
        if self.messages.fetch_add(1, Ordering::AcqRel) + 1 == self.expected {
            let _ = self.done_at.set(Instant::now());
            self.done.notify_one();
        }
    }
}

fn sink_acceptor() -> TlsAcceptor {
    let ck = rcgen::generate_simple_self_signed(vec!["sink.bench.test".to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

async fn start_sink(addr: &str, stats: Arc<SinkStats>) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.expect("sink binds");
    let local = listener.local_addr().unwrap();
    let acceptor = sink_acceptor();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(sink_session(tcp, acceptor.clone(), stats.clone()));
        }
    });
    local
}

enum Next {
    Quit,
    StartTls,
}

async fn sink_session(tcp: TcpStream, acceptor: TlsAcceptor, stats: Arc<SinkStats>) {
    let _ = tcp.set_nodelay(true);
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let mut plain = BufReader::with_capacity(64 * 1024, tcp);
    let mut out = b"220 sink.bench.test ESMTP bench sink\r\n".to_vec();
    if flush(&mut plain, &mut out).await.is_err() {
        return;
    }
    let Ok(Next::StartTls) = sink_dialogue(&mut plain, false, &stats).await else {
        return;
    };
    // Bytes pipelined after STARTTLS are discarded (the plain reader is dropped here).
    let Ok(tls) = acceptor.accept(plain.into_inner()).await else {
        return;
    };
    stats.tls_connections.fetch_add(1, Ordering::Relaxed);
    let mut tls = BufReader::with_capacity(64 * 1024, tls);
    let _ = sink_dialogue(&mut tls, true, &stats).await;
}

/// Writes the buffered replies.
async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    if !out.is_empty() {
        io.get_mut().write_all(out).await?;
        io.get_mut().flush().await?;
        out.clear();
    }
    Ok(())
}

/// Commands until QUIT, EOF or STARTTLS. Replies are flushed only when no more input is
/// buffered (RFC 2920), so a pipelining client gets them in one write.
async fn sink_dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    tls: bool,
    stats: &SinkStats,
) -> std::io::Result<Next> {
    let mut line = Vec::with_capacity(1024);
    let mut out = Vec::with_capacity(1024);
    let mut rcpts = 0usize;
    let mut mail = false;
    loop {
        if io.buffer().is_empty() {
            flush(io, &mut out).await?;
        }
        line.clear();
        if io.read_until(b'\n', &mut line).await? == 0 {
            return Ok(Next::Quit);
        }
        let verb = line
            .iter()
            .take_while(|b| b.is_ascii_alphabetic())
            .map(|b| b.to_ascii_uppercase())
            .collect::<Vec<u8>>();
        match verb.as_slice() {
            b"EHLO" => {
                out.extend_from_slice(
                    b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
                      250-SIZE 52428800\r\n",
                );
                if !tls {
                    out.extend_from_slice(b"250-STARTTLS\r\n");
                }
                out.extend_from_slice(b"250 ENHANCEDSTATUSCODES\r\n");
            }
            b"HELO" => out.extend_from_slice(b"250 sink.bench.test\r\n"),
            b"STARTTLS" if !tls => {
                out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
                flush(io, &mut out).await?;
                return Ok(Next::StartTls);
            }
            b"MAIL" => {
                mail = true;
                rcpts = 0;
                out.extend_from_slice(b"250 2.1.0 Ok\r\n");
            }
            b"RCPT" if mail => {
                rcpts += 1;
                out.extend_from_slice(b"250 2.1.5 Ok\r\n");
            }
            b"DATA" if rcpts > 0 => {
                out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                flush(io, &mut out).await?;
                let mut bytes = 0;
                loop {
                    line.clear();
                    if io.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(Next::Quit);
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    bytes += line.len();
                }
                out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                // Counted once the reply is on its way, as a real MTA's 250 would be.
                flush(io, &mut out).await?;
                stats.message(bytes, tls);
                mail = false;
                rcpts = 0;
            }
            b"RSET" => {
                mail = false;
                rcpts = 0;
                out.extend_from_slice(b"250 2.0.0 Ok\r\n");
            }
            b"NOOP" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
            b"QUIT" => {
                out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                flush(io, &mut out).await?;
                return Ok(Next::Quit);
            }
            _ => out.extend_from_slice(b"503 5.5.1 Bad sequence of commands\r\n"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The relay under test
// ---------------------------------------------------------------------------------------------

fn config(sink: SocketAddr) -> String {
    format!(
        r#"[server]
hostname = "relay.bench.test"
data_dir = "data"
policy = "policy.toml"

[limits]
max_connections_per_ip = 10000
max_connections = 10000

[tls]
self_signed = true

[[listener]]
address = "127.0.0.1:0"
kind = "smtp"

[relay]
trusted_networks = ["127.0.0.0/8"]

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

# Defaults otherwise: 32 workers, 20 connections per destination, 100 messages per connection.
[delivery]
relay_host = "{sink}"

# The relay host is an IP literal: no DNS query is made. Point the resolver at a closed
# loopback port anyway so nothing could leave this machine.
[dns]
nameservers = ["127.0.0.1:9"]
"#
    )
}

/// Starts the release binary in `dir`; returns it and its SMTP listener.
fn start_sealpost(dir: &std::path::Path, sink: SocketAddr) -> (Child, SocketAddr) {
    support::start_sealpost(dir, &config(sink))
}

/// Fields 14–17 of /proc/PID/stat (utime, stime, cutime, cstime) in seconds: the process's own
/// CPU and that of its children it has reaped.
fn proc_cpu(pid: u32) -> Option<(u32, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ppid: u32 = fields.get(1)?.parse().ok()?;
    let ticks: f64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((ppid, ticks / hz))
}

/// CPU seconds (user + system) of `pid`, its reaped children, and its live children: for
/// sealpost the one process; for Postfix the master and every daemon it runs or ran.
fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let (_, mut total) = proc_cpu(pid)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some((ppid, cpu)) = proc_cpu(child) {
            if ppid == pid {
                total += cpu;
            }
        }
    }
    Some(total)
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

fn message(size: usize) -> Vec<u8> {
    let mut m =
        format!("From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench\r\n\r\n").into_bytes();
    let line =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n";
    while m.len() + line.len() < size {
        m.extend_from_slice(line);
    }
    m.extend_from_slice(b".\r\n");
    m
}

async fn reply(r: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap() == 0 {
            panic!("connection closed; got {all:?}");
        }
        let last = line.as_bytes().get(3) == Some(&b' ');
        all.push_str(&line);
        if last {
            return all;
        }
    }
}

/// One submission session sending `count` messages, MAIL/RCPT/DATA pipelined.
async fn session(addr: SocketAddr, count: usize, body: Arc<Vec<u8>>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut c = BufReader::new(stream);
    reply(&mut c).await;
    c.get_mut()
        .write_all(b"EHLO load.bench.test\r\n")
        .await
        .unwrap();
    reply(&mut c).await;
    let envelope = format!("MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n");
    for _ in 0..count {
        c.get_mut().write_all(envelope.as_bytes()).await.unwrap();
        for _ in 0..3 {
            reply(&mut c).await;
        }
        c.get_mut().write_all(&body).await.unwrap();
        let r = reply(&mut c).await;
        assert!(r.starts_with("250 "), "{r}");
    }
    let _ = c.get_mut().write_all(b"QUIT\r\n").await;
}

/// Submits `total` messages over `sessions` sessions; returns when every one was accepted.
async fn builtin_load(target: SocketAddr, sessions: usize, total: usize, size: usize) {
    let body = Arc::new(message(size));
    let mut tasks = Vec::new();
    for i in 0..sessions {
        let count = total / sessions + usize::from(i < total % sessions);
        tasks.push(tokio::spawn(session(target, count, body.clone())));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Postfix's `smtp-source`: `sessions` connections kept open (`-d`), `total` messages of
/// `size` payload bytes, no pipelining.
async fn smtp_source_load(target: SocketAddr, sessions: usize, total: usize, size: usize) {
    let out = tokio::process::Command::new("smtp-source")
        .args(["-d", "-s", &sessions.to_string(), "-m", &total.to_string()])
        .args(["-l", &size.to_string(), "-M", "load.bench.test"])
        .args(["-f", SENDER, "-t", RECIPIENT, "-S", "bench"])
        .arg(target.to_string())
        .output()
        .await
        .expect("smtp-source runs (apt-get install postfix)");
    assert!(
        out.status.success(),
        "smtp-source failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::main]
async fn main() {
    let total = env_num("SEALPOST_BENCH_MESSAGES", 10_000);
    let sessions = env_num("SEALPOST_BENCH_SESSIONS", 50).clamp(1, total.max(1));
    let size = env_num("SEALPOST_BENCH_SIZE", 10 * 1024);
    let load = std::env::var("SEALPOST_BENCH_LOAD").unwrap_or_else(|_| "builtin".into());
    assert!(
        load == "builtin" || load == "smtp-source",
        "SEALPOST_BENCH_LOAD is builtin or smtp-source, not {load:?}"
    );
    let sink_addr = std::env::var("SEALPOST_BENCH_SINK").unwrap_or_else(|_| "127.0.0.2:0".into());
    let external: Option<SocketAddr> = std::env::var("SEALPOST_BENCH_TARGET")
        .ok()
        .map(|t| t.parse().expect("SEALPOST_BENCH_TARGET is ip:port"));

    let stats = Arc::new(SinkStats {
        expected: total,
        messages: AtomicUsize::new(0),
        tls_messages: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
        tls_connections: AtomicUsize::new(0),
        done_at: OnceLock::new(),
        done: Notify::new(),
    });
    let sink = start_sink(&sink_addr, stats.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let (mut relay, target, pid, mta) = match external {
        Some(target) => {
            let pid = std::env::var("SEALPOST_BENCH_TARGET_PID")
                .ok()
                .and_then(|p| p.parse().ok());
            let name = std::env::var("SEALPOST_BENCH_TARGET_NAME").unwrap_or("target".into());
            (None, target, pid, name)
        }
        None => {
            let (child, addr) = start_sealpost(dir.path(), sink);
            let pid = child.id();
            (Some(child), addr, Some(pid), "sealpost".to_string())
        }
    };
    let cpu_before = pid.and_then(tree_cpu_seconds).unwrap_or(0.0);

    let started = Instant::now();
    let builtin = load == "builtin";
    let mut submitted = tokio::spawn(async move {
        if builtin {
            builtin_load(target, sessions, total, size).await;
        } else {
            smtp_source_load(target, sessions, total, size).await;
        }
        started.elapsed()
    });
    // Wait for the sink's last message; a failing load generator ends the bench at once.
    let mut intake = None;
    let waited = tokio::time::timeout(DEADLINE, async {
        loop {
            tokio::select! {
                _ = stats.done.notified() => break,
                r = &mut submitted, if intake.is_none() => intake = Some(r.expect("load generator")),
            }
        }
    });
    if waited.await.is_err() {
        panic!(
            "sink {sink}: {} of {total} messages within {DEADLINE:?}",
            stats.messages.load(Ordering::Relaxed)
        );
    }
    let elapsed = stats.done_at.get().unwrap().duration_since(started);
    let cpu = pid
        .and_then(tree_cpu_seconds)
        .map(|after| after - cpu_before);
    let intake = match intake {
        Some(d) => d,
        None => submitted.await.expect("load generator"),
    };
    if let Some(child) = relay.as_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }

    let n = stats.messages.load(Ordering::Relaxed);
    let tls = stats.tls_messages.load(Ordering::Relaxed);
    let rate = n as f64 / elapsed.as_secs_f64();
    let per_1000 = cpu.map(|c| c * 1000.0 / n as f64);
    println!(
        "delivery: {mta}: {n} messages of {size} bytes, {sessions} sessions ({load} load), submitted in {:.2}s, all delivered after {:.2}s: {rate:.0} messages/s end to end; {} CPU per 1,000 messages",
        intake.as_secs_f64(),
        elapsed.as_secs_f64(),
        per_1000.map_or("unmeasured".to_string(), |c| format!("{c:.3}s")),
    );
    println!(
        "delivery: sink {sink}: {tls}/{n} messages over STARTTLS, {} of {} connections TLS, {:.1} KB per message body",
        stats.tls_connections.load(Ordering::Relaxed),
        stats.connections.load(Ordering::Relaxed),
        stats.bytes.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0,
    );
    assert_eq!(tls, n, "every message must reach the sink over STARTTLS");
    println!(
        "RESULT {mta}_msgs_per_sec={rate:.1} cpu_per_1000={} tls_messages={tls} messages={n} secs={:.3}",
        per_1000.map_or("NA".to_string(), |c| format!("{c:.4}")),
        elapsed.as_secs_f64(),
    );
}
