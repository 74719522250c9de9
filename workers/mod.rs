//! What applies: consumers that take events off RabbitMQ in batches and apply
//! them to Postgres, one module per event family. The parts:
//!
//! - [`consumer`]: one consumer per family, its lanes (by entity), batches and acks;
//! - [`apply`]: a batch in one transaction, every event first claiming its key
//!   in the inbox (`store::inbox`; a key already there means "already
//!   applied": skip); an event that fails alone is isolated by re-applying the
//!   batch one event per transaction;
//! - [`settle`]: after the commit, each outcome logged and counted, a retried
//!   event sent through the delay queues, a failed one parked in the
//!   dead-letter queue with the reason.
//!
//! A family plugs in through one trait, [`Applier`], and one line of
//! [`CONSUMERS`]; the generic parts name no family. The batch is acknowledged
//! only after the commit. While Postgres is unreachable the batch is held and
//! retried with a growing pause, so nothing more is consumed.

pub mod apply;
pub mod billing;
pub mod bookings;
pub mod calls;
pub mod consumer;
pub mod settle;
pub mod transcripts;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::bus::{Broker, Publisher, Topology};
use crate::config::Config;
use crate::events::{BusinessId, Envelope, Event, Family};

/// One event family's worker: how it applies an event inside the batch's
/// transaction. `Writes` gathers what is better sent once per batch (each
/// family's own rows), flushed before the commit.
pub trait Applier: Send + Sync + 'static {
    const FAMILY: Family;
    type Writes: Default + Send;

    /// A batch's empty `Writes`, given what the worker process shares (a family
    /// that calls out, like the calls family to Twilio's API, takes its client here).
    fn writes(_ctx: &WorkerContext) -> Self::Writes {
        Self::Writes::default()
    }

    /// Applies one event whose inbox key this transaction has just claimed. An
    /// event that cannot be applied yet is `Outcome::Retry(reason)`; one that
    /// never can is `Outcome::Park(reason)` (parked at once); either gives its key back.
    fn apply(
        tx: &mut PgConnection,
        writes: &mut Self::Writes,
        env: &Envelope,
    ) -> impl Future<Output = Result<Outcome, ApplyError>> + Send;

    /// Whether the event claims a key in the inbox (`inbox_keys`) before it is
    /// applied. An event that is its own de-duplication record claims none: its
    /// applying inserts a row under a unique key that only this event writes, in
    /// the same transaction, and is [`Outcome::Duplicate`] when that row is
    /// already there. Such an event must never be applied twice by any other
    /// path, and its row must be kept at least as long as a key would be
    /// (`EVENT_RETENTION`). Its row is its event-log entry too: an applied one
    /// gets no row in `webhook_worker.inbox`, so the row must hold all its
    /// envelope held, and `replay` must rebuild the envelope from it (an ignored
    /// one is logged as usual). A Real-Time Transcription segment is one: it is
    /// most of a call's callbacks, and its key and log row cost twice its row.
    fn claims_key(env: &Envelope) -> bool {
        let _ = env;
        true
    }

    /// Before the batch's events are applied, with every event that claimed its
    /// key: a family may take what they all need in one round trip (the calls
    /// family locks all their calls at once) instead of one per event. What
    /// another transaction holds is left for later ([`Outcome::Later`]) unless
    /// `wait`: one of the events has been left for later too often.
    fn prepare(
        tx: &mut PgConnection,
        writes: &mut Self::Writes,
        fresh: &[&Envelope],
        wait: bool,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send {
        let _ = (tx, writes, fresh, wait);
        async { Ok(()) }
    }

    /// Sends what `apply` gathered, before the commit.
    fn flush(tx: &mut PgConnection, writes: &mut Self::Writes) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

type Consumer = fn(Arc<WorkerContext>, CancellationToken) -> BoxFuture<'static, ()>;

/// Every family's consumer: a new family is one line here (and its [`Applier`]).
pub const CONSUMERS: &[(Family, Consumer)] = &[
    (calls::Calls::FAMILY, |ctx, stop| Box::pin(consumer::run::<calls::Calls>(ctx, stop))),
    (billing::Billing::FAMILY, |ctx, stop| Box::pin(consumer::run::<billing::Billing>(ctx, stop))),
    (bookings::Bookings::FAMILY, |ctx, stop| Box::pin(consumer::run::<bookings::Bookings>(ctx, stop))),
];

/// What applying one event came to.
#[derive(Debug)]
pub enum Outcome {
    Applied,
    /// Applied, and an operator must hear of it: reported once, after the commit,
    /// so a batch that is re-run does not report it twice.
    Flagged(Box<dyn Report>),
    /// Its key was already in the inbox (for an event that claims no key, its
    /// own row was already there: see [`Applier::claims_key`]).
    Duplicate,
    /// Recorded, but it changes nothing (stale, or a kind we do not apply).
    Ignored(&'static str),
    /// Cannot be applied yet: retried through the delay queues, then parked.
    Retry(String),
    /// Can never be applied: parked in the dead-letter queue at once.
    Park(String),
    /// Not now: another worker's transaction holds its entity (the call). Its key
    /// goes back and the message, unacknowledged, goes into its lane's next batch
    /// instead of this batch waiting for that transaction (which, with several
    /// `work` processes taking one queue, made them take turns for whole batches).
    Later,
}

/// Something an operator must hear of about an applied event (a log line, a counter).
pub trait Report: std::fmt::Debug + Send + Sync {
    fn report(&self);
}

impl PartialEq for Outcome {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Outcome::Applied, Outcome::Applied)
            | (Outcome::Duplicate, Outcome::Duplicate)
            | (Outcome::Later, Outcome::Later) => true,
            (Outcome::Flagged(a), Outcome::Flagged(b)) => format!("{a:?}") == format!("{b:?}"),
            (Outcome::Ignored(a), Outcome::Ignored(b)) => a == b,
            (Outcome::Retry(a), Outcome::Retry(b)) | (Outcome::Park(a), Outcome::Park(b)) => a == b,
            _ => false,
        }
    }
}

/// Why an event was not applied, as the batch loop must treat it.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Postgres is unreachable or busy: the whole batch is held and tried again.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// This event was refused (a constraint, a business deleted meanwhile...).
    /// Applied again alone in its transaction, it becomes [`Outcome::Retry`]:
    /// retried through the delay queues (what it needs may arrive), then parked.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// Why one event was refused: the dead-letter reason, never the SQL's parameters.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "database refused the event: SQLSTATE {code} {message}{}",
        .constraint.as_ref().map(|c| format!(" (constraint {c})")).unwrap_or_default()
    )]
    Database { code: String, message: String, constraint: Option<String> },
    #[error("database refused the event: {0}")]
    Driver(sqlx::Error),
    #[error("{0} without a business")]
    NoBusiness(&'static str),
    /// The event log's compressor could not be set up.
    #[error("zstd: {0}")]
    Compressor(std::io::Error),
    /// A family's own reason (a row it needs vanished meanwhile...).
    #[error("{0}")]
    Other(&'static str),
}

impl From<sqlx::Error> for ApplyError {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) { ApplyError::Unavailable(e) } else { ApplyError::Refused(Refusal::from(e)) }
    }
}

impl From<sqlx::Error> for Refusal {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) => Refusal::Database {
                code: db.code().unwrap_or_default().into_owned(),
                message: db.message().to_owned(),
                constraint: db.constraint().map(str::to_owned),
            },
            _ => Refusal::Driver(e),
        }
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
                // The event log's partition for today is missing: apply.rs creates it before the next try.
                || crate::store::inbox::is_missing_partition(e)
        }
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// The business an event is for; an event that needs one and has none is refused.
pub fn business_of(env: &Envelope) -> Result<BusinessId, ApplyError> {
    env.business_id.ok_or_else(|| Refusal::NoBusiness(env.event.kind()).into())
}

/// An event on another family's queue (only a foreign publisher could put it there): parked.
pub fn not_of_family(family: Family, event: &Event) -> Outcome {
    Outcome::Park(format!("{} is not a {} event", event.kind(), family.as_str()))
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
    /// Twilio's REST API (Intelligence transcripts); `None` if the client could not be built.
    pub twilio_api: Option<Arc<crate::twilio_api::TwilioApi>>,
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
            twilio_api: twilio_api(cfg),
        }
    }
}

/// The client of Twilio's REST API. Building one fails only if TLS cannot be
/// set up; the workers then run and park nothing, Intelligence events wait.
fn twilio_api(cfg: &Config) -> Option<Arc<crate::twilio_api::TwilioApi>> {
    let built =
        crate::twilio_api::TwilioApi::new(&cfg.twilio_api_url, &cfg.twilio_intelligence_url, cfg.twilio_api_timeout);
    match built {
        Ok(api) => Some(Arc::new(api)),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the client of Twilio's API; Intelligence transcripts will wait");
            None
        }
    }
}

/// Runs one consumer per family, each with `concurrency` lanes (see [`consumer`]),
/// until `shutdown`, reconnecting after broker failures.
pub async fn run(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let tasks: Vec<_> =
        CONSUMERS.iter().map(|(_, consume)| tokio::spawn(consume(ctx.clone(), shutdown.clone()))).collect();
    for t in tasks {
        let _ = t.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_one_consumer() {
        let mut declared: Vec<&str> = CONSUMERS.iter().map(|(f, _)| f.as_str()).collect();
        let mut all: Vec<&str> = Family::ALL.iter().map(|f| f.as_str()).collect();
        declared.sort();
        all.sort();
        assert_eq!(declared, all);
    }
}
