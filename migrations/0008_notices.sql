-- Notices to businesses' n8n workflows (CONTRACT.md section 5, issue 15).
-- Worker schema only: the dashboard's `drizzle-kit push` owns public.

-- The notice outbox and log. A row is written in the transaction that applies
-- the change it reports, so a notice exists if and only if its change was
-- committed. A relay publishes unrelayed rows to `{p}.notices`; the notices
-- consumer posts them and records the outcome here.
CREATE TABLE webhook_worker.notices (
    -- The Standard Webhooks `webhook-id` is 'msg_' + this id without dashes:
    -- the same on every try of one notice.
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- One notice per change and receiving integration, e.g.
    -- 'call.ended:<call id>:<integration id>'; a second decision is a no-op.
    change_key     text NOT NULL UNIQUE,
    business_id    integer NOT NULL,
    integration_id integer NOT NULL,
    kind           text NOT NULL,
    -- The exact JSON bytes that are signed and sent, fixed at commit.
    body           text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    relayed_at     timestamptz,
    tries          integer NOT NULL DEFAULT 0,
    -- A try in progress holds the notice until then, so that two copies of its
    -- message (a relay that crashed before recording its publish) never post
    -- it twice at once; a worker killed mid-try lets it go when this passes.
    claimed_until  timestamptz,
    last_error     text,
    settled_at     timestamptz,
    -- 'delivered', 'parked' or 'skipped' (notices turned off meanwhile).
    outcome        text
);
CREATE INDEX notices_unrelayed_idx ON webhook_worker.notices (created_at) WHERE relayed_at IS NULL;
CREATE INDEX notices_unsettled_idx ON webhook_worker.notices (created_at) WHERE settled_at IS NULL;
CREATE INDEX notices_business_idx ON webhook_worker.notices (business_id, created_at);

-- Integrations whose receiver answered 410 Gone, with the notify_url that did.
-- No notices are decided or sent while the integration's notify_url is still
-- that one; setting another notify_url turns them on again.
CREATE TABLE webhook_worker.notify_gone (
    integration_id integer PRIMARY KEY,
    notify_url     text NOT NULL,
    gone_at        timestamptz NOT NULL DEFAULT now()
);
