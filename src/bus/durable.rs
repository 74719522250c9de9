//! The durable accept, in one place: an event the ingress answers 2xx for is
//! either confirmed by RabbitMQ or, if the broker cannot confirm it, written
//! to the Postgres outbox, whose relay is woken to publish it once the broker
//! is back (docs/adr/0005-2xx-after-confirm.md, docs/adr/0007-outbox.md).

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;

use super::outbox::{self, Relay};
use super::{BusError, Publisher, Topology};
use crate::events::Envelope;

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
}

impl Durable {
    pub fn new(pool: PgPool, publisher: Arc<Publisher>, topology: Topology) -> Self {
        Durable { pool, publisher, topology, wake: Arc::new(Notify::new()) }
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
        let body = env.to_json();
        let bus = match self.publisher.publish_envelope(&self.topology, env, &body, traceparent).await {
            Ok(()) => return Ok(Via::Broker),
            Err(bus) => bus,
        };
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
