//! The kinds of notice, and what travels on the notices queue.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    CallEnded,
    TranscriptReady,
    BookingOutsideHours,
}

impl NoticeKind {
    pub const ALL: [NoticeKind; 3] =
        [NoticeKind::CallEnded, NoticeKind::TranscriptReady, NoticeKind::BookingOutsideHours];

    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::CallEnded => "call.ended",
            NoticeKind::TranscriptReady => "call.transcript_ready",
            NoticeKind::BookingOutsideHours => "booking.outside_hours",
        }
    }

    pub fn parse(s: &str) -> Option<NoticeKind> {
        NoticeKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The Standard Webhooks `webhook-id` of a notice: stable across its tries,
/// different between notices, and without `.` (the signed content is split on it).
pub fn webhook_id(id: Uuid) -> String {
    format!("msg_{}", id.simple())
}

/// The message on `{p}.notices`: only the notice's id. Everything else (body,
/// receiver, tries so far) is read from `webhook_worker.notices` at delivery,
/// so a redelivered or duplicated message can never send a stale copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeMessage {
    pub v: u8,
    pub notice_id: Uuid,
    /// Set on the copy parked in `{p}.notices.dead`: when an operator redrives
    /// it (`micro8gents dlq redrive`), the notice is opened again for a fresh
    /// round of tries.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parked: bool,
}

impl NoticeMessage {
    pub const VERSION: u8 = 1;

    pub fn new(notice_id: Uuid) -> Self {
        NoticeMessage { v: Self::VERSION, notice_id, parked: false }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Why a message cannot be used, for the dead-letter reason.
    pub fn decode(body: &[u8]) -> Result<NoticeMessage, String> {
        let m: NoticeMessage = serde_json::from_slice(body).map_err(|e| format!("undecodable notice message: {e}"))?;
        if m.v != Self::VERSION {
            return Err(format!("notice message version {} is not {}", m.v, Self::VERSION));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_ones_are_refused() {
        for k in NoticeKind::ALL {
            assert_eq!(NoticeKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(NoticeKind::parse("call.started"), None);
    }

    #[test]
    fn webhook_ids_have_no_dots_and_are_stable() {
        let id = Uuid::parse_str("67e55044-10b1-426f-9247-bb680e5fe0c8").unwrap();
        assert_eq!(webhook_id(id), "msg_67e5504410b1426f9247bb680e5fe0c8");
        assert_eq!(webhook_id(id), webhook_id(id));
    }

    #[test]
    fn messages_decode_or_say_why_not() {
        let m = NoticeMessage::new(Uuid::nil());
        let body = serde_json::to_vec(&m).unwrap();
        assert_eq!(NoticeMessage::decode(&body), Ok(m));
        assert!(NoticeMessage::decode(b"nope").unwrap_err().starts_with("undecodable notice message"));
        let v2 = br#"{"v":2,"notice_id":"00000000-0000-0000-0000-000000000000"}"#;
        assert_eq!(NoticeMessage::decode(v2).unwrap_err(), "notice message version 2 is not 1");
    }
}
