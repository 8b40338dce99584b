//! Identifier newtypes shared across modules.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

/// Queue identifier of one message: 12 hex digits of milliseconds since the epoch, 6 hex digits
/// chosen at random once per process (tells nodes apart), and 6 hex digits of a per-process
/// counter (unique within the process). Sortable by arrival time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(String);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn process_tag() -> u32 {
    static TAG: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *TAG.get_or_init(|| {
        let mut rnd = [0u8; 4];
        // Without a working RNG, the pid still tells concurrent processes apart.
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd).is_err() {
            return std::process::id();
        }
        u32::from_be_bytes(rnd)
    })
}

impl MessageId {
    /// A fresh identifier.
    pub fn generate() -> Self {
        let millis = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        MessageId(format!(
            "{:012X}{:06X}{:06X}",
            millis & 0xFFFF_FFFF_FFFF,
            process_tag() & 0xFF_FFFF,
            count & 0xFF_FFFF
        ))
    }

    /// Wraps an identifier read from storage or typed by an operator.
    pub fn from_string(s: impl Into<String>) -> Self {
        MessageId(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of one SMTP session, for correlating audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl SessionId {
    pub fn next() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        SessionId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
