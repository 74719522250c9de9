//! How `calls.transcript` is assembled from what the worker keeps (CONTRACT section 4).
//!
//! Three sources, ranked: Conversational Intelligence above Real-Time
//! Transcription above `<Record transcribe>`; a lower source never replaces a
//! higher one. Real-time segments and Intelligence sentences are kept in the
//! worker's schema, and the text is recomputed from all of them each time one
//! arrives, so it is a function of the events received, whatever their order.

use chrono::NaiveDateTime;

use crate::events::transcription::Track;

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
