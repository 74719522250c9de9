//! The Twilio REST client against a local stand-in of Twilio's API.

mod common;

use std::time::Duration;

use common::twilio_api::TwilioStandIn;
use micro8gents::config::Secret;
use micro8gents::twilio_api::{ApiFailure, Credentials, TwilioApi, USER_AGENT};

const ACCOUNT: &str = "AC00000000000000000000000000000001";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const GT: &str = "GT00000000000000000000000000000002";
const CALL: &str = "CA11111111111111111111111111111111";
const RECORDING: &str = "RE22222222222222222222222222222222";

fn creds(token: &str) -> Credentials {
    Credentials { account_sid: ACCOUNT.into(), auth_token: Secret::new(token) }
}

fn client(stand_in: &TwilioStandIn) -> TwilioApi {
    TwilioApi::new(&stand_in.base, &stand_in.base, Duration::from_secs(5)).unwrap()
}

#[tokio::test]
async fn reads_a_transcript_and_every_page_of_its_sentences() {
    let twilio = TwilioStandIn::start(ACCOUNT, TOKEN).await;
    let lines: Vec<String> = (0..2500).map(|i| format!("sentence {i}")).collect();
    let sentences: Vec<(i64, &str)> = lines.iter().enumerate().map(|(i, s)| (1 + (i % 2) as i64, s.as_str())).collect();
    twilio.add_transcript(GT, "completed", Some(CALL), Some(RECORDING), &[(1, "agent"), (2, "customer")], &sentences);
    let api = client(&twilio);
    let t = api.transcript(&creds(TOKEN), GT).await.unwrap();
    assert_eq!((t.status.as_str(), t.customer_key.as_deref()), ("completed", Some(CALL)));
    let channel = t.channel.unwrap();
    assert_eq!(channel.media_properties.unwrap().source_sid.as_deref(), Some(RECORDING));
    assert_eq!(channel.participants[1].role.as_deref(), Some("customer"));
    let got = api.sentences(&creds(TOKEN), GT).await.unwrap();
    assert_eq!(got.len(), 2500);
    assert!(got.iter().enumerate().all(|(i, s)| s.sentence_index == i as i64 && s.transcript == lines[i]));
    let seen = twilio.seen();
    let pages: Vec<_> = seen.iter().filter(|s| s.path.ends_with("/Sentences")).collect();
    assert_eq!(pages.len(), 3, "1000 a page, followed to the end: {pages:?}");
    assert!(pages[1].query.contains("PageToken="), "{pages:?}");
    for s in &seen {
        assert_eq!(s.user_agent.as_deref(), Some(USER_AGENT));
        assert_eq!(s.basic.as_deref(), Some(format!("{ACCOUNT}:{TOKEN}").as_str()));
    }
}

#[tokio::test]
async fn reads_the_call_of_a_recording() {
    let twilio = TwilioStandIn::start(ACCOUNT, TOKEN).await;
    twilio.add_recording(RECORDING, CALL);
    let api = client(&twilio);
    assert_eq!(api.recording_call_sid(&creds(TOKEN), RECORDING).await.unwrap(), CALL);
    let missing = api.recording_call_sid(&creds(TOKEN), "RE99999999999999999999999999999999").await;
    assert!(matches!(missing, Err(ApiFailure::Park(ref r)) if r.contains("404")), "{missing:?}");
}

#[tokio::test]
async fn wrong_credentials_and_unknown_sids_park() {
    let twilio = TwilioStandIn::start(ACCOUNT, TOKEN).await;
    twilio.add_transcript(GT, "completed", None, None, &[], &[]);
    let api = client(&twilio);
    let Err(ApiFailure::Park(reason)) = api.transcript(&creds("wrong-token"), GT).await else { panic!() };
    assert!(reason.contains("401") && reason.contains("auth_token"), "{reason}");
    assert!(!reason.contains("wrong-token"), "{reason}");
    let Err(ApiFailure::Park(reason)) = api.transcript(&creds(TOKEN), "GT99999999999999999999999999999999").await
    else {
        panic!()
    };
    assert!(reason.contains("404"), "{reason}");
}

#[tokio::test]
async fn busy_or_failing_twilio_is_retried_later() {
    let twilio = TwilioStandIn::start(ACCOUNT, TOKEN).await;
    twilio.add_transcript(GT, "completed", None, None, &[], &[(1, "Hi.")]);
    twilio.fail("/v2/Transcripts", &[429, 503]);
    let api = client(&twilio);
    for expected in ["429", "503"] {
        let Err(ApiFailure::Retry(reason)) = api.transcript(&creds(TOKEN), GT).await else { panic!() };
        assert!(reason.contains(expected), "{reason}");
    }
    assert_eq!(api.sentences(&creds(TOKEN), GT).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_silent_or_absent_twilio_is_retried_later() {
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            open.push(c);
        }
    });
    let api = TwilioApi::new(&base, &base, Duration::from_millis(300)).unwrap();
    let Err(ApiFailure::Retry(reason)) = api.transcript(&creds(TOKEN), GT).await else { panic!() };
    assert!(reason.contains("timed out"), "{reason}");
    held.abort();
    // Nothing listens here any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let api = TwilioApi::new(&base, &base, Duration::from_secs(2)).unwrap();
    let Err(ApiFailure::Retry(reason)) = api.transcript(&creds(TOKEN), GT).await else { panic!() };
    assert!(reason.contains("connect"), "{reason}");
}
