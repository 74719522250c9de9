//! Every refusal the ingress gives, mapped once to its HTTP answer (CONTRACT section 3).
//! Bodies are `{"error": code, "message": sentence}`; nothing secret, no SQL, no trace.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::events::FieldError;
use crate::verify::VerifyError;

/// Seconds a sender is asked to wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no business has this id")]
    UnknownBusiness,
    #[error("the business has no active {0} integration")]
    NoActiveIntegration(&'static str),
    #[error("{0}")]
    Signature(#[from] VerifyError),
    #[error("the body is larger than the {0}-byte limit")]
    TooLarge(usize),
    #[error("the body did not arrive within {0} s")]
    BodyTimeout(f64),
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Invalid(#[from] FieldError),
    /// The detail (which broker or database error) is logged where it happens, never answered.
    #[error("the event cannot be durably accepted right now: {0}")]
    Unavailable(&'static str),
    #[error("the endpoint is not configured: {0}")]
    NotConfigured(&'static str),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::UnknownBusiness | ApiError::NoActiveIntegration(_) | ApiError::NotConfigured(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Signature(_) => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::UnknownBusiness => "unknown_business",
            ApiError::NoActiveIntegration(_) => "no_active_integration",
            ApiError::Signature(e) => e.code(),
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::BodyTimeout(_) => "request_timeout",
            ApiError::Malformed(_) => "malformed_body",
            ApiError::Invalid(_) => "invalid_field",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::NotConfigured(_) => "not_configured",
        }
    }

    /// The reason counted in logs and metrics, by family of refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::UnknownBusiness | ApiError::NoActiveIntegration(_) | ApiError::NotConfigured(_) => {
                "unknown_business"
            }
            ApiError::Signature(VerifyError::TimestampOutOfTolerance(_)) => "timestamp",
            // Counted apart: the business must add its Webhooks Rule's key to config.shared_keys.
            ApiError::Signature(VerifyError::NoSharedKey) => "no_shared_key",
            ApiError::Signature(_) => "signature",
            ApiError::TooLarge(_) => "too_large",
            ApiError::BodyTimeout(_) => "timeout",
            ApiError::Malformed(_) | ApiError::Invalid(_) => "validation",
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    fn message(&self) -> String {
        match self {
            // The detail (broker or database error) goes to the log, not to the sender.
            ApiError::Unavailable(_) => "the event cannot be durably accepted right now; retry later".into(),
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code(), "message": self.message() });
        if let ApiError::Invalid(f) = &self {
            body["field"] = json!(f.field);
            body["rule"] = json!(f.rule);
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
        if matches!(self, ApiError::Unavailable(_)) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}
