//! Spans as an OTLP receiver got them, and the parser for Rotel's debug log.
//!
//! Rotel 0.0.1a15 (`rotel-agent start --exporter blackhole --debug-log traces
//! --debug-log-verbosity detailed`) has no file or JSON exporter; it prints each
//! batch it receives on stdout in the OpenTelemetry Collector's "debug
//! exporter" text form:
//!
//! ```text
//! ResourceSpans #0
//! Resource SchemaURL:
//! Resource attributes:
//!      -> service.name: Str(nginx)
//!      -> process.pid: Int(4242)
//! ScopeSpans #0
//! ScopeSpans SchemaURL:
//! InstrumentationScope periscope 0.1.0
//! Span #0
//!     Trace ID       : ed3f61f5a2bb06bc55f5a780574b5dd8
//!     Parent ID      :
//!     ID             : 976b63524832438d
//!     Name           : GET
//!     Kind           : SPAN_KIND_SERVER
//! Start time: 1795562622123277515
//! End time: 1795562622123403553
//!     Status code    : STATUS_CODE_ERROR
//!     Status message : boom
//! Attributes:
//!      -> url.path: Str(/a b)
//!      -> http.response.status_code: Int(500)
//! Events:
//! SpanEvent #0
//!      -> Name: something
//!      ...
//! ```
//!
//! String values are printed raw, so a value with a newline continues on the
//! next line: any line that is not one of the structural lines above is taken
//! as the continuation of the attribute before it. Rotel's own log lines (with
//! `--log-format json` they start with `{"v":`) are skipped.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    /// Arrays, maps, bytes: the raw text after the colon, e.g. `Slice(Str(x), Str(y))`.
    Other(String),
}

impl AttrValue {
    pub fn parse(raw: &str) -> AttrValue {
        let inner = |prefix: &str| raw.strip_prefix(prefix).and_then(|r| r.strip_suffix(')'));
        if let Some(s) = inner("Str(") {
            return AttrValue::Str(s.to_string());
        }
        if let Some(v) = inner("Int(").and_then(|s| s.parse().ok()) {
            return AttrValue::Int(v);
        }
        if let Some(v) = inner("Double(").and_then(|s| s.parse().ok()) {
            return AttrValue::Double(v);
        }
        if let Some(v) = inner("Bool(").and_then(|s| s.parse().ok()) {
            return AttrValue::Bool(v);
        }
        AttrValue::Other(raw.to_string())
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            AttrValue::Int(v) => Some(*v),
            _ => None,
        }
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) => write!(f, "{s:?}"),
            AttrValue::Int(v) => write!(f, "{v}"),
            AttrValue::Double(v) => write!(f, "{v}"),
            AttrValue::Bool(v) => write!(f, "{v}"),
            AttrValue::Other(s) => write!(f, "{s}"),
        }
    }
}

pub type Attributes = BTreeMap<String, AttrValue>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Unspecified,
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl SpanKind {
    fn parse(s: &str) -> SpanKind {
        match s {
            "SPAN_KIND_INTERNAL" => SpanKind::Internal,
            "SPAN_KIND_SERVER" => SpanKind::Server,
            "SPAN_KIND_CLIENT" => SpanKind::Client,
            "SPAN_KIND_PRODUCER" => SpanKind::Producer,
            "SPAN_KIND_CONSUMER" => SpanKind::Consumer,
            _ => SpanKind::Unspecified,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StatusCode {
    #[default]
    Unset,
    Ok,
    Error,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Status {
    pub code: StatusCode,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    pub kind: SpanKind,
    /// Unix time in nanoseconds.
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Attributes,
    pub resource: Attributes,
    pub scope_name: String,
    pub status: Status,
}

impl Span {
    pub fn duration_ns(&self) -> i128 {
        self.end_ns as i128 - self.start_ns as i128
    }

    pub fn duration_ms(&self) -> f64 {
        self.duration_ns() as f64 / 1e6
    }

    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.get(key)
    }

    pub fn str_attr(&self, key: &str) -> Option<&str> {
        self.attr(key).and_then(AttrValue::as_str)
    }

    pub fn int_attr(&self, key: &str) -> Option<i64> {
        self.attr(key).and_then(AttrValue::as_int)
    }

    pub fn res_str(&self, key: &str) -> Option<&str> {
        self.resource.get(key).and_then(AttrValue::as_str)
    }

    pub fn res_int(&self, key: &str) -> Option<i64> {
        self.resource.get(key).and_then(AttrValue::as_int)
    }

    pub fn service_name(&self) -> Option<&str> {
        self.res_str("service.name")
    }

    pub fn pid(&self) -> Option<u32> {
        self.res_int("process.pid")
            .and_then(|p| u32::try_from(p).ok())
    }

    pub fn path(&self) -> Option<&str> {
        self.str_attr("url.path")
    }

    pub fn status_code(&self) -> Option<i64> {
        self.int_attr("http.response.status_code")
    }

    /// Every attribute and resource attribute value, as text (for leak checks).
    pub fn all_values(&self) -> impl Iterator<Item = (String, String)> + '_ {
        let plain = |v: &AttrValue| match v {
            AttrValue::Str(s) | AttrValue::Other(s) => s.clone(),
            other => other.to_string(),
        };
        self.attributes
            .iter()
            .map(move |(k, v)| (k.clone(), plain(v)))
            .chain(
                self.resource
                    .iter()
                    .map(move |(k, v)| (format!("resource {k}"), plain(v))),
            )
            .chain(std::iter::once((
                "span name".to_string(),
                self.name.clone(),
            )))
            .chain(std::iter::once((
                "status message".to_string(),
                self.status.message.clone(),
            )))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {:?} [{} pid={}] {:.3}ms status={:?}{} trace={} span={} parent={}",
            self.kind,
            self.name,
            self.service_name().unwrap_or("?"),
            self.pid().map(|p| p.to_string()).unwrap_or("?".into()),
            self.duration_ms(),
            self.status.code,
            if self.status.message.is_empty() {
                String::new()
            } else {
                format!("({:?})", self.status.message)
            },
            self.trace_id,
            self.span_id,
            self.parent_span_id.as_deref().unwrap_or("-"),
        )?;
        write!(f, " {{")?;
        for (i, (k, v)) in self.attributes.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { "" } else { ", " })?;
        }
        write!(f, "}}")
    }
}

/// Render spans one per line for assertion messages (at most `max`, the
/// most recent ones), after a count per service and kind.
pub fn dump(spans: &[Span], max: usize) -> String {
    let mut s = String::new();
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for sp in spans {
        *counts
            .entry((
                sp.service_name().unwrap_or("?").to_string(),
                format!("{:?}", sp.kind),
            ))
            .or_default() += 1;
    }
    if counts.len() > 1 || spans.len() > max {
        let summary: Vec<String> = counts
            .iter()
            .map(|((svc, kind), n)| format!("{svc} {kind}: {n}"))
            .collect();
        s.push_str(&format!("  by service and kind: {}\n", summary.join(", ")));
    }
    if spans.len() > max {
        s.push_str(&format!(
            "  ... {} earlier spans not shown\n",
            spans.len() - max
        ));
    }
    let spans = &spans[spans.len().saturating_sub(max)..];
    for sp in spans {
        s.push_str("  ");
        s.push_str(&sp.to_string());
        s.push('\n');
    }
    if spans.is_empty() {
        s.push_str("  (no spans)\n");
    }
    s
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    None,
    ResourceAttrs,
    SpanFields,
    SpanAttrs,
    /// Events, links and anything else we do not keep.
    Skip,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Resource,
    Span,
}

/// Line-by-line parser for Rotel's detailed debug log.
#[derive(Default)]
pub struct DebugLogParser {
    spans: Vec<Span>,
    resource: Attributes,
    scope: String,
    current: Option<Span>,
    section: Option<Section>,
    pending: Option<(Target, String, String)>,
    /// Inside a metrics dump (`ResourceMetrics #`), until the next spans.
    in_metrics: bool,
}

impl DebugLogParser {
    pub fn new() -> Self {
        Self::default()
    }

    fn section(&self) -> Section {
        self.section.unwrap_or(Section::None)
    }

    fn flush_pending(&mut self) {
        if let Some((target, key, raw)) = self.pending.take() {
            let v = AttrValue::parse(&raw);
            match target {
                Target::Resource => {
                    self.resource.insert(key, v);
                }
                Target::Span => {
                    if let Some(s) = self.current.as_mut() {
                        s.attributes.insert(key, v);
                    }
                }
            }
        }
    }

    fn finish_span(&mut self) {
        self.flush_pending();
        if let Some(s) = self.current.take() {
            self.spans.push(s);
        }
    }

    pub fn feed(&mut self, line: &str) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        // Rotel's own log lines (JSON with --log-format json, or text with a timestamp).
        if line.starts_with("{\"v\":") || line.starts_with("\u{1b}[") || is_text_log_line(line) {
            return;
        }
        if line.starts_with("ResourceMetrics #") || line.starts_with("ResourceLogs #") {
            self.finish_span();
            self.in_metrics = true;
            return;
        }
        if line.starts_with("ResourceSpans #") {
            self.in_metrics = false;
            self.finish_span();
            self.resource.clear();
            self.scope.clear();
            self.section = Some(Section::None);
            return;
        }
        if self.in_metrics {
            return;
        }
        if line.starts_with("Resource SchemaURL:") || line.starts_with("ScopeSpans SchemaURL:") {
            self.flush_pending();
            return;
        }
        if line == "Resource attributes:" {
            self.flush_pending();
            self.section = Some(Section::ResourceAttrs);
            return;
        }
        if line.starts_with("ScopeSpans #") {
            self.finish_span();
            self.section = Some(Section::None);
            return;
        }
        if let Some(rest) = line.strip_prefix("InstrumentationScope ") {
            self.flush_pending();
            self.scope = rest.split_whitespace().next().unwrap_or("").to_string();
            return;
        }
        if line.starts_with("Span #") {
            self.finish_span();
            self.current = Some(Span {
                trace_id: String::new(),
                span_id: String::new(),
                parent_span_id: None,
                name: String::new(),
                kind: SpanKind::Unspecified,
                start_ns: 0,
                end_ns: 0,
                attributes: Attributes::new(),
                resource: self.resource.clone(),
                scope_name: self.scope.clone(),
                status: Status::default(),
            });
            self.section = Some(Section::SpanFields);
            return;
        }
        if line == "Attributes:" && self.current.is_some() {
            self.flush_pending();
            self.section = Some(Section::SpanAttrs);
            return;
        }
        if line == "Events:"
            || line == "Links:"
            || line.starts_with("SpanEvent #")
            || line.starts_with("SpanLink #")
        {
            self.flush_pending();
            self.section = Some(Section::Skip);
            return;
        }
        if let Some(v) = line.strip_prefix("Start time: ") {
            self.flush_pending();
            if let Some(s) = self.current.as_mut() {
                s.start_ns = v.trim().parse().unwrap_or(0);
            }
            return;
        }
        if let Some(v) = line.strip_prefix("End time: ") {
            self.flush_pending();
            if let Some(s) = self.current.as_mut() {
                s.end_ns = v.trim().parse().unwrap_or(0);
            }
            return;
        }
        if let Some(field) = line.strip_prefix("    ").filter(|f| !f.starts_with(' '))
            && let Some((k, v)) = field
                .split_once(" : ")
                .or_else(|| field.strip_suffix(" :").map(|k| (k, "")))
            && let key = k.trim_end()
            && matches!(
                key,
                "Trace ID"
                    | "Parent ID"
                    | "ID"
                    | "Name"
                    | "Kind"
                    | "Status code"
                    | "Status message"
            )
        {
            self.flush_pending();
            if let Some(s) = self.current.as_mut() {
                match key {
                    "Trace ID" => s.trace_id = v.trim().to_string(),
                    "Parent ID" => {
                        let p = v.trim();
                        s.parent_span_id = (!p.is_empty()).then(|| p.to_string());
                    }
                    "ID" => s.span_id = v.trim().to_string(),
                    "Name" => s.name = v.to_string(),
                    "Kind" => s.kind = SpanKind::parse(v.trim()),
                    "Status code" => {
                        s.status.code = match v.trim() {
                            "STATUS_CODE_OK" => StatusCode::Ok,
                            "STATUS_CODE_ERROR" => StatusCode::Error,
                            _ => StatusCode::Unset,
                        }
                    }
                    _ => s.status.message = v.to_string(),
                }
            }
            return;
        }
        if let Some(attr) = line.strip_prefix("     -> ") {
            self.flush_pending();
            let target = match self.section() {
                Section::ResourceAttrs => Target::Resource,
                Section::SpanAttrs => Target::Span,
                _ => return,
            };
            if let Some((k, raw)) = attr.split_once(": ") {
                self.pending = Some((target, k.to_string(), raw.to_string()));
            } else if let Some(k) = attr.strip_suffix(':') {
                self.pending = Some((target, k.to_string(), String::new()));
            }
            return;
        }
        // Anything else continues a multi-line attribute value.
        if let Some((_, _, raw)) = self.pending.as_mut() {
            raw.push('\n');
            raw.push_str(line);
        }
    }

    /// Spans completed so far. With `include_last`, the span still being read
    /// counts as complete (use it once the output has been quiet for a while).
    pub fn spans(&self, include_last: bool) -> Vec<Span> {
        let mut out = self.spans.clone();
        if include_last && let Some(cur) = &self.current {
            let mut cur = cur.clone();
            if let Some((Target::Span, k, raw)) = &self.pending {
                cur.attributes.insert(k.clone(), AttrValue::parse(raw));
            }
            out.push(cur);
        }
        out
    }
}

/// Parse a whole debug log.
pub fn parse_debug_log<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<Span> {
    let mut p = DebugLogParser::new();
    for l in lines {
        p.feed(l);
    }
    p.spans(true)
}

/// `2026-11-24T23:23:40.938295Z  INFO ...` (Rotel's text log format).
fn is_text_log_line(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && line.contains('Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from Rotel 0.0.1a15 receiving spans from the Python OTel SDK
    /// (tests/fixtures/rotel-debug-log.txt; see harness test for the live version).
    const FIXTURE: &str = include_str!("../fixtures/rotel-debug-log.txt");

    #[test]
    fn parses_rotel_detailed_debug_log() {
        let spans = parse_debug_log(FIXTURE.lines());
        assert_eq!(spans.len(), 4, "{}", dump(&spans, 10));

        let child = &spans[0];
        assert_eq!(child.name, "child");
        assert_eq!(child.kind, SpanKind::Client);
        assert_eq!(child.trace_id, "ed3f61f5a2bb06bc55f5a780574b5dd8");
        assert_eq!(child.span_id, "f73d56b676f9aea9");
        assert_eq!(child.parent_span_id.as_deref(), Some("3c051072b10a5d1d"));
        assert_eq!(child.str_attr("multi"), Some("line1\nline2"));
        assert_eq!(child.start_ns, 1795562981528374882);
        assert_eq!(child.end_ns, 1795562981528394341);
        assert_eq!(child.status.code, StatusCode::Unset);
        assert_eq!(child.scope_name, "t");

        let root = &spans[1];
        assert_eq!(root.name, "GET");
        assert_eq!(root.kind, SpanKind::Server);
        assert_eq!(root.parent_span_id, None);
        assert_eq!(
            root.status,
            Status {
                code: StatusCode::Error,
                message: "boom".into()
            }
        );
        assert_eq!(root.path(), Some("/a b"));
        assert_eq!(root.status_code(), Some(500));
        assert_eq!(root.int_attr("server.port"), Some(8080));
        assert_eq!(root.attr("f"), Some(&AttrValue::Double(1.5)));
        assert_eq!(root.attr("b"), Some(&AttrValue::Bool(true)));
        assert_eq!(
            root.attr("arr"),
            Some(&AttrValue::Other("Slice(Str(x), Str(y))".into()))
        );
        assert_eq!(root.str_attr("empty"), Some(""));
        assert_eq!(root.service_name(), Some("harness-check"));
        assert_eq!(root.pid(), Some(4242));
        assert_eq!(root.res_str("weird key"), Some("a = b, c\nd"));

        // Events are not mistaken for attributes.
        let ev = &spans[2];
        assert_eq!(ev.name, "ev");
        assert_eq!(ev.kind, SpanKind::Internal);
        assert_eq!(ev.int_attr("i"), Some(-3));
        assert_eq!(ev.attributes.len(), 1, "{ev}");
        assert_eq!(ev.service_name(), Some("svc2"));

        // A new ResourceSpans block resets the resource.
        let prod = &spans[3];
        assert_eq!(prod.kind, SpanKind::Producer);
        assert_eq!(prod.service_name(), Some("svc3"));
        assert!(prod.attributes.is_empty());
        assert_eq!(prod.res_int("process.pid"), None);
    }

    #[test]
    fn last_span_is_held_back_until_complete() {
        let mut p = DebugLogParser::new();
        for l in FIXTURE
            .lines()
            .take_while(|l| !l.starts_with("     -> url.path"))
        {
            p.feed(l);
        }
        assert_eq!(p.spans(false).len(), 1);
        assert_eq!(p.spans(true).len(), 2);
    }
}
