//! SQLite store: WAL, synchronous=FULL, group commit.
//!
//! One dedicated writer connection belongs to a writer task. [`Store::insert`] hands the message
//! to that task and waits; the task takes one request, drains whatever else is already waiting
//! (up to `max_batch`), writes them all in one transaction and acknowledges each only after the
//! COMMIT (fsynced, `synchronous = FULL`) returned. Reads go through a small pool; in WAL mode
//! they never wait for the writer.

use std::collections::HashMap;
use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, SqliteExecutor};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::ids::MessageId;

use super::{
    Envelope, QueueError, RecipientStatus, SealedBody, Store, StoredMessage, StoredRecipient,
};

/// How long a connection waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in the read pool.
const READERS: u32 = 4;

/// The embedded store.
pub struct SqliteStore {
    path: PathBuf,
    readers: SqlitePool,
    /// Sender to the writer task; `None` once closed.
    writer: Mutex<Option<mpsc::Sender<InsertRequest>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Sender to the outcome group-commit task; `None` once closed.
    finisher: Mutex<Option<mpsc::Sender<work::FinishRequest>>>,
    finisher_task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Transactions committed by the writer task.
    commits: Arc<AtomicU64>,
}

/// One message waiting for the writer task.
struct InsertRequest {
    envelope: Envelope,
    body: SealedBody,
    done: oneshot::Sender<Result<(), QueueError>>,
}

impl SqliteStore {
    /// Opens (creating) the database, applies migrations, starts the commit task.
    pub async fn open(path: &Path, max_batch: usize) -> Result<SqliteStore, QueueError> {
        prepare_file(path)?;
        let conn = connect_writer(path).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(options(path))
            .await?;
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 2);
        let commits = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run_writer(conn, rx, max_batch, commits.clone()));
        let (finish_tx, finish_rx) = mpsc::channel(256);
        let finisher_task = tokio::spawn(work::run_finisher(readers.clone(), finish_rx));
        Ok(SqliteStore {
            path: path.to_path_buf(),
            readers,
            writer: Mutex::new(Some(tx)),
            task: tokio::sync::Mutex::new(Some(task)),
            finisher: Mutex::new(Some(finish_tx)),
            finisher_task: tokio::sync::Mutex::new(Some(finisher_task)),
            commits,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Group-commit transactions committed so far (messages / commits = average batch).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    fn sender(&self) -> Option<mpsc::Sender<InsertRequest>> {
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Options every connection shares: FULL sync (each COMMIT is fsynced before it returns),
/// foreign keys (recipients cascade with their message), a busy timeout.
fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .foreign_keys(true)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
}

/// The writer connection: creates the database in WAL mode and applies the migrations.
async fn connect_writer(path: &Path) -> Result<SqliteConnection, QueueError> {
    let mut conn = options(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .connect()
        .await?;
    sqlx::migrate!("./migrations/sqlite").run(&mut conn).await?;
    Ok(conn)
}

/// Creates the parent directory (0700) and an empty database file (0600) when missing, so the
/// database and its -wal/-shm files (SQLite copies the mode) are private from the start.
fn prepare_file(path: &Path) -> Result<(), QueueError> {
    let io_err = |p: &Path, source: io::Error| QueueError::Io {
        path: p.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_err(dir, e))?;
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err(path, e)),
        _ => Ok(()),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, envelope: Envelope, body: SealedBody) -> Result<(), QueueError> {
        let writer = self.sender().ok_or(QueueError::Closed)?;
        let (done, acked) = oneshot::channel();
        let request = InsertRequest {
            envelope,
            body,
            done,
        };
        writer.send(request).await.map_err(|_| QueueError::Closed)?;
        drop(writer);
        acked.await.map_err(|_| QueueError::Closed)?
    }

    async fn list(&self) -> Result<Vec<StoredMessage>, QueueError> {
        let mut tx = self.readers.begin().await?;
        let messages = read::all_messages(&mut *tx).await?;
        let recipients = read::all_recipients(&mut *tx).await?;
        tx.commit().await?;
        let mut by_id: HashMap<String, usize> = HashMap::with_capacity(messages.len());
        let mut out = Vec::with_capacity(messages.len());
        for row in messages {
            let message = read::message(row)?;
            by_id.insert(message.id.as_str().to_string(), out.len());
            out.push(message);
        }
        for row in recipients {
            if let Some(&i) = by_id.get(&row.message_id) {
                out[i].recipients.push(read::recipient(row)?);
            }
        }
        Ok(out)
    }

    async fn get(&self, id: &MessageId) -> Result<Option<StoredMessage>, QueueError> {
        let mut tx = self.readers.begin().await?;
        let Some(row) = read::one_message(&mut *tx, id).await? else {
            return Ok(None);
        };
        let recipients = read::recipients_of(&mut *tx, id).await?;
        tx.commit().await?;
        let mut message = read::sealed_message(row)?;
        for row in recipients {
            message.recipients.push(read::recipient(row)?);
        }
        Ok(Some(message))
    }

    async fn claim(
        &self,
        claim: &crate::queue::Claim<'_>,
    ) -> Result<Vec<StoredMessage>, QueueError> {
        // Lease and read in one IMMEDIATE transaction: if reading fails, no lease is left
        // behind to strand the recipients until it runs out.
        let mut conn = self.readers.acquire().await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let ids = work::claim_rows(&mut tx, claim).await?;
        let claimed = work::claimed_messages(&mut tx, &ids).await?;
        tx.commit().await?;
        Ok(claimed)
    }

    async fn release(&self, owner: &str) -> Result<u64, QueueError> {
        Ok(work::release(&self.readers, owner).await?)
    }

    async fn extend(
        &self,
        owner: &str,
        ids: &[i64],
        lease_until: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        Ok(work::extend(&self.readers, owner, ids, &lease_until).await?)
    }

    async fn finish(
        &self,
        owner: Option<&str>,
        now: DateTime<Utc>,
        updates: &[crate::queue::RecipientUpdate],
    ) -> Result<u64, QueueError> {
        let finisher = self
            .finisher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(QueueError::Closed)?;
        let (done, answer) = oneshot::channel();
        let request = work::FinishRequest {
            owner: owner.map(str::to_string),
            now,
            updates: updates.to_vec(),
            done,
        };
        finisher
            .send(request)
            .await
            .map_err(|_| QueueError::Closed)?;
        drop(finisher);
        answer.await.map_err(|_| QueueError::Closed)?
    }

    async fn retry(&self, id: Option<&MessageId>, now: DateTime<Utc>) -> Result<u64, QueueError> {
        Ok(work::retry(&self.readers, id, &now).await?)
    }

    async fn delete(&self, id: &MessageId) -> Result<bool, QueueError> {
        Ok(work::delete(&self.readers, id).await?)
    }

    async fn close(&self) {
        drop(
            self.finisher
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        if let Some(task) = self.finisher_task.lock().await.take() {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "queue finisher task failed");
            }
        }
        drop(
            self.writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        if let Some(task) = self.task.lock().await.take() {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "queue writer task failed");
            }
        }
        self.readers.close().await;
    }
}

/// The writer task: group commit until every sender is gone, then close the connection.
async fn run_writer(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<InsertRequest>,
    max_batch: usize,
    commits: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        if commit_batch(&mut conn, &mut batch).await {
            commits.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the queue writer connection");
    }
}

/// Writes `batch` in one transaction and acknowledges every request with the outcome; true
/// when it committed.
async fn commit_batch(conn: &mut SqliteConnection, batch: &mut Vec<InsertRequest>) -> bool {
    let mut acks = Vec::with_capacity(batch.len());
    let mut rows = Vec::with_capacity(batch.len());
    for request in batch.drain(..) {
        acks.push(request.done);
        rows.push((request.envelope, request.body));
    }
    match write::batch(conn, rows).await {
        Ok(()) => {
            for ack in acks {
                let _ = ack.send(Ok(()));
            }
            true
        }
        Err(e) => {
            let count = acks.len();
            tracing::error!(error = %e, messages = count, "queue group commit failed");
            let shared = Arc::new(e);
            for ack in acks {
                let _ = ack.send(Err(batch_failed(&shared, count)));
            }
            false
        }
    }
}

/// The error every member of a failed group commit receives: `sqlx::Error` cannot be cloned,
/// so they share the original.
fn batch_failed(e: &Arc<sqlx::Error>, count: usize) -> QueueError {
    QueueError::Batch {
        count,
        cause: e.clone(),
    }
}

/// RFC 3339, UTC, microseconds, `Z`: fixed width, so text order is time order.
fn timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_time(id: &str, s: &str) -> Result<DateTime<Utc>, QueueError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| QueueError::Corrupt {
            id: id.to_string(),
            reason: format!("bad time {s:?}: {e}"),
        })
}

mod write;

mod read;
mod work;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, PolicyFile};
    use crate::queue::NewRecipient;

    fn request(id: &MessageId) -> (InsertRequest, oneshot::Receiver<Result<(), QueueError>>) {
        let decision =
            Policy::compile(&PolicyFile::default()).decide(&crate::policy::MessageFacts {
                sender: "a@b.example",
                recipient: "c@d.example",
            });
        let envelope = Envelope {
            id: id.clone(),
            received_at: Utc::now(),
            sender: "a@b.example".to_string(),
            recipients: vec![NewRecipient {
                address: "c@d.example".to_string(),
                domain: "d.example".to_string(),
                decision,
            }],
            client_ip: "127.0.0.1".parse().expect("ip"),
            auth_user: None,
            message_id_header: None,
            size: 3,
            lane: crate::queue::Lane::Transactional,
        };
        let body = SealedBody {
            key_id: "k".to_string(),
            nonce: [1; 12],
            ciphertext: vec![2; 19],
        };
        let (done, rx) = oneshot::channel();
        let request = InsertRequest {
            envelope,
            body,
            done,
        };
        (request, rx)
    }

    #[test]
    fn chunks_cover_every_row_with_few_statement_shapes() {
        for n in 0..200 {
            let sizes = write::chunk_sizes(n);
            assert_eq!(sizes.iter().sum::<usize>(), n);
            assert!(sizes.iter().all(|s| s.is_power_of_two() && *s <= 32));
        }
        assert_eq!(write::chunk_sizes(77), vec![32, 32, 8, 4, 1]);
    }

    #[test]
    fn timestamps_sort_as_text() {
        let early = DateTime::parse_from_rfc3339("2024-01-02T03:04:05Z").expect("time");
        let late = DateTime::parse_from_rfc3339("2024-01-02T03:04:05.000001Z").expect("time");
        let (early, late) = (early.with_timezone(&Utc), late.with_timezone(&Utc));
        assert_eq!(timestamp(&early), "2024-01-02T03:04:05.000000Z");
        assert!(timestamp(&early) < timestamp(&late));
        assert_eq!(parse_time("x", &timestamp(&late)).expect("parse"), late);
    }

    #[tokio::test]
    async fn writer_is_durable_and_a_failed_batch_stores_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.sqlite");
        prepare_file(&path).expect("prepare");
        let mut conn = connect_writer(&path).await.expect("connect");
        let mode = sqlx::query_scalar::<_, String>("PRAGMA journal_mode")
            .fetch_one(&mut conn)
            .await;
        assert_eq!(mode.expect("journal_mode"), "wal");
        let sync = sqlx::query_scalar::<_, i64>("PRAGMA synchronous")
            .fetch_one(&mut conn)
            .await;
        assert_eq!(sync.expect("synchronous"), 2, "synchronous must be FULL");

        // Two requests with the same id: the second violates the primary key, so the whole
        // transaction rolls back and both are refused.
        let id = MessageId::generate();
        let (first, first_rx) = request(&id);
        let (second, second_rx) = request(&id);
        let mut batch = vec![first, second];
        assert!(!commit_batch(&mut conn, &mut batch).await);
        assert!(matches!(
            first_rx.await,
            Ok(Err(QueueError::Batch { count: 2, .. }))
        ));
        assert!(matches!(
            second_rx.await,
            Ok(Err(QueueError::Batch { count: 2, .. }))
        ));
        let count = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages")
            .fetch_one(&mut conn)
            .await;
        assert_eq!(count.expect("count"), 0);

        // The connection is usable again afterwards.
        let (ok, ok_rx) = request(&MessageId::generate());
        assert!(commit_batch(&mut conn, &mut vec![ok]).await);
        assert!(matches!(ok_rx.await, Ok(Ok(()))));
    }
}
