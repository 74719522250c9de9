use std::process::ExitCode;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use clap::{Parser, Subcommand};
use micro8gents::app::{self, Role};
use micro8gents::bus::{Broker, Publisher, Topology};
use micro8gents::config::Config;
use micro8gents::events::{BusinessId, Provider};
use micro8gents::ops::{dlq, replay};
use micro8gents::store;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// mimalloc, not glibc's malloc: see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Micro8gents webhook worker: verifies webhooks (Twilio, Stripe, n8n),
/// carries them over RabbitMQ and applies them to Postgres.
/// Settings come from the environment (see README).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Clone)]
enum Command {
    /// Ingress and every consumer in one process (the default); applies migrations first.
    Run,
    /// The HTTP ingress only.
    Serve,
    /// The consumers only (any number may run side by side).
    Work,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective settings, secrets redacted.
    Config,
    /// Look at and redrive the messages parked in the dead-letter queues.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Remove the de-duplication keys and logged envelopes of events accepted
    /// longer ago than DURATION (whole UTC days); nothing in `public` is touched.
    Prune {
        /// e.g. 30d, 72h (default: EVENT_RETENTION)
        #[arg(long, value_name = "DURATION", value_parser = micro8gents::config::parse_duration)]
        older_than: Option<std::time::Duration>,
    },
    /// Publish logged events (webhook_worker.inbox) again through the normal path;
    /// an event already applied is a duplicate and changes nothing.
    Replay {
        /// Only this provider's events.
        #[arg(long)]
        provider: Provider,
        /// Only this business's events.
        #[arg(long)]
        business: Option<i32>,
        /// Only events received since: an RFC 3339 time or a duration back from now (2h).
        #[arg(long, value_parser = replay::parse_since)]
        since: Option<DateTime<Utc>>,
    },
}

#[derive(Subcommand, Clone)]
enum DlqCommand {
    /// List parked messages (none is removed).
    List {
        /// Only this family's queue (default: all).
        #[arg(long)]
        family: Option<dlq::Parking>,
        /// Read at most this many messages.
        #[arg(long, default_value_t = dlq::DEFAULT_LIMIT)]
        limit: usize,
    },
    /// Show one parked message: its reason, try, trace and body.
    Show {
        /// The message id (the event's de-duplication key).
        id: String,
        /// Look only in this family's queue.
        #[arg(long)]
        family: Option<dlq::Parking>,
    },
    /// Send parked messages back to their work queue, as first tries.
    Redrive {
        /// The message id to redrive.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Redrive every parked message (of --family, if given).
        #[arg(long)]
        all: bool,
        /// Only this family's queue.
        #[arg(long)]
        family: Option<dlq::Parking>,
        /// Read at most this many messages per queue.
        #[arg(long, default_value_t = dlq::DEFAULT_LIMIT)]
        limit: usize,
    },
}

fn main() -> ExitCode {
    // Before any HTTP client (the OTLP exporter's, Twilio's API) is built.
    micro8gents::twilio_api::install_crypto_provider();
    let cli = Cli::parse();
    let cfg = match Config::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("micro8gents: {e}");
            return ExitCode::from(2);
        }
    };
    // Before the runtime: the OTLP exporter's HTTP client blocks on a thread of its own.
    let tracer = match micro8gents::trace::otlp_provider() {
        Ok(tracer) => tracer,
        Err(e) => {
            eprintln!("micro8gents: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.log_json, tracer.as_ref());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = match runtime.block_on(dispatch(cli.command.unwrap_or(Command::Run), cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", chain(&e));
            ExitCode::FAILURE
        }
    };
    drop(runtime);
    // Sends the spans still batched.
    if let Some(tracer) = tracer
        && let Err(e) = tracer.shutdown()
    {
        eprintln!("micro8gents: traces not all exported: {e}");
    }
    code
}

/// An error and its causes, each said once: many errors' messages already
/// include their source's (sqlx's "while executing migration 1: ..."), so a
/// cause already in the text so far is not repeated.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn dispatch(command: Command, cfg: Config) -> anyhow::Result<()> {
    let role = match command {
        Command::Migrate => return Ok(store::migrate(&cfg).await?),
        Command::Config => {
            for (name, value) in cfg.describe() {
                println!("{name}={value}");
            }
            return Ok(());
        }
        Command::Run => {
            store::migrate(&cfg).await?;
            Role::Run
        }
        Command::Serve => Role::Serve,
        Command::Work => Role::Work,
        Command::Dlq(action) => return run_dlq(&cfg, action).await,
        Command::Prune { older_than } => return run_prune(&cfg, older_than.unwrap_or(cfg.event_retention)).await,
        Command::Replay { provider, business, since } => {
            let filter = replay::Filter { provider, business: business.map(BusinessId), since };
            return run_replay(&cfg, filter).await;
        }
    };
    let running = app::start(cfg, role).await?;
    let token = running.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing work in flight");
        token.cancel();
    });
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}

fn broker(cfg: &Config, what: &str) -> (Arc<Broker>, Topology) {
    let topology = Topology::new(&cfg.amqp_prefix, &cfg.retry_delays);
    let name = format!("micro8gents-{what}-{}", std::process::id());
    let broker = Broker::new(cfg.amqp_url.expose(), &name, topology.clone())
        .with_ca(cfg.amqp_ca.as_ref().map(|c| c.pem.as_str()));
    (Arc::new(broker), topology)
}

async fn run_dlq(cfg: &Config, action: DlqCommand) -> anyhow::Result<()> {
    let (broker, topo) = broker(cfg, "dlq");
    let result = dlq_command(cfg, &broker, &topo, action).await;
    broker.close().await;
    result
}

async fn dlq_command(cfg: &Config, broker: &Arc<Broker>, topo: &Topology, action: DlqCommand) -> anyhow::Result<()> {
    match action {
        DlqCommand::List { family, limit } => {
            let parked = dlq::list(broker, topo, family, limit).await?;
            println!("{:<9} {:<50} {:<24} {:>7}  reason", "family", "id", "kind", "attempt");
            for p in &parked {
                let id = if p.id.is_empty() { "-" } else { p.id.as_str() };
                println!("{:<9} {:<50} {:<24} {:>7}  {}", p.family, id, p.kind, p.attempt, p.reason);
            }
            println!("{} parked message(s)", parked.len());
        }
        DlqCommand::Show { id, family } => {
            let parked = dlq::show(broker, topo, &id, family).await?;
            if parked.is_empty() {
                anyhow::bail!("no parked message has the id {id:?}");
            }
            for p in parked {
                println!("family:       {}", p.family);
                println!("id:           {}", p.id);
                println!("kind:         {}", p.kind);
                println!("attempt:      {}", p.attempt);
                let at = p.published_at.and_then(|t| DateTime::from_timestamp(t as i64, 0));
                println!("parked at:    {}", at.map_or_else(|| "unknown".into(), |t| t.to_rfc3339()));
                println!("reason:       {}", p.reason);
                println!("traceparent:  {}", p.traceparent.as_deref().unwrap_or("-"));
                println!("body:\n{}", p.body_text());
            }
        }
        DlqCommand::Redrive { id, all: _, family, limit } => {
            let select = id.map_or(dlq::Select::All, dlq::Select::Id);
            let publisher = Publisher::new(broker.clone(), cfg.publish_timeout);
            let done = dlq::redrive(broker, &publisher, topo, &select, family, limit).await?;
            for p in &done.redriven {
                println!("redriven {} {}", p.family, if p.id.is_empty() { "-" } else { p.id.as_str() });
            }
            for (id, e) in &done.failed {
                println!("NOT redriven {id}: {e} (still parked)");
            }
            println!("{} redriven, {} failed", done.redriven.len(), done.failed.len());
            if let dlq::Select::Id(id) = select
                && done.redriven.is_empty()
                && done.failed.is_empty()
            {
                anyhow::bail!("no parked message has the id {id:?}");
            }
            if !done.failed.is_empty() {
                anyhow::bail!("{} message(s) could not be redriven", done.failed.len());
            }
        }
    }
    Ok(())
}

async fn run_replay(cfg: &Config, filter: replay::Filter) -> anyhow::Result<()> {
    let pool = store::pool(cfg, "micro8gents-replay")?;
    let (broker, topo) = broker(cfg, "replay");
    let publisher = Publisher::new(broker.clone(), cfg.publish_timeout);
    let result = replay::replay(&pool, &publisher, &topo, &filter).await;
    broker.close().await;
    let done = result?;
    for (key, reason) in &done.skipped {
        println!("skipped {key}: {reason}");
    }
    println!("{} event(s) published again, {} skipped", done.published, done.skipped.len());
    Ok(())
}

async fn run_prune(cfg: &Config, older_than: std::time::Duration) -> anyhow::Result<()> {
    let pool = store::pool(cfg, "micro8gents-prune")?;
    store::retention::create_partitions(&pool).await?;
    let pruned = store::retention::prune(&pool, older_than).await?;
    let days: Vec<String> = pruned.days.iter().map(|d| d.to_string()).collect();
    let kept = pruned.kept_from.map_or_else(String::new, |d| d.to_string());
    println!(
        "pruned events older than {}: {} day(s) of the event log dropped [{}], {} key(s) deleted, {} transcript segment(s) removed{}; kept from {kept} (UTC)",
        micro8gents::config::fmt_duration(older_than),
        days.len(),
        days.join(", "),
        pruned.keys,
        pruned.segments,
        if pruned.legacy_dropped { ", the old inbox dropped" } else { "" },
    );
    pool.close().await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Logs on stderr, text or JSON; spans also go to OTLP when a tracer is given.
fn init_logging(json: bool, tracer: Option<&SdkTracerProvider>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json { fmt.json().flatten_event(true).boxed() } else { fmt.boxed() };
    let otlp = tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t.tracer("micro8gents")));
    tracing_subscriber::registry().with(filter).with(fmt).with(otlp).init();
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("while executing migration 1: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("type \"call_status\" already exists")]
    struct Inner;

    #[test]
    fn a_cause_is_said_once() {
        let e = anyhow::Error::new(Outer(Inner)).context("migrate");
        assert_eq!(super::chain(&e), "migrate: while executing migration 1: type \"call_status\" already exists");
    }
}
