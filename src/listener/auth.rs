//! SMTP AUTH (RFC 4954): PLAIN and LOGIN against Argon2 hashes, and the per-IP failure throttle.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use base64::Engine;

use crate::config;

/// Configured users: name → PHC hash string.
pub struct Users {
    hashes: HashMap<String, String>,
    /// Argon2 checks use ~19 MiB and real CPU each: at most one per core at a time.
    checks: tokio::sync::Semaphore,
}

impl Users {
    pub fn new(users: &[config::User]) -> Users {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Users {
            hashes: users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
            checks: tokio::sync::Semaphore::new(cores),
        }
    }

    /// True when `user` is a configured login name.
    pub fn exists(&self, user: &str) -> bool {
        self.hashes.contains_key(user)
    }

    /// Checks a password; CPU-heavy (Argon2), so it runs on the blocking pool. Unknown users are
    /// checked against a fixed dummy hash so timing does not reveal which names exist.
    pub async fn verify(&self, user: &str, password: String) -> bool {
        let known = self.hashes.get(user).cloned();
        let hash = known.clone().unwrap_or_else(|| DUMMY_HASH.to_string());
        let Ok(_permit) = self.checks.acquire().await else {
            return false;
        };
        let ok = tokio::task::spawn_blocking(move || check(&hash, password.as_bytes()))
            .await
            .unwrap_or(false);
        ok && known.is_some()
    }
}

/// A valid Argon2id hash of a random password nobody knows.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2VhbHBvc3RkdW1teQ$U0m6iqEtWYaI+1qb0CfTHiMvWl4M2TV6rNP2Yf0bTq0";

fn check(phc: &str, password: &[u8]) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

/// Hashes a password for the config (`sealpost hash-password`).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| argon2::password_hash::Error::Crypto)?;
    let salt = SaltString::encode_b64(&bytes)?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Counts failed AUTH attempts per client IP within a window of `lockout`; at `max_failures`
/// the IP is locked out for `lockout`. A success does not clear the count, so one valid account
/// cannot be used to reset the counter while guessing another's password.
pub struct Throttle {
    max_failures: u32,
    lockout: Duration,
    state: Mutex<HashMap<IpAddr, Failures>>,
}

struct Failures {
    count: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

impl Failures {
    fn expired(&self, now: Instant, lockout: Duration) -> bool {
        match self.locked_until {
            Some(until) => until <= now,
            None => now.duration_since(self.window_start) >= lockout,
        }
    }
}

/// The throttled unit: an IPv4 address, or an IPv6 /64 (one subscriber's usual allocation).
fn throttle_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let masked = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(masked.into())
        }
        v4 => v4,
    }
}

/// Above this many tracked IPs, expired entries are pruned.
const PRUNE_AT: usize = 10_000;

impl Throttle {
    pub fn new(max_failures: u32, lockout: Duration) -> Throttle {
        Throttle {
            max_failures,
            lockout,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// True while `ip` is locked out.
    pub fn is_locked(&self, ip: IpAddr) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .get(&throttle_key(ip))
            .and_then(|f| f.locked_until)
            .is_some_and(|until| until > Instant::now())
    }

    /// Records a failure; returns true when this failure locked the IP out.
    pub fn failure(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.len() >= PRUNE_AT {
            state.retain(|_, f| !f.expired(now, self.lockout));
        }
        let entry = state.entry(throttle_key(ip)).or_insert(Failures {
            count: 0,
            window_start: now,
            locked_until: None,
        });
        if entry.expired(now, self.lockout) {
            *entry = Failures {
                count: 0,
                window_start: now,
                locked_until: None,
            };
        }
        entry.count += 1;
        if entry.count >= self.max_failures {
            entry.locked_until = Some(now + self.lockout);
            return true;
        }
        false
    }
}

/// Decodes a base64 SASL response; `None` when it is not valid base64.
pub fn decode_b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

pub fn encode_b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Splits a PLAIN response `authzid NUL authcid NUL password` into (authcid, password).
/// An authzid different from the authcid is refused (no proxy authorization).
pub fn parse_plain(raw: &[u8]) -> Option<(String, String)> {
    let mut parts = raw.split(|b| *b == 0);
    let authz = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?;
    let pass = std::str::from_utf8(parts.next()?).ok()?;
    if parts.next().is_some() || (!authz.is_empty() && authz != user.as_bytes()) {
        return None;
    }
    Some((user.to_string(), pass.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_parsing() {
        assert_eq!(
            parse_plain(b"\0app\0secret"),
            Some(("app".into(), "secret".into()))
        );
        assert_eq!(
            parse_plain(b"app\0app\0secret"),
            Some(("app".into(), "secret".into()))
        );
        assert_eq!(parse_plain(b"other\0app\0secret"), None);
        assert_eq!(parse_plain(b"app-secret"), None);
    }

    #[test]
    fn throttle_locks_after_limit() {
        let t = Throttle::new(2, Duration::from_secs(60));
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert!(!t.failure(ip));
        assert!(!t.is_locked(ip));
        assert!(t.failure(ip));
        assert!(t.is_locked(ip));
    }

    #[test]
    fn hash_roundtrip() {
        let h = hash_password("pw").unwrap();
        assert!(check(&h, b"pw"));
        assert!(!check(&h, b"nope"));
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }
}
