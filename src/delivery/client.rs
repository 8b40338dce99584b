//! Outbound SMTP client: one connection to one host, reused for several messages.

//!
//! [`Connection::open`] connects, reads the greeting, says EHLO (HELO when EHLO is refused with
//! 5xx) and upgrades with STARTTLS whenever the server offers it, in every mode (RFC 7435);
//! [`Connection::send`] runs one transaction, pipelined (RFC 2920) when offered. Every read and
//! write has the RFC 5321 §4.5.3.2 time limit of its stage from [`ClientTimeouts`]. Errors are
//! typed; `outcome.rs` classifies them as temporary or permanent, nowhere else.
//!
//! Stage names used in [`ClientError`]: `connect`, `greeting`, `EHLO`, `HELO`, `STARTTLS`,
//! `TLS handshake`, `MAIL`, `RCPT`, `DATA`, `message body`, `end of data` (after the final dot:
//! the message may have been accepted), `RSET`.

mod reply;
mod transaction;
mod wire;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::ClientTimeouts;
use crate::smtp::RemoteReply;

use super::tls::{self, TlsClients, TlsFailure, TlsReport, TlsRequirement};
use wire::{Stream, Wire};

/// Extensions the server offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub esmtp: bool,
    pub pipelining: bool,
    pub starttls: bool,
    /// `SIZE` (RFC 1870): `Some(0)` when offered without a fixed limit.
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
}

/// A message to send over an open connection.
pub struct Outgoing<'a> {
    /// Envelope sender; empty for `<>`.
    pub sender: &'a str,
    pub recipients: &'a [String],
    /// The message as stored (not dot-stuffed; the client stuffs it).
    pub body: &'a [u8],
    /// The envelope or headers need SMTPUTF8.
    pub smtputf8: bool,
    /// The body has 8-bit content.
    pub eight_bit: bool,
}

/// The result of one transaction.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// One RCPT reply per recipient, in order.
    pub rcpt: Vec<RemoteReply>,
    /// The reply after the final dot, or DATA's own reply when it was not 354 (either way it
    /// applies to every accepted recipient); `None` when no recipient was accepted (no message
    /// sent).
    pub data: Option<RemoteReply>,
}

/// Everything that can go wrong talking to one host. Classified in `outcome.rs`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed (refused, unreachable, reset).
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The server did not answer (or accept our writes) within the stage's time limit.
    #[error("timeout waiting for {stage}")]
    Timeout { stage: &'static str },
    /// The connection broke or was closed by the server.
    #[error("connection lost during {stage}: {source}")]
    Io {
        stage: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The server refused the greeting, EHLO/HELO, MAIL or RSET with this reply.
    #[error("server refused at {stage}: {reply}")]
    Rejected {
        stage: &'static str,
        reply: RemoteReply,
    },
    /// The requirement asks for TLS that cannot be had: STARTTLS not offered or refused, or the
    /// certificate did not pass the required check.
    #[error("TLS required but {0}")]
    TlsRequired(String),
    /// The TLS handshake failed while TLS was required.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(String),
    /// The server broke the protocol (malformed reply), or the message cannot be put into a
    /// command (no recipients, CR/LF or brackets in an address).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The message exceeds the server's declared SIZE; nothing was sent. Permanent.
    #[error("message of {size} bytes exceeds the server's SIZE limit of {limit}")]
    TooBig { size: u64, limit: u64 },
    /// The message needs SMTPUTF8 (RFC 6531), which the server does not offer; nothing was sent.
    #[error("message needs SMTPUTF8, which the server does not offer")]
    NeedsSmtpUtf8,
    /// The envelope can never be sent (no recipients, an address SMTP cannot carry).
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(String),
}

/// Longest wait for the reply to QUIT; the connection is done either way.
const QUIT_LIMIT: Duration = Duration::from_secs(5);

/// An open, greeted connection (after EHLO, and after STARTTLS + EHLO when TLS was used).
///
/// Call [`Connection::reset`] between transactions when reusing it, and [`Connection::quit`]
/// at the end.
pub struct Connection {
    wire: Wire,
    peer: SocketAddr,
    caps: Capabilities,
    tls: Option<TlsReport>,
    tls_fallback: Option<String>,
    timeouts: ClientTimeouts,
}

impl Connection {
    /// Connects, reads the greeting, EHLO (HELO fallback), STARTTLS as `tls` asks. In
    /// opportunistic mode a failed handshake is retried once on a new connection without TLS;
    /// `tls_fallback()` then says why.
    pub async fn open(
        addr: SocketAddr,
        mx_host: &str,
        helo: &str,
        tls: &TlsRequirement,
        tls_clients: &TlsClients,
        timeouts: &ClientTimeouts,
    ) -> Result<Connection, ClientError> {
        let dial = Dial {
            addr,
            mx_host,
            helo,
            tls,
            clients: tls_clients,
            timeouts,
        };
        match dial.attempt(true).await {
            Ok(conn) => Ok(conn),
            Err(OpenFailure::Fatal(e)) => Err(e),
            Err(OpenFailure::Fallback(reason)) => {
                tracing::info!(%addr, mx_host, %reason, "TLS failed; reconnecting without STARTTLS");
                let mut conn = dial.attempt(false).await.map_err(OpenFailure::into_error)?;
                conn.tls_fallback = Some(reason);
                Ok(conn)
            }
        }
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    pub fn tls(&self) -> Option<&TlsReport> {
        self.tls.as_ref()
    }

    /// Why TLS was not used although offered (handshake failure in opportunistic mode, or
    /// STARTTLS refused).
    pub fn tls_fallback(&self) -> Option<&str> {
        self.tls_fallback.as_deref()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// One transaction: MAIL, RCPT for each recipient, DATA, body, final dot (pipelined when
    /// offered). A refused MAIL is `Err(Rejected)`; refused recipients are in `Transaction::rcpt`.
    /// `TooBig`, `NeedsSmtpUtf8` and `Protocol` for an unusable envelope are returned before
    /// anything is sent.
    pub async fn send(&mut self, msg: &Outgoing<'_>) -> Result<Transaction, ClientError> {
        self.check(msg)?;
        let mail = transaction::mail_command(msg, &self.caps);
        if self.caps.pipelining {
            self.send_pipelined(msg, mail).await
        } else {
            self.send_lockstep(msg, mail).await
        }
    }

    /// What must hold before a transaction starts.
    fn check(&self, msg: &Outgoing<'_>) -> Result<(), ClientError> {
        let size = transaction::message_size(msg.body);
        if let Some(limit) = self.caps.size.filter(|l| *l > 0) {
            if size > limit {
                return Err(ClientError::TooBig { size, limit });
            }
        }
        if msg.smtputf8 && !self.caps.smtputf8 {
            return Err(ClientError::NeedsSmtpUtf8);
        }
        if msg.recipients.is_empty() {
            return Err(ClientError::InvalidEnvelope(
                "a transaction needs at least one recipient".to_string(),
            ));
        }
        let mut addrs =
            std::iter::once(msg.sender).chain(msg.recipients.iter().map(String::as_str));
        if let Some(bad) = addrs.find(|a| transaction::bad_address(a)) {
            return Err(ClientError::InvalidEnvelope(format!(
                "address {bad:?} cannot be sent in an SMTP command"
            )));
        }
        Ok(())
    }

    /// RSET before reusing the connection for another message.
    pub async fn reset(&mut self) -> Result<(), ClientError> {
        let limit = self.timeouts.mail;
        let reply = reply::remote(&self.wire.command("RSET", "RSET", limit).await?);
        if reply.code != 250 {
            return Err(ClientError::Rejected {
                stage: "RSET",
                reply,
            });
        }
        Ok(())
    }

    /// QUIT and close (errors ignored), within a few seconds.
    pub async fn quit(mut self) {
        let limit = QUIT_LIMIT.min(self.timeouts.mail);
        let wire = &mut self.wire;
        let _ = tokio::time::timeout(limit, async move {
            let _ = wire.command("QUIT", "QUIT", limit).await;
            wire.shutdown().await;
        })
        .await;
    }
}

/// Why one attempt at opening did not give a connection.
enum OpenFailure {
    Fatal(ClientError),
    /// Opportunistic TLS failed on this connection; try again without STARTTLS.
    Fallback(String),
}

impl OpenFailure {
    fn into_error(self) -> ClientError {
        match self {
            OpenFailure::Fatal(e) => e,
            OpenFailure::Fallback(reason) => ClientError::TlsHandshake(reason),
        }
    }
}

impl From<ClientError> for OpenFailure {
    fn from(e: ClientError) -> Self {
        OpenFailure::Fatal(e)
    }
}

/// The arguments of [`Connection::open`], for its steps.
struct Dial<'a> {
    addr: SocketAddr,
    mx_host: &'a str,
    helo: &'a str,
    tls: &'a TlsRequirement,
    clients: &'a TlsClients,
    timeouts: &'a ClientTimeouts,
}

impl Dial<'_> {
    /// One connection: greeting and EHLO, then STARTTLS when `starttls` and offered.
    async fn attempt(&self, starttls: bool) -> Result<Connection, OpenFailure> {
        let conn = self.greeted().await?;
        if !starttls {
            return Ok(conn);
        }
        if !conn.caps.starttls {
            if self.tls.required {
                return Err(ClientError::TlsRequired("STARTTLS not offered".to_string()).into());
            }
            return Ok(conn);
        }
        self.starttls(conn).await
    }

    /// TCP connect, a 220 greeting, EHLO.
    async fn greeted(&self) -> Result<Connection, ClientError> {
        let t = self.timeouts;
        let tcp = connect(self.addr, t.connect).await?;
        let mut wire = Wire::new(Stream::Plain(tcp));
        let greeting = reply::remote(&wire.read_reply("greeting", t.greeting).await?);
        if greeting.code != 220 {
            let _ = wire.write(b"QUIT\r\n", "QUIT", QUIT_LIMIT).await;
            return Err(ClientError::Rejected {
                stage: "greeting",
                reply: greeting,
            });
        }
        let caps = ehlo(&mut wire, self.helo, t.ehlo).await?;
        Ok(Connection {
            wire,
            peer: self.addr,
            caps,
            tls: None,
            tls_fallback: None,
            timeouts: t.clone(),
        })
    }

    /// STARTTLS (RFC 3207), the handshake, EHLO again.
    async fn starttls(&self, mut conn: Connection) -> Result<Connection, OpenFailure> {
        let limit = self.timeouts.ehlo;
        let reply = match conn.wire.command("STARTTLS", "STARTTLS", limit).await {
            Ok(r) => reply::remote(&r),
            Err(e) if self.tls.required => return Err(e.into()),
            Err(e) => return Err(OpenFailure::Fallback(format!("STARTTLS failed: {e}"))),
        };
        if reply.code != 220 {
            let reason = format!("STARTTLS refused: {reply}");
            if self.tls.required {
                return Err(ClientError::TlsRequired(reason).into());
            }
            // RFC 3207 §4: the session goes on unchanged, in plaintext.
            conn.tls_fallback = Some(reason);
            return Ok(conn);
        }
        if conn.wire.has_buffered() {
            // Bytes before the handshake are plaintext anyone could have injected
            // (CVE-2011-0411); the session cannot be trusted, so it counts as a failed handshake.
            let reason = "the server sent data right after its 220 to STARTTLS".to_string();
            return Err(self.handshake_failed(TlsFailure::Handshake(reason)));
        }
        let Connection { wire, timeouts, .. } = conn;
        let tcp = wire
            .into_plain()
            .ok_or_else(|| ClientError::Protocol("STARTTLS inside TLS".to_string()))?;
        let (stream, report) =
            match tls::handshake(self.clients, self.tls, self.mx_host, tcp, limit).await {
                Ok(done) => done,
                Err(failure) => return Err(self.handshake_failed(failure)),
            };
        let mut wire = Wire::new(Stream::Tls(Box::new(stream)));
        let caps = ehlo(&mut wire, self.helo, limit).await?;
        Ok(Connection {
            wire,
            peer: self.addr,
            caps,
            tls: Some(report),
            tls_fallback: None,
            timeouts,
        })
    }

    /// A refused certificate is never downgraded; other failures are when TLS is optional.
    fn handshake_failed(&self, failure: TlsFailure) -> OpenFailure {
        match failure {
            TlsFailure::Refused(reason) => OpenFailure::Fatal(ClientError::TlsRequired(format!(
                "certificate did not verify: {reason}"
            ))),
            TlsFailure::Timeout if self.tls.required => OpenFailure::Fatal(ClientError::Timeout {
                stage: "TLS handshake",
            }),
            TlsFailure::Handshake(reason) if self.tls.required => {
                OpenFailure::Fatal(ClientError::TlsHandshake(reason))
            }
            TlsFailure::Timeout => OpenFailure::Fallback("TLS handshake timed out".to_string()),
            TlsFailure::Handshake(reason) => {
                OpenFailure::Fallback(format!("TLS handshake failed: {reason}"))
            }
        }
    }
}

async fn connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, ClientError> {
    match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Err(_) => Err(ClientError::Timeout { stage: "connect" }),
        Ok(Err(source)) => Err(ClientError::Connect { addr, source }),
        Ok(Ok(tcp)) => {
            // Commands are small and each waits for its reply: no Nagle delay.
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
    }
}

/// EHLO, or HELO when EHLO is refused with 5xx (RFC 5321 §4.1.4).
async fn ehlo(wire: &mut Wire, helo: &str, limit: Duration) -> Result<Capabilities, ClientError> {
    let response = wire.command(&format!("EHLO {helo}"), "EHLO", limit).await?;
    if response.code == 250 {
        return Ok(reply::capabilities(&response));
    }
    let refused = reply::remote(&response);
    if !refused.is_permanent() {
        return Err(ClientError::Rejected {
            stage: "EHLO",
            reply: refused,
        });
    }
    let reply = reply::remote(&wire.command(&format!("HELO {helo}"), "HELO", limit).await?);
    if reply.code != 250 {
        return Err(ClientError::Rejected {
            stage: "HELO",
            reply,
        });
    }
    Ok(Capabilities::default())
}
