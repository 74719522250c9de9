//! Bookings pushed by a business's n8n workflow, parsed from their (already
//! verified) JSON body. Every field rule of CONTRACT section 4 is checked here,
//! so nothing invalid is ever published.

use chrono::{DateTime, FixedOffset, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{BusinessId, FieldError};

/// Longest `webhook-id` accepted; the spec sets none, but it ends up in our keys and logs.
pub const MAX_WEBHOOK_ID_CHARS: usize = 200;
/// Longest `external_id` accepted; the contract sets none, but it is a key of the worker's map.
pub const MAX_EXTERNAL_ID_CHARS: usize = 255;

/// A Standard Webhooks `webhook-id`: 1 to 200 characters of printable ASCII, no spaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WebhookId(String);

impl WebhookId {
    pub fn parse(raw: &str) -> Option<WebhookId> {
        let ok = !raw.is_empty() && raw.len() <= MAX_WEBHOOK_ID_CHARS && raw.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| WebhookId(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WebhookId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The seed's `booking_status` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BookingStatus {
    Upcoming,
    Completed,
    Canceled,
}

impl BookingStatus {
    fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "upcoming" => Self::Upcoming,
            "completed" => Self::Completed,
            "canceled" => Self::Canceled,
            _ => return None,
        })
    }

    /// The `booking_status` enum value of `public.bookings`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upcoming => "upcoming",
            Self::Completed => "completed",
            Self::Canceled => "canceled",
        }
    }
}

/// One push: the whole booking as the workflow sees it now, and which push it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BookingEvent {
    pub webhook_id: WebhookId,
    /// `webhook-timestamp` of the push: orders pushes of one `external_id`.
    pub pushed_at: DateTime<Utc>,
    #[serde(flatten)]
    pub booking: BookingFields,
}

/// The booking a push carries. A later push with the same `external_id`
/// replaces every field (absent optional fields become empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BookingFields {
    pub external_id: Option<String>,
    pub customer: String,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub service: String,
    /// As sent, offset kept: the worker judges opening hours in this local time.
    pub date: DateTime<FixedOffset>,
    pub status: BookingStatus,
    pub notes: Option<String>,
}

impl BookingFields {
    pub fn into_event(self, webhook_id: WebhookId, pushed_at: DateTime<Utc>) -> BookingEvent {
        BookingEvent { webhook_id, pushed_at, booking: self }
    }
}

/// Checks every field of a push's JSON object. Unknown fields are ignored (n8n adds
/// its own). `null` is the same as absent, and so is `""` for the optional text
/// fields, because that is what an n8n expression renders for a missing value.
pub fn parse_booking(body: &Map<String, Value>) -> Result<BookingFields, FieldError> {
    let f = Fields(body);
    // Checked in the contract table's order, so the first broken field is the one named.
    Ok(BookingFields {
        external_id: f.external_id()?,
        customer: f.required("customer", 100)?,
        phone: f.optional("phone", 20)?,
        email: f.email()?,
        service: f.required("service", 100)?,
        date: f.date("date")?,
        status: f.status()?,
        notes: f.optional_unbounded("notes")?,
    })
}

/// De-duplication key: the sender's message id, scoped by business.
pub fn booking_key(b: BusinessId, id: &WebhookId) -> String {
    format!("n8n:{b}:{id}")
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// The field's text; `None` when absent or `null`; a non-string is refused.
    fn text(&self, name: &str) -> Result<Option<&str>, FieldError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            // Postgres text cannot hold NUL; refusing it here keeps it off the queue.
            Some(Value::String(s)) if s.contains('\0') => Err(FieldError::new(name, "must not contain NUL characters")),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(FieldError::new(name, "must be a string")),
        }
    }

    fn required(&self, name: &str, max_chars: usize) -> Result<String, FieldError> {
        let value = self.text(name)?.filter(|s| !s.trim().is_empty());
        let value = value.ok_or_else(|| FieldError::new(name, "is required"))?;
        at_most(name, value, max_chars)
    }

    fn optional(&self, name: &str, max_chars: usize) -> Result<Option<String>, FieldError> {
        self.text(name)?.filter(|s| !s.is_empty()).map(|v| at_most(name, v, max_chars)).transpose()
    }

    fn optional_unbounded(&self, name: &str) -> Result<Option<String>, FieldError> {
        Ok(self.text(name)?.filter(|s| !s.is_empty()).map(str::to_string))
    }

    /// An identity, so `""` is refused rather than read as "none": a workflow
    /// that sends it has lost its id, and creating a new booking each time would hide that.
    fn external_id(&self) -> Result<Option<String>, FieldError> {
        match self.text("external_id")? {
            None => Ok(None),
            Some("") => Err(FieldError::new("external_id", "must not be empty")),
            Some(v) => at_most("external_id", v, MAX_EXTERNAL_ID_CHARS).map(Some),
        }
    }

    fn email(&self) -> Result<Option<String>, FieldError> {
        let email = self.optional("email", 255)?;
        if email.as_deref().is_some_and(|e| !is_email_address(e)) {
            return Err(FieldError::new("email", "must be an email address"));
        }
        Ok(email)
    }

    fn status(&self) -> Result<BookingStatus, FieldError> {
        match self.text("status")?.filter(|s| !s.is_empty()) {
            None => Ok(BookingStatus::Upcoming),
            Some(raw) => BookingStatus::parse(raw)
                .ok_or_else(|| FieldError::new("status", "must be one of upcoming, completed, canceled")),
        }
    }

    fn date(&self, name: &str) -> Result<DateTime<FixedOffset>, FieldError> {
        let raw = self.text(name)?.filter(|s| !s.is_empty()).ok_or_else(|| FieldError::new(name, "is required"))?;
        DateTime::parse_from_rfc3339(raw)
            .map_err(|_| FieldError::new(name, "must be an RFC 3339 date-time, e.g. 2026-03-15T14:30:00+02:00"))
    }
}

/// Lengths count characters, as Postgres's `varchar(n)` does, not bytes.
fn at_most(name: &str, value: &str, max_chars: usize) -> Result<String, FieldError> {
    if value.chars().count() > max_chars {
        return Err(FieldError::new(name, format!("must be at most {max_chars} characters")));
    }
    Ok(value.to_string())
}

/// A pragmatic address check: one `@`, a local part of at most 64 characters
/// without spaces, and a domain of two or more dot-separated labels made of
/// letters, digits and inner hyphens. Deliverability is not our business.
pub fn is_email_address(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else { return false };
    let local_ok = !local.is_empty()
        && local.chars().count() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| !c.is_whitespace() && !c.is_control() && !"@<>()[]\\,;:\"".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.chars().count() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    local_ok && domain_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({
            "external_id": "bk_1",
            "customer": "Jane Doe",
            "phone": "+14155552671",
            "email": "jane@example.com",
            "service": "Cleaning",
            "date": "2026-03-15T14:30:00+02:00",
            "status": "upcoming",
            "notes": "first visit",
            "n8n_execution": 42
        })
    }

    fn parse(v: &Value) -> Result<BookingFields, FieldError> {
        parse_booking(v.as_object().unwrap())
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = good();
        v[field] = value;
        v
    }

    fn without(field: &str) -> Value {
        let mut v = good();
        v.as_object_mut().unwrap().remove(field);
        v
    }

    #[test]
    fn a_full_push_parses_and_extra_fields_are_ignored() {
        let b = parse(&good()).unwrap();
        assert_eq!(b.external_id.as_deref(), Some("bk_1"));
        assert_eq!(b.customer, "Jane Doe");
        assert_eq!(b.status, BookingStatus::Upcoming);
        assert_eq!(b.date.naive_utc().to_string(), "2026-03-15 12:30:00");
        assert_eq!(b.date.offset().local_minus_utc(), 7200);
    }

    #[test]
    fn defaults_and_empty_optionals() {
        let mut v = json!({"customer": "A", "service": "B", "date": "2026-03-15T14:30:00Z"});
        let b = parse(&v).unwrap();
        assert_eq!(b.status, BookingStatus::Upcoming);
        assert_eq!((b.external_id, b.phone, b.email, b.notes), (None, None, None, None));
        for field in ["phone", "email", "notes", "status"] {
            v[field] = Value::Null;
        }
        v["phone"] = json!("");
        v["email"] = json!("");
        assert!(parse(&v).is_ok());
    }

    #[test]
    fn every_rule_names_its_field() {
        let long = |n: usize| json!("é".repeat(n));
        let cases = [
            (without("customer"), "customer", "is required"),
            (with("customer", json!("   ")), "customer", "is required"),
            (with("customer", long(101)), "customer", "must be at most 100 characters"),
            (with("customer", json!(7)), "customer", "must be a string"),
            (with("phone", json!("+1 415 555 2671 ext 12345")), "phone", "must be at most 20 characters"),
            (with("phone", json!(4155552671u64)), "phone", "must be a string"),
            (
                with("email", json!(format!("{}@example.com", "a".repeat(250)))),
                "email",
                "must be at most 255 characters",
            ),
            (with("email", json!("not-an-address")), "email", "must be an email address"),
            (without("service"), "service", "is required"),
            (with("service", long(101)), "service", "must be at most 100 characters"),
            (without("date"), "date", "is required"),
            (
                with("date", json!("15/03/2026 14:30")),
                "date",
                "must be an RFC 3339 date-time, e.g. 2026-03-15T14:30:00+02:00",
            ),
            (
                with("date", json!("2026-03-15T14:30:00")),
                "date",
                "must be an RFC 3339 date-time, e.g. 2026-03-15T14:30:00+02:00",
            ),
            (with("status", json!("cancelled")), "status", "must be one of upcoming, completed, canceled"),
            (with("status", json!(true)), "status", "must be a string"),
            (with("notes", json!(["x"])), "notes", "must be a string"),
            (with("notes", json!("a\u{0}b")), "notes", "must not contain NUL characters"),
            (with("external_id", json!("")), "external_id", "must not be empty"),
            (with("external_id", json!(12)), "external_id", "must be a string"),
            (with("external_id", json!("x".repeat(256))), "external_id", "must be at most 255 characters"),
        ];
        for (body, field, rule) in cases {
            assert_eq!(parse(&body).unwrap_err(), FieldError::new(field, rule), "{body}");
        }
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        // 100 two-byte characters are 200 bytes but within the 100-character limit.
        assert!(parse(&with("customer", json!("é".repeat(100)))).is_ok());
        assert!(parse(&with("phone", json!("٠".repeat(20)))).is_ok());
    }

    #[test]
    fn email_addresses() {
        for ok in ["a@b.co", "jane.doe+tag@mail.example.com", "ünï@bücher.de", "x@a-b.example"] {
            assert!(is_email_address(ok), "{ok}");
        }
        for bad in ["", "a", "a@", "@b.co", "a@b", "a b@c.de", "a@b..de", "a@-b.de", "a@b.de-", "a@@b.de", ".a@b.de"] {
            assert!(!is_email_address(bad), "{bad}");
        }
    }

    #[test]
    fn webhook_ids() {
        assert!(WebhookId::parse("msg_bk_20251125_0001").is_some());
        assert!(WebhookId::parse(&"x".repeat(200)).is_some());
        for bad in ["", "a b", "é", "a\tb", "a\u{7f}"] {
            assert!(WebhookId::parse(bad).is_none(), "{bad:?}");
        }
        assert!(WebhookId::parse(&"x".repeat(201)).is_none());
    }

    #[test]
    fn the_event_round_trips_through_json() {
        let id = WebhookId::parse("msg_1").unwrap();
        let e = parse(&good()).unwrap().into_event(id.clone(), DateTime::from_timestamp(1_764_072_000, 0).unwrap());
        let back: BookingEvent = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.booking.date.to_rfc3339(), "2026-03-15T14:30:00+02:00");
        assert_eq!(booking_key(BusinessId(7), &id), "n8n:7:msg_1");
    }
}
