//! W3C trace context, carried from the incoming request through the AMQP header
//! `traceparent` into the worker's span, and exported over OTLP only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! The ids are kept here, not taken from the OpenTelemetry layer, so that the
//! trace id reaches the logs and the worker whether or not a collector is set:
//! a request's incoming `traceparent` is continued, and a request without one
//! starts a new trace.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header name, on HTTP and on AMQP messages.
pub const TRACEPARENT: &str = "traceparent";

/// One hop of a trace: the trace, this hop's span, and whether the trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` value (version 00, or a later version read as 00 as the spec asks).
    pub fn parse(raw: &str) -> Option<TraceParent> {
        let raw = raw.trim();
        let mut parts = raw.split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
        let span_id = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
        let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
        Some(TraceParent { trace_id, span_id, sampled })
    }

    /// A new trace, sampled.
    pub fn new_root() -> TraceParent {
        TraceParent { trace_id: TraceId::from(uuid::Uuid::new_v4().as_u128()), span_id: new_span_id(), sampled: true }
    }

    /// The next hop of the same trace.
    pub fn child(&self) -> TraceParent {
        TraceParent { span_id: new_span_id(), ..*self }
    }

    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }

    fn remote_context(&self) -> opentelemetry::Context {
        let flags = if self.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let sc = SpanContext::new(self.trace_id, self.span_id, flags, true, TraceState::default());
        opentelemetry::Context::new().with_remote_span_context(sc)
    }

    /// The hop `span` is: in an exported trace (with OTLP) the span's own ids, as a
    /// child of `parent` if there is one; otherwise `parent`'s trace with a new span
    /// id, or a new trace.
    pub fn of_span(span: &tracing::Span, parent: Option<TraceParent>) -> TraceParent {
        if let Some(p) = parent {
            let _ = span.set_parent(p.remote_context());
        }
        let own = span.context().span().span_context().clone();
        if own.is_valid() && parent.is_none_or(|p| p.trace_id == own.trace_id()) {
            return TraceParent { trace_id: own.trace_id(), span_id: own.span_id(), sampled: own.is_sampled() };
        }
        parent.map_or_else(TraceParent::new_root, |p| p.child())
    }
}

fn new_span_id() -> SpanId {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let id = SpanId::from_bytes(bytes[..8].try_into().expect("8 bytes"));
    if id == SpanId::INVALID { SpanId::from_bytes([0, 0, 0, 0, 0, 0, 0, 1]) } else { id }
}

tokio::task_local! {
    /// The hop of the request being handled, for the publisher to pass on.
    static CURRENT: TraceParent;
}

/// Runs `f` with `hop` as the current request's trace hop.
pub async fn scope<F: Future>(hop: TraceParent, f: F) -> F::Output {
    CURRENT.scope(hop, f).await
}

/// The current request's hop, if inside [`scope`].
pub fn current() -> Option<TraceParent> {
    CURRENT.try_with(|t| *t).ok()
}

/// The OTLP exporter, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. Must be called outside the async
/// runtime: the exporter's HTTP client blocks on a thread of its own.
pub fn otlp_provider() -> Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>, String> {
    let value = |name: &'static str| std::env::var(name).ok().filter(|v| !v.trim().is_empty()).map(|v| (name, v));
    let Some((name, endpoint)) =
        value("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| value("OTEL_EXPORTER_OTLP_ENDPOINT"))
    else {
        return Ok(None);
    };
    // The exporter is built without TLS (no OpenSSL, no C crypto in the image): an
    // https endpoint would fail on every export, so it is refused at start instead.
    if !endpoint.trim().to_ascii_lowercase().starts_with("http://") {
        return Err(format!(
            "invalid setting {name}: must be an http:// endpoint, e.g. a collector beside the service \
             (http://otel-collector:4318); https is not supported by this build"
        ));
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        // The SDK's message may quote the values, and OTEL_EXPORTER_OTLP_HEADERS often holds an API key.
        .map_err(|_| {
            "invalid setting OTEL_EXPORTER_OTLP_ENDPOINT: not a usable OTLP/HTTP endpoint, or another \
             OTEL_EXPORTER_OTLP_* setting is malformed (values not shown)"
                .to_string()
        })?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("micro8gents").build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    Ok(Some(provider))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specs_example_round_trips() {
        let raw = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(raw).unwrap();
        assert!(t.sampled);
        assert_eq!(t.header(), raw);
        let child = t.child();
        assert_eq!(child.trace_id, t.trace_id);
        assert_ne!(child.span_id, t.span_id);
    }

    #[test]
    fn malformed_values_are_refused() {
        for raw in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(TraceParent::parse(raw).is_none(), "{raw}");
        }
        // A later version may carry more fields.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x").is_some());
    }

    #[test]
    fn new_roots_are_valid_and_distinct() {
        let (a, b) = (TraceParent::new_root(), TraceParent::new_root());
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(TraceParent::parse(&a.header()), Some(a));
    }
}
