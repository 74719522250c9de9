-- Stripe billing: what the billing worker keeps beyond public.subscriptions.
-- Like 0002, everything lives in the worker's own schema; public is untouched.

-- Checkout sessions whose client_reference_id named a user: how a subscription
-- whose metadata carries no user_id finds its user, by its id or its customer.
CREATE TABLE webhook_worker.billing_checkouts (
    session_id             text PRIMARY KEY,
    user_id                integer NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    stripe_customer_id     text,
    stripe_subscription_id text,
    event_created          timestamp NOT NULL,
    recorded_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_checkouts_customer_idx ON webhook_worker.billing_checkouts (stripe_customer_id);
CREATE INDEX billing_checkouts_subscription_idx ON webhook_worker.billing_checkouts (stripe_subscription_id);

-- One row per user with Stripe billing, locked (INSERT ... ON CONFLICT DO
-- UPDATE) by every billing write for that user. public.subscriptions has no
-- unique constraint on user_id and none may be added there, so without this
-- two workers could both find no row for a user and both insert one.
CREATE TABLE webhook_worker.billing_users (
    user_id   integer PRIMARY KEY REFERENCES public.users (id) ON DELETE CASCADE,
    locked_at timestamptz NOT NULL DEFAULT now()
);

-- Every Stripe subscription the worker has applied: its user, its last known
-- state and the `created` (UTC) of the last event applied to it, which is the
-- staleness guard. A user's public.subscriptions row shows the user's current
-- subscription among these (a live one before an ended one, then the newest).
-- `plan` is text, not public.subscription_plan, so that nothing here depends
-- on a type the dashboard's Drizzle owns.
CREATE TABLE webhook_worker.billing_subscriptions (
    stripe_subscription_id text PRIMARY KEY,
    user_id                integer NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    stripe_customer_id     text NOT NULL,
    status                 text NOT NULL,
    plan                   text,
    current_period_start   timestamp,
    current_period_end     timestamp,
    subscription_created   timestamp,
    last_event_id          text NOT NULL,
    last_event_created     timestamp NOT NULL,
    updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_subscriptions_user_idx ON webhook_worker.billing_subscriptions (user_id);
