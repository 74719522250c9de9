//! Stripe billing events through the real stack: HTTP ingress, RabbitMQ, worker, Postgres.
//!
//! Payloads are shaped like Stripe's own (PROTOCOLS.md §3.3/§4.4), pretty-printed as
//! Stripe sends them, in an API version before basil (`2024-06-20`, the billing period
//! on the subscription) and in basil (`2025-03-31.basil`, the period on the items).

mod common;

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use common::TestApp;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use micro8gents::app::{self, Role};
use micro8gents::bus::{ATTEMPT_HEADER, ERROR_HEADER, header_int, header_str};
use micro8gents::events::Family;
use micro8gents::verify::stripe::sign_header;
use serde_json::{Value, json};

const SECRET: &str = "whsec_test_5f2b8c1d9e7a4f60b3c2d1e0f9a8b7c6";
const OLD_SECRET: &str = "whsec_rotated_old_0000000000000000000000000000";
const NEW_SECRET: &str = "whsec_rotated_new_0000000000000000000000000001";
/// 2025-11-24 16:00:00 UTC: the events' own `created` times count from here.
const T0: i64 = 1_764_000_000;
const MONTH: i64 = 30 * 86_400;

async fn spawn() -> TestApp {
    spawn_with(|_| {}).await
}

async fn spawn_with(tweak: impl FnOnce(&mut std::collections::HashMap<String, String>)) -> TestApp {
    TestApp::spawn_with(|v| {
        v.insert("STRIPE_WEBHOOK_SECRET".into(), SECRET.into());
        tweak(v);
    })
    .await
}

fn now() -> i64 {
    Utc::now().timestamp()
}

fn utc(epoch: i64) -> NaiveDateTime {
    DateTime::from_timestamp(epoch, 0).unwrap().naive_utc()
}

// ---- Stripe-shaped events -----------------------------------------------------------------

fn event(id: &str, kind: &str, created: i64, api_version: &str, object: Value) -> Value {
    json!({
        "id": id, "object": "event", "api_version": api_version, "created": created,
        "data": {"object": object},
        "livemode": false, "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": kind
    })
}

fn price(id: &str, lookup_key: Option<&str>, metadata: Value) -> Value {
    json!({
        "id": id, "object": "price", "active": true, "currency": "usd", "lookup_key": lookup_key,
        "metadata": metadata, "product": "prod_TQxAbCdEfGhIjK",
        "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
        "type": "recurring", "unit_amount": 4900
    })
}

/// What a subscription event says, whatever its API version.
#[derive(Clone)]
struct Sub<'a> {
    id: &'a str,
    customer: &'a str,
    status: &'a str,
    user_id: Option<i32>,
    price: Value,
    period_start: i64,
}

impl<'a> Sub<'a> {
    fn new(id: &'a str, customer: &'a str, status: &'a str) -> Self {
        Sub {
            id,
            customer,
            status,
            user_id: None,
            price: price("price_basic", Some("basic"), json!({})),
            period_start: T0,
        }
    }

    fn user(mut self, user: i32) -> Self {
        self.user_id = Some(user);
        self
    }

    fn price(mut self, price: Value) -> Self {
        self.price = price;
        self
    }

    fn period(mut self, start: i64) -> Self {
        self.period_start = start;
        self
    }

    fn metadata(&self) -> Value {
        match self.user_id {
            Some(u) => json!({"user_id": u.to_string(), "clinic_id": "42"}),
            None => json!({"clinic_id": "42"}),
        }
    }

    fn item(&self) -> Value {
        json!({"id": "si_TQx7y8z9A0b1C2", "object": "subscription_item", "created": T0 - 100,
               "metadata": {}, "price": self.price, "quantity": 1, "subscription": self.id})
    }

    /// Before basil: `current_period_*` on the subscription, none on the item.
    fn acacia(&self, evt: &str, kind: &str, created: i64) -> Value {
        let object = json!({
            "id": self.id, "object": "subscription", "billing_cycle_anchor": T0 - 100,
            "cancel_at_period_end": false, "collection_method": "charge_automatically",
            "created": T0 - 100, "currency": "usd", "customer": self.customer,
            "current_period_start": self.period_start, "current_period_end": self.period_start + MONTH,
            "items": {"object": "list", "data": [self.item()], "has_more": false, "total_count": 1,
                      "url": format!("/v1/subscription_items?subscription={}", self.id)},
            "livemode": false, "metadata": self.metadata(), "status": self.status
        });
        event(evt, kind, created, "2024-06-20", object)
    }

    /// Basil: `current_period_*` on the items only.
    fn basil(&self, evt: &str, kind: &str, created: i64) -> Value {
        let mut item = self.item();
        item["current_period_start"] = json!(self.period_start);
        item["current_period_end"] = json!(self.period_start + MONTH);
        let object = json!({
            "id": self.id, "object": "subscription", "billing_cycle_anchor": T0 - 100,
            "cancel_at_period_end": false, "collection_method": "charge_automatically",
            "created": T0 - 100, "currency": "usd", "customer": self.customer,
            "items": {"object": "list", "data": [item], "has_more": false, "total_count": 1,
                      "url": format!("/v1/subscription_items?subscription={}", self.id)},
            "livemode": false, "metadata": self.metadata(), "status": self.status
        });
        event(evt, kind, created, "2025-03-31.basil", object)
    }
}

fn checkout_completed(evt: &str, created: i64, session: &str, user: i32, customer: &str, sub: &str) -> Value {
    let object = json!({
        "id": session, "object": "checkout.session", "client_reference_id": user.to_string(),
        "customer": customer, "subscription": sub, "mode": "subscription", "payment_status": "paid",
        "status": "complete", "livemode": false, "metadata": {}
    });
    event(evt, "checkout.session.completed", created, "2025-03-31.basil", object)
}

/// An invoice event; since basil its subscription is under `parent.subscription_details`.
fn invoice(evt: &str, kind: &str, created: i64, customer: &str, sub: &str, basil: bool) -> Value {
    let mut object = json!({
        "id": format!("in_{evt}"), "object": "invoice", "attempt_count": 1,
        "billing_reason": "subscription_cycle", "customer": customer,
        "status": if kind == "invoice.paid" { "paid" } else { "open" }
    });
    if basil {
        object["parent"] = json!({"type": "subscription_details", "quote_details": null,
            "subscription_details": {"metadata": {}, "subscription": sub}});
        event(evt, kind, created, "2025-03-31.basil", object)
    } else {
        object["subscription"] = json!(sub);
        event(evt, kind, created, "2024-06-20", object)
    }
}

// ---- posting ------------------------------------------------------------------------------

/// Posts raw bytes with the given `Stripe-Signature`; the status and the JSON answer.
async fn post_raw(app: &TestApp, body: &[u8], header: Option<&str>) -> (u16, Value) {
    let mut headers = vec![("content-type", "application/json; charset=utf-8")];
    if let Some(h) = header {
        headers.push(("stripe-signature", h));
    }
    let r = app.post_raw("/webhooks/stripe", body.to_vec(), &headers).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Posts an event pretty-printed, as Stripe sends it, signed with `secret` now.
async fn post_signed(app: &TestApp, secret: &str, event: &Value) -> (u16, Value) {
    let body = serde_json::to_vec_pretty(event).unwrap();
    post_raw(app, &body, Some(&sign_header(secret, now(), &body))).await
}

/// Posts an event and checks Stripe gets the contract's success answer.
async fn deliver(app: &TestApp, event: &Value) {
    let (status, json) = post_signed(app, SECRET, event).await;
    assert_eq!((status, json), (200, json!({"received": true})), "{}", event["id"]);
}

// ---- reading Postgres ---------------------------------------------------------------------

async fn user(app: &TestApp) -> i32 {
    let n = uuid::Uuid::new_v4().simple().to_string();
    let (id,): (i32,) = sqlx::query_as(
        "INSERT INTO users (username, email, password) VALUES ($1, $1 || '@example.com', 'x') RETURNING id",
    )
    .bind(&n[..20])
    .fetch_one(&app.pool)
    .await
    .unwrap();
    id
}

/// A row the dashboard made, as it does for a new account: free plan, no Stripe ids.
async fn dashboard_free_row(app: &TestApp, user: i32) {
    sqlx::query(
        "INSERT INTO subscriptions (user_id, plan, status, created_at, updated_at)
         VALUES ($1, 'free', 'active', '2025-01-01 00:00:00', '2025-01-01 00:00:00')",
    )
    .bind(user)
    .execute(&app.pool)
    .await
    .unwrap();
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct Row {
    plan: String,
    stripe_customer_id: Option<String>,
    stripe_subscription_id: Option<String>,
    status: String,
    current_period_start: Option<NaiveDateTime>,
    current_period_end: Option<NaiveDateTime>,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

async fn rows(app: &TestApp, user: i32) -> Vec<Row> {
    sqlx::query_as(
        "SELECT plan::text AS plan, stripe_customer_id, stripe_subscription_id, status, current_period_start,
                current_period_end, created_at, updated_at
           FROM subscriptions WHERE user_id = $1 ORDER BY id",
    )
    .bind(user)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// The user's one row (failing if there are more or none).
async fn row(app: &TestApp, user: i32) -> Row {
    let rows = rows(app, user).await;
    assert_eq!(rows.len(), 1, "exactly one subscriptions row for user {user}: {rows:?}");
    rows.into_iter().next().unwrap()
}

async fn all_rows(app: &TestApp) -> i64 {
    sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM subscriptions").fetch_one(&app.pool).await.unwrap().0
}

async fn inbox_outcome(app: &TestApp, evt: &str) -> Option<String> {
    sqlx::query_as::<_, (String,)>(
        "SELECT outcome FROM webhook_worker.inbox WHERE key_hash = webhook_worker.event_key_hash($1)",
    )
    .bind(format!("stripe:{evt}"))
    .fetch_optional(&app.pool)
    .await
    .unwrap()
    .map(|(o,)| o)
}

/// Waits until the worker has settled the event; its inbox outcome.
async fn settled(app: &TestApp, evt: &str) -> String {
    app.eventually(&format!("{evt} settled"), || inbox_outcome(app, evt)).await
}

/// Delivers an event and waits for its outcome.
async fn apply(app: &TestApp, event: &Value) -> String {
    deliver(app, event).await;
    settled(app, event["id"].as_str().unwrap()).await
}

fn assert_recent(t: NaiveDateTime) {
    let age = Utc::now().naive_utc() - t;
    assert!(age.num_seconds().abs() < 60, "{t} is not UTC now");
}

// ---- reading RabbitMQ ---------------------------------------------------------------------

/// Waits for the next parked billing message: its reason, its try count and its body.
async fn next_dead_letter(app: &TestApp) -> (String, i64, Value) {
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let queue = app.topology().dead_queue(Family::Billing);
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), "test".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(15), consumer.next())
        .await
        .expect("a dead letter arrives")
        .unwrap()
        .unwrap();
    d.ack(Default::default()).await.unwrap();
    conn.close(200, "bye".into()).await.ok();
    let reason = header_str(&d.properties, ERROR_HEADER).unwrap_or_default();
    let attempt = header_int(&d.properties, ATTEMPT_HEADER).unwrap_or_default();
    (reason, attempt, serde_json::from_slice(&d.data).unwrap())
}

/// How many messages wait in the billing retry queues.
async fn waiting_for_retry(app: &TestApp) -> u32 {
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut total = 0;
    for delay in &app.cfg.retry_delays {
        let name = app.topology().retry_queue(Family::Billing, *delay);
        let opts = QueueDeclareOptions { passive: true, ..Default::default() };
        let q = ch.queue_declare(name.as_str().into(), opts, FieldTable::default()).await.unwrap();
        total += q.message_count();
    }
    conn.close(200, "bye".into()).await.ok();
    total
}

// ---- the tests ----------------------------------------------------------------------------

#[tokio::test]
async fn a_whole_lifecycle_keeps_one_row_in_step() {
    let app = spawn().await;
    let u = user(&app).await;
    let (cus, sub) = ("cus_TQx1y2z3A4b5C6", "sub_1SWz9yA1bC2dE3fG4hI5jK6l");

    // Checkout completes: only who the customer is gets recorded.
    let cs = checkout_completed("evt_cs_1", T0, "cs_test_a1", u, cus, sub);
    assert_eq!(apply(&app, &cs).await, "applied");
    assert!(rows(&app, u).await.is_empty());
    // Stripe may generate a second Event object for the same session.
    let again = checkout_completed("evt_cs_2", T0, "cs_test_a1", u, cus, sub);
    assert_eq!(apply(&app, &again).await, "applied");

    // Created, before basil: no user_id in metadata, so the checkout session names the user.
    let s = Sub::new(sub, cus, "incomplete");
    assert_eq!(apply(&app, &s.acacia("evt_sub_1", "customer.subscription.created", T0 + 1)).await, "applied");
    let r = row(&app, u).await;
    assert_eq!(
        (r.plan.as_str(), r.status.as_str(), r.stripe_customer_id.as_deref(), r.stripe_subscription_id.as_deref()),
        ("basic", "incomplete", Some(cus), Some(sub))
    );
    assert_eq!((r.current_period_start, r.current_period_end), (Some(utc(T0)), Some(utc(T0 + MONTH))));
    assert_recent(r.created_at);
    assert_recent(r.updated_at);

    // The first invoice is paid (pre-basil shape: `subscription` on the invoice).
    let paid = invoice("evt_in_1", "invoice.paid", T0 + 2, cus, sub, false);
    assert_eq!(apply(&app, &paid).await, "applied");
    assert_eq!(row(&app, u).await.status, "active");

    // Updated in basil: the plan from the price's metadata.plan, the period from the item.
    let premium = price("price_premium", None, json!({"plan": "premium"}));
    let s = Sub::new(sub, cus, "active").price(premium).period(T0 + MONTH);
    assert_eq!(apply(&app, &s.basil("evt_sub_2", "customer.subscription.updated", T0 + 3)).await, "applied");
    let r = row(&app, u).await;
    assert_eq!((r.plan.as_str(), r.status.as_str()), ("premium", "active"));
    assert_eq!((r.current_period_start, r.current_period_end), (Some(utc(T0 + MONTH)), Some(utc(T0 + 2 * MONTH))));

    // A renewal fails (basil shape: the subscription under parent.subscription_details).
    let failed = invoice("evt_in_2", "invoice.payment_failed", T0 + 4, cus, sub, true);
    assert_eq!(apply(&app, &failed).await, "applied");
    assert_eq!(row(&app, u).await.status, "past_due");

    // Stripe gives up and cancels.
    let s = Sub::new(sub, cus, "canceled").price(price("price_premium", Some("premium"), json!({}))).period(T0 + MONTH);
    assert_eq!(apply(&app, &s.basil("evt_sub_3", "customer.subscription.deleted", T0 + 5)).await, "applied");
    let r = row(&app, u).await;
    assert_eq!((r.plan.as_str(), r.status.as_str()), ("premium", "canceled"));
    assert_recent(r.updated_at);

    // A paid invoice after the end does not revive it.
    let late_paid = invoice("evt_in_3", "invoice.paid", T0 + 6, cus, sub, true);
    assert_eq!(apply(&app, &late_paid).await, "ignored: the invoice does not move the subscription's status");
    assert_eq!(row(&app, u).await.status, "canceled");
    app.stop().await;
}

#[tokio::test]
async fn duplicates_are_applied_once() {
    let app = spawn().await;
    let u = user(&app).await;
    let created =
        Sub::new("sub_dup", "cus_dup", "active").user(u).basil("evt_dup_1", "customer.subscription.created", T0);
    let failed = invoice("evt_dup_2", "invoice.payment_failed", T0 + 1, "cus_dup", "sub_dup", true);
    for _ in 0..3 {
        // Each redelivery carries a new timestamp and signature, as Stripe's do.
        deliver(&app, &created).await;
        deliver(&app, &failed).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(settled(&app, "evt_dup_1").await, "applied");
    assert_eq!(settled(&app, "evt_dup_2").await, "applied");
    let first = row(&app, u).await;
    assert_eq!(first.status, "past_due");
    // Every redelivery settled by the worker, then check nothing moved.
    app.quiet().await;
    let (inbox,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM webhook_worker.inbox").fetch_one(&app.pool).await.unwrap();
    assert_eq!(inbox, 2);
    assert_eq!(row(&app, u).await, first);
    app.stop().await;
}

#[tokio::test]
async fn events_in_reverse_order_end_as_the_newest_says() {
    let app = spawn().await;
    let u = user(&app).await;
    let s = Sub::new("sub_rev", "cus_rev", "canceled").user(u).period(T0 + MONTH);
    assert_eq!(apply(&app, &s.basil("evt_rev_3", "customer.subscription.deleted", T0 + 30)).await, "applied");
    let after_deleted = row(&app, u).await;

    let premium = price("price_premium", Some("premium"), json!({}));
    let s = Sub::new("sub_rev", "cus_rev", "active").user(u).price(premium).period(T0 + MONTH);
    let stale = "ignored: older than the last applied event";
    assert_eq!(apply(&app, &s.basil("evt_rev_2", "customer.subscription.updated", T0 + 20)).await, stale);
    let paid = invoice("evt_rev_i", "invoice.paid", T0 + 15, "cus_rev", "sub_rev", true);
    assert_eq!(apply(&app, &paid).await, stale);
    let s = Sub::new("sub_rev", "cus_rev", "incomplete").user(u);
    assert_eq!(apply(&app, &s.acacia("evt_rev_1", "customer.subscription.created", T0 + 10)).await, stale);

    let r = row(&app, u).await;
    assert_eq!(r, after_deleted, "the older events changed nothing");
    assert_eq!((r.status.as_str(), r.plan.as_str()), ("canceled", "basic"));
    assert_eq!(r.current_period_end, Some(utc(T0 + 2 * MONTH)));
    let (last,): (String,) = sqlx::query_as(
        "SELECT last_event_id FROM webhook_worker.billing_subscriptions WHERE stripe_subscription_id = 'sub_rev'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(last, "evt_rev_3");
    app.stop().await;
}

/// Stripe often sends `customer.subscription.created` (incomplete) and `.updated`
/// (active) with one `created` second. Either arrival order ends `active`.
#[tokio::test]
async fn a_created_and_updated_pair_in_one_second_ends_the_same_in_either_order() {
    let app = spawn().await;
    for (order, first_is_created) in [("a", true), ("b", false)] {
        let u = user(&app).await;
        let (sub, cus) = (format!("sub_pair_{order}"), format!("cus_pair_{order}"));
        let created = Sub::new(&sub, &cus, "incomplete").user(u).basil(
            &format!("evt_pair_{order}_1"),
            "customer.subscription.created",
            T0 + 50,
        );
        let updated = Sub::new(&sub, &cus, "active").user(u).basil(
            &format!("evt_pair_{order}_2"),
            "customer.subscription.updated",
            T0 + 50,
        );
        let (first, second) = if first_is_created { (&created, &updated) } else { (&updated, &created) };
        assert_eq!(apply(&app, first).await, "applied");
        let outcome = apply(&app, second).await;
        if first_is_created {
            assert_eq!(outcome, "applied");
        } else {
            assert_eq!(outcome, "ignored: same second as the last applied event, earlier in the lifecycle");
        }
        let r = row(&app, u).await;
        assert_eq!((r.status.as_str(), r.plan.as_str()), ("active", "basic"), "order {order}");
        assert_eq!(r.stripe_subscription_id.as_deref(), Some(sub.as_str()));
    }
    app.stop().await;
}

#[tokio::test]
async fn a_subscription_before_its_checkout_session_waits_for_it() {
    let app = spawn_with(|v| {
        v.insert("RETRY_DELAYS".into(), "1s,2s,4s".into());
    })
    .await;
    let u = user(&app).await;
    let s = Sub::new("sub_wait", "cus_wait", "active");
    deliver(&app, &s.acacia("evt_wait_1", "customer.subscription.created", T0 + 5)).await;
    // The worker could not find the user and put the event in a delay queue.
    app.eventually("the event waits in a retry queue", || async { (waiting_for_retry(&app).await == 1).then_some(()) })
        .await;
    assert_eq!(inbox_outcome(&app, "evt_wait_1").await, None);
    assert!(rows(&app, u).await.is_empty());

    assert_eq!(
        apply(&app, &checkout_completed("evt_wait_cs", T0, "cs_wait", u, "cus_wait", "sub_wait")).await,
        "applied"
    );
    assert_eq!(settled(&app, "evt_wait_1").await, "applied");
    let r = row(&app, u).await;
    assert_eq!((r.status.as_str(), r.stripe_subscription_id.as_deref()), ("active", Some("sub_wait")));
    app.stop().await;
}

#[tokio::test]
async fn an_invoice_before_its_subscription_waits_for_it() {
    let app = spawn_with(|v| {
        v.insert("RETRY_DELAYS".into(), "300ms,600ms,1200ms,2400ms".into());
    })
    .await;
    let u = user(&app).await;
    deliver(&app, &invoice("evt_early_in", "invoice.paid", T0 + 2, "cus_early", "sub_early", true)).await;
    app.eventually("the invoice waits in a retry queue", || async {
        (waiting_for_retry(&app).await == 1).then_some(())
    })
    .await;
    let s = Sub::new("sub_early", "cus_early", "incomplete").user(u);
    assert_eq!(apply(&app, &s.basil("evt_early_sub", "customer.subscription.created", T0 + 1)).await, "applied");
    assert_eq!(settled(&app, "evt_early_in").await, "applied");
    assert_eq!(row(&app, u).await.status, "active");
    app.stop().await;
}

#[tokio::test]
async fn a_user_never_found_is_parked_with_the_reason() {
    let app = spawn().await; // the harness's RETRY_DELAYS: 100ms,200ms
    // metadata.user_id names no existing user, and nothing else names one either.
    let s = Sub::new("sub_lost", "cus_nobody", "active").user(987_654);
    deliver(&app, &s.basil("evt_lost", "customer.subscription.created", T0)).await;
    let (reason, attempt, body) = next_dead_letter(&app).await;
    assert_eq!(reason, "gave up after 3 tries: no user for customer cus_nobody yet");
    assert_eq!(attempt, 3);
    assert_eq!(body["key"], "stripe:evt_lost");
    assert_eq!(inbox_outcome(&app, "evt_lost").await, None);
    assert_eq!(all_rows(&app).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_plan_updates_an_existing_row_but_cannot_create_one() {
    let app = spawn().await;
    let gold = price("price_gold", Some("gold_monthly"), json!({}));

    // The dashboard's free row is found and updated; its plan stays as it is.
    let with_row = user(&app).await;
    dashboard_free_row(&app, with_row).await;
    let s = Sub::new("sub_gold1", "cus_gold1", "trialing").user(with_row).price(gold.clone());
    assert_eq!(apply(&app, &s.basil("evt_gold1", "customer.subscription.created", T0)).await, "applied");
    let r = row(&app, with_row).await;
    assert_eq!((r.plan.as_str(), r.status.as_str()), ("free", "trialing"));
    assert_eq!(r.stripe_subscription_id.as_deref(), Some("sub_gold1"));
    assert_eq!(r.current_period_end, Some(utc(T0 + MONTH)));
    assert_eq!(r.created_at, utc(1_735_689_600), "the dashboard's row, not a new one");
    assert_recent(r.updated_at);

    // Without a row to update, the event is parked at once with the price it names.
    let without_row = user(&app).await;
    let s = Sub::new("sub_gold2", "cus_gold2", "active").user(without_row).price(gold);
    deliver(&app, &s.basil("evt_gold2", "customer.subscription.created", T0)).await;
    let (reason, attempt, _) = next_dead_letter(&app).await;
    assert_eq!(
        reason,
        r#"price price_gold names no plan: "gold_monthly" is not one of free, basic, premium, enterprise"#
    );
    assert_eq!(attempt, 1);
    assert!(rows(&app, without_row).await.is_empty());
    assert_eq!(inbox_outcome(&app, "evt_gold2").await, None);
    app.stop().await;
}

#[tokio::test]
async fn unknown_event_types_are_recorded_not_applied() {
    let app = spawn().await;
    let u = user(&app).await;
    dashboard_free_row(&app, u).await;
    let before = row(&app, u).await;
    let customer = event(
        "evt_cust",
        "customer.created",
        T0,
        "2025-03-31.basil",
        json!({"id": "cus_new", "object": "customer", "email": "a@example.com", "metadata": {"user_id": u.to_string()}}),
    );
    assert_eq!(apply(&app, &customer).await, "ignored: event type not applied");
    let trial = Sub::new("sub_trial", "cus_new", "trialing").user(u).basil(
        "evt_trial",
        "customer.subscription.trial_will_end",
        T0 + 1,
    );
    assert_eq!(apply(&app, &trial).await, "ignored: event type not applied");
    assert_eq!(row(&app, u).await, before);
    let (kind,): (String,) = sqlx::query_as(
        "SELECT kind::text FROM webhook_worker.inbox WHERE key_hash = webhook_worker.event_key_hash('stripe:evt_cust')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(kind, "stripe_other");
    app.stop().await;
}

#[tokio::test]
async fn a_rotated_secret_and_several_signatures_are_accepted() {
    let app = TestApp::spawn_with(|v| {
        v.insert("STRIPE_WEBHOOK_SECRET".into(), format!("{NEW_SECRET}, {OLD_SECRET}"));
    })
    .await;
    let u = user(&app).await;
    let s = Sub::new("sub_rot", "cus_rot", "active").user(u);
    let by_old = s.basil("evt_rot_1", "customer.subscription.created", T0);
    assert_eq!(post_signed(&app, OLD_SECRET, &by_old).await, (200, json!({"received": true})));
    let by_new = invoice("evt_rot_2", "invoice.payment_failed", T0 + 1, "cus_rot", "sub_rot", true);
    assert_eq!(post_signed(&app, NEW_SECRET, &by_new).await.0, 200);

    // What Stripe sends during a rollover: one v1 per live secret, and a v0 to ignore.
    let body =
        serde_json::to_vec_pretty(&invoice("evt_rot_3", "invoice.paid", T0 + 2, "cus_rot", "sub_rot", true)).unwrap();
    let t = now();
    let v1 = |secret| sign_header(secret, t, &body).split_once(",v1=").unwrap().1.to_string();
    let header = format!(
        "t={t},v1={},v1={},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39",
        v1("whsec_unknown"),
        v1(OLD_SECRET)
    );
    assert_eq!(post_raw(&app, &body, Some(&header)).await.0, 200);

    // A secret that is neither is refused.
    let other = s.basil("evt_rot_4", "customer.subscription.updated", T0 + 3);
    assert_eq!(post_signed(&app, SECRET, &other).await.0, 401);

    for evt in ["evt_rot_1", "evt_rot_2", "evt_rot_3"] {
        assert_eq!(settled(&app, evt).await, "applied");
    }
    assert_eq!(row(&app, u).await.status, "active");
    assert_eq!(inbox_outcome(&app, "evt_rot_4").await, None);
    app.stop().await;
}

#[tokio::test]
async fn refusals_get_the_contract_answer_and_change_nothing() {
    let app = spawn_with(|v| {
        v.insert("BODY_LIMIT_BYTES".into(), "65536".into());
    })
    .await;
    let u = user(&app).await;
    let good = Sub::new("sub_ref", "cus_ref", "active").user(u).basil("evt_ref", "customer.subscription.created", T0);
    let body = serde_json::to_vec_pretty(&good).unwrap();
    let refused = |code: &str| json!({"error": code});
    let code = |(status, json): (u16, Value)| (status, json!({"error": json["error"]}));

    // Signed 301 s ago: outside Stripe's 300 s tolerance.
    let old = sign_header(SECRET, now() - 301, &body);
    assert_eq!(code(post_raw(&app, &body, Some(&old)).await), (401, refused("timestamp_out_of_tolerance")));
    // Wrong secret; a tampered body; garbage; none at all; a v0 alone.
    let wrong = sign_header("whsec_wrong", now(), &body);
    assert_eq!(code(post_raw(&app, &body, Some(&wrong)).await), (401, refused("invalid_signature")));
    let good_header = sign_header(SECRET, now(), &body);
    let mut tampered = body.clone();
    tampered.push(b'\n');
    assert_eq!(code(post_raw(&app, &tampered, Some(&good_header)).await), (401, refused("invalid_signature")));
    assert_eq!(code(post_raw(&app, &body, Some("garbage")).await), (401, refused("malformed_signature")));
    assert_eq!(code(post_raw(&app, &body, None).await), (401, refused("missing_signature")));
    let v0_only = good_header.replace("v1=", "v0=");
    assert_eq!(code(post_raw(&app, &body, Some(&v0_only)).await), (401, refused("malformed_signature")));

    // Good signatures over bodies that are not JSON, or miss a field.
    let not_json = b"{\"id\": \"evt_x\",";
    let r = post_raw(&app, not_json, Some(&sign_header(SECRET, now(), not_json))).await;
    assert_eq!(code(r), (400, refused("malformed_body")));
    for (field, broken) in [
        ("created", {
            let mut e = good.clone();
            e.as_object_mut().unwrap().remove("created");
            e
        }),
        ("id", {
            let mut e = good.clone();
            e.as_object_mut().unwrap().remove("id");
            e
        }),
        ("data.object.customer", {
            let mut e = good.clone();
            e["data"]["object"].as_object_mut().unwrap().remove("customer");
            e
        }),
    ] {
        let (status, json) = post_signed(&app, SECRET, &broken).await;
        assert_eq!((status, &json["error"], &json["field"]), (422, &json!("invalid_field"), &json!(field)));
    }
    // Over the size limit.
    let mut big = good.clone();
    big["data"]["object"]["description"] = json!("x".repeat(70_000));
    assert_eq!(code(post_signed(&app, SECRET, &big).await), (413, refused("payload_too_large")));

    // None of it reached the worker; the good delivery afterwards is the only thing that lands.
    assert_eq!(apply(&app, &good).await, "applied");
    let (inbox,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM webhook_worker.inbox").fetch_one(&app.pool).await.unwrap();
    assert_eq!(inbox, 1);
    assert_eq!(row(&app, u).await.status, "active");
    app.stop().await;
}

#[tokio::test]
async fn without_a_secret_the_endpoint_is_not_configured() {
    let app = TestApp::spawn().await;
    let event = Sub::new("sub_nc", "cus_nc", "active").basil("evt_nc", "customer.subscription.created", T0);
    let (status, json) = post_signed(&app, SECRET, &event).await;
    assert_eq!((status, &json["error"]), (404, &json!("not_configured")));
    // Refused before anything was published or logged: nothing is on its way.
    assert_eq!(inbox_outcome(&app, "evt_nc").await, None);
    assert_eq!(all_rows(&app).await, 0);
    app.stop().await;
}

/// Two transactions for one user, straight through the worker's code: the
/// second waits for the first one's user lock, then updates its row.
#[tokio::test]
async fn the_user_lock_makes_a_second_writer_wait_and_update() {
    use micro8gents::events::stripe::{Parsed, parse};
    use micro8gents::workers::{Outcome, billing};
    let app = spawn().await;
    let u = user(&app).await;
    let subscription = |sub: &str, evt: &str, created: i64| {
        let Ok(Parsed::Subscription(e)) =
            parse(&Sub::new(sub, "cus_lock", "active").user(u).basil(evt, "customer.subscription.created", created))
        else {
            panic!("a subscription event")
        };
        e
    };
    let (first, second) =
        (subscription("sub_lock_a", "evt_lock_a", T0), subscription("sub_lock_b", "evt_lock_b", T0 + 1));

    let mut tx1 = app.pool.begin().await.unwrap();
    assert_eq!(billing::apply_subscription(&mut tx1, &first).await.unwrap(), Outcome::Applied);
    let pool = app.pool.clone();
    let waiting = tokio::spawn(async move {
        let mut tx2 = pool.begin().await.unwrap();
        let outcome = billing::apply_subscription(&mut tx2, &second).await.unwrap();
        tx2.commit().await.unwrap();
        outcome
    });
    // The second transaction is seen waiting on a lock in Postgres itself.
    app.eventually("the second writer waiting on a lock", || async {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.pool)
        .await
        .ok()?;
        (waiting > 0).then_some(())
    })
    .await;
    assert!(!waiting.is_finished(), "the second writer waits for the user's lock");
    tx1.commit().await.unwrap();
    assert_eq!(waiting.await.unwrap(), Outcome::Applied);
    // One row, showing the newer subscription (both live; sub_lock_b's events are newer, same created).
    let r = row(&app, u).await;
    assert_eq!(r.stripe_subscription_id.as_deref(), Some("sub_lock_b"));
    app.stop().await;
}

/// sqlx opens sessions in UTC, but the rows must not depend on that: a session in
/// another zone still writes UTC wall time (CONTRACT section 4).
#[tokio::test]
async fn timestamps_are_utc_whatever_the_session_time_zone() {
    use micro8gents::events::stripe::{Parsed, parse};
    use micro8gents::workers::{Outcome, billing};
    let app = spawn().await;
    let u = user(&app).await;
    let event = Sub::new("sub_tz", "cus_tz", "active").user(u).acacia("evt_tz", "customer.subscription.created", T0);
    let Ok(Parsed::Subscription(e)) = parse(&event) else { panic!("a subscription event") };
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL TimeZone = 'Pacific/Auckland'").execute(&mut *tx).await.unwrap();
    assert_eq!(billing::apply_subscription(&mut tx, &e).await.unwrap(), Outcome::Applied);
    tx.commit().await.unwrap();
    let r = row(&app, u).await;
    assert_eq!((r.current_period_start, r.current_period_end), (Some(utc(T0)), Some(utc(T0 + MONTH))));
    assert_recent(r.created_at);
    assert_recent(r.updated_at);
    app.stop().await;
}

/// Two worker processes on one database and one broker, a burst of events for
/// one user across eight subscriptions: one row, showing the newest subscription.
#[tokio::test]
async fn two_workers_and_a_burst_for_one_user_make_one_row() {
    let app = spawn_with(|v| {
        // Invoices may reach a worker before their subscription: give them time.
        v.insert("RETRY_DELAYS".into(), "500ms,1s,2s,4s".into());
        v.insert("BATCH_SIZE".into(), "1".into());
        v.insert("PREFETCH".into(), "1".into());
    })
    .await;
    let second_worker = app::start(app.cfg.clone(), Role::Work).await.unwrap();
    let u = user(&app).await;
    let events: Vec<Value> = (0..8)
        .flat_map(|i| {
            let sub = format!("sub_burst_{i}");
            let mut created = Sub::new(&sub, "cus_burst", "incomplete").user(u).basil(
                &format!("evt_b{i}_1"),
                "customer.subscription.created",
                T0 + i,
            );
            // Each subscription was created i seconds after the first.
            created["data"]["object"]["created"] = json!(T0 - 100 + i);
            let mut paid = invoice(&format!("evt_b{i}_2"), "invoice.paid", T0 + 100 + i, "cus_burst", &sub, true);
            paid["data"]["object"]["id"] = json!(format!("in_burst_{i}"));
            [created, paid]
        })
        .collect();
    let answers = futures_util::future::join_all(events.iter().map(|e| post_signed(&app, SECRET, e))).await;
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
    for e in &events {
        let outcome = settled(&app, e["id"].as_str().unwrap()).await;
        assert!(outcome == "applied" || outcome.starts_with("ignored: not the user"), "{outcome}");
    }
    // The invoices of the early subscriptions may have been retried first; all are settled now.
    let r = row(&app, u).await;
    assert_eq!(r.stripe_subscription_id.as_deref(), Some("sub_burst_7"));
    assert_eq!(r.status, "active");
    let (subs,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM webhook_worker.billing_subscriptions WHERE user_id = $1")
            .bind(u)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(subs, 8);
    second_worker.stop().await;
    app.stop().await;
}
