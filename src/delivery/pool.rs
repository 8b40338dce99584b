//! Idle outbound connections kept for reuse, keyed by address, host name and TLS requirement.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::client::Connection;

/// How long an idle connection is kept.
const IDLE: Duration = Duration::from_secs(30);

struct Idle {
    conn: Connection,
    sent: usize,
    since: Instant,
}

type Key = (SocketAddr, String, String);

/// The pool. A connection is reused after a successful RSET, at most `max_messages` times.
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    max_messages: usize,
}

impl Pool {
    pub fn new(max_messages: usize) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            max_messages: max_messages.max(1),
        }
    }

    /// An idle connection for this destination, with the number of messages it has carried.
    pub fn take(&self, addr: SocketAddr, host: &str, tls: &str) -> Option<(Connection, usize)> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let key = (addr, host.to_string(), tls.to_string());
        let list = idle.get_mut(&key)?;
        while let Some(entry) = list.pop() {
            if entry.since.elapsed() < IDLE {
                return Some((entry.conn, entry.sent));
            }
            tokio::spawn(entry.conn.quit());
        }
        None
    }

    /// Returns a connection after a transaction; closes it when it has carried enough.
    pub fn give(&self, addr: SocketAddr, host: &str, tls: &str, conn: Connection, sent: usize) {
        if sent >= self.max_messages {
            tokio::spawn(conn.quit());
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Close what has idled too long anywhere, so connections to destinations that get no
        // more mail do not stay open until shutdown.
        for list in idle.values_mut() {
            list.retain_mut(|entry| entry.since.elapsed() < IDLE);
        }
        idle.retain(|_, list| !list.is_empty());
        let key = (addr, host.to_string(), tls.to_string());
        idle.entry(key).or_default().push(Idle {
            conn,
            sent,
            since: Instant::now(),
        });
    }

    /// Closes every idle connection (shutdown).
    pub fn clear(&self) {
        let drained: Vec<Idle> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.drain().flat_map(|(_, v)| v).collect()
        };
        for entry in drained {
            tokio::spawn(entry.conn.quit());
        }
    }
}
