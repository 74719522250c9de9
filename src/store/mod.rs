//! What stores: the Postgres pool, the migrations, and the per-business secrets.
//!
//! The seed's tables live in `public` exactly as Drizzle declares them; all the
//! worker's own state (inbox, outbox, sqlx's migration table) lives in the
//! `webhook_worker` schema, where a `drizzle-kit push` never looks.

pub mod adopt;
pub mod event_log;
pub mod inbox;
pub mod retention;
pub mod secrets;

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::config::Config;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn connect_options(cfg: &Config, application: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let statement_timeout = cfg.db_statement_timeout.as_millis().to_string();
    Ok(PgConnectOptions::from_str(cfg.database_url.expose())?
        .application_name(application)
        .options([("statement_timeout", statement_timeout.as_str())]))
}

/// A lazy pool: the process starts (and `/readyz` tells) even while Postgres is down.
pub fn pool(cfg: &Config, application: &str) -> Result<PgPool, sqlx::Error> {
    let opts = connect_options(cfg, application)?;
    Ok(PgPoolOptions::new()
        .max_connections(cfg.db_max_connections)
        .acquire_timeout(cfg.db_acquire_timeout)
        .connect_lazy_with(opts))
}

/// Why `migrate` stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateFailure {
    /// `public` lacks something the worker needs; each problem was logged on a line of its own.
    #[error(
        "the public schema is not compatible with the worker: {0} problem(s), each on a line above; nothing was changed"
    )]
    Incompatible(usize),
    /// The TLS handshake with Postgres failed (sslmode, sslrootcert in DATABASE_URL).
    #[error("Postgres TLS failed: {0}; check sslmode and sslrootcert in DATABASE_URL")]
    Tls(String),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Serialises whole `migrate` runs (adoption and sqlx's migrations) across processes.
/// sqlx's own lock covers only its part.
const MIGRATE_LOCK: i64 = 0x6d38_6164_6f70; // "m8adop"

/// Applies the migrations, after adopting a `public` schema the dashboard made
/// (see [`adopt`]). sqlx's bookkeeping table lands in the worker's schema
/// because that schema is first on the search path; the SQL files qualify every
/// object they create. Concurrent callers wait for each other on an advisory lock.
pub async fn migrate(cfg: &Config) -> Result<(), MigrateFailure> {
    let opts = connect_options(cfg, "micro8gents-migrate")?;
    let mut conn = PgConnection::connect_with(&opts).await.map_err(|e| match e {
        sqlx::Error::Tls(tls) => MigrateFailure::Tls(tls.to_string()),
        // rustls reports a refused certificate as InvalidData on the stream.
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            MigrateFailure::Tls(io.get_ref().map_or_else(|| io.to_string(), ToString::to_string))
        }
        e => e.into(),
    })?;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(MIGRATE_LOCK).execute(&mut conn).await?;
    let result = migrate_locked(&mut conn, cfg.event_retention).await;
    // Closing the session releases the lock too; unlocking first lets the next caller go at once.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATE_LOCK).execute(&mut conn).await;
    conn.close().await.ok();
    result
}

/// Then copies what is still within `EVENT_RETENTION` of an inbox older than
/// migration 0006 ([`retention::convert_legacy`]) and makes sure the event
/// log's partitions exist for the days ahead.
async fn migrate_locked(conn: &mut PgConnection, retention: std::time::Duration) -> Result<(), MigrateFailure> {
    let survey = adopt::survey(conn).await?;
    if !survey.problems.is_empty() {
        for p in &survey.problems {
            tracing::error!("{p}");
        }
        return Err(MigrateFailure::Incompatible(survey.problems.len()));
    }
    // A role that owns the schema but may not create schemas in the database can still migrate.
    let (exists,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind("webhook_worker")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        sqlx::query("CREATE SCHEMA webhook_worker").execute(&mut *conn).await?;
    }
    sqlx::query("SET search_path TO webhook_worker").execute(&mut *conn).await?;
    let (adoption_table,): (bool,) =
        sqlx::query_as("SELECT to_regclass('webhook_worker.adoption') IS NOT NULL").fetch_one(&mut *conn).await?;
    if !adoption_table {
        sqlx::query(ADOPTION_TABLE).execute(&mut *conn).await?;
    }
    if survey.found.is_empty() {
        tracing::info!("public holds none of the seed's tables: creating them (migration 1)");
    } else if adopt_if_new(conn, &survey).await? {
        tracing::info!(
            found = survey.found.join(","),
            "adopted the dashboard's public schema: everything the worker needs is there; \
             nothing in public was changed; migration 1 recorded as applied, see webhook_worker.adoption"
        );
    } else {
        tracing::info!("public schema checked: everything the worker needs is there");
    }
    MIGRATOR.run(&mut *conn).await?;
    let copied = retention::convert_legacy(conn, retention).await?;
    if copied > 0 {
        tracing::info!(events = copied, "copied the old inbox's events within EVENT_RETENTION into the new one");
    }
    retention::create_partitions(&mut *conn).await?;
    let (version,): (Option<i64>,) =
        sqlx::query_as("SELECT max(version) FROM _sqlx_migrations WHERE success").fetch_one(&mut *conn).await?;
    tracing::info!(version = version.unwrap_or(0), "migrations applied");
    Ok(())
}

/// The record of an adoption. Created on every database (adopted or not) so that
/// both paths end with the same worker schema.
const ADOPTION_TABLE: &str = "CREATE TABLE webhook_worker.adoption (
    adopted_at     timestamptz NOT NULL DEFAULT now(),
    worker_version text NOT NULL,
    -- The seed's tables and enums found in public, all checked compatible.
    found          text[] NOT NULL
)";

/// Records the adoption and marks migration 1 applied, once; false if migration 1 was already recorded.
async fn adopt_if_new(conn: &mut PgConnection, survey: &adopt::Survey) -> Result<bool, MigrateFailure> {
    let mut tx = conn.begin().await?;
    let (table,): (bool,) =
        sqlx::query_as("SELECT to_regclass('webhook_worker._sqlx_migrations') IS NOT NULL").fetch_one(&mut *tx).await?;
    if table {
        let (recorded,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM webhook_worker._sqlx_migrations WHERE version = 1)")
                .fetch_one(&mut *tx)
                .await?;
        if recorded {
            return Ok(false);
        }
    }
    sqlx::query("INSERT INTO webhook_worker.adoption (worker_version, found) VALUES ($1, $2)")
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(&survey.found)
        .execute(&mut *tx)
        .await?;
    // sqlx writes its own row, with migration 1's checksum, as if it had run it.
    MIGRATOR.skip(&mut *tx, Some(1)).await?;
    tx.commit().await?;
    Ok(true)
}
