//! Deciding a notice, inside the transaction that applies the change it
//! reports (the transactional outbox of CONTRACT.md section 5).
//!
//! One statement per change: it finds the business's active `n8n`
//! integrations that want this kind of notice (a `notify_url`, the kind in
//! `notify_events` or no list, not turned off by a 410 for that URL), takes a
//! snapshot of the row as this transaction left it, and writes one notice per
//! integration. The `change_key` makes a second decision for the same change a
//! no-op, whatever path decided it.

use sqlx::PgConnection;

use super::notice::NoticeKind;
use crate::events::BusinessId;

/// A committed change that may be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// The call's status became final (its own final status callback).
    CallEnded { call_id: i32 },
    /// A transcript was stored for the call; `source` names where it came from
    /// (`record`, `realtime`, `intelligence`): one notice per source.
    TranscriptReady { call_id: i32, source: &'a str },
    /// A pushed booking was flagged outside opening hours; `push_id` is the
    /// push's `webhook-id`, so each flagged push is reported once.
    BookingOutsideHours { booking_id: i32, push_id: &'a str, reason: &'a str },
}

impl Change<'_> {
    pub fn kind(&self) -> NoticeKind {
        match self {
            Change::CallEnded { .. } => NoticeKind::CallEnded,
            Change::TranscriptReady { .. } => NoticeKind::TranscriptReady,
            Change::BookingOutsideHours { .. } => NoticeKind::BookingOutsideHours,
        }
    }
}

/// The `n8n` integrations of business `$5` that want notices of kind `$1`:
/// active, with a `notify_url`, the kind in `notify_events` (no list, or a
/// malformed one that delivery parks with the reason, means every kind), and
/// not turned off by a 410 for that URL.
macro_rules! receivers {
    () => {
        "SELECT i.id AS integration_id FROM public.integrations i
          WHERE i.business_id = $5 AND i.type = 'n8n' AND i.status = 'active'
            AND coalesce(i.config->>'notify_url', '') <> ''
            AND (jsonb_typeof(i.config->'notify_events') IS DISTINCT FROM 'array' OR i.config->'notify_events' ? $1)
            AND NOT EXISTS (SELECT 1 FROM webhook_worker.notify_gone g
                             WHERE g.integration_id = i.id AND g.notify_url = i.config->>'notify_url')"
    };
}

/// RFC 3339 UTC, to the second, of a `timestamp` column (which holds UTC wall time).
macro_rules! rfc3339 {
    ($col:literal) => {
        concat!("to_char(", $col, ", 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
    };
}

/// `json_build_object` keeps the keys in the order written (jsonb would not):
/// the body reads as CONTRACT.md section 5 lists it.
const CALL_SQL: &str = concat!(
    "INSERT INTO webhook_worker.notices (change_key, business_id, integration_id, kind, body)
     SELECT $3 || ':' || r.integration_id, c.business_id, r.integration_id, $1,
            json_build_object('type', $1::text, 'timestamp', ",
    rfc3339!("(now() AT TIME ZONE 'UTC')"),
    ", 'data', json_build_object(
                'business_id', c.business_id, 'call_id', c.id, 'call_sid', tc.call_sid,
                'phone', c.phone, 'caller', c.caller, 'status', c.status, 'duration', c.duration,
                'start_time', ",
    rfc3339!("c.start_time"),
    ", 'end_time', ",
    rfc3339!("c.end_time"),
    ", 'recording', c.recording, 'transcript', c.transcript))::text
       FROM public.calls c
       LEFT JOIN LATERAL (SELECT call_sid FROM webhook_worker.twilio_calls t
                           WHERE t.call_id = c.id ORDER BY t.call_sid LIMIT 1) tc ON true
       JOIN LATERAL (",
    receivers!(),
    ") r ON true
      WHERE c.id = $2 AND c.business_id = $5
     ON CONFLICT (change_key) DO NOTHING"
);

const BOOKING_SQL: &str = concat!(
    "INSERT INTO webhook_worker.notices (change_key, business_id, integration_id, kind, body)
     SELECT $3 || ':' || r.integration_id, b.business_id, r.integration_id, $1,
            json_build_object('type', $1::text, 'timestamp', ",
    rfc3339!("(now() AT TIME ZONE 'UTC')"),
    ", 'data', json_build_object(
                'business_id', b.business_id, 'booking_id', b.id, 'external_id', nb.external_id,
                'id', b.id, 'customer', b.customer, 'phone', b.phone, 'email', b.email, 'service', b.service,
                'date', ",
    rfc3339!("b.date"),
    ", 'status', b.status, 'notes', b.notes, 'created_at', ",
    rfc3339!("b.created_at"),
    ", 'reason', $4::text))::text
       FROM public.bookings b
       LEFT JOIN LATERAL (SELECT external_id FROM webhook_worker.n8n_bookings n
                           WHERE n.booking_id = b.id LIMIT 1) nb ON true
       JOIN LATERAL (",
    receivers!(),
    ") r ON true
      WHERE b.id = $2 AND b.business_id = $5
     ON CONFLICT (change_key) DO NOTHING"
);

/// Writes the notices `change` causes; returns how many (0 when nobody wants one,
/// or it was decided before). Call it inside the applying transaction, after
/// the change is written; after the commit, [`super::relay::wake_if_pending`] sends
/// them at once (else the relay finds them within its poll interval).
pub async fn record(tx: &mut PgConnection, business: BusinessId, change: Change<'_>) -> Result<u64, sqlx::Error> {
    let kind = change.kind().as_str();
    let done = match change {
        Change::CallEnded { call_id } => {
            let key = format!("{kind}:{call_id}");
            sqlx::query(CALL_SQL).bind(kind).bind(call_id).bind(key).bind(None::<&str>).bind(business.0)
        }
        Change::TranscriptReady { call_id, source } => {
            let key = format!("{kind}:{call_id}:{source}");
            sqlx::query(CALL_SQL).bind(kind).bind(call_id).bind(key).bind(None::<&str>).bind(business.0)
        }
        Change::BookingOutsideHours { booking_id, push_id, reason } => {
            let key = format!("{kind}:{booking_id}:{push_id}");
            sqlx::query(BOOKING_SQL).bind(kind).bind(booking_id).bind(key).bind(reason).bind(business.0)
        }
    }
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() > 0 {
        super::relay::note_pending();
    }
    Ok(done.rows_affected())
}
