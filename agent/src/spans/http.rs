//! HTTP/1 exchanges to spans, following the stable OpenTelemetry HTTP
//! semantic conventions: required and recommended attributes only (opt-in
//! ones such as client.port, body sizes and network.local.* cost export
//! bandwidth on every span and are left out). Only the request line's path, the status, Host,
//! User-Agent and addresses are exported: never the query string, bodies or
//! other headers.

use std::borrow::Cow;
use std::sync::Arc;

use compact_str::{CompactString, ToCompactString, format_compact};

use rand::Rng;

use super::clock::Clock;
use super::model::{Attribute, Resource, Span, SpanKind, SpanStatus};
use crate::connections::Connection;
use crate::protocols::http1::{Exchange, Side};

const KNOWN_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

pub fn new_trace_id(rng: &mut impl Rng) -> [u8; 16] {
    loop {
        let id: [u8; 16] = rng.random();
        if id != [0; 16] {
            return id;
        }
    }
}

pub fn new_span_id(rng: &mut impl Rng) -> [u8; 8] {
    loop {
        let id: [u8; 8] = rng.random();
        if id != [0; 8] {
            return id;
        }
    }
}

/// Splits a Host header into name and port; IPv6 literals keep their
/// brackets off.
pub fn split_host(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[')
        && let Some((name, after)) = rest.split_once(']') {
            return (name, after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, port.parse().ok()),
        _ => (host, None),
    }
}

/// The trace and parent span of a W3C `traceparent` header
/// (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`), if valid.
pub fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let hex = |s: &str, out: &mut [u8]| -> Option<()> {
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(())
    };
    let (mut t, mut p) = ([0u8; 16], [0u8; 8]);
    hex(trace, &mut t)?;
    hex(span, &mut p)?;
    hex(version, &mut [0u8; 1])?;
    hex(flags, &mut [0u8; 1])?;
    (t != [0; 16] && p != [0; 8]).then_some((t, p))
}

/// TLS facts for one span: the connection's protocol version, and the
/// handshake duration on the connection's first span only.
#[derive(Clone, Copy, Default)]
pub struct TlsSpanInfo {
    pub version: Option<&'static str>,
    pub handshake_ns: Option<u64>,
}

impl TlsSpanInfo {
    /// `tls.protocol.name`, `tls.protocol.version` and, on a connection's
    /// first span, the handshake's duration.
    pub fn add_attributes(&self, attributes: &mut Vec<Attribute>) {
        attributes.push(Attribute::str("tls.protocol.name", "tls"));
        if let Some(version) = self.version {
            attributes.push(Attribute::str("tls.protocol.version", version));
        }
        if let Some(ns) = self.handshake_ns {
            attributes.push(Attribute::int("periscope.tls.handshake.duration_ns", ns as i64));
        }
    }
}

/// Room for the attributes an HTTP span can get (TLS, error and incomplete
/// ones included), before the phase durations the caller adds.
const HTTP_ATTRIBUTES: usize = 17;

/// The span of one exchange, from `start_ns` (the request's first byte, or
/// earlier for a client request whose dns/connect/handshake phases came
/// first). Its ids are left zero: the caller stamps them from the request's
/// identity. The exchange's path and user agent move into the span. The
/// attribute list is allocated once, with room for `extra` more.
pub fn build(
    extra: usize,
    ex: &mut Exchange,
    conn: &Connection,
    tls: Option<TlsSpanInfo>,
    start_ns: u64,
    resource: Arc<Resource>,
    clock: &Clock,
) -> Span {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let known = KNOWN_METHODS.iter().copied().find(|m| *m == ex.method);
    let method_known = known.is_some();
    let method: &'static str = known.unwrap_or("_OTHER");
    let mut attributes = Vec::with_capacity(HTTP_ATTRIBUTES + extra);
    attributes.push(Attribute::str("http.request.method", method));
    if !method_known {
        attributes.push(Attribute::str("http.request.method_original", ex.method.clone()));
    }
    let path = std::mem::take(&mut ex.path);
    attributes.push(Attribute::str("url.scheme", scheme));
    attributes.push(Attribute::str("network.protocol.version", ex.version.as_str()));
    if let Some(status) = ex.status {
        attributes.push(Attribute::int("http.response.status_code", status as i64));
    }

    let (host_name, host_port) = ex.host.as_deref().map(split_host).unwrap_or(("", None));
    let (kind, server_side_addr) = match ex.side {
        Side::Server => (SpanKind::Server, conn.local),
        Side::Client => (SpanKind::Client, conn.peer),
    };
    let server_address =
        if host_name.is_empty() { server_side_addr.ip().to_compact_string() } else { CompactString::from(host_name) };
    let server_port = host_port.unwrap_or(server_side_addr.port());
    let peer_ip = conn.peer_ip_text.clone();
    attributes.push(Attribute::int("network.peer.port", conn.peer.port() as i64));
    match ex.side {
        Side::Server => {
            attributes.push(Attribute::str("network.peer.address", peer_ip.clone()));
            attributes.push(Attribute::str("client.address", peer_ip));
            if let Some(ua) = ex.user_agent.take() {
                attributes.push(Attribute::str("user_agent.original", ua));
            }
        }
        Side::Client => {
            attributes.push(Attribute::str("network.peer.address", peer_ip));
            let default_port = server_port == if tls.is_some() { 443 } else { 80 };
            let url = match (server_address.contains(':'), default_port) {
                (true, true) => format_compact!("{scheme}://[{server_address}]{path}"),
                (true, false) => format_compact!("{scheme}://[{server_address}]:{server_port}{path}"),
                (false, true) => format_compact!("{scheme}://{server_address}{path}"),
                (false, false) => format_compact!("{scheme}://{server_address}:{server_port}{path}"),
            };
            attributes.push(Attribute::str("url.full", url));
        }
    }
    attributes.push(Attribute::str("server.address", server_address));
    attributes.push(Attribute::int("server.port", server_port as i64));
    attributes.push(Attribute::str("url.path", path));

    if let Some(tls) = tls {
        tls.add_attributes(&mut attributes);
    }
    let is_error = match (ex.side, ex.status) {
        (Side::Server, Some(s)) => s >= 500,
        (Side::Client, Some(s)) => s >= 400,
        _ => false,
    };
    let status = if is_error {
        let code = ex.status.unwrap_or_default();
        attributes.push(Attribute::str("error.type", code.to_compact_string()));
        SpanStatus::Error { message: format!("HTTP {code}") }
    } else {
        SpanStatus::Unset
    };
    if let Some(reason) = ex.incomplete {
        attributes.push(Attribute::str("periscope.incomplete", reason));
    }

    let name = Cow::Borrowed(if method_known { method } else { "HTTP" });
    exchange_span(ex, name, kind, start_ns, attributes, status, resource, clock)
}

/// The span of an exchange from its parts: it starts at `start_ns` (or the
/// request's first byte if earlier) and ends with the response's last byte
/// (the request's, without a response). Ids are left for the caller.
#[allow(clippy::too_many_arguments)]
pub fn exchange_span(
    ex: &Exchange,
    name: Cow<'static, str>,
    kind: SpanKind,
    start_ns: u64,
    attributes: Vec<Attribute>,
    status: SpanStatus,
    resource: Arc<Resource>,
    clock: &Clock,
) -> Span {
    let end_ns = ex.response_end_ns.unwrap_or(ex.request_end_ns).max(ex.request_start_ns);
    Span {
        trace_id: [0; 16],
        span_id: [0; 8],
        parent_span_id: None,
        name,
        kind,
        start_unix_nano: clock.to_unix_nanos(start_ns.min(ex.request_start_ns)),
        end_unix_nano: clock.to_unix_nanos(end_ns),
        attributes,
        status,
        resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connections::ProtocolState;
    use crate::spans::model::AttrValue;

    fn exchange(side: Side, status: Option<u16>) -> Exchange {
        Exchange {
            side,
            method: "GET".into(),
            path: "/items/7".into(),
            has_query: true,
            version: crate::protocols::exchange::HttpVersion::Http1_1,
            host: Some("shop.example:8080".into()),
            user_agent: Some("curl/7.88.1".into()),
            traceparent: None,
            request_content_length: None,
            grpc: false,
            grpc_status: None,
            status,
            request_body_bytes: 0,
            response_body_bytes: 12,
            request_start_ns: 1_000,
            request_end_ns: 2_000,
            response_start_ns: Some(3_000),
            response_end_ns: Some(4_000),
            incomplete: None,
            seq: 0,
        }
    }

    fn conn() -> Connection {
        Connection::new(
            10,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
            ProtocolState::Ignored,
            0,
        )
    }

    fn resource() -> Arc<Resource> {
        Arc::new(Resource { pid: 10, attributes: vec![Attribute::str("service.name", "curl")] })
    }

    #[test]
    fn client_span_attributes() {
        let clock = Clock::new();
        let span = build(0, &mut exchange(Side::Client, Some(404)), &conn(), None, u64::MAX, resource(), &clock);
        assert_eq!(span.kind, SpanKind::Client);
        assert_eq!(span.name, "GET");
        assert_eq!(span.attr("url.full"), Some(&AttrValue::Str("http://shop.example:8080/items/7".into())));
        assert_eq!(span.attr("server.address"), Some(&AttrValue::Str("shop.example".into())));
        assert_eq!(span.attr("server.port"), Some(&AttrValue::Int(8080)));
        assert_eq!(span.attr("http.response.status_code"), Some(&AttrValue::Int(404)));
        assert!(matches!(span.status, SpanStatus::Error { .. }));
        assert_eq!(span.end_unix_nano - span.start_unix_nano, 3_000);
        assert!(span.parent_span_id.is_none());
    }

    #[test]
    fn server_span_4xx_is_not_an_error_5xx_is() {
        let clock = Clock::new();
        let mut c = conn();
        std::mem::swap(&mut c.local, &mut c.peer);
        let s404 = build(0, &mut exchange(Side::Server, Some(404)), &c, None, u64::MAX, resource(), &clock);
        assert_eq!(s404.kind, SpanKind::Server);
        assert_eq!(s404.status, SpanStatus::Unset);
        assert_eq!(s404.attr("client.address"), Some(&AttrValue::Str("127.0.0.1".into())));
        let s500 = build(0, &mut exchange(Side::Server, Some(500)), &c, None, u64::MAX, resource(), &clock);
        assert!(matches!(s500.status, SpanStatus::Error { .. }));
        assert_eq!(s500.attr("error.type"), Some(&AttrValue::Str("500".into())));
    }

    #[test]
    fn unknown_method_and_incomplete() {
        let mut ex = exchange(Side::Server, None);
        ex.method = "PURGE".into();
        ex.incomplete = Some("no_response");
        ex.response_end_ns = None;
        let span = build(0, &mut ex, &conn(), None, u64::MAX, resource(), &Clock::new());
        assert_eq!(span.name, "HTTP");
        assert_eq!(span.attr("http.request.method"), Some(&AttrValue::Str("_OTHER".into())));
        assert_eq!(span.attr("periscope.incomplete"), Some(&AttrValue::Str("no_response".into())));
        assert_eq!(span.end_unix_nano - span.start_unix_nano, 1_000);
    }

    #[test]
    fn tls_span_attributes() {
        let tls = TlsSpanInfo { version: Some("1.3"), handshake_ns: Some(1_500_000) };
        let mut ex = exchange(Side::Client, Some(200));
        let mut c = conn();
        c.peer = "127.0.0.1:443".parse().unwrap();
        let mut ex443 = ex.clone();
        ex443.host = None;
        let span = build(0, &mut ex443, &c, Some(tls), u64::MAX, resource(), &Clock::new());
        assert_eq!(span.attr("url.scheme"), Some(&AttrValue::Str("https".into())));
        assert_eq!(span.attr("url.full"), Some(&AttrValue::Str("https://127.0.0.1/items/7".into())));
        assert_eq!(span.attr("tls.protocol.version"), Some(&AttrValue::Str("1.3".into())));
        assert_eq!(span.attr("periscope.tls.handshake.duration_ns"), Some(&AttrValue::Int(1_500_000)));
        let plain = build(0, &mut ex, &conn(), None, u64::MAX, resource(), &Clock::new());
        assert_eq!(plain.attr("tls.protocol.name"), None);
    }

    #[test]
    fn traceparent_parsing() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, p) = parse_traceparent(tp).unwrap();
        assert_eq!(t[0], 0x4b);
        assert_eq!(p, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-é4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // A future version may carry more fields.
        assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz").is_some());
    }

    #[test]
    fn host_splitting() {
        assert_eq!(split_host("a.b:81"), ("a.b", Some(81)));
        assert_eq!(split_host("a.b"), ("a.b", None));
        assert_eq!(split_host("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_host("::1"), ("::1", None));
    }
}
