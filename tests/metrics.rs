//! `GET /metrics`: real traffic moves the counters an operator alerts on.
//!
//! The recorder is per process and this file's tests share it, so every check
//! compares a scrape before with a scrape after; this file holds one test so that
//! the deltas are exact.

mod common;

use common::TestApp;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn ringing(call: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AccountSid", "AC00000000000000000000000000000001".into()),
        ("CallSid", call.into()),
        ("CallStatus", "ringing".into()),
        ("Direction", "inbound".into()),
        ("From", "+14155552671".into()),
        ("To", "+15005550006".into()),
        ("SequenceNumber", "0".into()),
        ("Timestamp", "Tue, 25 Nov 2025 12:00:01 +0000".into()),
    ]
}

/// One sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// One scrape, parsed.
struct Scrape(Vec<Sample>);

impl Scrape {
    async fn take(app: &TestApp) -> Scrape {
        let r = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/plain"), "{ct}");
        Scrape::parse(&r.text().await.unwrap())
    }

    fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            samples.push((name.to_string(), labels, value));
        }
        Scrape(samples)
    }

    /// The sum of the samples of `name` that carry all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|(_, _, v)| v)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _, _)| n == name)
    }
}

#[tokio::test]
async fn traffic_moves_the_counters() {
    let app = TestApp::spawn().await;
    let b = app.twilio_business(TOKEN).await;
    let before = Scrape::take(&app).await;

    let call = ringing("CA99999999999999999999999999999999");
    let params: Vec<(&str, &str)> = call.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Accepted, then accepted again (the sender's retry) and found a duplicate by the worker.
    assert_eq!(app.post_twilio(b, "call-status", TOKEN, &params).await.status(), 204);
    app.settled(1).await;
    assert_eq!(app.post_twilio(b, "call-status", TOKEN, &params).await.status(), 204);
    // Refused: signed with the wrong token.
    assert_eq!(app.post_twilio(b, "call-status", "wrong-token-wrong-token-wrong-tok", &params).await.status(), 401);

    let accepted = [("provider", "twilio"), ("endpoint", "call-status")];
    let rejected = [("provider", "twilio"), ("endpoint", "call-status"), ("reason", "signature")];
    let duplicate = [("provider", "twilio")];
    let after = app
        .eventually("the duplicate to be counted", || async {
            let now = Scrape::take(&app).await;
            let dup = now.sum("micro8gents_events_duplicate_total", &duplicate)
                - before.sum("micro8gents_events_duplicate_total", &duplicate);
            (dup >= 1.0).then_some(now)
        })
        .await;
    let delta = |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);

    assert_eq!(delta("micro8gents_events_accepted_total", &accepted), 2.0);
    assert_eq!(delta("micro8gents_events_rejected_total", &rejected), 1.0);
    assert_eq!(delta("micro8gents_events_duplicate_total", &duplicate), 1.0);
    assert_eq!(
        delta("micro8gents_events_applied_total", &[("provider", "twilio"), ("kind", "twilio_call_status")]),
        1.0
    );
    assert!(delta("micro8gents_batches_total", &[("family", "calls")]) >= 2.0);
    assert_eq!(delta("micro8gents_http_request_duration_seconds_count", &accepted), 3.0);
    assert!(after.has("micro8gents_http_request_duration_seconds_bucket"));
    assert!(delta("micro8gents_publish_confirm_duration_seconds_count", &[]) >= 2.0);
    assert!(delta("micro8gents_apply_duration_seconds_count", &[("family", "calls")]) >= 2.0);

    // The gauges read at scrape time.
    for family in ["calls", "billing", "bookings"] {
        assert_eq!(after.sum("micro8gents_dlq_messages", &[("family", family)]), 0.0, "{family}");
        assert!(after.0.iter().any(|(n, l, _)| n == "micro8gents_dlq_messages"
            && l.iter().any(|(k, v)| k == "family" && v == family)));
    }
    assert!(after.has("micro8gents_db_pool_connections"));
    app.stop().await;
}

#[tokio::test]
async fn the_outbox_gauges_show_its_depth_and_oldest_age() {
    // Every scrape reads the outbox afresh (the default shares a read for 5 s).
    let app = TestApp::spawn_with(|v| {
        v.insert("METRICS_GAUGE_REFRESH".into(), "0s".into());
    })
    .await;
    // A fresh database has an empty outbox.
    let scrape = Scrape::take(&app).await;
    assert_eq!(scrape.sum("micro8gents_outbox_messages", &[]), 0.0);
    assert_eq!(scrape.sum("micro8gents_outbox_oldest_age_seconds", &[]), 0.0);
    // Rows the relay has not published yet (no routing key is bound to "nowhere",
    // so the relay cannot take them away before the scrape).
    sqlx::query(
        "INSERT INTO webhook_worker.outbox (event_key, routing_key, kind, body, created_at)
         VALUES ('k1', 'nowhere', 'test', '', now() - interval '90 seconds'), ('k2', 'nowhere', 'test', '', now())",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let scrape = Scrape::take(&app).await;
    assert_eq!(scrape.sum("micro8gents_outbox_messages", &[]), 2.0);
    let age = scrape.sum("micro8gents_outbox_oldest_age_seconds", &[]);
    assert!((89.0..200.0).contains(&age), "{age}");
    app.stop().await;
}

#[tokio::test]
async fn a_work_process_serves_its_metrics_and_health_on_metrics_addr_only() {
    let app = TestApp::spawn().await;
    let mut cfg = app.cfg.clone();
    cfg.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let worker = micro8gents::app::start(cfg, micro8gents::app::Role::Work).await.unwrap();
    let base = format!("http://{}", worker.addr.expect("a work process with METRICS_ADDR listens"));
    let r = app.http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("micro8gents_dlq_messages"));
    assert_eq!(app.http.get(format!("{base}/readyz")).send().await.unwrap().status(), 200);
    let r = app.http.post(format!("{base}/webhooks/stripe")).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 404, "a work process takes no webhooks");
    worker.stop().await;

    // Without METRICS_ADDR a work process listens nowhere (several may share a host).
    let worker = micro8gents::app::start(app.cfg.clone(), micro8gents::app::Role::Work).await.unwrap();
    assert!(worker.addr.is_none());
    worker.stop().await;
    app.stop().await;
}

/// `/metrics` is on the public listener: a flood of scrapes shares one read of the
/// broker's dead-letter depths and the outbox per METRICS_GAUGE_REFRESH, instead of
/// opening an AMQP channel and counting the outbox each time.
#[tokio::test]
async fn a_flood_of_scrapes_reads_the_broker_and_the_outbox_once_per_refresh() {
    let app = TestApp::spawn_with(|v| {
        v.insert("METRICS_GAUGE_REFRESH".into(), "1h".into());
    })
    .await;
    let scrapes = (0..50)
        .map(|_| async { app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap() });
    let texts = futures_util::future::join_all(scrapes).await;
    assert!(texts.iter().all(|t| t.contains("micro8gents_dlq_messages") && t.contains("micro8gents_table_bytes")));
    let last = Scrape::take(&app).await;
    assert_eq!(last.sum("micro8gents_metrics_gauge_reads_total", &[]), 1.0);
    app.stop().await;
}
