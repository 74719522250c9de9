//! Issue 11, point 4: TLS to Postgres (`sslmode`, `sslrootcert` in DATABASE_URL)
//! and to RabbitMQ (`amqps://`, `AMQP_CA_FILE`), rustls only. The local Postgres
//! runs with `ssl = on` and a self-signed certificate; for AMQP a TLS-terminating
//! proxy with a CA made at test time stands in front of the local broker.

mod common;

use common::TestApp;
use common::dashboard::{TestDb, run_binary};
use common::tls::{TestCa, TlsProxy};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn with_query(url: &str, query: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_query(Some(query));
    u.to_string()
}

/// The same database reached by the name `localhost`, the name in the server's certificate.
fn via_localhost(url: &str, query: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_host(Some("localhost")).unwrap();
    u.set_query(Some(query));
    u.to_string()
}

/// The file the local Postgres serves its certificate from (self-signed: it is its own CA).
async fn server_cert_file(db: &TestDb) -> String {
    let mut conn = db.connect().await;
    let (path,): (String,) = sqlx::query_as("SELECT setting FROM pg_settings WHERE name = 'ssl_cert_file'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    path
}

async fn post_call(app: &TestApp, business: i32) {
    let params = [
        ("CallSid", "CA00000000000000000000000000000041"),
        ("CallStatus", "completed"),
        ("From", "+15550001111"),
        ("To", "+15550002222"),
        ("Direction", "inbound"),
        ("CallDuration", "5"),
        ("SequenceNumber", "0"),
    ];
    let res = app.post_twilio(business, "call-status", "tok", &params).await;
    assert!(res.status().is_success(), "{}", res.status());
}

#[tokio::test]
async fn with_sslmode_require_every_connection_of_the_service_is_encrypted() {
    let app = TestApp::spawn_with(|v| {
        let url = with_query(&v["DATABASE_URL"], "sslmode=require");
        v.insert("DATABASE_URL".into(), url);
    })
    .await;
    let business = app.twilio_business("tok").await;
    post_call(&app, business).await;
    app.settled(1).await;
    assert_eq!(common::calls_of(&app.pool, business).await.len(), 1);

    let rows: Vec<(String, bool, Option<String>)> = sqlx::query_as(
        "SELECT a.application_name, s.ssl, s.version
           FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
          WHERE a.datname = current_database() AND a.application_name LIKE 'micro8gents%'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(!rows.is_empty(), "the service holds connections");
    for (name, ssl, version) in &rows {
        assert!(*ssl, "{name} is not encrypted");
        assert!(version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")), "{name}: {version:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn sslmode_disable_and_prefer_are_honoured() {
    let db = TestDb::new().await;
    for (mode, encrypted) in [("disable", false), ("prefer", true), ("require", true)] {
        let opts: sqlx::postgres::PgConnectOptions = with_query(&db.url, &format!("sslmode={mode}")).parse().unwrap();
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(&opts).await.unwrap();
        let (ssl,): (bool,) = sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(ssl, encrypted, "sslmode={mode}");
    }
}

#[tokio::test]
async fn verify_full_and_verify_ca_accept_the_servers_ca_and_refuse_another_with_a_clear_line() {
    let db = TestDb::new().await;
    let server_ca = server_cert_file(&db).await;
    let other = TestCa::new("pg");
    let other_ca = other.pem_file.to_str().unwrap();

    for mode in ["verify-full", "verify-ca"] {
        let good = via_localhost(&db.url, &format!("sslmode={mode}&sslrootcert={server_ca}"));
        let out = run_binary(&["migrate"], &[("DATABASE_URL", &good)]);
        assert!(out.status.success(), "{mode} with the server's CA: {}", stderr(&out));

        let bad = via_localhost(&db.url, &format!("sslmode={mode}&sslrootcert={other_ca}"));
        let out = run_binary(&["migrate"], &[("DATABASE_URL", &bad)]);
        assert!(!out.status.success(), "{mode} with another CA must fail");
        let text = stderr(&out);
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains("Postgres TLS failed: invalid peer certificate"), "the line says why: {text}");
        assert!(lines[0].contains("check sslmode and sslrootcert in DATABASE_URL"), "{text}");
    }
}

#[tokio::test]
async fn amqps_with_a_private_ca_carries_events_end_to_end() {
    let ca = TestCa::new("amqp");
    let broker = url::Url::parse(&common::amqp_url()).unwrap();
    let upstream = format!("{}:{}", broker.host_str().unwrap(), broker.port().unwrap_or(5672));
    let proxy = TlsProxy::start(&ca, tokio::net::lookup_host(upstream).await.unwrap().next().unwrap()).await;
    let amqps = format!("amqps://guest:guest@localhost:{}/%2f", proxy.addr.port());

    let app = TestApp::spawn_with(|v| {
        v.insert("AMQP_URL".into(), amqps.clone());
        v.insert("AMQP_CA_FILE".into(), ca.pem_file.to_str().unwrap().into());
    })
    .await;
    let business = app.twilio_business("tok").await;
    post_call(&app, business).await;
    // Only a worker consuming over TLS can have applied it.
    app.settled(1).await;
    assert_eq!(common::calls_of(&app.pool, business).await[0].status, "completed");
    assert!(proxy.handshakes() >= 1);
    let outbox: (i64,) =
        sqlx::query_as("SELECT count(*) FROM webhook_worker.outbox").fetch_one(&app.pool).await.unwrap();
    assert_eq!(outbox.0, 0, "published over TLS, not parked in the outbox");
    app.stop().await;
}

// Multi-threaded: the proxy keeps running while the test waits for the binary.
#[tokio::test(flavor = "multi_thread")]
async fn amqps_verifies_the_brokers_certificate() {
    let ca = TestCa::new("amqp-verify");
    let broker = url::Url::parse(&common::amqp_url()).unwrap();
    let upstream = format!("{}:{}", broker.host_str().unwrap(), broker.port().unwrap_or(5672));
    let proxy = TlsProxy::start(&ca, tokio::net::lookup_host(upstream).await.unwrap().next().unwrap()).await;
    let amqps = format!("amqps://guest:guest@localhost:{}/%2f", proxy.addr.port());
    let prefix = format!("test.{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let base = [("AMQP_URL", amqps.as_str()), ("AMQP_PREFIX", prefix.as_str())];

    // Without the private CA the broker's certificate is not trusted.
    let out = run_binary(&["dlq", "list"], &base);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let text = stderr(&out);
    assert!(text.contains("certificate") || text.contains("UnknownIssuer"), "{text}");
    assert!(!text.contains("guest:guest"), "{text}");

    // With AMQP_CA_FILE it is.
    let ca_file = ca.pem_file.to_str().unwrap();
    let out = run_binary(&["dlq", "list"], &[base[0], base[1], ("AMQP_CA_FILE", ca_file)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 parked message(s)"));

    // Clean up what `dlq list` declared.
    common::delete_broker_objects_of(&[("AMQP_PREFIX", &prefix)]).await;
}

#[test]
fn a_ca_file_that_is_missing_or_not_pem_is_named() {
    let out = run_binary(&["config"], &[("AMQP_CA_FILE", "/nonexistent/ca.pem")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("micro8gents: invalid setting AMQP_CA_FILE: cannot read"), "{}", stderr(&out));
    let not_pem = std::env::temp_dir().join(format!("m8-not-pem-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&not_pem, "just text").unwrap();
    let out = run_binary(&["config"], &[("AMQP_CA_FILE", not_pem.to_str().unwrap())]);
    std::fs::remove_file(&not_pem).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("holds no PEM certificate"), "{}", stderr(&out));
}
