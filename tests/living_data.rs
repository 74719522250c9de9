//! Issue 11, point 6: the dashboard changes businesses and integrations while
//! the worker runs. An integration added, rotated or deactivated takes effect
//! within SECRET_CACHE_TTL (README), without a restart. The waits poll for the
//! answer a sender would get and then check how long it took.

mod common;

use std::time::Duration;

use common::TestApp;
use common::dashboard::DASHBOARD_SQL;
use serde_json::json;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(1);
/// Scheduling slack on a busy 2-core machine, on top of the cache time.
const SLACK: Duration = Duration::from_secs(2);

fn call(seq: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CallSid", "CA00000000000000000000000000000071".to_string()),
        ("CallStatus", "ringing".to_string()),
        ("From", "+15550001111".to_string()),
        ("To", "+15550002222".to_string()),
        ("Direction", "inbound".to_string()),
        ("SequenceNumber", seq.to_string()),
    ]
}

/// The status a callback signed with `token` gets (any 2xx counts as 200), polled until it is `want`;
/// how long that took.
async fn until_status(app: &TestApp, business: i32, token: &str, want: u16) -> Duration {
    let since = Instant::now();
    let mut seq = 0;
    loop {
        seq += 1;
        let owned = call(&seq.to_string());
        let params: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let status = app.post_twilio(business, "call-status", token, &params).await.status();
        let got = if status.is_success() { 200 } else { status.as_u16() };
        if got == want {
            return since.elapsed();
        }
        assert!(since.elapsed() < TTL + SLACK * 3, "still {got}, not {want}, after {:?}", since.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn integrations_added_rotated_or_deactivated_by_the_dashboard_take_effect_within_the_cache_time() {
    let app = TestApp::spawn_on_dashboard(DASHBOARD_SQL, |v| {
        v.insert("SECRET_CACHE_TTL".into(), "1s".into());
    })
    .await;
    // A business the dashboard created while the worker runs, still without an integration.
    let business = app.business().await;
    let owned = call("0");
    let params: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(app.post_twilio(business, "call-status", "first-token", &params).await.status().as_u16(), 404);

    // The owner connects Twilio in the dashboard.
    let integration = app
        .integration(business, "twilio", json!({"auth_token": "first-token", "account_sid": "AC00"}), "active")
        .await;
    let took = until_status(&app, business, "first-token", 200).await;
    assert!(took <= TTL + SLACK, "added: took {took:?}");

    // The owner rotates the auth token.
    sqlx::query("UPDATE integrations SET config = $2, updated_at = now() WHERE id = $1")
        .bind(integration)
        .bind(json!({"auth_token": "second-token", "account_sid": "AC00"}))
        .execute(&app.pool)
        .await
        .unwrap();
    let took = until_status(&app, business, "second-token", 200).await;
    assert!(took <= TTL + SLACK, "new token: took {took:?}");
    let took = until_status(&app, business, "first-token", 401).await;
    assert!(took <= TTL + SLACK, "old token refused: took {took:?}");

    // The owner disconnects Twilio.
    sqlx::query("UPDATE integrations SET status = 'inactive', updated_at = now() WHERE id = $1")
        .bind(integration)
        .execute(&app.pool)
        .await
        .unwrap();
    let took = until_status(&app, business, "second-token", 404).await;
    assert!(took <= TTL + SLACK, "deactivated: took {took:?}");

    // Every accepted callback was applied to the business's one call.
    assert_eq!(common::calls_of(&app.pool, business).await.len(), 1);
    app.stop().await;
}
