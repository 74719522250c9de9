//! What `/metrics` reads from outside the process (each dead-letter queue's depth,
//! the notices' included, through an AMQP channel; the outbox's depth, the
//! storage gauges of the worker's tables and the unsent notices by queries),
//! read at most once per
//! `METRICS_GAUGE_REFRESH` and shared by the scrapes in between: the listener is
//! public, and a scrape flood must not become a flood of channels and queries.

use std::time::{Duration, Instant};

use crate::events::Family;
use crate::telemetry;

use super::AppState;

/// One read of the gauges; `None` for what could not be read within a second.
#[derive(Clone, Default)]
pub struct Read {
    pub dlq: Option<Vec<(Family, u32)>>,
    pub outbox: Option<(i64, f64)>,
    pub storage: Option<String>,
    pub notices_unsent: Option<(i64, f64)>,
    pub notices_dlq: Option<u32>,
}

pub struct Gauges {
    every: Duration,
    /// The last read and when it was taken; one scrape reads at a time, the others wait and share it.
    last: tokio::sync::Mutex<Option<(Instant, Read)>>,
}

impl Gauges {
    pub fn new(every: Duration) -> Self {
        Gauges { every, last: tokio::sync::Mutex::new(None) }
    }

    /// The dead-letter depths, the outbox's depth and oldest age, the tables'
    /// storage gauges and the unsent notices; `None` for what could not be read
    /// within a second.
    pub async fn read(&self, state: &AppState) -> Read {
        let mut last = self.last.lock().await;
        if let Some((at, read)) = last.as_ref()
            && at.elapsed() < self.every
        {
            return read.clone();
        }
        metrics::counter!(telemetry::GAUGE_READS).increment(1);
        let limit = Duration::from_secs(1);
        let notice_queues = crate::notify::queue::NoticeQueues::new(&state.topology, &state.cfg.notify_retry_delays);
        let (dlq, outbox, storage, notices_unsent, notices_dlq) = tokio::join!(
            tokio::time::timeout(limit, state.broker.dead_letter_depths(&state.topology)),
            tokio::time::timeout(limit, crate::bus::outbox::depth(&state.pool)),
            tokio::time::timeout(limit, crate::store::retention::storage_gauges(&state.pool)),
            tokio::time::timeout(limit, crate::notify::deliver::unsent(&state.pool)),
            tokio::time::timeout(limit, notice_queues.dead_depth(&state.broker)),
        );
        let read = Read {
            dlq: dlq.ok().and_then(Result::ok),
            outbox: outbox.ok().and_then(Result::ok),
            storage: storage.ok().and_then(Result::ok),
            notices_unsent: notices_unsent.ok().and_then(Result::ok),
            notices_dlq: notices_dlq.ok().and_then(Result::ok),
        };
        *last = Some((Instant::now(), read.clone()));
        read
    }
}
