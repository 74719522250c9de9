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
//!
//! Warm-up ([`SecretStore::warm`]): an empty cache knows no business, so right after
//! a start every real business's first request would be budgeted, and with more
//! businesses than the budget's burst some are refused `503` (Twilio does not retry a
//! status callback, so its event is lost). So the ingress, before it accepts
//! requests and then every [`SecretStore::warm_every`] (half the time a business
//! stays known), reads in one query the answer of every business that exists, for
//! each provider with a per-business secret, the newest businesses first, as many as
//! the cache holds (`capacity` answers), and caches exactly what the per-key read
//! would have answered (secrets, or no active integration). It costs no budget
//! tokens and counts as one read. Ids that don't exist are never warmed: a made-up
//! id is still budgeted.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use moka::sync::Cache;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
    /// How long an existing business's answer is kept (it is re-read after `ttl`).
    known_for: Duration,
    /// The most answers a warm-up caches (the cache's capacity).
    capacity: u64,
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
            known_for,
            capacity: limits.capacity,
            reads: AtomicU64::new(0),
            over_budget: AtomicU64::new(0),
        }
    }

    /// Database reads so far (the cache's misses and re-checks, and one per warm-up).
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
        self.count_read();
        let lookup = self.read(key.0, key.1).await?;
        self.remember(key, Entry { read_at, lookup: lookup.clone() });
        Ok(lookup)
    }

    /// One database read of secrets, in `reads()` and its metric.
    fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::SECRET_READS).increment(1);
    }

    /// Caches an answer unless the cache holds one read later (a warm-up and a
    /// per-key read may overlap). Returns whether it was cached.
    fn remember(&self, key: Key, entry: Entry) -> bool {
        use moka::ops::compute::{CompResult, Op};
        let result = self.cache.entry(key).and_compute_with(|held| match held {
            Some(held) if held.value().read_at > entry.read_at => Op::Nop,
            _ => Op::Put(entry),
        });
        matches!(result, CompResult::Inserted(_) | CompResult::ReplacedWith(_))
    }

    /// How often the ingress warms the cache again ([`SecretStore::keep_warm`]): half the
    /// time an existing business's answer is kept, so a business quiet for that long is
    /// still known when it next calls and its request costs no budget.
    pub fn warm_every(&self) -> Duration {
        self.known_for / 2
    }

    /// Caches the answer of every business that exists, for each provider with a
    /// per-business secret, as [`SecretStore::get`] would have read it one key at a
    /// time: [`Lookup::Secrets`] or [`Lookup::NoActiveIntegration`] (never
    /// `UnknownBusiness`: ids that don't exist stay budgeted). One query, newest
    /// businesses (highest id) first, at most the cache's capacity in answers; it takes
    /// no budget token and counts as one read. Returns how many answers it cached (an
    /// answer read after the warm-up began is kept, not replaced).
    pub async fn warm(&self) -> Result<usize, sqlx::Error> {
        let kinds: Vec<(Provider, &'static str)> =
            Provider::ALL.into_iter().filter_map(|p| p.secret().map(|f| (p, f.field))).collect();
        if kinds.is_empty() {
            return Ok(0);
        }
        let businesses = i64::try_from(self.capacity / kinds.len() as u64).unwrap_or(i64::MAX);
        let read_at = Instant::now();
        self.count_read();
        // Per business and kind, the rows `read` gets: the active integrations of that
        // kind, newest first, or one row of NULLs when there is none.
        let rows: Vec<WarmRow> = sqlx::query_as(
            "WITH kinds (kind, field, n) AS (SELECT * FROM unnest($1::text[], $2::text[]) WITH ORDINALITY),
                  known AS (SELECT id FROM public.businesses ORDER BY id DESC LIMIT $3)
             SELECT b.id, k.n, i.id, i.config ->> k.field, i.config -> 'shared_keys'
               FROM known b
              CROSS JOIN kinds k
               LEFT JOIN public.integrations i
                 ON i.business_id = b.id AND i.type = k.kind AND i.status = 'active'
              ORDER BY b.id DESC, k.n, i.id DESC",
        )
        .bind(kinds.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>())
        .bind(kinds.iter().map(|(_, f)| *f).collect::<Vec<_>>())
        .bind(businesses)
        .fetch_all(&self.pool)
        .await?;
        let mut cached = 0;
        let mut rows = rows.into_iter().peekable();
        while let Some((business, n, integration, secret, keys)) = rows.next() {
            let mut group = vec![(integration, secret, keys)];
            while let Some((_, _, i, s, k)) = rows.next_if(|r| r.0 == business && r.1 == n) {
                group.push((i, s, k));
            }
            let Some(&(kind, _)) = usize::try_from(n - 1).ok().and_then(|n| kinds.get(n)) else { continue };
            let business = BusinessId(business);
            let lookup = answer(business, kind, group);
            if self.remember((business, kind), Entry { read_at, lookup }) {
                cached += 1;
            }
        }
        Ok(cached)
    }

    /// [`SecretStore::warm`], its outcome logged: how many answers and how long it
    /// took, or why it failed (never a secret). A failure leaves the per-request
    /// reads to do the work.
    pub async fn warm_logged(&self) {
        let started = Instant::now();
        match self.warm().await {
            Ok(answers) => info!(answers, took = ?started.elapsed(), "secret cache warmed"),
            Err(e) => warn!(
                error = %e,
                took = ?started.elapsed(),
                "could not warm the secret cache; first requests will read their secrets one by one"
            ),
        }
    }

    /// Warms the cache every [`SecretStore::warm_every`] until `shutdown`.
    pub async fn keep_warm(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.warm_every()) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.warm_logged() => {}
            }
        }
    }

    async fn read(&self, business: BusinessId, kind: Provider) -> Result<Lookup, sqlx::Error> {
        let rows: Vec<IntegrationRow> = sqlx::query_as(
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
        Ok(answer(business, kind, rows))
    }
}

/// An active integration of one kind as read: its id, its secret (`config ->> field`)
/// and `config -> 'shared_keys'`; all NULL for a business without one.
type IntegrationRow = (Option<i32>, Option<String>, Option<serde_json::Value>);

/// A warm-up's row: the business, the kind's position in the query's list of kinds
/// (from 1), then an [`IntegrationRow`].
type WarmRow = (i32, i64, Option<i32>, Option<String>, Option<serde_json::Value>);

/// The answer for one business and kind from its rows (newest integration first), as
/// both the per-key read and the warm-up get them: no row, the business does not
/// exist; no usable secret (empty, or refused by the provider's check, which is
/// logged), no active integration.
fn answer(business: BusinessId, kind: Provider, rows: Vec<IntegrationRow>) -> Lookup {
    if rows.is_empty() {
        return Lookup::UnknownBusiness;
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
        return Lookup::NoActiveIntegration;
    }
    Lookup::Secrets(Arc::new(Keys { secrets, shared }))
}
