//! Twilio `X-Twilio-Signature` validation, matching twilio-python 9.13 / twilio-node 6.2
//! (PROTOCOLS.md §1).

use std::collections::BTreeSet;
use std::ops::Range;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::Hmac;
use sha1::Sha1;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::{VerifyError, mac_bytes, mac_matches};

pub const SIGNATURE_HEADER: &str = "x-twilio-signature";
pub const SIGNATURE_SETTINGS_HEADER: &str = "x-twilio-webhooks-signature-settings";

/// The query parameter Twilio adds to JSON-body webhook URLs.
const BODY_HASH_PARAM: &str = "bodySHA256";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    HmacSha1,
    HmacSha256,
}

impl Algorithm {
    fn tag_len(self) -> usize {
        match self {
            Self::HmacSha1 => 20,
            Self::HmacSha256 => 32,
        }
    }
}

/// The most parameters a Twilio form callback may carry. Voice, recording and
/// transcription callbacks send a few dozen; a hostile body of hundreds of thousands
/// of empty parameters is refused before a single one is decoded.
pub const MAX_FORM_PARAMS: usize = 256;

/// Why a form body was refused before its signature could be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("the form has more than {0} parameters")]
    TooManyParams(usize),
    #[error("the form repeats the parameter {0:?} (Twilio never does)")]
    DuplicateName(String),
}

/// A form body's pairs in body order, refused if it has more than [`MAX_FORM_PARAMS`]
/// parameters (counted without decoding anything) or repeats a name. The name in the
/// error is cut short: it comes from whoever sent the body.
pub fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    // form_urlencoded skips empty segments, so count the same way.
    let count = body.split(|b| *b == b'&').filter(|segment| !segment.is_empty()).count();
    if count > MAX_FORM_PARAMS {
        return Err(FormError::TooManyParams(MAX_FORM_PARAMS));
    }
    let pairs: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let mut seen = std::collections::HashSet::with_capacity(pairs.len());
    if let Some((name, _)) = pairs.iter().find(|(name, _)| !seen.insert(name.as_str())) {
        return Err(FormError::DuplicateName(name.chars().take(64).collect()));
    }
    Ok(pairs)
}

/// Parses X-Twilio-Webhooks-Signature-Settings (`key=<id>,algorithm=HMAC_SHA256`); None header => HmacSha1.
///
/// A header that is present but unreadable is refused rather than defaulted, so a
/// mangled header cannot silently switch the algorithm.
pub fn algorithm_from_settings(header: Option<&str>) -> Result<Algorithm, VerifyError> {
    let Some(header) = header else {
        return Ok(Algorithm::HmacSha1);
    };
    let malformed = VerifyError::MalformedHeader(SIGNATURE_SETTINGS_HEADER);
    let value = header
        .split(',')
        .filter_map(|item| item.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("algorithm"))
        .map(|(_, value)| value.trim())
        .ok_or_else(|| malformed.clone())?;
    match value.to_ascii_uppercase().as_str() {
        "HMAC_SHA256" => Ok(Algorithm::HmacSha256),
        "HMAC_SHA1" => Ok(Algorithm::HmacSha1),
        _ => Err(malformed),
    }
}

/// A shared key of a Webhooks Rule (`config.shared_keys` of the business's integration).
#[derive(Debug, Clone, Copy)]
pub struct SharedKey<'a> {
    /// The `key=` value Twilio names in the settings header.
    pub id: &'a str,
    pub secret: &'a str,
}

/// The `key=` value of X-Twilio-Webhooks-Signature-Settings, if it names one.
pub fn shared_key_id(header: &str) -> Option<&str> {
    header
        .split(',')
        .filter_map(|item| item.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("key"))
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// The keys a signature may have been made with (CONTRACT section 3).
///
/// Without the settings header: the auth tokens. With it, SharedKey signing: the
/// shared key whose id the header names, else (no match, or no `key=`) every
/// shared key, as during a rotation. A business with no shared key cannot have
/// signed so: [`VerifyError::NoSharedKey`], and no MAC is computed.
pub fn signing_keys<'a>(
    settings: Option<&str>,
    auth_tokens: &[&'a str],
    shared: &[SharedKey<'a>],
) -> Result<Vec<&'a str>, VerifyError> {
    let Some(header) = settings else {
        return Ok(auth_tokens.to_vec());
    };
    if shared.is_empty() {
        return Err(VerifyError::NoSharedKey);
    }
    let named = shared_key_id(header).map(|id| shared.iter().filter(|k| k.id == id).map(|k| k.secret).collect());
    Ok(match named {
        Some(keys) if !Vec::<&str>::is_empty(&keys) => keys,
        _ => shared.iter().map(|k| k.secret).collect(),
    })
}

/// base64(HMAC(key, url + sorted(name+value) ...)) exactly as Twilio's SDKs compute it:
/// params sorted by name (byte order), multi-valued names de-duplicated and their values sorted.
pub fn compute_signature(key: &str, url: &str, params: &[(String, String)], alg: Algorithm) -> String {
    let signed = signed_string(url, params);
    STANDARD.encode(mac(key.as_bytes(), signed.as_bytes(), alg))
}

/// The URL forms Twilio's SDKs accept: as given, with any port removed, with the scheme's default port added (if none).
/// Keeps userinfo, path and the query string byte-for-byte as given (never re-encode or sort the query).
pub fn url_candidates(url: &str) -> Vec<String> {
    let given = url.to_owned();
    let Some(parts) = UrlParts::split(url) else {
        return vec![given];
    };
    let other = match parts.port {
        // Twilio's SDKs strip any port, not only the default one.
        Some(_) => format!("{}{}", parts.head, parts.tail),
        None => format!("{}:{}{}", parts.head, parts.default_port(), parts.tail),
    };
    if other == given { vec![given] } else { vec![given, other] }
}

/// Form-encoded callbacks: accepts if ANY key in `keys` matches ANY url candidate. `params` are form-decoded pairs in body order.
pub fn verify_form(
    keys: &[&str],
    url: &str,
    params: &[(String, String)],
    signature: Option<&str>,
    alg: Algorithm,
) -> Result<(), VerifyError> {
    let tag = decode_signature(signature, alg)?;
    let messages: Vec<String> = url_candidates(url).iter().map(|candidate| signed_string(candidate, params)).collect();
    any_key_signed_any(keys, &messages, &tag, alg)
}

/// JSON-body variant: `url` contains the `bodySHA256` query parameter; checks lowercase-hex sha256(body) equals it
/// (else BodyHashMismatch, or MalformedHeader("bodySHA256") if absent) and the signature over the URL candidates with no params appended.
pub fn verify_json(
    keys: &[&str],
    url: &str,
    body: &[u8],
    signature: Option<&str>,
    alg: Algorithm,
) -> Result<(), VerifyError> {
    let tag = decode_signature(signature, alg)?;
    check_body_hash(url, body)?;
    any_key_signed_any(keys, &url_candidates(url), &tag, alg)
}

/// Accepts if any key produced `tag` over any of the candidate messages.
fn any_key_signed_any(keys: &[&str], messages: &[String], tag: &[u8], alg: Algorithm) -> Result<(), VerifyError> {
    let matched = keys.iter().any(|key| messages.iter().any(|m| tag_matches(key.as_bytes(), m.as_bytes(), tag, alg)));
    if matched { Ok(()) } else { Err(VerifyError::Mismatch) }
}

/// `url` followed by every distinct (name, value) pair in byte order, with no separators.
/// A set of pairs gives both SDK rules at once: names sorted, and each name's values
/// de-duplicated and sorted.
fn signed_string(url: &str, params: &[(String, String)]) -> String {
    let pairs: BTreeSet<(&str, &str)> = params.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
    let mut signed = url.to_owned();
    for (name, value) in pairs {
        signed.push_str(name);
        signed.push_str(value);
    }
    signed
}

fn mac(key: &[u8], msg: &[u8], alg: Algorithm) -> Vec<u8> {
    match alg {
        Algorithm::HmacSha1 => mac_bytes::<Hmac<Sha1>>(key, &[msg]),
        Algorithm::HmacSha256 => mac_bytes::<Hmac<Sha256>>(key, &[msg]),
    }
}

fn tag_matches(key: &[u8], msg: &[u8], tag: &[u8], alg: Algorithm) -> bool {
    match alg {
        Algorithm::HmacSha1 => mac_matches::<Hmac<Sha1>>(key, &[msg], tag),
        Algorithm::HmacSha256 => mac_matches::<Hmac<Sha256>>(key, &[msg], tag),
    }
}

/// Whether `X-Twilio-Signature` is present and a tag of the algorithm's length: checked
/// before anything is looked up, so garbage costs no query.
pub fn check_signature_header(signature: Option<&str>, alg: Algorithm) -> Result<(), VerifyError> {
    decode_signature(signature, alg).map(|_| ())
}

/// Strict (canonical, padded) base64 makes "decode then compare bytes" accept exactly
/// the strings the SDKs' string comparison accepts.
fn decode_signature(signature: Option<&str>, alg: Algorithm) -> Result<Vec<u8>, VerifyError> {
    let signature = signature.ok_or(VerifyError::MissingHeader(SIGNATURE_HEADER))?;
    match STANDARD.decode(signature) {
        Ok(tag) if tag.len() == alg.tag_len() => Ok(tag),
        _ => Err(VerifyError::MalformedHeader(SIGNATURE_HEADER)),
    }
}

fn check_body_hash(url: &str, body: &[u8]) -> Result<(), VerifyError> {
    let claimed = query_param(url, BODY_HASH_PARAM).ok_or(VerifyError::MalformedHeader(BODY_HASH_PARAM))?;
    let actual = hex::encode(Sha256::digest(body));
    if bool::from(actual.as_bytes().ct_eq(claimed.as_bytes())) { Ok(()) } else { Err(VerifyError::BodyHashMismatch) }
}

/// First value of `name` in the query string; the first wins, as in twilio-python.
fn query_param(url: &str, name: &str) -> Option<String> {
    let (_, after) = url.split_once('?')?;
    let query = after.split_once('#').map_or(after, |(q, _)| q);
    form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == name).map(|(_, value)| value.into_owned())
}

/// Byte range of the host inside `authority`: after any userinfo, before any port.
fn host_range(authority: &str) -> Range<usize> {
    let start = authority.rfind('@').map_or(0, |at| at + 1);
    // A colon inside IPv6 brackets belongs to the host, not to a port.
    let end = authority[start..]
        .rfind(':')
        .map(|i| start + i)
        .filter(|&i| !authority[i..].contains(']'))
        .unwrap_or(authority.len());
    start..end
}

/// A URL cut around its port, by hand so that every other byte stays as given.
struct UrlParts<'a> {
    scheme: &'a str,
    /// `scheme://userinfo@host`, without the port.
    head: &'a str,
    port: Option<&'a str>,
    /// Path, query and fragment.
    tail: &'a str,
}

impl<'a> UrlParts<'a> {
    /// `None` for anything `url` refuses or that has no `scheme://authority`, so odd
    /// input falls back to the URL as given instead of a guessed rewrite.
    fn split(url: &'a str) -> Option<Self> {
        url::Url::parse(url).ok().filter(url::Url::has_host)?;
        let (scheme, after_scheme) = url.split_once("://")?;
        // `url` treats `\` as a path separator in http(s) URLs, so the authority ends there too.
        let authority_len = after_scheme.find(['/', '\\', '?', '#']).unwrap_or(after_scheme.len());
        let authority = &after_scheme[..authority_len];
        let host = host_range(authority);
        if host.is_empty() {
            return None;
        }
        Some(Self {
            scheme,
            head: &url[..scheme.len() + "://".len() + host.end],
            port: authority.get(host.end + 1..),
            tail: &after_scheme[authority_len..],
        })
    }

    fn default_port(&self) -> u16 {
        if self.scheme.eq_ignore_ascii_case("https") { 443 } else { 80 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::test_support::{byte_flips, str_flips};

    const TOKEN: &str = "12345";
    const U: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect()
    }

    /// Base params P of the official vectors.
    fn p() -> Vec<(String, String)> {
        pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ])
    }

    fn form(body: &str) -> Vec<(String, String)> {
        decode(body.as_bytes())
    }

    fn decode(raw: &[u8]) -> Vec<(String, String)> {
        form_urlencoded::parse(raw).map(|(n, v)| (n.into_owned(), v.into_owned())).collect()
    }

    fn sha1_form(url: &str, params: &[(String, String)], sig: &str) -> Result<(), VerifyError> {
        verify_form(&[TOKEN], url, params, Some(sig), Algorithm::HmacSha1)
    }

    // ---- §1.2 official vectors -------------------------------------------------------------

    #[test]
    fn row1_compute_signature() {
        assert_eq!(compute_signature(TOKEN, U, &p(), Algorithm::HmacSha1), "RSOYDt4T1cUTdK1PDd93/VVr8B8=");
        assert_eq!(sha1_form(U, &p(), "RSOYDt4T1cUTdK1PDd93/VVr8B8="), Ok(()));
    }

    #[test]
    fn row1_signed_string() {
        assert_eq!(
            signed_string(U, &p()),
            "https://mycompany.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+14158675309\
             Digits1234From+14158675309To+18005551212"
        );
    }

    #[test]
    fn row2_adds_port_on_https() {
        assert_eq!(sha1_form(U, &p(), "kvajT1Ptam85bY51eRf/AJRuM3w="), Ok(()));
    }

    #[test]
    fn row3_adds_port_on_http() {
        let url = "http://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(sha1_form(url, &p(), "0ZXoZLH/DfblKGATFgpif+LLRf4="), Ok(()));
    }

    #[test]
    fn row4_keeps_non_default_port_on_http() {
        let url = "http://mycompany.com:1234/myapp.php?foo=1&bar=2";
        assert_eq!(sha1_form(url, &p(), "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="), Ok(()));
    }

    #[test]
    fn row5_removes_any_port_on_https() {
        let url = "https://mycompany.com:1234/myapp.php?foo=1&bar=2";
        assert_eq!(sha1_form(url, &p(), "RSOYDt4T1cUTdK1PDd93/VVr8B8="), Ok(()));
    }

    #[test]
    fn row6_duplicate_values_are_deduplicated_and_sorted() {
        let params = pairs(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]);
        assert_eq!(
            signed_string(U, &params),
            "https://mycompany.com/myapp.php?foo=1&bar=2Digits1234Digits5678SidCA123SidAccountAC123"
        );
        assert_eq!(sha1_form(U, &params, "IK+Dwps556ElfBT0I3Rgjkr1wJU="), Ok(()));
    }

    #[test]
    fn row7_array_param_in_either_order() {
        let sig = "83O6e2vORAoJHUNzJjDWN1jz+BA=";
        let name = "MessagingBinding.Address";
        let ab = pairs(&[(name, "+1325xxxxxxx"), (name, "+1415xxxxxxx")]);
        let ba = pairs(&[(name, "+1415xxxxxxx"), (name, "+1325xxxxxxx")]);
        assert_eq!(sha1_form(U, &ab, sig), Ok(()));
        assert_eq!(sha1_form(U, &ba, sig), Ok(()));
    }

    #[test]
    fn row8_and_row9_userinfo_with_and_without_port() {
        let url = "https://user:pass@mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(sha1_form(url, &p(), "CukzLTc1tT5dXEDIHm/tKBanW10="), Ok(()));
        assert_eq!(sha1_form(url, &p(), "ZQFR1PTIZXF2MXB8ZnKCvnnA+rI="), Ok(()));
    }

    #[test]
    fn row10_user_only_userinfo() {
        let url = "https://user@mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(sha1_form(url, &p(), "2YRLlVAflCqxaNicjMpJcSTgzSs="), Ok(()));
    }

    /// Twilio signed the `%27` form; node accepts the `'` form only through a legacy
    /// querystring re-encoding. Like twilio-python 9.13 we never re-encode the query.
    #[test]
    fn row11_apostrophe_in_query_is_rejected_like_twilio_python() {
        let sig = "TfZzewPq8wqrGlMfyAud8+/IvJ0=";
        let raw = format!("{U}&Body=It's+amazing");
        assert_eq!(sha1_form(&raw, &p(), sig), Err(VerifyError::Mismatch));
        let encoded = format!("{U}&Body=It%27s+amazing");
        assert_eq!(sha1_form(&encoded, &p(), sig), Ok(()));
    }

    #[test]
    fn sharedkey_sha256_variant_of_row1() {
        let sig = "033hgUJA9M/hXIZsYjwkerEP/DBm35nEri5FhCYjA5s=";
        assert_eq!(compute_signature(TOKEN, U, &p(), Algorithm::HmacSha256), sig);
        let res = verify_form(&[TOKEN], U, &p(), Some(sig), Algorithm::HmacSha256);
        assert_eq!(res, Ok(()));
    }

    #[test]
    fn wrong_token_is_rejected() {
        let res = verify_form(&["54321"], U, &p(), Some("RSOYDt4T1cUTdK1PDd93/VVr8B8="), Algorithm::HmacSha1);
        assert_eq!(res, Err(VerifyError::Mismatch));
    }

    #[test]
    fn any_of_several_keys_may_match() {
        let res = verify_form(&["wrong", TOKEN], U, &p(), Some("RSOYDt4T1cUTdK1PDd93/VVr8B8="), Algorithm::HmacSha1);
        assert_eq!(res, Ok(()));
        assert_eq!(
            verify_form(&[], U, &p(), Some("RSOYDt4T1cUTdK1PDd93/VVr8B8="), Algorithm::HmacSha1),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn sha1_signature_under_sha256_settings_is_refused() {
        let res = verify_form(&[TOKEN], U, &p(), Some("RSOYDt4T1cUTdK1PDd93/VVr8B8="), Algorithm::HmacSha256);
        assert_eq!(res, Err(VerifyError::MalformedHeader(SIGNATURE_HEADER)));
    }

    // ---- JSON-body vectors ------------------------------------------------------------------

    const JSON_BODY: &[u8] = br#"{"property": "value", "boolean": true}"#;
    const JSON_HASH: &str = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
    const EMPTY_HASH: &str = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

    fn sha1_json(url: &str, body: &[u8], sig: &str) -> Result<(), VerifyError> {
        verify_json(&[TOKEN], url, body, Some(sig), Algorithm::HmacSha1)
    }

    #[test]
    fn json_row1() {
        let url = format!("{U}&bodySHA256={JSON_HASH}");
        assert_eq!(sha1_json(&url, JSON_BODY, "a9nBmqA0ju/hNViExpshrM61xv4="), Ok(()));
    }

    #[test]
    fn json_row2_empty_object_signed_with_port() {
        let url = format!("{U}&bodySHA256={EMPTY_HASH}");
        assert_eq!(sha1_json(&url, b"{}", "Ldidvp12m26NI7eqEvxnEpkd9Hc="), Ok(()));
    }

    #[test]
    fn json_row3_hash_is_the_only_query_param() {
        let url = format!("https://mycompany.com/myapp.php?bodySHA256={JSON_HASH}");
        assert_eq!(sha1_json(&url, JSON_BODY, "y77kIzt2vzLz71DgmJGsen2scGs="), Ok(()));
    }

    #[test]
    fn json_body_hash_mismatch() {
        let url = format!("{U}&bodySHA256={JSON_HASH}");
        let res = sha1_json(&url, b"{}", "a9nBmqA0ju/hNViExpshrM61xv4=");
        assert_eq!(res, Err(VerifyError::BodyHashMismatch));
    }

    #[test]
    fn json_uppercase_hash_is_refused() {
        let url = format!("{U}&bodySHA256={}", JSON_HASH.to_ascii_uppercase());
        let res = sha1_json(&url, JSON_BODY, "a9nBmqA0ju/hNViExpshrM61xv4=");
        assert_eq!(res, Err(VerifyError::BodyHashMismatch));
    }

    #[test]
    fn json_without_body_hash_param() {
        let res = sha1_json(U, JSON_BODY, "a9nBmqA0ju/hNViExpshrM61xv4=");
        assert_eq!(res, Err(VerifyError::MalformedHeader("bodySHA256")));
    }

    #[test]
    fn json_missing_signature() {
        let url = format!("{U}&bodySHA256={JSON_HASH}");
        let res = verify_json(&[TOKEN], &url, JSON_BODY, None, Algorithm::HmacSha1);
        assert_eq!(res, Err(VerifyError::MissingHeader(SIGNATURE_HEADER)));
    }

    // ---- §1.3 realistic callbacks -----------------------------------------------------------

    const FRESH_TOKEN: &str = "0123456789abcdef0123456789abcdef";
    const T1_URL: &str = "https://hooks.example.com/twilio/voice/status";
    const T1_BODY: &str = "AccountSid=AC00000000000000000000000000000001&ApiVersion=2010-04-01&CallSid=CA11111111111111111111111111111111&CallStatus=completed&CallDuration=42&Duration=1&Called=%2B15005550006&Caller=%2B14155552671&From=%2B14155552671&To=%2B15005550006&Direction=outbound-api&Timestamp=Tue%2C+25+Nov+2025+12%3A00%3A05+%2B0000&CallbackSource=call-progress-events&SequenceNumber=3&SipResponseCode=200";
    const T2_URL: &str = "https://hooks.example.com/twilio/voice/status?tenant=acme&call_ref=42";
    const T2_BODY: &str = "AccountSid=AC00000000000000000000000000000001&ApiVersion=2010-04-01&CallSid=CA11111111111111111111111111111111&CallStatus=ringing&Called=%2B15005550006&Caller=%2B14155552671&From=%2B14155552671&To=%2B15005550006&Direction=outbound-api&Timestamp=Tue%2C+25+Nov+2025+12%3A00%3A01+%2B0000&CallbackSource=call-progress-events&SequenceNumber=1";
    const T3_URL: &str = "https://hooks.example.com/twilio/voice/recording";
    const T3_BODY: &str = "AccountSid=AC00000000000000000000000000000001&CallSid=CA11111111111111111111111111111111&RecordingSid=RE22222222222222222222222222222222&RecordingUrl=https%3A%2F%2Fapi.twilio.com%2F2010-04-01%2FAccounts%2FAC00000000000000000000000000000001%2FRecordings%2FRE22222222222222222222222222222222&RecordingStatus=completed&RecordingDuration=37&RecordingChannels=2&RecordingStartTime=Tue%2C+25+Nov+2025+12%3A00%3A08+%2B0000&RecordingSource=OutboundAPI&RecordingTrack=both&ErrorCode=0";

    /// (url, body, sig over url as given, sig over url with :443, SHA-256 sig)
    const FRESH: [(&str, &str, &str, &str, &str); 3] = [
        (
            T1_URL,
            T1_BODY,
            "mVbLwaz35lPTDgI8N8aXVXu6Tac=",
            "SsmleX7RsIOHyovGEV050XD7g6I=",
            "5uETQ4ga568lQwk+nBGpXdcTxhWdiD1sg6MaQiOrX/c=",
        ),
        (
            T2_URL,
            T2_BODY,
            "P/DzH3PZVsxyHWDsTuRJLQ0+Irs=",
            "gbqcybxaaEXnLBeYtUqtAIeSE20=",
            "OfFNGQqYhSZZZtOKiA6yRady+08dZySSFacNfgLKgR0=",
        ),
        (
            T3_URL,
            T3_BODY,
            "dG4rPWx2pqbg7EF3f+zT7Ieo3sk=",
            "1jR1+gOXYsHhwRIzsqdjyaSC+6s=",
            "fP+cUZqHdFBJJRwNbSwh0bFg1/5Wv5Js5K3wdm0PgdU=",
        ),
    ];

    fn fresh_form(url: &str, body: &str, sig: &str, alg: Algorithm) -> Result<(), VerifyError> {
        verify_form(&[FRESH_TOKEN], url, &form(body), Some(sig), alg)
    }

    #[test]
    fn t1_signed_string() {
        assert_eq!(
            signed_string(T1_URL, &form(T1_BODY)),
            "https://hooks.example.com/twilio/voice/statusAccountSidAC00000000000000000000000000000001\
             ApiVersion2010-04-01CallDuration42CallSidCA11111111111111111111111111111111\
             CallStatuscompletedCallbackSourcecall-progress-eventsCalled+15005550006\
             Caller+14155552671Directionoutbound-apiDuration1From+14155552671SequenceNumber3\
             SipResponseCode200TimestampTue, 25 Nov 2025 12:00:05 +0000To+15005550006"
        );
    }

    #[test]
    fn fresh_vectors_all_columns() {
        for (url, body, plain, with_port, sha256) in FRESH {
            let params = form(body);
            assert_eq!(compute_signature(FRESH_TOKEN, url, &params, Algorithm::HmacSha1), plain);
            let url_443 = url.replacen(".com/", ".com:443/", 1);
            let sig_443 = compute_signature(FRESH_TOKEN, &url_443, &params, Algorithm::HmacSha1);
            assert_eq!(sig_443, with_port, "{url}");
            for sig in [plain, with_port] {
                assert_eq!(fresh_form(url, body, sig, Algorithm::HmacSha1), Ok(()), "{url}");
            }
            assert_eq!(fresh_form(url, body, sha256, Algorithm::HmacSha256), Ok(()), "{url}");
            let wrong_alg = fresh_form(url, body, plain, Algorithm::HmacSha256);
            assert!(wrong_alg.is_err(), "{url}");
        }
    }

    #[test]
    fn fresh_vectors_reject_a_swapped_body() {
        let res = fresh_form(T1_URL, T3_BODY, FRESH[0].2, Algorithm::HmacSha1);
        assert_eq!(res, Err(VerifyError::Mismatch));
    }

    // ---- exhaustive single-byte corruption --------------------------------------------------

    /// Twilio signs the form-decoded values, so a flip that decodes to the same params
    /// (only `%2B` -> `%2b`) is the same request, not a forgery; everything else must fail.
    #[test]
    fn every_body_byte_flip_is_rejected() {
        for (url, body, sig, _, _) in FRESH {
            let original = decode(body.as_bytes());
            for (i, flipped) in byte_flips(body.as_bytes()) {
                let params = decode(&flipped);
                if params == original {
                    let (was, now) = (body.as_bytes()[i], flipped[i]);
                    assert!(was.is_ascii_hexdigit() && was.eq_ignore_ascii_case(&now));
                    let escape = &body.as_bytes()[i.saturating_sub(2)..i];
                    assert!(escape.contains(&b'%'), "{url}: byte {i} is not in an escape");
                    continue;
                }
                let res = verify_form(&[FRESH_TOKEN], url, &params, Some(sig), Algorithm::HmacSha1);
                assert!(res.is_err(), "{url}: body byte {i} accepted");
            }
        }
    }

    #[test]
    fn every_signature_byte_flip_is_rejected() {
        for (url, body, plain, with_port, sha256) in FRESH {
            let params = form(body);
            let cases =
                [(plain, Algorithm::HmacSha1), (with_port, Algorithm::HmacSha1), (sha256, Algorithm::HmacSha256)];
            for (sig, alg) in cases {
                for (i, bad) in str_flips(sig) {
                    let res = verify_form(&[FRESH_TOKEN], url, &params, Some(&bad), alg);
                    assert!(res.is_err(), "{url}: signature byte {i} accepted");
                }
            }
        }
    }

    #[test]
    fn every_url_byte_flip_is_rejected() {
        for (url, body, plain, with_port, _) in FRESH {
            let params = form(body);
            for sig in [plain, with_port] {
                for (i, bad) in str_flips(url) {
                    let res = verify_form(&[FRESH_TOKEN], &bad, &params, Some(sig), Algorithm::HmacSha1);
                    assert!(res.is_err(), "{url}: url byte {i} accepted ({bad})");
                }
            }
        }
    }

    #[test]
    fn every_json_byte_flip_is_rejected() {
        let url = format!("{U}&bodySHA256={JSON_HASH}");
        let sig = "a9nBmqA0ju/hNViExpshrM61xv4=";
        for (i, bad) in byte_flips(JSON_BODY) {
            assert!(sha1_json(&url, &bad, sig).is_err(), "body byte {i}");
        }
        for (i, bad) in str_flips(&url) {
            assert!(sha1_json(&bad, JSON_BODY, sig).is_err(), "url byte {i}");
        }
        for (i, bad) in str_flips(sig) {
            assert!(sha1_json(&url, JSON_BODY, &bad).is_err(), "signature byte {i}");
        }
    }

    // ---- url_candidates ---------------------------------------------------------------------

    #[test]
    fn candidates_add_default_port() {
        assert_eq!(url_candidates(U), [U, "https://mycompany.com:443/myapp.php?foo=1&bar=2"]);
        assert_eq!(url_candidates("http://a.example/x"), ["http://a.example/x", "http://a.example:80/x"]);
    }

    #[test]
    fn candidates_strip_any_port() {
        assert_eq!(
            url_candidates("https://a.example:8443/x?y=1"),
            ["https://a.example:8443/x?y=1", "https://a.example/x?y=1"]
        );
        assert_eq!(url_candidates("https://a.example:443"), ["https://a.example:443", "https://a.example"]);
    }

    #[test]
    fn candidates_keep_userinfo_and_raw_query() {
        assert_eq!(
            url_candidates("https://u:p@a.example/x?b=It's+ok&a=%7e#frag"),
            ["https://u:p@a.example/x?b=It's+ok&a=%7e#frag", "https://u:p@a.example:443/x?b=It's+ok&a=%7e#frag"]
        );
        assert_eq!(
            url_candidates("https://u:p@a.example:9/x"),
            ["https://u:p@a.example:9/x", "https://u:p@a.example/x"]
        );
    }

    #[test]
    fn candidates_handle_ipv6_hosts() {
        assert_eq!(url_candidates("http://[::1]/x"), ["http://[::1]/x", "http://[::1]:80/x"]);
        assert_eq!(url_candidates("http://[::1]:8080/x"), ["http://[::1]:8080/x", "http://[::1]/x"]);
    }

    #[test]
    fn unparseable_urls_are_returned_as_given() {
        for url in [
            "",
            "not a url",
            "/relative/path?x=1",
            "https://",
            "https://host:99999/x",
            "mailto:someone@example.com",
            "https://exa mple.com/",
            "\u{0}://\u{ffff}",
        ] {
            assert_eq!(url_candidates(url), [url], "{url:?}");
        }
    }

    #[test]
    fn urls_without_an_authority_are_returned_as_given() {
        for url in ["https:///mycompany.com/x", "https:mycompany.com/x", "https://u@:443/x"] {
            assert_eq!(url_candidates(url), [url], "{url:?}");
        }
    }

    #[test]
    fn backslash_ends_the_authority() {
        assert_eq!(url_candidates("https://a.example\\x"), ["https://a.example\\x", "https://a.example:443\\x"]);
    }

    // ---- headers ----------------------------------------------------------------------------

    #[test]
    fn forms_are_parsed_in_body_order() {
        let pairs = parse_form(b"CallSid=CA1&From=%2B1415&Empty=&&Flag").unwrap();
        assert_eq!(
            pairs,
            vec![
                ("CallSid".into(), "CA1".into()),
                ("From".into(), "+1415".into()),
                ("Empty".into(), String::new()),
                ("Flag".into(), String::new()),
            ]
        );
        assert_eq!(parse_form(b"").unwrap(), vec![]);
    }

    #[test]
    fn forms_with_too_many_params_are_refused_without_decoding() {
        let at_cap =
            vec!["a%20b=c"; MAX_FORM_PARAMS].iter().enumerate().map(|(i, p)| format!("{i}{p}")).collect::<Vec<_>>();
        assert_eq!(parse_form(at_cap.join("&").as_bytes()).map(|p| p.len()), Ok(MAX_FORM_PARAMS));
        let hostile = "=&".repeat(150_000);
        assert_eq!(parse_form(hostile.as_bytes()), Err(FormError::TooManyParams(MAX_FORM_PARAMS)));
        // Empty segments are not parameters, as form_urlencoded reads them.
        assert_eq!(parse_form("&".repeat(100_000).as_bytes()), Ok(vec![]));
    }

    #[test]
    fn forms_that_repeat_a_name_are_refused_naming_it_briefly() {
        assert_eq!(parse_form(b"A=1&B=2&A=3"), Err(FormError::DuplicateName("A".into())));
        let long = format!("{0}=1&{0}=2", "n".repeat(1000));
        let err = parse_form(long.as_bytes()).unwrap_err();
        assert_eq!(err, FormError::DuplicateName("n".repeat(64)));
    }

    #[test]
    fn settings_header() {
        assert_eq!(algorithm_from_settings(None), Ok(Algorithm::HmacSha1));
        let sha256 = Ok(Algorithm::HmacSha256);
        assert_eq!(algorithm_from_settings(Some("key=KS123,algorithm=HMAC_SHA256")), sha256);
        assert_eq!(algorithm_from_settings(Some("algorithm=hmac_sha256, key=KS1")), sha256);
        assert_eq!(algorithm_from_settings(Some("key=KS1,algorithm=HMAC_SHA1")), Ok(Algorithm::HmacSha1));
        let malformed = Err(VerifyError::MalformedHeader(SIGNATURE_SETTINGS_HEADER));
        for bad in ["", "key=KS1", "algorithm=MD5", "algorithm", ",,,", "algorithm=HMAC_SHA512"] {
            assert_eq!(algorithm_from_settings(Some(bad)), malformed, "{bad:?}");
        }
    }

    #[test]
    fn missing_and_malformed_signatures() {
        assert_eq!(
            verify_form(&[TOKEN], U, &p(), None, Algorithm::HmacSha1),
            Err(VerifyError::MissingHeader(SIGNATURE_HEADER))
        );
        let malformed = Err(VerifyError::MalformedHeader(SIGNATURE_HEADER));
        for bad in [
            "",
            "not base64!",
            "RSOYDt4T1cUTdK1PDd93/VVr8B8",
            "RSOYDt4T1cUTdK1PDd93/VVr8B8==",
            "RSOYDt4T1cUTdK1PDd93/VVr8B9=",
            "QUJD",
            "\u{fffd}\u{0}",
        ] {
            assert_eq!(sha1_form(U, &p(), bad), malformed, "{bad:?}");
        }
    }

    // ---- SharedKey signing (Webhooks Rules) -------------------------------------------------

    const SETTINGS: &str = "key=KS00000000000000000000000000000001,algorithm=HMAC_SHA256";

    fn shared<'a>(list: &[(&'a str, &'a str)]) -> Vec<SharedKey<'a>> {
        list.iter().map(|(id, secret)| SharedKey { id, secret }).collect()
    }

    #[test]
    fn without_the_settings_header_the_auth_token_signs() {
        let keys = signing_keys(None, &["token"], &shared(&[("KS1", "shared")])).unwrap();
        assert_eq!(keys, ["token"]);
    }

    #[test]
    fn the_named_shared_key_signs_and_the_auth_token_does_not() {
        let ks = shared(&[("KS00000000000000000000000000000001", TOKEN), ("KS2", "other")]);
        let keys = signing_keys(Some(SETTINGS), &["auth-token"], &ks).unwrap();
        assert_eq!(keys, [TOKEN]);
        let sig = "033hgUJA9M/hXIZsYjwkerEP/DBm35nEri5FhCYjA5s=";
        let alg = algorithm_from_settings(Some(SETTINGS)).unwrap();
        assert_eq!(verify_form(&keys, U, &p(), Some(sig), alg), Ok(()));
        // The auth token is no longer a key once the header says SharedKey.
        let wrong = shared(&[("KS00000000000000000000000000000001", "auth-token")]);
        let keys = signing_keys(Some(SETTINGS), &[TOKEN], &wrong).unwrap();
        assert_eq!(verify_form(&keys, U, &p(), Some(sig), alg), Err(VerifyError::Mismatch));
    }

    #[test]
    fn with_no_id_match_every_shared_key_is_tried() {
        let ks = shared(&[("KSold", "old"), ("KSnew", TOKEN)]);
        assert_eq!(signing_keys(Some("key=KSunknown,algorithm=HMAC_SHA256"), &[], &ks).unwrap(), ["old", TOKEN]);
        assert_eq!(signing_keys(Some("algorithm=HMAC_SHA256"), &[], &ks).unwrap(), ["old", TOKEN]);
        assert_eq!(shared_key_id("algorithm=HMAC_SHA1, key = KS9 "), Some("KS9"));
        assert_eq!(shared_key_id("key=,algorithm=HMAC_SHA1"), None);
    }

    #[test]
    fn a_shared_key_named_where_none_is_configured_is_refused() {
        assert_eq!(signing_keys(Some(SETTINGS), &[TOKEN], &[]), Err(VerifyError::NoSharedKey));
        assert_eq!(VerifyError::NoSharedKey.code(), "no_shared_key");
    }

    #[test]
    fn odd_params_never_panic() {
        let params = pairs(&[("", ""), ("\u{0}", "\u{ffff}"), ("é", "ü"), ("a", "")]);
        let sig = compute_signature(TOKEN, "\u{0}", &params, Algorithm::HmacSha256);
        let res = verify_form(&[TOKEN, ""], "\u{0}", &params, Some(&sig), Algorithm::HmacSha256);
        assert_eq!(res, Ok(()));
    }
}
