//! Semantic checks on `[delivery]`: routes and the relay host parse, workers, rates, retries
//! and leases make sense.

use std::time::Duration;

use super::locate::{Findings, KeyPath};
use super::validate::{hostname_problem, section};

/// Routes and relay host parse; retry settings make sense.
pub(crate) fn check(delivery: &crate::config::Delivery, out: &mut Findings) {
    use crate::delivery::mx::RouteError;
    if let Err(errors) = crate::delivery::mx::Routes::from_config(delivery) {
        for e in errors {
            let key = match &e {
                RouteError::InvalidNextHop { key, .. }
                | RouteError::DuplicateDomain { key, .. }
                | RouteError::InvalidDomain { key, .. } => key.clone(),
            };
            out.error(KeyPath::parse(&key), e.to_string());
        }
    }
    let at = section("delivery");
    if let Some(message) = delivery.helo_name.as_deref().and_then(hostname_problem) {
        out.error(at.key("helo_name"), message);
    }
    if delivery.workers == 0 {
        out.error(at.key("workers"), "must be at least 1".to_string());
    }
    if delivery.bulk_workers == 0 {
        out.error(at.key("bulk_workers"), "must be at least 1".to_string());
    }
    for (i, rate) in delivery.rates.iter().enumerate() {
        if rate.per_minute == 0 {
            let key = at.key("rate").index(i).key("per_minute");
            out.error(
                key,
                "must be at least 1; to hold a domain's mail, use a route".to_string(),
            );
        }
    }
    if delivery.retry_schedule.is_empty() {
        out.error(
            at.key("retry_schedule"),
            "give at least one wait, e.g. [\"5m\"]".to_string(),
        );
    }
    if delivery.lease < Duration::from_secs(10) {
        out.error(
            at.key("lease"),
            "use at least 10s: a lease shorter than one delivery makes two workers send the same message".to_string(),
        );
    }
}
