//! After an attempt: one queue update and one audit record per recipient, and a DSN to the
//! sender for the recipients that failed.

use chrono::Utc;

use crate::audit::AuditEvent;
use crate::ids::MessageId;
use crate::policy::MessageFacts;
use crate::queue::{
    schedule, Envelope, NewRecipient, RecipientStatus, RecipientUpdate, StoredRecipient,
};
use crate::smtp::domain_of;

use super::attempt::Result_;
use super::dsn;
use super::outcome::{Outcome, Verdict};
use super::worker::{Deliverer, Group};

impl Deliverer {
    pub(super) async fn record(&self, group: &Group, results: Vec<Result_>) {
        let now = Utc::now();
        let mut updates = Vec::with_capacity(results.len());
        let mut failed = Vec::new();
        for (rcpt, result) in group.recipients.iter().zip(results) {
            let (update, event) = self.settle(group, rcpt, &result, now);
            if update.status == RecipientStatus::Failed {
                failed.push(dsn::Reported {
                    address: rcpt.address.clone(),
                    action: dsn::Action::Failed,
                    status: failure_status(&result.outcome),
                    remote_mta: result.remote_mta.clone(),
                    diagnostic: Some(result.outcome.reason.clone()),
                });
            }
            updates.push(update);
            for e in event {
                self.write(e).await;
            }
        }
        if let Err(e) = self.queue.finish(&updates).await {
            // The leases run out and the recipients are tried again: at least once, never lost.
            tracing::error!(queue_id = %group.message.id, error = %e, "recording delivery outcomes failed");
            return;
        }
        if !failed.is_empty() {
            self.bounce(group, &failed).await;
        }
    }

    /// The queue update and audit events for one recipient's outcome.
    fn settle(
        &self,
        group: &Group,
        rcpt: &StoredRecipient,
        result: &Result_,
        now: chrono::DateTime<Utc>,
    ) -> (RecipientUpdate, Vec<AuditEvent>) {
        let outcome = &result.outcome;
        let id = group.message.id.clone();
        let address = rcpt.address.clone();
        let update = |status, next| RecipientUpdate {
            id: rcpt.id,
            status,
            next_attempt: next,
            last_reply: Some(format!("{} {}", outcome.enhanced, outcome.reason)),
            attempted: true,
        };
        match outcome.verdict {
            Verdict::Delivered => (
                update(RecipientStatus::Delivered, None),
                vec![AuditEvent::DeliveryDelivered {
                    queue_id: id,
                    recipient: address,
                    mx_host: result.remote_mta.clone().unwrap_or_default(),
                    reply: outcome.reason.clone(),
                }],
            ),
            Verdict::Failed => (
                update(RecipientStatus::Failed, None),
                vec![failed_event(id, address, outcome)],
            ),
            Verdict::Deferred => {
                let attempts = rcpt.attempts + 1;
                let cfg = &self.cfg;
                let next = schedule::next_attempt(
                    group.message.received_at,
                    now,
                    attempts,
                    &cfg.retry_schedule,
                    cfg.max_retry_interval,
                    cfg.max_queue_lifetime,
                );
                match next {
                    Some(next) => (
                        update(RecipientStatus::Deferred, Some(next)),
                        vec![AuditEvent::DeliveryDeferred {
                            queue_id: id,
                            recipient: address,
                            reason: format!("{} {}", outcome.enhanced, outcome.reason),
                            attempts,
                            next_attempt: next.to_rfc3339(),
                        }],
                    ),
                    None => {
                        let age = (now - group.message.received_at).num_seconds().max(0) as u64;
                        let expired = Outcome {
                            verdict: Verdict::Failed,
                            enhanced: "5.4.7".into(),
                            reason: format!(
                                "delivery time expired; last error: {}",
                                outcome.reason
                            ),
                        };
                        let events = vec![
                            AuditEvent::QueueExpired {
                                queue_id: id.clone(),
                                recipient: address.clone(),
                                age_secs: age,
                            },
                            failed_event(id, address, &expired),
                        ];
                        (update(RecipientStatus::Failed, None), events)
                    }
                }
            }
        }
    }

    /// Queues a DSN to the sender; never for the null sender (no DSN for a DSN).
    async fn bounce(&self, group: &Group, failed: &[dsn::Reported]) {
        let original = &group.message;
        if original.sender.is_empty() {
            return;
        }
        let body = match self.queue.open_body(original) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(queue_id = %original.id, error = %e, "cannot read the original for a DSN");
                return;
            }
        };
        let headers = dsn::header_block(&body);
        let report = match dsn::build(
            &self.helo,
            &original.sender,
            &original.id,
            original.received_at,
            headers,
            failed,
        ) {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(queue_id = %original.id, error = %e, "building a DSN failed");
                return;
            }
        };
        self.queue_dsn(group, failed, report).await;
    }

    async fn queue_dsn(&self, group: &Group, failed: &[dsn::Reported], report: Vec<u8>) {
        let original = &group.message;
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
            lane: crate::queue::Lane::Transactional,
        };
        let event = AuditEvent::DsnQueued {
            queue_id: id,
            original: original.id.clone(),
            to,
            recipients: failed.iter().map(|f| f.address.clone()).collect(),
        };
        self.write(event).await;
        if let Err(e) = self.queue.enqueue(envelope, report).await {
            tracing::error!(queue_id = %original.id, error = %e, "queueing a DSN failed");
        }
    }

    pub(super) async fn write(&self, event: AuditEvent) {
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, "audit record failed");
        }
    }
}

fn failed_event(queue_id: MessageId, recipient: String, outcome: &Outcome) -> AuditEvent {
    AuditEvent::DeliveryFailed {
        queue_id,
        recipient,
        enhanced: outcome.enhanced.clone(),
        reason: outcome.reason.clone(),
    }
}

/// A DSN's Status for a failure: the enhanced code, made permanent.
fn failure_status(outcome: &Outcome) -> String {
    match outcome.enhanced.strip_prefix('4') {
        Some(rest) => format!("5{rest}"),
        None => outcome.enhanced.clone(),
    }
}
