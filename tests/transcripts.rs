//! Transcripts through the real stack: signed Real-Time Transcription and
//! Intelligence callbacks, RabbitMQ, the worker, Twilio's API (a local stand-in
//! serving its documented shapes) and Postgres.

mod common;

use std::time::Duration;

use common::twilio_api::TwilioStandIn;
use common::{PUBLIC_BASE_URL, TestApp, calls_of};
use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use micro8gents::bus::{ERROR_HEADER, header_str};
use micro8gents::verify::twilio::{Algorithm, compute_signature};
use serde_json::json;
use sha2::Digest;

const ACCOUNT: &str = "AC00000000000000000000000000000001";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const CALL: &str = "CA11111111111111111111111111111111";
const RECORDING: &str = "RE22222222222222222222222222222222";
const GT_A: &str = "GT8fbf72a043b98407a3ce68331cd0030a";
const GT_B: &str = "GT00000000000000000000000000000bbb";
const INTEL: &str = "GT00000000000000000000000000000002";

/// The service with Twilio's APIs pointed at a local stand-in.
async fn spawn() -> (TestApp, TwilioStandIn, i32) {
    let twilio = TwilioStandIn::start(ACCOUNT, TOKEN).await;
    let base = twilio.base.clone();
    let app = TestApp::spawn_with(|v| {
        v.insert("TWILIO_API_URL".into(), base.clone());
        v.insert("TWILIO_INTELLIGENCE_URL".into(), base);
    })
    .await;
    let b = app.business().await;
    app.integration(b, "twilio", json!({"auth_token": TOKEN, "account_sid": ACCOUNT}), "active").await;
    (app, twilio, b)
}

fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// One Real-Time Transcription callback, as Twilio form-encodes it.
fn rt(session: &str, seq: u32, second: u32, event: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut p = owned(&[
        ("AccountSid", ACCOUNT),
        ("CallSid", CALL),
        ("TranscriptionSid", session),
        ("TranscriptionEvent", event),
        ("LanguageCode", "en-US"),
    ]);
    p.push(("SequenceId".into(), seq.to_string()));
    p.push(("Timestamp".into(), format!("2025-11-25T12:00:{second:02}.454203Z")));
    p.extend(owned(extra));
    p
}

fn started(session: &str, second: u32, labels: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut extra = vec![
        ("TranscriptionEngine", "google"),
        ("Track", "both_tracks"),
        ("PartialResults", "true"),
        ("ProviderConfiguration", "{\"profanityFilter\":\"true\",\"speechModel\":\"telephony\"}"),
    ];
    extra.extend_from_slice(labels);
    rt(session, 1, second, "transcription-started", &extra)
}

fn content(session: &str, seq: u32, second: u32, track: &str, text: &str) -> Vec<(String, String)> {
    let data = json!({"transcript": text, "confidence": 0.9956335}).to_string();
    rt(
        session,
        seq,
        second,
        "transcription-content",
        &[("Track", track), ("Final", "true"), ("TranscriptionData", &data)],
    )
}

fn partial(session: &str, seq: u32, second: u32, text: &str) -> Vec<(String, String)> {
    let data = json!({"transcript": text}).to_string();
    let extra = [("Track", "inbound_track"), ("Final", "false"), ("Stability", "0.8"), ("TranscriptionData", &data)];
    rt(session, seq, second, "transcription-content", &extra)
}

async fn post(app: &TestApp, b: i32, endpoint: &str, params: &[(String, String)]) -> u16 {
    let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    app.post_twilio(b, endpoint, TOKEN, &borrowed).await.status().as_u16()
}

/// The same callback with `StatusCallbackMethod=GET`: parameters in the query, the full URL signed.
async fn get(app: &TestApp, b: i32, endpoint: &str, params: &[(String, String)]) -> u16 {
    let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
    let path = format!("/webhooks/twilio/{b}/{endpoint}?{query}");
    let signature = compute_signature(TOKEN, &format!("{PUBLIC_BASE_URL}{path}"), &[], Algorithm::HmacSha1);
    let r = app.http.get(format!("{}{path}", app.base)).header("x-twilio-signature", signature).send().await.unwrap();
    r.status().as_u16()
}

/// The Intelligence webhook as Twilio sends it: JSON, `bodySHA256` in the URL.
async fn post_intelligence(app: &TestApp, b: i32, body: &serde_json::Value) -> u16 {
    let body = body.to_string();
    let hash = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    let path = format!("/webhooks/twilio/{b}/intelligence?bodySHA256={hash}");
    let signature = compute_signature(TOKEN, &format!("{PUBLIC_BASE_URL}{path}"), &[], Algorithm::HmacSha1);
    let headers = [("x-twilio-signature", signature.as_str()), ("content-type", "application/json")];
    app.post_raw(&path, body, &headers).await.status().as_u16()
}

fn available(transcript: &str, customer_key: Option<&str>) -> serde_json::Value {
    json!({"account_sid": ACCOUNT, "service_sid": "GA00000000000000000000000000000001",
           "transcript_sid": transcript, "customer_key": customer_key,
           "event_type": "voice_intelligence_transcript_available", "encryption_credential_sid": null})
}

/// Waits until the call's transcript is `expected`.
async fn transcript_becomes(app: &TestApp, b: i32, expected: &str) {
    app.eventually(&format!("transcript {expected:?}"), || async {
        let rows = calls_of(&app.pool, b).await;
        (rows.len() == 1 && rows[0].transcript.as_deref() == Some(expected)).then_some(())
    })
    .await;
}

async fn outcome(app: &TestApp, key: &str) -> Option<String> {
    sqlx::query_as::<_, (String,)>(
        "SELECT outcome FROM webhook_worker.inbox WHERE key_hash = webhook_worker.event_key_hash($1)",
    )
    .bind(key)
    .fetch_optional(&app.pool)
    .await
    .unwrap()
    .map(|(o,)| o)
}

/// Waits for the next parked calls message; its reason.
async fn next_dead_letter(app: &TestApp) -> String {
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let queue = app.topology().dead_queue(micro8gents::events::Family::Calls);
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), "test".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(15), consumer.next())
        .await
        .expect("a dead letter arrives")
        .unwrap()
        .unwrap();
    d.ack(Default::default()).await.unwrap();
    let reason = header_str(&d.properties, ERROR_HEADER).unwrap_or_default();
    conn.close(200, "bye".into()).await.ok();
    reason
}

// ---- Real-Time Transcription ----------------------------------------------------------------

/// Every event type in order, without labels: the transcript grows with each final
/// segment (the call's row made by the first callback); partials, errors and the
/// stop add nothing.
#[tokio::test]
async fn a_realtime_session_grows_the_transcript_segment_by_segment() {
    let (app, _twilio, b) = spawn().await;
    assert_eq!(post(&app, b, "transcription", &started(GT_A, 1, &[])).await, 204);
    app.settled(1).await;
    let rows = calls_of(&app.pool, b).await;
    assert_eq!((rows.len(), rows[0].status.as_str(), rows[0].transcript.as_deref()), (1, "in-progress", None));

    assert_eq!(post(&app, b, "transcription", &partial(GT_A, 2, 2, "Hel")).await, 204);
    assert_eq!(
        post(&app, b, "transcription", &content(GT_A, 3, 3, "outbound_track", "Hello, this is Sam.")).await,
        204
    );
    transcript_becomes(&app, b, "Agent: Hello, this is Sam.").await;
    assert_eq!(post(&app, b, "transcription", &partial(GT_A, 4, 4, "I'd like")).await, 204);
    let line = "I'd like to book a cleaning.";
    assert_eq!(post(&app, b, "transcription", &content(GT_A, 5, 5, "inbound_track", line)).await, 204);
    let both = "Agent: Hello, this is Sam.\nCustomer: I'd like to book a cleaning.";
    transcript_becomes(&app, b, both).await;

    let error =
        rt(GT_A, 6, 6, "transcription-error", &[("TranscriptionErrorCode", "32651"), ("TranscriptionError", "x")]);
    assert_eq!(post(&app, b, "transcription", &error).await, 204);
    assert_eq!(post(&app, b, "transcription", &rt(GT_A, 7, 7, "transcription-stopped", &[])).await, 204);
    app.settled(5).await;
    let key = format!("twilio:realtime:{b}:{GT_A}:6");
    assert_eq!(outcome(&app, &key).await.as_deref(), Some("ignored: a transcription-error adds no text"));
    // The partials were answered and never carried: five events settled, the two
    // final segments kept as their own rows, the three others in the event log.
    let (logged, segments): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM webhook_worker.inbox), (SELECT count(*) FROM webhook_worker.transcript_segments)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((logged, segments), (3, 2));
    assert_eq!(calls_of(&app.pool, b).await[0].transcript.as_deref(), Some(both));
    app.stop().await;
}

/// Two sessions on one call, with labels on one, arriving reversed and twice: the
/// same transcript as in order, sessions in the order of their first Timestamp.
#[tokio::test]
async fn out_of_order_and_duplicated_segments_of_two_sessions_end_the_same() {
    let (app, _twilio, b) = spawn().await;
    let labels = [("InboundTrackLabel", "Jane (caller)"), ("OutboundTrackLabel", "Sam")];
    let events = [
        started(GT_A, 10, &labels),
        content(GT_A, 2, 11, "outbound_track", "Thanks for calling Acme Dental."),
        content(GT_A, 3, 12, "inbound_track", "Hi, I need a cleaning."),
        rt(GT_A, 4, 13, "transcription-stopped", &[]),
        // A second session started later, without labels.
        started(GT_B, 20, &[]),
        content(GT_B, 2, 21, "inbound_track", "Is Tuesday free?"),
        content(GT_B, 3, 22, "outbound_track", "Tuesday at 3 works."),
    ];
    for e in events.iter().rev().chain(events.iter()) {
        assert_eq!(post(&app, b, "transcription", e).await, 204);
    }
    let expected = "Sam: Thanks for calling Acme Dental.\nJane (caller): Hi, I need a cleaning.\n\
                    Customer: Is Tuesday free?\nAgent: Tuesday at 3 works.";
    transcript_becomes(&app, b, expected).await;
    app.quiet().await;
    // Each event applied once: a segment's own row is its de-duplication record and
    // its log entry (no inbox key, no log row); the session events' are in the inbox.
    let (segments, logged, keys): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM webhook_worker.transcript_segments g
                   JOIN webhook_worker.transcript_sessions s ON s.id = g.session_id WHERE s.business_id = $1),
                (SELECT count(*) FROM webhook_worker.inbox WHERE business_id = $1),
                (SELECT count(*) FROM webhook_worker.inbox_keys)",
    )
    .bind(b)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((segments, logged, keys), (4, 3, 3));
    // Each session's first time is its earliest event's, whatever came first.
    let firsts: Vec<(String, String)> = sqlx::query_as(
        "SELECT session_sid, to_char(first_at, 'HH24:MI:SS') FROM webhook_worker.transcript_sessions
          WHERE business_id = $1 ORDER BY 1",
    )
    .bind(b)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(firsts, [(GT_B.to_string(), "12:00:20".to_string()), (GT_A.to_string(), "12:00:10".to_string())]);
    app.stop().await;
}

/// A batch's segments are written in one statement (`write_segments`): posted all
/// at once with a long `BATCH_WAIT`, a session of segments only (with sender
/// retries among them), and one whose `transcription-started` shares the batch
/// (written one by one, in order), end as if each came alone.
#[tokio::test]
async fn segments_that_share_a_batch_end_as_if_each_came_alone() {
    let twilio = TwilioStandIn::start(ACCOUNT, TOKEN).await;
    let base = twilio.base.clone();
    let app = TestApp::spawn_with(|v| {
        v.insert("TWILIO_API_URL".into(), base.clone());
        v.insert("TWILIO_INTELLIGENCE_URL".into(), base);
        v.insert("BATCH_WAIT".into(), "2s".into());
    })
    .await;
    let b = app.business().await;
    app.integration(b, "twilio", json!({"auth_token": TOKEN, "account_sid": ACCOUNT}), "active").await;
    let lines = ["Hello, Acme Dental.", "Hi, a cleaning please.", "Tuesday?", "Tuesday at 3.", "Great, thanks."];
    let mut events: Vec<_> = lines
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let track = if i % 2 == 0 { "outbound_track" } else { "inbound_track" };
            content(GT_A, i as u32 + 2, 10 + i as u32, track, text)
        })
        .collect();
    // Two sender retries in the same batch.
    events.push(events[1].clone());
    events.push(events[3].clone());
    events.push(started(GT_B, 30, &[("InboundTrackLabel", "Jane")]));
    events.push(content(GT_B, 2, 31, "inbound_track", "One more thing."));
    events.push(content(GT_B, 3, 32, "outbound_track", "Sure."));
    events.push(rt(GT_B, 4, 33, "transcription-stopped", &[]));
    // One batch: 17 events with five more retries, all posted within BATCH_WAIT.
    for i in 0..5 {
        events.push(events[i].clone());
    }
    let answers = futures_util::future::join_all(events.iter().map(|e| post(&app, b, "transcription", e))).await;
    assert!(answers.iter().all(|s| *s == 204), "{answers:?}");
    let expected = "Agent: Hello, Acme Dental.\nCustomer: Hi, a cleaning please.\nAgent: Tuesday?\n\
                    Customer: Tuesday at 3.\nAgent: Great, thanks.\nJane: One more thing.\nAgent: Sure.";
    transcript_becomes(&app, b, expected).await;
    app.quiet().await;
    let (segments, sessions): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM webhook_worker.transcript_segments g
                   JOIN webhook_worker.transcript_sessions s ON s.id = g.session_id WHERE s.business_id = $1),
                (SELECT count(*) FROM webhook_worker.transcript_sessions WHERE business_id = $1)",
    )
    .bind(b)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((segments, sessions), (7, 2));
    let stopped: Vec<(String, bool)> = sqlx::query_as(
        "SELECT session_sid, stopped FROM webhook_worker.transcript_sessions WHERE business_id = $1 ORDER BY 1",
    )
    .bind(b)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(stopped, [(GT_B.to_string(), true), (GT_A.to_string(), false)]);
    assert_eq!(app.counter("micro8gents_events_duplicate_total").await, 7.0, "each retry is a duplicate");
    assert_eq!(app.counter("micro8gents_batches_total{family=\"calls\"}").await, 1.0, "they shared one batch");
    app.stop().await;
}

#[tokio::test]
async fn a_realtime_callback_with_a_bad_field_is_refused_naming_it() {
    let (app, _twilio, b) = spawn().await;
    let mut bad = content(GT_A, 2, 2, "inbound_track", "x");
    for (k, v) in &mut bad {
        if k == "TranscriptionData" {
            *v = "not json".into();
        }
    }
    let borrowed: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = app.post_twilio(b, "transcription", TOKEN, &borrowed).await;
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["field"], "TranscriptionData");
    app.stop().await;
}

// ---- sources ----------------------------------------------------------------------------------

/// `<Record transcribe>` < Real-Time < Intelligence, whatever the arrival order.
#[tokio::test]
async fn a_higher_source_replaces_a_lower_one_and_never_the_reverse() {
    let (app, twilio, b) = spawn().await;
    let record = owned(&[
        ("CallSid", CALL),
        ("TranscriptionSid", "TR33333333333333333333333333333333"),
        ("TranscriptionText", "hello i would like a cleaning"),
        ("TranscriptionStatus", "completed"),
    ]);
    assert_eq!(post(&app, b, "transcription", &record).await, 204);
    transcript_becomes(&app, b, "hello i would like a cleaning").await;
    assert_eq!(post(&app, b, "transcription", &content(GT_A, 2, 2, "inbound_track", "Hello.")).await, 204);
    transcript_becomes(&app, b, "Customer: Hello.").await;

    twilio.add_transcript(
        INTEL,
        "completed",
        Some(CALL),
        Some(RECORDING),
        &[(1, "agent"), (2, "customer")],
        &[(1, "Thanks for calling."), (2, "Hello, I would like a cleaning.")],
    );
    assert_eq!(post_intelligence(&app, b, &available(INTEL, Some(CALL))).await, 204);
    let intelligence = "Agent: Thanks for calling.\nCustomer: Hello, I would like a cleaning.";
    transcript_becomes(&app, b, intelligence).await;

    // Late real-time segments and a late <Record transcribe> change nothing now.
    assert_eq!(post(&app, b, "transcription", &content(GT_A, 3, 3, "outbound_track", "Late.")).await, 204);
    let mut record2 = record.clone();
    record2[1].1 = "TR44444444444444444444444444444444".into();
    assert_eq!(post(&app, b, "transcription", &record2).await, 204);
    app.settled(5).await;
    assert_eq!(calls_of(&app.pool, b).await[0].transcript.as_deref(), Some(intelligence));
    let key = format!("twilio:transcription:{b}:TR44444444444444444444444444444444:completed");
    assert_eq!(outcome(&app, &key).await.as_deref(), Some("ignored: a transcript from a higher source is kept"));
    app.stop().await;
}

// ---- Conversational Intelligence --------------------------------------------------------------

/// `customer_key` is the CallSid; the call has no row yet, so the transcript makes it.
#[tokio::test]
async fn an_intelligence_transcript_keyed_by_call_sid_is_read_from_twilio() {
    let (app, twilio, b) = spawn().await;
    twilio.add_transcript(
        INTEL,
        "completed",
        Some(CALL),
        None,
        &[(1, "agent"), (2, "customer")],
        &[(2, "I'd like to move my appointment."), (1, "Sure, to when?"), (3, "Background noise.")],
    );
    assert_eq!(post_intelligence(&app, b, &available(INTEL, Some(CALL))).await, 204);
    transcript_becomes(
        &app,
        b,
        "Customer: I'd like to move my appointment.\nAgent: Sure, to when?\nSpeaker 3: Background noise.",
    )
    .await;
    let seen = twilio.seen();
    assert!(seen.iter().all(|s| s.basic.as_deref() == Some(format!("{ACCOUNT}:{TOKEN}").as_str())), "{seen:?}");
    assert!(seen.iter().any(|s| s.path == format!("/v2/Transcripts/{INTEL}")));
    assert!(seen.iter().any(|s| s.path == format!("/v2/Transcripts/{INTEL}/Sentences")));
    assert_eq!(calls_of(&app.pool, b).await[0].status, "in-progress");
    app.stop().await;
}

/// `customer_key` is something else: the call is the recording's, known from its
/// recording callback, or else read from Twilio's Recordings resource.
#[tokio::test]
async fn an_intelligence_transcript_of_a_recording_finds_its_call() {
    let (app, twilio, b) = spawn().await;
    // Known: the recording callback came first.
    let recording = owned(&[
        ("CallSid", CALL),
        ("RecordingSid", RECORDING),
        (
            "RecordingUrl",
            "https://api.twilio.com/2010-04-01/Accounts/AC00/Recordings/RE22222222222222222222222222222222",
        ),
        ("RecordingStatus", "completed"),
    ]);
    assert_eq!(post(&app, b, "recording", &recording).await, 204);
    app.settled(1).await;
    twilio.add_transcript(INTEL, "completed", Some("order-42"), Some(RECORDING), &[(1, "agent")], &[(1, "Hello.")]);
    assert_eq!(post_intelligence(&app, b, &available(INTEL, Some("order-42"))).await, 204);
    transcript_becomes(&app, b, "Agent: Hello.").await;
    assert!(!twilio.seen().iter().any(|s| s.path.contains("/Recordings/")), "the recording was known");

    // Unknown: Twilio's API says whose it is.
    let other_call = "CA99999999999999999999999999999999";
    let other_recording = "RE99999999999999999999999999999999";
    let other_intel = "GT00000000000000000000000000000003";
    twilio.add_recording(other_recording, other_call);
    twilio.add_transcript(other_intel, "completed", None, Some(other_recording), &[(2, "customer")], &[(2, "Bye.")]);
    assert_eq!(post_intelligence(&app, b, &available(other_intel, None)).await, 204);
    app.eventually("the second call's transcript", || async {
        let rows = calls_of(&app.pool, b).await;
        rows.iter().any(|r| r.transcript.as_deref() == Some("Customer: Bye.")).then_some(())
    })
    .await;
    let path = format!("/2010-04-01/Accounts/{ACCOUNT}/Recordings/{other_recording}.json");
    assert!(twilio.seen().iter().any(|s| s.path == path));
    assert_eq!(calls_of(&app.pool, b).await.len(), 2);
    app.stop().await;
}

/// Still being made: read again after the retry delays until it is completed.
#[tokio::test]
async fn an_intelligence_transcript_in_progress_is_read_again_later() {
    let (app, twilio, b) = spawn().await;
    twilio.add_transcript(INTEL, "completed", Some(CALL), None, &[(1, "agent")], &[(1, "Done.")]);
    twilio.first_show(INTEL, &["queued", "in-progress"]);
    assert_eq!(post_intelligence(&app, b, &available(INTEL, Some(CALL))).await, 204);
    transcript_becomes(&app, b, "Agent: Done.").await;
    let reads = twilio.seen().iter().filter(|s| s.path == format!("/v2/Transcripts/{INTEL}")).count();
    assert_eq!(reads, 3);
    app.stop().await;
}

#[tokio::test]
async fn an_intelligence_transcript_never_completed_is_parked_with_the_reason() {
    let (app, twilio, b) = spawn().await;
    twilio.add_transcript(INTEL, "in-progress", Some(CALL), None, &[], &[]);
    assert_eq!(post_intelligence(&app, b, &available(INTEL, Some(CALL))).await, 204);
    let reason = next_dead_letter(&app).await;
    assert!(reason.contains("gave up after 3 tries"), "{reason}");
    assert!(reason.contains(&format!("transcript {INTEL} is in-progress, not completed yet")), "{reason}");
    assert!(calls_of(&app.pool, b).await.is_empty());
    app.stop().await;
}

/// Twilio refuses the credentials (401) or knows no such transcript (404): parked
/// at once with the reason; 5xx and 429 are tried again.
#[tokio::test]
async fn twilio_api_refusals_park_and_its_failures_retry() {
    let (app, twilio, b) = spawn().await;
    twilio.add_transcript(INTEL, "completed", Some(CALL), None, &[(1, "agent")], &[(1, "Hi.")]);
    twilio.fail(&format!("/v2/Transcripts/{INTEL}"), &[503, 429]);
    assert_eq!(post_intelligence(&app, b, &available(INTEL, Some(CALL))).await, 204);
    transcript_becomes(&app, b, "Agent: Hi.").await;

    let unknown = "GT0000000000000000000000000000dead";
    assert_eq!(post_intelligence(&app, b, &available(unknown, Some(CALL))).await, 204);
    let reason = next_dead_letter(&app).await;
    assert!(reason.contains("404") && reason.contains(unknown), "{reason}");
    assert!(!reason.contains("gave up after"), "a 404 is parked at once: {reason}");

    sqlx::query("UPDATE integrations SET config = jsonb_set(config::jsonb, '{auth_token}', '\"rotated\"')::json WHERE business_id = $1")
        .bind(b)
        .execute(&app.pool)
        .await
        .unwrap();
    let other = "GT00000000000000000000000000000004";
    twilio.add_transcript(other, "completed", Some(CALL), None, &[], &[(1, "x")]);
    // Signed with the new token now.
    let body = available(other, Some(CALL)).to_string();
    let hash = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    let path = format!("/webhooks/twilio/{b}/intelligence?bodySHA256={hash}");
    let signature = compute_signature("rotated", &format!("{PUBLIC_BASE_URL}{path}"), &[], Algorithm::HmacSha1);
    let headers = [("x-twilio-signature", signature.as_str()), ("content-type", "application/json")];
    assert_eq!(app.post_raw(&path, body, &headers).await.status(), 204);
    let reason = next_dead_letter(&app).await;
    assert!(reason.contains("401") && reason.contains("auth_token"), "{reason}");
    assert!(!reason.contains("rotated") && !reason.contains(TOKEN), "no secret in the reason: {reason}");
    app.stop().await;
}

// ---- GET callbacks ----------------------------------------------------------------------------

/// `StatusCallbackMethod=GET` on every Twilio endpoint.
#[tokio::test]
async fn every_twilio_endpoint_takes_get_callbacks() {
    let (app, twilio, b) = spawn().await;
    let status = owned(&[
        ("CallSid", CALL),
        ("CallStatus", "completed"),
        ("Direction", "inbound"),
        ("From", "+14155552671"),
        ("To", "+15005550006"),
        ("SequenceNumber", "3"),
        ("CallDuration", "125"),
        ("Timestamp", "Tue, 25 Nov 2025 12:02:05 +0000"),
    ]);
    assert_eq!(get(&app, b, "call-status", &status).await, 204);
    let recording = owned(&[
        ("CallSid", CALL),
        ("RecordingSid", RECORDING),
        (
            "RecordingUrl",
            "https://api.twilio.com/2010-04-01/Accounts/AC00/Recordings/RE22222222222222222222222222222222",
        ),
        ("RecordingStatus", "completed"),
    ]);
    assert_eq!(get(&app, b, "recording", &recording).await, 204);
    assert_eq!(get(&app, b, "transcription", &content(GT_A, 2, 2, "inbound_track", "Hi there.")).await, 204);
    app.settled(3).await;
    let row = &calls_of(&app.pool, b).await[0];
    assert_eq!((row.status.as_str(), row.duration.as_deref()), ("completed", Some("2:05")));
    assert!(row.recording.is_some());
    assert_eq!(row.transcript.as_deref(), Some("Customer: Hi there."));

    twilio.add_transcript(INTEL, "completed", Some(CALL), None, &[(2, "customer")], &[(2, "Hi there, again.")]);
    let intel = owned(&[
        ("account_sid", ACCOUNT),
        ("transcript_sid", INTEL),
        ("customer_key", CALL),
        ("event_type", "voice_intelligence_transcript_available"),
    ]);
    assert_eq!(get(&app, b, "intelligence", &intel).await, 204);
    transcript_becomes(&app, b, "Customer: Hi there, again.").await;

    // The signature covers the query: a changed parameter is refused.
    let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(&status).finish();
    let path = format!("/webhooks/twilio/{b}/call-status?{query}");
    let signature = compute_signature(TOKEN, &format!("{PUBLIC_BASE_URL}{path}"), &[], Algorithm::HmacSha1);
    let forged = path.replace("CallDuration=125", "CallDuration=999");
    let r = app.http.get(format!("{}{forged}", app.base)).header("x-twilio-signature", signature).send().await.unwrap();
    assert_eq!(r.status(), 401);
    app.stop().await;
}

// ---- SharedKey signing ------------------------------------------------------------------------

const KEY_ID: &str = "KS00000000000000000000000000000001";
const SHARED: &str = "shared-key-secret-one";
const SHARED_NEW: &str = "shared-key-secret-two";

/// A call-status callback signed as a Webhooks Rule signs it.
async fn post_shared(app: &TestApp, b: i32, key: &str, settings: &str) -> reqwest::Response {
    let params = owned(&[("CallSid", CALL), ("CallStatus", "ringing"), ("SequenceNumber", "0")]);
    let path = format!("/webhooks/twilio/{b}/call-status");
    let alg = if settings.contains("HMAC_SHA1") { Algorithm::HmacSha1 } else { Algorithm::HmacSha256 };
    let signature = compute_signature(key, &format!("{PUBLIC_BASE_URL}{path}"), &params, alg);
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish();
    let headers = [
        ("x-twilio-signature", signature.as_str()),
        ("x-twilio-webhooks-signature-settings", settings),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    app.post_raw(&path, body, &headers).await
}

async fn set_shared_keys(app: &TestApp, b: i32, keys: serde_json::Value) {
    sqlx::query(
        "UPDATE integrations SET config = jsonb_set(config::jsonb, '{shared_keys}', $2::jsonb)::json WHERE business_id = $1",
    )
    .bind(b)
    .bind(keys)
    .execute(&app.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn shared_key_signatures_one_key_a_rotation_and_refusals() {
    let (app, _twilio, b) = spawn().await;
    let settings = format!("key={KEY_ID},algorithm=HMAC_SHA256");

    // The header without a configured key: 401, its own code, counted apart.
    let r = post_shared(&app, b, SHARED, &settings).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "no_shared_key");
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.contains("no_shared_key") && l.contains("call-status") && !l.starts_with('#')),
        "{metrics}"
    );

    // One key.
    set_shared_keys(&app, b, json!([{"id": KEY_ID, "secret": SHARED}])).await;
    assert_eq!(post_shared(&app, b, SHARED, &settings).await.status(), 204);
    // Signed with the auth token while the header says SharedKey: refused.
    assert_eq!(post_shared(&app, b, TOKEN, &settings).await.status(), 401);
    // A wrong key.
    assert_eq!(post_shared(&app, b, "not-the-key", &settings).await.status(), 401);

    // A rotation: two keys; the header names the new one, or one not listed (then both are tried).
    let new_id = "KS00000000000000000000000000000002";
    set_shared_keys(&app, b, json!([{"id": KEY_ID, "secret": SHARED}, {"id": new_id, "secret": SHARED_NEW}])).await;
    let named_new = format!("key={new_id},algorithm=HMAC_SHA256");
    assert_eq!(post_shared(&app, b, SHARED_NEW, &named_new).await.status(), 204);
    assert_eq!(post_shared(&app, b, SHARED, &settings).await.status(), 204);
    let unlisted = "key=KS0000000000000000000000000000ffff,algorithm=HMAC_SHA1";
    assert_eq!(post_shared(&app, b, SHARED_NEW, unlisted).await.status(), 204);
    app.settled(1).await;
    assert_eq!(calls_of(&app.pool, b).await.len(), 1);
    app.stop().await;
}

/// The Intelligence webhook as a form (some setups send it so), and an event
/// type that is not "transcript available": recorded, applies nothing, asks nothing.
#[tokio::test]
async fn an_intelligence_form_webhook_and_other_event_types() {
    let (app, twilio, b) = spawn().await;
    twilio.add_transcript(INTEL, "completed", Some(CALL), None, &[(1, "agent")], &[(1, "From a form.")]);
    let form = owned(&[
        ("account_sid", ACCOUNT),
        ("transcript_sid", INTEL),
        ("customer_key", CALL),
        ("event_type", "voice_intelligence_transcript_available"),
    ]);
    assert_eq!(post(&app, b, "intelligence", &form).await, 204);
    transcript_becomes(&app, b, "Agent: From a form.").await;

    let other = "GT00000000000000000000000000000005";
    let mut body = available(other, Some(CALL));
    body["event_type"] = json!("voice_intelligence_operator_results_available");
    assert_eq!(post_intelligence(&app, b, &body).await, 204);
    app.settled(2).await;
    let key = format!("twilio:intelligence:{b}:{other}");
    assert_eq!(outcome(&app, &key).await.as_deref(), Some("ignored: an Intelligence event type that is not applied"));
    assert!(!twilio.seen().iter().any(|s| s.path.contains(other)));

    let r = app.post_twilio(b, "intelligence", TOKEN, &[("transcript_sid", "GX123")]).await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["field"], "transcript_sid");
    app.stop().await;
}

/// A malformed `config.shared_keys` entry is left out (and said in the log); the
/// well-formed one still verifies.
#[tokio::test]
async fn a_malformed_shared_key_entry_is_left_out() {
    let (app, _twilio, b) = spawn().await;
    let settings = format!("key={KEY_ID},algorithm=HMAC_SHA256");
    set_shared_keys(&app, b, json!("not a list")).await;
    let r = post_shared(&app, b, SHARED, &settings).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "no_shared_key");
    // Fixed a moment later: the refused request's fresh read makes it work at once.
    set_shared_keys(&app, b, json!([{"id": "KSbroken"}, {"secret": "no id"}, {"id": KEY_ID, "secret": SHARED}])).await;
    assert_eq!(post_shared(&app, b, SHARED, &settings).await.status(), 204);
    app.stop().await;
}

/// Retention removes a finished session's segments (issue 16); the call keeps its text,
/// and a duplicate callback arriving after its key was pruned too changes nothing.
#[tokio::test]
async fn pruned_segments_leave_the_transcript_and_a_late_duplicate_changes_nothing() {
    let (app, _twilio, b) = spawn().await;
    let line_2 = content(GT_A, 2, 11, "outbound_track", "Thanks for calling Acme Dental.");
    for e in [
        started(GT_A, 10, &[]),
        line_2.clone(),
        content(GT_A, 3, 12, "inbound_track", "Hi, I need a cleaning."),
        rt(GT_A, 4, 13, "transcription-stopped", &[]),
    ] {
        assert_eq!(post(&app, b, "transcription", &e).await, 204);
    }
    let text = "Agent: Thanks for calling Acme Dental.\nCustomer: Hi, I need a cleaning.";
    transcript_becomes(&app, b, text).await;
    app.settled(4).await;

    // Forty days later: the session and the event keys are past a 30-day retention.
    sqlx::query("UPDATE webhook_worker.transcript_sessions SET seen_at = seen_at - interval '40 days'")
        .execute(&app.pool)
        .await
        .unwrap();
    // The log's rows move to the day 40 days back; their keys expire with that day.
    sqlx::query(
        "SELECT webhook_worker.create_inbox_partitions((now() AT TIME ZONE 'UTC')::date - 40,
                                                       (now() AT TIME ZONE 'UTC')::date - 40)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE webhook_worker.inbox SET day = day - 40").execute(&app.pool).await.unwrap();
    // (The service's own upkeep may do part of it at the same moment: the state is what counts.)
    micro8gents::store::retention::prune(&app.pool, Duration::from_secs(30 * 86_400)).await.unwrap();
    let (segments, pruned_sessions): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM webhook_worker.transcript_segments),
                (SELECT count(*) FROM webhook_worker.transcript_sessions WHERE segments_pruned)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((segments, pruned_sessions), (0, 1));
    assert_eq!(calls_of(&app.pool, b).await[0].transcript.as_deref(), Some(text));

    // Twilio (or a replay) delivers segment 2 again: no segment row remembers it, the session does.
    assert_eq!(post(&app, b, "transcription", &line_2).await, 204);
    let key = format!("twilio:realtime:{b}:{GT_A}:2");
    let late = app.eventually("the late duplicate settled", || async {
        let outcomes: Vec<(String,)> = sqlx::query_as(
            "SELECT outcome FROM webhook_worker.inbox WHERE key_hash = webhook_worker.event_key_hash($1) ORDER BY applied_at",
        )
        .bind(&key)
        .fetch_all(&app.pool)
        .await
        .ok()?;
        // The first delivery's log row went with its day; the late one is logged today.
        (outcomes.len() == 1).then(|| outcomes[0].0.clone())
    })
    .await;
    assert!(late.contains("removed after EVENT_RETENTION"), "{late}");
    assert_eq!(calls_of(&app.pool, b).await[0].transcript.as_deref(), Some(text));
    let (segments,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM webhook_worker.transcript_segments").fetch_one(&app.pool).await.unwrap();
    assert_eq!(segments, 0);
    app.stop().await;
}

/// A segment's row is its log entry: `replay` rebuilds its event as it arrived,
/// and a second environment fed by the replay ends with the same transcript.
#[tokio::test]
async fn a_replay_rebuilds_segments_from_their_rows_for_another_environment() {
    use micro8gents::bus::{Broker, Publisher};
    use micro8gents::events::transcription::{RealtimeKind, Track};
    use micro8gents::events::{BusinessId, Event, Provider};
    use micro8gents::ops::replay;

    let (app, _twilio, b) = spawn().await;
    let labels = [("InboundTrackLabel", "Jane (caller)"), ("OutboundTrackLabel", "Sam")];
    for e in [
        started(GT_A, 10, &labels),
        content(GT_A, 2, 11, "outbound_track", "Thanks for calling Acme Dental."),
        content(GT_A, 3, 12, "inbound_track", "Hi, I need a cleaning."),
        rt(GT_A, 4, 13, "transcription-stopped", &[]),
    ] {
        assert_eq!(post(&app, b, "transcription", &e).await, 204);
    }
    let text = "Sam: Thanks for calling Acme Dental.\nJane (caller): Hi, I need a cleaning.";
    transcript_becomes(&app, b, text).await;
    app.quiet().await;

    // The rebuilt event: what Twilio sent, under the key the ingress gave it.
    let rebuilt: Vec<_> = micro8gents::workers::transcripts::logged_segments(&app.pool, Some(BusinessId(b)), None)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rebuilt.len(), 2);
    assert_eq!(rebuilt[0].key, format!("twilio:realtime:{b}:{GT_A}:2"));
    assert_eq!(rebuilt[0].business_id, Some(BusinessId(b)));
    let Event::TwilioRealtime(e) = &rebuilt[0].event else { panic!("{:?}", rebuilt[0].event) };
    assert_eq!((e.call_sid.as_str(), e.session_sid.as_str(), e.sequence_id), (CALL, GT_A, 2));
    assert_eq!(e.timestamp.unwrap().to_rfc3339(), "2025-11-25T12:00:11.454203+00:00");
    assert_eq!(
        e.kind,
        RealtimeKind::Content {
            track: Some(Track::Outbound),
            is_final: true,
            text: Some("Thanks for calling Acme Dental.".into())
        }
    );
    // Another business's segments, or only those received later, are not replayed.
    let none = micro8gents::workers::transcripts::logged_segments(&app.pool, Some(BusinessId(b + 1)), None);
    assert_eq!(none.collect::<Vec<_>>().await.len(), 0);
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    let none = micro8gents::workers::transcripts::logged_segments(&app.pool, Some(BusinessId(b)), Some(later));
    assert_eq!(none.collect::<Vec<_>>().await.len(), 0);

    // A second environment (its own database and queues) fed by the replay.
    let (staging, _twilio_2, b2) = spawn().await;
    assert_eq!(b2, b, "both environments number their first business alike");
    let broker = std::sync::Arc::new(Broker::new(staging.cfg.amqp_url.expose(), "replay-test", staging.topology()));
    let publisher = Publisher::new(broker.clone(), staging.cfg.publish_timeout);
    let filter = replay::Filter { provider: Provider::Twilio, business: Some(BusinessId(b)), since: None };
    let done = replay::replay(&app.pool, &publisher, &staging.topology(), &filter).await.unwrap();
    assert_eq!((done.published, done.skipped.len()), (4, 0));
    transcript_becomes(&staging, b, text).await;
    broker.close().await;
    staging.stop().await;
    app.stop().await;
}

/// A deployment that kept segments under their session's SID (migration 0009)
/// keeps every one of them under the session's number after migrating.
#[tokio::test]
async fn segments_kept_by_session_sid_move_under_the_session_number() {
    let mut old = common::OldDeployment::at(9, "segments").await;
    let (db, cfg, url) = (&mut old.conn, old.cfg.clone(), old.url.clone());
    // Two businesses whose sessions happen to share a SID: each keeps its own segments.
    for (business, texts) in [(7, ["Hello", "Hi there"]), (8, ["Other", "Business"])] {
        sqlx::query(
            "INSERT INTO webhook_worker.transcript_sessions (business_id, session_sid, call_sid, first_at)
             VALUES ($1, $2, $3, now())",
        )
        .bind(business)
        .bind(GT_A)
        .bind(CALL)
        .execute(&mut *db)
        .await
        .unwrap();
        for (seq, text) in texts.iter().enumerate() {
            sqlx::query(
                "INSERT INTO webhook_worker.transcript_segments (sequence_id, business_id, outbound, session_sid, text)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(seq as i64 + 2)
            .bind(business)
            .bind(seq == 1)
            .bind(GT_A)
            .bind(*text)
            .execute(&mut *db)
            .await
            .unwrap();
        }
    }

    micro8gents::store::migrate(&cfg).await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let rows: Vec<(i32, String, i64, bool, String)> = sqlx::query_as(
        "SELECT s.business_id, s.session_sid, g.sequence_id, g.outbound, g.text
           FROM webhook_worker.transcript_segments g JOIN webhook_worker.transcript_sessions s ON s.id = g.session_id
          ORDER BY 1, 3",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let row = |b: i32, seq: i64, out: bool, text: &str| (b, GT_A.to_string(), seq, out, text.to_string());
    assert_eq!(
        rows,
        vec![
            row(7, 2, false, "Hello"),
            row(7, 3, true, "Hi there"),
            row(8, 2, false, "Other"),
            row(8, 3, true, "Business")
        ]
    );
    pool.close().await;
    old.drop_database().await;
}
