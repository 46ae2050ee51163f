//! The last N traces the daemon exported, for `periscope traces`: a bounded
//! ring of compact span records grouped by trace, kept on the event loop.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compact_str::{CompactString, ToCompactString};
use rustc_hash::FxHashMap;

use super::model::{SpanView, TraceView, ViewKind};
use crate::export::stdout::hex;
use crate::spans::model::{AttrValue, Resource, Span, SpanKind, SpanStatus};

/// Spans kept per trace; later ones are counted, not kept.
const MAX_SPANS_PER_TRACE: usize = 256;
/// Longest label kept.
const MAX_LABEL: usize = 120;

struct Record {
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    name: Cow<'static, str>,
    label: CompactString,
    resource: Arc<Resource>,
    kind: SpanKind,
    start_unix_nano: u64,
    end_unix_nano: u64,
    status: CompactString,
    error: bool,
}

struct Entry {
    trace_id: [u8; 16],
    seq: u64,
    updated_seq: u64,
    updated_at: Instant,
    spans: Vec<Record>,
}

/// What `periscope traces` asks for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceQuery {
    /// Most traces returned (the newest).
    pub last: usize,
    /// Only traces with a span of this service.
    pub service: Option<String>,
    /// Only traces at least this long (first start to last end).
    pub min_duration_ns: u64,
    /// Only traces with an error span.
    pub errors: bool,
    /// Only traces updated after this sequence number.
    pub after_seq: u64,
    /// Only traces that got no span for this long (complete, most likely).
    pub quiet: Duration,
}

pub struct RecentTraces {
    capacity: usize,
    traces: VecDeque<Entry>,
    /// Trace id to its entry's `seq`; the entry is at `seq - first_seq`.
    index: FxHashMap<[u8; 16], u64>,
    next_seq: u64,
    next_update: u64,
    spans_dropped: u64,
}

/// The attributes a record is made from, found in one pass over the span's
/// attributes (the first of a repeated key, as [`Span::attr`] finds).
#[derive(Default)]
struct Fields<'a> {
    rpc_service: Option<&'a AttrValue>,
    rpc_method: Option<&'a AttrValue>,
    method: Option<&'a AttrValue>,
    path: Option<&'a AttrValue>,
    dns_question: Option<&'a AttrValue>,
    server_address: Option<&'a AttrValue>,
    server_port: Option<&'a AttrValue>,
    grpc_status: Option<&'a AttrValue>,
    http_status: Option<&'a AttrValue>,
    error_type: Option<&'a AttrValue>,
}

impl<'a> Fields<'a> {
    fn of(span: &'a Span) -> Self {
        let mut f = Fields::default();
        for a in &span.attributes {
            let slot = match a.key.as_ref() {
                "rpc.service" => &mut f.rpc_service,
                "rpc.method" => &mut f.rpc_method,
                "http.request.method" => &mut f.method,
                "url.path" => &mut f.path,
                "dns.question.name" => &mut f.dns_question,
                "server.address" => &mut f.server_address,
                "server.port" => &mut f.server_port,
                "rpc.grpc.status_code" => &mut f.grpc_status,
                "http.response.status_code" => &mut f.http_status,
                "error.type" => &mut f.error_type,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(&a.value);
            }
        }
        f
    }
}

fn as_str(value: Option<&AttrValue>) -> Option<&str> {
    match value {
        Some(AttrValue::Str(s)) => Some(s.as_str()),
        _ => None,
    }
}

/// `GET /path`, the RPC's full method, the DNS question, or the name.
fn label(span: &Span, f: &Fields) -> CompactString {
    let mut label = CompactString::default();
    if let (Some(service), Some(method)) = (as_str(f.rpc_service), as_str(f.rpc_method)) {
        label.reserve(service.len() + 1 + method.len());
        label.push_str(service);
        label.push('/');
        label.push_str(method);
    } else if let Some(method) = as_str(f.method) {
        let path = as_str(f.path).unwrap_or("");
        label.reserve(method.len() + 1 + path.len());
        label.push_str(method);
        label.push(' ');
        label.push_str(path);
    } else if let Some(question) = as_str(f.dns_question) {
        let _ = write!(label, "{} {question}", span.name);
    } else if let Some(server) = as_str(f.server_address)
        && span.kind != SpanKind::Internal
    {
        let _ = write!(label, "{} {server}", span.name);
        if let Some(AttrValue::Int(port)) = f.server_port {
            let _ = write!(label, ":{port}");
        }
    } else {
        label.push_str(&span.name);
    }
    if label.len() > MAX_LABEL {
        let mut end = MAX_LABEL;
        while !label.is_char_boundary(end) {
            end -= 1;
        }
        label.truncate(end);
    }
    label
}

fn status_text(f: &Fields) -> CompactString {
    let code = match (f.grpc_status, f.http_status) {
        (Some(AttrValue::Int(c)), _) => {
            crate::spans::rpc::code_name(*c as u32).map(CompactString::from)
        }
        (_, Some(AttrValue::Int(c))) => Some(c.to_compact_string()),
        _ => None,
    };
    match (code, as_str(f.error_type)) {
        (Some(c), _) => c,
        (None, Some(e)) => e.into(),
        (None, None) => CompactString::default(),
    }
}

impl RecentTraces {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            traces: VecDeque::with_capacity(capacity.min(4096)),
            index: FxHashMap::default(),
            next_seq: 0,
            next_update: 1,
            spans_dropped: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn spans_dropped(&self) -> u64 {
        self.spans_dropped
    }

    /// Keeps a record of an exported span.
    pub fn add(&mut self, span: &Span, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        let fields = Fields::of(span);
        let record = Record {
            span_id: span.span_id,
            parent_span_id: span.parent_span_id,
            name: span.name.clone(),
            label: label(span, &fields),
            resource: span.resource.clone(),
            kind: span.kind,
            start_unix_nano: span.start_unix_nano,
            end_unix_nano: span.end_unix_nano,
            status: status_text(&fields),
            error: matches!(span.status, SpanStatus::Error { .. }),
        };
        let update = self.next_update;
        self.next_update += 1;
        let entry = match self.index.get(&span.trace_id) {
            Some(&seq) => {
                let first = self.traces.front().map_or(seq, |e| e.seq);
                seq.checked_sub(first)
                    .and_then(|i| self.traces.get_mut(i as usize))
            }
            None => None,
        };
        let entry = match entry {
            Some(e) => e,
            None => self.push_trace(span.trace_id, now),
        };
        entry.updated_seq = update;
        entry.updated_at = now;
        if entry.spans.len() < MAX_SPANS_PER_TRACE {
            entry.spans.push(record);
        } else {
            self.spans_dropped += 1;
        }
    }

    fn push_trace(&mut self, trace_id: [u8; 16], now: Instant) -> &mut Entry {
        if self.traces.len() >= self.capacity
            && let Some(old) = self.traces.pop_front()
            && self.index.get(&old.trace_id) == Some(&old.seq)
        {
            self.index.remove(&old.trace_id);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.index.insert(trace_id, seq);
        self.traces.push_back(Entry {
            trace_id,
            seq,
            updated_seq: 0,
            updated_at: now,
            spans: Vec::with_capacity(4),
        });
        self.traces.back_mut().expect("just pushed")
    }

    /// The newest traces that match, oldest first.
    pub fn query(&self, q: &TraceQuery, now: Instant) -> Vec<TraceView> {
        let mut out: Vec<TraceView> = self
            .traces
            .iter()
            .rev()
            .filter(|e| {
                e.updated_seq > q.after_seq
                    && now.saturating_duration_since(e.updated_at) >= q.quiet
            })
            .filter(|e| {
                q.service
                    .as_deref()
                    .is_none_or(|s| e.spans.iter().any(|r| r.resource.service_name() == s))
            })
            .filter(|e| !q.errors || e.spans.iter().any(|r| r.error))
            .filter(|e| duration_ns(e) >= q.min_duration_ns)
            .take(q.last)
            .map(view)
            .collect();
        out.reverse();
        out
    }
}

fn duration_ns(e: &Entry) -> u64 {
    let start = e.spans.iter().map(|r| r.start_unix_nano).min().unwrap_or(0);
    let end = e.spans.iter().map(|r| r.end_unix_nano).max().unwrap_or(0);
    end.saturating_sub(start)
}

fn view(e: &Entry) -> TraceView {
    TraceView {
        trace_id: hex(&e.trace_id),
        updated_seq: e.updated_seq,
        spans: e
            .spans
            .iter()
            .map(|r| SpanView {
                span_id: hex(&r.span_id),
                parent_span_id: r.parent_span_id.map(|p| hex(&p)),
                name: r.name.to_string(),
                label: r.label.to_string(),
                service: r.resource.service_name().to_string(),
                pid: r.resource.pid,
                kind: match r.kind {
                    SpanKind::Client => ViewKind::Client,
                    SpanKind::Server => ViewKind::Server,
                    SpanKind::Internal => ViewKind::Internal,
                },
                start_unix_nano: r.start_unix_nano,
                end_unix_nano: r.end_unix_nano,
                status: r.status.to_string(),
                error: r.error,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::model::Attribute;

    fn span(
        trace: u8,
        id: u8,
        parent: Option<u8>,
        service: &str,
        path: &str,
        ms: (u64, u64),
    ) -> Span {
        Span {
            trace_id: [trace; 16],
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            name: Cow::Borrowed("GET"),
            kind: SpanKind::Server,
            start_unix_nano: ms.0 * 1_000_000,
            end_unix_nano: ms.1 * 1_000_000,
            attributes: vec![
                Attribute::str("http.request.method", "GET"),
                Attribute::str("url.path", path),
                Attribute::int("http.response.status_code", 200),
            ],
            status: SpanStatus::Unset,
            resource: Arc::new(Resource {
                pid: 1,
                attributes: vec![Attribute::str("service.name", service)],
            }),
        }
    }

    fn all() -> TraceQuery {
        TraceQuery {
            last: 100,
            ..Default::default()
        }
    }

    #[test]
    fn groups_by_trace_and_keeps_the_newest() {
        let now = Instant::now();
        let mut r = RecentTraces::new(2);
        r.add(&span(1, 1, None, "a", "/one", (0, 10)), now);
        r.add(&span(2, 2, None, "b", "/two", (0, 50)), now);
        r.add(&span(1, 3, Some(1), "c", "/one/child", (1, 5)), now);
        let t = r.query(&all(), now);
        assert_eq!(t.len(), 2);
        // Oldest first, by when the trace's first span came.
        assert_eq!(t[0].trace_id, "01".repeat(16));
        assert_eq!(t[0].spans.len(), 2, "the child joined its trace");
        assert_eq!(t[0].spans[0].label, "GET /one");
        assert_eq!(
            t[0].spans[1].parent_span_id.as_deref(),
            Some("0101010101010101")
        );
        assert_eq!(t[0].spans[0].status, "200");
        r.add(&span(3, 4, None, "a", "/three", (0, 1)), now);
        let t = r.query(&all(), now);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0].trace_id,
            "02".repeat(16),
            "trace 1 came first and went"
        );
        // An evicted trace that comes back starts again.
        r.add(&span(1, 5, None, "b", "/late", (0, 1)), now);
        let t = r.query(&all(), now);
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].trace_id, "01".repeat(16));
        assert_eq!(t[1].spans.len(), 1);
    }

    #[test]
    fn filters() {
        let now = Instant::now();
        let mut r = RecentTraces::new(10);
        r.add(&span(1, 1, None, "a", "/fast", (0, 1)), now);
        let mut slow = span(2, 2, None, "b", "/slow", (0, 500));
        slow.status = SpanStatus::Error {
            message: "x".into(),
        };
        r.add(&slow, now);
        let q = |f: &dyn Fn(&mut TraceQuery)| {
            let mut q = all();
            f(&mut q);
            r.query(&q, now)
                .into_iter()
                .map(|t| t.spans[0].label.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(q(&|q| q.service = Some("a".into())), ["GET /fast"]);
        assert_eq!(q(&|q| q.min_duration_ns = 100_000_000), ["GET /slow"]);
        assert_eq!(q(&|q| q.errors = true), ["GET /slow"]);
        assert_eq!(q(&|q| q.last = 1), ["GET /slow"]);
        assert_eq!(q(&|q| q.after_seq = 1), ["GET /slow"]);
        assert!(q(&|q| q.quiet = Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn zero_capacity_keeps_nothing_and_spans_per_trace_are_bounded() {
        let now = Instant::now();
        let mut r = RecentTraces::new(0);
        r.add(&span(1, 1, None, "a", "/", (0, 1)), now);
        assert!(r.query(&all(), now).is_empty());
        let mut r = RecentTraces::new(1);
        for i in 0..300u16 {
            r.add(&span(1, (i % 250) as u8, None, "a", "/", (0, 1)), now);
        }
        assert_eq!(r.query(&all(), now)[0].spans.len(), MAX_SPANS_PER_TRACE);
        assert_eq!(r.spans_dropped(), 300 - MAX_SPANS_PER_TRACE as u64);
    }
}
