//! Delivery status notifications to the sender
//! ([RFC 3464](https://www.rfc-editor.org/rfc/rfc3464),
//! [RFC 6522](https://www.rfc-editor.org/rfc/rfc6522)).
//!
//! A DSN is a `multipart/report; report-type=delivery-status` with three parts:
//! 1. `text/plain`: which recipients and why, for a person;
//! 2. `message/delivery-status`: the same, for a program;
//! 3. `text/rfc822-headers`: the header block of the original message.
//!
//! The original *body* is never returned: it may carry protected health information, and the
//! sender still has it. [`build`] re-applies [`header_block`] to what it is given, so even a
//! whole message passed by mistake yields its headers only.
//!
//! Output safety, since most inputs come from outside (client headers, remote replies):
//! - CRLF line endings throughout, no line longer than 998 octets
//!   ([RFC 5322 §2.1.1](https://www.rfc-editor.org/rfc/rfc5322#section-2.1.1));
//! - the delivery-status part is 7-bit by construction: remote replies are flattened to one
//!   line of printable ASCII (non-ASCII as `\x{HEX}`), capped, and folded; non-ASCII addresses
//!   use the `utf-8` address type with embedded `\x{HEX}` escapes
//!   ([RFC 6533 §3](https://www.rfc-editor.org/rfc/rfc6533#section-3));
//! - the other two parts are sent as `7bit` when they are, and base64 otherwise;
//! - the MIME boundary is checked against every part and changed until it occurs in none, so a
//!   hostile header block cannot close a part early.
//!
//! The `To` header carries the envelope sender as given; a non-ASCII sender address is written
//! as UTF-8 ([RFC 6532](https://www.rfc-editor.org/rfc/rfc6532)), which the envelope needs
//! SMTPUTF8 for anyway.

use std::fmt::Write as _;

use base64::Engine as _;
use chrono::{DateTime, Utc};

use crate::ids::MessageId;

/// Longest line allowed in the output, without its CRLF.
const MAX_LINE: usize = 998;
/// Lines we write ourselves are folded or wrapped to this width where possible.
const FOLD_WIDTH: usize = 78;
/// A word longer than this is split, so folding always fits within [`MAX_LINE`].
const MAX_WORD: usize = 800;
/// Remote replies longer than this (in characters) are cut, marked with `...`.
const MAX_DIAGNOSTIC: usize = 2000;
/// Longest encoded address or host name accepted in one field.
const MAX_FIELD_VALUE: usize = 900;
/// Boundary candidates tried before giving up.
const BOUNDARY_ATTEMPTS: u32 = 64;

/// One recipient the DSN reports on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub address: String,
    pub action: Action,
    /// Enhanced status code (RFC 3463), e.g. `5.1.1`.
    pub status: String,
    /// MX host name, when a remote server was reached.
    pub remote_mta: Option<String>,
    /// The remote reply, e.g. `550 5.1.1 no such user`.
    pub diagnostic: Option<String>,
}

/// What happened to a recipient ([RFC 3464 §2.3.3](https://www.rfc-editor.org/rfc/rfc3464#section-2.3.3)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Given up: the message will not be delivered.
    Failed,
    /// Not delivered yet; still being retried.
    Delayed,
}

impl Action {
    /// The `Action:` field value.
    pub fn keyword(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        }
    }
}

/// Why a DSN could not be built. Values are not repeated in the messages (they may be
/// addresses), only which input was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    #[error("a DSN must report on at least one recipient")]
    NoRecipients,
    #[error("no DSN is sent to the null reverse-path")]
    NullSender,
    #[error("invalid host name for the {field}")]
    InvalidHost { field: &'static str },
    #[error("invalid address for the {field}: control characters or too long")]
    InvalidAddress { field: &'static str },
    #[error("invalid queue id: letters, digits, '-', '_' and '.' only, at most 64")]
    InvalidQueueId,
    #[error("invalid status code for reported recipient {index}: expected class.subject.detail")]
    InvalidStatus { index: usize },
    #[error("the delivery-status part would not be 7-bit clean")]
    NotSevenBit,
    #[error("no MIME boundary could be found that is absent from the content")]
    NoBoundary,
}

/// The header block of a message: the bytes before the first empty line (CRLF or LF line
/// endings), including the line ending of the last header line but not the empty line; the
/// whole message if it has no empty line (no body).
pub fn header_block(message: &[u8]) -> &[u8] {
    let mut start = 0;
    loop {
        let rest = message.get(start..).unwrap_or_default();
        // The block also ends at the first line that is neither a header field nor a folded
        // continuation: in a message without a blank line, body text is never taken for headers.
        if rest.starts_with(b"\r\n") || rest.starts_with(b"\n") || !header_line(rest) {
            return message.get(..start).unwrap_or(message);
        }
        match memchr::memchr(b'\n', rest) {
            Some(at) => start += at + 1,
            None => return message,
        }
    }
}

/// A header field line (`name:` with printable name characters) or a continuation line.
fn header_line(line: &[u8]) -> bool {
    if line.is_empty() || matches!(line[0], b' ' | b'\t') {
        return true;
    }
    match line.iter().position(|b| *b == b':') {
        // Printable field names; 8-bit bytes are tolerated (seen in the wild, RFC 6532 values).
        Some(colon) if colon > 0 => line[..colon].iter().all(|b| *b >= 33),
        _ => false,
    }
}

/// Builds an RFC 3464 DSN to `to` (the envelope sender of the original) reporting on
/// `reported`. See the module documentation for what is and is not included.
pub fn build(
    reporting_mta: &str,
    to: &str,
    original: &MessageId,
    arrival: DateTime<Utc>,
    original_headers: &[u8],
    reported: &[Reported],
) -> Result<Vec<u8>, DsnError> {
    check_inputs(reporting_mta, to, original, reported)?;
    let now = Utc::now();
    let ctx = Context {
        reporting_mta,
        queue_id: original.as_str(),
        arrival: arrival.to_rfc2822(),
        now: now.to_rfc2822(),
    };
    let human = encode_text(human_text(&ctx, reported).into_bytes());
    let status = delivery_status(&ctx, reported)?;
    let headers = encode_text(to_crlf(header_block(original_headers)));

    let parts = [
        Part::new("text/plain", human, "Notification"),
        Part {
            content_type: "message/delivery-status".to_string(),
            encoding: "7bit",
            description: "Delivery report",
            body: status.into_bytes(),
        },
        Part::new("text/rfc822-headers", headers, "Original message headers"),
    ];
    let boundary = choose_boundary(&parts)?;

    let mut out = top_headers(&ctx, to, reported, &boundary).into_bytes();
    for part in &parts {
        part.write(&boundary, &mut out);
    }
    out.extend_from_slice(b"--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    Ok(out)
}

/// Values shared by the parts of one DSN.
struct Context<'a> {
    reporting_mta: &'a str,
    queue_id: &'a str,
    arrival: String,
    now: String,
}

/// One body part, already transfer-encoded.
struct Part {
    content_type: String,
    encoding: &'static str,
    description: &'static str,
    body: Vec<u8>,
}

impl Part {
    /// A text part; `text` is `(charset, encoding, body)` from [`encode_text`].
    fn new(content_type: &str, text: Encoded, description: &'static str) -> Part {
        let (charset, encoding, body) = text;
        Part {
            content_type: format!("{content_type}; charset={charset}"),
            encoding,
            description,
            body,
        }
    }

    /// Writes the delimiter line, the part headers, the body, and the CRLF that belongs to the
    /// next delimiter (RFC 2046 §5.1.1).
    fn write(&self, boundary: &str, out: &mut Vec<u8>) {
        let head = format!(
            "--{boundary}\r\nContent-Type: {}\r\nContent-Description: {}\r\n\
             Content-Transfer-Encoding: {}\r\n\r\n",
            self.content_type, self.description, self.encoding
        );
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&self.body);
        if !self.body.is_empty() && !self.body.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

fn check_inputs(
    reporting_mta: &str,
    to: &str,
    original: &MessageId,
    reported: &[Reported],
) -> Result<(), DsnError> {
    check_host(reporting_mta, "reporting MTA")?;
    if to.is_empty() {
        return Err(DsnError::NullSender);
    }
    check_address(to, "DSN recipient")?;
    let id = original.as_str();
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !id_ok {
        return Err(DsnError::InvalidQueueId);
    }
    if reported.is_empty() {
        return Err(DsnError::NoRecipients);
    }
    for (index, recipient) in reported.iter().enumerate() {
        check_address(&recipient.address, "reported recipient")?;
        if final_recipient(&recipient.address).len() > MAX_FIELD_VALUE {
            return Err(DsnError::InvalidAddress {
                field: "reported recipient",
            });
        }
        if !valid_status(&recipient.status) {
            return Err(DsnError::InvalidStatus { index });
        }
        if let Some(host) = &recipient.remote_mta {
            check_host(host, "remote MTA")?;
        }
    }
    Ok(())
}

/// A DNS name or address literal: letters, digits and `.-_:[]`, nothing that could end a field.
fn check_host(host: &str, field: &'static str) -> Result<(), DsnError> {
    let ok = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        });
    if ok {
        Ok(())
    } else {
        Err(DsnError::InvalidHost { field })
    }
}

fn check_address(address: &str, field: &'static str) -> Result<(), DsnError> {
    let ok = !address.is_empty()
        && address.len() <= MAX_FIELD_VALUE
        && !address.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(DsnError::InvalidAddress { field })
    }
}

/// `class.subject.detail` with class 2, 4 or 5 (RFC 3463 §2).
fn valid_status(status: &str) -> bool {
    let mut fields = status.split('.');
    let class_ok = matches!(fields.next(), Some("2" | "4" | "5"));
    let number = |f: Option<&str>| {
        f.is_some_and(|f| (1..=3).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()))
    };
    class_ok && number(fields.next()) && number(fields.next()) && fields.next().is_none()
}

/// The value of `Final-Recipient:`: `rfc822; addr` for ASCII addresses, else the `utf-8` type
/// with every character outside QCHAR escaped as `\x{HEX}` (RFC 6533 §3).
fn final_recipient(address: &str) -> String {
    if address.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return format!("rfc822; {address}");
    }
    let mut out = String::from("utf-8; ");
    for c in address.chars() {
        let qchar = c.is_ascii_graphic() && !matches!(c, '+' | '=' | '\\');
        if qchar {
            out.push(c);
        } else {
            let _ = write!(out, "\\x{{{:02X}}}", u32::from(c));
        }
    }
    out
}

/// A remote reply as one line of printable ASCII words separated by single spaces: line breaks
/// and other whitespace or controls become spaces, other non-ASCII becomes `\x{HEX}`, and text
/// beyond [`MAX_DIAGNOSTIC`] characters is cut.
fn flatten(text: &str) -> String {
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == MAX_DIAGNOSTIC {
            out.push_str(" ...");
            break;
        }
        if c.is_ascii_graphic() {
            out.push(c);
        } else if c.is_whitespace() || c.is_control() {
            out.push(' ');
        } else {
            let _ = write!(out, "\\x{{{:02X}}}", u32::from(c));
        }
    }
    out.split_ascii_whitespace().collect::<Vec<_>>().join(" ")
}

/// Splits `text` (words separated by spaces) into lines: the first holds at most `first` octets,
/// the others at most `rest`, except that a word is never split below [`MAX_WORD`] octets.
fn wrap(text: &str, first: usize, rest: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ').flat_map(|w| split_word(w, MAX_WORD)) {
        let room = if lines.len() == 1 { first } else { rest };
        match lines.last_mut() {
            Some(line) if line.is_empty() => line.push_str(word),
            Some(line) if line.len() + 1 + word.len() <= room => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// Pieces of `word` of at most `max` octets, cut at character boundaries.
fn split_word(word: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = word;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        pieces.push(head);
        rest = tail;
    }
    if !rest.is_empty() {
        pieces.push(rest);
    }
    pieces
}

fn human_text(ctx: &Context<'_>, reported: &[Reported]) -> String {
    let mut text = format!(
        "This is the mail delivery system at {}.\r\n\r\n\
         This concerns your message with queue id {},\r\nreceived {}.\r\n",
        ctx.reporting_mta, ctx.queue_id, ctx.arrival
    );
    let groups = [
        (
            Action::Failed,
            "It could not be delivered to the recipients below and will not be\r\n\
             retried.\r\n",
        ),
        (
            Action::Delayed,
            "It has not yet been delivered to the recipients below. Delivery is\r\n\
             still being retried; you do not need to send the message again.\r\n",
        ),
    ];
    for (action, intro) in groups {
        let mut group = reported.iter().filter(|r| r.action == action).peekable();
        if group.peek().is_none() {
            continue;
        }
        text.push_str("\r\n");
        text.push_str(intro);
        for recipient in group {
            human_recipient(recipient, &mut text);
        }
    }
    text.push_str(
        "\r\nFor privacy, this report does not include the content of your message.\r\n\
         Its headers are attached for reference.\r\n",
    );
    text
}

fn human_recipient(recipient: &Reported, text: &mut String) {
    let _ = write!(
        text,
        "\r\n<{}>\r\n    Status: {}\r\n",
        recipient.address, recipient.status
    );
    if let Some(host) = &recipient.remote_mta {
        let _ = write!(text, "    Remote server: {host}\r\n");
    }
    let reply = recipient
        .diagnostic
        .as_deref()
        .map(flatten)
        .unwrap_or_default();
    if !reply.is_empty() {
        text.push_str("    Reply:\r\n");
        for line in wrap(&reply, FOLD_WIDTH - 6, FOLD_WIDTH - 6) {
            let _ = write!(text, "      {line}\r\n");
        }
    }
}

/// The `message/delivery-status` body: per-message fields, then one block per recipient, each
/// block preceded by an empty line (RFC 3464 §2.1).
fn delivery_status(ctx: &Context<'_>, reported: &[Reported]) -> Result<String, DsnError> {
    let mut body = format!(
        "Reporting-MTA: dns; {}\r\nArrival-Date: {}\r\nX-Sealpost-Queue-Id: {}\r\n",
        ctx.reporting_mta, ctx.arrival, ctx.queue_id
    );
    for recipient in reported {
        let _ = write!(
            body,
            "\r\nFinal-Recipient: {}\r\nAction: {}\r\nStatus: {}\r\n",
            final_recipient(&recipient.address),
            recipient.action.keyword(),
            recipient.status
        );
        if let Some(host) = &recipient.remote_mta {
            let _ = write!(body, "Remote-MTA: dns; {host}\r\n");
        }
        let reply = recipient
            .diagnostic
            .as_deref()
            .map(flatten)
            .unwrap_or_default();
        if !reply.is_empty() {
            let prefix = "Diagnostic-Code: smtp; ";
            let lines = wrap(&reply, FOLD_WIDTH - prefix.len(), FOLD_WIDTH - 1);
            let _ = write!(body, "{prefix}{}\r\n", lines.join("\r\n "));
        }
        let _ = write!(body, "Last-Attempt-Date: {}\r\n", ctx.now);
    }
    // Built from validated, flattened and folded values; checked all the same.
    if !is_7bit(body.as_bytes()) {
        return Err(DsnError::NotSevenBit);
    }
    Ok(body)
}

fn top_headers(ctx: &Context<'_>, to: &str, reported: &[Reported], boundary: &str) -> String {
    let subject = if reported.iter().any(|r| r.action == Action::Failed) {
        "Undelivered Mail Returned to Sender"
    } else {
        "Delayed Mail (still being retried)"
    };
    let mta = ctx.reporting_mta;
    format!(
        "From: \"Mail Delivery System\" <MAILER-DAEMON@{mta}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {}\r\n\
         Message-ID: <{}.dsn@{mta}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n",
        ctx.now,
        MessageId::generate()
    )
}

/// A boundary that occurs in no part (RFC 2046 §5.1.1). `=_` cannot appear in base64 and the
/// random part cannot be predicted; the check makes it certain.
fn choose_boundary(parts: &[Part]) -> Result<String, DsnError> {
    boundary_from(&format!("=_sealpost-dsn-{}", MessageId::generate()), parts)
}

/// The first of `base-0`, `base-1`, … that occurs in no part.
fn boundary_from(base: &str, parts: &[Part]) -> Result<String, DsnError> {
    for attempt in 0..BOUNDARY_ATTEMPTS {
        let boundary = format!("{base}-{attempt}");
        let clash = parts
            .iter()
            .any(|p| memchr::memmem::find(&p.body, boundary.as_bytes()).is_some());
        if !clash {
            return Ok(boundary);
        }
    }
    Err(DsnError::NoBoundary)
}

/// Every line ending becomes CRLF (bare CR and bare LF included), and a non-empty block ends
/// with CRLF.
fn to_crlf(block: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len() + 2);
    let mut bytes = block.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        match b {
            b'\r' => {
                bytes.next_if_eq(&b'\n');
                out.extend_from_slice(b"\r\n");
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            other => out.push(other),
        }
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// True when CRLF-terminated `body` may be sent as `7bit` (RFC 2045 §2.7): ASCII without NUL,
/// CR and LF only as CRLF, lines of at most [`MAX_LINE`] octets.
fn is_7bit(body: &[u8]) -> bool {
    let mut line_len = 0;
    let mut bytes = body.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        match b {
            b'\r' if bytes.next_if_eq(&b'\n').is_some() => line_len = 0,
            b'\r' | b'\n' | 0 | 0x80..=0xff => return false,
            _ => {
                line_len += 1;
                if line_len > MAX_LINE {
                    return false;
                }
            }
        }
    }
    true
}

/// A text body ready to send: charset, transfer encoding, encoded bytes.
type Encoded = (&'static str, &'static str, Vec<u8>);

/// `7bit` when the body allows it, else base64 in lines of 76 characters. The charset is
/// `us-ascii` for ASCII text and `utf-8` otherwise (RFC 6532 for 8-bit header blocks).
fn encode_text(body: Vec<u8>) -> Encoded {
    let charset = if body.is_ascii() { "us-ascii" } else { "utf-8" };
    if is_7bit(&body) {
        return (charset, "7bit", body);
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(&body);
    let mut out = Vec::with_capacity(encoded.len() + encoded.len() / 38 + 2);
    for line in encoded.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    (charset, "base64", out)
}

#[cfg(test)]
#[path = "dsn_tests.rs"]
mod tests;
