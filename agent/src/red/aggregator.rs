//! RED metrics from spans: every request span the pipeline builds, sampled
//! in or not, lands in a duration histogram keyed by its process and a
//! small, bounded set of attributes; the exported ones become exemplars.
//! Client calls also feed the service map's edges.
//!
//! Runs on the event loop (no locks); readers get a [`RedSnapshot`] or a
//! [`ServiceMap`] through the control channel.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;

use compact_str::{CompactString, ToCompactString};
use rustc_hash::{FxHashMap, FxHashSet};

use super::routes::derive_route;
use super::snapshot::{
    DURATION_BOUNDS_S, Exemplar, PointResource, PointValue, RedMetric, RedSnapshot, Series,
};
use crate::export::stdout::hex;
use crate::local_view::model::{MapEdge, ServiceMap};
use crate::spans::model::{AttrValue, Resource, Span, SpanKind, SpanStatus};

const BUCKETS: usize = DURATION_BOUNDS_S.len() + 1;
/// Most data points per series.
pub const MAX_POINT_ATTRIBUTES: usize = 8;
/// Most series kept; spans that would make more are counted, not kept.
const MAX_SERIES: usize = 20_000;
/// Most service-map edges kept.
const MAX_EDGES: usize = 10_000;
/// A series or edge with no span for this long is dropped.
const IDLE_NS: u64 = 10 * 60 * 1_000_000_000;
/// Client spans and server parents remembered to learn which service
/// answers at an address.
const MAX_PENDING_LINKS: usize = 4096;
/// The value bounded dimensions fold into.
pub const OTHER: &str = "_OTHER";
/// Edges' rates are over the last minute, in ten-second slots.
const SLOT_NS: u64 = 10_000_000_000;
const SLOTS: usize = 6;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Value {
    Int(i64),
    Str(CompactString),
}

type Attrs = [Option<(&'static str, Value)>; MAX_POINT_ATTRIBUTES];

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    /// The resource's address: the series holds the `Arc`, so the address
    /// is not reused while the key exists.
    resource: usize,
    metric: RedMetric,
    attrs: Attrs,
}

#[derive(Clone, Copy, Debug)]
struct KeptExemplar {
    value: f64,
    time_unix_nano: u64,
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

#[derive(Debug)]
struct SeriesState {
    id: u64,
    resource: Arc<Resource>,
    start_unix_nano: u64,
    last_unix_nano: u64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    buckets: [u64; BUCKETS],
    exemplars: [Option<KeptExemplar>; BUCKETS],
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EdgeKey {
    caller: CompactString,
    /// The address and port the caller connected to (network.peer.*).
    peer: (CompactString, u16),
    /// `server.address:server.port`, shown when the callee is not known.
    server: (CompactString, u16),
}

#[derive(Debug)]
struct EdgeState {
    requests: u64,
    errors: u64,
    buckets: [u64; BUCKETS],
    max_s: f64,
    first_unix_nano: u64,
    last_unix_nano: u64,
    /// Requests per ten-second slot; `slot_epoch` is the newest slot's index.
    slots: [u64; SLOTS],
    slot_epoch: u64,
}

/// Which values a service has used for one bounded dimension.
#[derive(Default)]
struct BoundedValues {
    seen: FxHashSet<CompactString>,
}

pub struct RedAggregator {
    enabled: bool,
    enabled_since_unix_nano: u64,
    series: FxHashMap<SeriesKey, SeriesState>,
    next_id: u64,
    /// Per (service, dimension): routes, RPC methods, DNS names, servers.
    bounded: FxHashMap<(CompactString, &'static str), BoundedValues>,
    max_values: usize,
    routes_folded: u64,
    series_overflow: u64,
    edges: FxHashMap<EdgeKey, EdgeState>,
    /// Which service answered at a peer address, learned from linked
    /// client and server spans.
    answering: FxHashMap<(CompactString, u16), CompactString>,
    recent_clients: FxHashMap<[u8; 8], (CompactString, u16)>,
    recent_clients_order: VecDeque<[u8; 8]>,
    recent_servers: FxHashMap<[u8; 8], CompactString>,
    recent_servers_order: VecDeque<[u8; 8]>,
    route_buf: String,
}

/// Seconds between two Unix-ns times.
fn seconds(start: u64, end: u64) -> f64 {
    end.saturating_sub(start) as f64 / 1e9
}

fn bucket_of(value_s: f64) -> usize {
    DURATION_BOUNDS_S
        .iter()
        .position(|b| value_s <= *b)
        .unwrap_or(DURATION_BOUNDS_S.len())
}

fn str_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match span.attr(key) {
        Some(AttrValue::Str(s)) => Some(s.as_str()),
        _ => None,
    }
}

fn int_attr(span: &Span, key: &str) -> Option<i64> {
    match span.attr(key) {
        Some(AttrValue::Int(i)) => Some(*i),
        _ => None,
    }
}

/// Which histogram a span counts in, if any: request spans (HTTP, gRPC),
/// DNS lookups, and calls that failed before any request (failed connects
/// and TLS handshakes) as HTTP with their `error.type`. Phases do not count.
fn metric_of(span: &Span) -> Option<RedMetric> {
    let client = match span.kind {
        SpanKind::Client => true,
        SpanKind::Server => false,
        SpanKind::Internal => return None,
    };
    if span.attr("rpc.system").is_some() {
        return Some(if client {
            RedMetric::RpcClient
        } else {
            RedMetric::RpcServer
        });
    }
    if span.attr("dns.question.name").is_some() && client {
        return Some(RedMetric::DnsLookup);
    }
    if span.attr("http.request.method").is_some() || span.attr("error.type").is_some() {
        return Some(if client {
            RedMetric::HttpClient
        } else {
            RedMetric::HttpServer
        });
    }
    None
}

impl BoundedValues {
    /// `value` if the service has room for it (or already has it), else `_OTHER`.
    fn admit(&mut self, value: &str, max: usize, folded: &mut u64) -> CompactString {
        if self.seen.contains(value) {
            return value.into();
        }
        if self.seen.len() < max {
            self.seen.insert(value.into());
            return value.into();
        }
        *folded += 1;
        OTHER.into()
    }
}

impl RedAggregator {
    /// `max_values`: distinct routes (and RPC methods, DNS names, servers)
    /// each service keeps before folding the rest into `_OTHER`.
    pub fn new(max_values: usize) -> Self {
        Self {
            enabled: true,
            enabled_since_unix_nano: now_unix_nano(),
            series: FxHashMap::default(),
            next_id: 1,
            bounded: FxHashMap::default(),
            max_values: max_values.max(1),
            routes_folded: 0,
            series_overflow: 0,
            edges: FxHashMap::default(),
            answering: FxHashMap::default(),
            recent_clients: FxHashMap::default(),
            recent_clients_order: VecDeque::new(),
            recent_servers: FxHashMap::default(),
            recent_servers_order: VecDeque::new(),
            route_buf: String::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Off: nothing is counted and everything kept is forgotten.
    pub fn set_enabled(&mut self, enabled: bool) {
        if enabled == self.enabled {
            return;
        }
        self.enabled = enabled;
        self.series.clear();
        self.edges.clear();
        self.bounded.clear();
        self.enabled_since_unix_nano = now_unix_nano();
    }

    pub fn routes_folded(&self) -> u64 {
        self.routes_folded
    }

    pub fn series_overflow(&self) -> u64 {
        self.series_overflow
    }

    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Counts one span; `exported` spans may become exemplars.
    pub fn record(&mut self, span: &Span, exported: bool) {
        if !self.enabled {
            return;
        }
        let Some(metric) = metric_of(span) else {
            return;
        };
        let value_s = seconds(span.start_unix_nano, span.end_unix_nano);
        let error = matches!(span.status, SpanStatus::Error { .. });
        let attrs = self.point_attributes(metric, span);
        let key = SeriesKey {
            resource: Arc::as_ptr(&span.resource) as usize,
            metric,
            attrs,
        };
        let bucket = bucket_of(value_s);
        let exemplar = exported.then(|| KeptExemplar {
            value: value_s,
            time_unix_nano: span.end_unix_nano,
            trace_id: span.trace_id,
            span_id: span.span_id,
        });
        let full = self.series.len() >= MAX_SERIES;
        match self.series.get_mut(&key) {
            Some(s) => s.add(value_s, bucket, span.end_unix_nano, exemplar),
            None if full => self.series_overflow += 1,
            None => {
                let mut s =
                    SeriesState::new(self.next_id, span.resource.clone(), span.start_unix_nano);
                self.next_id += 1;
                s.add(value_s, bucket, span.end_unix_nano, exemplar);
                self.series.insert(key, s);
            }
        }
        match metric {
            RedMetric::HttpClient | RedMetric::RpcClient => {
                self.record_edge(span, value_s, bucket, error)
            }
            RedMetric::HttpServer | RedMetric::RpcServer => self.learn_from_server(span),
            RedMetric::DnsLookup => {}
        }
    }

    fn bounded(&mut self, service: &str, dimension: &'static str, value: &str) -> CompactString {
        let max = self.max_values;
        let entry = self.bounded.entry((service.into(), dimension)).or_default();
        entry.admit(value, max, &mut self.routes_folded)
    }

    fn point_attributes(&mut self, metric: RedMetric, span: &Span) -> Attrs {
        let mut attrs: Attrs = Default::default();
        let mut n = 0;
        let mut push = |key: &'static str, value: Option<Value>| {
            if let Some(v) = value
                && n < MAX_POINT_ATTRIBUTES
            {
                attrs[n] = Some((key, v));
                n += 1;
            }
        };
        let s = |key: &str| str_attr(span, key).map(|v| Value::Str(v.into()));
        let i = |key: &str| int_attr(span, key).map(Value::Int);
        let service = span.resource.service_name().to_compact_string();
        match metric {
            RedMetric::HttpServer | RedMetric::HttpClient => {
                push("http.request.method", s("http.request.method"));
                push("http.response.status_code", i("http.response.status_code"));
                push("error.type", s("error.type"));
                push("url.scheme", s("url.scheme"));
                push("network.protocol.version", s("network.protocol.version"));
                if metric == RedMetric::HttpServer {
                    let route = str_attr(span, "url.path").map(|path| {
                        derive_route(path, &mut self.route_buf);
                        let route = std::mem::take(&mut self.route_buf);
                        let kept = self.bounded(&service, "http.route", &route);
                        self.route_buf = route;
                        Value::Str(kept)
                    });
                    push("http.route", route);
                } else {
                    let server = self.server_value(&service, span);
                    push("server.address", server.0);
                    push("server.port", server.1);
                }
            }
            RedMetric::RpcServer | RedMetric::RpcClient => {
                push("rpc.system", s("rpc.system"));
                let service_method = (str_attr(span, "rpc.service"), str_attr(span, "rpc.method"));
                if let (Some(rpc_service), Some(method)) = service_method {
                    let mut full = std::mem::take(&mut self.route_buf);
                    full.clear();
                    let _ = write!(full, "{rpc_service}/{method}");
                    let kept = self.bounded(&service, "rpc.method", &full);
                    self.route_buf = full;
                    if kept == OTHER {
                        push("rpc.service", Some(Value::Str(OTHER.into())));
                        push("rpc.method", Some(Value::Str(OTHER.into())));
                    } else {
                        push("rpc.service", Some(Value::Str(rpc_service.into())));
                        push("rpc.method", Some(Value::Str(method.into())));
                    }
                }
                push("rpc.grpc.status_code", i("rpc.grpc.status_code"));
                push("error.type", s("error.type"));
                if metric == RedMetric::RpcClient {
                    let server = self.server_value(&service, span);
                    push("server.address", server.0);
                    push("server.port", server.1);
                }
            }
            RedMetric::DnsLookup => {
                let name = str_attr(span, "dns.question.name")
                    .map(|q| Value::Str(self.bounded(&service, "dns.question.name", q)));
                push("dns.question.name", name);
                push("error.type", s("error.type"));
            }
        }
        attrs
    }

    /// `server.address` and `server.port`, bounded per service together.
    fn server_value(&mut self, service: &str, span: &Span) -> (Option<Value>, Option<Value>) {
        let Some(address) = str_attr(span, "server.address") else {
            return (None, None);
        };
        let port = int_attr(span, "server.port");
        let mut joined = std::mem::take(&mut self.route_buf);
        joined.clear();
        joined.push_str(address);
        if let Some(p) = port {
            let _ = write!(joined, ":{p}");
        }
        let kept = self.bounded(service, "server", &joined);
        self.route_buf = joined;
        if kept == OTHER {
            return (Some(Value::Str(OTHER.into())), None);
        }
        (Some(Value::Str(address.into())), port.map(Value::Int))
    }

    fn record_edge(&mut self, span: &Span, value_s: f64, bucket: usize, error: bool) {
        let Some(peer_address) = str_attr(span, "network.peer.address") else {
            return;
        };
        let peer_port = int_attr(span, "network.peer.port").unwrap_or(0) as u16;
        let server = (
            CompactString::from(str_attr(span, "server.address").unwrap_or(peer_address)),
            int_attr(span, "server.port").map_or(peer_port, |p| p as u16),
        );
        let peer = (CompactString::from(peer_address), peer_port);
        if let Some(callee) = self.recent_servers.remove(&span.span_id) {
            self.learn_answering(peer.clone(), callee);
        } else {
            remember(
                &mut self.recent_clients,
                &mut self.recent_clients_order,
                span.span_id,
                peer.clone(),
            );
        }
        let key = EdgeKey {
            caller: span.resource.service_name().into(),
            peer,
            server,
        };
        let now = span.end_unix_nano;
        if let Some(edge) = self.edges.get_mut(&key) {
            edge.add(value_s, bucket, error, now);
        } else if self.edges.len() < MAX_EDGES {
            let mut edge = EdgeState::new(now);
            edge.add(value_s, bucket, error, now);
            self.edges.insert(key, edge);
        }
    }

    /// A server span whose parent is a client span seen here tells which
    /// service answers at that client's peer address.
    fn learn_from_server(&mut self, span: &Span) {
        let Some(parent) = span.parent_span_id else {
            return;
        };
        let service = CompactString::from(span.resource.service_name());
        if let Some(peer) = self.recent_clients.remove(&parent) {
            self.learn_answering(peer, service);
        } else {
            remember(
                &mut self.recent_servers,
                &mut self.recent_servers_order,
                parent,
                service,
            );
        }
    }

    fn learn_answering(&mut self, peer: (CompactString, u16), service: CompactString) {
        if self.answering.len() >= MAX_EDGES && !self.answering.contains_key(&peer) {
            self.answering.clear();
        }
        self.answering.insert(peer, service);
    }

    /// Every series, cumulative; series idle for ten minutes are dropped
    /// first (they start again from zero if their spans come back).
    pub fn snapshot(&mut self) -> RedSnapshot {
        let now = now_unix_nano();
        self.series
            .retain(|_, s| now.saturating_sub(s.last_unix_nano) < IDLE_NS);
        self.edges
            .retain(|_, e| now.saturating_sub(e.last_unix_nano) < IDLE_NS);
        let mut resources: Vec<PointResource> = Vec::new();
        let mut resource_index: FxHashMap<usize, usize> = FxHashMap::default();
        let mut series: Vec<Series> = Vec::with_capacity(self.series.len());
        for (key, s) in &self.series {
            let index = *resource_index.entry(key.resource).or_insert_with(|| {
                resources.push(point_resource(&s.resource));
                resources.len() - 1
            });
            series.push(s.to_series(key, index));
        }
        series.sort_by_key(|s| s.id);
        RedSnapshot {
            time_unix_nano: now,
            enabled: self.enabled,
            resources,
            series,
            routes_folded: self.routes_folded,
            series_overflow: self.series_overflow,
        }
    }

    /// The service map: one edge per (caller, callee), callees named by
    /// the service seen answering there when there is one.
    pub fn service_map(&self) -> ServiceMap {
        let now = now_unix_nano();
        let window_s = seconds(self.enabled_since_unix_nano, now).max(1e-9);
        let mut merged: FxHashMap<(CompactString, CompactString), (EdgeState, f64)> =
            FxHashMap::default();
        for (key, edge) in &self.edges {
            let callee = self.answering.get(&key.peer).cloned().unwrap_or_else(|| {
                compact_str::format_compact!("{}:{}", key.server.0, key.server.1)
            });
            let rate = edge.rate_per_s(now);
            let entry = merged
                .entry((key.caller.clone(), callee))
                .or_insert_with(|| (EdgeState::new(edge.first_unix_nano), 0.0));
            entry.0.merge(edge);
            entry.1 += rate;
        }
        let mut edges: Vec<MapEdge> = merged
            .into_iter()
            .map(|((caller, callee), (edge, rate))| MapEdge {
                caller: caller.into(),
                callee: callee.into(),
                requests: edge.requests,
                errors: edge.errors,
                rate_per_s: rate,
                p50_ms: edge.quantile_s(0.5) * 1e3,
                p99_ms: edge.quantile_s(0.99) * 1e3,
            })
            .collect();
        edges.sort_by(|a, b| (&a.caller, &a.callee).cmp(&(&b.caller, &b.callee)));
        ServiceMap { window_s, edges }
    }
}

fn remember<V>(
    map: &mut FxHashMap<[u8; 8], V>,
    order: &mut VecDeque<[u8; 8]>,
    id: [u8; 8],
    value: V,
) {
    if order.len() >= MAX_PENDING_LINKS
        && let Some(old) = order.pop_front()
    {
        map.remove(&old);
    }
    map.insert(id, value);
    order.push_back(id);
}

fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn point_value(v: &AttrValue) -> Option<PointValue> {
    match v {
        AttrValue::Str(s) => Some(PointValue::Str(s.to_string())),
        AttrValue::Int(i) => Some(PointValue::Int(*i)),
        AttrValue::Bool(b) => Some(PointValue::Str(b.to_string())),
        AttrValue::Double(_) | AttrValue::StrArray(_) => None,
    }
}

fn point_resource(r: &Resource) -> PointResource {
    let mut attributes: Vec<(String, PointValue)> = r
        .attributes
        .iter()
        .filter_map(|a| point_value(&a.value).map(|v| (a.key.to_string(), v)))
        .collect();
    if !attributes.iter().any(|(k, _)| k == "process.pid") {
        attributes.push(("process.pid".into(), PointValue::Int(r.pid as i64)));
    }
    PointResource { attributes }
}

impl SeriesState {
    fn new(id: u64, resource: Arc<Resource>, start_unix_nano: u64) -> Self {
        Self {
            id,
            resource,
            start_unix_nano,
            last_unix_nano: start_unix_nano,
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: 0.0,
            buckets: [0; BUCKETS],
            exemplars: [None; BUCKETS],
        }
    }

    fn add(&mut self, value_s: f64, bucket: usize, at: u64, exemplar: Option<KeptExemplar>) {
        self.count += 1;
        self.sum += value_s;
        self.min = self.min.min(value_s);
        self.max = self.max.max(value_s);
        self.buckets[bucket] += 1;
        self.last_unix_nano = self.last_unix_nano.max(at);
        if exemplar.is_some() {
            self.exemplars[bucket] = exemplar;
        }
    }

    fn to_series(&self, key: &SeriesKey, resource: usize) -> Series {
        Series {
            id: self.id,
            metric: key.metric,
            resource,
            attributes: key
                .attrs
                .iter()
                .flatten()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Int(i) => PointValue::Int(*i),
                        Value::Str(s) => PointValue::Str(s.to_string()),
                    };
                    (k.to_string(), v)
                })
                .collect(),
            start_unix_nano: self.start_unix_nano,
            count: self.count,
            sum: self.sum,
            min: if self.count == 0 { 0.0 } else { self.min },
            max: self.max,
            bucket_counts: self.buckets.to_vec(),
            exemplars: self
                .exemplars
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    e.map(|e| {
                        (
                            i,
                            Exemplar {
                                value: e.value,
                                time_unix_nano: e.time_unix_nano,
                                trace_id: hex(&e.trace_id),
                                span_id: hex(&e.span_id),
                            },
                        )
                    })
                })
                .collect(),
        }
    }
}

impl EdgeState {
    fn new(first_unix_nano: u64) -> Self {
        Self {
            requests: 0,
            errors: 0,
            buckets: [0; BUCKETS],
            max_s: 0.0,
            first_unix_nano,
            last_unix_nano: first_unix_nano,
            slots: [0; SLOTS],
            slot_epoch: first_unix_nano / SLOT_NS,
        }
    }

    fn add(&mut self, value_s: f64, bucket: usize, error: bool, at: u64) {
        self.requests += 1;
        self.errors += u64::from(error);
        self.buckets[bucket] += 1;
        self.max_s = self.max_s.max(value_s);
        self.last_unix_nano = self.last_unix_nano.max(at);
        let epoch = at / SLOT_NS;
        if epoch > self.slot_epoch {
            let shift = (epoch - self.slot_epoch).min(SLOTS as u64) as usize;
            self.slots.rotate_left(shift);
            for s in &mut self.slots[SLOTS - shift..] {
                *s = 0;
            }
            self.slot_epoch = epoch;
        }
        let back = self.slot_epoch.saturating_sub(epoch) as usize;
        if back < SLOTS {
            self.slots[SLOTS - 1 - back] += 1;
        }
    }

    fn merge(&mut self, other: &EdgeState) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.max_s = self.max_s.max(other.max_s);
        self.first_unix_nano = self.first_unix_nano.min(other.first_unix_nano);
    }

    /// Requests a second over the last minute (or since the edge appeared).
    fn rate_per_s(&self, now: u64) -> f64 {
        let epoch = now / SLOT_NS;
        let age = epoch.saturating_sub(self.slot_epoch) as usize;
        if age >= SLOTS {
            return 0.0;
        }
        let recent: u64 = self.slots[age..].iter().sum();
        let window_ns = (SLOTS as u64 * SLOT_NS)
            .min(now.saturating_sub(self.first_unix_nano))
            .max(1_000_000_000);
        recent as f64 / (window_ns as f64 / 1e9)
    }

    /// The `q` quantile in seconds, interpolated inside its bucket.
    fn quantile_s(&self, q: f64) -> f64 {
        quantile_from_buckets(&self.buckets, self.requests, self.max_s, q)
    }
}

/// Estimates a quantile from histogram buckets (bounds
/// [`DURATION_BOUNDS_S`]), linearly inside the bucket it falls in; the
/// overflow bucket ends at the largest value seen.
pub fn quantile_from_buckets(buckets: &[u64], count: u64, max: f64, q: f64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    let rank = (q.clamp(0.0, 1.0) * count as f64).max(1.0);
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let lower = if i == 0 {
                0.0
            } else {
                DURATION_BOUNDS_S[i - 1]
            };
            let upper = DURATION_BOUNDS_S
                .get(i)
                .copied()
                .unwrap_or(max)
                .min(max.max(lower));
            let within = (rank - below as f64) / n as f64;
            return lower + (upper - lower) * within;
        }
        below += n;
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::model::Attribute;
    use std::borrow::Cow;

    fn resource(service: &str, pid: u32) -> Arc<Resource> {
        Arc::new(Resource {
            pid,
            attributes: vec![Attribute::str("service.name", service)],
        })
    }

    fn http(resource: &Arc<Resource>, kind: SpanKind, path: &str, status: i64, ms: u64) -> Span {
        let mut attributes = vec![
            Attribute::str("http.request.method", "GET"),
            Attribute::int("http.response.status_code", status),
            Attribute::str("url.scheme", "http"),
            Attribute::str("url.path", path),
            Attribute::str("network.peer.address", "127.0.0.1"),
            Attribute::int("network.peer.port", 8080),
            Attribute::str("server.address", "127.0.0.1"),
            Attribute::int("server.port", 8080),
            Attribute::str("user_agent.original", "curl"),
        ];
        let error = (kind == SpanKind::Server && status >= 500)
            || (kind == SpanKind::Client && status >= 400);
        if error {
            attributes.push(Attribute::str("error.type", status.to_string()));
        }
        let start = now_unix_nano() - 1_000_000_000;
        Span {
            trace_id: [7; 16],
            span_id: [status as u8; 8],
            parent_span_id: None,
            name: Cow::Borrowed("GET"),
            kind,
            start_unix_nano: start,
            end_unix_nano: start + ms * 1_000_000,
            attributes,
            status: if error {
                SpanStatus::Error {
                    message: String::new(),
                }
            } else {
                SpanStatus::Unset
            },
            resource: resource.clone(),
        }
    }

    fn attr<'a>(s: &'a Series, key: &str) -> Option<&'a PointValue> {
        s.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    #[test]
    fn counts_per_status_with_exemplars_only_from_exported_spans() {
        let nginx = resource("nginx", 10);
        let mut red = RedAggregator::new(100);
        for i in 0..5 {
            red.record(
                &http(&nginx, SpanKind::Server, &format!("/items/{i}"), 200, 3),
                i == 0,
            );
        }
        red.record(&http(&nginx, SpanKind::Server, "/items/9", 503, 300), false);
        let snap = red.snapshot();
        assert_eq!(snap.series.len(), 2);
        let ok = snap
            .series
            .iter()
            .find(|s| attr(s, "http.response.status_code") == Some(&PointValue::Int(200)))
            .unwrap();
        assert_eq!(ok.count, 5);
        assert_eq!(ok.metric, RedMetric::HttpServer);
        assert_eq!(
            attr(ok, "http.route"),
            Some(&PointValue::Str("/items/{id}".into()))
        );
        assert_eq!(
            ok.bucket_counts[0], 5,
            "3 ms is in the first bucket (<= 5 ms)"
        );
        assert_eq!(ok.exemplars.len(), 1);
        assert_eq!(ok.exemplars[0].1.trace_id, "07".repeat(16));
        let failed = snap.series.iter().find(|s| s.id != ok.id).unwrap();
        assert_eq!(
            attr(failed, "error.type"),
            Some(&PointValue::Str("503".into()))
        );
        assert!(failed.exemplars.is_empty(), "not exported: no exemplar");
        assert_eq!(failed.bucket_counts[bucket_of(0.3)], 1);
        assert!(
            snap.series
                .iter()
                .all(|s| s.attributes.len() <= MAX_POINT_ATTRIBUTES)
        );
        assert!(
            snap.series
                .iter()
                .all(|s| attr(s, "url.path").is_none() && attr(s, "user_agent.original").is_none())
        );
        assert_eq!(
            snap.resources[ok.resource]
                .attributes
                .iter()
                .find(|(k, _)| k == "service.name")
                .unwrap()
                .1,
            PointValue::Str("nginx".into())
        );
    }

    #[test]
    fn routes_are_capped_per_service_and_the_rest_folded() {
        let app = resource("app", 11);
        let mut red = RedAggregator::new(3);
        for i in 0..50 {
            red.record(
                &http(&app, SpanKind::Server, &format!("/page{i}x/a"), 200, 1),
                false,
            );
        }
        let snap = red.snapshot();
        assert_eq!(snap.series.len(), 4, "3 routes and _OTHER");
        let other = snap
            .series
            .iter()
            .find(|s| attr(s, "http.route") == Some(&PointValue::Str(OTHER.into())))
            .unwrap();
        assert_eq!(other.count, 47);
        assert_eq!(snap.routes_folded, 47);
        // Another service has its own allowance.
        let other_app = resource("other", 12);
        red.record(
            &http(&other_app, SpanKind::Server, "/page1x/a", 200, 1),
            false,
        );
        assert_eq!(red.snapshot().series.len(), 5);
    }

    #[test]
    fn phases_and_unknown_spans_do_not_count() {
        let app = resource("app", 11);
        let mut red = RedAggregator::new(3);
        let mut phase = http(&app, SpanKind::Server, "/", 200, 1);
        phase.kind = SpanKind::Internal;
        red.record(&phase, true);
        let mut bare = http(&app, SpanKind::Server, "/", 200, 1);
        bare.attributes.clear();
        red.record(&bare, true);
        assert!(red.snapshot().series.is_empty());
    }

    #[test]
    fn disabled_counts_nothing() {
        let app = resource("app", 11);
        let mut red = RedAggregator::new(3);
        red.record(&http(&app, SpanKind::Server, "/", 200, 1), true);
        red.set_enabled(false);
        red.record(&http(&app, SpanKind::Server, "/", 200, 1), true);
        assert!(red.snapshot().series.is_empty());
        red.set_enabled(true);
        red.record(&http(&app, SpanKind::Server, "/", 200, 1), true);
        assert_eq!(red.snapshot().series[0].count, 1);
    }

    #[test]
    fn map_names_the_callee_once_a_linked_server_span_was_seen() {
        let curl = resource("curl", 20);
        let nginx = resource("nginx", 21);
        let mut red = RedAggregator::new(10);
        let mut client = http(&curl, SpanKind::Client, "/", 200, 4);
        client.span_id = [1; 8];
        red.record(&client, true);
        let map = red.service_map();
        assert_eq!(map.edges.len(), 1);
        assert_eq!(map.edges[0].callee, "127.0.0.1:8080");
        let mut server = http(&nginx, SpanKind::Server, "/", 200, 3);
        server.parent_span_id = Some([1; 8]);
        red.record(&server, true);
        let mut failed = http(&curl, SpanKind::Client, "/", 404, 40);
        failed.span_id = [2; 8];
        red.record(&failed, true);
        let map = red.service_map();
        assert_eq!(map.edges.len(), 1, "{map:?}");
        let e = &map.edges[0];
        assert_eq!(
            (e.caller.as_str(), e.callee.as_str(), e.requests, e.errors),
            ("curl", "nginx", 2, 1)
        );
        assert!(e.p50_ms > 0.0 && e.p50_ms <= 5.0, "{e:?}");
        assert!(e.p99_ms > 25.0 && e.p99_ms <= 50.0, "{e:?}");
        assert!(e.rate_per_s > 0.0);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let mut b = [0u64; BUCKETS];
        b[0] = 50; // <= 5 ms
        b[6] = 50; // 100..250 ms
        assert!((quantile_from_buckets(&b, 100, 0.2, 0.5) - 0.005).abs() < 1e-9);
        let p99 = quantile_from_buckets(&b, 100, 0.2, 0.99);
        assert!(p99 > 0.1 && p99 <= 0.2, "{p99}");
        assert_eq!(quantile_from_buckets(&b, 0, 0.0, 0.5), 0.0);
    }
}
