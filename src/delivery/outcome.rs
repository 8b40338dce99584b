//! Every delivery result is classified here, and only here: delivered, deferred (try again)
//! or failed (DSN to the sender). Compare Stalwart's `Status` and hickory's `should_retry()`.

use crate::smtp::RemoteReply;

use super::client::ClientError;
use super::mx::MxError;

/// What happens to a recipient after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Deferred,
    Failed,
}

/// A classified result with the reason recorded in the queue, the audit log and any DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Enhanced status code (RFC 3463), e.g. `4.4.1`.
    pub enhanced: String,
    /// Human-readable reason, e.g. the remote reply.
    pub reason: String,
}

impl Outcome {
    fn new(verdict: Verdict, enhanced: &str, reason: String) -> Outcome {
        Outcome {
            verdict,
            enhanced: enhanced.to_string(),
            reason,
        }
    }
}

/// A remote reply: 2xx delivered, 4xx deferred, 5xx failed (RFC 5321 §4.2.1).
pub fn of_reply(reply: &RemoteReply) -> Outcome {
    let (verdict, default) = match reply.code {
        200..=299 => (Verdict::Delivered, "2.0.0"),
        500..=599 => (Verdict::Failed, "5.0.0"),
        // 4xx, and anything a final reply must not be (1xx, 3xx, nonsense): try again.
        _ => (Verdict::Deferred, "4.0.0"),
    };
    let enhanced = reply.enhanced.as_deref().unwrap_or(default);
    Outcome::new(verdict, enhanced, reply.to_string())
}

/// A failure to find hosts: null MX and non-existent domains are permanent, the rest temporary.
pub fn of_mx(err: &MxError) -> Outcome {
    let verdict = if err.is_permanent() {
        Verdict::Failed
    } else {
        Verdict::Deferred
    };
    Outcome::new(verdict, err.enhanced(), err.to_string())
}

/// A client-side failure for the whole transaction.
pub fn of_client(err: &ClientError) -> Outcome {
    use ClientError::*;
    match err {
        Rejected { reply, .. } => of_reply(reply),
        TooBig { .. } => Outcome::new(Verdict::Failed, "5.3.4", err.to_string()),
        NeedsSmtpUtf8 => Outcome::new(Verdict::Failed, "5.6.7", err.to_string()),
        InvalidEnvelope(_) => Outcome::new(Verdict::Failed, "5.1.3", err.to_string()),
        Connect { .. } => Outcome::new(Verdict::Deferred, "4.4.1", err.to_string()),
        Timeout { .. } | Io { .. } => Outcome::new(Verdict::Deferred, "4.4.2", err.to_string()),
        TlsRequired(_) | TlsHandshake(_) => {
            Outcome::new(Verdict::Deferred, "4.7.5", err.to_string())
        }
        Protocol(_) => Outcome::new(Verdict::Deferred, "4.5.0", err.to_string()),
    }
}

/// Whether the next MX or address may be tried after `err` (RFC 5321 §5.1): connection
/// failures, timeouts before a transaction, a refused greeting or EHLO, TLS failures (when the
/// decision allows moving on, which the client reports as an error here).
pub fn try_next_host(err: &ClientError) -> bool {
    use ClientError::*;
    match err {
        Connect { .. } | TlsRequired(_) | TlsHandshake(_) => true,
        Timeout { stage } | Io { stage, .. } => !in_transaction(stage),
        Rejected { stage, reply } => {
            !in_transaction(stage) || reply.is_transient() && *stage == "MAIL"
        }
        // A garbled reply may come after the message was sent: never send it again elsewhere.
        Protocol(_) => false,
        TooBig { .. } | NeedsSmtpUtf8 | InvalidEnvelope(_) => false,
    }
}

fn in_transaction(stage: &str) -> bool {
    matches!(
        stage,
        "MAIL" | "RCPT" | "DATA" | "message body" | "end of data" | "RSET"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, enhanced: Option<&str>) -> RemoteReply {
        RemoteReply {
            code,
            enhanced: enhanced.map(str::to_string),
            text: "text".to_string(),
        }
    }

    #[test]
    fn replies_by_class() {
        assert_eq!(of_reply(&reply(250, None)).verdict, Verdict::Delivered);
        let soft = of_reply(&reply(451, Some("4.3.0")));
        assert_eq!(
            (soft.verdict, soft.enhanced.as_str()),
            (Verdict::Deferred, "4.3.0")
        );
        let hard = of_reply(&reply(550, None));
        assert_eq!(
            (hard.verdict, hard.enhanced.as_str()),
            (Verdict::Failed, "5.0.0")
        );
    }

    #[test]
    fn dns_failures() {
        let null = of_mx(&MxError::NullMx("x.test".into()));
        assert_eq!(
            (null.verdict, null.enhanced.as_str()),
            (Verdict::Failed, "5.1.10")
        );
        let temp = of_mx(&MxError::Temporary {
            domain: "x.test".into(),
            reason: "SERVFAIL".into(),
        });
        assert_eq!(temp.verdict, Verdict::Deferred);
    }

    #[test]
    fn client_errors() {
        assert_eq!(of_client(&ClientError::NeedsSmtpUtf8).enhanced, "5.6.7");
        assert_eq!(
            of_client(&ClientError::TooBig { size: 2, limit: 1 }).verdict,
            Verdict::Failed
        );
        let greeting = ClientError::Rejected {
            stage: "greeting",
            reply: reply(421, None),
        };
        assert!(try_next_host(&greeting));
        assert!(!try_next_host(&ClientError::Timeout { stage: "DATA" }));
        assert!(try_next_host(&ClientError::Timeout { stage: "greeting" }));
    }
}
