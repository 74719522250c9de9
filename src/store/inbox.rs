//! The de-duplication keys (`webhook_worker.inbox_keys`) and the event log
//! (`webhook_worker.inbox`): every statement a worker or `replay` runs on them
//! is here, so their shape can change in one place. Keeping them bounded
//! (partitions ahead, pruning) is [`super::retention`]; how a key and an
//! envelope are stored is [`super::event_log`] (docs/adr/0010-bounded-inbox.md).
//!
//! A worker claims an event's key in the transaction that applies it (a key
//! already there means "already applied": skip), releases it when the event is
//! to be retried or parked, and logs every event it settled, with its outcome,
//! in one statement before the commit. `replay` reads the log back day by day.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use futures_util::stream::BoxStream;
use sqlx::{PgConnection, PgPool};

use super::event_log::key_hash;
use crate::events::{BusinessId, Envelope, Provider};

/// Claims the keys of the envelopes in one statement; returns the keys that
/// were new (a key already there is a redelivery, and so is a second copy
/// within `envs`).
pub async fn claim_all<'a>(tx: &mut PgConnection, envs: &[&'a Envelope]) -> Result<HashSet<&'a str>, sqlx::Error> {
    if envs.is_empty() {
        return Ok(HashSet::new());
    }
    let by_hash: HashMap<Vec<u8>, &'a str> = envs.iter().map(|env| (key_hash(&env.key), env.key.as_str())).collect();
    let inserted: Vec<Vec<u8>> = sqlx::query_scalar(
        "INSERT INTO webhook_worker.inbox_keys (key_hash) SELECT unnest($1::bytea[])
         ON CONFLICT (key_hash) DO NOTHING RETURNING key_hash",
    )
    .bind(envs.iter().map(|env| key_hash(&env.key)).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    Ok(inserted.iter().filter_map(|h| by_hash.get(h).copied()).collect())
}

/// Claims one event's key; false if it was already there (a redelivery).
pub async fn claim(tx: &mut PgConnection, env: &Envelope) -> Result<bool, sqlx::Error> {
    Ok(!claim_all(tx, &[env]).await?.is_empty())
}

/// Gives a key back (the event will be retried or parked, not applied).
pub async fn release(tx: &mut PgConnection, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM webhook_worker.inbox_keys WHERE key_hash = $1")
        .bind(key_hash(key))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// One settled event for the log.
pub struct Settled {
    pub key_hash: Vec<u8>,
    pub kind: &'static str,
    pub business_id: Option<i32>,
    /// `applied`, or `ignored: <why>`.
    pub outcome: String,
    /// The envelope's stored form ([`super::event_log::EnvelopePacker::pack`]).
    pub envelope: Vec<u8>,
}

/// Logs the settled events of a batch, in one statement, in today's partition.
pub async fn log(tx: &mut PgConnection, events: &[Settled]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO webhook_worker.inbox (key_hash, kind, business_id, outcome, envelope)
         SELECT * FROM unnest($1::bytea[], $2::text[]::webhook_worker.event_kind[], $3::int4[], $4::text[], $5::bytea[])",
    )
    .bind(events.iter().map(|e| e.key_hash.as_slice()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.kind).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.business_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.outcome.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.envelope.as_slice()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Whether a write failed because the log has no partition for today (its
/// upkeep has not run yet): creating them and trying again fixes it.
pub fn is_missing_partition(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23514") && db.message().contains("no partition"))
}

/// Which logged events to read back.
#[derive(Debug, Clone)]
pub struct Filter {
    pub provider: Provider,
    pub business: Option<BusinessId>,
    /// Only events received at or after this time.
    pub since: Option<DateTime<Utc>>,
}

/// The days the log holds that may have events received since `since`, oldest
/// first (an event is claimed on or after the day it was received).
pub async fn days(pool: &PgPool, since: Option<DateTime<Utc>>) -> Result<Vec<NaiveDate>, sqlx::Error> {
    sqlx::query_scalar("SELECT day FROM webhook_worker.inbox_partitions() WHERE $1::date IS NULL OR day >= $1")
        .bind(since.map(|t| t.date_naive()))
        .fetch_all(pool)
        .await
}

/// A logged event: its key hash and its envelope's stored form.
pub type Logged = (Vec<u8>, Vec<u8>);

/// The logged events of one day that match `filter`, in the order they were
/// applied, read in one pass (the day's partition is scanned and sorted once).
/// With `since`, also events received before it but applied after: the
/// caller checks the envelope's `received_at` (the log keeps the time only there).
pub fn read_day<'a>(pool: &'a PgPool, day: NaiveDate, filter: &Filter) -> BoxStream<'a, Result<Logged, sqlx::Error>> {
    sqlx::query_as(
        "SELECT key_hash, envelope FROM webhook_worker.inbox
          WHERE day = $1 AND starts_with(kind::text, $2 || '_')
            AND ($3::int IS NULL OR business_id = $3)
            AND ($4::timestamptz IS NULL OR applied_at >= $4)
          ORDER BY applied_at, key_hash",
    )
    .bind(day)
    .bind(filter.provider.as_str())
    .bind(filter.business.map(|b| b.0))
    .bind(filter.since)
    .fetch(pool)
}
