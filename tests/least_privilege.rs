//! Issue 11, points 5 and 6: the worker as a least-privileged Postgres role on
//! the dashboard's database. deploy/postgres/worker-role.sql (the README's role
//! SQL) is run as it is, with a unique role name; then `migrate` (adopting the
//! dashboard's schema), `serve` and `work` run under that role and apply real
//! signed Twilio, n8n and Stripe callbacks to data the dashboard made before
//! the worker ever ran.

mod common;

use std::collections::HashMap;

use chrono::Utc;
use common::dashboard::{DASHBOARD_SQL, TestDb};
use common::{PUBLIC_BASE_URL, amqp_url};
use hmac::{KeyInit, Mac};
use micro8gents::app::{self, Role};
use micro8gents::config::Config;
use micro8gents::verify::standard_webhooks::{Secret, sign};
use micro8gents::verify::twilio::{Algorithm, compute_signature};
use serde_json::json;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

const ROLE_SQL: &str = include_str!("../deploy/postgres/worker-role.sql");
const TOKEN: &str = "twilio-auth-token-least-privilege";
const N8N_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_least_privilege_0000000000000000";

/// A login role of its own, dropped (after the test's database) when the test ends.
struct TestRole(String);

impl Drop for TestRole {
    fn drop(&mut self) {
        let name = self.0.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&common::admin_url()).await {
                    let _ =
                        sqlx::raw_sql(AssertSqlSafe(format!("DROP ROLE IF EXISTS {name}"))).execute(&mut conn).await;
                }
            })
        })
        .join()
        .ok();
    }
}

/// What the dashboard made before the worker first ran.
struct Seeded {
    user: i32,
    business: i32,
    subscription: i32,
}

async fn seed(db: &TestDb) -> Seeded {
    let mut conn = db.connect().await;
    let (user,): (i32,) = sqlx::query_as(
        "INSERT INTO users (username, email, password, \"businessName\") VALUES ('dr-who', 'who@example.com', 'x', 'Acme Dental') RETURNING id",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let (business,): (i32,) = sqlx::query_as(
        "INSERT INTO businesses (user_id, business_name, email) VALUES ($1, 'Acme Dental', 'desk@example.com') RETURNING id",
    )
    .bind(user)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO hours_of_operation (business_id, day_of_week, open_time, close_time, is_open)
         SELECT $1, d, '09:00', '17:00', true FROM unnest(ARRAY['Monday','Tuesday','Wednesday','Thursday','Friday']) d",
    )
    .bind(business)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO integrations (business_id, type, config, status) VALUES
           ($1, 'twilio', $2, 'active'), ($1, 'n8n', $3, 'active')",
    )
    .bind(business)
    .bind(json!({"auth_token": TOKEN, "account_sid": "AC00"}))
    .bind(json!({"webhook_secret": N8N_SECRET}))
    .execute(&mut conn)
    .await
    .unwrap();
    // The dashboard gives every user a free plan at sign-up.
    let (subscription,): (i32,) =
        sqlx::query_as("INSERT INTO subscriptions (user_id, plan, status) VALUES ($1, 'free', 'active') RETURNING id")
            .bind(user)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    Seeded { user, business, subscription }
}

fn stripe_header(body: &str) -> String {
    let t = Utc::now().timestamp();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(STRIPE_SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn migrate_serve_and_work_run_as_the_readme_role_on_the_dashboards_database() {
    let role = TestRole(format!("m8_lp_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
    let db = TestDb::with(DASHBOARD_SQL).await;
    let seeded = seed(&db).await;
    db.exec(&ROLE_SQL.replace("micro8gents_worker", &role.0)).await;
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username(&role.0).unwrap();
    url.set_password(Some("change-me")).unwrap();
    let worker_url = url.to_string();
    let public_before = db.catalog("public").await;

    // migrate, as a user runs it, under the role.
    let out = common::dashboard::run_binary(&["migrate"], &[("DATABASE_URL", &worker_url)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("adopted the dashboard's public schema"), "{err}");

    // work and serve, as two processes would, under the role.
    let prefix = format!("test.{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let vars: HashMap<String, String> = [
        ("DATABASE_URL", worker_url.as_str()),
        ("AMQP_URL", &amqp_url()),
        ("AMQP_PREFIX", &prefix),
        ("LISTEN_ADDR", "127.0.0.1:0"),
        ("PUBLIC_BASE_URL", PUBLIC_BASE_URL),
        ("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET),
        ("RETRY_DELAYS", "100ms,200ms"),
        ("BATCH_WAIT", "2ms"),
        ("SHUTDOWN_GRACE", "5s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = Config::from_vars(&vars).unwrap();
    let work = app::start(cfg.clone(), Role::Work).await.expect("work starts");
    let serve = app::start(cfg.clone(), Role::Serve).await.expect("serve starts");
    let base = format!("http://{}", serve.addr.unwrap());
    let http = reqwest::Client::new();

    // Twilio: a call's status callbacks.
    let path = format!("/webhooks/twilio/{}/call-status", seeded.business);
    for (seq, status) in [("0", "ringing"), ("1", "completed")] {
        let params: Vec<(String, String)> = [
            ("CallSid", "CA00000000000000000000000000000051"),
            ("CallStatus", status),
            ("From", "+15550001111"),
            ("To", "+15550002222"),
            ("Direction", "inbound"),
            ("CallDuration", "125"),
            ("SequenceNumber", seq),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let sig = compute_signature(TOKEN, &format!("{PUBLIC_BASE_URL}{path}"), &params, Algorithm::HmacSha1);
        let res = http
            .post(format!("{base}{path}"))
            .header("x-twilio-signature", sig)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish())
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "twilio: {}", res.status());
    }

    // n8n: a booking outside opening hours (a Sunday).
    let body = json!({"external_id": "bk-1", "customer": "Jane Roe", "service": "Cleaning",
                      "date": "2026-03-15T14:30:00+02:00", "status": "upcoming"})
    .to_string();
    let (id, ts) = ("msg_least_privilege_1", Utc::now().timestamp());
    let sig = sign(&Secret::parse(N8N_SECRET).unwrap(), id, ts, body.as_bytes());
    let res = http
        .post(format!("{base}/webhooks/n8n/{}/bookings", seeded.business))
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "n8n: {}", res.status());

    // Stripe: the user's subscription becomes a paid one.
    let created = Utc::now().timestamp();
    let event = json!({
        "id": "evt_least_privilege_1", "object": "event", "api_version": "2025-03-31.basil", "created": created,
        "type": "customer.subscription.created", "livemode": false,
        "data": {"object": {
            "id": "sub_lp_1", "object": "subscription", "customer": "cus_lp_1", "status": "active",
            "created": created, "metadata": {"user_id": seeded.user.to_string()},
            "items": {"object": "list", "data": [{
                "id": "si_lp_1", "object": "subscription_item",
                "current_period_start": created, "current_period_end": created + 2_592_000,
                "price": {"id": "price_basic", "object": "price", "lookup_key": "basic", "metadata": {}}
            }]}
        }}
    })
    .to_string();
    let res = http
        .post(format!("{base}/webhooks/stripe"))
        .header("stripe-signature", stripe_header(&event))
        .header("content-type", "application/json")
        .body(event)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "stripe: {}", res.status());

    // What the dashboard shows, read as the dashboard (admin) reads it.
    let mut admin = db.connect().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM webhook_worker.inbox WHERE outcome = 'applied'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
        if n >= 4 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {n} of 4 events applied");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (status, duration): (String, Option<String>) =
        sqlx::query_as("SELECT status::text, duration FROM calls WHERE business_id = $1")
            .bind(seeded.business)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!((status.as_str(), duration.as_deref()), ("completed", Some("2:05")));
    let (customer,): (String,) = sqlx::query_as("SELECT customer FROM bookings WHERE business_id = $1")
        .bind(seeded.business)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(customer, "Jane Roe");
    let subs: Vec<(i32, String, Option<String>)> =
        sqlx::query_as("SELECT id, plan::text, stripe_subscription_id FROM subscriptions WHERE user_id = $1")
            .bind(seeded.user)
            .fetch_all(&mut admin)
            .await
            .unwrap();
    assert_eq!(subs, vec![(seeded.subscription, "basic".to_string(), Some("sub_lp_1".to_string()))]);

    serve.stop().await;
    work.stop().await;
    // The role could never have changed public, and did not.
    assert_eq!(db.catalog("public").await, public_before);
    let (owner,): (String,) =
        sqlx::query_as("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'webhook_worker'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(owner, role.0);
    admin.close().await.ok();
    common::delete_broker_objects_of(&[("AMQP_PREFIX", &prefix), ("RETRY_DELAYS", "100ms,200ms")]).await;
}
