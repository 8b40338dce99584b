//! The SMTP session state machine: greeting → EHLO → [STARTTLS → EHLO] → [AUTH] → MAIL →
//! RCPT… → DATA. One method per verb; DATA lives in `data.rs`, AUTH in `sasl.rs`.

use std::net::SocketAddr;
use std::sync::Arc;

use smtp_proto::{Error as ParseError, MailFrom, RcptTo, Request};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::AuditEvent;
use crate::ids::SessionId;
use crate::shutdown::Signal;
use crate::smtp::{domain_of, replies, write_multiline, Reply};

use super::io::{Conn, End, Line};
use super::tls::TlsInfo;
use super::Context;

/// What the command loop asks the connection handler to do next.
pub enum Next {
    /// Upgrade to TLS, then run the loop again.
    StartTls,
    /// Close the connection (QUIT, fatal limit, timeout, shutdown, EOF).
    Close,
}

/// An open mail transaction.
pub struct Transaction {
    pub sender: String,
    pub recipients: Vec<String>,
}

/// Per-connection state.
pub struct Session {
    pub(super) ctx: Arc<Context>,
    pub(super) id: SessionId,
    pub(super) peer: SocketAddr,
    /// STARTTLS may be offered on this listener.
    pub(super) starttls_allowed: bool,
    pub(super) tls: Option<TlsInfo>,
    pub(super) helo: Option<String>,
    pub(super) esmtp: bool,
    pub(super) auth_user: Option<String>,
    pub(super) tx: Option<Transaction>,
    bad_commands: usize,
}

impl Session {
    pub fn new(ctx: Arc<Context>, peer: SocketAddr, starttls_allowed: bool) -> Session {
        Session {
            ctx,
            id: SessionId::next(),
            peer,
            starttls_allowed,
            tls: None,
            helo: None,
            esmtp: false,
            auth_user: None,
            tx: None,
            bad_commands: 0,
        }
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    /// RFC 3207 §4.2: after STARTTLS the session starts over (EHLO again, no AUTH carried over).
    pub fn tls_established(&mut self, info: TlsInfo) {
        self.tls = Some(info);
        self.helo = None;
        self.esmtp = false;
        self.auth_user = None;
        self.tx = None;
    }

    pub fn greeting(&self) -> Reply {
        Reply::plain(220, format!("{} ESMTP sealpost", self.ctx.hostname))
    }

    /// Reads and answers commands until the connection should close or switch to TLS.
    pub async fn command_loop<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        signal: &mut Signal,
    ) -> Next {
        loop {
            let limits = &self.ctx.limits;
            let read = conn
                .read_line(
                    limits.max_command_line,
                    limits.command_timeout,
                    Some(signal),
                )
                .await;
            let line = match read {
                Ok(line) => line,
                Err(end) => return self.ended(conn, end).await,
            };
            let next = match line {
                Line::Ok(line) => self.dispatch(conn, &line).await,
                Line::TooLong => self.bad(conn, &replies::LINE_TOO_LONG),
                Line::BareLineEnd => self.bad(conn, &replies::BARE_LF),
                Line::Overflow => {
                    conn.reply(&replies::LINE_TOO_LONG);
                    Some(Next::Close)
                }
            };
            if let Some(next) = next {
                let _ = conn.flush().await;
                return next;
            }
        }
    }

    pub(super) async fn ended<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        end: End,
    ) -> Next {
        let reply = match end {
            End::Timeout => Some(&replies::TIMEOUT),
            End::Shutdown => Some(&replies::SHUTTING_DOWN),
            End::Eof | End::Io(_) => None,
        };
        if let Some(reply) = reply {
            conn.reply(reply);
            let _ = conn.flush().await;
        }
        Next::Close
    }

    /// Counts a bad command; past the limit the session is closed with 421.
    pub(super) fn bad<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        reply: &Reply,
    ) -> Option<Next> {
        self.bad_commands += 1;
        if self.bad_commands > self.ctx.limits.max_bad_commands {
            conn.reply(&replies::TOO_MANY_ERRORS);
            return Some(Next::Close);
        }
        conn.reply(reply);
        None
    }

    async fn dispatch<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        line: &[u8],
    ) -> Option<Next> {
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(e) => return self.bad(conn, &parse_error_reply(e)),
        };
        match request {
            Request::Ehlo { host } => self.ehlo(conn, &host, true),
            Request::Helo { host } => self.ehlo(conn, &host, false),
            Request::StartTls => return self.starttls(conn),
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth(conn, mechanism, &initial_response).await,
            Request::Mail { from } => return self.mail(conn, from).await,
            Request::Rcpt { to } => return self.rcpt(conn, to).await,
            Request::Data => return self.data(conn).await,
            Request::Rset => {
                self.tx = None;
                conn.reply(&replies::OK);
            }
            Request::Noop { .. } => conn.reply(&replies::OK),
            Request::Quit => {
                conn.reply(&replies::BYE);
                return Some(Next::Close);
            }
            Request::Vrfy { .. } => conn.reply(&replies::VRFY),
            Request::Expn { .. } => conn.reply(&replies::EXPN),
            Request::Help { .. } => conn.reply(&replies::HELP),
            _ => return self.bad(conn, &replies::NOT_IMPLEMENTED),
        }
        None
    }

    fn ehlo<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        host: &str,
        esmtp: bool,
    ) {
        self.helo = Some(host.to_string());
        self.esmtp = esmtp;
        self.tx = None;
        if !esmtp {
            conn.reply(&Reply::plain(250, self.ctx.hostname.clone()));
            return;
        }
        let mut lines = vec![
            format!("{} greets {}", self.ctx.hostname, host),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.ctx.limits.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.tls.is_none() && self.starttls_allowed && self.ctx.tls.is_some() {
            lines.push("STARTTLS".to_string());
        }
        if self.tls.is_some() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        write_multiline(250, &lines, conn.reply_raw());
    }

    fn starttls<S: AsyncRead + AsyncWrite + Unpin>(&mut self, conn: &mut Conn<S>) -> Option<Next> {
        if self.tls.is_some() {
            return self.bad(conn, &replies::ALREADY_TLS);
        }
        if !self.starttls_allowed || self.ctx.tls.is_none() {
            return self.bad(conn, &replies::TLS_UNAVAILABLE);
        }
        // CVE-2011-0411 class: anything pipelined after STARTTLS is plaintext the attacker may
        // have injected; it must never be executed inside the TLS session.
        let dropped = conn.discard_input();
        if dropped > 0 {
            tracing::warn!(session = %self.id, peer = %self.peer, dropped, "discarded bytes pipelined after STARTTLS");
        }
        conn.reply(&replies::READY_TLS);
        Some(Next::StartTls)
    }

    async fn mail<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        from: MailFrom<std::borrow::Cow<'_, str>>,
    ) -> Option<Next> {
        if self.helo.is_none() {
            return self.bad(conn, &replies::NEED_HELO);
        }
        if self.tx.is_some() {
            return self.bad(conn, &replies::NESTED_MAIL);
        }
        if from.size as u64 > self.ctx.limits.max_message_size {
            let sender = Some(from.address.to_string());
            return self
                .reject(conn, "mail", &replies::MESSAGE_TOO_BIG, sender, None)
                .await;
        }
        self.tx = Some(Transaction {
            sender: from.address.to_string(),
            recipients: Vec::new(),
        });
        conn.reply(&replies::SENDER_OK);
        None
    }

    async fn rcpt<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        to: RcptTo<std::borrow::Cow<'_, str>>,
    ) -> Option<Next> {
        let Some(tx) = self.tx.as_ref() else {
            return self.bad(conn, &replies::NEED_MAIL);
        };
        let address = to.address.to_string();
        let sender = Some(tx.sender.clone());
        if domain_of(&address).is_none() {
            return self.bad(conn, &replies::BAD_RECIPIENT);
        }
        if tx.recipients.len() >= self.ctx.limits.max_recipients {
            let reply = &replies::TOO_MANY_RECIPIENTS;
            return self
                .reject(conn, "rcpt", reply, sender, Some(address))
                .await;
        }
        if !self.may_relay() {
            let reply = &replies::RELAY_DENIED;
            return self
                .reject(conn, "rcpt", reply, sender, Some(address))
                .await;
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.recipients.push(address);
        }
        conn.reply(&replies::RECIPIENT_OK);
        None
    }

    /// Authenticated clients and clients on a trusted network may relay; nobody else.
    fn may_relay(&self) -> bool {
        self.auth_user.is_some()
            || self
                .ctx
                .trusted
                .iter()
                .any(|net| net.contains(&self.peer.ip()))
    }

    /// Replies with a refusal and records it in the audit log. A refusal counts as an error
    /// of the session, so a client cannot fill the audit log by repeating refused commands.
    pub(super) async fn reject<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        stage: &str,
        reply: &Reply,
        sender: Option<String>,
        recipient: Option<String>,
    ) -> Option<Next> {
        let event = AuditEvent::MessageRejected {
            session: self.id,
            client_ip: self.peer.ip(),
            stage: stage.to_string(),
            code: reply.code,
            enhanced: reply.enhanced.to_string(),
            reason: reply.text.to_string(),
            sender,
            recipient,
        };
        if let Err(e) = self.ctx.audit.record(event).await {
            tracing::error!(error = %e, "audit record for a rejection failed");
        }
        self.bad(conn, reply)
    }
}

/// The reply for a command smtp-proto could not parse.
fn parse_error_reply(e: ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => replies::UNKNOWN_COMMAND,
        ParseError::InvalidSenderAddress => replies::BAD_SENDER,
        ParseError::InvalidRecipientAddress => replies::BAD_RECIPIENT,
        ParseError::SyntaxError { syntax } => {
            Reply::owned(501, "5.5.4", format!("Syntax: {syntax}"))
        }
        ParseError::InvalidParameter { param } => {
            Reply::owned(501, "5.5.4", format!("Invalid parameter {param}"))
        }
        ParseError::UnsupportedParameter { param } => {
            Reply::owned(555, "5.5.4", format!("Unsupported parameter {param}"))
        }
        _ => replies::SYNTAX,
    }
}
