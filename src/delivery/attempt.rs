//! One delivery attempt for one group: hops in order, addresses in order, one transaction.

use std::net::SocketAddr;
use std::time::Instant;

use crate::audit::AuditEvent;

use super::client::{ClientError, Connection, Outgoing, Transaction};
use super::mx::{self, Hop};
use super::outcome::{self, Outcome, Verdict};
use super::tls::TlsRequirement;
use super::worker::{Deliverer, Group};

/// The result for one recipient: its outcome and the MX host that gave it (for DSNs).
pub(super) struct Result_ {
    pub outcome: Outcome,
    pub remote_mta: Option<String>,
}

/// What one attempt on one address came to.
enum Step {
    /// Final for this group (delivered, refused, or an error that forbids moving on).
    Done(Vec<Result_>),
    /// Try the next address or host; the outcome stands if none is left.
    Next(Outcome),
}

impl Deliverer {
    pub(super) async fn attempt(&self, group: &Group) -> Vec<Result_> {
        // No expiry check here: the attempt at the deadline is a real one, and an expired
        // recipient is failed (with `queue.expired`) when that attempt is recorded.
        let body = match self.queue.open_body(&group.message) {
            Ok(body) => body,
            Err(e) => {
                let o = Outcome {
                    verdict: Verdict::Deferred,
                    enhanced: "4.3.0".into(),
                    reason: e.to_string(),
                };
                return self.all(group, o, None);
            }
        };
        let hops = match mx::hops(&self.dns, &self.routes, &group.domain, self.mx_port).await {
            Ok(hops) => hops,
            Err(e) => return self.all(group, outcome::of_mx(&e), None),
        };
        let recipients: Vec<String> = group.recipients.iter().map(|r| r.address.clone()).collect();
        let message = &group.message;
        let outgoing = Outgoing {
            sender: &message.sender,
            recipients: &recipients,
            body: &body,
            smtputf8: !message.sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii()),
            eight_bit: body.iter().any(|b| *b >= 0x80),
        };
        let decision = &group.recipients[0].decision;
        if decision.mode == crate::policy::Mode::Portal {
            // Escalated mail must never leave over SMTP; hold it until the portal exists.
            let o = Outcome {
                verdict: Verdict::Deferred,
                enhanced: "4.7.0".into(),
                reason: "held: portal delivery is not available yet".into(),
            };
            return self.all(group, o, None);
        }
        let tls = TlsRequirement::from_decision(decision);
        let mut last = None;
        for hop in &hops {
            for ip in &hop.addrs {
                let addr = SocketAddr::new(*ip, hop.port);
                match self.try_address(group, hop, addr, &tls, &outgoing).await {
                    Step::Done(results) => return results,
                    Step::Next(o) => last = Some(o),
                }
            }
        }
        let fallback = Outcome {
            verdict: Verdict::Deferred,
            enhanced: "4.4.4".into(),
            reason: format!("no usable host for {}", group.domain),
        };
        self.all(group, last.unwrap_or(fallback), None)
    }

    async fn try_address(
        &self,
        group: &Group,
        hop: &Hop,
        addr: SocketAddr,
        tls: &TlsRequirement,
        outgoing: &Outgoing<'_>,
    ) -> Step {
        let started = Instant::now();
        let tls_key = format!("{tls:?}");
        let (mut conn, sent) = match self.connection(addr, hop, tls, &tls_key).await {
            Ok(pair) => pair,
            Err(e) => {
                self.audit_attempt(group, hop, addr, None, &e.to_string(), None, started)
                    .await;
                return self.after_error(group, hop, &e);
            }
        };
        let result = conn.send(outgoing).await;
        match result {
            Ok(tx) => {
                let (text, enhanced) = summary(&tx);
                self.audit_attempt(group, hop, addr, Some(&conn), &text, enhanced, started)
                    .await;
                self.pool.give(addr, &hop.host, &tls_key, conn, sent + 1);
                Step::Done(per_recipient(&tx, &hop.host))
            }
            Err(e) => {
                self.audit_attempt(group, hop, addr, Some(&conn), &e.to_string(), None, started)
                    .await;
                tokio::spawn(conn.quit());
                self.after_error(group, hop, &e)
            }
        }
    }

    /// A reused connection (after a successful RSET) or a new one.
    async fn connection(
        &self,
        addr: SocketAddr,
        hop: &Hop,
        tls: &TlsRequirement,
        tls_key: &str,
    ) -> Result<(Connection, usize), ClientError> {
        while let Some((mut conn, sent)) = self.pool.take(addr, &hop.host, tls_key) {
            if conn.reset().await.is_ok() {
                return Ok((conn, sent));
            }
        }
        let conn = Connection::open(
            addr,
            &hop.host,
            &self.helo,
            tls,
            &self.tls,
            &self.cfg.timeouts,
        )
        .await?;
        Ok((conn, 0))
    }

    fn after_error(&self, group: &Group, hop: &Hop, e: &ClientError) -> Step {
        let o = outcome::of_client(e);
        if outcome::try_next_host(e) {
            Step::Next(o)
        } else {
            Step::Done(self.all(group, o, Some(hop.host.clone())))
        }
    }

    fn all(&self, group: &Group, o: Outcome, remote: Option<String>) -> Vec<Result_> {
        group
            .recipients
            .iter()
            .map(|_| Result_ {
                outcome: o.clone(),
                remote_mta: remote.clone(),
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    async fn audit_attempt(
        &self,
        group: &Group,
        hop: &Hop,
        addr: SocketAddr,
        conn: Option<&Connection>,
        reply: &str,
        enhanced: Option<String>,
        started: Instant,
    ) {
        let event = AuditEvent::DeliveryAttempt {
            queue_id: group.message.id.clone(),
            recipients: group.recipients.iter().map(|r| r.address.clone()).collect(),
            mx_host: hop.host.clone(),
            ip: Some(addr.ip()),
            port: addr.port(),
            tls: conn.and_then(|c| c.tls().cloned()),
            tls_fallback: conn.and_then(|c| c.tls_fallback().map(str::to_string)),
            reply: reply.to_string(),
            enhanced,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, "audit record for a delivery attempt failed");
        }
    }
}

/// Per recipient: a refused RCPT stands on its own; accepted ones share the reply to the dot.
fn per_recipient(tx: &Transaction, host: &str) -> Vec<Result_> {
    tx.rcpt
        .iter()
        .map(|rcpt| {
            let reply = match (&tx.data, rcpt.is_positive()) {
                (Some(data), true) => data,
                _ => rcpt,
            };
            Result_ {
                outcome: outcome::of_reply(reply),
                remote_mta: Some(host.to_string()),
            }
        })
        .collect()
}

/// The reply that ended the transaction, for the attempt record.
fn summary(tx: &Transaction) -> (String, Option<String>) {
    let reply = tx.data.as_ref().or_else(|| tx.rcpt.last());
    match reply {
        Some(r) => (r.to_string(), r.enhanced.clone()),
        None => ("no reply".to_string(), None),
    }
}
