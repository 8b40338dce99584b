//! Delivery work: claims with leases, outcomes, admin retry and delete.
//!
//! A claim is one `UPDATE … RETURNING` statement, so it is atomic without a read-then-write
//! transaction (which WAL could refuse with SQLITE_BUSY_SNAPSHOT).

use sqlx::Row;

use super::*;
use crate::queue::RecipientUpdate;

const OPEN: &str = "status IN ('queued', 'deferred')";

/// Claims the due recipients of up to `limit` messages; returns their row ids.
pub(super) async fn claim_rows(
    conn: &mut SqliteConnection,
    claim: &crate::queue::Claim<'_>,
) -> Result<Vec<i64>, sqlx::Error> {
    // Whole messages: every due recipient of up to `limit` messages, so one message's
    // recipients at one destination travel in one transaction. Saturated domains (a JSON
    // array in ?6) are left for later, so their backlog never ties up the workers.
    let due = format!(
        "lane = ?5 AND {OPEN} AND next_attempt <= ?3 \
         AND (lease_until IS NULL OR lease_until < ?3) \
         AND domain NOT IN (SELECT value FROM json_each(?6))"
    );
    // Oldest rows first (row ids grow with arrival) and bounded scans: the inner query stops
    // after a few rows per wanted message, the update finds rows by message id, so a claim
    // costs the same with 10 or 100,000 messages queued.
    let sql = format!(
        "UPDATE recipients SET lease_owner = ?1, lease_until = ?2 \
         WHERE {due} AND message_id IN \
             (SELECT DISTINCT message_id FROM \
                 (SELECT message_id FROM recipients WHERE {due} ORDER BY id LIMIT ?4 * 4) \
              LIMIT ?4) \
         RETURNING id"
    );
    let skip = serde_json::to_string(claim.skip_domains).unwrap_or_else(|_| "[]".to_string());
    let rows = sqlx::query(&sql)
        .bind(claim.owner)
        .bind(timestamp(&claim.lease_until))
        .bind(timestamp(&claim.now))
        .bind(i64::try_from(claim.limit).unwrap_or(i64::MAX))
        .bind(claim.lane.as_str())
        .bind(skip)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(|r| r.try_get::<i64, _>(0)).collect()
}

/// The claimed recipients' messages with bodies, each with only its claimed recipients.
pub(super) async fn claimed_messages(
    tx: &mut SqliteConnection,
    ids: &[i64],
) -> Result<Vec<StoredMessage>, QueueError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let placeholders = vec!["?"; ids.len()].join(",");
    let sql = format!(
        "SELECT {} FROM recipients WHERE id IN ({placeholders}) ORDER BY message_id, id",
        read::RECIPIENT_COLUMNS
    );
    let mut query = sqlx::query_as::<_, read::RecipientRow>(&sql);
    for id in ids {
        query = query.bind(id);
    }
    let rows = query.fetch_all(&mut *tx).await?;
    let mut out: Vec<StoredMessage> = Vec::new();
    for row in rows {
        if out.last().map(|m| m.id.as_str()) != Some(row.message_id.as_str()) {
            let id = MessageId::from_string(row.message_id.clone());
            let Some(message) = read::one_message(&mut *tx, &id).await? else {
                continue;
            };
            out.push(read::sealed_message(message)?);
        }
        if let Some(message) = out.last_mut() {
            message.recipients.push(read::recipient(row)?);
        }
    }
    Ok(out)
}

/// Clears the leases of one node: its tokens are `node` or `node#n`.
pub(super) async fn release(pool: &SqlitePool, node: &str) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE recipients SET lease_owner = NULL, lease_until = NULL \
         WHERE lease_owner = ?1 OR substr(lease_owner, 1, length(?1) + 1) = ?1 || '#'",
    )
    .bind(node)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Extends leases still held by `owner`.
pub(super) async fn extend(
    pool: &SqlitePool,
    owner: &str,
    ids: &[i64],
    lease_until: &DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let placeholders = vec!["?"; ids.len()].join(",");
    let sql = format!(
        "UPDATE recipients SET lease_until = ? WHERE lease_owner = ? AND id IN ({placeholders})"
    );
    let mut query = sqlx::query(&sql).bind(timestamp(lease_until)).bind(owner);
    for id in ids {
        query = query.bind(id);
    }
    query.execute(pool).await?;
    Ok(())
}

/// Records outcomes and releases leases inside the caller's transaction; only rows the caller
/// may change.
async fn finish(
    conn: &mut SqliteConnection,
    owner: Option<&str>,
    now: &DateTime<Utc>,
    updates: &[RecipientUpdate],
) -> Result<u64, sqlx::Error> {
    let guard = match owner {
        // Both variants name ?7 and ?8 so the same eight values bind to either.
        Some(_) => "lease_owner = ?7 AND ?8 IS NOT NULL",
        None => {
            "?7 IS NULL AND status IN ('queued', 'deferred') \
             AND (lease_until IS NULL OR lease_until < ?8)"
        }
    };
    let sql = format!(
        "UPDATE recipients SET status = ?1, attempts = attempts + ?2, next_attempt = ?3, \
         last_reply = COALESCE(?4, last_reply), warned = MAX(warned, ?6), \
         lease_owner = NULL, lease_until = NULL WHERE id = ?5 AND {guard}"
    );
    let now = timestamp(now);
    let mut changed = 0;
    for u in updates {
        let done = sqlx::query(&sql)
            .bind(u.status.as_str())
            .bind(i64::from(u.attempted))
            .bind(u.next_attempt.as_ref().map(timestamp))
            .bind(u.last_reply.as_deref())
            .bind(u.id)
            .bind(i64::from(u.warned))
            .bind(owner)
            .bind(&now)
            .execute(&mut *conn)
            .await?;
        changed += done.rows_affected();
    }
    erase_finished_bodies(conn, updates).await?;
    Ok(changed)
}

/// One outcome report waiting for the finisher task.
pub(super) struct FinishRequest {
    pub owner: Option<String>,
    pub now: DateTime<Utc>,
    pub updates: Vec<RecipientUpdate>,
    pub done: tokio::sync::oneshot::Sender<Result<u64, QueueError>>,
}

/// Group commit for outcomes: the finisher takes one request, drains what else is waiting,
/// applies all in one `BEGIN IMMEDIATE` transaction (one fsync) and answers each with the rows
/// it changed. On failure every request in the batch gets the error (nothing was applied).
pub(super) async fn run_finisher(
    pool: SqlitePool,
    mut rx: tokio::sync::mpsc::Receiver<FinishRequest>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < FINISH_BATCH {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        match finish_batch(&pool, &batch).await {
            Ok(counts) => {
                for (request, n) in batch.drain(..).zip(counts) {
                    let _ = request.done.send(Ok(n));
                }
            }
            Err(e) => {
                let count = batch.len();
                tracing::error!(error = %e, requests = count, "recording delivery outcomes failed");
                let shared = Arc::new(e);
                for request in batch.drain(..) {
                    let _ = request.done.send(Err(QueueError::Batch {
                        count,
                        cause: shared.clone(),
                    }));
                }
            }
        }
    }
}

/// Most outcome reports applied in one transaction.
const FINISH_BATCH: usize = 256;

async fn finish_batch(pool: &SqlitePool, batch: &[FinishRequest]) -> Result<Vec<u64>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let mut counts = Vec::with_capacity(batch.len());
    for request in batch {
        let owner = request.owner.as_deref();
        counts.push(finish(&mut tx, owner, &request.now, &request.updates).await?);
    }
    tx.commit().await?;
    Ok(counts)
}

/// Erases the (sealed) body of every message touched by `updates` that has no open recipient
/// left: once a message is delivered, failed or dropped everywhere, no copy of its content
/// stays in the queue. The envelope row stays for `queue list` and the audit trail.
async fn erase_finished_bodies(
    conn: &mut SqliteConnection,
    updates: &[RecipientUpdate],
) -> Result<(), sqlx::Error> {
    if updates.is_empty() {
        return Ok(());
    }
    let placeholders = vec!["?"; updates.len()].join(",");
    let sql = format!(
        "UPDATE messages SET body = x'' WHERE length(body) > 0 AND id IN \
             (SELECT message_id FROM recipients WHERE id IN ({placeholders})) \
         AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = messages.id AND r.{OPEN})"
    );
    let mut query = sqlx::query(&sql);
    for u in updates {
        query = query.bind(u.id);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// Makes open recipients due now.
pub(super) async fn retry(
    pool: &SqlitePool,
    id: Option<&MessageId>,
    now: &DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "UPDATE recipients SET next_attempt = ?1 WHERE {OPEN} AND (?2 IS NULL OR message_id = ?2)"
    );
    let done = sqlx::query(&sql)
        .bind(timestamp(now))
        .bind(id.map(|i| i.as_str()))
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// Deletes a message; recipients go with it (ON DELETE CASCADE).
pub(super) async fn delete(pool: &SqlitePool, id: &MessageId) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM messages WHERE id = ?1")
        .bind(id.as_str())
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}
