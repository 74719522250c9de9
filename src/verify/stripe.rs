//! Stripe `Stripe-Signature` verification, matching stripe-python 16 / stripe-node 23
//! (PROTOCOLS.md §3).

use hmac::Hmac;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{VerifyError, mac_bytes};

pub const SIGNATURE_HEADER: &str = "stripe-signature";
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// The longest `Stripe-Signature` read: Stripe sends a timestamp and one `v1` per live
/// secret (two during a rotation) plus a `v0`, about 220 bytes.
pub const MAX_HEADER_BYTES: usize = 2048;
/// The most `v1` values looked at in one header (more is refused as malformed).
pub const MAX_SIGNATURES: usize = 16;

/// The only live scheme; Stripe's docs say to ignore all others to prevent downgrades.
const SCHEME: &str = "v1";

/// Verifies `Stripe-Signature` (t=..., every v1=..., other schemes ignored) against every secret
/// (the whole `whsec_...` string is the key). Rejects t < now - tolerance (a future t is accepted, as Stripe's SDKs do).
/// Returns the header's timestamp.
///
/// The tolerance is applied literally: unlike stripe-python, 0 does not switch the check off.
/// The timestamp is checked before any MAC (the window is public), the header's size and
/// its number of `v1` values are capped, and each secret's MAC is computed once and
/// compared with every `v1`, so a refusal costs at most one MAC per secret.
pub fn verify(
    secrets: &[&str],
    header: Option<&str>,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<i64, VerifyError> {
    let header = header.ok_or(VerifyError::MissingHeader(SIGNATURE_HEADER))?;
    let (t, signatures) = parse_header(header)?;
    if t < now.saturating_sub(tolerance_secs) {
        return Err(VerifyError::TimestampOutOfTolerance(tolerance_secs));
    }
    let matched = secrets.iter().any(|secret| {
        let expected = hex::encode(signature(secret, t, body));
        signatures.iter().fold(false, |hit, sig| hit | bool::from(expected.as_bytes().ct_eq(sig.as_bytes())))
    });
    if matched { Ok(t) } else { Err(VerifyError::Mismatch) }
}

/// `t=<t>,v1=<hex>` for tests and tools.
pub fn sign_header(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},{SCHEME}={}", hex::encode(signature(secret, t, body)))
}

/// HMAC-SHA256 over `"<t>.<body>"`, keyed with the secret text itself (not base64-decoded).
fn signature(secret: &str, t: i64, body: &[u8]) -> Vec<u8> {
    let t = t.to_string();
    mac_bytes::<Hmac<Sha256>>(secret.as_bytes(), &[t.as_bytes(), b".", body])
}

/// The timestamp and every `v1` value. As in the SDKs, items split on the first `=` and
/// unknown keys are skipped; a missing/non-integer `t` or no `v1` at all is malformed.
fn parse_header(header: &str) -> Result<(i64, Vec<&str>), VerifyError> {
    let malformed = VerifyError::MalformedHeader(SIGNATURE_HEADER);
    if header.len() > MAX_HEADER_BYTES {
        return Err(malformed);
    }
    let items = || header.split(',').filter_map(|i| i.split_once('='));
    let t = items()
        .find(|(key, _)| *key == "t")
        .and_then(|(_, value)| value.parse::<i64>().ok())
        .ok_or_else(|| malformed.clone())?;
    let signatures: Vec<&str> = items().filter(|(key, _)| *key == SCHEME).map(|(_, value)| value).collect();
    if signatures.is_empty() || signatures.len() > MAX_SIGNATURES {
        return Err(malformed);
    }
    Ok((t, signatures))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::test_support::{byte_flips, str_flips};

    // ---- §3.2 official vector (stripe-dotnet) -----------------------------------------------

    const OFFICIAL_SECRET: &str = "webhook_secret";
    const OFFICIAL_T: i64 = 1_533_204_620;
    const OFFICIAL_HEADER: &str = "t=1533204620,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef";
    const OFFICIAL_V1_NO_NEWLINE: &str = "8c506d7d19ece69e9a38e398964787dda54eeb2583381ffc7f56070c28d7f119";
    const OFFICIAL_BODY: &str = r#"{
  "id": "evt_123",
  "object": "event",
  "account": "acct_123",
  "api_version": "2017-05-25",
  "created": 1533204620,
  "data": {
    "object": {
      "id": "cus_123",
      "object": "customer",
      "created": 123456789,
      "email": "test@stripe.com",
      "livemode": false,
      "metadata": {}
    }
  },
  "livemode": false,
  "pending_webhooks": 1,
  "request": {
    "id": "req_123",
    "idempotency_key": "idempotency-key-123"
  },
  "type": "customer.created"
}
"#;

    fn official(header: &str, body: &[u8]) -> Result<i64, VerifyError> {
        verify(&[OFFICIAL_SECRET], Some(header), body, OFFICIAL_T + 100, 300)
    }

    #[test]
    fn official_payload_is_byte_exact() {
        use sha2::Digest as _;
        assert_eq!(OFFICIAL_BODY.len(), 484);
        assert_eq!(
            hex::encode(Sha256::digest(OFFICIAL_BODY)),
            "98cc89412549ca7faf118fca984763bdb6f81e13d1ce8c528dbbb5be602ec1be"
        );
    }

    #[test]
    fn official_vector_verifies_and_ignores_v0() {
        assert_eq!(official(OFFICIAL_HEADER, OFFICIAL_BODY.as_bytes()), Ok(OFFICIAL_T));
        let expected = OFFICIAL_HEADER.split(",v0=").next().unwrap_or_default();
        assert_eq!(sign_header(OFFICIAL_SECRET, OFFICIAL_T, OFFICIAL_BODY.as_bytes()), expected);
    }

    #[test]
    fn official_vector_without_trailing_newline_is_rejected() {
        let body = OFFICIAL_BODY.trim_end_matches('\n').as_bytes();
        assert_eq!(body.len(), 483);
        assert_eq!(official(OFFICIAL_HEADER, body), Err(VerifyError::Mismatch));
        let header = format!("t={OFFICIAL_T},v1={OFFICIAL_V1_NO_NEWLINE}");
        assert_eq!(official(&header, body), Ok(OFFICIAL_T));
        assert_eq!(official(&header, OFFICIAL_BODY.as_bytes()), Err(VerifyError::Mismatch));
    }

    /// A valid-looking v0 alone must never authenticate (downgrade protection).
    #[test]
    fn v0_alone_is_refused() {
        let v0 = OFFICIAL_HEADER.split(",v0=").nth(1).unwrap_or_default();
        let header = format!("t={OFFICIAL_T},v0={v0}");
        let res = official(&header, OFFICIAL_BODY.as_bytes());
        assert_eq!(res, Err(VerifyError::MalformedHeader(SIGNATURE_HEADER)));
    }

    #[test]
    fn flipping_the_ignored_v0_changes_nothing() {
        let v0_start = OFFICIAL_HEADER.find(",v0=").unwrap_or_default() + 4;
        for (i, bad) in str_flips(OFFICIAL_HEADER).filter(|(i, _)| *i >= v0_start) {
            assert_eq!(official(&bad, OFFICIAL_BODY.as_bytes()), Ok(OFFICIAL_T), "{i}");
        }
    }

    // ---- §3.3 fresh vectors -----------------------------------------------------------------

    const S1_SECRET: &str = "whsec_test_5f2b8c1d9e7a4f60b3c2d1e0f9a8b7c6";
    const S1_T: i64 = 1_764_072_000;
    const S1_HEADER: &str = "t=1764072000,v1=9642051292d0df104d84d0c3ba9e92e09c9a3b78504ead6f12b322ef080ca236";
    const S1_BODY: &str = r#"{"id":"evt_1SXa2bC3dE4fG5hI6jK7lM8n","object":"event","api_version":"2025-03-31.basil","created":1764071999,"data":{"object":{"id":"sub_1SWz9yA1bC2dE3fG4hI5jK6l","object":"subscription","billing_cycle_anchor":1762862400,"cancel_at":null,"cancel_at_period_end":false,"canceled_at":null,"collection_method":"charge_automatically","created":1762862400,"currency":"usd","customer":"cus_TQx1y2z3A4b5C6","ended_at":null,"items":{"object":"list","data":[{"id":"si_TQx7y8z9A0b1C2","object":"subscription_item","created":1762862401,"current_period_end":1766750400,"current_period_start":1764072000,"metadata":{},"price":{"id":"price_1SWz0aA1bC2dE3fG4hI5jK6l","object":"price","active":true,"currency":"usd","product":"prod_TQxAbCdEfGhIjK","recurring":{"interval":"month","interval_count":1,"usage_type":"licensed"},"type":"recurring","unit_amount":4900},"quantity":1,"subscription":"sub_1SWz9yA1bC2dE3fG4hI5jK6l"}],"has_more":false,"total_count":1,"url":"/v1/subscription_items?subscription=sub_1SWz9yA1bC2dE3fG4hI5jK6l"},"latest_invoice":"in_1SXa2aC3dE4fG5hI6jK7lM8n","livemode":false,"metadata":{"clinic_id":"42"},"pause_collection":null,"status":"active","trial_end":1764072000,"trial_start":1762862400},"previous_attributes":{"latest_invoice":"in_1SWz9zA1bC2dE3fG4hI5jK6l","status":"trialing"}},"livemode":false,"pending_webhooks":1,"request":{"id":null,"idempotency_key":null},"type":"customer.subscription.updated"}"#;

    const S2_NEW: &str = "whsec_rotated_new_0000000000000000000000000001";
    const S2_OLD: &str = "whsec_rotated_old_0000000000000000000000000000";
    const S2_T: i64 = 1_764_075_601;
    const S2_HEADER: &str = "t=1764075601,v1=6b3f2f97a76add07bb7fdda0ecbf68d07913421a701eacdba6409d07fb4f440e,v1=d50e64f39262b09308f6d32f7d4793285019b846ac7aaf2c21899c41888b609c,v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39";
    const S2_BODY: &str = r#"{"id":"evt_1SXb3cD4eF5gH6iJ7kL8mN9o","object":"event","api_version":"2025-03-31.basil","created":1764075600,"data":{"object":{"id":"in_1SXb3bD4eF5gH6iJ7kL8mN9o","object":"invoice","attempt_count":1,"billing_reason":"subscription_cycle","customer":"cus_TQx1y2z3A4b5C6","status":"open"}},"livemode":false,"pending_webhooks":1,"request":{"id":null,"idempotency_key":null},"type":"invoice.payment_failed"}"#;

    fn s1(header: &str, body: &[u8]) -> Result<i64, VerifyError> {
        verify(&[S1_SECRET], Some(header), body, S1_T, DEFAULT_TOLERANCE_SECS)
    }

    fn s2(secrets: &[&str], now: i64) -> Result<i64, VerifyError> {
        let tolerance = DEFAULT_TOLERANCE_SECS;
        verify(secrets, Some(S2_HEADER), S2_BODY.as_bytes(), now, tolerance)
    }

    #[test]
    fn fresh_payloads_are_byte_exact() {
        use sha2::Digest as _;
        assert_eq!(S1_BODY.len(), 1412);
        assert_eq!(
            hex::encode(Sha256::digest(S1_BODY)),
            "0ba224c1ebd202abb7d91f42e208ec9e7a99d4ff4f4ffc4ebcba59a28754d7ec"
        );
        assert_eq!(S2_BODY.len(), 401);
        assert_eq!(
            hex::encode(Sha256::digest(S2_BODY)),
            "523619b57ebd5b42c8ed772c399210ec29d8a652f56fd316e6178e6e11a638a7"
        );
    }

    #[test]
    fn s1_verifies_and_signs() {
        assert_eq!(s1(S1_HEADER, S1_BODY.as_bytes()), Ok(S1_T));
        assert_eq!(sign_header(S1_SECRET, S1_T, S1_BODY.as_bytes()), S1_HEADER);
    }

    #[test]
    fn s2_rotation_either_secret_verifies() {
        assert_eq!(s2(&[S2_NEW], S2_T), Ok(S2_T));
        assert_eq!(s2(&[S2_OLD], S2_T), Ok(S2_T));
        assert_eq!(s2(&["whsec_wrong", S2_OLD], S2_T), Ok(S2_T));
    }

    #[test]
    fn s2_header_v1s_are_new_then_old() {
        let body = S2_BODY.as_bytes();
        let new = sign_header(S2_NEW, S2_T, body);
        let old = sign_header(S2_OLD, S2_T, body);
        let old_v1 = old.split(",v1=").nth(1).unwrap_or_default();
        assert!(S2_HEADER.starts_with(&format!("{new},v1={old_v1},v0=")));
    }

    #[test]
    fn s2_wrong_secret_is_rejected() {
        assert_eq!(s2(&["whsec_wrong"], S2_T), Err(VerifyError::Mismatch));
        assert_eq!(s2(&[], S2_T), Err(VerifyError::Mismatch));
    }

    #[test]
    fn s2_tolerance_edges() {
        assert_eq!(s2(&[S2_NEW], S2_T + 300), Ok(S2_T));
        assert_eq!(s2(&[S2_NEW], S2_T + 301), Err(VerifyError::TimestampOutOfTolerance(300)));
    }

    #[test]
    fn future_timestamps_are_accepted_like_the_sdks() {
        assert_eq!(s2(&[S2_NEW], S2_T - 86_400), Ok(S2_T));
    }

    #[test]
    fn a_stale_request_is_refused_before_any_mac() {
        let before = crate::verify::macs_computed_by_this_thread();
        assert_eq!(s2(&["whsec_wrong"], S2_T + 10_000), Err(VerifyError::TimestampOutOfTolerance(300)));
        assert_eq!(crate::verify::macs_computed_by_this_thread(), before);
    }

    #[test]
    fn the_header_size_and_the_number_of_v1_values_are_capped() {
        let malformed = Err(VerifyError::MalformedHeader(SIGNATURE_HEADER));
        let wrong = format!("v1={}", "0".repeat(64));
        let with = |n: usize| format!("t={S1_T},{},{}", vec![wrong.as_str(); n].join(","), &S1_HEADER[13..]);
        assert_eq!(s1(&with(MAX_SIGNATURES - 1), S1_BODY.as_bytes()), Ok(S1_T));
        assert_eq!(s1(&with(MAX_SIGNATURES), S1_BODY.as_bytes()), malformed);
        let padded = format!("{S1_HEADER},x={}", "y".repeat(MAX_HEADER_BYTES));
        assert_eq!(s1(&padded, S1_BODY.as_bytes()), malformed);
    }

    #[test]
    fn each_secret_costs_one_mac_whatever_the_number_of_v1_values() {
        let wrong = format!("v1={}", "0".repeat(64));
        let header = format!("t={S1_T},{}", vec![wrong.as_str(); MAX_SIGNATURES].join(","));
        let before = crate::verify::macs_computed_by_this_thread();
        let res = verify(&["whsec_a", "whsec_b"], Some(&header), S1_BODY.as_bytes(), S1_T, 300);
        assert_eq!(res, Err(VerifyError::Mismatch));
        assert_eq!(crate::verify::macs_computed_by_this_thread() - before, 2);
    }

    #[test]
    fn extreme_clock_values_do_not_overflow() {
        let body = S1_BODY.as_bytes();
        let header = sign_header(S1_SECRET, i64::MIN, body);
        let res = verify(&[S1_SECRET], Some(&header), body, i64::MAX, i64::MAX);
        assert_eq!(res, Err(VerifyError::TimestampOutOfTolerance(i64::MAX)));
        let header = sign_header(S1_SECRET, i64::MAX, body);
        let res = verify(&[S1_SECRET], Some(&header), body, i64::MIN, i64::MIN);
        assert_eq!(res, Ok(i64::MAX));
    }

    // ---- malformed headers ------------------------------------------------------------------

    #[test]
    fn missing_header() {
        let res = verify(&[S1_SECRET], None, b"{}", S1_T, 300);
        assert_eq!(res, Err(VerifyError::MissingHeader(SIGNATURE_HEADER)));
    }

    #[test]
    fn malformed_headers_from_stripe_dotnet_and_more() {
        let v1 = "9642051292d0df104d84d0c3ba9e92e09c9a3b78504ead6f12b322ef080ca236";
        let malformed = Err(VerifyError::MalformedHeader(SIGNATURE_HEADER));
        for bad in [
            format!("t=,v1={v1}"),
            "t,v1=,v0=".to_owned(),
            "t".to_owned(),
            ",,".to_owned(),
            String::new(),
            format!("v1={v1}"),
            format!("t=abc,v1={v1}"),
            format!("t=1764072000.5,v1={v1}"),
            format!("t=99999999999999999999,v1={v1}"),
            "t=1764072000".to_owned(),
            "t=1764072000,v1".to_owned(),
            format!("t=1764072000,V1={v1}"),
        ] {
            assert_eq!(s1(&bad, S1_BODY.as_bytes()), malformed, "{bad:?}");
        }
    }

    #[test]
    fn unusable_v1_values_are_mismatches() {
        for bad in [
            "t=1764072000,v1=",
            "t=1764072000,v1=zz",
            "t=1764072000,v1=9642051292D0DF104D84D0C3BA9E92E09C9A3B78504EAD6F12B322EF080CA236",
            "t=1764072000,v1=9642051292d0df104d84d0c3ba9e92e09c9a3b78504ead6f12b322ef080ca23",
        ] {
            assert_eq!(s1(bad, S1_BODY.as_bytes()), Err(VerifyError::Mismatch), "{bad:?}");
        }
    }

    #[test]
    fn one_good_v1_among_garbage_is_enough() {
        let header = format!("t=1764072000,v1=zz,v1=,x=1,{}", &S1_HEADER[13..]);
        assert_eq!(s1(&header, S1_BODY.as_bytes()), Ok(S1_T));
    }

    #[test]
    fn non_utf8_body_never_panics() {
        let body = [0xff, 0xfe, 0x00, 0x80];
        let header = sign_header(S1_SECRET, S1_T, &body);
        assert_eq!(s1(&header, &body), Ok(S1_T));
    }

    // ---- exhaustive single-byte corruption --------------------------------------------------

    #[test]
    fn every_body_byte_flip_is_rejected() {
        for (i, bad) in byte_flips(S1_BODY.as_bytes()) {
            assert!(s1(S1_HEADER, &bad).is_err(), "body byte {i} accepted");
        }
        for (i, bad) in byte_flips(OFFICIAL_BODY.as_bytes()) {
            assert!(official(OFFICIAL_HEADER, &bad).is_err(), "official body byte {i}");
        }
    }

    #[test]
    fn every_header_byte_flip_is_rejected() {
        for (i, bad) in str_flips(S1_HEADER) {
            assert!(s1(&bad, S1_BODY.as_bytes()).is_err(), "header byte {i} accepted: {bad}");
        }
    }
}
