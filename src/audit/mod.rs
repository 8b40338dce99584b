//! Tamper-evident audit log: typed events appended as hash-chained JSON lines.
//!
//! Each line holds `seq`, `ts` (RFC 3339 UTC), `event`, the event's fields, `prev` (the `hash`
//! of the previous line, 64 zeros for the first) and `hash` (SHA-256 over the line's canonical
//! content: the JSON object without `hash`, keys sorted, no whitespace). `verify` recomputes the
//! chain and names the first line that was changed, removed or reordered.

mod event;
mod verify;
mod writer;

pub use event::{AuditEvent, RecipientDecision};
pub use verify::{canonical_json, verify, VerifyError, VerifyReport, GENESIS};
pub use writer::{AuditError, AuditLog};
