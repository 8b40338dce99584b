//! Delivery status notifications to the envelope sender, queued like any message from `<>`.
//! Used by the delivery loop (failures, delay warnings) and by `sealpost queue bounce`.

use chrono::Utc;

use crate::audit::{AuditEvent, AuditLog};
use crate::ids::MessageId;
use crate::policy::{MessageFacts, Policy};
use crate::queue::{Envelope, Lane, NewRecipient, Queue, StoredMessage};
use crate::smtp::domain_of;

use super::dsn;

/// What a DSN needs to be built and queued.
pub struct Notifier<'a> {
    pub queue: &'a Queue,
    pub audit: &'a AuditLog,
    pub policy: &'a Policy,
    /// Our host name: Reporting-MTA and the MAILER-DAEMON address.
    pub reporting_mta: &'a str,
}

impl Notifier<'_> {
    /// Queues a DSN about `reported` to the sender of `original`; never for the null sender,
    /// so a DSN is never bounced. Returns the DSN's queue id when one was queued.
    pub async fn send(
        &self,
        original: &StoredMessage,
        reported: &[dsn::Reported],
    ) -> Option<MessageId> {
        if original.sender.is_empty() || reported.is_empty() {
            return None;
        }
        let body = match self.queue.open_body(original) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(queue_id = %original.id, error = %e, "cannot read the original for a DSN");
                return None;
            }
        };
        let headers = dsn::header_block(&body);
        let sender = &original.sender;
        let built = dsn::build(
            self.reporting_mta,
            sender,
            &original.id,
            original.received_at,
            headers,
            reported,
        );
        match built {
            Ok(report) => self.enqueue(original, reported, report).await,
            Err(e) => {
                tracing::error!(queue_id = %original.id, error = %e, "building a DSN failed");
                None
            }
        }
    }

    async fn enqueue(
        &self,
        original: &StoredMessage,
        reported: &[dsn::Reported],
        report: Vec<u8>,
    ) -> Option<MessageId> {
        let to = original.sender.clone();
        let id = MessageId::generate();
        let decision = self.policy.decide(&MessageFacts {
            sender: "",
            recipient: &to,
        });
        let envelope = Envelope {
            id: id.clone(),
            received_at: Utc::now(),
            sender: String::new(),
            recipients: vec![NewRecipient {
                address: to.clone(),
                domain: domain_of(&to).unwrap_or_default(),
                decision,
            }],
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            auth_user: None,
            message_id_header: None,
            size: report.len() as u64,
            lane: Lane::Transactional,
        };
        let event = AuditEvent::DsnQueued {
            queue_id: id.clone(),
            original: original.id.clone(),
            to,
            recipients: reported.iter().map(|f| f.address.clone()).collect(),
        };
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, "audit record for a DSN failed; DSN not queued");
            return None;
        }
        match self.queue.enqueue(envelope, report).await {
            Ok(()) => Some(id),
            Err(e) => {
                tracing::error!(queue_id = %original.id, error = %e, "queueing a DSN failed");
                None
            }
        }
    }
}
