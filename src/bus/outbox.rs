//! The Postgres outbox: where the ingress keeps an event that RabbitMQ could not
//! confirm, so that the 2xx it answers still holds. The relay publishes the
//! rows, oldest first, once the broker is back, and deletes each row only after
//! the broker has confirmed it. Any number of relays (one per ingress process)
//! share the table: `FOR UPDATE SKIP LOCKED` gives each row to one of them.
//!
//! Order between events is not needed for correctness: every worker guards its
//! writes against late and repeated events (see docs/adr/0007-outbox.md).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{BusError, Outgoing, Publisher, Topology};
use crate::events::Envelope;

/// Rows taken per relay round.
const RELAY_BATCH: i64 = 200;
/// How often the relay looks even when nobody woke it (rows left by a crashed process).
const IDLE_POLL: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(10);

/// Keeps an accepted event that the broker did not confirm.
pub async fn insert(pool: &PgPool, env: &Envelope, body: &[u8], traceparent: Option<&str>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_worker.outbox (event_key, routing_key, kind, body, traceparent) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&env.key)
    .bind(env.event.family().as_str())
    .bind(env.event.kind())
    .bind(body)
    .bind(traceparent)
        .execute(pool)
        .await?;
    Ok(())
}

/// The outbox's depth and the age of its oldest row in seconds (for the metrics).
pub async fn depth(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
           FROM webhook_worker.outbox",
    )
    .fetch_one(pool)
    .await
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    event_key: String,
    routing_key: String,
    kind: String,
    body: Vec<u8>,
    traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
}

pub struct Relay {
    pub pool: PgPool,
    pub publisher: Arc<Publisher>,
    pub topology: Topology,
    /// Poked by the ingress whenever it writes a row.
    pub wake: Arc<Notify>,
}

impl Relay {
    /// Drains the outbox whenever woken (and every second), backing off while the broker is away.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut pause = IDLE_POLL;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            match self.drain().await {
                Ok(()) => pause = IDLE_POLL,
                Err(e) => {
                    pause = (pause * 2).min(MAX_PAUSE);
                    warn!(error = %e, retry_in = ?pause, "outbox relay paused");
                    // Sleep out the pause even if woken: no busy loop while the broker is down.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    async fn drain(&self) -> Result<(), RelayError> {
        loop {
            let relayed = self.relay_once().await?;
            if relayed == 0 {
                return Ok(());
            }
            info!(relayed, "outbox rows published");
        }
    }

    /// Publishes one batch of rows (confirms pipelined) and deletes the confirmed ones.
    async fn relay_once(&self) -> Result<usize, RelayError> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, event_key, routing_key, kind, body, traceparent FROM webhook_worker.outbox
              ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(RELAY_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let exchange = self.topology.events_exchange();
        let outgoing: Vec<Outgoing<'_>> = rows
            .iter()
            .map(|r| Outgoing {
                exchange: &exchange,
                routing_key: &r.routing_key,
                body: &r.body,
                message_id: &r.event_key,
                kind: &r.kind,
                attempt: 1,
                error: None,
                traceparent: r.traceparent.as_deref(),
            })
            .collect();
        let results = join_all(outgoing.iter().map(|o| self.publisher.publish(o))).await;
        let confirmed: Vec<i64> = rows.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|(row, _)| row.id).collect();
        sqlx::query("DELETE FROM webhook_worker.outbox WHERE id = ANY($1)").bind(&confirmed).execute(&mut *tx).await?;
        tx.commit().await?;
        debug!(confirmed = confirmed.len(), taken = rows.len(), "outbox batch");
        match results.into_iter().find_map(Result::err) {
            Some(e) => Err(e.into()),
            None => Ok(confirmed.len()),
        }
    }
}
