//! The dead-letter queues `{p}.<family>.dead` and `{p}.notices.dead`: list,
//! show and redrive parked messages.
//!
//! Reading never loses a message: messages are taken with `basic.get` without
//! auto-ack and held until the end, then handed back (`nack` with requeue), except
//! the ones a redrive has republished, confirmed, and only then acknowledged.

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use serde::Serialize;

use crate::bus::{
    ATTEMPT_HEADER, Broker, BusError, ERROR_HEADER, Outgoing, Publisher, Topology, header_int, header_str,
};
use crate::events::Family;
use crate::notify::queue::NoticeQueues;

/// The most messages one command reads from a queue, unless told otherwise.
pub const DEFAULT_LIMIT: usize = 10_000;

/// One parked message as an operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Parked {
    pub family: &'static str,
    /// The message's `message_id`: the event's de-duplication key (empty if the publisher set none).
    pub id: String,
    pub kind: String,
    /// The try that failed.
    pub attempt: i64,
    /// Why it was parked (`x-last-error`), or what the broker said.
    pub reason: String,
    /// When it was last published (epoch seconds), if known.
    pub published_at: Option<u64>,
    /// The trace it belongs to, kept on a redrive.
    pub traceparent: Option<String>,
    #[serde(skip)]
    pub body: Vec<u8>,
}

impl Parked {
    fn from_delivery(family: Parking, d: &Delivery) -> Parked {
        let p = &d.properties;
        Parked {
            family: family.as_str(),
            id: p.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default(),
            kind: p.kind().as_ref().map_or_else(|| "unknown".into(), |k| k.to_string()),
            attempt: header_int(p, ATTEMPT_HEADER).unwrap_or(1),
            reason: reason(p),
            published_at: *p.timestamp(),
            traceparent: header_str(p, crate::trace::TRACEPARENT),
            body: d.data.clone(),
        }
    }

    /// The body for a person: pretty JSON if it is JSON, else the text as it is.
    pub fn body_text(&self) -> String {
        match serde_json::from_slice::<serde_json::Value>(&self.body) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(_) => String::from_utf8_lossy(&self.body).into_owned(),
        }
    }
}

/// Why a message is parked. The worker parks with fresh headers (`x-last-error`);
/// a message that carries `x-death` was parked by the broker itself, e.g. after
/// `x-delivery-limit` deliveries that no worker finished, and any `x-last-error`
/// it has is from an earlier try.
fn reason(p: &lapin::BasicProperties) -> String {
    let last_error = header_str(p, ERROR_HEADER);
    match (broker_death(p), last_error) {
        (Some(death), Some(earlier)) => format!("parked by the broker: {death} (an earlier try: {earlier})"),
        (Some(death), None) => format!("parked by the broker: {death}"),
        (None, Some(e)) => e,
        (None, None) => "no reason recorded".into(),
    }
}

/// The reason and queue of the latest `x-death` entry (the broker puts the latest first).
fn broker_death(p: &lapin::BasicProperties) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = p.headers().as_ref()?.inner().get("x-death")? else { return None };
    let AMQPValue::FieldTable(latest) = deaths.as_slice().first()? else { return None };
    let text = |k: &str| match latest.inner().get(k) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
        _ => None,
    };
    let reason = text("reason")?;
    Some(match text("queue") {
        Some(q) => format!("{reason} in {q}"),
        None => reason,
    })
}

/// Which messages a redrive takes.
#[derive(Debug, Clone)]
pub enum Select {
    All,
    Id(String),
}

impl Select {
    fn takes(&self, p: &Parked) -> bool {
        match self {
            Select::All => true,
            Select::Id(id) => &p.id == id,
        }
    }
}

/// A dead-letter queue: an event family's, or the notices' (`--family notices`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parking {
    Family(Family),
    Notices,
}

impl Parking {
    pub const ALL: [Parking; Family::ALL.len() + 1] = {
        let mut all = [Parking::Notices; Family::ALL.len() + 1];
        let mut i = 0;
        while i < Family::ALL.len() {
            all[i] = Parking::Family(Family::ALL[i]);
            i += 1;
        }
        all
    };

    pub fn as_str(self) -> &'static str {
        match self {
            Parking::Family(f) => f.as_str(),
            Parking::Notices => crate::notify::queue::ROUTING_KEY,
        }
    }

    fn dead_queue(self, topo: &Topology) -> String {
        match self {
            Parking::Family(f) => topo.dead_queue(f),
            Parking::Notices => NoticeQueues::new(topo, &[]).dead_queue(),
        }
    }
}

impl From<Family> for Parking {
    fn from(f: Family) -> Self {
        Parking::Family(f)
    }
}

impl clap::ValueEnum for Parking {
    fn value_variants<'a>() -> &'a [Self] {
        &Parking::ALL
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// The queues a command works on: one, or every family's and the notices'.
pub fn families(only: Option<Parking>) -> Vec<Parking> {
    only.map_or_else(|| Parking::ALL.to_vec(), |f| vec![f])
}

/// The messages parked in the families' dead-letter queues, oldest first; none is removed.
pub async fn list(
    broker: &Broker,
    topo: &Topology,
    only: Option<Parking>,
    limit: usize,
) -> Result<Vec<Parked>, BusError> {
    let mut out = Vec::new();
    for family in families(only) {
        let ch = broker.channel().await?;
        let held = hold(&ch, &family.dead_queue(topo), limit.saturating_sub(out.len())).await;
        out.extend(held.iter().map(|d| Parked::from_delivery(family, d)));
        give_back(&ch, &held).await?;
        let _ = ch.close(200, "listed".into()).await;
    }
    Ok(out)
}

/// The parked messages whose id is `id` (normally one).
pub async fn show(broker: &Broker, topo: &Topology, id: &str, only: Option<Parking>) -> Result<Vec<Parked>, BusError> {
    Ok(list(broker, topo, only, DEFAULT_LIMIT).await?.into_iter().filter(|p| p.id == id).collect())
}

/// What a redrive did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Redriven {
    pub redriven: Vec<Parked>,
    /// Selected but not republished (the broker refused or did not confirm): still parked.
    pub failed: Vec<(String, String)>,
}

/// Republishes the selected parked messages, their original bytes, to the events
/// exchange with the family as routing key and `x-attempt` back at 1; each DLQ copy
/// is acknowledged only after the broker confirmed its republished twin.
pub async fn redrive(
    broker: &Broker,
    publisher: &Publisher,
    topo: &Topology,
    select: &Select,
    only: Option<Parking>,
    limit: usize,
) -> Result<Redriven, BusError> {
    let mut done = Redriven::default();
    let progress = super::Progress::new("redriven");
    for family in families(only) {
        let ch = broker.channel().await?;
        let held = hold(&ch, &family.dead_queue(topo), limit).await;
        let mut keep = Vec::new();
        for d in held {
            let parked = Parked::from_delivery(family, &d);
            if !select.takes(&parked) {
                keep.push(d);
                continue;
            }
            let exchange = topo.events_exchange();
            let out = Outgoing {
                exchange: &exchange,
                routing_key: family.as_str(),
                body: &d.data,
                message_id: &parked.id,
                kind: &parked.kind,
                attempt: 1,
                error: None,
                traceparent: parked.traceparent.as_deref(),
            };
            match publisher.publish(&out).await {
                Ok(()) => {
                    ch.basic_ack(d.delivery_tag, BasicAckOptions::default()).await?;
                    done.redriven.push(parked);
                    progress.update(done.redriven.len() as u64);
                }
                Err(e) => {
                    done.failed.push((parked.id.clone(), e.to_string()));
                    keep.push(d);
                }
            }
        }
        give_back(&ch, &keep).await?;
        let _ = ch.close(200, "redriven".into()).await;
    }
    progress.finish(done.redriven.len() as u64);
    Ok(done)
}

/// Takes up to `limit` messages off the queue, unacknowledged: while held they
/// are invisible to other readers, and a crash of this process hands them back.
async fn hold(ch: &Channel, queue: &str, limit: usize) -> Vec<Delivery> {
    let mut held = Vec::new();
    while held.len() < limit {
        match ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await {
            Ok(Some(m)) => held.push(m.delivery),
            // Empty, or no such queue (nothing was ever parked there): nothing more to read.
            Ok(None) | Err(_) => break,
        }
    }
    held
}

async fn give_back(ch: &Channel, held: &[Delivery]) -> Result<(), BusError> {
    for d in held {
        ch.basic_nack(d.delivery_tag, BasicNackOptions { multiple: false, requeue: true }).await?;
    }
    Ok(())
}
