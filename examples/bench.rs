//! The benchmark of the whole path (issue 6): signed webhooks in, rows in
//! Postgres out, with the machine's own ceilings measured in the same run.
//!
//! ```sh
//! cargo build --release --bin micro8gents --example bench
//! target/release/examples/bench                        # 20,000 calls: 360,000 Twilio events + bookings + Stripe
//! target/release/examples/bench --rate 1000 --calls 2000   # hold 1,000 req/s, report p99 there
//! target/release/examples/bench --serve 2 --work 2     # child processes of target/release/micro8gents
//! ```
//!
//! It creates a fresh database and its own AMQP_PREFIX, seeds businesses and
//! users, signs the whole workload up front (so signatures must be used within
//! Stripe's and Standard Webhooks' five minutes), and then:
//! 1. ceiling: the same load generator against a trivial HTTP server (200 to everything);
//! 2. ceiling: RabbitMQ alone, a quorum queue, persistent messages of the
//!    service's mean envelope size, 64 publishes in flight with confirms, consumed with acks;
//! 3. the service: every request sent, then waits until Postgres holds every
//!    effect and checks the rows (lost and doubled), not just inbox counts.
//!
//! Service settings come from the environment like the service's own
//! (WORKER_CONCURRENCY, BATCH_SIZE, PREFETCH, DATABASE_MAX_CONNECTIONS...);
//! the bench sets DATABASE_URL, AMQP_PREFIX, LISTEN_ADDR, PUBLIC_BASE_URL and
//! STRIPE_WEBHOOK_SECRET itself. Everything is removed at the end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use clap::Parser;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use micro8gents::app::{self, Role, Running};
use micro8gents::bus::Topology;
use micro8gents::config::{Config, DEFAULT_AMQP_URL};
use micro8gents::events::transcription as tr;
use micro8gents::events::twilio::{self as tw, Params};
use micro8gents::events::{BusinessId, Envelope, Event};
use micro8gents::notify::queue::NoticeQueues;
use micro8gents::store;
use micro8gents::verify::twilio::{Algorithm, compute_signature};
use micro8gents::verify::{standard_webhooks, stripe};
use serde_json::json;
use sqlx::{AssertSqlSafe, Connection as _, PgConnection, PgPool};

/// The service's allocator (src/main.rs), so that the in-process service costs what `serve`/`work` do.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PUBLIC_BASE_URL: &str = "https://hooks.bench.test";
const STRIPE_SECRET: &str = "whsec_bench_5f2b8c1d9e7a4f60b3c2d1e0f9a8b7c6";
const N8N_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark of the whole webhook path, with the machine's ceilings measured in the same run")]
struct Args {
    /// Twilio calls; each is four status callbacks, the Real-Time Transcription session
    /// (see --segments), one recording and one `<Record transcribe>` transcription.
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
    /// Final Real-Time Transcription segments per call, sent during the call between
    /// `transcription-started` and `transcription-stopped` (0: no Real-Time session).
    #[arg(long, default_value_t = 10)]
    segments: usize,
    /// n8n booking pushes (one booking each).
    #[arg(long, default_value_t = 2_000)]
    bookings: usize,
    /// Stripe customers; each sends checkout.session.completed, customer.subscription.created, invoice.paid.
    #[arg(long, default_value_t = 500)]
    stripe_users: usize,
    /// Businesses the calls and bookings are spread over.
    #[arg(long, default_value_t = 50)]
    businesses: usize,
    /// The order requests are sent in: `realistic` (hundreds of calls in progress at once, a
    /// call's callbacks 100 or more requests apart, in order) or `back-to-back` (a call's
    /// callbacks one after another, the order of the first benchmarks).
    #[arg(long, value_enum, default_value_t = Order::Realistic)]
    order: Order,
    /// Requests in flight (closed loop). Ignored with --rate.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Hold this many requests per second (open loop; latency counted from each request's scheduled time).
    #[arg(long)]
    rate: Option<u32>,
    /// Run this many `serve` child processes of --bin (0: the service runs in this process).
    #[arg(long, default_value_t = 0)]
    serve: usize,
    /// Run this many `work` child processes of --bin (with --serve).
    #[arg(long, default_value_t = 0)]
    work: usize,
    /// The service binary for --serve/--work.
    #[arg(long, default_value = "target/release/micro8gents")]
    bin: PathBuf,
    /// Skip the two ceiling measurements.
    #[arg(long)]
    no_ceilings: bool,
    /// Messages for the broker ceiling (0: as many as the workload has events).
    #[arg(long, default_value_t = 0)]
    ceiling_messages: usize,
    /// Leave the bench's database in place afterwards (to look at what the run stored).
    #[arg(long)]
    keep_database: bool,
    /// Give up waiting for Postgres after this many seconds without progress.
    #[arg(long, default_value_t = 60)]
    stall_secs: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    Realistic,
    BackToBack,
}

impl Order {
    fn name(self) -> &'static str {
        match self {
            Order::Realistic => "realistic order",
            Order::BackToBack => "back-to-back order",
        }
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

fn admin_url() -> String {
    env_or("BENCH_DATABASE_URL", &env_or("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
}

fn amqp_url() -> String {
    env_or("AMQP_URL", DEFAULT_AMQP_URL)
}

/// One signed request, ready to send.
#[derive(Clone)]
struct Req {
    path: String,
    body: Bytes,
    headers: Vec<(&'static str, String)>,
}

/// What the workload must leave in Postgres.
struct Expect {
    businesses: Vec<i32>,
    users: Vec<i32>,
    calls: usize,
    /// The text every call's `calls.transcript` must hold at the end.
    transcript: String,
    bookings: usize,
    events: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // reqwest is built without a TLS provider of its own.
    micro8gents::twilio_api::install_crypto_provider();
    let args = Args::parse();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db_name = format!("m8_bench_{}", &id[..12]);
    let prefix = format!("bench.{}", &id[..12]);
    let admin = admin_url();
    let mut admin_conn = PgConnection::connect(&admin).await?;
    // BENCH_TEMPLATE: start from a copy of a database of your own (e.g. an inbox
    // pre-filled by scripts/prefill-inbox.sh) instead of template1.
    let template = std::env::var("BENCH_TEMPLATE").unwrap_or_else(|_| "template1".into());
    if !template.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        anyhow::bail!("BENCH_TEMPLATE {template:?}: a database name of letters, digits and _ only");
    }
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {db_name} TEMPLATE {template} STRATEGY FILE_COPY")))
        .execute(&mut admin_conn)
        .await?;
    admin_conn.close().await?;
    let db_url = {
        let mut u = url::Url::parse(&admin)?;
        u.set_path(&db_name);
        u.to_string()
    };
    println!("bench: database {db_name}, AMQP_PREFIX {prefix}");

    let vars = service_vars(&db_url, &prefix);
    let result = match Config::from_vars(&vars) {
        Ok(cfg) => run(&args, &cfg, &vars).await,
        Err(e) => Err(e.into()),
    };
    let (delays, notice_delays) =
        Config::from_vars(&vars).map(|c| (c.retry_delays, c.notify_retry_delays)).unwrap_or_default();
    let topo = Topology::new(&prefix, &delays);
    // The notices' lanes too: a bench that left them would leave 8 idle quorum queues a run.
    let mut queues = topo.all_queues();
    queues.extend(NoticeQueues::new(&topo, &notice_delays).all_queues());
    cleanup(&db_name, &prefix, &queues, &topo.all_exchanges(), args.keep_database).await;
    result
}

/// The service's settings: the environment's, with the bench's own database, names and secrets.
fn service_vars(db_url: &str, prefix: &str) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = std::env::vars().collect();
    for (k, v) in [
        ("DATABASE_URL", db_url),
        ("AMQP_URL", &amqp_url()),
        ("AMQP_PREFIX", prefix),
        ("LISTEN_ADDR", "127.0.0.1:0"),
        ("PUBLIC_BASE_URL", PUBLIC_BASE_URL),
        ("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET),
    ] {
        vars.insert(k.into(), v.into());
    }
    // A Stripe invoice that overtakes its subscription waits one retry delay: keep that short.
    vars.entry("RETRY_DELAYS".into()).or_insert_with(|| "250ms,500ms,1s,2s,5s".into());
    vars
}

async fn run(args: &Args, cfg: &Config, vars: &HashMap<String, String>) -> anyhow::Result<()> {
    let prefix = cfg.amqp_prefix.as_str();
    store::migrate(cfg).await?;
    let pool = PgPool::connect(cfg.database_url.expose()).await?;

    let (expect, requests) = workload(args, &pool).await?;
    println!(
        "workload: {} requests = {} calls x {} Twilio ({} Real-Time segments a call) + {} n8n bookings + {} Stripe users x 3; {} businesses",
        requests.len(),
        args.calls,
        call_params(0, args.segments).len(),
        args.segments,
        args.bookings,
        args.stripe_users,
        args.businesses
    );
    let requests = Arc::new(requests);
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(args.concurrency.max(256)).tcp_nodelay(true).build()?;

    let mut ceilings = Vec::new();
    if !args.no_ceilings {
        let trivial = trivial_server().await?;
        let r = send_on_load_runtime(args, &client, &[format!("http://{trivial}")], &requests).await;
        ceilings.push(format!(
            "ceiling, trivial HTTP server (same load generator): {:.0} req/s, p50 {:.2?} p99 {:.2?} max {:.2?}",
            r.rate(),
            r.pct(0.50),
            r.pct(0.99),
            r.max()
        ));
        println!("{}", ceilings.last().unwrap());
        let size = mean_envelope_size(args.segments);
        let n = if args.ceiling_messages > 0 { args.ceiling_messages } else { expect.events };
        let rate = broker_ceiling(prefix, n, size).await?;
        ceilings.push(format!(
            "ceiling, RabbitMQ alone (quorum, persistent, {size} B, 64 in flight with confirms, consumed with acks): {rate:.0} msgs/s over {n} msgs"
        ));
        println!("{}", ceilings.last().unwrap());
    }

    let (service, bases) = Service::start(args, cfg, vars).await?;
    // The bench's own connection, whose backend the meter counts apart from the service's.
    let mut waiter = PgConnection::connect(cfg.database_url.expose()).await?;
    let waiter_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut waiter).await?;
    let watch = Watch {
        db_name: cfg.database_url.expose().rsplit('/').next().unwrap_or_default().to_string(),
        postmaster: proc_stat(&format!("/proc/{waiter_pid}/stat")).filter(|s| s.0 == "postgres").map(|s| s.1),
        bench_backends: vec![waiter_pid as u32],
        children: service.pids(args),
    };
    if watch.postmaster.is_none() {
        println!("note: Postgres's processes are not visible here (another machine?): its CPU is not measured");
    }
    let wal0: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text").fetch_one(&mut waiter).await?;
    let wal_stats0 = wal_stats(&mut waiter).await?;
    // What the database held before (a BENCH_TEMPLATE's pre-filled inbox): the run's
    // events are the inbox rows applied from now on, its storage what the tables grew.
    let since: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&mut waiter).await?;
    let sizes0 = table_sizes(&mut waiter).await?;
    let load_before = load_average();
    let meter = Meter::start(watch);
    let wall_start: DateTime<Utc> = Utc::now();
    let sent = send_on_load_runtime(args, &client, &bases, &requests).await;
    let settled = wait_settled(&mut waiter, since, expect.events, Duration::from_secs(args.stall_secs)).await?;
    let cpu = meter.stop();
    let load_after = load_average();
    let wal_bytes: i64 = sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::pg_lsn)::int8")
        .bind(&wal0)
        .fetch_one(&mut waiter)
        .await?;
    service.stop().await;

    let check = check_rows(&pool, since, &expect).await?;
    // The last row applied. A segment has no applied time, but every call's last
    // callbacks (its final status, recording, transcription) come after its
    // segments and are in the log.
    let last: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(applied_at) FROM webhook_worker.inbox WHERE applied_at >= $1")
            .bind(since)
            .fetch_one(&pool)
            .await?;
    let e2e = last.map(|t| (t - wall_start).to_std().unwrap_or_default()).unwrap_or(settled);

    println!("---- results ({}) ----", mode(args));
    println!(
        "ingress: {} requests, {} answered 2xx, {} retried after a non-2xx/refusal, {:.0} req/s over {:.2?}",
        requests.len(),
        sent.ok,
        sent.retries,
        sent.rate(),
        sent.elapsed
    );
    println!("answer latency: p50 {:.2?} p99 {:.2?} max {:.2?}", sent.pct(0.50), sent.pct(0.99), sent.max());
    println!(
        "end to end: {:.0} events/s ({} events, first request to last row {:.2?})",
        check.events_applied as f64 / e2e.as_secs_f64(),
        check.events_applied,
        e2e
    );
    println!("inbox outcomes: {}", check.outcomes);
    println!(
        "events lost: {}  doubled: {}  (calls {}/{} complete, {} extra rows; bookings {}/{}, {} extra; subscriptions {}/{}, {} extra; inbox {}/{})",
        check.lost(),
        check.doubled(),
        check.calls_complete,
        expect.calls,
        check.calls_extra,
        check.bookings_ok,
        expect.bookings,
        check.bookings_extra,
        check.subs_ok,
        expect.users.len(),
        check.subs_extra,
        check.events_applied,
        expect.events
    );
    for c in &ceilings {
        println!("{c}");
    }
    print_cpu(&cpu, check.events_applied.max(1), &load_before, &load_after);
    // Backends flush their WAL counters when they end: the service's have by now.
    let wal_stats1 = wal_stats(&mut waiter).await?;
    print_storage(&mut waiter, &sizes0, check.events_applied.max(1), wal_bytes, wal_stats0, wal_stats1).await?;
    waiter.close().await?;
    pool.close().await;
    if check.lost() > 0 || check.doubled() > 0 {
        anyhow::bail!("the end state is wrong");
    }
    Ok(())
}

fn print_cpu(cpu: &CpuUse, events: usize, before: &str, after: &str) {
    let per = |s: f64| s * 1e6 / events as f64;
    println!(
        "cpu while the service ran ({:.1?} wall, first request to last row; load average before {before}, after {after}):",
        cpu.wall
    );
    let mut listed = 0.0;
    let mut parts: Vec<&(String, f64)> = cpu.parts.iter().collect();
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    for (part, secs) in parts {
        listed += secs;
        println!("  {part:42} {secs:7.1} s  {:6.0} µs/event", per(*secs));
    }
    let capacity = cpu.wall.as_secs_f64() * cpu.cores as f64;
    println!(
        "  {:42} {:7.1} s  {:6.0} µs/event",
        "Postgres + RabbitMQ + service + load (ours)",
        cpu.parts
            .iter()
            .filter(|(p, _)| !p.contains("not ours") && !p.starts_with("bench:"))
            .map(|(_, s)| s)
            .sum::<f64>(),
        per(cpu
            .parts
            .iter()
            .filter(|(p, _)| !p.contains("not ours") && !p.starts_with("bench:"))
            .map(|(_, s)| s)
            .sum::<f64>())
    );
    println!(
        "  machine: busy {:.1} s, idle {:.1} s: {:.0}% of {} cores busy; not listed above (others' compilers and tests, kernel) {:.1} s",
        cpu.machine_busy,
        cpu.machine_idle,
        100.0 * cpu.machine_busy / capacity.max(1e-9),
        cpu.cores,
        (cpu.machine_busy - listed).max(0.0)
    );
    let ours: f64 =
        cpu.parts.iter().filter(|(p, _)| !p.contains("not ours") && !p.starts_with("bench:")).map(|(_, s)| s).sum();
    println!(
        "  the path alone (Postgres, RabbitMQ, service, load generator) kept {:.0}% of {} cores busy ({:.2} cores)",
        100.0 * ours / capacity.max(1e-9),
        cpu.cores,
        ours / cpu.wall.as_secs_f64().max(1e-9)
    );
    let service: f64 = cpu.parts.iter().filter(|(p, _)| p.starts_with("service")).map(|(_, s)| s).sum();
    let pg: f64 =
        cpu.parts.iter().filter(|(p, _)| p.starts_with("Postgres") && !p.contains("not ours")).map(|(_, s)| s).sum();
    println!(
        "  per event: Postgres {:.0} µs (service's backends and background), RabbitMQ {:.0} µs, service {:.0} µs, load generator {:.0} µs",
        per(pg - cpu.get("Postgres: the bench's own queries")),
        per(cpu.get("RabbitMQ (beam.smp)")),
        per(service),
        per(cpu.get("load generator"))
    );
}

/// `pg_stat_wal`: (records, full-page images, bytes), cluster-wide.
async fn wal_stats(conn: &mut PgConnection) -> anyhow::Result<(i64, i64, i64)> {
    Ok(sqlx::query_as("SELECT wal_records::int8, wal_fpi::int8, wal_bytes::int8 FROM pg_stat_wal")
        .fetch_one(&mut *conn)
        .await?)
}

/// The worker's schema on disk after the run (tables, indexes and TOAST), and WAL written, per event.
/// Each table of the worker's schema: (name, total, indexes, TOAST) bytes.
type TableSizes = Vec<(String, i64, i64, i64)>;

async fn table_sizes(conn: &mut PgConnection) -> anyhow::Result<TableSizes> {
    Ok(sqlx::query_as(
        "SELECT c.relname::text, pg_total_relation_size(c.oid)::int8, pg_indexes_size(c.oid)::int8,
                COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0)::int8
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'webhook_worker' AND c.relkind IN ('r', 'm')
          ORDER BY 2 DESC",
    )
    .fetch_all(&mut *conn)
    .await?)
}

async fn print_storage(
    conn: &mut PgConnection,
    before: &TableSizes,
    events: usize,
    wal_bytes: i64,
    w0: (i64, i64, i64),
    w1: (i64, i64, i64),
) -> anyhow::Result<()> {
    let after = table_sizes(conn).await?;
    let total: i64 = after.iter().map(|t| t.1).sum();
    let held: i64 = before.iter().map(|t| t.1).sum();
    // A fresh database holds empty tables (a few pages): counted as the run's, as always.
    // A template's pre-filled tables are not the run's: only what they grew is.
    let prefilled = held > 16 << 20;
    let grown = |name: &str, b: i64, f: fn(&(String, i64, i64, i64)) -> i64| {
        b - if prefilled { before.iter().find(|t| t.0 == name).map_or(0, f) } else { 0 }
    };
    let mut tables: Vec<(String, i64, i64, i64)> = after
        .iter()
        .map(|t| (t.0.clone(), grown(&t.0, t.1, |t| t.1), grown(&t.0, t.2, |t| t.2), grown(&t.0, t.3, |t| t.3)))
        .collect();
    tables.sort_by_key(|t| std::cmp::Reverse(t.1));
    let run_total: i64 = tables.iter().map(|t| t.1).sum();
    let per = |b: i64| b as f64 / events as f64;
    if prefilled {
        println!(
            "storage: schema webhook_worker {:.1} MB after the run, {:.1} MB before (the template's); the run added {:.0} B per accepted event",
            total as f64 / 1e6,
            held as f64 / 1e6,
            per(run_total)
        );
    } else {
        println!(
            "storage: schema webhook_worker {:.1} MB after the run, {:.0} B per accepted event (tables + indexes + TOAST)",
            total as f64 / 1e6,
            per(run_total)
        );
    }
    for (name, all, idx, toast) in tables.iter().filter(|t| t.1 > 0).take(6) {
        println!(
            "  {name:28} {:7.0} B/event (indexes {:.0}, TOAST {:.0}, heap {:.0})",
            per(*all),
            per(*idx),
            per(*toast),
            per(all - idx - toast)
        );
    }
    println!(
        "WAL: {:.0} B per event (insert LSN delta {:.1} MB); pg_stat_wal: {:.1} records and {:.2} full-page images per event, {:.0} B/event (cluster-wide: others' writes on a shared server count too)",
        per(wal_bytes),
        wal_bytes as f64 / 1e6,
        (w1.0 - w0.0) as f64 / events as f64,
        (w1.1 - w0.1) as f64 / events as f64,
        per(w1.2 - w0.2)
    );
    Ok(())
}

fn mode(args: &Args) -> String {
    let load = match args.rate {
        Some(r) => format!("fixed rate {r} req/s"),
        None => format!("concurrency {}", args.concurrency),
    };
    let procs = if args.serve > 0 {
        format!("{} serve + {} work processes", args.serve, args.work)
    } else {
        "in-process `run`".to_string()
    };
    format!("{}, {load}, {procs}", args.order.name())
}

// ---- the workload ---------------------------------------------------------------------------

async fn workload(args: &Args, pool: &PgPool) -> anyhow::Result<(Expect, Vec<Req>)> {
    let mut businesses = Vec::new();
    for i in 0..args.businesses.max(1) {
        let user = insert_user(pool, &format!("bench-owner-{i}")).await?;
        let b: i32 = sqlx::query_scalar(
            "INSERT INTO businesses (user_id, business_name, email) VALUES ($1, $2, 'desk@bench.test') RETURNING id",
        )
        .bind(user)
        .bind(format!("Bench clinic {i}"))
        .fetch_one(pool)
        .await?;
        for (kind, config) in
            [("twilio", json!({"auth_token": token(b)})), ("n8n", json!({"webhook_secret": N8N_SECRET}))]
        {
            sqlx::query("INSERT INTO integrations (business_id, type, config, status) VALUES ($1, $2, $3, 'active')")
                .bind(b)
                .bind(kind)
                .bind(config)
                .execute(pool)
                .await?;
        }
        businesses.push(b);
    }
    let mut users = Vec::new();
    for i in 0..args.stripe_users {
        users.push(insert_user(pool, &format!("bench-payer-{i}")).await?);
    }

    // Each request gets a position in [0, 1); the workload is sent in that order.
    let mut slotted: Vec<(f64, Req)> = Vec::new();
    let per_call = call_params(0, args.segments).len();
    let total = (args.calls * per_call + args.bookings + args.stripe_users * 3).max(1);
    let schedule = CallSchedule::new(args.order, args.calls, args.segments, total);
    for i in 0..args.calls {
        let b = businesses[i % businesses.len()];
        for (req, at) in call_requests(i, b, args.segments).into_iter().zip(schedule.positions(i)) {
            slotted.push((at, req));
        }
    }
    for i in 0..args.bookings {
        let b = businesses[i % businesses.len()];
        slotted.push((i as f64 / args.bookings as f64, booking_request(i, b)));
    }
    // A customer's three Stripe events a third of the run apart, as in life (minutes apart).
    let n = args.stripe_users.max(1) as f64;
    for (i, user) in users.iter().enumerate() {
        for (phase, req) in stripe_requests(i, *user).into_iter().enumerate() {
            slotted.push(((phase as f64 + i as f64 / n) / 3.0, req));
        }
    }
    slotted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let requests: Vec<Req> = slotted.into_iter().map(|(_, r)| r).collect();
    let expect = Expect {
        businesses,
        users,
        calls: args.calls,
        transcript: expected_transcript(args.segments),
        bookings: args.bookings,
        events: requests.len(),
    };
    Ok((expect, requests))
}

/// Where a call's callbacks sit in the run (positions in [0, 1)), in the order of
/// [`call_params`].
///
/// Back to back: call `i`'s `k` callbacks take slots `ki .. ki+k-1`. Realistic: calls
/// start evenly over the run and each callback follows the one before it after
/// a gap counted in requests of the whole workload: ringing 100–200 after
/// initiated, answered 100–400 later, completed 200–1,500 later (the
/// conversation), the recording 100–300 after the end and the transcription
/// 300–1,200 after that. So at any moment a few hundred calls of every business
/// are in progress and a worker batch almost never holds two events of one call.
/// The Real-Time Transcription session (started, the segments, stopped) is
/// spread evenly over the conversation, between answered and completed.
struct CallSchedule {
    order: Order,
    calls: usize,
    /// Real-Time Transcription events per call (0, or the segments and their started and stopped).
    realtime: usize,
    /// One request's share of the run, scaled down if a call's span would not fit.
    unit: f64,
    /// The share of the run in which calls start (the rest is the last calls' tail).
    starts: f64,
}

/// Gaps in requests before each callback of a call (the first is its start).
const CALL_GAPS: [(u64, u64); 6] = [(0, 0), (100, 200), (100, 400), (200, 1_500), (100, 300), (300, 1_200)];

impl CallSchedule {
    fn new(order: Order, calls: usize, segments: usize, total_requests: usize) -> Self {
        let longest: u64 = CALL_GAPS.iter().map(|(_, hi)| hi).sum();
        let unit = (1.0 / total_requests as f64).min(0.5 / longest as f64);
        let realtime = if segments == 0 { 0 } else { segments + 2 };
        CallSchedule { order, calls: calls.max(1), realtime, unit, starts: 1.0 - unit * longest as f64 }
    }

    fn positions(&self, i: usize) -> Vec<f64> {
        let k = CALL_GAPS.len() + self.realtime;
        match self.order {
            Order::BackToBack => (0..k).map(|j| (i * k + j) as f64 / (self.calls * k) as f64).collect(),
            Order::Realistic => {
                let mut rng = SplitMix(i as u64);
                let mut at = self.starts * i as f64 / self.calls as f64;
                let mut main: Vec<f64> = CALL_GAPS
                    .iter()
                    .map(|(lo, hi)| {
                        at += (lo + rng.next() % (hi - lo + 1)) as f64 * self.unit;
                        at
                    })
                    .collect();
                // The session's events between answered (2) and completed (3), evenly apart.
                let (answered, completed) = (main[2], main[3]);
                let step = (completed - answered) / (self.realtime + 1) as f64;
                let session = (1..=self.realtime).map(|j| answered + step * j as f64);
                main.splice(3..3, session);
                main
            }
        }
    }
}

/// A small deterministic generator (splitmix64): the same workload every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

async fn insert_user(pool: &PgPool, name: &str) -> anyhow::Result<i32> {
    Ok(sqlx::query_scalar(
        "INSERT INTO users (username, email, password) VALUES ($1, $1 || '@bench.test', 'x') RETURNING id",
    )
    .bind(name)
    .fetch_one(pool)
    .await?)
}

fn token(business: i32) -> String {
    format!("bench-auth-token-{business:08}")
}

/// What a caller and the receptionist say, one final Real-Time segment each, in turn.
const SEGMENT_TEXTS: [&str; 4] = [
    "Hi, I would like to book a cleaning next Tuesday afternoon.",
    "Of course, we have three thirty or four fifteen on Tuesday.",
    "Three thirty works, the name is Jane Doe.",
    "You are booked for Tuesday at three thirty, see you then.",
];

/// Segment `j` (from 0): its track and its text; the caller speaks first.
fn segment(j: usize) -> (&'static str, &'static str, String) {
    let (track, label) = if j.is_multiple_of(2) { ("inbound_track", "Customer") } else { ("outbound_track", "Agent") };
    (track, label, format!("{} ({})", SEGMENT_TEXTS[j % SEGMENT_TEXTS.len()], j + 1))
}

/// The transcript a call ends with: the Real-Time one (a higher source than
/// `<Record transcribe>`, which arrives after it) when there are segments.
fn expected_transcript(segments: usize) -> String {
    if segments == 0 {
        return RECORD_TRANSCRIPT.to_string();
    }
    (0..segments).map(segment).map(|(_, label, text)| format!("{label}: {text}")).collect::<Vec<_>>().join("\n")
}

const RECORD_TRANSCRIPT: &str = "Hi, I would like to book a cleaning next Tuesday afternoon if you have a slot.";

/// Call `i`'s SID of a kind (`CA`, `GT`, `RE`, `TR`): 32 hex digits that look
/// random, as Twilio's do. A counter (`CA000…01`) would compress and index far
/// better than real SIDs and flatter the storage and insert figures.
fn twilio_sid(prefix: &str, i: usize) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{prefix}{i}").as_bytes());
    format!("{prefix}{}", hex::encode(&digest[..16]))
}

/// A call's callbacks, each with its endpoint, in the order Twilio sends them:
/// initiated, ringing, in-progress, the Real-Time session (started, `segments`
/// final segments, stopped; none if 0), completed, recording, transcription.
fn call_params(i: usize, segments: usize) -> Vec<(&'static str, Vec<(String, String)>)> {
    let sid = twilio_sid("CA", i);
    let status = |s: &str, seq: usize| {
        let mut p = vec![
            ("AccountSid", "AC00000000000000000000000000000000".to_string()),
            ("CallSid", sid.clone()),
            ("CallStatus", s.to_string()),
            ("Direction", "inbound".into()),
            ("From", "+14155552671".into()),
            ("To", "+15005550006".into()),
            ("CallerName", "Jane Doe".into()),
            ("SequenceNumber", seq.to_string()),
            ("Timestamp", format!("Tue, 25 Nov 2025 12:00:{:02} +0000", seq * 10)),
            ("ApiVersion", "2010-04-01".into()),
        ];
        if s == "completed" {
            p.push(("CallDuration", "125".into()));
        }
        owned(p)
    };
    let gt = twilio_sid("GT", i);
    let session = segments + 2;
    let realtime = |seq: usize, event: &str| {
        // During the conversation, between in-progress (12:00:20) and completed (12:00:30).
        let ms = 20_000 + 10_000 * seq / (session + 1);
        let mut p = vec![
            ("AccountSid", "AC00000000000000000000000000000000".to_string()),
            ("CallSid", sid.clone()),
            ("TranscriptionSid", gt.clone()),
            ("SequenceId", seq.to_string()),
            ("Timestamp", format!("2025-11-25T12:00:{:02}.{:03}000Z", ms / 1000, ms % 1000)),
            ("TranscriptionEvent", event.to_string()),
        ];
        match event {
            "transcription-started" => p.extend([
                ("Track", "both_tracks".to_string()),
                ("LanguageCode", "en-US".into()),
                ("TranscriptionEngine", "google".into()),
                ("PartialResults", "false".into()),
            ]),
            "transcription-content" => {
                let (track, _, text) = segment(seq - 2);
                p.extend([
                    ("Track", track.to_string()),
                    ("Final", "true".into()),
                    ("LanguageCode", "en-US".into()),
                    ("TranscriptionData", json!({"transcript": text, "confidence": 0.97}).to_string()),
                ]);
            }
            _ => {}
        }
        ("transcription", owned(p))
    };
    let mut all = vec![
        ("call-status", status("initiated", 0)),
        ("call-status", status("ringing", 1)),
        ("call-status", status("in-progress", 2)),
    ];
    if segments > 0 {
        all.push(realtime(1, "transcription-started"));
        all.extend((2..segments + 2).map(|seq| realtime(seq, "transcription-content")));
        all.push(realtime(segments + 2, "transcription-stopped"));
    }
    all.extend([
        ("call-status", status("completed", 3)),
        (
            "recording",
            owned(vec![
                ("AccountSid", "AC00000000000000000000000000000000".into()),
                ("CallSid", sid.clone()),
                ("RecordingSid", twilio_sid("RE", i)),
                ("RecordingStatus", "completed".into()),
                (
                    "RecordingUrl",
                    format!("https://api.twilio.com/2010-04-01/Accounts/AC00/Recordings/{}", twilio_sid("RE", i)),
                ),
                ("RecordingDuration", "120".into()),
            ]),
        ),
        (
            "transcription",
            owned(vec![
                ("AccountSid", "AC00000000000000000000000000000000".into()),
                ("CallSid", sid.clone()),
                ("TranscriptionSid", twilio_sid("TR", i)),
                ("TranscriptionStatus", "completed".into()),
                ("TranscriptionText", RECORD_TRANSCRIPT.into()),
            ]),
        ),
    ]);
    all
}

fn call_requests(i: usize, business: i32, segments: usize) -> Vec<Req> {
    call_params(i, segments)
        .into_iter()
        .map(|(endpoint, params)| {
            let path = format!("/webhooks/twilio/{business}/{endpoint}");
            let sig =
                compute_signature(&token(business), &format!("{PUBLIC_BASE_URL}{path}"), &params, Algorithm::HmacSha1);
            let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish();
            Req {
                path,
                body: Bytes::from(body),
                headers: vec![
                    ("x-twilio-signature", sig),
                    ("content-type", "application/x-www-form-urlencoded".into()),
                ],
            }
        })
        .collect()
}

fn booking_request(i: usize, business: i32) -> Req {
    let body = json!({
        "external_id": format!("bk_bench_{i}"),
        "customer": format!("Customer {i}"),
        "phone": "+14155552671",
        "email": "jane@example.com",
        "service": "Cleaning",
        "date": format!("2026-03-{:02}T14:30:00+02:00", 1 + i % 28),
        "status": "upcoming",
        "notes": "booked by the AI receptionist",
        "workflow": {"id": "wf_1", "execution": i},
    })
    .to_string();
    let id = format!("msg_bench_{i}");
    let ts = Utc::now().timestamp();
    let secret = standard_webhooks::Secret::parse(N8N_SECRET).expect("a whsec_ secret");
    let sig = standard_webhooks::sign(&secret, &id, ts, body.as_bytes());
    Req {
        path: format!("/webhooks/n8n/{business}/bookings"),
        body: Bytes::from(body),
        headers: vec![
            ("webhook-id", id),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig),
            ("content-type", "application/json".into()),
        ],
    }
}

const T0: i64 = 1_764_000_000;

fn stripe_requests(i: usize, user: i32) -> Vec<Req> {
    let (customer, sub, session) = (format!("cus_bench{i}"), format!("sub_bench{i}"), format!("cs_bench{i}"));
    let event = |id: String, kind: &str, created: i64, object: serde_json::Value| {
        json!({"id": id, "object": "event", "api_version": "2025-03-31.basil", "created": created,
               "data": {"object": object}, "livemode": false, "pending_webhooks": 1,
               "request": {"id": null, "idempotency_key": null}, "type": kind})
    };
    let checkout = event(
        format!("evt_bench_cs{i}"),
        "checkout.session.completed",
        T0,
        json!({"id": session, "object": "checkout.session", "client_reference_id": user.to_string(),
               "customer": customer, "subscription": sub, "mode": "subscription", "payment_status": "paid",
               "status": "complete", "livemode": false, "metadata": {}}),
    );
    let item = json!({"id": format!("si_bench{i}"), "object": "subscription_item", "created": T0 - 100,
        "current_period_start": T0, "current_period_end": T0 + 30 * 86_400, "metadata": {},
        "price": {"id": "price_basic", "object": "price", "active": true, "currency": "usd", "lookup_key": "basic",
                  "metadata": {}, "product": "prod_bench", "recurring": {"interval": "month", "interval_count": 1},
                  "type": "recurring", "unit_amount": 4900},
        "quantity": 1, "subscription": sub});
    let subscription = event(
        format!("evt_bench_sub{i}"),
        "customer.subscription.created",
        T0 + 1,
        json!({"id": sub, "object": "subscription", "billing_cycle_anchor": T0 - 100, "cancel_at_period_end": false,
               "collection_method": "charge_automatically", "created": T0 - 100, "currency": "usd",
               "customer": customer, "items": {"object": "list", "data": [item], "has_more": false, "total_count": 1},
               "livemode": false, "metadata": {"user_id": user.to_string()}, "status": "active"}),
    );
    let invoice = event(
        format!("evt_bench_in{i}"),
        "invoice.paid",
        T0 + 2,
        json!({"id": format!("in_bench{i}"), "object": "invoice", "attempt_count": 1,
               "billing_reason": "subscription_create", "customer": customer, "status": "paid",
               "parent": {"type": "subscription_details", "quote_details": null,
                          "subscription_details": {"metadata": {}, "subscription": sub}}}),
    );
    [checkout, subscription, invoice]
        .into_iter()
        .map(|e| {
            let body = serde_json::to_vec_pretty(&e).expect("json");
            let sig = stripe::sign_header(STRIPE_SECRET, Utc::now().timestamp(), &body);
            Req {
                path: "/webhooks/stripe".into(),
                body: Bytes::from(body),
                headers: vec![("stripe-signature", sig), ("content-type", "application/json".into())],
            }
        })
        .collect()
}

fn owned(p: Vec<(&str, String)>) -> Vec<(String, String)> {
    p.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The mean size of the envelopes a call's callbacks become: the broker ceiling's message size.
fn mean_envelope_size(segments: usize) -> usize {
    let b = BusinessId(1);
    let sizes: Vec<usize> = call_params(0, segments)
        .iter()
        .map(|(endpoint, params)| {
            let p = Params(params);
            let (key, event) = match *endpoint {
                "call-status" => {
                    let e = tw::parse_call_status(&p).expect("valid");
                    (tw::call_status_key(b, &e), Event::TwilioCallStatus(e))
                }
                "recording" => {
                    let e = tw::parse_recording(&p).expect("valid");
                    (tw::recording_key(b, &e), Event::TwilioRecording(e))
                }
                _ if tr::is_realtime(params) => {
                    let e = tr::parse_realtime(params).expect("valid");
                    (tr::realtime_key(b, &e), Event::TwilioRealtime(e))
                }
                _ => {
                    let e = tw::parse_transcription(&p).expect("valid");
                    (tw::transcription_key(b, &e), Event::TwilioTranscription(e))
                }
            };
            Envelope::new(key, Some(b), uuid::Uuid::new_v4().simple().to_string(), event).to_json().len()
        })
        .collect();
    sizes.iter().sum::<usize>() / sizes.len()
}

// ---- the load generator ---------------------------------------------------------------------

struct Sent {
    latencies: Vec<Duration>,
    ok: usize,
    retries: usize,
    elapsed: Duration,
}

impl Sent {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        let n = self.latencies.len();
        if n == 0 {
            return Duration::ZERO;
        }
        self.latencies[((n as f64 * p) as usize).min(n - 1)]
    }
    fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or_default()
    }
}

/// Sends every request once successfully (a refused or failed one is sent again,
/// as the providers do), spreading them over `bases` in turn.
async fn send_all(args: &Args, client: &reqwest::Client, bases: &[String], requests: &Arc<Vec<Req>>) -> Sent {
    let started = Instant::now();
    let retries = Arc::new(AtomicUsize::new(0));
    let mut latencies: Vec<Duration> = match args.rate {
        None => {
            let next = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..args.concurrency.max(1))
                .map(|_| {
                    let (client, bases, requests, next, retries) =
                        (client.clone(), bases.to_vec(), requests.clone(), next.clone(), retries.clone());
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(req) = requests.get(i) else { break };
                            let t = Instant::now();
                            send_one(&client, &bases[i % bases.len()], req, &retries).await;
                            lat.push(t.elapsed());
                        }
                        lat
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(requests.len());
            for t in tasks {
                all.extend(t.await.unwrap_or_default());
            }
            all
        }
        Some(rate) => {
            // Open loop: request i is due at i/rate; its latency counts from then, so a
            // stall is not hidden by the generator waiting for it (coordinated omission).
            let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let mut inflight = FuturesUnordered::new();
            let mut all = Vec::with_capacity(requests.len());
            let t0 = tokio::time::Instant::now();
            for i in 0..requests.len() {
                let due = t0 + interval * i as u32;
                loop {
                    tokio::select! {
                        biased;
                        Some(l) = inflight.next(), if !inflight.is_empty() => all.push(l),
                        _ = tokio::time::sleep_until(due) => break,
                    }
                }
                let (client, base, requests, retries) =
                    (client.clone(), bases[i % bases.len()].clone(), requests.clone(), retries.clone());
                inflight.push(tokio::spawn(async move {
                    send_one(&client, &base, &requests[i], &retries).await;
                    due.elapsed()
                }));
            }
            while let Some(l) = inflight.next().await {
                all.push(l);
            }
            all.into_iter().map(|r| r.unwrap_or_default()).collect()
        }
    };
    let elapsed = started.elapsed();
    latencies.sort();
    Sent { ok: latencies.len(), latencies, retries: retries.load(Ordering::Relaxed), elapsed }
}

/// The load generator runs on its own runtime, in threads named `bench-load`, so
/// that its CPU is told apart from an in-process service's.
fn load_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(LOAD_THREAD)
            .enable_all()
            .build()
            .expect("the load generator's runtime")
    })
}

async fn send_on_load_runtime(
    args: &Args,
    client: &reqwest::Client,
    bases: &[String],
    requests: &Arc<Vec<Req>>,
) -> Sent {
    let (args, client, bases, requests) = (args.clone(), client.clone(), bases.to_vec(), requests.clone());
    load_runtime()
        .spawn(async move { send_all(&args, &client, &bases, &requests).await })
        .await
        .expect("load generator")
}

async fn send_one(client: &reqwest::Client, base: &str, req: &Req, retries: &AtomicUsize) {
    for attempt in 0.. {
        let mut r = client.post(format!("{base}{}", req.path)).body(req.body.clone());
        for (k, v) in &req.headers {
            r = r.header(*k, v);
        }
        match r.send().await {
            Ok(resp) if resp.status().is_success() => return,
            Ok(resp) => {
                if attempt < 3 {
                    eprintln!("answer {} on {}: {}", resp.status(), req.path, resp.text().await.unwrap_or_default());
                }
            }
            Err(e) if attempt < 3 => eprintln!("request failed: {e}"),
            Err(_) => {}
        }
        retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(50 * (attempt + 1).min(20))).await;
    }
}

async fn trivial_server() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

// ---- the broker ceiling ---------------------------------------------------------------------

/// RabbitMQ alone: a quorum queue, persistent messages, 64 publishes awaiting
/// confirms at a time, a consumer acking each message. Messages per second
/// from the first publish to the last ack.
async fn broker_ceiling(prefix: &str, n: usize, size: usize) -> anyhow::Result<f64> {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let queue = format!("{prefix}.ceiling");
    let mut qargs = FieldTable::default();
    qargs.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let setup = conn.create_channel().await?;
    setup
        .queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, qargs)
        .await?;

    let consume_ch = conn.create_channel().await?;
    consume_ch.basic_qos(200, BasicQosOptions::default()).await?;
    let mut consumer = consume_ch
        .basic_consume(queue.as_str().into(), "ceiling".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let started = Instant::now();
    let consuming = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            let Some(Ok(d)) = consumer.next().await else { break };
            d.ack(BasicAckOptions::default()).await?;
            got += 1;
        }
        Ok::<_, lapin::Error>(got)
    });

    let publish_ch = conn.create_channel().await?;
    publish_ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = vec![b'x'; size];
    let mut inflight = FuturesUnordered::new();
    for _ in 0..n {
        if inflight.len() >= 64 {
            inflight.next().await.expect("one in flight")?;
        }
        let confirm = publish_ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        inflight.push(confirm);
    }
    while let Some(c) = inflight.next().await {
        c?;
    }
    let got = consuming.await??;
    let elapsed = started.elapsed();
    anyhow::ensure!(got == n, "the ceiling consumer got {got} of {n}");
    let _ = setup.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = conn.close(200, "ceiling done".into()).await;
    Ok(n as f64 / elapsed.as_secs_f64())
}

// ---- the service ----------------------------------------------------------------------------

enum Service {
    InProcess(Running),
    Children(Vec<Child>),
}

impl Service {
    async fn start(
        args: &Args,
        cfg: &Config,
        vars: &HashMap<String, String>,
    ) -> anyhow::Result<(Service, Vec<String>)> {
        if args.serve == 0 {
            let running = app::start(cfg.clone(), Role::Run).await?;
            let base = format!("http://{}", running.addr.expect("the ingress listens"));
            return Ok((Service::InProcess(running), vec![base]));
        }
        let mut children = Vec::new();
        let mut bases = Vec::new();
        let spawn = |role: &str, listen: &str| -> anyhow::Result<Child> {
            let mut cmd = Command::new(&args.bin);
            cmd.arg(role).env_clear().envs(vars).env("LISTEN_ADDR", listen);
            if !vars.contains_key("RUST_LOG") {
                // One log line per accepted and per applied event is a per-event cost of its own.
                cmd.env("RUST_LOG", "warn");
            }
            cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start {}: {e}", args.bin.display()))
        };
        for _ in 0..args.serve {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let listen = format!("127.0.0.1:{port}");
            children.push(spawn("serve", &listen)?);
            bases.push(format!("http://{listen}"));
        }
        for _ in 0..args.work {
            children.push(spawn("work", "127.0.0.1:0")?);
        }
        let service = Service::Children(children);
        let http = reqwest::Client::new();
        for base in &bases {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let ready = http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success());
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    service.stop().await;
                    anyhow::bail!("{base} did not become ready");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok((service, bases))
    }

    /// The child processes and their role (`serve` ones first, as started).
    fn pids(&self, args: &Args) -> Vec<(u32, &'static str)> {
        match self {
            Service::InProcess(_) => Vec::new(),
            Service::Children(children) => children
                .iter()
                .enumerate()
                .map(|(i, c)| (c.id(), if i < args.serve { "serve" } else { "work" }))
                .collect(),
        }
    }

    async fn stop(self) {
        match self {
            Service::InProcess(running) => running.stop().await,
            Service::Children(children) => {
                for c in &children {
                    let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
                }
                for mut c in children {
                    let _ = tokio::task::spawn_blocking(move || c.wait()).await;
                }
            }
        }
    }
}

/// Events settled since `$1`: the event log's rows and the Real-Time segments,
/// which are their own log entries (they have no row in the log).
const SETTLED_SINCE: &str = "SELECT (SELECT count(*) FROM webhook_worker.inbox WHERE applied_at >= $1)
                             + (SELECT count(*) FROM webhook_worker.transcript_segments WHERE received_at >= $1)";

/// Waits until the inbox holds `events` keys; gives up after `stall` without progress.
async fn wait_settled(
    conn: &mut PgConnection,
    since: DateTime<Utc>,
    events: usize,
    stall: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (mut last_n, mut last_change) = (-1i64, Instant::now());
    loop {
        let n: i64 = sqlx::query_scalar(SETTLED_SINCE).bind(since).fetch_one(&mut *conn).await?;
        if n as usize >= events {
            return Ok(started.elapsed());
        }
        if n != last_n {
            (last_n, last_change) = (n, Instant::now());
        } else if last_change.elapsed() > stall {
            eprintln!("no progress for {stall:?} at {n} of {events} events; checking what is there");
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---- the end state --------------------------------------------------------------------------

#[derive(Default)]
struct Check {
    events_applied: usize,
    events_expected: usize,
    calls_complete: usize,
    calls_expected: usize,
    calls_extra: usize,
    bookings_ok: usize,
    bookings_expected: usize,
    bookings_extra: usize,
    subs_ok: usize,
    subs_expected: usize,
    subs_extra: usize,
    outcomes: String,
}

impl Check {
    /// Effects missing: rows that should be there and are not, or events never settled.
    fn lost(&self) -> usize {
        (self.calls_expected - self.calls_complete)
            + (self.bookings_expected - self.bookings_ok)
            + (self.subs_expected - self.subs_ok)
            + self.events_expected.saturating_sub(self.events_applied)
    }
    /// Effects made twice: a second row for one call, booking or subscriber.
    fn doubled(&self) -> usize {
        self.calls_extra + self.bookings_extra + self.subs_extra
    }
}

async fn check_rows(pool: &PgPool, since: DateTime<Utc>, e: &Expect) -> anyhow::Result<Check> {
    let events: i64 = sqlx::query_scalar(SETTLED_SINCE).bind(since).fetch_one(pool).await?;
    let outcomes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT outcome, count(*) FROM webhook_worker.inbox WHERE applied_at >= $1 GROUP BY 1
         UNION ALL
         SELECT 'applied (Real-Time segments, kept as their own rows)', count(*)
           FROM webhook_worker.transcript_segments WHERE received_at >= $1 HAVING count(*) > 0
         ORDER BY 2 DESC",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    // A call is complete when its one row has every callback's effect.
    let (rows, complete): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'completed' AND duration = '2:05' AND end_time IS NOT NULL
                 AND recording LIKE 'https://api.twilio.com/%' AND transcript = $2
                 AND phone = '+14155552671' AND caller = 'Jane Doe')
           FROM calls WHERE business_id = ANY($1)",
    )
    .bind(&e.businesses)
    .bind(&e.transcript)
    .fetch_one(pool)
    .await?;
    let mapped: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT m.call_id) FROM webhook_worker.twilio_calls m JOIN calls c ON c.id = m.call_id
          WHERE c.status = 'completed' AND c.recording IS NOT NULL AND c.transcript IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    let (brows, bok): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM bookings WHERE business_id = ANY($1)),
                (SELECT count(*) FROM webhook_worker.n8n_bookings m JOIN bookings b ON b.id = m.booking_id
                  WHERE b.customer = 'Customer ' || substr(m.external_id, 10) AND b.status = 'upcoming')",
    )
    .bind(&e.businesses)
    .fetch_one(pool)
    .await?;
    let (srows, sok): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT user_id) FILTER (WHERE status = 'active' AND plan = 'basic'
                 AND stripe_subscription_id = 'sub_bench' || substr(stripe_customer_id, 10))
           FROM subscriptions WHERE user_id = ANY($1)",
    )
    .bind(&e.users)
    .fetch_one(pool)
    .await?;
    Ok(Check {
        events_applied: events as usize,
        events_expected: e.events,
        calls_complete: (complete.min(mapped) as usize).min(e.calls),
        calls_expected: e.calls,
        calls_extra: (rows as usize).saturating_sub(e.calls),
        bookings_ok: (bok as usize).min(e.bookings),
        bookings_expected: e.bookings,
        bookings_extra: (brows as usize).saturating_sub(e.bookings),
        subs_ok: (sok as usize).min(e.users.len()),
        subs_expected: e.users.len(),
        subs_extra: (srows as usize).saturating_sub(e.users.len()),
        outcomes: outcomes.iter().map(|(o, n)| format!("{o}: {n}")).collect::<Vec<_>>().join(", "),
    })
}

async fn cleanup(db_name: &str, prefix: &str, queues: &[String], exchanges: &[String], keep_database: bool) {
    if let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            for q in queues.iter().cloned().chain([format!("{prefix}.ceiling")]) {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
            for x in exchanges {
                let _ = ch.exchange_delete(x.as_str().into(), Default::default()).await;
            }
        }
        let _ = conn.close(200, "bench done".into()).await;
    }
    if keep_database {
        println!("bench: kept database {db_name}; removed the {prefix}.* queues and exchanges");
        return;
    }
    if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")))
            .execute(&mut conn)
            .await;
    }
    println!("bench: removed database {db_name} and the {prefix}.* queues and exchanges");
}

// ---- where the CPU goes ---------------------------------------------------------------------

/// The thread names that let the bench tell its own parts apart in `/proc/self/task`.
const LOAD_THREAD: &str = "bench-load";
const METER_THREAD: &str = "bench-meter";

/// CPU seconds of each part of the path while the service ran, sampled from
/// `/proc` every 200 ms (a process that ends between two samples loses at most
/// its last 200 ms). Postgres is the postmaster and its children, told apart by
/// the database in a backend's title; RabbitMQ is every `beam.smp`; the load
/// generator is this process's `bench-load` threads; the service is the
/// `micro8gents` children, or, in process, the rest of this process.
struct Meter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<CpuUse>,
}

/// What the meter knows of the processes to watch.
#[derive(Clone)]
struct Watch {
    db_name: String,
    postmaster: Option<u32>,
    /// Backends of the bench's own queries (waiting for the rows), not the service's.
    bench_backends: Vec<u32>,
    /// `micro8gents` children and their role.
    children: Vec<(u32, &'static str)>,
}

#[derive(Default, Debug)]
struct CpuUse {
    /// CPU seconds per part, in the order first seen.
    parts: Vec<(String, f64)>,
    /// Every core's busy and idle seconds (`/proc/stat`).
    machine_busy: f64,
    machine_idle: f64,
    wall: Duration,
    cores: usize,
}

impl CpuUse {
    fn get(&self, part: &str) -> f64 {
        self.parts.iter().filter(|(p, _)| p == part).map(|(_, s)| s).sum()
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `/proc/<pid>/stat`: (comm, ppid, utime + stime ticks, start time).
fn proc_stat(path: &str) -> Option<(String, u32, u64, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let comm = s[open + 1..close].to_string();
    let rest: Vec<&str> = s[close + 2..].split_whitespace().collect();
    let num = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((comm, num(1)? as u32, num(11)? + num(12)?, num(19)?))
}

/// Every core's (busy, idle) ticks since boot.
fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system [idle iowait] irq softirq steal
    (at(0) + at(1) + at(2) + at(5) + at(6) + at(7), at(3) + at(4))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Watch {
    /// The part a process belongs to, or `None` to leave it out.
    fn part(&self, pid: u32, comm: &str, ppid: u32) -> Option<String> {
        if pid == std::process::id() {
            return None; // counted by thread
        }
        if let Some((_, role)) = self.children.iter().find(|(p, _)| *p == pid) {
            return Some(format!("service: micro8gents {role}"));
        }
        if comm == "beam.smp" {
            return Some("RabbitMQ (beam.smp)".into());
        }
        let postmaster = self.postmaster?;
        if pid == postmaster {
            return Some("Postgres: background".into());
        }
        if ppid != postmaster {
            return None;
        }
        if self.bench_backends.contains(&pid) {
            return Some("Postgres: the bench's own queries".into());
        }
        let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let title = String::from_utf8_lossy(&title).replace('\0', " ");
        Some(if title.split_whitespace().any(|w| w == self.db_name) {
            "Postgres: the service's backends".into()
        } else if title.split_whitespace().any(|w| w == "[local]" || (w.contains('(') && w.ends_with(')'))) {
            // A backend of another database: others' tests on a shared server.
            "Postgres: other databases (not ours)".into()
        } else {
            "Postgres: background".into()
        })
    }
}

impl Meter {
    fn start(watch: Watch) -> Meter {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(METER_THREAD.into())
            .spawn(move || {
                let hz = clock_ticks();
                let started = Instant::now();
                let m0 = machine_ticks();
                // (pid, start time) -> (part, ticks at the first sample or 0 if born later, last ticks)
                let mut seen: HashMap<(u32, u64), (String, u64, u64)> = HashMap::new();
                let mut own: HashMap<u32, (String, u64, u64)> = HashMap::new();
                let mut first = true;
                let own_total =
                    |hz: f64| proc_stat(&format!("/proc/{}/stat", std::process::id())).map_or(0.0, |s| s.2 as f64 / hz);
                let own0 = own_total(hz);
                loop {
                    let stopping = flag.load(Ordering::Relaxed);
                    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                            continue;
                        };
                        let Some((comm, ppid, ticks, start)) = proc_stat(&format!("/proc/{pid}/stat")) else {
                            continue;
                        };
                        if let Some(slot) = seen.get_mut(&(pid, start)) {
                            slot.2 = ticks;
                        } else if let Some(part) = watch.part(pid, &comm, ppid) {
                            seen.insert((pid, start), (part, if first { ticks } else { 0 }, ticks));
                        }
                    }
                    let tasks = format!("/proc/{}/task", std::process::id());
                    for entry in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
                        let Some(tid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                            continue;
                        };
                        if let Some((comm, _, ticks, _)) = proc_stat(&format!("{tasks}/{tid}/stat")) {
                            own.entry(tid).or_insert_with(|| (comm, if first { ticks } else { 0 }, ticks)).2 = ticks;
                        }
                    }
                    first = false;
                    if stopping {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                let m1 = machine_ticks();
                let mut parts: Vec<(String, f64)> = Vec::new();
                let mut add = |part: &str, secs: f64| match parts.iter_mut().find(|(p, _)| p == part) {
                    Some((_, s)) => *s += secs,
                    None => parts.push((part.to_string(), secs)),
                };
                for (part, t0, t1) in seen.values() {
                    add(part, t1.saturating_sub(*t0) as f64 / hz);
                }
                let (mut load, mut meter) = (0.0, 0.0);
                for (comm, t0, t1) in own.values() {
                    let secs = t1.saturating_sub(*t0) as f64 / hz;
                    if comm.starts_with(LOAD_THREAD) {
                        load += secs;
                    } else if comm.starts_with(METER_THREAD) {
                        meter += secs;
                    }
                }
                let rest = (own_total(hz) - own0 - load - meter).max(0.0);
                if watch.children.is_empty() {
                    add("service: in this process (`run`)", rest);
                } else {
                    add("bench: waiting for the rows", rest);
                }
                add("load generator", load);
                add("bench: this meter", meter);
                CpuUse {
                    parts,
                    machine_busy: m1.0.saturating_sub(m0.0) as f64 / hz,
                    machine_idle: m1.1.saturating_sub(m0.1) as f64 / hz,
                    wall: started.elapsed(),
                    cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                }
            })
            .expect("a meter thread");
        Meter { stop, thread }
    }

    fn stop(self) -> CpuUse {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}
