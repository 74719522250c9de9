//! Wiring: builds the pool, the broker connection, the ingress and the
//! consumers for one process, and stops them gracefully.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::durable::Durable;
use crate::bus::{Broker, Publisher, Topology};
use crate::config::Config;
use crate::ingress::{AppState, Gauges, operational_router, router};
use crate::notify::client::Deliverer;
use crate::notify::consumer::NoticeConsumer;
use crate::notify::queue::NoticeQueues;
use crate::notify::relay::NoticeRelay;
use crate::serve::ServeLimits;
use crate::store::{self, secrets::SecretCacheLimits, secrets::SecretStore};
use crate::workers::{self, WorkerContext};

/// Which parts of the service this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Ingress and consumers.
    Run,
    /// Ingress only.
    Serve,
    /// Consumers only.
    Work,
}

impl Role {
    fn serves(self) -> bool {
        matches!(self, Role::Run | Role::Serve)
    }
    fn works(self) -> bool {
        matches!(self, Role::Run | Role::Work)
    }
    fn name(self) -> &'static str {
        match self {
            Role::Run => "run",
            Role::Serve => "serve",
            Role::Work => "work",
        }
    }
}

/// A started service.
pub struct Running {
    /// Where the ingress (or a `work` process's metrics) listens, port 0 resolved.
    pub addr: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    broker: Arc<Broker>,
    grace: std::time::Duration,
}

impl Running {
    /// Stops taking work, lets the requests and the batch in flight finish
    /// (for at most `SHUTDOWN_GRACE`), then closes the broker connection.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the service has stopped (after `shutdown` is cancelled).
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        let all = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(self.grace, all).await.is_err() {
            warn!(grace = ?self.grace, "shutdown grace elapsed; exiting with work in flight");
        }
        self.broker.close().await;
    }
}

/// The notice relay and the notices consumer of a `work` (or `run`) process.
fn notices(
    cfg: &Config,
    pool: &sqlx::PgPool,
    broker: &Arc<Broker>,
    topology: &Topology,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let queues = NoticeQueues::new(topology, &cfg.notify_retry_delays);
    let publisher = Arc::new(Publisher::new(broker.clone(), cfg.publish_timeout));
    let deliverer = Deliverer::new(cfg.notify_timeout, cfg.notify_allow_private_networks)
        .map_err(|e| anyhow::anyhow!("cannot build the notices HTTP client: {e}"))?;
    let relay = NoticeRelay {
        pool: pool.clone(),
        broker: broker.clone(),
        publisher: publisher.clone(),
        queues: queues.clone(),
    };
    let consumer = Arc::new(NoticeConsumer {
        pool: pool.clone(),
        broker: broker.clone(),
        publisher,
        deliverer: Arc::new(deliverer),
        queues,
        delays: cfg.notify_retry_delays.clone(),
        timeout: cfg.notify_timeout,
    });
    Ok(vec![tokio::spawn(relay.run(shutdown.clone())), tokio::spawn(consumer.run(shutdown.clone()))])
}

pub async fn start(cfg: Config, role: Role) -> anyhow::Result<Running> {
    crate::telemetry::install();
    let pool = store::pool(&cfg, &format!("micro8gents-{}", role.name()))?;
    let topology = Topology::new(&cfg.amqp_prefix, &cfg.retry_delays);
    let conn_name = format!("micro8gents-{}-{}", role.name(), std::process::id());
    let broker = Broker::new(cfg.amqp_url.expose(), &conn_name, topology.clone())
        .with_ca(cfg.amqp_ca.as_ref().map(|c| c.pem.as_str()));
    // The ingress only publishes: it declares the one exchange it needs, the workers the rest.
    let broker = Arc::new(if role.works() { broker } else { broker.publish_only() });
    if let Err(e) = broker.ping().await {
        warn!(error = %e, "RabbitMQ is not reachable yet; will keep trying");
    }
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut addr = None;

    if role.works() {
        let ctx = Arc::new(WorkerContext::new(&cfg, pool.clone(), broker.clone(), topology.clone()));
        tasks.push(tokio::spawn(workers::run(ctx, shutdown.clone())));
        let (retention, every) = (cfg.event_retention, cfg.event_prune_interval);
        tasks.push(tokio::spawn(store::retention::maintain(pool.clone(), retention, every, shutdown.clone())));
        tasks.extend(notices(&cfg, &pool, &broker, &topology, &shutdown)?);
    }
    // The ingress serves everything on LISTEN_ADDR; a `work` process serves its
    // health and metrics on METRICS_ADDR if one is set (several may share a host).
    let listen = match role {
        Role::Run | Role::Serve => Some((cfg.listen_addr, "ingress listening")),
        Role::Work => cfg.metrics_addr.map(|a| (a, "metrics listening")),
    };
    if let Some((at, what)) = listen {
        let listener = TcpListener::bind(at).await?;
        addr = Some(listener.local_addr()?);
        info!(addr = %listener.local_addr()?, "{what}");
        let publisher = Arc::new(Publisher::new(broker.clone(), cfg.publish_timeout));
        let durable = Durable::new(pool.clone(), publisher, topology.clone(), cfg.publish_pack, cfg.publish_wait);
        if role.serves() {
            tasks.push(tokio::spawn(durable.relay().run(shutdown.clone())));
        }
        let state = Arc::new(AppState {
            durable,
            secrets: SecretStore::with_limits(
                pool.clone(),
                SecretCacheLimits {
                    ttl: cfg.secret_cache_ttl,
                    capacity: cfg.secret_cache_capacity,
                    fresh_reads_per_sec: cfg.secret_fresh_reads_per_sec,
                },
            ),
            gauges: Gauges::new(cfg.metrics_gauge_refresh),
            broker: broker.clone(),
            pool: pool.clone(),
            topology,
            cfg: cfg.clone(),
        });
        if role.serves() {
            // Before the first request: every business that exists is known, so a
            // restart does not budget (and refuse) real businesses' first requests. If
            // the database is down the ingress starts anyway; requests read one by one.
            state.secrets.warm_logged().await;
            let warm = state.clone();
            let until = shutdown.clone();
            tasks.push(tokio::spawn(async move { warm.secrets.keep_warm(until).await }));
        }
        let app = if role.serves() { router(state) } else { operational_router(state) };
        let limits = ServeLimits {
            header_read_timeout: cfg.header_read_timeout,
            max_requests_in_flight: cfg.max_requests_in_flight,
        };
        tasks.push(tokio::spawn(crate::serve::serve(listener, app, limits, shutdown.clone())));
    }
    Ok(Running { addr, shutdown, tasks, broker, grace: cfg.shutdown_grace })
}
