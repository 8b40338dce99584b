-- The queue: one row per message, one row per recipient.
--
-- Times are TEXT in one fixed-width RFC 3339 form, UTC with microseconds and `Z`
-- (e.g. 2024-05-01T12:00:00.000000Z), so comparing the text compares the instants; claims
-- rely on that (`next_attempt <= :now`, `lease_until < :now`).
-- Bodies are AES-256-GCM ciphertext (tag appended); `key_id` names the key and `nonce` is the
-- 12-byte nonce. The body is the last column so reading the envelope never pages it in.

CREATE TABLE messages (
    id                TEXT    NOT NULL PRIMARY KEY,
    received_at       TEXT    NOT NULL,
    sender            TEXT    NOT NULL,
    client_ip         TEXT    NOT NULL,
    auth_user         TEXT,
    message_id_header TEXT,
    size              INTEGER NOT NULL CHECK (size >= 0),
    key_id            TEXT    NOT NULL,
    nonce             BLOB    NOT NULL CHECK (length(nonce) = 12),
    body              BLOB    NOT NULL
) STRICT;

CREATE TABLE recipients (
    id           INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    message_id   TEXT    NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address      TEXT    NOT NULL,
    -- Lower-cased domain part: delivery claims due recipients grouped by domain.
    domain       TEXT    NOT NULL,
    -- crate::policy::Decision as JSON.
    decision     TEXT    NOT NULL,
    status       TEXT    NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'delivered', 'deferred', 'failed', 'dropped', 'escalated')),
    attempts     INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- Due time while queued/deferred; NULL once final.
    next_attempt TEXT,
    last_reply   TEXT,
    -- Delivery leases: a worker claims a row by setting both; a lease that ran out may be
    -- claimed again (a crashed worker's recipients come back).
    lease_owner  TEXT,
    lease_until  TEXT
) STRICT;

CREATE INDEX recipients_due ON recipients (status, next_attempt);
CREATE INDEX recipients_message ON recipients (message_id);
CREATE INDEX recipients_domain_due ON recipients (domain, status, next_attempt);
