//! A recording SMTP sink: a small SMTP server started inside a test on a loopback address, with
//! configurable misbehaviour. It records every accepted message (envelope and un-dot-stuffed
//! body), every connection and command, and whether each session used TLS; tests await counts
//! through a watch channel instead of sleeping.
//!
//! ```ignore
//! let ca = TestCa::new();
//! let sink = Sink::builder().starttls(&ca, "mx1.test").pipelining().start_on("127.0.0.2:0").await;
//! let other = Sink::builder().reject_rcpt("nobody@b.test")
//!     .start_on(format!("127.0.0.3:{}", sink.port())).await;
//! let got = sink.wait_messages(1).await;
//! ```

mod certs;
mod session;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use certs::{SinkCert, TestCa};
use session::Server;

/// Longest a `wait_*` call waits before failing the test (a guard, not a delay).
const WAIT: Duration = Duration::from_secs(60);

/// One accepted message.
#[derive(Debug, Clone)]
pub struct Received {
    /// Address between the brackets of MAIL FROM (empty for `<>`).
    pub mail_from: String,
    /// MAIL FROM parameters after the address (`SIZE=… BODY=8BITMIME`).
    pub mail_params: String,
    /// Accepted RCPT TO addresses, in order.
    pub rcpt_to: Vec<String>,
    /// The body as the client meant it: dot-stuffing removed, final CRLF kept, `.` line not.
    pub body: Vec<u8>,
    /// The session used TLS.
    pub tls: bool,
    /// Index of the session in [`Sink::sessions`].
    pub session: usize,
}

/// One connection.
#[derive(Debug, Clone, Default)]
pub struct SessionLog {
    /// STARTTLS completed.
    pub tls: bool,
    /// Every command line received, without CRLF (body lines are not commands).
    pub commands: Vec<String>,
    /// Some command arrived with more input already buffered behind it (the client pipelined).
    pub pipelined: bool,
}

/// Counters the `wait_*` calls watch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub connections: usize,
    pub messages: usize,
}

#[derive(Default)]
struct Log {
    messages: Vec<Received>,
    sessions: Vec<SessionLog>,
}

struct State {
    log: Mutex<Log>,
    counts: watch::Sender<Counts>,
}

impl State {
    fn new_session(&self) -> usize {
        let mut log = self.log.lock().unwrap();
        log.sessions.push(SessionLog::default());
        self.counts.send_modify(|c| c.connections += 1);
        log.sessions.len() - 1
    }

    fn command(&self, id: usize, line: &str, pipelined: bool) {
        let mut log = self.log.lock().unwrap();
        let session = &mut log.sessions[id];
        session.commands.push(line.to_string());
        session.pipelined |= pipelined;
    }

    fn tls(&self, id: usize) {
        self.log.lock().unwrap().sessions[id].tls = true;
    }

    fn message(&self, message: Received) {
        self.log.lock().unwrap().messages.push(message);
        self.counts.send_modify(|c| c.messages += 1);
    }
}

/// How a sink behaves; built with [`Sink::builder`].
#[derive(Clone, Default)]
struct Behaviour {
    greeting: Option<String>,
    cert: Option<SinkCert>,
    tls12_only: bool,
    broken_tls: bool,
    pipelining: bool,
    size: Option<u64>,
    smtputf8: bool,
    mail_reply: Option<String>,
    data_reply: Option<String>,
    end_of_data_reply: Option<String>,
    rcpt_replies: Vec<(String, String)>,
    drop_in_data: bool,
    hang: bool,
}

/// Builder for a sink that misbehaves in chosen ways. Replies are whole lines without CRLF,
/// e.g. `"451 4.3.0 Try again later"`.
#[derive(Clone, Default)]
pub struct SinkBuilder {
    b: Behaviour,
}

impl SinkBuilder {
    /// Advertise STARTTLS with a certificate for `name` issued by `ca`.
    pub fn starttls(self, ca: &TestCa, name: &str) -> Self {
        self.certificate(ca.issue(&[name]))
    }

    /// Advertise STARTTLS with this certificate (e.g. [`SinkCert::self_signed`]).
    pub fn certificate(mut self, cert: SinkCert) -> Self {
        self.b.cert = Some(cert);
        self
    }

    /// Offer only TLS 1.2 (needs a certificate).
    pub fn tls12_only(mut self) -> Self {
        self.b.tls12_only = true;
        self
    }

    /// Advertise STARTTLS, answer it with 220, then send garbage instead of a handshake and close.
    pub fn broken_tls(mut self) -> Self {
        self.b.broken_tls = true;
        self
    }

    pub fn pipelining(mut self) -> Self {
        self.b.pipelining = true;
        self
    }

    /// Advertise `SIZE n`.
    pub fn size(mut self, n: u64) -> Self {
        self.b.size = Some(n);
        self
    }

    pub fn smtputf8(mut self) -> Self {
        self.b.smtputf8 = true;
        self
    }

    /// Greet with this line instead of 220 (e.g. `"421 4.3.2 Busy"`), then answer only QUIT.
    pub fn greeting(mut self, line: &str) -> Self {
        self.b.greeting = Some(line.to_string());
        self
    }

    /// Answer every MAIL with this line.
    pub fn mail_reply(mut self, line: &str) -> Self {
        self.b.mail_reply = Some(line.to_string());
        self
    }

    /// Answer every DATA command with this line (instead of 354).
    pub fn data_reply(mut self, line: &str) -> Self {
        self.b.data_reply = Some(line.to_string());
        self
    }

    /// Answer the final dot with this line; the message is recorded only for a 2xx.
    pub fn end_of_data_reply(mut self, line: &str) -> Self {
        self.b.end_of_data_reply = Some(line.to_string());
        self
    }

    /// Refuse RCPT TO:<addr> with `550 5.1.1 No such user`.
    pub fn reject_rcpt(self, addr: &str) -> Self {
        self.rcpt_reply(addr, "550 5.1.1 No such user here")
    }

    /// Answer RCPT TO:<addr> with this line.
    pub fn rcpt_reply(mut self, addr: &str, line: &str) -> Self {
        self.b
            .rcpt_replies
            .push((addr.to_ascii_lowercase(), line.to_string()));
        self
    }

    /// Close the connection after the first body line, without a reply.
    pub fn drop_in_data(mut self) -> Self {
        self.b.drop_in_data = true;
        self
    }

    /// Accept connections and never send a byte.
    pub fn hang(mut self) -> Self {
        self.b.hang = true;
        self
    }

    /// Binds `addr` (`"127.0.0.2:0"`, `format!("127.0.0.3:{port}")`) and starts serving.
    pub async fn start_on<A: ToSocketAddrs>(self, addr: A) -> Sink {
        let listener = TcpListener::bind(addr).await.expect("sink binds");
        let addr = listener.local_addr().unwrap();
        let acceptor = self
            .b
            .cert
            .as_ref()
            .map(|c| certs::acceptor(c, self.b.tls12_only));
        let state = Arc::new(State {
            log: Mutex::new(Log::default()),
            counts: watch::channel(Counts::default()).0,
        });
        let server = Server {
            b: Arc::new(self.b),
            acceptor,
            state: state.clone(),
        };
        let task = tokio::spawn(server.accept_loop(listener));
        Sink { addr, state, task }
    }
}

/// A running sink; stops (closing every session) when dropped.
pub struct Sink {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Sink {
    pub fn builder() -> SinkBuilder {
        SinkBuilder::default()
    }

    /// A well-behaved sink (no STARTTLS, no PIPELINING) on `addr`.
    pub async fn start_on<A: ToSocketAddrs>(addr: A) -> Sink {
        Sink::builder().start_on(addr).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Accepted messages so far.
    pub fn messages(&self) -> Vec<Received> {
        self.state.log.lock().unwrap().messages.clone()
    }

    pub fn sessions(&self) -> Vec<SessionLog> {
        self.state.log.lock().unwrap().sessions.clone()
    }

    pub fn connections(&self) -> usize {
        self.state.counts.borrow().connections
    }

    /// Every command of every session, in order.
    pub fn commands(&self) -> Vec<String> {
        let log = self.state.log.lock().unwrap();
        log.sessions
            .iter()
            .flat_map(|s| s.commands.iter().cloned())
            .collect()
    }

    /// Waits until at least `n` messages were accepted; returns all of them.
    pub async fn wait_messages(&self, n: usize) -> Vec<Received> {
        self.wait(|c| c.messages >= n, "messages").await;
        self.messages()
    }

    /// Waits until at least `n` connections were accepted.
    pub async fn wait_connections(&self, n: usize) {
        self.wait(|c| c.connections >= n, "connections").await;
    }

    async fn wait(&self, done: impl FnMut(&Counts) -> bool, what: &str) {
        let mut rx = self.state.counts.subscribe();
        let waited = tokio::time::timeout(WAIT, async { rx.wait_for(done).await.map(|_| ()) });
        match waited.await {
            Ok(Ok(())) => {}
            _ => panic!(
                "sink {}: not enough {what} within {WAIT:?}: {:?}",
                self.addr,
                *self.state.counts.borrow()
            ),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
