//! A local stand-in for Twilio's REST API: a real HTTP server in the test that
//! serves the JSON shapes Twilio documents (Intelligence v2 Transcripts and
//! Sentences, with pagination; the 2010-04-01 Recording resource), checks HTTP
//! Basic like Twilio (401 with Twilio's error body), answers 404 for what it
//! does not hold, and can be told to fail a path a few times (429, 5xx) or to
//! hold a transcript `in-progress`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use serde_json::{Value, json};

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub query: String,
    pub user_agent: Option<String>,
    /// The `user:password` of the Basic header, decoded.
    pub basic: Option<String>,
}

#[derive(Default)]
struct Data {
    account_sid: String,
    auth_token: String,
    transcripts: HashMap<String, Value>,
    sentences: HashMap<String, Vec<Value>>,
    recordings: HashMap<String, Value>,
    /// Statuses a transcript shows on its next reads, before its own.
    statuses: HashMap<String, VecDeque<String>>,
    /// Status codes to answer, in turn, for requests whose path starts with the key.
    failures: Vec<(String, VecDeque<u16>)>,
    seen: Vec<Seen>,
}

#[derive(Clone)]
pub struct TwilioStandIn {
    pub base: String,
    data: Arc<Mutex<Data>>,
    server: tokio::task::AbortHandle,
}

impl Drop for TwilioStandIn {
    fn drop(&mut self) {
        if Arc::strong_count(&self.data) == 1 {
            self.server.abort();
        }
    }
}

pub const SERVICE_SID: &str = "GA00000000000000000000000000000001";

impl TwilioStandIn {
    /// Listens on a free local port, accepting the account's SID and token only.
    pub async fn start(account_sid: &str, auth_token: &str) -> TwilioStandIn {
        let data = Arc::new(Mutex::new(Data {
            account_sid: account_sid.into(),
            auth_token: auth_token.into(),
            ..Default::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let base = format!("http://{addr}");
        let app = Router::new()
            .route("/v2/Transcripts/{sid}", get(transcript))
            .route("/v2/Transcripts/{sid}/Sentences", get(sentences))
            .route("/2010-04-01/Accounts/{account}/Recordings/{file}", get(recording))
            .fallback(|| async { not_found() })
            .with_state((data.clone(), base.clone()));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        })
        .abort_handle();
        TwilioStandIn { base, data, server }
    }

    /// A transcript as `GET /v2/Transcripts/{sid}` returns it, with its sentences.
    /// `participants` are `(channel_participant, role)`.
    pub fn add_transcript(
        &self,
        sid: &str,
        status: &str,
        customer_key: Option<&str>,
        recording_sid: Option<&str>,
        participants: &[(i64, &str)],
        sentences: &[(i64, &str)],
    ) {
        let mut d = self.data.lock().unwrap();
        let account = d.account_sid.clone();
        let participants: Vec<Value> = participants
            .iter()
            .map(|(channel, role)| {
                json!({"channel_participant": channel, "media_participant_id": format!("+1415555000{channel}"),
                       "role": role, "full_name": null, "user_id": null, "image_url": null})
            })
            .collect();
        let transcript = json!({
            "account_sid": account, "service_sid": SERVICE_SID, "sid": sid,
            "date_created": "2025-11-25T12:05:00Z", "date_updated": "2025-11-25T12:06:00Z",
            "status": status, "customer_key": customer_key, "data_logging": false,
            "language_code": "en-US", "media_start_time": null, "duration": 125, "redaction": true,
            "channel": {"media_properties": {"source": "Recording", "source_sid": recording_sid,
                                              "media_url": null},
                        "participants": participants},
            "url": format!("https://intelligence.twilio.com/v2/Transcripts/{sid}"),
            "links": {"sentences": format!("https://intelligence.twilio.com/v2/Transcripts/{sid}/Sentences"),
                      "media": format!("https://intelligence.twilio.com/v2/Transcripts/{sid}/Media"),
                      "operator_results": format!("https://intelligence.twilio.com/v2/Transcripts/{sid}/OperatorResults")}
        });
        let sentences: Vec<Value> = sentences
            .iter()
            .enumerate()
            .map(|(i, (channel, text))| {
                json!({"media_channel": channel, "sentence_index": i, "start_time": format!("{}.5", i * 3),
                       "end_time": format!("{}.1", i * 3 + 2), "transcript": text,
                       "sid": format!("GX{:032x}", i), "confidence": "0.93", "words": []})
            })
            .collect();
        d.transcripts.insert(sid.into(), transcript);
        d.sentences.insert(sid.into(), sentences);
    }

    /// The transcript shows these statuses on its next reads (one each), then its own.
    pub fn first_show(&self, sid: &str, statuses: &[&str]) {
        let queue = statuses.iter().map(|s| s.to_string()).collect();
        self.data.lock().unwrap().statuses.insert(sid.into(), queue);
    }

    /// Changes a transcript's `status` (e.g. from `in-progress` to `completed`).
    pub fn set_status(&self, sid: &str, status: &str) {
        let mut d = self.data.lock().unwrap();
        if let Some(t) = d.transcripts.get_mut(sid) {
            t["status"] = json!(status);
        }
    }

    pub fn add_recording(&self, recording_sid: &str, call_sid: &str) {
        let mut d = self.data.lock().unwrap();
        let account = d.account_sid.clone();
        let recording = json!({
            "account_sid": account, "api_version": "2010-04-01", "call_sid": call_sid,
            "conference_sid": null, "date_created": "Tue, 25 Nov 2025 12:00:08 +0000",
            "date_updated": "Tue, 25 Nov 2025 12:02:13 +0000", "start_time": "Tue, 25 Nov 2025 12:00:08 +0000",
            "duration": "125", "sid": recording_sid, "price": null, "price_unit": "USD", "status": "completed",
            "channels": 2, "source": "DialVerb", "error_code": null, "track": "both",
            "uri": format!("/2010-04-01/Accounts/{account}/Recordings/{recording_sid}.json"),
            "encryption_details": null,
            "subresource_uris": {}, "media_url": format!("https://api.twilio.com/2010-04-01/Accounts/{account}/Recordings/{recording_sid}")
        });
        d.recordings.insert(recording_sid.into(), recording);
    }

    /// The next requests whose path starts with `prefix` get these statuses, in turn.
    pub fn fail(&self, prefix: &str, statuses: &[u16]) {
        self.data.lock().unwrap().failures.push((prefix.into(), statuses.iter().copied().collect()));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.data.lock().unwrap().seen.clone()
    }
}

type Shared = (Arc<Mutex<Data>>, String);

fn twilio_error(status: StatusCode, code: u32, message: &str) -> Response {
    let body = json!({"code": code, "message": message,
                      "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status.as_u16()});
    (status, axum::Json(body)).into_response()
}

fn not_found() -> Response {
    twilio_error(StatusCode::NOT_FOUND, 20404, "The requested resource was not found")
}

/// Records the request, applies an injected failure, checks the credentials.
fn admit(d: &mut Data, path: &str, query: &str, headers: &HeaderMap) -> Option<Response> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let basic = header("authorization")
        .and_then(|h| h.strip_prefix("Basic ").map(str::to_string))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    d.seen.push(Seen {
        path: path.into(),
        query: query.into(),
        user_agent: header("user-agent"),
        basic: basic.clone(),
    });
    if let Some((_, queue)) = d.failures.iter_mut().find(|(p, q)| path.starts_with(p.as_str()) && !q.is_empty()) {
        let status = StatusCode::from_u16(queue.pop_front().unwrap()).unwrap();
        return Some(twilio_error(status, 20500, "Injected failure"));
    }
    if basic.as_deref() != Some(&format!("{}:{}", d.account_sid, d.auth_token)) {
        return Some(twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate"));
    }
    None
}

async fn transcript(State((data, _)): State<Shared>, Path(sid): Path<String>, headers: HeaderMap) -> Response {
    let mut d = data.lock().unwrap();
    if let Some(refused) = admit(&mut d, &format!("/v2/Transcripts/{sid}"), "", &headers) {
        return refused;
    }
    let shown = d.statuses.get_mut(&sid).and_then(VecDeque::pop_front);
    let Some(mut t) = d.transcripts.get(&sid).cloned() else { return not_found() };
    if let Some(status) = shown {
        t["status"] = json!(status);
    }
    axum::Json(t).into_response()
}

async fn sentences(
    State((data, base)): State<Shared>,
    Path(sid): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut d = data.lock().unwrap();
    let path = format!("/v2/Transcripts/{sid}/Sentences");
    let query: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if let Some(refused) = admit(&mut d, &path, &query.join("&"), &headers) {
        return refused;
    }
    let Some(all) = d.sentences.get(&sid) else { return not_found() };
    let size: usize = q.get("PageSize").and_then(|s| s.parse().ok()).unwrap_or(50).clamp(1, 5000);
    let page: usize = q.get("Page").and_then(|s| s.parse().ok()).unwrap_or(0);
    let start = page * size;
    let items: Vec<Value> = all.iter().skip(start).take(size).cloned().collect();
    let url = |p: usize| format!("{base}{path}?PageSize={size}&Page={p}&PageToken=PT{p:032x}");
    let next = (start + size < all.len()).then(|| url(page + 1));
    let previous = (page > 0).then(|| url(page - 1));
    axum::Json(json!({
        "sentences": items,
        "meta": {"page": page, "page_size": size, "first_page_url": format!("{base}{path}?PageSize={size}&Page=0"),
                 "previous_page_url": previous, "url": url(page), "next_page_url": next, "key": "sentences"}
    }))
    .into_response()
}

async fn recording(
    State((data, _)): State<Shared>,
    Path((account, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut d = data.lock().unwrap();
    let path = format!("/2010-04-01/Accounts/{account}/Recordings/{file}");
    if let Some(refused) = admit(&mut d, &path, "", &headers) {
        return refused;
    }
    let Some(sid) = file.strip_suffix(".json") else { return not_found() };
    if account != d.account_sid {
        return not_found();
    }
    d.recordings.get(sid).map_or_else(not_found, |r| axum::Json(r.clone()).into_response())
}
