//! `[dns]` and `[delivery]`: resolution, workers, retries, timeouts, routes and rates.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::default_true;
use super::duration::{duration_list, duration_opt, duration_str};

/// `[dns]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Nameservers as `ip:port`; the system resolver (/etc/resolv.conf) when empty.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// Time to wait for one answer.
    #[serde(default = "default_dns_timeout", with = "duration_str")]
    pub timeout: Duration,
    /// Attempts per query before it counts as a temporary failure.
    #[serde(default = "default_dns_attempts")]
    pub attempts: usize,
}

/// `[delivery]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// Deliver queued mail. `false` keeps everything queued (intake only; like Postfix's
    /// `defer_transports` for all mail); `sealpost queue` still works.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Name sent in EHLO; `server.hostname` when absent (Postfix: smtp_helo_name).
    pub helo_name: Option<String>,
    /// Concurrent deliveries of the transactional lane (the default lane).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Concurrent deliveries of the bulk lane (`X-Sealpost-Lane: bulk`); bulk mail never takes
    /// a transactional worker.
    #[serde(default = "default_bulk_workers")]
    pub bulk_workers: usize,
    /// Per-domain delivery rates (messages per minute).
    #[serde(default, rename = "rate")]
    pub rates: Vec<Rate>,
    /// Waits between attempts; after the list, the last wait doubles up to `max_retry_interval`.
    #[serde(default = "default_retry_schedule", with = "duration_list")]
    pub retry_schedule: Vec<Duration>,
    /// Longest wait between two attempts (Postfix: maximal_backoff_time).
    #[serde(default = "default_max_retry", with = "duration_str")]
    pub max_retry_interval: Duration,
    /// Age after which an undelivered recipient fails with a DSN (Postfix: maximal_queue_lifetime).
    #[serde(default = "default_lifetime", with = "duration_str")]
    pub max_queue_lifetime: Duration,
    /// Send the sender one "delayed" DSN when a recipient is still undelivered this long after
    /// arrival (Postfix: delay_warning_time). Off when absent.
    #[serde(default, with = "duration_opt")]
    pub delay_warning: Option<Duration>,
    /// How long a claimed recipient stays with one worker before another may take it over.
    #[serde(default = "default_lease", with = "duration_str")]
    pub lease: Duration,
    /// How often the queue is polled for due recipients when idle.
    #[serde(default = "default_poll", with = "duration_str")]
    pub poll_interval: Duration,
    /// Concurrent connections to one destination (Postfix: default_destination_concurrency_limit).
    #[serde(default = "default_per_destination")]
    pub max_connections_per_destination: usize,
    /// Messages sent over one connection before it is closed (Postfix: smtp_connection_reuse_count_limit).
    #[serde(default = "default_per_connection")]
    pub max_messages_per_connection: usize,
    /// RFC 5321 §4.5.3.2 timeouts.
    #[serde(default)]
    pub timeouts: ClientTimeouts,
    /// Send everything through this host (`host` or `host:port`) instead of MX lookups
    /// (Postfix: relayhost).
    pub relay_host: Option<String>,
    /// Per-domain next hops (Postfix: transport_maps).
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
}

/// `[delivery.timeouts]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTimeouts {
    #[serde(default = "default_connect_timeout", with = "duration_str")]
    pub connect: Duration,
    #[serde(default = "five_minutes", with = "duration_str")]
    pub greeting: Duration,
    #[serde(default = "five_minutes", with = "duration_str")]
    pub ehlo: Duration,
    #[serde(default = "five_minutes", with = "duration_str")]
    pub mail: Duration,
    #[serde(default = "five_minutes", with = "duration_str")]
    pub rcpt: Duration,
    #[serde(default = "two_minutes", with = "duration_str")]
    pub data_init: Duration,
    #[serde(default = "three_minutes", with = "duration_str")]
    pub data_block: Duration,
    #[serde(default = "ten_minutes", with = "duration_str")]
    pub data_term: Duration,
}

/// `[[delivery.rate]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Recipient domain (exact, case-insensitive).
    pub domain: String,
    /// Messages per minute at most, spread evenly.
    pub per_minute: u32,
}

/// `[[delivery.route]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Recipient domain this route applies to (exact, lower case).
    pub domain: String,
    /// `host` or `host:port` (port 25 by default) to deliver to, without MX lookup.
    pub next_hop: String,
}

fn default_dns_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_dns_attempts() -> usize {
    2
}
fn default_workers() -> usize {
    32
}
fn default_bulk_workers() -> usize {
    4
}
fn default_retry_schedule() -> Vec<Duration> {
    [5, 10, 20, 40, 60]
        .iter()
        .map(|m| Duration::from_secs(m * 60))
        .collect()
}
fn default_max_retry() -> Duration {
    Duration::from_secs(4 * 3600)
}
fn default_lifetime() -> Duration {
    Duration::from_secs(5 * 86400)
}
fn default_lease() -> Duration {
    Duration::from_secs(600)
}
fn default_poll() -> Duration {
    Duration::from_secs(1)
}
fn default_per_destination() -> usize {
    20
}
fn default_per_connection() -> usize {
    100
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(30)
}
fn two_minutes() -> Duration {
    Duration::from_secs(120)
}
fn three_minutes() -> Duration {
    Duration::from_secs(180)
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}
fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            nameservers: Vec::new(),
            timeout: default_dns_timeout(),
            attempts: default_dns_attempts(),
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            enabled: true,
            helo_name: None,
            workers: default_workers(),
            bulk_workers: default_bulk_workers(),
            rates: Vec::new(),
            retry_schedule: default_retry_schedule(),
            max_retry_interval: default_max_retry(),
            max_queue_lifetime: default_lifetime(),
            delay_warning: None,
            lease: default_lease(),
            poll_interval: default_poll(),
            max_connections_per_destination: default_per_destination(),
            max_messages_per_connection: default_per_connection(),
            timeouts: ClientTimeouts::default(),
            relay_host: None,
            routes: Vec::new(),
        }
    }
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            connect: default_connect_timeout(),
            greeting: five_minutes(),
            ehlo: five_minutes(),
            mail: five_minutes(),
            rcpt: five_minutes(),
            data_init: two_minutes(),
            data_block: three_minutes(),
            data_term: ten_minutes(),
        }
    }
}
