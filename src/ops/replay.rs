//! Replays accepted events from the event log (`webhook_worker.inbox`) through the
//! normal path: each envelope is published again to the events exchange, confirmed,
//! and the worker decides. An event already applied is a duplicate there (its key
//! is in the inbox), so a replay changes nothing that is already right.

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::PgPool;

use crate::bus::{Pending, Publisher, Topology};
use crate::events::{Envelope, Provider};
pub use crate::store::inbox::Filter;
use crate::store::{event_log, inbox};

use super::Progress;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Replayed {
    pub published: u64,
    /// Log rows whose envelope no longer decodes (written by another version): key hash and reason.
    pub skipped: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the event log: {0}")]
    Db(#[from] sqlx::Error),
    #[error("publishing {key}: {error}")]
    Publish { key: String, error: crate::bus::BusError },
}

/// Publishes every logged event that matches, oldest first, each confirmed
/// before the next; then (Twilio) the Real-Time segments, which are their own
/// log entries, session by session.
pub async fn replay(
    pool: &PgPool,
    publisher: &Publisher,
    topo: &Topology,
    filter: &Filter,
) -> Result<Replayed, ReplayError> {
    let progress = Progress::new("replayed");
    let mut done = Replayed::default();
    for day in inbox::days(pool, filter.since).await? {
        let mut rows = inbox::read_day(pool, day, filter);
        while let Some((hash, stored)) = rows.try_next().await? {
            let env = match event_log::unpack(&stored).and_then(|json| Envelope::from_json(&json)) {
                Ok(env) if filter.since.is_none_or(|t| env.received_at >= t) => env,
                Ok(_) => continue,
                Err(reason) => {
                    done.skipped.push((format!("key hash {}", hex::encode(hash)), reason));
                    continue;
                }
            };
            publish(publisher, topo, &env, &mut done, &progress).await?;
        }
    }
    // Real-Time segments are their own log entries (migration 0012): rebuilt from their rows.
    if filter.provider == Provider::Twilio {
        let mut segments = crate::workers::transcripts::logged_segments(pool, filter.business, filter.since);
        while let Some(env) = segments.try_next().await? {
            publish(publisher, topo, &env, &mut done, &progress).await?;
        }
    }
    progress.finish(done.published);
    Ok(done)
}

/// Publishes one envelope again, confirmed, and counts it.
async fn publish(
    publisher: &Publisher,
    topo: &Topology,
    env: &Envelope,
    done: &mut Replayed,
    progress: &Progress,
) -> Result<(), ReplayError> {
    publisher
        .publish_events(topo, env.event.family(), &[&Pending::of(env, env.to_json(), None)])
        .await
        .map_err(|error| ReplayError::Publish { key: env.key.clone(), error })?;
    done.published += 1;
    progress.update(done.published);
    Ok(())
}

/// `--since`: an RFC 3339 time, or a duration back from now (`2h`, `30m`).
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago = crate::config::parse_duration(s)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration like 2h"))?;
    let ago = chrono::Duration::from_std(ago).map_err(|e| e.to_string())?;
    Ok(Utc::now() - ago)
}
