//! The operator's commands against the real services: `micro8gents dlq ...` and
//! `micro8gents replay ...`.

mod common;

use std::process::Output;

use common::{TestApp, calls_of};
use lapin::options::BasicPublishOptions;
use micro8gents::bus::{Broker, Publisher};
use micro8gents::events::twilio::{Params, parse_call_status};
use micro8gents::events::{BusinessId, Envelope, Event, Family, Provider};
use micro8gents::ops::{dlq, replay};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn status(call: &str, status: &str, seq: &str, second: u32) -> Vec<(String, String)> {
    [
        ("AccountSid", "AC00000000000000000000000000000001".to_string()),
        ("CallSid", call.to_string()),
        ("CallStatus", status.to_string()),
        ("Direction", "inbound".to_string()),
        ("From", "+14155552671".to_string()),
        ("To", "+15005550006".to_string()),
        ("SequenceNumber", seq.to_string()),
        ("Timestamp", format!("Tue, 25 Nov 2025 12:00:{second:02} +0000")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Runs the real binary against the test's database and broker names.
fn cli(app: &TestApp, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_micro8gents"))
        .args(args)
        .env_clear()
        .env("DATABASE_URL", app.cfg.database_url.expose())
        .env("AMQP_URL", app.cfg.amqp_url.expose())
        .env("AMQP_PREFIX", &app.cfg.amqp_prefix)
        .env("RETRY_DELAYS", "100ms,200ms")
        .env("NOTIFY_RETRY_DELAYS", "100ms,200ms")
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Publishes bytes to the calls work queue as a foreign or older publisher would.
async fn publish_raw(app: &TestApp, body: &[u8], message_id: &str) {
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let props = lapin::BasicProperties::default().with_delivery_mode(2).with_message_id(message_id.into());
    ch.basic_publish(
        app.topology().events_exchange().as_str().into(),
        "calls".into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
    conn.close(200, "bye".into()).await.ok();
}

/// The worker's count of Twilio duplicates, from `/metrics`.
async fn duplicates(app: &TestApp) -> f64 {
    let text = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("micro8gents_events_duplicate_total{provider=\"twilio\"} "))
        .map_or(0.0, |v| v.parse().unwrap())
}

fn broker(app: &TestApp) -> std::sync::Arc<Broker> {
    std::sync::Arc::new(Broker::new(app.cfg.amqp_url.expose(), "ops-test", app.topology()))
}

#[tokio::test]
async fn a_parked_event_is_listed_shown_and_redriven_once_it_can_be_applied() {
    let app = TestApp::spawn().await;
    let broker = broker(&app);
    // A good event for a business that does not exist (yet): retried, then parked.
    let missing = 900_000 + (uuid::Uuid::new_v4().as_u128() % 90_000) as i32;
    let key = format!("twilio:status:{missing}:CA42:0");
    let event = parse_call_status(&Params(&status("CA42", "ringing", "0", 1))).unwrap();
    let env = Envelope::new(key.clone(), Some(BusinessId(missing)), "req".into(), Event::TwilioCallStatus(event));
    publish_raw(&app, &env.to_json(), &key).await;

    let list = app.parked(&broker, 1).await;
    assert_eq!(list[0].id, key);
    assert_eq!(list[0].family, "calls");
    assert_eq!(list[0].attempt, 3);
    assert!(list[0].reason.contains("calls_business_id_businesses_id_fk"), "{}", list[0].reason);
    // Listing lost nothing.
    assert_eq!(app.parked(&broker, 1).await[0].id, key);

    // The same through the binary.
    let out = cli(&app, &["dlq", "list", "--family", "calls"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains(&key), "{}", stdout(&out));
    assert!(stdout(&out).contains("1 parked message(s)"), "{}", stdout(&out));
    let out = cli(&app, &["dlq", "show", &key]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("gave up after 3 tries"), "{}", stdout(&out));
    assert!(stdout(&out).contains("\"CA42\""), "{}", stdout(&out));
    let out = cli(&app, &["dlq", "show", "no-such-id"]);
    assert!(!out.status.success());

    // The cause is fixed: the business now exists. Redrive it.
    let (user,): (i32,) = sqlx::query_as(
        "INSERT INTO users (username, email, password) VALUES ('u42', 'u42@example.com', 'x') RETURNING id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO businesses (id, user_id, business_name, email) VALUES ($1, $2, 'Late Co', 'l@example.com')",
    )
    .bind(missing)
    .bind(user)
    .execute(&app.pool)
    .await
    .unwrap();
    let out = cli(&app, &["dlq", "redrive", &key]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("1 redriven, 0 failed"), "{}", stdout(&out));

    app.settled(1).await;
    let rows = calls_of(&app.pool, missing).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "in-progress");
    assert!(dlq::list(&broker, &app.topology(), None, 100).await.unwrap().is_empty());
    broker.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_redriven_message_that_is_still_bad_is_parked_again_with_its_reason() {
    let app = TestApp::spawn().await;
    let broker = broker(&app);
    publish_raw(&app, b"{not json", "bad-1").await;
    publish_raw(&app, b"{not json either", "bad-2").await;
    let list = app.parked(&broker, 2).await;
    assert!(list.iter().all(|p| p.reason.contains("undecodable envelope")), "{list:?}");

    let publisher = Publisher::new(broker.clone(), app.cfg.publish_timeout);
    let select = dlq::Select::Id("bad-1".into());
    let done = dlq::redrive(&broker, &publisher, &app.topology(), &select, None, 100).await.unwrap();
    assert_eq!(done.redriven.len(), 1);
    assert_eq!(done.redriven[0].id, "bad-1");
    assert!(done.failed.is_empty());

    // Back in the DLQ after its one new try, with the reason, the other one untouched.
    let list = app
        .eventually("bad-1 parked again", || async {
            let list = dlq::list(&broker, &app.topology(), Some(Family::Calls.into()), 100).await.ok()?;
            (list.len() == 2 && list.iter().any(|p| p.id == "bad-1")).then_some(list)
        })
        .await;
    let again = list.iter().find(|p| p.id == "bad-1").unwrap();
    assert_eq!(again.body, b"{not json");
    assert_eq!(again.attempt, 1);
    assert!(again.reason.contains("undecodable envelope"), "{}", again.reason);

    // --all takes everything.
    let done = dlq::redrive(&broker, &publisher, &app.topology(), &dlq::Select::All, None, 100).await.unwrap();
    assert_eq!(done.redriven.len(), 2);
    app.parked(&broker, 2).await;
    broker.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_message_the_broker_parked_says_so() {
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
    let app = TestApp::spawn().await;
    let broker = broker(&app);
    // As the broker dead-letters a message past x-delivery-limit: an x-death entry,
    // and the x-last-error of an earlier retry still on it.
    let mut death = FieldTable::default();
    death.insert("reason".into(), AMQPValue::LongString(LongString::from("delivery_limit")));
    death.insert("queue".into(), AMQPValue::LongString(LongString::from(app.topology().work_queue(Family::Calls))));
    let mut headers = FieldTable::default();
    headers.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])));
    headers.insert("x-last-error".into(), AMQPValue::LongString(LongString::from("no call yet")));
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let props = lapin::BasicProperties::default().with_message_id("crashy".into()).with_headers(headers);
    ch.basic_publish(app.topology().dead_exchange().as_str().into(), "calls".into(), Default::default(), b"{}", props)
        .await
        .unwrap()
        .await
        .unwrap();
    conn.close(200, "bye".into()).await.ok();

    let list = app.parked(&broker, 1).await;
    let expected = format!(
        "parked by the broker: delivery_limit in {} (an earlier try: no call yet)",
        app.topology().work_queue(Family::Calls)
    );
    assert_eq!(list[0].reason, expected);
    broker.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_replay_of_applied_events_changes_nothing() {
    let app = TestApp::spawn().await;
    let b = app.twilio_business(TOKEN).await;
    let other = app.twilio_business(TOKEN).await;
    for (seq, (s, second)) in [("ringing", 1), ("in-progress", 3), ("completed", 9)].into_iter().enumerate() {
        let params = status("CA77", s, &seq.to_string(), second);
        let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(app.post_twilio(b, "call-status", TOKEN, &borrowed).await.status(), 204);
    }
    let params = status("CA78", "ringing", "0", 1);
    let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(app.post_twilio(other, "call-status", TOKEN, &borrowed).await.status(), 204);
    app.settled(4).await;
    let before = format!("{:?}", calls_of(&app.pool, b).await);
    let inbox = || async {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM webhook_worker.inbox").fetch_one(&app.pool).await.unwrap();
        n
    };
    assert_eq!(inbox().await, 4);

    let dups_before = duplicates(&app).await;

    // Only this business's events.
    let broker = broker(&app);
    let publisher = Publisher::new(broker.clone(), app.cfg.publish_timeout);
    let filter = replay::Filter { provider: Provider::Twilio, business: Some(BusinessId(b)), since: None };
    let done = replay::replay(&app.pool, &publisher, &app.topology(), &filter).await.unwrap();
    assert_eq!(done.published, 3);
    assert!(done.skipped.is_empty());
    // Nothing of another provider.
    let filter = replay::Filter { provider: Provider::Stripe, business: None, since: None };
    assert_eq!(replay::replay(&app.pool, &publisher, &app.topology(), &filter).await.unwrap().published, 0);

    // Through the binary too: everything from Twilio in the last hour.
    let out = cli(&app, &["replay", "--provider", "twilio", "--since", "1h"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("4 event(s) published again"), "{}", stdout(&out));

    // Every replayed event reaches the worker and is counted a duplicate; nothing changed.
    app.eventually("the 7 replayed events to be found duplicates", || async {
        (duplicates(&app).await - dups_before >= 7.0).then_some(())
    })
    .await;
    // A duplicate is counted after its transaction ends: nothing more can change the rows.
    assert_eq!(format!("{:?}", calls_of(&app.pool, b).await), before);
    assert_eq!(inbox().await, 4);
    assert!(dlq::list(&broker, &app.topology(), None, 100).await.unwrap().is_empty());
    broker.close().await;
    app.stop().await;
}
