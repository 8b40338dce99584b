//! The group-commit write path: multi-row INSERTs in one transaction.

use sqlx::query::Query;
use sqlx::sqlite::{Sqlite, SqliteArguments};

use super::*;

/// Most rows in one multi-row INSERT (a power of two; see [`chunk_sizes`]).
const ROWS_PER_STATEMENT: usize = 32;

const MESSAGE_INSERT: &str = "INSERT INTO messages (id, received_at, sender, client_ip, \
    auth_user, message_id_header, size, key_id, lane, nonce, body) VALUES ";
const MESSAGE_VALUES: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
const RECIPIENT_INSERT: &str = "INSERT INTO recipients (message_id, address, domain, \
    decision, status, attempts, next_attempt, lane) VALUES ";
const RECIPIENT_VALUES: &str = "(?, ?, ?, ?, 'queued', 0, ?, ?)";

type Insert<'q> = Query<'q, Sqlite, SqliteArguments<'q>>;

/// A recipient row, ready to bind.
struct Recipient {
    message_id: String,
    address: String,
    domain: String,
    decision: String,
    next_attempt: String,
    lane: &'static str,
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
        .bind(envelope.lane.as_str())
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
                lane: envelope.lane.as_str(),
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
                .bind(r.next_attempt)
                .bind(r.lane);
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
