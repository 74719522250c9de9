//! Applies bookings pushed by n8n workflows to `public.bookings`.
//!
//! A push without `external_id` always creates a booking. A push with one
//! creates the business's booking for it the first time and replaces its fields
//! afterwards; the worker's row for it in `webhook_worker.n8n_bookings` is
//! locked for the transaction, so two workers take turns, and it remembers the
//! `webhook-timestamp` of the last push applied: an older push changes nothing.
//! A cancel is a status like any other; nothing is ever deleted.
//!
//! A booking whose date falls when the business is closed is stored all the
//! same and flagged (see [`judge_hours`] and [`OutsideHours::report`]).

use chrono::{DateTime, Datelike, FixedOffset, Timelike, Utc, Weekday};
use sqlx::PgConnection;
use tracing::warn;

use super::{Applier, ApplyError, Outcome, Refusal, Report};
use crate::events::BusinessId;
use crate::events::n8n::BookingEvent;
use crate::events::{Envelope, Event, Family};
use crate::notify::record::{Change, record as record_notice};

/// Counts applied pushes whose booking falls outside opening hours (served on `/metrics`).
pub const OUTSIDE_HOURS_METRIC: &str = "micro8gents_bookings_outside_hours_total";

/// What the worker knows of one `external_id`, read under a row lock.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct BookingState {
    pub booking_id: Option<i32>,
    pub last_pushed_at: Option<DateTime<Utc>>,
}

/// What a push does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Create,
    Update(i32),
    /// A push for this `external_id` with a later `webhook-timestamp` is already applied.
    Ignore,
}

/// Decides what a push does, given the state of its `external_id` (`None`: it has
/// none). Pushes are ordered by their `webhook-timestamp`; one with the same
/// timestamp as the last applied is applied too (the later arrival wins).
pub fn plan(state: Option<&BookingState>, pushed_at: DateTime<Utc>) -> Plan {
    let Some(state) = state else { return Plan::Create };
    if state.last_pushed_at.is_some_and(|last| pushed_at < last) {
        return Plan::Ignore;
    }
    state.booking_id.map_or(Plan::Create, Plan::Update)
}

/// A booking stored outside its business's opening hours, reported after the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutsideHours {
    pub booking_id: i32,
    pub business: BusinessId,
    /// The date as pushed (local time with its offset).
    pub date: String,
    pub reason: String,
}

impl Report for OutsideHours {
    /// The operator's log line and counter. The row in
    /// `webhook_worker.bookings_outside_hours` was written with the booking.
    fn report(&self) {
        warn!(
            booking_id = self.booking_id,
            business = self.business.0,
            date = %self.date,
            reason = %self.reason,
            "booking stored outside the business's opening hours"
        );
        metrics::counter!(OUTSIDE_HOURS_METRIC).increment(1);
    }
}

/// The bookings family: n8n's bookings.
pub struct Bookings;

impl Applier for Bookings {
    const FAMILY: Family = Family::Bookings;
    type Writes = ();

    async fn apply(tx: &mut PgConnection, _: &mut (), env: &Envelope) -> Result<Outcome, ApplyError> {
        match &env.event {
            Event::N8nBooking(e) => apply_booking(tx, super::business_of(env)?, e).await,
            other => Ok(super::not_of_family(Self::FAMILY, other)),
        }
    }

    async fn flush(_: &mut PgConnection, _: &mut ()) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

pub async fn apply_booking(
    tx: &mut PgConnection,
    business: BusinessId,
    e: &BookingEvent,
) -> Result<Outcome, ApplyError> {
    let state = match &e.booking.external_id {
        Some(external_id) => Some(lock_booking(tx, business, external_id).await?),
        None => None,
    };
    let plan = plan(state.as_ref(), e.pushed_at);
    if plan == Plan::Ignore {
        return Ok(Outcome::Ignored("older than the last applied push"));
    }
    let hours = read_hours(tx, business).await?;
    let closed = match judge_hours(&hours, e.booking.date) {
        Opening::Closed(reason) => Some(reason),
        Opening::Open | Opening::NotConfigured => None,
    };
    let booking_id = write_booking(tx, business, e, plan, closed.as_deref()).await?;
    if let Some(reason) = &closed {
        let push_id = e.webhook_id.as_str();
        record_notice(tx, business, Change::BookingOutsideHours { booking_id, push_id, reason }).await?;
    }
    Ok(match closed {
        Some(reason) => {
            Outcome::Flagged(Box::new(OutsideHours { booking_id, business, date: e.booking.date.to_rfc3339(), reason }))
        }
        None => Outcome::Applied,
    })
}

/// Finds or makes the `external_id`'s row and locks it until the transaction
/// ends, so two workers can never both create a booking for it.
async fn lock_booking(
    tx: &mut PgConnection,
    business: BusinessId,
    external_id: &str,
) -> Result<BookingState, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO webhook_worker.n8n_bookings (business_id, external_id) VALUES ($1, $2)
         ON CONFLICT (business_id, external_id) DO UPDATE SET external_id = EXCLUDED.external_id
         RETURNING booking_id, last_pushed_at",
    )
    .bind(business.0)
    .bind(external_id)
    .fetch_one(&mut *tx)
    .await
}

async fn read_hours(tx: &mut PgConnection, business: BusinessId) -> Result<Vec<HoursRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT day_of_week, open_time, close_time, is_open FROM public.hours_of_operation WHERE business_id = $1",
    )
    .bind(business.0)
    .fetch_all(&mut *tx)
    .await
}

/// The flag's row follows the booking's latest state: written (or refreshed)
/// when it is outside hours, removed when a later push moves it inside.
macro_rules! flag_and_select {
    () => {
        ",
        flagged AS (
            INSERT INTO webhook_worker.bookings_outside_hours
                   (booking_id, business_id, booking_date, local_date, reason, webhook_id)
            SELECT b.id, $1, $8, $13, $14, $12 FROM b WHERE $14::text IS NOT NULL
            ON CONFLICT (booking_id) DO UPDATE SET booking_date = EXCLUDED.booking_date,
                local_date = EXCLUDED.local_date, reason = EXCLUDED.reason,
                webhook_id = EXCLUDED.webhook_id, flagged_at = now()),
        unflagged AS (
            DELETE FROM webhook_worker.bookings_outside_hours o USING b
             WHERE o.booking_id = b.id AND $14::text IS NULL)
        SELECT id FROM b"
    };
}

/// Creates the booking and points its `external_id` (if any) at it.
const CREATE: &str = concat!(
    "WITH b AS (
        INSERT INTO public.bookings (business_id, customer, phone, email, service, date, status, notes)
        VALUES ($1, $4, $5, $6, $7, $8, $9::text::public.booking_status, $10)
        RETURNING id),
    mapped AS (
        UPDATE webhook_worker.n8n_bookings m
           SET booking_id = b.id, last_pushed_at = $11, last_webhook_id = $12
          FROM b WHERE m.business_id = $1 AND m.external_id = $2)",
    flag_and_select!()
);

/// Replaces every field the push carries (a cancel is a status, never a delete).
const UPDATE: &str = concat!(
    "WITH b AS (
        UPDATE public.bookings
           SET customer = $4, phone = $5, email = $6, service = $7, date = $8,
               status = $9::text::public.booking_status, notes = $10
         WHERE id = $3 AND business_id = $1
        RETURNING id),
    mapped AS (
        UPDATE webhook_worker.n8n_bookings m
           SET last_pushed_at = $11, last_webhook_id = $12
         WHERE m.business_id = $1 AND m.external_id = $2)",
    flag_and_select!()
);

/// Writes the booking, the `external_id`'s new state and the flag, in one statement.
async fn write_booking(
    tx: &mut PgConnection,
    business: BusinessId,
    e: &BookingEvent,
    plan: Plan,
    closed: Option<&str>,
) -> Result<i32, ApplyError> {
    let (sql, booking_id) = match plan {
        Plan::Update(id) => (UPDATE, Some(id)),
        Plan::Create | Plan::Ignore => (CREATE, None),
    };
    let b = &e.booking;
    let written: Option<(i32,)> = sqlx::query_as(sql)
        .bind(business.0)
        .bind(b.external_id.as_deref())
        .bind(booking_id)
        .bind(&b.customer)
        .bind(b.phone.as_deref())
        .bind(b.email.as_deref())
        .bind(&b.service)
        // `timestamp without time zone` holds UTC wall time (CONTRACT section 4).
        .bind(b.date.naive_utc())
        .bind(b.status.as_str())
        .bind(b.notes.as_deref())
        .bind(e.pushed_at)
        .bind(e.webhook_id.as_str())
        .bind(b.date.to_rfc3339())
        .bind(closed)
        .fetch_optional(&mut *tx)
        .await?;
    // Only if the booking was deleted between our lock and our update; retried, it is created anew.
    written
        .map(|(id,)| id)
        .ok_or_else(|| ApplyError::Refused(Refusal::Other("the booking was deleted while being updated")))
}

/// One `hours_of_operation` row, as the dashboard stores it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct HoursRow {
    pub day_of_week: String,
    pub open_time: Option<String>,
    pub close_time: Option<String>,
    pub is_open: bool,
}

/// Whether the business is open at a booking's date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// The business has no (recognisable) hours: nothing can be judged, nothing is flagged.
    NotConfigured,
    Open,
    Closed(String),
}

const DAY: u32 = 24 * 3600;

/// Judges a booking's date against the business's hours, in the local time of
/// the date's own UTC offset (the workflow's, which is the business's).
///
/// - No rows, or none whose `day_of_week` names a day: not configured.
/// - Days are named in full or by three letters, in any case (`Monday`, `mon`).
/// - A day with no row is closed; a day whose rows are all `is_open = false` is closed.
/// - An open row covers `[open_time, close_time)`; `HH:MM` or `HH:MM:SS`, `24:00` is midnight
///   at the end of the day. A row whose close is before its open runs past midnight into the
///   next day. Equal open and close, or a missing or unreadable time, means open all day:
///   a row we cannot read must not raise false alarms.
/// - Several rows for one day (a lunch break) are open if any covers the time.
pub fn judge_hours(hours: &[HoursRow], local: DateTime<FixedOffset>) -> Opening {
    let rows: Vec<(Weekday, &HoursRow)> = hours.iter().filter_map(|r| Some((parse_day(&r.day_of_week)?, r))).collect();
    if rows.is_empty() {
        return Opening::NotConfigured;
    }
    let (day, t) = (local.weekday(), local.num_seconds_from_midnight());
    let open_rows = |d: Weekday| rows.iter().filter(move |(rd, r)| *rd == d && r.is_open).map(|(_, r)| span(r));
    // Yesterday's hours that run past midnight.
    if open_rows(day.pred()).any(|s| matches!(s, Some((open, close)) if close < open && t < close)) {
        return Opening::Open;
    }
    let today: Vec<Option<(u32, u32)>> = open_rows(day).collect();
    let covered = |s: &Option<(u32, u32)>| match *s {
        None => true,
        Some((open, close)) if open == close => true,
        Some((open, close)) if open < close => open <= t && t < close,
        Some((open, _)) => open <= t,
    };
    if today.iter().any(covered) {
        return Opening::Open;
    }
    let name = day_name(day);
    Opening::Closed(if rows.iter().all(|(d, _)| *d != day) {
        format!("no opening hours for {name}")
    } else if today.is_empty() {
        format!("closed on {name}")
    } else {
        let spans: Vec<String> = today.iter().flatten().map(|(o, c)| format!("{}-{}", clock(*o), clock(*c))).collect();
        format!("outside opening hours on {name} ({})", spans.join(", "))
    })
}

fn parse_day(raw: &str) -> Option<Weekday> {
    let d = raw.trim().to_ascii_lowercase();
    let days = [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri, Weekday::Sat, Weekday::Sun];
    days.into_iter().find(|w| {
        let full = day_name(*w).to_ascii_lowercase();
        d == full || d == full[..3]
    })
}

fn day_name(d: Weekday) -> &'static str {
    match d {
        Weekday::Mon => "Monday",
        Weekday::Tue => "Tuesday",
        Weekday::Wed => "Wednesday",
        Weekday::Thu => "Thursday",
        Weekday::Fri => "Friday",
        Weekday::Sat => "Saturday",
        Weekday::Sun => "Sunday",
    }
}

/// A row's `[open, close)` in seconds since midnight; `None` if a time is missing or unreadable.
fn span(r: &HoursRow) -> Option<(u32, u32)> {
    Some((parse_clock(r.open_time.as_deref()?)?, parse_clock(r.close_time.as_deref()?)?))
}

/// `H:MM`, `HH:MM` or `HH:MM:SS`, up to `24:00`.
fn parse_clock(raw: &str) -> Option<u32> {
    let mut parts = raw.trim().split(':');
    let h: u32 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let s: u32 = parts.next().map_or(Some(0), |s| s.parse().ok())?;
    // Checked: the dashboard's free-text column may hold `1193047:00`, which overflows `h * 3600`.
    let secs = h.checked_mul(3600)?.checked_add(m.checked_mul(60)?)?.checked_add(s)?;
    (parts.next().is_none() && m < 60 && s < 60 && secs <= DAY).then_some(secs)
}

fn clock(secs: u32) -> String {
    format!("{:02}:{:02}", secs / 3600, secs % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(day: &str, open: Option<&str>, close: Option<&str>, is_open: bool) -> HoursRow {
        HoursRow {
            day_of_week: day.into(),
            open_time: open.map(Into::into),
            close_time: close.map(Into::into),
            is_open,
        }
    }

    fn weekdays_9_to_17() -> Vec<HoursRow> {
        let mut rows: Vec<HoursRow> = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
            .iter()
            .map(|d| row(d, Some("09:00"), Some("17:00"), true))
            .collect();
        rows.push(row("Saturday", None, None, false));
        rows
    }

    /// 2026-03-16 is a Monday.
    fn at(s: &str) -> DateTime<FixedOffset> {
        DateTime::parse_from_rfc3339(s).unwrap()
    }

    fn closed(hours: &[HoursRow], s: &str) -> Option<String> {
        match judge_hours(hours, at(s)) {
            Opening::Closed(reason) => Some(reason),
            _ => None,
        }
    }

    #[test]
    fn weekday_hours_are_judged_in_the_dates_own_offset() {
        let h = weekdays_9_to_17();
        assert_eq!(judge_hours(&h, at("2026-03-16T09:00:00+02:00")), Opening::Open);
        assert_eq!(judge_hours(&h, at("2026-03-16T16:59:59+02:00")), Opening::Open);
        // One instant, two offsets: 07:30 in UTC is before opening, 09:30 in +02:00 is not.
        assert_eq!(
            judge_hours(&h, at("2026-03-16T07:30:00Z")),
            Opening::Closed("outside opening hours on Monday (09:00-17:00)".into())
        );
        assert_eq!(judge_hours(&h, at("2026-03-16T09:30:00+02:00")), Opening::Open);
        assert_eq!(closed(&h, "2026-03-16T17:00:00+02:00").unwrap(), "outside opening hours on Monday (09:00-17:00)");
        assert_eq!(closed(&h, "2026-03-16T08:59:59-05:00").unwrap(), "outside opening hours on Monday (09:00-17:00)");
    }

    #[test]
    fn missing_days_and_closed_days_are_closed() {
        let h = weekdays_9_to_17();
        assert_eq!(closed(&h, "2026-03-15T12:00:00+02:00").unwrap(), "no opening hours for Sunday");
        assert_eq!(closed(&h, "2026-03-14T12:00:00+02:00").unwrap(), "closed on Saturday");
    }

    #[test]
    fn no_hours_at_all_is_never_flagged() {
        assert_eq!(judge_hours(&[], at("2026-03-15T03:00:00Z")), Opening::NotConfigured);
        let unreadable = [row("Someday", Some("09:00"), Some("17:00"), true)];
        assert_eq!(judge_hours(&unreadable, at("2026-03-15T03:00:00Z")), Opening::NotConfigured);
    }

    #[test]
    fn day_names_in_any_case_or_short() {
        for name in ["monday", "MONDAY", " Monday ", "Mon", "mon"] {
            let h = [row(name, Some("9:00"), Some("17:00"), true)];
            assert_eq!(judge_hours(&h, at("2026-03-16T10:00:00Z")), Opening::Open, "{name}");
        }
    }

    #[test]
    fn split_shifts_overnight_and_all_day() {
        let lunch =
            [row("Monday", Some("09:00"), Some("12:00"), true), row("Monday", Some("13:00"), Some("17:00"), true)];
        assert_eq!(judge_hours(&lunch, at("2026-03-16T11:00:00Z")), Opening::Open);
        assert_eq!(
            closed(&lunch, "2026-03-16T12:30:00Z").unwrap(),
            "outside opening hours on Monday (09:00-12:00, 13:00-17:00)"
        );

        let night = [row("Friday", Some("20:00"), Some("02:00"), true), row("Saturday", None, None, false)];
        assert_eq!(judge_hours(&night, at("2026-03-20T23:00:00Z")), Opening::Open);
        assert_eq!(judge_hours(&night, at("2026-03-21T01:30:00Z")), Opening::Open);
        assert_eq!(closed(&night, "2026-03-21T02:00:00Z").unwrap(), "closed on Saturday");
        assert_eq!(closed(&night, "2026-03-20T19:00:00Z").unwrap(), "outside opening hours on Friday (20:00-02:00)");

        for (open, close) in
            [(Some("00:00"), Some("00:00")), (Some("00:00"), Some("24:00")), (None, None), (Some("9am"), Some("5pm"))]
        {
            let h = [row("Monday", open, close, true)];
            assert_eq!(judge_hours(&h, at("2026-03-16T03:00:00Z")), Opening::Open, "{open:?}-{close:?}");
        }
    }

    #[test]
    fn clocks() {
        assert_eq!(parse_clock("09:00"), Some(9 * 3600));
        assert_eq!(parse_clock("9:05:30"), Some(9 * 3600 + 330));
        assert_eq!(parse_clock("24:00"), Some(DAY));
        let huge = ["1193047:00", "4294967295:00", "0:71582789", "0:0:4294967295", "1193046:28:16"];
        for bad in ["24:01", "12:60", "12", "12:00:00:00", "noon", ""].into_iter().chain(huge) {
            assert_eq!(parse_clock(bad), None, "{bad}");
        }
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_764_072_000 + secs, 0).unwrap()
    }

    #[test]
    fn plans() {
        assert_eq!(plan(None, t(0)), Plan::Create);
        assert_eq!(plan(Some(&BookingState::default()), t(0)), Plan::Create);
        let known = BookingState { booking_id: Some(7), last_pushed_at: Some(t(10)) };
        assert_eq!(plan(Some(&known), t(11)), Plan::Update(7));
        assert_eq!(plan(Some(&known), t(10)), Plan::Update(7));
        assert_eq!(plan(Some(&known), t(9)), Plan::Ignore);
        // Deleted from the dashboard: a newer push creates it again, an older one still loses.
        let deleted = BookingState { booking_id: None, last_pushed_at: Some(t(10)) };
        assert_eq!(plan(Some(&deleted), t(11)), Plan::Create);
        assert_eq!(plan(Some(&deleted), t(9)), Plan::Ignore);
    }
}
