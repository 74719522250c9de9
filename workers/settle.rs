//! After the commit: each outcome logged and counted; a retried event sent
//! through the delay queues, a failed one (or one out of tries) parked in the
//! dead-letter queue with the reason, each confirmed before the batch is acked.

use tracing::field::{Empty, display};
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::consumer::Item;
use super::{Outcome, WorkerContext};
use crate::bus::{BusError, Outgoing, Topology};
use crate::events::Family;
use crate::telemetry;
use crate::trace::TraceParent;

/// After the commit: logs the outcome and sends a retried or failed message
/// on its way, confirmed by the broker before the batch is acknowledged.
pub async fn settle(ctx: &WorkerContext, family: Family, item: &Item, outcome: &Outcome) -> Result<(), BusError> {
    let span = match &item.envelope {
        Ok(env) => {
            info_span!("event", request_id = %env.request_id, key = %env.key, provider = env.event.provider().as_str(), kind = env.event.kind(), business = env.business_id.map(|b| b.0), call_sid = env.event.call_sid(), family = family.as_str(), trace_id = Empty)
        }
        Err(_) => {
            info_span!("event", key = %item.message_id, family = family.as_str(), trace_id = Empty)
        }
    };
    // The worker's span continues the ingress's trace.
    let parent = item.traceparent.as_deref().and_then(TraceParent::parse);
    span.record("trace_id", display(TraceParent::of_span(&span, parent).trace_id));
    count(item, outcome);
    async {
        match outcome {
            Outcome::Applied => info!(attempt = item.attempt, "applied"),
            Outcome::Flagged(flag) => {
                info!(attempt = item.attempt, "applied");
                flag.report();
            }
            Outcome::Duplicate => info!("duplicate; already applied"),
            Outcome::Ignored(why) => info!(reason = why, "recorded; changes nothing"),
            Outcome::Retry(reason) => retry_or_park(ctx, family, item, reason).await?,
            Outcome::Park(reason) => park(ctx, family, item, reason).await?,
            // Kept by its lane for the next batch: nothing is sent or acknowledged.
            Outcome::Later => debug!("its call is held by another worker; in the lane's next batch"),
        }
        Ok(())
    }
    .instrument(span)
    .await
}

/// The outcome in the metrics; retries and dead letters are counted where they are sent.
fn count(item: &Item, outcome: &Outcome) {
    let provider = item.envelope.as_ref().map_or("unknown", |env| env.event.provider().as_str());
    match outcome {
        Outcome::Applied | Outcome::Flagged(_) => {
            let kind = item.envelope.as_ref().map_or("unknown", |env| env.event.kind());
            metrics::counter!(telemetry::EVENTS_APPLIED, "provider" => provider, "kind" => kind).increment(1);
        }
        Outcome::Duplicate => metrics::counter!(telemetry::EVENTS_DUPLICATE, "provider" => provider).increment(1),
        Outcome::Ignored(why) => {
            metrics::counter!(telemetry::EVENTS_IGNORED, "provider" => provider, "reason" => *why).increment(1)
        }
        Outcome::Later => metrics::counter!(telemetry::EVENTS_DEFERRED, "provider" => provider).increment(1),
        Outcome::Retry(_) | Outcome::Park(_) => {}
    }
}

async fn retry_or_park(ctx: &WorkerContext, family: Family, item: &Item, reason: &str) -> Result<(), BusError> {
    let delays = &ctx.topology.retry_delays;
    let Some(delay) = usize::try_from(item.attempt.saturating_sub(1)).ok().and_then(|i| delays.get(i)) else {
        let reason = format!("gave up after {} tries: {reason}", item.attempt);
        return park(ctx, family, item, &reason).await;
    };
    warn!(attempt = item.attempt, delay_ms = delay.as_millis() as u64, reason, "not applied; will retry");
    metrics::counter!(telemetry::EVENTS_RETRIED, "family" => family.as_str()).increment(1);
    let (exchange, key) = (ctx.topology.retry_exchange(), Topology::retry_routing_key(family, *delay));
    ctx.publisher.publish(&republish(item, &exchange, &key, item.attempt.saturating_add(1), reason)).await
}

async fn park(ctx: &WorkerContext, family: Family, item: &Item, reason: &str) -> Result<(), BusError> {
    error!(attempt = item.attempt, reason, "dead-lettered");
    metrics::counter!(telemetry::EVENTS_DEAD_LETTERED, "family" => family.as_str()).increment(1);
    let exchange = ctx.topology.dead_exchange();
    ctx.publisher.publish(&republish(item, &exchange, family.as_str(), item.attempt, reason)).await
}

/// The event's original bytes, untouched (alone, if it came in a pack), with the new try count and the reason.
fn republish<'a>(
    item: &'a Item,
    exchange: &'a str,
    routing_key: &'a str,
    attempt: i64,
    reason: &'a str,
) -> Outgoing<'a> {
    Outgoing {
        exchange,
        routing_key,
        body: &item.body,
        message_id: &item.message_id,
        kind: &item.kind,
        attempt,
        error: Some(reason),
        traceparent: item.traceparent.as_deref(),
    }
}
