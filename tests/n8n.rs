//! n8n booking pushes through the real stack: HTTP ingress, RabbitMQ, worker, Postgres.

mod common;

use base64::Engine as _;
use chrono::{NaiveDateTime, Utc};
use common::TestApp;
use hmac::{KeyInit, Mac};
use micro8gents::app::{self, Role};
use micro8gents::verify::standard_webhooks::{Secret, sign};
use serde_json::{Value, json};
use sqlx::PgPool;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
/// PROTOCOLS.md 5.3: the ASCII key an n8n Crypto node is given, and the secret stored for it.
const N8N_KEY: &str = "n8n-booking-signing-key-2025-abcdefgh";
const N8N_SECRET: &str = "whsec_bjhuLWJvb2tpbmctc2lnbmluZy1rZXktMjAyNS1hYmNkZWZnaA==";

fn now() -> i64 {
    Utc::now().timestamp()
}

fn booking(external_id: Option<&str>, customer: &str, date: &str, status: &str) -> Value {
    let mut b = json!({
        "customer": customer,
        "phone": "+14155552671",
        "email": "jane@example.com",
        "service": "Cleaning",
        "date": date,
        "status": status,
        "notes": "first visit",
        // n8n adds fields of its own; they are ignored.
        "workflow": {"id": "wf_1", "execution": 1234},
    });
    if let Some(id) = external_id {
        b["external_id"] = json!(id);
    }
    b
}

async fn n8n_business(app: &TestApp, secret: &str) -> i32 {
    let b = app.business().await;
    app.integration(b, "n8n", json!({"webhook_secret": secret}), "active").await;
    b
}

fn path(business: impl std::fmt::Display) -> String {
    format!("/webhooks/n8n/{business}/bookings")
}

/// Posts `body` verbatim with the three Standard Webhooks headers, `signature` as given.
async fn post_signed(
    app: &TestApp,
    business: i32,
    id: &str,
    ts: i64,
    signature: &str,
    body: &str,
) -> reqwest::Response {
    let ts = ts.to_string();
    let headers = [
        ("webhook-id", id),
        ("webhook-timestamp", ts.as_str()),
        ("webhook-signature", signature),
        ("content-type", "application/json"),
    ];
    app.post_raw(&path(business), body.to_string(), &headers).await
}

/// Signs `body` with `secret` as a Standard Webhooks sender does, and posts it.
async fn push_at(app: &TestApp, business: i32, secret: &str, id: &str, ts: i64, body: &str) -> reqwest::Response {
    let sig = sign(&Secret::parse(secret).unwrap(), id, ts, body.as_bytes());
    post_signed(app, business, id, ts, &sig, body).await
}

async fn push(app: &TestApp, business: i32, id: &str, body: &Value) -> reqwest::Response {
    push_at(app, business, SECRET, id, now(), &body.to_string()).await
}

/// Asserts a 202 with the contract's body.
async fn accepted(r: reqwest::Response, id: &str) {
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "accepted", "webhook_id": id}));
}

/// Asserts a refusal's status and error code; returns its body.
async fn refused(r: reqwest::Response, status: u16, error: &str) -> Value {
    assert_eq!(r.status(), status);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], error, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    body
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct BookingRow {
    id: i32,
    customer: String,
    phone: Option<String>,
    email: Option<String>,
    service: String,
    date: NaiveDateTime,
    status: String,
    notes: Option<String>,
}

async fn bookings_of(pool: &PgPool, business: i32) -> Vec<BookingRow> {
    sqlx::query_as(
        "SELECT id, customer, phone, email, service, date, status::text AS status, notes
           FROM bookings WHERE business_id = $1 ORDER BY id",
    )
    .bind(business)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(pool).await.unwrap();
    n
}

fn utc(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
}

#[tokio::test]
async fn a_push_creates_a_booking_in_utc_wall_time() {
    let app = TestApp::spawn().await;
    let b = n8n_business(&app, SECRET).await;
    let r = push(&app, b, "msg_create_1", &booking(Some("bk_1"), "Jane Doe", "2026-03-15T14:30:00+02:00", "upcoming"))
        .await;
    accepted(r, "msg_create_1").await;
    app.settled(1).await;

    let rows = bookings_of(&app.pool, b).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row.customer, "Jane Doe");
    assert_eq!(row.phone.as_deref(), Some("+14155552671"));
    assert_eq!(row.email.as_deref(), Some("jane@example.com"));
    assert_eq!(row.service, "Cleaning");
    assert_eq!(row.date, utc("2026-03-15 12:30:00"));
    assert_eq!(row.status, "upcoming");
    assert_eq!(row.notes.as_deref(), Some("first visit"));
    let (is_key, outcome): (bool, String) =
        sqlx::query_as("SELECT key_hash = webhook_worker.event_key_hash($1), outcome FROM webhook_worker.inbox")
            .bind(format!("n8n:{b}:msg_create_1"))
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((is_key, outcome.as_str()), (true, "applied"));
    let (mapped, webhook_id): (Option<i32>, Option<String>) = sqlx::query_as(
        "SELECT booking_id, last_webhook_id FROM webhook_worker.n8n_bookings WHERE business_id = $1 AND external_id = 'bk_1'",
    )
    .bind(b)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((mapped, webhook_id.as_deref()), (Some(row.id), Some("msg_create_1")));
    // No opening hours configured: nothing is flagged.
    assert_eq!(count(&app.pool, "SELECT count(*) FROM webhook_worker.bookings_outside_hours").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_later_push_with_the_same_external_id_updates_the_booking_and_a_cancel_keeps_it() {
    let app = TestApp::spawn().await;
    let b = n8n_business(&app, SECRET).await;
    let first = booking(Some("bk_1"), "Jane Doe", "2026-03-15T14:30:00+02:00", "upcoming");
    accepted(push(&app, b, "msg_1", &first).await, "msg_1").await;
    app.settled(1).await;
    let created = bookings_of(&app.pool, b).await;

    // Moved, renamed, phone and notes dropped: a push carries the whole booking.
    let moved = json!({"external_id": "bk_1", "customer": "Jane Roe", "service": "Whitening",
                       "date": "2026-03-16T09:00:00-05:00", "email": "roe@example.org"});
    accepted(push(&app, b, "msg_2", &moved).await, "msg_2").await;
    app.settled(2).await;
    let rows = bookings_of(&app.pool, b).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let expected = BookingRow {
        id: created[0].id,
        customer: "Jane Roe".into(),
        phone: None,
        email: Some("roe@example.org".into()),
        service: "Whitening".into(),
        date: utc("2026-03-16 14:00:00"),
        status: "upcoming".into(),
        notes: None,
    };
    assert_eq!(rows[0], expected);

    let mut canceled = moved.clone();
    canceled["status"] = json!("canceled");
    accepted(push(&app, b, "msg_3", &canceled).await, "msg_3").await;
    app.settled(3).await;
    let rows = bookings_of(&app.pool, b).await;
    assert_eq!(rows, vec![BookingRow { status: "canceled".into(), ..expected }]);
    app.stop().await;
}

#[tokio::test]
async fn pushes_without_external_id_always_create() {
    let app = TestApp::spawn().await;
    let b = n8n_business(&app, SECRET).await;
    let walk_in = booking(None, "Walk In", "2026-03-16T10:00:00Z", "completed");
    accepted(push(&app, b, "msg_a", &walk_in).await, "msg_a").await;
    accepted(push(&app, b, "msg_b", &walk_in).await, "msg_b").await;
    app.settled(2).await;
    let rows = bookings_of(&app.pool, b).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.customer == "Walk In" && r.status == "completed"));
    assert_eq!(count(&app.pool, "SELECT count(*) FROM webhook_worker.n8n_bookings").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn the_same_webhook_id_is_applied_once_even_with_a_changed_body() {
    let app = TestApp::spawn().await;
    let b = n8n_business(&app, SECRET).await;
    let first = booking(Some("bk_1"), "First Body", "2026-03-16T10:00:00Z", "upcoming");
    let changed = booking(Some("bk_1"), "Changed Body", "2026-03-17T10:00:00Z", "canceled");
    accepted(push(&app, b, "msg_dup", &first).await, "msg_dup").await;
    // A retry (same id, new attempt time) with another body: accepted, and no effect.
    let r = push_at(&app, b, SECRET, "msg_dup", now() + 1, &changed.to_string()).await;
    accepted(r, "msg_dup").await;
    // Both settled (one applied, one a duplicate). Not "a later push landed":
    // the worker applies other entities' events in other lanes, in any order.
    app.quiet().await;

    let rows = bookings_of(&app.pool, b).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].customer.as_str(), rows[0].status.as_str()), ("First Body", "upcoming"));
    assert_eq!(rows[0].date, utc("2026-03-16 10:00:00"));
    assert_eq!(count(&app.pool, "SELECT count(*) FROM webhook_worker.inbox").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn an_older_push_for_an_external_id_changes_nothing() {
    let app = TestApp::spawn().await;
    let b = n8n_business(&app, SECRET).await;
    let t = now();
    let newer = booking(Some("bk_1"), "Newer", "2026-03-16T10:00:00Z", "canceled");
    let older = booking(Some("bk_1"), "Older", "2026-03-16T11:00:00Z", "upcoming");
    accepted(push_at(&app, b, SECRET, "msg_newer", t, &newer.to_string()).await, "msg_newer").await;
    app.settled(1).await;
    // Sent earlier, delivered later (an n8n retry from before the newer push).
    accepted(push_at(&app, b, SECRET, "msg_older", t - 60, &older.to_string()).await, "msg_older").await;
    app.settled(2).await;
    let rows = bookings_of(&app.pool, b).await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].customer.as_str(), rows[0].status.as_str()), ("Newer", "canceled"));
    let (outcome,): (String,) =
        sqlx::query_as("SELECT outcome FROM webhook_worker.inbox WHERE key_hash = webhook_worker.event_key_hash($1)")
            .bind(format!("n8n:{b}:msg_older"))
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(outcome, "ignored: older than the last applied push");
    app.stop().await;
}

#[tokio::test]
async fn every_invalid_field_is_a_422_naming_it_and_nothing_is_published() {
    let app = TestApp::spawn().await;
    let b = n8n_business(&app, SECRET).await;
    let good = || booking(Some("bk_1"), "Jane Doe", "2026-03-16T10:00:00Z", "upcoming");
    let with = |field: &str, value: Value| {
        let mut v = good();
        v[field] = value;
        v
    };
    let without = |field: &str| {
        let mut v = good();
        v.as_object_mut().unwrap().remove(field);
        v
    };
    let cases = [
        (without("customer"), "customer", "is required"),
        (with("customer", json!("x".repeat(101))), "customer", "must be at most 100 characters"),
        (with("customer", json!(42)), "customer", "must be a string"),
        (with("phone", json!("+1 (415) 555-2671 x99")), "phone", "must be at most 20 characters"),
        (with("email", json!(format!("{}@example.com", "a".repeat(244)))), "email", "must be at most 255 characters"),
        (with("email", json!("jane at example.com")), "email", "must be an email address"),
        (without("service"), "service", "is required"),
        (with("service", json!("s".repeat(101))), "service", "must be at most 100 characters"),
        (without("date"), "date", "is required"),
        (
            with("date", json!("2026-03-16 10:00")),
            "date",
            "must be an RFC 3339 date-time, e.g. 2026-03-15T14:30:00+02:00",
        ),
        (with("status", json!("pending")), "status", "must be one of upcoming, completed, canceled"),
        (with("notes", json!({"text": "x"})), "notes", "must be a string"),
        (with("external_id", json!("e".repeat(256))), "external_id", "must be at most 255 characters"),
        (with("external_id", json!(17)), "external_id", "must be a string"),
    ];
    for (i, (body, field, rule)) in cases.iter().enumerate() {
        let r = push(&app, b, &format!("msg_bad_{i}"), body).await;
        let json = refused(r, 422, "invalid_field").await;
        assert_eq!((json["field"].as_str(), json["rule"].as_str()), (Some(*field), Some(*rule)), "case {i}: {json}");
    }
    // Lengths count characters: 100 two-byte characters are within the limit.
    let wide = with("customer", json!("é".repeat(100)));
    // Bodies that are not a JSON object are 400.
    for (i, raw) in ["not json", "[1,2]", "\"text\"", ""].iter().enumerate() {
        let r = push_at(&app, b, SECRET, &format!("msg_raw_{i}"), now(), raw).await;
        refused(r, 400, "malformed_body").await;
    }
    accepted(push(&app, b, "msg_wide", &wide).await, "msg_wide").await;
    app.settled(1).await;
    // Everything accepted settled, then check only the good push landed.
    app.quiet().await;
    assert_eq!(count(&app.pool, "SELECT count(*) FROM webhook_worker.inbox").await, 1);
    let rows = bookings_of(&app.pool, b).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].customer, "é".repeat(100));
    app.stop().await;
}

#[tokio::test]
async fn refusals_of_the_signature_and_the_business_get_the_contract_answer() {
    let app = TestApp::spawn_with(|v| {
        v.insert("BODY_LIMIT_BYTES".into(), "2048".into());
    })
    .await;
    let b = n8n_business(&app, SECRET).await;
    let other = n8n_business(&app, OTHER_SECRET).await;
    let no_integration = app.business().await;
    let inactive = app.business().await;
    app.integration(inactive, "n8n", json!({"webhook_secret": SECRET}), "inactive").await;
    let unparsable = app.business().await;
    app.integration(unparsable, "n8n", json!({"webhook_secret": "whsec_not base64!"}), "active").await;
    let body = booking(Some("bk_1"), "Jane Doe", "2026-03-16T10:00:00Z", "upcoming").to_string();

    // Expired (and future) timestamps, correctly signed.
    let r = push_at(&app, b, SECRET, "msg_old", now() - 301, &body).await;
    refused(r, 401, "timestamp_out_of_tolerance").await;
    let r = push_at(&app, b, SECRET, "msg_future", now() + 400, &body).await;
    refused(r, 401, "timestamp_out_of_tolerance").await;
    // A wrong secret, and another business's own secret.
    let wrong = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    refused(push_at(&app, b, wrong, "msg_wrong", now(), &body).await, 401, "invalid_signature").await;
    refused(push_at(&app, b, OTHER_SECRET, "msg_other", now(), &body).await, 401, "invalid_signature").await;
    // A good signature over another body.
    let sig = sign(&Secret::parse(SECRET).unwrap(), "msg_tamper", now(), body.as_bytes());
    let tampered = body.replace("Jane", "John");
    refused(post_signed(&app, b, "msg_tamper", now(), &sig, &tampered).await, 401, "invalid_signature").await;
    // Missing headers; a webhook-id too long or with a space; a timestamp that is no number.
    let r = app.post_raw(&path(b), body.clone(), &[("content-type", "application/json")]).await;
    refused(r, 401, "missing_signature").await;
    let long_id = "m".repeat(201);
    refused(push_at(&app, b, SECRET, &long_id, now(), &body).await, 401, "malformed_signature").await;
    refused(push_at(&app, b, SECRET, "msg with space", now(), &body).await, 401, "malformed_signature").await;
    let r = app
        .post_raw(
            &path(b),
            body.clone(),
            &[("webhook-id", "msg_x"), ("webhook-timestamp", "soon"), ("webhook-signature", "v1,AAAA")],
        )
        .await;
    refused(r, 401, "malformed_signature").await;
    // Unknown businesses, and businesses without a usable active n8n integration.
    refused(push_at(&app, 987_654, SECRET, "msg_unknown", now(), &body).await, 404, "unknown_business").await;
    refused(app.post_raw(&path("abc"), body.clone(), &[]).await, 404, "unknown_business").await;
    for business in [no_integration, inactive, unparsable] {
        let r = push_at(&app, business, SECRET, "msg_none", now(), &body).await;
        refused(r, 404, "no_active_integration").await;
    }
    // Too large.
    let big = booking(Some("bk_1"), "Jane Doe", "2026-03-16T10:00:00Z", "upcoming");
    let mut big = big;
    big["notes"] = json!("n".repeat(4096));
    refused(push(&app, b, "msg_big", &big).await, 413, "payload_too_large").await;
    // No answer leaks a secret.
    let r = push_at(&app, b, wrong, "msg_leak", now(), &body).await;
    let text = r.text().await.unwrap();
    assert!(!text.contains("whsec_") && !text.contains("MfKQ9r8G"), "{text}");

    // The other business's push with its own secret is the only thing that lands.
    accepted(push_at(&app, other, OTHER_SECRET, "msg_ok", now(), &body).await, "msg_ok").await;
    app.settled(1).await;
    app.quiet().await;
    assert_eq!(count(&app.pool, "SELECT count(*) FROM webhook_worker.inbox").await, 1);
    for business in [b, no_integration, inactive, unparsable] {
        assert!(bookings_of(&app.pool, business).await.is_empty());
    }
    assert_eq!(bookings_of(&app.pool, other).await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_signature_header_with_two_v1_values_passes_if_one_matches() {
    let app = TestApp::spawn().await;
    let b = n8n_business(&app, SECRET).await;
    let body = booking(Some("bk_rot"), "Rotated", "2026-03-16T10:00:00Z", "upcoming").to_string();
    let ts = now();
    let old = sign(&Secret::parse(OTHER_SECRET).unwrap(), "msg_rot", ts, body.as_bytes());
    let new = sign(&Secret::parse(SECRET).unwrap(), "msg_rot", ts, body.as_bytes());
    // The sender signs with both its old and its new secret during a rotation.
    let r = post_signed(&app, b, "msg_rot", ts, &format!("{old} {new}"), &body).await;
    accepted(r, "msg_rot").await;
    app.settled(1).await;
    assert_eq!(bookings_of(&app.pool, b).await[0].customer, "Rotated");
    app.stop().await;
}

/// What an n8n Crypto node (Hmac, SHA256, BASE64) computes with the secret text `key`.
fn crypto_node_hmac(key: &str, value: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(value.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn a_key_given_to_an_n8n_crypto_node_verifies_against_its_whsec_secret() {
    // The PROTOCOLS.md 5.3 vector, computed the Crypto node's way.
    let vector = r#"{"type":"appointment.booked","timestamp":"2025-11-25T12:00:00.000Z","data":{"booking_id":"bk_20251125_0001","clinic_id":"42","patient":{"name":"Jane Doe","phone":"+14155552671"},"start":"2025-12-01T15:30:00Z","end":"2025-12-01T16:00:00Z","service":"consultation","source":"n8n"}}"#;
    let sig = crypto_node_hmac(N8N_KEY, &format!("msg_bk_20251125_0001.1764072000.{vector}"));
    assert_eq!(sig, "ZR0paqjHtLwF0NG4QbfINF3113wDDE5pp1iI4bcnf20=");

    let app = TestApp::spawn().await;
    let b = n8n_business(&app, N8N_SECRET).await;
    let body = booking(Some("bk_20251125_0001"), "Jane Doe", "2025-12-01T15:30:00Z", "upcoming").to_string();
    let (id, ts) = ("msg_bk_20251125_0001", now());
    let sig = crypto_node_hmac(N8N_KEY, &format!("{id}.{ts}.{body}"));
    accepted(post_signed(&app, b, id, ts, &format!("v1,{sig}"), &body).await, id).await;
    app.settled(1).await;
    let rows = bookings_of(&app.pool, b).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].date, utc("2025-12-01 15:30:00"));
    app.stop().await;
}

async fn weekdays_nine_to_five(app: &TestApp, business: i32) {
    for day in ["Monday", "tuesday", "Wednesday", "Thursday", "Friday"] {
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
    sqlx::query("INSERT INTO hours_of_operation (business_id, day_of_week, is_open) VALUES ($1, 'Saturday', false)")
        .bind(business)
        .execute(&app.pool)
        .await
        .unwrap();
}

#[derive(Debug, sqlx::FromRow)]
struct FlagRow {
    booking_id: i32,
    business_id: i32,
    booking_date: NaiveDateTime,
    local_date: String,
    reason: String,
    webhook_id: String,
}

async fn flags(pool: &PgPool) -> Vec<FlagRow> {
    sqlx::query_as(
        "SELECT booking_id, business_id, booking_date, local_date, reason, webhook_id
           FROM webhook_worker.bookings_outside_hours ORDER BY booking_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_booking_outside_opening_hours_is_stored_and_flagged() {
    let app = TestApp::spawn().await;
    let b = n8n_business(&app, SECRET).await;
    weekdays_nine_to_five(&app, b).await;

    // Sunday 2026-03-15, 14:30 local: the business has no hours that day.
    let sunday = booking(Some("bk_sun"), "Jane Doe", "2026-03-15T14:30:00+02:00", "upcoming");
    accepted(push(&app, b, "msg_sun", &sunday).await, "msg_sun").await;
    // Monday 08:30 local (+02:00), before opening.
    let early = booking(None, "Early Bird", "2026-03-16T08:30:00+02:00", "upcoming");
    accepted(push(&app, b, "msg_early", &early).await, "msg_early").await;
    // Monday 09:30 local, though 07:30 in UTC: inside, judged in the pushed offset.
    let inside = booking(None, "On Time", "2026-03-16T09:30:00+02:00", "upcoming");
    accepted(push(&app, b, "msg_inside", &inside).await, "msg_inside").await;
    app.settled(3).await;

    let rows = bookings_of(&app.pool, b).await;
    assert_eq!(rows.len(), 3, "stored all the same: {rows:?}");
    let id_of = |name: &str| rows.iter().find(|r| r.customer == name).unwrap().id;
    let f = flags(&app.pool).await;
    assert_eq!(f.len(), 2, "{f:?}");
    let sun = f.iter().find(|f| f.booking_id == id_of("Jane Doe")).unwrap();
    assert_eq!(sun.business_id, b);
    assert_eq!(sun.booking_date, utc("2026-03-15 12:30:00"));
    assert_eq!(sun.local_date, "2026-03-15T14:30:00+02:00");
    assert_eq!(sun.reason, "no opening hours for Sunday");
    assert_eq!(sun.webhook_id, "msg_sun");
    let early_flag = f.iter().find(|f| f.booking_id == id_of("Early Bird")).unwrap();
    assert_eq!(early_flag.reason, "outside opening hours on Monday (09:00-17:00)");

    // Moved into opening hours: the flag goes. Moved to a closed Saturday: it comes back.
    let mut moved = sunday.clone();
    moved["date"] = json!("2026-03-17T10:00:00+02:00");
    accepted(push(&app, b, "msg_moved", &moved).await, "msg_moved").await;
    app.settled(4).await;
    assert!(flags(&app.pool).await.iter().all(|f| f.booking_id != id_of("Jane Doe")));
    moved["date"] = json!("2026-03-21T10:00:00+02:00");
    accepted(push_at(&app, b, SECRET, "msg_sat", now() + 1, &moved.to_string()).await, "msg_sat").await;
    app.settled(5).await;
    let f = flags(&app.pool).await;
    let sat = f.iter().find(|f| f.booking_id == id_of("Jane Doe")).unwrap();
    assert_eq!((sat.reason.as_str(), sat.webhook_id.as_str()), ("closed on Saturday", "msg_sat"));
    assert_eq!(bookings_of(&app.pool, b).await.len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn two_workers_never_create_two_bookings_for_one_external_id() {
    let app = TestApp::spawn_with(|v| {
        // Small batches, so the two workers really interleave.
        v.insert("BATCH_SIZE".into(), "2".into());
        v.insert("PREFETCH".into(), "2".into());
    })
    .await;
    let second = app::start(app.cfg.clone(), Role::Work).await.unwrap();
    let b = n8n_business(&app, SECRET).await;
    let t = now() - 100;
    let pushes = (0..30).map(|i| {
        let body = booking(Some("bk_race"), &format!("Version {i}"), "2026-03-16T10:00:00Z", "upcoming").to_string();
        let app = &app;
        async move {
            let id = format!("msg_race_{i}");
            accepted(push_at(app, b, SECRET, &id, t + i, &body).await, &id).await;
        }
    });
    futures_util::future::join_all(pushes).await;
    app.settled(30).await;
    second.stop().await;
    let rows = bookings_of(&app.pool, b).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    // Whatever the order they were applied in, the newest push is what stands.
    assert_eq!(rows[0].customer, "Version 29");
    let (last,): (Option<String>,) =
        sqlx::query_as("SELECT last_webhook_id FROM webhook_worker.n8n_bookings WHERE external_id = 'bk_race'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(last.as_deref(), Some("msg_race_29"));
    app.stop().await;
}
