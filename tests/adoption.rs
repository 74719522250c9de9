//! Issue 11, points 1-3: `migrate` on the dashboard's database. The dashboard's
//! `public` starts from tests/fixtures/dashboard-schema.sql, exactly as
//! drizzle-kit generates it. What a user checks: the exit code and the lines
//! `migrate` prints, and the catalog of `public` before and after.

mod common;

use std::collections::HashMap;

use common::dashboard::{DASHBOARD_SQL, TestDb, diff};
use common::{PUBLIC_BASE_URL, TestApp};
use micro8gents::config::Config;
use micro8gents::store;

fn cfg(db: &TestDb) -> Config {
    Config::from_vars(&HashMap::from([("DATABASE_URL".to_string(), db.url.clone())])).unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// sqlx's bookkeeping: (version, checksum, success).
async fn applied(db: &TestDb) -> Vec<(i64, Vec<u8>, bool)> {
    let mut conn = db.connect().await;
    sqlx::query_as("SELECT version, checksum, success FROM webhook_worker._sqlx_migrations ORDER BY version")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

async fn adoptions(db: &TestDb) -> i64 {
    let mut conn = db.connect().await;
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM webhook_worker.adoption").fetch_one(&mut conn).await.unwrap();
    n
}

/// The `public` catalog that the dashboard's own SQL makes on a fresh database.
async fn drizzle_public() -> Vec<String> {
    TestDb::with(DASHBOARD_SQL).await.catalog("public").await
}

#[tokio::test]
async fn an_empty_database_gets_the_seed_schema_as_drizzle_would_make_it() {
    let db = TestDb::new().await;
    let out = db.migrate_binary();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("public holds none of the seed's tables: creating them"), "{}", stderr(&out));
    let expected = drizzle_public().await;
    let public = db.catalog("public").await;
    assert_eq!(public, expected, "{}", diff(&expected, &public));
    assert_eq!(adoptions(&db).await, 0);
}

#[tokio::test]
async fn the_dashboards_schema_is_adopted_without_changing_public_and_a_second_migrate_changes_nothing() {
    let db = TestDb::with(DASHBOARD_SQL).await;
    let before = db.catalog("public").await;

    let out = db.migrate_binary();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("adopted the dashboard's public schema"), "{}", stderr(&out));
    let after = db.catalog("public").await;
    assert_eq!(before, after, "{}", diff(&before, &after));
    assert_eq!(adoptions(&db).await, 1);
    let first = applied(&db).await;
    assert!(first.iter().all(|(_, _, ok)| *ok) && first[0].0 == 1, "{first:?}");
    let worker = db.catalog("webhook_worker").await;

    let again = db.migrate_binary();
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("public schema checked: everything the worker needs is there"),
        "{}",
        stderr(&again)
    );
    assert_eq!(db.catalog("public").await, before);
    assert_eq!(db.catalog("webhook_worker").await, worker);
    assert_eq!(applied(&db).await, first);
    assert_eq!(adoptions(&db).await, 1);
}

#[tokio::test]
async fn dashboard_first_and_worker_first_end_in_the_same_state() {
    let dashboard_first = TestDb::with(DASHBOARD_SQL).await;
    store::migrate(&cfg(&dashboard_first)).await.expect("adopts");
    let worker_first = TestDb::new().await;
    store::migrate(&cfg(&worker_first)).await.expect("creates");

    for schema in ["public", "webhook_worker"] {
        let (a, b) = (dashboard_first.catalog(schema).await, worker_first.catalog(schema).await);
        assert_eq!(a, b, "{schema}: {}", diff(&a, &b));
    }
    // Migration 1 is recorded with sqlx's own checksum, so later sqlx runs accept it.
    assert_eq!(applied(&dashboard_first).await, applied(&worker_first).await);

    // And the worker-first database, now used by the dashboard too, is checked and left alone.
    let out = worker_first.migrate_binary();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("public schema checked"), "{}", stderr(&out));
}

#[tokio::test]
async fn two_migrates_at_once_both_succeed_and_adopt_once() {
    for db in [TestDb::with(DASHBOARD_SQL).await, TestDb::new().await] {
        let adopting = !db.catalog("public").await.is_empty();
        let before = db.catalog("public").await;
        let config = cfg(&db);
        let (a, b, c) = tokio::join!(store::migrate(&config), store::migrate(&config), store::migrate(&config));
        a.expect("first migrate");
        b.expect("second migrate");
        c.expect("third migrate");
        assert_eq!(adoptions(&db).await, i64::from(adopting));
        let versions: Vec<i64> = applied(&db).await.into_iter().map(|(v, _, _)| v).collect();
        let mut unique = versions.clone();
        unique.dedup();
        assert_eq!(versions, unique);
        if adopting {
            assert_eq!(db.catalog("public").await, before);
        }
    }
}

/// What a dashboard release might add: columns (nullable, or with a default),
/// a table, an index, an enum value, a longer varchar.
const DASHBOARD_EVOLVED: &str = "
    ALTER TABLE calls ADD COLUMN sentiment text;
    ALTER TABLE calls ALTER COLUMN caller TYPE varchar(255);
    ALTER TABLE bookings ADD COLUMN source varchar(20) DEFAULT 'web' NOT NULL;
    ALTER TABLE integrations ADD COLUMN last_error text;
    CREATE TABLE campaigns (id serial PRIMARY KEY, business_id integer NOT NULL REFERENCES businesses(id), name text NOT NULL);
    CREATE INDEX calls_phone_idx ON calls (phone);
    ALTER TYPE call_status ADD VALUE 'voicemail';
    ALTER TYPE subscription_plan ADD VALUE 'team';
";

#[tokio::test]
async fn extra_columns_tables_indexes_and_enum_values_never_stop_migrate_serve_or_work() {
    let sql = format!("{DASHBOARD_SQL};\n{DASHBOARD_EVOLVED}");
    let db = TestDb::with(&sql).await;
    let before = db.catalog("public").await;
    let out = db.migrate_binary();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(db.catalog("public").await, before);

    // The service runs on such a database and applies real callbacks.
    let app = TestApp::spawn_on_dashboard(&sql, |_| {}).await;
    let before = common::dashboard::catalog(&mut app.pool.acquire().await.unwrap(), "public").await;
    let business = app.twilio_business("tok").await;
    let call = [
        ("CallSid", "CA00000000000000000000000000000011"),
        ("CallStatus", "completed"),
        ("From", "+15550001111"),
        ("To", "+15550002222"),
        ("Direction", "inbound"),
        ("CallDuration", "65"),
        ("SequenceNumber", "0"),
        ("Timestamp", "Tue, 25 Nov 2025 12:00:05 +0000"),
    ];
    let res = app.post_twilio(business, "call-status", "tok", &call).await;
    assert!(res.status().is_success(), "{}", res.status());
    app.settled(1).await;
    let calls = common::calls_of(&app.pool, business).await;
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0].status.as_str(), calls[0].duration.as_deref()), ("completed", Some("1:05")));
    let after = common::dashboard::catalog(&mut app.pool.acquire().await.unwrap(), "public").await;
    assert_eq!(before, after, "{}", diff(&before, &after));
    app.stop().await;
}

/// The dashboard's SQL with what the worker needs broken in five ways.
fn broken_dashboard() -> String {
    let sql = DASHBOARD_SQL
        // A missing column.
        .replace("\t\"recording\" text,\n\t\"transcript\" text\n", "\t\"recording\" text\n")
        // An incompatible type.
        .replace("\"date\" timestamp NOT NULL", "\"date\" text NOT NULL")
        // A missing enum value.
        .replace(
            "ENUM('completed', 'in-progress', 'missed', 'transferred')",
            "ENUM('completed', 'in-progress', 'missed')",
        )
        // A column the worker may leave NULL made NOT NULL.
        .replace("\"caller\" varchar(100),", "\"caller\" varchar(100) NOT NULL,")
        // A varchar too short for what the worker writes.
        .replace("\"customer\" varchar(100) NOT NULL", "\"customer\" varchar(40) NOT NULL");
    assert_ne!(sql, DASHBOARD_SQL);
    format!("{sql};\nALTER TABLE subscriptions ADD COLUMN seats integer NOT NULL;")
}

#[tokio::test]
async fn a_missing_column_type_or_enum_value_stops_migrate_and_run_with_one_line_each_and_changes_nothing() {
    let db = TestDb::with(&broken_dashboard()).await;
    let before = db.catalog("public").await;

    for command in ["migrate", "run"] {
        let out = common::dashboard::run_binary(
            &[command],
            &[("DATABASE_URL", &db.url), ("LISTEN_ADDR", "127.0.0.1:0"), ("PUBLIC_BASE_URL", PUBLIC_BASE_URL)],
        );
        assert!(!out.status.success(), "{command} must fail: {}", stderr(&out));
        let text = stderr(&out);
        let problems: Vec<&str> = text.lines().filter(|l| l.contains("ERROR") && l.contains("public.")).collect();
        let expected = [
            "public.calls.transcript: column missing; expected text, nullable",
            "public.bookings.date: expected timestamp (without time zone), found text",
            "public.call_status: enum value 'transferred' missing",
            "public.calls.caller: expected nullable (the worker may write NULL), found NOT NULL",
            "public.bookings.customer: expected varchar(100) or longer, or text, found character varying(40)",
            "public.subscriptions.seats: NOT NULL without a default",
        ];
        for e in expected {
            assert_eq!(problems.iter().filter(|l| l.contains(e)).count(), 1, "{command}: no line {e:?} in\n{text}");
        }
        assert_eq!(problems.len(), expected.len(), "{command}: one line per problem:\n{text}");
        assert!(text.contains("the public schema is not compatible with the worker: 6 problem(s)"), "{text}");

        let after = db.catalog("public").await;
        assert_eq!(before, after, "{}", diff(&before, &after));
        assert!(!db.schema_exists("webhook_worker").await, "a refused migrate creates nothing");
    }
}

#[tokio::test]
async fn a_missing_table_is_named() {
    let db = TestDb::with(&format!("{DASHBOARD_SQL};\nDROP TABLE hours_of_operation;")).await;
    let out = db.migrate_binary();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("public.hours_of_operation: table missing"), "{}", stderr(&out));
}

#[tokio::test]
async fn after_adoption_the_running_service_leaves_public_exactly_as_drizzle_made_it() {
    let expected = drizzle_public().await;
    let app = TestApp::spawn_on_dashboard(DASHBOARD_SQL, |_| {}).await;
    let business = app.twilio_business("tok").await;
    for (seq, status) in [("0", "ringing"), ("1", "in-progress"), ("2", "completed")] {
        let params = [
            ("CallSid", "CA00000000000000000000000000000012"),
            ("CallStatus", status),
            ("From", "+15550001111"),
            ("To", "+15550002222"),
            ("Direction", "inbound"),
            ("SequenceNumber", seq),
            ("Timestamp", "Tue, 25 Nov 2025 12:00:05 +0000"),
        ];
        assert!(app.post_twilio(business, "call-status", "tok", &params).await.status().is_success());
    }
    app.settled(3).await;
    assert_eq!(common::calls_of(&app.pool, business).await[0].status, "completed");
    let public = common::dashboard::catalog(&mut app.pool.acquire().await.unwrap(), "public").await;
    assert_eq!(public, expected, "{}", diff(&expected, &public));
    app.stop().await;
}
