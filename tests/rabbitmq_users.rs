//! Issue 11, point 5 (RabbitMQ): the ingress and the workers each run as a
//! broker user of their own with only the permissions README and
//! docker-compose.yml give them (the regular expressions below, with the
//! test's prefix for `micro8gents`). The users are made with rabbitmqctl under
//! unique names and deleted afterwards.

mod common;

use std::process::Command;

use common::{PUBLIC_BASE_URL, TestApp};
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use micro8gents::app::{self, Role};
use micro8gents::config::ConnUrl;
use micro8gents::verify::twilio::{Algorithm, compute_signature};

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").arg("-q").args(args).output().expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Broker users made for one test, deleted when it ends.
struct BrokerUsers(Vec<String>);

impl BrokerUsers {
    fn add(&mut self, name: &str, password: &str, configure: &str, write: &str, read: &str) {
        rabbitmqctl(&["add_user", name, password]);
        self.0.push(name.to_string());
        rabbitmqctl(&["set_permissions", "-p", "/", name, configure, write, read]);
    }
}

impl Drop for BrokerUsers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("rabbitmqctl").args(["-q", "delete_user", name]).output();
        }
    }
}

/// `amqp://user:password@host:port/%2f` on the test broker.
fn as_user(user: &str, password: &str) -> String {
    let mut u = url::Url::parse(&common::amqp_url()).unwrap();
    u.set_username(user).unwrap();
    u.set_password(Some(password)).unwrap();
    u.to_string()
}

#[tokio::test]
async fn the_ingress_and_the_workers_run_as_separate_users_with_only_their_permissions() {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let (ingress, worker) = (format!("m8-ingress-{id}"), format!("m8-worker-{id}"));
    let prefix = format!("test.{id}");
    let p = regex_escape(&prefix);
    let mut users = BrokerUsers(Vec::new());
    // README, "Deploying next to the dashboard": the ingress may declare and
    // write its one exchange, and read nothing; the workers own the rest.
    users.add(&ingress, "ingress-pw", &format!("^{p}\\.events$"), &format!("^{p}\\.events$"), "^$");
    users.add(&worker, "worker-pw", &format!("^{p}\\."), &format!("^{p}\\."), &format!("^{p}\\."));

    // The workers (and the broker topology they declare) as the worker user.
    let app = TestApp::spawn_with(|v| {
        v.insert("AMQP_PREFIX".into(), prefix.clone());
        v.insert("AMQP_URL".into(), as_user(&worker, "worker-pw"));
    })
    .await;
    // An ingress of its own as the ingress user.
    let mut cfg = app.cfg.clone();
    cfg.amqp_url = ConnUrl::new(as_user(&ingress, "ingress-pw"));
    cfg.listen_addr = "127.0.0.1:0".parse().unwrap();
    let serve = app::start(cfg, Role::Serve).await.expect("serve starts");
    let base = format!("http://{}", serve.addr.unwrap());

    let business = app.twilio_business("tok").await;
    let path = format!("/webhooks/twilio/{business}/call-status");
    let params: Vec<(String, String)> = [
        ("CallSid", "CA00000000000000000000000000000061"),
        ("CallStatus", "completed"),
        ("From", "+15550001111"),
        ("To", "+15550002222"),
        ("Direction", "inbound"),
        ("CallDuration", "7"),
        ("SequenceNumber", "0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let sig = compute_signature("tok", &format!("{PUBLIC_BASE_URL}{path}"), &params, Algorithm::HmacSha1);
    let res = app
        .http
        .post(format!("{base}{path}"))
        .header("x-twilio-signature", sig)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish())
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    app.settled(1).await;
    assert_eq!(common::calls_of(&app.pool, business).await[0].status, "completed");
    let (outbox,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM webhook_worker.outbox").fetch_one(&app.pool).await.unwrap();
    assert_eq!(outbox, 0, "the ingress user published to the broker");

    // The ingress user can publish, but cannot read a queue.
    let conn = lapin::Connection::connect(&as_user(&ingress, "ingress-pw"), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let consume = ch
        .basic_consume(
            format!("{prefix}.calls").as_str().into(),
            "peek".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    let Err(err) = consume else { panic!("the ingress user may not consume") };
    let err = err.to_string();
    assert!(err.contains("ACCESS_REFUSED") || err.contains("access"), "{err}");
    let _ = conn.close(200, "bye".into()).await;

    serve.stop().await;
    app.stop().await;
    drop(users);
}

fn regex_escape(s: &str) -> String {
    s.chars().flat_map(|c| if c == '.' { vec!['\\', '.'] } else { vec![c] }).collect()
}
