//! Applies Stripe billing events to `public.subscriptions` (CONTRACT section 4).
//!
//! Stripe promises neither order nor a single delivery. The worker keeps, per
//! Stripe subscription, its last known state and the `created` of the last
//! event applied to it (`webhook_worker.billing_subscriptions`); an older event
//! changes nothing. A user's one `public.subscriptions` row shows that user's
//! current subscription (a live one before an ended one, then the newest), so a
//! late event about a replaced subscription cannot take the row back.
//!
//! Every write for a user first locks the user's row in
//! `webhook_worker.billing_users`, so two workers take turns on one user: the
//! second sees the first one's `public.subscriptions` row instead of inserting
//! another. The decisions are pure functions ([`plan_subscription`],
//! [`plan_invoice`], [`project`]) of that state and the event; every decision
//! that refuses an event (retry, fail, ignore) is made before anything is written.

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::PgConnection;

use super::{Applier, ApplyError, Outcome};
use crate::events::stripe::{CheckoutSessionEvent, InvoiceEvent, Payment, SubscriptionEvent};
use crate::events::{Envelope, Event, Family};

/// What the worker knows of one Stripe subscription (a `billing_subscriptions` row).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SubState {
    pub stripe_subscription_id: String,
    pub user_id: i32,
    pub stripe_customer_id: String,
    pub status: String,
    /// One of the `subscription_plan` values, once a price named one.
    pub plan: Option<String>,
    pub current_period_start: Option<NaiveDateTime>,
    pub current_period_end: Option<NaiveDateTime>,
    pub subscription_created: Option<NaiveDateTime>,
    pub last_event_id: String,
    pub last_event_created: NaiveDateTime,
}

pub const STALE: &str = "older than the last applied event";
pub const NOT_CURRENT: &str = "not the user's current subscription";

/// A subscription that has ended for good; any other status still bills or may again.
pub fn is_live(status: &str) -> bool {
    !matches!(status, "canceled" | "incomplete_expired")
}

/// The subscription a user's row shows: a live one before an ended one, then
/// the most recently created, then the one with the latest event.
pub fn current(subs: &[SubState]) -> Option<&SubState> {
    subs.iter().max_by_key(|s| (is_live(&s.status), s.subscription_created, s.last_event_created))
}

fn naive(t: DateTime<Utc>) -> NaiveDateTime {
    t.naive_utc()
}

/// Where a status stands in Stripe's lifecycle (CONTRACT section 4), for events
/// of one subscription that share a `created` second. A status Stripe may add
/// later ranks lowest, so it never hides a known one.
pub fn lifecycle_rank(status: &str) -> u8 {
    match status {
        "incomplete" => 1,
        "incomplete_expired" => 2,
        "trialing" => 3,
        "active" => 4,
        "past_due" => 5,
        "unpaid" => 6,
        "paused" => 7,
        "canceled" => 8,
        _ => 0,
    }
}

pub const SAME_SECOND_EARLIER: &str = "same second as the last applied event, earlier in the lifecycle";

/// Why an event leaving the subscription in `next_status` must change nothing, if it must.
///
/// Older than the last applied event: stale. In the same second (Stripe often
/// sends `customer.subscription.created` and `.updated` with one `created`): the
/// status later in Stripe's lifecycle wins, so the pair ends the same in either
/// order. Equal ranks apply in arrival order.
fn refusal(prev: Option<&SubState>, created: DateTime<Utc>, next_status: &str) -> Option<&'static str> {
    let p = prev?;
    let created = naive(created);
    if created < p.last_event_created {
        Some(STALE)
    } else if created == p.last_event_created && lifecycle_rank(next_status) < lifecycle_rank(&p.status) {
        Some(SAME_SECOND_EARLIER)
    } else {
        None
    }
}

/// The subscription's state after a subscription event: everything the event
/// says, with what it does not say (an unnamed plan, a missing period) kept.
pub fn plan_subscription(prev: Option<&SubState>, user_id: i32, e: &SubscriptionEvent) -> Result<SubState, Outcome> {
    let s = &e.object;
    if let Some(reason) = refusal(prev, e.created, &s.status) {
        return Err(Outcome::Ignored(reason));
    }
    let kept = |f: fn(&SubState) -> Option<NaiveDateTime>| prev.and_then(f);
    Ok(SubState {
        stripe_subscription_id: s.id.clone(),
        user_id,
        stripe_customer_id: s.customer.clone(),
        status: s.status.clone(),
        plan: s.plan.plan().map(|p| p.as_str().to_string()).or_else(|| prev.and_then(|p| p.plan.clone())),
        current_period_start: s.current_period_start.map(naive).or_else(|| kept(|p| p.current_period_start)),
        current_period_end: s.current_period_end.map(naive).or_else(|| kept(|p| p.current_period_end)),
        subscription_created: s.created.map(naive).or_else(|| kept(|p| p.subscription_created)),
        last_event_id: e.id.clone(),
        last_event_created: naive(e.created),
    })
}

/// How an invoice moves its subscription's status, as Stripe's own subscription
/// would: a paid invoice settles a subscription that was waiting for payment, a
/// failed one makes a paying subscription past due. A canceled one never moves.
pub fn invoice_status(status: &str, payment: Payment) -> Option<&'static str> {
    match (payment, status) {
        (Payment::Paid, "past_due" | "unpaid" | "incomplete") => Some("active"),
        (Payment::Failed, "active" | "trialing") => Some("past_due"),
        _ => None,
    }
}

pub fn plan_invoice(prev: &SubState, e: &InvoiceEvent) -> Result<SubState, Outcome> {
    if let Some(reason) = refusal(Some(prev), e.created, &prev.status) {
        return Err(Outcome::Ignored(reason));
    }
    let Some(status) = invoice_status(&prev.status, e.object.payment) else {
        return Err(Outcome::Ignored("the invoice does not move the subscription's status"));
    };
    if let Some(reason) = refusal(Some(prev), e.created, status) {
        return Err(Outcome::Ignored(reason));
    }
    Ok(SubState {
        status: status.to_string(),
        last_event_id: e.id.clone(),
        last_event_created: naive(e.created),
        ..prev.clone()
    })
}

/// What the user's row must show once `next` replaces its subscription's state
/// among the user's subscriptions `before`: the current subscription, if `next`
/// is or was the current one; `None` if the row is about another subscription.
pub fn project(before: &[SubState], next: &SubState) -> Option<SubState> {
    let id = &next.stripe_subscription_id;
    let was_current = current(before).is_some_and(|c| &c.stripe_subscription_id == id);
    let mut after: Vec<SubState> = before.iter().filter(|s| &s.stripe_subscription_id != id).cloned().collect();
    after.push(next.clone());
    let now_current = current(&after).cloned()?;
    (was_current || &now_current.stripe_subscription_id == id).then_some(now_current)
}

// ---- applying ----------------------------------------------------------------------------

/// The billing family: Stripe's events.
pub struct Billing;

impl Applier for Billing {
    const FAMILY: Family = Family::Billing;
    type Writes = ();

    async fn apply(tx: &mut PgConnection, _: &mut (), env: &Envelope) -> Result<Outcome, ApplyError> {
        match &env.event {
            Event::StripeSubscription(e) => apply_subscription(tx, e).await,
            Event::StripeCheckoutSession(e) => apply_checkout(tx, e).await,
            Event::StripeInvoice(e) => apply_invoice(tx, e).await,
            Event::StripeOther(_) => Ok(Outcome::Ignored("event type not applied")),
            other => Ok(super::not_of_family(Self::FAMILY, other)),
        }
    }

    async fn flush(_: &mut PgConnection, _: &mut ()) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

pub async fn apply_subscription(tx: &mut PgConnection, e: &SubscriptionEvent) -> Result<Outcome, ApplyError> {
    let s = &e.object;
    let Some(user) = resolve_user(tx, s.user_id, Some(&s.id), Some(&s.customer)).await? else {
        return Ok(Outcome::Retry(format!("no user for customer {} yet", s.customer)));
    };
    lock_user(tx, user).await?;
    let subs = user_subscriptions(tx, user, &s.id).await?;
    let prev = subs.iter().find(|p| p.stripe_subscription_id == s.id);
    let next = match plan_subscription(prev, user, e) {
        Ok(next) => next,
        Err(outcome) => return Ok(outcome),
    };
    let unnamed = s.plan.describe_unnamed();
    apply_state(tx, &subs, next, unnamed).await
}

pub async fn apply_invoice(tx: &mut PgConnection, e: &InvoiceEvent) -> Result<Outcome, ApplyError> {
    let Some(sub_id) = e.object.subscription.as_deref() else {
        return Ok(Outcome::Ignored("the invoice is not for a subscription"));
    };
    let customer = e.object.customer.as_deref();
    let known: Option<(i32,)> =
        sqlx::query_as("SELECT user_id FROM webhook_worker.billing_subscriptions WHERE stripe_subscription_id = $1")
            .bind(sub_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((user,)) = known else {
        // Stripe may send the invoice before the subscription's own events: wait for them.
        let reason = match resolve_user(tx, None, Some(sub_id), customer).await? {
            None => format!("no user for customer {} yet", customer.unwrap_or(sub_id)),
            Some(_) => format!("subscription {sub_id} not applied yet"),
        };
        return Ok(Outcome::Retry(reason));
    };
    lock_user(tx, user).await?;
    let subs = user_subscriptions(tx, user, sub_id).await?;
    let Some(prev) = subs.iter().find(|p| p.stripe_subscription_id == sub_id) else {
        return Ok(Outcome::Retry(format!("subscription {sub_id} not applied yet")));
    };
    let next = match plan_invoice(prev, e) {
        Ok(next) => next,
        Err(outcome) => return Ok(outcome),
    };
    apply_state(tx, &subs, next, None).await
}

/// Records who a checkout session's customer and subscription belong to, when
/// its `client_reference_id` names a user. Changes no `subscriptions` row: the
/// subscription's own events carry its state.
pub async fn apply_checkout(tx: &mut PgConnection, e: &CheckoutSessionEvent) -> Result<Outcome, ApplyError> {
    let s = &e.object;
    if s.customer.is_none() && s.subscription.is_none() {
        return Ok(Outcome::Ignored("the session names no customer or subscription"));
    }
    let Some(claimed) = s.client_reference_id.as_deref().and_then(|r| r.trim().parse::<i32>().ok()) else {
        return Ok(Outcome::Ignored("the session's client_reference_id names no user"));
    };
    let recorded = sqlx::query(
        "INSERT INTO webhook_worker.billing_checkouts
             (session_id, user_id, stripe_customer_id, stripe_subscription_id, event_created)
         SELECT $1, u.id, $3, $4, $5 FROM public.users u WHERE u.id = $2
         ON CONFLICT (session_id) DO UPDATE SET
             user_id = EXCLUDED.user_id, stripe_customer_id = EXCLUDED.stripe_customer_id,
             stripe_subscription_id = EXCLUDED.stripe_subscription_id, event_created = EXCLUDED.event_created",
    )
    .bind(&s.id)
    .bind(claimed)
    .bind(s.customer.as_deref())
    .bind(s.subscription.as_deref())
    .bind(naive(e.created))
    .execute(&mut *tx)
    .await?;
    // No row means no such user; a session seen before (Stripe may send two events for it) is rewritten.
    Ok(if recorded.rows_affected() == 1 {
        Outcome::Applied
    } else {
        Outcome::Ignored("the session's client_reference_id names no user")
    })
}

/// Writes the subscription's new state and, if the user's row is about it, the row.
/// A row that does not exist yet needs a plan: without one the event fails.
async fn apply_state(
    tx: &mut PgConnection,
    before: &[SubState],
    next: SubState,
    unnamed: Option<String>,
) -> Result<Outcome, ApplyError> {
    let user_subs: Vec<SubState> = before.iter().filter(|s| s.user_id == next.user_id).cloned().collect();
    let shown = project(&user_subs, &next);
    let row = match &shown {
        Some(shown) => find_row(tx, shown).await?,
        None => None,
    };
    if let Some(shown) = shown.as_ref().filter(|s| row.is_none() && s.plan.is_none()) {
        let reason = unnamed.unwrap_or_else(|| format!("subscription {} names no plan", shown.stripe_subscription_id));
        return Ok(Outcome::Park(reason));
    }
    write_state(tx, &next).await?;
    match shown {
        Some(shown) => {
            write_row(tx, row, &shown).await?;
            Ok(Outcome::Applied)
        }
        None => Ok(Outcome::Ignored(NOT_CURRENT)),
    }
}

/// The user an event is about: the subscription's `metadata.user_id` if it names
/// an existing user, else a checkout session that named the user for this
/// subscription or customer, else a subscription row already holding them.
async fn resolve_user(
    tx: &mut PgConnection,
    metadata_user: Option<i32>,
    subscription: Option<&str>,
    customer: Option<&str>,
) -> Result<Option<i32>, sqlx::Error> {
    let (user,): (Option<i32>,) = sqlx::query_as(
        "SELECT COALESCE(
            (SELECT id FROM public.users WHERE id = $1),
            (SELECT user_id FROM webhook_worker.billing_checkouts WHERE stripe_subscription_id = $2
              ORDER BY event_created DESC LIMIT 1),
            (SELECT user_id FROM webhook_worker.billing_checkouts WHERE stripe_customer_id = $3
              ORDER BY event_created DESC LIMIT 1),
            (SELECT user_id FROM webhook_worker.billing_subscriptions WHERE stripe_subscription_id = $2),
            (SELECT user_id FROM public.subscriptions WHERE stripe_subscription_id = $2 ORDER BY id LIMIT 1),
            (SELECT user_id FROM public.subscriptions WHERE stripe_customer_id = $3 ORDER BY id LIMIT 1))",
    )
    .bind(metadata_user)
    .bind(subscription)
    .bind(customer)
    .fetch_one(&mut *tx)
    .await?;
    Ok(user)
}

/// Makes the user's lock row and locks it until the transaction ends: every
/// billing write for one user happens in turn, whichever worker applies it.
async fn lock_user(tx: &mut PgConnection, user: i32) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_worker.billing_users (user_id) VALUES ($1)
         ON CONFLICT (user_id) DO UPDATE SET locked_at = now() RETURNING user_id",
    )
    .bind(user)
    .fetch_one(&mut *tx)
    .await?;
    Ok(())
}

/// The user's subscriptions, and the event's one whoever it was recorded for, locked.
async fn user_subscriptions(tx: &mut PgConnection, user: i32, sub_id: &str) -> Result<Vec<SubState>, sqlx::Error> {
    sqlx::query_as(
        "SELECT stripe_subscription_id, user_id, stripe_customer_id, status, plan, current_period_start,
                current_period_end, subscription_created, last_event_id, last_event_created
           FROM webhook_worker.billing_subscriptions
          WHERE user_id = $1 OR stripe_subscription_id = $2
          ORDER BY stripe_subscription_id
            FOR UPDATE",
    )
    .bind(user)
    .bind(sub_id)
    .fetch_all(&mut *tx)
    .await
}

/// The user's `subscriptions` row: the one holding this subscription, else this
/// customer, else the oldest (the dashboard may have made one, e.g. a free plan).
async fn find_row(tx: &mut PgConnection, shown: &SubState) -> Result<Option<i32>, sqlx::Error> {
    let row: Option<(i32,)> = sqlx::query_as(
        "SELECT id FROM public.subscriptions WHERE user_id = $1
          ORDER BY stripe_subscription_id IS NOT DISTINCT FROM $2 DESC,
                   stripe_customer_id IS NOT DISTINCT FROM $3 DESC, id
          LIMIT 1",
    )
    .bind(shown.user_id)
    .bind(&shown.stripe_subscription_id)
    .bind(&shown.stripe_customer_id)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.map(|(id,)| id))
}

async fn write_state(tx: &mut PgConnection, s: &SubState) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_worker.billing_subscriptions
             (stripe_subscription_id, user_id, stripe_customer_id, status, plan, current_period_start,
              current_period_end, subscription_created, last_event_id, last_event_created)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (stripe_subscription_id) DO UPDATE SET
             user_id = EXCLUDED.user_id, stripe_customer_id = EXCLUDED.stripe_customer_id,
             status = EXCLUDED.status, plan = EXCLUDED.plan,
             current_period_start = EXCLUDED.current_period_start,
             current_period_end = EXCLUDED.current_period_end,
             subscription_created = EXCLUDED.subscription_created,
             last_event_id = EXCLUDED.last_event_id, last_event_created = EXCLUDED.last_event_created,
             updated_at = now()",
    )
    .bind(&s.stripe_subscription_id)
    .bind(s.user_id)
    .bind(&s.stripe_customer_id)
    .bind(&s.status)
    .bind(s.plan.as_deref())
    .bind(s.current_period_start)
    .bind(s.current_period_end)
    .bind(s.subscription_created)
    .bind(&s.last_event_id)
    .bind(s.last_event_created)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Updates the user's row to show `s` (a plan or period it does not know is
/// left as it is; `updated_at` moves only if something changed), or inserts it.
/// Timestamps are UTC wall time whatever the session's time zone.
async fn write_row(tx: &mut PgConnection, row: Option<i32>, s: &SubState) -> Result<(), sqlx::Error> {
    let sql = match row {
        Some(_) => {
            "UPDATE public.subscriptions SET
                 stripe_customer_id = $3, stripe_subscription_id = $4, status = $5,
                 plan = COALESCE($6::text::public.subscription_plan, plan),
                 current_period_start = COALESCE($7, current_period_start),
                 current_period_end = COALESCE($8, current_period_end),
                 updated_at = (now() AT TIME ZONE 'UTC')
              WHERE id = $1
                AND (stripe_customer_id, stripe_subscription_id, status, plan, current_period_start, current_period_end)
                    IS DISTINCT FROM
                    ($3, $4, $5, COALESCE($6::text::public.subscription_plan, plan),
                     COALESCE($7, current_period_start), COALESCE($8, current_period_end))"
        }
        None => {
            "INSERT INTO public.subscriptions (user_id, plan, stripe_customer_id, stripe_subscription_id, status,
                                              current_period_start, current_period_end, created_at, updated_at)
             VALUES ($2, $6::text::public.subscription_plan, $3, $4, $5, $7, $8,
                     (now() AT TIME ZONE 'UTC'), (now() AT TIME ZONE 'UTC'))"
        }
    };
    sqlx::query(sql)
        .bind(row)
        .bind(s.user_id)
        .bind(&s.stripe_customer_id)
        .bind(&s.stripe_subscription_id)
        .bind(&s.status)
        .bind(s.plan.as_deref())
        .bind(s.current_period_start)
        .bind(s.current_period_end)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::stripe::{Invoice, Plan, PlanSource, StripeEvent, Subscription};

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    fn sub_event(id: &str, created: i64, status: &str, plan: Option<Plan>) -> SubscriptionEvent {
        StripeEvent {
            id: format!("evt_{created}"),
            event_type: "customer.subscription.updated".into(),
            created: t(created),
            api_version: Some("2025-03-31.basil".into()),
            object: Subscription {
                id: id.into(),
                customer: "cus_1".into(),
                status: status.into(),
                user_id: Some(1),
                created: Some(t(10)),
                current_period_start: Some(t(created)),
                current_period_end: Some(t(created + 100)),
                plan: match plan {
                    Some(plan) => PlanSource::Named { plan },
                    None => PlanSource::Unnamed { price: Some("price_x".into()), name: Some("gold".into()) },
                },
            },
        }
    }

    fn invoice(created: i64, payment: Payment) -> InvoiceEvent {
        StripeEvent {
            id: format!("evt_in_{created}"),
            event_type: "invoice.paid".into(),
            created: t(created),
            api_version: None,
            object: Invoice {
                id: "in_1".into(),
                payment,
                customer: Some("cus_1".into()),
                subscription: Some("sub_1".into()),
            },
        }
    }

    fn state(id: &str, status: &str, created: i64, last_event: i64) -> SubState {
        let e = sub_event(id, last_event, status, Some(Plan::Basic));
        let mut s = plan_subscription(None, 1, &e).unwrap();
        s.subscription_created = Some(naive(t(created)));
        s
    }

    #[test]
    fn an_older_event_changes_nothing_and_an_equal_one_applies() {
        let prev = state("sub_1", "active", 10, 100);
        assert_eq!(
            plan_subscription(Some(&prev), 1, &sub_event("sub_1", 99, "past_due", None)),
            Err(Outcome::Ignored(STALE))
        );
        let same_second = plan_subscription(Some(&prev), 1, &sub_event("sub_1", 100, "past_due", None)).unwrap();
        assert_eq!(same_second.status, "past_due");
        let same_status = plan_subscription(Some(&prev), 1, &sub_event("sub_1", 100, "active", None)).unwrap();
        assert_eq!(same_status.last_event_id, "evt_100");
        assert_eq!(plan_invoice(&prev, &invoice(99, Payment::Failed)), Err(Outcome::Ignored(STALE)));
    }

    /// `created` (incomplete) and `updated` (active) in one second, in both orders:
    /// the status later in the lifecycle wins either way.
    #[test]
    fn a_same_second_pair_ends_the_same_in_either_order() {
        let created = sub_event("sub_1", 100, "incomplete", Some(Plan::Basic));
        let updated = sub_event("sub_1", 100, "active", Some(Plan::Basic));
        let run = |first: &SubscriptionEvent, second: &SubscriptionEvent| {
            let s1 = plan_subscription(None, 1, first).unwrap();
            plan_subscription(Some(&s1), 1, second).map_or(s1.status.clone(), |s2| s2.status)
        };
        assert_eq!(run(&created, &updated), "active");
        assert_eq!(run(&updated, &created), "active");
        let s1 = plan_subscription(None, 1, &updated).unwrap();
        assert_eq!(plan_subscription(Some(&s1), 1, &created), Err(Outcome::Ignored(SAME_SECOND_EARLIER)));
        // A later second still moves back along the lifecycle (a reactivated subscription, say).
        let later = sub_event("sub_1", 101, "incomplete", None);
        assert_eq!(plan_subscription(Some(&s1), 1, &later).unwrap().status, "incomplete");
        // Every listed status ranks above an unknown one, in the contract's order.
        let order =
            ["incomplete", "incomplete_expired", "trialing", "active", "past_due", "unpaid", "paused", "canceled"];
        assert!(order.windows(2).all(|w| lifecycle_rank(w[0]) < lifecycle_rank(w[1])));
        assert!(lifecycle_rank("something_new") < lifecycle_rank("incomplete"));
    }

    #[test]
    fn a_same_second_invoice_cannot_move_the_status_back() {
        let prev = state("sub_1", "past_due", 10, 100);
        // paid: past_due -> active, earlier in the lifecycle than past_due in the same second.
        assert_eq!(plan_invoice(&prev, &invoice(100, Payment::Paid)), Err(Outcome::Ignored(SAME_SECOND_EARLIER)));
        let active = state("sub_1", "active", 10, 100);
        assert_eq!(plan_invoice(&active, &invoice(100, Payment::Failed)).unwrap().status, "past_due");
    }

    #[test]
    fn an_unnamed_plan_keeps_the_known_one() {
        let prev = state("sub_1", "active", 10, 100);
        let next = plan_subscription(Some(&prev), 1, &sub_event("sub_1", 200, "active", None)).unwrap();
        assert_eq!(next.plan.as_deref(), Some("basic"));
        assert_eq!(next.current_period_start, Some(naive(t(200))));
        let fresh = plan_subscription(None, 1, &sub_event("sub_1", 200, "active", None)).unwrap();
        assert_eq!(fresh.plan, None);
    }

    #[test]
    fn invoices_move_the_status_as_stripe_does() {
        use Payment::*;
        for (status, payment, expected) in [
            ("past_due", Paid, Some("active")),
            ("unpaid", Paid, Some("active")),
            ("incomplete", Paid, Some("active")),
            ("active", Paid, None),
            ("canceled", Paid, None),
            ("active", Failed, Some("past_due")),
            ("trialing", Failed, Some("past_due")),
            ("past_due", Failed, None),
            ("incomplete", Failed, None),
            ("canceled", Failed, None),
            ("paused", Failed, None),
        ] {
            assert_eq!(invoice_status(status, payment), expected, "{status} {payment:?}");
        }
        let prev = state("sub_1", "past_due", 10, 100);
        let next = plan_invoice(&prev, &invoice(150, Paid)).unwrap();
        assert_eq!((next.status.as_str(), next.last_event_created), ("active", naive(t(150))));
        assert_eq!(next.plan, prev.plan);
    }

    #[test]
    fn a_live_subscription_is_shown_before_an_ended_one_then_the_newest() {
        let old_active = state("sub_old", "active", 10, 500);
        let new_canceled = state("sub_new", "canceled", 20, 400);
        let newer_active = state("sub_newer", "active", 30, 300);
        assert_eq!(current(&[old_active.clone(), new_canceled.clone()]).unwrap().stripe_subscription_id, "sub_old");
        let all = [old_active, new_canceled, newer_active];
        assert_eq!(current(&all).unwrap().stripe_subscription_id, "sub_newer");
    }

    #[test]
    fn a_late_event_of_a_replaced_subscription_leaves_the_row_alone() {
        let old = state("sub_old", "canceled", 10, 100);
        let new = state("sub_new", "active", 20, 200);
        let late_old = state("sub_old", "canceled", 10, 300);
        assert_eq!(project(&[old.clone(), new.clone()], &late_old), None);
        // A new subscription takes the row over from an ended one.
        let shown = project(&[old], &new).unwrap();
        assert_eq!(shown.stripe_subscription_id, "sub_new");
    }

    #[test]
    fn when_the_shown_subscription_ends_the_row_shows_the_live_one() {
        let a = state("sub_a", "active", 10, 100);
        let b = state("sub_b", "active", 20, 100);
        let b_ends = state("sub_b", "canceled", 20, 200);
        let shown = project(&[a, b], &b_ends).unwrap();
        assert_eq!(shown.stripe_subscription_id, "sub_a");
        assert_eq!(shown.status, "active");
    }

    #[test]
    fn a_first_subscription_is_shown() {
        let s = state("sub_1", "incomplete", 10, 100);
        assert_eq!(project(&[], &s), Some(s));
    }
}
