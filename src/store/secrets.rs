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
