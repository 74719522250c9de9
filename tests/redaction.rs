//! Issue 11, point 4: no form of a connection URL leaks its password into
//! `micro8gents config` or a log line: `user:pass@`, `?password=...`, and
//! `amqp:user:pass@host` without `//` (refused, not echoed).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Binary;
use common::dashboard::run_binary;

const SECRET: &str = "s3cret-Pa55";

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn config_never_shows_a_password_in_any_url_form() {
    let cases = [
        (
            "DATABASE_URL",
            format!("postgres://app:{SECRET}@db.internal:5432/m8"),
            "postgres://app:redacted@db.internal:5432/m8",
        ),
        (
            "DATABASE_URL",
            format!("postgres://app@db.internal/m8?sslmode=verify-full&password={SECRET}"),
            "postgres://app@db.internal/m8?sslmode=verify-full&password=redacted",
        ),
        (
            "DATABASE_URL",
            format!("postgresql://app@db.internal/m8?sslpassword={SECRET}"),
            "postgresql://app@db.internal/m8?sslpassword=redacted",
        ),
        ("AMQP_URL", format!("amqps://m8:{SECRET}@mq.internal:5671/%2f"), "amqps://m8:redacted@mq.internal:5671/%2f"),
        (
            "AMQP_URL",
            format!("amqp://m8@mq.internal/%2f?password={SECRET}"),
            "amqp://m8@mq.internal/%2f?password=redacted",
        ),
    ];
    for (name, value, shown) in cases {
        let out = run_binary(&["config"], &[(name, &value)]);
        assert!(out.status.success(), "{name}={value}: {}", text(&out));
        let all = text(&out);
        assert!(!all.contains(SECRET), "{name} leaks: {all}");
        assert!(all.contains(&format!("{name}={shown}")), "{name}: {all}");
    }
}

#[test]
fn a_url_without_slashes_is_refused_without_echoing_it() {
    for (name, value) in [
        ("AMQP_URL", format!("amqp:m8:{SECRET}@mq.internal")),
        ("AMQP_URL", format!("amqps:m8:{SECRET}@mq.internal:5671")),
        ("DATABASE_URL", format!("postgres:app:{SECRET}@db.internal/m8")),
    ] {
        for command in ["config", "migrate", "run"] {
            let out = run_binary(&[command], &[(name, &value)]);
            assert_eq!(out.status.code(), Some(2), "{command} {name}={value}: {}", text(&out));
            let all = text(&out);
            assert!(!all.contains(SECRET), "{command} leaks: {all}");
            assert!(all.starts_with(&format!("micro8gents: invalid setting {name}: must look like")), "{all}");
        }
    }
}

#[test]
fn failing_connections_log_no_password() {
    // Nothing listens on port 9: both connections fail and say so.
    let db = format!("postgres://app:{SECRET}@127.0.0.1:9/m8?password={SECRET}");
    let amqp = format!("amqp://m8:{SECRET}@127.0.0.1:9/%2f");
    for args in [&["migrate"][..], &["dlq", "list"][..], &["replay", "--provider", "twilio"][..]] {
        let out = run_binary(args, &[("DATABASE_URL", &db), ("AMQP_URL", &amqp)]);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let all = text(&out);
        assert!(all.contains("ERROR"), "{args:?} says why: {all}");
        assert!(!all.contains(SECRET), "{args:?} leaks: {all}");
    }
}

#[test]
fn a_running_service_that_cannot_reach_its_backends_logs_no_password() {
    let db = format!("postgres://app:{SECRET}@127.0.0.1:9/m8?password={SECRET}");
    let amqp = format!("amqps://m8:{SECRET}@127.0.0.1:9/%2f");
    let mut child = Command::new(env!("CARGO_BIN_EXE_micro8gents"))
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", &db)
        .env("AMQP_URL", &amqp)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let guard = Binary(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !lines.iter().any(|l: &String| l.contains("not reachable")) {
        assert!(Instant::now() < deadline, "no warning about the broker: {lines:#?}");
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(line);
        }
    }
    drop(guard);
    lines.extend(rx.try_iter());
    assert!(lines.iter().all(|l| !l.contains(SECRET)), "{lines:#?}");
}
