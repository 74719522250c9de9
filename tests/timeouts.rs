//! Slow clients can't hold the ingress: headers and bodies have deadlines, idle
//! keep-alive connections are closed, and requests beyond the bound in flight get
//! 503 with Retry-After at once. Each test waits for the server's move (a close, an
//! answer) with a generous cap, and would hit that cap without the bound.

mod common;

use std::time::Duration;

use common::TestApp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the server sends before it closes, or `None` if it is still silent at the cap.
async fn until_closed(stream: &mut TcpStream) -> Option<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&seen).into_owned()),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap()
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_headers_is_closed_by_the_server() {
    let app = TestApp::spawn_with(|v| {
        v.insert("HEADER_READ_TIMEOUT".into(), "300ms".into());
    })
    .await;
    let mut slow = connect(&app).await;
    slow.write_all(b"POST /webhooks/stripe HTTP/1.1\r\nHost: hooks.example.com\r\nX-Slow: 1").await.unwrap();
    let closed = until_closed(&mut slow).await;
    assert!(closed.is_some(), "the server kept a connection with unfinished headers open");
    // The service itself is fine.
    let r = app.http.get(format!("{}/healthz", app.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_by_the_server() {
    let app = TestApp::spawn_with(|v| {
        v.insert("HEADER_READ_TIMEOUT".into(), "300ms".into());
    })
    .await;
    let mut idle = connect(&app).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: hooks.example.com\r\n\r\n").await.unwrap();
    let seen = until_closed(&mut idle).await;
    let seen = seen.expect("the server kept an idle keep-alive connection open");
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_trickles_in_is_answered_408() {
    let app = TestApp::spawn_with(|v| {
        v.insert("BODY_READ_TIMEOUT".into(), "500ms".into());
        v.insert("STRIPE_WEBHOOK_SECRET".into(), "whsec_test".into());
    })
    .await;
    let mut slow = connect(&app).await;
    let head = "POST /webhooks/stripe HTTP/1.1\r\nHost: hooks.example.com\r\nContent-Type: application/json\r\n\
                Stripe-Signature: t=1,v1=00\r\nContent-Length: 1000\r\n\r\n{\"id\":";
    slow.write_all(head.as_bytes()).await.unwrap();
    let seen = until_closed(&mut slow).await.expect("the server waited for the body without end");
    assert!(seen.starts_with("HTTP/1.1 408"), "{seen}");
    assert!(seen.contains("\"error\":\"request_timeout\""), "{seen}");
    app.stop().await;
}

#[tokio::test]
async fn requests_beyond_the_bound_in_flight_get_503_with_retry_after_at_once() {
    let app = TestApp::spawn_with(|v| {
        v.insert("MAX_REQUESTS_IN_FLIGHT".into(), "2".into());
        v.insert("BODY_READ_TIMEOUT".into(), "60s".into());
        v.insert("STRIPE_WEBHOOK_SECRET".into(), "whsec_test".into());
    })
    .await;
    // Two requests whose bodies never finish hold both slots.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut s = connect(&app).await;
        let head =
            "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: t=1,v1=00\r\nContent-Length: 100\r\n\r\n{";
        s.write_all(head.as_bytes()).await.unwrap();
        holders.push(s);
    }
    let third = app
        .eventually("a request to be shed", || async {
            let r = app.http.get(format!("{}/healthz", app.base)).send().await.ok()?;
            (r.status() == 503).then_some(r)
        })
        .await;
    assert_eq!(third.headers()["retry-after"], "5");
    let body: serde_json::Value = third.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
    // When the slow clients go, the slots come back.
    drop(holders);
    app.eventually("a slot to be free again", || async {
        let r = app.http.get(format!("{}/healthz", app.base)).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("micro8gents_http_requests_shed_total ")), "{metrics}");
    app.stop().await;
}
