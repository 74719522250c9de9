//! Adopting a `public` schema that the dashboard's Drizzle made (ADR 0011).
//!
//! The dashboard's database exists before the worker. Migration 0001 creates the
//! seed's tables, which would fail there (`type "call_status" already exists`).
//! So before sqlx runs, `migrate` looks at `public`: when it holds any of the
//! seed's tables or enums, it checks from the catalog that everything the worker
//! reads or writes is there with a type the worker can use, and, the first time,
//! records migration 1 as applied (with sqlx's own checksum) plus a row in
//! `webhook_worker.adoption`, in one transaction. It never changes `public`.
//!
//! The check also runs on every later `migrate`, on any database: a dashboard
//! release that drops or retypes a column the worker needs is reported before
//! the service would fail on it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use sqlx::PgConnection;

/// A type the worker can live with for one column.
#[derive(Debug, Clone, Copy)]
enum Ty {
    Integer,
    /// `varchar(n)` with n at least this, or `text`: the worker writes values up to the seed's length.
    Chars(i32),
    /// Any character type: the worker only reads it.
    AnyText,
    Text,
    Timestamp,
    Boolean,
    /// `jsonb` or `json`: read with `->>`.
    Json,
    /// The named enum in `public`.
    Enum(&'static str),
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::Integer => f.write_str("integer"),
            Ty::Chars(n) => write!(f, "varchar({n}) or longer, or text"),
            Ty::AnyText => f.write_str("a character type (varchar or text)"),
            Ty::Text => f.write_str("text"),
            Ty::Timestamp => f.write_str("timestamp (without time zone)"),
            Ty::Boolean => f.write_str("boolean"),
            Ty::Json => f.write_str("jsonb"),
            Ty::Enum(name) => write!(f, "the enum {name}"),
        }
    }
}

/// How the worker uses a column.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Use {
    Read,
    /// Written, never NULL.
    Write,
    /// Written, sometimes NULL: the column must stay nullable.
    WriteNullable,
}

struct Column {
    table: &'static str,
    name: &'static str,
    ty: Ty,
    used: Use,
}

const fn col(table: &'static str, name: &'static str, ty: Ty, used: Use) -> Column {
    Column { table, name, ty, used }
}

use Ty::*;
use Use::*;

/// Every column of `public` the worker reads or writes (workers/*.rs, store/secrets.rs).
const COLUMNS: &[Column] = &[
    col("users", "id", Integer, Read),
    col("businesses", "id", Integer, Read),
    col("hours_of_operation", "business_id", Integer, Read),
    col("hours_of_operation", "day_of_week", AnyText, Read),
    col("hours_of_operation", "open_time", AnyText, Read),
    col("hours_of_operation", "close_time", AnyText, Read),
    col("hours_of_operation", "is_open", Boolean, Read),
    col("integrations", "id", Integer, Read),
    col("integrations", "business_id", Integer, Read),
    col("integrations", "type", AnyText, Read),
    col("integrations", "config", Json, Read),
    col("integrations", "status", AnyText, Read),
    col("calls", "id", Integer, Read),
    col("calls", "business_id", Integer, Write),
    col("calls", "status", Enum("call_status"), Write),
    col("calls", "start_time", Timestamp, Write),
    col("calls", "end_time", Timestamp, WriteNullable),
    col("calls", "duration", Chars(20), WriteNullable),
    col("calls", "phone", Chars(20), WriteNullable),
    col("calls", "caller", Chars(100), WriteNullable),
    col("calls", "recording", Text, WriteNullable),
    col("calls", "transcript", Text, WriteNullable),
    col("bookings", "id", Integer, Read),
    col("bookings", "business_id", Integer, Write),
    col("bookings", "customer", Chars(100), Write),
    col("bookings", "phone", Chars(20), WriteNullable),
    col("bookings", "email", Chars(255), WriteNullable),
    col("bookings", "service", Chars(100), Write),
    col("bookings", "date", Timestamp, Write),
    col("bookings", "status", Enum("booking_status"), Write),
    col("bookings", "notes", Text, WriteNullable),
    col("subscriptions", "id", Integer, Read),
    col("subscriptions", "user_id", Integer, Write),
    col("subscriptions", "plan", Enum("subscription_plan"), Write),
    col("subscriptions", "stripe_customer_id", Chars(100), WriteNullable),
    col("subscriptions", "stripe_subscription_id", Chars(100), WriteNullable),
    col("subscriptions", "status", Chars(20), Write),
    col("subscriptions", "current_period_start", Timestamp, WriteNullable),
    col("subscriptions", "current_period_end", Timestamp, WriteNullable),
    col("subscriptions", "created_at", Timestamp, Write),
    col("subscriptions", "updated_at", Timestamp, Write),
];

/// The enum values the worker writes.
const ENUMS: &[(&str, &[&str])] = &[
    ("call_status", &["completed", "in-progress", "missed", "transferred"]),
    ("booking_status", &["upcoming", "completed", "canceled"]),
    ("subscription_plan", &["free", "basic", "premium", "enterprise"]),
];

/// Tables whose `id` the worker's own tables reference (a foreign key needs it unique).
const REFERENCED: &[&str] = &["users", "calls", "bookings"];

/// Tables the worker inserts rows into: any other NOT NULL column needs a default.
const INSERTED: &[&str] = &["calls", "bookings", "subscriptions"];

/// The seed's tables: the ones a role running the worker must be able to see.
pub const SEED_TABLES: &[&str] =
    &["users", "businesses", "hours_of_operation", "faqs", "calls", "bookings", "integrations", "subscriptions"];

/// One thing in `public` the worker cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem(pub String);

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `public` looked like to the check.
#[derive(Debug, Default)]
pub struct Survey {
    /// Seed tables and enums found in `public` (empty: nothing to adopt, migration 1 creates them).
    pub found: Vec<String>,
    pub problems: Vec<Problem>,
}

#[derive(sqlx::FromRow)]
struct CatalogRow {
    table_name: String,
    column_name: String,
    type_name: String,
    base: String,
    public_enum: bool,
    length: Option<i32>,
    not_null: bool,
    has_default: bool,
}

struct CatalogColumn {
    type_name: String,
    /// `typname` of the column's type and whether it is an enum in `public`.
    base: String,
    public_enum: bool,
    /// `varchar(n)`: n; None otherwise.
    length: Option<i32>,
    not_null: bool,
    has_default: bool,
}

/// Reads `public` from the catalog and lists every problem; changes nothing.
pub async fn survey(conn: &mut PgConnection) -> Result<Survey, sqlx::Error> {
    let rows: Vec<CatalogRow> = sqlx::query_as(
        "SELECT c.relname::text AS table_name, a.attname::text AS column_name,
                format_type(a.atttypid, a.atttypmod) AS type_name, t.typname::text AS base,
                (t.typtype = 'e' AND tn.nspname = 'public') AS public_enum,
                CASE WHEN t.typname IN ('varchar', 'bpchar') AND a.atttypmod > 4 THEN a.atttypmod - 4 END AS length,
                a.attnotnull AS not_null, (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS has_default
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           JOIN pg_type t ON t.oid = a.atttypid
           JOIN pg_namespace tn ON tn.oid = t.typnamespace
          WHERE c.relkind IN ('r', 'p')",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut tables: BTreeMap<String, BTreeMap<String, CatalogColumn>> = BTreeMap::new();
    for r in rows {
        let c = CatalogColumn {
            type_name: r.type_name,
            base: r.base,
            public_enum: r.public_enum,
            length: r.length,
            not_null: r.not_null,
            has_default: r.has_default,
        };
        tables.entry(r.table_name).or_default().insert(r.column_name, c);
    }
    let enum_rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT t.typname::text, e.enumlabel::text
           FROM pg_type t
           JOIN pg_namespace n ON n.oid = t.typnamespace AND n.nspname = 'public'
           JOIN pg_enum e ON e.enumtypid = t.oid",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut enums: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, label) in enum_rows {
        enums.entry(name).or_default().insert(label);
    }
    let keyed: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT c.relname::text
           FROM pg_constraint k
           JOIN pg_class c ON c.oid = k.conrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
          WHERE k.contype IN ('p', 'u')
            AND k.conkey = ARRAY[(SELECT attnum FROM pg_attribute WHERE attrelid = c.oid AND attname = 'id')]",
    )
    .fetch_all(&mut *conn)
    .await?;
    let keyed: BTreeSet<String> = keyed.into_iter().map(|(t,)| t).collect();

    let mut found: Vec<String> =
        SEED_TABLES.iter().filter(|t| tables.contains_key(**t)).map(|t| t.to_string()).collect();
    found.extend(ENUMS.iter().filter(|(e, _)| enums.contains_key(*e)).map(|(e, _)| e.to_string()));
    let mut survey = Survey { found, problems: Vec::new() };
    if survey.found.is_empty() {
        return Ok(survey);
    }
    survey.problems = problems(&tables, &enums, &keyed);
    Ok(survey)
}

fn problems(
    tables: &BTreeMap<String, BTreeMap<String, CatalogColumn>>,
    enums: &BTreeMap<String, BTreeSet<String>>,
    keyed: &BTreeSet<String>,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut said_missing = BTreeSet::new();
    for c in COLUMNS {
        let Some(table) = tables.get(c.table) else {
            if said_missing.insert(c.table) {
                out.push(Problem(format!("public.{}: table missing (the worker uses it)", c.table)));
            }
            continue;
        };
        let what = format!("public.{}.{}", c.table, c.name);
        let Some(found) = table.get(c.name) else {
            let null = if c.used == WriteNullable { ", nullable" } else { "" };
            out.push(Problem(format!("{what}: column missing; expected {}{null}", c.ty)));
            continue;
        };
        if !type_fits(c.ty, found) {
            out.push(Problem(format!("{what}: expected {}, found {}", c.ty, found.type_name)));
        }
        if c.used == WriteNullable && found.not_null {
            out.push(Problem(format!("{what}: expected nullable (the worker may write NULL), found NOT NULL")));
        }
    }
    for table in INSERTED {
        let Some(columns) = tables.get(*table) else { continue };
        for (name, c) in columns {
            let written = COLUMNS.iter().any(|w| w.table == *table && w.name == name && w.used != Read);
            if c.not_null && !c.has_default && !written {
                out.push(Problem(format!(
                    "public.{table}.{name}: NOT NULL without a default, which the worker's inserts never set; \
                     expected a default or NULL allowed"
                )));
            }
        }
    }
    for table in REFERENCED {
        if tables.contains_key(*table) && !keyed.contains(*table) {
            out.push(Problem(format!(
                "public.{table}.id: expected a primary key or unique constraint (the worker's tables reference it)"
            )));
        }
    }
    for (name, values) in ENUMS {
        let Some(present) = enums.get(*name) else {
            out.push(Problem(format!("public.{name}: enum missing; expected values {}", values.join(", "))));
            continue;
        };
        for v in values.iter().filter(|v| !present.contains(**v)) {
            out.push(Problem(format!("public.{name}: enum value '{v}' missing")));
        }
    }
    out
}

fn type_fits(ty: Ty, c: &CatalogColumn) -> bool {
    let chars = matches!(c.base.as_str(), "varchar" | "text");
    match ty {
        Integer => c.base == "int4",
        Chars(n) => c.base == "text" || (c.base == "varchar" && c.length.is_none_or(|len| len >= n)),
        AnyText => chars,
        Text => c.base == "text",
        Timestamp => c.base == "timestamp",
        Boolean => c.base == "bool",
        Json => matches!(c.base.as_str(), "jsonb" | "json"),
        Enum(name) => c.public_enum && c.base == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(base: &str, length: Option<i32>) -> CatalogColumn {
        CatalogColumn {
            type_name: base.into(),
            base: base.into(),
            public_enum: false,
            length,
            not_null: false,
            has_default: false,
        }
    }

    #[test]
    fn longer_or_unbounded_text_fits_a_written_varchar() {
        assert!(type_fits(Chars(100), &column("varchar", Some(100))));
        assert!(type_fits(Chars(100), &column("varchar", Some(255))));
        assert!(type_fits(Chars(100), &column("varchar", None)));
        assert!(type_fits(Chars(100), &column("text", None)));
        assert!(!type_fits(Chars(100), &column("varchar", Some(50))));
        assert!(!type_fits(Chars(100), &column("int4", None)));
    }

    #[test]
    fn an_enum_column_must_use_the_public_enum() {
        let mut c = column("call_status", None);
        assert!(!type_fits(Enum("call_status"), &c));
        c.public_enum = true;
        assert!(type_fits(Enum("call_status"), &c));
        assert!(!type_fits(Enum("booking_status"), &c));
    }
}
