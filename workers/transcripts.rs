//! How `calls.transcript` is assembled from what the worker keeps (CONTRACT section 4).
//!
//! Three sources, ranked: Conversational Intelligence above Real-Time
//! Transcription above `<Record transcribe>`; a lower source never replaces a
//! higher one. Real-time segments and Intelligence sentences are kept in the
//! worker's schema, and the text is recomputed from all of them each time one
//! arrives, so it is a function of the events received, whatever their order.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::PgConnection;

use super::calls::{CallWrites, Happened};
use super::{ApplyError, Outcome};
use crate::config::Secret;
use crate::events::transcription::{IntelligenceEvent, RealtimeEvent, RealtimeKind, Track, is_twilio_sid};
use crate::events::{BusinessId, Envelope, Event};
use crate::twilio_api::{self, ApiFailure, Credentials, TwilioApi};

/// Where a call's transcript came from, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// `<Record transcribe>`: one `TranscriptionText`.
    Record = 1,
    /// Real-Time Transcription: final segments of one or more sessions.
    Realtime = 2,
    /// Conversational Intelligence: the post-call transcript of the recording.
    Intelligence = 3,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Record => "record",
            Source::Realtime => "realtime",
            Source::Intelligence => "intelligence",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "record" => Some(Source::Record),
            "realtime" => Some(Source::Realtime),
            "intelligence" => Some(Source::Intelligence),
            _ => None,
        }
    }

    /// Whether text from `self` may be stored over what `current` stored.
    pub fn may_replace(self, current: Option<Source>) -> bool {
        current.is_none_or(|c| self >= c)
    }
}

/// A Real-Time Transcription session of one call, as its events so far describe it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Session {
    pub session_sid: String,
    /// The earliest `Timestamp` among the session's events received.
    pub first_at: NaiveDateTime,
    pub inbound_label: Option<String>,
    pub outbound_label: Option<String>,
}

/// One final segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub session_sid: String,
    pub sequence_id: i64,
    pub track: Track,
    pub text: String,
}

/// One line per final segment, `<label>: <text>`: sessions in the order of their
/// first `Timestamp` (then SID, so equal times still give one order), segments
/// in `SequenceId` order; the label is the session's own for the track, else
/// `Customer` (inbound) or `Agent` (outbound). `None` when there is no segment.
pub fn realtime_text(sessions: &[Session], segments: &[Segment]) -> Option<String> {
    let mut ordered: Vec<&Session> = sessions.iter().collect();
    ordered.sort_by(|a, b| (a.first_at, &a.session_sid).cmp(&(b.first_at, &b.session_sid)));
    let position = |sid: &str| ordered.iter().position(|s| s.session_sid == sid).unwrap_or(usize::MAX);
    let mut lines: Vec<(usize, &str, i64, &Segment)> =
        segments.iter().map(|g| (position(&g.session_sid), g.session_sid.as_str(), g.sequence_id, g)).collect();
    lines.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    lines.dedup_by(|a, b| a.1 == b.1 && a.2 == b.2);
    let text: Vec<String> = lines
        .iter()
        .map(|(_, sid, _, g)| {
            let session = ordered.iter().find(|s| s.session_sid == *sid);
            let own = session.and_then(|s| match g.track {
                Track::Inbound => s.inbound_label.as_deref(),
                Track::Outbound => s.outbound_label.as_deref(),
            });
            format!("{}: {}", own.unwrap_or(g.track.default_label()), g.text)
        })
        .collect();
    (!text.is_empty()).then(|| text.join("\n"))
}

/// A participant of an Intelligence transcript: which media channel is whose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    pub channel_participant: Option<i64>,
    pub role: Option<String>,
}

/// One Intelligence sentence with its label decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub index: i64,
    pub label: String,
    pub text: String,
}

/// The label of a sentence: the `role` of the participant on its channel,
/// capitalized (`customer` is `Customer`), else `Speaker <media_channel>`.
pub fn sentence_label(participants: &[Participant], media_channel: Option<i64>) -> String {
    let role = participants
        .iter()
        .find(|p| p.channel_participant.is_some() && p.channel_participant == media_channel)
        .and_then(|p| p.role.as_deref())
        .and_then(crate::events::transcription::clean_label);
    match (role, media_channel) {
        (Some(role), _) => capitalize(&role),
        (None, Some(channel)) => format!("Speaker {channel}"),
        (None, None) => "Speaker".to_string(),
    }
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map_or_else(String::new, |first| first.to_uppercase().chain(chars).collect())
}

/// One line per sentence in `sentence_index` order; a repeated index counts once.
pub fn intelligence_text(lines: &[Line]) -> Option<String> {
    let mut ordered: Vec<&Line> = lines.iter().filter(|l| !l.text.trim().is_empty()).collect();
    ordered.sort_by_key(|l| l.index);
    ordered.dedup_by_key(|l| l.index);
    let text: Vec<String> = ordered.iter().map(|l| format!("{}: {}", l.label, one_line(&l.text))).collect();
    (!text.is_empty()).then(|| text.join("\n"))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---- applying ----------------------------------------------------------------------------

/// A Real-Time Transcription event: its session and (a final one) its segment
/// are kept, then the call's text is recomputed from every segment kept. The
/// first callback of a call makes its row.
pub async fn apply_realtime(
    tx: &mut PgConnection,
    writes: &mut CallWrites,
    business: BusinessId,
    e: &RealtimeEvent,
    received_at: DateTime<Utc>,
) -> Result<Outcome, ApplyError> {
    match &e.kind {
        RealtimeKind::Error { .. } => return Ok(Outcome::Ignored("a transcription-error adds no text")),
        RealtimeKind::Content { is_final: false, .. } => return Ok(Outcome::Ignored("a partial result adds no text")),
        _ => {}
    }
    let at = e.timestamp.unwrap_or(received_at).naive_utc();
    // The call's lock first: two workers with segments of one call take turns,
    // and the second recomputes with the first one's segment committed.
    writes.call(tx, business, &e.call_sid).await?;
    let segment = e.segment().map(|(track, text)| NewSegment {
        sequence_id: e.sequence_id,
        outbound: track == Track::Outbound,
        text,
        received_at,
        sent_at: e.timestamp,
    });
    let written = writes.sessions.take(business, &e.session_sid, segment.as_ref().map(|g| g.sequence_id));
    let state = match written {
        Some(state) => state,
        None => record_session(tx, business, e, at, segment.as_ref()).await?,
    };
    match state {
        // The segment claims no inbox key (`Calls::claims_key`): its row is the
        // record that it was applied, so one already there makes it a duplicate.
        // It is its event's log entry too: with the two times, `replay` rebuilds the
        // envelope from it ([`logged_segments`]).
        SessionState::Kept { segment_inserted: false, .. } if segment.is_some() => return Ok(Outcome::Duplicate),
        SessionState::Kept { .. } => {}
        SessionState::Pruned => {
            return Ok(Outcome::Ignored(
                "the session's segments were removed after EVENT_RETENTION; the call's transcript stays as it is",
            ));
        }
    }
    let call = writes.call(tx, business, &e.call_sid).await?;
    if matches!(e.kind, RealtimeKind::Stopped) {
        // Whether it gave any text is read at the flush, with the call's segments.
        call.happened.push(Happened::RealtimeSessionStopped { session_sid: e.session_sid.clone() });
    }
    // The row now (this may be the call's first callback); the text once per call
    // and batch, when the batch's writes are flushed (`recompute_realtime`).
    call.store_transcript(Source::Realtime, None, received_at);
    call.realtime_changed = true;
    Ok(Outcome::Applied)
}

/// Each call's real-time text from every segment kept, this transaction's
/// included, in one statement for all of them, by (business, call SID); a
/// call with no session is not in it.
pub(super) async fn recompute_realtime(
    tx: &mut PgConnection,
    calls: &[(BusinessId, &str)],
) -> Result<HashMap<(i32, String), Realtime>, sqlx::Error> {
    let pieces = realtime_pieces(tx, calls).await?;
    Ok(pieces
        .into_iter()
        .map(|(call, (sessions, segments))| {
            let with_text = segments.iter().map(|g| g.session_sid.clone()).collect();
            (call, Realtime { text: realtime_text(&sessions, &segments), with_text })
        })
        .collect())
}

/// A call's Real-Time Transcription as this transaction sees it.
#[derive(Debug, Default)]
pub(super) struct Realtime {
    /// The call's real-time text (`None`: no segment kept).
    pub text: Option<String>,
    /// The sessions that gave at least one segment still kept.
    pub with_text: HashSet<String>,
}

/// Whether a session's segments are still kept (see [`prune_segments_before`]), and
/// the session's number, which its segments carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SessionState {
    /// Kept; `segment_inserted`: the event's segment is a new row (false: there was
    /// one already, or the event has none).
    Kept {
        id: i64,
        segment_inserted: bool,
    },
    Pruned,
}

/// A final segment to keep, with its session.
struct NewSegment<'a> {
    sequence_id: i64,
    outbound: bool,
    text: &'a str,
    received_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
}

/// Creates or updates the session: its earliest time, its labels (only
/// `transcription-started` carries them), whether it stopped. A segment that
/// changes none of these (nearly all of them) writes nothing: the row is read,
/// not rewritten, so a session is not a new row version per segment (dead
/// tuples and ~200 bytes of WAL each). The event's segment, if any, is inserted
/// under the session in the same statement (one round trip per segment), unless
/// the session's segments were pruned.
async fn record_session(
    tx: &mut PgConnection,
    business: BusinessId,
    e: &RealtimeEvent,
    at: NaiveDateTime,
    segment: Option<&NewSegment<'_>>,
) -> Result<SessionState, sqlx::Error> {
    let (started, inbound, outbound) = match &e.kind {
        RealtimeKind::Started { inbound_label, outbound_label } => {
            (true, inbound_label.clone(), outbound_label.clone())
        }
        _ => (false, None, None),
    };
    // A statement that finds nothing met a row committed by another transaction
    // after its snapshot was taken (the conflict saw it, the read did not): the
    // same statement again, with a new snapshot, reads it (and keeps the segment).
    let mut written: Option<(i64, bool, i64)> = None;
    for _ in 0..2 {
        written = sqlx::query_as(
        "WITH up AS (
             INSERT INTO webhook_worker.transcript_sessions
                 (business_id, session_sid, call_sid, first_at, inbound_label, outbound_label, stopped)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (business_id, session_sid) DO UPDATE SET
                 first_at = LEAST(transcript_sessions.first_at, EXCLUDED.first_at),
                 inbound_label = CASE WHEN $8 THEN EXCLUDED.inbound_label ELSE transcript_sessions.inbound_label END,
                 outbound_label = CASE WHEN $8 THEN EXCLUDED.outbound_label ELSE transcript_sessions.outbound_label END,
                 stopped = transcript_sessions.stopped OR EXCLUDED.stopped
             WHERE $8 OR EXCLUDED.first_at < transcript_sessions.first_at
                OR (EXCLUDED.stopped AND NOT transcript_sessions.stopped)
             RETURNING id, segments_pruned),
         s AS (
             SELECT id, segments_pruned FROM up
             UNION ALL
             SELECT id, segments_pruned FROM webhook_worker.transcript_sessions
              WHERE business_id = $1 AND session_sid = $2 AND NOT EXISTS (SELECT 1 FROM up)),
         g AS (
             INSERT INTO webhook_worker.transcript_segments (session_id, sequence_id, outbound, text, received_at, sent_at)
             SELECT s.id, $10, $11, $12, $13, $14 FROM s WHERE $9 AND NOT s.segments_pruned
             ON CONFLICT DO NOTHING
             RETURNING 1)
         SELECT id, segments_pruned, (SELECT count(*) FROM g) FROM s",
    )
        .bind(business.0)
        .bind(&e.session_sid)
        .bind(&e.call_sid)
        .bind(at)
        .bind(&inbound)
        .bind(&outbound)
        .bind(matches!(e.kind, RealtimeKind::Stopped))
        .bind(started)
        .bind(segment.is_some())
        .bind(segment.map_or(0, |g| g.sequence_id))
        .bind(segment.is_some_and(|g| g.outbound))
        .bind(segment.map_or("", |g| g.text))
        .bind(segment.map(|g| g.received_at))
        .bind(segment.and_then(|g| g.sent_at))
        .fetch_optional(&mut *tx)
        .await?;
        if written.is_some() {
            break;
        }
    }
    let (id, pruned, inserted) = written.ok_or(sqlx::Error::RowNotFound)?;
    Ok(if pruned { SessionState::Pruned } else { SessionState::Kept { id, segment_inserted: inserted > 0 } })
}

/// What [`write_sessions`] wrote for a batch: each session's row (its number, and
/// whether its segments were pruned), and the segments it inserted.
#[derive(Debug, Default)]
pub struct SessionsWritten {
    sessions: HashMap<(i32, String), (i64, bool)>,
    inserted: HashSet<(i32, String, i64)>,
}

impl SessionsWritten {
    /// What the batch statement did for this event of the session (its segment's
    /// `SequenceId`, if it has one), or `None` if the statement did not account
    /// for the session. The first copy of a segment in the batch gets its insert;
    /// a second copy is told it was already there.
    fn take(&mut self, business: BusinessId, session_sid: &str, segment: Option<i64>) -> Option<SessionState> {
        let key = (business.0, session_sid.to_string());
        let (id, pruned) = *self.sessions.get(&key)?;
        if pruned {
            return Some(SessionState::Pruned);
        }
        let segment_inserted = segment.is_some_and(|seq| self.inserted.remove(&(key.0, key.1, seq)));
        Some(SessionState::Kept { id, segment_inserted })
    }
}

/// One session's events in a batch, as [`write_sessions`] sends them.
struct BatchSession<'a> {
    business: i32,
    session_sid: &'a str,
    call_sid: &'a str,
    /// The earliest time among them.
    at: NaiveDateTime,
    /// The labels of its `transcription-started`, if one is in the batch.
    started: Option<(Option<&'a str>, Option<&'a str>)>,
    stopped: bool,
}

/// Writes a batch's Real-Time sessions and final segments in one statement,
/// before the batch's events are applied one by one (a segment is most of a
/// call's callbacks; one statement each was the largest Postgres cost left).
/// Every `transcription-started`, final segment and `-stopped` of a call this
/// transaction holds: each session is created or updated once, as
/// [`record_session`] would leave it after all of them (the earliest time, a
/// start's labels, stopped if one stopped it), and each segment inserted under
/// it. Whether a stopped session gave any text is read when the batch is
/// flushed, so it counts the batch's segments whatever their order. (In
/// realistic traffic a call's start, segments and stop are close enough to
/// share a lane's batch: a first version that left such sessions to
/// `record_session` wrote half the segments one statement each.) A session the
/// statement does not account for (another transaction committed it after
/// this statement's snapshot) is written by `record_session` as before, event
/// by event. Each event then reads its outcome from [`SessionsWritten`], as it
/// would have from its own statement.
pub(super) async fn write_sessions(
    tx: &mut PgConnection,
    writes: &mut CallWrites,
    fresh: &[&Envelope],
) -> Result<(), sqlx::Error> {
    let mut sessions: Vec<BatchSession> = Vec::new();
    let mut segments = Vec::new();
    let mut events = 0;
    for env in fresh {
        let (Some(business), Event::TwilioRealtime(e)) = (env.business_id, &env.event) else { continue };
        if writes.is_busy(business, &e.call_sid) {
            continue;
        }
        let at = e.timestamp.unwrap_or(env.received_at).naive_utc();
        let started = match &e.kind {
            RealtimeKind::Started { inbound_label, outbound_label } => {
                Some((inbound_label.as_deref(), outbound_label.as_deref()))
            }
            RealtimeKind::Content { is_final: true, .. } | RealtimeKind::Stopped => None,
            // Applied without a session write (see `apply_realtime`).
            RealtimeKind::Content { .. } | RealtimeKind::Error { .. } => continue,
        };
        events += 1;
        let i = match sessions.iter().position(|s| s.business == business.0 && s.session_sid == e.session_sid) {
            Some(i) => i,
            None => {
                let (session_sid, call_sid) = (e.session_sid.as_str(), e.call_sid.as_str());
                sessions.push(BatchSession {
                    business: business.0,
                    session_sid,
                    call_sid,
                    at,
                    started,
                    stopped: false,
                });
                sessions.len() - 1
            }
        };
        let s = &mut sessions[i];
        s.at = s.at.min(at);
        s.call_sid = s.call_sid.min(e.call_sid.as_str());
        s.started = s.started.or(started);
        s.stopped |= matches!(e.kind, RealtimeKind::Stopped);
        if let Some((track, text)) = e.segment() {
            segments.push((business.0, e, track == Track::Outbound, text, env.received_at));
        }
    }
    if events < 2 {
        return Ok(());
    }
    let (mut businesses, mut sids, mut calls, mut ats) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut started, mut inbound, mut outbound_labels, mut stopped) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in &sessions {
        businesses.push(s.business);
        sids.push(s.session_sid);
        calls.push(s.call_sid);
        ats.push(s.at);
        started.push(s.started.is_some());
        inbound.push(s.started.and_then(|l| l.0));
        outbound_labels.push(s.started.and_then(|l| l.1));
        stopped.push(s.stopped);
    }
    let n = segments.len();
    let (mut g_businesses, mut g_sids, mut seqs, mut outbound) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut texts, mut received, mut sent) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for (business, e, out, text, received_at) in &segments {
        g_businesses.push(*business);
        g_sids.push(e.session_sid.as_str());
        seqs.push(e.sequence_id);
        outbound.push(*out);
        texts.push(*text);
        received.push(*received_at);
        sent.push(e.timestamp);
    }
    // As `record_session`'s statement for each event: a session row is created,
    // or updated only where an event changes it (an earlier time, a start's
    // labels, a stop), and otherwise read, not rewritten.
    let rows: Vec<(i32, String, i64, bool, Vec<i64>)> = sqlx::query_as(
        "WITH one AS (
             SELECT * FROM unnest($1::int4[], $2::text[], $3::text[], $4::timestamp[], $5::bool[], $6::text[],
                                  $7::text[], $8::bool[])
                 AS one(business_id, session_sid, call_sid, at, started, inbound_label, outbound_label, stopped)),
         i AS (
             SELECT * FROM unnest($9::int4[], $10::text[], $11::int8[], $12::bool[], $13::text[],
                                  $14::timestamptz[], $15::timestamptz[])
                 AS i(business_id, session_sid, sequence_id, outbound, text, received_at, sent_at)),
         up AS (
             INSERT INTO webhook_worker.transcript_sessions AS t
                 (business_id, session_sid, call_sid, first_at, inbound_label, outbound_label, stopped)
             SELECT business_id, session_sid, call_sid, at, inbound_label, outbound_label, stopped FROM one
             ON CONFLICT (business_id, session_sid) DO UPDATE SET
                 first_at = LEAST(t.first_at, EXCLUDED.first_at),
                 inbound_label = CASE WHEN (SELECT o.started FROM one o WHERE o.business_id = EXCLUDED.business_id
                                                                         AND o.session_sid = EXCLUDED.session_sid)
                                      THEN EXCLUDED.inbound_label ELSE t.inbound_label END,
                 outbound_label = CASE WHEN (SELECT o.started FROM one o WHERE o.business_id = EXCLUDED.business_id
                                                                          AND o.session_sid = EXCLUDED.session_sid)
                                       THEN EXCLUDED.outbound_label ELSE t.outbound_label END,
                 stopped = t.stopped OR EXCLUDED.stopped
             WHERE (SELECT o.started FROM one o WHERE o.business_id = EXCLUDED.business_id
                                                  AND o.session_sid = EXCLUDED.session_sid)
                OR EXCLUDED.first_at < t.first_at
                OR (EXCLUDED.stopped AND NOT t.stopped)
             RETURNING t.id, t.business_id, t.session_sid, t.segments_pruned),
         s AS (
             SELECT id, business_id, session_sid, segments_pruned FROM up
             UNION ALL
             SELECT t.id, t.business_id, t.session_sid, t.segments_pruned
               FROM webhook_worker.transcript_sessions t JOIN one USING (business_id, session_sid)
              WHERE NOT EXISTS (SELECT 1 FROM up WHERE up.business_id = t.business_id AND up.session_sid = t.session_sid)),
         g AS (
             INSERT INTO webhook_worker.transcript_segments (session_id, sequence_id, outbound, text, received_at, sent_at)
             SELECT s.id, i.sequence_id, i.outbound, i.text, i.received_at, i.sent_at
               FROM i JOIN s USING (business_id, session_sid)
              WHERE NOT s.segments_pruned
             ON CONFLICT DO NOTHING
             RETURNING session_id, sequence_id)
         SELECT s.business_id, s.session_sid, s.id, s.segments_pruned,
                ARRAY(SELECT g.sequence_id FROM g WHERE g.session_id = s.id)
           FROM s",
    )
    .bind(&businesses)
    .bind(&sids)
    .bind(&calls)
    .bind(&ats)
    .bind(&started)
    .bind(&inbound)
    .bind(&outbound_labels)
    .bind(&stopped)
    .bind(&g_businesses)
    .bind(&g_sids)
    .bind(&seqs)
    .bind(&outbound)
    .bind(&texts)
    .bind(&received)
    .bind(&sent)
    .fetch_all(&mut *tx)
    .await?;
    for (business, session_sid, id, pruned, inserted) in rows {
        for seq in inserted {
            writes.sessions.inserted.insert((business, session_sid.clone(), seq));
        }
        writes.sessions.sessions.insert((business, session_sid), (id, pruned));
    }
    Ok(())
}

/// The calls' sessions and their segments, in one statement (a row per segment,
/// one with no segment for a session that has none), by (business, call SID).
#[allow(clippy::type_complexity)]
async fn realtime_pieces(
    tx: &mut PgConnection,
    calls: &[(BusinessId, &str)],
) -> Result<HashMap<(i32, String), (Vec<Session>, Vec<Segment>)>, sqlx::Error> {
    type Row =
        (i32, String, String, NaiveDateTime, Option<String>, Option<String>, Option<i64>, Option<bool>, Option<String>);
    let businesses: Vec<i32> = calls.iter().map(|(b, _)| b.0).collect();
    let sids: Vec<&str> = calls.iter().map(|(_, sid)| *sid).collect();
    // Through the calls' sessions: a segment names its session, not its call.
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT s.business_id, s.call_sid, s.session_sid, s.first_at, s.inbound_label, s.outbound_label,
                g.sequence_id, g.outbound, g.text
           FROM unnest($1::int4[], $2::text[]) AS c(business_id, call_sid)
           JOIN webhook_worker.transcript_sessions s ON s.business_id = c.business_id AND s.call_sid = c.call_sid
           LEFT JOIN webhook_worker.transcript_segments g ON g.session_id = s.id",
    )
    .bind(&businesses)
    .bind(&sids)
    .fetch_all(&mut *tx)
    .await?;
    let mut by_call: HashMap<(i32, String), (Vec<Session>, Vec<Segment>)> = HashMap::new();
    for (business, call_sid, session_sid, first_at, inbound_label, outbound_label, sequence_id, outbound, text) in rows
    {
        let (sessions, segments) = by_call.entry((business, call_sid)).or_default();
        if !sessions.iter().any(|s| s.session_sid == session_sid) {
            sessions.push(Session { session_sid: session_sid.clone(), first_at, inbound_label, outbound_label });
        }
        if let (Some(sequence_id), Some(outbound), Some(text)) = (sequence_id, outbound, text) {
            let track = if outbound { Track::Outbound } else { Track::Inbound };
            segments.push(Segment { session_sid, sequence_id, track, text });
        }
    }
    Ok(by_call)
}

/// Keeps which call a recording belongs to (any status), for Intelligence transcripts of it.
pub async fn remember_recording(
    tx: &mut PgConnection,
    business: BusinessId,
    recording_sid: &str,
    call_sid: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_worker.twilio_recordings (business_id, recording_sid, call_sid)
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(business.0)
    .bind(recording_sid)
    .bind(call_sid)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// An Intelligence "transcript available" webhook: the transcript is read from
/// Twilio's API with the business's credentials, its sentences kept, and the
/// call's text recomputed. Still being made: tried again later (the retry
/// queues' growing delays), then parked with the reason.
pub async fn apply_intelligence(
    tx: &mut PgConnection,
    writes: &mut CallWrites,
    business: BusinessId,
    e: &IntelligenceEvent,
    received_at: DateTime<Utc>,
) -> Result<Outcome, ApplyError> {
    if !e.is_transcript_available() {
        return Ok(Outcome::Ignored("an Intelligence event type that is not applied"));
    }
    let Some(api) = writes.twilio.clone() else {
        return Ok(Outcome::Retry("this worker has no client for Twilio's API".into()));
    };
    let creds = match credentials(tx, business, e.account_sid.as_deref()).await? {
        Ok(creds) => creds,
        Err(reason) => return Ok(Outcome::Park(reason)),
    };
    // Twilio is asked before any call row is locked.
    let fetched = match fetch(&api, &creds, tx, business, e).await {
        Ok(Ok(f)) => f,
        Ok(Err(ApiFailure::Retry(reason))) => return Ok(Outcome::Retry(reason)),
        Ok(Err(ApiFailure::Park(reason))) => return Ok(Outcome::Park(reason)),
        Err(db) => return Err(db.into()),
    };
    store_sentences(tx, business, &e.transcript_sid, &fetched).await?;
    writes.call(tx, business, &fetched.call_sid).await?;
    let text = newest_intelligence_text(tx, business, &fetched.call_sid).await?;
    let call = writes.call(tx, business, &fetched.call_sid).await?;
    call.store_transcript(Source::Intelligence, text, received_at);
    Ok(Outcome::Applied)
}

/// What was read of one Intelligence transcript.
#[derive(Debug)]
struct Fetched {
    call_sid: String,
    date_created: Option<String>,
    lines: Vec<Line>,
}

/// The business's Twilio credentials: `config.account_sid` (else the webhook's
/// `account_sid`) and `config.auth_token`. `Err` is the reason to park.
async fn credentials(
    tx: &mut PgConnection,
    business: BusinessId,
    webhook_account: Option<&str>,
) -> Result<Result<Credentials, String>, sqlx::Error> {
    let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT config ->> 'account_sid', config ->> 'auth_token' FROM public.integrations
          WHERE business_id = $1 AND type = 'twilio' AND status = 'active' ORDER BY id DESC LIMIT 1",
    )
    .bind(business.0)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((account, token)) = row else {
        return Ok(Err(format!("business {business} has no active Twilio integration")));
    };
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Ok(Err(format!("business {business}'s Twilio integration has no auth_token")));
    };
    let account = account.filter(|a| is_twilio_sid(a, "AC")).or_else(|| webhook_account.map(str::to_string));
    let Some(account_sid) = account else {
        return Ok(Err(format!("business {business}'s Twilio integration has no account_sid (AC...) in its config")));
    };
    Ok(Ok(Credentials { account_sid, auth_token: Secret::new(token) }))
}

/// Reads the transcript, finds its call, reads every sentence.
async fn fetch(
    api: &TwilioApi,
    creds: &Credentials,
    tx: &mut PgConnection,
    business: BusinessId,
    e: &IntelligenceEvent,
) -> Result<Result<Fetched, ApiFailure>, sqlx::Error> {
    let sid = &e.transcript_sid;
    let t = match api.transcript(creds, sid).await {
        Ok(t) => t,
        Err(f) => return Ok(Err(f)),
    };
    match t.status.as_str() {
        "completed" => {}
        "failed" | "canceled" | "error" => {
            return Ok(Err(ApiFailure::Park(format!("transcript {sid} ended {}, with no text", t.status))));
        }
        other => return Ok(Err(ApiFailure::Retry(format!("transcript {sid} is {other}, not completed yet")))),
    }
    let channel = t.channel.clone().unwrap_or_default();
    let call_sid = match call_of(api, creds, tx, business, e, &t).await? {
        Ok(c) => c,
        Err(f) => return Ok(Err(f)),
    };
    let sentences = match api.sentences(creds, sid).await {
        Ok(s) => s,
        Err(f) => return Ok(Err(f)),
    };
    let participants: Vec<Participant> = channel
        .participants
        .iter()
        .map(|p| Participant { channel_participant: p.channel_participant, role: p.role.clone() })
        .collect();
    let lines = sentences
        .iter()
        .map(|s| Line {
            index: s.sentence_index,
            label: sentence_label(&participants, s.media_channel),
            text: s.transcript.clone(),
        })
        .collect();
    Ok(Ok(Fetched { call_sid, date_created: t.date_created.clone(), lines }))
}

/// The call: `customer_key` when it is a CallSid (the webhook's, else the
/// transcript's); else the call of the recording the transcript was made from,
/// as its recording callback said or as Twilio's API says.
async fn call_of(
    api: &TwilioApi,
    creds: &Credentials,
    tx: &mut PgConnection,
    business: BusinessId,
    e: &IntelligenceEvent,
    t: &twilio_api::Transcript,
) -> Result<Result<String, ApiFailure>, sqlx::Error> {
    let key = e.call_sid().or(t.customer_key.as_deref().filter(|k| is_twilio_sid(k, "CA")));
    if let Some(call) = key {
        return Ok(Ok(call.to_string()));
    }
    let recording = t.channel.as_ref().and_then(|c| c.media_properties.as_ref()).and_then(|m| m.source_sid.as_deref());
    let Some(recording) = recording.filter(|r| is_twilio_sid(r, "RE")) else {
        return Ok(Err(ApiFailure::Park(format!(
            "transcript {}: customer_key is not a CallSid and it names no recording",
            e.transcript_sid
        ))));
    };
    let known: Option<(String,)> = sqlx::query_as(
        "SELECT call_sid FROM webhook_worker.twilio_recordings WHERE business_id = $1 AND recording_sid = $2",
    )
    .bind(business.0)
    .bind(recording)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((call,)) = known {
        return Ok(Ok(call));
    }
    Ok(api.recording_call_sid(creds, recording).await.and_then(|call| {
        if is_twilio_sid(&call, "CA") {
            Ok(call)
        } else {
            Err(ApiFailure::Park(format!("recording {recording}: call_sid {call:?} is not a CallSid")))
        }
    }))
}

/// Keeps the transcript and its sentences; a transcript read again replaces its sentences.
async fn store_sentences(
    tx: &mut PgConnection,
    business: BusinessId,
    transcript_sid: &str,
    f: &Fetched,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_worker.intelligence_transcripts (business_id, transcript_sid, call_sid, date_created)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (business_id, transcript_sid) DO UPDATE
            SET call_sid = EXCLUDED.call_sid, date_created = EXCLUDED.date_created, fetched_at = now()",
    )
    .bind(business.0)
    .bind(transcript_sid)
    .bind(&f.call_sid)
    .bind(f.date_created.as_deref())
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM webhook_worker.intelligence_sentences WHERE business_id = $1 AND transcript_sid = $2")
        .bind(business.0)
        .bind(transcript_sid)
        .execute(&mut *tx)
        .await?;
    let indexes: Vec<i64> = f.lines.iter().map(|l| l.index).collect();
    let labels: Vec<&str> = f.lines.iter().map(|l| l.label.as_str()).collect();
    let texts: Vec<&str> = f.lines.iter().map(|l| l.text.as_str()).collect();
    sqlx::query(
        "INSERT INTO webhook_worker.intelligence_sentences (business_id, transcript_sid, sentence_index, label, text)
         SELECT $1, $2, i, l, t FROM UNNEST($3::bigint[], $4::text[], $5::text[]) AS s(i, l, t)
         ON CONFLICT DO NOTHING",
    )
    .bind(business.0)
    .bind(transcript_sid)
    .bind(&indexes)
    .bind(&labels)
    .bind(&texts)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The text of the call's newest Intelligence transcript (by Twilio's `date_created`).
async fn newest_intelligence_text(
    tx: &mut PgConnection,
    business: BusinessId,
    call_sid: &str,
) -> Result<Option<String>, sqlx::Error> {
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT s.sentence_index, s.label, s.text FROM webhook_worker.intelligence_sentences s
          WHERE s.business_id = $1 AND s.transcript_sid = (
                SELECT transcript_sid FROM webhook_worker.intelligence_transcripts
                 WHERE business_id = $1 AND call_sid = $2
                 ORDER BY date_created DESC NULLS LAST, fetched_at DESC, transcript_sid DESC LIMIT 1)",
    )
    .bind(business.0)
    .bind(call_sid)
    .fetch_all(&mut *tx)
    .await?;
    let lines: Vec<Line> = rows.into_iter().map(|(index, label, text)| Line { index, label, text }).collect();
    Ok(intelligence_text(&lines))
}

/// A kept segment's row, as [`logged_segments`] reads it.
type SegmentRow = (i32, String, String, i64, bool, String, DateTime<Utc>, Option<DateTime<Utc>>);

/// The events of the final segments applied since migration 0012, rebuilt
/// from their rows (a segment is its own log entry: see `Calls::claims_key`),
/// session by session and in `SequenceId` order within each; with `business`
/// and `since` (received at or after), only those. The envelope is the one the
/// worker received, but for `request_id` (never logged) and `received_at`,
/// kept to the microsecond. Segments applied before 0012 are in the event log.
pub fn logged_segments(
    pool: &sqlx::PgPool,
    business: Option<BusinessId>,
    since: Option<DateTime<Utc>>,
) -> futures_util::stream::BoxStream<'_, Result<crate::events::Envelope, sqlx::Error>> {
    use futures_util::{StreamExt, TryStreamExt};
    sqlx::query_as::<_, SegmentRow>(
        "SELECT s.business_id, s.session_sid, s.call_sid, g.sequence_id, g.outbound, g.text, g.received_at, g.sent_at
           FROM webhook_worker.transcript_sessions s
           JOIN webhook_worker.transcript_segments g ON g.session_id = s.id
          WHERE g.received_at IS NOT NULL
            AND ($1::int IS NULL OR s.business_id = $1)
            AND ($2::timestamptz IS NULL OR g.received_at >= $2)
          ORDER BY s.id, g.sequence_id",
    )
    .bind(business.map(|b| b.0))
    .bind(since)
    .fetch(pool)
    .map_ok(|(b, session_sid, call_sid, sequence_id, outbound, text, received_at, sent_at)| {
        let event = RealtimeEvent {
            call_sid,
            session_sid,
            sequence_id,
            timestamp: sent_at,
            kind: RealtimeKind::Content {
                track: Some(if outbound { Track::Outbound } else { Track::Inbound }),
                is_final: true,
                text: Some(text),
            },
        };
        let business = BusinessId(b);
        crate::events::Envelope {
            version: crate::events::ENVELOPE_VERSION,
            key: crate::events::transcription::realtime_key(business, &event),
            business_id: Some(business),
            received_at,
            request_id: String::new(),
            event: crate::events::Event::TwilioRealtime(event),
        }
    })
    .boxed()
}

/// Sessions whose segments one prune statement removes (about ten segments each).
pub const SESSION_SLICE: i64 = 500;

/// Removes the segments of the Real-Time Transcription sessions first seen before
/// `cut` and marks those sessions `segments_pruned`, [`SESSION_SLICE`] sessions per
/// statement; returns how many segments went. The session rows stay (one per call), so
/// a late duplicate of a pruned session's callback is ignored rather than rebuilding
/// the call's text from what is left. Rows in `public` are never touched.
pub async fn prune_segments_before(pool: &sqlx::PgPool, cut: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    let mut removed = 0;
    loop {
        let (sessions, segments): (i64, i64) = sqlx::query_as(
            "WITH s AS (
                 UPDATE webhook_worker.transcript_sessions SET segments_pruned = true
                  WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM webhook_worker.transcript_sessions
                         WHERE NOT segments_pruned AND seen_at < $1 LIMIT $2))
                 RETURNING id),
             g AS (
                 DELETE FROM webhook_worker.transcript_segments g USING s
                  WHERE g.session_id = s.id
                 RETURNING 1)
             SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM g)",
        )
        .bind(cut)
        .bind(SESSION_SLICE)
        .fetch_one(pool)
        .await?;
        removed += segments as u64;
        if sessions < SESSION_SLICE {
            return Ok(removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u32) -> NaiveDateTime {
        chrono::NaiveDate::from_ymd_opt(2025, 11, 25).unwrap().and_hms_opt(12, 0, s).unwrap()
    }

    fn session(sid: &str, s: u32, inbound: Option<&str>, outbound: Option<&str>) -> Session {
        Session {
            session_sid: sid.into(),
            first_at: at(s),
            inbound_label: inbound.map(Into::into),
            outbound_label: outbound.map(Into::into),
        }
    }

    fn seg(sid: &str, seq: i64, track: Track, text: &str) -> Segment {
        Segment { session_sid: sid.into(), sequence_id: seq, track, text: text.into() }
    }

    #[test]
    fn sources_rank_intelligence_over_realtime_over_record() {
        use Source::*;
        assert!(Realtime.may_replace(Some(Record)));
        assert!(Intelligence.may_replace(Some(Realtime)));
        assert!(Realtime.may_replace(Some(Realtime)));
        assert!(!Record.may_replace(Some(Realtime)));
        assert!(!Realtime.may_replace(Some(Intelligence)));
        assert!(Record.may_replace(None));
        for s in [Record, Realtime, Intelligence] {
            assert_eq!(Source::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn segments_in_sequence_order_with_default_labels() {
        let sessions = [session("GTa", 0, None, None)];
        let segments = [
            seg("GTa", 4, Track::Inbound, "I'd like a cleaning."),
            seg("GTa", 2, Track::Outbound, "Hello, this is Sam."),
        ];
        assert_eq!(
            realtime_text(&sessions, &segments).as_deref(),
            Some("Agent: Hello, this is Sam.\nCustomer: I'd like a cleaning.")
        );
        assert_eq!(realtime_text(&sessions, &[]), None);
    }

    #[test]
    fn sessions_in_order_of_their_first_timestamp_with_their_labels() {
        let later = session("GTa", 30, Some("Caller"), Some("Sam"));
        let earlier = session("GTb", 10, None, Some("Bot"));
        let segments = [
            seg("GTa", 2, Track::Inbound, "second session"),
            seg("GTb", 3, Track::Inbound, "first session, later"),
            seg("GTb", 2, Track::Outbound, "first session"),
            seg("GTa", 3, Track::Outbound, "reply"),
        ];
        let expected = "Bot: first session\nCustomer: first session, later\nCaller: second session\nSam: reply";
        for sessions in [[later.clone(), earlier.clone()], [earlier.clone(), later.clone()]] {
            assert_eq!(realtime_text(&sessions, &segments).as_deref(), Some(expected));
        }
        let mut reversed = segments.to_vec();
        reversed.reverse();
        assert_eq!(realtime_text(&[later, earlier], &reversed).as_deref(), Some(expected));
    }

    #[test]
    fn a_duplicated_segment_counts_once() {
        let sessions = [session("GTa", 0, None, None)];
        let s = seg("GTa", 2, Track::Inbound, "Hi");
        assert_eq!(realtime_text(&sessions, &[s.clone(), s]).as_deref(), Some("Customer: Hi"));
    }

    #[test]
    fn sentence_labels_come_from_the_participant_on_the_channel() {
        let ps = [
            Participant { channel_participant: Some(1), role: Some("agent".into()) },
            Participant { channel_participant: Some(2), role: Some("customer".into()) },
        ];
        assert_eq!(sentence_label(&ps, Some(2)), "Customer");
        assert_eq!(sentence_label(&ps, Some(1)), "Agent");
        assert_eq!(sentence_label(&ps, Some(0)), "Speaker 0");
        assert_eq!(sentence_label(&[], None), "Speaker");
        let unnamed = [Participant { channel_participant: Some(1), role: None }];
        assert_eq!(sentence_label(&unnamed, Some(1)), "Speaker 1");
    }

    #[test]
    fn sentences_in_index_order() {
        let line = |index, label: &str, text: &str| Line { index, label: label.into(), text: text.into() };
        let lines = [
            line(1, "Customer", "I need a cleaning."),
            line(0, "Agent", "Hi,\nthanks for calling."),
            line(1, "Customer", "I need a cleaning."),
        ];
        assert_eq!(
            intelligence_text(&lines).as_deref(),
            Some("Agent: Hi, thanks for calling.\nCustomer: I need a cleaning.")
        );
        assert_eq!(intelligence_text(&[]), None);
    }
}
