//! The queue: the only owner of persistent state.
//!
//! [`Store`] is the storage seam (SQLite now, PostgreSQL later; nothing in it assumes SQLite).
//! [`Queue`] sits in front of it and seals bodies with the [`keys::KeyRing`] before they reach
//! any store, so no store ever sees plaintext.

pub mod keys;
pub mod schedule;
pub mod sqlite;

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ids::MessageId;
use crate::policy::Decision;

pub use keys::{KeyError, KeyRing};

/// Errors of the queue and its stores.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The database refused or failed; the message was not stored.
    #[error("queue database: {0}")]
    Database(#[from] sqlx::Error),
    /// Schema migration failed at start.
    #[error("queue migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Creating the data directory or database file failed.
    #[error("queue storage {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Sealing or opening a body failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A stored row could not be understood (e.g. an unknown decision).
    #[error("queue row for {id}: {reason}")]
    Corrupt { id: String, reason: String },
    /// A group commit failed; none of its `count` messages were stored.
    #[error("queue transaction of {count} message(s) rolled back, none stored: {cause}")]
    Batch {
        count: usize,
        cause: Arc<sqlx::Error>,
    },
    /// The body was erased when the message's last recipient was delivered or failed.
    #[error("the body of {0} was erased after its last recipient was delivered or failed")]
    Erased(String),
    /// The store's writer has stopped (shutting down).
    #[error("queue is shut down")]
    Closed,
}

/// One recipient as accepted at intake.
#[derive(Debug, Clone, Serialize)]
pub struct NewRecipient {
    pub address: String,
    /// Lower-cased domain part.
    pub domain: String,
    pub decision: Decision,
}

/// Delivery lane: transactional mail never waits behind bulk mail; each lane has its own workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    #[default]
    Transactional,
    Bulk,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Transactional, Lane::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Transactional => "transactional",
            Lane::Bulk => "bulk",
        }
    }

    /// Case-insensitive, as the `X-Sealpost-Lane` header value.
    pub fn parse(s: &str) -> Option<Lane> {
        match s.trim().to_ascii_lowercase().as_str() {
            "transactional" => Some(Lane::Transactional),
            "bulk" => Some(Lane::Bulk),
            _ => None,
        }
    }
}

/// Envelope and facts of a message accepted at intake.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    pub id: MessageId,
    pub received_at: DateTime<Utc>,
    /// Envelope sender; empty for the null reverse-path `<>`.
    pub sender: String,
    pub recipients: Vec<NewRecipient>,
    pub client_ip: IpAddr,
    pub auth_user: Option<String>,
    /// The `Message-ID:` header, when present.
    pub message_id_header: Option<String>,
    /// Plaintext size in bytes.
    pub size: u64,
    pub lane: Lane,
}

/// A body sealed with AES-256-GCM.
#[derive(Debug, Clone)]
pub struct SealedBody {
    pub key_id: String,
    /// 12-byte nonce, unique per message.
    pub nonce: [u8; 12],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// Delivery status of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    Queued,
    Delivered,
    Deferred,
    Failed,
    Dropped,
    Escalated,
}

impl RecipientStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RecipientStatus::Queued => "queued",
            RecipientStatus::Delivered => "delivered",
            RecipientStatus::Deferred => "deferred",
            RecipientStatus::Failed => "failed",
            RecipientStatus::Dropped => "dropped",
            RecipientStatus::Escalated => "escalated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => RecipientStatus::Queued,
            "delivered" => RecipientStatus::Delivered,
            "deferred" => RecipientStatus::Deferred,
            "failed" => RecipientStatus::Failed,
            "dropped" => RecipientStatus::Dropped,
            "escalated" => RecipientStatus::Escalated,
            _ => return None,
        })
    }
}

/// One recipient row as stored.
#[derive(Debug, Clone, Serialize)]
pub struct StoredRecipient {
    /// Row id, unique in the store.
    pub id: i64,
    pub address: String,
    pub domain: String,
    pub decision: Decision,
    pub status: RecipientStatus,
    pub attempts: u32,
    pub next_attempt: Option<DateTime<Utc>>,
    pub last_reply: Option<String>,
    /// A delay-warning DSN was sent for this recipient.
    pub warned: bool,
}

/// A message as stored: envelope, recipients with their state, and the sealed body.
#[derive(Debug, Clone, Serialize)]
pub struct StoredMessage {
    pub id: MessageId,
    pub received_at: DateTime<Utc>,
    pub sender: String,
    pub client_ip: String,
    pub auth_user: Option<String>,
    pub message_id_header: Option<String>,
    pub size: u64,
    pub key_id: String,
    pub lane: Lane,
    pub recipients: Vec<StoredRecipient>,
    #[serde(skip)]
    pub body: Option<SealedBody>,
}

/// The storage seam. Every method is a complete, durable operation.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a message and its recipients. Returns only after the transaction holding it is
    /// committed and on stable storage; stores may commit many messages together.
    async fn insert(&self, envelope: Envelope, body: SealedBody) -> Result<(), QueueError>;
    /// All messages with their recipients, oldest first, without bodies.
    async fn list(&self) -> Result<Vec<StoredMessage>, QueueError>;
    /// One message with its recipients and sealed body.
    async fn get(&self, id: &MessageId) -> Result<Option<StoredMessage>, QueueError>;
    /// Claims the due recipients (queued or deferred, `next_attempt <= now`, no live lease) of
    /// up to `limit` messages for `owner` until `lease_until`, atomically: two workers never claim the same
    /// recipient while its lease lasts. Returns their messages (with bodies), each carrying only
    /// its claimed recipients. A crashed owner's recipients come back once the lease runs out.
    async fn claim(&self, claim: &Claim<'_>) -> Result<Vec<StoredMessage>, QueueError>;
    /// Releases every lease held by node `owner` (lease tokens `owner` and `owner#…`): a node
    /// restarting after a crash takes its unfinished recipients back at once instead of
    /// waiting for the leases to run out.
    async fn release(&self, owner: &str) -> Result<u64, QueueError>;
    /// Extends `owner`'s leases on these recipients (a delivery still running).
    async fn extend(
        &self,
        owner: &str,
        ids: &[i64],
        lease_until: DateTime<Utc>,
    ) -> Result<(), QueueError>;
    /// Records outcomes (attempts + 1 when attempted) and releases the leases, in one
    /// transaction. With `Some(owner)`, only rows still leased by `owner` change (a lease that
    /// was lost to another worker is not overwritten); with `None` (an operator), only open
    /// rows that no live lease holds. Returns how many rows changed.
    async fn finish(
        &self,
        owner: Option<&str>,
        now: DateTime<Utc>,
        updates: &[RecipientUpdate],
    ) -> Result<u64, QueueError>;
    /// Makes the open recipients of one message (or of all, with `None`) due at `now`;
    /// returns how many.
    async fn retry(&self, id: Option<&MessageId>, now: DateTime<Utc>) -> Result<u64, QueueError>;
    /// Removes a message and its recipients; false when there was none.
    async fn delete(&self, id: &MessageId) -> Result<bool, QueueError>;
    /// Finishes pending commits and stops background work.
    async fn close(&self);
}

/// What a delivery worker asks the store for.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    pub lane: Lane,
    /// Lease token.
    pub owner: &'a str,
    pub now: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
    /// Most messages to claim.
    pub limit: usize,
    /// Recipient domains to leave alone for now (no free connection or rate slot).
    pub skip_domains: &'a [String],
}

/// The outcome of one attempt for one recipient, as the store records it.
#[derive(Debug, Clone)]
pub struct RecipientUpdate {
    pub id: i64,
    pub status: RecipientStatus,
    /// When to try again (deferred); `None` for final states.
    pub next_attempt: Option<DateTime<Utc>>,
    pub last_reply: Option<String>,
    /// Count this as an attempt (false for admin actions such as bounce).
    pub attempted: bool,
    /// A delay-warning DSN was sent now (never cleared once set).
    pub warned: bool,
}

/// The queue: seals bodies, then hands them to the store.
#[derive(Clone)]
pub struct Queue {
    store: Arc<dyn Store>,
    keys: Arc<KeyRing>,
    /// Counts queued messages so delivery loops wake at once (each loop holds a receiver).
    queued: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Queue {
    pub fn new(store: Arc<dyn Store>, keys: Arc<KeyRing>) -> Queue {
        Queue {
            store,
            keys,
            queued: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Seals `body` (in place, no copy) and stores the message durably.
    pub async fn enqueue(&self, envelope: Envelope, body: Vec<u8>) -> Result<(), QueueError> {
        let sealed = self.keys.seal(&envelope.id, body)?;
        self.store.insert(envelope, sealed).await?;
        self.queued.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// A receiver whose `changed()` completes whenever a message was queued since it last looked.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.queued.subscribe()
    }

    pub async fn list(&self) -> Result<Vec<StoredMessage>, QueueError> {
        self.store.list().await
    }

    pub async fn get(&self, id: &MessageId) -> Result<Option<StoredMessage>, QueueError> {
        self.store.get(id).await
    }

    /// Decrypts a stored message's body.
    pub fn open_body(&self, message: &StoredMessage) -> Result<Vec<u8>, QueueError> {
        let body = message.body.clone().ok_or_else(|| QueueError::Corrupt {
            id: message.id.to_string(),
            reason: "no body stored".to_string(),
        })?;
        if body.ciphertext.is_empty() {
            return Err(QueueError::Erased(message.id.to_string()));
        }
        Ok(self.keys.open(&message.id, body)?)
    }

    pub async fn claim(&self, claim: &Claim<'_>) -> Result<Vec<StoredMessage>, QueueError> {
        self.store.claim(claim).await
    }

    pub async fn release(&self, owner: &str) -> Result<u64, QueueError> {
        self.store.release(owner).await
    }

    pub async fn extend(
        &self,
        owner: &str,
        ids: &[i64],
        lease_until: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        self.store.extend(owner, ids, lease_until).await
    }

    pub async fn finish(
        &self,
        owner: Option<&str>,
        updates: &[RecipientUpdate],
    ) -> Result<u64, QueueError> {
        self.store.finish(owner, Utc::now(), updates).await
    }

    pub async fn retry(&self, id: Option<&MessageId>) -> Result<u64, QueueError> {
        self.store.retry(id, Utc::now()).await
    }

    pub async fn delete(&self, id: &MessageId) -> Result<bool, QueueError> {
        self.store.delete(id).await
    }

    pub async fn close(&self) {
        self.store.close().await
    }
}
