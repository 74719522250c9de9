//! Retention: an accepted event's de-duplication key and logged envelope are
//! kept for `EVENT_RETENTION`, then removed (see docs/adr/0010-bounded-inbox.md).
//!
//! - The event log `webhook_worker.inbox` has one partition per UTC day (the
//!   day the worker claimed the event). Days that have ended before the cut are
//!   dropped whole: no dead rows, no vacuum, a few bytes of WAL.
//! - The keys `webhook_worker.inbox_keys` of those days are deleted first: the
//!   keys a day's partition lists (a key and its log row are written in one
//!   transaction), [`PAGE_SLICE`] pages of it (~5,000 keys) per statement, each
//!   its own short transaction; the space they leave is reused by new keys, so
//!   the table keeps its size. A key holds no date of its own (migration 0011).
//!
//! So an event is kept at least `EVENT_RETENTION` and less than a day longer.
//! Every `run`/`work` process runs [`maintain`] at start and every
//! `EVENT_PRUNE_INTERVAL` (at most an hour); an advisory lock lets one of
//! them work at a time, the others find nothing left to do. Nothing in
//! `public` is ever touched.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{Acquire, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::event_log::{EnvelopePacker, key_hash};

/// Days of partitions kept ready ahead of today.
pub const DAYS_AHEAD: i32 = 3;
/// Pages of an expiring day's log whose keys one statement (and transaction)
/// deletes: ~28 logged events a page, so ~5,000 keys.
pub const PAGE_SLICE: i64 = 180;
/// How long a prune waits for the lock of a partition to drop (a worker's
/// transaction holds it for milliseconds); it tries again at the next round.
const LOCK_TIMEOUT: &str = "5s";

pub const PRUNE_LAST_SUCCESS: &str = "micro8gents_prune_last_success_timestamp_seconds";
pub const RETENTION_SECONDS: &str = "micro8gents_event_retention_seconds";
pub const TABLE_BYTES: &str = "micro8gents_table_bytes";
pub const TABLE_ROWS: &str = "micro8gents_table_rows_estimate";
pub const TABLE_OLDEST_AGE: &str = "micro8gents_table_oldest_entry_age_seconds";

/// What one prune removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// The first UTC day kept: everything claimed before it is gone.
    pub kept_from: Option<NaiveDate>,
    /// Days of the event log dropped.
    pub days: Vec<NaiveDate>,
    /// De-duplication keys deleted.
    pub keys: u64,
    /// Whether the old (pre-0006) inbox was dropped because all of it had expired.
    pub legacy_dropped: bool,
    /// Real-Time Transcription segments removed (of sessions that began before the cut).
    pub segments: u64,
}

/// Creates the event log's partitions from yesterday to [`DAYS_AHEAD`] days
/// ahead, those that are missing; returns how many it created.
pub async fn create_partitions<'c>(db: impl sqlx::PgExecutor<'c>) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT webhook_worker.create_inbox_partitions((now() AT TIME ZONE 'UTC')::date - 1,
                                                       (now() AT TIME ZONE 'UTC')::date + $1)",
    )
    .bind(DAYS_AHEAD)
    .fetch_one(db)
    .await
}

/// Removes the keys and logged envelopes of every event claimed on a UTC day
/// that ended before `now - older_than`. Rows in `public` are never touched.
pub async fn prune(pool: &PgPool, older_than: Duration) -> Result<Pruned, sqlx::Error> {
    let older_than = chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
    let cut = Utc::now().checked_sub_signed(older_than).unwrap_or(DateTime::<Utc>::MIN_UTC);
    prune_before(pool, cut).await
}

/// [`prune`] with the cut given as a time.
pub async fn prune_before(pool: &PgPool, cut: DateTime<Utc>) -> Result<Pruned, sqlx::Error> {
    let kept_from = cut.date_naive();
    let mut pruned = Pruned { kept_from: Some(kept_from), ..Pruned::default() };
    let expiring = expiring_days(pool, kept_from).await?;
    pruned.keys = delete_keys_of(pool, &expiring).await?;
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    pruned.days = drop_days(&mut tx, &expiring).await?;
    pruned.legacy_dropped = drop_expired_legacy(&mut tx, cut).await?;
    tx.commit().await?;
    // The same cut as the keys: what began before the first UTC day kept.
    let day_cut = kept_from.and_time(chrono::NaiveTime::MIN).and_utc();
    pruned.segments = crate::workers::transcripts::prune_segments_before(pool, day_cut).await?;
    Ok(pruned)
}

/// The partitions of the event log whose day is before `kept_from`, oldest first.
pub async fn expiring_days(pool: &PgPool, kept_from: NaiveDate) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT partition FROM webhook_worker.inbox_partitions() WHERE day < $1 ORDER BY day")
        .bind(kept_from)
        .fetch_all(pool)
        .await
}

/// Deletes the keys the given partitions of the log list, [`PAGE_SLICE`] pages
/// per statement, each its own transaction; returns how many it deleted.
pub async fn delete_keys_of(pool: &PgPool, partitions: &[String]) -> Result<u64, sqlx::Error> {
    let mut keys = 0;
    for partition in partitions {
        let pages: Option<i64> = sqlx::query_scalar(
            "SELECT pg_relation_size(c.oid) / current_setting('block_size')::int8
               FROM pg_class c WHERE c.oid = to_regclass(format('webhook_worker.%I', $1::text))",
        )
        .bind(partition)
        .fetch_optional(pool)
        .await?;
        // Gone already: another process pruned it meanwhile.
        let Some(pages) = pages else { continue };
        for first in (0..pages).step_by(PAGE_SLICE as usize) {
            let deleted: i64 = sqlx::query_scalar("SELECT webhook_worker.delete_keys_of_logged($1, $2, $3)")
                .bind(partition)
                .bind(first)
                .bind(PAGE_SLICE)
                .fetch_one(pool)
                .await?;
            keys += deleted as u64;
        }
    }
    Ok(keys)
}

/// Drops the given partitions of the log, those still there, and no other: a
/// partition of an expired day that appeared after its keys were deleted (a
/// day copied in by `migrate`, a restore) waits for the next round, which
/// deletes its keys first; dropping it now would leave its keys for ever.
/// Returns the days dropped. Waits at most [`LOCK_TIMEOUT`] for the log's lock.
pub async fn drop_days(tx: &mut PgConnection, partitions: &[String]) -> Result<Vec<NaiveDate>, sqlx::Error> {
    sqlx::query("SELECT set_config('lock_timeout', $1, true)").bind(LOCK_TIMEOUT).execute(&mut *tx).await?;
    // The lock `create_inbox_partitions` and `drop_inbox_partitions` take.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('webhook_worker.inbox partitions'))").execute(&mut *tx).await?;
    let present: Vec<(String, NaiveDate)> = sqlx::query_as(
        "SELECT partition, day FROM webhook_worker.inbox_partitions() WHERE partition = ANY($1) ORDER BY day",
    )
    .bind(partitions)
    .fetch_all(&mut *tx)
    .await?;
    let mut days = Vec::with_capacity(present.len());
    for (partition, day) in present {
        // `inbox_partitions()` lists only `inbox_YYYYMMDD` children of the log; quoted all the same.
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE webhook_worker.\"{}\"", partition.replace('"', "\"\""))))
            .execute(&mut *tx)
            .await?;
        days.push(day);
    }
    Ok(days)
}

/// The old inbox (before migration 0006), left only if `migrate` could not copy
/// it: dropped whole once its newest row is older than the cut.
async fn drop_expired_legacy(tx: &mut sqlx::PgConnection, cut: DateTime<Utc>) -> Result<bool, sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('webhook_worker.inbox_legacy') IS NOT NULL").fetch_one(&mut *tx).await?;
    if !exists {
        return Ok(false);
    }
    let newest: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(received_at) FROM webhook_worker.inbox_legacy").fetch_one(&mut *tx).await?;
    if newest.is_some_and(|t| t >= cut) {
        return Ok(false);
    }
    sqlx::query("DROP TABLE webhook_worker.inbox_legacy").execute(&mut *tx).await?;
    Ok(true)
}

/// One round of upkeep: partitions ahead, then the prune.
pub async fn upkeep(pool: &PgPool, retention: Duration) -> Result<Pruned, sqlx::Error> {
    create_partitions(pool).await?;
    prune(pool, retention).await
}

/// Runs [`upkeep`] now and every `interval` until `shutdown`; a failed round
/// is logged and tried again at the next one.
pub async fn maintain(pool: PgPool, retention: Duration, interval: Duration, shutdown: CancellationToken) {
    metrics::gauge!(RETENTION_SECONDS).set(retention.as_secs_f64());
    loop {
        match upkeep(&pool, retention).await {
            Ok(p) => {
                metrics::gauge!(PRUNE_LAST_SUCCESS).set(Utc::now().timestamp() as f64);
                if !p.days.is_empty() || p.keys > 0 || p.legacy_dropped || p.segments > 0 {
                    info!(days = ?p.days, keys = p.keys, segments = p.segments, legacy_dropped = p.legacy_dropped, kept_from = ?p.kept_from, "pruned expired events");
                }
            }
            Err(e) => warn!(error = %e, "inbox upkeep failed; trying again at the next round"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Copies the old inbox's rows claimed since `now - retention` into the new
/// tables (keys hashed, envelopes compressed), then drops it. Run by
/// `migrate`. It reads only the recent rows (the old `(provider, received_at)`
/// index); an interrupted copy is simply run again: a key already copied is
/// skipped with its log row.
pub async fn convert_legacy(conn: &mut PgConnection, retention: Duration) -> Result<u64, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('webhook_worker.inbox_legacy') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(0);
    }
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let cut = Utc::now().checked_sub_signed(retention).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut packer = EnvelopePacker::new().map_err(|e| sqlx::Error::Protocol(format!("zstd: {e}")))?;
    let mut copied = 0u64;
    for provider in ["twilio", "stripe", "n8n"] {
        // An event is applied after it was received: a day's margin finds every one applied since the cut.
        let mut after = (cut - chrono::Duration::days(1), String::new());
        loop {
            type Row = (String, String, Option<i32>, DateTime<Utc>, DateTime<Utc>, String, String);
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT event_key, kind, business_id, received_at, applied_at, outcome, envelope::text
                   FROM webhook_worker.inbox_legacy
                  WHERE provider = $1 AND (received_at, event_key) > ($2, $3)
                  ORDER BY received_at, event_key LIMIT 2000",
            )
            .bind(provider)
            .bind(after.0)
            .bind(&after.1)
            .fetch_all(&mut *conn)
            .await?;
            let Some(last) = rows.last() else { break };
            after = (last.3, last.0.clone());
            let rows: Vec<&Row> = rows.iter().filter(|r| r.4 >= cut).collect();
            copied += copy_legacy_rows(conn, &mut packer, &rows).await?;
        }
    }
    sqlx::query("DROP TABLE webhook_worker.inbox_legacy").execute(&mut *conn).await?;
    Ok(copied)
}

type LegacyRow = (String, String, Option<i32>, DateTime<Utc>, DateTime<Utc>, String, String);

async fn copy_legacy_rows(
    conn: &mut PgConnection,
    packer: &mut EnvelopePacker,
    rows: &[&LegacyRow],
) -> Result<u64, sqlx::Error> {
    let days: Vec<NaiveDate> = rows.iter().map(|r| r.4.date_naive()).collect();
    let (Some(first), Some(last)) = (days.iter().min(), days.iter().max()) else { return Ok(0) };
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT webhook_worker.create_inbox_partitions($1, $2)")
        .bind(first)
        .bind(last)
        .execute(&mut *tx)
        .await?;
    let hashes: Vec<Vec<u8>> = rows.iter().map(|r| key_hash(&r.0)).collect();
    let new: Vec<Vec<u8>> = sqlx::query_scalar(
        "INSERT INTO webhook_worker.inbox_keys (key_hash)
         SELECT unnest($1::bytea[]) ON CONFLICT DO NOTHING RETURNING key_hash",
    )
    .bind(&hashes)
    .fetch_all(&mut *tx)
    .await?;
    let new: std::collections::HashSet<Vec<u8>> = new.into_iter().collect();
    let rows: Vec<(usize, &&LegacyRow)> = rows.iter().enumerate().filter(|(i, _)| new.contains(&hashes[*i])).collect();
    sqlx::query(
        "INSERT INTO webhook_worker.inbox (key_hash, day, kind, business_id, applied_at, outcome, envelope)
         SELECT * FROM unnest($1::bytea[], $2::date[], $3::text[]::webhook_worker.event_kind[], $4::int4[],
                              $5::timestamptz[], $6::text[], $7::bytea[])",
    )
    .bind(rows.iter().map(|(i, _)| hashes[*i].clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(i, _)| days[*i]).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, r)| r.1.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, r)| r.2).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, r)| r.4).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, r)| r.5.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, r)| packer.pack(r.6.as_bytes())).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// Size, estimated rows and the age of the oldest entry of each of the
/// worker's tables, as Prometheus text. Reads only the catalog (the keys and
/// the log are as old as the log's oldest day: they expire together) and the outbox (empty unless the broker is down), so a
/// scrape costs a few milliseconds however big the tables are.
pub async fn storage_gauges(pool: &PgPool) -> Result<String, sqlx::Error> {
    let tables: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT c.relname::text,
                CASE WHEN c.relkind = 'p'
                     THEN (SELECT COALESCE(sum(pg_total_relation_size(p.relid)), 0)::int8
                             FROM pg_partition_tree(c.oid) p WHERE p.isleaf)
                     ELSE pg_total_relation_size(c.oid) END,
                CASE WHEN c.relkind = 'p'
                     THEN (SELECT COALESCE(sum(greatest(pc.reltuples, 0)), 0)::float8
                             FROM pg_partition_tree(c.oid) p JOIN pg_class pc ON pc.oid = p.relid WHERE p.isleaf)
                     ELSE greatest(c.reltuples, 0)::float8 END
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'webhook_worker' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let (keys_age, outbox_age): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM now() - ((SELECT min(day) FROM webhook_worker.inbox_partitions())::timestamp AT TIME ZONE 'UTC'))::float8,
                EXTRACT(EPOCH FROM now() - (SELECT min(created_at) FROM webhook_worker.outbox))::float8",
    )
    .fetch_one(pool)
    .await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP {TABLE_BYTES} Bytes on disk of each table of the worker's schema, with its indexes and TOAST (a partitioned table: all its partitions)."
    );
    let _ = writeln!(out, "# TYPE {TABLE_BYTES} gauge");
    for (t, bytes, _) in &tables {
        let _ = writeln!(out, "{TABLE_BYTES}{{table=\"{t}\"}} {bytes}");
    }
    let _ = writeln!(
        out,
        "# HELP {TABLE_ROWS} Rows of each table of the worker's schema, as Postgres last estimated them."
    );
    let _ = writeln!(out, "# TYPE {TABLE_ROWS} gauge");
    for (t, _, rows) in &tables {
        let _ = writeln!(out, "{TABLE_ROWS}{{table=\"{t}\"}} {rows}");
    }
    let _ = writeln!(
        out,
        "# HELP {TABLE_OLDEST_AGE} Age of the oldest entry (the inbox: the start of the oldest day kept; 0 when empty)."
    );
    let _ = writeln!(out, "# TYPE {TABLE_OLDEST_AGE} gauge");
    for (t, age) in [("inbox", keys_age), ("inbox_keys", keys_age), ("outbox", outbox_age)] {
        let _ = writeln!(out, "{TABLE_OLDEST_AGE}{{table=\"{t}\"}} {}", age.unwrap_or(0.0).max(0.0));
    }
    Ok(out)
}
