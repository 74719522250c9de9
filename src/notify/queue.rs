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
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

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

    /// Declares the queues and bindings (the exchanges are the event topology's):
    /// a lane like an event family's, named `notices`.
    pub async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        Topology::new(&self.prefix, &[]).declare_lane(ch, ROUTING_KEY, &self.delays).await
    }
}
