//! Configuration: `sealpost.toml` into serde structs.
//!
//! Every struct denies unknown fields; every field has a doc comment (this is the reference that
//! `docs/configuration.md` follows) and a named default. Loading, validation and the
//! `key path (line:column)` diagnostics live in [`load`].
//!
//! Relative paths are resolved against the working directory `sealpost` is started in.

mod delivery;
mod duration;
pub mod load;

pub use delivery::{ClientTimeouts, Delivery, Dns, Rate, Route};
pub use duration::{duration_list, duration_opt, duration_str};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use load::{load, ConfigError, Loaded, Problem};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity, data directory and the policy file.
    pub server: Server,
    /// Session limits.
    #[serde(default)]
    pub limits: Limits,
    /// Inbound TLS certificate.
    #[serde(default)]
    pub tls: Tls,
    /// SMTP listeners; defaults to 127.0.0.1:2525 (smtp + STARTTLS) and 127.0.0.1:2465 (implicit TLS).
    #[serde(default = "default_listeners", rename = "listener")]
    pub listeners: Vec<Listener>,
    /// Who may relay.
    #[serde(default)]
    pub relay: Relay,
    /// SMTP AUTH users and brute-force protection.
    #[serde(default)]
    pub auth: Auth,
    /// The persistent queue.
    #[serde(default)]
    pub queue: Queue,
    /// At-rest encryption keys.
    pub encryption: Encryption,
    /// The audit log.
    #[serde(default)]
    pub audit: Audit,
    /// DNS resolution for delivery.
    #[serde(default)]
    pub dns: Dns,
    /// Outbound delivery: workers, retries, timeouts, routes.
    #[serde(default)]
    pub delivery: Delivery,
    /// Knobs that exist only so tests can run on loopback without root. `check` warns when present.
    #[serde(default)]
    pub testing: Option<Testing>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Host name used in the greeting, EHLO reply and `Received:` header.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Directory for the queue, audit log and keys; created on first start.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Path of the policy file.
    pub policy: PathBuf,
    /// Grace period for sessions in DATA at shutdown.
    #[serde(default = "default_grace", with = "duration_str")]
    pub shutdown_grace: Duration,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest message accepted, in bytes (advertised as SIZE); larger ones get 552 5.3.4.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// Recipients per message; more get 452 4.5.3.
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Longest command line in octets including CRLF; longer ones get 500 5.5.2.
    #[serde(default = "default_max_command_line")]
    pub max_command_line: usize,
    /// Longest message line in octets excluding CRLF (RFC 5321 says 998); longer ones get 500 5.5.2.
    #[serde(default = "default_max_data_line")]
    pub max_data_line: usize,
    /// Time to wait for a command before 421 4.4.2.
    #[serde(default = "default_command_timeout", with = "duration_str")]
    pub command_timeout: Duration,
    /// Time to wait for each chunk of message data before 421 4.4.2.
    #[serde(default = "default_data_timeout", with = "duration_str")]
    pub data_timeout: Duration,
    /// Concurrent sessions in total; more get 421 4.7.0.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Concurrent sessions from one client IP; more get 421 4.7.0.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Unknown or malformed commands tolerated per session before 421 and close.
    #[serde(default = "default_max_bad_commands")]
    pub max_bad_commands: usize,
}

/// `[tls]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain for inbound TLS.
    pub cert: Option<PathBuf>,
    /// PEM private key for inbound TLS.
    pub key: Option<PathBuf>,
    /// Generate a self-signed certificate at start when `cert`/`key` are not given.
    #[serde(default)]
    pub self_signed: bool,
}

/// Listener kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerKind {
    /// Plain SMTP, STARTTLS offered when `starttls = true` and a certificate is available.
    Smtp,
    /// TLS from the first byte (submissions, RFC 8314).
    ImplicitTls,
}

/// `[[listener]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Address and port to bind, e.g. `127.0.0.1:2525`.
    pub address: SocketAddr,
    /// `smtp` or `implicit-tls`.
    #[serde(default = "default_kind")]
    pub kind: ListenerKind,
    /// Offer STARTTLS on an `smtp` listener.
    #[serde(default = "default_true")]
    pub starttls: bool,
}

/// `[relay]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    /// Client networks (CIDR) allowed to relay without AUTH.
    #[serde(default = "default_trusted")]
    pub trusted_networks: Vec<IpNet>,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// Failed AUTH attempts from one IP before it is refused.
    #[serde(default = "default_auth_failures")]
    pub max_failures: u32,
    /// How long an IP over the limit is refused.
    #[serde(default = "default_auth_lockout", with = "duration_str")]
    pub lockout: Duration,
    /// Users allowed to AUTH (PLAIN, LOGIN) once the session is encrypted.
    #[serde(default, rename = "user")]
    pub users: Vec<User>,
}

/// `[[auth.user]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Argon2 PHC string from `sealpost hash-password`.
    pub password_hash: String,
}

/// `[queue]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    /// SQLite database file.
    #[serde(default = "default_queue_path")]
    pub path: PathBuf,
    /// Most messages committed in one transaction (group commit).
    #[serde(default = "default_batch")]
    pub max_batch: usize,
}

/// `[encryption]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// Id of the key new messages are sealed with.
    pub active_key: String,
    /// Create the active key file on start when missing (audited as `key.created`).
    #[serde(default)]
    pub create_if_missing: bool,
    /// All keys: the active one and older ones still needed to read queued messages.
    #[serde(rename = "key")]
    pub keys: Vec<KeyRef>,
}

/// `[[encryption.key]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRef {
    /// Key id stored with each message (1 to 32 characters: letters, digits, `-`, `_`).
    pub id: String,
    /// File holding the 32 raw key bytes, mode 0600 (`sealpost keygen PATH`).
    pub file: PathBuf,
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// JSON-lines audit log file.
    #[serde(default = "default_audit_path")]
    pub path: PathBuf,
}

/// `[testing]`: never in production.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Testing {
    /// Port dialled for MX delivery instead of 25.
    pub mx_port: Option<u16>,
    /// Port of the MTA-STS policy host instead of 443.
    pub mta_sts_port: Option<u16>,
    /// Extra trust anchors for PKIX checks.
    #[serde(default)]
    pub extra_roots: Vec<PathBuf>,
}

fn default_hostname() -> String {
    "sealpost.localhost".to_string()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_max_message_size() -> u64 {
    25 * 1024 * 1024
}
fn default_max_recipients() -> usize {
    100
}
fn default_max_command_line() -> usize {
    2048
}
fn default_max_data_line() -> usize {
    998
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_data_timeout() -> Duration {
    Duration::from_secs(180)
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_connections_per_ip() -> usize {
    200
}
fn default_max_bad_commands() -> usize {
    10
}
fn default_kind() -> ListenerKind {
    ListenerKind::Smtp
}
pub(crate) fn default_true() -> bool {
    true
}
fn default_trusted() -> Vec<IpNet> {
    Vec::new()
}
fn default_auth_failures() -> u32 {
    5
}
fn default_auth_lockout() -> Duration {
    Duration::from_secs(900)
}
fn default_queue_path() -> PathBuf {
    PathBuf::from("data/queue.sqlite")
}
fn default_batch() -> usize {
    256
}
fn default_audit_path() -> PathBuf {
    PathBuf::from("data/audit.jsonl")
}

/// The default listeners: 127.0.0.1:2525 (smtp + STARTTLS), 127.0.0.1:2465 (implicit TLS).
pub fn default_listeners() -> Vec<Listener> {
    vec![
        Listener {
            address: SocketAddr::from(([127, 0, 0, 1], 2525)),
            kind: ListenerKind::Smtp,
            starttls: true,
        },
        Listener {
            address: SocketAddr::from(([127, 0, 0, 1], 2465)),
            kind: ListenerKind::ImplicitTls,
            starttls: false,
        },
    ]
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            max_command_line: default_max_command_line(),
            max_data_line: default_max_data_line(),
            command_timeout: default_command_timeout(),
            data_timeout: default_data_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            max_bad_commands: default_max_bad_commands(),
        }
    }
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            trusted_networks: default_trusted(),
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            max_failures: default_auth_failures(),
            lockout: default_auth_lockout(),
            users: Vec::new(),
        }
    }
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            path: default_queue_path(),
            max_batch: default_batch(),
        }
    }
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            path: default_audit_path(),
        }
    }
}
