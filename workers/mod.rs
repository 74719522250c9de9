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

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, message::Delivery};
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
    /// Batches of one family applied at once, in lanes by entity (see `WORKER_CONCURRENCY`).
    pub concurrency: usize,
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
            concurrency: cfg.worker_concurrency,
        }
    }
}

/// Runs one consumer per family, each with `concurrency` lanes (see [`consume`]),
/// until `shutdown`, reconnecting after broker failures.
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

/// One consumer (one channel, delivery order) feeds `concurrency` lanes. A
/// message goes to the lane of its entity ([`Event::lock_key`]: the call, the
/// booking, the Stripe customer), so one entity's events are still applied one
/// batch after another in the order the queue delivered them, as with a single
/// consumer, while the lanes' batches are in Postgres at the same time.
async fn consume(ctx: &Arc<WorkerContext>, family: Family, shutdown: &CancellationToken) -> Result<(), BusError> {
    let ch = ctx.broker.channel().await?;
    let lanes = ctx.concurrency.max(1);
    let window = usize::from(ctx.prefetch).saturating_mul(lanes).min(usize::from(u16::MAX)) as u16;
    ch.basic_qos(window, BasicQosOptions::default()).await?;
    let queue = ctx.topology.work_queue(family);
    let tag = format!("{}-{}", family.as_str(), uuid::Uuid::new_v4().simple());
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    info!(queue = %queue, lanes, "consuming");
    // A lane that fails (its channel broke) stops the others and the consumer: all reconnect.
    let failed = shutdown.child_token();
    let acks = Arc::new(Acks::new(ch.clone()));
    let mut senders = Vec::with_capacity(lanes);
    let mut tasks = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (tx, rx) = tokio::sync::mpsc::channel(usize::from(ctx.prefetch).max(1));
        senders.push(tx);
        let (ctx, ch, acks, failed) = (ctx.clone(), ch.clone(), acks.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let result = lane(&ctx, family, &ch, &acks, rx, &failed).await;
            if result.is_err() {
                failed.cancel();
            }
            result
        }));
    }
    let mut outcome = Ok(());
    loop {
        let next = tokio::select! {
            _ = failed.cancelled() => break,
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                outcome = Err(e.into());
                break;
            }
            None => {
                outcome = Err(BusError::Unavailable("consumer cancelled by the broker".into()));
                break;
            }
        };
        let item = Item::new(delivery);
        let lane = lane_of(&item, lanes);
        if senders[lane].send(item).await.is_err() {
            break;
        }
    }
    // Each lane finishes the batch it holds; anything not started is requeued
    // by the broker when the channel closes.
    failed.cancel();
    drop(senders);
    for t in tasks {
        match t.await {
            Ok(Err(e)) if outcome.is_ok() && !shutdown.is_cancelled() => outcome = Err(e),
            _ => {}
        }
    }
    // Batches applied above a gap (a lane's messages never started) are acked
    // one by one, so a restart does not deliver them again.
    if let Err(e) = acks.settled_above_gaps().await {
        debug!(error = %e, "could not ack the last settled messages; they will be redelivered as duplicates");
    }
    let _ = ch.close(200, "shutdown".into()).await;
    if outcome.is_ok() && !shutdown.is_cancelled() {
        outcome = Err(BusError::Unavailable("a lane stopped".into()));
    }
    outcome
}

/// The lane an item is applied in: a hash of the entity it locks.
fn lane_of(item: &Item, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let (business, entity, _, _) = lock_key(item);
    (business, entity).hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// Takes batches off its share of the deliveries and applies them, one after another.
async fn lane(
    ctx: &WorkerContext,
    family: Family,
    ch: &Channel,
    acks: &Acks,
    mut rx: tokio::sync::mpsc::Receiver<Item>,
    stop: &CancellationToken,
) -> Result<(), BusError> {
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            first = rx.recv() => first,
        };
        let Some(first) = first else { return Ok(()) };
        let batch = fill_batch(ctx, &mut rx, first).await;
        process_batch(ctx, family, ch, acks, batch, stop).await?;
    }
}

/// Takes what is already waiting, up to the batch size or for `batch_wait` at most.
async fn fill_batch(ctx: &WorkerContext, rx: &mut tokio::sync::mpsc::Receiver<Item>, first: Item) -> Vec<Item> {
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + ctx.batch_wait;
    while batch.len() < ctx.batch_size {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => batch.push(item),
            Ok(None) | Err(_) => break,
        }
    }
    batch
}

/// One message of a batch: its delivery, its try count and, if it decoded, its envelope.
struct Item {
    delivery: Delivery,
    attempt: i64,
    /// The W3C trace the message arrived in (set by the ingress).
    traceparent: Option<String>,
    envelope: Result<Envelope, String>,
}

impl Item {
    fn new(delivery: Delivery) -> Self {
        Item {
            attempt: header_int(&delivery.properties, ATTEMPT_HEADER).unwrap_or(1),
            traceparent: header_str(&delivery.properties, TRACEPARENT),
            envelope: Envelope::from_json(&delivery.data),
            delivery,
        }
    }
}

async fn process_batch(
    ctx: &WorkerContext,
    family: Family,
    ch: &Channel,
    acks: &Acks,
    mut items: Vec<Item>,
    shutdown: &CancellationToken,
) -> Result<(), BusError> {
    // One lock order for every worker: no deadlocks between concurrent batches.
    items.sort_by_key(lock_key);

    let started = std::time::Instant::now();
    let Some(outcomes) = apply_all(&ctx.pool, &items, shutdown).await else {
        // Shutting down while Postgres is away: hand the batch back untouched
        // (never settled, so no later `multiple` ack covers it).
        for item in &items {
            ch.basic_nack(item.delivery.delivery_tag, BasicNackOptions { multiple: false, requeue: true }).await?;
        }
        return Ok(());
    };
    let labels = [("family", family.as_str())];
    metrics::histogram!(telemetry::APPLY_DURATION, &labels).record(started.elapsed().as_secs_f64());
    metrics::counter!(telemetry::BATCHES, &labels).increment(1);
    for (item, outcome) in items.iter().zip(&outcomes) {
        settle(ctx, family, item, outcome).await?;
    }
    acks.settled(items.iter().map(|i| i.delivery.delivery_tag)).await
}

/// Acknowledges a channel's deliveries once every one up to a tag is settled,
/// with one `multiple` ack: lanes finish out of order, and an ack per message
/// costs the broker and the worker as much again as the message itself.
/// (Delivery tags count up from 1 per channel, and the channel has one consumer.)
struct Acks {
    ch: Channel,
    state: tokio::sync::Mutex<AckState>,
}

#[derive(Default)]
struct AckState {
    /// Every tag up to here is acknowledged.
    upto: u64,
    /// Settled tags above `upto`, waiting for the ones below them.
    done: BTreeSet<u64>,
}

impl Acks {
    fn new(ch: Channel) -> Self {
        Acks { ch, state: tokio::sync::Mutex::new(AckState::default()) }
    }

    async fn settled(&self, tags: impl Iterator<Item = u64>) -> Result<(), BusError> {
        let mut st = self.state.lock().await;
        if let Some(upto) = st.settle(tags) {
            // Under the lock, so acks leave in order.
            self.ch.basic_ack(upto, BasicAckOptions { multiple: true }).await?;
        }
        Ok(())
    }
}

impl Acks {
    /// Acks each settled tag that waits behind an unsettled one: at the end, when
    /// the gap will never close (its messages go back to the queue instead).
    async fn settled_above_gaps(&self) -> Result<(), BusError> {
        let mut st = self.state.lock().await;
        while let Some(tag) = st.done.pop_first() {
            self.ch.basic_ack(tag, BasicAckOptions { multiple: false }).await?;
        }
        Ok(())
    }
}

impl AckState {
    /// Records settled tags; the tag to ack with `multiple` if the settled run from 1 grew.
    fn settle(&mut self, tags: impl Iterator<Item = u64>) -> Option<u64> {
        self.done.extend(tags);
        let before = self.upto;
        while self.done.first() == Some(&(self.upto + 1)) {
            self.done.pop_first();
            self.upto += 1;
        }
        (self.upto > before).then_some(self.upto)
    }
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

/// The fast path: the whole batch's keys are claimed in one statement, then
/// each new event is applied; per-call writes and inbox outcomes are gathered
/// ([`Deferred`]) and sent once per call and once per batch before the commit.
async fn apply_in_one_transaction(pool: &PgPool, items: &[Item]) -> Result<Vec<Outcome>, ApplyError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let mut fresh = claim_all(&mut tx, items).await?;
    let mut writes = Deferred::default();
    let mut outcomes = Vec::with_capacity(items.len());
    for item in items {
        // The first item of a key claimed it; a second copy in the same batch is a duplicate.
        let claimed = item.envelope.as_ref().is_ok_and(|env| fresh.remove(env.key.as_str()));
        outcomes.push(apply_claimed(&mut tx, &mut writes, item, claimed).await?);
    }
    writes.flush(&mut tx).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// The slow path: every event alone, so that a failing one fails only itself.
async fn apply_one_by_one(pool: &PgPool, items: &[Item]) -> Result<Vec<Outcome>, ApplyError> {
    let mut conn = pool.acquire().await?;
    let mut outcomes = Vec::with_capacity(items.len());
    for item in items {
        let mut tx = conn.begin().await?;
        let mut writes = Deferred::default();
        let applied = match apply_item(&mut tx, &mut writes, item).await {
            Ok(o) => writes.flush(&mut tx).await.map(|()| o).map_err(ApplyError::from),
            Err(e) => Err(e),
        };
        let outcome = match applied {
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

async fn apply_item(tx: &mut PgConnection, writes: &mut Deferred, item: &Item) -> Result<Outcome, ApplyError> {
    let claimed = match &item.envelope {
        Ok(env) => claim(tx, env, raw_envelope(item)).await?,
        Err(_) => false,
    };
    apply_claimed(tx, writes, item, claimed).await
}

/// Applies an event whose key this transaction has just claimed (`claimed`), or
/// says why not: undecodable, or a duplicate.
async fn apply_claimed(
    tx: &mut PgConnection,
    writes: &mut Deferred,
    item: &Item,
    claimed: bool,
) -> Result<Outcome, ApplyError> {
    let env = match &item.envelope {
        Ok(env) => env,
        Err(reason) => return Ok(Outcome::Failed(reason.clone())),
    };
    if !claimed {
        return Ok(Outcome::Duplicate);
    }
    let outcome = apply_event(tx, &mut writes.calls, env).await?;
    match &outcome {
        Outcome::Retry(_) | Outcome::Failed(_) => release(tx, &env.key).await?,
        Outcome::Ignored(why) => writes.ignored.push((env.key.clone(), why)),
        Outcome::Applied | Outcome::Flagged(_) | Outcome::Duplicate => {}
    }
    Ok(outcome)
}

async fn apply_event(
    tx: &mut PgConnection,
    writes: &mut calls::CallWrites,
    env: &Envelope,
) -> Result<Outcome, ApplyError> {
    let business =
        || env.business_id.ok_or_else(|| ApplyError::Permanent(format!("{} without a business", env.event.kind())));
    match &env.event {
        Event::TwilioCallStatus(e) => calls::apply_status(tx, writes, business()?, e, env.received_at).await,
        Event::TwilioRecording(e) => calls::apply_recording(tx, writes, business()?, e, env.received_at).await,
        Event::TwilioTranscription(e) => calls::apply_transcription(tx, writes, business()?, e, env.received_at).await,
        Event::N8nBooking(e) => bookings::apply_booking(tx, business()?, e).await,
        Event::StripeSubscription(e) => billing::apply_subscription(tx, e).await,
        Event::StripeCheckoutSession(e) => billing::apply_checkout(tx, e).await,
        Event::StripeInvoice(e) => billing::apply_invoice(tx, e).await,
        Event::StripeOther(_) => Ok(Outcome::Ignored("event type not applied")),
    }
}

fn raw_envelope(item: &Item) -> &str {
    std::str::from_utf8(&item.delivery.data).unwrap_or("{}")
}

/// Records the keys of every decodable event of the batch in one statement;
/// returns the keys that were new (a key already there is a redelivery).
async fn claim_all<'a>(tx: &mut PgConnection, items: &'a [Item]) -> Result<HashSet<&'a str>, sqlx::Error> {
    let envs: Vec<(&Envelope, &str)> =
        items.iter().filter_map(|i| i.envelope.as_ref().ok().map(|env| (env, raw_envelope(i)))).collect();
    if envs.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO webhook_worker.inbox (event_key, provider, kind, business_id, received_at, envelope)
         SELECT k, p, t, b, r, e::json
           FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::timestamptz[], $6::text[]) AS u(k, p, t, b, r, e)
         ON CONFLICT (event_key) DO NOTHING
         RETURNING event_key",
    )
    .bind(envs.iter().map(|(env, _)| env.key.as_str()).collect::<Vec<_>>())
    .bind(envs.iter().map(|(env, _)| env.event.provider().as_str()).collect::<Vec<_>>())
    .bind(envs.iter().map(|(env, _)| env.event.kind()).collect::<Vec<_>>())
    .bind(envs.iter().map(|(env, _)| env.business_id.map(|b| b.0)).collect::<Vec<_>>())
    .bind(envs.iter().map(|(env, _)| env.received_at).collect::<Vec<_>>())
    .bind(envs.iter().map(|(_, raw)| *raw).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let inserted: HashSet<String> = inserted.into_iter().collect();
    Ok(envs.iter().map(|(env, _)| env.key.as_str()).filter(|k| inserted.contains(*k)).collect())
}

/// Records the event's key; false if it was already there (a redelivery).
async fn claim(tx: &mut PgConnection, env: &Envelope, raw: &str) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO webhook_worker.inbox (event_key, provider, kind, business_id, received_at, envelope)
         VALUES ($1, $2, $3, $4, $5, $6::json) ON CONFLICT (event_key) DO NOTHING",
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

/// Writes gathered while a transaction applies its events, sent before it commits.
#[derive(Default)]
struct Deferred {
    calls: calls::CallWrites,
    /// Keys of events recorded but changing nothing, and why.
    ignored: Vec<(String, &'static str)>,
}

impl Deferred {
    async fn flush(&mut self, tx: &mut PgConnection) -> Result<(), sqlx::Error> {
        self.calls.flush(tx).await?;
        if !self.ignored.is_empty() {
            note_outcomes(tx, &self.ignored).await?;
            self.ignored.clear();
        }
        Ok(())
    }
}

/// Says in the inbox why each event changed nothing: one statement for the batch.
async fn note_outcomes(tx: &mut PgConnection, ignored: &[(String, &'static str)]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_worker.inbox i SET outcome = 'ignored: ' || u.why
           FROM unnest($1::text[], $2::text[]) AS u(k, why) WHERE i.event_key = u.k",
    )
    .bind(ignored.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
    .bind(ignored.iter().map(|(_, why)| *why).collect::<Vec<_>>())
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

#[cfg(test)]
mod tests {
    use super::AckState;

    #[test]
    fn acks_wait_for_every_lower_tag_and_never_pass_a_gap() {
        let mut acks = AckState::default();
        assert_eq!(acks.settle([3, 4].into_iter()), None, "1 and 2 are still being applied");
        assert_eq!(acks.settle([1].into_iter()), Some(1));
        assert_eq!(acks.settle([2, 6].into_iter()), Some(4), "2 closes the gap up to 4; 5 is missing");
        assert_eq!(acks.settle(std::iter::empty()), None);
        assert_eq!(acks.settle([5].into_iter()), Some(6));
        assert!(acks.done.is_empty());
    }
}
