//! The dashboard's side of a shared database: its Drizzle SQL, databases a test
//! prepares the way the dashboard left them, and catalog snapshots to prove
//! what the worker did or did not change.

use std::process::{Command, Output};

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::admin_url;

/// What drizzle-kit generates for the seed schema (a copy of shared/dashboard-schema.sql).
pub const DASHBOARD_SQL: &str = include_str!("../fixtures/dashboard-schema.sql");

/// A database of its own for one test, dropped when it goes out of scope.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("m8_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin_url()).await.expect("admin connection to Postgres");
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
        conn.close().await.ok();
        let mut url = url::Url::parse(&admin_url()).unwrap();
        url.set_path(&name);
        TestDb { name, url: url.to_string() }
    }

    /// A database whose `public` the dashboard made, with `sql` (usually [`DASHBOARD_SQL`]).
    pub async fn with(sql: &str) -> TestDb {
        let db = TestDb::new().await;
        db.exec(sql).await;
        db
    }

    pub async fn exec(&self, sql: &str) {
        let mut conn = PgConnection::connect(&self.url).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(sql.to_string())).execute(&mut conn).await.expect("SQL applies");
        conn.close().await.ok();
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }

    /// Everything observable about `schema` (see [`catalog`]).
    pub async fn catalog(&self, schema: &str) -> Vec<String> {
        let mut conn = self.connect().await;
        let facts = catalog(&mut conn, schema).await;
        conn.close().await.ok();
        facts
    }

    pub async fn schema_exists(&self, schema: &str) -> bool {
        let mut conn = self.connect().await;
        let (exists,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        exists
    }

    /// `micro8gents migrate` as a user runs it: the real binary, its exit code and its lines.
    pub fn migrate_binary(&self) -> Output {
        run_binary(&["migrate"], &[("DATABASE_URL", &self.url)])
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
                    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::raw_sql(AssertSqlSafe(drop)).execute(&mut conn).await;
                }
            })
        })
        .join()
        .ok();
    }
}

/// Runs the `micro8gents` binary with only these variables (plus PATH) set.
pub fn run_binary(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_micro8gents"));
    cmd.args(args)
        .env_clear()
        .env("LOG_FORMAT", "text")
        .env("RUST_LOG", std::env::var("M8_TEST_LOG").unwrap_or("info".into()));
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

/// The catalog of `schema` as sorted one-line facts, without OIDs, row counts or
/// sequence positions: relations, columns in order with type, nullability and
/// default, enums with their labels in order, other types, constraints, indexes,
/// sequences, functions, triggers, policies, rules and comments.
pub async fn catalog(conn: &mut PgConnection, schema: &str) -> Vec<String> {
    let queries: &[&str] = &[
        "SELECT 'relation ' || c.relname || ' kind=' || c.relkind::text || ' persistence=' || c.relpersistence::text::text
                || ' rls=' || c.relrowsecurity
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
        "SELECT 'column ' || c.relname || '#' || a.attnum || ' ' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                || ' notnull=' || a.attnotnull || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-')
                || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
                || ' collation=' || coalesce(co.collname, '-')
           FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
           LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 0
          WHERE n.nspname = $1 AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
        "SELECT 'enum ' || t.typname || ' ' || string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
           FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_enum e ON e.enumtypid = t.oid
          WHERE n.nspname = $1 GROUP BY t.typname",
        "SELECT 'type ' || t.typname || ' ' || t.typtype::text
           FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
          WHERE n.nspname = $1
            AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
            AND NOT EXISTS (SELECT 1 FROM pg_type el WHERE el.typarray = t.oid)",
        "SELECT 'constraint ' || k.conname || ' on ' || coalesce(c.relname, '-') || ' ' || pg_get_constraintdef(k.oid)
           FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace
           LEFT JOIN pg_class c ON c.oid = k.conrelid
          WHERE n.nspname = $1 AND k.contype <> 'n'",
        "SELECT 'index ' || indexname || ' ' || indexdef FROM pg_indexes WHERE schemaname = $1",
        "SELECT 'sequence ' || c.relname || ' ' || format_type(s.seqtypid, NULL) || ' start=' || s.seqstart
                || ' inc=' || s.seqincrement || ' min=' || s.seqmin || ' max=' || s.seqmax
           FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1",
        "SELECT 'function ' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')'
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1",
        "SELECT 'trigger ' || t.tgname || ' on ' || c.relname
           FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND NOT t.tgisinternal",
        "SELECT 'policy ' || policyname || ' on ' || tablename FROM pg_policies WHERE schemaname = $1",
        "SELECT 'rule ' || rulename || ' on ' || tablename FROM pg_rules WHERE schemaname = $1",
        "SELECT 'comment ' || c.relname || ' ' || d.objsubid || ' ' || d.description
           FROM pg_description d JOIN pg_class c ON c.oid = d.objoid JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1",
    ];
    let mut facts = Vec::new();
    for sql in queries {
        let rows: Vec<(String,)> = sqlx::query_as(AssertSqlSafe(sql.to_string()))
            .bind(schema)
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("reading the catalog ({sql}): {e}"));
        facts.extend(rows.into_iter().map(|(f,)| f));
    }
    facts.sort();
    facts
}

/// Lines of `b` not in `a` and of `a` not in `b`, for a readable failure.
pub fn diff(a: &[String], b: &[String]) -> String {
    let only_a: Vec<&String> = a.iter().filter(|f| !b.contains(f)).collect();
    let only_b: Vec<&String> = b.iter().filter(|f| !a.contains(f)).collect();
    format!("only before/expected: {only_a:#?}\nonly after/actual: {only_b:#?}")
}
