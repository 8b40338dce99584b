//! Accept loop and SMTP sessions.
//!
//! A [`Listeners`] owns the bound sockets; each accepted connection gets a task running one
//! [`session::Session`]. A semaphore caps connections in total, a per-IP counter caps each
//! client, and every task holds a [`DrainGuard`] so shutdown can wait for sessions to finish.

pub mod auth;
mod data;
pub mod io;
mod sasl;
pub mod session;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::audit::{AuditEvent, AuditLog};
use crate::config::{self, ListenerKind};
use crate::policy::Policy;
use crate::queue::Queue;
use crate::shutdown::{DrainGuard, Signal};
use crate::smtp::{replies, Reply};

pub use io::Conn;
use session::{Next, Session};
use tls::TlsInfo;

/// Everything a session needs, shared by all sessions.
pub struct Context {
    pub hostname: String,
    pub limits: config::Limits,
    pub tls: Option<TlsAcceptor>,
    pub trusted: Vec<IpNet>,
    pub users: auth::Users,
    pub throttle: auth::Throttle,
    pub policy: Policy,
    pub queue: Queue,
    pub audit: AuditLog,
}

/// Errors binding listeners.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {0} is `implicit-tls` but no TLS certificate is configured")]
    NoTls(SocketAddr),
}

/// One bound listener.
struct Bound {
    socket: TcpListener,
    kind: ListenerKind,
    starttls: bool,
    local: SocketAddr,
}

/// The bound listeners, ready to accept.
pub struct Listeners {
    bound: Vec<Bound>,
}

impl Listeners {
    /// Binds every configured listener (port 0 picks a free port; see [`Listeners::addresses`]).
    pub async fn bind(configs: &[config::Listener], tls: bool) -> Result<Listeners, ListenError> {
        let mut bound = Vec::new();
        for cfg in configs {
            if cfg.kind == ListenerKind::ImplicitTls && !tls {
                return Err(ListenError::NoTls(cfg.address));
            }
            let err = |source| ListenError::Bind {
                address: cfg.address,
                source,
            };
            let socket = TcpListener::bind(cfg.address).await.map_err(err)?;
            let local = socket.local_addr().map_err(err)?;
            bound.push(Bound {
                socket,
                kind: cfg.kind,
                starttls: cfg.starttls,
                local,
            });
        }
        Ok(Listeners { bound })
    }

    /// The bound addresses with their kinds, e.g. `127.0.0.1:2525 (smtp)`.
    pub fn addresses(&self) -> Vec<String> {
        self.bound
            .iter()
            .map(|b| {
                let kind = match b.kind {
                    ListenerKind::Smtp => "smtp",
                    ListenerKind::ImplicitTls => "implicit-tls",
                };
                format!("{} ({kind})", b.local)
            })
            .collect()
    }

    /// Accepts on every listener until shutdown is signalled.
    /// Every session holds a clone of `guard`; sessions waiting for a command are told to stop
    /// by `signal`, sessions in DATA finish their message first.
    pub async fn run(self, ctx: Arc<Context>, signal: Signal, guard: DrainGuard) {
        let limits = Arc::new(ConnLimits::new(&ctx.limits));
        let mut tasks = tokio::task::JoinSet::new();
        for bound in self.bound {
            let accept = AcceptLoop {
                ctx: ctx.clone(),
                limits: limits.clone(),
                guard: guard.clone(),
                signal: signal.clone(),
            };
            tasks.spawn(accept.run(bound));
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Total and per-IP connection caps.
struct ConnLimits {
    total: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    per_ip_max: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Releases a per-IP slot when the session ends.
struct IpSlot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.limits.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl ConnLimits {
    fn new(limits: &config::Limits) -> ConnLimits {
        ConnLimits {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
            per_ip_max: limits.max_connections_per_ip,
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    fn take_ip(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            limits: self.clone(),
            ip,
        })
    }
}

struct AcceptLoop {
    ctx: Arc<Context>,
    limits: Arc<ConnLimits>,
    guard: DrainGuard,
    signal: Signal,
}

impl AcceptLoop {
    async fn run(mut self, bound: Bound) {
        loop {
            let accepted = tokio::select! {
                r = bound.socket.accept() => r,
                _ = self.signal.recv() => return,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // An IPv4 client on a dual-stack `[::]` listener appears as `::ffff:a.b.c.d`; limits,
            // trusted networks and the audit log all see the plain IPv4 address.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            self.spawn(stream, peer, &bound);
        }
    }

    fn spawn(&self, stream: TcpStream, peer: SocketAddr, bound: &Bound) {
        let permit = self.limits.total.clone().try_acquire_owned().ok();
        let slot = permit.as_ref().and_then(|_| self.limits.take_ip(peer.ip()));
        let (permit, slot) = match (permit, slot) {
            (Some(permit), Some(slot)) if !self.ctx.throttle.is_locked(peer.ip()) => (permit, slot),
            (permit, slot) => {
                let reply = match (permit, slot) {
                    (None, _) => replies::TOO_MANY_CONNECTIONS,
                    (Some(_), None) => replies::TOO_MANY_FROM_IP,
                    (Some(_), Some(_)) => replies::AUTH_LOCKED,
                };
                self.refuse(stream, bound.kind, reply);
                return;
            }
        };
        let handler = Handler {
            ctx: self.ctx.clone(),
            signal: self.signal.clone(),
            _guard: self.guard.clone(),
            peer,
            kind: bound.kind,
            starttls: bound.starttls,
            listener: bound.local,
        };
        tokio::spawn(async move {
            handler.run(stream).await;
            drop((slot, permit));
        });
    }

    /// Refuses a connection without holding any session slot; when too many refusals are
    /// already in flight the connection is simply closed.
    fn refuse(&self, stream: TcpStream, kind: ListenerKind, reply: Reply) {
        let Ok(permit) = self.limits.refusals.clone().try_acquire_owned() else {
            return;
        };
        let tls = match kind {
            ListenerKind::ImplicitTls => self.ctx.tls.clone(),
            ListenerKind::Smtp => None,
        };
        tokio::spawn(async move {
            refuse(stream, tls, reply).await;
            drop(permit);
        });
    }
}

/// Sends a 421 and closes; on an implicit-TLS listener the reply goes inside TLS (RFC 8314
/// §3.3), so the client sees a temporary refusal rather than a broken handshake.
async fn refuse(stream: TcpStream, tls: Option<TlsAcceptor>, reply: Reply) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let send = async {
        match tls {
            Some(acceptor) => {
                if let Ok(tls) = acceptor.accept(stream).await {
                    write_and_close(tls, &out).await;
                }
            }
            None => write_and_close(stream, &out).await,
        }
    };
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, send).await;
}

/// How long a refused client gets to receive its 421.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Refusals (421 replies to connections over a limit) in flight at once.
const MAX_REFUSALS: usize = 64;

async fn write_and_close<S: tokio::io::AsyncWrite + Unpin>(mut stream: S, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    if stream.write_all(bytes).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

/// One connection.
struct Handler {
    ctx: Arc<Context>,
    signal: Signal,
    _guard: DrainGuard,
    peer: SocketAddr,
    kind: ListenerKind,
    starttls: bool,
    listener: SocketAddr,
}

impl Handler {
    async fn run(mut self, stream: TcpStream) {
        let mut session = Session::new(self.ctx.clone(), self.peer, self.starttls);
        self.record(AuditEvent::SessionConnected {
            session: session.id(),
            client_ip: self.peer.ip(),
            client_port: self.peer.port(),
            listener: self.listener.to_string(),
        })
        .await;
        if self.kind == ListenerKind::ImplicitTls {
            if let Some(mut conn) = self.handshake(&mut session, stream).await {
                conn.reply(&session.greeting());
                session.command_loop(&mut conn, &mut self.signal).await;
            }
            return;
        }
        let mut conn = Conn::new(stream, self.ctx.limits.command_timeout);
        conn.reply(&session.greeting());
        if let Next::StartTls = session.command_loop(&mut conn, &mut self.signal).await {
            if conn.flush().await.is_err() {
                return;
            }
            if let Some(mut tls) = self.handshake(&mut session, conn.into_stream()).await {
                session.command_loop(&mut tls, &mut self.signal).await;
            }
        }
    }

    /// Runs the TLS handshake (bounded by the command timeout) and records `session.tls`.
    async fn handshake(
        &self,
        session: &mut Session,
        stream: TcpStream,
    ) -> Option<Conn<tokio_rustls::server::TlsStream<TcpStream>>> {
        let acceptor = self.ctx.tls.clone()?;
        let timeout = self.ctx.limits.command_timeout;
        let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(peer = %self.peer, error = %e, "inbound TLS handshake failed");
                return None;
            }
            Err(_) => return None,
        };
        let info = TlsInfo::of(tls.get_ref().1);
        self.record(AuditEvent::SessionTls {
            session: session.id(),
            client_ip: self.peer.ip(),
            version: info.version.clone(),
            cipher: info.cipher.clone(),
        })
        .await;
        session.tls_established(info);
        Some(Conn::new(tls, self.ctx.limits.command_timeout))
    }

    async fn record(&self, event: AuditEvent) {
        if let Err(e) = self.ctx.audit.record(event).await {
            tracing::error!(error = %e, "audit record failed");
        }
    }
}
