//! After an attempt: one queue update and one audit record per recipient, and a DSN to the
//! sender for the recipients that failed.

use chrono::Utc;

use crate::audit::AuditEvent;
use crate::ids::MessageId;
use crate::queue::{schedule, RecipientStatus, RecipientUpdate, StoredRecipient};

use super::attempt::Result_;
use super::dsn;
use super::notify::Notifier;
use super::outcome::{Outcome, Verdict};
use super::worker::{Deliverer, Group};

impl Deliverer {
    pub(super) async fn record(&self, group: &Group, results: Vec<Result_>) {
        let now = Utc::now();
        let mut updates = Vec::with_capacity(results.len());
        let mut failed = Vec::new();
        let mut delayed = Vec::new();
        let mut events = Vec::new();
        for (rcpt, result) in group.recipients.iter().zip(results) {
            let (mut update, event) = self.settle(group, rcpt, &result, now);
            let report = |action, status| dsn::Reported {
                address: rcpt.address.clone(),
                action,
                status,
                remote_mta: result.remote_mta.clone(),
                diagnostic: Some(result.outcome.reason.clone()),
            };
            if update.status == RecipientStatus::Failed {
                failed.push(report(dsn::Action::Failed, failure_status(&result.outcome)));
            } else if update.status == RecipientStatus::Deferred && self.warn_now(group, rcpt, now)
            {
                update.warned = true;
                delayed.push(report(
                    dsn::Action::Delayed,
                    result.outcome.enhanced.clone(),
                ));
            }
            updates.push(update);
            events.extend(event);
        }
        // The queue first: once the outcome is recorded, a cut-off task cannot cause a resend.
        match self.queue.finish(Some(&group.lease), &updates).await {
            Ok(n) if n as usize == updates.len() => {}
            Ok(n) => {
                // The lease ran out and another worker took over: its outcome stands.
                tracing::warn!(queue_id = %group.message.id, recorded = n, of = updates.len(), "delivery lease lost; outcome not recorded");
                return;
            }
            Err(e) => {
                // The leases run out and the recipients are tried again: at least once, never lost.
                tracing::error!(queue_id = %group.message.id, error = %e, "recording delivery outcomes failed");
                return;
            }
        }
        for e in events {
            self.write(e).await;
        }
        if !failed.is_empty() {
            self.bounce(group, &failed).await;
        }
        if !delayed.is_empty() {
            self.bounce(group, &delayed).await;
        }
    }

    /// True when a delay warning is due for this recipient: configured, old enough, not sent.
    fn warn_now(&self, group: &Group, rcpt: &StoredRecipient, now: chrono::DateTime<Utc>) -> bool {
        let Some(after) = self.cfg.delay_warning else {
            return false;
        };
        let age = (now - group.message.received_at)
            .to_std()
            .unwrap_or_default();
        !rcpt.warned && age >= after
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
            last_reply: Some(with_code(outcome)),
            attempted: true,
            warned: false,
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
                            reason: with_code(outcome),
                            attempts,
                            next_attempt: next.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
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

    async fn bounce(&self, group: &Group, failed: &[dsn::Reported]) {
        let notifier = Notifier {
            queue: &self.queue,
            audit: &self.audit,
            policy: &self.policy,
            reporting_mta: &self.helo,
        };
        notifier.send(&group.message, failed).await;
    }

    pub(super) async fn write(&self, event: AuditEvent) {
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, "audit record failed");
        }
    }
}

/// The reason with its enhanced code in front, unless it is a remote reply that has it already.
fn with_code(outcome: &Outcome) -> String {
    if outcome.reason.starts_with(|c: char| c.is_ascii_digit()) {
        outcome.reason.clone()
    } else {
        format!("{} {}", outcome.enhanced, outcome.reason)
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
