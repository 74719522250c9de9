-- Issue 16: a Real-Time Transcription segment is most of a call's callbacks, so
-- every byte of its row counts (docs/adr/0015-lean-segments.md, "Later").
--
-- A segment named its session by (business_id, session_sid): 4 + 35 bytes in
-- the row and again in every primary-key entry (56-byte index entries). The
-- session row gets a number; a segment keeps that number (8 bytes) instead, so a
-- segment's index entry is 24 bytes and its row ~30 bytes smaller. The session
-- row still holds the business and the SID, so a segment is only ever reached
-- through its business's session.

ALTER TABLE webhook_worker.transcript_sessions
    ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY,
    ADD CONSTRAINT transcript_sessions_id_key UNIQUE (id);

CREATE TABLE webhook_worker.transcript_segments_by_id (
    session_id  bigint  NOT NULL,
    sequence_id bigint  NOT NULL,
    outbound    boolean NOT NULL,
    text        text    NOT NULL,
    PRIMARY KEY (session_id, sequence_id)
);
INSERT INTO webhook_worker.transcript_segments_by_id (session_id, sequence_id, outbound, text)
SELECT s.id, g.sequence_id, g.outbound, g.text
  FROM webhook_worker.transcript_segments g
  JOIN webhook_worker.transcript_sessions s ON s.business_id = g.business_id AND s.session_sid = g.session_sid;
DROP TABLE webhook_worker.transcript_segments;
ALTER TABLE webhook_worker.transcript_segments_by_id RENAME TO transcript_segments;
ALTER INDEX webhook_worker.transcript_segments_by_id_pkey RENAME TO transcript_segments_pkey;
