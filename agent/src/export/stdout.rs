//! Spans as lines on stdout, for when no OTLP endpoint is configured.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Map, Value};

use super::merged_resource;
use crate::spans::model::{AttrValue, Attribute, Span, SpanKind, SpanStatus};

/// One readable line per span (no trailing newline). Fields, separated by
/// single spaces, always in this order:
///
/// ```text
/// <start> <KIND> <service>[<pid>] <what> <code> <duration> <from> -> <to> trace=<hex32> span=<hex16> [parent=<hex16>] [error="<msg>"] [<key>=<value> ...]
/// 2026-11-24T23:10:00.123Z SERVER nginx[1234] GET /index.html 200 1.234ms 127.0.0.1:43210 -> 127.0.0.1:8080 trace=4bf9...4736 span=00f0...02b7 url.scheme=http network.protocol.version=1.1
/// ```
///
/// - `start`: RFC 3339 UTC, milliseconds. `KIND`: `SERVER`, `CLIENT`, `INTERNAL`.
/// - `service[pid]`: the resource's `service.name` and pid.
/// - `what`: `<http.request.method> <url.path>` (or `url.full`, or `-`) for
///   HTTP; the span name otherwise.
/// - `code`: `http.response.status_code`; else `ERROR` for an error span; else `-`.
/// - `duration`: milliseconds with three decimals (`0.042ms`, `1500.000ms`).
/// - `from -> to`: caller then callee. From `network.peer.*` and
///   `network.local.*`, falling back to `client.*` (server spans) or
///   `server.*` (client spans); an unknown caller is left out (`-> to`),
///   an unknown callee is `?`; IPv6 as `[addr]:port`.
/// - then every attribute not already shown, in the span's order; string
///   values containing spaces, quotes, `=`, `\` or control characters, and
///   empty ones, are JSON-quoted.
pub fn format_text(span: &Span) -> String {
    let mut used: Vec<&str> = Vec::new();
    let mut out = String::with_capacity(256);
    let _ = write!(
        out,
        "{} {} {}[{}] ",
        rfc3339_millis(span.start_unix_nano),
        kind_str(span.kind),
        span.resource.service_name(),
        span.resource.pid
    );

    // what
    match str_attr(span, "http.request.method") {
        Some(method) => {
            used.push("http.request.method");
            let target = ["url.path", "url.full"]
                .into_iter()
                .find_map(|k| str_attr(span, k).map(|v| (k, v)));
            match target {
                Some((k, v)) => {
                    used.push(k);
                    let _ = write!(out, "{method} {v}");
                }
                None => {
                    let _ = write!(out, "{method} -");
                }
            }
        }
        None => out.push_str(if span.name.is_empty() {
            "-"
        } else {
            &span.name
        }),
    }

    // code
    match span.attr("http.response.status_code") {
        Some(v) => {
            used.push("http.response.status_code");
            let _ = write!(out, " {}", display_value(v));
        }
        None if matches!(span.status, SpanStatus::Error { .. }) => out.push_str(" ERROR"),
        None => out.push_str(" -"),
    }

    let ns = span.end_unix_nano.saturating_sub(span.start_unix_nano);
    let _ = write!(out, " {}.{:03}ms", ns / 1_000_000, (ns % 1_000_000) / 1_000);

    // from -> to
    let peer_fallback = match span.kind {
        SpanKind::Client => "server",
        _ => "client",
    };
    let peer = endpoint(span, &["network.peer", peer_fallback], &mut used);
    let local = match span.kind {
        SpanKind::Client => endpoint(span, &["network.local"], &mut used),
        _ => endpoint(span, &["network.local", "server"], &mut used),
    };
    let (from, to) = match span.kind {
        SpanKind::Client => (local, peer),
        _ => (peer, local),
    };
    // A client's own address is opt-in and usually not exported: the
    // arrow then starts at the process already named on the line.
    if from != "?" {
        let _ = write!(out, " {from}");
    }
    let _ = write!(out, " -> {to} trace={} span={}", hex(&span.trace_id), hex(&span.span_id));
    if let Some(p) = &span.parent_span_id {
        let _ = write!(out, " parent={}", hex(p));
    }
    if let SpanStatus::Error { message } = &span.status {
        let _ = write!(out, " error={}", json_quote(message));
    }
    for a in &span.attributes {
        if used.contains(&a.key.as_ref()) {
            continue;
        }
        let _ = write!(out, " {}=", a.key);
        match &a.value {
            AttrValue::Str(s) if needs_quotes(s) => out.push_str(&json_quote(s)),
            v => out.push_str(&display_value(v)),
        }
    }
    out
}

#[derive(Serialize)]
struct JsonSpan<'a> {
    trace_id: String,
    span_id: String,
    parent_span_id: Option<String>,
    name: &'a str,
    kind: &'static str,
    start_unix_nano: u64,
    end_unix_nano: u64,
    duration_ns: u64,
    status: JsonStatus<'a>,
    attributes: Map<String, Value>,
    resource: Map<String, Value>,
}

#[derive(Serialize)]
struct JsonStatus<'a> {
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

/// One JSON object per span (no trailing newline):
///
/// ```text
/// {"trace_id":"<hex32>","span_id":"<hex16>","parent_span_id":"<hex16>"|null,"name":"GET",
///  "kind":"SERVER"|"CLIENT"|"INTERNAL","start_unix_nano":N,"end_unix_nano":N,"duration_ns":N,
///  "status":{"code":"UNSET"}|{"code":"ERROR","message":"..."},
///  "attributes":{"http.request.method":"GET",...},"resource":{"service.name":"nginx",...}}
/// ```
///
/// Attribute values keep their types (string, integer, boolean, double;
/// non-finite doubles become `null`). `resource` is the process's resource
/// merged with `extra_resource` (`OTEL_RESOURCE_ATTRIBUTES`), the process's
/// own attributes winning.
pub fn format_json(span: &Span, extra_resource: &[Attribute]) -> String {
    let (code, message) = match &span.status {
        SpanStatus::Unset => ("UNSET", None),
        SpanStatus::Error { message } => ("ERROR", Some(message.as_str())),
    };
    let j = JsonSpan {
        trace_id: hex(&span.trace_id),
        span_id: hex(&span.span_id),
        parent_span_id: span.parent_span_id.as_ref().map(|p| hex(p)),
        name: &span.name,
        kind: kind_str(span.kind),
        start_unix_nano: span.start_unix_nano,
        end_unix_nano: span.end_unix_nano,
        duration_ns: span.end_unix_nano.saturating_sub(span.start_unix_nano),
        status: JsonStatus { code, message },
        attributes: json_attrs(span.attributes.iter()),
        resource: json_attrs(merged_resource(&span.resource, extra_resource)),
    };
    serde_json::to_string(&j)
        .unwrap_or_else(|e| format!("{{\"error\":{}}}", json_quote(&e.to_string())))
}

fn json_attrs<'a>(attrs: impl Iterator<Item = &'a Attribute>) -> Map<String, Value> {
    attrs
        .map(|a| {
            let v = match &a.value {
                AttrValue::Str(s) => Value::from(s.as_str()),
                AttrValue::Int(i) => Value::from(*i),
                AttrValue::Bool(b) => Value::from(*b),
                AttrValue::Double(d) => Value::from(*d),
                AttrValue::StrArray(v) => Value::from(v.clone()),
            };
            (a.key.to_string(), v)
        })
        .collect()
}

fn kind_str(kind: SpanKind) -> &'static str {
    match kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Internal => "INTERNAL",
    }
}

fn str_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match span.attr(key) {
        Some(AttrValue::Str(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// `<prefix>.address` and `<prefix>.port` of the first prefix that has an
/// address, as `addr:port`; `?` if none has.
fn endpoint<'a>(span: &'a Span, prefixes: &[&'static str], used: &mut Vec<&'a str>) -> String {
    for prefix in prefixes {
        let Some((addr_key, addr)) = span
            .attributes
            .iter()
            .find(|a| {
                a.key
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest == ".address")
            })
            .and_then(|a| match &a.value {
                AttrValue::Str(s) if !s.is_empty() => Some((a.key.as_ref(), s.as_str())),
                _ => None,
            })
        else {
            continue;
        };
        used.push(addr_key);
        let port = span.attributes.iter().find(|a| {
            a.key
                .strip_prefix(prefix)
                .is_some_and(|rest| rest == ".port")
        });
        let addr = if addr.contains(':') {
            format!("[{addr}]")
        } else {
            addr.to_string()
        };
        return match port {
            Some(p) => {
                used.push(p.key.as_ref());
                format!("{addr}:{}", display_value(&p.value))
            }
            None => addr,
        };
    }
    "?".to_string()
}

fn display_value(v: &AttrValue) -> String {
    match v {
        AttrValue::Str(s) => s.to_string(),
        AttrValue::Int(i) => i.to_string(),
        AttrValue::Bool(b) => b.to_string(),
        AttrValue::Double(d) => d.to_string(),
        AttrValue::StrArray(v) => v.join(","),
    }
}

fn needs_quotes(s: &str) -> bool {
    s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '\\'))
}

fn json_quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for nanoseconds since the Unix epoch.
pub fn rfc3339_millis(unix_nano: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(unix_nano);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::model::Resource;
    use std::sync::Arc;

    fn nginx() -> Arc<Resource> {
        Arc::new(Resource {
            pid: 1234,
            attributes: vec![
                Attribute::str("service.name", "nginx"),
                Attribute::int("process.pid", 1234),
            ],
        })
    }

    fn server_span() -> Span {
        Span {
            trace_id: [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ],
            span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
            parent_span_id: None,
            name: "GET".into(),
            kind: SpanKind::Server,
            start_unix_nano: 1_795_561_800_123_456_789,
            end_unix_nano: 1_795_561_800_124_690_789,
            attributes: vec![
                Attribute::str("http.request.method", "GET"),
                Attribute::str("url.path", "/index.html"),
                Attribute::str("url.scheme", "http"),
                Attribute::int("http.response.status_code", 200),
                Attribute::str("network.peer.address", "127.0.0.1"),
                Attribute::int("network.peer.port", 43210),
                Attribute::str("network.local.address", "127.0.0.1"),
                Attribute::int("network.local.port", 8080),
                Attribute::str("network.protocol.version", "1.1"),
                Attribute::str("user_agent.original", "curl/8.5.0 (x86_64)"),
            ],
            status: SpanStatus::Unset,
            resource: nginx(),
        }
    }

    #[test]
    fn time_format() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_795_561_800_123_999_999),
            "2026-11-24T23:10:00.123Z"
        );
        assert_eq!(
            rfc3339_millis(951_827_696_007_000_000),
            "2000-02-29T12:34:56.007Z"
        );
        assert_eq!(
            rfc3339_millis(1_709_251_199_999_000_000),
            "2024-02-29T23:59:59.999Z"
        );
    }

    #[test]
    fn text_server_span() {
        assert_eq!(
            format_text(&server_span()),
            "2026-11-24T23:10:00.123Z SERVER nginx[1234] GET /index.html 200 1.234ms \
             127.0.0.1:43210 -> 127.0.0.1:8080 trace=4bf92f3577b34da6a3ce929d0e0e4736 span=00f067aa0ba902b7 \
             url.scheme=http network.protocol.version=1.1 user_agent.original=\"curl/8.5.0 (x86_64)\""
        );
    }

    #[test]
    fn text_client_error_span() {
        let mut s = server_span();
        s.kind = SpanKind::Client;
        s.name = "GET".into();
        s.parent_span_id = Some([1, 2, 3, 4, 5, 6, 7, 8]);
        s.end_unix_nano = s.start_unix_nano + 1_500_000_000;
        s.status = SpanStatus::Error {
            message: "connection reset".into(),
        };
        s.attributes = vec![
            Attribute::str("http.request.method", "POST"),
            Attribute::str("url.full", "http://api/v1/x"),
            Attribute::str("server.address", "::1"),
            Attribute::int("server.port", 80),
            Attribute::bool("periscope.incomplete", true),
            Attribute::str("empty", ""),
        ];
        assert_eq!(
            format_text(&s),
            "2026-11-24T23:10:00.123Z CLIENT nginx[1234] POST http://api/v1/x ERROR 1500.000ms \
             -> [::1]:80 trace=4bf92f3577b34da6a3ce929d0e0e4736 span=00f067aa0ba902b7 \
             parent=0102030405060708 error=\"connection reset\" periscope.incomplete=true empty=\"\""
        );
    }

    #[test]
    fn text_non_http_span() {
        let mut s = server_span();
        s.kind = SpanKind::Client;
        s.name = "DNS query".into();
        s.end_unix_nano = s.start_unix_nano + 42_000;
        s.attributes = vec![
            Attribute::str("dns.question.name", "example.com"),
            Attribute::str("network.peer.address", "10.0.0.53"),
            Attribute::int("network.peer.port", 53),
        ];
        let line = format_text(&s);
        assert!(
            line.starts_with("2026-11-24T23:10:00.123Z CLIENT nginx[1234] DNS query - 0.042ms -> 10.0.0.53:53 trace="),
            "{line}"
        );
        assert!(line.ends_with(" dns.question.name=example.com"), "{line}");
    }

    #[test]
    fn json_line() {
        let mut s = server_span();
        s.parent_span_id = Some([0xab; 8]);
        s.status = SpanStatus::Error {
            message: "boom".into(),
        };
        s.attributes.push(Attribute {
            key: "ratio".into(),
            value: AttrValue::Double(0.5),
        });
        let extra = vec![
            Attribute::str("service.name", "ignored"),
            Attribute::str("deployment.environment.name", "prod"),
        ];
        let line = format_json(&s, &extra);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["span_id"], "00f067aa0ba902b7");
        assert_eq!(v["parent_span_id"], "abababababababab");
        assert_eq!(v["name"], "GET");
        assert_eq!(v["kind"], "SERVER");
        assert_eq!(v["start_unix_nano"], 1_795_561_800_123_456_789u64);
        assert_eq!(v["end_unix_nano"], 1_795_561_800_124_690_789u64);
        assert_eq!(v["duration_ns"], 1_234_000);
        assert_eq!(
            v["status"],
            serde_json::json!({"code": "ERROR", "message": "boom"})
        );
        assert_eq!(v["attributes"]["http.response.status_code"], 200);
        assert_eq!(v["attributes"]["url.path"], "/index.html");
        assert_eq!(v["attributes"]["ratio"], 0.5);
        assert_eq!(v["resource"]["service.name"], "nginx");
        assert_eq!(v["resource"]["process.pid"], 1234);
        assert_eq!(v["resource"]["deployment.environment.name"], "prod");

        let v: Value = serde_json::from_str(&format_json(&server_span(), &[])).unwrap();
        assert_eq!(v["parent_span_id"], Value::Null);
        assert_eq!(v["status"], serde_json::json!({"code": "UNSET"}));
    }
}
