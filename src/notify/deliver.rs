//! One try of one notice, against the database: claim it, check that it may
//! still be sent and where, post it, record what came of it.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use url::Url;
use uuid::Uuid;

use super::classify::{Answer, Verdict, decide};
use super::client::{Deliverer, Outgoing};
use super::guard::{UrlProblem, check_url, origin};
use super::notice::{NoticeKind, webhook_id};
use crate::verify::standard_webhooks::Secret;

/// A notice claimed for a try, with its integration as it is now.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub business_id: i32,
    pub integration_id: i32,
    pub kind: String,
    pub body: String,
    /// Tries before this one.
    pub tries: i32,
    pub active: Option<bool>,
    pub notify_url: Option<String>,
    pub notify_events: Option<Value>,
    pub webhook_secret: Option<String>,
    pub gone: bool,
}

/// Whether a notice may be claimed now.
#[derive(Debug)]
pub enum Claim {
    Claimed(Box<Claimed>),
    /// Delivered, parked or skipped already (a duplicate message): nothing to do.
    Settled,
    /// Another try of it is in progress (or was, in a worker that died): later.
    Busy,
    /// No such notice (pruned): nothing to do.
    Missing,
}

/// Takes the notice for `hold` (longer than one try can last).
pub async fn claim(pool: &PgPool, id: Uuid, hold: Duration) -> Result<Claim, sqlx::Error> {
    let claimed: Option<Claimed> = sqlx::query_as(
        "WITH c AS (
             UPDATE webhook_worker.notices SET claimed_until = now() + $2
              WHERE id = $1 AND settled_at IS NULL AND (claimed_until IS NULL OR claimed_until < now())
          RETURNING id, business_id, integration_id, kind, body, tries)
         SELECT c.*, (i.type = 'n8n' AND i.status = 'active') AS active,
                i.config->>'notify_url' AS notify_url, i.config->'notify_events' AS notify_events,
                i.config->>'webhook_secret' AS webhook_secret,
                EXISTS (SELECT 1 FROM webhook_worker.notify_gone g
                         WHERE g.integration_id = c.integration_id AND g.notify_url = i.config->>'notify_url') AS gone
           FROM c LEFT JOIN public.integrations i ON i.id = c.integration_id",
    )
    .bind(id)
    .bind(hold)
    .fetch_optional(pool)
    .await?;
    if let Some(c) = claimed {
        return Ok(Claim::Claimed(Box::new(c)));
    }
    let settled: Option<bool> =
        sqlx::query_scalar("SELECT settled_at IS NOT NULL FROM webhook_worker.notices WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(match settled {
        None => Claim::Missing,
        Some(true) => Claim::Settled,
        Some(false) => Claim::Busy,
    })
}

/// Where and how to send a claimed notice.
pub struct Ready {
    pub url: Url,
    pub secret: Secret,
    pub webhook_id: String,
}

/// What stops a claimed notice before any request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Notices were turned off after it was decided: settled as skipped, not an error.
    Skip(String),
    /// The configuration cannot work: parked with the reason (no try is made).
    Park(String),
    /// The URL resolves to a refused address (literal hosts; names are refused when resolved).
    Refused(String),
}

/// Checks the integration as it is now. Pure.
pub fn prepare(c: &Claimed, allow_private: bool) -> Result<Ready, Stop> {
    let Some(url) = c.notify_url.as_deref().filter(|u| !u.trim().is_empty()) else {
        return Err(Stop::Skip("the integration no longer has a notify_url".into()));
    };
    if c.active != Some(true) {
        return Err(Stop::Skip("the integration is no longer an active n8n integration".into()));
    }
    if c.gone {
        return Err(Stop::Skip("the receiver answered 410 Gone; notices are off until notify_url changes".into()));
    }
    match &c.notify_events {
        None | Some(Value::Null) => {}
        Some(Value::Array(kinds)) => {
            let mut wanted = false;
            for k in kinds {
                match k.as_str().and_then(NoticeKind::parse) {
                    Some(kind) => wanted |= kind.as_str() == c.kind,
                    None => {
                        return Err(Stop::Park(format!("config.notify_events lists {k}, which is not a notice type")));
                    }
                }
            }
            if !wanted {
                return Err(Stop::Skip(format!("config.notify_events no longer lists {}", c.kind)));
            }
        }
        Some(_) => return Err(Stop::Park("config.notify_events must be a list of notice types".into())),
    }
    let url = check_url(url, allow_private).map_err(|p| match p {
        UrlProblem::Refused(r) => Stop::Refused(format!("refused: {r}")),
        other => Stop::Park(other.to_string()),
    })?;
    let secret = c
        .webhook_secret
        .as_deref()
        .ok_or_else(|| Stop::Park("config.webhook_secret is missing: notices are signed with it".into()))
        .and_then(|s| {
            Secret::parse(s).map_err(|e| Stop::Park(format!("config.webhook_secret cannot sign notices: {e}")))
        })?;
    Ok(Ready { url, secret, webhook_id: webhook_id(c.id) })
}

/// The outcome of one try, for the consumer to act on (and record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    Delivered,
    Skipped(String),
    Retry {
        after: Duration,
        reason: String,
    },
    Parked(String),
    /// Parked before any try: the integration's configuration cannot work.
    Misconfigured(String),
    /// Parked because the address was refused by the guard.
    Refused(String),
    /// Parked after a 410; notices are now off for the integration's URL.
    Gone(String),
}

/// One try: prepare, send, decide.
pub async fn attempt(c: &Claimed, deliverer: &Deliverer, delays: &[Duration]) -> Settle {
    let ready = match prepare(c, deliverer.allow_private()) {
        Ok(r) => r,
        Err(Stop::Skip(why)) => return Settle::Skipped(why),
        Err(Stop::Park(why)) => return Settle::Misconfigured(why),
        Err(Stop::Refused(why)) => return Settle::Refused(why),
    };
    let answer = deliverer
        .send(&Outgoing { url: &ready.url, secret: &ready.secret, webhook_id: &ready.webhook_id, body: &c.body })
        .await;
    let tries = c.tries as usize + 1;
    let refused = matches!(answer, Answer::Refused(_));
    match decide(&answer, tries, delays) {
        Verdict::Delivered => Settle::Delivered,
        Verdict::Retry { after, reason } => Settle::Retry { after, reason },
        Verdict::Park { reason } if refused => Settle::Refused(reason),
        Verdict::Park { reason } => Settle::Parked(reason),
        Verdict::Disable { reason } => Settle::Gone(reason),
    }
}

/// The receiver a notice counts against for the per-receiver limit: its URL's origin.
pub fn receiver(c: &Claimed) -> String {
    c.notify_url.as_deref().and_then(|u| Url::parse(u.trim()).ok()).map_or_else(|| "(none)".into(), |u| origin(&u))
}

/// Records the outcome and releases the claim. A try that reached the receiver
/// (or was refused) counts in `tries`; a skip does not.
pub async fn record(pool: &PgPool, c: &Claimed, s: &Settle) -> Result<(), sqlx::Error> {
    let (outcome, error, tried): (Option<&str>, Option<&str>, bool) = match s {
        Settle::Delivered => (Some("delivered"), None, true),
        Settle::Skipped(why) => (Some("skipped"), Some(why), false),
        Settle::Retry { reason, .. } => (None, Some(reason), true),
        Settle::Misconfigured(why) => (Some("parked"), Some(why), false),
        Settle::Parked(why) | Settle::Refused(why) | Settle::Gone(why) => (Some("parked"), Some(why), true),
    };
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE webhook_worker.notices
            SET tries = tries + $2::int, last_error = $3, outcome = $4, claimed_until = NULL,
                settled_at = CASE WHEN $4::text IS NULL THEN NULL ELSE now() END
          WHERE id = $1",
    )
    .bind(c.id)
    .bind(i32::from(tried))
    .bind(error)
    .bind(outcome)
    .execute(&mut *tx)
    .await?;
    if let (Settle::Gone(_), Some(url)) = (s, c.notify_url.as_deref()) {
        sqlx::query(
            "INSERT INTO webhook_worker.notify_gone (integration_id, notify_url) VALUES ($1, $2)
             ON CONFLICT (integration_id) DO UPDATE SET notify_url = EXCLUDED.notify_url, gone_at = now()",
        )
        .bind(c.integration_id)
        .bind(url)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Notices neither delivered nor parked, and the age of the oldest in seconds (for the metrics).
pub async fn unsent(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
           FROM webhook_worker.notices WHERE settled_at IS NULL",
    )
    .fetch_one(pool)
    .await
}

/// Lets a claim go without a try (the receiver was busy): the notice is taken again later.
pub async fn release(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE webhook_worker.notices SET claimed_until = NULL WHERE id = $1 AND settled_at IS NULL")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn claimed() -> Claimed {
        Claimed {
            id: Uuid::nil(),
            business_id: 1,
            integration_id: 7,
            kind: "call.ended".into(),
            body: "{}".into(),
            tries: 0,
            active: Some(true),
            notify_url: Some("https://n8n.example.com/webhook/x".into()),
            notify_events: None,
            webhook_secret: Some(SECRET.into()),
            gone: false,
        }
    }

    fn stop(c: &Claimed) -> Stop {
        match prepare(c, false) {
            Ok(_) => panic!("expected a stop"),
            Err(s) => s,
        }
    }

    #[test]
    fn a_well_configured_integration_is_ready() {
        let ready = prepare(&claimed(), false).unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(ready.webhook_id, "msg_00000000000000000000000000000000");
        assert_eq!(ready.url.as_str(), "https://n8n.example.com/webhook/x");
        let listed = Claimed { notify_events: Some(serde_json::json!(["call.ended"])), ..claimed() };
        assert!(prepare(&listed, false).is_ok());
    }

    #[test]
    fn notices_turned_off_since_are_skipped() {
        assert!(matches!(stop(&Claimed { notify_url: None, ..claimed() }), Stop::Skip(_)));
        assert!(matches!(stop(&Claimed { active: Some(false), ..claimed() }), Stop::Skip(_)));
        assert!(matches!(stop(&Claimed { active: None, ..claimed() }), Stop::Skip(_)));
        assert!(matches!(stop(&Claimed { gone: true, ..claimed() }), Stop::Skip(_)));
        let other = Claimed { notify_events: Some(serde_json::json!(["booking.outside_hours"])), ..claimed() };
        assert_eq!(stop(&other), Stop::Skip("config.notify_events no longer lists call.ended".into()));
    }

    #[test]
    fn bad_configuration_parks_with_a_reason_naming_the_field() {
        let s = stop(&Claimed { notify_events: Some(serde_json::json!("call.ended")), ..claimed() });
        assert_eq!(s, Stop::Park("config.notify_events must be a list of notice types".into()));
        let s = stop(&Claimed { notify_events: Some(serde_json::json!(["call.started"])), ..claimed() });
        assert_eq!(s, Stop::Park("config.notify_events lists \"call.started\", which is not a notice type".into()));
        let s = stop(&Claimed { webhook_secret: None, ..claimed() });
        assert!(matches!(&s, Stop::Park(r) if r.starts_with("config.webhook_secret is missing")), "{s:?}");
        let s = stop(&Claimed { webhook_secret: Some("whsec_!!!".into()), ..claimed() });
        assert!(matches!(&s, Stop::Park(r) if r.starts_with("config.webhook_secret cannot sign")), "{s:?}");
        let s = stop(&Claimed { notify_url: Some("ftp://n8n.example.com/".into()), ..claimed() });
        assert_eq!(s, Stop::Park("config.notify_url must be http or https, not \"ftp\"".into()));
        let s = stop(&Claimed { notify_url: Some("http://169.254.169.254/latest".into()), ..claimed() });
        assert!(matches!(&s, Stop::Refused(r) if r.contains("cloud-metadata")), "{s:?}");
    }

    #[test]
    fn the_receiver_is_the_urls_origin() {
        assert_eq!(receiver(&claimed()), "https://n8n.example.com");
        assert_eq!(receiver(&Claimed { notify_url: None, ..claimed() }), "(none)");
    }
}
