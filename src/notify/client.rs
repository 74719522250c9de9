//! The delivery client: one signed POST of one notice, and what came of it.
//!
//! reqwest over rustls with the `ring` provider (no OpenSSL, no C crypto build),
//! a connect timeout and a total timeout of `NOTIFY_TIMEOUT` each, no redirects,
//! no proxy from the environment, and the [`GuardedResolver`] in front of every
//! connection.

use std::time::Duration;

use chrono::Utc;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use url::Url;

use super::classify::{Answer, parse_retry_after};
use super::guard::{GuardedResolver, check_url, refused_in};
use crate::verify::standard_webhooks::{ID_HEADER, SIGNATURE_HEADER, Secret, TIMESTAMP_HEADER, sign};

/// At most this much of an answer's body is read (and thrown away) so that the
/// connection can be kept; a receiver that sends more gets its connection closed.
const ANSWER_BODY_LIMIT: usize = 16 * 1024;
const AGENT: &str = concat!("micro8gents-notify/", env!("CARGO_PKG_VERSION"));

/// One notice on its way: the receiver, the integration's secret, the stable
/// `webhook-id` and the exact body bytes (signed as they are sent).
pub struct Outgoing<'a> {
    pub url: &'a Url,
    pub secret: &'a Secret,
    pub webhook_id: &'a str,
    pub body: &'a str,
}

pub struct Deliverer {
    client: reqwest::Client,
    timeout: Duration,
    allow_private: bool,
}

impl Deliverer {
    pub fn new(timeout: Duration, allow_private: bool) -> Result<Self, reqwest::Error> {
        crate::twilio_api::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(GuardedResolver { allow_private })
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .build()?;
        Ok(Deliverer { client, timeout, allow_private })
    }

    pub fn allow_private(&self) -> bool {
        self.allow_private
    }

    /// Signs with a fresh `webhook-timestamp` (receivers allow ±5 minutes, and a
    /// retry may come hours later) and posts. Never fails: every outcome is an [`Answer`].
    pub async fn send(&self, n: &Outgoing<'_>) -> Answer {
        // Literal addresses never reach the resolver: check them here.
        if let Err(super::guard::UrlProblem::Refused(r)) = check_url(n.url.as_str(), self.allow_private) {
            return Answer::Refused(r);
        }
        let ts = Utc::now().timestamp();
        let signature = sign(n.secret, n.webhook_id, ts, n.body.as_bytes());
        let sent = self
            .client
            .post(n.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, AGENT)
            .header(ID_HEADER, n.webhook_id)
            .header(TIMESTAMP_HEADER, ts.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(n.body.to_string())
            .send()
            .await;
        match sent {
            Ok(mut resp) => {
                let code = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, Utc::now()));
                let mut read = 0;
                while read < ANSWER_BODY_LIMIT {
                    match resp.chunk().await {
                        Ok(Some(chunk)) => read += chunk.len(),
                        _ => break,
                    }
                }
                Answer::Status { code, retry_after }
            }
            Err(e) => match refused_in(&e) {
                Some(r) => Answer::Refused(r),
                None => Answer::NoAnswer { reason: self.describe(e) },
            },
        }
    }

    /// Why there was no answer, without the URL (its path may be a secret).
    fn describe(&self, e: reqwest::Error) -> String {
        let e = e.without_url();
        if e.is_timeout() {
            return format!("no answer within NOTIFY_TIMEOUT ({:?})", self.timeout);
        }
        let mut reason =
            if e.is_connect() { "could not connect".to_string() } else { "the request failed".to_string() };
        let mut cur = std::error::Error::source(&e);
        let mut last = String::new();
        while let Some(cause) = cur {
            let text = cause.to_string();
            if text != last {
                reason.push_str(": ");
                reason.push_str(&text);
            }
            last = text;
            cur = cause.source();
        }
        reason
    }
}
