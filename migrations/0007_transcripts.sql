-- Transcripts from Real-Time Transcription and Conversational Intelligence
-- (CONTRACT section 4). The pieces are kept here, in the worker's schema, and
-- public.calls.transcript is recomputed from them, so the text does not depend
-- on the order the callbacks arrive in.

-- Which source the call's stored transcript came from: 'record' (<Record
-- transcribe>) < 'realtime' < 'intelligence'. A lower one never replaces a higher one.
ALTER TABLE webhook_worker.twilio_calls ADD COLUMN transcript_source text;

-- One Real-Time Transcription session (TranscriptionSid, GT...) of a call: the
-- earliest Timestamp among its events (sessions are ordered by it), the track
-- labels of its transcription-started event, and whether it has stopped.
CREATE TABLE webhook_worker.transcript_sessions (
    business_id    integer NOT NULL,
    session_sid    text NOT NULL,
    call_sid       text NOT NULL,
    first_at       timestamp NOT NULL,
    inbound_label  text,
    outbound_label text,
    stopped        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (business_id, session_sid)
);
CREATE INDEX transcript_sessions_call_idx ON webhook_worker.transcript_sessions (business_id, call_sid);

-- Every final segment with text, once per (session, SequenceId).
CREATE TABLE webhook_worker.transcript_segments (
    business_id integer NOT NULL,
    session_sid text NOT NULL,
    sequence_id bigint NOT NULL,
    call_sid    text NOT NULL,
    track       text NOT NULL CHECK (track IN ('inbound_track', 'outbound_track')),
    text        text NOT NULL,
    PRIMARY KEY (business_id, session_sid, sequence_id)
);
CREATE INDEX transcript_segments_call_idx ON webhook_worker.transcript_segments (business_id, call_sid);

-- An Intelligence transcript read from Twilio's API, with its call; a call's
-- newest one (by Twilio's date_created) is the one shown.
CREATE TABLE webhook_worker.intelligence_transcripts (
    business_id    integer NOT NULL,
    transcript_sid text NOT NULL,
    call_sid       text NOT NULL,
    date_created   text,
    fetched_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (business_id, transcript_sid)
);
CREATE INDEX intelligence_transcripts_call_idx ON webhook_worker.intelligence_transcripts (business_id, call_sid);

-- Its sentences, each with the label decided from the transcript's participants.
CREATE TABLE webhook_worker.intelligence_sentences (
    business_id    integer NOT NULL,
    transcript_sid text NOT NULL,
    sentence_index bigint NOT NULL,
    label          text NOT NULL,
    text           text NOT NULL,
    PRIMARY KEY (business_id, transcript_sid, sentence_index)
);

-- RecordingSid -> CallSid, from recording callbacks: an Intelligence transcript
-- of a recording finds its call here before asking Twilio's API.
CREATE TABLE webhook_worker.twilio_recordings (
    business_id   integer NOT NULL,
    recording_sid text NOT NULL,
    call_sid      text NOT NULL,
    PRIMARY KEY (business_id, recording_sid)
);
