//! Storage stays bounded (issue 16): an event's key and logged envelope are kept
//! for EVENT_RETENTION, then removed whole days at a time, by the running
//! service and by `micro8gents prune`, without touching `public`.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use chrono::{Duration, NaiveDate, Utc};
use common::{TestApp, calls_of};
use micro8gents::events::Envelope;
use micro8gents::store::{event_log, inbox, retention};
use sqlx::{AssertSqlSafe, PgPool};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// The service with a retention long enough that its own hourly round leaves
/// the seeded days alone: the test decides when they are pruned.
async fn spawn_keeping_old_days() -> TestApp {
    TestApp::spawn_with(|v| {
        v.insert("EVENT_RETENTION".into(), "3650d".into());
    })
    .await
}

/// Today as the database's clock has it (UTC): the day the worker claims events on.
async fn today(pool: &PgPool) -> NaiveDate {
    sqlx::query_scalar("SELECT (now() AT TIME ZONE 'UTC')::date").fetch_one(pool).await.unwrap()
}

/// Puts `n` events claimed `days_ago` days ago into the log and the keys, as
/// the worker would have written them then.
async fn seed_day(pool: &PgPool, days_ago: i64, n: usize) -> NaiveDate {
    let day = today(pool).await - Duration::days(days_ago);
    // One transaction: a running service's prune waits for it, then sees the whole day.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT webhook_worker.create_inbox_partitions($1, $1)").bind(day).execute(&mut *tx).await.unwrap();
    let mut packer = event_log::EnvelopePacker::new().unwrap();
    for i in 0..n {
        let key = format!("stripe:evt_seed_{days_ago}_{i}");
        let received = day.and_hms_opt(12, 0, 0).unwrap().and_utc();
        let envelope = format!(
            r#"{{"version":1,"key":"{key}","business_id":null,"received_at":"{}","request_id":"seed","event":{{"kind":"stripe_other","data":{{"id":"evt_seed_{days_ago}_{i}","event_type":"customer.created","created":"{}","api_version":null,"object":{{"object":"customer","id":"cus_1"}}}}}}}}"#,
            received.to_rfc3339(),
            received.to_rfc3339()
        );
        sqlx::query("INSERT INTO webhook_worker.inbox_keys (key_hash) VALUES ($1)")
            .bind(event_log::key_hash(&key))
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO webhook_worker.inbox (key_hash, day, kind, applied_at, outcome, envelope)
             VALUES ($1, $2, 'stripe_other', $3, 'ignored: event type not applied', $4)",
        )
        .bind(event_log::key_hash(&key))
        .bind(day)
        .bind(received)
        .bind(packer.pack(envelope.as_bytes()))
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    day
}

/// Events in the log and keys per claimed day (a key's day is its log row's; a
/// key without a log row, which no prune would ever find, counts on 1970-01-01).
async fn per_day(pool: &PgPool) -> (BTreeMap<NaiveDate, i64>, BTreeMap<NaiveDate, i64>) {
    let q = |sql: &'static str| async move {
        sqlx::query_as::<_, (NaiveDate, i64)>(sql).fetch_all(pool).await.unwrap().into_iter().collect()
    };
    (
        q("SELECT day, count(*) FROM webhook_worker.inbox GROUP BY day").await,
        q("SELECT COALESCE(l.day, '1970-01-01'), count(*)
             FROM webhook_worker.inbox_keys k LEFT JOIN webhook_worker.inbox l USING (key_hash) GROUP BY 1")
        .await,
    )
}

async fn partitions(pool: &PgPool) -> Vec<NaiveDate> {
    sqlx::query_scalar("SELECT day FROM webhook_worker.inbox_partitions()").fetch_all(pool).await.unwrap()
}

/// Every table of `public`, each as one fingerprint of all its rows.
async fn public_fingerprint(pool: &PgPool) -> BTreeMap<String, (i64, String)> {
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut out = BTreeMap::new();
    for t in tables {
        let sql = format!(
            "SELECT count(*), COALESCE(md5(string_agg(r::text, '|' ORDER BY r::text)), '') FROM public.\"{t}\" r"
        );
        let row: (i64, String) = sqlx::query_as(AssertSqlSafe(sql)).fetch_one(pool).await.unwrap();
        out.insert(t, row);
    }
    out
}

fn status(call: &str, status: &str, seq: &str, second: u32) -> Vec<(String, String)> {
    let mut p = vec![
        ("CallSid", call.to_string()),
        ("CallStatus", status.to_string()),
        ("Direction", "inbound".to_string()),
        ("From", "+14155552671".to_string()),
        ("To", "+15005550006".to_string()),
        ("SequenceNumber", seq.to_string()),
        ("Timestamp", format!("Tue, 25 Nov 2025 12:00:{second:02} +0000")),
    ];
    if status == "completed" {
        p.push(("CallDuration", "125".to_string()));
    }
    p.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

async fn post(app: &TestApp, business: i32, params: &[(String, String)]) {
    let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let answer = app.post_twilio(business, "call-status", TOKEN, &borrowed).await;
    assert_eq!(answer.status().as_u16(), 204);
}

/// Waits until today's log holds `n` events.
async fn settled_today(app: &TestApp, n: i64) {
    let day = today(&app.pool).await;
    app.eventually(&format!("{n} events logged today"), || async {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_worker.inbox WHERE day = $1")
            .bind(day)
            .fetch_one(&app.pool)
            .await
            .ok()?;
        (count >= n).then_some(())
    })
    .await
}

#[tokio::test]
async fn the_key_hash_is_the_same_in_rust_and_in_sql() {
    let app = TestApp::spawn().await;
    for key in ["stripe:evt_1", "twilio:status:7:CA1:0:ringing", "n8n:3:msg_ü"] {
        let sql: Vec<u8> = sqlx::query_scalar("SELECT webhook_worker.event_key_hash($1)")
            .bind(key)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(sql, event_log::key_hash(key), "{key}");
    }
    app.stop().await;
}

#[tokio::test]
async fn prune_removes_exactly_the_days_before_the_cut_and_nothing_in_public() {
    let app = spawn_keeping_old_days().await;
    let b = app.twilio_business(TOKEN).await;
    post(&app, b, &status("CA16161616161616161616161616161616", "completed", "2", 9)).await;
    settled_today(&app, 1).await;
    let today = today(&app.pool).await;
    for days_ago in [40, 31, 30, 29, 1] {
        seed_day(&app.pool, days_ago, 3).await;
    }
    let public_before = public_fingerprint(&app.pool).await;

    let out = Command::new(env!("CARGO_BIN_EXE_micro8gents"))
        .args(["prune", "--older-than", "30d"])
        .env("DATABASE_URL", app.cfg.database_url.expose())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The cut is 30 days ago, in the day `today - 30`: every day that ended before it goes.
    let gone = [today - Duration::days(40), today - Duration::days(31)];
    assert!(
        stdout.contains(&format!("2 day(s) of the event log dropped [{}, {}], 6 key(s) deleted", gone[0], gone[1])),
        "{stdout}"
    );

    let (log, keys) = per_day(&app.pool).await;
    let kept: BTreeMap<NaiveDate, i64> = [30, 29, 1].map(|d| (today - Duration::days(d), 3)).into_iter().collect();
    let mut expected = kept.clone();
    expected.insert(today, 1);
    assert_eq!(log, expected);
    assert_eq!(keys, expected);
    let days = partitions(&app.pool).await;
    assert!(!days.contains(&gone[0]) && !days.contains(&gone[1]), "{days:?}");
    assert!(kept.keys().all(|d| days.contains(d)), "{days:?}");
    assert_eq!(public_fingerprint(&app.pool).await, public_before);

    // Run again, nothing is left to remove.
    let again = retention::prune(&app.pool, std::time::Duration::from_secs(30 * 86_400)).await.unwrap();
    assert_eq!((again.days.len(), again.keys), (0, 0));
    app.stop().await;
}

/// Retention deletes a day's keys in slices of its log's pages before it drops
/// the day: every slice deletes the keys its pages list, and only those.
#[tokio::test]
async fn a_days_keys_are_deleted_slice_by_slice_through_its_log() {
    let app = spawn_keeping_old_days().await;
    let day = seed_day(&app.pool, 45, 300).await;
    let other = seed_day(&app.pool, 44, 5).await;
    let part = format!("inbox_{}", day.format("%Y%m%d"));
    let pages: i64 = sqlx::query_scalar(
        "SELECT pg_relation_size(format('webhook_worker.%I', $1::text)::regclass) / current_setting('block_size')::int8",
    )
    .bind(&part)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(pages >= 3, "the seeded day spans {pages} page(s)");
    let mut deleted = Vec::new();
    for first in (0..pages).step_by(2) {
        let n: i64 = sqlx::query_scalar("SELECT webhook_worker.delete_keys_of_logged($1, $2, 2)")
            .bind(&part)
            .bind(first)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        deleted.push(n);
    }
    assert!(deleted.iter().all(|&n| n > 0 && n < 300), "{deleted:?}");
    assert_eq!(deleted.iter().sum::<i64>(), 300);
    let (_, keys) = per_day(&app.pool).await;
    assert_eq!(keys.get(&day), None);
    assert_eq!(keys.get(&other), Some(&5));
    // Anything but a partition of the log is refused.
    let err =
        sqlx::query("SELECT webhook_worker.delete_keys_of_logged('calls', 0, 1)").execute(&app.pool).await.unwrap_err();
    assert!(err.to_string().contains("not a partition of the event log: calls"), "{err}");
    app.stop().await;
}

/// A day of the log that expired but appeared after the prune listed the days
/// (a day `migrate` copied in, a restore, the chaos run's seeder) is not dropped
/// with the listed ones: its keys were not deleted, and would then outlive it
/// for ever. The next round deletes them, then drops it.
#[tokio::test]
async fn a_day_that_appears_during_a_prune_waits_for_the_next_round_with_its_keys() {
    let app = spawn_keeping_old_days().await;
    let listed_day = seed_day(&app.pool, 40, 20).await;
    let kept_from = today(&app.pool).await - Duration::days(30);
    let listed = retention::expiring_days(&app.pool, kept_from).await.unwrap();
    assert_eq!(listed, [format!("inbox_{}", listed_day.format("%Y%m%d"))]);
    assert_eq!(retention::delete_keys_of(&app.pool, &listed).await.unwrap(), 20);
    // Meanwhile another expired day is written, keys and log.
    let late_day = seed_day(&app.pool, 41, 7).await;
    let mut tx = app.pool.begin().await.unwrap();
    let dropped = retention::drop_days(&mut tx, &listed).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(dropped, [listed_day]);
    let (log, keys) = per_day(&app.pool).await;
    assert_eq!(log.get(&late_day), Some(&7), "the late day is still there");
    assert_eq!(keys.get(&late_day), Some(&7), "with its keys");
    assert_eq!(keys.get(&NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()), None, "no key outlives its day");
    // The next round takes it whole.
    let pruned = retention::prune(&app.pool, std::time::Duration::from_secs(30 * 86_400)).await.unwrap();
    assert_eq!((pruned.days, pruned.keys), (vec![late_day], 7));
    let (log, keys) = per_day(&app.pool).await;
    assert!(log.keys().all(|d| *d >= kept_from) && keys.keys().all(|d| *d >= kept_from), "{log:?} {keys:?}");
    app.stop().await;
}

/// The log stores an event's kind as an enum: its values are exactly the kinds
/// the code names, so no event is ever refused for its kind.
#[tokio::test]
async fn the_logs_kinds_are_the_kinds_the_code_names() {
    let app = TestApp::spawn().await;
    let values: Vec<String> = sqlx::query_scalar("SELECT unnest(enum_range(NULL::webhook_worker.event_kind))::text")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(values, micro8gents::events::KINDS);
    app.stop().await;
}

#[tokio::test]
async fn a_bad_older_than_is_named_and_removes_nothing() {
    let app = spawn_keeping_old_days().await;
    seed_day(&app.pool, 40, 2).await;
    let out = Command::new(env!("CARGO_BIN_EXE_micro8gents"))
        .args(["prune", "--older-than", "a month"])
        .env("DATABASE_URL", app.cfg.database_url.expose())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--older-than"), "{out:?}");
    assert_eq!(per_day(&app.pool).await.1.values().sum::<i64>(), 2);
    app.stop().await;
}

#[tokio::test]
async fn the_running_service_prunes_what_expires_and_reports_it() {
    let app = TestApp::spawn_with(|v| {
        v.insert("EVENT_RETENTION".into(), "2d".into());
        v.insert("EVENT_PRUNE_INTERVAL".into(), "200ms".into());
    })
    .await;
    let today = today(&app.pool).await;
    let old = seed_day(&app.pool, 3, 4).await;
    let young = seed_day(&app.pool, 2, 4).await;
    app.eventually("the expired day pruned", || async {
        // The keys go first, then the day's log partition (its own transaction).
        let (log, keys) = per_day(&app.pool).await;
        (!keys.contains_key(&old) && !log.contains_key(&old)).then_some(())
    })
    .await;
    let (log, keys) = per_day(&app.pool).await;
    assert_eq!(log, BTreeMap::from([(young, 4)]));
    assert_eq!(keys, BTreeMap::from([(young, 4)]));
    // Partitions are ready for the days ahead.
    let days = partitions(&app.pool).await;
    for ahead in 0..=retention::DAYS_AHEAD {
        assert!(days.contains(&(today + Duration::days(ahead.into()))), "{days:?}");
    }

    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    let gauge = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(gauge("micro8gents_table_bytes{table=\"inbox\"}") > 0.0);
    assert!(gauge("micro8gents_table_bytes{table=\"inbox_keys\"}") > 0.0);
    assert!(gauge("micro8gents_table_bytes{table=\"twilio_calls\"}") > 0.0);
    let oldest = gauge("micro8gents_table_oldest_entry_age_seconds{table=\"inbox\"}");
    assert!((2.0 * 86_400.0..3.0 * 86_400.0).contains(&oldest), "{oldest}");
    assert_eq!(gauge("micro8gents_event_retention_seconds"), 2.0 * 86_400.0);
    assert!(gauge("micro8gents_prune_last_success_timestamp_seconds") > (Utc::now().timestamp() - 60) as f64);
    app.stop().await;
}

#[tokio::test]
async fn a_duplicate_arriving_after_its_key_was_pruned_does_not_move_a_row_backwards() {
    let app = TestApp::spawn().await;
    let b = app.twilio_business(TOKEN).await;
    let call = "CA27272727272727272727272727272727";
    let ringing = status(call, "ringing", "0", 1);
    let completed = status(call, "completed", "2", 9);
    post(&app, b, &ringing).await;
    post(&app, b, &status(call, "in-progress", "1", 3)).await;
    post(&app, b, &completed).await;
    settled_today(&app, 3).await;
    let before = calls_of(&app.pool, b).await;
    assert_eq!(before[0].status, "completed");

    // Everything claimed before tomorrow is pruned: today's keys and log are gone.
    let tomorrow = (today(&app.pool).await + Duration::days(1)).and_hms_opt(0, 0, 0).unwrap().and_utc();
    let pruned = retention::prune_before(&app.pool, tomorrow).await.unwrap();
    assert_eq!(pruned.keys, 3);
    assert_eq!(per_day(&app.pool).await, (BTreeMap::new(), BTreeMap::new()));

    // Twilio sends the callbacks again: the keys are new, the row guards decide.
    // (Today's partition is gone too: the worker creates it again and goes on.)
    post(&app, b, &ringing).await;
    post(&app, b, &completed).await;
    settled_today(&app, 2).await;
    assert_eq!(calls_of(&app.pool, b).await, before);
    let ringing_outcome: String = sqlx::query_scalar(
        "SELECT outcome FROM webhook_worker.inbox WHERE key_hash = webhook_worker.event_key_hash($1)",
    )
    .bind(format!("twilio:status:{b}:{call}:0:ringing"))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(ringing_outcome.starts_with("ignored"), "{ringing_outcome}");
    app.stop().await;
}

#[tokio::test]
async fn pruning_while_events_are_applied_loses_nothing() {
    let app = spawn_keeping_old_days().await;
    let b = app.twilio_business(TOKEN).await;
    for days_ago in 40..60 {
        seed_day(&app.pool, days_ago, 20).await;
    }
    let calls: Vec<String> = (0..40).map(|i| format!("CA{i:032}")).collect();
    let pool = app.pool.clone();
    // One old day dropped after another while the callbacks are applied.
    let pruner = tokio::spawn(async move {
        let mut dropped = 0;
        for days_ago in (39..60).rev() {
            let cut = Utc::now() - Duration::days(days_ago);
            dropped += retention::prune_before(&pool, cut).await.unwrap().days.len();
        }
        dropped
    });
    let sends = calls.iter().map(|call| {
        let app = &app;
        async move {
            for (s, seq, second) in [("ringing", "0", 1), ("in-progress", "1", 3), ("completed", "2", 9)] {
                post(app, b, &status(call, s, seq, second)).await;
            }
        }
    });
    futures_util::future::join_all(sends).await;
    assert_eq!(pruner.await.unwrap(), 20);
    settled_today(&app, 120).await;
    let rows = calls_of(&app.pool, b).await;
    assert_eq!(rows.len(), 40);
    assert!(rows.iter().all(|c| c.status == "completed" && c.duration.as_deref() == Some("2:05")), "{rows:?}");
    let (log, keys) = per_day(&app.pool).await;
    let today = today(&app.pool).await;
    assert_eq!(log, BTreeMap::from([(today, 120)]));
    assert_eq!(keys, log);
    app.stop().await;
}

#[tokio::test]
async fn an_old_inbox_is_copied_within_the_retention_and_then_dropped() {
    // A deployment from before migration 0006, with a month and a half of events.
    let mut old = common::OldDeployment::at(5, "legacy").await;
    let (db, cfg, url) = (&mut old.conn, old.cfg.clone(), old.url.clone());
    let envelope = |key: &str, at: chrono::DateTime<Utc>| {
        format!(
            r#"{{"version":1,"key":"{key}","business_id":null,"received_at":"{}","request_id":"r","event":{{"kind":"stripe_other","data":{{"id":"x","event_type":"customer.created","created":"{}","api_version":null,"object":{{"object":"customer","id":"cus_1"}}}}}}}}"#,
            at.to_rfc3339(),
            at.to_rfc3339()
        )
    };
    for days_ago in [45, 31, 29, 2] {
        let at = Utc::now() - Duration::days(days_ago);
        let key = format!("stripe:evt_legacy_{days_ago}");
        sqlx::query(
            "INSERT INTO webhook_worker.inbox (event_key, provider, kind, received_at, applied_at, outcome, envelope)
             VALUES ($1, 'stripe', 'stripe_other', $2, $2, 'ignored: event type not applied', $3::json)",
        )
        .bind(&key)
        .bind(at)
        .bind(envelope(&key, at))
        .execute(&mut *db)
        .await
        .unwrap();
    }

    micro8gents::store::migrate(&cfg).await.unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    let legacy: bool =
        sqlx::query_scalar("SELECT to_regclass('webhook_worker.inbox_legacy') IS NULL").fetch_one(&pool).await.unwrap();
    assert!(legacy, "the old inbox is dropped once copied");
    let rows: Vec<(Vec<u8>, NaiveDate, String, Vec<u8>)> =
        sqlx::query_as("SELECT key_hash, day, outcome, envelope FROM webhook_worker.inbox ORDER BY applied_at")
            .fetch_all(&pool)
            .await
            .unwrap();
    // Within the default 30 days: the events of 29 and 2 days ago, each on the day it was applied.
    assert_eq!(rows.len(), 2, "{rows:?}");
    let today = today(&pool).await;
    for ((hash, day, outcome, stored), days_ago) in rows.iter().zip([29, 2]) {
        let key = format!("stripe:evt_legacy_{days_ago}");
        assert_eq!(hash, &event_log::key_hash(&key));
        assert_eq!(*day, today - Duration::days(days_ago));
        assert_eq!(outcome, "ignored: event type not applied");
        let json: serde_json::Value = serde_json::from_slice(&event_log::unpack(stored).unwrap()).unwrap();
        assert_eq!(json["key"], key.as_str());
    }
    // Their keys still make a redelivery a duplicate.
    let mut tx = pool.begin().await.unwrap();
    let copied: Vec<Envelope> =
        rows.iter().map(|r| Envelope::from_json(&event_log::unpack(&r.3).unwrap()).unwrap()).collect();
    assert!(inbox::claim_all(&mut tx, &copied.iter().collect::<Vec<_>>()).await.unwrap().is_empty());
    tx.rollback().await.unwrap();
    // Migrating again changes nothing.
    micro8gents::store::migrate(&cfg).await.unwrap();
    assert_eq!(per_day(&pool).await.0.values().sum::<i64>(), 2);

    pool.close().await;
    old.drop_database().await;
}
