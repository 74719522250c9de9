//! Who sends us webhooks, declared once.
//!
//! [`PROVIDERS`] is the one list of senders: each with its name (in URLs,
//! metric labels, the event log and `replay --provider`), the event family its
//! events travel and are applied in, and where its per-business signing secret
//! lives in `public.integrations` (if it has one). Everything else derives
//! from it: the secret store's queries, the CLI's accepted values and help,
//! the dead-letter tools' and metrics' family list. A provider's endpoints are
//! declared next to their handlers in `ingress::ENDPOINTS`.

use serde::{Deserialize, Serialize};

use crate::verify::standard_webhooks;

/// A sender of webhooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Twilio,
    Stripe,
    N8n,
}

/// The queue family an event is carried on; each has its own queue, retry
/// queues, DLQ and consumer (a `workers::Family` implementation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Calls,
    Billing,
    Bookings,
}

/// Where a provider's per-business secret is stored: an active row of
/// `public.integrations` whose `type` is the provider's name holds it in
/// `config ->> field`.
#[derive(Debug)]
pub struct SecretField {
    pub field: &'static str,
    /// Whether a stored secret has a usable form (one that does not is logged and left out).
    pub check: fn(&str) -> Result<(), String>,
}

/// One provider's declaration.
#[derive(Debug)]
pub struct ProviderSpec {
    pub provider: Provider,
    pub name: &'static str,
    pub family: Family,
    /// `None` for a provider signing with one platform-wide secret from the settings (Stripe).
    pub secret: Option<SecretField>,
}

/// Every provider, in the order help texts list them.
pub const PROVIDERS: &[ProviderSpec] = &[
    ProviderSpec {
        provider: Provider::Twilio,
        name: "twilio",
        family: Family::Calls,
        // An auth token is opaque.
        secret: Some(SecretField { field: "auth_token", check: |_| Ok(()) }),
    },
    ProviderSpec { provider: Provider::Stripe, name: "stripe", family: Family::Billing, secret: None },
    ProviderSpec {
        provider: Provider::N8n,
        name: "n8n",
        family: Family::Bookings,
        // A Standard Webhooks `whsec_` secret.
        secret: Some(SecretField {
            field: "webhook_secret",
            check: |s| standard_webhooks::Secret::parse(s).map(|_| ()).map_err(|e| e.to_string()),
        }),
    },
];

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Twilio, Provider::Stripe, Provider::N8n];

    pub fn spec(self) -> &'static ProviderSpec {
        PROVIDERS.iter().find(|p| p.provider == self).expect("every provider is declared in PROVIDERS")
    }

    pub fn as_str(self) -> &'static str {
        self.spec().name
    }

    pub fn family(self) -> Family {
        self.spec().family
    }

    /// Where its per-business secret lives, if it has one.
    pub fn secret(self) -> Option<&'static SecretField> {
        self.spec().secret.as_ref()
    }

    /// Parses a provider's name (`replay --provider`).
    pub fn parse(s: &str) -> Result<Provider, String> {
        PROVIDERS
            .iter()
            .find(|p| p.name == s)
            .map(|p| p.provider)
            .ok_or_else(|| format!("{s:?} is not {}", one_of(PROVIDERS.iter().map(|p| p.name))))
    }
}

impl Family {
    pub const ALL: [Family; 3] = [Family::Calls, Family::Billing, Family::Bookings];

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Calls => "calls",
            Family::Billing => "billing",
            Family::Bookings => "bookings",
        }
    }

    /// Parses a family's name (`dlq --family`).
    pub fn parse(s: &str) -> Result<Family, String> {
        Family::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not {}", one_of(Family::ALL.iter().map(|f| f.as_str()))))
    }
}

/// The CLI's accepted values and help text come from the registry.
impl clap::ValueEnum for Provider {
    fn value_variants<'a>() -> &'a [Self] {
        &Provider::ALL
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

impl clap::ValueEnum for Family {
    fn value_variants<'a>() -> &'a [Self] {
        &Family::ALL
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// `a, b or c`.
fn one_of<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_provider_is_declared_once_and_parses_back() {
        for p in Provider::ALL {
            assert_eq!(PROVIDERS.iter().filter(|s| s.provider == p).count(), 1, "{p:?}");
            assert_eq!(Provider::parse(p.as_str()), Ok(p));
        }
        assert_eq!(PROVIDERS.len(), Provider::ALL.len());
        assert_eq!(Provider::parse("fax").unwrap_err(), "\"fax\" is not twilio, stripe or n8n");
        assert_eq!(Family::parse("fax").unwrap_err(), "\"fax\" is not calls, billing or bookings");
        assert_eq!(Family::parse("calls"), Ok(Family::Calls));
    }

    #[test]
    fn an_n8n_secret_must_be_a_standard_webhooks_secret() {
        let check = Provider::N8n.secret().unwrap().check;
        assert!(check("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(check("not-a-secret").is_err());
        assert!((Provider::Twilio.secret().unwrap().check)("anything").is_ok());
        assert!(Provider::Stripe.secret().is_none());
    }
}
