//! W3C trace context end to end, exported over OTLP: the binary, pointed at a
//! collector by `OTEL_EXPORTER_OTLP_ENDPOINT`, sends the ingress's `webhook` span
//! and the worker's `event` span in the sender's trace.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use common::{Binary, PUBLIC_BASE_URL, TestApp};
use micro8gents::verify::twilio::{Algorithm, compute_signature};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_SPAN: &str = "b7ad6b7169203331";

/// A collector that keeps every OTLP/HTTP traces request body.
async fn collector() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().push(body.to_vec());
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (format!("http://{addr}"), bodies)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn the_senders_trace_reaches_the_worker_and_the_collector() {
    let app = TestApp::spawn().await;
    let prefix = format!("{}.otel", app.cfg.amqp_prefix);
    let business = app.twilio_business(TOKEN).await;
    let (endpoint, bodies) = collector().await;

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut binary = Binary(
        Command::new(env!("CARGO_BIN_EXE_micro8gents"))
            .arg("run")
            .env_clear()
            .env("DATABASE_URL", app.cfg.database_url.expose())
            .env("AMQP_URL", app.cfg.amqp_url.expose())
            .env("AMQP_PREFIX", &prefix)
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("PUBLIC_BASE_URL", PUBLIC_BASE_URL)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("RETRY_DELAYS", "1s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    app.eventually("the binary to be ready", || async {
        let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;

    let path = format!("/webhooks/twilio/{business}/call-status");
    let params: Vec<(String, String)> = [
        ("CallSid", "CA0000000000000000000000000000traced"),
        ("CallStatus", "ringing"),
        ("From", "+14155552671"),
        ("To", "+15005550006"),
        ("SequenceNumber", "0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let sig = compute_signature(TOKEN, &format!("{PUBLIC_BASE_URL}{path}"), &params, Algorithm::HmacSha1);
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("x-twilio-signature", sig)
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    app.settled(1).await;

    // A stop flushes the spans still batched.
    let pid = binary.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || binary.0.wait()).await.unwrap().unwrap();
    assert!(status.success());

    let trace = hex::decode(TRACE_ID).unwrap();
    let parent = hex::decode(PARENT_SPAN).unwrap();
    let bodies = bodies.lock().unwrap().clone();
    assert!(!bodies.is_empty(), "nothing was exported");
    let all: Vec<u8> = bodies.concat();
    let spans_in_trace = all.windows(trace.len()).filter(|w| *w == trace.as_slice()).count();
    assert!(spans_in_trace >= 2, "the ingress's and the worker's spans are both in the sender's trace");
    assert!(contains(&all, &parent), "the ingress span is not the sender's child");
    assert!(contains(&all, b"webhook") && contains(&all, b"event"), "both spans are exported");
    assert!(contains(&all, b"micro8gents"), "the service is named");
    assert!(!contains(&all, TOKEN.as_bytes()));

    // The binary's broker names.
    common::delete_broker_objects_of(&[("AMQP_PREFIX", &prefix), ("RETRY_DELAYS", "1s")]).await;
    app.stop().await;
}
