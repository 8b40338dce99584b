//! Outbound SMTP client: one connection to one host, reused for several messages.

use std::net::SocketAddr;

use crate::config::ClientTimeouts;
use crate::smtp::RemoteReply;

use super::tls::{TlsClients, TlsReport, TlsRequirement};

/// Extensions the server offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub esmtp: bool,
    pub pipelining: bool,
    pub starttls: bool,
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
    /// The reply after the final dot; `None` when no recipient was accepted (no DATA sent).
    pub data: Option<RemoteReply>,
}

/// Everything that can go wrong talking to one host. Classified in `outcome.rs`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("timeout waiting for {stage}")]
    Timeout { stage: &'static str },
    #[error("connection lost during {stage}: {source}")]
    Io {
        stage: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("server refused at {stage}: {reply}")]
    Rejected {
        stage: &'static str,
        reply: RemoteReply,
    },
    #[error("TLS required but {0}")]
    TlsRequired(String),
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("message of {size} bytes exceeds the server's SIZE limit of {limit}")]
    TooBig { size: u64, limit: u64 },
    #[error("message needs SMTPUTF8, which the server does not offer")]
    NeedsSmtpUtf8,
}

/// An open, greeted connection (after EHLO, and after STARTTLS + EHLO when TLS was used).
pub struct Connection {}

impl Connection {
    /// Connects, reads the greeting, EHLO (HELO fallback), STARTTLS as `tls` asks. In
    /// opportunistic mode a failed handshake is retried once on a new connection without TLS;
    /// `tls_fallback()` then says why.
    pub async fn open(
        _addr: SocketAddr,
        _mx_host: &str,
        _helo: &str,
        _tls: &TlsRequirement,
        _tls_clients: &TlsClients,
        _timeouts: &ClientTimeouts,
    ) -> Result<Connection, ClientError> {
        todo!()
    }

    pub fn capabilities(&self) -> &Capabilities {
        todo!()
    }

    pub fn tls(&self) -> Option<&TlsReport> {
        todo!()
    }

    /// Why TLS was not used although offered (handshake failure in opportunistic mode).
    pub fn tls_fallback(&self) -> Option<&str> {
        todo!()
    }

    pub fn peer(&self) -> SocketAddr {
        todo!()
    }

    /// One transaction: MAIL, RCPT for each recipient, DATA, body, final dot (pipelined when
    /// offered). A refused MAIL is `Err(Rejected)`; refused recipients are in `Transaction::rcpt`.
    pub async fn send(&mut self, _msg: &Outgoing<'_>) -> Result<Transaction, ClientError> {
        todo!()
    }

    /// RSET before reusing the connection for another message.
    pub async fn reset(&mut self) -> Result<(), ClientError> {
        todo!()
    }

    /// QUIT and close (errors ignored).
    pub async fn quit(self) {}
}
