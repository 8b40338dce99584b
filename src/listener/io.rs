//! Buffered SMTP I/O for one connection: command lines, message data, and batched replies.
//!
//! Lines end only at CRLF. A bare LF or bare CR is never taken as a line end (nor as the end of
//! DATA): in a command it makes the command invalid, in DATA it taints the message, which is then
//! refused whole (SMTP smuggling).

use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::shutdown::Signal;
use crate::smtp::Reply;

/// Why reading stopped.
#[derive(Debug)]
pub enum End {
    /// The client closed the connection.
    Eof,
    /// No data within the timeout.
    Timeout,
    /// Shutdown was requested while waiting for a command.
    Shutdown,
    /// A socket or TLS error.
    Io(std::io::Error),
}

/// One command line as read.
#[derive(Debug)]
pub enum Line {
    /// A complete line including its CRLF.
    Ok(Vec<u8>),
    /// The line contained a bare LF or CR.
    BareLineEnd,
    /// The line exceeded the limit; its bytes were discarded up to its CRLF.
    TooLong,
    /// Far more than a line's worth of bytes without any CRLF: the client is not speaking SMTP.
    Overflow,
}

/// Bytes without a CRLF after which a command line is given up on and the session closed.
const OVERFLOW_LIMIT: usize = 64 * 1024;

/// Why a message's data was refused (the data is still read up to the real end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataProblem {
    BareLineEnd,
    TooBig,
    LineTooLong,
}

/// Where DATA goes: the body being built and the checks on it.
pub struct DataSink {
    pub body: Vec<u8>,
    pub max_size: usize,
    pub max_line: usize,
    pub problem: Option<DataProblem>,
    /// Bytes of message data seen (after unstuffing), whether stored or not.
    pub size: usize,
    at_line_start: bool,
    line_len: usize,
}

impl DataSink {
    /// `body` may already hold a prefix (the `Received:` header), not counted in `size`.
    pub fn new(body: Vec<u8>, max_size: usize, max_line: usize) -> DataSink {
        DataSink {
            body,
            max_size,
            max_line,
            problem: None,
            size: 0,
            at_line_start: true,
            line_len: 0,
        }
    }

    fn taint(&mut self, p: DataProblem) {
        if self.problem.is_none() {
            self.problem = Some(p);
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.size += bytes.len();
        if self.size > self.max_size {
            self.taint(DataProblem::TooBig);
        }
        if self.problem.is_none() {
            self.body.extend_from_slice(bytes);
        }
    }

    /// Takes one CRLF-terminated segment (or a partial one when `complete` is false).
    /// Returns true at the end-of-data line.
    fn segment(&mut self, seg: &[u8], complete: bool) -> bool {
        let mut seg = seg;
        if self.at_line_start && seg.first() == Some(&b'.') {
            if complete && seg == b".\r\n" {
                return true;
            }
            seg = &seg[1..];
        }
        let content = if complete { &seg[..seg.len() - 2] } else { seg };
        if memchr::memchr2(b'\r', b'\n', content).is_some() {
            self.taint(DataProblem::BareLineEnd);
        }
        self.line_len += content.len();
        if self.line_len > self.max_line {
            self.taint(DataProblem::LineTooLong);
        }
        self.push(seg);
        self.at_line_start = complete;
        if complete {
            self.line_len = 0;
        }
        false
    }
}

/// Partial lines longer than this are passed to the sink before their CRLF arrives.
const PARTIAL_FLUSH: usize = 64 * 1024;

/// A connection with an input buffer and a reply buffer.
pub struct Conn<S> {
    pub stream: S,
    buf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
    /// Bound on sending replies: a client that stops reading cannot hold the session.
    write_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S, write_timeout: Duration) -> Conn<S> {
        Conn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
            pos: 0,
            out: Vec::with_capacity(1024),
            write_timeout,
        }
    }

    /// Queues a reply; it is sent before the next blocking read (PIPELINING) or on `flush`.
    pub fn reply(&mut self, reply: &Reply) {
        reply.write_to(&mut self.out);
    }

    /// Queues raw reply bytes (multi-line replies).
    pub fn reply_raw(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Sends pending replies within the write timeout.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        let write = async {
            if !self.out.is_empty() {
                self.stream.write_all(&self.out).await?;
                self.out.clear();
            }
            self.stream.flush().await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client is not reading replies",
            )),
        }
    }

    /// Drops everything the client sent that has not been read yet (after STARTTLS).
    pub fn discard_input(&mut self) -> usize {
        let n = self.buf.len() - self.pos;
        self.buf.clear();
        self.pos = 0;
        n
    }

    pub fn into_stream(self) -> S {
        self.stream
    }

    /// Reads more input by `deadline`, flushing pending replies first.
    async fn fill(&mut self, deadline: Instant, signal: Option<&mut Signal>) -> Result<(), End> {
        self.flush().await.map_err(End::Io)?;
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf));
        let result = match signal {
            Some(signal) => tokio::select! {
                r = read => r,
                _ = signal.recv() => return Err(End::Shutdown),
            },
            None => read.await,
        };
        match result {
            Err(_) => Err(End::Timeout),
            Ok(Err(e)) => Err(End::Io(e)),
            Ok(Ok(0)) => Err(End::Eof),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Reads one command line of at most `max` octets including CRLF, within `timeout` for the
    /// whole line. Only CRLF ends a line: a bare LF or CR makes the line (up to its CRLF)
    /// invalid, it never splits it into two commands.
    pub async fn read_line(
        &mut self,
        max: usize,
        timeout: Duration,
        mut signal: Option<&mut Signal>,
    ) -> Result<Line, End> {
        let deadline = Instant::now() + timeout;
        let mut skipped = 0usize;
        loop {
            let pending = &self.buf[self.pos..];
            if let Some(i) = memchr::memmem::find(pending, b"\r\n") {
                let line = &pending[..i + 2];
                self.pos += i + 2;
                if skipped > 0 || line.len() > max {
                    return Ok(Line::TooLong);
                }
                if memchr::memchr2(b'\r', b'\n', &line[..i]).is_some() {
                    return Ok(Line::BareLineEnd);
                }
                return Ok(Line::Ok(line.to_vec()));
            }
            if pending.len() > max {
                // Drop what cannot be a valid line, keeping a trailing CR for its LF.
                let keep = usize::from(pending.last() == Some(&b'\r'));
                skipped += pending.len() - keep;
                self.pos = self.buf.len() - keep;
                if skipped > OVERFLOW_LIMIT {
                    return Ok(Line::Overflow);
                }
            }
            self.fill(deadline, signal.as_deref_mut()).await?;
        }
    }

    /// Reads message data up to the end-of-data line into `sink`.
    /// `timeout` bounds each read (RFC 5321 §4.5.3.2.5: per data block).
    pub async fn read_data(&mut self, sink: &mut DataSink, timeout: Duration) -> Result<(), End> {
        loop {
            if self.take_segments(sink) {
                return Ok(());
            }
            self.fill(Instant::now() + timeout, None).await?;
        }
    }

    /// Feeds every complete CRLF segment in the buffer to the sink; true at end of data.
    fn take_segments(&mut self, sink: &mut DataSink) -> bool {
        let mut search = self.pos;
        while let Some(i) = memchr::memchr(b'\n', &self.buf[search..]) {
            let nl = search + i;
            if nl > self.pos && self.buf[nl - 1] == b'\r' {
                let seg_end = nl + 1;
                let done = sink.segment(&self.buf[self.pos..seg_end], true);
                self.pos = seg_end;
                if done {
                    return true;
                }
                search = self.pos;
            } else {
                // A bare LF: not a line end. Keep looking for CRLF; the sink sees the LF.
                search = nl + 1;
            }
        }
        let pending = self.buf.len() - self.pos;
        if pending > PARTIAL_FLUSH {
            // Keep a trailing CR back: its LF may be in the next read.
            let keep = usize::from(self.buf.last() == Some(&b'\r'));
            let end = self.buf.len() - keep;
            sink.segment(&self.buf[self.pos..end], false);
            self.pos = end;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> (DataSink, bool) {
        let mut sink = DataSink::new(Vec::new(), 1 << 20, 998);
        let mut conn = Conn::new(tokio::io::empty(), Duration::from_secs(1));
        conn.buf.extend_from_slice(input);
        let done = conn.take_segments(&mut sink);
        (sink, done)
    }

    #[test]
    fn unstuffs_and_ends_at_dot_line() {
        let (sink, done) = run(b"a\r\n..b\r\n.\r\nQUIT\r\n");
        assert!(done);
        assert_eq!(sink.body, b"a\r\n.b\r\n");
        assert_eq!(sink.problem, None);
    }

    #[test]
    fn bare_lf_dot_is_not_end_of_data() {
        for smuggle in [&b"a\n.\nMAIL"[..], b"a\n.\r\nMAIL", b"a\r.\rMAIL"] {
            let mut input = smuggle.to_vec();
            input.extend_from_slice(b" FROM:<x@y>\r\n");
            let (sink, done) = run(&input);
            assert!(!done, "{:?} ended DATA", String::from_utf8_lossy(smuggle));
            assert_eq!(sink.problem, Some(DataProblem::BareLineEnd));
        }
    }

    #[test]
    fn long_line_and_size() {
        let mut input = vec![b'x'; 1200];
        input.extend_from_slice(b"\r\n.\r\n");
        let (sink, done) = run(&input);
        assert!(done);
        assert_eq!(sink.problem, Some(DataProblem::LineTooLong));
    }
}
