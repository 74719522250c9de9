//! What stores: the Postgres pool, the migrations, and the per-business secrets.
//!
//! The seed's tables live in `public` exactly as Drizzle declares them; all the
//! worker's own state (inbox, outbox, sqlx's migration table) lives in the
//! `webhook_worker` schema, where a `drizzle-kit push` never looks.

pub mod inbox;
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

/// Applies the migrations. sqlx's bookkeeping table lands in the worker's schema
/// because that schema is first on the search path; the SQL files qualify every
/// object they create. Concurrent callers are serialised by sqlx's advisory lock.
pub async fn migrate(cfg: &Config) -> Result<(), sqlx::migrate::MigrateError> {
    let opts = connect_options(cfg, "micro8gents-migrate")?;
    let mut conn = PgConnection::connect_with(&opts).await?;
    sqlx::query("CREATE SCHEMA IF NOT EXISTS webhook_worker").execute(&mut conn).await?;
    sqlx::query("SET search_path TO webhook_worker").execute(&mut conn).await?;
    MIGRATOR.run(&mut conn).await?;
    conn.close().await?;
    Ok(())
}
