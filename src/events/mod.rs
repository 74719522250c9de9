//! What is carried: the versioned envelope every accepted webhook travels in,
//! from the ingress through RabbitMQ to a worker.
//!
//! The wire form is JSON. `version` lets a worker refuse (dead-letter) a message
//! written by a newer ingress instead of misreading it.

pub mod n8n;
pub mod stripe;
pub mod transcription;
pub mod twilio;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const ENVELOPE_VERSION: u16 = 1;

/// A `businesses.id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BusinessId(pub i32);

impl std::fmt::Display for BusinessId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

pub use crate::providers::{Family, Provider};

/// One accepted webhook, verified and parsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    /// De-duplication key: the same provider event always gets the same key.
    pub key: String,
    pub business_id: Option<BusinessId>,
    pub received_at: DateTime<Utc>,
    /// The ingress request that accepted it, for logs.
    pub request_id: String,
    pub event: Event,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum Event {
    TwilioCallStatus(twilio::CallStatusEvent),
    TwilioRecording(twilio::RecordingEvent),
    TwilioTranscription(twilio::TranscriptionEvent),
    /// A Real-Time Transcription callback (`TranscriptionEvent=...`).
    TwilioRealtime(transcription::RealtimeEvent),
    /// A Conversational Intelligence "transcript available" webhook.
    TwilioIntelligence(transcription::IntelligenceEvent),
    N8nBooking(n8n::BookingEvent),
    StripeSubscription(stripe::SubscriptionEvent),
    StripeCheckoutSession(stripe::CheckoutSessionEvent),
    StripeInvoice(stripe::InvoiceEvent),
    /// A Stripe event type the worker records but does not apply.
    StripeOther(stripe::OtherEvent),
}

impl From<stripe::Parsed> for Event {
    fn from(p: stripe::Parsed) -> Self {
        match p {
            stripe::Parsed::Subscription(e) => Event::StripeSubscription(e),
            stripe::Parsed::CheckoutSession(e) => Event::StripeCheckoutSession(e),
            stripe::Parsed::Invoice(e) => Event::StripeInvoice(e),
            stripe::Parsed::Other(e) => Event::StripeOther(e),
        }
    }
}

/// Every event kind, as [`Event::kind`] names it: the values of the log's
/// `webhook_worker.event_kind` enum, in order (a test holds the two together).
pub const KINDS: [&str; 10] = [
    "twilio_call_status",
    "twilio_recording",
    "twilio_transcription",
    "twilio_realtime_transcription",
    "twilio_intelligence_transcript",
    "n8n_booking",
    "stripe_subscription",
    "stripe_checkout_session",
    "stripe_invoice",
    "stripe_other",
];

impl Event {
    pub fn provider(&self) -> Provider {
        match self {
            Event::TwilioCallStatus(_)
            | Event::TwilioRecording(_)
            | Event::TwilioTranscription(_)
            | Event::TwilioRealtime(_)
            | Event::TwilioIntelligence(_) => Provider::Twilio,
            Event::N8nBooking(_) => Provider::N8n,
            Event::StripeSubscription(_)
            | Event::StripeCheckoutSession(_)
            | Event::StripeInvoice(_)
            | Event::StripeOther(_) => Provider::Stripe,
        }
    }

    /// The family it travels and is applied in: its provider's.
    pub fn family(&self) -> Family {
        self.provider().family()
    }

    /// The name the event log stores (`webhook_worker.inbox.kind`, an enum whose
    /// values are exactly these: a new kind is a migration too).
    pub fn kind(&self) -> &'static str {
        KINDS[match self {
            Event::TwilioCallStatus(_) => 0,
            Event::TwilioRecording(_) => 1,
            Event::TwilioTranscription(_) => 2,
            Event::TwilioRealtime(_) => 3,
            Event::TwilioIntelligence(_) => 4,
            Event::N8nBooking(_) => 5,
            Event::StripeSubscription(_) => 6,
            Event::StripeCheckoutSession(_) => 7,
            Event::StripeInvoice(_) => 8,
            Event::StripeOther(_) => 9,
        }]
    }

    /// The Twilio CallSid the event is about, for logs and spans.
    pub fn call_sid(&self) -> Option<&str> {
        match self {
            Event::TwilioCallStatus(e) => Some(&e.call_sid),
            Event::TwilioRecording(e) => Some(&e.call_sid),
            Event::TwilioTranscription(e) => Some(&e.call_sid),
            Event::TwilioRealtime(e) => Some(&e.call_sid),
            Event::TwilioIntelligence(e) => e.call_sid(),
            _ => None,
        }
    }

    /// Where a worker puts the event in its batch, and so the order it takes row
    /// locks in: by the entity the event is about (a Twilio call, a Stripe
    /// customer), then by a rank and a time within that entity. Every worker
    /// sorts the same way, so two concurrent batches take their locks in one
    /// order. (Billing locks the user a customer resolves to; the rare user with
    /// two customers could still meet a deadlock, which Postgres breaks and the
    /// worker retries with the batch.) For Stripe, a checkout session (which
    /// only records who a customer is) comes first, then the customer's events
    /// oldest first, so a batch that received them out of order applies them in order.
    /// `None` when the event locks no shared row.
    pub fn lock_key(&self) -> (Option<&str>, u8, i64) {
        match self {
            // A transferred leg locks its parent's call.
            Event::TwilioCallStatus(e) => (Some(e.parent_call_sid.as_deref().unwrap_or(&e.call_sid)), 0, 0),
            Event::TwilioRecording(_) | Event::TwilioTranscription(_) | Event::TwilioRealtime(_) => {
                (self.call_sid(), 0, 0)
            }
            // Its call may be known only from its recording: then by the transcript.
            Event::TwilioIntelligence(e) => (Some(e.call_sid().unwrap_or(&e.transcript_sid)), 0, 0),
            Event::N8nBooking(e) => (e.booking.external_id.as_deref(), 0, 0),
            Event::StripeCheckoutSession(e) => {
                let s = &e.object;
                (Some(s.customer.as_deref().unwrap_or(&s.id)), 0, e.created.timestamp())
            }
            Event::StripeSubscription(e) => (Some(&e.object.customer), 1, e.created.timestamp()),
            Event::StripeInvoice(e) => {
                let customer = e.object.customer.as_deref().or(e.object.subscription.as_deref());
                (Some(customer.unwrap_or(&e.object.id)), 1, e.created.timestamp())
            }
            Event::StripeOther(e) => (None, 1, e.created.timestamp()),
        }
    }
}

impl Envelope {
    pub fn new(key: String, business_id: Option<BusinessId>, request_id: String, event: Event) -> Self {
        Envelope { version: ENVELOPE_VERSION, key, business_id, received_at: Utc::now(), request_id, event }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }

    /// Decodes a message body; any error is permanent for that message.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| format!("undecodable envelope: {e}"))?;
        if env.version != ENVELOPE_VERSION {
            return Err(format!("envelope version {} is not {ENVELOPE_VERSION}", env.version));
        }
        Ok(env)
    }
}

/// A field that failed validation, named for the sender (422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct FieldError {
    pub field: String,
    pub rule: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        FieldError { field: field.into(), rule: rule.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        let params: Vec<(String, String)> =
            [("CallSid", "CA1"), ("CallStatus", "ringing"), ("SequenceNumber", "0"), ("From", "+14155552671")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let e = twilio::parse_call_status(&twilio::Params(&params)).unwrap();
        let key = twilio::call_status_key(BusinessId(7), &e);
        Envelope::new(key, Some(BusinessId(7)), "req-1".into(), Event::TwilioCallStatus(e))
    }

    #[test]
    fn an_envelope_survives_the_wire() {
        let env = sample();
        let json = env.to_json();
        assert_eq!(Envelope::from_json(&json).unwrap(), env);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["event"]["kind"], "twilio_call_status");
        assert_eq!(v["key"], "twilio:status:7:CA1:0:ringing");
    }

    #[test]
    fn a_newer_or_broken_envelope_is_refused_with_the_reason() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["version"] = 2.into();
        let err = Envelope::from_json(v.to_string().as_bytes()).unwrap_err();
        assert!(err.contains("version 2"), "{err}");
        assert!(Envelope::from_json(b"{not json").unwrap_err().starts_with("undecodable envelope"));
        v["version"] = 1.into();
        v["event"]["kind"] = "fax_received".into();
        assert!(Envelope::from_json(v.to_string().as_bytes()).is_err());
    }
}
