//! SMTP protocol vocabulary shared by the listener and (later) the delivery client: replies with
//! enhanced status codes (RFC 3463) and small parsing helpers.

use std::borrow::Cow;

/// One SMTP reply: basic code, enhanced status code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code, e.g. `5.7.1`.
    pub enhanced: &'static str,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, enhanced: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            enhanced,
            text: Cow::Borrowed(text),
        }
    }

    pub fn owned(code: u16, enhanced: &'static str, text: String) -> Reply {
        Reply {
            code,
            enhanced,
            text: Cow::Owned(text),
        }
    }

    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// A reply without an enhanced status code: RFC 2034 §4 leaves it out of the greeting and
    /// the HELO/EHLO replies, which start with the server's domain (RFC 5321 §4.2).
    pub fn plain(code: u16, text: String) -> Reply {
        Reply {
            code,
            enhanced: "",
            text: Cow::Owned(text),
        }
    }

    /// Appends the wire form (`CODE X.Y.Z text\r\n`) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let line = if self.enhanced.is_empty() {
            format!("{} {}\r\n", self.code, self.text)
        } else {
            format!("{} {} {}\r\n", self.code, self.enhanced, self.text)
        };
        out.extend_from_slice(line.as_bytes());
    }
}

/// Appends a multi-line reply (`250-a`, `250-b`, `250 c`) without enhanced codes, as EHLO uses.
pub fn write_multiline(code: u16, lines: &[String], out: &mut Vec<u8>) {
    for (i, line) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        out.extend_from_slice(format!("{code}{sep}{line}\r\n").as_bytes());
    }
}

/// A reply received from a remote server (owned, enhanced code optional).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RemoteReply {
    pub code: u16,
    /// Enhanced status code (`5.1.1`) when the server sent one.
    pub enhanced: Option<String>,
    /// The text, lines joined with a space.
    pub text: String,
}

impl RemoteReply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
}

impl std::fmt::Display for RemoteReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

/// The replies the listener sends, in one place so codes stay consistent.
pub mod replies {
    use super::Reply;

    pub const OK: Reply = Reply::new(250, "2.0.0", "Ok");
    pub const SENDER_OK: Reply = Reply::new(250, "2.1.0", "Sender ok");
    pub const RECIPIENT_OK: Reply = Reply::new(250, "2.1.5", "Recipient ok");
    pub const START_DATA: Reply = Reply::new(354, "", "End data with <CR><LF>.<CR><LF>");
    pub const READY_TLS: Reply = Reply::new(220, "2.0.0", "Ready to start TLS");
    pub const BYE: Reply = Reply::new(221, "2.0.0", "Bye");
    pub const AUTH_OK: Reply = Reply::new(235, "2.7.0", "Authentication successful");
    pub const VRFY: Reply = Reply::new(
        252,
        "2.5.0",
        "Cannot VRFY user; send mail and delivery will be attempted",
    );
    pub const HELP: Reply = Reply::new(
        214,
        "2.0.0",
        "See RFC 5321; commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT",
    );

    pub const SHUTTING_DOWN: Reply =
        Reply::new(421, "4.3.2", "Service shutting down, try again later");
    pub const TIMEOUT: Reply = Reply::new(421, "4.4.2", "Timeout exceeded, closing connection");
    pub const TOO_MANY_CONNECTIONS: Reply =
        Reply::new(421, "4.7.0", "Too many connections, try again later");
    pub const TOO_MANY_FROM_IP: Reply = Reply::new(
        421,
        "4.7.0",
        "Too many connections from your address, try again later",
    );
    pub const TOO_MANY_ERRORS: Reply =
        Reply::new(421, "4.7.0", "Too many errors, closing connection");
    pub const AUTH_LOCKED: Reply = Reply::new(
        421,
        "4.7.0",
        "Too many failed authentications from your address, try again later",
    );
    pub const TLS_UNAVAILABLE: Reply = Reply::new(454, "4.7.0", "TLS not available");
    pub const NOT_QUEUED: Reply = Reply::new(
        451,
        "4.3.0",
        "Temporary failure: message not queued, try again later",
    );
    pub const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, "4.5.3", "Too many recipients");

    pub const LINE_TOO_LONG: Reply = Reply::new(500, "5.5.2", "Line too long");
    pub const BARE_LF: Reply = Reply::new(
        500,
        "5.5.2",
        "Bare <LF> or <CR> received; lines must end with <CR><LF>",
    );
    pub const UNKNOWN_COMMAND: Reply = Reply::new(500, "5.5.1", "Command unrecognized");
    pub const SYNTAX: Reply = Reply::new(501, "5.5.4", "Syntax error in parameters or arguments");
    pub const BAD_SENDER: Reply = Reply::new(501, "5.1.7", "Bad sender address syntax");
    pub const BAD_RECIPIENT: Reply = Reply::new(501, "5.1.3", "Bad recipient address syntax");
    pub const NOT_IMPLEMENTED: Reply = Reply::new(502, "5.5.1", "Command not implemented");
    pub const EXPN: Reply = Reply::new(502, "5.5.1", "EXPN not supported");
    pub const NEED_HELO: Reply = Reply::new(503, "5.5.1", "Send EHLO or HELO first");
    pub const NEED_MAIL: Reply = Reply::new(503, "5.5.1", "Need MAIL command first");
    pub const NEED_RCPT: Reply = Reply::new(503, "5.5.1", "Need RCPT command first");
    pub const NESTED_MAIL: Reply = Reply::new(503, "5.5.1", "Nested MAIL command");
    pub const ALREADY_TLS: Reply = Reply::new(503, "5.5.1", "TLS already active");
    pub const ALREADY_AUTH: Reply = Reply::new(503, "5.5.1", "Already authenticated");
    pub const AUTH_IN_TRANSACTION: Reply =
        Reply::new(503, "5.5.1", "AUTH not allowed during a mail transaction");
    pub const UNSUPPORTED_MECH: Reply =
        Reply::new(504, "5.5.4", "Unrecognized authentication mechanism");
    pub const AUTH_FAILED: Reply = Reply::new(535, "5.7.8", "Authentication credentials invalid");
    pub const AUTH_CANCELLED: Reply = Reply::new(501, "5.7.0", "Authentication cancelled");
    pub const ENCRYPTION_REQUIRED: Reply = Reply::new(
        538,
        "5.7.11",
        "Encryption required for requested authentication mechanism",
    );
    pub const MESSAGE_TOO_BIG: Reply = Reply::new(
        552,
        "5.3.4",
        "Message size exceeds fixed maximum message size",
    );
    pub const RELAY_DENIED: Reply = Reply::new(
        554,
        "5.7.1",
        "Relay access denied; authenticate or send from a trusted network",
    );
    pub const NO_VALID_RECIPIENTS: Reply = Reply::new(554, "5.5.1", "No valid recipients");
    pub const DATA_LINE_TOO_LONG: Reply = Reply::new(
        500,
        "5.5.2",
        "Message line too long (see RFC 5321 4.5.3.1.6); wrap lines or use a transfer encoding",
    );
    pub const DATA_BARE_LF: Reply = Reply::new(
        550,
        "5.5.2",
        "Message refused: bare <LF> or <CR> in message data (lines must end with <CR><LF>)",
    );
}

/// The lower-cased domain of `local@domain`, if the address has one.
pub fn domain_of(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() || domain.contains(['<', '>', ' ']) {
        return None;
    }
    Some(domain.trim_end_matches('.').to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_wire_form() {
        let mut out = Vec::new();
        replies::RELAY_DENIED.write_to(&mut out);
        assert!(out.starts_with(b"554 5.7.1 Relay access denied"));
        assert!(out.ends_with(b"\r\n"));
    }

    #[test]
    fn domains() {
        assert_eq!(domain_of("a@Example.COM").as_deref(), Some("example.com"));
        assert_eq!(domain_of("nodomain"), None);
        assert_eq!(domain_of("@x.org"), None);
    }
}
