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
}
