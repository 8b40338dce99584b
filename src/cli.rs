//! The `sealpost` subcommands. Errors surface as `anyhow` here, at the binary's edge only.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use crate::audit::{self, AuditEvent, AuditLog};
use crate::config::{self, ConfigError, Loaded};
use crate::ids::MessageId;
use crate::queue::sqlite::SqliteStore;
use crate::queue::{keys, KeyRing, Queue, StoredMessage};

const DEFAULT_CONFIG: &str = "config/sealpost.toml";

/// sealpost: outbound SMTP relay for protected health information.
#[derive(Debug, Parser)]
#[command(name = "sealpost", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay: accept mail on the configured listeners and queue it durably, encrypted.
    ///
    /// Refuses to start on a configuration that `check` rejects. SIGTERM or SIGINT stop
    /// accepting, let sessions in DATA finish within `server.shutdown_grace`, then exit.
    Serve {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration and the policy file it names; print every problem.
    ///
    /// Each problem shows file, line:column and key path. Exit status 0 when the relay would
    /// start (warnings may still be printed), 1 otherwise.
    Check {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Write a new random 32-byte at-rest key to PATH with mode 0600 (never overwrites).
    Keygen {
        /// Where to write the key, e.g. data/keys/k2.key.
        path: PathBuf,
    },
    /// Read a password from standard input and print its Argon2id hash for `[[auth.user]]`.
    HashPassword,
    /// Inspect the queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG, global = true)]
        config: PathBuf,
    },
    /// Work with the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List queued messages: id, age, sender, recipients and their status.
    List {
        /// One JSON object per message instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make deferred recipients due now: of one message, or of all with --all (audited).
    Retry {
        /// Queue id.
        id: Option<String>,
        /// Every message in the queue.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Fail a message's undelivered recipients now and send the sender a DSN (audited).
    Bounce {
        /// Queue id.
        id: String,
    },
    /// Remove a message from the queue without delivering it or telling the sender (audited).
    Delete {
        /// Queue id.
        id: String,
    },
    /// Show one message: envelope, per-recipient decision and status.
    ///
    /// `--body` decrypts and prints the message itself; that access is recorded in the audit
    /// log as `admin.body_viewed` with the operating-system user.
    Show {
        /// Queue id, as printed by `queue list` or in the 250 reply.
        id: String,
        /// Also print the decrypted message (audited).
        #[arg(long)]
        body: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the whole hash chain; name the first line that was changed, removed or reordered.
    Verify {
        /// Audit log file; defaults to `audit.path` of the configuration.
        path: Option<PathBuf>,
        /// Configuration file (used when PATH is not given).
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// Runs a parsed command; the returned code is the process exit status.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve { config } => serve(&config).await,
        Command::Check { config } => Ok(check(&config)),
        Command::Keygen { path } => {
            keys::keygen(&path)?;
            println!("wrote a new 32-byte key to {} (mode 0600)", path.display());
            Ok(0)
        }
        Command::HashPassword => hash_password(),
        Command::Queue { command, config } => queue(&config, command).await,
        Command::Audit {
            command: AuditCommand::Verify { path, config },
        } => audit_verify(path, &config),
    }
}

/// Loads the config, printing every problem; `None` when it is unusable.
fn load_reporting(path: &Path) -> Option<Loaded> {
    match config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("{w}");
            }
            Some(loaded)
        }
        Err(ConfigError::Invalid(problems)) => {
            for p in &problems {
                eprintln!("{p}");
            }
            let errors = problems
                .iter()
                .filter(|p| p.severity == config::load::Severity::Error)
                .count();
            eprintln!("{}: {errors} error(s); nothing was started", path.display());
            None
        }
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

fn check(path: &Path) -> i32 {
    let Some(loaded) = load_reporting(path) else {
        return 1;
    };
    let c = &loaded.config;
    println!(
        "{}: ok: {} listener(s), {} trusted network(s), {} user(s), policy {} (default mode {}), {} warning(s)",
        path.display(),
        c.listeners.len(),
        c.relay.trusted_networks.len(),
        c.auth.users.len(),
        c.server.policy.display(),
        loaded.policy.defaults.mode.as_str(),
        loaded.warnings.len()
    );
    0
}

async fn serve(path: &Path) -> anyhow::Result<i32> {
    let Some(loaded) = load_reporting(path) else {
        return Ok(1);
    };
    crate::server::serve(loaded, stop_signal(), |addresses| {
        for a in addresses {
            println!("sealpost: listening on {a}");
        }
        let _ = std::io::stdout().flush();
    })
    .await?;
    println!("sealpost: stopped");
    Ok(0)
}

/// Completes on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn hash_password() -> anyhow::Result<i32> {
    eprintln!("password (read from standard input, one line):");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        bail!("empty password");
    }
    let hash = crate::listener::auth::hash_password(password)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    println!("{hash}");
    Ok(0)
}

fn audit_verify(path: Option<PathBuf>, config_path: &Path) -> anyhow::Result<i32> {
    let path = match path {
        Some(p) => p,
        None => {
            let Some(loaded) = load_reporting(config_path) else {
                return Ok(1);
            };
            loaded.config.audit.path
        }
    };
    match audit::verify(&path) {
        Ok(report) => {
            println!(
                "{}: ok: {} record(s), chain head {}",
                path.display(),
                report.lines,
                report.head
            );
            Ok(0)
        }
        Err(e) => {
            println!("{}: FAILED: {e}", path.display());
            Ok(1)
        }
    }
}

async fn queue(config_path: &Path, command: QueueCommand) -> anyhow::Result<i32> {
    let Some(loaded) = load_reporting(config_path) else {
        return Ok(1);
    };
    let cfg = &loaded.config;
    if !cfg.queue.path.exists() {
        bail!(
            "no queue database at {} (has `sealpost serve` run with this config?)",
            cfg.queue.path.display()
        );
    }
    let mut enc = cfg.encryption.clone();
    enc.create_if_missing = false;
    let (keyring, _) = KeyRing::load(&enc).context("loading at-rest keys")?;
    let store = SqliteStore::open(&cfg.queue.path, 1).await?;
    let queue = Queue::new(Arc::new(store), Arc::new(keyring));
    let code = match command {
        QueueCommand::List { json } => {
            // Envelopes name patients' correspondents: reading them is an access to record.
            admin_record(&cfg.audit.path, "list", None, 0).await?;
            queue_list(&queue, json).await?
        }
        QueueCommand::Show { id, body } => {
            let id = MessageId::from_string(id);
            admin_record(&cfg.audit.path, "show", Some(id.clone()), 0).await?;
            queue_show(&queue, &cfg.audit.path, &id, body).await?
        }
        QueueCommand::Retry { id, all } => {
            let id = id.map(MessageId::from_string);
            if id.is_none() && !all {
                bail!("name a queue id, or use --all");
            }
            let n = queue.retry(id.as_ref()).await?;
            admin_record(&cfg.audit.path, "retry", id, n).await?;
            println!("{n} recipient(s) due now");
            0
        }
        QueueCommand::Bounce { id } => {
            queue_bounce(&queue, &loaded, &MessageId::from_string(id)).await?
        }
        QueueCommand::Delete { id } => {
            let id = MessageId::from_string(id);
            let Some(message) = queue.get(&id).await? else {
                eprintln!("no message {id} in the queue");
                return Ok(1);
            };
            let n = message.recipients.len() as u64;
            // Recorded first: a deletion the audit log cannot record does not happen.
            admin_record(&cfg.audit.path, "delete", Some(id.clone()), n).await?;
            queue.delete(&id).await?;
            println!("deleted {id} ({n} recipient(s))");
            0
        }
    };
    queue.close().await;
    Ok(code)
}

async fn queue_list(queue: &Queue, json: bool) -> anyhow::Result<i32> {
    let messages = queue.list().await?;
    if json {
        for m in &messages {
            println!("{}", serde_json::to_string(m)?);
        }
        return Ok(0);
    }
    println!("{:<24}  {:<19}  {:>8}  sender", "id", "received", "size");
    for m in &messages {
        println!(
            "{:<24}  {:<19}  {:>8}  {}",
            m.id,
            m.received_at.format("%Y-%m-%d %H:%M:%S"),
            m.size,
            display_sender(&m.sender),
        );
        for r in &m.recipients {
            let next = r
                .next_attempt
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "-".to_string());
            println!(
                "    {:<40} {:<9} attempts={} next={} {}",
                r.address,
                r.status.as_str(),
                r.attempts,
                next,
                r.last_reply.as_deref().unwrap_or("")
            );
        }
    }
    println!("{} message(s)", messages.len());
    Ok(0)
}

fn display_sender(s: &str) -> &str {
    if s.is_empty() {
        "<>"
    } else {
        s
    }
}

async fn queue_show(
    queue: &Queue,
    audit_path: &Path,
    id: &MessageId,
    with_body: bool,
) -> anyhow::Result<i32> {
    let Some(message) = queue.get(id).await? else {
        eprintln!("no message {id} in the queue");
        return Ok(1);
    };
    print_message(&message);
    if with_body {
        let body = queue.open_body(&message)?;
        let log = AuditLog::open(audit_path).await?;
        log.record(AuditEvent::AdminBodyViewed {
            queue_id: id.clone(),
            os_user: os_user(),
        })
        .await?;
        log.close().await;
        println!("--- message (decrypted; this access was audited) ---");
        std::io::stdout().write_all(&body)?;
    }
    Ok(0)
}

/// Fails the open recipients of a message and queues a DSN to its sender.
async fn queue_bounce(queue: &Queue, loaded: &Loaded, id: &MessageId) -> anyhow::Result<i32> {
    use crate::delivery::dsn::{Action, Reported};
    use crate::delivery::notify::Notifier;
    use crate::queue::{RecipientStatus, RecipientUpdate};
    let Some(message) = queue.get(id).await? else {
        eprintln!("no message {id} in the queue");
        return Ok(1);
    };
    let open: Vec<_> = message
        .recipients
        .iter()
        .filter(|r| {
            matches!(
                r.status,
                RecipientStatus::Queued | RecipientStatus::Deferred
            )
        })
        .collect();
    if open.is_empty() {
        println!("{id}: no undelivered recipients; nothing to bounce");
        return Ok(0);
    }
    let user = os_user();
    let reason = format!("bounced by the administrator ({user})");
    // One row at a time: a recipient a worker is delivering right now keeps its lease and
    // is not bounced.
    let mut bounced = Vec::new();
    for r in open {
        let update = RecipientUpdate {
            id: r.id,
            status: RecipientStatus::Failed,
            next_attempt: None,
            last_reply: Some(format!("5.0.0 {reason}")),
            attempted: false,
            warned: false,
        };
        match queue.finish(None, std::slice::from_ref(&update)).await? {
            0 => eprintln!("{}: being delivered right now; not bounced", r.address),
            _ => bounced.push(r),
        }
    }
    let open = bounced;
    if open.is_empty() {
        println!("{id}: nothing bounced");
        return Ok(1);
    }
    let cfg = &loaded.config;
    let log = AuditLog::open(&cfg.audit.path).await?;
    log.record(AuditEvent::AdminQueue {
        action: "bounce".to_string(),
        queue_id: Some(id.clone()),
        recipients: open.len() as u64,
        os_user: user,
    })
    .await?;
    let mut reported = Vec::new();
    for r in &open {
        log.record(AuditEvent::DeliveryFailed {
            queue_id: id.clone(),
            recipient: r.address.clone(),
            enhanced: "5.0.0".to_string(),
            reason: reason.clone(),
        })
        .await?;
        reported.push(Reported {
            address: r.address.clone(),
            action: Action::Failed,
            status: "5.0.0".to_string(),
            remote_mta: None,
            diagnostic: Some(reason.clone()),
        });
    }
    let policy = crate::policy::Policy::compile(&loaded.policy);
    let reporting = cfg
        .delivery
        .helo_name
        .as_deref()
        .unwrap_or(&cfg.server.hostname);
    let notifier = Notifier {
        queue,
        audit: &log,
        policy: &policy,
        reporting_mta: reporting,
    };
    match notifier.send(&message, &reported).await {
        Some(dsn) => println!(
            "{id}: {} recipient(s) failed; DSN {dsn} queued to <{}>",
            open.len(),
            message.sender
        ),
        None if message.sender.is_empty() => println!(
            "{id}: {} recipient(s) failed; no DSN (the message came from the null sender)",
            open.len()
        ),
        None => eprintln!(
            "{id}: {} recipient(s) failed; the DSN could not be queued (see the log above)",
            open.len()
        ),
    }
    log.close().await;
    Ok(0)
}

/// Records an admin queue action with the OS user.
async fn admin_record(
    audit_path: &Path,
    action: &str,
    queue_id: Option<MessageId>,
    recipients: u64,
) -> anyhow::Result<()> {
    let log = AuditLog::open(audit_path).await?;
    log.record(AuditEvent::AdminQueue {
        action: action.to_string(),
        queue_id,
        recipients,
        os_user: os_user(),
    })
    .await?;
    log.close().await;
    Ok(())
}

fn print_message(m: &StoredMessage) {
    println!("id:          {}", m.id);
    println!("received:    {}", m.received_at.to_rfc3339());
    println!("sender:      <{}>", m.sender);
    println!("client ip:   {}", m.client_ip);
    println!("auth user:   {}", m.auth_user.as_deref().unwrap_or("-"));
    println!(
        "message-id:  {}",
        m.message_id_header.as_deref().unwrap_or("-")
    );
    println!(
        "size:        {} bytes (sealed with key {})",
        m.size, m.key_id
    );
    for r in &m.recipients {
        println!(
            "recipient:   <{}> status={} mode={} rule={} attempts={} last_reply={}",
            r.address,
            r.status.as_str(),
            r.decision.mode.as_str(),
            r.decision.rule,
            r.attempts,
            r.last_reply.as_deref().unwrap_or("-")
        );
    }
}

/// The operating-system user running the command, for admin audit records.
pub fn os_user() -> String {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let name = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".to_string());
    format!("{name} (uid {uid})")
}
