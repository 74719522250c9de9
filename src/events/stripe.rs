//! Stripe billing events, normalised at the ingress from the (already verified)
//! JSON body, so that the worker never reads Stripe's raw JSON.
//!
//! Only the event types the billing worker applies are read strictly (a missing
//! or ill-typed field is a 422 that names it). Any other type is carried as
//! [`OtherObject`] and recorded by the worker without effect, so that a new
//! event type selected in Stripe's dashboard never turns into failed deliveries.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::FieldError;

/// The first API version whose subscriptions carry their billing period on the
/// items instead of on the subscription (PROTOCOLS.md §4.3).
pub const BASIL: &str = "2025-03-31";

/// The subscription event types the worker applies.
pub const SUBSCRIPTION_TYPES: [&str; 5] = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
];
pub const CHECKOUT_COMPLETED: &str = "checkout.session.completed";
pub const INVOICE_PAID: &str = "invoice.paid";
pub const INVOICE_PAYMENT_FAILED: &str = "invoice.payment_failed";

/// The seed's `subscription_plan` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    Free,
    Basic,
    Premium,
    Enterprise,
}

impl Plan {
    /// A name that is exactly one of the plans (ignoring case and surrounding spaces).
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw.trim().to_ascii_lowercase().as_str() {
            "free" => Plan::Free,
            "basic" => Plan::Basic,
            "premium" => Plan::Premium,
            "enterprise" => Plan::Enterprise,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Basic => "basic",
            Plan::Premium => "premium",
            Plan::Enterprise => "enterprise",
        }
    }
}

/// One Stripe event: what every event carries, and its object, normalised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StripeEvent<T> {
    /// `evt_...`; the de-duplication key is `stripe:{id}`.
    pub id: String,
    /// Stripe's `type`, e.g. `customer.subscription.updated`.
    pub event_type: String,
    /// When Stripe created the event: the order of events for one subscription.
    pub created: DateTime<Utc>,
    pub api_version: Option<String>,
    pub object: T,
}

pub type SubscriptionEvent = StripeEvent<Subscription>;
pub type CheckoutSessionEvent = StripeEvent<CheckoutSession>;
pub type InvoiceEvent = StripeEvent<Invoice>;
pub type OtherEvent = StripeEvent<OtherObject>;

/// What the worker needs of a subscription, whatever the event's API version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub customer: String,
    /// Stripe's own status value (`active`, `past_due`, ...).
    pub status: String,
    /// `metadata.user_id`, when the platform put it there.
    pub user_id: Option<i32>,
    /// When the subscription itself was created: which of a user's subscriptions is the newer.
    pub created: Option<DateTime<Utc>>,
    pub current_period_start: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub plan: PlanSource,
}

/// The plan a subscription's price names, or what it names instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PlanSource {
    Named {
        plan: Plan,
    },
    /// No price names a plan; kept so the worker can say which price and what it says.
    Unnamed {
        price: Option<String>,
        name: Option<String>,
    },
}

impl PlanSource {
    pub fn plan(&self) -> Option<Plan> {
        match self {
            PlanSource::Named { plan } => Some(*plan),
            PlanSource::Unnamed { .. } => None,
        }
    }

    /// `price price_... names no plan: lookup_key/metadata.plan "gold"`, for a parked event.
    pub fn describe_unnamed(&self) -> Option<String> {
        let PlanSource::Unnamed { price, name } = self else { return None };
        let price = price.as_deref().unwrap_or("(none)");
        let what = match name {
            Some(name) => format!("{name:?} is not one of free, basic, premium, enterprise"),
            None => "it has neither a lookup_key nor a metadata.plan".to_string(),
        };
        Some(format!("price {price} names no plan: {what}"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    /// The platform puts the user's id here when it opens the session.
    pub client_reference_id: Option<String>,
    pub customer: Option<String>,
    pub subscription: Option<String>,
    pub mode: Option<String>,
}

/// Which way an invoice event moves its subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payment {
    Paid,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invoice {
    pub id: String,
    pub payment: Payment,
    pub customer: Option<String>,
    /// `subscription` before basil, `parent.subscription_details.subscription` since.
    pub subscription: Option<String>,
}

/// An event type the worker does not apply: only what a log line needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtherObject {
    pub object: Option<String>,
    pub id: Option<String>,
}

/// An event's object, normalised by its type.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Subscription(SubscriptionEvent),
    CheckoutSession(CheckoutSessionEvent),
    Invoice(InvoiceEvent),
    Other(OtherEvent),
}

impl Parsed {
    pub fn id(&self) -> &str {
        match self {
            Parsed::Subscription(e) => &e.id,
            Parsed::CheckoutSession(e) => &e.id,
            Parsed::Invoice(e) => &e.id,
            Parsed::Other(e) => &e.id,
        }
    }
}

/// The de-duplication key of an event: Stripe retries an event with the same id.
pub fn event_key(id: &str) -> String {
    format!("stripe:{id}")
}

/// Reads a verified event body (already JSON). Errors name the field by its path.
pub fn parse(body: &Value) -> Result<Parsed, FieldError> {
    let head = Head {
        id: required_text(body, "id", 255)?.to_string(),
        event_type: required_text(body, "type", 255)?.to_string(),
        created: required_time(body, "created")?,
        api_version: text(body, "api_version", 64)?.map(str::to_string),
    };
    let Some(object) = get(body, "data.object").filter(|o| o.is_object()) else {
        return Err(FieldError::new("data.object", "is required and must be an object"));
    };
    let obj = Obj { value: object, prefix: "data.object" };
    let t = head.event_type.as_str();
    Ok(if SUBSCRIPTION_TYPES.contains(&t) {
        let object = subscription(&obj, head.api_version.as_deref())?;
        Parsed::Subscription(head.with(object))
    } else if t == CHECKOUT_COMPLETED {
        Parsed::CheckoutSession(head.with(checkout_session(&obj)?))
    } else if t == INVOICE_PAID || t == INVOICE_PAYMENT_FAILED {
        let payment = if t == INVOICE_PAID { Payment::Paid } else { Payment::Failed };
        Parsed::Invoice(head.with(invoice(&obj, payment)?))
    } else {
        let other = OtherObject {
            object: object.get("object").and_then(Value::as_str).map(str::to_string),
            id: object.get("id").and_then(Value::as_str).map(str::to_string),
        };
        Parsed::Other(head.with(other))
    })
}

/// What every event carries, read before its object.
struct Head {
    id: String,
    event_type: String,
    created: DateTime<Utc>,
    api_version: Option<String>,
}

impl Head {
    fn with<T>(self, object: T) -> StripeEvent<T> {
        StripeEvent {
            id: self.id,
            event_type: self.event_type,
            created: self.created,
            api_version: self.api_version,
            object,
        }
    }
}

/// The two columns that hold Stripe ids are `varchar(100)`.
const STRIPE_ID_MAX: usize = 100;

fn subscription(o: &Obj, api_version: Option<&str>) -> Result<Subscription, FieldError> {
    o.expect_object("subscription")?;
    let status = o.required_text("status", 20)?.to_string();
    let user_id = o
        .text("metadata.user_id", 32)?
        .map(|raw| {
            raw.trim()
                .parse::<i32>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| o.error("metadata.user_id", "must be a user id"))
        })
        .transpose()?;
    let (current_period_start, current_period_end) = period(o, api_version)?;
    Ok(Subscription {
        id: o.required_text("id", STRIPE_ID_MAX)?.to_string(),
        customer: o.required_id("customer")?,
        status,
        user_id,
        created: o.time("created")?,
        current_period_start,
        current_period_end,
        plan: plan_source(o)?,
    })
}

/// A billing period's start and end, as far as known.
type Period = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Before basil the period is on the subscription; since basil it is on each item,
/// and the subscription's period runs from the earliest item start to the latest
/// item end. Where the version's place holds nothing (or the version is unknown),
/// the other place is read, so a payload is never misread for lack of a version.
fn period(o: &Obj, api_version: Option<&str>) -> Result<Period, FieldError> {
    let on_subscription = (o.time("current_period_start")?, o.time("current_period_end")?);
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    for (i, _) in o.items().iter().enumerate() {
        starts.extend(o.time(&format!("items.data[{i}].current_period_start"))?);
        ends.extend(o.time(&format!("items.data[{i}].current_period_end"))?);
    }
    let on_items = (starts.into_iter().min(), ends.into_iter().max());
    let basil = api_version.is_some_and(|v| v.get(..BASIL.len()).is_some_and(|date| date >= BASIL));
    let (first, second) = if basil { (on_items, on_subscription) } else { (on_subscription, on_items) };
    Ok(if first.0.is_some() || first.1.is_some() { first } else { second })
}

/// The first item whose price names a plan by its `lookup_key`, else by its
/// `metadata.plan`; if none does, the first item's price and what it says.
fn plan_source(o: &Obj) -> Result<PlanSource, FieldError> {
    let mut unnamed = PlanSource::Unnamed { price: None, name: None };
    for i in 0..o.items().len() {
        let price = format!("items.data[{i}].price");
        let lookup_key = o.text(&format!("{price}.lookup_key"), 255)?;
        let meta_plan = o.text(&format!("{price}.metadata.plan"), 255)?;
        if let Some(plan) = lookup_key.and_then(Plan::parse).or_else(|| meta_plan.and_then(Plan::parse)) {
            return Ok(PlanSource::Named { plan });
        }
        if i == 0 {
            let id = o.text(&format!("{price}.id"), 255)?.map(str::to_string);
            unnamed = PlanSource::Unnamed { price: id, name: lookup_key.or(meta_plan).map(str::to_string) };
        }
    }
    Ok(unnamed)
}

fn checkout_session(o: &Obj) -> Result<CheckoutSession, FieldError> {
    o.expect_object("checkout.session")?;
    Ok(CheckoutSession {
        id: o.required_text("id", 255)?.to_string(),
        client_reference_id: o.text("client_reference_id", 200)?.map(str::to_string),
        customer: o.id("customer")?,
        subscription: o.id("subscription")?,
        mode: o.text("mode", 32)?.map(str::to_string),
    })
}

fn invoice(o: &Obj, payment: Payment) -> Result<Invoice, FieldError> {
    o.expect_object("invoice")?;
    let subscription = match o.id("subscription")? {
        Some(s) => Some(s),
        None => o.id("parent.subscription_details.subscription")?,
    };
    Ok(Invoice { id: o.required_text("id", 255)?.to_string(), payment, customer: o.id("customer")?, subscription })
}

// ---- reading fields by path ---------------------------------------------------------------

/// A value at a dotted path; `items.data[2]` indexes an array. JSON `null` reads as absent.
fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, step| match step.split_once('[') {
            Some((key, index)) => v.get(key)?.get(index.trim_end_matches(']').parse::<usize>().ok()?),
            None => v.get(step),
        })
        .filter(|v| !v.is_null())
}

fn text<'a>(v: &'a Value, path: &str, max_chars: usize) -> Result<Option<&'a str>, FieldError> {
    match get(v, path) {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= max_chars => Ok(Some(s)),
        Some(Value::String(_)) => Err(FieldError::new(path, format!("must be at most {max_chars} characters"))),
        Some(_) => Err(FieldError::new(path, "must be a string")),
    }
}

fn required_text<'a>(v: &'a Value, path: &str, max_chars: usize) -> Result<&'a str, FieldError> {
    text(v, path, max_chars)?.ok_or_else(|| FieldError::new(path, "is required"))
}

fn time(v: &Value, path: &str) -> Result<Option<DateTime<Utc>>, FieldError> {
    get(v, path)
        .map(|t| {
            t.as_i64()
                .and_then(|secs| DateTime::from_timestamp(secs, 0))
                .ok_or_else(|| FieldError::new(path, "must be a Unix time in seconds"))
        })
        .transpose()
}

fn required_time(v: &Value, path: &str) -> Result<DateTime<Utc>, FieldError> {
    time(v, path)?.ok_or_else(|| FieldError::new(path, "is required"))
}

/// `data.object`, with errors named by their full path.
struct Obj<'a> {
    value: &'a Value,
    prefix: &'static str,
}

impl Obj<'_> {
    fn path(&self, field: &str) -> String {
        format!("{}.{field}", self.prefix)
    }

    fn error(&self, field: &str, rule: &str) -> FieldError {
        FieldError::new(self.path(field), rule)
    }

    fn renamed(&self, e: FieldError, field: &str) -> FieldError {
        FieldError::new(self.path(field), e.rule)
    }

    fn text(&self, field: &str, max_chars: usize) -> Result<Option<&str>, FieldError> {
        text(self.value, field, max_chars).map_err(|e| self.renamed(e, field))
    }

    fn required_text(&self, field: &str, max_chars: usize) -> Result<&str, FieldError> {
        self.text(field, max_chars)?.ok_or_else(|| self.error(field, "is required"))
    }

    fn time(&self, field: &str) -> Result<Option<DateTime<Utc>>, FieldError> {
        time(self.value, field).map_err(|e| self.renamed(e, field))
    }

    /// A reference to another Stripe object: its id, or (if expanded) the object's `id`.
    fn id(&self, field: &str) -> Result<Option<String>, FieldError> {
        let expanded = get(self.value, field).is_some_and(Value::is_object);
        let field = if expanded { format!("{field}.id") } else { field.to_string() };
        Ok(self.text(&field, STRIPE_ID_MAX)?.map(str::to_string))
    }

    fn required_id(&self, field: &str) -> Result<String, FieldError> {
        self.id(field)?.ok_or_else(|| self.error(field, "is required"))
    }

    fn items(&self) -> &[Value] {
        get(self.value, "items.data").and_then(Value::as_array).map_or(&[], Vec::as_slice)
    }

    /// Stripe names every object's kind in `object`; one of another kind is refused.
    fn expect_object(&self, kind: &str) -> Result<(), FieldError> {
        match get(self.value, "object") {
            None => Ok(()),
            Some(v) if v.as_str() == Some(kind) => Ok(()),
            Some(_) => Err(self.error("object", &format!("must be \"{kind}\" for this event type"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// PROTOCOLS.md §3.3 S1: a basil `customer.subscription.updated`, period on the item.
    const S1_BODY: &str = r#"{"id":"evt_1SXa2bC3dE4fG5hI6jK7lM8n","object":"event","api_version":"2025-03-31.basil","created":1764071999,"data":{"object":{"id":"sub_1SWz9yA1bC2dE3fG4hI5jK6l","object":"subscription","billing_cycle_anchor":1762862400,"cancel_at":null,"cancel_at_period_end":false,"canceled_at":null,"collection_method":"charge_automatically","created":1762862400,"currency":"usd","customer":"cus_TQx1y2z3A4b5C6","ended_at":null,"items":{"object":"list","data":[{"id":"si_TQx7y8z9A0b1C2","object":"subscription_item","created":1762862401,"current_period_end":1766750400,"current_period_start":1764072000,"metadata":{},"price":{"id":"price_1SWz0aA1bC2dE3fG4hI5jK6l","object":"price","active":true,"currency":"usd","product":"prod_TQxAbCdEfGhIjK","recurring":{"interval":"month","interval_count":1,"usage_type":"licensed"},"type":"recurring","unit_amount":4900},"quantity":1,"subscription":"sub_1SWz9yA1bC2dE3fG4hI5jK6l"}],"has_more":false,"total_count":1,"url":"/v1/subscription_items?subscription=sub_1SWz9yA1bC2dE3fG4hI5jK6l"},"latest_invoice":"in_1SXa2aC3dE4fG5hI6jK7lM8n","livemode":false,"metadata":{"clinic_id":"42"},"pause_collection":null,"status":"active","trial_end":1764072000,"trial_start":1762862400},"previous_attributes":{"latest_invoice":"in_1SWz9zA1bC2dE3fG4hI5jK6l","status":"trialing"}},"livemode":false,"pending_webhooks":1,"request":{"id":null,"idempotency_key":null},"type":"customer.subscription.updated"}"#;

    /// PROTOCOLS.md §3.3 S2 (P2): a basil `invoice.payment_failed` without a subscription.
    const S2_BODY: &str = r#"{"id":"evt_1SXb3cD4eF5gH6iJ7kL8mN9o","object":"event","api_version":"2025-03-31.basil","created":1764075600,"data":{"object":{"id":"in_1SXb3bD4eF5gH6iJ7kL8mN9o","object":"invoice","attempt_count":1,"billing_reason":"subscription_cycle","customer":"cus_TQx1y2z3A4b5C6","status":"open"}},"livemode":false,"pending_webhooks":1,"request":{"id":null,"idempotency_key":null},"type":"invoice.payment_failed"}"#;

    fn at(secs: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(secs, 0)
    }

    fn parse_str(body: &str) -> Result<Parsed, FieldError> {
        parse(&serde_json::from_str(body).unwrap())
    }

    /// A pre-basil subscription: the period on the subscription, the plan on the price's lookup_key.
    fn acacia_subscription() -> Value {
        json!({
            "id": "evt_old", "object": "event", "api_version": "2024-06-20", "created": 1718900000,
            "type": "customer.subscription.created",
            "data": {"object": {
                "id": "sub_old", "object": "subscription", "customer": "cus_old", "status": "incomplete",
                "created": 1718899990, "current_period_start": 1718899990, "current_period_end": 1721491990,
                "metadata": {"user_id": "7"},
                "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item",
                    "price": {"id": "price_basic", "object": "price", "lookup_key": "basic", "metadata": {}}}]}
            }}
        })
    }

    #[test]
    fn s1_reads_the_period_from_the_items_since_basil() {
        let Parsed::Subscription(e) = parse_str(S1_BODY).unwrap() else { panic!("not a subscription") };
        assert_eq!(e.id, "evt_1SXa2bC3dE4fG5hI6jK7lM8n");
        assert_eq!(e.event_type, "customer.subscription.updated");
        assert_eq!(e.created, at(1764071999).unwrap());
        assert_eq!(e.api_version.as_deref(), Some("2025-03-31.basil"));
        let s = e.object;
        assert_eq!(
            (s.id.as_str(), s.customer.as_str(), s.status.as_str()),
            ("sub_1SWz9yA1bC2dE3fG4hI5jK6l", "cus_TQx1y2z3A4b5C6", "active")
        );
        assert_eq!(s.user_id, None, "clinic_id is not a user id");
        assert_eq!((s.current_period_start, s.current_period_end), (at(1764072000), at(1766750400)));
        assert_eq!(s.created, at(1762862400));
        // S1's price has neither a lookup_key nor a metadata.plan.
        let unnamed = PlanSource::Unnamed { price: Some("price_1SWz0aA1bC2dE3fG4hI5jK6l".into()), name: None };
        assert_eq!(s.plan, unnamed);
        assert_eq!(
            s.plan.describe_unnamed().unwrap(),
            "price price_1SWz0aA1bC2dE3fG4hI5jK6l names no plan: it has neither a lookup_key nor a metadata.plan"
        );
    }

    #[test]
    fn s2_is_an_invoice_without_a_subscription() {
        let Parsed::Invoice(e) = parse_str(S2_BODY).unwrap() else { panic!("not an invoice") };
        assert_eq!(e.object.payment, Payment::Failed);
        assert_eq!(e.object.customer.as_deref(), Some("cus_TQx1y2z3A4b5C6"));
        assert_eq!(e.object.subscription, None);
    }

    #[test]
    fn before_basil_the_period_is_on_the_subscription() {
        let Parsed::Subscription(e) = parse(&acacia_subscription()).unwrap() else { panic!() };
        let s = e.object;
        assert_eq!((s.current_period_start, s.current_period_end), (at(1718899990), at(1721491990)));
        assert_eq!(s.user_id, Some(7));
        assert_eq!(s.plan, PlanSource::Named { plan: Plan::Basic });
    }

    #[test]
    fn basil_takes_the_earliest_item_start_and_the_latest_item_end() {
        let mut body = acacia_subscription();
        body["api_version"] = json!("2025-03-31.basil");
        let object = body["data"]["object"].as_object_mut().unwrap();
        object.remove("current_period_start");
        object.remove("current_period_end");
        object["items"]["data"] = json!([
            {"current_period_start": 200, "current_period_end": 900, "price": {"id": "price_a", "lookup_key": "gold"}},
            {"current_period_start": 100, "current_period_end": 500, "price": {"id": "price_b", "metadata": {"plan": "Premium"}}},
        ]);
        let Parsed::Subscription(e) = parse(&body).unwrap() else { panic!() };
        assert_eq!((e.object.current_period_start, e.object.current_period_end), (at(100), at(900)));
        // The second item's metadata.plan names a plan even though the first item's price names none.
        assert_eq!(e.object.plan, PlanSource::Named { plan: Plan::Premium });
    }

    #[test]
    fn an_unknown_plan_name_is_kept_for_the_report() {
        let mut body = acacia_subscription();
        body["data"]["object"]["items"]["data"][0]["price"]["lookup_key"] = json!("gold_monthly");
        let Parsed::Subscription(e) = parse(&body).unwrap() else { panic!() };
        assert_eq!(e.object.plan.plan(), None);
        assert_eq!(
            e.object.plan.describe_unnamed().unwrap(),
            r#"price price_basic names no plan: "gold_monthly" is not one of free, basic, premium, enterprise"#
        );
        // lookup_key first, metadata.plan as the fallback.
        body["data"]["object"]["items"]["data"][0]["price"]["metadata"] = json!({"plan": "enterprise"});
        let Parsed::Subscription(e) = parse(&body).unwrap() else { panic!() };
        assert_eq!(e.object.plan.plan(), Some(Plan::Enterprise));
    }

    #[test]
    fn without_a_version_the_period_is_found_where_it_is() {
        let mut body = acacia_subscription();
        body.as_object_mut().unwrap().remove("api_version");
        let Parsed::Subscription(e) = parse(&body).unwrap() else { panic!() };
        assert_eq!(e.object.current_period_end, at(1721491990));
        assert_eq!(e.api_version, None);
    }

    #[test]
    fn invoices_find_their_subscription_before_and_since_basil() {
        let old = json!({"id": "evt_i1", "type": "invoice.paid", "created": 1, "api_version": "2024-06-20",
            "data": {"object": {"id": "in_1", "object": "invoice", "customer": "cus_1", "subscription": "sub_1"}}});
        let basil = json!({"id": "evt_i2", "type": "invoice.paid", "created": 1, "api_version": "2025-03-31.basil",
            "data": {"object": {"id": "in_2", "object": "invoice", "customer": {"id": "cus_1", "object": "customer"},
                "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1", "metadata": {}}}}}});
        for body in [old, basil] {
            let Parsed::Invoice(e) = parse(&body).unwrap() else { panic!() };
            assert_eq!(e.object.payment, Payment::Paid);
            assert_eq!(e.object.subscription.as_deref(), Some("sub_1"));
            assert_eq!(e.object.customer.as_deref(), Some("cus_1"));
        }
    }

    #[test]
    fn checkout_sessions_keep_the_user_reference() {
        let body = json!({"id": "evt_c", "type": "checkout.session.completed", "created": 5,
            "data": {"object": {"id": "cs_test_1", "object": "checkout.session", "client_reference_id": "12",
                "customer": "cus_1", "subscription": "sub_1", "mode": "subscription"}}});
        let Parsed::CheckoutSession(e) = parse(&body).unwrap() else { panic!() };
        let s = e.object;
        assert_eq!(s.client_reference_id.as_deref(), Some("12"));
        assert_eq!(
            (s.customer.as_deref(), s.subscription.as_deref(), s.mode.as_deref()),
            (Some("cus_1"), Some("sub_1"), Some("subscription"))
        );
    }

    #[test]
    fn other_event_types_are_carried_loosely() {
        // A subscription event type the worker does not apply is not held to the subscription's fields.
        let body = json!({"id": "evt_t", "type": "customer.subscription.trial_will_end", "created": 5,
            "data": {"object": {"id": "sub_1", "object": "subscription"}}});
        let Parsed::Other(e) = parse(&body).unwrap() else { panic!() };
        assert_eq!((e.object.object.as_deref(), e.object.id.as_deref()), (Some("subscription"), Some("sub_1")));
    }

    #[test]
    fn missing_or_bad_fields_are_named_by_their_path() {
        let cases = [
            (json!({"type": "customer.created", "created": 1, "data": {"object": {}}}), "id"),
            (json!({"id": "evt_1", "created": 1, "data": {"object": {}}}), "type"),
            (json!({"id": "evt_1", "type": "customer.created", "data": {"object": {}}}), "created"),
            (
                json!({"id": "evt_1", "type": "customer.created", "created": "yesterday", "data": {"object": {}}}),
                "created",
            ),
            (json!({"id": "evt_1", "type": "customer.created", "created": 1}), "data.object"),
            (json!({"id": 5, "type": "customer.created", "created": 1, "data": {"object": {}}}), "id"),
        ];
        for (body, field) in cases {
            assert_eq!(parse(&body).unwrap_err().field, field, "{body}");
        }
        let sub = |object: Value| json!({"id": "evt_1", "type": "customer.subscription.updated", "created": 1, "data": {"object": object}});
        let cases = [
            (json!({"id": "sub_1", "status": "active"}), "data.object.customer"),
            (json!({"id": "sub_1", "customer": "cus_1"}), "data.object.status"),
            (json!({"customer": "cus_1", "status": "active"}), "data.object.id"),
            (
                json!({"id": "sub_1", "customer": "cus_1", "status": "active", "metadata": {"user_id": "abc"}}),
                "data.object.metadata.user_id",
            ),
            (
                json!({"id": "sub_1", "customer": "cus_1", "status": "active", "current_period_end": "soon"}),
                "data.object.current_period_end",
            ),
            (
                json!({"id": "sub_1", "customer": "cus_1", "status": "active", "object": "invoice"}),
                "data.object.object",
            ),
            (json!({"id": "sub_1", "customer": "c".repeat(101), "status": "active"}), "data.object.customer"),
            (
                json!({"id": "sub_1", "customer": "cus_1", "status": "active", "items": {"data": [{"current_period_end": "x"}]}}),
                "data.object.items.data[0].current_period_end",
            ),
        ];
        for (object, field) in cases {
            assert_eq!(parse(&sub(object.clone())).unwrap_err().field, field, "{object}");
        }
    }

    #[test]
    fn event_keys_are_the_event_id() {
        assert_eq!(event_key("evt_1"), "stripe:evt_1");
    }
}
