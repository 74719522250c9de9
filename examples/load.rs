//! A first, rough load run: signed Twilio callbacks (per call: four status
//! callbacks, a recording and a transcription) against a running service.
//!
//! ```sh
//! micro8gents run &                     # against the local Postgres and RabbitMQ
//! cargo run --release --example load    # CALLS=2000 CONCURRENCY=64 by default
//! ```
//! Settings (environment): BASE_URL (http://127.0.0.1:8080), PUBLIC_BASE_URL
//! (what the service signs against, http://localhost:8080), DATABASE_URL, CALLS,
//! CONCURRENCY. It creates its own business and waits until every callback is
//! settled in the worker's inbox.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use micro8gents::verify::twilio::{Algorithm, compute_signature};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = env("BASE_URL", "http://127.0.0.1:8080");
    let public = env("PUBLIC_BASE_URL", "http://localhost:8080");
    let db = sqlx::PgPool::connect(&env("DATABASE_URL", micro8gents::config::DEFAULT_DATABASE_URL)).await?;
    let calls: usize = env("CALLS", "2000").parse()?;
    let concurrency: usize = env("CONCURRENCY", "64").parse()?;
    let token = uuid::Uuid::new_v4().simple().to_string();
    let business = create_business(&db, &token).await?;

    let requests: Vec<(String, String, String)> = (0..calls)
        .flat_map(|i| call_callbacks(i, business))
        .map(|(path, params)| sign(&public, &token, path, params))
        .collect();
    let total = requests.len();
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
    let started = Instant::now();
    let mut latencies: Vec<Duration> = stream::iter(requests)
        .map(|(path, body, sig)| {
            let client = client.clone();
            let url = format!("{base}{path}");
            async move {
                let t = Instant::now();
                let r = client
                    .post(url)
                    .header("x-twilio-signature", sig)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => Some(t.elapsed()),
                    Ok(r) => {
                        eprintln!("answer {}", r.status());
                        None
                    }
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        None
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(|l| async move { l })
        .collect()
        .await;
    let sent = started.elapsed();
    latencies.sort();
    let ok = latencies.len();
    let pct = |p: f64| latencies[((ok as f64 * p) as usize).min(ok.saturating_sub(1))];
    println!("requests: {total}, answered 2xx: {ok}, concurrency {concurrency}");
    println!("ingress: {:.0} req/s over {:.2?}", ok as f64 / sent.as_secs_f64(), sent);
    if ok > 0 {
        println!("latency: p50 {:.2?} p99 {:.2?} max {:.2?}", pct(0.50), pct(0.99), latencies[ok - 1]);
    }
    loop {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM webhook_worker.inbox WHERE business_id = $1")
            .bind(business)
            .fetch_one(&db)
            .await?;
        if n as usize >= ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e2e = started.elapsed();
    let (rows,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM calls WHERE business_id = $1").bind(business).fetch_one(&db).await?;
    println!(
        "end to end: {:.0} events/s ({ok} events in {:.2?}); calls rows: {rows} (expected {calls})",
        ok as f64 / e2e.as_secs_f64(),
        e2e
    );
    Ok(())
}

async fn create_business(db: &sqlx::PgPool, token: &str) -> anyhow::Result<i32> {
    let (user,): (i32,) = sqlx::query_as(
        "INSERT INTO users (username, email, password) VALUES ($1, $1 || '@load.test', 'x') RETURNING id",
    )
    .bind(format!("load-{token}"))
    .fetch_one(db)
    .await?;
    let (business,): (i32,) = sqlx::query_as(
        "INSERT INTO businesses (user_id, business_name, email) VALUES ($1, 'Load test', 'load@example.com') RETURNING id",
    )
    .bind(user)
    .fetch_one(db)
    .await?;
    sqlx::query("INSERT INTO integrations (business_id, type, config, status) VALUES ($1, 'twilio', $2, 'active')")
        .bind(business)
        .bind(serde_json::json!({ "auth_token": token }))
        .execute(db)
        .await?;
    Ok(business)
}

fn call_callbacks(i: usize, business: i32) -> Vec<(String, Vec<(String, String)>)> {
    let sid = format!("CA{i:032x}");
    let status = |s: &str, seq: usize| {
        let mut p = vec![
            ("CallSid", sid.clone()),
            ("CallStatus", s.to_string()),
            ("Direction", "inbound".into()),
            ("From", "+14155552671".into()),
            ("To", "+15005550006".into()),
            ("SequenceNumber", seq.to_string()),
            ("Timestamp", format!("Tue, 25 Nov 2025 12:00:{:02} +0000", seq * 10)),
        ];
        if s == "completed" {
            p.push(("CallDuration", "125".into()));
        }
        (format!("/webhooks/twilio/{business}/call-status"), owned(p))
    };
    vec![
        status("initiated", 0),
        status("ringing", 1),
        status("in-progress", 2),
        status("completed", 3),
        (
            format!("/webhooks/twilio/{business}/recording"),
            owned(vec![
                ("CallSid", sid.clone()),
                ("RecordingSid", format!("RE{i:032x}")),
                ("RecordingStatus", "completed".into()),
                ("RecordingUrl", format!("https://api.twilio.com/Recordings/RE{i:032x}")),
            ]),
        ),
        (
            format!("/webhooks/twilio/{business}/transcription"),
            owned(vec![
                ("CallSid", sid.clone()),
                ("TranscriptionSid", format!("TR{i:032x}")),
                ("TranscriptionStatus", "completed".into()),
                ("TranscriptionText", "I would like to book a cleaning on Tuesday.".into()),
            ]),
        ),
    ]
}

fn owned(p: Vec<(&str, String)>) -> Vec<(String, String)> {
    p.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn sign(public: &str, token: &str, path: String, params: Vec<(String, String)>) -> (String, String, String) {
    let sig = compute_signature(token, &format!("{public}{path}"), &params, Algorithm::HmacSha1);
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish();
    (path, body, sig)
}
