//! sealpost: an outbound SMTP relay for mail that carries protected health information.
//!
//! Map of the modules (see `DESIGN.md` for the path of one message):
//! - [`config`]: `sealpost.toml` into typed structs, with diagnostics for `sealpost check`.
//! - [`listener`]: accept loop, SMTP session state machine, inbound TLS and AUTH.
//! - [`smtp`]: protocol vocabulary: replies with enhanced status codes.
//! - [`policy`]: one [`policy::Decision`] per recipient.
//! - [`queue`]: the [`queue::Store`] seam, the SQLite store, at-rest encryption.
//! - [`audit`]: typed, hash-chained audit events.
//! - [`server`]: wires the pieces together for `sealpost serve`.
//! - [`cli`]: the `sealpost` subcommands.

pub mod audit;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod dns;
pub mod ids;
pub mod listener;
pub mod policy;
pub mod queue;
pub mod server;
pub mod shutdown;
pub mod smtp;
