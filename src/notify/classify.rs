//! What the receiver's answer means for a notice (CONTRACT.md §5): pure, so
//! every branch is unit-tested without a network.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::guard::Refused;

/// The result of one try, as the delivery client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The receiver answered with this status (and maybe a `Retry-After`).
    Status { code: u16, retry_after: Option<Duration> },
    /// No answer: connection refused or reset, DNS failure, TLS failure, or the
    /// timeout ran out. Worth another try.
    NoAnswer { reason: String },
    /// The guard refused the address: trying again cannot help.
    Refused(Refused),
}

/// What to do with the notice after a try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again after this long; `reason` rides along in `x-last-error`.
    Retry {
        after: Duration,
        reason: String,
    },
    /// Park in the dead-letter queue now.
    Park {
        reason: String,
    },
    /// 410 Gone: park this one and send no more until the `notify_url` changes.
    Disable {
        reason: String,
    },
}

/// Decides after try number `tries` (1 for the first) with the configured
/// delays between tries: a notice gets `delays.len() + 1` tries in all.
///
/// A `Retry-After` longer than the scheduled delay is honoured when it is no
/// longer than the largest configured delay (the bound): the wait is then the
/// shortest configured delay that covers it. One longer than the bound is
/// ignored (a receiver cannot hold a notice for days).
pub fn decide(answer: &Answer, tries: usize, delays: &[Duration]) -> Verdict {
    let reason = match answer {
        Answer::Refused(r) => return Verdict::Park { reason: format!("refused: {r}") },
        Answer::Status { code, .. } if (200..300).contains(code) => return Verdict::Delivered,
        Answer::Status { code: 410, .. } => {
            return Verdict::Disable {
                reason:
                    "the receiver answered 410 Gone: notices are off for this integration until its notify_url changes"
                        .into(),
            };
        }
        Answer::Status { code, .. } if retryable(*code) => format!("the receiver answered {code}"),
        Answer::Status { code, .. } if (300..400).contains(code) => {
            return Verdict::Park {
                reason: format!("the receiver answered {code} (a redirect, which is not followed)"),
            };
        }
        Answer::Status { code, .. } => return Verdict::Park { reason: format!("the receiver answered {code}") },
        Answer::NoAnswer { reason } => reason.clone(),
    };
    let Some(scheduled) = delays.get(tries.saturating_sub(1)).copied() else {
        return Verdict::Park { reason: format!("gave up after {tries} tries: {reason}") };
    };
    let retry_after = match answer {
        Answer::Status { retry_after, .. } => *retry_after,
        _ => None,
    };
    let bound = delays.iter().max().copied().unwrap_or(scheduled);
    let after = match retry_after {
        Some(wanted) if wanted > scheduled && wanted <= bound => {
            delays.iter().copied().filter(|d| *d >= wanted).min().unwrap_or(bound)
        }
        _ => scheduled,
    };
    Verdict::Retry { after, reason }
}

fn retryable(code: u16) -> bool {
    code >= 500 || code == 408 || code == 429
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3); a date in
/// the past is no wait at all; anything else is ignored.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delays() -> Vec<Duration> {
        ["5s", "30s", "120s", "600s"]
            .iter()
            .map(|s| Duration::from_secs(s.trim_end_matches('s').parse().unwrap()))
            .collect()
    }
    fn status(code: u16) -> Answer {
        Answer::Status { code, retry_after: None }
    }
    fn after(v: Verdict) -> Duration {
        match v {
            Verdict::Retry { after, .. } => after,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn two_hundreds_are_delivered() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(decide(&status(code), 1, &delays()), Verdict::Delivered);
        }
    }

    #[test]
    fn server_errors_timeouts_and_throttling_are_retried_after_each_delay_in_turn() {
        for code in [500, 502, 503, 504, 408, 429] {
            assert_eq!(after(decide(&status(code), 1, &delays())), Duration::from_secs(5), "{code}");
        }
        let none = Answer::NoAnswer { reason: "connection refused".into() };
        let waits: Vec<_> = (1..=4).map(|t| after(decide(&none, t, &delays()))).collect();
        assert_eq!(waits, delays());
        match decide(&none, 5, &delays()) {
            Verdict::Park { reason } => assert_eq!(reason, "gave up after 5 tries: connection refused"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gone_turns_notices_off_and_other_client_errors_park_at_once() {
        assert!(matches!(decide(&status(410), 1, &delays()), Verdict::Disable { .. }));
        for code in [400, 401, 403, 404, 405, 413, 422] {
            match decide(&status(code), 1, &delays()) {
                Verdict::Park { reason } => assert_eq!(reason, format!("the receiver answered {code}")),
                other => panic!("{code}: {other:?}"),
            }
        }
        match decide(&status(302), 1, &delays()) {
            Verdict::Park { reason } => assert!(reason.contains("redirect"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_guard_refusal_parks_with_the_reason() {
        let r = Refused { host: "localhost".into(), addr: "127.0.0.1".parse().unwrap(), class: "loopback" };
        match decide(&Answer::Refused(r), 1, &delays()) {
            Verdict::Park { reason } => {
                assert!(reason.starts_with("refused: localhost is 127.0.0.1, a loopback address"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_is_honoured_within_the_bound() {
        let with = |secs| Answer::Status { code: 429, retry_after: Some(Duration::from_secs(secs)) };
        // Shorter than the scheduled wait: the schedule stands.
        assert_eq!(after(decide(&with(1), 1, &delays())), Duration::from_secs(5));
        // Longer: the shortest configured delay that covers it.
        assert_eq!(after(decide(&with(20), 1, &delays())), Duration::from_secs(30));
        assert_eq!(after(decide(&with(600), 1, &delays())), Duration::from_secs(600));
        // Beyond the bound (the largest delay): ignored.
        assert_eq!(after(decide(&with(86_400), 1, &delays())), Duration::from_secs(5));
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T08:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Tue, 01 Dec 2026 08:01:30 GMT", now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after("Tue, 01 Dec 2026 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}
