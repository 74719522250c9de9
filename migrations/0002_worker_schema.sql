-- The worker's own state. It lives in its own schema so that the dashboard's
-- `drizzle-kit push` (which owns `public`) never sees or drops it.

-- Every event a worker has settled, keyed by its de-duplication key: the inbox
-- that makes a redelivery a no-op, and the event log that `replay` reads.
CREATE TABLE webhook_worker.inbox (
    event_key   text PRIMARY KEY,
    provider    text NOT NULL,
    kind        text NOT NULL,
    business_id integer,
    received_at timestamptz NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    -- 'applied', or why the event changed nothing ('ignored: ...').
    outcome     text NOT NULL DEFAULT 'applied',
    -- json, not jsonb: kept as sent (for replay), without the cost of converting it per event.
    envelope    json NOT NULL
);
CREATE INDEX inbox_provider_received_idx ON webhook_worker.inbox (provider, received_at);

-- Twilio CallSid -> calls.id, per business, with what the status guard needs:
-- the highest SequenceNumber applied, whether a final status was applied, and
-- the time of the earliest status event seen (the call's start).
CREATE TABLE webhook_worker.twilio_calls (
    business_id    integer NOT NULL,
    call_sid       text NOT NULL,
    call_id        integer REFERENCES public.calls (id) ON DELETE CASCADE,
    last_sequence  bigint,
    reached_final  boolean NOT NULL DEFAULT false,
    transferred    boolean NOT NULL DEFAULT false,
    first_event_at timestamp,
    PRIMARY KEY (business_id, call_sid)
);
CREATE INDEX twilio_calls_call_id_idx ON webhook_worker.twilio_calls (call_id);
