-- Issue 16: storage stays bounded (see docs/adr/0010-bounded-inbox.md).
--
-- Two tables replace the old inbox:
-- - `inbox_keys`: the de-duplication keys, as a 15-byte hash, one small row
--   each, in one table so that a claim is one index probe whatever the
--   retention. Expired keys are deleted in small slices every hour (a day's
--   worth is a few MB); the space is reused by new keys, so it does not grow.
-- - `inbox`: the event log (envelope kept for replay, once and compressed by
--   the worker, kind, outcome, times), partitioned by the UTC day the event was
--   claimed. It has no index at all; a whole day is dropped at once when it
--   expires: no dead rows, a few bytes of WAL.
--
-- The old table is kept as `inbox_legacy`; `micro8gents migrate` copies the
-- rows still within EVENT_RETENTION into the new tables and then drops it.

ALTER TABLE webhook_worker.inbox RENAME TO inbox_legacy;
ALTER INDEX webhook_worker.inbox_pkey RENAME TO inbox_legacy_pkey;
ALTER INDEX webhook_worker.inbox_provider_received_idx RENAME TO inbox_legacy_provider_received_idx;

CREATE TABLE webhook_worker.inbox_keys (
    -- The first 15 bytes of SHA-256 of the event's de-duplication key (with its
    -- length byte, 16: an index entry of exactly 24 bytes)
    -- (webhook_worker.event_key_hash). The key itself is in the envelope.
    key_hash bytea PRIMARY KEY,
    -- The UTC day the event was claimed: when the key expires.
    day      date NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')::date
) WITH (autovacuum_vacuum_scale_factor = 0.02);
-- Finds the expired keys; a few bytes per key (B-tree deduplication of equal days).
CREATE INDEX inbox_keys_day_idx ON webhook_worker.inbox_keys (day);

CREATE TABLE webhook_worker.inbox (
    applied_at  timestamptz NOT NULL DEFAULT now(),
    -- The UTC day the event was claimed: the partition, and so its retention.
    day         date NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')::date,
    business_id integer,
    key_hash    bytea NOT NULL,
    kind        text NOT NULL,
    -- 'applied', or why the event changed nothing ('ignored: ...').
    outcome     text NOT NULL,
    -- The envelope as the worker received it: byte 0 says how it is stored
    -- (0: JSON as is; 1: zstd with the built-in dictionary 1), the rest is the data.
    envelope    bytea NOT NULL
) PARTITION BY RANGE (day);

-- What the worker writes into `key_hash`, for operators and tests:
--   SELECT * FROM webhook_worker.inbox WHERE key_hash = webhook_worker.event_key_hash('stripe:evt_1');
CREATE FUNCTION webhook_worker.event_key_hash(key text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT substring(sha256(convert_to(key, 'UTF8')) FROM 1 FOR 15) $$;

-- The partition of one day.
CREATE FUNCTION webhook_worker.inbox_partition(d date) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT 'inbox_' || to_char(d, 'YYYYMMDD') $$;

-- Creates the partitions of the days from `first` to `last` that are missing;
-- returns how many it created. Callers in several processes are serialised by
-- an advisory lock held until their transaction ends.
CREATE FUNCTION webhook_worker.create_inbox_partitions(first date, last date) RETURNS integer
    LANGUAGE plpgsql AS $$
DECLARE
    d date;
    created integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('webhook_worker.inbox partitions'));
    FOR d IN SELECT generate_series(first, last, interval '1 day')::date LOOP
        IF to_regclass(format('webhook_worker.%I', webhook_worker.inbox_partition(d))) IS NULL THEN
            EXECUTE format('CREATE TABLE webhook_worker.%I PARTITION OF webhook_worker.inbox FOR VALUES FROM (%L) TO (%L)',
                           webhook_worker.inbox_partition(d), d, d + 1);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END $$;

-- The inbox's partitions with the day each holds, oldest first.
CREATE FUNCTION webhook_worker.inbox_partitions() RETURNS TABLE (partition text, day date)
    LANGUAGE sql STABLE AS $$
    SELECT c.relname::text, to_date(substring(c.relname FROM 7), 'YYYYMMDD')
      FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'webhook_worker.inbox'::regclass
       AND c.relname ~ '^inbox_[0-9]{8}$'
     ORDER BY 2
$$;

-- Drops every partition all of whose events were claimed before `cut`, i.e.
-- whose day ends at or before it; returns the days dropped. Nothing else is
-- touched. A partition is dropped whole: no dead rows, a few bytes of WAL.
CREATE FUNCTION webhook_worker.drop_inbox_partitions(cut timestamptz) RETURNS SETOF date
    LANGUAGE plpgsql AS $$
DECLARE
    p record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('webhook_worker.inbox partitions'));
    FOR p IN SELECT * FROM webhook_worker.inbox_partitions() LOOP
        EXIT WHEN p.day >= (cut AT TIME ZONE 'UTC')::date;
        EXECUTE format('DROP TABLE webhook_worker.%I', p.partition);
        RETURN NEXT p.day;
    END LOOP;
END $$;

-- Today (UTC) and the next days exist from the start; the service keeps
-- creating them ahead.
SELECT webhook_worker.create_inbox_partitions((now() AT TIME ZONE 'UTC')::date - 1,
                                              (now() AT TIME ZONE 'UTC')::date + 3);
