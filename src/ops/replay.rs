//! Replays accepted events from the event log (`webhook_worker.inbox`) through the
//! normal path: each envelope is published again to the events exchange, confirmed,
//! and the worker decides. An event already applied is a duplicate there (its key
//! is in the inbox), so a replay changes nothing that is already right.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::bus::{Publisher, Topology};
use crate::events::Envelope;
use crate::store::inbox;
pub use crate::store::inbox::Filter;

use super::Progress;

/// Rows read from the log at a time.
const PAGE: i64 = 500;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Replayed {
    pub published: u64,
    /// Log rows whose envelope no longer decodes (written by another version): key and reason.
    pub skipped: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the event log: {0}")]
    Db(#[from] sqlx::Error),
    #[error("publishing {key}: {error}")]
    Publish { key: String, error: crate::bus::BusError },
}

/// Publishes every logged event that matches, oldest first, each confirmed before the next.
pub async fn replay(
    pool: &PgPool,
    publisher: &Publisher,
    topo: &Topology,
    filter: &Filter,
) -> Result<Replayed, ReplayError> {
    let progress = Progress::new("replayed");
    let mut done = Replayed::default();
    let mut after: Option<(DateTime<Utc>, String)> = None;
    loop {
        let page = inbox::page(pool, filter, after.as_ref(), PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some((last.1, last.0.clone()));
        for (key, _, envelope) in page {
            let env = match Envelope::from_json(envelope.as_bytes()) {
                Ok(env) => env,
                Err(reason) => {
                    done.skipped.push((key, reason));
                    continue;
                }
            };
            publisher
                .publish_envelope(topo, &env, &env.to_json(), None)
                .await
                .map_err(|error| ReplayError::Publish { key, error })?;
            done.published += 1;
            progress.update(done.published);
        }
    }
    progress.finish(done.published);
    Ok(done)
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
