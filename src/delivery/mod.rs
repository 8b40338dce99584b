//! Delivery: claim due recipients, route them, speak SMTP, record one outcome per recipient.
//!
//! - [`worker`]: the loop that claims work with leases and runs one task per destination group.
//! - [`attempt`]: hops and addresses in order, one transaction per group.
//! - [`outcome`]: the one place where results are classified.
//! - [`record`]: queue updates, audit records, DSNs.
//! - [`mx`], [`client`], [`tls`], [`pool`], [`dsn`]: routing, the SMTP client, TLS, reuse, bounces.

mod attempt;
pub mod client;
pub mod dsn;
pub mod mx;
pub mod notify;
pub mod outcome;
mod pool;
mod record;
pub mod tls;
pub mod worker;

pub use worker::{Deliverer, Parts};
