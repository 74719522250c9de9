//! Per-business signing secrets, from `public.integrations`, cached briefly
//! (where each provider keeps its secret is declared in `providers::PROVIDERS`).
//!
//! A cached answer is trusted for `ttl`; a signature that fails against the
//! cache is checked again against a fresh read before it is refused, so a new
//! secret works the moment it is saved, and a removed or deactivated one stops
//! working within `ttl` (see docs/adr/0004-secret-cache.md).
//!
//! Anyone can name any business id, so what an id the database doesn't know may
//! cost is bounded (docs/adr/0012-hostile-input.md): the cache is a bounded `moka`
//! cache whose frequency-based admission keeps real businesses in when a flood of
//! one-off ids passes through; unknown ids are remembered (for `ttl`) like known
//! ones; and a read that is not the periodic refresh of a business known to exist
//! (an id never seen, or a re-check after a mismatch) needs a token from a shared
//! budget (`governor`), so a flood of random ids costs a bounded number of queries
//! per second and can't queue real lookups behind it on the pool.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use moka::sync::Cache;
use sqlx::PgPool;
use tracing::warn;

use crate::config::Secret;
use crate::events::BusinessId;
use crate::providers::Provider;
use crate::telemetry;

/// What the database says about a business's integration of one kind.
#[derive(Debug, Clone)]
pub enum Lookup {
    UnknownBusiness,
    /// The business exists but has no active integration of that kind holding a
    /// usable secret (one that does not parse is logged and left out).
    NoActiveIntegration,
    /// Every active integration's secret (usually one; two during a hand-over).
    Secrets(Arc<Keys>),
}

/// A business's keys for one provider: the secrets (Twilio's auth token, n8n's
/// `webhook_secret`), and Twilio's shared keys (`config.shared_keys`, for
/// SharedKey signing). Derefs to the secrets.
#[derive(Debug, Default)]
pub struct Keys {
    pub secrets: Vec<Secret>,
    /// `(id, secret)` of every well-formed entry of `config.shared_keys`.
    pub shared: Vec<(String, Secret)>,
}

impl Keys {
    pub fn tokens(&self) -> Vec<&str> {
        self.secrets.iter().map(Secret::expose).collect()
    }

    pub fn shared_keys(&self) -> Vec<crate::verify::twilio::SharedKey<'_>> {
        self.shared.iter().map(|(id, s)| crate::verify::twilio::SharedKey { id, secret: s.expose() }).collect()
    }
}

impl std::ops::Deref for Keys {
    type Target = [Secret];
    fn deref(&self) -> &[Secret] {
        &self.secrets
    }
}

/// `config.shared_keys`: `[{"id": "...", "secret": "..."}]`. An entry without both
/// is an operator's mistake, said (without the secret) and left out.
fn shared_keys(business: BusinessId, integration: i32, raw: Option<serde_json::Value>) -> Vec<(String, Secret)> {
    let Some(raw) = raw.filter(|v| !v.is_null()) else { return Vec::new() };
    let Some(entries) = raw.as_array() else {
        warn!(business = business.0, integration, "ignoring config.shared_keys: it is not a list");
        return Vec::new();
    };
    entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let field = |name: &str| e.get(name).and_then(|v| v.as_str()).filter(|v| !v.is_empty());
            match (field("id"), field("secret")) {
                (Some(id), Some(secret)) => Some((id.to_string(), Secret::new(secret))),
                _ => {
                    warn!(
                        business = business.0,
                        integration,
                        entry = i,
                        "ignoring a config.shared_keys entry without both an id and a secret"
                    );
                    None
                }
            }
        })
        .collect()
}

type Key = (BusinessId, Provider);

/// How much memory and how many database reads the secret cache may spend.
#[derive(Debug, Clone, Copy)]
pub struct SecretCacheLimits {
    /// How long an answer is trusted (`SECRET_CACHE_TTL`); also how long an unknown
    /// business is remembered as unknown, so a business created a moment ago works
    /// within this time.
    pub ttl: Duration,
    /// The most (business, kind) answers kept (`SECRET_CACHE_CAPACITY`).
    pub capacity: u64,
    /// Reads per second allowed for ids not known to exist and for re-checks after a
    /// mismatch (`SECRET_FRESH_READS_PER_SEC`); the refresh of a known business is free.
    pub fresh_reads_per_sec: NonZeroU32,
}

impl SecretCacheLimits {
    pub const DEFAULT_CAPACITY: u64 = 10_000;
    pub const DEFAULT_FRESH_READS_PER_SEC: NonZeroU32 = NonZeroU32::new(50).unwrap();

    pub fn with_ttl(ttl: Duration) -> Self {
        SecretCacheLimits {
            ttl,
            capacity: Self::DEFAULT_CAPACITY,
            fresh_reads_per_sec: Self::DEFAULT_FRESH_READS_PER_SEC,
        }
    }
}

/// Why no answer could be had.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("the database read failed: {0}")]
    Database(#[from] sqlx::Error),
    /// The budget of fresh reads is spent for now (a flood of unknown ids or of bad signatures).
    #[error("too many secret look-ups right now")]
    OverBudget,
}

/// One cached answer, with the instant its read began.
#[derive(Clone)]
struct Entry {
    read_at: Instant,
    lookup: Lookup,
}

impl Entry {
    /// The business exists, so refreshing its answer costs no budget.
    fn known(&self) -> bool {
        !matches!(self.lookup, Lookup::UnknownBusiness)
    }
}

/// Unknown ids are forgotten after the TTL; the answers of existing businesses are kept
/// longer (still re-read after the TTL) so that their refresh stays out of the budget.
struct Expiry {
    ttl: Duration,
    known_for: Duration,
}

impl moka::Expiry<Key, Entry> for Expiry {
    fn expire_after_create(&self, _: &Key, entry: &Entry, _: Instant) -> Option<Duration> {
        Some(if entry.known() { self.known_for } else { self.ttl })
    }

    fn expire_after_update(&self, key: &Key, entry: &Entry, at: Instant, _: Option<Duration>) -> Option<Duration> {
        self.expire_after_create(key, entry, at)
    }
}

/// A business not asked about for this long must earn its next read from the budget again.
const KNOWN_FOR: Duration = Duration::from_secs(3600);

pub struct SecretStore {
    pool: PgPool,
    ttl: Duration,
    cache: Cache<Key, Entry>,
    /// One database read at a time per key: a burst of requests (bad
    /// signatures included) waiting for a fresh answer shares one read. Bounded
    /// too; a gate evicted while held costs at most one extra read.
    gates: Cache<Key, Arc<tokio::sync::Mutex<()>>>,
    budget: DefaultDirectRateLimiter,
    reads: AtomicU64,
    over_budget: AtomicU64,
}

impl SecretStore {
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        Self::with_limits(pool, SecretCacheLimits::with_ttl(ttl))
    }

    pub fn with_limits(pool: PgPool, limits: SecretCacheLimits) -> Self {
        let known_for = KNOWN_FOR.max(limits.ttl);
        let cache =
            Cache::builder().max_capacity(limits.capacity).expire_after(Expiry { ttl: limits.ttl, known_for }).build();
        let gates = Cache::builder().max_capacity(limits.capacity).time_to_idle(Duration::from_secs(60)).build();
        let per_sec = limits.fresh_reads_per_sec;
        SecretStore {
            pool,
            ttl: limits.ttl,
            cache,
            gates,
            budget: RateLimiter::direct(Quota::per_second(per_sec).allow_burst(per_sec)),
            reads: AtomicU64::new(0),
            over_budget: AtomicU64::new(0),
        }
    }

    /// Database reads so far (the cache's misses and re-checks).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Reads refused so far because the budget was spent.
    pub fn reads_over_budget(&self) -> u64 {
        self.over_budget.load(Ordering::Relaxed)
    }

    /// Answers held now (after the cache's pending evictions are applied).
    pub fn cached_answers(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// The cached answer if it is younger than the TTL, else a fresh one (from the
    /// budget unless the business is known to exist).
    pub async fn get(&self, business: BusinessId, kind: Provider) -> Result<Lookup, LookupError> {
        let key = (business, kind);
        let cached = self.cache.get(&key);
        if let Some(entry) = &cached
            && entry.read_at.elapsed() < self.ttl
        {
            return Ok(entry.lookup.clone());
        }
        let budgeted = !cached.is_some_and(|e| e.known());
        self.read_once(key, budgeted, |entry| entry.read_at.elapsed() < self.ttl).await
    }

    /// An answer read from the database after this call began, so it sees every
    /// change committed before the request: either a read of its own, or one
    /// that another request started while this one waited its turn. A read of its
    /// own needs a token from the budget.
    pub async fn fresh(&self, business: BusinessId, kind: Provider) -> Result<Lookup, LookupError> {
        let asked = Instant::now();
        self.read_once((business, kind), true, |entry| entry.read_at >= asked).await
    }

    /// Waits for the key's turn, then takes an answer that `good_enough` accepts if
    /// another read left one meanwhile, else reads.
    async fn read_once(
        &self,
        key: Key,
        budgeted: bool,
        good_enough: impl Fn(&Entry) -> bool,
    ) -> Result<Lookup, LookupError> {
        let gate = self.gates.get_with(key, Default::default);
        let _turn = gate.lock().await;
        if let Some(entry) = self.cache.get(&key).filter(&good_enough) {
            return Ok(entry.lookup);
        }
        if budgeted && self.budget.check().is_err() {
            self.over_budget.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::SECRET_READS_OVER_BUDGET).increment(1);
            return Err(LookupError::OverBudget);
        }
        let read_at = Instant::now();
        self.reads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::SECRET_READS).increment(1);
        let lookup = self.read(key.0, key.1).await?;
        self.cache.insert(key, Entry { read_at, lookup: lookup.clone() });
        Ok(lookup)
    }

    async fn read(&self, business: BusinessId, kind: Provider) -> Result<Lookup, sqlx::Error> {
        let rows: Vec<(Option<i32>, Option<String>, Option<serde_json::Value>)> = sqlx::query_as(
            "SELECT i.id, i.config ->> $3, i.config -> 'shared_keys'
               FROM public.businesses b
               LEFT JOIN public.integrations i
                 ON i.business_id = b.id AND i.type = $2 AND i.status = 'active'
              WHERE b.id = $1
              ORDER BY i.id DESC",
        )
        .bind(business.0)
        .bind(kind.as_str())
        .bind(kind.secret().map(|f| f.field))
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(Lookup::UnknownBusiness);
        }
        let mut shared = Vec::new();
        let secrets: Vec<Secret> = rows
            .into_iter()
            .filter_map(|(integration, s, keys)| {
                let integration = integration?;
                shared.extend(shared_keys(business, integration, keys));
                Some((integration, s?))
            })
            .filter(|(_, s)| !s.is_empty())
            .filter(|(integration, s)| match kind.secret().map_or(Ok(()), |f| (f.check)(s)) {
                Ok(()) => true,
                Err(problem) => {
                    // An operator's mistake: said once per read (not per request), never with the secret.
                    warn!(
                        business = business.0,
                        integration,
                        kind = kind.as_str(),
                        problem,
                        "ignoring an active integration whose secret cannot be used"
                    );
                    false
                }
            })
            .map(|(_, s)| Secret::new(s))
            .collect();
        if secrets.is_empty() {
            return Ok(Lookup::NoActiveIntegration);
        }
        Ok(Lookup::Secrets(Arc::new(Keys { secrets, shared })))
    }
}
