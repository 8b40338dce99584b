//! Reads: list and get, each in one snapshot transaction.

use super::*;
use crate::queue::Lane;

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
    lane: String,
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
    id: i64,
    pub(super) message_id: String,
    address: String,
    domain: String,
    decision: String,
    status: String,
    attempts: i64,
    next_attempt: Option<String>,
    last_reply: Option<String>,
    warned: i64,
}

const MESSAGE_COLUMNS: &str =
    "id, received_at, sender, client_ip, auth_user, message_id_header, size, key_id, lane";
pub(super) const RECIPIENT_COLUMNS: &str =
    "id, message_id, address, domain, decision, status, attempts, next_attempt, last_reply, warned";

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
    let lane = Lane::parse(&row.lane)
        .ok_or_else(|| corrupt(&row.id, &format!("unknown lane {:?}", row.lane)))?;
    Ok(StoredMessage {
        id: MessageId::from_string(row.id),
        received_at,
        sender: row.sender,
        client_ip: row.client_ip,
        auth_user: row.auth_user,
        message_id_header: row.message_id_header,
        size,
        key_id: row.key_id,
        lane,
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
    let attempts = u32::try_from(row.attempts).map_err(|_| corrupt(id, "attempts out of range"))?;
    let next_attempt = match row.next_attempt {
        Some(t) => Some(parse_time(id, &t)?),
        None => None,
    };
    Ok(StoredRecipient {
        id: row.id,
        address,
        domain: row.domain,
        decision,
        status,
        attempts,
        next_attempt,
        last_reply: row.last_reply,
        warned: row.warned != 0,
    })
}

fn corrupt(id: &str, reason: &str) -> QueueError {
    QueueError::Corrupt {
        id: id.to_string(),
        reason: reason.to_string(),
    }
}
