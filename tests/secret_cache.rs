//! What an unknown business id may cost: the secret cache is bounded, remembers
//! unknown ids, and spends a budget of reads on them, so a flood of random ids costs
//! a bounded number of queries and memory while real businesses keep working.

mod common;

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use common::TestApp;
use micro8gents::events::BusinessId;
use micro8gents::providers::Provider;
use micro8gents::store::secrets::{Lookup, LookupError, SecretCacheLimits, SecretStore};

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
