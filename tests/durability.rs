//! The promise behind every 2xx, under the failures that happen in production.
//! Each test puts its own TCP proxies between the service and Postgres /
//! RabbitMQ and cuts them, so tests running beside it are not disturbed.

mod common;

use std::time::Duration;

use common::{TestApp, calls_of};
use micro8gents::app::Role;
use micro8gents::events::Family;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn status(call: &str, status: &str, seq: u32) -> Vec<(String, String)> {
    let mut p = vec![
        ("CallSid", call.to_string()),
        ("CallStatus", status.to_string()),
        ("Direction", "inbound".to_string()),
        ("From", "+14155552671".to_string()),
        ("SequenceNumber", seq.to_string()),
        ("Timestamp", format!("Tue, 25 Nov 2025 12:00:{:02} +0000", seq * 10)),
    ];
    if status == "completed" {
        p.push(("CallDuration", "125".to_string()));
    }
    p.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The four status callbacks of call number `i`.
fn call(i: usize) -> Vec<Vec<(String, String)>> {
    let sid = format!("CA{i:032}");
    ["initiated", "ringing", "in-progress", "completed"]
        .iter()
        .enumerate()
        .map(|(seq, s)| status(&sid, s, seq as u32))
        .collect()
}

async fn post(app: &TestApp, business: i32, params: &[(String, String)]) -> reqwest::Response {
    let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    app.post_twilio(business, "call-status", TOKEN, &borrowed).await
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&app.pool).await.unwrap();
    n
}

/// Every call of the business is completed, once.
async fn assert_calls_completed(app: &TestApp, business: i32, calls: usize) {
    let rows = calls_of(&app.pool, business).await;
    assert_eq!(rows.len(), calls, "one row per call");
    assert!(rows.iter().all(|c| c.status == "completed" && c.duration.as_deref() == Some("2:05")), "{rows:?}");
}

#[tokio::test]
async fn broker_down_at_the_ingress_events_wait_in_the_outbox_and_are_applied_once() {
    let app = TestApp::spawn_proxied(|v| {
        v.insert("PUBLISH_TIMEOUT".into(), "1s".into());
    })
    .await;
    let b = app.twilio_business(TOKEN).await;
    let amqp = app.amqp_proxy.as_ref().unwrap();

    amqp.cut();
    for params in call(1) {
        assert_eq!(post(&app, b, &params).await.status(), 204, "accepted while the broker is down");
    }
    assert_eq!(count(&app, "SELECT count(*) FROM webhook_worker.outbox").await, 4, "kept in the outbox");
    // A window to show an absence (the relay retries meanwhile); no condition can show one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(calls_of(&app.pool, b).await.is_empty(), "nothing applied while the broker is away");

    amqp.restore();
    app.settled(4).await;
    app.eventually("an empty outbox", || async {
        (count(&app, "SELECT count(*) FROM webhook_worker.outbox").await == 0).then_some(())
    })
    .await;
    assert_calls_completed(&app, b, 1).await;
    // More traffic after recovery goes straight through.
    for params in call(2) {
        assert_eq!(post(&app, b, &params).await.status(), 204);
    }
    app.settled(8).await;
    assert_calls_completed(&app, b, 2).await;
    assert_eq!(count(&app, "SELECT count(*) FROM webhook_worker.inbox").await, 8);
    app.stop().await;
}

/// A broker that stops confirming without closing the connection: an event that
/// queued behind the message in flight is answered once its own PUBLISH_TIMEOUT
/// is up (kept in the outbox), not after that message's timeout and then its
/// own; once the broker is back, each event is applied once.
#[tokio::test]
async fn behind_a_broker_that_stalls_each_event_waits_one_publish_timeout_and_is_applied_once() {
    let app = TestApp::spawn_proxied(|v| {
        v.insert("PUBLISH_TIMEOUT".into(), "2s".into());
    })
    .await;
    let b = app.twilio_business(TOKEN).await;
    let amqp = app.amqp_proxy.as_ref().unwrap();
    // A first request connects the ingress's publisher through the proxy.
    for params in call(1) {
        assert_eq!(post(&app, b, &params).await.status(), 204);
    }
    app.settled(4).await;

    amqp.freeze();
    let calls: Vec<_> = (2..5).map(call).collect();
    let timed = |params: Vec<(String, String)>, after: u64| {
        let app = &app;
        async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            let started = std::time::Instant::now();
            let status = post(app, b, &params).await.status();
            (status, started.elapsed())
        }
    };
    // The first leaves at once and waits for its confirm; the next two arrive while it does.
    let answers = futures_util::future::join_all(
        calls.iter().enumerate().map(|(i, c)| timed(c[3].clone(), if i == 0 { 0 } else { 300 })),
    )
    .await;
    for (status, took) in &answers {
        assert_eq!(*status, 204, "kept in the outbox");
        assert!(*took < Duration::from_secs(3), "answered after {took:?}: more than one PUBLISH_TIMEOUT (2s)");
    }
    assert_eq!(count(&app, "SELECT count(*) FROM webhook_worker.outbox").await, 3);

    amqp.thaw();
    app.eventually("an empty outbox", || async {
        (count(&app, "SELECT count(*) FROM webhook_worker.outbox").await == 0).then_some(())
    })
    .await;
    app.settled(7).await;
    app.quiet().await;
    assert_eq!(count(&app, "SELECT count(*) FROM webhook_worker.inbox").await, 7, "each applied once");
    let rows = calls_of(&app.pool, b).await;
    assert_eq!(rows.len(), 4, "one row per call: {rows:?}");
    assert!(rows.iter().all(|c| c.status == "completed"), "{rows:?}");
    app.stop().await;
}

#[tokio::test]
async fn broker_and_database_down_the_answer_is_503_with_retry_after() {
    let app = TestApp::spawn_proxied(|v| {
        v.insert("PUBLISH_TIMEOUT".into(), "1s".into());
        // The secret stays cached, so it is the outbox write that fails, not the lookup.
        v.insert("SECRET_CACHE_TTL".into(), "1h".into());
    })
    .await;
    let b = app.twilio_business(TOKEN).await;
    let calls = call(1);
    assert_eq!(post(&app, b, &calls[0]).await.status(), 204);
    app.settled(1).await;

    app.amqp_proxy.as_ref().unwrap().cut();
    app.pg_proxy.as_ref().unwrap().cut();
    let r = post(&app, b, &calls[1]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
    assert!(!body["message"].as_str().unwrap().contains("127.0.0.1"), "no internals in the answer: {body}");

    // The sender retries once things are back; the retry lands.
    app.amqp_proxy.as_ref().unwrap().restore();
    app.pg_proxy.as_ref().unwrap().restore();
    let retried = app
        .eventually("the retry to be accepted", || async {
            let status = post(&app, b, &calls[1]).await.status();
            status.is_success().then_some(status)
        })
        .await;
    assert_eq!(retried, 204);
    app.settled(2).await;
    assert_eq!(calls_of(&app.pool, b).await[0].status, "in-progress");
    app.stop().await;
}

#[tokio::test]
async fn database_down_at_the_worker_nothing_is_lost_nothing_spins_and_it_catches_up() {
    let app = TestApp::spawn_proxied(|v| {
        v.insert("SECRET_CACHE_TTL".into(), "1h".into());
        v.insert("DATABASE_ACQUIRE_TIMEOUT".into(), "1s".into());
    })
    .await;
    let b = app.twilio_business(TOKEN).await;
    let pg = app.pg_proxy.as_ref().unwrap();
    let calls: Vec<_> = (0..5).map(call).collect();
    assert_eq!(post(&app, b, &calls[0][0]).await.status(), 204);
    app.settled(1).await;

    pg.cut();
    for params in calls.iter().flatten().skip(1) {
        assert_eq!(post(&app, b, params).await.status(), 204, "the broker takes it while Postgres is down");
    }
    let before = pg.attempts();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tries = pg.attempts() - before;
    assert!(tries <= 30, "the worker backs off instead of spinning: {tries} connection attempts in 3 s");
    assert_eq!(count(&app, "SELECT count(*) FROM webhook_worker.inbox").await, 1, "nothing applied meanwhile");

    pg.restore();
    app.settled(20).await;
    assert_calls_completed(&app, b, 5).await;
    app.stop().await;
}

#[tokio::test]
async fn a_worker_that_loses_the_broker_mid_batch_has_its_messages_redelivered_and_applied_once() {
    let app = TestApp::spawn_proxied(|v| {
        v.insert("SECRET_CACHE_TTL".into(), "1h".into());
        v.insert("DATABASE_ACQUIRE_TIMEOUT".into(), "1s".into());
    })
    .await;
    let b = app.twilio_business(TOKEN).await;
    let (pg, amqp) = (app.pg_proxy.as_ref().unwrap(), app.amqp_proxy.as_ref().unwrap());
    let calls: Vec<_> = (0..3).map(call).collect();
    assert_eq!(post(&app, b, &calls[0][0]).await.status(), 204);
    app.settled(1).await;

    // The worker takes a batch it cannot commit...
    pg.cut();
    let tried = pg.attempts();
    for params in calls.iter().flatten().skip(1) {
        assert_eq!(post(&app, b, params).await.status(), 204);
    }
    app.eventually("the worker holding every message and trying Postgres", || async {
        (app.ready(Family::Calls).await == 0 && pg.attempts() > tried).then_some(())
    })
    .await;
    // ...then loses its broker connection: the broker requeues everything unacknowledged.
    amqp.cut();
    app.eventually("the unacknowledged messages back in the queue", || async {
        (app.ready(Family::Calls).await == 11).then_some(())
    })
    .await;
    // Postgres returns first, then the broker: the requeued copies are
    // delivered again and meet the inbox.
    pg.restore();
    amqp.restore();
    app.settled(12).await;
    app.eventually("nothing left in the queue", || async { (app.ready(Family::Calls).await == 0).then_some(()) }).await;
    assert_eq!(count(&app, "SELECT count(*) FROM webhook_worker.inbox").await, 12);
    assert_calls_completed(&app, b, 3).await;
    app.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_loses_nothing_answered() {
    let mut app = TestApp::spawn().await;
    let b = app.twilio_business(TOKEN).await;
    let requests: Vec<_> = (0..50).flat_map(call).collect();
    let sends: Vec<_> = requests
        .iter()
        .map(|p| {
            let borrowed: Vec<(&str, &str)> = p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let request = app.twilio_request(b, "call-status", TOKEN, &borrowed);
            tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()).ok() })
        })
        .collect();
    // Stop the service while the load is in flight, as SIGTERM would.
    app.settled(1).await;
    let started = std::time::Instant::now();
    app.stop_service().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "stopped within SHUTDOWN_GRACE: {took:?}");
    let mut answered = 0;
    for s in sends {
        match s.await.unwrap() {
            Some(204) => answered += 1,
            Some(other) => panic!("an in-flight request got {other}"),
            None => {} // refused after the stop began: the sender retries it
        }
    }
    assert!(answered > 0, "some requests were answered before the stop");

    // A new worker drains whatever the stopped one had not taken.
    let worker = app.start_another(Role::Work).await;
    app.settled(answered).await;
    // A window to show an absence (no event applied twice); no condition can show one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let applied = count(&app, "SELECT count(*) FROM webhook_worker.inbox").await;
    assert_eq!(applied, answered, "every 2xx is applied, once");
    worker.stop().await;
    app.stop().await;
}

/// Applies a call's first callback, then holds its state row in a transaction of
/// the test's own, as another `work` process in the middle of its batch would.
async fn first_callback_then_hold_the_call(
    app: &TestApp,
    business: i32,
    first: &[(String, String)],
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    assert_eq!(post(app, business, first).await.status(), 204);
    app.settled(1).await;
    let mut other = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM webhook_worker.twilio_calls WHERE business_id = $1 FOR UPDATE")
        .bind(business)
        .execute(&mut *other)
        .await
        .unwrap();
    other
}

/// A call whose state row another transaction holds (another `work` process in
/// the middle of its batch) does not hold up the other calls of the batch: they
/// are applied at once, and the held call's event follows when the row is free,
/// once.
#[tokio::test]
async fn a_call_held_by_another_worker_does_not_hold_up_the_rest_of_the_batch() {
    let app = TestApp::spawn_with(|v| {
        // One lane, and time for the callbacks below to land in one batch.
        v.insert("WORKER_CONCURRENCY".into(), "1".into());
        v.insert("BATCH_WAIT".into(), "200ms".into());
    })
    .await;
    let b = app.twilio_business(TOKEN).await;
    let (held, free) = (call(1), call(2));
    let other = first_callback_then_hold_the_call(&app, b, &held[0]).await;
    for params in [&held[3], &free[0], &free[1], &free[2], &free[3]] {
        assert_eq!(post(&app, b, params).await.status(), 204);
    }
    app.eventually("the free call completed while the other is held", || async {
        let rows = calls_of(&app.pool, b).await;
        (rows.len() == 2 && rows[1].status == "completed").then_some(())
    })
    .await;
    assert_eq!(calls_of(&app.pool, b).await[0].status, "in-progress", "the held call waits");

    other.rollback().await.unwrap();
    app.eventually("the held call's callback applied", || async {
        (calls_of(&app.pool, b).await[0].status == "completed").then_some(())
    })
    .await;
    assert_calls_completed(&app, b, 2).await;
    app.settled(6).await;
    app.quiet().await;
    assert_eq!(count(&app, "SELECT count(*) FROM webhook_worker.inbox").await, 6, "each callback once");
    assert_eq!(app.ready(Family::Calls).await, 0);
    app.stop().await;
}

/// An event whose call another transaction keeps holding is not left for later
/// for ever: after `MOST_DEFERRALS` batches its batch waits for the lock, and
/// the event is applied once the holder is done.
#[tokio::test]
async fn an_event_left_for_later_too_often_waits_for_its_call() {
    let app = TestApp::spawn_with(|v| {
        v.insert("WORKER_CONCURRENCY".into(), "1".into());
    })
    .await;
    let b = app.twilio_business(TOKEN).await;
    let held = call(1);
    let other = first_callback_then_hold_the_call(&app, b, &held[0]).await;
    assert_eq!(post(&app, b, &held[3]).await.status(), 204);
    // Deferred a few times (5 ms apart), then the worker's batch waits on the row lock.
    app.eventually("the worker waiting for the held call", || async {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.pool)
        .await
        .ok()?;
        (waiting > 0).then_some(())
    })
    .await;
    other.rollback().await.unwrap();
    app.eventually("the call completed", || async {
        (calls_of(&app.pool, b).await[0].status == "completed").then_some(())
    })
    .await;
    app.settled(2).await;
    app.quiet().await;
    assert_eq!(count(&app, "SELECT count(*) FROM webhook_worker.inbox").await, 2, "each callback once");
    app.stop().await;
}
