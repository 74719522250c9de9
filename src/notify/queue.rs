//! The notices' own queues, beside the event families' (docs/adr/0014-notices-outbox.md):
//!
//! ```text
//! {p}.events --notices--> {p}.notices                       quorum, the delivery queue
//! {p}.retry  --notices.ms--> {p}.notices.retry.{ms}         TTL = ms, dead-letters back to {p}.notices
//! {p}.dead   --notices--> {p}.notices.dead                  parked, reason in x-last-error
//! ```
//! Declared by the processes that use them (idempotent), on every new channel.

use std::time::Duration;

use lapin::Channel;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::bus::{Broker, BusError, Topology};

pub const ROUTING_KEY: &str = "notices";

#[derive(Debug, Clone)]
pub struct NoticeQueues {
    pub prefix: String,
    pub delays: Vec<Duration>,
}

impl NoticeQueues {
    pub fn new(topology: &Topology, delays: &[Duration]) -> Self {
        NoticeQueues { prefix: topology.prefix.clone(), delays: delays.to_vec() }
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
    pub fn work_queue(&self) -> String {
        format!("{}.{ROUTING_KEY}", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.{ROUTING_KEY}.dead", self.prefix)
    }
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.{ROUTING_KEY}.retry.{}", self.prefix, delay.as_millis())
    }
    pub fn retry_routing_key(delay: Duration) -> String {
        format!("{ROUTING_KEY}.{}", delay.as_millis())
    }

    pub fn all_queues(&self) -> Vec<String> {
        let mut names = vec![self.work_queue(), self.dead_queue()];
        names.extend(self.delays.iter().map(|d| self.retry_queue(*d)));
        names
    }

    /// The queue to wait in for `after`: the configured delay equal to it, else
    /// the shortest one longer, else the longest.
    pub fn delay_for(&self, after: Duration) -> Duration {
        let longest = self.delays.iter().max().copied().unwrap_or(after);
        self.delays.iter().copied().filter(|d| *d >= after).min().unwrap_or(longest)
    }

    /// Messages parked in `{p}.notices.dead` (a passive declare: creates nothing).
    pub async fn dead_depth(&self, broker: &Broker) -> Result<u32, BusError> {
        let ch = broker.channel().await?;
        let opts = QueueDeclareOptions { passive: true, ..Default::default() };
        let q = ch.queue_declare(self.dead_queue().as_str().into(), opts, FieldTable::default()).await;
        let _ = ch.close(200, "scraped".into()).await;
        Ok(q?.message_count())
    }

    /// Declares the queues and bindings (the exchanges are the event topology's).
    pub async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        let mut work = quorum_args();
        work.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(crate::bus::topology::DELIVERY_LIMIT));
        work.insert("x-dead-letter-exchange".into(), long(self.dead_exchange()));
        declare_bound(ch, &self.work_queue(), work, &self.events_exchange(), ROUTING_KEY).await?;
        declare_bound(ch, &self.dead_queue(), quorum_args(), &self.dead_exchange(), ROUTING_KEY).await?;
        for delay in &self.delays {
            let mut args = quorum_args();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay.as_millis() as i64));
            args.insert("x-dead-letter-exchange".into(), long(self.events_exchange()));
            args.insert("x-dead-letter-routing-key".into(), long(ROUTING_KEY.to_string()));
            let key = Self::retry_routing_key(*delay);
            declare_bound(ch, &self.retry_queue(*delay), args, &self.retry_exchange(), &key).await?;
        }
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_goes_to_the_delay_queue_that_covers_it() {
        let q = NoticeQueues {
            prefix: "p".into(),
            delays: vec![Duration::from_secs(5), Duration::from_secs(30), Duration::from_secs(120)],
        };
        assert_eq!(q.delay_for(Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(q.delay_for(Duration::from_secs(1)), Duration::from_secs(5));
        assert_eq!(q.delay_for(Duration::from_secs(31)), Duration::from_secs(120));
        assert_eq!(q.delay_for(Duration::from_secs(9999)), Duration::from_secs(120));
        assert_eq!(q.retry_queue(Duration::from_secs(30)), "p.notices.retry.30000");
        assert_eq!(q.all_queues().len(), 5);
    }
}
