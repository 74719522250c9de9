//! The binary's JSON logs through a whole signed flow: every line is JSON, lines
//! about an event carry its request id, key, provider, business and CallSid, and
//! no line carries a secret (at `RUST_LOG=debug`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Binary, PUBLIC_BASE_URL, TestApp};
use micro8gents::verify::standard_webhooks::{Secret, sign};
use micro8gents::verify::twilio::{Algorithm, compute_signature};
use serde_json::{Value, json};

const TWILIO_TOKEN: &str = "tw1l10t0k3n0000sup3rs3cr3t0000ab";
const STRIPE_SECRET: &str = "whsec_str1p3sup3rs3cr3tv4lu3000000";
/// Key text `n8n-log-test-key-not-for-logs-xyz`.
const N8N_SECRET: &str = "whsec_bjhuLWxvZy10ZXN0LWtleS1ub3QtZm9yLWxvZ3MteHl6";
const N8N_KEY_TEXT: &str = "n8n-log-test-key-not-for-logs-xyz";
const CALL: &str = "CA5555555555555555555555555555555a";
/// The sender's W3C trace, continued by the ingress and the worker.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn start(app: &TestApp, prefix: &str) -> (Binary, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_micro8gents"))
        .arg("run")
        .env_clear()
        .env("DATABASE_URL", app.cfg.database_url.expose())
        .env("AMQP_URL", app.cfg.amqp_url.expose())
        .env("AMQP_PREFIX", prefix)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("PUBLIC_BASE_URL", PUBLIC_BASE_URL)
        .env("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .env("SHUTDOWN_GRACE", "5s")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Binary(child), rx)
}

/// The address from the `ingress listening` line; every line read so far goes to `seen`.
fn listening(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>) -> String {
    loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("the ingress starts listening");
        seen.push(line.clone());
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        if v["message"] == "ingress listening" {
            return v["addr"].as_str().unwrap().to_string();
        }
    }
}

#[tokio::test]
async fn json_logs_name_the_event_and_never_a_secret() {
    let app = TestApp::spawn().await;
    // The binary gets names of its own, so the in-process service does not take its events.
    let prefix = format!("{}.bin", app.cfg.amqp_prefix);
    let twilio_business = app.twilio_business(TWILIO_TOKEN).await;
    let n8n_business = app.business().await;
    app.integration(n8n_business, "n8n", json!({"webhook_secret": N8N_SECRET}), "active").await;

    let (mut binary, rx) = start(&app, &prefix);
    let mut lines = Vec::new();
    let base = format!("http://{}", listening(&rx, &mut lines));
    let http = reqwest::Client::new();

    // Twilio: a good callback and one signed with a wrong token.
    let path = format!("/webhooks/twilio/{twilio_business}/call-status");
    let params: Vec<(String, String)> = [
        ("CallSid", CALL),
        ("CallStatus", "ringing"),
        ("Direction", "inbound"),
        ("From", "+14155552671"),
        ("To", "+15005550006"),
        ("SequenceNumber", "0"),
        ("Timestamp", "Tue, 25 Nov 2025 12:00:01 +0000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish();
    for (token, expect) in [(TWILIO_TOKEN, 204), ("not-the-token", 401)] {
        let sig = compute_signature(token, &format!("{PUBLIC_BASE_URL}{path}"), &params, Algorithm::HmacSha1);
        let r = http
            .post(format!("{base}{path}"))
            .header("x-twilio-signature", sig)
            .header("traceparent", TRACEPARENT)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), expect);
    }

    // Stripe: an event type that is recorded and changes nothing.
    let now = chrono::Utc::now().timestamp();
    let event = json!({"id": "evt_log_1", "object": "event", "type": "customer.created", "created": now,
        "api_version": "2025-03-31.basil", "data": {"object": {"id": "cus_1", "object": "customer"}}});
    let bytes = event.to_string();
    let header = micro8gents::verify::stripe::sign_header(STRIPE_SECRET, now, bytes.as_bytes());
    let r = http
        .post(format!("{base}/webhooks/stripe"))
        .header("stripe-signature", header)
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // n8n: a booking.
    let booking = json!({"external_id": "bk_log", "customer": "Jane", "service": "Cleaning",
        "date": "2026-03-16T10:30:00+02:00"})
    .to_string();
    let sig = sign(&Secret::parse(N8N_SECRET).unwrap(), "msg_log_1", now, booking.as_bytes());
    let r = http
        .post(format!("{base}/webhooks/n8n/{n8n_business}/bookings"))
        .header("webhook-id", "msg_log_1")
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", sig)
        .header("content-type", "application/json")
        .body(booking)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    app.settled(3).await;
    // Stop it as an orchestrator would, and read everything it said.
    let pid = binary.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exited = tokio::task::spawn_blocking(move || {
        let status = binary.0.wait();
        (binary, status)
    })
    .await
    .unwrap();
    assert!(exited.1.unwrap().success());
    lines.extend(rx.iter());
    common::delete_broker_objects_of(&[("AMQP_PREFIX", &prefix)]).await;

    let n8n_key_b64 = N8N_SECRET.trim_start_matches("whsec_");
    let mut events: Vec<Value> = Vec::new();
    for line in &lines {
        for secret in [TWILIO_TOKEN, STRIPE_SECRET, N8N_SECRET, n8n_key_b64, N8N_KEY_TEXT] {
            assert!(!line.contains(secret), "a log line carries a secret: {line}");
        }
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        events.push(v);
    }
    assert!(events.len() > 10, "{lines:?}");

    let with = |message: &str| -> Vec<&Value> { events.iter().filter(|v| v["message"] == message).collect() };
    // The ingress: accepted lines name everything known.
    let accepted = with("accepted");
    assert_eq!(accepted.len(), 3, "{lines:#?}");
    for v in &accepted {
        for field in ["request_id", "key", "provider", "kind"] {
            assert!(v[field].is_string(), "{field} missing: {v}");
        }
    }
    // The ingress continues the sender's trace, or starts one.
    for v in &accepted {
        assert!(v["span"]["trace_id"].as_str().is_some_and(|t| t.len() == 32), "{v}");
    }
    let twilio = accepted.iter().find(|v| v["provider"] == "twilio").unwrap();
    assert_eq!(twilio["span"]["trace_id"], TRACE_ID);
    assert_eq!(twilio["call_sid"], CALL);
    assert_eq!(twilio["business"], twilio_business);
    let stripe = accepted.iter().find(|v| v["provider"] == "stripe").unwrap();
    assert!(stripe.get("business").is_none() && stripe.get("call_sid").is_none(), "{stripe}");
    let refused: Vec<&Value> =
        events.iter().filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with("refused"))).collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["reason"], "signature");
    assert!(refused[0]["request_id"].is_string());
    assert_eq!(refused[0]["business"], twilio_business);

    // The worker: each settled line sits in the event's span.
    let settled: Vec<&Value> = with("applied").into_iter().chain(with("recorded; changes nothing")).collect();
    assert_eq!(settled.len(), 3, "{lines:#?}");
    for v in settled {
        let span = &v["span"];
        for field in ["request_id", "key", "provider", "kind", "family"] {
            assert!(span[field].is_string(), "{field} missing in the span: {v}");
        }
        let same = accepted.iter().any(|a| {
            a["request_id"] == span["request_id"]
                && a["key"] == span["key"]
                && a["span"]["trace_id"] == span["trace_id"]
        });
        assert!(same, "the worker's line has the ingress's request id, key and trace: {v}");
        if span["provider"] == "twilio" {
            assert_eq!(span["call_sid"], CALL);
            assert_eq!(span["trace_id"], TRACE_ID);
            assert_eq!(span["business"], twilio_business);
        }
    }
    app.stop().await;
}
