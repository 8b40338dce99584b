//! The delivery loop: claim due recipients with a lease, split them by destination domain and
//! deliver each group in its own task, bounded by `delivery.workers` and by
//! `max_connections_per_destination` per domain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::audit::AuditLog;
use crate::config;
use crate::dns::Dns;
use crate::policy::Policy;
use crate::queue::{Claim, Lane, Queue, StoredMessage, StoredRecipient};
use crate::shutdown::Signal;

use super::mx::{RouteError, Routes};
use super::pool::Pool;
use super::tls::TlsClients;

/// Everything a delivery task needs, shared.
pub struct Deliverer {
    pub(super) queue: Queue,
    pub(super) audit: AuditLog,
    pub(super) dns: Dns,
    pub(super) routes: Routes,
    pub(super) tls: TlsClients,
    pub(super) policy: Policy,
    pub(super) cfg: config::Delivery,
    /// Name in EHLO and in DSNs' Reporting-MTA.
    pub(super) helo: String,
    /// Port dialled for MX hosts: 25, or `[testing] mx_port`.
    pub(super) mx_port: u16,
    pub(super) pool: Pool,
    /// This node's name in leases; each claim's lease token is `node#n`.
    node: String,
    /// Claims made so far (makes lease tokens unique).
    claims: std::sync::atomic::AtomicU64,
    per_domain: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Per-domain pacing: spacing between messages and the next free slot.
    rates: HashMap<String, (Duration, Mutex<tokio::time::Instant>)>,
}

/// One message's recipients at one domain, delivered in one transaction.
pub(super) struct Group {
    /// The lease token of the claim this group came from.
    pub lease: Arc<str>,
    pub message: Arc<StoredMessage>,
    pub domain: String,
    pub recipients: Vec<StoredRecipient>,
}

/// Pieces from `serve` the deliverer is built from.
pub struct Parts {
    pub queue: Queue,
    pub audit: AuditLog,
    pub dns: Dns,
    pub tls: TlsClients,
    pub policy: Policy,
    pub cfg: config::Delivery,
    pub hostname: String,
    pub mx_port: u16,
}

impl Deliverer {
    /// Fails only on routes `check` would reject.
    pub fn new(parts: Parts) -> Result<Arc<Deliverer>, Vec<RouteError>> {
        let helo = parts.cfg.helo_name.clone().unwrap_or(parts.hostname);
        Ok(Arc::new(Deliverer {
            routes: Routes::from_config(&parts.cfg)?,
            pool: Pool::new(parts.cfg.max_messages_per_connection),
            // Stable across restarts, distinct per node (the host name): a restarted node takes
            // back its own unfinished leases at once.
            node: helo.clone(),
            claims: std::sync::atomic::AtomicU64::new(0),
            per_domain: Mutex::new(HashMap::new()),
            rates: parts
                .cfg
                .rates
                .iter()
                .map(|r| {
                    let spacing = Duration::from_secs(60) / r.per_minute.max(1);
                    let slot = Mutex::new(tokio::time::Instant::now());
                    (r.domain.to_ascii_lowercase(), (spacing, slot))
                })
                .collect(),
            queue: parts.queue,
            audit: parts.audit,
            dns: parts.dns,
            tls: parts.tls,
            policy: parts.policy,
            cfg: parts.cfg,
            helo,
            mx_port: parts.mx_port,
        }))
    }

    /// Runs one loop per lane until `signal`; then waits up to `grace` for deliveries in
    /// flight. Recipients of deliveries cut off then keep their lease until it runs out and are
    /// retried.
    pub async fn run(self: Arc<Self>, signal: Signal, grace: Duration) {
        match self.queue.release(&self.node).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                recipients = n,
                "took back deliveries left unfinished by a previous run"
            ),
            Err(e) => tracing::error!(error = %e, "releasing leases of a previous run failed"),
        }
        let mut lanes = JoinSet::new();
        for lane in Lane::ALL {
            let workers = match lane {
                Lane::Transactional => self.cfg.workers,
                Lane::Bulk => self.cfg.bulk_workers,
            };
            lanes.spawn(
                self.clone()
                    .run_lane(lane, workers.max(1), signal.clone(), grace),
            );
        }
        while lanes.join_next().await.is_some() {}
        self.pool.clear();
    }

    /// One lane: its own workers, claiming only its own recipients, so a bulk backlog never
    /// delays transactional mail.
    async fn run_lane(
        self: Arc<Self>,
        lane: Lane,
        workers: usize,
        mut signal: Signal,
        grace: Duration,
    ) {
        let slots = Arc::new(Semaphore::new(workers));
        let mut queued = self.queue.subscribe();
        let mut tasks = JoinSet::new();
        while !signal.is_shutdown() {
            let (lease, claimed) = self.claim(lane, slots.available_permits()).await;
            if claimed.is_empty() {
                tokio::select! {
                    _ = signal.recv() => break,
                    _ = queued.changed() => {}
                    _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
                continue;
            }
            for group in groups(&lease, claimed) {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                tasks.spawn(self.clone().deliver(group, permit));
            }
            while tasks.try_join_next().is_some() {}
        }
        let drain = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(grace, drain).await;
        tasks.abort_all();
    }

    /// Claims due recipients under a fresh lease token; returns the token and the messages.
    async fn claim(&self, lane: Lane, free: usize) -> (Arc<str>, Vec<StoredMessage>) {
        let n = self
            .claims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token: Arc<str> = Arc::from(format!("{}#{n}", self.node));
        if free == 0 {
            return (token, Vec::new());
        }
        let now = Utc::now();
        let skip = self.saturated_domains();
        let claim = Claim {
            lane,
            owner: &token,
            now,
            lease_until: now + self.lease(),
            limit: free,
            skip_domains: &skip,
        };
        match self.queue.claim(&claim).await {
            Ok(claimed) => (token, claimed),
            Err(e) => {
                tracing::error!(error = %e, lane = lane.as_str(), "claiming due recipients failed");
                (token, Vec::new())
            }
        }
    }

    /// Domains with no free connection slot or whose rate slot is still ahead: claiming
    /// their mail now would only park workers.
    fn saturated_domains(&self) -> Vec<String> {
        let mut out: Vec<String> = {
            let mut map = self.per_domain.lock().unwrap_or_else(|e| e.into_inner());
            // Forget idle domains (nobody else holds their semaphore).
            map.retain(|_, s| Arc::strong_count(s) > 1);
            map.iter()
                .filter(|(_, s)| s.available_permits() == 0)
                .map(|(d, _)| d.clone())
                .collect()
        };
        let now = tokio::time::Instant::now();
        for (domain, (_, next)) in &self.rates {
            if *next.lock().unwrap_or_else(|e| e.into_inner()) > now {
                out.push(domain.clone());
            }
        }
        out
    }

    fn lease(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.cfg.lease).unwrap_or(chrono::Duration::minutes(10))
    }

    /// Keeps a running delivery's lease alive (every third of the lease period) so no other
    /// worker takes the recipients over while it still talks to the remote server.
    async fn heartbeat(&self, group: &Group) {
        let ids: Vec<i64> = group.recipients.iter().map(|r| r.id).collect();
        let period = (self.cfg.lease / 3).max(Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tick.tick().await;
            let until = Utc::now() + self.lease();
            if let Err(e) = self.queue.extend(&group.lease, &ids, until).await {
                tracing::warn!(error = %e, "extending a delivery lease failed");
            }
        }
    }

    async fn deliver(self: Arc<Self>, group: Group, _slot: OwnedSemaphorePermit) {
        let limit = self.destination(&group.domain);
        let Ok(_conn_slot) = limit.acquire_owned().await else {
            return;
        };
        let results = tokio::select! {
            results = async {
                self.pace(&group.domain).await;
                self.attempt(&group).await
            } => results,
            _ = self.heartbeat(&group) => unreachable!("the heartbeat never ends"),
        };
        self.record(&group, results).await;
    }

    /// Waits for the domain's next slot when `[[delivery.rate]]` limits it.
    async fn pace(&self, domain: &str) {
        let Some((spacing, next)) = self.rates.get(domain) else {
            return;
        };
        let at = {
            let mut next = next.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + *spacing;
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// The per-domain connection limit.
    fn destination(&self, domain: &str) -> Arc<Semaphore> {
        let mut map = self.per_domain.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(domain.to_string())
            .or_insert_with(|| {
                Arc::new(Semaphore::new(
                    self.cfg.max_connections_per_destination.max(1),
                ))
            })
            .clone()
    }
}

/// Splits claimed messages into one group per (message, recipient domain, decision): one
/// transaction carries only recipients that ask for the same TLS treatment.
fn groups(lease: &Arc<str>, claimed: Vec<StoredMessage>) -> Vec<Group> {
    let mut out = Vec::new();
    for mut message in claimed {
        let recipients = std::mem::take(&mut message.recipients);
        let message = Arc::new(message);
        let mut by_domain: Vec<(String, Vec<StoredRecipient>)> = Vec::new();
        for r in recipients {
            let same = |(d, list): &&mut (String, Vec<StoredRecipient>)| {
                *d == r.domain && list[0].decision == r.decision
            };
            match by_domain.iter_mut().find(same) {
                Some((_, list)) => list.push(r),
                None => by_domain.push((r.domain.clone(), vec![r])),
            }
        }
        for (domain, recipients) in by_domain {
            out.push(Group {
                lease: lease.clone(),
                message: message.clone(),
                domain,
                recipients,
            });
        }
    }
    out
}
