-- Issue 16: a Real-Time Transcription segment is kept once (docs/adr/0015-lean-segments.md,
-- "A segment is its own log entry").
--
-- A final segment's row already held everything its event carried but two times:
-- its session (business, SIDs: the session row), SequenceId, track and text. Its
-- event-log row repeated all of it, compressed, for replay: ~250 bytes per
-- segment, most of a call's callbacks. With the two times here, `replay` rebuilds
-- the envelope from the rows, and a segment applied from now on leaves no log row.
--
-- `received_at` NULL: a segment applied before this migration, whose event is in
-- the log (replay takes it from there, not twice).

ALTER TABLE webhook_worker.transcript_segments
    -- When the ingress accepted the callback (the envelope's `received_at`).
    ADD COLUMN received_at timestamptz,
    -- Twilio's `Timestamp` (the event's `timestamp`), when it sent it.
    ADD COLUMN sent_at timestamptz;
