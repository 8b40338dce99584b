//! The DATA verb: read the message, add `Received:`, decide per recipient, queue durably and
//! record `message.received`, and only then reply 250.

use chrono::Utc;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::{AuditEvent, RecipientDecision};
use crate::ids::MessageId;
use crate::policy::MessageFacts;
use crate::queue::{Envelope, Lane, NewRecipient};
use crate::smtp::{domain_of, replies, Reply};

use super::io::{DataProblem, DataSink, End};
use super::session::{Next, Session, Transaction};
use super::Conn;

impl Session {
    pub(super) async fn data<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
    ) -> Option<Next> {
        let Some(tx) = self.tx.as_ref() else {
            conn.reply(&replies::NEED_MAIL);
            return None;
        };
        if tx.recipients.is_empty() {
            conn.reply(&replies::NO_VALID_RECIPIENTS);
            return None;
        }
        let id = MessageId::generate();
        let header = self.received_header(&id, tx);
        let header_len = header.len();
        let limits = &self.ctx.limits;
        let mut body = Vec::with_capacity(header_len + 16 * 1024);
        body.extend_from_slice(header.as_bytes());
        let mut sink = DataSink::new(body, limits.max_message_size as usize, limits.max_data_line);
        conn.reply(&replies::START_DATA);
        let read = conn.read_data(&mut sink, limits.data_timeout).await;
        let tx = self.tx.take()?;
        if let Err(end) = read {
            return Some(self.data_interrupted(conn, end, tx).await);
        }
        if let Some(problem) = sink.problem {
            let reply = problem_reply(problem);
            return self
                .reject(conn, "data", &reply, Some(tx.sender), None)
                .await;
        }
        self.accept(conn, id, tx, sink.body, header_len).await
    }

    async fn data_interrupted<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        end: End,
        tx: Transaction,
    ) -> Next {
        let reply = match end {
            End::Timeout => replies::TIMEOUT,
            _ => Reply::new(421, "4.4.2", "Connection lost during DATA"),
        };
        let _ = self
            .reject(conn, "data", &reply, Some(tx.sender), None)
            .await;
        let _ = conn.flush().await;
        Next::Close
    }

    async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        id: MessageId,
        tx: Transaction,
        mut body: Vec<u8>,
        header_len: usize,
    ) -> Option<Next> {
        // A first line starting with white space would fold into our own `Received:` header.
        if matches!(body.get(header_len), Some(b' ' | b'\t')) {
            let reply = Reply::new(550, "5.6.0", "Message starts with a folded header line");
            return self
                .reject(conn, "data", &reply, Some(tx.sender), None)
                .await;
        }
        let lane = match take_lane(&mut body, header_len) {
            Ok(lane) => lane,
            Err(reason) => {
                let reply = Reply::owned(550, "5.6.0", reason);
                return self
                    .reject(conn, "data", &reply, Some(tx.sender), None)
                    .await;
            }
        };
        let message_id = message_id_header(&body[header_len..]);
        let recipients: Vec<NewRecipient> = tx
            .recipients
            .iter()
            .map(|address| NewRecipient {
                address: address.clone(),
                domain: domain_of(address).unwrap_or_default(),
                decision: self.ctx.policy.decide(&MessageFacts {
                    sender: &tx.sender,
                    recipient: address,
                }),
            })
            .collect();
        let event = AuditEvent::MessageReceived {
            queue_id: id.clone(),
            session: self.id,
            sender: tx.sender.clone(),
            recipients: recipients
                .iter()
                .map(|r| RecipientDecision {
                    address: r.address.clone(),
                    mode: r.decision.mode,
                    rule: r.decision.rule.clone(),
                })
                .collect(),
            size: body.len() as u64,
            client_ip: self.peer.ip(),
            auth_user: self.auth_user.clone(),
            message_id: message_id.clone(),
            tls: self
                .tls
                .as_ref()
                .map(|t| format!("{} {}", t.version, t.cipher)),
        };
        let envelope = Envelope {
            id: id.clone(),
            received_at: Utc::now(),
            sender: tx.sender.clone(),
            recipients,
            client_ip: self.peer.ip(),
            auth_user: self.auth_user.clone(),
            message_id_header: message_id,
            size: body.len() as u64,
            lane,
        };
        // The audit record first, then the queue: every queued message has its
        // `message.received` record, even across a crash between the two. Both are durable
        // before the 250.
        let ctx = self.ctx.clone();
        if let Err(e) = ctx.audit.record(event).await {
            tracing::error!(queue_id = %id, error = %e, "audit log unavailable; message refused");
            conn.reply(&replies::NOT_QUEUED);
            return None;
        }
        match ctx.queue.enqueue(envelope, body).await {
            Ok(()) => {
                conn.reply(&Reply::owned(250, "2.0.0", format!("Ok: queued as {id}")));
                None
            }
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "message not queued");
                let sender = Some(tx.sender);
                self.reject(conn, "queue", &replies::NOT_QUEUED, sender, None)
                    .await
            }
        }
    }

    /// `Received:` per RFC 5321 §4.4 with the RFC 3848 protocol name and the inbound TLS facts.
    fn received_header(&self, id: &MessageId, tx: &Transaction) -> String {
        let protocol = match (self.esmtp, self.tls.is_some(), self.auth_user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let helo = self.helo.as_deref().unwrap_or("unknown");
        let tls = match &self.tls {
            Some(t) => format!("\r\n\t(using {} with cipher {})", t.version, t.cipher),
            None => String::new(),
        };
        let rcpt = match tx.recipients.as_slice() {
            [one] => format!("\r\n\tfor <{one}>"),
            _ => String::new(),
        };
        format!(
            "Received: from {helo} ([{ip}]){tls}\r\n\tby {host} (sealpost) with {protocol} id {id}{rcpt};\r\n\t{date}\r\n",
            ip = address_literal(self.peer.ip()),
            host = self.ctx.hostname,
            date = Utc::now().to_rfc2822(),
        )
    }
}

fn problem_reply(problem: DataProblem) -> Reply {
    match problem {
        DataProblem::BareLineEnd => replies::DATA_BARE_LF,
        DataProblem::TooBig => replies::MESSAGE_TOO_BIG,
        DataProblem::LineTooLong => replies::DATA_LINE_TOO_LONG,
    }
}

/// The header that picks the delivery lane; removed before the message is stored.
const LANE_HEADER: &[u8] = b"x-sealpost-lane";

/// Finds `X-Sealpost-Lane:` in the header block starting at `start`, removes it (with any
/// folded continuation lines) and returns the lane; transactional when absent.
fn take_lane(body: &mut Vec<u8>, start: usize) -> Result<Lane, String> {
    let mut pos = start;
    let mut found: Option<String> = None;
    while pos < body.len() && !body[pos..].starts_with(b"\r\n") {
        let end = field_end(body, pos);
        let field = &body[pos..end];
        let is_lane = field.len() > LANE_HEADER.len()
            && field[..LANE_HEADER.len()].eq_ignore_ascii_case(LANE_HEADER)
            && field[LANE_HEADER.len()..]
                .trim_ascii_start()
                .starts_with(b":");
        if !is_lane {
            pos = end;
            continue;
        }
        if found.is_some() {
            return Err("Message has more than one X-Sealpost-Lane header".to_string());
        }
        let colon = field
            .iter()
            .position(|b| *b == b':')
            .unwrap_or(field.len() - 1);
        let value: String = String::from_utf8_lossy(&field[colon + 1..])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        found = Some(value);
        body.drain(pos..end);
    }
    match found {
        None => Ok(Lane::Transactional),
        Some(value) => Lane::parse(&value).ok_or_else(|| {
            let shown: String = value
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(64)
                .collect();
            format!("Unknown delivery lane {shown:?} in X-Sealpost-Lane; use \"transactional\" or \"bulk\"")
        }),
    }
}

/// The end (after its CRLF) of the header field starting at `pos`, including folded lines.
fn field_end(body: &[u8], pos: usize) -> usize {
    let mut end = pos;
    loop {
        end = match memchr::memmem::find(&body[end..], b"\r\n") {
            Some(i) => end + i + 2,
            None => return body.len(),
        };
        if !matches!(body.get(end), Some(b' ' | b'\t')) {
            return end;
        }
    }
}

/// RFC 5321 §4.1.3 address literal body: `1.2.3.4` or `IPv6:…`.
fn address_literal(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("IPv6:{v6}"),
        },
    }
}

/// Longest `Message-ID:` value recorded; longer or malformed ones are left out of the
/// queue row and the audit log (the header stays in the message).
const MAX_MESSAGE_ID: usize = 250;

/// The `Message-ID:` header of the message, if any and well-formed (headers only are parsed).
fn message_id_header(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let id = parsed.message_id()?;
    let printable = id.bytes().all(|b| b.is_ascii_graphic());
    (printable && !id.is_empty() && id.len() <= MAX_MESSAGE_ID).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_bounded_and_printable() {
        assert_eq!(
            message_id_header(b"Message-ID: <a@b>\r\n\r\nx").as_deref(),
            Some("a@b")
        );
        let long = format!("Message-ID: <{}@b>\r\n\r\n", "x".repeat(400));
        assert_eq!(message_id_header(long.as_bytes()), None);
        assert_eq!(message_id_header(b"Subject: none\r\n\r\n"), None);
    }

    #[test]
    fn lane_header_is_read_and_removed() {
        let mut body = b"Received: x\r\nSubject: a\r\nX-Sealpost-Lane:\r\n bulk\r\nTo: b\r\n\r\nX-Sealpost-Lane: no\r\n".to_vec();
        assert_eq!(take_lane(&mut body, 13), Ok(Lane::Bulk));
        assert_eq!(
            body,
            b"Received: x\r\nSubject: a\r\nTo: b\r\n\r\nX-Sealpost-Lane: no\r\n".to_vec()
        );
        let mut plain = b"Subject: a\r\n\r\nbody".to_vec();
        assert_eq!(take_lane(&mut plain, 0), Ok(Lane::Transactional));
        let mut bad = b"x-sealpost-lane : urgent\r\n\r\n".to_vec();
        assert!(take_lane(&mut bad, 0).unwrap_err().contains("\"urgent\""));
        let mut two = b"X-Sealpost-Lane: bulk\r\nX-Sealpost-Lane: bulk\r\n\r\n".to_vec();
        assert!(take_lane(&mut two, 0).is_err());
    }

    #[test]
    fn ipv6_literals_are_tagged() {
        assert_eq!(address_literal("::1".parse().unwrap()), "IPv6:::1");
        assert_eq!(address_literal("127.0.0.1".parse().unwrap()), "127.0.0.1");
    }
}
