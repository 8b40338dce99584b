//! Delivery: claim due recipients, route them, speak SMTP, record one outcome per recipient.

pub mod client;
pub mod mx;
pub mod tls;
