//! Settings, read once from the environment and validated at start.
//!
//! Every setting has a default that works against the local services and the
//! project's docker-compose.yml. A bad value stops the process with one line
//! that names the variable (`ConfigError`'s Display).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// A value that must never reach a log line or an answer.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A connection URL whose password must not be printed.
#[derive(Clone)]
pub struct ConnUrl(String);

impl ConnUrl {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with its password replaced, fit for logs and `micro8gents config`:
    /// the `user:password@` part and any query parameter named like a password
    /// (`?password=...`). A URL without `//` (`amqp:user:pass@host`) is not
    /// shown at all, since its parts cannot be told apart.
    pub fn redacted(&self) -> String {
        let Ok(mut u) = url::Url::parse(&self.0) else { return "[unparsable url]".to_string() };
        if u.cannot_be_a_base() {
            return format!("{}:[redacted]", u.scheme());
        }
        if u.password().is_some() {
            let _ = u.set_password(Some("redacted"));
        }
        let secret_params = u.query_pairs().any(|(k, _)| is_secret_param(&k));
        if secret_params {
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let v = if is_secret_param(&k) { "redacted".to_string() } else { v.into_owned() };
                    (k.into_owned(), v)
                })
                .collect();
            u.query_pairs_mut().clear().extend_pairs(pairs);
        }
        u.to_string()
    }
}

/// `password`, `sslpassword`, `passwd`, `secret`, `token`, ...: a query parameter that may hold a secret.
fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "secret", "token"].iter().any(|s| name.contains(s))
}

impl fmt::Debug for ConnUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: ConnUrl,
    pub amqp_url: ConnUrl,
    /// Extra CA certificates (PEM) that an `amqps://` broker's certificate may chain to.
    pub amqp_ca: Option<CaFile>,
    /// Prefix of every exchange and queue name; lets environments (and tests) share a broker.
    pub amqp_prefix: String,
    pub listen_addr: SocketAddr,
    /// Scheme, host and optional path prefix that Twilio calls; no trailing slash.
    pub public_base_url: String,
    pub stripe_webhook_secrets: Vec<Secret>,
    pub body_limit_bytes: usize,
    pub publish_timeout: Duration,
    /// The most accepted events the ingress publishes in one message (1: one event per message).
    pub publish_pack: usize,
    /// How long a message that would carry few events waits for more (0: never).
    pub publish_wait: Duration,
    pub secret_cache_ttl: Duration,
    /// The most (business, provider) answers the secret cache keeps.
    pub secret_cache_capacity: u64,
    /// Secret reads a second for ids not known to exist and re-checks after a mismatch.
    pub secret_fresh_reads_per_sec: std::num::NonZeroU32,
    /// A connection must finish a request's headers within this; also closes idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// A request's body must have arrived within this (408 otherwise).
    pub body_read_timeout: Duration,
    /// Requests handled at once; one more is answered 503 with Retry-After.
    pub max_requests_in_flight: usize,
    /// How long `/metrics` reuses the dead-letter depths, outbox and storage gauges it read (0: every scrape).
    pub metrics_gauge_refresh: Duration,
    pub db_max_connections: u32,
    pub db_acquire_timeout: Duration,
    pub db_statement_timeout: Duration,
    pub prefetch: u16,
    pub batch_size: usize,
    pub batch_wait: Duration,
    /// Lanes per event family in one `work` process: one consumer (one channel,
    /// prefetch times lanes) feeds them by entity, so that several batches are
    /// in Postgres at once (docs/adr/0009-lanes-and-cumulative-acks.md).
    pub worker_concurrency: usize,
    /// Delays between the tries of an event that cannot be applied yet; one try more than delays.
    pub retry_delays: Vec<Duration>,
    pub shutdown_grace: Duration,
    /// How long an accepted event's de-duplication key and logged envelope are kept.
    pub event_retention: Duration,
    /// How often a `run`/`work` process creates partitions ahead and prunes (at most an hour).
    pub event_prune_interval: Duration,
    pub log_json: bool,
    /// Where a `work` process serves `/metrics`, `/healthz` and `/readyz`; none if unset.
    pub metrics_addr: Option<SocketAddr>,
    /// Twilio's REST API base (`TWILIO_API_URL`), no trailing slash.
    pub twilio_api_url: String,
    /// Twilio's Intelligence API base (`TWILIO_INTELLIGENCE_URL`), no trailing slash.
    pub twilio_intelligence_url: String,
    /// Connect + answer time allowed per request to Twilio's API.
    pub twilio_api_timeout: Duration,
    /// Waits between the tries of a notice to a business's n8n; one try more than delays.
    pub notify_retry_delays: Vec<Duration>,
    /// Connect and total time allowed per notice try.
    pub notify_timeout: Duration,
    /// Lets notices go to loopback and private addresses (self-hosted n8n; tests).
    pub notify_allow_private_networks: bool,
}

/// A PEM file of CA certificates, read and checked at start.
#[derive(Clone)]
pub struct CaFile {
    pub path: String,
    pub pem: String,
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaFile({:?})", self.path)
    }
}

/// One bad setting, named.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/micro8gents";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// Reads settings from a map, so tests can check validation without touching the environment.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let env = Env(vars);
        let cfg = Config {
            database_url: ConnUrl::new(env.url("DATABASE_URL", DEFAULT_DATABASE_URL, &["postgres", "postgresql"])?),
            amqp_url: ConnUrl::new(env.url("AMQP_URL", DEFAULT_AMQP_URL, &["amqp", "amqps"])?),
            amqp_ca: env.ca_file("AMQP_CA_FILE")?,
            amqp_prefix: env.name("AMQP_PREFIX", "micro8gents")?,
            listen_addr: env.parsed("LISTEN_ADDR", "0.0.0.0:8080", "an address like 0.0.0.0:8080")?,
            public_base_url: env.base_url("PUBLIC_BASE_URL", "http://localhost:8080")?,
            stripe_webhook_secrets: env.secret_list("STRIPE_WEBHOOK_SECRET")?,
            body_limit_bytes: env.body_limit("BODY_LIMIT_BYTES", 1024 * 1024)?,
            publish_timeout: env.duration("PUBLISH_TIMEOUT", "5s")?,
            publish_pack: env.at_most("PUBLISH_PACK", 64, 1000)?,
            publish_wait: env.duration("PUBLISH_WAIT", "5ms")?,
            secret_cache_ttl: env.duration("SECRET_CACHE_TTL", "2s")?,
            secret_cache_capacity: env.positive("SECRET_CACHE_CAPACITY", 10_000)?,
            secret_fresh_reads_per_sec: env
                .positive::<u32>("SECRET_FRESH_READS_PER_SEC", 50)?
                .try_into()
                .map_err(|_| bad("SECRET_FRESH_READS_PER_SEC", "must be above zero".into()))?,
            header_read_timeout: env.positive_duration("HEADER_READ_TIMEOUT", "5s")?,
            body_read_timeout: env.positive_duration("BODY_READ_TIMEOUT", "10s")?,
            max_requests_in_flight: env.positive("MAX_REQUESTS_IN_FLIGHT", 512)?,
            metrics_gauge_refresh: env.duration("METRICS_GAUGE_REFRESH", "5s")?,
            db_max_connections: env.positive("DATABASE_MAX_CONNECTIONS", 16)?,
            db_acquire_timeout: env.duration("DATABASE_ACQUIRE_TIMEOUT", "5s")?,
            db_statement_timeout: env.duration("DATABASE_STATEMENT_TIMEOUT", "10s")?,
            prefetch: env.positive("PREFETCH", 200)?,
            batch_size: env.positive("BATCH_SIZE", 100)?,
            batch_wait: env.duration("BATCH_WAIT", "200ms")?,
            worker_concurrency: env.at_most("WORKER_CONCURRENCY", 4, 64)?,
            retry_delays: env.duration_list("RETRY_DELAYS", "5s,30s,2m,10m,1h")?,
            shutdown_grace: env.duration("SHUTDOWN_GRACE", "20s")?,
            event_retention: env.positive_duration("EVENT_RETENTION", "30d")?,
            event_prune_interval: env.duration_at_most("EVENT_PRUNE_INTERVAL", "1h", Duration::from_secs(3600))?,
            log_json: env.log_format("LOG_FORMAT")?,
            metrics_addr: env.optional("METRICS_ADDR", "an address like 0.0.0.0:9100")?,
            twilio_api_url: env.base_url("TWILIO_API_URL", "https://api.twilio.com")?,
            twilio_intelligence_url: env.base_url("TWILIO_INTELLIGENCE_URL", "https://intelligence.twilio.com")?,
            twilio_api_timeout: env.duration("TWILIO_API_TIMEOUT", "10s")?,
            notify_retry_delays: env.duration_list("NOTIFY_RETRY_DELAYS", "5s,30s,2m,10m,1h,6h")?,
            notify_timeout: env.duration("NOTIFY_TIMEOUT", "10s")?,
            notify_allow_private_networks: env.boolean("NOTIFY_ALLOW_PRIVATE_NETWORKS", false)?,
        };
        if cfg.publish_wait > Duration::from_millis(100) {
            let said = fmt_duration(cfg.publish_wait);
            return Err(bad("PUBLISH_WAIT", format!("{said} is longer than the limit of 100ms (it delays answers)")));
        }
        if cfg.notify_timeout.is_zero() {
            return Err(bad("NOTIFY_TIMEOUT", "must be above zero".into()));
        }
        Ok(cfg)
    }

    /// The effective settings, secrets redacted, one `NAME=value` per line.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let secrets = if self.stripe_webhook_secrets.is_empty() {
            "(unset)".to_string()
        } else {
            format!("[{} redacted]", self.stripe_webhook_secrets.len())
        };
        vec![
            ("DATABASE_URL", self.database_url.redacted()),
            ("AMQP_URL", self.amqp_url.redacted()),
            ("AMQP_CA_FILE", self.amqp_ca.as_ref().map_or_else(|| "(unset)".into(), |c| c.path.clone())),
            ("AMQP_PREFIX", self.amqp_prefix.clone()),
            ("LISTEN_ADDR", self.listen_addr.to_string()),
            ("PUBLIC_BASE_URL", self.public_base_url.clone()),
            ("STRIPE_WEBHOOK_SECRET", secrets),
            ("BODY_LIMIT_BYTES", self.body_limit_bytes.to_string()),
            ("PUBLISH_TIMEOUT", fmt_duration(self.publish_timeout)),
            ("PUBLISH_PACK", self.publish_pack.to_string()),
            ("PUBLISH_WAIT", fmt_duration(self.publish_wait)),
            ("SECRET_CACHE_TTL", fmt_duration(self.secret_cache_ttl)),
            ("SECRET_CACHE_CAPACITY", self.secret_cache_capacity.to_string()),
            ("SECRET_FRESH_READS_PER_SEC", self.secret_fresh_reads_per_sec.to_string()),
            ("HEADER_READ_TIMEOUT", fmt_duration(self.header_read_timeout)),
            ("BODY_READ_TIMEOUT", fmt_duration(self.body_read_timeout)),
            ("MAX_REQUESTS_IN_FLIGHT", self.max_requests_in_flight.to_string()),
            ("METRICS_GAUGE_REFRESH", fmt_duration(self.metrics_gauge_refresh)),
            ("DATABASE_MAX_CONNECTIONS", self.db_max_connections.to_string()),
            ("DATABASE_ACQUIRE_TIMEOUT", fmt_duration(self.db_acquire_timeout)),
            ("DATABASE_STATEMENT_TIMEOUT", fmt_duration(self.db_statement_timeout)),
            ("PREFETCH", self.prefetch.to_string()),
            ("BATCH_SIZE", self.batch_size.to_string()),
            ("BATCH_WAIT", fmt_duration(self.batch_wait)),
            ("WORKER_CONCURRENCY", self.worker_concurrency.to_string()),
            ("RETRY_DELAYS", self.retry_delays.iter().map(|d| fmt_duration(*d)).collect::<Vec<_>>().join(",")),
            ("SHUTDOWN_GRACE", fmt_duration(self.shutdown_grace)),
            ("EVENT_RETENTION", fmt_duration(self.event_retention)),
            ("EVENT_PRUNE_INTERVAL", fmt_duration(self.event_prune_interval)),
            ("LOG_FORMAT", if self.log_json { "json" } else { "text" }.to_string()),
            ("METRICS_ADDR", self.metrics_addr.map_or_else(|| "(unset)".into(), |a| a.to_string())),
            ("TWILIO_API_URL", self.twilio_api_url.clone()),
            ("TWILIO_INTELLIGENCE_URL", self.twilio_intelligence_url.clone()),
            ("TWILIO_API_TIMEOUT", fmt_duration(self.twilio_api_timeout)),
            (
                "NOTIFY_RETRY_DELAYS",
                self.notify_retry_delays.iter().map(|d| fmt_duration(*d)).collect::<Vec<_>>().join(","),
            ),
            ("NOTIFY_TIMEOUT", fmt_duration(self.notify_timeout)),
            ("NOTIFY_ALLOW_PRIVATE_NETWORKS", self.notify_allow_private_networks.to_string()),
        ]
    }
}

struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn parsed<T: FromStr>(&self, name: &'static str, default: &str, expected: &str) -> Result<T, ConfigError> {
        let raw = self.get(name).unwrap_or(default);
        raw.parse().map_err(|_| bad(name, format!("{raw:?} is not {expected}")))
    }

    fn optional<T: FromStr>(&self, name: &'static str, expected: &str) -> Result<Option<T>, ConfigError> {
        let Some(raw) = self.get(name) else { return Ok(None) };
        raw.parse().map(Some).map_err(|_| bad(name, format!("{raw:?} is not {expected}")))
    }

    fn positive<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr + Default + PartialOrd + fmt::Display,
    {
        let Some(raw) = self.get(name) else { return Ok(default) };
        match raw.parse::<T>() {
            Ok(v) if v > T::default() => Ok(v),
            _ => Err(bad(name, format!("{raw:?} is not a positive whole number"))),
        }
    }

    fn positive_duration(&self, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let d = self.duration(name, default)?;
        if d.is_zero() {
            return Err(bad(name, "must be longer than 0".to_string()));
        }
        Ok(d)
    }

    /// A positive duration no longer than `max`.
    fn duration_at_most(&self, name: &'static str, default: &str, max: Duration) -> Result<Duration, ConfigError> {
        let d = self.positive_duration(name, default)?;
        if d > max {
            return Err(bad(name, format!("{} is longer than the limit of {}", fmt_duration(d), fmt_duration(max))));
        }
        Ok(d)
    }

    /// A positive whole number no larger than `max`.
    fn at_most(&self, name: &'static str, default: usize, max: usize) -> Result<usize, ConfigError> {
        let n = self.positive(name, default)?;
        if n > max {
            return Err(bad(name, format!("{n} is above the limit of {max}")));
        }
        Ok(n)
    }

    fn url(&self, name: &'static str, default: &str, schemes: &[&str]) -> Result<String, ConfigError> {
        let raw = self.get(name).unwrap_or(default);
        // The value may hold a password: never echo it.
        let parsed = url::Url::parse(raw).map_err(|e| bad(name, format!("not a URL ({e})")))?;
        if !schemes.contains(&parsed.scheme()) {
            return Err(bad(name, format!("scheme must be one of {}", schemes.join(", "))));
        }
        if parsed.cannot_be_a_base() {
            return Err(bad(
                name,
                format!("must look like {}://user:password@host:port/... (value not shown)", parsed.scheme()),
            ));
        }
        Ok(raw.to_string())
    }

    fn ca_file(&self, name: &'static str) -> Result<Option<CaFile>, ConfigError> {
        let Some(path) = self.get(name) else { return Ok(None) };
        let pem = std::fs::read_to_string(path).map_err(|e| bad(name, format!("cannot read {path:?}: {e}")))?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(bad(name, format!("{path:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")));
        }
        Ok(Some(CaFile { path: path.to_string(), pem }))
    }

    fn base_url(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let raw = self.get(name).unwrap_or(default);
        let parsed = url::Url::parse(raw).map_err(|e| bad(name, format!("{raw:?} is not a URL ({e})")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(bad(name, format!("{raw:?} must be an http or https URL with a host")));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad(name, format!("{raw:?} must not have a query or fragment")));
        }
        Ok(raw.trim_end_matches('/').to_string())
    }

    fn name(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let raw = self.get(name).unwrap_or(default);
        let ok = raw.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok || raw.len() > 100 {
            return Err(bad(name, format!("{raw:?} may only hold letters, digits, '-', '_' and '.'")));
        }
        Ok(raw.to_string())
    }

    fn secret_list(&self, name: &'static str) -> Result<Vec<Secret>, ConfigError> {
        let Some(raw) = self.get(name) else { return Ok(Vec::new()) };
        let secrets: Vec<Secret> = raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(Secret::new).collect();
        if secrets.iter().any(|s| !s.expose().starts_with("whsec_")) {
            return Err(bad(name, "every secret must start with whsec_ (value not shown)".into()));
        }
        Ok(secrets)
    }

    fn body_limit(&self, name: &'static str, default: usize) -> Result<usize, ConfigError> {
        let limit = self.positive(name, default)?;
        if limit > 1024 * 1024 {
            return Err(bad(name, format!("{limit} is above the contract's 1 MiB (1048576) ceiling")));
        }
        Ok(limit)
    }

    fn duration(&self, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let raw = self.get(name).unwrap_or(default);
        parse_duration(raw).map_err(|p| bad(name, p))
    }

    fn duration_list(&self, name: &'static str, default: &str) -> Result<Vec<Duration>, ConfigError> {
        let raw = self.get(name).unwrap_or(default);
        let delays = raw.split(',').map(|d| parse_duration(d.trim())).collect::<Result<Vec<_>, _>>();
        let delays = delays.map_err(|p| bad(name, p))?;
        if delays.is_empty() || delays.iter().any(|d| d.is_zero()) {
            return Err(bad(name, "needs one or more delays above zero".into()));
        }
        Ok(delays)
    }

    fn boolean(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(_) => Err(bad(name, "is neither true nor false".into())),
        }
    }

    fn log_format(&self, name: &'static str) -> Result<bool, ConfigError> {
        match self.get(name).unwrap_or("text") {
            "json" => Ok(true),
            "text" => Ok(false),
            other => Err(bad(name, format!("{other:?} is neither \"text\" nor \"json\""))),
        }
    }
}

fn bad(name: &'static str, problem: String) -> ConfigError {
    ConfigError { name, problem }
}

/// Parses `250ms`, `5s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{raw:?} is not a duration like 250ms, 5s, 2m, 1h or 30d"))?;
    let seconds_per = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{raw:?} has an unknown unit (use ms, s, m, h or d)")),
    };
    n.checked_mul(seconds_per).map(Duration::from_secs).ok_or_else(|| format!("{raw:?} is too long a duration"))
}

pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        ms if ms % 86_400_000 == 0 && ms > 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 && ms > 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 && ms > 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_work_against_local_services() {
        let cfg = Config::from_vars(&HashMap::new()).unwrap();
        assert_eq!(cfg.listen_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(cfg.body_limit_bytes, 1024 * 1024);
        assert_eq!(cfg.retry_delays.len(), 5);
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (name, value) in [
            ("LISTEN_ADDR", "nope"),
            ("PUBLIC_BASE_URL", "ftp://x"),
            ("BODY_LIMIT_BYTES", "2000000"),
            ("PREFETCH", "0"),
            ("WORKER_CONCURRENCY", "0"),
            ("WORKER_CONCURRENCY", "65"),
            ("RETRY_DELAYS", "5s,soon"),
            ("AMQP_URL", "http://x"),
            ("LOG_FORMAT", "xml"),
            ("METRICS_ADDR", "9100"),
            ("HEADER_READ_TIMEOUT", "0s"),
            ("BODY_READ_TIMEOUT", "soon"),
            ("MAX_REQUESTS_IN_FLIGHT", "0"),
            ("SECRET_CACHE_CAPACITY", "-1"),
            ("SECRET_FRESH_READS_PER_SEC", "0"),
            ("METRICS_GAUGE_REFRESH", "5x"),
            ("NOTIFY_RETRY_DELAYS", "5s,,1h"),
            ("NOTIFY_TIMEOUT", "0s"),
            ("NOTIFY_TIMEOUT", "ten"),
            ("NOTIFY_ALLOW_PRIVATE_NETWORKS", "maybe"),
        ] {
            let err = Config::from_vars(&vars(&[(name, value)])).unwrap_err();
            assert_eq!(err.name, name);
            assert!(err.to_string().starts_with(&format!("invalid setting {name}:")), "{err}");
        }
    }

    #[test]
    fn worker_concurrency_defaults_to_four_consumers_per_family() {
        assert_eq!(Config::from_vars(&HashMap::new()).unwrap().worker_concurrency, 4);
        let cfg = Config::from_vars(&vars(&[("WORKER_CONCURRENCY", "1")])).unwrap();
        assert_eq!(cfg.worker_concurrency, 1);
        assert!(cfg.describe().contains(&("WORKER_CONCURRENCY", "1".to_string())));
    }

    #[test]
    fn secrets_never_print() {
        let cfg = Config::from_vars(&vars(&[
            ("STRIPE_WEBHOOK_SECRET", "whsec_aaa,whsec_bbb"),
            ("DATABASE_URL", "postgres://u:hunter2@db/x"),
        ]))
        .unwrap();
        let shown = format!("{cfg:?} {:?}", cfg.describe());
        assert!(!shown.contains("whsec_aaa") && !shown.contains("hunter2"), "{shown}");
        assert_eq!(cfg.stripe_webhook_secrets.len(), 2);
        let err = Config::from_vars(&vars(&[("STRIPE_WEBHOOK_SECRET", "sk_live_oops")])).unwrap_err();
        assert!(!err.to_string().contains("sk_live_oops"));
    }

    #[test]
    fn durations_round_trip() {
        for raw in ["250ms", "5s", "2m", "1h", "30d"] {
            assert_eq!(fmt_duration(parse_duration(raw).unwrap()), raw);
        }
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
    }

    #[test]
    fn retention_defaults_to_thirty_days_and_prunes_at_least_hourly() {
        let cfg = Config::from_vars(&vars(&[])).unwrap();
        assert_eq!(cfg.event_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(cfg.event_prune_interval, Duration::from_secs(3600));
        let err = Config::from_vars(&vars(&[("EVENT_RETENTION", "0d")])).unwrap_err();
        assert_eq!(err.to_string(), "invalid setting EVENT_RETENTION: must be longer than 0");
        let err = Config::from_vars(&vars(&[("EVENT_RETENTION", "a month")])).unwrap_err();
        assert!(err.to_string().starts_with("invalid setting EVENT_RETENTION: \"a month\" is not a duration"), "{err}");
        let err = Config::from_vars(&vars(&[("EVENT_PRUNE_INTERVAL", "2h")])).unwrap_err();
        assert_eq!(err.to_string(), "invalid setting EVENT_PRUNE_INTERVAL: 2h is longer than the limit of 1h");
    }

    #[test]
    fn packing_defaults_and_its_limits_are_named() {
        let cfg = Config::from_vars(&vars(&[])).unwrap();
        assert_eq!(
            (cfg.publish_pack, cfg.publish_wait, cfg.batch_wait),
            (64, Duration::from_millis(5), Duration::from_millis(200))
        );
        let cfg = Config::from_vars(&vars(&[("PUBLISH_PACK", "1"), ("PUBLISH_WAIT", "2ms")])).unwrap();
        assert_eq!((cfg.publish_pack, cfg.publish_wait), (1, Duration::from_millis(2)));
        let err = Config::from_vars(&vars(&[("PUBLISH_PACK", "5000")])).unwrap_err();
        assert_eq!(err.to_string(), "invalid setting PUBLISH_PACK: 5000 is above the limit of 1000");
        let err = Config::from_vars(&vars(&[("PUBLISH_PACK", "0")])).unwrap_err();
        assert!(err.to_string().starts_with("invalid setting PUBLISH_PACK"), "{err}");
        let err = Config::from_vars(&vars(&[("PUBLISH_WAIT", "1s")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting PUBLISH_WAIT: 1s is longer than the limit of 100ms (it delays answers)"
        );
    }

    #[test]
    fn durations_too_long_to_hold_are_refused_not_wrapped() {
        for raw in ["5124095576030432h", "307445734561825861m", "18446744073709551616s", "213503982334602d"] {
            assert!(parse_duration(raw).is_err(), "{raw}");
        }
        assert_eq!(parse_duration("18446744073709551615s").unwrap(), Duration::from_secs(u64::MAX));
    }
}
