//! The one client of Twilio's REST API: what the calls worker reads after an
//! Intelligence "transcript available" webhook (CONTRACT section 4).
//!
//! Only the worker calls it, never the ingress: a webhook is answered as soon as
//! it is durable. Every request is a GET with HTTP Basic (the business's
//! `account_sid` and `auth_token`, never logged), a `User-Agent`, a connect and
//! a total timeout, no redirects, and an answer read under a size limit. Its
//! failures come in two kinds the worker can act on: [`ApiFailure::Retry`]
//! (429, 5xx, 408, timeouts, connection trouble) and [`ApiFailure::Park`]
//! (401/403/404 and any other answer that a retry cannot change).

use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::Secret;

/// `User-Agent` of every request: Twilio's support can tell our traffic apart.
pub const USER_AGENT: &str = concat!("micro8gents/", env!("CARGO_PKG_VERSION"), " (webhook worker)");
/// The most a single answer may be; a page of 1000 sentences is far below.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Sentences asked for per page (Twilio allows up to 5000).
const PAGE_SIZE: u32 = 1000;
/// A transcript has at most this many pages; more is a loop, not a call.
const MAX_PAGES: usize = 200;

/// Installs `ring` as the process's TLS crypto provider, once. reqwest is built
/// without a provider of its own (no aws-lc, no OpenSSL), so every process and
/// test that builds a reqwest client calls this first; calling it again is a no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A business's credentials for Twilio's REST API. The token never prints.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub account_sid: String,
    pub auth_token: Secret,
}

/// Why a read of Twilio's API did not give an answer, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiFailure {
    /// Worth trying again later: Twilio is busy, down or unreachable.
    #[error("{0}")]
    Retry(String),
    /// A retry cannot help (wrong credentials, an unknown SID, an answer we
    /// cannot read): park the event with this reason.
    #[error("{0}")]
    Park(String),
}

#[derive(Debug, Clone)]
pub struct TwilioApi {
    http: reqwest::Client,
    api_url: String,
    intelligence_url: String,
}

/// `GET /v2/Transcripts/{sid}`, the fields the worker uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Transcript {
    pub sid: String,
    /// `queued`, `in-progress`, `completed`, `new`, `failed`, `canceled`, `error`.
    pub status: String,
    #[serde(default)]
    pub customer_key: Option<String>,
    #[serde(default)]
    pub date_created: Option<String>,
    #[serde(default)]
    pub channel: Option<Channel>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Channel {
    #[serde(default)]
    pub media_properties: Option<MediaProperties>,
    #[serde(default)]
    pub participants: Vec<Participant>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MediaProperties {
    #[serde(default)]
    pub source: Option<String>,
    /// A Recording SID (`RE…`) when the source is a recording.
    #[serde(default)]
    pub source_sid: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Participant {
    #[serde(default, deserialize_with = "lenient_int")]
    pub channel_participant: Option<i64>,
    #[serde(default)]
    pub role: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Sentence {
    #[serde(default, deserialize_with = "lenient_int")]
    pub media_channel: Option<i64>,
    #[serde(deserialize_with = "required_int")]
    pub sentence_index: i64,
    #[serde(default)]
    pub transcript: String,
}

#[derive(Deserialize)]
struct SentencePage {
    sentences: Vec<Sentence>,
    #[serde(default)]
    meta: Meta,
}

#[derive(Default, Deserialize)]
struct Meta {
    #[serde(default)]
    next_page_url: Option<String>,
}

#[derive(Deserialize)]
struct Recording {
    call_sid: Option<String>,
}

/// Twilio's JSON writes these numbers as numbers, but some of its resources write
/// numbers as strings (`"confidence": "0.93"`); either is read.
fn lenient_int<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match v {
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

fn required_int<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    lenient_int(d)?.ok_or_else(|| serde::de::Error::custom("not a whole number"))
}

impl TwilioApi {
    /// `api_url` is `TWILIO_API_URL`, `intelligence_url` `TWILIO_INTELLIGENCE_URL`
    /// (scheme, host and optional path, no trailing slash needed).
    pub fn new(api_url: &str, intelligence_url: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            // A redirect would carry the credentials elsewhere; Twilio's API does not redirect.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(TwilioApi {
            http,
            api_url: api_url.trim_end_matches('/').to_string(),
            intelligence_url: intelligence_url.trim_end_matches('/').to_string(),
        })
    }

    /// `GET {TWILIO_INTELLIGENCE_URL}/v2/Transcripts/{sid}`.
    pub async fn transcript(&self, creds: &Credentials, sid: &str) -> Result<Transcript, ApiFailure> {
        self.get_json(creds, &format!("{}/v2/Transcripts/{sid}", self.intelligence_url)).await
    }

    /// Every sentence of a transcript, following `meta.next_page_url` to the last page.
    ///
    /// Only the path and query of a next-page URL are used, on the configured
    /// base: the credentials never go to a host named in an answer.
    pub async fn sentences(&self, creds: &Credentials, sid: &str) -> Result<Vec<Sentence>, ApiFailure> {
        let mut url = format!("{}/v2/Transcripts/{sid}/Sentences?PageSize={PAGE_SIZE}", self.intelligence_url);
        let mut all = Vec::new();
        for _ in 0..MAX_PAGES {
            let page: SentencePage = self.get_json(creds, &url).await?;
            all.extend(page.sentences);
            match page.meta.next_page_url.filter(|u| !u.is_empty()) {
                Some(next) => url = self.on_base(&self.intelligence_url, &next)?,
                None => return Ok(all),
            }
        }
        Err(ApiFailure::Park(format!("transcript {sid} has more than {MAX_PAGES} pages of sentences")))
    }

    /// The call a recording belongs to:
    /// `GET {TWILIO_API_URL}/2010-04-01/Accounts/{account_sid}/Recordings/{sid}.json`.
    pub async fn recording_call_sid(&self, creds: &Credentials, recording_sid: &str) -> Result<String, ApiFailure> {
        let url = format!("{}/2010-04-01/Accounts/{}/Recordings/{recording_sid}.json", self.api_url, creds.account_sid);
        let r: Recording = self.get_json(creds, &url).await?;
        r.call_sid
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiFailure::Park(format!("recording {recording_sid} names no call_sid")))
    }

    /// `next` (absolute or not) with its scheme and host replaced by `base`'s.
    fn on_base(&self, base: &str, next: &str) -> Result<String, ApiFailure> {
        let path_and_query = match url::Url::parse(next) {
            Ok(u) => {
                let mut p = u.path().to_string();
                if let Some(q) = u.query() {
                    p.push('?');
                    p.push_str(q);
                }
                p
            }
            Err(_) if next.starts_with('/') => next.to_string(),
            Err(_) => return Err(ApiFailure::Park("Twilio's next_page_url is not a URL".to_string())),
        };
        // A base with a path prefix (a proxy) keeps it; Twilio's own paths start at /v2.
        let base_path = url::Url::parse(base).map(|u| u.path().trim_end_matches('/').to_string()).unwrap_or_default();
        let rest = path_and_query.strip_prefix(&base_path).unwrap_or(&path_and_query);
        Ok(format!("{base}{rest}"))
    }

    async fn get_json<T: DeserializeOwned>(&self, creds: &Credentials, url: &str) -> Result<T, ApiFailure> {
        let what = describe(url);
        let mut answer = self
            .http
            .get(url)
            .basic_auth(&creds.account_sid, Some(creds.auth_token.expose()))
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| ApiFailure::Retry(format!("{what}: {}", transport(&e))))?;
        let status = answer.status();
        if !status.is_success() {
            return Err(classify(status, &what));
        }
        let mut body = Vec::new();
        while let Some(chunk) =
            answer.chunk().await.map_err(|e| ApiFailure::Retry(format!("{what}: {}", transport(&e))))?
        {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(ApiFailure::Park(format!("{what}: the answer is larger than {MAX_ANSWER_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| ApiFailure::Park(format!("{what}: unexpected answer: {e}")))
    }
}

/// What an answer's status means for the event that needed it.
pub fn classify(status: reqwest::StatusCode, what: &str) -> ApiFailure {
    let code = status.as_u16();
    match code {
        401 | 403 => ApiFailure::Park(format!(
            "{what}: Twilio answered {code}: check the business's Twilio account_sid and auth_token"
        )),
        404 => ApiFailure::Park(format!("{what}: Twilio answered 404 (no such resource in this account)")),
        408 | 429 => ApiFailure::Retry(format!("{what}: Twilio answered {code}")),
        500..=599 => ApiFailure::Retry(format!("{what}: Twilio answered {code}")),
        _ => ApiFailure::Park(format!("{what}: Twilio answered {code}")),
    }
}

/// `GET <path>` for messages: the path names the resource; the query (a page
/// token) and the host add nothing a reader needs.
fn describe(url: &str) -> String {
    let path = url::Url::parse(url).map(|u| u.path().to_string()).unwrap_or_else(|_| "?".to_string());
    format!("GET {path}")
}

/// A transport error in words, without the URL (already in the message).
fn transport(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() { kind.to_string() } else { format!("{kind} ({detail})") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_retry_or_park() {
        use reqwest::StatusCode as S;
        for code in [401, 403, 404, 400, 302, 410] {
            let s = S::from_u16(code).unwrap();
            assert!(matches!(classify(s, "GET /x"), ApiFailure::Park(_)), "{code}");
        }
        for code in [408, 429, 500, 502, 503, 504] {
            let s = S::from_u16(code).unwrap();
            assert!(matches!(classify(s, "GET /x"), ApiFailure::Retry(_)), "{code}");
        }
        let ApiFailure::Park(reason) = classify(S::UNAUTHORIZED, "GET /v2/Transcripts/GT1") else { panic!() };
        assert!(reason.contains("401") && reason.contains("auth_token"), "{reason}");
    }

    #[test]
    fn next_pages_stay_on_the_configured_host() {
        let api = TwilioApi::new("http://127.0.0.1:9", "http://127.0.0.1:9/twilio", Duration::from_secs(1)).unwrap();
        let next = "https://evil.example/twilio/v2/Transcripts/GT1/Sentences?PageSize=1&Page=1&PageToken=PT1";
        assert_eq!(
            api.on_base("http://127.0.0.1:9/twilio", next).unwrap(),
            "http://127.0.0.1:9/twilio/v2/Transcripts/GT1/Sentences?PageSize=1&Page=1&PageToken=PT1"
        );
        let twilio = "https://intelligence.twilio.com/v2/Transcripts/GT1/Sentences?Page=2";
        assert_eq!(
            api.on_base("http://127.0.0.1:9/twilio", twilio).unwrap(),
            "http://127.0.0.1:9/twilio/v2/Transcripts/GT1/Sentences?Page=2"
        );
        assert_eq!(
            api.on_base("https://intelligence.twilio.com", "/v2/Transcripts/GT1/Sentences?Page=2").unwrap(),
            "https://intelligence.twilio.com/v2/Transcripts/GT1/Sentences?Page=2"
        );
        assert!(api.on_base("https://intelligence.twilio.com", "Page=2").is_err());
    }

    #[test]
    fn credentials_never_print_the_token() {
        let c = Credentials { account_sid: "AC1".into(), auth_token: Secret::new("s3cret-token") };
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn sentences_read_numbers_written_either_way() {
        let page: SentencePage = serde_json::from_str(
            r#"{"sentences":[{"media_channel":1,"sentence_index":0,"transcript":"Hi."},
                             {"media_channel":"2","sentence_index":"1","transcript":"Hello.","confidence":"0.9"}],
                "meta":{"next_page_url":null}}"#,
        )
        .unwrap();
        assert_eq!(page.sentences[1].media_channel, Some(2));
        assert_eq!(page.sentences[1].sentence_index, 1);
        assert!(page.meta.next_page_url.is_none());
    }
}
