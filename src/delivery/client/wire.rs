//! The byte stream under a connection (plain TCP, or TLS after STARTTLS), with a read buffer
//! and a time limit on every read and write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::Response;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;

use super::ClientError;

/// Plain TCP, or TLS after STARTTLS.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

const READ_CHUNK: usize = 8 * 1024;

/// A stream with a read buffer: replies that arrive together (pipelining) are read one by one.
pub(super) struct Wire {
    stream: Stream,
    buf: Vec<u8>,
    pos: usize,
}

impl Wire {
    pub(super) fn new(stream: Stream) -> Wire {
        Wire {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
        }
    }

    /// Bytes received but not yet parsed. After a `220` to STARTTLS there must be none: they
    /// would be plaintext injected before the handshake (CVE-2011-0411 style).
    pub(super) fn has_buffered(&self) -> bool {
        self.pos < self.buf.len()
    }

    /// The TCP stream, when no TLS is on it yet.
    pub(super) fn into_plain(self) -> Option<TcpStream> {
        match self.stream {
            Stream::Plain(s) => Some(s),
            Stream::Tls(_) => None,
        }
    }

    /// Writes all of `bytes` and flushes, within `limit`.
    pub(super) async fn write(
        &mut self,
        bytes: &[u8],
        stage: &'static str,
        limit: Duration,
    ) -> Result<(), ClientError> {
        let stream = &mut self.stream;
        let io = async move {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        match tokio::time::timeout(limit, io).await {
            Err(_) => Err(ClientError::Timeout { stage }),
            Ok(Err(source)) => Err(ClientError::Io { stage, source }),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Sends `line` with CRLF and reads one reply.
    pub(super) async fn command(
        &mut self,
        line: &str,
        stage: &'static str,
        limit: Duration,
    ) -> Result<Response<String>, ClientError> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes, stage, limit).await?;
        self.read_reply(stage, limit).await
    }

    /// One whole (possibly multi-line) reply, within `limit`.
    pub(super) async fn read_reply(
        &mut self,
        stage: &'static str,
        limit: Duration,
    ) -> Result<Response<String>, ClientError> {
        let deadline = Instant::now() + limit;
        let mut receiver = ResponseReceiver::default();
        loop {
            if self.has_buffered() {
                let mut bytes = self.buf[self.pos..].iter();
                let parsed = receiver.parse(&mut bytes);
                self.pos = self.buf.len() - bytes.len();
                match parsed {
                    Ok(reply) => return Ok(reply),
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => {}
                    Err(e) => {
                        return Err(ClientError::Protocol(format!(
                            "malformed reply during {stage}: {e}"
                        )))
                    }
                }
            }
            self.fill(stage, deadline).await?;
        }
    }

    /// Replaces the (fully consumed) buffer with newly received bytes.
    async fn fill(&mut self, stage: &'static str, deadline: Instant) -> Result<(), ClientError> {
        self.buf.clear();
        self.pos = 0;
        match timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => Err(ClientError::Timeout { stage }),
            Ok(Err(source)) => Err(ClientError::Io { stage, source }),
            Ok(Ok(0)) => Err(ClientError::Io {
                stage,
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ),
            }),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Closes the write side (TLS close_notify, then FIN), errors ignored.
    pub(super) async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}
