//! Twilio's newer transcript callbacks, parsed from their (already verified)
//! parameters: Real-Time Transcription (`<Start><Transcription statusCallbackUrl>`)
//! and the Conversational Intelligence "transcript available" webhook
//! (CONTRACT sections 3 and 4, PROTOCOLS section 7).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{BusinessId, FieldError};

/// A label longer than this is cut: it is the name before each line of a transcript.
pub const MAX_LABEL_CHARS: usize = 50;

/// Which side of the call a real-time segment was heard on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Track {
    /// `inbound_track`: the caller.
    Inbound,
    /// `outbound_track`: the receptionist.
    Outbound,
}

impl Track {
    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "inbound_track" => Some(Self::Inbound),
            "outbound_track" => Some(Self::Outbound),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound_track",
            Self::Outbound => "outbound_track",
        }
    }

    /// The label of a track whose session named none.
    pub fn default_label(self) -> &'static str {
        match self {
            Self::Inbound => "Customer",
            Self::Outbound => "Agent",
        }
    }
}

/// One Real-Time Transcription callback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealtimeEvent {
    pub call_sid: String,
    /// `TranscriptionSid` (`GT…`): the session.
    pub session_sid: String,
    /// `SequenceId`: counts every event of the session from 1.
    pub sequence_id: i64,
    /// `Timestamp` (ISO 8601), when sent.
    pub timestamp: Option<DateTime<Utc>>,
    pub kind: RealtimeKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RealtimeKind {
    /// `transcription-started`: the only event that carries the track labels.
    Started { inbound_label: Option<String>, outbound_label: Option<String> },
    /// `transcription-content`. Only a final one with text adds a line.
    Content { track: Option<Track>, is_final: bool, text: Option<String> },
    /// `transcription-stopped`: the session (or the call) ended.
    Stopped,
    /// `transcription-error`: recorded, adds nothing.
    Error { code: Option<String>, message: Option<String> },
}

impl RealtimeEvent {
    /// The line this event adds to the transcript, if any: a final segment with text.
    pub fn segment(&self) -> Option<(Track, &str)> {
        match &self.kind {
            RealtimeKind::Content { track: Some(track), is_final: true, text: Some(text) } => Some((*track, text)),
            _ => None,
        }
    }

    pub fn event_name(&self) -> &'static str {
        match self.kind {
            RealtimeKind::Started { .. } => "transcription-started",
            RealtimeKind::Content { .. } => "transcription-content",
            RealtimeKind::Stopped => "transcription-stopped",
            RealtimeKind::Error { .. } => "transcription-error",
        }
    }
}

/// The Intelligence "transcript available" webhook. It carries no text: the
/// worker reads the transcript from Twilio's API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntelligenceEvent {
    pub transcript_sid: String,
    /// Whatever the integrator set when creating the transcript; often the CallSid.
    pub customer_key: Option<String>,
    pub account_sid: Option<String>,
    /// `voice_intelligence_transcript_available`, or a type we record but do not apply.
    pub event_type: Option<String>,
}

pub const TRANSCRIPT_AVAILABLE: &str = "voice_intelligence_transcript_available";

impl IntelligenceEvent {
    /// The call, when `customer_key` is a CallSid (`CA` + 32 hex digits).
    pub fn call_sid(&self) -> Option<&str> {
        self.customer_key.as_deref().filter(|k| is_twilio_sid(k, "CA"))
    }

    pub fn is_transcript_available(&self) -> bool {
        self.event_type.as_deref().is_none_or(|t| t == TRANSCRIPT_AVAILABLE)
    }
}

/// `prefix` followed by 32 hexadecimal digits, as Twilio writes every SID.
pub fn is_twilio_sid(s: &str, prefix: &str) -> bool {
    s.len() == prefix.len() + 32 && s.starts_with(prefix) && s[prefix.len()..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether a transcription callback is a Real-Time one (else `<Record transcribe>`).
pub fn is_realtime(params: &[(String, String)]) -> bool {
    params.iter().any(|(k, v)| k == "TranscriptionEvent" && !v.is_empty())
}

fn get<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

fn required<'a>(p: &'a [(String, String)], name: &str) -> Result<&'a str, FieldError> {
    get(p, name).ok_or_else(|| FieldError::new(name, "is required"))
}

fn sid(p: &[(String, String)], name: &str, prefix: &str) -> Result<String, FieldError> {
    let v = required(p, name)?;
    if is_twilio_sid(v, prefix) {
        Ok(v.to_string())
    } else {
        Err(FieldError::new(name, format!("must be a Twilio SID: {prefix} and 32 hexadecimal digits")))
    }
}

/// Real-Time Transcription writes ISO 8601 (`2024-06-25T18:45:21.454203Z`); the
/// RFC 2822 form of the voice callbacks is read too.
fn timestamp(p: &[(String, String)]) -> Result<Option<DateTime<Utc>>, FieldError> {
    let Some(v) = get(p, "Timestamp") else { return Ok(None) };
    DateTime::parse_from_rfc3339(v)
        .or_else(|_| DateTime::parse_from_rfc2822(v))
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|_| FieldError::new("Timestamp", "must be an ISO 8601 time"))
}

/// A label as written before a line: one line, trimmed, cut to [`MAX_LABEL_CHARS`].
pub fn clean_label(raw: &str) -> Option<String> {
    let one_line: String = raw.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let label: String = one_line.trim().chars().take(MAX_LABEL_CHARS).collect();
    let label = label.trim_end().to_string();
    (!label.is_empty()).then_some(label)
}

/// A segment's text on one line: a transcript is one line per segment.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn parse_realtime(p: &[(String, String)]) -> Result<RealtimeEvent, FieldError> {
    let event = required(p, "TranscriptionEvent")?;
    let sequence_id = required(p, "SequenceId")?
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| FieldError::new("SequenceId", "must be a whole number"))?;
    let kind = match event {
        "transcription-started" => RealtimeKind::Started {
            inbound_label: get(p, "InboundTrackLabel").and_then(clean_label),
            outbound_label: get(p, "OutboundTrackLabel").and_then(clean_label),
        },
        "transcription-content" => content(p)?,
        "transcription-stopped" => RealtimeKind::Stopped,
        "transcription-error" => RealtimeKind::Error {
            code: get(p, "TranscriptionErrorCode").map(|c| c.chars().take(20).collect()),
            message: get(p, "TranscriptionError").map(|m| m.chars().take(500).collect()),
        },
        _ => {
            return Err(FieldError::new(
                "TranscriptionEvent",
                "must be transcription-started, transcription-content, transcription-stopped or transcription-error",
            ));
        }
    };
    Ok(RealtimeEvent {
        call_sid: sid(p, "CallSid", "CA")?,
        session_sid: sid(p, "TranscriptionSid", "GT")?,
        sequence_id,
        timestamp: timestamp(p)?,
        kind,
    })
}

/// `transcription-content`: a partial result (`Final=false`) is read no further
/// than its flag; a final one must say its track and carry its text as JSON.
fn content(p: &[(String, String)]) -> Result<RealtimeKind, FieldError> {
    let is_final = match get(p, "Final") {
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(_) => return Err(FieldError::new("Final", "must be true or false")),
        None => return Err(FieldError::new("Final", "is required")),
    };
    if !is_final {
        return Ok(RealtimeKind::Content { track: get(p, "Track").and_then(Track::parse), is_final, text: None });
    }
    let track = Track::parse(required(p, "Track")?)
        .ok_or_else(|| FieldError::new("Track", "must be inbound_track or outbound_track"))?;
    #[derive(Deserialize)]
    struct Data {
        transcript: Option<String>,
    }
    let data: Data = serde_json::from_str(required(p, "TranscriptionData")?)
        .map_err(|_| FieldError::new("TranscriptionData", "must be a JSON object with a transcript"))?;
    let text = data.transcript.map(|t| one_line(&t)).filter(|t| !t.is_empty());
    Ok(RealtimeKind::Content { track: Some(track), is_final, text })
}

pub fn parse_intelligence(p: &[(String, String)]) -> Result<IntelligenceEvent, FieldError> {
    let account_sid = get(p, "account_sid").map(|_| sid(p, "account_sid", "AC")).transpose()?;
    Ok(IntelligenceEvent {
        transcript_sid: sid(p, "transcript_sid", "GT")?,
        customer_key: get(p, "customer_key").map(|k| k.chars().take(256).collect()),
        account_sid,
        event_type: get(p, "event_type").map(|t| t.chars().take(100).collect()),
    })
}

/// De-duplication keys: a session's events are unique by `SequenceId`; a
/// transcript is announced once (a repeat is the same transcript).
pub fn realtime_key(b: BusinessId, e: &RealtimeEvent) -> String {
    format!("twilio:realtime:{b}:{}:{}", e.session_sid, e.sequence_id)
}

pub fn intelligence_key(b: BusinessId, e: &IntelligenceEvent) -> String {
    format!("twilio:intelligence:{b}:{}", e.transcript_sid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GT: &str = "GT8fbf72a043b98407a3ce68331cd0030a";
    const CA: &str = "CA11111111111111111111111111111111";

    fn params(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
    }

    fn base(event: &str, seq: &str) -> Vec<(String, String)> {
        params(&[
            ("AccountSid", "AC00000000000000000000000000000001"),
            ("CallSid", CA),
            ("TranscriptionSid", GT),
            ("Timestamp", "2024-06-25T18:45:21.454203Z"),
            ("SequenceId", seq),
            ("TranscriptionEvent", event),
        ])
    }

    /// PROTOCOLS 7.1's example body, as Twilio form-encodes it.
    #[test]
    fn parses_the_documented_content_event() {
        let body = "TranscriptionEvent=transcription-content&SequenceId=2&AccountSid=AC00000000000000000000000000000001&CallSid=CA11111111111111111111111111111111&TranscriptionSid=GT8fbf72a043b98407a3ce68331cd0030a&Timestamp=2024-06-25T18%3A45%3A21.454203Z&LanguageCode=en-US&Track=outbound_track&Final=true&TranscriptionData=%7B%22transcript%22%3A%22Hello%2C+this+is+Sam%22%2C%22confidence%22%3A0.9956335%7D";
        let p: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes()).into_owned().collect();
        assert!(is_realtime(&p));
        let e = parse_realtime(&p).unwrap();
        assert_eq!(e.session_sid, GT);
        assert_eq!(e.sequence_id, 2);
        assert_eq!(e.timestamp.unwrap().to_rfc3339(), "2024-06-25T18:45:21.454203+00:00");
        assert_eq!(e.segment(), Some((Track::Outbound, "Hello, this is Sam")));
    }

    #[test]
    fn started_carries_the_labels() {
        let mut p = base("transcription-started", "1");
        p.extend(params(&[("InboundTrackLabel", " Caller\n"), ("OutboundTrackLabel", ""), ("Track", "both_tracks")]));
        let e = parse_realtime(&p).unwrap();
        assert_eq!(e.kind, RealtimeKind::Started { inbound_label: Some("Caller".into()), outbound_label: None });
        assert_eq!(e.segment(), None);
    }

    #[test]
    fn partials_stopped_and_errors_add_nothing() {
        let mut partial = base("transcription-content", "3");
        partial.extend(params(&[
            ("Final", "false"),
            ("Stability", "0.8"),
            ("TranscriptionData", "{\"transcript\":\"Hel\"}"),
        ]));
        let e = parse_realtime(&partial).unwrap();
        assert_eq!(e.segment(), None);
        assert_eq!(parse_realtime(&base("transcription-stopped", "9")).unwrap().kind, RealtimeKind::Stopped);
        let mut error = base("transcription-error", "4");
        error.extend(params(&[("TranscriptionErrorCode", "32651"), ("TranscriptionError", "provider failed")]));
        let e = parse_realtime(&error).unwrap();
        assert_eq!(e.segment(), None);
        assert_eq!(e.event_name(), "transcription-error");
    }

    #[test]
    fn a_final_without_text_adds_nothing() {
        let mut p = base("transcription-content", "5");
        p.extend(params(&[
            ("Final", "true"),
            ("Track", "inbound_track"),
            ("TranscriptionData", "{\"transcript\":\"  \"}"),
        ]));
        assert_eq!(parse_realtime(&p).unwrap().segment(), None);
    }

    #[test]
    fn a_segment_is_one_line() {
        let mut p = base("transcription-content", "5");
        let data = "{\"transcript\":\"Two\\nlines\\r\\nhere\"}";
        p.extend(params(&[("Final", "true"), ("Track", "inbound_track"), ("TranscriptionData", data)]));
        assert_eq!(parse_realtime(&p).unwrap().segment(), Some((Track::Inbound, "Two lines here")));
    }

    #[test]
    fn bad_fields_are_named() {
        let named = |p: &[(String, String)]| parse_realtime(p).unwrap_err().field;
        let mut p = base("transcription-content", "2");
        p.extend(params(&[("Final", "true"), ("Track", "inbound_track"), ("TranscriptionData", "not json")]));
        assert_eq!(named(&p), "TranscriptionData");
        let mut p = base("transcription-content", "2");
        p.extend(params(&[("Final", "true"), ("Track", "both_tracks"), ("TranscriptionData", "{}")]));
        assert_eq!(named(&p), "Track");
        let mut p = base("transcription-content", "2");
        p.extend(params(&[("Final", "maybe")]));
        assert_eq!(named(&p), "Final");
        assert_eq!(named(&base("transcription-paused", "2")), "TranscriptionEvent");
        assert_eq!(named(&base("transcription-stopped", "x")), "SequenceId");
        let mut p = base("transcription-stopped", "2");
        p.retain(|(k, _)| k != "TranscriptionSid");
        p.push(("TranscriptionSid".into(), "TR33333333333333333333333333333333".into()));
        assert_eq!(named(&p), "TranscriptionSid");
        let mut p = base("transcription-stopped", "2");
        p.retain(|(k, _)| k != "Timestamp");
        p.push(("Timestamp".into(), "yesterday".into()));
        assert_eq!(named(&p), "Timestamp");
    }

    #[test]
    fn intelligence_webhook() {
        let p = params(&[
            ("account_sid", "AC00000000000000000000000000000001"),
            ("service_sid", "GA00000000000000000000000000000001"),
            ("transcript_sid", "GT00000000000000000000000000000002"),
            ("customer_key", CA),
            ("event_type", TRANSCRIPT_AVAILABLE),
        ]);
        let e = parse_intelligence(&p).unwrap();
        assert_eq!(e.call_sid(), Some(CA));
        assert!(e.is_transcript_available());
        let other = IntelligenceEvent { customer_key: Some("order-42".into()), ..e.clone() };
        assert_eq!(other.call_sid(), None);
        let p = params(&[("transcript_sid", "GX1")]);
        assert_eq!(parse_intelligence(&p).unwrap_err().field, "transcript_sid");
        assert_eq!(parse_intelligence(&[]).unwrap_err().field, "transcript_sid");
    }

    #[test]
    fn envelopes_round_trip() {
        let mut p = base("transcription-content", "2");
        p.extend(params(&[
            ("Final", "true"),
            ("Track", "inbound_track"),
            ("TranscriptionData", "{\"transcript\":\"Hi\"}"),
        ]));
        let e = parse_realtime(&p).unwrap();
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<RealtimeEvent>(&json).unwrap(), e);
    }
}
