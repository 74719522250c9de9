//! The consumer side of a family: one channel, its lanes, batches and acks.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, message::Delivery};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Applier, Outcome, WorkerContext, apply, settle};
use crate::bus::{ATTEMPT_HEADER, BusError, header_int, header_str, pack};
use crate::events::Envelope;
use crate::providers::Family;
use crate::telemetry;
use crate::trace::TRACEPARENT;

/// One family's consumer until `shutdown`, reconnecting after broker failures.
pub async fn run<A: Applier>(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let family = A::FAMILY;
    let mut pause = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let started = tokio::time::Instant::now();
        match consume::<A>(&ctx, &shutdown).await {
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
async fn consume<A: Applier>(ctx: &Arc<WorkerContext>, shutdown: &CancellationToken) -> Result<(), BusError> {
    let family = A::FAMILY;
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
    // Past a quarter of the window waiting behind a gap, acks go one by one (see `AckState`).
    let acks = Arc::new(Acks::new(ch.clone(), usize::from(window / 4).max(1)));
    let mut senders = Vec::with_capacity(lanes);
    let mut tasks = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (tx, rx) = tokio::sync::mpsc::channel(usize::from(ctx.prefetch).max(1));
        senders.push(tx);
        let (ctx, acks, failed) = (ctx.clone(), acks.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let result = lane::<A>(&ctx, &acks, rx, &failed).await;
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
                outcome = Err(BusError::ConsumerCancelled);
                break;
            }
        };
        // A pack's events go each to its own lane; its message is acked when all are settled.
        let items = Item::split(delivery, A::FAMILY);
        if let [first, _, ..] = items.as_slice() {
            acks.expect(first.tag, items.len()).await;
        }
        let mut stopped = false;
        for item in items {
            let lane = lane_of(&item, lanes);
            if senders[lane].send(item).await.is_err() {
                stopped = true;
                break;
            }
        }
        if stopped {
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
        outcome = Err(BusError::LaneStopped);
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

/// Takes batches off its share of the deliveries and applies them, one after
/// another. A batch takes what is waiting, and while that is less than half of
/// `batch_size` ([`company`]) waits up to `batch_wait` for more. A batch costs
/// Postgres about as much for its statements and commit as for its events, and
/// in realistic traffic a call's events are far apart, so each batch also
/// rewrites its calls' rows: fuller batches are most of what a lane can save,
/// at 1,000 requests a second (a lane has ~250 events a second) as under load
/// (the backlog that built up during one transaction is the next batch). An
/// event's row appears up to `batch_wait` later; answers never wait for it.
/// What a batch leaves for later ([`Outcome::Later`]) starts the next one.
/// Unacknowledged until applied: if the lane stops first, the broker requeues them.
async fn lane<A: Applier>(
    ctx: &WorkerContext,
    acks: &Acks,
    mut rx: tokio::sync::mpsc::Receiver<Item>,
    stop: &CancellationToken,
) -> Result<(), BusError> {
    let mut later = Vec::new();
    loop {
        let batch = if later.is_empty() {
            let first = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                first = rx.recv() => first,
            };
            let Some(first) = first else { return Ok(()) };
            fill_batch(ctx, &mut rx, vec![first]).await
        } else {
            if stop.is_cancelled() {
                return Ok(());
            }
            fill_batch(ctx, &mut rx, std::mem::take(&mut later)).await
        };
        later = process_batch::<A>(ctx, acks, batch, stop).await?;
    }
}

/// Events a batch waits (up to `batch_wait`) to have before it is applied: half
/// of the batch size (50 by default). Measured at 1,000 requests/s (realistic
/// order, README "Runs with fuller batches"): with 16 and 50 ms a lane committed
/// ~12 events at a time and Postgres spent 533–679 µs an event; with 50 and
/// 200 ms, 180 µs (171–182 with 64 and 200 ms).
pub fn company(batch_size: usize) -> usize {
    (batch_size / 2).max(1)
}

/// Takes what is already waiting, up to the batch size; waits up to
/// `batch_wait` for more while it has fewer than [`company`].
async fn fill_batch(
    ctx: &WorkerContext,
    rx: &mut tokio::sync::mpsc::Receiver<Item>,
    mut batch: Vec<Item>,
) -> Vec<Item> {
    let enough = company(ctx.batch_size);
    let deadline = tokio::time::Instant::now() + ctx.batch_wait;
    loop {
        while batch.len() < ctx.batch_size {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        if batch.len() >= enough {
            return batch;
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => batch.push(item),
            Ok(None) | Err(_) => return batch,
        }
    }
}

/// One event of a batch: the message it came in (alone or in a pack), its own
/// bytes, its try count and, if it decoded, its envelope.
pub struct Item {
    /// The delivery tag of its message (shared by the events of a pack).
    pub tag: u64,
    /// The event's own bytes: the message body, or its part of the pack.
    pub body: Vec<u8>,
    /// The message id it is republished with (its key; a pack's own id if it is one undecodable pack).
    pub message_id: String,
    /// The `type` it is republished with.
    pub kind: String,
    pub attempt: i64,
    /// The W3C trace the message arrived in (set by the ingress).
    pub traceparent: Option<String>,
    pub envelope: Result<Envelope, String>,
    /// How many batches have left it for later ([`Outcome::Later`]) so far.
    pub deferrals: u32,
}

/// After this many deferrals a batch waits for the locks it needs (see `apply_all`):
/// another process that keeps a call busy cannot keep an event waiting for ever.
pub const MOST_DEFERRALS: u32 = 20;

impl Item {
    /// The events a message holds: itself, or each event of a pack ([`pack`]).
    /// A pack that does not split is one undecodable item, parked whole.
    pub fn split(delivery: Delivery, family: Family) -> Vec<Item> {
        let props = &delivery.properties;
        let (tag, attempt) = (delivery.delivery_tag, attempt_of(header_int(props, ATTEMPT_HEADER)));
        let message_id = props.message_id().as_ref().map_or_else(String::new, |m| m.to_string());
        let kind = props.kind().as_ref().map_or_else(|| "unknown".to_string(), |k| k.to_string());
        if !pack::is_pack(&delivery.data) {
            let traceparent = header_str(props, TRACEPARENT);
            return vec![Item { traceparent, ..Item::of(tag, delivery.data, message_id, kind, attempt, family) }];
        }
        let parts = match pack::split(&delivery.data) {
            Ok(parts) => parts,
            Err(reason) => {
                let item = Item::of(tag, delivery.data.clone(), message_id, kind, attempt, family);
                return vec![Item { envelope: Err(reason), ..item }];
            }
        };
        let traceparents = traceparents(props);
        parts
            .into_iter()
            .enumerate()
            .map(|(i, part)| {
                let mut item = Item::of(tag, part.as_bytes().to_vec(), String::new(), String::new(), attempt, family);
                (item.message_id, item.kind) = match &item.envelope {
                    Ok(env) => (env.key.clone(), env.event.kind().to_string()),
                    Err(_) => (format!("{message_id} #{}", i + 1), "unknown".to_string()),
                };
                item.traceparent = traceparents.get(i).filter(|t| !t.is_empty()).cloned();
                item
            })
            .collect()
    }

    fn of(tag: u64, body: Vec<u8>, message_id: String, kind: String, attempt: i64, family: Family) -> Item {
        Item {
            envelope: Envelope::from_json(&body).and_then(|env| of_family(env, family)),
            tag,
            body,
            message_id,
            kind,
            attempt,
            traceparent: None,
            deferrals: 0,
        }
    }
}

/// A pack's `traceparent` of each event, in pack order.
fn traceparents(props: &lapin::BasicProperties) -> Vec<String> {
    let Some(AMQPValue::FieldArray(list)) =
        props.headers().as_ref().and_then(|h| h.inner().get(pack::TRACEPARENTS_HEADER))
    else {
        return Vec::new();
    };
    list.as_slice()
        .iter()
        .map(|v| match v {
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            _ => String::new(),
        })
        .collect()
}

/// The try count a message carries, kept within 1..=[`MAX_ATTEMPT`]: whoever can
/// publish can put any integer there, and the count is used in arithmetic.
pub const MAX_ATTEMPT: i64 = 1_000_000;

pub fn attempt_of(header: Option<i64>) -> i64 {
    header.unwrap_or(1).clamp(1, MAX_ATTEMPT)
}

/// An envelope of another family on this queue is refused as undecodable (dead-lettered
/// with the reason) before it could claim its inbox key here and be lost to its own family.
fn of_family(env: Envelope, family: Family) -> Result<Envelope, String> {
    let of = env.event.family();
    if of == family {
        Ok(env)
    } else {
        Err(format!("a {} event ({}) on the {} queue", of.as_str(), env.event.kind(), family.as_str()))
    }
}

/// Applies a batch, settles and acknowledges what it came to; returns the items
/// left for the lane's next batch ([`Outcome::Later`]).
async fn process_batch<A: Applier>(
    ctx: &WorkerContext,
    acks: &Acks,
    mut items: Vec<Item>,
    shutdown: &CancellationToken,
) -> Result<Vec<Item>, BusError> {
    // One lock order for every worker: no deadlocks between concurrent batches.
    items.sort_by(|a, b| lock_key(a).cmp(&lock_key(b)));

    let started = std::time::Instant::now();
    let Some(outcomes) = apply::apply_all::<A>(ctx, &items, shutdown).await else {
        // Shutting down while Postgres is away: hand the batch's messages back
        // untouched (never settled, so no later `multiple` ack covers them).
        acks.requeue(items.iter().map(|i| i.tag)).await?;
        return Ok(Vec::new());
    };
    let labels = [("family", A::FAMILY.as_str())];
    metrics::histogram!(telemetry::APPLY_DURATION, &labels).record(started.elapsed().as_secs_f64());
    metrics::counter!(telemetry::BATCHES, &labels).increment(1);
    for (item, outcome) in items.iter().zip(&outcomes) {
        settle::settle(ctx, A::FAMILY, item, outcome).await?;
    }
    let (later, settled): (Vec<_>, Vec<_>) =
        items.into_iter().zip(outcomes).partition(|(_, outcome)| *outcome == Outcome::Later);
    acks.settled(settled.iter().map(|(i, _)| i.tag)).await?;
    Ok(later
        .into_iter()
        .map(|(mut item, _)| {
            item.deferrals = item.deferrals.saturating_add(1);
            item
        })
        .collect())
}

/// Acknowledges a channel's deliveries once every one up to a tag is settled,
/// with one `multiple` ack: lanes finish out of order, and an ack per message
/// costs the broker and the worker as much again as the message itself.
/// (Delivery tags count up from 1 per channel, and the channel has one consumer.)
/// A message a lane keeps for later ([`Outcome::Later`]) holds a gap open; the
/// settled ones behind it count against the prefetch window, so once they are
/// a quarter of it they are acked one by one rather than stall the consumer.
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
    /// Tags above `upto` already acknowledged one by one (or handed back).
    acked: BTreeSet<u64>,
    /// How many may wait in `done` before they are acked one by one.
    most_waiting: usize,
    /// Packs with events still unsettled: how many.
    unsettled: HashMap<u64, usize>,
    /// Packs handed back to the broker: their other events' settling acknowledges nothing.
    requeued: HashSet<u64>,
}

/// What to acknowledge after some tags settled.
#[derive(Debug, Default, PartialEq, Eq)]
struct ToAck {
    /// Every unacknowledged tag up to this one, with `multiple`.
    upto: Option<u64>,
    /// Each of these alone.
    each: Vec<u64>,
}

impl Acks {
    fn new(ch: Channel, most_waiting: usize) -> Self {
        Acks { ch, state: tokio::sync::Mutex::new(AckState { most_waiting, ..AckState::default() }) }
    }

    /// A pack of `events` arrived as `tag`: it is settled when all of them are.
    async fn expect(&self, tag: u64, events: usize) {
        self.state.lock().await.unsettled.insert(tag, events);
    }

    /// Hands these messages back to the broker (each once), unsettled.
    async fn requeue(&self, tags: impl Iterator<Item = u64>) -> Result<(), BusError> {
        let mut st = self.state.lock().await;
        for tag in st.requeue(tags) {
            self.ch.basic_nack(tag, BasicNackOptions { multiple: false, requeue: true }).await?;
        }
        Ok(())
    }

    async fn settled(&self, tags: impl Iterator<Item = u64>) -> Result<(), BusError> {
        let mut st = self.state.lock().await;
        let to_ack = st.settle(tags);
        // Under the lock, so acks leave in order.
        if let Some(upto) = to_ack.upto {
            self.ch.basic_ack(upto, BasicAckOptions { multiple: true }).await?;
        }
        for tag in to_ack.each {
            self.ch.basic_ack(tag, BasicAckOptions { multiple: false }).await?;
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
    /// Records settled tags; what to acknowledge now: with `multiple`, the last
    /// unacknowledged tag of the settled run from 1 if it grew, and one by one the
    /// settled tags behind a gap once there are more than `most_waiting` of them.
    fn settle(&mut self, tags: impl Iterator<Item = u64>) -> ToAck {
        for tag in tags {
            if let Some(left) = self.unsettled.get_mut(&tag) {
                *left -= 1;
                if *left > 0 {
                    continue;
                }
                self.unsettled.remove(&tag);
            }
            if !self.requeued.contains(&tag) {
                self.done.insert(tag);
            }
        }
        let mut to_ack = ToAck::default();
        loop {
            let next = self.upto + 1;
            if self.done.remove(&next) {
                // A `multiple` ack must name a tag not yet acknowledged.
                to_ack.upto = Some(next);
            } else if !self.acked.remove(&next) {
                break;
            }
            self.upto = next;
        }
        if self.done.len() > self.most_waiting {
            to_ack.each = std::mem::take(&mut self.done).into_iter().collect();
            self.acked.extend(to_ack.each.iter().copied());
        }
        to_ack
    }

    /// Marks these messages handed back; the ones to nack (each once, never one already acked).
    fn requeue(&mut self, tags: impl Iterator<Item = u64>) -> Vec<u64> {
        let mut nack = Vec::new();
        for tag in tags {
            if tag <= self.upto || self.acked.contains(&tag) || !self.requeued.insert(tag) {
                continue;
            }
            self.unsettled.remove(&tag);
            self.done.remove(&tag);
            // No longer outstanding: a later `multiple` ack may pass it.
            self.acked.insert(tag);
            nack.push(tag);
        }
        nack
    }
}

/// The batch order, which is also the order row locks are taken in (see [`Event::lock_key`]).
/// Borrowed from the item: sorting allocates nothing.
fn lock_key(item: &Item) -> (i32, &str, u8, i64) {
    match &item.envelope {
        Ok(env) => {
            let (entity, rank, at) = env.event.lock_key();
            (env.business_id.map_or(0, |b| b.0), entity.unwrap_or(&env.key), rank, at)
        }
        Err(_) => (i32::MIN, "", 0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::{AckState, MAX_ATTEMPT, ToAck, attempt_of};

    #[test]
    fn an_attempt_header_out_of_range_is_clamped_not_overflowed() {
        assert_eq!(attempt_of(None), 1);
        assert_eq!(attempt_of(Some(3)), 3);
        for (raw, kept) in [(i64::MIN, 1), (-5, 1), (0, 1), (i64::MAX, MAX_ATTEMPT)] {
            let attempt = attempt_of(Some(raw));
            assert_eq!(attempt, kept, "{raw}");
            // What settling does with it: the retry index and the next try.
            assert!(usize::try_from(attempt - 1).is_ok() && attempt.checked_add(1).is_some());
        }
    }

    fn upto(tag: Option<u64>) -> ToAck {
        ToAck { upto: tag, each: Vec::new() }
    }

    #[test]
    fn acks_wait_for_every_lower_tag_and_never_pass_a_gap() {
        let mut acks = AckState { most_waiting: 100, ..AckState::default() };
        assert_eq!(acks.settle([3, 4].into_iter()), upto(None), "1 and 2 are still being applied");
        assert_eq!(acks.settle([1].into_iter()), upto(Some(1)));
        assert_eq!(acks.settle([2, 6].into_iter()), upto(Some(4)), "2 closes the gap up to 4; 5 is missing");
        assert_eq!(acks.settle(std::iter::empty()), upto(None));
        assert_eq!(acks.settle([5].into_iter()), upto(Some(6)));
        assert!(acks.done.is_empty());
    }

    #[test]
    fn a_gap_held_open_does_not_hold_the_window_and_no_tag_is_acked_twice() {
        // Tag 1 is kept for a later batch; 2..=4 settle behind it.
        let mut acks = AckState { most_waiting: 2, ..AckState::default() };
        assert_eq!(acks.settle([2, 3].into_iter()), upto(None));
        assert_eq!(acks.settle([4].into_iter()), ToAck { upto: None, each: vec![2, 3, 4] }, "more than 2 waiting");
        assert_eq!(acks.settle([6].into_iter()), upto(None));
        // 1 settles: the run reaches 4 (2..=4 already acked), 5 is missing, so only 1 goes.
        assert_eq!(acks.settle([1].into_iter()), upto(Some(1)));
        assert_eq!(acks.upto, 4);
        // 5 settles: the multiple ack names 6, the last one not yet acknowledged.
        assert_eq!(acks.settle([5].into_iter()), upto(Some(6)));
        assert!(acks.done.is_empty() && acks.acked.is_empty());
        // A run that ends on tags acked one by one names the last one not acked.
        assert_eq!(acks.settle([9, 10, 11].into_iter()), ToAck { upto: None, each: vec![9, 10, 11] });
        assert_eq!(acks.settle([7, 8].into_iter()), upto(Some(8)));
        assert_eq!(acks.upto, 11);
    }

    #[test]
    fn a_pack_is_acked_once_all_its_events_settle_and_one_handed_back_never() {
        let mut acks = AckState { most_waiting: 100, ..AckState::default() };
        acks.unsettled.insert(1, 3);
        assert_eq!(acks.settle([1, 1].into_iter()), upto(None), "one event of pack 1 is still being applied");
        assert_eq!(acks.settle([2].into_iter()), upto(None), "2 waits behind pack 1");
        assert_eq!(acks.settle([1].into_iter()), upto(Some(2)));
        // Pack 3 of two events: one settles, then the batch holding the other is handed back.
        acks.unsettled.insert(3, 2);
        assert_eq!(acks.settle([3].into_iter()), upto(None));
        assert_eq!(acks.requeue([3, 3].into_iter()), vec![3], "a pack is nacked once");
        assert_eq!(acks.requeue([3, 1].into_iter()), Vec::<u64>::new(), "never nacked twice, nor once acked");
        assert_eq!(acks.settle([3].into_iter()), upto(None), "its other event settling later acks nothing");
        assert_eq!(acks.settle([4].into_iter()), upto(Some(4)), "the run passes the tag handed back");
        assert!(acks.done.is_empty() && acks.unsettled.is_empty());
    }
}
