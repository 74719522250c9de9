use std::process::ExitCode;

use clap::{Parser, Subcommand};
use micro8gents::app::{self, Role};
use micro8gents::config::Config;
use micro8gents::store;
use tracing_subscriber::EnvFilter;

/// Micro8gents webhook worker: verifies Twilio, Stripe and n8n webhooks,
/// carries them over RabbitMQ and applies them to Postgres.
/// Settings come from the environment (see README).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Clone, Copy)]
enum Command {
    /// Ingress and every consumer in one process (the default); applies migrations first.
    Run,
    /// The HTTP ingress only.
    Serve,
    /// The consumers only (any number may run side by side).
    Work,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective settings, secrets redacted.
    Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("micro8gents: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(dispatch(cli.command.unwrap_or(Command::Run), cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, cfg: Config) -> anyhow::Result<()> {
    let role = match command {
        Command::Migrate => return Ok(store::migrate(&cfg).await?),
        Command::Config => {
            for (name, value) in cfg.describe() {
                println!("{name}={value}");
            }
            return Ok(());
        }
        Command::Run => {
            store::migrate(&cfg).await?;
            Role::Run
        }
        Command::Serve => Role::Serve,
        Command::Work => Role::Work,
    };
    let running = app::start(cfg, role).await?;
    let token = running.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing work in flight");
        token.cancel();
    });
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
