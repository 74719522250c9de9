-- Issue 16: a Real-Time Transcription segment is a row per accepted event, so it
-- must be small and must not stay forever (docs/adr/0015-lean-segments.md).
--
-- - The segment no longer repeats its call (the session row says it) nor names
--   its track in text: one boolean. Its index by call goes; a call's segments
--   are found through its sessions and the primary key.
-- - Retention removes the segments of sessions first seen before the cut
--   (EVENT_RETENTION) and marks the session `segments_pruned`: the session row
--   (one per call) stays as a tombstone, so a late duplicate of a pruned
--   session's callback changes nothing instead of rebuilding the call's text
--   from one segment.

CREATE TABLE webhook_worker.transcript_segments_lean (
    sequence_id bigint  NOT NULL,
    business_id integer NOT NULL,
    outbound    boolean NOT NULL,
    session_sid text    NOT NULL,
    text        text    NOT NULL,
    PRIMARY KEY (business_id, session_sid, sequence_id)
);
INSERT INTO webhook_worker.transcript_segments_lean (sequence_id, business_id, outbound, session_sid, text)
SELECT sequence_id, business_id, track = 'outbound_track', session_sid, text
  FROM webhook_worker.transcript_segments;
DROP TABLE webhook_worker.transcript_segments;
ALTER TABLE webhook_worker.transcript_segments_lean RENAME TO transcript_segments;
ALTER INDEX webhook_worker.transcript_segments_lean_pkey RENAME TO transcript_segments_pkey;

ALTER TABLE webhook_worker.transcript_sessions
    ADD COLUMN segments_pruned boolean NOT NULL DEFAULT false,
    -- When the worker first saw the session: its retention runs from here, not from
    -- the sender's Timestamp (first_at), which a skewed clock could put far back.
    ADD COLUMN seen_at timestamptz NOT NULL DEFAULT now();
-- Finds the sessions whose segments retention is due to remove; a session leaves it when pruned.
CREATE INDEX transcript_sessions_unpruned_idx ON webhook_worker.transcript_sessions (seen_at) WHERE NOT segments_pruned;
