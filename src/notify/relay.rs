//! The notice relay: publishes notices committed by the apply transactions to
//! `{p}.notices`, and records each publish only after the broker's confirm. A
//! process killed between the commit and the publish leaves the row unrelayed,
//! and the next relay (this process restarted, or any other `work` process)
//! publishes it. A crash between the confirm and the record publishes it twice;
//! the consumer's claim on the notice row turns the copy into a no-op.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::notice::{NoticeMessage, webhook_id};
use super::queue::{NoticeQueues, ROUTING_KEY};
use crate::bus::{Broker, BusError, Outgoing, Publisher};

const BATCH: i64 = 100;
/// How often the relay looks when nobody woke it (rows left by a crashed process).
const POLL: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(10);

static WAKE: LazyLock<Notify> = LazyLock::new(Notify::new);
/// Set when a transaction wrote a notice; the next commit wakes the relay.
static PENDING: AtomicBool = AtomicBool::new(false);

/// Notes that a notice was written (by [`super::record::record`]).
pub(crate) fn note_pending() {
    PENDING.store(true, Ordering::Relaxed);
}

/// After a commit: if notices were written, relays them now rather than at the
/// next poll. Costs nothing otherwise, so every applying transaction calls it.
pub fn wake_if_pending() {
    if PENDING.swap(false, Ordering::Relaxed) {
        WAKE.notify_one();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
}

pub struct NoticeRelay {
    pub pool: PgPool,
    pub broker: Arc<Broker>,
    pub publisher: Arc<Publisher>,
    pub queues: NoticeQueues,
}

impl NoticeRelay {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut pause = POLL;
        let mut declared = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = WAKE.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            // The queues must exist before a publish can be routed (the consumer
            // declares them too); declared again after any failure.
            if !declared {
                declared = self.declare().await.is_ok();
            }
            match self.drain().await {
                Ok(()) => pause = POLL,
                Err(e) => {
                    warn!(error = %e, "notice relay could not publish; will try again");
                    declared = false;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }

    async fn declare(&self) -> Result<(), BusError> {
        let ch = self.broker.channel().await?;
        self.queues.declare(&ch).await?;
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    /// Publishes every unrelayed notice, a batch per transaction.
    pub async fn drain(&self) -> Result<(), RelayError> {
        while self.relay_batch().await? == BATCH as usize {}
        Ok(())
    }

    async fn relay_batch(&self) -> Result<usize, RelayError> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, kind FROM webhook_worker.notices WHERE relayed_at IS NULL
              ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let exchange = self.queues.events_exchange();
        let mut done = Vec::with_capacity(rows.len());
        for (id, kind) in &rows {
            let body = NoticeMessage::new(*id).to_json();
            let message_id = webhook_id(*id);
            let out = Outgoing {
                exchange: &exchange,
                routing_key: ROUTING_KEY,
                body: &body,
                message_id: &message_id,
                kind,
                attempt: 1,
                error: None,
                traceparent: None,
            };
            if let Err(e) = self.publisher.publish(&out).await {
                // Keep what was confirmed so far.
                self.mark(&mut tx, &done).await?;
                tx.commit().await?;
                return Err(e.into());
            }
            done.push(*id);
        }
        self.mark(&mut tx, &done).await?;
        tx.commit().await?;
        debug!(relayed = done.len(), "notices relayed");
        Ok(rows.len())
    }

    async fn mark(&self, tx: &mut sqlx::PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE webhook_worker.notices SET relayed_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(tx)
            .await?;
        Ok(())
    }
}
