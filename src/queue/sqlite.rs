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
        Ok(SqliteStore {
            path: path.to_path_buf(),
            readers,
            writer: Mutex::new(Some(tx)),
            task: tokio::sync::Mutex::new(Some(task)),
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

    async fn close(&self) {
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
/// so each gets a wrapper sharing the original.
fn batch_failed(e: &Arc<sqlx::Error>, count: usize) -> QueueError {
    QueueError::Database(sqlx::Error::Io(io::Error::other(BatchFailed {
        count,
        cause: e.clone(),
    })))
}

/// A group commit that failed; none of its messages were stored.
#[derive(Debug, thiserror::Error)]
#[error("transaction of {count} messages rolled back, none stored: {cause}")]
struct BatchFailed {
    count: usize,
    cause: Arc<sqlx::Error>,
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

mod write {
    use sqlx::query::Query;
    use sqlx::sqlite::{Sqlite, SqliteArguments};

    use super::*;

    /// Most rows in one multi-row INSERT (a power of two; see [`chunk_sizes`]).
    const ROWS_PER_STATEMENT: usize = 32;

    const MESSAGE_INSERT: &str = "INSERT INTO messages (id, received_at, sender, client_ip, \
        auth_user, message_id_header, size, key_id, nonce, body) VALUES ";
    const MESSAGE_VALUES: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    const RECIPIENT_INSERT: &str = "INSERT INTO recipients (message_id, address, domain, \
        decision, status, attempts, next_attempt) VALUES ";
    const RECIPIENT_VALUES: &str = "(?, ?, ?, ?, 'queued', 0, ?)";

    type Insert<'q> = Query<'q, Sqlite, SqliteArguments<'q>>;

    /// A recipient row, ready to bind.
    struct Recipient {
        message_id: String,
        address: String,
        domain: String,
        decision: String,
        next_attempt: String,
    }

    /// Inserts all rows in one `BEGIN IMMEDIATE` transaction; rolled back on any error.
    pub(super) async fn batch(
        conn: &mut SqliteConnection,
        rows: Vec<(Envelope, SealedBody)>,
    ) -> Result<(), sqlx::Error> {
        let recipients = recipient_rows(&rows)?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        messages(&mut tx, rows).await?;
        recipient_inserts(&mut tx, recipients).await?;
        tx.commit().await
    }

    /// Multi-row INSERTs of the message rows; bodies are moved into the statement, not copied.
    async fn messages(
        conn: &mut SqliteConnection,
        rows: Vec<(Envelope, SealedBody)>,
    ) -> Result<(), sqlx::Error> {
        let mut rows = rows.into_iter();
        for size in chunk_sizes(rows.len()) {
            let sql = values_sql(MESSAGE_INSERT, MESSAGE_VALUES, size);
            let mut query = sqlx::query(&sql);
            for (envelope, body) in rows.by_ref().take(size) {
                query = bind_message(query, envelope, body);
            }
            query.execute(&mut *conn).await?;
        }
        Ok(())
    }

    fn bind_message(query: Insert<'_>, envelope: Envelope, body: SealedBody) -> Insert<'_> {
        query
            .bind(String::from(envelope.id.as_str()))
            .bind(timestamp(&envelope.received_at))
            .bind(envelope.sender)
            .bind(envelope.client_ip.to_string())
            .bind(envelope.auth_user)
            .bind(envelope.message_id_header)
            .bind(i64::try_from(envelope.size).unwrap_or(i64::MAX))
            .bind(body.key_id)
            .bind(body.nonce.to_vec())
            .bind(body.ciphertext)
    }

    /// Every recipient of the batch: status `queued`, due at once (`next_attempt = received_at`).
    fn recipient_rows(rows: &[(Envelope, SealedBody)]) -> Result<Vec<Recipient>, sqlx::Error> {
        let mut out = Vec::with_capacity(rows.iter().map(|(e, _)| e.recipients.len()).sum());
        for (envelope, _) in rows {
            let received = timestamp(&envelope.received_at);
            for r in &envelope.recipients {
                out.push(Recipient {
                    message_id: envelope.id.as_str().to_string(),
                    address: r.address.clone(),
                    domain: r.domain.clone(),
                    decision: serde_json::to_string(&r.decision)
                        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
                    next_attempt: received.clone(),
                });
            }
        }
        Ok(out)
    }

    async fn recipient_inserts(
        conn: &mut SqliteConnection,
        rows: Vec<Recipient>,
    ) -> Result<(), sqlx::Error> {
        let mut rows = rows.into_iter();
        for size in chunk_sizes(rows.len()) {
            let sql = values_sql(RECIPIENT_INSERT, RECIPIENT_VALUES, size);
            let mut query = sqlx::query(&sql);
            for r in rows.by_ref().take(size) {
                query = query
                    .bind(r.message_id)
                    .bind(r.address)
                    .bind(r.domain)
                    .bind(r.decision)
                    .bind(r.next_attempt);
            }
            query.execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Splits `n` rows into statements of power-of-two sizes up to [`ROWS_PER_STATEMENT`], so
    /// only a handful of distinct statements is ever prepared (and they stay cached).
    pub(super) fn chunk_sizes(mut n: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        while n > 0 {
            let size = if n >= ROWS_PER_STATEMENT {
                ROWS_PER_STATEMENT
            } else {
                1 << n.ilog2()
            };
            sizes.push(size);
            n -= size;
        }
        sizes
    }

    fn values_sql(head: &str, row: &str, rows: usize) -> String {
        let mut sql = String::with_capacity(head.len() + rows * (row.len() + 2));
        sql.push_str(head);
        for i in 0..rows {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(row);
        }
        sql
    }
}

mod read {
    use super::*;

    /// The envelope columns of `messages`.
    #[derive(sqlx::FromRow)]
    pub(super) struct MessageRow {
        id: String,
        received_at: String,
        sender: String,
        client_ip: String,
        auth_user: Option<String>,
        message_id_header: Option<String>,
        size: i64,
        key_id: String,
    }

    /// A message row with its sealed body.
    #[derive(sqlx::FromRow)]
    pub(super) struct SealedRow {
        #[sqlx(flatten)]
        pub(super) envelope: MessageRow,
        nonce: Vec<u8>,
        body: Vec<u8>,
    }

    #[derive(sqlx::FromRow)]
    pub(super) struct RecipientRow {
        pub(super) message_id: String,
        address: String,
        domain: String,
        decision: String,
        status: String,
        attempts: i64,
        next_attempt: Option<String>,
        last_reply: Option<String>,
    }

    const MESSAGE_COLUMNS: &str =
        "id, received_at, sender, client_ip, auth_user, message_id_header, size, key_id";
    const RECIPIENT_COLUMNS: &str =
        "message_id, address, domain, decision, status, attempts, next_attempt, last_reply";

    pub(super) async fn all_messages(
        conn: impl SqliteExecutor<'_>,
    ) -> Result<Vec<MessageRow>, sqlx::Error> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages ORDER BY received_at, id");
        sqlx::query_as(&sql).fetch_all(conn).await
    }

    pub(super) async fn all_recipients(
        conn: impl SqliteExecutor<'_>,
    ) -> Result<Vec<RecipientRow>, sqlx::Error> {
        let sql = format!("SELECT {RECIPIENT_COLUMNS} FROM recipients ORDER BY id");
        sqlx::query_as(&sql).fetch_all(conn).await
    }

    pub(super) async fn recipients_of(
        conn: impl SqliteExecutor<'_>,
        id: &MessageId,
    ) -> Result<Vec<RecipientRow>, sqlx::Error> {
        let sql =
            format!("SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE message_id = ? ORDER BY id");
        sqlx::query_as(&sql).bind(id.as_str()).fetch_all(conn).await
    }

    pub(super) async fn one_message(
        conn: impl SqliteExecutor<'_>,
        id: &MessageId,
    ) -> Result<Option<SealedRow>, sqlx::Error> {
        let sql = format!("SELECT {MESSAGE_COLUMNS}, nonce, body FROM messages WHERE id = ?");
        sqlx::query_as(&sql)
            .bind(id.as_str())
            .fetch_optional(conn)
            .await
    }

    /// The message, without recipients or body.
    pub(super) fn message(row: MessageRow) -> Result<StoredMessage, QueueError> {
        let received_at = parse_time(&row.id, &row.received_at)?;
        let size = u64::try_from(row.size).map_err(|_| corrupt(&row.id, "negative size"))?;
        Ok(StoredMessage {
            id: MessageId::from_string(row.id),
            received_at,
            sender: row.sender,
            client_ip: row.client_ip,
            auth_user: row.auth_user,
            message_id_header: row.message_id_header,
            size,
            key_id: row.key_id,
            recipients: Vec::new(),
            body: None,
        })
    }

    /// The message with its sealed body.
    pub(super) fn sealed_message(row: SealedRow) -> Result<StoredMessage, QueueError> {
        let nonce: [u8; 12] = row
            .nonce
            .try_into()
            .map_err(|_| corrupt(&row.envelope.id, "nonce is not 12 bytes"))?;
        let mut message = message(row.envelope)?;
        message.body = Some(SealedBody {
            key_id: message.key_id.clone(),
            nonce,
            ciphertext: row.body,
        });
        Ok(message)
    }

    pub(super) fn recipient(row: RecipientRow) -> Result<StoredRecipient, QueueError> {
        let id = &row.message_id;
        let address = row.address;
        let decision = serde_json::from_str(&row.decision)
            .map_err(|e| corrupt(id, &format!("decision of {address}: {e}")))?;
        let status = RecipientStatus::parse(&row.status)
            .ok_or_else(|| corrupt(id, &format!("unknown status {:?} of {address}", row.status)))?;
        let attempts =
            u32::try_from(row.attempts).map_err(|_| corrupt(id, "attempts out of range"))?;
        let next_attempt = match row.next_attempt {
            Some(t) => Some(parse_time(id, &t)?),
            None => None,
        };
        Ok(StoredRecipient {
            address,
            domain: row.domain,
            decision,
            status,
            attempts,
            next_attempt,
            last_reply: row.last_reply,
        })
    }

    fn corrupt(id: &str, reason: &str) -> QueueError {
        QueueError::Corrupt {
            id: id.to_string(),
            reason: reason.to_string(),
        }
    }
}

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
        assert!(matches!(first_rx.await, Ok(Err(QueueError::Database(_)))));
        assert!(matches!(second_rx.await, Ok(Err(QueueError::Database(_)))));
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
