//! Twilio voice callbacks, parsed from their (already verified) parameters.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{BusinessId, FieldError};

/// Twilio's `CallStatus` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallStatus {
    Queued,
    Initiated,
    Ringing,
    InProgress,
    Completed,
    Busy,
    NoAnswer,
    Failed,
    Canceled,
}

impl CallStatus {
    fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "queued" => Self::Queued,
            "initiated" => Self::Initiated,
            "ringing" => Self::Ringing,
            "in-progress" | "answered" => Self::InProgress,
            "completed" => Self::Completed,
            "busy" => Self::Busy,
            "no-answer" => Self::NoAnswer,
            "failed" => Self::Failed,
            "canceled" | "cancelled" => Self::Canceled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Initiated => "initiated",
            Self::Ringing => "ringing",
            Self::InProgress => "in-progress",
            Self::Completed => "completed",
            Self::Busy => "busy",
            Self::NoAnswer => "no-answer",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    /// A final status ends the call; nothing after it may move the call back.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Busy | Self::NoAnswer | Self::Failed | Self::Canceled)
    }

    /// The `call_status` enum value of `public.calls` (CONTRACT section 4).
    pub fn db_status(self) -> &'static str {
        match self {
            Self::Queued | Self::Initiated | Self::Ringing | Self::InProgress => "in-progress",
            Self::Completed => "completed",
            Self::Busy | Self::NoAnswer | Self::Failed | Self::Canceled => "missed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallStatusEvent {
    pub call_sid: String,
    pub parent_call_sid: Option<String>,
    pub status: CallStatus,
    pub sequence: Option<i64>,
    /// Twilio's `Timestamp` (RFC 2822), when sent.
    pub timestamp: Option<DateTime<Utc>>,
    pub direction: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub caller_name: Option<String>,
    /// `CallDuration`, seconds, on final events.
    pub call_duration: Option<i64>,
}

impl CallStatusEvent {
    /// The caller's number: `From` on inbound calls, `To` on outbound ones.
    pub fn caller_number(&self) -> Option<&str> {
        let outbound = self.direction.as_deref().is_some_and(|d| d.starts_with("outbound"));
        if outbound { self.to.as_deref() } else { self.from.as_deref() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordingEvent {
    pub call_sid: String,
    pub recording_sid: String,
    pub status: String,
    pub url: Option<String>,
    pub start_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptionEvent {
    pub call_sid: String,
    pub transcription_sid: String,
    pub status: String,
    pub text: Option<String>,
}

/// Form parameters of one callback, looked up by name.
pub struct Params<'a>(pub &'a [(String, String)]);

impl Params<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
    }

    fn required(&self, name: &str) -> Result<&str, FieldError> {
        self.get(name).ok_or_else(|| FieldError::new(name, "is required"))
    }

    fn sid(&self, name: &str, prefix: &str) -> Result<String, FieldError> {
        let v = self.required(name)?;
        self.check_sid(name, v, prefix)
    }

    fn check_sid(&self, name: &str, v: &str, prefix: &str) -> Result<String, FieldError> {
        let ok = v.starts_with(prefix) && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric());
        if ok {
            Ok(v.to_string())
        } else {
            Err(FieldError::new(name, format!("must be a Twilio SID starting with {prefix}")))
        }
    }

    fn integer(&self, name: &str) -> Result<Option<i64>, FieldError> {
        self.get(name)
            .map(|v| {
                v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| FieldError::new(name, "must be a whole number"))
            })
            .transpose()
    }

    fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, FieldError> {
        self.get(name)
            .map(|v| {
                DateTime::parse_from_rfc2822(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| FieldError::new(name, "must be an RFC 2822 date"))
            })
            .transpose()
    }

    fn text(&self, name: &str) -> Option<String> {
        self.get(name).map(str::to_string)
    }
}

pub fn parse_call_status(p: &Params) -> Result<CallStatusEvent, FieldError> {
    let raw_status = p.required("CallStatus")?;
    let status = CallStatus::parse(raw_status)
        .ok_or_else(|| FieldError::new("CallStatus", "must be one of Twilio's call statuses"))?;
    let parent_call_sid = p.get("ParentCallSid").map(|v| p.check_sid("ParentCallSid", v, "CA")).transpose()?;
    Ok(CallStatusEvent {
        call_sid: p.sid("CallSid", "CA")?,
        parent_call_sid,
        status,
        sequence: p.integer("SequenceNumber")?,
        timestamp: p.time("Timestamp")?,
        direction: p.text("Direction"),
        from: p.text("From"),
        to: p.text("To"),
        caller_name: p.text("CallerName"),
        call_duration: p.integer("CallDuration")?,
    })
}

pub fn parse_recording(p: &Params) -> Result<RecordingEvent, FieldError> {
    Ok(RecordingEvent {
        call_sid: p.sid("CallSid", "CA")?,
        recording_sid: p.sid("RecordingSid", "RE")?,
        status: p.required("RecordingStatus")?.to_string(),
        url: p.text("RecordingUrl"),
        start_time: p.time("RecordingStartTime")?,
    })
}

pub fn parse_transcription(p: &Params) -> Result<TranscriptionEvent, FieldError> {
    Ok(TranscriptionEvent {
        call_sid: p.sid("CallSid", "CA")?,
        transcription_sid: p.sid("TranscriptionSid", "TR")?,
        status: p.required("TranscriptionStatus")?.to_string(),
        text: p.text("TranscriptionText"),
    })
}

/// De-duplication keys: one per distinct Twilio callback, scoped by business.
pub fn call_status_key(b: BusinessId, e: &CallStatusEvent) -> String {
    let seq = e.sequence.map_or_else(|| "-".to_string(), |s| s.to_string());
    format!("twilio:status:{b}:{}:{seq}:{}", e.call_sid, e.status.as_str())
}

pub fn recording_key(b: BusinessId, e: &RecordingEvent) -> String {
    format!("twilio:recording:{b}:{}:{}", e.recording_sid, e.status)
}

pub fn transcription_key(b: BusinessId, e: &TranscriptionEvent) -> String {
    format!("twilio:transcription:{b}:{}:{}", e.transcription_sid, e.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(body: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(body.as_bytes()).into_owned().collect()
    }

    const T1: &str = "AccountSid=AC00000000000000000000000000000001&ApiVersion=2010-04-01&CallSid=CA11111111111111111111111111111111&CallStatus=completed&CallDuration=42&Duration=1&Called=%2B15005550006&Caller=%2B14155552671&From=%2B14155552671&To=%2B15005550006&Direction=outbound-api&Timestamp=Tue%2C+25+Nov+2025+12%3A00%3A05+%2B0000&CallbackSource=call-progress-events&SequenceNumber=3&SipResponseCode=200";

    #[test]
    fn parses_twilio_completed_callback() {
        let p = params(T1);
        let e = parse_call_status(&Params(&p)).unwrap();
        assert_eq!(e.status, CallStatus::Completed);
        assert_eq!(e.sequence, Some(3));
        assert_eq!(e.call_duration, Some(42));
        assert_eq!(e.timestamp.unwrap().to_rfc3339(), "2025-11-25T12:00:05+00:00");
        // Outbound: the other party is `To`.
        assert_eq!(e.caller_number(), Some("+15005550006"));
    }

    #[test]
    fn status_mapping_follows_the_contract() {
        let cases = [
            ("queued", "in-progress"),
            ("initiated", "in-progress"),
            ("ringing", "in-progress"),
            ("in-progress", "in-progress"),
            ("completed", "completed"),
            ("busy", "missed"),
            ("no-answer", "missed"),
            ("failed", "missed"),
            ("canceled", "missed"),
        ];
        for (raw, db) in cases {
            assert_eq!(CallStatus::parse(raw).unwrap().db_status(), db, "{raw}");
        }
    }

    #[test]
    fn missing_or_bad_fields_are_named() {
        let p = params("CallStatus=ringing");
        assert_eq!(parse_call_status(&Params(&p)).unwrap_err().field, "CallSid");
        let p = params("CallSid=CA1&CallStatus=dancing");
        assert_eq!(parse_call_status(&Params(&p)).unwrap_err().field, "CallStatus");
        let p = params("CallSid=CA1&CallStatus=ringing&SequenceNumber=x");
        assert_eq!(parse_call_status(&Params(&p)).unwrap_err().field, "SequenceNumber");
        let p = params("CallSid=CA1&CallStatus=ringing&Timestamp=yesterday");
        assert_eq!(parse_call_status(&Params(&p)).unwrap_err().field, "Timestamp");
        let p = params("CallSid=CA1&RecordingStatus=completed");
        assert_eq!(parse_recording(&Params(&p)).unwrap_err().field, "RecordingSid");
    }
}
