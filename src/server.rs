//! `sealpost serve`: open the keys, audit log and queue, bind the listeners, run until told to
//! stop, then drain.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use crate::audit::{AuditError, AuditEvent, AuditLog};
use crate::config::Loaded;
use crate::delivery::tls::TlsClients;
use crate::delivery::{Deliverer, Parts};
use crate::dns::Dns;
use crate::listener::{self, auth, tls, Context, Listeners};
use crate::policy::Policy;
use crate::queue::sqlite::SqliteStore;
use crate::queue::{KeyError, KeyRing, Queue, QueueError};
use crate::shutdown::Shutdown;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    #[error("outbound TLS: {0}")]
    TlsClient(String),
    #[error("delivery routes: {0}")]
    Routes(String),
}

/// Runs the relay until `stop` completes. `on_ready` receives the bound addresses (tests and
/// the CLI print them; port 0 in the config picks free ports).
pub async fn serve(
    loaded: Loaded,
    stop: impl Future<Output = ()>,
    on_ready: impl FnOnce(&[String]),
) -> Result<(), ServeError> {
    let cfg = &loaded.config;
    tls::install_crypto_provider();
    create_dir(&cfg.server.data_dir)?;
    for path in [&cfg.queue.path, &cfg.audit.path] {
        if let Some(parent) = path.parent() {
            create_dir(parent)?;
        }
    }
    let (keys, created) = KeyRing::load(&cfg.encryption)?;
    let audit = AuditLog::open(&cfg.audit.path).await?;
    for (key_id, path) in created {
        audit
            .record(AuditEvent::KeyCreated {
                key_id,
                path: path.display().to_string(),
            })
            .await?;
    }
    let store = SqliteStore::open(&cfg.queue.path, cfg.queue.max_batch).await?;
    let queue = Queue::new(Arc::new(store), Arc::new(keys));
    let acceptor = tls::acceptor(&cfg.tls, &cfg.server.hostname)?;
    let listeners = Listeners::bind(&cfg.listeners, acceptor.is_some()).await?;
    let addresses = listeners.addresses();
    let deliverer = deliverer(&loaded, queue.clone(), audit.clone())?;
    audit
        .record(AuditEvent::ServiceStarted {
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_sha256: loaded.config_sha256.clone(),
            policy_sha256: loaded.policy_sha256.clone(),
            listeners: addresses.clone(),
        })
        .await?;
    let ctx = Arc::new(Context {
        hostname: cfg.server.hostname.clone(),
        limits: cfg.limits.clone(),
        tls: acceptor,
        trusted: cfg.relay.trusted_networks.clone(),
        users: auth::Users::new(&cfg.auth.users),
        throttle: auth::Throttle::new(cfg.auth.max_failures, cfg.auth.lockout),
        policy: Policy::compile(&loaded.policy),
        queue: queue.clone(),
        audit: audit.clone(),
    });
    let shutdown = Shutdown::new();
    let accepting = tokio::spawn(listeners.run(ctx, shutdown.signal(), shutdown.guard()));
    let grace = cfg.server.shutdown_grace;
    let delivering = match cfg.delivery.enabled {
        true => Some(tokio::spawn(deliverer.run(shutdown.signal(), grace))),
        false => {
            tracing::warn!("delivery is disabled ([delivery] enabled = false): mail stays queued");
            None
        }
    };
    on_ready(&addresses);
    stop.await;
    tracing::info!("shutting down: no new connections; waiting for sessions in DATA");
    let drained = shutdown.drain(cfg.server.shutdown_grace).await;
    accepting.abort();
    if let Some(Err(e)) = match delivering {
        Some(task) => Some(task.await),
        None => None,
    } {
        tracing::error!(error = %e, "the delivery loop ended abnormally");
    }
    // Close the queue first: a session still running after the grace period can no longer
    // have a message acknowledged (it gets 451), so nothing unacknowledged is kept and nothing
    // acknowledged is lost. Then the last audit record.
    queue.close().await;
    let reason = if drained {
        "signal; all sessions finished"
    } else {
        "signal; grace period over, unfinished sessions cut off without acknowledgement"
    };
    let stopped = audit
        .record(AuditEvent::ServiceStopped {
            reason: reason.to_string(),
        })
        .await;
    audit.close().await;
    stopped?;
    Ok(())
}

/// The delivery side: resolver, outbound TLS, routes.
fn deliverer(loaded: &Loaded, queue: Queue, audit: AuditLog) -> Result<Arc<Deliverer>, ServeError> {
    let cfg = &loaded.config;
    let testing = cfg.testing.clone().unwrap_or_default();
    let tls = TlsClients::new(&testing.extra_roots).map_err(ServeError::TlsClient)?;
    let parts = Parts {
        queue,
        audit,
        dns: Dns::new(&cfg.dns)?,
        tls,
        policy: Policy::compile(&loaded.policy),
        cfg: cfg.delivery.clone(),
        hostname: cfg.server.hostname.clone(),
        mx_port: testing.mx_port.unwrap_or(25),
    };
    Deliverer::new(parts).map_err(|errors| {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        ServeError::Routes(text.join("; "))
    })
}

/// Creates a directory (and parents) readable only by the service user.
fn create_dir(path: &Path) -> Result<(), ServeError> {
    if path.as_os_str().is_empty() || path.exists() {
        return Ok(());
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| ServeError::DataDir {
            path: path.display().to_string(),
            source,
        })
}
