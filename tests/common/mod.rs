//! The test harness: each test starts the real service (ingress and workers)
//! on port 0 against its own fresh database and its own RabbitMQ names, so
//! tests run in parallel against the real Postgres and RabbitMQ.
//!
//! `TEST_DATABASE_URL` (an admin URL that may create databases) and `AMQP_URL`
//! override the local defaults.
#![allow(dead_code)]

pub mod dashboard;
pub mod proxy;
pub mod receiver;
pub mod tls;
pub mod twilio_api;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use micro8gents::app::{self, Role, Running};
use micro8gents::bus::Topology;
use micro8gents::config::{Config, DEFAULT_AMQP_URL};
use micro8gents::notify::queue::NoticeQueues;
use micro8gents::store;
use micro8gents::verify::twilio::{Algorithm, compute_signature};
use proxy::Proxy;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

pub const PUBLIC_BASE_URL: &str = "https://hooks.example.com";

/// A `micro8gents` child process, killed if the test fails before it stops it.
pub struct Binary(pub std::process::Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into())
}

fn database_url(admin: &str, name: &str) -> String {
    let mut url = url::Url::parse(admin).expect("admin url");
    url.set_path(name);
    url.to_string()
}

/// A database of its own whose worker schema is migrated only to `version`: a
/// deployment from before a later migration. `conn` is open on it (search path
/// `webhook_worker`) for the test to fill; `cfg` points `migrate` at it.
pub struct OldDeployment {
    pub name: String,
    pub url: String,
    pub cfg: Config,
    pub conn: sqlx::PgConnection,
    admin: sqlx::PgConnection,
}

impl OldDeployment {
    pub async fn at(version: i64, prefix: &str) -> Self {
        use sqlx::Connection;
        let name = format!("m8_test_{prefix}_{}", uuid::Uuid::new_v4().simple());
        let admin_url = admin_url();
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
        let url = database_url(&admin_url, &name);
        let vars = std::collections::HashMap::from([("DATABASE_URL".to_string(), url.clone())]);
        let cfg = Config::from_vars(&vars).unwrap();
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("CREATE SCHEMA webhook_worker").execute(&mut conn).await.unwrap();
        sqlx::query("SET search_path TO webhook_worker").execute(&mut conn).await.unwrap();
        let migrator =
            sqlx::migrate::Migrator::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations"))
                .await
                .unwrap();
        migrator.run_to(version, &mut conn).await.unwrap();
        OldDeployment { name, url, cfg, conn, admin }
    }

    /// Drops the database (after the test's pools are closed).
    pub async fn drop_database(mut self) {
        use sqlx::Connection;
        let _ = self.conn.close().await;
        let drop = format!("DROP DATABASE {} WITH (FORCE)", self.name);
        sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut self.admin).await.unwrap();
    }
}

pub struct TestApp {
    pub base: String,
    /// A direct connection to the test's database (never through a proxy).
    pub pool: PgPool,
    pub cfg: Config,
    pub http: reqwest::Client,
    /// Set by `spawn_proxied`: the service reaches Postgres and RabbitMQ through these.
    pub pg_proxy: Option<Proxy>,
    pub amqp_proxy: Option<Proxy>,
    db_name: String,
    direct_db_url: String,
    running: Option<Running>,
}

/// `host:port` of a URL, resolved.
fn socket_of(url: &str) -> std::net::SocketAddr {
    let u = url::Url::parse(url).unwrap();
    let host = u.host_str().unwrap();
    let port = u.port_or_known_default().unwrap_or(match u.scheme() {
        "amqp" => 5672,
        _ => 5432,
    });
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).unwrap().next().unwrap()
}

fn via(url: &str, proxy: &Proxy) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_host(Some("127.0.0.1")).unwrap();
    u.set_port(Some(proxy.addr.port())).unwrap();
    u.to_string()
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// Starts the service with the test defaults, changed by `tweak`.
    pub async fn spawn_with(tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
        Self::spawn_inner(false, tweak).await
    }

    /// Like `spawn_with`, but the service reaches Postgres and RabbitMQ through
    /// proxies the test can cut (`pg_proxy`, `amqp_proxy`).
    pub async fn spawn_proxied(tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
        Self::spawn_inner(true, tweak).await
    }

    /// Like `spawn_with`, on a database whose `public` the dashboard made first with `dashboard_sql`
    /// (e.g. [`dashboard::DASHBOARD_SQL`]); `migrate` adopts it.
    pub async fn spawn_on_dashboard(dashboard_sql: &str, tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
        Self::spawn_prepared(false, Some(dashboard_sql), tweak).await
    }

    async fn spawn_inner(proxied: bool, tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
        Self::spawn_prepared(proxied, None, tweak).await
    }

    async fn spawn_prepared(
        proxied: bool,
        dashboard_sql: Option<&str>,
        tweak: impl FnOnce(&mut HashMap<String, String>),
    ) -> TestApp {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db_name = format!("m8_test_{id}");
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.expect("admin connection to Postgres");
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {db_name}"))).execute(&mut conn).await.unwrap();
        conn.close().await.ok();
        if let Some(sql) = dashboard_sql {
            let mut conn = PgConnection::connect(&database_url(&admin, &db_name)).await.unwrap();
            sqlx::raw_sql(AssertSqlSafe(sql.to_string())).execute(&mut conn).await.expect("the dashboard's SQL");
            conn.close().await.ok();
        }

        let mut vars: HashMap<String, String> = [
            ("DATABASE_URL", database_url(&admin, &db_name)),
            ("AMQP_URL", amqp_url()),
            ("AMQP_PREFIX", format!("test.{}", &id[..12])),
            ("LISTEN_ADDR", "127.0.0.1:0".into()),
            ("PUBLIC_BASE_URL", PUBLIC_BASE_URL.into()),
            ("RETRY_DELAYS", "100ms,200ms".into()),
            ("NOTIFY_RETRY_DELAYS", "100ms,200ms".into()),
            ("NOTIFY_TIMEOUT", "2s".into()),
            ("BATCH_WAIT", "2ms".into()),
            ("SHUTDOWN_GRACE", "5s".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        tweak(&mut vars);
        let direct_db_url = vars["DATABASE_URL"].clone();
        store::migrate(&Config::from_vars(&vars).expect("test config")).await.expect("migrations");
        let (mut pg_proxy, mut amqp_proxy) = (None, None);
        if proxied {
            let pg = Proxy::start(socket_of(&direct_db_url)).await;
            let amqp = Proxy::start(socket_of(&vars["AMQP_URL"])).await;
            vars.insert("DATABASE_URL".into(), via(&direct_db_url, &pg));
            vars.insert("AMQP_URL".into(), via(&vars["AMQP_URL"], &amqp));
            (pg_proxy, amqp_proxy) = (Some(pg), Some(amqp));
        }
        let cfg = Config::from_vars(&vars).expect("test config");
        let pool = PgPool::connect(&direct_db_url).await.unwrap();
        let running = app::start(cfg.clone(), Role::Run).await.expect("service starts");
        let base = format!("http://{}", running.addr.expect("ingress address"));
        TestApp {
            base,
            pool,
            cfg,
            http: {
                micro8gents::twilio_api::install_crypto_provider();
                reqwest::Client::new()
            },
            pg_proxy,
            amqp_proxy,
            db_name,
            direct_db_url,
            running: Some(running),
        }
    }

    /// Starts another process-like instance (e.g. a second worker) on the same
    /// database and RabbitMQ names, reaching them directly.
    pub async fn start_another(&self, role: Role) -> Running {
        let mut cfg = self.cfg.clone();
        cfg.database_url = micro8gents::config::ConnUrl::new(self.direct_db_url.clone());
        cfg.amqp_url = micro8gents::config::ConnUrl::new(amqp_url());
        cfg.listen_addr = "127.0.0.1:0".parse().unwrap();
        app::start(cfg, role).await.expect("another instance starts")
    }

    /// Stops the service under test (as on SIGTERM) but keeps its database and queues.
    pub async fn stop_service(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }

    pub fn topology(&self) -> Topology {
        Topology::new(&self.cfg.amqp_prefix, &self.cfg.retry_delays)
    }

    /// How many messages wait in a family's work queue, not yet delivered to
    /// a consumer (asked over a connection of the test's own, not through a proxy).
    pub async fn ready(&self, family: micro8gents::events::Family) -> u32 {
        use lapin::options::QueueDeclareOptions;
        let conn = lapin::Connection::connect(&amqp_url(), Default::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let queue = self.topology().work_queue(family);
        let opts = QueueDeclareOptions { passive: true, ..Default::default() };
        let q = ch.queue_declare(queue.as_str().into(), opts, Default::default()).await.unwrap();
        conn.close(200, "bye".into()).await.ok();
        q.message_count()
    }

    pub fn notice_queues(&self) -> NoticeQueues {
        NoticeQueues::new(&self.topology(), &self.cfg.notify_retry_delays)
    }

    /// Every queue of the test: the event families' and the notices'.
    fn queue_names(&self) -> Vec<String> {
        let mut names = self.topology().all_queues();
        names.extend(self.notice_queues().all_queues());
        names
    }

    /// Inserts a user and their business; returns the business id.
    pub async fn business(&self) -> i32 {
        let n = uuid::Uuid::new_v4().simple().to_string();
        let (user,): (i32,) = sqlx::query_as(
            "INSERT INTO users (username, email, password) VALUES ($1, $1 || '@example.com', 'x') RETURNING id",
        )
        .bind(&n[..20])
        .fetch_one(&self.pool)
        .await
        .unwrap();
        let (business,): (i32,) = sqlx::query_as(
            "INSERT INTO businesses (user_id, business_name, email) VALUES ($1, 'Acme Dental', 'desk@example.com') RETURNING id",
        )
        .bind(user)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        business
    }

    pub async fn integration(&self, business: i32, kind: &str, config: serde_json::Value, status: &str) -> i32 {
        let (id,): (i32,) = sqlx::query_as(
            "INSERT INTO integrations (business_id, type, config, status) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(business)
        .bind(kind)
        .bind(config)
        .bind(status)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        id
    }

    /// A business with an active Twilio integration holding `token`.
    pub async fn twilio_business(&self, token: &str) -> i32 {
        let b = self.business().await;
        self.integration(b, "twilio", serde_json::json!({"auth_token": token, "account_sid": "AC00"}), "active").await;
        b
    }

    /// Posts a form callback signed as Twilio signs it.
    pub async fn post_twilio(
        &self,
        business: i32,
        endpoint: &str,
        token: &str,
        params: &[(&str, &str)],
    ) -> reqwest::Response {
        self.twilio_request(business, endpoint, token, params).send().await.expect("request reaches the ingress")
    }

    /// A signed Twilio callback, ready to send (for tests that expect the send itself to fail).
    pub fn twilio_request(
        &self,
        business: i32,
        endpoint: &str,
        token: &str,
        params: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let path = format!("/webhooks/twilio/{business}/{endpoint}");
        let owned: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let signature = compute_signature(token, &format!("{PUBLIC_BASE_URL}{path}"), &owned, Algorithm::HmacSha1);
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
        self.http
            .post(format!("{}{path}", self.base))
            .header("x-twilio-signature", signature)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self.http.post(format!("{}{path}", self.base)).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request reaches the ingress")
    }

    /// Polls until `probe` yields a value, or fails the test after 30 s (a loaded
    /// 2-core CI machine has taken more than 15 s to settle a handful of events).
    pub async fn eventually<T, F, Fut>(&self, what: &str, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The sum of a counter's series (`name` alone, or with its labels) in the service's `/metrics`.
    pub async fn counter(&self, name: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.base)).send().await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The calls dead-letter queue once it holds exactly `n` messages.
    pub async fn parked(&self, broker: &micro8gents::bus::Broker, n: usize) -> Vec<micro8gents::ops::dlq::Parked> {
        use micro8gents::events::Family;
        self.eventually(&format!("{n} parked message(s)"), || async {
            let list =
                micro8gents::ops::dlq::list(broker, &self.topology(), Some(Family::Calls.into()), 100).await.ok()?;
            (list.len() == n).then_some(list)
        })
        .await
    }

    /// Waits until the worker has settled `n` events (applied or ignored): the
    /// event log's rows and the Real-Time segments, which are their own log entries.
    pub async fn settled(&self, n: i64) {
        self.eventually(&format!("{n} events in the inbox"), || async {
            let (count,): (i64,) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM webhook_worker.inbox)
                      + (SELECT count(*) FROM webhook_worker.transcript_segments WHERE received_at IS NOT NULL)",
            )
            .fetch_one(&self.pool)
            .await
            .ok()?;
            (count >= n).then_some(())
        })
        .await
    }

    /// Waits until the worker has settled every event the ingress accepted:
    /// by this process's counters (each test is its own process under
    /// nextest), as many applied, ignored, duplicate or dead-lettered as
    /// accepted. Then nothing accepted is still on its way to the database.
    pub async fn quiet(&self) {
        self.eventually("every accepted event settled", || async {
            let text = self.http.get(format!("{}/metrics", self.base)).send().await.ok()?.text().await.ok()?;
            let total = |name: &str| -> f64 {
                text.lines()
                    .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum()
            };
            let accepted = total("micro8gents_events_accepted_total");
            let settled = ["applied", "ignored", "duplicate", "dead_lettered"]
                .iter()
                .map(|o| total(&format!("micro8gents_events_{o}_total")))
                .sum::<f64>();
            (accepted > 0.0 && settled >= accepted).then_some(())
        })
        .await
    }

    /// Stops the service and removes its database and broker objects.
    pub async fn stop(mut self) {
        self.stop_service().await;
        self.pool.close().await;
        cleanup(&self.db_name, &self.queue_names(), &self.topology()).await;
        self.db_name.clear();
    }
}

impl Drop for TestApp {
    /// A failed test still cleans up after itself.
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown.cancel();
        }
        if !self.db_name.is_empty() {
            let (db, queues, topo) = (self.db_name.clone(), self.queue_names(), self.topology());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(cleanup(&db, &queues, &topo));
            })
            .join()
            .ok();
        }
    }
}

async fn cleanup(db_name: &str, queues: &[String], topo: &Topology) {
    delete_queues_and_exchanges(queues, &topo.all_exchanges()).await;
    if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")))
            .execute(&mut conn)
            .await;
    }
}

async fn delete_queues_and_exchanges(queues: &[String], exchanges: &[String]) {
    if let Ok(conn) = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            for q in queues {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
            for x in exchanges {
                let _ = ch.exchange_delete(x.as_str().into(), Default::default()).await;
            }
        }
        let _ = conn.close(200, "bye".into()).await;
    }
}

/// Deletes the queues and exchanges that a `micro8gents` child process declared when
/// started with these variables (the rest at their defaults): its event families' and
/// its notices', whatever its retry delays. A test that starts a binary under a prefix
/// of its own calls this, so no run leaves idle quorum queues on the shared broker.
pub async fn delete_broker_objects_of(vars: &[(&str, &str)]) {
    let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let cfg = Config::from_vars(&vars).expect("the binary's settings");
    let topo = Topology::new(&cfg.amqp_prefix, &cfg.retry_delays);
    let mut queues = topo.all_queues();
    queues.extend(NoticeQueues::new(&topo, &cfg.notify_retry_delays).all_queues());
    delete_queues_and_exchanges(&queues, &topo.all_exchanges()).await;
}

/// The `calls` row of a business, if there is exactly one.
#[derive(Debug, PartialEq, sqlx::FromRow)]
pub struct CallRow {
    pub id: i32,
    pub status: String,
    pub phone: Option<String>,
    pub caller: Option<String>,
    pub start_time: chrono::NaiveDateTime,
    pub end_time: Option<chrono::NaiveDateTime>,
    pub duration: Option<String>,
    pub recording: Option<String>,
    pub transcript: Option<String>,
}

pub async fn calls_of(pool: &PgPool, business: i32) -> Vec<CallRow> {
    sqlx::query_as(
        "SELECT id, status::text AS status, phone, caller, start_time, end_time, duration, recording, transcript
           FROM calls WHERE business_id = $1 ORDER BY id",
    )
    .bind(business)
    .fetch_all(pool)
    .await
    .unwrap()
}
