//! Intake throughput: N concurrent loopback sessions each submitting 10 KB messages to the real
//! `sealpost` binary (release build) with durability on (WAL + synchronous=FULL, audit fsync).
//! Reports accepted messages per second and p50/p99 time from the end of DATA to the 250.
//!
//! `cargo bench --bench intake` (env: SEALPOST_BENCH_SESSIONS, default 50;
//! SEALPOST_BENCH_MESSAGES, total messages, default 20000; SEALPOST_BENCH_SIZE, default 10240).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::TcpStream;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const CONFIG: &str = r#"[server]
hostname = "bench.test"
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
[encryption]
active_key = "k1"
create_if_missing = true
[[encryption.key]]
id = "k1"
file = "data/keys/k1.key"
[delivery]
enabled = false
[dns]
nameservers = ["127.0.0.1:9"]
"#;

fn start(dir: &std::path::Path) -> (std::process::Child, SocketAddr) {
    support::start_sealpost(dir, CONFIG)
}

async fn reply(r: &mut TokioBufReader<TcpStream>) -> String {
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

/// One session sending `count` messages; returns the end-of-DATA→250 latencies.
async fn session(addr: SocketAddr, count: usize, body: std::sync::Arc<Vec<u8>>) -> Vec<Duration> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut c = TokioBufReader::new(stream);
    reply(&mut c).await;
    c.get_mut()
        .write_all(b"EHLO bench.client\r\n")
        .await
        .unwrap();
    reply(&mut c).await;
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        c.get_mut()
            .write_all(
                b"MAIL FROM:<app@clinic.example>\r\nRCPT TO:<pat@hospital.example>\r\nDATA\r\n",
            )
            .await
            .unwrap();
        for _ in 0..3 {
            reply(&mut c).await;
        }
        c.get_mut().write_all(&body).await.unwrap();
        let end = Instant::now();
        let r = reply(&mut c).await;
        assert!(r.starts_with("250 "), "{r}");
        latencies.push(end.elapsed());
    }
    let _ = c.get_mut().write_all(b"QUIT\r\n").await;
    latencies
}

fn message(size: usize) -> Vec<u8> {
    let mut m =
        b"From: <app@clinic.example>\r\nTo: <pat@hospital.example>\r\nSubject: bench\r\n\r\n"
            .to_vec();
    let line =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n";
    while m.len() + line.len() < size {
        m.extend_from_slice(line);
    }
    m.extend_from_slice(b".\r\n");
    m
}

/// User + system CPU seconds of a process, from /proc (Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let sessions = env_num("SEALPOST_BENCH_SESSIONS", 50);
    let total = env_num("SEALPOST_BENCH_MESSAGES", 20_000);
    let size = env_num("SEALPOST_BENCH_SIZE", 10 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(dir.path());
    let body = std::sync::Arc::new(message(size));
    let per = total / sessions;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        tasks.push(tokio::spawn(session(addr, per, body.clone())));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let n = latencies.len();
    println!(
        "intake: {n} messages of {size} bytes over {sessions} sessions in {:.2}s: {:.0} messages/s; end of DATA to 250: p50 {:.2} ms, p99 {:.2} ms",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
    );
    if let Some(cpu) = cpu_seconds(child.id()) {
        println!(
            "intake: relay process CPU {:.2}s user+system, {:.3}s per 1,000 messages",
            cpu,
            cpu * 1000.0 / n as f64
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
