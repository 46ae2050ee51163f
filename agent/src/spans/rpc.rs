//! gRPC exchanges (HTTP/2 with `content-type: application/grpc*`) to spans,
//! following the OpenTelemetry RPC semantic conventions: the span is named
//! `{package.Service}/{Method}`, carries `rpc.system`, `rpc.service`,
//! `rpc.method` and `rpc.grpc.status_code`, and its status follows the gRPC
//! rules (a client span fails on any code but OK; a server span only on the
//! codes that mean the server failed). `grpc-message` and messages are never
//! exported.

use std::borrow::Cow;
use std::sync::Arc;

use compact_str::{CompactString, ToCompactString};

use super::clock::Clock;
use super::http::{TlsSpanInfo, exchange_span, split_host};
use super::model::{Attribute, Resource, Span, SpanKind, SpanStatus};
use crate::connections::Connection;
use crate::protocols::exchange::{Exchange, Side, grpc_path};

/// gRPC status codes by number (google.golang.org/grpc/codes).
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Codes for which a server span is an error (the server, not the caller,
/// failed): UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
/// UNAVAILABLE, DATA_LOSS.
fn server_error(code: u32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

pub fn code_name(code: u32) -> Option<&'static str> {
    CODE_NAMES.get(code as usize).copied()
}

const RPC_ATTRIBUTES: usize = 14;

/// The span of one gRPC call; see [`super::http::build`] for the arguments
/// (ids are left zero for the caller to stamp).
pub fn build(
    extra: usize,
    ex: &mut Exchange,
    conn: &Connection,
    tls: Option<TlsSpanInfo>,
    start_ns: u64,
    resource: Arc<Resource>,
    clock: &Clock,
) -> Span {
    let mut attributes = Vec::with_capacity(RPC_ATTRIBUTES + extra);
    attributes.push(Attribute::str("rpc.system", "grpc"));
    let name: Cow<'static, str> = match grpc_path(&ex.path) {
        Some((service, method)) => {
            attributes.push(Attribute::str("rpc.service", CompactString::from(service)));
            attributes.push(Attribute::str("rpc.method", CompactString::from(method)));
            Cow::Owned(ex.path[1..].to_string())
        }
        None => Cow::Borrowed("grpc"),
    };
    let (kind, server_side_addr) = match ex.side {
        Side::Server => (SpanKind::Server, conn.local),
        Side::Client => (SpanKind::Client, conn.peer),
    };
    let (host_name, host_port) = ex.host.as_deref().map(split_host).unwrap_or(("", None));
    let server_address =
        if host_name.is_empty() { server_side_addr.ip().to_compact_string() } else { CompactString::from(host_name) };
    attributes.push(Attribute::str("server.address", server_address));
    attributes.push(Attribute::int("server.port", host_port.unwrap_or(server_side_addr.port()) as i64));
    attributes.push(Attribute::str("network.peer.address", conn.peer_ip_text.clone()));
    attributes.push(Attribute::int("network.peer.port", conn.peer.port() as i64));
    attributes.push(Attribute::str("network.protocol.name", "http"));
    attributes.push(Attribute::str("network.protocol.version", ex.version.as_str()));
    if let Some(tls) = tls {
        tls.add_attributes(&mut attributes);
    }
    let mut status = SpanStatus::Unset;
    if let Some(code) = ex.grpc_status {
        attributes.push(Attribute::int("rpc.grpc.status_code", code as i64));
        let failed = match ex.side {
            Side::Client => code != 0,
            Side::Server => server_error(code),
        };
        if failed {
            let label = code_name(code).map(CompactString::from).unwrap_or_else(|| code.to_compact_string());
            status = SpanStatus::Error { message: format!("gRPC {label}") };
            attributes.push(Attribute::str("error.type", label));
        }
    } else if let Some(http) = ex.status.filter(|s| *s != 200) {
        // No gRPC status at all: the HTTP/2 layer answered (a proxy's 502,
        // a 404 for an unknown path on a non-gRPC server).
        attributes.push(Attribute::int("http.response.status_code", http as i64));
        if ex.side == Side::Client || http >= 500 {
            status = SpanStatus::Error { message: format!("HTTP {http}") };
            attributes.push(Attribute::str("error.type", http.to_compact_string()));
        }
    }
    if let Some(reason) = ex.incomplete {
        attributes.push(Attribute::str("periscope.incomplete", reason));
    }
    exchange_span(ex, name, kind, start_ns, attributes, status, resource, clock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connections::ProtocolState;
    use crate::protocols::exchange::HttpVersion;
    use crate::spans::model::AttrValue;

    fn exchange(side: Side, grpc_status: Option<u32>) -> Exchange {
        Exchange {
            side,
            method: "POST".into(),
            path: "/demo.Greeter/SayHello".into(),
            has_query: false,
            version: HttpVersion::Http2,
            host: Some("greeter.local:50051".into()),
            user_agent: Some("grpc-python/1.51".into()),
            traceparent: None,
            request_content_length: None,
            grpc: true,
            grpc_status,
            status: Some(200),
            request_body_bytes: 12,
            response_body_bytes: 12,
            request_start_ns: 1_000,
            request_end_ns: 2_000,
            response_start_ns: Some(3_000),
            response_end_ns: Some(9_000),
            incomplete: None,
            seq: 1,
        }
    }

    fn conn(local: &str, peer: &str) -> Connection {
        Connection::new(10, local.parse().unwrap(), peer.parse().unwrap(), ProtocolState::Ignored, 0)
    }

    fn resource() -> Arc<Resource> {
        Arc::new(Resource { pid: 10, attributes: vec![Attribute::str("service.name", "greeter")] })
    }

    #[test]
    fn client_call_attributes_and_status() {
        let c = conn("127.0.0.1:40000", "127.0.0.1:50051");
        let ok = build(0, &mut exchange(Side::Client, Some(0)), &c, None, u64::MAX, resource(), &Clock::new());
        assert_eq!(ok.name, "demo.Greeter/SayHello");
        assert_eq!(ok.kind, SpanKind::Client);
        assert_eq!(ok.attr("rpc.system"), Some(&AttrValue::Str("grpc".into())));
        assert_eq!(ok.attr("rpc.service"), Some(&AttrValue::Str("demo.Greeter".into())));
        assert_eq!(ok.attr("rpc.method"), Some(&AttrValue::Str("SayHello".into())));
        assert_eq!(ok.attr("rpc.grpc.status_code"), Some(&AttrValue::Int(0)));
        assert_eq!(ok.attr("server.address"), Some(&AttrValue::Str("greeter.local".into())));
        assert_eq!(ok.attr("server.port"), Some(&AttrValue::Int(50051)));
        assert_eq!(ok.status, SpanStatus::Unset);
        assert_eq!(ok.end_unix_nano - ok.start_unix_nano, 8_000);
        let not_found = build(0, &mut exchange(Side::Client, Some(5)), &c, None, u64::MAX, resource(), &Clock::new());
        assert!(matches!(not_found.status, SpanStatus::Error { .. }));
        assert_eq!(not_found.attr("error.type"), Some(&AttrValue::Str("NOT_FOUND".into())));
    }

    #[test]
    fn server_fails_only_on_server_codes() {
        let c = conn("127.0.0.1:50051", "127.0.0.1:40000");
        for (code, failed) in [(0, false), (5, false), (3, false), (16, false), (2, true), (4, true), (12, true), (13, true), (14, true), (15, true)] {
            let s = build(0, &mut exchange(Side::Server, Some(code)), &c, None, u64::MAX, resource(), &Clock::new());
            assert_eq!(s.kind, SpanKind::Server);
            assert_eq!(matches!(s.status, SpanStatus::Error { .. }), failed, "code {code}");
        }
    }

    #[test]
    fn unreadable_path_is_not_guessed() {
        let c = conn("127.0.0.1:50051", "127.0.0.1:40000");
        let mut ex = exchange(Side::Server, None);
        ex.path = CompactString::default();
        ex.incomplete = Some("hpack_state");
        let s = build(0, &mut ex, &c, None, u64::MAX, resource(), &Clock::new());
        assert_eq!(s.name, "grpc");
        assert_eq!(s.attr("rpc.method"), None);
        assert_eq!(s.attr("rpc.grpc.status_code"), None);
        assert_eq!(s.attr("periscope.incomplete"), Some(&AttrValue::Str("hpack_state".into())));
    }

    #[test]
    fn paths() {
        assert_eq!(grpc_path("/a.B/C"), Some(("a.B", "C")));
        assert_eq!(grpc_path("/a.B/"), None);
        assert_eq!(grpc_path("a.B/C"), None);
        assert_eq!(grpc_path("/a/b/c"), None);
        assert_eq!(code_name(14), Some("UNAVAILABLE"));
        assert_eq!(code_name(99), None);
    }
}
