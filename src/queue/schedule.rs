//! Pure retry and expiry arithmetic: no clocks, no I/O.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The wait before the next attempt after `attempts` failed attempts (1 = the first failed).
/// Follows `schedule`; past its end the last wait doubles each time, never beyond `max`.
pub fn backoff(attempts: u32, schedule: &[Duration], max: Duration) -> Duration {
    let Some(last) = schedule.last() else {
        return max;
    };
    let index = attempts.saturating_sub(1) as usize;
    if let Some(wait) = schedule.get(index) {
        return (*wait).min(max);
    }
    let doublings = (index + 1 - schedule.len()).min(32) as u32;
    last.checked_mul(2u32.saturating_pow(doublings))
        .unwrap_or(max)
        .min(max)
}

/// The time of the next attempt, or `None` when that would be past the queue lifetime (the
/// recipient then fails as expired).
pub fn next_attempt(
    received_at: DateTime<Utc>,
    now: DateTime<Utc>,
    attempts: u32,
    schedule: &[Duration],
    max: Duration,
    lifetime: Duration,
) -> Option<DateTime<Utc>> {
    let wait = chrono::Duration::from_std(backoff(attempts, schedule, max)).ok()?;
    let next = now + wait;
    let deadline = received_at + chrono::Duration::from_std(lifetime).ok()?;
    (now < deadline).then(|| next.min(deadline))
}

/// True once a message is older than the queue lifetime.
pub fn expired(received_at: DateTime<Utc>, now: DateTime<Utc>, lifetime: Duration) -> bool {
    match chrono::Duration::from_std(lifetime) {
        Ok(life) => now >= received_at + life,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mins(m: u64) -> Duration {
        Duration::from_secs(m * 60)
    }

    #[test]
    fn follows_the_schedule_then_doubles_to_the_cap() {
        let schedule = [mins(5), mins(10), mins(20), mins(40), mins(60)];
        let waits: Vec<u64> = (1..=9)
            .map(|a| backoff(a, &schedule, mins(240)).as_secs() / 60)
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 120, 240, 240, 240]);
        assert_eq!(backoff(u32::MAX, &schedule, mins(240)), mins(240));
        assert_eq!(backoff(1, &[], mins(7)), mins(7));
    }

    #[test]
    fn next_attempt_stops_at_the_lifetime() {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let schedule = [mins(5)];
        let life = mins(60);
        let next = next_attempt(t0, t0, 1, &schedule, mins(240), life).unwrap();
        assert_eq!(next, t0 + chrono::Duration::minutes(5));
        // Late attempts are pulled in to the deadline, then nothing.
        let late = t0 + chrono::Duration::minutes(58);
        let capped = next_attempt(t0, late, 3, &schedule, mins(240), life).unwrap();
        assert_eq!(capped, t0 + chrono::Duration::minutes(60));
        let over = t0 + chrono::Duration::minutes(60);
        assert_eq!(next_attempt(t0, over, 4, &schedule, mins(240), life), None);
        assert!(expired(t0, over, life));
        assert!(!expired(t0, late, life));
    }
}
