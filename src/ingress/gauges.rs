//! What `/metrics` reads from outside the process (each dead-letter queue's depth
//! through an AMQP channel, the outbox's depth and the storage gauges of the
//! worker's tables by queries), read at most once per
//! `METRICS_GAUGE_REFRESH` and shared by the scrapes in between: the listener is
//! public, and a scrape flood must not become a flood of channels and queries.

use std::time::{Duration, Instant};

use crate::events::Family;
use crate::telemetry;

use super::AppState;

type Read = (Option<Vec<(Family, u32)>>, Option<(i64, f64)>, Option<String>);

pub struct Gauges {
    every: Duration,
    /// The last read and when it was taken; one scrape reads at a time, the others wait and share it.
    last: tokio::sync::Mutex<Option<(Instant, Read)>>,
}

impl Gauges {
    pub fn new(every: Duration) -> Self {
        Gauges { every, last: tokio::sync::Mutex::new(None) }
    }

    /// The dead-letter depths, the outbox's depth and oldest age, and the tables'
    /// storage gauges; `None` for what could not be read within a second.
    pub async fn read(&self, state: &AppState) -> Read {
        let mut last = self.last.lock().await;
        if let Some((at, read)) = last.as_ref()
            && at.elapsed() < self.every
        {
            return read.clone();
        }
        metrics::counter!(telemetry::GAUGE_READS).increment(1);
        let limit = Duration::from_secs(1);
        let (dlq, outbox, storage) = tokio::join!(
            tokio::time::timeout(limit, state.broker.dead_letter_depths(&state.topology)),
            tokio::time::timeout(limit, crate::bus::outbox::depth(&state.pool)),
            tokio::time::timeout(limit, crate::store::retention::storage_gauges(&state.pool)),
        );
        let read = (dlq.ok().and_then(Result::ok), outbox.ok().and_then(Result::ok), storage.ok().and_then(Result::ok));
        *last = Some((Instant::now(), read.clone()));
        read
    }
}
