//! Properties of the signature checks, over generated input (proptest): a signed
//! request with any byte changed is refused, and refusing costs at most one MAC per
//! secret whatever the request carries.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use micro8gents::verify::{macs_computed_by_this_thread, standard_webhooks as sw, stripe, twilio};
use proptest::prelude::*;

const NOW: i64 = 1_764_072_000;

fn secret_text() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_]{1,40}"
}

/// A byte position below `len` and a mask that changes it.
fn flip() -> impl Strategy<Value = (prop::sample::Index, u8)> {
    (any::<prop::sample::Index>(), 1u8..=255)
}

fn flipped(bytes: &[u8], (at, mask): &(prop::sample::Index, u8)) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let i = at.index(out.len());
    out[i] ^= mask;
    out
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn stripe_any_changed_byte_of_body_or_header_is_refused(
        secret in secret_text(),
        body in prop::collection::vec(any::<u8>(), 1..512),
        f in flip(),
    ) {
        let header = stripe::sign_header(&secret, NOW, &body);
        let verify = |h: &str, b: &[u8]| stripe::verify(&[&secret], Some(h), b, NOW, 300);
        prop_assert_eq!(verify(&header, &body), Ok(NOW));
        prop_assert!(verify(&header, &flipped(&body, &f)).is_err());
        let bad_header = flipped(header.as_bytes(), &f);
        prop_assert!(verify(&lossy(&bad_header), &body).is_err(), "{}", lossy(&bad_header));
    }

    #[test]
    fn standard_webhooks_any_changed_byte_is_refused(
        key in prop::collection::vec(any::<u8>(), 1..64),
        id in "msg_[A-Za-z0-9]{1,30}",
        body in prop::collection::vec(any::<u8>(), 1..512),
        part in 0usize..4,
        f in flip(),
    ) {
        let secret = sw::Secret::parse(&format!("whsec_{}", STANDARD.encode(&key))).unwrap();
        let ts = NOW.to_string();
        let sig = sw::sign(&secret, &id, NOW, &body);
        let verify = |id: &str, ts: &str, sig: &str, body: &[u8]| {
            sw::verify(std::slice::from_ref(&secret), Some(id), Some(ts), Some(sig), body, NOW)
        };
        prop_assert_eq!(verify(&id, &ts, &sig, &body), Ok(()));
        let refused = match part {
            0 => verify(&lossy(&flipped(id.as_bytes(), &f)), &ts, &sig, &body),
            1 => verify(&id, &lossy(&flipped(ts.as_bytes(), &f)), &sig, &body),
            2 => verify(&id, &ts, &lossy(&flipped(sig.as_bytes(), &f)), &body),
            _ => verify(&id, &ts, &sig, &flipped(&body, &f)),
        };
        prop_assert!(refused.is_err());
    }

    /// Twilio signs the decoded parameters, so a changed byte of the body is refused
    /// unless it decodes to the same parameters (`+` and `%20` are both a space).
    #[test]
    fn twilio_any_changed_byte_is_refused_unless_the_parameters_are_the_same(
        token in secret_text(),
        params in prop::collection::btree_map("[A-Za-z]{1,12}", ".{0,20}", 1..12),
        f in flip(),
        in_url in any::<bool>(),
    ) {
        let url = "https://hooks.example.com/webhooks/twilio/7/call-status?x=1";
        let params: Vec<(String, String)> = params.into_iter().collect();
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish();
        let sig = twilio::compute_signature(&token, url, &params, twilio::Algorithm::HmacSha1);
        let verify = |url: &str, p: &[(String, String)]| {
            twilio::verify_form(&[&token], url, p, Some(&sig), twilio::Algorithm::HmacSha1)
        };
        prop_assert_eq!(verify(url, &params), Ok(()));
        if in_url {
            let bad = lossy(&flipped(url.as_bytes(), &f));
            // The URL as given or without its default port are the same URL to Twilio.
            prop_assume!(!twilio::url_candidates(&bad).iter().any(|c| twilio::url_candidates(url).contains(c)));
            prop_assert!(verify(&bad, &params).is_err(), "{}", bad);
        } else {
            let bad = flipped(body.as_bytes(), &f);
            if let Ok(decoded) = twilio::parse_form(&bad) {
                let mut same = decoded.clone();
                same.sort();
                if same != params {
                    prop_assert!(verify(url, &decoded).is_err(), "{}", lossy(&bad));
                }
            }
        }
    }

    /// However many tags a header holds and whatever they are, a check costs at most one
    /// MAC per secret (none at all when no tag is well formed or the timestamp is stale).
    #[test]
    fn standard_webhooks_cost_at_most_one_mac_per_secret(
        keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..4),
        tags in prop::collection::vec(prop_oneof![
            prop::collection::vec(any::<u8>(), 32).prop_map(|t| format!("v1,{}", STANDARD.encode(t))),
            "v[0-9],[A-Za-z0-9+/=]{0,50}",
            ".{0,50}",
        ], 0..40),
        body in prop::collection::vec(any::<u8>(), 0..2048),
        skew in -400i64..400,
    ) {
        let secrets: Vec<sw::Secret> =
            keys.iter().map(|k| sw::Secret::parse(&STANDARD.encode(k)).unwrap()).collect();
        let header = tags.join(" ");
        let ts = (NOW + skew).to_string();
        let before = macs_computed_by_this_thread();
        let result = sw::verify(&secrets, Some("msg_1"), Some(&ts), Some(&header), &body, NOW);
        let cost = macs_computed_by_this_thread() - before;
        prop_assert!(result.is_err());
        prop_assert!(cost <= secrets.len() as u64, "{} MACs for {} secrets", cost, secrets.len());
        if sw::v1_tags(&header).is_err() || skew.abs() > 300 {
            prop_assert_eq!(cost, 0);
        }
    }

    #[test]
    fn stripe_costs_at_most_one_mac_per_secret(
        secrets in prop::collection::vec(secret_text(), 0..4),
        items in prop::collection::vec(prop_oneof![
            "v1=[0-9a-f]{64}",
            "v[0-9]=[0-9a-f]{0,70}",
            "[a-z0-9]{0,3}=.{0,20}",
        ], 0..40),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let header = format!("t={NOW},{}", items.join(","));
        let keys: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let before = macs_computed_by_this_thread();
        let _ = stripe::verify(&keys, Some(&header), &body, NOW, 300);
        let cost = macs_computed_by_this_thread() - before;
        prop_assert!(cost <= keys.len() as u64, "{} MACs for {} secrets", cost, keys.len());
    }

    /// Twilio signs the URL the sender used; its SDKs accept it with or without the port,
    /// so the cost is one MAC per secret per form of the URL, at most two.
    #[test]
    fn twilio_costs_at_most_one_mac_per_secret_and_url_form(
        tokens in prop::collection::vec(secret_text(), 0..4),
        body in prop::collection::vec(any::<u8>(), 0..2048),
        signature in ".{0,60}",
    ) {
        let url = "https://hooks.example.com/webhooks/twilio/7/call-status";
        let keys: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let before = macs_computed_by_this_thread();
        if let Ok(params) = twilio::parse_form(&body) {
            let _ = twilio::verify_form(&keys, url, &params, Some(&signature), twilio::Algorithm::HmacSha1);
        }
        let cost = macs_computed_by_this_thread() - before;
        prop_assert!(cost <= 2 * keys.len() as u64, "{} MACs for {} tokens", cost, keys.len());
    }
}
