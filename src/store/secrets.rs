//! Per-business signing secrets, from `public.integrations`, cached briefly
//! (where each provider keeps its secret is declared in `providers::PROVIDERS`).
//!
//! A cached answer is trusted for `ttl`; a signature that fails against the
//! cache is checked again against a fresh read before it is refused, so a new
//! secret works the moment it is saved, and a removed or deactivated one stops
//! working within `ttl` (see docs/adr/0004-secret-cache.md).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tracing::warn;

use crate::config::Secret;
use crate::events::BusinessId;
use crate::providers::Provider;

/// What the database says about a business's integration of one kind.
#[derive(Debug, Clone)]
pub enum Lookup {
    UnknownBusiness,
    /// The business exists but has no active integration of that kind holding a
    /// usable secret (one that does not parse is logged and left out).
    NoActiveIntegration,
    /// Every active integration's secret (usually one; two during a hand-over).
    Secrets(Arc<[Secret]>),
}

type Key = (BusinessId, Provider);

pub struct SecretStore {
    pool: PgPool,
    ttl: Duration,
    /// Each answer with the instant its read began.
    cache: Mutex<HashMap<Key, (Instant, Lookup)>>,
    /// One database read at a time per key: a burst of requests (bad
    /// signatures included) waiting for a fresh answer shares one read.
    gates: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    reads: std::sync::atomic::AtomicU64,
}

impl SecretStore {
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        SecretStore { pool, ttl, cache: Mutex::default(), gates: Mutex::default(), reads: Default::default() }
    }

    /// Database reads so far (the cache's misses and re-checks).
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cached answer if it is younger than the TTL, else a fresh one.
    pub async fn get(&self, business: BusinessId, kind: Provider) -> Result<Lookup, sqlx::Error> {
        let cached = self.cache.lock().get(&(business, kind)).cloned();
        match cached {
            Some((at, lookup)) if at.elapsed() < self.ttl => Ok(lookup),
            _ => self.fresh(business, kind).await,
        }
    }

    /// An answer read from the database after this call began, so it sees every
    /// change committed before the request: either a read of its own, or one
    /// that another request started while this one waited its turn.
    pub async fn fresh(&self, business: BusinessId, kind: Provider) -> Result<Lookup, sqlx::Error> {
        let key = (business, kind);
        let asked = Instant::now();
        let gate = self.gates.lock().entry(key).or_default().clone();
        let _turn = gate.lock().await;
        if let Some((began, lookup)) = self.cache.lock().get(&key)
            && *began >= asked
        {
            return Ok(lookup.clone());
        }
        let began = Instant::now();
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let lookup = self.read(business, kind).await?;
        self.cache.lock().insert(key, (began, lookup.clone()));
        Ok(lookup)
    }

    async fn read(&self, business: BusinessId, kind: Provider) -> Result<Lookup, sqlx::Error> {
        let rows: Vec<(Option<i32>, Option<String>)> = sqlx::query_as(
            "SELECT i.id, i.config ->> $3
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
        let secrets: Vec<Secret> = rows
            .into_iter()
            .filter_map(|(integration, s)| Some((integration?, s?)))
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
        Ok(Lookup::Secrets(secrets.into()))
    }
}
