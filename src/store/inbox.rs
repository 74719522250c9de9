//! The event log and de-duplication table, `webhook_worker.inbox`: every SQL
//! statement that touches it is here, so its shape can change in one place.
//!
//! A worker claims an event's key in the transaction that applies it (a key
//! already there means "already applied": skip), releases it when the event is
//! to be retried or parked, and notes why an event changed nothing. `replay`
//! reads it back by provider, business and time.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::events::{BusinessId, Envelope, Provider};

/// An event to claim: its decoded envelope and the exact bytes it arrived as (logged as they are).
pub type Entry<'a> = (&'a Envelope, &'a str);

/// Records the keys of the entries in one statement; returns the keys that
/// were new (a key already there is a redelivery).
pub async fn claim_all<'a>(tx: &mut PgConnection, entries: &[Entry<'a>]) -> Result<HashSet<&'a str>, sqlx::Error> {
    if entries.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO webhook_worker.inbox (event_key, provider, kind, business_id, received_at, envelope)
         SELECT k, p, t, b, r, e::json
           FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::timestamptz[], $6::text[]) AS u(k, p, t, b, r, e)
         ON CONFLICT (event_key) DO NOTHING
         RETURNING event_key",
    )
    .bind(entries.iter().map(|(env, _)| env.key.as_str()).collect::<Vec<_>>())
    .bind(entries.iter().map(|(env, _)| env.event.provider().as_str()).collect::<Vec<_>>())
    .bind(entries.iter().map(|(env, _)| env.event.kind()).collect::<Vec<_>>())
    .bind(entries.iter().map(|(env, _)| env.business_id.map(|b| b.0)).collect::<Vec<_>>())
    .bind(entries.iter().map(|(env, _)| env.received_at).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, raw)| *raw).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let inserted: HashSet<String> = inserted.into_iter().collect();
    Ok(entries.iter().map(|(env, _)| env.key.as_str()).filter(|k| inserted.contains(*k)).collect())
}

/// Records one event's key; false if it was already there (a redelivery).
pub async fn claim(tx: &mut PgConnection, env: &Envelope, raw: &str) -> Result<bool, sqlx::Error> {
    Ok(!claim_all(tx, &[(env, raw)]).await?.is_empty())
}

/// Gives a key back (the event will be retried or parked, not applied).
pub async fn release(tx: &mut PgConnection, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM webhook_worker.inbox WHERE event_key = $1").bind(key).execute(&mut *tx).await?;
    Ok(())
}

/// Says why each event changed nothing: one statement for the batch.
pub async fn note_ignored(tx: &mut PgConnection, ignored: &[(String, &'static str)]) -> Result<(), sqlx::Error> {
    if ignored.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE webhook_worker.inbox i SET outcome = 'ignored: ' || u.why
           FROM unnest($1::text[], $2::text[]) AS u(k, why) WHERE i.event_key = u.k",
    )
    .bind(ignored.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
    .bind(ignored.iter().map(|(_, why)| *why).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Which logged events to read back.
#[derive(Debug, Clone)]
pub struct Filter {
    pub provider: Provider,
    pub business: Option<BusinessId>,
    /// Only events received at or after this time.
    pub since: Option<DateTime<Utc>>,
}

/// A logged event: its key, when it was received, its envelope as logged.
pub type Logged = (String, DateTime<Utc>, String);

/// Up to `limit` logged events matching `filter`, oldest first, after `after` (a page's last row).
pub async fn page(
    pool: &PgPool,
    filter: &Filter,
    after: Option<&(DateTime<Utc>, String)>,
    limit: i64,
) -> Result<Vec<Logged>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_key, received_at, envelope::text FROM webhook_worker.inbox
          WHERE provider = $1
            AND ($2::int IS NULL OR business_id = $2)
            AND ($3::timestamptz IS NULL OR received_at >= $3)
            AND ($4::timestamptz IS NULL OR (received_at, event_key) > ($4, $5))
          ORDER BY received_at, event_key
          LIMIT $6",
    )
    .bind(filter.provider.as_str())
    .bind(filter.business.map(|b| b.0))
    .bind(filter.since)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1.clone()))
    .bind(limit)
    .fetch_all(pool)
    .await
}
