//! CI's check that the local RabbitMQ really serves quorum queues, and its sweeper of
//! queues that killed test processes left behind.
//!
//! `rabbitmq-diagnostics check_running` answers "running" for a node that cannot
//! open a connection in time or, after `stop_app`/`start_app` on 3.10, cannot serve a
//! new quorum queue (`rabbit_quorum_queue:consume` fails with `noproc`). `.ci/run`
//! runs this probe before the tests and restarts the node fully when it fails.
//!
//! ```text
//! broker_probe                      # declare a quorum queue, publish (confirmed), get, delete
//! broker_probe --delete < names     # delete the queues named one per line on stdin
//! ```
//! AMQP_URL as for the service (default: the local broker). Exit code 0 when it worked.

use std::io::BufRead;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let delete = std::env::args().any(|a| a == "--delete");
    let work = async {
        let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        if delete {
            let mut deleted = 0;
            for name in std::io::stdin().lock().lines().map_while(Result::ok) {
                let name = name.trim();
                if !name.is_empty() {
                    ch.queue_delete(name.into(), Default::default()).await?;
                    deleted += 1;
                }
            }
            println!("deleted {deleted} leftover queues");
        } else {
            let queue = format!("ci.probe.{}", std::process::id());
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            ch.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
                .await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"probe",
                BasicProperties::default(),
            )
            .await?
            .await?;
            let got = ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await?;
            ch.queue_delete(queue.as_str().into(), Default::default()).await?;
            if got.is_none() {
                eprintln!("the probe message did not come back from the quorum queue");
                std::process::exit(1);
            }
            println!("RabbitMQ serves quorum queues");
        }
        conn.close(200, "bye".into()).await?;
        Ok::<_, lapin::Error>(())
    };
    match tokio::time::timeout(DEADLINE, work).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("RabbitMQ probe failed: {e}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("RabbitMQ probe timed out after {DEADLINE:?}");
            std::process::exit(1);
        }
    }
}
