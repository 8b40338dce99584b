//! One sink connection: the SMTP dialogue, STARTTLS, and the recorded transaction.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::{Behaviour, Received, State};

/// Shared by every session of one sink.
#[derive(Clone)]
pub(super) struct Server {
    pub(super) b: Arc<Behaviour>,
    pub(super) acceptor: Option<TlsAcceptor>,
    pub(super) state: Arc<State>,
}

/// What a session does after a command.
enum Next {
    Continue,
    StartTls,
    Close,
}

/// The envelope of the transaction in progress.
struct Txn {
    from: String,
    params: String,
    rcpts: Vec<String>,
}

impl Server {
    pub(super) async fn accept_loop(self, listener: TcpListener) {
        // Dropping the set (when the sink's task is aborted) aborts every session.
        let mut sessions = JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let id = self.state.new_session();
            sessions.spawn(self.clone().session(tcp, id));
            while sessions.try_join_next().is_some() {}
        }
    }

    async fn session(self, tcp: TcpStream, id: usize) {
        if self.b.hang {
            let _held = tcp;
            std::future::pending::<()>().await;
            return;
        }
        let mut io = BufReader::new(tcp);
        let greeting = self.b.greeting.clone();
        if let Some(line) = greeting.filter(|g| !g.starts_with("220")) {
            let _ = send(&mut io, &line).await;
            return refuse_all(&mut io).await;
        }
        if send(&mut io, "220 sink.test ESMTP test sink")
            .await
            .is_err()
        {
            return;
        }
        let mut s = Session {
            server: self.clone(),
            id,
            tls: false,
            txn: None,
        };
        if !matches!(s.run(&mut io).await, Next::StartTls) {
            return;
        }
        let Some(acceptor) = self.acceptor.clone() else {
            return;
        };
        let Ok(tls) = acceptor.accept(io.into_inner()).await else {
            return;
        };
        self.state.tls(id);
        s.tls = true;
        s.run(&mut BufReader::new(tls)).await;
    }
}

/// After a refusing greeting: 221 to QUIT, 503 to anything else.
async fn refuse_all<S: AsyncRead + AsyncWrite + Unpin>(io: &mut BufReader<S>) {
    let mut line = Vec::new();
    while matches!(io.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
        let quit = line.to_ascii_uppercase().starts_with(b"QUIT");
        let reply = if quit {
            "221 2.0.0 Bye"
        } else {
            "503 5.5.1 No service"
        };
        if send(io, reply).await.is_err() || quit {
            return;
        }
        line.clear();
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    line: &str,
) -> std::io::Result<()> {
    let w = io.get_mut();
    w.write_all(format!("{line}\r\n").as_bytes()).await?;
    w.flush().await
}

struct Session {
    server: Server,
    id: usize,
    tls: bool,
    txn: Option<Txn>,
}

impl Session {
    /// Commands until QUIT, EOF or STARTTLS.
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut BufReader<S>) -> Next {
        loop {
            let mut line = Vec::new();
            match io.read_until(b'\n', &mut line).await {
                Ok(n) if n > 0 => {}
                _ => return Next::Close,
            }
            let pipelined = !io.buffer().is_empty();
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            self.server.state.command(self.id, &text, pipelined);
            match self.command(&text, io).await {
                Next::Continue => {}
                other => return other,
            }
        }
    }

    async fn command<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        text: &str,
        io: &mut BufReader<S>,
    ) -> Next {
        let verb = text.split(' ').next().unwrap_or("").to_ascii_uppercase();
        let reply = match verb.as_str() {
            "EHLO" => self.ehlo(),
            "HELO" => "250 sink.test".to_string(),
            "STARTTLS" => return self.starttls(io).await,
            "MAIL" => self.mail(text),
            "RCPT" => self.rcpt(text),
            "DATA" => return self.data(io).await,
            "RSET" => {
                self.txn = None;
                "250 2.0.0 Ok".to_string()
            }
            "NOOP" => "250 2.0.0 Ok".to_string(),
            "QUIT" => {
                let _ = send(io, "221 2.0.0 Bye").await;
                return Next::Close;
            }
            _ => "500 5.5.1 Command unrecognized".to_string(),
        };
        reply_then(io, &reply, Next::Continue).await
    }

    fn ehlo(&self) -> String {
        let b = &self.server.b;
        let mut lines = vec![
            "sink.test greets you".to_string(),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if b.pipelining {
            lines.push("PIPELINING".to_string());
        }
        if let Some(n) = b.size {
            lines.push(format!("SIZE {n}"));
        }
        if b.smtputf8 {
            lines.push("SMTPUTF8".to_string());
        }
        if !self.tls && (b.cert.is_some() || b.broken_tls) {
            lines.push("STARTTLS".to_string());
        }
        let last = lines.len() - 1;
        let wire: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect();
        wire.join("\r\n")
    }

    async fn starttls<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut BufReader<S>) -> Next {
        let b = &self.server.b;
        if self.tls || (b.cert.is_none() && !b.broken_tls) {
            return reply_then(io, "502 5.5.1 STARTTLS not available", Next::Continue).await;
        }
        if send(io, "220 2.0.0 Ready to start TLS").await.is_err() {
            return Next::Close;
        }
        if b.broken_tls {
            // Wait for the ClientHello, then answer with something that is not TLS.
            let _ = io.fill_buf().await;
            let _ = send(io, "this is not a TLS ServerHello at all").await;
            let _ = io.get_mut().shutdown().await;
            return Next::Close;
        }
        self.txn = None;
        Next::StartTls
    }

    fn mail(&mut self, text: &str) -> String {
        if let Some(reply) = &self.server.b.mail_reply {
            return reply.clone();
        }
        let Some((from, params)) = address(text) else {
            return "501 5.5.4 Syntax: MAIL FROM:<address>".to_string();
        };
        self.txn = Some(Txn {
            from,
            params,
            rcpts: Vec::new(),
        });
        "250 2.1.0 Sender ok".to_string()
    }

    fn rcpt(&mut self, text: &str) -> String {
        let Some(txn) = self.txn.as_mut() else {
            return "503 5.5.1 Need MAIL first".to_string();
        };
        let Some((to, _)) = address(text) else {
            return "501 5.5.4 Syntax: RCPT TO:<address>".to_string();
        };
        let lower = to.to_ascii_lowercase();
        if let Some((_, reply)) = self.server.b.rcpt_replies.iter().find(|(a, _)| *a == lower) {
            return reply.clone();
        }
        txn.rcpts.push(to);
        "250 2.1.5 Recipient ok".to_string()
    }

    async fn data<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut BufReader<S>) -> Next {
        let b = self.server.b.clone();
        if let Some(reply) = &b.data_reply {
            return reply_then(io, reply, Next::Continue).await;
        }
        let Some(txn) = self.txn.take().filter(|t| !t.rcpts.is_empty()) else {
            return reply_then(io, "554 5.5.1 No valid recipients", Next::Continue).await;
        };
        if send(io, "354 End data with <CR><LF>.<CR><LF>")
            .await
            .is_err()
        {
            return Next::Close;
        }
        if b.drop_in_data {
            let _ = io.read_until(b'\n', &mut Vec::new()).await;
            return Next::Close;
        }
        let Some(body) = read_body(io).await else {
            return Next::Close;
        };
        let reply = b
            .end_of_data_reply
            .clone()
            .unwrap_or_else(|| "250 2.0.0 Ok: queued".to_string());
        if reply.starts_with('2') {
            self.server.state.message(Received {
                mail_from: txn.from,
                mail_params: txn.params,
                rcpt_to: txn.rcpts,
                body,
                tls: self.tls,
                session: self.id,
            });
        }
        reply_then(io, &reply, Next::Continue).await
    }
}

async fn reply_then<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    reply: &str,
    next: Next,
) -> Next {
    match send(io, reply).await {
        Ok(()) => next,
        Err(_) => Next::Close,
    }
}

/// The address between `<` and `>` after the colon, and the parameters after it.
fn address(text: &str) -> Option<(String, String)> {
    let (_, rest) = text.split_once(':')?;
    let rest = rest.trim_start().strip_prefix('<')?;
    let (addr, params) = rest.split_once('>')?;
    Some((addr.to_string(), params.trim().to_string()))
}

/// Body lines up to the lone dot, with dot-stuffing removed; `None` at EOF.
async fn read_body<S: AsyncRead + Unpin>(io: &mut BufReader<S>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = Vec::new();
        match io.read_until(b'\n', &mut line).await {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
        if line == b".\r\n" {
            return Some(body);
        }
        let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
        body.extend_from_slice(unstuffed);
    }
}
