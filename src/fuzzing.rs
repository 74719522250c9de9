//! The entry points of the fuzz targets (`fuzz/`), one per parser or verifier that
//! reads what a stranger sends. The same functions run the committed corpus as a
//! regression test on stable (`tests/fuzz_corpus.rs`), so a crash found once stays fixed.
//!
//! Each takes raw bytes, splits them into fields at NUL bytes where it needs several
//! inputs, must never panic, and asserts the invariant that makes the code worth
//! having (a signature it computed verifies; what it prints, it reads back).

use crate::config::{fmt_duration, parse_duration};
use crate::events::twilio::{self as twilio_events, Params};
use crate::events::{Envelope, n8n, stripe as stripe_events};
use crate::ingress::json_object_of as json_object;
use crate::ingress::twilio::json_params;
use crate::trace::TraceParent;
use crate::verify::{standard_webhooks, stripe, twilio};

/// A target: its name (the binary's, the corpus folder's) and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target by name: the fuzz binaries and the corpus test both read this list.
pub const TARGETS: &[Target] = &[
    ("twilio_signature", twilio_signature),
    ("twilio_settings", twilio_settings),
    ("twilio_payload", twilio_payload),
    ("stripe_signature", stripe_signature),
    ("stripe_payload", stripe_payload),
    ("standard_webhooks", standard_webhooks),
    ("n8n_payload", n8n_payload),
    ("envelope", envelope),
    ("traceparent", traceparent),
    ("duration", duration),
];

/// `N` fields split at NUL bytes; missing ones are empty, extra NULs stay in the last.
fn fields<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut out = [&data[..0]; N];
    let mut rest = data;
    for (i, slot) in out.iter_mut().enumerate() {
        if i + 1 == N {
            *slot = rest;
            break;
        }
        match rest.iter().position(|b| *b == 0) {
            Some(at) => {
                *slot = &rest[..at];
                rest = &rest[at + 1..];
            }
            None => {
                *slot = rest;
                rest = &rest[rest.len()..];
            }
        }
    }
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn number(bytes: &[u8]) -> i64 {
    std::str::from_utf8(bytes).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// `key \0 url \0 form-or-JSON body \0 X-Twilio-Signature \0 settings header`.
pub fn twilio_signature(data: &[u8]) {
    let [key, url, body, signature, settings] = fields(data);
    let (key, url, signature) = (text(key), text(url), text(signature));
    let settings = (!settings.is_empty()).then(|| text(settings));
    let alg = twilio::algorithm_from_settings(settings.as_deref()).unwrap_or(twilio::Algorithm::HmacSha1);
    let candidates = twilio::url_candidates(&url);
    assert!(candidates.first() == Some(&url) && candidates.len() <= 2, "{url:?} -> {candidates:?}");
    if let Ok(params) = twilio::parse_form(body) {
        let _ = twilio::verify_form(&[&key], &url, &params, Some(&signature), alg);
        let good = twilio::compute_signature(&key, &url, &params, alg);
        assert_eq!(twilio::verify_form(&[&key], &url, &params, Some(&good), alg), Ok(()));
    }
    let _ = twilio::verify_json(&[&key], &url, body, Some(&signature), alg);
}

/// An `X-Twilio-Webhooks-Signature-Settings` value.
pub fn twilio_settings(data: &[u8]) {
    let _ = twilio::algorithm_from_settings(Some(&text(data)));
}

/// A Twilio callback body, read as a form and as the JSON variant, through each callback's parser.
pub fn twilio_payload(data: &[u8]) {
    if let Ok(pairs) = twilio::parse_form(data) {
        assert!(pairs.len() <= twilio::MAX_FORM_PARAMS);
        twilio_params(&pairs);
    }
    if let Ok(object) = json_object(data) {
        twilio_params(&json_params(object));
    }
}

fn twilio_params(pairs: &[(String, String)]) {
    let p = Params(pairs);
    let _ = twilio_events::parse_call_status(&p);
    let _ = twilio_events::parse_recording(&p);
    let _ = twilio_events::parse_transcription(&p);
}

/// `secret \0 Stripe-Signature \0 body \0 now`.
pub fn stripe_signature(data: &[u8]) {
    let [secret, header, body, now] = fields(data);
    let (secret, header, now) = (text(secret), text(header), number(now));
    let _ = stripe::verify(&[&secret], Some(&header), body, now, stripe::DEFAULT_TOLERANCE_SECS);
    let good = stripe::sign_header(&secret, now, body);
    assert_eq!(stripe::verify(&[&secret], Some(&good), body, now, stripe::DEFAULT_TOLERANCE_SECS), Ok(now));
}

/// A Stripe event body.
pub fn stripe_payload(data: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = stripe_events::parse(&value);
    }
}

/// `secret \0 webhook-id \0 webhook-timestamp \0 webhook-signature \0 body \0 now`.
pub fn standard_webhooks(data: &[u8]) {
    let [secret, id, timestamp, signature, body, now] = fields(data);
    let (id, timestamp, signature, now) = (text(id), text(timestamp), text(signature), number(now));
    let _ = standard_webhooks::v1_tags(&signature);
    let Ok(secret) = standard_webhooks::Secret::parse(&text(secret)) else { return };
    let secrets = [secret];
    let _ = standard_webhooks::verify(&secrets, Some(&id), Some(&timestamp), Some(&signature), body, now);
    let good = standard_webhooks::sign(&secrets[0], &id, now, body);
    let now_text = now.to_string();
    assert_eq!(standard_webhooks::verify(&secrets, Some(&id), Some(&now_text), Some(&good), body, now), Ok(()));
}

/// An n8n booking body, and a `webhook-id`.
pub fn n8n_payload(data: &[u8]) {
    let _ = n8n::WebhookId::parse(&text(data));
    if let Ok(object) = json_object(data) {
        let _ = n8n::parse_booking(&object);
    }
}

/// An AMQP message body: what decodes re-encodes to something that decodes.
pub fn envelope(data: &[u8]) {
    if let Ok(env) = Envelope::from_json(data) {
        assert!(Envelope::from_json(&env.to_json()).is_ok());
    }
}

/// A `traceparent` header: what parses prints back to itself.
pub fn traceparent(data: &[u8]) {
    if let Some(parent) = TraceParent::parse(&text(data)) {
        assert_eq!(TraceParent::parse(&parent.header()), Some(parent));
    }
}

/// A duration setting: what parses prints back to the same duration.
pub fn duration(data: &[u8]) {
    if let Ok(d) = parse_duration(&text(data)) {
        assert_eq!(parse_duration(&fmt_duration(d)), Ok(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_at_nul_and_pad_with_empties() {
        assert_eq!(fields::<3>(b"a\0b\0c\0d"), [&b"a"[..], b"b", b"c\0d"]);
        assert_eq!(fields::<3>(b"a"), [&b"a"[..], b"", b""]);
        assert_eq!(fields::<1>(b"a\0b"), [&b"a\0b"[..]]);
    }
}
