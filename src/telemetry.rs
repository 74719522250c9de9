//! What an operator sees: Prometheus metrics.
//!
//! Counters and histograms are recorded through the `metrics` crate wherever
//! the thing happens (the ingress's accept and refusal, the publisher, the
//! worker's settle). One recorder per process, installed on first use, so
//! several services started in one process (the tests) share it. Gauges that
//! describe *this* process's surroundings (dead-letter depth, pool, outbox) are
//! read at scrape time by their owners into a [`Snapshot`] and appended to the
//! text, so they are never stale and never mixed up between two services in
//! one process. This module imports neither the bus nor the store.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::events::Family;

pub const EVENTS_ACCEPTED: &str = "micro8gents_events_accepted_total";
pub const EVENTS_REJECTED: &str = "micro8gents_events_rejected_total";
pub const EVENTS_DUPLICATE: &str = "micro8gents_events_duplicate_total";
pub const HTTP_DURATION: &str = "micro8gents_http_request_duration_seconds";
pub const PUBLISH_CONFIRM_DURATION: &str = "micro8gents_publish_confirm_duration_seconds";
pub const EVENT_MESSAGES_PUBLISHED: &str = "micro8gents_event_messages_published_total";
pub const APPLY_DURATION: &str = "micro8gents_apply_duration_seconds";
pub const BATCHES: &str = "micro8gents_batches_total";
pub const EVENTS_APPLIED: &str = "micro8gents_events_applied_total";
pub const EVENTS_IGNORED: &str = "micro8gents_events_ignored_total";
/// Events put back into their lane's next batch because another worker's transaction held their call.
pub const EVENTS_DEFERRED: &str = "micro8gents_events_deferred_total";
pub const EVENTS_RETRIED: &str = "micro8gents_events_retried_total";
pub const EVENTS_DEAD_LETTERED: &str = "micro8gents_events_dead_lettered_total";
pub const DLQ_DEPTH: &str = "micro8gents_dlq_messages";
pub const POOL_CONNECTIONS: &str = "micro8gents_db_pool_connections";
pub const OUTBOX_DEPTH: &str = "micro8gents_outbox_messages";
pub const OUTBOX_OLDEST_AGE: &str = "micro8gents_outbox_oldest_age_seconds";
pub const REQUESTS_SHED: &str = "micro8gents_http_requests_shed_total";
pub const BODY_TIMEOUTS: &str = "micro8gents_http_body_timeouts_total";
pub const SECRET_READS: &str = "micro8gents_secret_reads_total";
pub const SECRET_READS_OVER_BUDGET: &str = "micro8gents_secret_reads_over_budget_total";
pub const GAUGE_READS: &str = "micro8gents_metrics_gauge_reads_total";
pub const SIGNATURE_MACS: &str = "micro8gents_signature_macs_total";
pub const NOTICES_SENT: &str = "micro8gents_notices_sent_total";
pub const NOTICES_RETRIED: &str = "micro8gents_notices_retried_total";
pub const NOTICES_PARKED: &str = "micro8gents_notices_parked_total";
pub const NOTICES_SKIPPED: &str = "micro8gents_notices_skipped_total";
pub const NOTICES_REFUSED: &str = "micro8gents_notices_refused_total";
pub const NOTICES_DEFERRED: &str = "micro8gents_notices_deferred_total";
pub const NOTICES_UNSENT: &str = "micro8gents_notices_unsent";
pub const NOTICES_OLDEST_UNSENT: &str = "micro8gents_notices_oldest_unsent_age_seconds";

/// Seconds: from a fast confirm (1 ms) to the publish timeout and beyond.
const BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Histograms are folded this often; a scrape folds them too.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder once and returns the handle that renders it.
/// If some other recorder was installed first, the handle renders nothing recorded,
/// but scraping still works.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder =
            PrometheusBuilder::new().set_buckets(BUCKETS).expect("bucket list is not empty").build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only gauges");
        }
        describe();
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                }
            })
            .expect("metrics upkeep thread");
        handle
    })
}

fn describe() {
    describe_counter!(
        EVENTS_ACCEPTED,
        "Webhooks accepted: confirmed by the broker or kept in the outbox, and the sender got a 2xx."
    );
    describe_counter!(
        EVENTS_REJECTED,
        "Webhooks refused, by reason (signature, timestamp, unknown_business, validation, too_large, unavailable)."
    );
    describe_counter!(
        EVENTS_DUPLICATE,
        "Events a worker found already applied (redeliveries, sender retries, replays)."
    );
    describe_histogram!(HTTP_DURATION, metrics::Unit::Seconds, "Time from request to answer on a webhook endpoint.");
    describe_histogram!(PUBLISH_CONFIRM_DURATION, metrics::Unit::Seconds, "Time from publish to the broker's confirm.");
    describe_counter!(
        EVENT_MESSAGES_PUBLISHED,
        "Messages the ingress published for accepted events; accepted events per message is the packing (PUBLISH_PACK)."
    );
    describe_histogram!(APPLY_DURATION, metrics::Unit::Seconds, "Time to apply one batch to Postgres.");
    describe_counter!(BATCHES, "Batches applied by the workers.");
    describe_counter!(EVENTS_APPLIED, "Events that changed the database.");
    describe_counter!(
        EVENTS_IGNORED,
        "Events recorded but changing nothing (stale, or a kind not applied), by reason."
    );
    describe_counter!(
        EVENTS_DEFERRED,
        "Events put into their lane's next batch because another worker's transaction held their call."
    );
    describe_counter!(EVENTS_RETRIED, "Events sent to a delay queue to be tried again later.");
    describe_counter!(EVENTS_DEAD_LETTERED, "Events parked in a dead-letter queue.");
    describe_counter!(
        REQUESTS_SHED,
        "Requests answered 503 at once because MAX_REQUESTS_IN_FLIGHT were being handled."
    );
    describe_counter!(
        BODY_TIMEOUTS,
        "Requests answered 408 because their body did not arrive within BODY_READ_TIMEOUT."
    );
    describe_counter!(
        SECRET_READS,
        "Database reads of per-business secrets (cache misses, re-checks, and one per warm-up of the cache)."
    );
    describe_counter!(
        SECRET_READS_OVER_BUDGET,
        "Secret reads refused because SECRET_FRESH_READS_PER_SEC was spent (unknown ids, re-checks)."
    );
    describe_counter!(
        GAUGE_READS,
        "Times /metrics read the dead-letter depths, the outbox, the tables' sizes and the unsent notices (at most once per METRICS_GAUGE_REFRESH)."
    );
    describe_counter!(NOTICES_SENT, "Notices delivered to a business's n8n (a 2xx answer), by kind.");
    describe_counter!(NOTICES_RETRIED, "Notice tries that failed and were queued to be tried again, by kind.");
    describe_counter!(NOTICES_PARKED, "Notices parked in the notices dead-letter queue, by kind and reason.");
    describe_counter!(NOTICES_SKIPPED, "Notices not sent because notices were turned off after they were decided.");
    describe_counter!(NOTICES_REFUSED, "Notices whose notify_url is an address the SSRF guard refuses.");
    describe_counter!(NOTICES_DEFERRED, "Notice messages put back because their receiver had its share in flight.");
}

/// Counts a request refused because too many were in flight.
pub fn shed() {
    metrics::counter!(REQUESTS_SHED).increment(1);
}

/// Counts an accepted webhook (confirmed by the broker, or kept in the outbox).
pub fn accepted(provider: &'static str, endpoint: &'static str) {
    metrics::counter!(EVENTS_ACCEPTED, "provider" => provider, "endpoint" => endpoint).increment(1);
}

/// Counts a refused webhook by its reason (`ApiError::reason`).
pub fn rejected(provider: &'static str, endpoint: &'static str, reason: &'static str) {
    metrics::counter!(EVENTS_REJECTED, "provider" => provider, "endpoint" => endpoint, "reason" => reason).increment(1);
}

pub fn http_duration(provider: &'static str, endpoint: &'static str, took: Duration) {
    metrics::histogram!(HTTP_DURATION, "provider" => provider, "endpoint" => endpoint).record(took.as_secs_f64());
}

/// This process's surroundings at scrape time, read by whoever owns them
/// (the bus, the outbox, the pool); `None` when it could not be read in time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Each family's dead-letter queue depth.
    pub dlq: Option<Vec<(Family, u32)>>,
    /// The pool's connections: (size, idle).
    pub pool: Option<(u32, u32)>,
    /// The outbox's depth and the age of its oldest row in seconds.
    pub outbox: Option<(i64, f64)>,
    /// The worker schema's tables: size, rows and oldest entry, already in the
    /// text format (`store::retention::storage_gauges`).
    pub storage: Option<String>,
    /// MACs computed by this process's signature checks so far.
    pub macs: u64,
    /// Notices neither delivered nor parked yet, and the age of the oldest in seconds.
    pub notices_unsent: Option<(i64, f64)>,
    /// The notices' dead-letter queue depth.
    pub notices_dlq: Option<u32>,
}

/// The whole text for one scrape: what was recorded, then the snapshot's gauges.
pub fn render(snapshot: &Snapshot) -> String {
    let handle = install();
    handle.run_upkeep();
    let mut out = handle.render();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if let Some(depths) = &snapshot.dlq {
        let _ = writeln!(out, "# HELP {DLQ_DEPTH} Messages parked in each family's dead-letter queue.");
        let _ = writeln!(out, "# TYPE {DLQ_DEPTH} gauge");
        for (family, n) in depths {
            let _ = writeln!(out, "{DLQ_DEPTH}{{family=\"{}\"}} {n}", family.as_str());
        }
        if let Some(n) = snapshot.notices_dlq {
            let _ = writeln!(out, "{DLQ_DEPTH}{{family=\"notices\"}} {n}");
        }
    }
    if let Some((size, idle)) = snapshot.pool {
        let idle = idle.min(size);
        let _ = writeln!(out, "# HELP {POOL_CONNECTIONS} Postgres connections of this process's pool, by state.");
        let _ = writeln!(out, "# TYPE {POOL_CONNECTIONS} gauge");
        let _ = writeln!(out, "{POOL_CONNECTIONS}{{state=\"in_use\"}} {}", size - idle);
        let _ = writeln!(out, "{POOL_CONNECTIONS}{{state=\"idle\"}} {idle}");
    }
    if let Some((depth, age)) = snapshot.outbox {
        let _ = writeln!(out, "# HELP {OUTBOX_DEPTH} Events in the Postgres outbox waiting to be published.");
        let _ = writeln!(out, "# TYPE {OUTBOX_DEPTH} gauge");
        let _ = writeln!(out, "{OUTBOX_DEPTH} {depth}");
        let _ = writeln!(out, "# HELP {OUTBOX_OLDEST_AGE} Age of the oldest event in the outbox (0 when empty).");
        let _ = writeln!(out, "# TYPE {OUTBOX_OLDEST_AGE} gauge");
        let _ = writeln!(out, "{OUTBOX_OLDEST_AGE} {age}");
    }
    if let Some(storage) = &snapshot.storage {
        out.push_str(storage);
    }
    let _ = writeln!(
        out,
        "# HELP {SIGNATURE_MACS} MACs computed to check signatures: the work a request costs, refused or not."
    );
    let _ = writeln!(out, "# TYPE {SIGNATURE_MACS} counter");
    let _ = writeln!(out, "{SIGNATURE_MACS} {}", snapshot.macs);
    if let Some((unsent, age)) = snapshot.notices_unsent {
        let _ = writeln!(
            out,
            "# HELP {NOTICES_UNSENT} Notices to businesses' n8n decided but neither delivered nor parked."
        );
        let _ = writeln!(out, "# TYPE {NOTICES_UNSENT} gauge");
        let _ = writeln!(out, "{NOTICES_UNSENT} {unsent}");
        let _ = writeln!(out, "# HELP {NOTICES_OLDEST_UNSENT} Age of the oldest unsent notice (0 when none).");
        let _ = writeln!(out, "# TYPE {NOTICES_OLDEST_UNSENT} gauge");
        let _ = writeln!(out, "{NOTICES_OLDEST_UNSENT} {age}");
    }
    out
}
