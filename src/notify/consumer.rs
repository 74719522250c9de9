//! The notices consumer: takes notice messages from `{p}.notices`, posts each
//! to its receiver, and retries, parks or settles it.
//!
//! It runs on its own channel, beside the event families' consumers, so a slow
//! receiver never holds up applying events. Among receivers, a per-receiver
//! limit keeps one that hangs from taking the whole prefetch window: at most
//! [`IN_FLIGHT_PER_RECEIVER`] posts to one receiver at once, at most
//! [`HELD_PER_RECEIVER`] of its messages held; the rest wait in the shortest
//! delay queue (without using up a try) while other receivers' notices go on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, info, info_span, warn};
use uuid::Uuid;

use super::client::Deliverer;
use super::deliver::{Claim, Claimed, Settle, attempt, claim, receiver, record, release};
use super::notice::{NoticeMessage, webhook_id};
use super::queue::{NoticeQueues, ROUTING_KEY};
use crate::bus::{ATTEMPT_HEADER, Broker, BusError, Outgoing, Publisher, header_int};
use crate::telemetry::{
    NOTICES_DEFERRED, NOTICES_PARKED, NOTICES_REFUSED, NOTICES_RETRIED, NOTICES_SENT, NOTICES_SKIPPED,
};

/// Posts to one receiver at the same time.
pub const IN_FLIGHT_PER_RECEIVER: usize = 4;
/// Messages of one receiver held (posting or waiting for a slot) at once.
pub const HELD_PER_RECEIVER: usize = 16;
/// Unacknowledged notice messages per consumer.
const PREFETCH: u16 = 256;

pub struct NoticeConsumer {
    pub pool: PgPool,
    pub broker: Arc<Broker>,
    pub publisher: Arc<Publisher>,
    pub deliverer: Arc<Deliverer>,
    pub queues: NoticeQueues,
    /// `NOTIFY_RETRY_DELAYS`.
    pub delays: Vec<Duration>,
    /// `NOTIFY_TIMEOUT`: a claim is held a little longer than one try can last.
    pub timeout: Duration,
}

impl NoticeConsumer {
    /// Consumes until `shutdown`, reconnecting after broker failures.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut pause = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.consume(&shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, "notices consumer stopped; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn consume(self: &Arc<Self>, shutdown: &CancellationToken) -> Result<(), BusError> {
        let ch = self.broker.channel().await?;
        self.queues.declare(&ch).await?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let queue = self.queues.work_queue();
        let tag = format!("notices-{}", Uuid::new_v4().simple());
        let mut consumer = ch
            .basic_consume(queue.as_str().into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        info!(queue = %queue, "consuming notices");
        let limiter = Limiter::default();
        let tracker = TaskTracker::new();
        let outcome = loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    let (this, ch, limiter) = (self.clone(), ch.clone(), limiter.clone());
                    tracker.spawn(async move { this.handle(&ch, &limiter, delivery).await });
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(BusError::ConsumerCancelled),
            }
        };
        // Tries in flight end within NOTIFY_TIMEOUT; their outcomes are recorded and acked.
        tracker.close();
        tracker.wait().await;
        let _ = ch.close(200, "shutdown".into()).await;
        outcome
    }

    async fn handle(&self, ch: &Channel, limiter: &Limiter, delivery: Delivery) {
        let tag = delivery.delivery_tag;
        let result = self.handle_inner(limiter, &delivery).await;
        let settled = match result {
            Ok(()) => ch.basic_ack(tag, BasicAckOptions::default()).await,
            Err(e) => {
                // Postgres or the broker is away: hand the message back after a pause.
                warn!(error = %e, "notice not settled; it will be taken again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                ch.basic_nack(tag, BasicNackOptions { multiple: false, requeue: true }).await
            }
        };
        if let Err(e) = settled {
            debug!(error = %e, "could not settle a notice message; the broker will deliver it again");
        }
    }

    async fn handle_inner(&self, limiter: &Limiter, delivery: &Delivery) -> Result<(), HandleError> {
        let msg = match NoticeMessage::decode(&delivery.data) {
            Ok(m) => m,
            Err(reason) => {
                warn!(%reason, "notice message parked");
                metrics::counter!(NOTICES_PARKED, "kind" => "unknown", "reason" => "undecodable").increment(1);
                let attempt = header_int(&delivery.properties, ATTEMPT_HEADER).unwrap_or(1);
                return Ok(self.park_raw(&delivery.data, "unknown", attempt, &reason).await?);
            }
        };
        if msg.parked {
            reopen(&self.pool, msg.notice_id).await?;
        }
        let hold = self.timeout + Duration::from_secs(5);
        let c = match claim(&self.pool, msg.notice_id, hold).await? {
            Claim::Claimed(c) => c,
            Claim::Settled | Claim::Missing => return Ok(()),
            Claim::Busy => return Ok(self.defer(msg.notice_id, "another try of it is in progress").await?),
        };
        let span = info_span!("notice", webhook_id = %webhook_id(c.id), kind = %c.kind, business = c.business_id);
        async {
            let Some(slot) = limiter.enter(&receiver(&c)) else {
                release(&self.pool, c.id).await?;
                metrics::counter!(NOTICES_DEFERRED).increment(1);
                return Ok(self.defer(c.id, "its receiver is busy").await?);
            };
            let _permit = slot.acquire().await;
            let settle = attempt(&c, &self.deliverer, &self.delays).await;
            self.follow_up(&c, &settle).await?;
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Records the outcome, then queues the next try or parks it.
    async fn follow_up(&self, c: &Claimed, settle: &Settle) -> Result<(), HandleError> {
        record(&self.pool, c, settle).await?;
        let kind = c.kind.clone();
        let tries = i64::from(c.tries) + 1;
        match settle {
            Settle::Delivered => {
                info!(tries, "notice delivered");
                metrics::counter!(NOTICES_SENT, "kind" => kind).increment(1);
            }
            Settle::Skipped(why) => {
                info!(reason = %why, "notice skipped");
                metrics::counter!(NOTICES_SKIPPED, "kind" => kind).increment(1);
            }
            Settle::Retry { after, reason } => {
                let delay = self.queues.delay_for(*after);
                info!(tries, %reason, retry_in = ?delay, "notice not delivered; will retry");
                metrics::counter!(NOTICES_RETRIED, "kind" => kind).increment(1);
                self.publish_retry(c.id, &c.kind, delay, tries + 1, reason).await?;
            }
            Settle::Parked(why) | Settle::Misconfigured(why) | Settle::Refused(why) | Settle::Gone(why) => {
                let class = match settle {
                    Settle::Refused(_) => "refused",
                    Settle::Gone(_) => "gone",
                    Settle::Misconfigured(_) => "misconfigured",
                    _ if why.starts_with("gave up") => "gave_up",
                    _ => "rejected",
                };
                warn!(tries, reason = %why, "notice parked");
                if class == "refused" {
                    metrics::counter!(NOTICES_REFUSED).increment(1);
                }
                metrics::counter!(NOTICES_PARKED, "kind" => kind.clone(), "reason" => class).increment(1);
                let body = NoticeMessage { parked: true, ..NoticeMessage::new(c.id) }.to_json();
                self.park_raw(&body, &kind, tries, why).await?;
            }
        }
        Ok(())
    }

    async fn publish_retry(
        &self,
        id: Uuid,
        kind: &str,
        delay: Duration,
        attempt: i64,
        reason: &str,
    ) -> Result<(), BusError> {
        let body = NoticeMessage::new(id).to_json();
        let message_id = webhook_id(id);
        let exchange = self.queues.retry_exchange();
        let key = NoticeQueues::retry_routing_key(delay);
        let out = Outgoing {
            exchange: &exchange,
            routing_key: &key,
            body: &body,
            message_id: &message_id,
            kind,
            attempt,
            error: Some(reason),
            traceparent: None,
        };
        self.publisher.publish(&out).await
    }

    /// Puts the message back behind the shortest delay without using up a try.
    async fn defer(&self, id: Uuid, why: &str) -> Result<(), BusError> {
        let shortest = self.delays.iter().min().copied().unwrap_or(Duration::from_secs(1));
        debug!(reason = why, "notice deferred");
        self.publish_retry(id, "deferred", shortest, 0, why).await
    }

    async fn park_raw(&self, body: &[u8], kind: &str, attempt: i64, reason: &str) -> Result<(), BusError> {
        let exchange = self.queues.dead_exchange();
        let message_id = NoticeMessage::decode(body).map(|m| webhook_id(m.notice_id)).unwrap_or_default();
        let out = Outgoing {
            exchange: &exchange,
            routing_key: ROUTING_KEY,
            body,
            message_id: &message_id,
            kind,
            attempt,
            error: Some(reason),
            traceparent: None,
        };
        self.publisher.publish(&out).await
    }
}

/// A parked notice whose message an operator redrove: a fresh round of tries.
async fn reopen(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_worker.notices SET settled_at = NULL, outcome = NULL, tries = 0, claimed_until = NULL
          WHERE id = $1 AND outcome = 'parked'",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Per-receiver slots: posts in flight (a semaphore) and messages held.
#[derive(Clone, Default)]
struct Limiter {
    receivers: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

struct Slot {
    key: String,
    sem: Arc<Semaphore>,
    limiter: Limiter,
}

impl Limiter {
    /// A slot for one more message of `key`, or `None` if it holds its share already.
    fn enter(&self, key: &str) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(key.to_string()).or_default();
        if *n >= HELD_PER_RECEIVER {
            return None;
        }
        *n += 1;
        let sem = self
            .receivers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(IN_FLIGHT_PER_RECEIVER)))
            .clone();
        Some(Slot { key: key.to_string(), sem, limiter: self.clone() })
    }
}

impl Slot {
    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().acquire_owned().await.ok()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.limiter.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
                self.limiter.receivers.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_holds_at_most_its_share_and_others_are_not_affected() {
        let l = Limiter::default();
        let held: Vec<_> = (0..HELD_PER_RECEIVER).map(|_| l.enter("https://slow.example").unwrap()).collect();
        assert!(l.enter("https://slow.example").is_none());
        assert!(l.enter("https://other.example").is_some());
        drop(held);
        assert!(l.enter("https://slow.example").is_some());
        assert!(l.receivers.lock().unwrap().len() <= 1);
    }
}
