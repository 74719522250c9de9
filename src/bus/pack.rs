//! Several events in one AMQP message: a *pack*.
//!
//! The broker's cost is per message (a Raft entry, a confirm, a delivery, an
//! ack), not per byte, so under load the ingress publishes the events that
//! arrived while its previous publish was being confirmed as one message, and
//! answers each of their requests once that message is confirmed (group commit;
//! see [`super::durable`]). The worker splits a pack back into its events, each
//! applied, retried or parked on its own; the message is acknowledged once all
//! of them are settled.
//!
//! The body is a JSON array of the events' envelopes, each exactly the bytes
//! it would have been sent as alone, so splitting re-encodes nothing and an
//! event retried or parked alone leaves as the message it would always have
//! been. A single envelope is a JSON object, so the first byte tells the two
//! apart, whoever published (the ingress, the outbox relay, a redrive).
//! Each event's W3C `traceparent` rides in the [`TRACEPARENTS_HEADER`] array,
//! in the same order ("" for none).

use serde_json::value::RawValue;

/// Header carrying each packed event's `traceparent`, in pack order.
pub const TRACEPARENTS_HEADER: &str = "x-traceparents";
/// The `type` property of a pack (a single event's is its kind).
pub const PACK_KIND: &str = "pack";

/// The body of a pack of these envelopes (each a JSON object).
pub fn encode<'a>(bodies: impl ExactSizeIterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let len = bodies.clone().map(<[u8]>::len).sum::<usize>() + bodies.len() + 1;
    let mut out = Vec::with_capacity(len);
    out.push(b'[');
    for (i, body) in bodies.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(body);
    }
    out.push(b']');
    out
}

/// Whether a message body is a pack (a JSON array) rather than one envelope.
pub fn is_pack(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

/// The events of a pack, each as its own bytes; why not if the body is not a JSON array.
pub fn split(body: &[u8]) -> Result<Vec<&str>, String> {
    let parts: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| format!("undecodable pack: {e}"))?;
    if parts.is_empty() {
        return Err("an empty pack".into());
    }
    Ok(parts.into_iter().map(RawValue::get).collect())
}

#[cfg(test)]
mod tests {
    use super::{encode, is_pack, split};

    #[test]
    fn a_pack_splits_into_the_exact_bytes_that_went_in() {
        let bodies: [&[u8]; 3] = [br#"{"a":1}"#, br#"{"b":"x,]"}"#, br#"{"c":[1,2]}"#];
        let pack = encode(bodies.iter().copied());
        assert!(is_pack(&pack));
        assert!(!is_pack(bodies[0]));
        let parts = split(&pack).unwrap();
        assert_eq!(parts.iter().map(|p| p.as_bytes()).collect::<Vec<_>>(), bodies);
    }

    #[test]
    fn a_broken_or_empty_pack_is_refused_with_the_reason() {
        assert!(split(b"[{\"a\":1},").unwrap_err().starts_with("undecodable pack"));
        assert_eq!(split(b"[]").unwrap_err(), "an empty pack");
        assert!(split(b"{\"a\":1}").is_err(), "an object is not a pack");
    }
}
