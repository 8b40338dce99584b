//! The typed audit events. Addresses and technical facts only: never bodies, subjects or
//! attachment names.

use std::net::IpAddr;

use serde::Serialize;

use crate::ids::{MessageId, SessionId};
use crate::policy::Mode;

/// One recipient's decision as recorded in `message.received`.
#[derive(Debug, Clone, Serialize)]
pub struct RecipientDecision {
    pub address: String,
    pub mode: Mode,
    pub rule: String,
}

/// Every event the audit log knows. Serialized with `"event": "<name>"` and the variant's fields.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event")]
pub enum AuditEvent {
    /// The service started with this configuration and policy.
    #[serde(rename = "service.started")]
    ServiceStarted {
        version: String,
        config_sha256: String,
        policy_sha256: String,
        listeners: Vec<String>,
    },
    /// The service stopped.
    #[serde(rename = "service.stopped")]
    ServiceStopped { reason: String },
    /// An at-rest key file was created because it was missing (`create_if_missing`).
    #[serde(rename = "key.created")]
    KeyCreated { key_id: String, path: String },
    /// A client connected.
    #[serde(rename = "session.connected")]
    SessionConnected {
        session: SessionId,
        client_ip: IpAddr,
        client_port: u16,
        listener: String,
    },
    /// A TLS handshake completed on an inbound session.
    #[serde(rename = "session.tls")]
    SessionTls {
        session: SessionId,
        client_ip: IpAddr,
        version: String,
        cipher: String,
    },
    /// An AUTH attempt (never the password).
    #[serde(rename = "session.auth")]
    SessionAuth {
        session: SessionId,
        client_ip: IpAddr,
        user: String,
        mechanism: String,
        success: bool,
    },
    /// A message was queued durably (written before its 250).
    #[serde(rename = "message.received")]
    MessageReceived {
        queue_id: MessageId,
        session: SessionId,
        sender: String,
        recipients: Vec<RecipientDecision>,
        size: u64,
        client_ip: IpAddr,
        auth_user: Option<String>,
        message_id: Option<String>,
        tls: Option<String>,
    },
    /// A transaction, recipient or session was refused.
    #[serde(rename = "message.rejected")]
    MessageRejected {
        session: SessionId,
        client_ip: IpAddr,
        stage: String,
        code: u16,
        enhanced: String,
        reason: String,
        sender: Option<String>,
        recipient: Option<String>,
    },
    /// An operator decrypted a queued body (`queue show --body`).
    #[serde(rename = "admin.body_viewed")]
    AdminBodyViewed {
        queue_id: MessageId,
        os_user: String,
    },
    /// One delivery attempt to one host: what was said and what TLS looked like.
    #[serde(rename = "delivery.attempt")]
    DeliveryAttempt {
        queue_id: MessageId,
        recipients: Vec<String>,
        mx_host: String,
        ip: Option<IpAddr>,
        port: u16,
        /// TLS facts (version, cipher, certificate subject/issuer/fingerprint/expiry, whether
        /// it verified and why not); `None` for plaintext.
        tls: Option<crate::delivery::tls::TlsReport>,
        /// Why TLS was not used although offered (opportunistic fallback).
        tls_fallback: Option<String>,
        /// The remote reply (or local error) that ended the attempt.
        reply: String,
        enhanced: Option<String>,
        duration_ms: u64,
    },
    /// A recipient was accepted by the remote server (after its 250 to the final dot).
    #[serde(rename = "delivery.delivered")]
    DeliveryDelivered {
        queue_id: MessageId,
        recipient: String,
        mx_host: String,
        reply: String,
    },
    /// A recipient failed temporarily and waits for another attempt.
    #[serde(rename = "delivery.deferred")]
    DeliveryDeferred {
        queue_id: MessageId,
        recipient: String,
        reason: String,
        attempts: u32,
        next_attempt: String,
    },
    /// A recipient failed permanently; a DSN goes to the sender unless it is `<>`.
    #[serde(rename = "delivery.failed")]
    DeliveryFailed {
        queue_id: MessageId,
        recipient: String,
        enhanced: String,
        reason: String,
    },
    /// A delivery status notification was queued.
    #[serde(rename = "dsn.queued")]
    DsnQueued {
        queue_id: MessageId,
        /// The message the DSN reports on.
        original: MessageId,
        to: String,
        recipients: Vec<String>,
    },
    /// A recipient reached `max_queue_lifetime` undelivered.
    #[serde(rename = "queue.expired")]
    QueueExpired {
        queue_id: MessageId,
        recipient: String,
        age_secs: u64,
    },
    /// An operator looked at or acted on the queue (`queue list`, `show`, `retry`, `bounce`,
    /// `delete`); `recipients` counts those acted on (0 for list and show).
    #[serde(rename = "admin.queue")]
    AdminQueue {
        action: String,
        queue_id: Option<MessageId>,
        recipients: u64,
        os_user: String,
    },
}
