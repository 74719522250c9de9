//! What an unknown business id may cost: the secret cache is bounded, remembers
//! unknown ids, and spends a budget of reads on them, so a flood of random ids costs
//! a bounded number of queries and memory while real businesses keep working.
//! A warm-up at start makes every existing business known, so a restart spends no
//! budget on real businesses.

mod common;

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use common::TestApp;
use futures_util::future::join_all;
use micro8gents::app::{Role, Running};
use micro8gents::events::BusinessId;
use micro8gents::providers::Provider;
use micro8gents::store::secrets::{Lookup, LookupError, SecretCacheLimits, SecretStore};
use micro8gents::verify::standard_webhooks::{self, sign};
use serde_json::{Value, json};

const TOKEN: &str = "a-real-auth-token";

#[tokio::test]
async fn a_flood_of_random_business_ids_costs_bounded_reads_and_memory_while_real_ones_work() {
    let app = TestApp::spawn().await;
    let real = BusinessId(app.twilio_business(TOKEN).await);
    let limits = SecretCacheLimits {
        ttl: Duration::from_millis(200),
        capacity: 100,
        fresh_reads_per_sec: NonZeroU32::new(20).unwrap(),
    };
    let store = SecretStore::with_limits(app.pool.clone(), limits);
    assert!(matches!(store.get(real, Provider::Twilio).await, Ok(Lookup::Secrets(_))));

    let started = Instant::now();
    let (mut unknown, mut over_budget) = (0, 0);
    for round in 0..20 {
        // 200 ids never seen, at once, as a flood would send them.
        let ids = (0..200).map(|i| BusinessId(1_000_000 + round * 200 + i));
        let answers = futures_util::future::join_all(ids.map(|b| store.get(b, Provider::Twilio))).await;
        for answer in answers {
            match answer {
                Ok(Lookup::UnknownBusiness) => unknown += 1,
                Err(LookupError::OverBudget) => over_budget += 1,
                other => panic!("a random id got {other:?}"),
            }
        }
        // The real business is answered all along, from the cache or by its free refresh.
        let lookup = store.get(real, Provider::Twilio).await;
        assert!(matches!(&lookup, Ok(Lookup::Secrets(s)) if s[0].expose() == TOKEN), "round {round}: {lookup:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();

    // 4,000 random ids: the reads are what the budget allows (a burst of 20, then 20 a
    // second) plus the real business's refreshes, not one per id.
    let allowed = 20.0 + 20.0 * elapsed + 1.0;
    let refreshes = 1.0 + elapsed / 0.2 + 1.0;
    assert!((store.reads() as f64) <= allowed + refreshes, "{} reads in {elapsed:.2}s", store.reads());
    assert_eq!(unknown + over_budget, 4000);
    assert!(over_budget >= 4000 - allowed as u64, "{over_budget} refused by the budget");
    assert_eq!(store.reads_over_budget(), over_budget);
    // Memory: never more answers than the capacity, however many ids were asked about.
    assert!(store.cached_answers() <= 100, "{} answers cached", store.cached_answers());
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_id_is_remembered_and_a_business_created_a_moment_ago_works_within_the_cache_time() {
    let app = TestApp::spawn().await;
    let ttl = Duration::from_millis(500);
    let store = SecretStore::new(app.pool.clone(), ttl);
    let last = app.business().await;
    let next = BusinessId(last + 1);

    assert!(matches!(store.get(next, Provider::Twilio).await, Ok(Lookup::UnknownBusiness)));
    let remembered_at = Instant::now();
    assert!(matches!(store.get(next, Provider::Twilio).await, Ok(Lookup::UnknownBusiness)));
    assert_eq!(store.reads(), 1, "the unknown id is remembered, not read again");

    // The dashboard creates the business a moment later; once the documented cache time
    // (SECRET_CACHE_TTL) has passed since the answer was read, the next request finds it.
    let created = app.twilio_business(TOKEN).await;
    assert_eq!(created, next.0);
    tokio::time::sleep_until((remembered_at + ttl).into()).await;
    let lookup = store.get(next, Provider::Twilio).await;
    assert!(matches!(&lookup, Ok(Lookup::Secrets(s)) if s[0].expose() == TOKEN), "{lookup:?}");
    assert_eq!(store.reads(), 2);
    app.stop().await;
}

#[tokio::test]
async fn re_checks_after_a_mismatch_spend_the_budget_and_then_stop() {
    let app = TestApp::spawn().await;
    let real = BusinessId(app.twilio_business(TOKEN).await);
    let limits = SecretCacheLimits {
        ttl: Duration::from_secs(60),
        capacity: 100,
        fresh_reads_per_sec: NonZeroU32::new(3).unwrap(),
    };
    let store = SecretStore::with_limits(app.pool.clone(), limits);
    assert!(store.get(real, Provider::Twilio).await.is_ok());
    let mut refused = 0;
    for _ in 0..50 {
        match store.fresh(real, Provider::Twilio).await {
            Ok(Lookup::Secrets(_)) => {}
            Err(LookupError::OverBudget) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    // One read spent by the first look-up; two more re-checks, then the budget is empty.
    assert!(store.reads() <= 4, "{} reads", store.reads());
    assert!(refused >= 46, "{refused} re-checks refused");
    // A known business still gets its cached answer.
    assert!(matches!(store.get(real, Provider::Twilio).await, Ok(Lookup::Secrets(_))));
    app.stop().await;
}

// ---- warm-up -------------------------------------------------------------------------------

const N8N_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const CALL: &str = "CA11111111111111111111111111111111";

/// A service whose budget of fresh secret reads is one a second.
async fn spawn_with_one_read_a_second() -> TestApp {
    TestApp::spawn_with(|v| {
        v.insert("SECRET_FRESH_READS_PER_SEC".into(), "1".into());
    })
    .await
}

/// Starts the ingress again (as a deploy does) on the businesses seeded so far, and
/// points `app` at it; the caller stops what it returns.
async fn restart(app: &mut TestApp) -> Running {
    app.stop_service().await;
    let running = app.start_another(Role::Serve).await;
    app.base = format!("http://{}", running.addr.expect("ingress address"));
    running
}

/// A Twilio status callback signed with `token`: its status code and answer.
async fn call_status(app: &TestApp, business: i32, token: &str) -> (u16, Value) {
    let params = [("AccountSid", "AC00000000000000000000000000000001"), ("CallSid", CALL), ("CallStatus", "ringing")];
    let r = app.post_twilio(business, "call-status", token, &params).await;
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// An n8n booking push signed with `secret` as a Standard Webhooks sender signs it.
async fn booking(app: &TestApp, business: i32, secret: &str) -> (u16, Value) {
    let body = json!({"external_id": format!("bk_{business}"), "customer": "Jane Doe", "service": "cleaning",
                      "date": "2026-03-16T10:00:00Z"})
    .to_string();
    let (id, ts) = (format!("msg_{business}"), chrono::Utc::now().timestamp());
    let signature = sign(&standard_webhooks::Secret::parse(secret).unwrap(), &id, ts, body.as_bytes());
    let ts = ts.to_string();
    let headers = [
        ("webhook-id", id.as_str()),
        ("webhook-timestamp", ts.as_str()),
        ("webhook-signature", signature.as_str()),
        ("content-type", "application/json"),
    ];
    let r = app.post_raw(&format!("/webhooks/n8n/{business}/bookings"), body, &headers).await;
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Sums every series of a metric on the service's `/metrics` (absent is 0).
async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const OVER_BUDGET: &str = "micro8gents_secret_reads_over_budget_total";

#[tokio::test]
async fn after_a_restart_every_business_s_first_request_is_answered_not_refused_over_budget() {
    let mut app = spawn_with_one_read_a_second().await;
    let mut businesses = Vec::new();
    for i in 0..5 {
        let token = format!("auth-token-{i}");
        let b = app.twilio_business(&token).await;
        app.integration(b, "n8n", json!({"webhook_secret": N8N_SECRET}), "active").await;
        businesses.push((b, token));
    }
    let running = restart(&mut app).await;

    // Ten first requests at once, ten times the budget: each is answered from the warm-up.
    let twilio = businesses.iter().map(|(b, token)| call_status(&app, *b, token));
    let n8n = businesses.iter().map(|(b, _)| booking(&app, *b, N8N_SECRET));
    let (twilio, n8n) = tokio::join!(join_all(twilio), join_all(n8n));
    for ((b, _), (status, answer)) in businesses.iter().zip(&twilio) {
        assert!((200..300).contains(status), "business {b}'s Twilio callback: {status} {answer}");
    }
    for ((b, _), (status, answer)) in businesses.iter().zip(&n8n) {
        assert!((200..300).contains(status), "business {b}'s n8n push: {status} {answer}");
    }
    assert_eq!(metric(&app, OVER_BUDGET).await, 0.0);
    running.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn the_warm_up_remembers_a_business_without_an_integration_but_never_a_made_up_id() {
    let mut app = spawn_with_one_read_a_second().await;
    let inactive = app.business().await;
    app.integration(inactive, "twilio", json!({"auth_token": TOKEN, "account_sid": "AC00"}), "inactive").await;
    let bare = app.business().await;
    let real = app.twilio_business(TOKEN).await;
    let running = restart(&mut app).await;

    // Refused as before, without spending the budget (one read a second).
    for b in [inactive, bare] {
        let (status, answer) = call_status(&app, b, TOKEN).await;
        assert_eq!((status, answer["error"].as_str()), (404, Some("no_active_integration")), "business {b}");
    }
    assert_eq!(call_status(&app, real, TOKEN).await.0, 204);
    assert_eq!(metric(&app, OVER_BUDGET).await, 0.0);

    // Ids that don't exist were not warmed: two at once, one read is left for them.
    let made_up = [real + 1000, real + 2000];
    let answers = join_all(made_up.map(|b| call_status(&app, b, TOKEN))).await;
    let mut seen: Vec<(u16, Option<&str>)> = answers.iter().map(|(s, a)| (*s, a["error"].as_str())).collect();
    seen.sort();
    assert_eq!(seen, [(404, Some("unknown_business")), (503, Some("unavailable"))], "{answers:?}");
    assert_eq!(metric(&app, OVER_BUDGET).await, 1.0);
    running.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn warmed_answers_verify_what_a_read_would_during_a_hand_over_and_refuse_a_malformed_secret() {
    let mut app = spawn_with_one_read_a_second().await;
    // A hand-over: the old token and the new one are both active.
    let handing_over = app.twilio_business("old-auth-token").await;
    app.integration(handing_over, "twilio", json!({"auth_token": "new-auth-token", "account_sid": "AC00"}), "active")
        .await;
    // An n8n secret that is not a `whsec_` secret is unusable: no active integration.
    let malformed = app.business().await;
    app.integration(malformed, "n8n", json!({"webhook_secret": "not-a-secret"}), "active").await;
    let running = restart(&mut app).await;

    assert_eq!(call_status(&app, handing_over, "old-auth-token").await.0, 204);
    assert_eq!(call_status(&app, handing_over, "new-auth-token").await.0, 204);
    let (status, answer) = booking(&app, malformed, N8N_SECRET).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("no_active_integration")), "{answer}");
    assert_eq!(metric(&app, OVER_BUDGET).await, 0.0);
    running.stop().await;
    app.stop().await;
}

/// What a look-up answers, secrets included, for comparing two stores' answers.
fn shown(lookup: &Result<Lookup, LookupError>) -> String {
    match lookup {
        Ok(Lookup::UnknownBusiness) => "unknown business".into(),
        Ok(Lookup::NoActiveIntegration) => "no active integration".into(),
        Ok(Lookup::Secrets(keys)) => {
            let shared: Vec<(&str, &str)> = keys.shared.iter().map(|(id, s)| (id.as_str(), s.expose())).collect();
            format!("secrets {:?}, shared keys {shared:?}", keys.tokens())
        }
        Err(e) => format!("error: {e}"),
    }
}

#[tokio::test]
async fn the_warm_up_caches_what_each_read_would_answer_in_one_read_and_no_budget() {
    let app = TestApp::spawn().await;
    let handing_over = app.twilio_business("old-auth-token").await;
    let shared = json!({"auth_token": "new-auth-token", "shared_keys": [{"id": "SK1", "secret": "s1"}, {"id": "SK2"}]});
    app.integration(handing_over, "twilio", shared, "active").await;
    app.integration(handing_over, "n8n", json!({"webhook_secret": N8N_SECRET}), "active").await;
    let malformed = app.business().await;
    app.integration(malformed, "n8n", json!({"webhook_secret": "not-a-secret"}), "active").await;
    app.integration(malformed, "twilio", json!({"auth_token": ""}), "active").await;
    let inactive = app.business().await;
    app.integration(inactive, "twilio", json!({"auth_token": TOKEN}), "inactive").await;
    app.integration(inactive, "n8n", json!({"webhook_secret": N8N_SECRET}), "disabled").await;
    let bare = app.business().await;

    let limits = SecretCacheLimits {
        ttl: Duration::from_secs(60),
        capacity: 100,
        fresh_reads_per_sec: NonZeroU32::new(1).unwrap(),
    };
    let warmed = SecretStore::with_limits(app.pool.clone(), limits);
    assert_eq!(warmed.warm().await.unwrap(), 8, "4 businesses, 2 kinds with a per-business secret");
    let cold = SecretStore::new(app.pool.clone(), Duration::from_secs(60));
    for b in [handing_over, malformed, inactive, bare] {
        for kind in [Provider::Twilio, Provider::N8n] {
            let (w, c) = (warmed.get(BusinessId(b), kind).await, cold.get(BusinessId(b), kind).await);
            assert_eq!(shown(&w), shown(&c), "business {b}, {kind:?}");
        }
    }
    assert!(shown(&warmed.get(BusinessId(handing_over), Provider::Twilio).await).contains(r#"("SK1", "s1")"#));
    // All eight answers came from the one warm-up query, none from the budget.
    assert_eq!((warmed.reads(), warmed.reads_over_budget()), (1, 0));
    assert_eq!(cold.reads(), 8);
    app.stop().await;
}

#[tokio::test]
async fn the_warm_up_caches_the_newest_businesses_up_to_the_capacity() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.twilio_business(TOKEN).await);
    }
    let limits = SecretCacheLimits {
        ttl: Duration::from_secs(60),
        capacity: 4,
        fresh_reads_per_sec: NonZeroU32::new(1).unwrap(),
    };
    let store = SecretStore::with_limits(app.pool.clone(), limits);
    // Room for 4 answers: the two newest businesses, Twilio and n8n each.
    assert_eq!(store.warm().await.unwrap(), 4);
    assert_eq!(store.cached_answers(), 4);
    for b in &ids[1..] {
        assert!(matches!(store.get(BusinessId(*b), Provider::Twilio).await, Ok(Lookup::Secrets(_))));
    }
    assert_eq!(store.reads(), 1, "the newest two were warmed");
    // The oldest was left out: its first look-up is a read of its own.
    assert!(matches!(store.get(BusinessId(ids[0]), Provider::Twilio).await, Ok(Lookup::Secrets(_))));
    assert_eq!(store.reads(), 2);
    app.stop().await;
}
