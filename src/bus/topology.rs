//! The RabbitMQ topology, declared by every process at start (declarations are idempotent).
//!
//! ```text
//! {p}.events  (direct) --family--> {p}.{family}            quorum, the work queue
//! {p}.retry   (direct) --family.ms--> {p}.{family}.retry.{ms}  quorum, TTL = ms,
//!                                     dead-letters back to {p}.events with key = family
//! {p}.dead    (direct) --family--> {p}.{family}.dead        quorum, parked messages
//! ```
//! The work queues also dead-letter into `{p}.dead` after `DELIVERY_LIMIT`
//! deliveries, so a message that crashes its worker every time is parked, not looped.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::events::Family;

/// Deliveries of one message before the broker itself parks it (a worker that dies on it each time).
pub const DELIVERY_LIMIT: i64 = 20;

#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
    pub retry_delays: Vec<Duration>,
}

impl Topology {
    pub fn new(prefix: &str, retry_delays: &[Duration]) -> Self {
        Topology { prefix: prefix.to_string(), retry_delays: retry_delays.to_vec() }
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    pub fn work_queue(&self, f: Family) -> String {
        format!("{}.{}", self.prefix, f.as_str())
    }
    pub fn dead_queue(&self, f: Family) -> String {
        format!("{}.{}.dead", self.prefix, f.as_str())
    }
    pub fn retry_queue(&self, f: Family, delay: Duration) -> String {
        format!("{}.{}.retry.{}", self.prefix, f.as_str(), delay.as_millis())
    }
    pub fn retry_routing_key(f: Family, delay: Duration) -> String {
        format!("{}.{}", f.as_str(), delay.as_millis())
    }

    /// Every queue name, for tools and test clean-up.
    pub fn all_queues(&self) -> Vec<String> {
        let mut names = Vec::new();
        for f in Family::ALL {
            names.push(self.work_queue(f));
            names.push(self.dead_queue(f));
            names.extend(self.retry_delays.iter().map(|d| self.retry_queue(f, *d)));
        }
        names
    }

    pub fn all_exchanges(&self) -> Vec<String> {
        vec![self.events_exchange(), self.retry_exchange(), self.dead_exchange()]
    }

    /// The one exchange a publisher needs (declaring it needs `configure` on it alone).
    pub async fn declare_events_exchange(&self, ch: &Channel) -> lapin::Result<()> {
        let opts = ExchangeDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(self.events_exchange().into(), ExchangeKind::Direct, opts, FieldTable::default()).await
    }

    pub async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        for ex in self.all_exchanges() {
            let opts = ExchangeDeclareOptions { durable: true, ..Default::default() };
            ch.exchange_declare(ex.into(), ExchangeKind::Direct, opts, FieldTable::default()).await?;
        }
        for f in Family::ALL {
            self.declare_family(ch, f).await?;
        }
        Ok(())
    }

    async fn declare_family(&self, ch: &Channel, f: Family) -> lapin::Result<()> {
        self.declare_lane(ch, f.as_str(), &self.retry_delays).await
    }

    /// Declares one lane of the topology, an event family's or the notices': the
    /// work queue `{p}.{name}` (bound by `name`), its dead queue `{p}.{name}.dead`
    /// and a delay queue `{p}.{name}.retry.{ms}` per delay (bound by `name.ms`,
    /// dead-lettering back to the work queue). The exchanges must exist.
    pub(crate) async fn declare_lane(&self, ch: &Channel, name: &str, delays: &[Duration]) -> lapin::Result<()> {
        let (p, events) = (&self.prefix, self.events_exchange());
        let mut work = quorum_args();
        work.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(DELIVERY_LIMIT));
        work.insert("x-dead-letter-exchange".into(), long(self.dead_exchange()));
        declare_bound(ch, &format!("{p}.{name}"), work, &events, name).await?;

        declare_bound(ch, &format!("{p}.{name}.dead"), quorum_args(), &self.dead_exchange(), name).await?;

        for delay in delays {
            let ms = delay.as_millis();
            let mut args = quorum_args();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms as i64));
            args.insert("x-dead-letter-exchange".into(), long(events.clone()));
            args.insert("x-dead-letter-routing-key".into(), long(name.to_string()));
            declare_bound(ch, &format!("{p}.{name}.retry.{ms}"), args, &self.retry_exchange(), &format!("{name}.{ms}"))
                .await?;
        }
        Ok(())
    }
}

/// Quorum queues replicate by Raft; at-least-once dead-lettering (which needs
/// `reject-publish` overflow) keeps a message from being lost on its way from a
/// retry queue back to the work queue.
fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum".into()));
    args.insert("x-dead-letter-strategy".into(), long("at-least-once".into()));
    args.insert("x-overflow".into(), long("reject-publish".into()));
    args
}

fn long(s: String) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn declare_bound(ch: &Channel, queue: &str, args: FieldTable, exchange: &str, key: &str) -> lapin::Result<()> {
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(ShortString::from(queue), opts, args).await?;
    ch.queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default()).await
}
