//! What applies: consumers that take events off RabbitMQ in batches and apply
//! them to Postgres, one module per event family.
//!
//! A batch is applied in one transaction; every event first claims its key in
//! `webhook_worker.inbox` (a key already there means "already applied": skip).
//! The batch is acknowledged only after the commit. An event that fails alone
//! is isolated by re-applying the batch one event per transaction; it is then
//! retried through the delay queues or parked in the dead-letter queue, with
//! the reason, and never holds up the others. While Postgres is unreachable the
//! batch is held and retried with a growing pause, so nothing more is consumed.

pub mod billing;
pub mod bookings;
pub mod calls;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer, message::Delivery};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::field::{Empty, display};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::bus::{ATTEMPT_HEADER, Broker, BusError, Outgoing, Publisher, Topology, header_int, header_str};
use crate::config::Config;
use crate::events::{Envelope, Event, Family};
use crate::telemetry;
use crate::trace::{TRACEPARENT, TraceParent};

/// What applying one event came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Applied, and an operator must hear of it: reported once, after the commit,
    /// so a batch that is re-run does not report it twice.
    Flagged(bookings::OutsideHours),
    /// Its key was already in the inbox.
    Duplicate,
    /// Recorded, but it changes nothing (stale, or a kind we do not apply).
    Ignored(&'static str),
    /// Cannot be applied yet; try again later.
    Retry(String),
    /// Can never be applied.
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Postgres is unreachable or busy: the whole batch waits and tries again.
    #[error("database unavailable: {0}")]
    Transient(sqlx::Error),
    /// This event's SQL failed (a constraint, a business deleted meanwhile...).
    #[error("{0}")]
    Permanent(String),
}

impl From<sqlx::Error> for ApplyError {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) { ApplyError::Transient(e) } else { ApplyError::Permanent(describe_db_error(&e)) }
    }
}

/// Connection trouble, timeouts, deadlocks and serialization failures pass; data errors do not.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57")
                || matches!(code.as_ref(), "40001" | "40P01" | "55P03")
        }
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// A database error for the dead-letter reason: its SQLSTATE and constraint, never parameters.
fn describe_db_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => format!(
            "database refused the event: SQLSTATE {} {}{}",
            db.code().unwrap_or_default(),
            db.message(),
            db.constraint().map(|c| format!(" (constraint {c})")).unwrap_or_default()
        ),
        other => format!("database refused the event: {other}"),
    }
}

/// What a worker process shares between its consumers.
pub struct WorkerContext {
    pub pool: PgPool,
    pub broker: Arc<Broker>,
    pub publisher: Publisher,
    pub topology: Topology,
    pub prefetch: u16,
    pub batch_size: usize,
    pub batch_wait: Duration,
}

impl WorkerContext {
    pub fn new(cfg: &Config, pool: PgPool, broker: Arc<Broker>, topology: Topology) -> Self {
        WorkerContext {
            publisher: Publisher::new(broker.clone(), cfg.publish_timeout),
            pool,
            broker,
            topology,
            prefetch: cfg.prefetch,
            batch_size: cfg.batch_size,
            batch_wait: cfg.batch_wait,
        }
    }
}

/// Runs one consumer per family until `shutdown`, reconnecting after broker failures.
pub async fn run(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let tasks: Vec<_> = Family::ALL
        .into_iter()
        .map(|family| tokio::spawn(consume_forever(ctx.clone(), family, shutdown.clone())))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

async fn consume_forever(ctx: Arc<WorkerContext>, family: Family, shutdown: CancellationToken) {
    let mut pause = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let started = tokio::time::Instant::now();
        match consume(&ctx, family, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                // A consumer that ran a while before failing starts its back-off afresh.
                if started.elapsed() > Duration::from_secs(30) {
                    pause = Duration::from_millis(200);
                }
                warn!(family = family.as_str(), error = %e, "consumer stopped; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
    debug!(family = family.as_str(), "consumer finished");
}

async fn consume(ctx: &WorkerContext, family: Family, shutdown: &CancellationToken) -> Result<(), BusError> {
    let ch = ctx.broker.channel().await?;
    ch.basic_qos(ctx.prefetch, BasicQosOptions::default()).await?;
    let queue = ctx.topology.work_queue(family);
    let tag = format!("{}-{}", family.as_str(), uuid::Uuid::new_v4().simple());
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    info!(queue = %queue, "consuming");
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = consumer.next() => next,
        };
        let Some(first) = first else { return Err(BusError::Unavailable("consumer cancelled by the broker".into())) };
        let batch = fill_batch(ctx, &mut consumer, first?).await?;
        process_batch(ctx, family, &ch, batch, shutdown).await?;
    }
    // Anything prefetched but not taken is requeued by the broker when the channel closes.
    let _ = ch.close(200, "shutdown".into()).await;
    Ok(())
}

/// Takes what is already waiting, up to the batch size or for `batch_wait` at most.
async fn fill_batch(ctx: &WorkerContext, consumer: &mut Consumer, first: Delivery) -> Result<Vec<Delivery>, BusError> {
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + ctx.batch_wait;
    while batch.len() < ctx.batch_size {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(d)) => batch.push(d?),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(batch)
}

/// One message of a batch: its delivery, its try count and, if it decoded, its envelope.
struct Item {
    delivery: Delivery,
    attempt: i64,
    /// The W3C trace the message arrived in (set by the ingress).
    traceparent: Option<String>,
    envelope: Result<Envelope, String>,
}

async fn process_batch(
    ctx: &WorkerContext,
    family: Family,
    ch: &Channel,
    batch: Vec<Delivery>,
    shutdown: &CancellationToken,
) -> Result<(), BusError> {
    let last_tag = batch.last().map(|d| d.delivery_tag).unwrap_or_default();
    let mut items: Vec<Item> = batch
        .into_iter()
        .map(|d| Item {
            attempt: header_int(&d.properties, ATTEMPT_HEADER).unwrap_or(1),
            traceparent: header_str(&d.properties, TRACEPARENT),
            envelope: Envelope::from_json(&d.data),
            delivery: d,
        })
        .collect();
    // One lock order for every worker: no deadlocks between concurrent batches.
    items.sort_by_key(lock_key);

    let started = std::time::Instant::now();
    let applied = apply_all(&ctx.pool, &items, shutdown).await;
    let Some(outcomes) = applied else {
        // Shutting down while Postgres is away: hand the batch back untouched.
        ch.basic_nack(last_tag, BasicNackOptions { multiple: true, requeue: true }).await?;
        return Ok(());
    };
    let labels = [("family", family.as_str())];
    metrics::histogram!(telemetry::APPLY_DURATION, &labels).record(started.elapsed().as_secs_f64());
    metrics::counter!(telemetry::BATCHES, &labels).increment(1);
    for (item, outcome) in items.iter().zip(&outcomes) {
        settle(ctx, family, item, outcome).await?;
    }
    ch.basic_ack(last_tag, BasicAckOptions { multiple: true }).await?;
    Ok(())
}

/// The batch order, which is also the order row locks are taken in (see [`Event::lock_key`]).
fn lock_key(item: &Item) -> (i32, String, u8, i64) {
    match &item.envelope {
        Ok(env) => {
            let (entity, rank, at) = env.event.lock_key();
            (env.business_id.map_or(0, |b| b.0), entity.unwrap_or(&env.key).to_string(), rank, at)
        }
        Err(_) => (i32::MIN, String::new(), 0, 0),
    }
}

/// Applies the batch in one transaction, or, if one event fails, each event in
/// its own. Waits out database outages; `None` means shutdown came first.
async fn apply_all(pool: &PgPool, items: &[Item], shutdown: &CancellationToken) -> Option<Vec<Outcome>> {
    let mut pause = Duration::from_millis(100);
    loop {
        let result = match apply_in_one_transaction(pool, items).await {
            Err(ApplyError::Permanent(_)) => apply_one_by_one(pool, items).await,
            other => other,
        };
        match result {
            Ok(outcomes) => return Some(outcomes),
            Err(e) => {
                warn!(error = %e, pause_ms = pause.as_millis() as u64, "batch not applied; holding it and retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(15));
            }
        }
    }
}

async fn apply_in_one_transaction(pool: &PgPool, items: &[Item]) -> Result<Vec<Outcome>, ApplyError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let mut outcomes = Vec::with_capacity(items.len());
    for item in items {
        outcomes.push(apply_item(&mut tx, item).await?);
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// The slow path: every event alone, so that a failing one fails only itself.
async fn apply_one_by_one(pool: &PgPool, items: &[Item]) -> Result<Vec<Outcome>, ApplyError> {
    let mut conn = pool.acquire().await?;
    let mut outcomes = Vec::with_capacity(items.len());
    for item in items {
        let mut tx = conn.begin().await?;
        let outcome = match apply_item(&mut tx, item).await {
            Ok(o) => {
                tx.commit().await?;
                o
            }
            Err(ApplyError::Permanent(reason)) => {
                tx.rollback().await?;
                Outcome::Retry(reason)
            }
            Err(transient) => return Err(transient),
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

async fn apply_item(tx: &mut PgConnection, item: &Item) -> Result<Outcome, ApplyError> {
    let env = match &item.envelope {
        Ok(env) => env,
        Err(reason) => return Ok(Outcome::Failed(reason.clone())),
    };
    let raw = std::str::from_utf8(&item.delivery.data).unwrap_or("{}");
    if !claim(tx, env, raw).await? {
        return Ok(Outcome::Duplicate);
    }
    let outcome = apply_event(tx, env).await?;
    match &outcome {
        Outcome::Retry(_) | Outcome::Failed(_) => release(tx, &env.key).await?,
        Outcome::Ignored(why) => note_outcome(tx, &env.key, why).await?,
        Outcome::Applied | Outcome::Flagged(_) | Outcome::Duplicate => {}
    }
    Ok(outcome)
}

async fn apply_event(tx: &mut PgConnection, env: &Envelope) -> Result<Outcome, ApplyError> {
    let business =
        || env.business_id.ok_or_else(|| ApplyError::Permanent(format!("{} without a business", env.event.kind())));
    match &env.event {
        Event::TwilioCallStatus(e) => calls::apply_status(tx, business()?, e, env.received_at).await,
        Event::TwilioRecording(e) => calls::apply_recording(tx, business()?, e, env.received_at).await,
        Event::TwilioTranscription(e) => calls::apply_transcription(tx, business()?, e, env.received_at).await,
        Event::N8nBooking(e) => bookings::apply_booking(tx, business()?, e).await,
        Event::StripeSubscription(e) => billing::apply_subscription(tx, e).await,
        Event::StripeCheckoutSession(e) => billing::apply_checkout(tx, e).await,
        Event::StripeInvoice(e) => billing::apply_invoice(tx, e).await,
        Event::StripeOther(_) => Ok(Outcome::Ignored("event type not applied")),
    }
}

/// Records the event's key; false if it was already there (a redelivery).
async fn claim(tx: &mut PgConnection, env: &Envelope, raw: &str) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO webhook_worker.inbox (event_key, provider, kind, business_id, received_at, envelope)
         VALUES ($1, $2, $3, $4, $5, $6::jsonb) ON CONFLICT (event_key) DO NOTHING",
    )
    .bind(&env.key)
    .bind(env.event.provider().as_str())
    .bind(env.event.kind())
    .bind(env.business_id.map(|b| b.0))
    .bind(env.received_at)
    .bind(raw)
    .execute(&mut *tx)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

async fn release(tx: &mut PgConnection, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM webhook_worker.inbox WHERE event_key = $1").bind(key).execute(&mut *tx).await?;
    Ok(())
}

async fn note_outcome(tx: &mut PgConnection, key: &str, why: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE webhook_worker.inbox SET outcome = $2 WHERE event_key = $1")
        .bind(key)
        .bind(format!("ignored: {why}"))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// After the commit: logs the outcome and sends a retried or failed message
/// on its way, confirmed by the broker before the batch is acknowledged.
async fn settle(ctx: &WorkerContext, family: Family, item: &Item, outcome: &Outcome) -> Result<(), BusError> {
    let span = match &item.envelope {
        Ok(env) => {
            info_span!("event", request_id = %env.request_id, key = %env.key, provider = env.event.provider().as_str(), kind = env.event.kind(), business = env.business_id.map(|b| b.0), call_sid = env.event.call_sid(), family = family.as_str(), trace_id = Empty)
        }
        Err(_) => {
            info_span!("event", key = ?item.delivery.properties.message_id(), family = family.as_str(), trace_id = Empty)
        }
    };
    // The worker's span continues the ingress's trace.
    let parent = item.traceparent.as_deref().and_then(TraceParent::parse);
    span.record("trace_id", display(TraceParent::of_span(&span, parent).trace_id));
    count(item, outcome);
    async {
        match outcome {
            Outcome::Applied => info!(attempt = item.attempt, "applied"),
            Outcome::Flagged(flag) => {
                info!(attempt = item.attempt, "applied");
                flag.report();
            }
            Outcome::Duplicate => info!("duplicate; already applied"),
            Outcome::Ignored(why) => info!(reason = why, "recorded; changes nothing"),
            Outcome::Retry(reason) => retry_or_park(ctx, family, item, reason).await?,
            Outcome::Failed(reason) => park(ctx, family, item, reason).await?,
        }
        Ok(())
    }
    .instrument(span)
    .await
}

/// The outcome in the metrics; retries and dead letters are counted where they are sent.
fn count(item: &Item, outcome: &Outcome) {
    let provider = item.envelope.as_ref().map_or("unknown", |env| env.event.provider().as_str());
    match outcome {
        Outcome::Applied | Outcome::Flagged(_) => {
            let kind = item.envelope.as_ref().map_or("unknown", |env| env.event.kind());
            metrics::counter!(telemetry::EVENTS_APPLIED, "provider" => provider, "kind" => kind).increment(1);
        }
        Outcome::Duplicate => metrics::counter!(telemetry::EVENTS_DUPLICATE, "provider" => provider).increment(1),
        Outcome::Ignored(why) => {
            metrics::counter!(telemetry::EVENTS_IGNORED, "provider" => provider, "reason" => *why).increment(1)
        }
        Outcome::Retry(_) | Outcome::Failed(_) => {}
    }
}

async fn retry_or_park(ctx: &WorkerContext, family: Family, item: &Item, reason: &str) -> Result<(), BusError> {
    let delays = &ctx.topology.retry_delays;
    let Some(delay) = usize::try_from(item.attempt - 1).ok().and_then(|i| delays.get(i)) else {
        let reason = format!("gave up after {} tries: {reason}", item.attempt);
        return park(ctx, family, item, &reason).await;
    };
    warn!(attempt = item.attempt, delay_ms = delay.as_millis() as u64, reason, "not applied; will retry");
    metrics::counter!(telemetry::EVENTS_RETRIED, "family" => family.as_str()).increment(1);
    let (exchange, key) = (ctx.topology.retry_exchange(), Topology::retry_routing_key(family, *delay));
    ctx.publisher.publish(&republish(item, &exchange, &key, item.attempt + 1, reason)).await
}

async fn park(ctx: &WorkerContext, family: Family, item: &Item, reason: &str) -> Result<(), BusError> {
    error!(attempt = item.attempt, reason, "dead-lettered");
    metrics::counter!(telemetry::EVENTS_DEAD_LETTERED, "family" => family.as_str()).increment(1);
    let exchange = ctx.topology.dead_exchange();
    ctx.publisher.publish(&republish(item, &exchange, family.as_str(), item.attempt, reason)).await
}

/// The original bytes, untouched, with the new try count and the reason.
fn republish<'a>(
    item: &'a Item,
    exchange: &'a str,
    routing_key: &'a str,
    attempt: i64,
    reason: &'a str,
) -> Outgoing<'a> {
    let props = &item.delivery.properties;
    Outgoing {
        exchange,
        routing_key,
        body: &item.delivery.data,
        message_id: props.message_id().as_ref().map_or("", |m| m.as_str()),
        kind: props.kind().as_ref().map_or("unknown", |k| k.as_str()),
        attempt,
        error: Some(reason),
        traceparent: item.traceparent.as_deref(),
    }
}
