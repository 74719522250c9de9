//! How an accepted event is kept in `webhook_worker.inbox`: a fixed-width key
//! and the envelope, compressed, once (see docs/adr/0010-bounded-inbox.md).
//!
//! - The de-duplication key is stored as the first 15 bytes of its SHA-256
//!   ([`key_hash`]), 16 bytes on disk instead of ~65 of text, and an index of
//!   fixed-width entries (15, not 16: with its length byte a key then fills an
//!   index entry to exactly 24 bytes instead of padding it to 32). The key itself is inside the envelope, for replay.
//!   SQL computes the same with `webhook_worker.event_key_hash(text)`.
//! - The envelope is stored once (its key and `received_at` only there), less
//!   the ingress's `request_id` (for that request's logs only), compressed with zstd
//!   and a dictionary built into the binary (`envelope-dict-2.txt`: one
//!   envelope of each kind, with SIDs as random as Twilio's), which takes a
//!   ~470-byte Twilio envelope to ~130-175 bytes. Its first byte names the
//!   format: rows keep the dictionary they were written with until they age
//!   out, so every dictionary ever written stays readable. **Never edit an
//!   `envelope-dict-N.txt`**: add the next one (dictionary 2 is dictionary 1
//!   plus the kinds that came after it: Real-Time Transcription, Intelligence,
//!   n8n bookings and `<Dial>` legs; it took their envelopes from ~228 to ~174
//!   bytes).

use std::sync::LazyLock;

use sha2::{Digest, Sha256};
use zstd::bulk::{Compressor, Decompressor};
use zstd::dict::{DecoderDictionary, EncoderDictionary};

/// Byte 0 of a stored envelope: JSON as is (rows copied from the old inbox).
pub const FORMAT_JSON: u8 = 0;
/// Byte 0 of a stored envelope: zstd with dictionary 1 (written until dictionary 2 came).
pub const FORMAT_ZSTD_DICT1: u8 = 1;
/// Byte 0 of a stored envelope: zstd with dictionary 2 (what the worker writes).
pub const FORMAT_ZSTD_DICT2: u8 = 2;

/// zstd's level: 3 is its default; higher levels save a few bytes for much more CPU.
const LEVEL: i32 = 3;
/// The most a stored envelope may inflate to (the ingress takes at most 1 MiB bodies).
const MAX_ENVELOPE: usize = 8 << 20;

/// 120 bits: a chance collision needs ~2^60 keys; a made one, a SHA-256 second preimage.
pub const KEY_HASH_BYTES: usize = 15;

static DICT1: &[u8] = include_bytes!("envelope-dict-1.txt");
static DICT2: &[u8] = include_bytes!("envelope-dict-2.txt");
static ENCODER2: LazyLock<EncoderDictionary<'static>> = LazyLock::new(|| EncoderDictionary::copy(DICT2, LEVEL));
static DECODER1: LazyLock<DecoderDictionary<'static>> = LazyLock::new(|| DecoderDictionary::copy(DICT1));
static DECODER2: LazyLock<DecoderDictionary<'static>> = LazyLock::new(|| DecoderDictionary::copy(DICT2));

/// The inbox's key for a de-duplication key: the first 15 bytes of its SHA-256.
pub fn key_hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes())[..KEY_HASH_BYTES].to_vec()
}

/// Compresses envelopes for the inbox; one per batch (it holds zstd's context).
pub struct EnvelopePacker {
    zstd: Compressor<'static>,
}

impl EnvelopePacker {
    pub fn new() -> std::io::Result<Self> {
        Ok(EnvelopePacker { zstd: Compressor::with_prepared_dictionary(&ENCODER2)? })
    }

    /// The stored form of an envelope as received (its JSON bytes).
    pub fn pack(&mut self, json: &[u8]) -> Vec<u8> {
        match self.zstd.compress(json) {
            Ok(z) if z.len() < json.len() => [&[FORMAT_ZSTD_DICT2][..], &z].concat(),
            // zstd cannot fail on a buffer it sized itself; storing as is stays correct.
            _ => [&[FORMAT_JSON][..], json].concat(),
        }
    }
}

/// The envelope's JSON bytes from their stored form.
pub fn unpack(stored: &[u8]) -> Result<Vec<u8>, String> {
    match stored.split_first() {
        Some((&FORMAT_JSON, json)) => Ok(json.to_vec()),
        Some((&FORMAT_ZSTD_DICT1, z)) => inflate(z, &DECODER1),
        Some((&FORMAT_ZSTD_DICT2, z)) => inflate(z, &DECODER2),
        Some((other, _)) => Err(format!("stored envelope: unknown format {other}")),
        None => Err("stored envelope: empty".into()),
    }
}

fn inflate(z: &[u8], dict: &DecoderDictionary<'static>) -> Result<Vec<u8>, String> {
    let size = Decompressor::upper_bound(z).ok_or("stored envelope: no zstd frame size")?;
    if size > MAX_ENVELOPE {
        return Err(format!("stored envelope: {size} bytes is more than an envelope can be"));
    }
    Decompressor::with_prepared_dictionary(dict)
        .and_then(|mut d| d.decompress(z, size))
        .map_err(|e| format!("stored envelope: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const CALL: &str = r#"{"version":1,"key":"twilio:status:17:CA5f3c1d9e8b7a6f5e4d3c2b1a09f8e7d6:2:in-progress","business_id":17,"received_at":"2026-12-01T08:31:07.412873921Z","request_id":"7d1c5b0e-93a4-4e8f-b6d2-1f0a9c8e7b65","event":{"kind":"twilio_call_status","data":{"call_sid":"CA5f3c1d9e8b7a6f5e4d3c2b1a09f8e7d6","parent_call_sid":null,"status":"in-progress","sequence":2,"timestamp":"2026-12-01T08:31:05Z","direction":"inbound","from":"+14155550123","to":"+15005550006","caller_name":"ALICE SMITH","call_duration":null}}}"#;

    #[test]
    fn an_envelope_comes_back_byte_for_byte_and_less_than_half_as_big() {
        let mut p = EnvelopePacker::new().unwrap();
        let stored = p.pack(CALL.as_bytes());
        assert_eq!(stored[0], FORMAT_ZSTD_DICT2);
        assert!(stored.len() * 5 < CALL.len() * 2, "{} of {} bytes", stored.len(), CALL.len());
        assert_eq!(unpack(&stored).unwrap(), CALL.as_bytes());
    }

    /// A Real-Time segment with fresh SIDs and text the dictionary has never seen.
    const SEGMENT: &str = r#"{"version":1,"key":"twilio:realtime:42:GTa71c09e4f2b85d3a6e1f7c0b9d4e2a58:7","business_id":42,"received_at":"2026-12-02T09:14:55.208417336Z","request_id":"","event":{"kind":"twilio_realtime","data":{"call_sid":"CAd04b7e91c3f5a2869e0b1d7c4f3a5e92","session_sid":"GTa71c09e4f2b85d3a6e1f7c0b9d4e2a58","sequence_id":7,"timestamp":"2026-12-02T09:14:54.981Z","kind":{"event":"content","track":"inbound","is_final":true,"text":"Could someone look at the boiler before the weekend?"}}}}"#;

    #[test]
    fn dictionary_2_knows_the_kinds_that_came_after_dictionary_1() {
        let mut old = Compressor::with_dictionary(LEVEL, DICT1).unwrap();
        let with_1 = old.compress(SEGMENT.as_bytes()).unwrap().len();
        let stored = EnvelopePacker::new().unwrap().pack(SEGMENT.as_bytes());
        assert!(
            stored.len() + 30 < with_1 + 1,
            "dictionary 2: {} bytes, dictionary 1: {} bytes",
            stored.len(),
            with_1 + 1
        );
        assert_eq!(unpack(&stored).unwrap(), SEGMENT.as_bytes());
    }

    #[test]
    fn rows_written_with_dictionary_1_still_come_back() {
        let z = Compressor::with_dictionary(LEVEL, DICT1).unwrap().compress(CALL.as_bytes()).unwrap();
        let stored = [&[FORMAT_ZSTD_DICT1][..], &z].concat();
        assert_eq!(unpack(&stored).unwrap(), CALL.as_bytes());
        // The same bytes read with the other dictionary are not the envelope.
        let mut wrong = stored.clone();
        wrong[0] = FORMAT_ZSTD_DICT2;
        assert_ne!(unpack(&wrong).ok().as_deref(), Some(CALL.as_bytes()));
    }

    #[test]
    fn what_does_not_shrink_is_kept_as_is() {
        let mut p = EnvelopePacker::new().unwrap();
        let stored = p.pack(b"{}");
        assert_eq!(stored, b"\x00{}");
        assert_eq!(unpack(&stored).unwrap(), b"{}");
    }

    #[test]
    fn a_damaged_or_unknown_stored_envelope_is_an_error_not_a_panic() {
        assert!(unpack(b"").unwrap_err().contains("empty"));
        assert!(unpack(b"\x07abc").unwrap_err().contains("unknown format 7"));
        assert!(unpack(b"\x01not zstd").is_err());
        assert!(unpack(b"\x02not zstd").is_err());
        let mut stored = EnvelopePacker::new().unwrap().pack(CALL.as_bytes());
        let n = stored.len();
        stored[n / 2] ^= 0xff;
        // zstd's checksum-free frame may decode to other bytes, but never panics or overruns.
        let _ = unpack(&stored);
    }

    #[test]
    fn the_key_hash_is_sha256_cut_to_15_bytes() {
        // SELECT webhook_worker.event_key_hash('stripe:evt_1') gives the same
        // (checked against Postgres in tests/retention.rs).
        assert_eq!(hex::encode(key_hash("stripe:evt_1")), "086cb4b9c326916d9ad59cdb4bb87d");
    }
}
