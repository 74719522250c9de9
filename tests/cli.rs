//! The binary's start-up contract: a bad setting stops it with one line naming the
//! variable; `micro8gents config` shows the settings with every secret redacted.
//! Neither needs Postgres or RabbitMQ.

use std::process::{Command, Output};

fn run(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_micro8gents"));
    cmd.args(args).env_clear();
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr).lines().map(str::to_string).collect()
}

#[test]
fn a_malformed_setting_stops_the_binary_with_one_line_naming_it() {
    let cases = [
        ("LISTEN_ADDR", "nope"),
        ("PUBLISH_TIMEOUT", "5 parsecs"),
        ("DATABASE_URL", "mysql://db/x"),
        ("PREFETCH", "0"),
        ("LOG_FORMAT", "xml"),
        ("RETRY_DELAYS", "5s,soon"),
    ];
    for (name, value) in cases {
        for command in ["run", "serve", "work", "migrate", "config"] {
            let out = run(&[command], &[(name, value)]);
            assert_eq!(out.status.code(), Some(2), "{command} with {name}={value}: {out:?}");
            let lines = stderr_lines(&out);
            assert_eq!(lines.len(), 1, "{command} with {name}={value}: {lines:?}");
            assert!(lines[0].starts_with(&format!("micro8gents: invalid setting {name}:")), "{lines:?}");
            assert!(out.stdout.is_empty());
        }
    }
}

#[test]
fn a_bad_url_is_named_without_echoing_its_password() {
    let out = run(&["run"], &[("AMQP_URL", "amqp://guest:hunter2-amqp@[bad")]);
    assert_eq!(out.status.code(), Some(2));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("AMQP_URL"), "{lines:?}");
    assert!(!lines[0].contains("hunter2"), "{lines:?}");
}

#[test]
fn a_bad_otlp_endpoint_is_named_without_its_value() {
    let out = run(&["run"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://key-s3cret@[not a url")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("micro8gents: invalid setting OTEL_EXPORTER_OTLP_ENDPOINT:"), "{lines:?}");
    assert!(!lines[0].contains("s3cret"), "{lines:?}");

    let out = run(&["config"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example.com")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("OTEL_EXPORTER_OTLP_ENDPOINT: must be an http:// endpoint"), "{lines:?}");
}

#[test]
fn config_prints_every_setting_with_secrets_redacted() {
    let vars = [
        ("DATABASE_URL", "postgres://app:pg-s3cret-pass@db.internal:5432/m8"),
        ("AMQP_URL", "amqp://m8:amqp-s3cret-pass@mq.internal:5672/%2f"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_new_s3cret,whsec_old_s3cret"),
        ("BATCH_SIZE", "50"),
    ];
    let out = run(&["config"], &vars);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    for secret in ["pg-s3cret-pass", "amqp-s3cret-pass", "whsec_new_s3cret", "whsec_old_s3cret", "s3cret"] {
        assert!(!text.contains(secret), "config shows a secret: {text}");
    }
    assert!(text.contains("DATABASE_URL=postgres://app:redacted@db.internal:5432/m8"), "{text}");
    assert!(text.contains("AMQP_URL=amqp://m8:redacted@mq.internal:5672/%2f"), "{text}");
    assert!(text.contains("STRIPE_WEBHOOK_SECRET=[2 redacted]"), "{text}");
    assert!(text.contains("BATCH_SIZE=50"), "{text}");
    for name in ["LISTEN_ADDR", "PUBLIC_BASE_URL", "RETRY_DELAYS", "LOG_FORMAT", "AMQP_PREFIX"] {
        assert!(text.lines().any(|l| l.starts_with(&format!("{name}="))), "{name} missing: {text}");
    }
}
