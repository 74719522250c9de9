//! Standard Webhooks (`webhook-id` / `webhook-timestamp` / `webhook-signature`), as sent by
//! our n8n flows; matches the reference libraries (PROTOCOLS.md §5).

use std::fmt;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use hmac::Hmac;
use sha2::Sha256;

use subtle::ConstantTimeEq;

use super::{VerifyError, mac_bytes};

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";
pub const TOLERANCE_SECS: i64 = 300;

const SECRET_PREFIX: &str = "whsec_";
const VERSION: &str = "v1";

/// Secrets are operator config, so decode them as leniently as the reference libraries
/// (padding optional, stray trailing bits tolerated); signatures stay strict.
const SECRET_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// A Standard Webhooks secret: `whsec_` + base64 (padding optional), key = decoded bytes. Debug must NOT print the key.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

/// Why a configured secret could not be used. Never echoes the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the webhook secret is empty")]
    Empty,
    #[error("the webhook secret is not valid base64")]
    InvalidBase64,
}

impl Secret {
    /// Accepts `whsec_<base64>` or bare base64, as the reference libraries do.
    pub fn parse(s: &str) -> Result<Secret, SecretError> {
        let encoded = s.strip_prefix(SECRET_PREFIX).unwrap_or(s);
        if encoded.is_empty() {
            return Err(SecretError::Empty);
        }
        let key = SECRET_ENGINE.decode(encoded).map_err(|_| SecretError::InvalidBase64)?;
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Secret(key))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The longest `webhook-signature` header read. A sender signs with one secret, two
/// during a rotation; each `v1` entry is 47 bytes, so this leaves ample room while
/// keeping the cost of reading a hostile header small.
pub const MAX_SIGNATURE_HEADER_BYTES: usize = 2048;
/// The most `v1` tags looked at in one header (more is refused as malformed).
pub const MAX_TAGS: usize = 16;
/// An HMAC-SHA256 tag's length; a `v1` entry of any other length can never match.
const TAG_LEN: usize = 32;

/// Verifies id/timestamp/signature headers (space-separated `v1,<b64>` list; other versions skipped) against every secret,
/// with ±tolerance on the timestamp. A missing header -> MissingHeader(name); non-integer timestamp -> MalformedHeader.
///
/// Refusing costs little whatever the request carries: the timestamp is checked before
/// any MAC, the header's size and its number of tags are capped, a header without one
/// well-formed `v1` tag is malformed (so callers know a fresh secret can't help), and
/// each secret's MAC is computed once and compared with every tag.
pub fn verify(
    secrets: &[Secret],
    id: Option<&str>,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    let id = id.ok_or(VerifyError::MissingHeader(ID_HEADER))?;
    let timestamp = timestamp.ok_or(VerifyError::MissingHeader(TIMESTAMP_HEADER))?;
    let signature = signature.ok_or(VerifyError::MissingHeader(SIGNATURE_HEADER))?;
    let ts: i64 = timestamp.parse().map_err(|_| VerifyError::MalformedHeader(TIMESTAMP_HEADER))?;
    if now.abs_diff(ts) > TOLERANCE_SECS.unsigned_abs() {
        return Err(VerifyError::TimestampOutOfTolerance(TOLERANCE_SECS));
    }
    let tags = v1_tags(signature)?;
    let ts_text = ts.to_string();
    let content: [&[u8]; 5] = [id.as_bytes(), b".", ts_text.as_bytes(), b".", body];
    let matched = secrets.iter().any(|secret| {
        let expected = mac_bytes::<Hmac<Sha256>>(&secret.0, &content);
        tags.iter().fold(false, |hit, tag| hit | bool::from(expected.as_slice().ct_eq(tag)))
    });
    if matched { Ok(()) } else { Err(VerifyError::Mismatch) }
}

/// `v1,<base64>` for tests and tools.
pub fn sign(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let content: [&[u8]; 5] = [id.as_bytes(), b".", ts.as_bytes(), b".", body];
    let tag = mac_bytes::<Hmac<Sha256>>(&secret.0, &content);
    format!("{VERSION},{}", STANDARD.encode(tag))
}

/// The well-formed `v1` tags: canonical base64 of exactly 32 bytes. Entries of other
/// versions, or that could never match, are skipped; strict decoding keeps "decode then
/// compare" equivalent to the reference libraries' string comparison. A header that is
/// too long, holds too many tags or none that is well-formed is malformed.
pub fn v1_tags(header: &str) -> Result<Vec<[u8; TAG_LEN]>, VerifyError> {
    let malformed = VerifyError::MalformedHeader(SIGNATURE_HEADER);
    if header.len() > MAX_SIGNATURE_HEADER_BYTES {
        return Err(malformed);
    }
    let mut tags = Vec::new();
    for (version, sig) in header.split(' ').filter_map(|entry| entry.split_once(',')) {
        // A base64 text of a 32-byte tag is 44 characters; anything else is skipped unread.
        // The buffer is a little larger than the tag because the decoder sizes by estimate.
        let mut decoded = [0u8; TAG_LEN + 4];
        if version != VERSION || sig.len() != 44 || STANDARD.decode_slice(sig, &mut decoded) != Ok(TAG_LEN) {
            continue;
        }
        if tags.len() == MAX_TAGS {
            return Err(malformed);
        }
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&decoded[..TAG_LEN]);
        tags.push(tag);
    }
    if tags.is_empty() { Err(malformed) } else { Ok(tags) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::test_support::{byte_flips, str_flips};

    // ---- §5.2 official vectors --------------------------------------------------------------

    const OFF_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const OFF_KEY_HEX: &str = "31f290f6bf06298aab4f08d43c3f082cf648a362da2da4b0";
    const OFF_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const OFF_TS: i64 = 1_614_265_330;
    const OFF_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const OFF_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    const RUST_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const RUST_KEY_HEX: &str = "0b6155b0140886bb1c0a195020c57e6f9b1262ca686fba03";
    const RUST_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const RUST_TS: i64 = 1_649_367_553;
    const RUST_BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const RUST_SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn secret(s: &str) -> Secret {
        match Secret::parse(s) {
            Ok(secret) => secret,
            Err(e) => panic!("test secret rejected: {e}"),
        }
    }

    fn official(sig: &str) -> Result<(), VerifyError> {
        let ts = OFF_TS.to_string();
        verify(&[secret(OFF_SECRET)], Some(OFF_ID), Some(&ts), Some(sig), OFF_BODY, OFF_TS)
    }

    #[test]
    fn official_secrets_decode_to_the_documented_keys() {
        assert_eq!(hex::encode(secret(OFF_SECRET).0), OFF_KEY_HEX);
        assert_eq!(hex::encode(secret(RUST_SECRET).0), RUST_KEY_HEX);
    }

    #[test]
    fn official_sign_vectors() {
        assert_eq!(sign(&secret(OFF_SECRET), OFF_ID, OFF_TS, OFF_BODY), OFF_SIG);
        assert_eq!(sign(&secret(RUST_SECRET), RUST_ID, RUST_TS, RUST_BODY), RUST_SIG);
    }

    #[test]
    fn official_verify_vectors() {
        assert_eq!(official(OFF_SIG), Ok(()));
        let ts = RUST_TS.to_string();
        let res = verify(&[secret(RUST_SECRET)], Some(RUST_ID), Some(&ts), Some(RUST_SIG), RUST_BODY, RUST_TS);
        assert_eq!(res, Ok(()));
    }

    #[test]
    fn official_negative_last_char_changed() {
        let bad = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=";
        assert_eq!(official(bad), Err(VerifyError::Mismatch));
    }

    #[test]
    fn official_negative_empty_and_truncated() {
        let malformed = Err(VerifyError::MalformedHeader(SIGNATURE_HEADER));
        assert_eq!(official("v1,"), malformed);
        for cut in 0..OFF_SIG.len() {
            assert_eq!(official(&OFF_SIG[..cut]), malformed, "{cut}");
        }
    }

    #[test]
    fn official_other_versions_are_skipped() {
        let header = format!("v2,AAAA v1a,hnO3f9T8Ytu9 {OFF_SIG} v2,{}", &OFF_SIG[3..]);
        assert_eq!(official(&header), Ok(()));
        let v2_only = format!("v2,{}", &OFF_SIG[3..]);
        assert_eq!(official(&v2_only), Err(VerifyError::MalformedHeader(SIGNATURE_HEADER)));
    }

    // ---- §5.3 n8n vector and rotation -------------------------------------------------------

    const N8N_SECRET: &str = "whsec_bjhuLWJvb2tpbmctc2lnbmluZy1rZXktMjAyNS1hYmNkZWZnaA==";
    const N8N_KEY: &[u8] = b"n8n-booking-signing-key-2025-abcdefgh";
    const N8N_ID: &str = "msg_bk_20251125_0001";
    const N8N_TS: i64 = 1_764_072_000;
    const N8N_BODY: &[u8] = br#"{"type":"appointment.booked","timestamp":"2025-11-25T12:00:00.000Z","data":{"booking_id":"bk_20251125_0001","clinic_id":"42","patient":{"name":"Jane Doe","phone":"+14155552671"},"start":"2025-12-01T15:30:00Z","end":"2025-12-01T16:00:00Z","service":"consultation","source":"n8n"}}"#;
    const N8N_SIG: &str = "v1,ZR0paqjHtLwF0NG4QbfINF3113wDDE5pp1iI4bcnf20=";
    const ROTATED_SECRET: &str = "whsec_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    const ROTATED_SIG: &str = "v1,m/7PjDbbnuDX65gFix9CXQsHLfCXcGM3TTi8LXaZ58o=";

    fn n8n(secrets: &[Secret], sig: &str, body: &[u8], now: i64) -> Result<(), VerifyError> {
        let ts = N8N_TS.to_string();
        verify(secrets, Some(N8N_ID), Some(&ts), Some(sig), body, now)
    }

    #[test]
    fn n8n_vector() {
        use sha2::Digest as _;
        assert_eq!(N8N_BODY.len(), 279);
        assert_eq!(
            hex::encode(Sha256::digest(N8N_BODY)),
            "716fab29b0b2148c9354778fed63ab38e898cb97c9b730666c013146fd5430e4"
        );
        assert_eq!(secret(N8N_SECRET).0, N8N_KEY);
        assert_eq!(sign(&secret(N8N_SECRET), N8N_ID, N8N_TS, N8N_BODY), N8N_SIG);
        assert_eq!(n8n(&[secret(N8N_SECRET)], N8N_SIG, N8N_BODY, N8N_TS), Ok(()));
    }

    #[test]
    fn rotation_either_secret_verifies_the_combined_header() {
        let rotated = secret(ROTATED_SECRET);
        assert_eq!(rotated.0, (1..=32).collect::<Vec<u8>>());
        assert_eq!(sign(&rotated, N8N_ID, N8N_TS, N8N_BODY), ROTATED_SIG);
        let header = format!("{N8N_SIG} {ROTATED_SIG}");
        for secrets in [vec![secret(N8N_SECRET)], vec![rotated.clone()]] {
            assert_eq!(n8n(&secrets, &header, N8N_BODY, N8N_TS), Ok(()));
        }
        let wrong = secret("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        assert_eq!(n8n(&[wrong], &header, N8N_BODY, N8N_TS), Err(VerifyError::Mismatch));
        assert_eq!(n8n(&[], &header, N8N_BODY, N8N_TS), Err(VerifyError::Mismatch));
    }

    // ---- timestamp window -------------------------------------------------------------------

    #[test]
    fn tolerance_is_plus_minus_300_seconds() {
        let s = [secret(N8N_SECRET)];
        let out = Err(VerifyError::TimestampOutOfTolerance(TOLERANCE_SECS));
        assert_eq!(n8n(&s, N8N_SIG, N8N_BODY, N8N_TS + 300), Ok(()));
        assert_eq!(n8n(&s, N8N_SIG, N8N_BODY, N8N_TS - 300), Ok(()));
        assert_eq!(n8n(&s, N8N_SIG, N8N_BODY, N8N_TS + 301), out);
        assert_eq!(n8n(&s, N8N_SIG, N8N_BODY, N8N_TS - 301), out);
        assert_eq!(n8n(&s, N8N_SIG, N8N_BODY, i64::MIN), out);
        assert_eq!(n8n(&s, N8N_SIG, N8N_BODY, i64::MAX), out);
    }

    /// The clock is read before any MAC, so a stale request costs no hashing at all
    /// (the window is public: the spec documents it).
    #[test]
    fn a_stale_request_is_refused_before_any_mac() {
        let before = crate::verify::macs_computed_by_this_thread();
        let res = n8n(&[secret(ROTATED_SECRET)], N8N_SIG, N8N_BODY, N8N_TS + 10_000);
        assert_eq!(res, Err(VerifyError::TimestampOutOfTolerance(TOLERANCE_SECS)));
        assert_eq!(crate::verify::macs_computed_by_this_thread(), before);
    }

    #[test]
    fn extreme_timestamps_never_panic() {
        let s = [secret(N8N_SECRET)];
        for ts in [i64::MIN, i64::MAX, 0] {
            let sig = sign(&s[0], "id", ts, b"");
            let text = ts.to_string();
            let res = verify(&s, Some("id"), Some(&text), Some(&sig), b"", ts);
            assert_eq!(res, Ok(()));
        }
    }

    // ---- headers ----------------------------------------------------------------------------

    #[test]
    fn missing_headers_are_named() {
        let s = [secret(N8N_SECRET)];
        let (id, ts, sig) = (Some(N8N_ID), Some("1764072000"), Some(N8N_SIG));
        let cases = [(None, ts, sig, ID_HEADER), (id, None, sig, TIMESTAMP_HEADER), (id, ts, None, SIGNATURE_HEADER)];
        for (id, ts, sig, name) in cases {
            let res = verify(&s, id, ts, sig, N8N_BODY, N8N_TS);
            assert_eq!(res, Err(VerifyError::MissingHeader(name)));
        }
    }

    #[test]
    fn non_integer_timestamps_are_malformed() {
        let s = [secret(N8N_SECRET)];
        for ts in ["", "abc", "1764072000.0", " 1764072000", "1e9", "99999999999999999999"] {
            let res = verify(&s, Some(N8N_ID), Some(ts), Some(N8N_SIG), N8N_BODY, N8N_TS);
            assert_eq!(res, Err(VerifyError::MalformedHeader(TIMESTAMP_HEADER)), "{ts:?}");
        }
    }

    #[test]
    fn headers_without_a_well_formed_tag_are_malformed_and_cost_no_mac() {
        let wrong_length = format!("v1,{}", STANDARD.encode([7u8; 31]));
        let not_canonical = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OF=";
        for header in
            ["", " ", "v1", "v1,", ",", "v1,!!!", "v1,AAAA", "v1 ,x", "\u{fffd}", &wrong_length, not_canonical]
        {
            let before = crate::verify::macs_computed_by_this_thread();
            assert_eq!(official(header), Err(VerifyError::MalformedHeader(SIGNATURE_HEADER)), "{header:?}");
            assert_eq!(crate::verify::macs_computed_by_this_thread(), before, "{header:?}");
        }
    }

    #[test]
    fn malformed_tags_beside_a_good_one_are_skipped() {
        let header = format!("v1,AAAA v1,!!! v1,{} {OFF_SIG}", STANDARD.encode([7u8; 31]));
        assert_eq!(official(&header), Ok(()));
    }

    #[test]
    fn the_header_size_and_the_number_of_tags_are_capped() {
        let malformed = Err(VerifyError::MalformedHeader(SIGNATURE_HEADER));
        let wrong = format!("v1,{}", STANDARD.encode([9u8; 32]));
        let many = |n: usize| vec![wrong.as_str(); n].join(" ");
        assert_eq!(official(&format!("{} {OFF_SIG}", many(MAX_TAGS - 1))), Ok(()));
        assert_eq!(official(&format!("{} {OFF_SIG}", many(MAX_TAGS))), malformed);
        let padded = format!("{OFF_SIG}{}", " ".repeat(MAX_SIGNATURE_HEADER_BYTES));
        assert_eq!(official(&padded), malformed);
    }

    #[test]
    fn each_secret_costs_one_mac_whatever_the_number_of_tags() {
        let wrong = format!("v1,{}", STANDARD.encode([9u8; 32]));
        let header = vec![wrong.as_str(); MAX_TAGS].join(" ");
        let secrets = [secret(N8N_SECRET), secret(ROTATED_SECRET), secret(OFF_SECRET)];
        let before = crate::verify::macs_computed_by_this_thread();
        assert_eq!(n8n(&secrets, &header, N8N_BODY, N8N_TS), Err(VerifyError::Mismatch));
        assert_eq!(crate::verify::macs_computed_by_this_thread() - before, 3);
    }

    // ---- secrets ----------------------------------------------------------------------------

    #[test]
    fn secret_padding_and_prefix_are_optional() {
        let unpadded = N8N_SECRET.trim_end_matches('=');
        assert_eq!(secret(unpadded).0, N8N_KEY);
        let bare = N8N_SECRET.trim_start_matches(SECRET_PREFIX);
        assert_eq!(secret(bare).0, N8N_KEY);
    }

    #[test]
    fn bad_secrets_are_refused() {
        for bad in ["", "whsec_", "whsec_!!!!", "whsec_a", "not base64 at all", "whsec_====", "="] {
            assert!(Secret::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secret_never_leaks_through_debug_or_errors() {
        let printed = format!("{:?}", secret(N8N_SECRET));
        assert_eq!(printed, "Secret(<redacted>)");
        let raw = "whsec_s3cr3t!!";
        let err = Secret::parse(raw).err().map(|e| format!("{e} {e:?}"));
        assert!(err.is_some_and(|e| !e.contains("s3cr3t")));
    }

    // ---- exhaustive single-byte corruption --------------------------------------------------

    fn n8n_headers(id: &str, ts: &str, sig: &str, body: &[u8]) -> Result<(), VerifyError> {
        verify(&[secret(N8N_SECRET)], Some(id), Some(ts), Some(sig), body, N8N_TS)
    }

    #[test]
    fn every_body_byte_flip_is_rejected() {
        for (i, bad) in byte_flips(N8N_BODY) {
            assert!(n8n_headers(N8N_ID, "1764072000", N8N_SIG, &bad).is_err(), "body byte {i}");
        }
    }

    #[test]
    fn every_signature_byte_flip_is_rejected() {
        for (i, bad) in str_flips(N8N_SIG) {
            assert!(n8n_headers(N8N_ID, "1764072000", &bad, N8N_BODY).is_err(), "sig byte {i}");
        }
    }

    #[test]
    fn every_id_and_timestamp_byte_flip_is_rejected() {
        for (i, bad) in str_flips(N8N_ID) {
            assert!(n8n_headers(&bad, "1764072000", N8N_SIG, N8N_BODY).is_err(), "id byte {i}");
        }
        for (i, bad) in str_flips("1764072000") {
            assert!(n8n_headers(N8N_ID, &bad, N8N_SIG, N8N_BODY).is_err(), "ts byte {i}");
        }
    }
}
