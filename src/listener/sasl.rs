//! The AUTH verb (RFC 4954): PLAIN and LOGIN, only inside TLS.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::AuditEvent;
use crate::smtp::replies;

use super::auth::{decode_b64, parse_plain};
use super::io::{Conn, Line};
use super::session::{Next, Session};

/// How a SASL exchange ended before the password check.
enum Exchange {
    Credentials(String, String),
    Refused(crate::smtp::Reply),
    Close,
}

impl Session {
    pub(super) async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        mechanism: u64,
        initial: &str,
    ) -> Option<Next> {
        if self.tls.is_none() {
            return self.bad(conn, &replies::ENCRYPTION_REQUIRED);
        }
        if self.auth_user.is_some() {
            conn.reply(&replies::ALREADY_AUTH);
            return None;
        }
        if self.tx.is_some() {
            conn.reply(&replies::AUTH_IN_TRANSACTION);
            return None;
        }
        if self.ctx.throttle.is_locked(self.peer.ip()) {
            conn.reply(&replies::AUTH_LOCKED);
            return Some(Next::Close);
        }
        let (name, exchange) = match mechanism {
            smtp_proto::AUTH_PLAIN => ("PLAIN", self.plain(conn, initial).await),
            smtp_proto::AUTH_LOGIN => ("LOGIN", self.login(conn, initial).await),
            _ => return self.bad(conn, &replies::UNSUPPORTED_MECH),
        };
        match exchange {
            Exchange::Credentials(user, password) => self.check(conn, name, user, password).await,
            Exchange::Refused(reply) => self.bad(conn, &reply),
            Exchange::Close => Some(Next::Close),
        }
    }

    async fn check<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        mechanism: &str,
        user: String,
        password: String,
    ) -> Option<Next> {
        let ip = self.peer.ip();
        let success = self.ctx.users.verify(&user, password).await;
        // A name that is no configured user may be a password typed into the wrong field:
        // it is not recorded.
        let recorded = if self.ctx.users.exists(&user) {
            user.clone()
        } else {
            "(unknown user)".to_string()
        };
        let event = AuditEvent::SessionAuth {
            session: self.id,
            client_ip: ip,
            user: recorded,
            mechanism: mechanism.to_string(),
            success,
        };
        if let Err(e) = self.ctx.audit.record(event).await {
            tracing::error!(error = %e, "audit record for AUTH failed");
        }
        if success {
            self.auth_user = Some(user);
            conn.reply(&replies::AUTH_OK);
            return None;
        }
        if self.ctx.throttle.failure(ip) {
            conn.reply(&replies::AUTH_FAILED);
            conn.reply(&replies::AUTH_LOCKED);
            return Some(Next::Close);
        }
        self.bad(conn, &replies::AUTH_FAILED)
    }

    async fn plain<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        initial: &str,
    ) -> Exchange {
        let response = match initial {
            "" => match self.challenge(conn, "").await {
                Ok(r) => r,
                Err(e) => return e,
            },
            "=" => String::new(),
            r => r.to_string(),
        };
        match decode_b64(&response).as_deref().and_then(parse_plain) {
            Some((user, password)) => Exchange::Credentials(user, password),
            None => Exchange::Refused(replies::SYNTAX),
        }
    }

    async fn login<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        initial: &str,
    ) -> Exchange {
        let user = match initial {
            "" => match self.challenge(conn, "VXNlcm5hbWU6").await {
                Ok(r) => r,
                Err(e) => return e,
            },
            r => r.to_string(),
        };
        let password = match self.challenge(conn, "UGFzc3dvcmQ6").await {
            Ok(r) => r,
            Err(e) => return e,
        };
        let text = |s: &str| decode_b64(s).and_then(|b| String::from_utf8(b).ok());
        match (text(&user), text(&password)) {
            (Some(u), Some(p)) => Exchange::Credentials(u, p),
            _ => Exchange::Refused(replies::SYNTAX),
        }
    }

    /// Sends `334 prompt` and reads the client's response line (without CRLF).
    async fn challenge<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        prompt: &str,
    ) -> Result<String, Exchange> {
        conn.reply_raw()
            .extend_from_slice(format!("334 {prompt}\r\n").as_bytes());
        let limits = &self.ctx.limits;
        let line = match conn
            .read_line(limits.max_command_line, limits.command_timeout, None)
            .await
        {
            Ok(line) => line,
            Err(end) => {
                self.ended(conn, end).await;
                return Err(Exchange::Close);
            }
        };
        let Line::Ok(line) = line else {
            return Err(Exchange::Refused(replies::SYNTAX));
        };
        let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
        if text == "*" {
            return Err(Exchange::Refused(replies::AUTH_CANCELLED));
        }
        Ok(text)
    }
}
