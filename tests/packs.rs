//! Several events in one message (`PUBLISH_PACK`, src/bus/pack.rs): the
//! ingress packs what arrives while a publish is being confirmed, and the
//! worker applies, retries and parks each event of a pack on its own.

mod common;

use std::time::Duration;

use common::{TestApp, calls_of};
use micro8gents::bus::{Broker, Pending, Publisher};
use micro8gents::events::twilio::{Params, parse_call_status};
use micro8gents::events::{BusinessId, Envelope, Event, Family};
use micro8gents::ops::dlq;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn completed(call: &str) -> Vec<(String, String)> {
    [
        ("AccountSid", "AC00000000000000000000000000000001"),
        ("CallSid", call),
        ("CallStatus", "completed"),
        ("CallDuration", "125"),
        ("Direction", "inbound"),
        ("From", "+14155552671"),
        ("To", "+15005550006"),
        ("SequenceNumber", "3"),
        ("Timestamp", "Tue, 25 Nov 2025 12:00:30 +0000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The envelope the ingress would make of call `call`'s completed callback for `business`.
fn envelope(business: i32, call: &str) -> Envelope {
    let event = parse_call_status(&Params(&completed(call))).unwrap();
    let key = format!("twilio:status:{business}:{call}:3");
    Envelope::new(key, Some(BusinessId(business)), "req".into(), Event::TwilioCallStatus(event))
}

fn pending(env: &Envelope) -> Pending {
    Pending::of(env, env.to_json(), None)
}

fn broker(app: &TestApp) -> std::sync::Arc<Broker> {
    std::sync::Arc::new(Broker::new(app.cfg.amqp_url.expose(), "packs-test", app.topology()))
}

/// Every call of the business completed, once each.
async fn calls_completed(app: &TestApp, business: i32, calls: usize) {
    app.eventually(&format!("{calls} completed calls"), || async {
        let rows = calls_of(&app.pool, business).await;
        (rows.len() == calls).then_some(())
    })
    .await;
    let rows = calls_of(&app.pool, business).await;
    assert!(rows.iter().all(|c| c.status == "completed" && c.duration.as_deref() == Some("2:05")), "{rows:?}");
}

#[tokio::test]
async fn each_event_of_a_pack_is_applied_retried_or_parked_on_its_own_and_the_pack_is_acked() {
    let mut app = TestApp::spawn().await;
    let b = app.twilio_business(TOKEN).await;
    let missing = 900_000 + (uuid::Uuid::new_v4().as_u128() % 90_000) as i32;
    let (a, c) = (envelope(b, "CA01"), envelope(b, "CA02"));
    let nowhere = envelope(missing, "CA03");
    let broken =
        Pending { body: br#"{"not":"an envelope"}"#.to_vec(), key: "broken".into(), kind: "x", traceparent: None };
    // A twice (a sender's retry in the same pack), a broken event, one for a business that does not exist.
    let events = [pending(&a), pending(&c), pending(&a), broken, pending(&nowhere)];
    let broker = broker(&app);
    let publisher = Publisher::new(broker.clone(), app.cfg.publish_timeout);
    publisher.publish_events(&app.topology(), Family::Calls, &events.iter().collect::<Vec<_>>()).await.unwrap();

    calls_completed(&app, b, 2).await;
    // Each bad event is parked alone, as the message it would have been: the
    // broken one at once, the other after its tries (RETRY_DELAYS 100ms,200ms).
    let mut list = app.parked(&broker, 2).await;
    list.sort_by_key(|p| p.attempt);
    assert_eq!(list[0].body, br#"{"not":"an envelope"}"#);
    assert_eq!(list[0].id, format!("pack of 5: {} #4", a.key));
    assert!(list[0].reason.contains("undecodable envelope"), "{}", list[0].reason);
    assert_eq!((list[1].id.as_str(), list[1].attempt), (nowhere.key.as_str(), 3));
    assert_eq!(list[1].body, nowhere.to_json());
    assert!(list[1].reason.contains("calls_business_id_businesses_id_fk"), "{}", list[1].reason);
    assert_eq!(app.counter("micro8gents_events_duplicate_total").await, 1.0, "A's second copy");

    // Acknowledged once all five settled: stopping the consumer hands nothing back.
    app.stop_service().await;
    assert_eq!(app.ready(Family::Calls).await, 0, "the pack was acknowledged");
    assert_eq!(calls_of(&app.pool, b).await.len(), 2);
    broker.close().await;
    app.stop().await;
}

/// Posts one completed callback for each of `calls` calls, the next `apart` after
/// the one before (each sent without waiting for the answer before it); every answer is 204.
async fn post_apart(app: &TestApp, business: i32, calls: usize, apart: Duration) {
    let params: Vec<_> = (0..calls).map(|i| completed(&format!("CA{i:032}"))).collect();
    let answers = futures_util::future::join_all(params.iter().enumerate().map(|(i, p)| {
        let borrowed: Vec<(&str, &str)> = p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        async move {
            tokio::time::sleep(apart * i as u32).await;
            app.post_twilio(business, "call-status", TOKEN, &borrowed).await.status()
        }
    }))
    .await;
    assert!(answers.iter().all(|s| *s == 204), "{answers:?}");
}

#[tokio::test]
async fn requests_that_arrive_together_share_messages_and_each_event_lands_once() {
    let app = TestApp::spawn().await;
    let b = app.twilio_business(TOKEN).await;
    post_apart(&app, b, 200, Duration::ZERO).await;
    app.quiet().await;
    calls_completed(&app, b, 200).await;
    let messages = app.counter("micro8gents_event_messages_published_total").await;
    assert_eq!(app.counter("micro8gents_events_accepted_total").await, 200.0);
    assert!((1.0..200.0).contains(&messages), "200 events in {messages} messages");
    assert_eq!(app.counter("micro8gents_events_duplicate_total").await, 0.0);
    app.stop().await;
}

#[tokio::test]
async fn with_publish_pack_1_every_event_is_its_own_message() {
    let app = TestApp::spawn_with(|v| {
        v.insert("PUBLISH_PACK".into(), "1".into());
    })
    .await;
    let b = app.twilio_business(TOKEN).await;
    post_apart(&app, b, 100, Duration::ZERO).await;
    app.quiet().await;
    calls_completed(&app, b, 100).await;
    assert_eq!(app.counter("micro8gents_event_messages_published_total").await, 100.0);
    app.stop().await;
}

#[tokio::test]
async fn a_pack_the_broker_parked_is_redriven_and_split() {
    let app = TestApp::spawn().await;
    let b = app.twilio_business(TOKEN).await;
    let (a, c) = (envelope(b, "CA11"), envelope(b, "CA12"));
    let body = micro8gents::bus::pack::encode([a.to_json(), c.to_json()].iter().map(Vec::as_slice));
    // As the broker parks a message no worker finished within x-delivery-limit deliveries.
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let props = lapin::BasicProperties::default().with_message_id(format!("pack of 2: {}", a.key).into());
    let dead = app.topology().dead_exchange();
    ch.basic_publish(dead.as_str().into(), "calls".into(), Default::default(), &body, props)
        .await
        .unwrap()
        .await
        .unwrap();
    conn.close(200, "bye".into()).await.ok();

    let broker = broker(&app);
    let list = app.parked(&broker, 1).await;
    assert!(list[0].body_text().contains(&a.key) && list[0].body_text().contains(&c.key));
    let publisher = Publisher::new(broker.clone(), app.cfg.publish_timeout);
    let done = dlq::redrive(&broker, &publisher, &app.topology(), &dlq::Select::All, None, 100).await.unwrap();
    assert_eq!(done.redriven.len(), 1);
    calls_completed(&app, b, 2).await;
    assert!(dlq::list(&broker, &app.topology(), None, 100).await.unwrap().is_empty());
    broker.close().await;
    app.stop().await;
}

#[tokio::test]
async fn with_publish_wait_a_few_requests_wait_for_company_and_leave_together() {
    let app = TestApp::spawn_with(|v| {
        v.insert("PUBLISH_WAIT".into(), "100ms".into());
    })
    .await;
    let b = app.twilio_business(TOKEN).await;
    // 16 requests sent 3 ms apart (each alone would leave alone, its message
    // confirmed before the next arrives): the first waits up to 100 ms for
    // company, so they share a message or two.
    post_apart(&app, b, 16, Duration::from_millis(3)).await;
    app.quiet().await;
    calls_completed(&app, b, 16).await;
    let messages = app.counter("micro8gents_event_messages_published_total").await;
    assert!((1.0..=4.0).contains(&messages), "16 events in {messages} messages");
    app.stop().await;
}
