-- Issue 16: fewer bytes per event in the inbox (docs/adr/0010-bounded-inbox.md,
-- "Later: the kind as an enum, keys without a day").
--
-- - The log's `kind` was text: 12 to 30 bytes in every row (the commonest,
--   `twilio_realtime_transcription`, 30). An enum is 4 bytes and reads the same:
--   `WHERE kind = 'stripe_invoice'` works as before (`starts_with` needs `kind::text`).
--   A new event kind is a new value here (`ALTER TYPE ... ADD VALUE`), checked
--   against the code's list (`Event::KINDS`) by the tests.
-- - A key's `day` (4 bytes, 8 with alignment, and an index of ~13 bytes per key)
--   said when it expires. The log's partition of the same day already says it:
--   a key and its log row are written in one transaction, on the same day. So
--   retention deletes the keys listed in a day's partition, then drops it.

CREATE TYPE webhook_worker.event_kind AS ENUM (
    'twilio_call_status',
    'twilio_recording',
    'twilio_transcription',
    'twilio_realtime_transcription',
    'twilio_intelligence_transcript',
    'n8n_booking',
    'stripe_subscription',
    'stripe_checkout_session',
    'stripe_invoice',
    'stripe_other'
);

ALTER TABLE webhook_worker.inbox
    ALTER COLUMN kind TYPE webhook_worker.event_kind USING kind::webhook_worker.event_kind;

-- A key whose day has no partition any more (its log was dropped without it, by
-- hand) would never expire once `day` is gone: those go now.
DELETE FROM webhook_worker.inbox_keys k
 WHERE k.day < COALESCE((SELECT min(day) FROM webhook_worker.inbox_partitions()), k.day + 1);

DROP INDEX webhook_worker.inbox_keys_day_idx;
ALTER TABLE webhook_worker.inbox_keys DROP COLUMN day;
-- Dropping a column leaves its bytes in every row until the row is rewritten
-- (CLUSTER rewrites it in a transaction, which VACUUM FULL cannot).
CLUSTER webhook_worker.inbox_keys USING inbox_keys_pkey;
ALTER TABLE webhook_worker.inbox_keys SET WITHOUT CLUSTER;

-- Deletes the keys of the events logged in pages [first_page, first_page + pages)
-- of one day's partition of the log (a slice read by a TID range scan: no index
-- needed); returns how many it deleted. Retention runs it slice by slice over a
-- partition, each slice its own short transaction, then drops the partition.
CREATE FUNCTION webhook_worker.delete_keys_of_logged(part text, first_page bigint, pages bigint) RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    deleted bigint;
BEGIN
    IF part !~ '^inbox_[0-9]{8}$' THEN
        RAISE EXCEPTION 'not a partition of the event log: %', part;
    END IF;
    EXECUTE format(
        'DELETE FROM webhook_worker.inbox_keys WHERE key_hash IN (
             SELECT key_hash FROM webhook_worker.%I WHERE ctid >= %L::tid AND ctid < %L::tid)',
        part, format('(%s,0)', first_page), format('(%s,0)', first_page + pages));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END $$;
