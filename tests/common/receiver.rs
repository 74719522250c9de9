//! A business's n8n, as far as notices go: a local HTTP server that records
//! every notice and checks its Standard Webhooks signature with its own code
//! (HMAC-SHA256 straight from the spec, not the service's signer), and answers
//! as each test scripts it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::Value;

/// How the receiver answers one request on a path.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// The status with a `Retry-After` header.
    RetryAfter(u16, &'static str),
    /// Holds the request this long, then answers 200.
    Hang(Duration),
}

#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub webhook_id: String,
    pub timestamp: i64,
    /// The signature verified against the secret, and the timestamp is within 5 minutes.
    pub verified: bool,
    pub content_type: String,
    pub body: Value,
    /// What the receiver answered; 0 for a request it held (`Reply::Hang`).
    pub answered: u16,
}

struct Inner {
    key: Vec<u8>,
    log: Mutex<Vec<Received>>,
    scripts: Mutex<HashMap<String, VecDeque<Reply>>>,
}

pub struct Receiver {
    pub base: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Starts on 127.0.0.1, verifying with `secret` (`whsec_` + base64).
    pub async fn start(secret: &str) -> Receiver {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
            .expect("test secret is base64");
        let inner = Arc::new(Inner { key, log: Mutex::default(), scripts: Mutex::default() });
        let app = axum::Router::new().route("/{*path}", axum::routing::post(receive)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { base, inner, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    /// The next answers on `path`, in order; after them, 200.
    pub fn script(&self, path: &str, replies: impl IntoIterator<Item = Reply>) {
        self.inner.scripts.lock().unwrap().entry(path.to_string()).or_default().extend(replies);
    }

    pub fn received(&self, path: &str) -> Vec<Received> {
        self.inner.log.lock().unwrap().iter().filter(|r| r.path == path).cloned().collect()
    }

    pub fn all(&self) -> Vec<Received> {
        self.inner.log.lock().unwrap().clone()
    }
}

async fn receive(
    State(inner): State<Arc<Inner>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let (id, ts, sig) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let verified = verify(&inner.key, &id, &ts, &sig, &body);
    let reply =
        inner.scripts.lock().unwrap().get_mut(&path).and_then(VecDeque::pop_front).unwrap_or(Reply::Status(200));
    let answered = match &reply {
        Reply::Status(c) | Reply::RetryAfter(c, _) => *c,
        // Held: whoever sent it may be gone before the answer.
        Reply::Hang(_) => 0,
    };
    inner.log.lock().unwrap().push(Received {
        path,
        webhook_id: id,
        timestamp: ts.parse().unwrap_or_default(),
        verified,
        content_type: header("content-type"),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        answered,
    });
    match reply {
        Reply::Status(c) => StatusCode::from_u16(c).unwrap().into_response(),
        Reply::RetryAfter(c, after) => (StatusCode::from_u16(c).unwrap(), [("retry-after", after)]).into_response(),
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
    }
}

/// Standard Webhooks, from the spec: base64(HMAC-SHA256(key, id "." ts "." body)),
/// sent as space-separated `v1,<sig>` entries; the timestamp within ±5 minutes.
fn verify(key: &[u8], id: &str, ts: &str, header: &str, body: &[u8]) -> bool {
    let Ok(t) = ts.parse::<i64>() else { return false };
    if (chrono::Utc::now().timestamp() - t).abs() > 300 {
        return false;
    }
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    header.split(' ').any(|entry| entry.strip_prefix("v1,") == Some(expected.as_str()))
}
