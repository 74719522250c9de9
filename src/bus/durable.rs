//! The durable accept, in one place: an event the ingress answers 2xx for is
//! either confirmed by RabbitMQ or, if the broker cannot confirm it, written
//! to the Postgres outbox, whose relay is woken to publish it once the broker
//! is back (docs/adr/0005-2xx-after-confirm.md, docs/adr/0007-outbox.md).
//!
//! Publishing is a group commit: per event family, one message is in flight
//! at a time, and the events accepted while it waits for its confirm leave
//! together as the next one, a pack of up to `PUBLISH_PACK` events
//! ([`super::pack`]). Alone, an event leaves at once as its own message; under
//! load, the broker handles one message for many events. Each request is
//! answered when the message holding its event is confirmed, and if that
//! message is not, each of its events goes to the outbox on its own.
//! `PUBLISH_WAIT` (default 5ms) lets a message that would carry fewer than
//! [`COMPANY`] events wait that long for more: fewer, fuller messages at a few
//! hundred requests a second, for that much on those answers.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, mpsc, oneshot};

use super::outbox::{self, Relay};
use super::{BusError, Pending, Publisher, Topology};
use crate::events::{Envelope, Family};
use crate::telemetry;

/// Where an accepted event was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Broker,
    Outbox,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Broker => "broker",
            Via::Outbox => "outbox",
        }
    }
}

/// Neither the broker nor the outbox took the event: the sender must retry.
#[derive(Debug, thiserror::Error)]
#[error("the broker did not confirm the event ({bus}) and the outbox write failed")]
pub struct NotKept {
    pub bus: BusError,
    #[source]
    pub db: sqlx::Error,
}

/// Publishes, else keeps in the outbox and wakes the relay.
pub struct Durable {
    pool: PgPool,
    publisher: Arc<Publisher>,
    topology: Topology,
    wake: Arc<Notify>,
    /// Per family (in [`Family::ALL`] order), the queue of its group publisher; none with `PUBLISH_PACK=1`.
    gather: Vec<mpsc::Sender<Waiting>>,
}

/// An event waiting for the message that carries it to be confirmed.
struct Waiting {
    event: Pending,
    confirmed: oneshot::Sender<Result<(), Arc<BusError>>>,
}

impl Durable {
    /// Spawns a group publisher per event family that packs up to `pack`
    /// events in a message (1: every event is its own message), waiting up to
    /// `wait` for company while a message would hold fewer than [`COMPANY`].
    pub fn new(pool: PgPool, publisher: Arc<Publisher>, topology: Topology, pack: usize, wait: Duration) -> Self {
        // One event per message needs no group publisher: each request
        // publishes its own, all of them in flight at once.
        let gather = if pack <= 1 {
            Vec::new()
        } else {
            Family::ALL
                .into_iter()
                .map(|family| {
                    let (tx, rx) = mpsc::channel(1024);
                    tokio::spawn(group_publish(publisher.clone(), topology.clone(), family, pack, wait, rx));
                    tx
                })
                .collect()
        };
        Durable { pool, publisher, topology, wake: Arc::new(Notify::new()), gather }
    }

    /// Hands the event to its family's group publisher and waits for the confirm of its message.
    async fn publish(&self, env: &Envelope, body: Vec<u8>, traceparent: Option<&str>) -> Result<(), BusError> {
        let family = env.event.family();
        let at = Family::ALL.iter().position(|f| *f == family).unwrap_or(0);
        let event = Pending::of(env, body, traceparent);
        let Some(gather) = self.gather.get(at) else {
            return publish_counted(&self.publisher, &self.topology, family, &[&event]).await;
        };
        let (confirmed, heard) = oneshot::channel();
        if gather.send(Waiting { event, confirmed }).await.is_err() {
            return Err(BusError::Refused("the group publisher stopped"));
        }
        // An event waits for its message's confirm no longer than a publish of
        // its own would have: behind a message the broker is slow to confirm, it
        // goes to the outbox when its own time is up (the message may still be
        // confirmed later; its key makes the second copy a duplicate).
        match tokio::time::timeout(self.publisher.timeout(), heard).await {
            Ok(Ok(result)) => result.map_err(BusError::Shared),
            Ok(Err(_)) => Err(BusError::Refused("the group publisher stopped")),
            Err(_) => Err(BusError::ConfirmTimeout(self.publisher.timeout())),
        }
    }

    /// Makes the event durable: confirmed by the broker, or in the outbox.
    /// `on_publish_failed` hears why the broker did not take it (for the log)
    /// before the outbox is tried.
    pub async fn keep(
        &self,
        env: &Envelope,
        traceparent: Option<&str>,
        on_publish_failed: impl FnOnce(&BusError),
    ) -> Result<Via, NotKept> {
        let bus = match self.publish(env, env.to_json(), traceparent).await {
            Ok(()) => return Ok(Via::Broker),
            Err(bus) => bus,
        };
        let body = env.to_json();
        on_publish_failed(&bus);
        match outbox::insert(&self.pool, env, &body, traceparent).await {
            Ok(()) => {
                self.wake.notify_one();
                Ok(Via::Outbox)
            }
            Err(db) => Err(NotKept { bus, db }),
        }
    }

    /// The relay that publishes what [`Durable::keep`] left in the outbox, woken by it.
    pub fn relay(&self) -> Relay {
        Relay {
            pool: self.pool.clone(),
            publisher: self.publisher.clone(),
            topology: self.topology.clone(),
            wake: self.wake.clone(),
        }
    }
}

/// One family's group publisher: takes the events waiting (up to `most`),
/// publishes them as one message, tells each what the broker said, and goes
/// again. While a message waits for its confirm the next one gathers.
async fn group_publish(
    publisher: Arc<Publisher>,
    topology: Topology,
    family: Family,
    most: usize,
    wait: Duration,
    mut rx: mpsc::Receiver<Waiting>,
) {
    let enough = most.min(COMPANY);
    let mut waiting = Vec::new();
    while rx.recv_many(&mut waiting, most).await > 0 {
        let deadline = tokio::time::Instant::now() + wait;
        while waiting.len() < enough && !wait.is_zero() {
            let room = most - waiting.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut waiting, room)).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        while !waiting.is_empty() {
            let take = fits(waiting.iter().map(|w| w.event.body.len()));
            let message: Vec<Waiting> = waiting.drain(..take).collect();
            let events: Vec<&Pending> = message.iter().map(|w| &w.event).collect();
            let result = publish_counted(&publisher, &topology, family, &events).await.map_err(Arc::new);
            for w in message {
                let _ = w.confirmed.send(result.clone());
            }
        }
    }
}

/// Publishes one message of accepted events and counts it.
async fn publish_counted(
    publisher: &Publisher,
    topology: &Topology,
    family: Family,
    events: &[&Pending],
) -> Result<(), BusError> {
    let result = publisher.publish_events(topology, family, events).await;
    metrics::counter!(telemetry::EVENT_MESSAGES_PUBLISHED, "family" => family.as_str()).increment(1);
    result
}

/// Events a message waits (up to `PUBLISH_WAIT`) to carry before it leaves.
pub const COMPANY: usize = 16;

/// A pack's body stays under this, well inside the broker's message size limit.
pub const PACK_MOST_BYTES: usize = 1 << 20;

/// How many of the events (by body size) go in the next message: at least one.
fn fits(sizes: impl Iterator<Item = usize>) -> usize {
    let mut total = 0;
    let mut n = 0;
    for size in sizes {
        total += size + 1;
        if n > 0 && total > PACK_MOST_BYTES {
            break;
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::{PACK_MOST_BYTES, fits};

    #[test]
    fn a_message_takes_events_up_to_the_byte_limit_and_always_one() {
        assert_eq!(fits([100, 100, 100].into_iter()), 3);
        assert_eq!(fits([PACK_MOST_BYTES / 2, PACK_MOST_BYTES / 2, 10].into_iter()), 1);
        assert_eq!(fits([PACK_MOST_BYTES * 3, 10].into_iter()), 1, "an event above the limit still leaves, alone");
        assert_eq!(fits(std::iter::empty()), 0);
    }
}
