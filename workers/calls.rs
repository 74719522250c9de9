//! Applies Twilio's call-status, recording and transcription callbacks to `public.calls`.
//!
//! Order is never assumed. Each call's row in `webhook_worker.twilio_calls` is
//! locked for the transaction and holds what the guard needs; the decision of
//! what to write is a pure function ([`plan_status`]) of that state and the event.

use std::collections::HashSet;

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::PgConnection;

use super::transcripts::{self, Source};
use super::{Applier, ApplyError, Outcome};
use crate::events::BusinessId;
use crate::events::transcription::RealtimeKind;
use crate::events::twilio::{CallStatus, CallStatusEvent, RecordingEvent, TranscriptionEvent};
use crate::events::{Envelope, Event, Family};
use crate::notify::record::{Change, record as record_notice};

/// What the worker knows of one call, read under a row lock.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct CallState {
    pub call_id: Option<i32>,
    pub last_sequence: Option<i64>,
    pub reached_final: bool,
    pub transferred: bool,
    pub first_event_at: Option<NaiveDateTime>,
    /// Which source the stored transcript came from (see [`Source`]).
    pub transcript_source: Option<String>,
}

impl CallState {
    pub fn transcript_source(&self) -> Option<Source> {
        self.transcript_source.as_deref().and_then(Source::parse)
    }
}

/// What a call's events did that a notice may report (`call.ended`,
/// `call.transcript_ready`). Gathered per call in [`PendingCall::happened`] while
/// the batch is applied, so it is known in the transaction that commits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happened {
    /// `calls.transcript` was stored from this source.
    TranscriptStored(Source),
    /// A Real-Time Transcription session stopped. Whether it gave any segment is
    /// read at the flush ([`PendingCall::sessions_with_text`]), with the batch's
    /// segments in, whatever their order in the batch.
    RealtimeSessionStopped { session_sid: String },
    /// The call's status became final (`completed` or `missed`).
    BecameFinal,
    /// An answered `<Dial>` leg made the call `transferred`.
    Transferred,
}

/// The columns of `public.calls` to set; `None` leaves a column as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallChange {
    pub status: Option<&'static str>,
    pub start_time: Option<NaiveDateTime>,
    pub end_time: Option<NaiveDateTime>,
    pub duration: Option<String>,
    pub phone: Option<String>,
    pub caller: Option<String>,
    pub recording: Option<String>,
    pub transcript: Option<String>,
}

/// Decides what a status callback changes. A callback moves the call's status
/// only if it ranks above the last one applied: a final status outranks any
/// non-final one, and within the same finality the higher `SequenceNumber` wins.
/// Start time, number and name are filled in whatever the order.
pub fn plan_status(state: &CallState, e: &CallStatusEvent, at: NaiveDateTime) -> (CallChange, CallState) {
    let mut change = CallChange::default();
    let mut next = state.clone();
    let rank = (e.status.is_final(), e.sequence.unwrap_or(-1));
    let applied = state.last_sequence.is_some() || state.reached_final;
    let current = (state.reached_final, state.last_sequence.unwrap_or(-1));
    if !applied || rank > current {
        change.status = Some(if state.transferred { "transferred" } else { e.status.db_status() });
        next.last_sequence = Some(rank.1);
        next.reached_final = rank.0;
        if rank.0 {
            change.end_time = Some(at);
            change.duration = e.call_duration.map(minutes_seconds);
        }
    }
    if state.first_event_at.is_none_or(|first| at < first) {
        change.start_time = Some(at);
        next.first_event_at = Some(at);
    }
    change.phone = e.caller_number().map(|p| clip(p, 20));
    change.caller = e.caller_name.as_deref().map(|c| clip(c, 100));
    (change, next)
}

/// `125` seconds is `2:05`.
pub fn minutes_seconds(seconds: i64) -> String {
    format!("{}:{:02}", seconds / 60, seconds % 60)
}

/// The seed's varchar lengths are hard limits; a longer value would fail the
/// whole event, so it is cut (on a character boundary) instead.
fn clip(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

fn naive(t: DateTime<Utc>) -> NaiveDateTime {
    t.naive_utc()
}

/// The calls family: Twilio's status, recording and transcription callbacks.
pub struct Calls;

impl Applier for Calls {
    const FAMILY: Family = Family::Calls;
    type Writes = CallWrites;

    fn writes(ctx: &super::WorkerContext) -> CallWrites {
        CallWrites { twilio: ctx.twilio_api.clone(), ..Default::default() }
    }

    async fn apply(tx: &mut PgConnection, writes: &mut CallWrites, env: &Envelope) -> Result<Outcome, ApplyError> {
        let at = env.received_at;
        if let (Some(b), Some(call)) = (env.business_id, call_of(&env.event))
            && writes.is_busy(b, call)
        {
            return Ok(Outcome::Later);
        }
        match &env.event {
            Event::TwilioCallStatus(e) => apply_status(tx, writes, super::business_of(env)?, e, at).await,
            Event::TwilioRecording(e) => apply_recording(tx, writes, super::business_of(env)?, e, at).await,
            Event::TwilioTranscription(e) => apply_transcription(tx, writes, super::business_of(env)?, e, at).await,
            Event::TwilioRealtime(e) => transcripts::apply_realtime(tx, writes, super::business_of(env)?, e, at).await,
            Event::TwilioIntelligence(e) => {
                transcripts::apply_intelligence(tx, writes, super::business_of(env)?, e, at).await
            }
            other => Ok(super::not_of_family(Self::FAMILY, other)),
        }
    }

    /// A final Real-Time Transcription segment is its own record: its row's
    /// primary key (the session's number, `SequenceId`) is the event's key.
    fn claims_key(env: &Envelope) -> bool {
        !matches!(&env.event, Event::TwilioRealtime(e) if e.segment().is_some())
    }

    async fn prepare(
        tx: &mut PgConnection,
        writes: &mut CallWrites,
        fresh: &[&Envelope],
        wait: bool,
    ) -> Result<(), sqlx::Error> {
        let calls: Vec<(BusinessId, &str)> =
            fresh.iter().filter_map(|env| Some((env.business_id?, call_of(&env.event)?))).collect();
        writes.lock_all(tx, &calls, wait).await?;
        transcripts::write_sessions(tx, writes, fresh).await
    }

    async fn flush(tx: &mut PgConnection, writes: &mut CallWrites) -> Result<(), sqlx::Error> {
        writes.flush(tx).await
    }
}

pub async fn apply_status(
    tx: &mut PgConnection,
    writes: &mut CallWrites,
    business: BusinessId,
    e: &CallStatusEvent,
    received_at: DateTime<Utc>,
) -> Result<Outcome, ApplyError> {
    let at = naive(e.timestamp.unwrap_or(received_at));
    if let Some(parent) = &e.parent_call_sid {
        if !leg_was_answered(e.status) {
            return Ok(Outcome::Ignored("a <Dial> leg that nobody answered leaves its parent as it is"));
        }
        return mark_transferred(tx, writes, business, parent, at).await;
    }
    let call = writes.call(tx, business, &e.call_sid).await?;
    let (change, next) = plan_status(&call.state, e, at);
    let applied = change.status.is_some();
    if next.reached_final && !call.state.reached_final {
        call.happened.push(Happened::BecameFinal);
    }
    call.record(change, next);
    Ok(if applied { Outcome::Applied } else { Outcome::Ignored("older than the call's current status") })
}

/// Whether a `<Dial>` leg reached a person: answered (`in-progress`) or ended
/// after an answer (`completed`). A leg that was `busy`, `no-answer`, `failed` or
/// `canceled` (Twilio's default `completed` event carries these too) handed
/// nobody the call; `queued`, `initiated` and `ringing` have not yet.
pub fn leg_was_answered(status: CallStatus) -> bool {
    matches!(status, CallStatus::InProgress | CallStatus::Completed)
}

/// An answered leg (see [`leg_was_answered`]) handed the caller to a person: the parent call
/// becomes `transferred` for good, and the leg gets no row of its own. A leg
/// that arrives before its parent creates the parent's row, so the order of
/// arrival does not matter.
async fn mark_transferred(
    tx: &mut PgConnection,
    writes: &mut CallWrites,
    business: BusinessId,
    parent: &str,
    at: NaiveDateTime,
) -> Result<Outcome, ApplyError> {
    let call = writes.call(tx, business, parent).await?;
    let change = CallChange {
        status: Some("transferred"),
        start_time: (!call.row_exists()).then_some(at),
        ..Default::default()
    };
    let next = CallState { transferred: true, ..call.state.clone() };
    if !call.state.transferred {
        call.happened.push(Happened::Transferred);
    }
    call.record(change, next);
    Ok(Outcome::Applied)
}

pub async fn apply_recording(
    tx: &mut PgConnection,
    writes: &mut CallWrites,
    business: BusinessId,
    e: &RecordingEvent,
    received_at: DateTime<Utc>,
) -> Result<Outcome, ApplyError> {
    super::transcripts::remember_recording(tx, business, &e.recording_sid, &e.call_sid).await?;
    let Some(url) = e.url.as_ref().filter(|_| e.status == "completed") else {
        return Ok(Outcome::Ignored("recording not completed"));
    };
    let call = writes.call(tx, business, &e.call_sid).await?;
    let change = CallChange {
        recording: Some(url.clone()),
        start_time: (!call.row_exists()).then(|| naive(e.start_time.unwrap_or(received_at))),
        ..Default::default()
    };
    let next = call.state.clone();
    call.record(change, next);
    Ok(Outcome::Applied)
}

pub async fn apply_transcription(
    tx: &mut PgConnection,
    writes: &mut CallWrites,
    business: BusinessId,
    e: &TranscriptionEvent,
    received_at: DateTime<Utc>,
) -> Result<Outcome, ApplyError> {
    let Some(text) = e.text.as_ref().filter(|_| e.status == "completed") else {
        return Ok(Outcome::Ignored("transcription not completed"));
    };
    let call = writes.call(tx, business, &e.call_sid).await?;
    if !call.store_transcript(Source::Record, Some(text.clone()), received_at) {
        return Ok(Outcome::Ignored("a transcript from a higher source is kept"));
    }
    Ok(Outcome::Applied)
}

/// The calls one transaction has locked, with what it will write to each.
///
/// A call's callbacks usually arrive together and land in one batch. The first
/// event of a call in the transaction locks its row ([`lock_call`]); the later
/// ones plan against the state the earlier ones left ([`plan_status`] is pure)
/// and their changes are merged, a later value replacing an earlier one, which
/// is what writing each in turn with `COALESCE(new, old)` would leave. Each
/// call then gets one write, in [`CallWrites::flush`], before the commit: two
/// round trips per call per batch instead of two per event.
#[derive(Debug, Default)]
pub struct CallWrites {
    calls: Vec<PendingCall>,
    /// Calls another transaction held when this one tried to lock them.
    busy: Vec<(BusinessId, String)>,
    /// Twilio's REST API, for Intelligence transcripts; `None` where the worker has none.
    pub twilio: Option<std::sync::Arc<crate::twilio_api::TwilioApi>>,
    /// The batch's Real-Time sessions and segments, written ahead in one statement
    /// ([`transcripts::write_sessions`]).
    pub(super) sessions: transcripts::SessionsWritten,
}

#[derive(Debug)]
pub struct PendingCall {
    business: BusinessId,
    call_sid: String,
    /// As locked: without a `call_id`, the flush creates the `public.calls` row.
    locked: CallState,
    /// As the events so far leave it.
    pub state: CallState,
    change: CallChange,
    recorded: bool,
    /// What this batch's events did to the call, in order (see [`Happened`]).
    pub happened: Vec<Happened>,
    /// A real-time event of this batch changed the call's segments or sessions:
    /// its text is recomputed once, at the flush.
    pub realtime_changed: bool,
    /// Read at the flush when `realtime_changed`: the call's sessions with a segment kept.
    sessions_with_text: HashSet<String>,
}

impl PendingCall {
    /// Whether the call has a row, or will have one once this transaction's writes are sent.
    pub fn row_exists(&self) -> bool {
        self.locked.call_id.is_some() || self.recorded
    }

    /// Adds one event's change (later values win) and the state it leaves.
    pub fn record(&mut self, change: CallChange, next: CallState) {
        merge(&mut self.change, change);
        self.state = next;
        self.recorded = true;
    }

    /// Stores `text` as the call's transcript from `source`, unless a higher
    /// source's is stored (CONTRACT section 4): the one place a transcript is
    /// decided, and so where [`Happened::TranscriptStored`] is known. Without
    /// text, only the call's row is made (a transcript's callback may be the
    /// call's first). Whether the source may store.
    pub fn store_transcript(&mut self, source: Source, text: Option<String>, at: DateTime<Utc>) -> bool {
        let allowed = source.may_replace(self.state.transcript_source());
        let text = text.filter(|_| allowed);
        let mut next = self.state.clone();
        if text.is_some() {
            next.transcript_source = Some(source.as_str().to_string());
            self.happened.push(Happened::TranscriptStored(source));
        }
        let change =
            CallChange { start_time: (!self.row_exists()).then(|| naive(at)), transcript: text, ..Default::default() };
        self.record(change, next);
        allowed
    }
}

impl CallWrites {
    /// The call's pending write, locking its row first if this transaction has not yet.
    pub async fn call(
        &mut self,
        tx: &mut PgConnection,
        business: BusinessId,
        call_sid: &str,
    ) -> Result<&mut PendingCall, sqlx::Error> {
        // Batches are sorted by call, so the call is almost always the last one touched.
        let found = self.calls.iter().rposition(|c| c.business == business && c.call_sid == call_sid);
        let i = match found {
            Some(i) => i,
            None => {
                let locked = lock_call(tx, business, call_sid).await?;
                self.calls.push(PendingCall {
                    business,
                    call_sid: call_sid.to_string(),
                    state: locked.clone(),
                    locked,
                    change: CallChange::default(),
                    recorded: false,
                    happened: Vec::new(),
                    realtime_changed: false,
                    sessions_with_text: HashSet::new(),
                });
                self.calls.len() - 1
            }
        };
        Ok(&mut self.calls[i])
    }

    /// Whether another transaction held the call when [`CallWrites::lock_all`] ran.
    pub fn is_busy(&self, business: BusinessId, call_sid: &str) -> bool {
        self.busy.iter().any(|(b, s)| *b == business && s == call_sid)
    }

    /// Locks every call that `calls` names that no other transaction holds, in two
    /// statements at most for the whole batch instead of one per call (see
    /// [`lock_calls`]); a call this transaction has already locked is skipped, and
    /// one another transaction holds is remembered as busy (its events are
    /// [`Outcome::Later`]). Later [`CallWrites::call`]s of the locked calls cost
    /// no round trip.
    pub async fn lock_all(
        &mut self,
        tx: &mut PgConnection,
        calls: &[(BusinessId, &str)],
        wait: bool,
    ) -> Result<(), sqlx::Error> {
        let mut wanted: Vec<(BusinessId, &str)> = calls
            .iter()
            .copied()
            .filter(|(b, sid)| !self.calls.iter().any(|c| c.business == *b && c.call_sid == *sid))
            .collect();
        wanted.sort_unstable_by(|a, b| (a.0.0, a.1).cmp(&(b.0.0, b.1)));
        wanted.dedup_by(|a, b| (a.0.0, a.1) == (b.0.0, b.1));
        if wanted.is_empty() {
            return Ok(());
        }
        let locked = lock_calls(tx, &wanted, wait).await?;
        for (business, call_sid) in &wanted {
            if !locked.iter().any(|(b, s, _)| b == business && s == call_sid) {
                self.busy.push((*business, call_sid.to_string()));
            }
        }
        for (business, call_sid, locked) in locked {
            self.calls.push(PendingCall {
                business,
                call_sid,
                state: locked.clone(),
                locked,
                change: CallChange::default(),
                recorded: false,
                happened: Vec::new(),
                realtime_changed: false,
                sessions_with_text: HashSet::new(),
            });
        }
        Ok(())
    }

    /// Sends every call's merged change: one statement for all the calls of
    /// the batch. Each call's [`PendingCall::happened`] is known here, inside
    /// the transaction that commits it: the place to decide a notice about it.
    pub async fn flush(&mut self, tx: &mut PgConnection) -> Result<(), sqlx::Error> {
        let mut pending: Vec<PendingCall> = self.calls.drain(..).filter(|c| c.recorded).collect();
        // Every changed call's real-time text in one read.
        let changed: Vec<(BusinessId, &str)> =
            pending.iter().filter(|c| c.realtime_changed).map(|c| (c.business, c.call_sid.as_str())).collect();
        if !changed.is_empty() {
            let mut texts = transcripts::recompute_realtime(tx, &changed).await?;
            for c in pending.iter_mut().filter(|c| c.realtime_changed) {
                let read = texts.remove(&(c.business.0, c.call_sid.clone())).unwrap_or_default();
                c.store_transcript(Source::Realtime, read.text, Utc::now());
                c.sessions_with_text = read.with_text;
            }
        }
        if !pending.is_empty() {
            write_calls(tx, &pending).await?;
        }
        for c in pending.iter().filter(|c| !c.happened.is_empty()) {
            let call_id = match c.locked.call_id {
                Some(id) => Some(id),
                None => created_call_id(tx, c).await?,
            };
            notify_changes(tx, c, call_id).await?;
        }
        Ok(())
    }
}

/// The call a Twilio event will surely lock, if it is one whose call is known
/// before it is applied: a status callback (of an answered leg, its parent), a
/// completed recording or `<Record transcribe>` transcription, and a Real-Time
/// Transcription event other than an error or a partial result. The batch locks
/// them all at once, and an event whose call another worker holds waits for the
/// next batch. An Intelligence transcript (its call is read from Twilio's API)
/// locks its call when it is applied.
pub fn call_of(event: &Event) -> Option<&str> {
    match event {
        Event::TwilioCallStatus(e) => match &e.parent_call_sid {
            None => Some(&e.call_sid),
            Some(parent) => leg_was_answered(e.status).then_some(parent.as_str()),
        },
        Event::TwilioRecording(e) => (e.url.is_some() && e.status == "completed").then_some(e.call_sid.as_str()),
        Event::TwilioTranscription(e) => (e.text.is_some() && e.status == "completed").then_some(e.call_sid.as_str()),
        Event::TwilioRealtime(e) => match &e.kind {
            RealtimeKind::Error { .. } | RealtimeKind::Content { is_final: false, .. } => None,
            _ => Some(e.call_sid.as_str()),
        },
        _ => None,
    }
}

/// The `public.calls` id the batch's write gave a call that had none.
async fn created_call_id(tx: &mut PgConnection, c: &PendingCall) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar("SELECT call_id FROM webhook_worker.twilio_calls WHERE business_id = $1 AND call_sid = $2")
        .bind(c.business.0)
        .bind(&c.call_sid)
        .fetch_optional(&mut *tx)
        .await
        .map(Option::flatten)
}

/// The notices a call's write causes, decided in the same transaction
/// (CONTRACT.md section 5): `call.ended` when its own final status is first
/// applied; `call.transcript_ready` when a transcript is stored from
/// `<Record transcribe>` or Intelligence, or a Real-Time session with text
/// stops while the real-time transcript is the one stored. Each once per call
/// and source (the notice's change key).
async fn notify_changes(tx: &mut PgConnection, c: &PendingCall, call_id: Option<i32>) -> Result<(), sqlx::Error> {
    let Some(call_id) = call_id else { return Ok(()) };
    for h in &c.happened {
        let change = match h {
            Happened::BecameFinal => Change::CallEnded { call_id },
            Happened::TranscriptStored(source @ (Source::Record | Source::Intelligence)) => {
                Change::TranscriptReady { call_id, source: source.as_str() }
            }
            Happened::RealtimeSessionStopped { session_sid }
                if c.sessions_with_text.contains(session_sid)
                    && c.state.transcript_source() == Some(Source::Realtime) =>
            {
                Change::TranscriptReady { call_id, source: Source::Realtime.as_str() }
            }
            _ => continue,
        };
        record_notice(tx, c.business, change).await?;
    }
    Ok(())
}

/// `later` applied after `into`: each column a later event sets replaces the earlier value.
fn merge(into: &mut CallChange, later: CallChange) {
    fn take<T>(slot: &mut Option<T>, v: Option<T>) {
        if v.is_some() {
            *slot = v;
        }
    }
    take(&mut into.status, later.status);
    take(&mut into.start_time, later.start_time);
    take(&mut into.end_time, later.end_time);
    take(&mut into.duration, later.duration);
    take(&mut into.phone, later.phone);
    take(&mut into.caller, later.caller);
    take(&mut into.recording, later.recording);
    take(&mut into.transcript, later.transcript);
}

/// Finds or makes the call's state row and locks it until the transaction ends,
/// so two workers applying callbacks of one call take turns.
async fn lock_call(tx: &mut PgConnection, business: BusinessId, call_sid: &str) -> Result<CallState, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO webhook_worker.twilio_calls (business_id, call_sid) VALUES ($1, $2)
         ON CONFLICT (business_id, call_sid) DO UPDATE SET call_sid = EXCLUDED.call_sid
         RETURNING call_id, last_sequence, reached_final, transferred, first_event_at, transcript_source",
    )
    .bind(business.0)
    .bind(call_sid)
    .fetch_one(&mut *tx)
    .await
}

type LockedRow = (i32, String, Option<i32>, Option<i64>, bool, bool, Option<NaiveDateTime>, Option<String>);

/// Locks the state rows of `calls` (sorted, distinct) that no other transaction
/// holds, until the transaction ends: the ones that exist with one `SELECT ...
/// FOR UPDATE SKIP LOCKED`, then the ones that do not exist yet with one `INSERT
/// ... ON CONFLICT DO NOTHING` (rows that exist but are held are left out by
/// `NOT EXISTS`, since the insert would wait for their holder; it waits only for
/// a worker inserting the same new call at this moment, in the same
/// `(business_id, call_sid)` order, so no deadlock). The calls not returned are held by another worker: rather than
/// wait for its whole batch, their events go into the next batch. Locking an
/// existing row this way writes nothing, where an upsert would write a new
/// version of it. With `wait`, every call is locked, waiting for whoever holds it
/// (in the batch's sort order, so two workers cannot deadlock).
async fn lock_calls(
    tx: &mut PgConnection,
    calls: &[(BusinessId, &str)],
    wait: bool,
) -> Result<Vec<(BusinessId, String, CallState)>, sqlx::Error> {
    let businesses: Vec<i32> = calls.iter().map(|(b, _)| b.0).collect();
    let sids: Vec<&str> = calls.iter().map(|(_, s)| *s).collect();
    let mut rows: Vec<LockedRow> = sqlx::query_as(if wait { LOCK_WAITING } else { LOCK_FREE })
        .bind(&businesses)
        .bind(&sids)
        .fetch_all(&mut *tx)
        .await?;
    if rows.len() < calls.len() {
        let found: HashSet<(i32, &str)> = rows.iter().map(|r| (r.0, r.1.as_str())).collect();
        let (b, s): (Vec<i32>, Vec<&str>) = calls.iter().map(|(b, s)| (b.0, *s)).filter(|k| !found.contains(k)).unzip();
        let new: Vec<LockedRow> = sqlx::query_as(if wait { INSERT_WAITING } else { INSERT_NEW })
            .bind(&b)
            .bind(&s)
            .fetch_all(&mut *tx)
            .await?;
        rows.extend(new);
    }
    Ok(rows
        .into_iter()
        .map(|(b, sid, call_id, last_sequence, reached_final, transferred, first_event_at, transcript_source)| {
            let state =
                CallState { call_id, last_sequence, reached_final, transferred, first_event_at, transcript_source };
            (BusinessId(b), sid, state)
        })
        .collect())
}

/// The existing calls no other transaction holds, locked.
const LOCK_FREE: &str = "SELECT m.business_id, m.call_sid, m.call_id, m.last_sequence, m.reached_final, m.transferred,
                m.first_event_at, m.transcript_source
           FROM webhook_worker.twilio_calls m
           JOIN unnest($1::int4[], $2::text[]) AS k(b, s) ON m.business_id = k.b AND m.call_sid = k.s
          ORDER BY m.business_id, m.call_sid COLLATE \"C\"
            FOR UPDATE OF m SKIP LOCKED";

/// Every existing call, locked, waiting for whoever holds one.
const LOCK_WAITING: &str =
    "SELECT m.business_id, m.call_sid, m.call_id, m.last_sequence, m.reached_final, m.transferred,
                m.first_event_at, m.transcript_source
           FROM webhook_worker.twilio_calls m
           JOIN unnest($1::int4[], $2::text[]) AS k(b, s) ON m.business_id = k.b AND m.call_sid = k.s
          ORDER BY m.business_id, m.call_sid COLLATE \"C\"
            FOR UPDATE OF m";

/// The calls that do not exist yet (a held one is left out: the insert would wait for it).
const INSERT_NEW: &str = "INSERT INTO webhook_worker.twilio_calls (business_id, call_sid)
             SELECT b, s FROM unnest($1::int4[], $2::text[]) WITH ORDINALITY AS k(b, s, o)
              WHERE NOT EXISTS (SELECT 1 FROM webhook_worker.twilio_calls m WHERE m.business_id = k.b AND m.call_sid = k.s)
              ORDER BY o
             ON CONFLICT (business_id, call_sid) DO NOTHING
             RETURNING business_id, call_sid, call_id, last_sequence, reached_final, transferred, first_event_at,
                       transcript_source";

/// The calls still missing, and any another worker inserted meanwhile, locked.
const INSERT_WAITING: &str = "INSERT INTO webhook_worker.twilio_calls (business_id, call_sid)
             SELECT b, s FROM unnest($1::int4[], $2::text[]) WITH ORDINALITY AS k(b, s, o) ORDER BY o
             ON CONFLICT (business_id, call_sid) DO UPDATE SET call_sid = EXCLUDED.call_sid
             RETURNING business_id, call_sid, call_id, last_sequence, reached_final, transferred, first_event_at,
                       transcript_source";

/// Writes every pending call's change to `public.calls` and its new guard state,
/// in one statement: existing rows are updated (`COALESCE(new, old)` per
/// column), the rows of calls seen for the first time are inserted with ids
/// drawn from the table's own sequence, so that each state row learns its call's id.
async fn write_calls(tx: &mut PgConnection, calls: &[PendingCall]) -> Result<(), sqlx::Error> {
    if let [c] = calls {
        // One call (a quiet moment): the plain statement is cheaper to plan.
        return write_call(tx, c.business, &c.call_sid, &c.locked, &c.change, &c.state).await.map(|_| ());
    }
    let col = |f: fn(&PendingCall) -> Option<&str>| calls.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "WITH u AS (
            SELECT * FROM unnest($1::int4[], $2::text[], $3::int4[], $4::text[], $5::timestamp[], $6::timestamp[],
                                 $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
                                 $12::int8[], $13::bool[], $14::bool[], $15::timestamp[], $16::text[])
                AS u(business_id, call_sid, call_id, status, start_time, end_time, duration, phone, caller,
                     recording, transcript, last_sequence, reached_final, transferred, first_event_at,
                     transcript_source)
         ), fresh AS MATERIALIZED (
            SELECT u.*, nextval(pg_get_serial_sequence('public.calls', 'id'))::int4 AS new_id
              FROM u WHERE u.call_id IS NULL
         ), ins AS (
            INSERT INTO public.calls (id, business_id, status, start_time, end_time, duration, phone, caller, recording, transcript)
            SELECT new_id, business_id, COALESCE(status, 'in-progress')::public.call_status,
                   COALESCE(start_time, (now() AT TIME ZONE 'UTC')), end_time, duration, phone, caller, recording, transcript
              FROM fresh
         ), upd AS (
            UPDATE public.calls c SET
                status = COALESCE(u.status::public.call_status, c.status),
                start_time = COALESCE(u.start_time, c.start_time),
                end_time = COALESCE(u.end_time, c.end_time),
                duration = COALESCE(u.duration, c.duration),
                phone = COALESCE(u.phone, c.phone),
                caller = COALESCE(u.caller, c.caller),
                recording = COALESCE(u.recording, c.recording),
                transcript = COALESCE(u.transcript, c.transcript)
              FROM u WHERE c.id = u.call_id
         )
         UPDATE webhook_worker.twilio_calls m
            SET call_id = COALESCE(m.call_id, f.new_id), last_sequence = u.last_sequence,
                reached_final = u.reached_final, transferred = u.transferred, first_event_at = u.first_event_at,
                transcript_source = u.transcript_source
           FROM u LEFT JOIN fresh f ON f.business_id = u.business_id AND f.call_sid = u.call_sid
          WHERE m.business_id = u.business_id AND m.call_sid = u.call_sid",
    )
    .bind(calls.iter().map(|c| c.business.0).collect::<Vec<_>>())
    .bind(col(|c| Some(c.call_sid.as_str())))
    .bind(calls.iter().map(|c| c.locked.call_id).collect::<Vec<_>>())
    .bind(col(|c| c.change.status))
    .bind(calls.iter().map(|c| c.change.start_time).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.change.end_time).collect::<Vec<_>>())
    .bind(col(|c| c.change.duration.as_deref()))
    .bind(col(|c| c.change.phone.as_deref()))
    .bind(col(|c| c.change.caller.as_deref()))
    .bind(col(|c| c.change.recording.as_deref()))
    .bind(col(|c| c.change.transcript.as_deref()))
    .bind(calls.iter().map(|c| c.state.last_sequence).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.state.reached_final).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.state.transferred).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.state.first_event_at).collect::<Vec<_>>())
    .bind(col(|c| c.state.transcript_source.as_deref()))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Writes the change to `public.calls` (creating the row on the call's first
/// event) and the new guard state, in one statement.
async fn write_call(
    tx: &mut PgConnection,
    business: BusinessId,
    call_sid: &str,
    state: &CallState,
    c: &CallChange,
    next: &CallState,
) -> Result<Option<i32>, sqlx::Error> {
    let sql = if state.call_id.is_none() {
        "WITH c AS (
            INSERT INTO public.calls (business_id, status, start_time, end_time, duration, phone, caller, recording, transcript)
            VALUES ($1, COALESCE($4::text, 'in-progress')::public.call_status, COALESCE($5, (now() AT TIME ZONE 'UTC')),
                    $6, $7, $8, $9, $10, $11)
            RETURNING id)
         UPDATE webhook_worker.twilio_calls m
            SET call_id = c.id, last_sequence = $12, reached_final = $13, transferred = $14, first_event_at = $15,
                transcript_source = $16
           FROM c WHERE m.business_id = $1 AND m.call_sid = $2
         RETURNING m.call_id"
    } else {
        "WITH c AS (
            UPDATE public.calls SET
                status = COALESCE($4::text::public.call_status, status),
                start_time = COALESCE($5, start_time),
                end_time = COALESCE($6, end_time),
                duration = COALESCE($7, duration),
                phone = COALESCE($8, phone),
                caller = COALESCE($9, caller),
                recording = COALESCE($10, recording),
                transcript = COALESCE($11, transcript)
             WHERE id = $3
            RETURNING id)
         UPDATE webhook_worker.twilio_calls m
            SET last_sequence = $12, reached_final = $13, transferred = $14, first_event_at = $15,
                transcript_source = $16
          WHERE m.business_id = $1 AND m.call_sid = $2
         RETURNING m.call_id"
    };
    sqlx::query_scalar::<_, Option<i32>>(sql)
        .bind(business.0)
        .bind(call_sid)
        .bind(state.call_id)
        .bind(c.status)
        .bind(c.start_time)
        .bind(c.end_time)
        .bind(c.duration.as_deref())
        .bind(c.phone.as_deref())
        .bind(c.caller.as_deref())
        .bind(c.recording.as_deref())
        .bind(c.transcript.as_deref())
        .bind(next.last_sequence)
        .bind(next.reached_final)
        .bind(next.transferred)
        .bind(next.first_event_at)
        .bind(next.transcript_source.as_deref())
        .fetch_optional(&mut *tx)
        .await
        .map(Option::flatten)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u32) -> NaiveDateTime {
        chrono::NaiveDate::from_ymd_opt(2025, 11, 25).unwrap().and_hms_opt(12, 0, secs).unwrap()
    }

    fn event(status: CallStatus, seq: i64) -> CallStatusEvent {
        CallStatusEvent {
            call_sid: "CA1".into(),
            parent_call_sid: None,
            status,
            sequence: Some(seq),
            timestamp: None,
            direction: Some("inbound".into()),
            from: Some("+14155552671".into()),
            to: Some("+15005550006".into()),
            caller_name: None,
            call_duration: status.is_final().then_some(125),
        }
    }

    /// Applies events in the given order and returns the final status, start and end.
    fn run(events: &[(CallStatus, i64, u32)]) -> (Option<&'static str>, CallState, Option<NaiveDateTime>) {
        let mut state = CallState::default();
        let (mut status, mut end) = (None, None);
        for (s, seq, t) in events {
            let (change, next) = plan_status(&state, &event(*s, *seq), at(*t));
            status = change.status.or(status);
            end = change.end_time.or(end);
            state = next;
        }
        (status, state, end)
    }

    #[test]
    fn any_order_ends_in_the_same_state() {
        use CallStatus::*;
        let calls = [(Ringing, 1, 1), (InProgress, 2, 3), (Completed, 3, 9)];
        let in_order = run(&calls);
        assert_eq!(in_order.0, Some("completed"));
        assert_eq!(in_order.1.first_event_at, Some(at(1)));
        assert_eq!(in_order.2, Some(at(9)));
        for perm in [[2, 1, 0], [2, 0, 1], [0, 2, 1], [1, 0, 2], [1, 2, 0]] {
            let shuffled: Vec<_> = perm.iter().map(|i| calls[*i]).collect();
            assert_eq!(run(&shuffled), in_order, "{perm:?}");
        }
    }

    #[test]
    fn a_late_non_final_never_undoes_a_final() {
        use CallStatus::*;
        let state = run(&[(NoAnswer, 2, 30)]).1;
        let (change, _) = plan_status(&state, &event(Ringing, 5), at(10));
        assert_eq!(change.status, None);
        assert_eq!(change.start_time, Some(at(10)));
    }

    #[test]
    fn transferred_stays_transferred() {
        let state = CallState { call_id: Some(1), transferred: true, ..Default::default() };
        let (change, _) = plan_status(&state, &event(CallStatus::Completed, 4), at(20));
        assert_eq!(change.status, Some("transferred"));
        assert_eq!(change.duration.as_deref(), Some("2:05"));
    }

    /// Merging the changes of a call's events gives what writing each in turn
    /// (`COALESCE(new, old)` per column) would leave, in every order.
    #[test]
    fn merged_changes_equal_the_changes_written_in_turn() {
        use CallStatus::*;
        let calls = [(Ringing, 1, 1), (InProgress, 2, 3), (Completed, 3, 9), (Initiated, 0, 0)];
        for perm in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
            let (mut state, mut merged, mut written) =
                (CallState::default(), CallChange::default(), CallChange::default());
            for i in perm {
                let (s, seq, t) = calls[i];
                let (change, next) = plan_status(&state, &event(s, seq), at(t));
                merge(&mut merged, change.clone());
                written = CallChange {
                    status: change.status.or(written.status),
                    start_time: change.start_time.or(written.start_time),
                    end_time: change.end_time.or(written.end_time),
                    duration: change.duration.or(written.duration),
                    phone: change.phone.or(written.phone),
                    caller: change.caller.or(written.caller),
                    recording: change.recording.or(written.recording),
                    transcript: change.transcript.or(written.transcript),
                };
                state = next;
            }
            assert_eq!(merged, written, "{perm:?}");
            assert_eq!(merged.status, Some("completed"));
            assert_eq!(merged.start_time, Some(at(0)));
        }
    }

    type Callbacks = Vec<(CallStatus, i64, u32)>;

    /// The row a sequence of callbacks leaves, each written in turn (`COALESCE(new, old)`).
    fn row_after(events: &[(CallStatus, i64, u32)]) -> (CallChange, CallState) {
        let (mut state, mut row) = (CallState::default(), CallChange::default());
        for (s, seq, t) in events {
            let (change, next) = plan_status(&state, &event(*s, *seq), at(*t));
            merge(&mut row, change);
            state = next;
        }
        (row, state)
    }

    /// A call as Twilio reports it: non-final statuses with rising sequence numbers and
    /// times, maybe one final status last, and some callbacks delivered twice.
    fn a_call() -> impl proptest::strategy::Strategy<Value = Callbacks> {
        use CallStatus::*;
        use proptest::prelude::*;
        let steps = prop::sample::subsequence(vec![Queued, Initiated, Ringing, InProgress], 0..=4);
        let end = prop::option::of(prop::sample::select(vec![Completed, Busy, NoAnswer, Failed, Canceled]));
        (steps, end, prop::collection::vec(0u32..3, 5), prop::collection::vec(any::<prop::sample::Index>(), 0..3))
            .prop_filter("a call has at least one callback", |(steps, end, _, _)| !steps.is_empty() || end.is_some())
            .prop_map(|(steps, end, gaps, repeats)| {
                let mut t = 0;
                let mut events: Vec<_> = steps
                    .into_iter()
                    .chain(end)
                    .enumerate()
                    .map(|(i, s)| {
                        t += gaps[i];
                        (s, i as i64, t)
                    })
                    .collect();
                let again: Vec<_> = repeats.iter().map(|r| events[r.index(events.len())]).collect();
                events.extend(again);
                events
            })
    }

    fn a_call_and_a_shuffle() -> impl proptest::strategy::Strategy<Value = (Callbacks, Callbacks)> {
        use proptest::strategy::{Just, Strategy};
        a_call().prop_flat_map(|c| (Just(c.clone()), Just(c).prop_shuffle()))
    }

    proptest::proptest! {
        /// Any order of a call's callbacks, repeats included, ends in the same row.
        #[test]
        fn any_order_of_a_calls_callbacks_ends_in_the_same_row((call, shuffled) in a_call_and_a_shuffle()) {
            proptest::prop_assert_eq!(row_after(&shuffled), row_after(&call));
        }
    }

    #[test]
    fn only_an_answered_leg_transfers_its_parent() {
        use CallStatus::*;
        for s in [InProgress, Completed] {
            assert!(leg_was_answered(s), "{s:?}");
        }
        for s in [Queued, Initiated, Ringing, Busy, NoAnswer, Failed, Canceled] {
            assert!(!leg_was_answered(s), "{s:?}");
        }
    }

    #[test]
    fn durations_are_minutes_and_seconds() {
        assert_eq!(minutes_seconds(125), "2:05");
        assert_eq!(minutes_seconds(0), "0:00");
        assert_eq!(minutes_seconds(3600), "60:00");
    }

    #[test]
    fn outbound_calls_take_the_number_from_to() {
        let mut e = event(CallStatus::Ringing, 0);
        e.direction = Some("outbound-dial".into());
        let (change, _) = plan_status(&CallState::default(), &e, at(0));
        assert_eq!(change.phone.as_deref(), Some("+15005550006"));
    }
}
