//! Shared by the benchmarks: start the release `sealpost` binary on a config and find its
//! SMTP listener.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// Writes `config` and a default policy into `dir`, starts `sealpost serve` there, and returns
/// the process and the first listener it printed.
pub fn start_sealpost(dir: &std::path::Path, config: &str) -> (Child, SocketAddr) {
    std::fs::write(dir.join("sealpost.toml"), config).unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[defaults]\nmode = \"opportunistic\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .args(["serve", "--config", "sealpost.toml"])
        .current_dir(dir)
        .env("SEALPOST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("relay started").unwrap();
        if let Some(rest) = line.strip_prefix("sealpost: listening on ") {
            break rest.split(' ').next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}
