//! One mail transaction: MAIL, RCPT…, DATA, the dot-stuffed body and the final dot, pipelined
//! (RFC 2920) when the server offers it, in lockstep otherwise.

use memchr::memmem::Finder;

use super::{reply, ClientError, Connection, Outgoing, Transaction};
use crate::smtp::RemoteReply;

/// Body bytes are gathered into writes of about this size.
const WRITE_CHUNK: usize = 64 * 1024;

impl Connection {
    /// MAIL + RCPT… + DATA in one write, then the replies in order (RFC 2920 §3.1).
    pub(super) async fn send_pipelined(
        &mut self,
        msg: &Outgoing<'_>,
        mail: String,
    ) -> Result<Transaction, ClientError> {
        let mut batch = mail;
        for rcpt in msg.recipients {
            batch.push_str(&format!("RCPT TO:<{rcpt}>\r\n"));
        }
        batch.push_str("DATA\r\n");
        let t = self.timeouts.clone();
        self.wire.write(batch.as_bytes(), "MAIL", t.mail).await?;
        let mail_reply = self.reply("MAIL", t.mail).await?;
        let rest = self.pipelined_replies(msg.recipients.len()).await;
        if !mail_reply.is_positive() {
            // The refusal is the outcome even if the server then closed (e.g. 421).
            if let Ok((_, data_reply)) = &rest {
                if data_reply.code == 354 {
                    let _ = self.abort_data().await;
                }
            }
            return Err(rejected("MAIL", mail_reply));
        }
        let (rcpt, data_reply) = rest?;
        if !any_accepted(&rcpt) {
            if data_reply.code == 354 {
                // RFC 2920 §3.1: DATA was accepted although no RCPT was; end it at once.
                self.abort_data().await?;
            }
            return Ok(Transaction { rcpt, data: None });
        }
        self.finish(msg.body, rcpt, data_reply).await
    }

    /// The RCPT replies and DATA's reply of a pipelined group, in order.
    async fn pipelined_replies(
        &mut self,
        recipients: usize,
    ) -> Result<(Vec<RemoteReply>, RemoteReply), ClientError> {
        let t = self.timeouts.clone();
        let mut rcpt = Vec::with_capacity(recipients);
        for _ in 0..recipients {
            rcpt.push(self.reply("RCPT", t.rcpt).await?);
        }
        let data_reply = self.reply("DATA", t.data_init).await?;
        Ok((rcpt, data_reply))
    }

    /// One command, one reply.
    pub(super) async fn send_lockstep(
        &mut self,
        msg: &Outgoing<'_>,
        mail: String,
    ) -> Result<Transaction, ClientError> {
        let t = self.timeouts.clone();
        let line = mail.trim_end();
        let mail_reply = reply::remote(&self.wire.command(line, "MAIL", t.mail).await?);
        if !mail_reply.is_positive() {
            return Err(rejected("MAIL", mail_reply));
        }
        let mut rcpt = Vec::with_capacity(msg.recipients.len());
        for addr in msg.recipients {
            let line = format!("RCPT TO:<{addr}>");
            rcpt.push(reply::remote(
                &self.wire.command(&line, "RCPT", t.rcpt).await?,
            ));
        }
        if !any_accepted(&rcpt) {
            return Ok(Transaction { rcpt, data: None });
        }
        let data_reply = reply::remote(&self.wire.command("DATA", "DATA", t.data_init).await?);
        self.finish(msg.body, rcpt, data_reply).await
    }

    /// After DATA's reply: the body when it is 354, else DATA's refusal as the outcome.
    async fn finish(
        &mut self,
        body: &[u8],
        rcpt: Vec<RemoteReply>,
        data_reply: RemoteReply,
    ) -> Result<Transaction, ClientError> {
        if data_reply.code != 354 {
            if data_reply.code < 400 {
                // A 2xx to DATA would mark recipients delivered with no body sent.
                return Err(ClientError::Protocol(format!(
                    "unexpected reply to DATA: {data_reply}"
                )));
            }
            return Ok(Transaction {
                rcpt,
                data: Some(data_reply),
            });
        }
        self.write_body(body).await?;
        let end = self.reply("end of data", self.timeouts.data_term).await?;
        Ok(Transaction {
            rcpt,
            data: Some(end),
        })
    }

    /// The dot-stuffed body and the final dot, written in slices of the stored body (never a
    /// stuffed copy of the whole), each write within `data_block`.
    async fn write_body(&mut self, body: &[u8]) -> Result<(), ClientError> {
        let limit = self.timeouts.data_block;
        let mut out: Vec<u8> = Vec::with_capacity(WRITE_CHUNK.min(body.len() + 8));
        for piece in DotStuffed::new(body) {
            if out.len() + piece.len() > WRITE_CHUNK && !out.is_empty() {
                self.wire.write(&out, "message body", limit).await?;
                out.clear();
            }
            if piece.len() >= WRITE_CHUNK {
                self.wire.write(piece, "message body", limit).await?;
            } else {
                out.extend_from_slice(piece);
            }
        }
        if !out.is_empty() {
            self.wire.write(&out, "message body", limit).await?;
        }
        Ok(())
    }

    /// Ends a DATA that got 354 with no accepted recipient: the bare dot, reply ignored.
    async fn abort_data(&mut self) -> Result<(), ClientError> {
        let t = self.timeouts.clone();
        self.wire
            .write(b".\r\n", "end of data", t.data_block)
            .await?;
        self.reply("end of data", t.data_term).await?;
        Ok(())
    }

    async fn reply(
        &mut self,
        stage: &'static str,
        limit: std::time::Duration,
    ) -> Result<RemoteReply, ClientError> {
        Ok(reply::remote(&self.wire.read_reply(stage, limit).await?))
    }
}

fn any_accepted(rcpt: &[RemoteReply]) -> bool {
    rcpt.iter().any(RemoteReply::is_positive)
}

fn rejected(stage: &'static str, reply: RemoteReply) -> ClientError {
    ClientError::Rejected { stage, reply }
}

/// The octets the body takes on the wire before stuffing: a final CRLF is added when missing.
pub(super) fn message_size(body: &[u8]) -> u64 {
    let tail = if body.is_empty() || body.ends_with(b"\r\n") {
        0
    } else {
        2
    };
    body.len() as u64 + tail
}

/// `MAIL FROM:<sender>` with SIZE (RFC 1870), BODY=8BITMIME (RFC 6152) and SMTPUTF8 (RFC 6531)
/// as offered and needed, CRLF-terminated.
pub(super) fn mail_command(msg: &Outgoing<'_>, caps: &super::Capabilities) -> String {
    let mut line = format!("MAIL FROM:<{}>", msg.sender);
    if caps.size.is_some() {
        line.push_str(&format!(" SIZE={}", message_size(msg.body)));
    }
    if msg.eight_bit && caps.eightbitmime {
        line.push_str(" BODY=8BITMIME");
    }
    if msg.smtputf8 && caps.smtputf8 {
        line.push_str(" SMTPUTF8");
    }
    line.push_str("\r\n");
    line
}

/// An address that cannot go between `<` and `>` in a command line.
pub(super) fn bad_address(addr: &str) -> bool {
    addr.bytes()
        .any(|b| matches!(b, b'\r' | b'\n' | b'<' | b'>' | b'\0'))
}

/// The body as wire slices (RFC 5321 §4.5.2): the stored body split before every line that
/// starts with `.`, an extra `.` between, a CRLF when the body does not end with one, then
/// `.\r\n`.
struct DotStuffed<'a> {
    body: &'a [u8],
    pos: usize,
    dot_next: bool,
    tail: u8,
    finder: Finder<'static>,
}

impl<'a> DotStuffed<'a> {
    fn new(body: &'a [u8]) -> DotStuffed<'a> {
        DotStuffed {
            body,
            pos: 0,
            dot_next: body.first() == Some(&b'.'),
            tail: 0,
            finder: Finder::new(b"\n."),
        }
    }
}

impl<'a> Iterator for DotStuffed<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.dot_next {
            self.dot_next = false;
            return Some(b".");
        }
        let body = self.body;
        if self.pos < body.len() {
            let start = self.pos;
            let end = match self.finder.find(&body[start..]) {
                Some(i) => {
                    self.dot_next = true;
                    start + i + 1
                }
                None => body.len(),
            };
            self.pos = end;
            return Some(&body[start..end]);
        }
        self.tail += 1;
        match self.tail {
            1 if !body.is_empty() && !body.ends_with(b"\r\n") => Some(b"\r\n"),
            1 | 2 => {
                self.tail = 2;
                Some(b".\r\n")
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuffed(body: &[u8]) -> Vec<u8> {
        DotStuffed::new(body).flatten().copied().collect()
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(stuffed(b"a\r\nb\r\n"), b"a\r\nb\r\n.\r\n");
        assert_eq!(
            stuffed(b".a\r\n..b\r\n.\r\n"),
            b"..a\r\n...b\r\n..\r\n.\r\n"
        );
        assert_eq!(stuffed(b"no crlf"), b"no crlf\r\n.\r\n");
        assert_eq!(stuffed(b"x\r\n."), b"x\r\n..\r\n.\r\n");
        assert_eq!(stuffed(b""), b".\r\n");
        assert_eq!(stuffed(b"a.b\r\n"), b"a.b\r\n.\r\n");
    }

    #[test]
    fn sizes_and_params() {
        assert_eq!(message_size(b"a\r\n"), 3);
        assert_eq!(message_size(b"a"), 3);
        let caps = super::super::Capabilities {
            size: Some(0),
            eightbitmime: true,
            smtputf8: true,
            ..Default::default()
        };
        let msg = Outgoing {
            sender: "a@b",
            recipients: &[],
            body: b"x\r\n",
            smtputf8: true,
            eight_bit: true,
        };
        assert_eq!(
            mail_command(&msg, &caps),
            "MAIL FROM:<a@b> SIZE=3 BODY=8BITMIME SMTPUTF8\r\n"
        );
        assert!(bad_address("a@b>\r\nRCPT TO:<x@y"));
        assert!(!bad_address("a@b.example"));
    }
}
