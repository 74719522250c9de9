//! What carries events: one RabbitMQ connection per process, channels made on
//! demand, and a publisher that only reports success once the broker has
//! confirmed the message (publisher confirms + `mandatory`).

pub mod durable;
pub mod outbox;
pub mod pack;
pub mod topology;

use parking_lot::Mutex as SyncMutex;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::events::{Envelope, Family};
pub use topology::Topology;

/// Header counting how many times a message has been tried (1 on first publish).
pub const ATTEMPT_HEADER: &str = "x-attempt";
/// Header carrying why a message was retried or parked.
pub const ERROR_HEADER: &str = "x-last-error";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed connect, callers are refused at once for this long: no busy reconnect loop.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The last connect failed a moment ago; not tried again yet.
    #[error("the broker is unreachable (reconnect backing off)")]
    BackingOff,
    #[error("the broker is unreachable: {0}")]
    Connect(lapin::Error),
    #[error("the broker is unreachable: connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("the broker cancelled the consumer")]
    ConsumerCancelled,
    #[error("a lane of the consumer stopped")]
    LaneStopped,
    #[error("the broker refused the message: {0}")]
    Refused(&'static str),
    #[error("no publish confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// One failure heard by every event of a pack.
    #[error("{0}")]
    Shared(std::sync::Arc<BusError>),
}

#[derive(Debug, Clone, Copy)]
enum Declares {
    All,
    EventsExchange,
}

/// The process's broker connection, re-established lazily after it breaks.
pub struct Broker {
    url: String,
    name: String,
    topology: Topology,
    /// Extra CA certificates for `amqps://` (`AMQP_CA_FILE`); the bundled Mozilla roots always apply.
    tls: lapin::tcp::OwnedTLSConfig,
    /// What this process declares on connect: everything, or (the ingress) only the exchange it publishes to.
    declares: Declares,
    conn: Mutex<Option<Connection>>,
    last_failure: SyncMutex<Option<Instant>>,
}

impl Broker {
    /// The topology is declared on every (re)connect, so a broker that lost it
    /// (a fresh node, a deleted queue) gets it back without a restart.
    pub fn new(url: &str, name: &str, topology: Topology) -> Self {
        Broker {
            url: url.to_string(),
            name: name.to_string(),
            topology,
            tls: lapin::tcp::OwnedTLSConfig::default(),
            declares: Declares::All,
            conn: Mutex::new(None),
            last_failure: SyncMutex::new(None),
        }
    }

    /// Trusts these CA certificates (PEM) too when the URL is `amqps://`.
    pub fn with_ca(mut self, ca_pem: Option<&str>) -> Self {
        self.tls.cert_chain = ca_pem.map(str::to_string);
        self
    }

    /// Declares only the events exchange on connect: a process that only
    /// publishes (the ingress) then needs no permission on queues (README,
    /// "Deploying next to the dashboard"). The workers declare the rest.
    pub fn publish_only(mut self) -> Self {
        self.declares = Declares::EventsExchange;
        self
    }

    /// A new channel on the live connection, connecting first if needed.
    pub async fn channel(&self) -> Result<Channel, BusError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.create_channel().await?);
        }
        *conn = None;
        let fresh = self.connect().await?;
        let ch = fresh.create_channel().await?;
        *conn = Some(fresh);
        Ok(ch)
    }

    /// A channel in publisher-confirm mode.
    pub async fn confirm_channel(&self) -> Result<Channel, BusError> {
        let ch = self.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(ch)
    }

    /// Connected now, or connects (subject to the reconnect back-off).
    pub async fn ping(&self) -> Result<(), BusError> {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_some_and(|c| c.status().connected()) {
            return Ok(());
        }
        *conn = Some(self.connect().await?);
        Ok(())
    }

    async fn connect(&self) -> Result<Connection, BusError> {
        let recent = self.last_failure.lock().is_some_and(|t| t.elapsed() < RECONNECT_BACKOFF);
        if recent {
            return Err(BusError::BackingOff);
        }
        let props = ConnectionProperties::default().with_connection_name(LongString::from(self.name.clone()));
        let result = tokio::time::timeout(CONNECT_TIMEOUT, self.connect_and_declare(props)).await;
        let outcome = match result {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(BusError::Connect(e)),
            Err(_) => Err(BusError::ConnectTimeout(CONNECT_TIMEOUT)),
        };
        *self.last_failure.lock() = outcome.as_ref().err().map(|_| Instant::now());
        outcome
    }

    async fn connect_and_declare(&self, props: ConnectionProperties) -> lapin::Result<Connection> {
        let conn = lapin::ConnectionBuilder::new()?
            .with_uri_str(self.url.clone())
            .with_properties(props)
            .with_tls_config(self.tls.clone())
            .connect()
            .await?;
        let ch = conn.create_channel().await?;
        match self.declares {
            Declares::All => self.topology.declare(&ch).await?,
            Declares::EventsExchange => self.topology.declare_events_exchange(&ch).await?,
        }
        ch.close(200, "declared".into()).await?;
        Ok(conn)
    }

    /// Each family's dead-letter queue depth, read with a passive declare (which creates nothing).
    pub async fn dead_letter_depths(&self, topology: &Topology) -> Result<Vec<(Family, u32)>, BusError> {
        let ch = self.channel().await?;
        let mut depths = Vec::new();
        for family in Family::ALL {
            let opts = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
            let q = ch.queue_declare(topology.dead_queue(family).as_str().into(), opts, FieldTable::default()).await?;
            depths.push((family, q.message_count()));
        }
        let _ = ch.close(200, "scraped".into()).await;
        Ok(depths)
    }

    pub async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            let _ = c.close(200, "shutdown".into()).await;
        }
    }
}

/// Publishes messages and waits for the broker's confirm of each.
pub struct Publisher {
    broker: std::sync::Arc<Broker>,
    timeout: Duration,
    channel: Mutex<Option<Channel>>,
}

/// An accepted event on its way to the broker: its envelope's bytes and its message's properties.
pub struct Pending {
    pub body: Vec<u8>,
    pub key: String,
    pub kind: &'static str,
    pub traceparent: Option<String>,
}

impl Pending {
    /// An envelope already encoded as `body`, in the trace `traceparent`.
    pub fn of(env: &Envelope, body: Vec<u8>, traceparent: Option<&str>) -> Self {
        Pending { body, key: env.key.clone(), kind: env.event.kind(), traceparent: traceparent.map(str::to_string) }
    }
}

/// What goes out: where, and with which headers.
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub message_id: &'a str,
    pub kind: &'a str,
    pub attempt: i64,
    pub error: Option<&'a str>,
    /// The W3C `traceparent` the message carries on to the worker.
    pub traceparent: Option<&'a str>,
}

impl Publisher {
    pub fn new(broker: std::sync::Arc<Broker>, timeout: Duration) -> Self {
        Publisher { broker, timeout, channel: Mutex::new(None) }
    }

    /// How long a publish waits for the broker's confirm (`PUBLISH_TIMEOUT`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Publishes these events of one family to the events exchange as one
    /// message, first attempt: a pack ([`pack`]) if there are several.
    pub async fn publish_events(&self, topo: &Topology, family: Family, events: &[&Pending]) -> Result<(), BusError> {
        let exchange = topo.events_exchange();
        if let [one] = events {
            let out = Outgoing {
                exchange: &exchange,
                routing_key: family.as_str(),
                body: &one.body,
                message_id: &one.key,
                kind: one.kind,
                attempt: 1,
                error: None,
                traceparent: one.traceparent.as_deref(),
            };
            return self.publish(&out).await;
        }
        let body = pack::encode(events.iter().map(|e| e.body.as_slice()));
        let first = events.first().map_or("", |e| e.key.as_str());
        let out = Outgoing {
            exchange: &exchange,
            routing_key: family.as_str(),
            body: &body,
            message_id: &format!("pack of {}: {first}", events.len()),
            kind: pack::PACK_KIND,
            attempt: 1,
            error: None,
            traceparent: None,
        };
        let props = properties(&out);
        let traceparents = events
            .iter()
            .map(|e| AMQPValue::LongString(LongString::from(e.traceparent.clone().unwrap_or_default())))
            .collect::<Vec<_>>();
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(pack::TRACEPARENTS_HEADER.into(), AMQPValue::FieldArray(traceparents.into()));
        self.send(&out, props.with_headers(headers)).await
    }

    /// Returns once the broker has taken responsibility for the message.
    pub async fn publish(&self, out: &Outgoing<'_>) -> Result<(), BusError> {
        self.send(out, properties(out)).await
    }

    async fn send(&self, out: &Outgoing<'_>, props: BasicProperties) -> Result<(), BusError> {
        let ch = self.channel().await?;
        let result = self.publish_on(&ch, out, props).await;
        if result.is_err() && !ch.status().connected() {
            self.channel.lock().await.take();
        }
        result
    }

    async fn publish_on(&self, ch: &Channel, out: &Outgoing<'_>, props: BasicProperties) -> Result<(), BusError> {
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let started = Instant::now();
        let confirm = ch.basic_publish(out.exchange.into(), out.routing_key.into(), opts, out.body, props).await?;
        let confirmation = tokio::time::timeout(self.timeout, confirm).await;
        metrics::histogram!(crate::telemetry::PUBLISH_CONFIRM_DURATION).record(started.elapsed().as_secs_f64());
        let confirmation = match confirmation {
            Ok(c) => c?,
            Err(_) => return Err(BusError::ConfirmTimeout(self.timeout)),
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BusError::Refused("unroutable (no queue bound)")),
            Confirmation::Nack(_) => Err(BusError::Refused("nack")),
            Confirmation::NotRequested => Err(BusError::Refused("confirms not enabled")),
        }
    }

    async fn channel(&self) -> Result<Channel, BusError> {
        let mut slot = self.channel.lock().await;
        if let Some(ch) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(ch.clone());
        }
        let ch = self.broker.confirm_channel().await?;
        *slot = Some(ch.clone());
        Ok(ch)
    }
}

fn properties(out: &Outgoing<'_>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(out.attempt));
    if let Some(e) = out.error {
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(LongString::from(e.to_string())));
    }
    if let Some(t) = out.traceparent {
        headers.insert(crate::trace::TRACEPARENT.into(), AMQPValue::LongString(LongString::from(t.to_string())));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(ShortString::from(truncate(out.message_id, 255)))
        .with_type(out.kind.into())
        .with_timestamp(chrono::Utc::now().timestamp() as u64)
        .with_headers(headers)
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Reads a header as an integer, whatever integer type the sender used.
pub fn header_int(props: &BasicProperties, name: &str) -> Option<i64> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

/// Reads a header as text.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(v) => Some(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        AMQPValue::ShortString(v) => Some(v.as_str().to_string()),
        _ => None,
    }
}
