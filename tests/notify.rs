//! Notices to a business's n8n (CONTRACT.md section 5) through the real stack:
//! Twilio callbacks and n8n pushes in at the ingress, RabbitMQ, the worker,
//! Postgres, and out to a local receiver that checks every signature with its
//! own implementation of Standard Webhooks.

mod common;

use std::time::{Duration, Instant};

use common::TestApp;
use common::receiver::{Received, Receiver, Reply};
use micro8gents::bus::{Broker, Publisher};
use micro8gents::ops::dlq::{self, Parking};
use micro8gents::verify::standard_webhooks::{Secret, sign};
use serde_json::{Value, json};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A test service that may post to the local receiver.
async fn spawn() -> TestApp {
    spawn_with(&[]).await
}

/// The app with notices allowed to the test's loopback receivers, and these settings.
async fn spawn_with(settings: &[(&str, &str)]) -> TestApp {
    TestApp::spawn_with(|v| {
        v.insert("NOTIFY_ALLOW_PRIVATE_NETWORKS".into(), "true".into());
        v.extend(settings.iter().map(|(k, val)| (k.to_string(), val.to_string())));
    })
    .await
}

/// A business with Twilio and an n8n integration whose notices go to `notify_url`.
async fn business(app: &TestApp, notify_url: &str, events: Option<Value>) -> (i32, i32) {
    let b = app.twilio_business(TOKEN).await;
    let mut config = json!({"webhook_secret": SECRET, "notify_url": notify_url});
    if let Some(e) = events {
        config["notify_events"] = e;
    }
    let i = app.integration(b, "n8n", config, "active").await;
    (b, i)
}

fn status(call: &str, status: &str, seq: u32) -> Vec<(String, String)> {
    let mut p = vec![
        ("AccountSid", "AC00000000000000000000000000000001".to_string()),
        ("CallSid", call.to_string()),
        ("CallStatus", status.to_string()),
        ("Direction", "inbound".to_string()),
        ("From", "+14155552671".to_string()),
        ("To", "+15005550006".to_string()),
        ("CallerName", "Jane Doe".to_string()),
        ("SequenceNumber", seq.to_string()),
        ("Timestamp", format!("Tue, 25 Nov 2025 12:00:{:02} +0000", seq * 3)),
        ("CallbackSource", "call-progress-events".to_string()),
    ];
    if status == "completed" || status == "no-answer" {
        p.push(("CallDuration", "125".to_string()));
    }
    p.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn transcription(call: &str, text: &str) -> Vec<(String, String)> {
    [
        ("CallSid", call),
        ("TranscriptionSid", "TR3333"),
        ("TranscriptionText", text),
        ("TranscriptionStatus", "completed"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn post(app: &TestApp, business: i32, endpoint: &str, params: &[(String, String)]) {
    let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = app.post_twilio(business, endpoint, TOKEN, &borrowed).await;
    assert_eq!(r.status().as_u16(), 204, "{endpoint} accepted");
}

/// A call that rings and is answered and ends: three status callbacks.
async fn whole_call(app: &TestApp, business: i32, call: &str) {
    for (s, seq) in [("ringing", 0), ("in-progress", 1), ("completed", 2)] {
        post(app, business, "call-status", &status(call, s, seq)).await;
    }
}

fn call_sid(n: u32) -> String {
    format!("CA{n:032x}")
}

/// Waits until the receiver holds `n` requests on `path`.
async fn received(app: &TestApp, r: &Receiver, path: &str, n: usize) -> Vec<Received> {
    app.eventually(&format!("{n} notices on /{path}"), || async {
        let got = r.received(path);
        (got.len() >= n).then_some(got)
    })
    .await
}

/// Waits until there are `n` notices in the database, all settled; returns
/// (kind, outcome, tries, last_error) of each, oldest first.
async fn settled(app: &TestApp, n: usize) -> Vec<(String, String, i32, Option<String>)> {
    app.eventually("every notice settled", || async {
        let rows: Vec<(String, Option<String>, i32, Option<String>)> = sqlx::query_as(
            "SELECT kind, outcome, tries, last_error FROM webhook_worker.notices ORDER BY created_at, kind",
        )
        .fetch_all(&app.pool)
        .await
        .ok()?;
        let all = rows.len() >= n && rows.iter().all(|r| r.1.is_some());
        all.then(|| rows.into_iter().map(|(k, o, t, e)| (k, o.unwrap(), t, e)).collect())
    })
    .await
}

async fn notice_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webhook_worker.notices").fetch_one(&app.pool).await.unwrap()
}

#[tokio::test]
async fn each_change_is_noticed_once_signed_with_the_integrations_secret() {
    let app = spawn().await;
    let r = Receiver::start(SECRET).await;
    let (b, _) = business(&app, &r.url("all"), None).await;
    let (only_ended, _) = business(&app, &r.url("ended-only"), Some(json!(["call.ended"]))).await;
    let call = call_sid(1);

    whole_call(&app, b, &call).await;
    // Twilio retries and a late callback: no second call.ended.
    post(&app, b, "call-status", &status(&call, "completed", 2)).await;
    post(&app, b, "call-status", &status(&call, "ringing", 0)).await;
    post(&app, b, "transcription", &transcription(&call, "Hello, I would like to book a cleaning.")).await;
    post(&app, b, "transcription", &transcription(&call, "Hello, I would like to book a cleaning.")).await;
    whole_call(&app, only_ended, &call_sid(2)).await;
    post(&app, only_ended, "transcription", &transcription(&call_sid(2), "Hi")).await;
    // 3 + 3 status callbacks and 2 transcriptions; the repeats are duplicates.
    app.settled(8).await;

    let got = received(&app, &r, "all", 2).await;
    let outcomes = settled(&app, 3).await;
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| o.1 == "delivered" && o.2 == 1), "{outcomes:?}");
    let got_all = r.received("all");
    assert_eq!(got_all.len(), 2, "exactly two notices for the first business: {got_all:?}");
    let only = r.received("ended-only");
    assert_eq!(only.len(), 1, "notify_events lists call.ended only: {only:?}");
    assert_eq!(only[0].body["type"], "call.ended");

    for n in r.all() {
        assert!(n.verified, "signature verifies with the integration's secret: {n:?}");
        assert_eq!(n.content_type, "application/json");
        assert!(n.webhook_id.starts_with("msg_") && !n.webhook_id.contains('.'), "{}", n.webhook_id);
    }
    let ids: std::collections::HashSet<_> = r.all().iter().map(|n| n.webhook_id.clone()).collect();
    assert_eq!(ids.len(), 3, "every notice has its own webhook-id");

    let ended = got.iter().find(|n| n.body["type"] == "call.ended").expect("call.ended").body.clone();
    let (call_id,): (i32,) =
        sqlx::query_as("SELECT id FROM calls WHERE business_id = $1").bind(b).fetch_one(&app.pool).await.unwrap();
    let data = &ended["data"];
    assert_eq!(data["business_id"], b);
    assert_eq!(data["call_id"], call_id);
    assert_eq!(data["call_sid"], call.as_str());
    assert_eq!(data["status"], "completed");
    assert_eq!(data["phone"], "+14155552671");
    assert_eq!(data["caller"], "Jane Doe");
    assert_eq!(data["duration"], "2:05");
    assert_eq!(data["start_time"], "2025-11-25T12:00:00Z");
    assert_eq!(data["end_time"], "2025-11-25T12:00:06Z");
    assert!(chrono::DateTime::parse_from_rfc3339(ended["timestamp"].as_str().unwrap()).is_ok(), "{ended}");
    let ready = got.iter().find(|n| n.body["type"] == "call.transcript_ready").expect("transcript_ready");
    assert_eq!(ready.body["data"]["transcript"], "Hello, I would like to book a cleaning.");
    assert_eq!(ready.body["data"]["call_id"], call_id);
    app.stop().await;
}

async fn weekdays_nine_to_five(app: &TestApp, business: i32) {
    for day in ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"] {
        sqlx::query(
            "INSERT INTO hours_of_operation (business_id, day_of_week, open_time, close_time, is_open)
             VALUES ($1, $2, '09:00', '17:00', true)",
        )
        .bind(business)
        .bind(day)
        .execute(&app.pool)
        .await
        .unwrap();
    }
}

async fn push(app: &TestApp, business: i32, id: &str, body: &Value) {
    let body = body.to_string();
    let ts = chrono::Utc::now().timestamp();
    let sig = sign(&Secret::parse(SECRET).unwrap(), id, ts, body.as_bytes());
    let ts = ts.to_string();
    let headers = [
        ("webhook-id", id),
        ("webhook-timestamp", ts.as_str()),
        ("webhook-signature", sig.as_str()),
        ("content-type", "application/json"),
    ];
    let r = app.post_raw(&format!("/webhooks/n8n/{business}/bookings"), body, &headers).await;
    assert_eq!(r.status().as_u16(), 202);
}

#[tokio::test]
async fn a_booking_pushed_outside_opening_hours_is_noticed_once_per_flagged_push() {
    let app = spawn().await;
    let r = Receiver::start(SECRET).await;
    let (b, _) = business(&app, &r.url("bookings"), None).await;
    weekdays_nine_to_five(&app, b).await;
    let booking = |date: &str| {
        json!({"external_id": "bk-1", "customer": "Jane Doe", "phone": "+14155552671", "email": "jane@example.com",
               "service": "Cleaning", "date": date, "status": "upcoming", "notes": "first visit"})
    };
    // Saturday: flagged. Pushed twice (n8n's retry): one notice.
    push(&app, b, "msg_bk_1", &booking("2026-03-14T10:00:00+00:00")).await;
    push(&app, b, "msg_bk_1", &booking("2026-03-14T10:00:00+00:00")).await;
    // Moved into Monday's hours: no notice. Then to 20:00 Monday: a second flagged push.
    push(&app, b, "msg_bk_2", &booking("2026-03-16T10:00:00+00:00")).await;
    push(&app, b, "msg_bk_3", &booking("2026-03-16T20:00:00+00:00")).await;
    app.settled(3).await;

    let got = received(&app, &r, "bookings", 2).await;
    let outcomes = settled(&app, 2).await;
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert_eq!(r.received("bookings").len(), 2);
    let (booking_id,): (i32,) =
        sqlx::query_as("SELECT id FROM bookings WHERE business_id = $1").bind(b).fetch_one(&app.pool).await.unwrap();
    for n in &got {
        assert!(n.verified);
        assert_eq!(n.body["type"], "booking.outside_hours");
        let d = &n.body["data"];
        assert_eq!(d["business_id"], b);
        assert_eq!(d["booking_id"], booking_id);
        assert_eq!(d["external_id"], "bk-1");
        assert_eq!(d["customer"], "Jane Doe");
        assert_eq!(d["service"], "Cleaning");
        assert_eq!(d["status"], "upcoming");
        assert!(d["reason"].as_str().unwrap().contains("opening hours"), "{d}");
    }
    // Notices promise no order among themselves (each is delivered on its own), only one per flagged push.
    let mut dates: Vec<_> = got.iter().map(|n| n.body["data"]["date"].as_str().unwrap().to_string()).collect();
    dates.sort();
    assert_eq!(dates, ["2026-03-14T10:00:00Z", "2026-03-16T20:00:00Z"]);
    app.stop().await;
}

#[tokio::test]
async fn a_receiver_that_fails_twice_gets_the_notice_exactly_once() {
    let app = spawn().await;
    let r = Receiver::start(SECRET).await;
    r.script("flaky", [Reply::Status(503), Reply::RetryAfter(429, "0")]);
    let (b, _) = business(&app, &r.url("flaky"), Some(json!(["call.ended"]))).await;
    whole_call(&app, b, &call_sid(7)).await;

    let got = received(&app, &r, "flaky", 3).await;
    let outcomes = settled(&app, 1).await;
    assert_eq!(outcomes, vec![("call.ended".to_string(), "delivered".to_string(), 3, None)]);
    assert_eq!(got.iter().map(|n| n.answered).collect::<Vec<_>>(), [503, 429, 200]);
    assert_eq!(got.iter().filter(|n| n.answered == 200).count(), 1, "accepted exactly once");
    assert!(got.iter().all(|n| n.webhook_id == got[0].webhook_id), "the same webhook-id on every try");
    assert!(got.iter().all(|n| n.verified && n.body == got[0].body), "the same signed body on every try");
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metric(&metrics, "micro8gents_notices_retried_total") >= 2.0, "{metrics}");
    assert!(metric(&metrics, "micro8gents_notices_sent_total") >= 1.0);
    app.stop().await;
}

/// Sums every series of a metric in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_receiver_that_answers_410_gets_no_more_until_the_notify_url_changes() {
    let app = spawn().await;
    let r = Receiver::start(SECRET).await;
    r.script("gone", [Reply::Status(410)]);
    let (b, integration) = business(&app, &r.url("gone"), Some(json!(["call.ended"]))).await;
    whole_call(&app, b, &call_sid(1)).await;
    received(&app, &r, "gone", 1).await;
    let outcomes = settled(&app, 1).await;
    assert_eq!(outcomes[0].1, "parked");
    assert!(outcomes[0].3.as_deref().unwrap().contains("410"), "{outcomes:?}");

    // Another call ends: its change is applied, no notice is decided or sent.
    whole_call(&app, b, &call_sid(2)).await;
    app.settled(6).await;
    assert_eq!(notice_count(&app).await, 1);

    // A new notify_url turns notices on again.
    sqlx::query("UPDATE integrations SET config = config || jsonb_build_object('notify_url', $2::text) WHERE id = $1")
        .bind(integration)
        .bind(r.url("new"))
        .execute(&app.pool)
        .await
        .unwrap();
    whole_call(&app, b, &call_sid(3)).await;
    let got = received(&app, &r, "new", 1).await;
    assert_eq!(got[0].body["data"]["call_sid"], call_sid(3));
    assert_eq!(r.received("gone").len(), 1, "the gone receiver got nothing more");
    app.stop().await;
}

#[tokio::test]
async fn other_client_errors_park_at_once_visible_to_dlq_and_a_redrive_sends_it_again() {
    let app = spawn().await;
    let r = Receiver::start(SECRET).await;
    r.script("bad", [Reply::Status(401)]);
    let (b, _) = business(&app, &r.url("bad"), Some(json!(["call.ended"]))).await;
    whole_call(&app, b, &call_sid(1)).await;
    let outcomes = settled(&app, 1).await;
    assert_eq!(outcomes[0].1, "parked");
    assert_eq!(outcomes[0].2, 1, "one try only");
    assert_eq!(outcomes[0].3.as_deref(), Some("the receiver answered 401"));
    assert_eq!(r.received("bad").len(), 1);

    // What `micro8gents dlq list --family notices` prints.
    let broker = std::sync::Arc::new(Broker::new(app.cfg.amqp_url.expose(), "notify-test", app.topology()));
    let parked = app
        .eventually("the parked notice in the dlq listing", || async {
            let list = dlq::list(&broker, &app.topology(), Some(Parking::Notices), 100).await.ok()?;
            (list.len() == 1).then_some(list)
        })
        .await;
    assert_eq!(parked[0].family, "notices");
    assert_eq!(parked[0].kind, "call.ended");
    assert_eq!(parked[0].reason, "the receiver answered 401");
    assert_eq!(parked[0].id, r.received("bad")[0].webhook_id, "listed under its webhook-id");
    assert_eq!(dlq::list(&broker, &app.topology(), None, 100).await.unwrap().len(), 1, "listed with every family");

    // The receiver is fixed; `micro8gents dlq redrive <id>` sends the notice again, same id.
    let publisher = Publisher::new(broker.clone(), app.cfg.publish_timeout);
    let select = dlq::Select::Id(parked[0].id.clone());
    let done = dlq::redrive(&broker, &publisher, &app.topology(), &select, Some(Parking::Notices), 100).await.unwrap();
    assert_eq!(done.redriven.len(), 1);
    let got = received(&app, &r, "bad", 2).await;
    assert_eq!(got[1].answered, 200);
    assert_eq!(got[1].webhook_id, got[0].webhook_id);
    let outcomes = app
        .eventually("the redriven notice delivered", || async {
            let o = settled(&app, 1).await;
            (o[0].1 == "delivered").then_some(o)
        })
        .await;
    assert_eq!(outcomes[0].2, 1, "a redrive starts a fresh round of tries");
    broker.close().await;
    app.stop().await;
}

/// The reasons (`x-last-error`) of the messages in `{p}.notices.dead`, read without taking them.
async fn dead_letters(app: &TestApp) -> Vec<String> {
    let queue = app.notice_queues().dead_queue();
    app.eventually("a parked notice message", || async {
        let conn = lapin::Connection::connect(&common::amqp_url(), Default::default()).await.ok()?;
        let ch = conn.create_channel().await.ok()?;
        let mut reasons = Vec::new();
        while let Ok(Some(m)) = ch.basic_get(queue.as_str().into(), Default::default()).await {
            reasons.push(
                micro8gents::bus::header_str(&m.delivery.properties, micro8gents::bus::ERROR_HEADER)
                    .unwrap_or_default(),
            );
        }
        let _ = conn.close(200, "read".into()).await;
        (!reasons.is_empty()).then_some(reasons)
    })
    .await
}

#[tokio::test]
async fn a_notify_url_on_a_private_address_is_refused_and_parked_with_the_reason() {
    // The default: private networks not allowed.
    let app = TestApp::spawn().await;
    let r = Receiver::start(SECRET).await;
    let by_name = r.url("x").replace("127.0.0.1", "localhost");
    let (b, _) = business(&app, &by_name, Some(json!(["call.ended"]))).await;
    let (literal, _) = business(&app, &r.url("y"), Some(json!(["call.ended"]))).await;
    whole_call(&app, b, &call_sid(1)).await;
    whole_call(&app, literal, &call_sid(2)).await;
    let outcomes = settled(&app, 2).await;
    assert_eq!(outcomes.len(), 2);
    for (_, outcome, _, error) in &outcomes {
        assert_eq!(outcome, "parked");
        let e = error.as_deref().unwrap();
        assert!(
            e.starts_with("refused: ") && e.contains("loopback") && e.contains("NOTIFY_ALLOW_PRIVATE_NETWORKS"),
            "{e}"
        );
    }
    let mut parked = dead_letters(&app).await;
    parked.sort();
    assert!(parked.iter().any(|p| p.contains("localhost is 127.0.0.1")), "{parked:?}");
    assert!(r.all().is_empty(), "nothing reached the private address");
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metric(&metrics, "micro8gents_notices_refused_total") >= 2.0, "{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn a_hanging_receiver_delays_neither_applying_events_nor_other_businesses_notices() {
    let app = spawn_with(&[("NOTIFY_TIMEOUT", "60s")]).await;
    let slow = Receiver::start(SECRET).await;
    let fast = Receiver::start(SECRET).await;
    slow.script("slow", (0..40).map(|_| Reply::Hang(Duration::from_secs(60))));
    let (hung, _) = business(&app, &slow.url("slow"), Some(json!(["call.ended"]))).await;
    let (healthy, _) = business(&app, &fast.url("fast"), Some(json!(["call.ended"]))).await;
    let started = Instant::now();
    // More of the hanging business's notices than one receiver may hold.
    for n in 0..24 {
        whole_call(&app, hung, &call_sid(100 + n)).await;
    }
    whole_call(&app, healthy, &call_sid(1)).await;
    // Every event applied, the healthy business's notice delivered, well within the 60 s hang.
    app.settled(75).await;
    let (ended,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM calls WHERE status = 'completed'").fetch_one(&app.pool).await.unwrap();
    assert_eq!(ended, 25);
    let got = received(&app, &fast, "fast", 1).await;
    assert_eq!(got[0].body["data"]["business_id"], healthy);
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    let held = slow.received("slow").len();
    assert!(held <= micro8gents::notify::consumer::IN_FLIGHT_PER_RECEIVER, "{held} posts in flight to one receiver");
    app.stop().await;
}

/// A real `micro8gents work` process with the test's database and queues.
fn work_process(app: &TestApp) -> common::Binary {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_micro8gents"))
        .arg("work")
        .env("DATABASE_URL", app.cfg.database_url.expose())
        .env("AMQP_URL", app.cfg.amqp_url.expose())
        .env("AMQP_PREFIX", &app.cfg.amqp_prefix)
        .env("RETRY_DELAYS", "100ms,200ms")
        .env("NOTIFY_RETRY_DELAYS", "100ms,200ms")
        .env("NOTIFY_TIMEOUT", "3s")
        .env("NOTIFY_ALLOW_PRIVATE_NETWORKS", "true")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("micro8gents work starts");
    common::Binary(child)
}

#[tokio::test]
async fn a_worker_killed_with_sigkill_between_commit_and_delivery_still_delivers_once() {
    let mut app = spawn().await;
    // Only an ingress in this process; the worker is a real `micro8gents work`.
    app.stop_service().await;
    let serve = app.start_another(micro8gents::app::Role::Serve).await;
    app.base = format!("http://{}", serve.addr.unwrap());
    let r = Receiver::start(SECRET).await;
    // The first try is held: the worker has committed the call and its notice and is sending it.
    r.script("kill", [Reply::Hang(Duration::from_secs(60))]);
    let (b, _) = business(&app, &r.url("kill"), Some(json!(["call.ended"]))).await;

    let mut first = work_process(&app);
    whole_call(&app, b, &call_sid(9)).await;
    let held = received(&app, &r, "kill", 1).await;
    // SIGKILL: no shutdown, no ack, no outcome recorded.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (outcome, relayed): (Option<String>, bool) =
        sqlx::query_as("SELECT outcome, relayed_at IS NOT NULL FROM webhook_worker.notices")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((outcome, relayed), (None, true), "committed and relayed, not settled");

    let second = work_process(&app);
    // The killed try's claim lapses (NOTIFY_TIMEOUT + 5 s), then the redelivered message is sent.
    let deadline = Instant::now() + Duration::from_secs(40);
    let got = loop {
        let got = r.received("kill");
        if got.len() >= 2 {
            break got;
        }
        assert!(Instant::now() < deadline, "the notice was not sent again after the kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let outcomes = settled(&app, 1).await;
    assert_eq!(outcomes[0].1, "delivered");
    assert_eq!(got[1].answered, 200);
    assert_eq!(got[1].webhook_id, held[0].webhook_id, "the same notice, the same webhook-id");
    assert_eq!(got[1].body, held[0].body);
    assert_eq!(got.iter().filter(|n| n.answered == 200).count(), 1, "accepted exactly once");
    // Nothing more arrives: the notice is settled and no copy is left in a queue.
    let (calls,): (i64,) = sqlx::query_as("SELECT count(*) FROM calls").fetch_one(&app.pool).await.unwrap();
    assert_eq!(calls, 1);
    assert_eq!(notice_count(&app).await, 1);
    serve.stop().await;
    drop(second); // before the cleanup, so it cannot declare its queues again afterwards
    app.stop().await;
}

/// A Real-Time Transcription callback (CONTRACT section 4).
fn realtime(call: &str, seq: u32, event: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = [
        ("AccountSid", "AC00000000000000000000000000000001"),
        ("CallSid", call),
        ("TranscriptionSid", "GT8fbf72a043b98407a3ce68331cd0030a"),
        ("TranscriptionEvent", event),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    p.push(("SequenceId".into(), seq.to_string()));
    p.push(("Timestamp".into(), format!("2025-11-25T12:00:{:02}.454203Z", seq)));
    p.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    p
}

/// A session's start, segments and stop in one batch: the batch writes the
/// session and its segments in one statement before its events are applied, and
/// the stop (posted first) is noticed with the text of the segments of the same
/// batch, read when the batch's writes are flushed.
#[tokio::test]
async fn a_real_time_session_that_starts_speaks_and_stops_in_one_batch_is_noticed_with_its_text() {
    let app = spawn_with(&[("BATCH_WAIT", "2s")]).await;
    let r = Receiver::start(SECRET).await;
    let (b, _) = business(&app, &r.url("rt"), Some(json!(["call.transcript_ready"]))).await;
    let call = call_sid(4);
    let line = |text: &str| json!({"transcript": text, "confidence": 0.98}).to_string();
    let (hello, book) = (line("Hello, this is Sam"), line("A cleaning, please"));
    let events = [
        realtime(&call, 4, "transcription-stopped", &[]),
        realtime(&call, 1, "transcription-started", &[("Track", "both_tracks"), ("InboundTrackLabel", "Jane")]),
        realtime(
            &call,
            2,
            "transcription-content",
            &[("Track", "outbound_track"), ("Final", "true"), ("TranscriptionData", &hello)],
        ),
        realtime(
            &call,
            3,
            "transcription-content",
            &[("Track", "inbound_track"), ("Final", "true"), ("TranscriptionData", &book)],
        ),
    ];
    futures_util::future::join_all(events.iter().map(|e| post(&app, b, "transcription", e))).await;
    let got = received(&app, &r, "rt", 1).await;
    assert_eq!(got[0].body["type"], "call.transcript_ready");
    assert_eq!(got[0].body["data"]["transcript"], "Agent: Hello, this is Sam\nJane: A cleaning, please");
    assert_eq!(app.counter("micro8gents_batches_total{family=\"calls\"}").await, 1.0, "they shared one batch");
    let stopped: bool =
        sqlx::query_scalar("SELECT stopped FROM webhook_worker.transcript_sessions WHERE business_id = $1")
            .bind(b)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(stopped);
    app.stop().await;
}

#[tokio::test]
async fn a_real_time_session_with_text_is_noticed_when_it_stops_and_a_higher_source_again() {
    let app = spawn().await;
    let r = Receiver::start(SECRET).await;
    let (b, _) = business(&app, &r.url("rt"), Some(json!(["call.transcript_ready"]))).await;
    let call = call_sid(3);
    let line = |text: &str| json!({"transcript": text, "confidence": 0.98}).to_string();
    let (hello, book) = (line("Hello, this is Sam"), line("I'd like to book a cleaning"));
    post(&app, b, "transcription", &realtime(&call, 1, "transcription-started", &[("Track", "both_tracks")])).await;
    post(
        &app,
        b,
        "transcription",
        &realtime(
            &call,
            2,
            "transcription-content",
            &[("Track", "outbound_track"), ("Final", "true"), ("TranscriptionData", &hello)],
        ),
    )
    .await;
    post(
        &app,
        b,
        "transcription",
        &realtime(
            &call,
            3,
            "transcription-content",
            &[("Track", "inbound_track"), ("Final", "true"), ("TranscriptionData", &book)],
        ),
    )
    .await;
    app.settled(3).await;
    // Segments alone are no notice: the session is still going.
    assert_eq!(notice_count(&app).await, 0);
    post(&app, b, "transcription", &realtime(&call, 4, "transcription-stopped", &[])).await;
    let got = received(&app, &r, "rt", 1).await;
    assert_eq!(got[0].body["type"], "call.transcript_ready");
    assert_eq!(got[0].body["data"]["transcript"], "Agent: Hello, this is Sam\nCustomer: I'd like to book a cleaning");
    // A <Record transcribe> transcript is a lower source: it replaces nothing, no notice.
    post(&app, b, "transcription", &transcription(&call, "lower source")).await;
    app.settled(5).await;
    assert_eq!(settled(&app, 1).await.len(), 1);
    assert_eq!(r.received("rt").len(), 1);
    app.stop().await;
}
