//! The `public` schema must be exactly what the dashboard's Drizzle code declares
//! (CONTRACT.md section 1): the dashboard keeps running `drizzle-kit push`
//! against the same database, so any drift either breaks it or gets dropped.
//!
//! The expected catalog is built at test time by parsing the Drizzle TypeScript
//! of `tests/fixtures/seed_schema.md` (a copy of the seed document), so the test
//! cannot drift from the seed. The actual catalog is read from Postgres after
//! running `migrations/` the way the application does (search_path set to the
//! worker's own schema). Both are rendered to a set of one-line "facts" and
//! compared; a failure prints the facts that are missing and the ones that are
//! unexpected.
//!
//! Needs Postgres: `TEST_DATABASE_URL` (an admin URL able to create databases),
//! by default `postgres://postgres@127.0.0.1:5432/postgres`.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use anyhow::{Context, bail};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row};

const SEED: &str = include_str!("fixtures/seed_schema.md");
const WORKER_SCHEMA: &str = "webhook_worker";
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Postgres truncates identifiers to NAMEDATALEN - 1 bytes.
const MAX_IDENT: usize = 63;

// ---------------------------------------------------------------------------
// The Drizzle model, as parsed from the seed
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum ColType {
    Serial,
    Integer,
    Varchar(Option<u32>),
    Text,
    Timestamp {
        with_tz: bool,
        precision: Option<u32>,
    },
    Boolean,
    Jsonb,
    /// SQL name of the enum type.
    Enum(String),
}

#[derive(Debug, Clone)]
struct ForeignKey {
    /// TypeScript variable of the referenced table and the referenced property.
    target_var: String,
    target_key: String,
    on_update: Option<String>,
    on_delete: Option<String>,
}

#[derive(Debug, Clone)]
enum ColDefault {
    Now,
    Bool(bool),
    Int(i64),
    Str(String),
}

#[derive(Debug, Clone)]
struct DrizzleColumn {
    /// TypeScript property name.
    key: String,
    /// SQL column name.
    name: String,
    ty: ColType,
    not_null: bool,
    primary_key: bool,
    /// `Some(constraint name)` when `.unique()` is used.
    unique: Option<String>,
    default: Option<ColDefault>,
    references: Option<ForeignKey>,
}

#[derive(Debug, Clone)]
struct DrizzleTable {
    var: String,
    name: String,
    columns: Vec<DrizzleColumn>,
}

#[derive(Debug, Default)]
struct DrizzleSchema {
    /// SQL enum name -> labels in declared order.
    enums: Vec<(String, Vec<String>)>,
    tables: Vec<DrizzleTable>,
}

// ---------------------------------------------------------------------------
// A tiny parser for the subset of Drizzle's pg-core API the seed uses.
// Anything it does not understand is an error, never silently skipped, so a
// seed using a new construct fails loudly instead of being half-compared.
// ---------------------------------------------------------------------------

/// The contents of every ```typescript / ```ts fenced block of a markdown text.
fn typescript_blocks(md: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in md.lines() {
        let trimmed = line.trim();
        match &mut current {
            None => {
                if let Some(lang) = trimmed.strip_prefix("```") {
                    let lang = lang.trim();
                    if lang == "typescript" || lang == "ts" {
                        current = Some(String::new());
                    }
                }
            }
            Some(buf) => {
                if trimmed.starts_with("```") {
                    blocks.push(current.take().unwrap());
                } else {
                    buf.push_str(line);
                    buf.push('\n');
                }
            }
        }
    }
    blocks
}

struct Cursor<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(src: &'a str, pos: usize) -> Self {
        Self { src, pos }
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn context(&self) -> String {
        let line = self.src[..self.pos].matches('\n').count() + 1;
        let snippet: String = self.rest().chars().take(60).collect();
        format!("block line {line}, at {snippet:?}")
    }

    fn skip_ws(&mut self) {
        loop {
            let rest = self.rest();
            let trimmed = rest.trim_start();
            self.pos += rest.len() - trimmed.len();
            if trimmed.starts_with("//") {
                self.pos += trimmed.find('\n').unwrap_or(trimmed.len());
            } else if trimmed.starts_with("/*") {
                self.pos += trimmed.find("*/").map_or(trimmed.len(), |i| i + 2);
            } else {
                break;
            }
        }
    }

    fn peek(&mut self, token: &str) -> bool {
        self.skip_ws();
        self.rest().starts_with(token)
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.peek(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> anyhow::Result<()> {
        if self.eat(token) { Ok(()) } else { bail!("expected {token:?} ({})", self.context()) }
    }

    fn ident(&mut self) -> anyhow::Result<String> {
        self.skip_ws();
        let rest = self.rest();
        let len = rest
            .char_indices()
            .find(|&(i, c)| !(c == '_' || c == '$' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())))
            .map_or(rest.len(), |(i, _)| i);
        if len == 0 {
            bail!("expected an identifier ({})", self.context());
        }
        self.pos += len;
        Ok(rest[..len].to_string())
    }

    fn string(&mut self) -> anyhow::Result<String> {
        self.skip_ws();
        let rest = self.rest();
        let quote = match rest.chars().next() {
            Some(q @ ('"' | '\'' | '`')) => q,
            _ => bail!("expected a string literal ({})", self.context()),
        };
        let mut out = String::new();
        let mut chars = rest.char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, e)) => out.push(e),
                    None => break,
                },
                '$' if quote == '`' => {
                    bail!("template interpolation unsupported ({})", self.context())
                }
                c if c == quote => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                c => out.push(c),
            }
        }
        bail!("unterminated string literal ({})", self.context())
    }

    fn number(&mut self) -> anyhow::Result<i64> {
        self.skip_ws();
        let rest = self.rest();
        let len = rest
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
            .map_or(rest.len(), |(i, _)| i);
        let n = rest[..len].parse().with_context(|| format!("expected an integer ({})", self.context()))?;
        self.pos += len;
        Ok(n)
    }

    /// `{ key: value, ... }` where values are strings, integers or booleans.
    fn object(&mut self) -> anyhow::Result<BTreeMap<String, Literal>> {
        self.expect("{")?;
        let mut map = BTreeMap::new();
        while !self.eat("}") {
            let key = self.ident()?;
            self.expect(":")?;
            let value = self.literal()?;
            map.insert(key, value);
            if !self.eat(",") {
                self.expect("}")?;
                break;
            }
        }
        Ok(map)
    }

    fn literal(&mut self) -> anyhow::Result<Literal> {
        self.skip_ws();
        if self.peek("\"") || self.peek("'") || self.peek("`") {
            return Ok(Literal::Str(self.string()?));
        }
        if self.eat("true") {
            return Ok(Literal::Bool(true));
        }
        if self.eat("false") {
            return Ok(Literal::Bool(false));
        }
        if self.rest().starts_with(|c: char| c.is_ascii_digit() || c == '-') {
            return Ok(Literal::Int(self.number()?));
        }
        bail!("unsupported literal ({})", self.context())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl Literal {
    fn as_str(&self) -> anyhow::Result<&str> {
        match self {
            Literal::Str(s) => Ok(s),
            other => bail!("expected a string, got {other:?}"),
        }
    }
    fn as_int(&self) -> anyhow::Result<i64> {
        match self {
            Literal::Int(n) => Ok(*n),
            other => bail!("expected an integer, got {other:?}"),
        }
    }
    fn as_bool(&self) -> anyhow::Result<bool> {
        match self {
            Literal::Bool(b) => Ok(*b),
            other => bail!("expected a boolean, got {other:?}"),
        }
    }
}

fn parse_drizzle(md: &str) -> anyhow::Result<DrizzleSchema> {
    let mut schema = DrizzleSchema::default();
    // TS variable of an enum -> its SQL name.
    let mut enum_vars: BTreeMap<String, String> = BTreeMap::new();

    for block in typescript_blocks(md) {
        let mut search_from = 0;
        while let Some(offset) = block[search_from..].find("export const ") {
            let start = search_from + offset;
            let mut cur = Cursor::new(&block, start);
            cur.expect("export")?;
            cur.expect("const")?;
            let var = cur.ident()?;
            cur.expect("=")?;
            let callee = cur.ident()?;
            match callee.as_str() {
                "pgEnum" => {
                    let (name, labels) = parse_enum(&mut cur)?;
                    enum_vars.insert(var, name.clone());
                    schema.enums.push((name, labels));
                }
                "pgTable" => {
                    let table = parse_table(&mut cur, var, &enum_vars)?;
                    schema.tables.push(table);
                }
                other if other.starts_with("pg") => {
                    bail!("unsupported Drizzle construct `{other}` ({})", cur.context())
                }
                // Zod schemas, helpers, ...: no SQL.
                _ => {}
            }
            search_from = cur.pos.max(start + 1);
        }
    }

    // Resolve `.references(() => var.key)` now that every table is known.
    for table in &schema.tables {
        for column in &table.columns {
            if let Some(fk) = &column.references {
                let target = schema.tables.iter().find(|t| t.var == fk.target_var).with_context(|| {
                    format!("{}.{}: unknown table variable {}", table.name, column.name, fk.target_var)
                })?;
                target.columns.iter().find(|c| c.key == fk.target_key).with_context(|| {
                    format!("{}.{}: {} has no property {}", table.name, column.name, fk.target_var, fk.target_key)
                })?;
            }
        }
    }
    Ok(schema)
}

fn parse_enum(cur: &mut Cursor) -> anyhow::Result<(String, Vec<String>)> {
    cur.expect("(")?;
    let name = cur.string()?;
    cur.expect(",")?;
    cur.expect("[")?;
    let mut labels = Vec::new();
    while !cur.eat("]") {
        labels.push(cur.string()?);
        if !cur.eat(",") {
            cur.expect("]")?;
            break;
        }
    }
    cur.expect(")")?;
    Ok((name, labels))
}

fn parse_table(cur: &mut Cursor, var: String, enum_vars: &BTreeMap<String, String>) -> anyhow::Result<DrizzleTable> {
    cur.expect("(")?;
    let name = cur.string()?;
    cur.expect(",")?;
    cur.expect("{")?;
    let mut columns = Vec::new();
    while !cur.eat("}") {
        let key = cur.ident()?;
        cur.expect(":")?;
        columns.push(parse_column(cur, &name, key, enum_vars)?);
        if !cur.eat(",") {
            cur.expect("}")?;
            break;
        }
    }
    if cur.eat(",") && !cur.peek(")") {
        bail!(
            "table {name}: the extra-config argument (indexes, composite keys, ...) is not supported ({})",
            cur.context()
        );
    }
    cur.expect(")")?;
    Ok(DrizzleTable { var, name, columns })
}

fn parse_column(
    cur: &mut Cursor,
    table: &str,
    key: String,
    enum_vars: &BTreeMap<String, String>,
) -> anyhow::Result<DrizzleColumn> {
    let builder = cur.ident()?;
    cur.expect("(")?;
    // The SQL name is optional in recent Drizzle versions (defaults to the key).
    let name = if cur.peek(")") || cur.peek("{") {
        key.clone()
    } else {
        let name = cur.string()?;
        cur.eat(",");
        name
    };
    let options = if cur.peek("{") { cur.object()? } else { BTreeMap::new() };
    cur.eat(",");
    cur.expect(")")?;

    let allow = |allowed: &[&str]| -> anyhow::Result<()> {
        for k in options.keys() {
            if !allowed.contains(&k.as_str()) {
                bail!("{table}.{name}: unsupported option `{k}` of {builder}()");
            }
        }
        Ok(())
    };
    let ty = match builder.as_str() {
        "serial" => {
            allow(&[])?;
            ColType::Serial
        }
        "integer" => {
            allow(&["mode"])?;
            ColType::Integer
        }
        "varchar" => {
            allow(&["length"])?;
            let length = match options.get("length") {
                Some(l) => Some(u32::try_from(l.as_int()?)?),
                None => None,
            };
            ColType::Varchar(length)
        }
        "text" => {
            allow(&[])?;
            ColType::Text
        }
        "timestamp" => {
            allow(&["mode", "withTimezone", "precision"])?;
            let with_tz = match options.get("withTimezone") {
                Some(v) => v.as_bool()?,
                None => false,
            };
            let precision = match options.get("precision") {
                Some(p) => Some(u32::try_from(p.as_int()?)?),
                None => None,
            };
            ColType::Timestamp { with_tz, precision }
        }
        "boolean" => {
            allow(&[])?;
            ColType::Boolean
        }
        "jsonb" => {
            allow(&[])?;
            ColType::Jsonb
        }
        other => match enum_vars.get(other) {
            Some(sql_name) => {
                allow(&[])?;
                ColType::Enum(sql_name.clone())
            }
            None => bail!("{table}.{name}: unsupported column builder `{other}`"),
        },
    };

    let mut column = DrizzleColumn {
        key,
        name,
        ty,
        not_null: false,
        primary_key: false,
        unique: None,
        default: None,
        references: None,
    };

    while cur.eat(".") {
        let method = cur.ident()?;
        if cur.eat("<") {
            // `.$type<Foo>()`: a TypeScript-only generic, skip it.
            let mut depth = 1;
            while depth > 0 {
                let c =
                    cur.rest().chars().next().with_context(|| format!("unterminated generic ({})", cur.context()))?;
                cur.pos += c.len_utf8();
                match c {
                    '<' => depth += 1,
                    '>' => depth -= 1,
                    _ => {}
                }
            }
        }
        cur.expect("(")?;
        match method.as_str() {
            "notNull" => column.not_null = true,
            "primaryKey" => {
                column.primary_key = true;
                column.not_null = true;
            }
            "unique" => {
                let constraint = if cur.peek(")") { format!("{table}_{}_unique", column.name) } else { cur.string()? };
                column.unique = Some(constraint);
            }
            "defaultNow" => column.default = Some(ColDefault::Now),
            "default" => {
                column.default = Some(match cur.literal()? {
                    Literal::Bool(b) => ColDefault::Bool(b),
                    Literal::Int(n) => ColDefault::Int(n),
                    Literal::Str(s) => ColDefault::Str(s),
                })
            }
            "references" => {
                // () => users.id   or   (): AnyPgColumn => users.id
                cur.expect("(")?;
                cur.expect(")")?;
                if cur.eat(":") {
                    cur.ident()?;
                }
                cur.expect("=>")?;
                let target_var = cur.ident()?;
                cur.expect(".")?;
                let target_key = cur.ident()?;
                let mut fk = ForeignKey { target_var, target_key, on_update: None, on_delete: None };
                if cur.eat(",") && cur.peek("{") {
                    for (k, v) in cur.object()? {
                        match k.as_str() {
                            "onDelete" => fk.on_delete = Some(v.as_str()?.to_string()),
                            "onUpdate" => fk.on_update = Some(v.as_str()?.to_string()),
                            other => bail!("{table}.{}: unsupported reference option {other}", column.name),
                        }
                    }
                }
                column.references = Some(fk);
            }
            // Client-side only: no SQL.
            "$type" => {}
            other => bail!("{table}.{}: unsupported column method .{other}()", column.name),
        }
        cur.expect(")")?;
    }
    Ok(column)
}

// ---------------------------------------------------------------------------
// Catalog facts: one line per observable property of the `public` schema.
// The same formatting functions render the expected and the actual side.
// ---------------------------------------------------------------------------

type Facts = BTreeSet<String>;

/// Identifier as Postgres' `quote_ident` / `pg_get_*def` print it (the seed
/// only needs the "quote when not a plain lower-case word" rule plus the
/// reserved words below).
fn quote_ident(s: &str) -> String {
    const RESERVED: &str = "all analyse analyze and any array as asc between bigint bit boolean both case cast char character check coalesce collate column constraint create current_date current_time current_timestamp current_user dec decimal default deferrable desc distinct do else end except exists extract false fetch float for foreign from grant group having in initially inout int integer intersect interval into leading limit localtime localtimestamp national nchar none not null nullif numeric offset on only or order out overlay placing position precision primary real references returning row select session_user setof smallint some substring symmetric table then time timestamp to trailing treat trim true union unique user using values varchar variadic when where window with";
    let plain = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain && !RESERVED.split(' ').any(|w| w == s) {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

fn truncate_ident(s: String) -> String {
    if s.len() <= MAX_IDENT {
        return s;
    }
    let mut end = MAX_IDENT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn relation_fact(name: &str, kind: &str, persistence: &str, row_security: bool) -> String {
    format!("relation {name}: kind={kind} persistence={persistence} rowsecurity={row_security}")
}

fn column_order_fact(table: &str, columns: &[String]) -> String {
    format!("columns of {table} in order: {}", columns.join(", "))
}

#[allow(clippy::too_many_arguments)]
fn column_fact(
    table: &str,
    column: &str,
    format_type: &str,
    udt_name: &str,
    max_length: Option<i32>,
    nullable: bool,
    default: Option<&str>,
    identity: &str,
    generated: &str,
    collation: Option<&str>,
) -> String {
    let mut fact = format!(
        "column {table}.{column}: type={format_type} udt={udt_name} maxlen={} nullable={} default={} identity={identity} generated={generated}",
        opt(max_length),
        if nullable { "YES" } else { "NO" },
        opt(default),
    );
    if let Some(collation) = collation {
        fact.push_str(&format!(" collation={collation}"));
    }
    fact
}

fn enum_fact(name: &str, labels: &[String]) -> String {
    let labels: Vec<String> = labels.iter().map(|l| format!("'{l}'")).collect();
    format!("enum {name}: [{}]", labels.join(", "))
}

fn type_fact(name: &str, typtype: &str) -> String {
    format!("type {name}: typtype={typtype}")
}

fn constraint_fact(name: &str, table: &str, contype: &str, definition: &str) -> String {
    format!("constraint {name} on {table}: contype={contype} {definition}")
}

fn index_fact(name: &str, table: &str, definition: &str) -> String {
    format!("index {name} on {table}: {definition}")
}

#[allow(clippy::too_many_arguments)]
fn sequence_fact(
    name: &str,
    data_type: &str,
    start: i64,
    increment: i64,
    min: i64,
    max: i64,
    cache: i64,
    cycle: bool,
    owned_by: Option<&str>,
) -> String {
    format!(
        "sequence {name}: as {data_type} start={start} increment={increment} min={min} max={max} cache={cache} cycle={cycle} owned_by={}",
        opt(owned_by)
    )
}

fn column_sql_type(ty: &ColType) -> (String, String, Option<i32>) {
    // (format_type, udt_name, character_maximum_length)
    match ty {
        ColType::Serial | ColType::Integer => ("integer".into(), "int4".into(), None),
        ColType::Varchar(Some(n)) => (format!("character varying({n})"), "varchar".into(), Some(*n as i32)),
        ColType::Varchar(None) => ("character varying".into(), "varchar".into(), None),
        ColType::Text => ("text".into(), "text".into(), None),
        ColType::Timestamp { with_tz, precision } => {
            let p = precision.map_or(String::new(), |p| format!("({p})"));
            let zone = if *with_tz { "with" } else { "without" };
            let udt = if *with_tz { "timestamptz" } else { "timestamp" };
            (format!("timestamp{p} {zone} time zone"), udt.into(), None)
        }
        ColType::Boolean => ("boolean".into(), "bool".into(), None),
        ColType::Jsonb => ("jsonb".into(), "jsonb".into(), None),
        ColType::Enum(name) => (quote_ident(name), name.clone(), None),
    }
}

fn fk_action(action: &Option<String>) -> anyhow::Result<&'static str> {
    Ok(match action.as_deref() {
        None | Some("no action") => "",
        Some("cascade") => "CASCADE",
        Some("restrict") => "RESTRICT",
        Some("set null") => "SET NULL",
        Some("set default") => "SET DEFAULT",
        Some(other) => bail!("unsupported referential action {other:?}"),
    })
}

/// What drizzle-kit would create in `public` for the parsed schema.
fn expected_facts(schema: &DrizzleSchema) -> anyhow::Result<Facts> {
    let mut facts = Facts::new();
    for (name, labels) in &schema.enums {
        facts.insert(type_fact(name, "e"));
        facts.insert(enum_fact(name, labels));
    }
    for table in &schema.tables {
        let t = table.name.as_str();
        let qt = quote_ident(t);
        facts.insert(relation_fact(t, "r", "p", false));
        let names: Vec<String> = table.columns.iter().map(|c| c.name.clone()).collect();
        facts.insert(column_order_fact(t, &names));

        let pk: Vec<&DrizzleColumn> = table.columns.iter().filter(|c| c.primary_key).collect();
        if pk.len() > 1 {
            bail!("table {t}: several .primaryKey() columns");
        }
        for column in &table.columns {
            let c = column.name.as_str();
            let qc = quote_ident(c);
            let (format_type, udt, max_length) = column_sql_type(&column.ty);
            let default = match (&column.ty, &column.default) {
                (ColType::Serial, None) => {
                    let seq = format!("{t}_{c}_seq");
                    if seq.len() > MAX_IDENT {
                        bail!("{t}.{c}: serial sequence name too long to predict");
                    }
                    facts.insert(relation_fact(&seq, "S", "p", false));
                    facts.insert(sequence_fact(
                        &seq,
                        "integer",
                        1,
                        1,
                        1,
                        i32::MAX as i64,
                        1,
                        false,
                        Some(&format!("{t}.{c}")),
                    ));
                    Some(format!("nextval('{}'::regclass)", quote_ident(&seq)))
                }
                (ColType::Serial, Some(_)) => bail!("{t}.{c}: serial with a default"),
                (_, None) => None,
                (_, Some(ColDefault::Now)) => Some("now()".to_string()),
                (_, Some(ColDefault::Bool(b))) => Some(b.to_string()),
                (_, Some(ColDefault::Int(n))) => Some(n.to_string()),
                (ty, Some(ColDefault::Str(s))) => {
                    let cast = match ty {
                        ColType::Text => "text".to_string(),
                        ColType::Varchar(_) => "character varying".to_string(),
                        ColType::Enum(name) => quote_ident(name),
                        other => bail!("{t}.{c}: string default on {other:?} unsupported"),
                    };
                    Some(format!("'{}'::{cast}", s.replace('\'', "''")))
                }
            };
            let not_null = column.not_null || column.ty == ColType::Serial;
            facts.insert(column_fact(
                t,
                c,
                &format_type,
                &udt,
                max_length,
                !not_null,
                default.as_deref(),
                "NO",
                "NEVER",
                None,
            ));

            if column.primary_key {
                let name = truncate_ident(format!("{t}_pkey"));
                facts.insert(relation_fact(&name, "i", "p", false));
                facts.insert(constraint_fact(&name, t, "p", &format!("PRIMARY KEY ({qc})")));
                facts.insert(index_fact(
                    &name,
                    t,
                    &format!("CREATE UNIQUE INDEX {} ON public.{qt} USING btree ({qc})", quote_ident(&name)),
                ));
            }
            if let Some(unique) = &column.unique {
                let name = truncate_ident(unique.clone());
                facts.insert(relation_fact(&name, "i", "p", false));
                facts.insert(constraint_fact(&name, t, "u", &format!("UNIQUE ({qc})")));
                facts.insert(index_fact(
                    &name,
                    t,
                    &format!("CREATE UNIQUE INDEX {} ON public.{qt} USING btree ({qc})", quote_ident(&name)),
                ));
            }
            if let Some(fk) = &column.references {
                let target = schema.tables.iter().find(|x| x.var == fk.target_var).expect("resolved by the parser");
                let target_col =
                    target.columns.iter().find(|x| x.key == fk.target_key).expect("resolved by the parser");
                let name = truncate_ident(format!("{t}_{c}_{}_{}_fk", target.name, target_col.name));
                let mut def = format!(
                    "FOREIGN KEY ({qc}) REFERENCES {}({})",
                    quote_ident(&target.name),
                    quote_ident(&target_col.name)
                );
                let on_update = fk_action(&fk.on_update)?;
                if !on_update.is_empty() {
                    def.push_str(&format!(" ON UPDATE {on_update}"));
                }
                let on_delete = fk_action(&fk.on_delete)?;
                if !on_delete.is_empty() {
                    def.push_str(&format!(" ON DELETE {on_delete}"));
                }
                facts.insert(constraint_fact(&name, t, "f", &def));
            }
        }
    }
    Ok(facts)
}

/// Everything observable about `public` in the connected database. The
/// connection's search_path must be `public` so that names print unqualified
/// the way the expected side renders them.
async fn actual_facts(conn: &mut PgConnection) -> anyhow::Result<Facts> {
    let mut facts = Facts::new();

    // Every relation: tables, indexes, sequences, views, composite types, ...
    for row in sqlx::query(
        "SELECT c.relname::text, c.relkind::text, c.relpersistence::text, c.relrowsecurity
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public'",
    )
    .fetch_all(&mut *conn)
    .await
    .context("reading relations")?
    {
        facts.insert(relation_fact(
            &row.try_get::<String, _>(0)?,
            &row.try_get::<String, _>(1)?,
            &row.try_get::<String, _>(2)?,
            row.try_get(3)?,
        ));
    }

    // Columns (of tables, views, ...), in ordinal order.
    let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in sqlx::query(
        "SELECT c.table_name::text, c.column_name::text,
                format_type(a.atttypid, a.atttypmod), c.udt_name::text,
                c.character_maximum_length::int4, c.is_nullable::text,
                c.column_default::text, c.is_identity::text, c.is_generated::text,
                c.collation_name::text
         FROM information_schema.columns c
         JOIN pg_attribute a
           ON a.attrelid = format('%I.%I', c.table_schema, c.table_name)::regclass
          AND a.attname = c.column_name
         WHERE c.table_schema = 'public'
         ORDER BY c.table_name, c.ordinal_position",
    )
    .fetch_all(&mut *conn)
    .await
    .context("reading columns")?
    {
        let table: String = row.try_get(0)?;
        let column: String = row.try_get(1)?;
        let nullable: String = row.try_get(5)?;
        facts.insert(column_fact(
            &table,
            &column,
            &row.try_get::<String, _>(2)?,
            &row.try_get::<String, _>(3)?,
            row.try_get(4)?,
            nullable == "YES",
            row.try_get::<Option<String>, _>(6)?.as_deref(),
            &row.try_get::<String, _>(7)?,
            &row.try_get::<String, _>(8)?,
            row.try_get::<Option<String>, _>(9)?.as_deref(),
        ));
        order.entry(table).or_default().push(column);
    }
    for (table, columns) in &order {
        facts.insert(column_order_fact(table, columns));
    }

    // Enums and their labels in sort order.
    for row in sqlx::query(
        "SELECT t.typname::text, array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
         FROM pg_type t
         JOIN pg_namespace n ON n.oid = t.typnamespace
         JOIN pg_enum e ON e.enumtypid = t.oid
         WHERE n.nspname = 'public'
         GROUP BY t.typname",
    )
    .fetch_all(&mut *conn)
    .await
    .context("reading enums")?
    {
        let labels: Vec<String> = row.try_get(1)?;
        facts.insert(enum_fact(&row.try_get::<String, _>(0)?, &labels));
    }

    // Every type except the implicit row types of relations and array types.
    for row in sqlx::query(
        "SELECT t.typname::text, t.typtype::text
         FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE n.nspname = 'public'
           AND NOT EXISTS (SELECT 1 FROM pg_class c
                           WHERE c.oid = t.typrelid AND c.relkind <> 'c')
           AND NOT EXISTS (SELECT 1 FROM pg_type el WHERE el.typarray = t.oid)",
    )
    .fetch_all(&mut *conn)
    .await
    .context("reading types")?
    {
        facts.insert(type_fact(&row.try_get::<String, _>(0)?, &row.try_get::<String, _>(1)?));
    }

    // Constraints. NOT NULL constraints (contype 'n', Postgres 18+) are left
    // out: nullability is already compared column by column.
    for row in sqlx::query(
        "SELECT c.conname::text, coalesce(cl.relname::text, '-'), c.contype::text,
                pg_get_constraintdef(c.oid)
         FROM pg_constraint c
         JOIN pg_namespace n ON n.oid = c.connamespace
         LEFT JOIN pg_class cl ON cl.oid = c.conrelid
         WHERE n.nspname = 'public' AND c.contype <> 'n'",
    )
    .fetch_all(&mut *conn)
    .await
    .context("reading constraints")?
    {
        facts.insert(constraint_fact(
            &row.try_get::<String, _>(0)?,
            &row.try_get::<String, _>(1)?,
            &row.try_get::<String, _>(2)?,
            &row.try_get::<String, _>(3)?,
        ));
    }

    for row in sqlx::query(
        "SELECT indexname::text, tablename::text, indexdef
         FROM pg_indexes WHERE schemaname = 'public'",
    )
    .fetch_all(&mut *conn)
    .await
    .context("reading indexes")?
    {
        facts.insert(index_fact(
            &row.try_get::<String, _>(0)?,
            &row.try_get::<String, _>(1)?,
            &row.try_get::<String, _>(2)?,
        ));
    }

    // Sequences with their parameters and owning column.
    for row in sqlx::query(
        "SELECT c.relname::text, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement,
                s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
                (SELECT format('%s.%s', tc.relname, a.attname)
                 FROM pg_depend d
                 JOIN pg_class tc ON tc.oid = d.refobjid
                 JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                   AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                 LIMIT 1)
         FROM pg_sequence s
         JOIN pg_class c ON c.oid = s.seqrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public'",
    )
    .fetch_all(&mut *conn)
    .await
    .context("reading sequences")?
    {
        facts.insert(sequence_fact(
            &row.try_get::<String, _>(0)?,
            &row.try_get::<String, _>(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
            row.try_get(5)?,
            row.try_get(6)?,
            row.try_get(7)?,
            row.try_get::<Option<String>, _>(8)?.as_deref(),
        ));
    }

    // Things the seed never declares, so any of them is a difference.
    let extras: &[(&str, &str)] = &[
        (
            "function",
            "SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') prokind='
                    || p.prokind::text
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'public'",
        ),
        (
            "trigger",
            "SELECT t.tgname || ' on ' || c.relname
             FROM pg_trigger t
             JOIN pg_class c ON c.oid = t.tgrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND NOT t.tgisinternal",
        ),
        ("policy", "SELECT policyname || ' on ' || tablename FROM pg_policies WHERE schemaname = 'public'"),
        ("rule", "SELECT rulename || ' on ' || tablename FROM pg_rules WHERE schemaname = 'public'"),
        (
            "operator",
            "SELECT o.oid::regoperator::text
             FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace
             WHERE n.nspname = 'public'",
        ),
        (
            "collation",
            "SELECT c.collname::text
             FROM pg_collation c JOIN pg_namespace n ON n.oid = c.collnamespace
             WHERE n.nspname = 'public'",
        ),
    ];
    for (kind, sql) in extras {
        for row in sqlx::query(*sql).fetch_all(&mut *conn).await.with_context(|| format!("reading {kind}s"))? {
            facts.insert(format!("{kind} {}", row.try_get::<String, _>(0)?));
        }
    }

    Ok(facts)
}

/// `None` when equal, else a readable report of both sides of the difference.
fn compare(expected: &Facts, actual: &Facts) -> Option<String> {
    let missing: Vec<&String> = expected.difference(actual).collect();
    let unexpected: Vec<&String> = actual.difference(expected).collect();
    if missing.is_empty() && unexpected.is_empty() {
        return None;
    }
    let mut report =
        String::from("the `public` schema differs from the seed's Drizzle schema (tests/fixtures/seed_schema.md)\n");
    if !missing.is_empty() {
        report.push_str("\nexpected by the seed but MISSING from the database:\n");
        for fact in missing {
            report.push_str(&format!("  - {fact}\n"));
        }
    }
    if !unexpected.is_empty() {
        report.push_str("\npresent in the database but NOT in the seed:\n");
        for fact in unexpected {
            report.push_str(&format!("  + {fact}\n"));
        }
    }
    Some(report)
}

// ---------------------------------------------------------------------------
// Throw-away databases
// ---------------------------------------------------------------------------

fn admin_options() -> anyhow::Result<PgConnectOptions> {
    let url = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string());
    PgConnectOptions::from_str(&url).with_context(|| "parsing TEST_DATABASE_URL / default admin URL")
}

struct TestDb {
    admin: PgConnectOptions,
    name: String,
}

impl TestDb {
    async fn create() -> anyhow::Result<Self> {
        let admin = admin_options()?;
        let name = format!("m8_schema_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect_with(&admin)
            .await
            .context("connecting to the admin database (set TEST_DATABASE_URL?)")?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        conn.close().await.ok();
        Ok(Self { admin, name })
    }

    fn options(&self) -> PgConnectOptions {
        self.admin.clone().database(&self.name)
    }

    /// A connection whose search_path is `public`, for reading the catalog.
    async fn catalog_connection(&self) -> anyhow::Result<PgConnection> {
        let opts = self.options().options([("search_path", "public")]);
        Ok(PgConnection::connect_with(&opts).await?)
    }

    /// Apply `migrations/` as the application does: on a connection whose
    /// search_path is the worker's own schema.
    async fn migrate(&self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect_with(&self.options()).await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {WORKER_SCHEMA}; SET search_path TO {WORKER_SCHEMA}"
        )))
        .execute(&mut conn)
        .await?;
        sqlx::migrate!("./migrations").run(&mut conn).await.context("running migrations")?;
        conn.close().await.ok();
        Ok(())
    }

    async fn drop(self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect_with(&self.admin).await?;
        sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)))
            .execute(&mut conn)
            .await
            .with_context(|| format!("dropping database {}", self.name))?;
        conn.close().await.ok();
        Ok(())
    }
}

/// Create a database, run `body` against it, drop it whatever happened, then
/// hand back the body's result (assertions happen after the drop).
async fn with_migrated_db<T, F>(body: F) -> anyhow::Result<T>
where
    F: AsyncFnOnce(&TestDb) -> anyhow::Result<T>,
{
    let db = TestDb::create().await?;
    let outcome = match db.migrate().await {
        Ok(()) => body(&db).await,
        Err(e) => Err(e),
    };
    let dropped = db.drop().await;
    let value = outcome?;
    dropped?;
    Ok(value)
}

fn seed_facts() -> Facts {
    let schema = parse_drizzle(SEED).expect("parsing the seed's Drizzle code");
    expected_facts(&schema).expect("deriving the expected catalog from the seed")
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The parser really reads the seed (guards against a parser that silently
/// finds nothing and so "matches" an empty schema).
#[test]
fn seed_parser_reads_the_whole_drizzle_schema() {
    let schema = parse_drizzle(SEED).expect("parsing the seed");
    let tables: Vec<&str> = schema.tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        tables,
        ["users", "businesses", "hours_of_operation", "faqs", "calls", "bookings", "integrations", "subscriptions"]
    );
    let enums: Vec<&str> = schema.enums.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(enums, ["call_status", "booking_status", "subscription_plan"]);
    assert_eq!(schema.enums[0].1, ["completed", "in-progress", "missed", "transferred"]);
    let column_count: usize = schema.tables.iter().map(|t| t.columns.len()).sum();
    assert_eq!(column_count, 6 + 13 + 6 + 4 + 11 + 10 + 7 + 10);
    let fks = schema.tables.iter().flat_map(|t| &t.columns).filter(|c| c.references.is_some()).count();
    assert_eq!(fks, 7);

    let facts = seed_facts();
    for fact in [
        "column users.businessName: type=character varying(255) udt=varchar maxlen=255 nullable=YES default=- identity=NO generated=NEVER",
        "column users.created_at: type=timestamp without time zone udt=timestamp maxlen=- nullable=NO default=now() identity=NO generated=NEVER",
        "column hours_of_operation.is_open: type=boolean udt=bool maxlen=- nullable=NO default=true identity=NO generated=NEVER",
        "column calls.id: type=integer udt=int4 maxlen=- nullable=NO default=nextval('calls_id_seq'::regclass) identity=NO generated=NEVER",
        "constraint bookings_business_id_businesses_id_fk on bookings: contype=f FOREIGN KEY (business_id) REFERENCES businesses(id)",
        "constraint users_email_unique on users: contype=u UNIQUE (email)",
        "constraint users_pkey on users: contype=p PRIMARY KEY (id)",
    ] {
        assert!(facts.contains(fact), "expected fact missing: {fact}\n{facts:#?}");
    }
}

#[tokio::test]
async fn public_schema_matches_the_drizzle_seed() {
    let expected = seed_facts();
    let (actual, migrations_schemas) = with_migrated_db(async |db: &TestDb| {
        let mut conn = db.catalog_connection().await?;
        let actual = actual_facts(&mut conn).await?;
        let schemas: Vec<String> = sqlx::query_scalar(
            "SELECT n.nspname::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relname = '_sqlx_migrations'",
        )
        .fetch_all(&mut conn)
        .await?;
        conn.close().await.ok();
        Ok((actual, schemas))
    })
    .await
    .expect("migrating and reading a fresh database");

    assert!(
        !migrations_schemas.iter().any(|s| s == "public"),
        "_sqlx_migrations must not live in public (found in {migrations_schemas:?})"
    );
    assert!(!migrations_schemas.is_empty(), "the migrator recorded nothing: no _sqlx_migrations table anywhere");
    if let Some(report) = compare(&expected, &actual) {
        panic!("{report}");
    }
}

/// The comparator is not vacuous: an extra column in `public` is reported.
#[tokio::test]
async fn comparator_reports_an_extra_column() {
    let expected = seed_facts();
    let actual = with_migrated_db(async |db: &TestDb| {
        let mut conn = db.catalog_connection().await?;
        sqlx::raw_sql("ALTER TABLE public.calls ADD COLUMN extra int").execute(&mut conn).await?;
        let actual = actual_facts(&mut conn).await?;
        conn.close().await.ok();
        Ok(actual)
    })
    .await
    .expect("migrating and reading a fresh database");

    let report = compare(&expected, &actual).expect("an extra column must be reported");
    println!("{report}");
    assert!(report.contains("+ column calls.extra: type=integer"), "report does not name calls.extra:\n{report}");
}
