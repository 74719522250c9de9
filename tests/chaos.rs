//! Chaos run: a few thousand signed callbacks against real `micro8gents serve`
//! and `work` processes while the real RabbitMQ is restarted and a worker is
//! killed with SIGKILL. Then it checks that every callback answered 2xx is
//! applied exactly once in effect.
//!
//! It restarts the shared broker, so it is `#[ignore]`d in the parallel suite;
//! `.ci/run` runs it alone afterwards:
//! `cargo nextest run --test chaos --run-ignored only --no-capture`.
//! `CHAOS_CALLS` (default 500, six callbacks each) sets the size.
//!
//! It also runs with a short `EVENT_RETENTION` (1d, pruned every second by the
//! work processes) while old days are added to the event log throughout the
//! load, so whole partitions are dropped while events are being applied.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{admin_url, amqp_url};
use futures_util::{StreamExt, stream};
use micro8gents::bus::Topology;
use micro8gents::config::parse_duration;
use micro8gents::events::BusinessId;
use micro8gents::events::twilio::{self as tw, Params};
use micro8gents::verify::twilio::{Algorithm, compute_signature};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

const TOKEN: &str = "c4a05c4a05c4a05c4a05c4a05c4a05c4";
const PUBLIC: &str = "https://hooks.example.com";

struct Callback {
    path: String,
    params: Vec<(String, String)>,
    key: String,
}

fn callbacks(business: i32, i: usize) -> Vec<Callback> {
    let sid = format!("CA{i:032x}");
    let b = BusinessId(business);
    let mut out = Vec::new();
    for (seq, status) in ["initiated", "ringing", "in-progress", "completed"].iter().enumerate() {
        let mut p = vec![
            ("CallSid", sid.clone()),
            ("CallStatus", status.to_string()),
            ("Direction", "inbound".into()),
            ("From", "+14155552671".into()),
            ("SequenceNumber", seq.to_string()),
            ("Timestamp", format!("Tue, 25 Nov 2025 12:00:{:02} +0000", seq * 10)),
        ];
        if *status == "completed" {
            p.push(("CallDuration", "125".into()));
        }
        let params = owned(p);
        let key = tw::call_status_key(b, &tw::parse_call_status(&Params(&params)).unwrap());
        out.push(Callback { path: format!("/webhooks/twilio/{business}/call-status"), params, key });
    }
    let rec = owned(vec![
        ("CallSid", sid.clone()),
        ("RecordingSid", format!("RE{i:032x}")),
        ("RecordingStatus", "completed".into()),
        ("RecordingUrl", format!("https://api.twilio.com/Recordings/RE{i:032x}")),
    ]);
    let key = tw::recording_key(b, &tw::parse_recording(&Params(&rec)).unwrap());
    out.push(Callback { path: format!("/webhooks/twilio/{business}/recording"), params: rec, key });
    let tr = owned(vec![
        ("CallSid", sid),
        ("TranscriptionSid", format!("TR{i:032x}")),
        ("TranscriptionStatus", "completed".into()),
        ("TranscriptionText", "Please book me in for Tuesday.".into()),
    ]);
    let key = tw::transcription_key(b, &tw::parse_transcription(&Params(&tr)).unwrap());
    out.push(Callback { path: format!("/webhooks/twilio/{business}/transcription"), params: tr, key });
    out
}

fn owned(p: Vec<(&str, String)>) -> Vec<(String, String)> {
    p.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

struct Fleet {
    env: Vec<(String, String)>,
    children: Vec<Child>,
}

impl Fleet {
    fn spawn(&mut self, command: &str) -> usize {
        let child = Command::new(env!("CARGO_BIN_EXE_micro8gents"))
            .arg(command)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("micro8gents starts");
        self.children.push(child);
        self.children.len() - 1
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// Stops the broker's app; starts it again when dropped, even if the test fails meanwhile.
struct BrokerRestart;

impl BrokerRestart {
    fn stop() -> Self {
        rabbitmqctl(&["stop_app"]);
        BrokerRestart
    }
}

impl Drop for BrokerRestart {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").stdout(Stdio::null()).status();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl").args(args).stdout(Stdio::null()).status().expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared RabbitMQ; run alone (see the module docs)"]
async fn every_answered_event_is_applied_exactly_once_through_a_broker_restart_and_a_killed_worker() {
    let calls: usize = std::env::var("CHAOS_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db_name = format!("m8_chaos_{}", &id[..12]);
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {db_name}"))).execute(&mut admin).await.unwrap();
    let mut db_url = url::Url::parse(&admin_url()).unwrap();
    db_url.set_path(&db_name);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let env: Vec<(String, String)> = [
        ("DATABASE_URL", db_url.to_string()),
        ("AMQP_URL", amqp_url()),
        ("AMQP_PREFIX", format!("chaos.{}", &id[..12])),
        ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
        ("PUBLIC_BASE_URL", PUBLIC.to_string()),
        ("PUBLISH_TIMEOUT", "2s".into()),
        ("RETRY_DELAYS", "200ms,1s".into()),
        ("RUST_LOG", "error".into()),
        ("EVENT_RETENTION", "1d".into()),
        ("EVENT_PRUNE_INTERVAL", "1s".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let status = Command::new(env!("CARGO_BIN_EXE_micro8gents"))
        .arg("migrate")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .status()
        .unwrap();
    assert!(status.success(), "migrate");
    let pool = PgPool::connect(db_url.as_str()).await.unwrap();
    let business = create_business(&pool).await;

    let mut fleet = Fleet { env, children: Vec::new() };
    fleet.spawn("serve");
    let first_worker = fleet.spawn("work");
    fleet.spawn("work");
    let base = format!("http://127.0.0.1:{port}");
    micro8gents::twilio_api::install_crypto_provider();
    let http = reqwest::Client::new();
    wait_ready(&http, &base).await;

    let all: Vec<Callback> = (0..calls).flat_map(|i| callbacks(business, i)).collect();
    let total = all.len();
    let progress = Arc::new(AtomicUsize::new(0));
    let load = {
        let (http, base, progress) = (http.clone(), base.clone(), progress.clone());
        tokio::spawn(async move { send_all(http, base, all, progress).await })
    };
    // Expired days keep appearing while the load runs; the workers drop them.
    let seeding = tokio_util::sync::CancellationToken::new();
    let seeder = tokio::spawn(seed_expired_days(pool.clone(), seeding.clone()));

    // Chaos while the load runs: restart the broker at 25%, SIGKILL a worker at 55%.
    wait_for(&progress, total / 4).await;
    eprintln!("chaos: restarting RabbitMQ");
    {
        let _restart = BrokerRestart::stop();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    rabbitmqctl(&["await_startup"]);
    wait_for(&progress, total * 55 / 100).await;
    eprintln!("chaos: killing a worker with SIGKILL");
    fleet.children[first_worker].kill().unwrap();
    fleet.children[first_worker].wait().unwrap();
    fleet.spawn("work");

    let results = load.await.unwrap();
    seeding.cancel();
    let seeded_days = seeder.await.unwrap();
    let answered: Vec<&Callback> = results.iter().filter(|(_, s)| *s == Some(204)).map(|(c, _)| c).collect();
    let refused_503 = results.iter().filter(|(_, s)| *s == Some(503)).count();
    let failed = results.iter().filter(|(_, s)| s.is_none()).count();
    let other = results.len() - answered.len() - refused_503 - failed;

    // Wait for the outbox to drain and the workers to settle everything answered.
    let keys: Vec<String> = answered.iter().map(|c| c.key.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let found = loop {
        let (found,): (i64,) = sqlx::query_as("SELECT count(*) FROM webhook_worker.inbox_keys WHERE key_hash IN (SELECT webhook_worker.event_key_hash(k) FROM unnest($1::text[]) k)")
            .bind(&keys)
            .fetch_one(&pool)
            .await
            .unwrap();
        if found as usize == keys.len() || Instant::now() > deadline {
            break found as usize;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (outbox,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM webhook_worker.outbox").fetch_one(&pool).await.unwrap();

    // Effects: one row per call that had any callback answered, and each answered fact is on it.
    let touched: HashSet<String> = answered.iter().map(|c| c.params[0].1.clone()).collect();
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM calls WHERE business_id = $1")
        .bind(business)
        .fetch_one(&pool)
        .await
        .unwrap();
    // A doubled call would be a second row that the CallSid map does not point at.
    let (mapped,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM webhook_worker.twilio_calls WHERE business_id = $1 AND call_id IS NOT NULL",
    )
    .bind(business)
    .fetch_one(&pool)
    .await
    .unwrap();
    let duplicates = (rows - mapped) as usize;
    let completed =
        answered.iter().filter(|c| c.params.iter().any(|(k, v)| k == "CallStatus" && v == "completed")).count();
    let (completed_rows,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM calls WHERE business_id = $1 AND status = 'completed'")
            .bind(business)
            .fetch_one(&pool)
            .await
            .unwrap();
    let lost = keys.len() - found;
    // Every expired day is gone soon after the load (the workers prune every second).
    let deadline = Instant::now() + Duration::from_secs(30);
    let expired_left = loop {
        let (left,): (i64,) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM webhook_worker.inbox WHERE day < (now() AT TIME ZONE 'UTC')::date - 1)
                  + (SELECT count(*) FROM webhook_worker.inbox_keys k WHERE NOT EXISTS (
                        SELECT 1 FROM webhook_worker.inbox l
                         WHERE l.key_hash = k.key_hash AND l.day >= (now() AT TIME ZONE 'UTC')::date - 1))",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if left == 0 || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    println!(
        "chaos: sent={total} answered_2xx={} answered_503={refused_503} failed_to_connect={failed} other={other} \
         found_in_postgres={found} duplicates={duplicates} lost={lost} calls_rows={rows} completed={completed_rows}/{completed} outbox_left={outbox} \
         expired_days_seeded={seeded_days} expired_rows_left={expired_left}",
        answered.len()
    );
    drop(fleet);
    pool.close().await;
    cleanup(&db_name, &mut admin).await;

    assert_eq!(lost, 0, "every 2xx is applied");
    assert!(seeded_days > 0, "old days were added during the load");
    assert_eq!(expired_left, 0, "every expired day was pruned");
    assert_eq!(duplicates, 0, "nothing doubled");
    assert_eq!(rows as usize, touched.len(), "one calls row per call");
    assert_eq!(completed_rows as usize, completed, "every answered completion is on its call");
    assert_eq!(other, 0, "no answer other than 204, 503 or a refused connection");
    assert!(answered.len() * 2 > total, "most of the load was accepted");
}

/// Adds an expired day (two days ago and older) to the event log every 300 ms
/// until `stop`; returns how many it added.
async fn seed_expired_days(pool: PgPool, stop: tokio_util::sync::CancellationToken) -> usize {
    let mut added = 0;
    while !stop.is_cancelled() {
        let days_ago = 2 + added as i32;
        // One transaction: the partition's advisory lock keeps the workers' prune out until the day is whole.
        let seeded = async {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "SELECT webhook_worker.create_inbox_partitions((now() AT TIME ZONE 'UTC')::date - $1,
                                                               (now() AT TIME ZONE 'UTC')::date - $1)",
            )
            .bind(days_ago)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "WITH d AS (SELECT (now() AT TIME ZONE 'UTC')::date - $1 AS day),
                      k AS (INSERT INTO webhook_worker.inbox_keys (key_hash)
                            SELECT webhook_worker.event_key_hash('chaos:expired:' || $1 || ':' || g)
                              FROM generate_series(1, 50) g)
                 INSERT INTO webhook_worker.inbox (key_hash, day, kind, applied_at, outcome, envelope)
                 SELECT webhook_worker.event_key_hash('chaos:expired:' || $1 || ':' || g), d.day, 'stripe_other',
                        d.day::timestamp AT TIME ZONE 'UTC', 'applied', '\\x007b7d'::bytea
                   FROM d, generate_series(1, 50) g",
            )
            .bind(days_ago)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        }
        .await;
        if let Err(e) = seeded {
            eprintln!("chaos: could not add an expired day: {e}");
        }
        added += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    added
}

async fn send_all(
    http: reqwest::Client,
    base: String,
    all: Vec<Callback>,
    progress: Arc<AtomicUsize>,
) -> Vec<(Callback, Option<u16>)> {
    stream::iter(all)
        .map(|c| {
            let (http, base, progress) = (http.clone(), base.clone(), progress.clone());
            async move {
                let sig = compute_signature(TOKEN, &format!("{PUBLIC}{}", c.path), &c.params, Algorithm::HmacSha1);
                let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&c.params).finish();
                let r = http
                    .post(format!("{base}{}", c.path))
                    .header("x-twilio-signature", sig)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .timeout(Duration::from_secs(20))
                    .body(body)
                    .send()
                    .await;
                progress.fetch_add(1, Ordering::SeqCst);
                let status = r.ok().map(|r| r.status().as_u16());
                (c, status)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

async fn wait_for(progress: &AtomicUsize, n: usize) {
    while progress.load(Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the ingress did not get ready");
}

async fn create_business(pool: &PgPool) -> i32 {
    let (business,): (i32,) = sqlx::query_as(
        "WITH u AS (INSERT INTO users (username, email, password) VALUES ('chaos', 'chaos@example.com', 'x') RETURNING id)
         INSERT INTO businesses (user_id, business_name, email) SELECT id, 'Chaos Clinic', 'c@example.com' FROM u RETURNING id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO integrations (business_id, type, config, status) VALUES ($1, 'twilio', $2, 'active')")
        .bind(business)
        .bind(serde_json::json!({ "auth_token": TOKEN }))
        .execute(pool)
        .await
        .unwrap();
    business
}

async fn cleanup(db_name: &str, admin: &mut PgConnection) {
    let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))).execute(admin).await;
    let prefix = format!("chaos.{}", &db_name["m8_chaos_".len()..]);
    let delays = vec![parse_duration("200ms").unwrap(), parse_duration("1s").unwrap()];
    let topo = Topology::new(&prefix, &delays);
    if let Ok(conn) = lapin::Connection::connect(&amqp_url(), Default::default()).await
        && let Ok(ch) = conn.create_channel().await
    {
        for q in topo.all_queues() {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
        for x in topo.all_exchanges() {
            let _ = ch.exchange_delete(x.as_str().into(), Default::default()).await;
        }
        let _ = conn.close(200, "bye".into()).await;
    }
}
