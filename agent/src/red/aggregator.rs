//! RED metrics from spans: every request span the pipeline builds, sampled
//! in or not, lands in a duration histogram keyed by its process and a
//! small, bounded set of attributes; the exported ones become exemplars.
//! Client calls also feed the service map's edges.
//!
//! Runs on the event loop (no locks); readers get a [`RedSnapshot`] or a
//! [`ServiceMap`] through the control channel.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use compact_str::CompactString;
use hashbrown::Equivalent;
use rustc_hash::{FxBuildHasher, FxHashMap, FxHashSet};

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

#[derive(Clone, Debug, PartialEq, Eq)]
enum Value {
    Int(i64),
    Str(CompactString),
}

/// A [`Value`] borrowed from the span (or the route being built): what a
/// span's series is looked up by, so that a span of a known series costs
/// no copy of its attribute values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueRef<'a> {
    Int(i64),
    Str(&'a str),
}

type Attrs = [Option<(&'static str, Value)>; MAX_POINT_ATTRIBUTES];
type AttrsRef<'a> = [Option<(&'static str, ValueRef<'a>)>; MAX_POINT_ATTRIBUTES];

#[derive(Clone, Debug, PartialEq, Eq)]
struct SeriesKey {
    /// The resource's address: the series holds the `Arc`, so the address
    /// is not reused while the key exists.
    resource: usize,
    metric: RedMetric,
    attrs: Attrs,
}

/// A [`SeriesKey`] borrowing its values; hashes and compares as the key
/// it stands for.
struct SeriesKeyRef<'a> {
    resource: usize,
    metric: RedMetric,
    attrs: AttrsRef<'a>,
}

impl Value {
    fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Int(i) => ValueRef::Int(*i),
            Value::Str(s) => ValueRef::Str(s.as_str()),
        }
    }
}

impl ValueRef<'_> {
    fn to_owned(self) -> Value {
        match self {
            ValueRef::Int(i) => Value::Int(i),
            ValueRef::Str(s) => Value::Str(s.into()),
        }
    }
}

/// The hash of a series key, owned or borrowed alike. Attribute names are
/// left out (the metric decides them); equality still compares them.
fn hash_series<'a, H: Hasher>(
    resource: usize,
    metric: RedMetric,
    attrs: impl Iterator<Item = Option<ValueRef<'a>>>,
    state: &mut H,
) {
    state.write_usize(resource);
    metric.hash(state);
    for value in attrs {
        match value {
            None => state.write_u8(0),
            Some(ValueRef::Int(i)) => {
                state.write_u8(1);
                state.write_i64(i);
            }
            Some(ValueRef::Str(s)) => {
                state.write_u8(2);
                s.hash(state);
            }
        }
    }
}

impl Hash for SeriesKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let attrs = self
            .attrs
            .iter()
            .map(|a| a.as_ref().map(|(_, v)| v.as_ref()));
        hash_series(self.resource, self.metric, attrs, state);
    }
}

impl Hash for SeriesKeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let attrs = self.attrs.iter().map(|a| a.map(|(_, v)| v));
        hash_series(self.resource, self.metric, attrs, state);
    }
}

impl Equivalent<SeriesKey> for SeriesKeyRef<'_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        self.resource == key.resource
            && self.metric == key.metric
            && self
                .attrs
                .iter()
                .zip(&key.attrs)
                .all(|(a, b)| match (a, b) {
                    (None, None) => true,
                    (Some((ka, va)), Some((kb, vb))) => ka == kb && *va == vb.as_ref(),
                    _ => false,
                })
    }
}

impl SeriesKeyRef<'_> {
    fn to_owned(&self) -> SeriesKey {
        SeriesKey {
            resource: self.resource,
            metric: self.metric,
            attrs: self.attrs.map(|a| a.map(|(k, v)| (k, v.to_owned()))),
        }
    }
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

#[derive(Clone, Debug, PartialEq, Eq)]
struct EdgeKey {
    caller: CompactString,
    /// The address and port the caller connected to (network.peer.*).
    peer: (CompactString, u16),
    /// `server.address:server.port`, shown when the callee is not known.
    server: (CompactString, u16),
}

/// An [`EdgeKey`] borrowing its strings from the span.
#[derive(Clone, Copy)]
struct EdgeKeyRef<'a> {
    caller: &'a str,
    peer: (&'a str, u16),
    server: (&'a str, u16),
}

impl Hash for EdgeKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        EdgeKeyRef {
            caller: &self.caller,
            peer: (&self.peer.0, self.peer.1),
            server: (&self.server.0, self.server.1),
        }
        .hash(state)
    }
}

impl Hash for EdgeKeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.caller.hash(state);
        self.peer.hash(state);
        self.server.hash(state);
    }
}

impl Equivalent<EdgeKey> for EdgeKeyRef<'_> {
    fn equivalent(&self, key: &EdgeKey) -> bool {
        self.caller == key.caller
            && self.peer.1 == key.peer.1
            && self.server.1 == key.server.1
            && self.peer.0 == key.peer.0
            && self.server.0 == key.server.0
    }
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

/// The dimensions bounded per service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dimension {
    Route,
    RpcMethod,
    DnsName,
    Server,
}

/// What a service's request path (or server address and port) came to:
/// its route, and whether the service kept it or folded it into `_OTHER`.
/// Valid as long as the service's bounded values are: a kept value stays
/// kept and a folded one folded (the sets only grow, until cleared).
#[derive(PartialEq, Eq)]
struct ResolvedKey {
    service: CompactString,
    dimension: Dimension,
    raw: CompactString,
    port: Option<i64>,
}

struct ResolvedKeyRef<'a> {
    service: &'a str,
    dimension: Dimension,
    raw: &'a str,
    port: Option<i64>,
}

struct Resolved {
    /// The derived route (routes only).
    route: CompactString,
    kept: bool,
}

/// Paths and servers whose resolution is remembered; the cache is emptied
/// when full.
const MAX_RESOLVED: usize = 4096;

impl Hash for ResolvedKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        ResolvedKeyRef {
            service: &self.service,
            dimension: self.dimension,
            raw: &self.raw,
            port: self.port,
        }
        .hash(state)
    }
}

impl Hash for ResolvedKeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.service.hash(state);
        state.write_u8(self.dimension as u8);
        self.raw.hash(state);
        self.port.hash(state);
    }
}

impl Equivalent<ResolvedKey> for ResolvedKeyRef<'_> {
    fn equivalent(&self, key: &ResolvedKey) -> bool {
        self.dimension == key.dimension
            && self.port == key.port
            && self.raw == key.raw
            && self.service == key.service
    }
}

/// A service's bounded dimensions, looked up by the service name without
/// copying it.
#[derive(Default)]
struct ServiceBounded {
    dimensions: [BoundedValues; 4],
}

pub struct RedAggregator {
    enabled: bool,
    enabled_since_unix_nano: u64,
    series: hashbrown::HashMap<SeriesKey, SeriesState, FxBuildHasher>,
    next_id: u64,
    /// Per service and dimension: routes, RPC methods, DNS names, servers.
    bounded: FxHashMap<CompactString, ServiceBounded>,
    /// Raw paths and servers already resolved against `bounded`.
    resolved: hashbrown::HashMap<ResolvedKey, Resolved, FxBuildHasher>,
    max_values: usize,
    routes_folded: u64,
    series_overflow: u64,
    edges: hashbrown::HashMap<EdgeKey, EdgeState, FxBuildHasher>,
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

/// The span attributes the aggregator reads, found in one pass over the
/// span's attribute list (the first of a repeated key, as [`Span::attr`]).
#[derive(Default)]
struct Fields<'a> {
    values: [Option<&'a AttrValue>; FIELDS],
}

const METHOD: usize = 0;
const STATUS_CODE: usize = 1;
const ERROR_TYPE: usize = 2;
const SCHEME: usize = 3;
const PROTOCOL_VERSION: usize = 4;
const PATH: usize = 5;
const SERVER_ADDRESS: usize = 6;
const SERVER_PORT: usize = 7;
const PEER_ADDRESS: usize = 8;
const PEER_PORT: usize = 9;
const RPC_SYSTEM: usize = 10;
const RPC_SERVICE: usize = 11;
const RPC_METHOD: usize = 12;
const GRPC_STATUS_CODE: usize = 13;
const DNS_QUESTION: usize = 14;
const FIELDS: usize = 15;

fn field_of(key: &str) -> Option<usize> {
    Some(match key {
        "http.request.method" => METHOD,
        "http.response.status_code" => STATUS_CODE,
        "error.type" => ERROR_TYPE,
        "url.scheme" => SCHEME,
        "network.protocol.version" => PROTOCOL_VERSION,
        "url.path" => PATH,
        "server.address" => SERVER_ADDRESS,
        "server.port" => SERVER_PORT,
        "network.peer.address" => PEER_ADDRESS,
        "network.peer.port" => PEER_PORT,
        "rpc.system" => RPC_SYSTEM,
        "rpc.service" => RPC_SERVICE,
        "rpc.method" => RPC_METHOD,
        "rpc.grpc.status_code" => GRPC_STATUS_CODE,
        "dns.question.name" => DNS_QUESTION,
        _ => return None,
    })
}

impl<'a> Fields<'a> {
    fn of(span: &'a Span) -> Self {
        let mut fields = Fields::default();
        for a in &span.attributes {
            if let Some(i) = field_of(&a.key)
                && fields.values[i].is_none()
            {
                fields.values[i] = Some(&a.value);
            }
        }
        fields
    }

    fn has(&self, field: usize) -> bool {
        self.values[field].is_some()
    }

    fn str(&self, field: usize) -> Option<&'a str> {
        match self.values[field] {
            Some(AttrValue::Str(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    fn int(&self, field: usize) -> Option<i64> {
        match self.values[field] {
            Some(AttrValue::Int(i)) => Some(*i),
            _ => None,
        }
    }

    fn str_value(&self, field: usize) -> Option<ValueRef<'a>> {
        self.str(field).map(ValueRef::Str)
    }

    fn int_value(&self, field: usize) -> Option<ValueRef<'a>> {
        self.int(field).map(ValueRef::Int)
    }
}

/// Which histogram a span counts in, if any: request spans (HTTP, gRPC),
/// DNS lookups, and calls that failed before any request (failed connects
/// and TLS handshakes) as HTTP with their `error.type`. Phases do not count.
fn metric_of(span: &Span, fields: &Fields) -> Option<RedMetric> {
    let client = match span.kind {
        SpanKind::Client => true,
        SpanKind::Server => false,
        SpanKind::Internal => return None,
    };
    if fields.has(RPC_SYSTEM) {
        return Some(if client {
            RedMetric::RpcClient
        } else {
            RedMetric::RpcServer
        });
    }
    if fields.has(DNS_QUESTION) && client {
        return Some(RedMetric::DnsLookup);
    }
    if fields.has(METHOD) || fields.has(ERROR_TYPE) {
        return Some(if client {
            RedMetric::HttpClient
        } else {
            RedMetric::HttpServer
        });
    }
    None
}

impl BoundedValues {
    /// Whether the service has room for `value` (or already has it); a
    /// value without room is counted in `folded` and becomes `_OTHER`.
    fn admit(&mut self, value: &str, max: usize, folded: &mut u64) -> bool {
        if self.seen.contains(value) {
            return true;
        }
        if self.seen.len() < max {
            self.seen.insert(value.into());
            return true;
        }
        *folded += 1;
        false
    }
}

impl RedAggregator {
    /// `max_values`: distinct routes (and RPC methods, DNS names, servers)
    /// each service keeps before folding the rest into `_OTHER`.
    pub fn new(max_values: usize) -> Self {
        Self {
            enabled: true,
            enabled_since_unix_nano: now_unix_nano(),
            series: hashbrown::HashMap::default(),
            next_id: 1,
            bounded: FxHashMap::default(),
            resolved: hashbrown::HashMap::default(),
            max_values: max_values.max(1),
            routes_folded: 0,
            series_overflow: 0,
            edges: hashbrown::HashMap::default(),
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
        self.resolved.clear();
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
        let fields = Fields::of(span);
        let Some(metric) = metric_of(span, &fields) else {
            return;
        };
        let value_s = seconds(span.start_unix_nano, span.end_unix_nano);
        let error = matches!(span.status, SpanStatus::Error { .. });
        // The route (or nothing) the series key borrows.
        let mut route = std::mem::take(&mut self.route_buf);
        let attrs = self.point_attributes(metric, span, &fields, &mut route);
        let key = SeriesKeyRef {
            resource: Arc::as_ptr(&span.resource) as usize,
            metric,
            attrs,
        };
        let bucket = bucket_of(value_s);
        let exemplar = exported.then_some(KeptExemplar {
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
                self.series.insert(key.to_owned(), s);
            }
        }
        self.route_buf = route;
        match metric {
            RedMetric::HttpClient | RedMetric::RpcClient => {
                self.record_edge(span, &fields, value_s, bucket, error)
            }
            RedMetric::HttpServer | RedMetric::RpcServer => self.learn_from_server(span),
            RedMetric::DnsLookup => {}
        }
    }

    /// Whether `value` is kept for the service's `dimension` (else `_OTHER`).
    fn bounded(&mut self, service: &str, dimension: Dimension, value: &str) -> bool {
        let max = self.max_values;
        let entry = match self.bounded.get_mut(service) {
            Some(e) => e,
            None => self.bounded.entry(service.into()).or_default(),
        };
        entry.dimensions[dimension as usize].admit(value, max, &mut self.routes_folded)
    }

    /// Whether the service keeps `raw` (a path's route, in `buf`, or a
    /// server with `port`) or folds it into `_OTHER`: [`Self::bounded`]
    /// through a cache of raw values.
    fn resolve(
        &mut self,
        service: &str,
        dimension: Dimension,
        raw: &str,
        port: Option<i64>,
        buf: &mut String,
    ) -> bool {
        let key = ResolvedKeyRef {
            service,
            dimension,
            raw,
            port,
        };
        if let Some(r) = self.resolved.get(&key) {
            if !r.kept {
                self.routes_folded += 1;
            } else if dimension == Dimension::Route {
                buf.clear();
                buf.push_str(&r.route);
            }
            return r.kept;
        }
        let route = match dimension {
            Dimension::Route => {
                derive_route(raw, buf);
                true
            }
            _ => {
                buf.clear();
                buf.push_str(raw);
                if let Some(p) = port {
                    let _ = write!(buf, ":{p}");
                }
                false
            }
        };
        let kept = self.bounded(service, dimension, buf);
        if self.resolved.len() >= MAX_RESOLVED {
            self.resolved.clear();
        }
        self.resolved.insert(
            ResolvedKey {
                service: service.into(),
                dimension,
                raw: raw.into(),
                port,
            },
            Resolved {
                route: if route {
                    buf.as_str().into()
                } else {
                    CompactString::default()
                },
                kept,
            },
        );
        kept
    }

    /// The series' attributes, borrowing from `span` and from `buf` (which
    /// holds the derived route).
    fn point_attributes<'a>(
        &mut self,
        metric: RedMetric,
        span: &'a Span,
        fields: &Fields<'a>,
        buf: &'a mut String,
    ) -> AttrsRef<'a> {
        let mut attrs: AttrsRef<'a> = Default::default();
        let mut n = 0;
        let mut push = |key: &'static str, value: Option<ValueRef<'a>>| {
            if let Some(v) = value
                && n < MAX_POINT_ATTRIBUTES
            {
                attrs[n] = Some((key, v));
                n += 1;
            }
        };
        let other = Some(ValueRef::Str(OTHER));
        let service = span.resource.service_name();
        match metric {
            RedMetric::HttpServer | RedMetric::HttpClient => {
                push("http.request.method", fields.str_value(METHOD));
                push("http.response.status_code", fields.int_value(STATUS_CODE));
                push("error.type", fields.str_value(ERROR_TYPE));
                push("url.scheme", fields.str_value(SCHEME));
                push(
                    "network.protocol.version",
                    fields.str_value(PROTOCOL_VERSION),
                );
                if metric == RedMetric::HttpServer {
                    let route = match fields.str(PATH) {
                        Some(path) => {
                            if self.resolve(service, Dimension::Route, path, None, buf) {
                                Some(ValueRef::Str(buf.as_str()))
                            } else {
                                other
                            }
                        }
                        None => None,
                    };
                    push("http.route", route);
                } else {
                    let server = self.server_value(service, fields, buf);
                    push("server.address", server.0);
                    push("server.port", server.1);
                }
            }
            RedMetric::RpcServer | RedMetric::RpcClient => {
                push("rpc.system", fields.str_value(RPC_SYSTEM));
                let service_method = (fields.str(RPC_SERVICE), fields.str(RPC_METHOD));
                if let (Some(rpc_service), Some(method)) = service_method {
                    buf.clear();
                    let _ = write!(buf, "{rpc_service}/{method}");
                    if self.bounded(service, Dimension::RpcMethod, buf) {
                        push("rpc.service", Some(ValueRef::Str(rpc_service)));
                        push("rpc.method", Some(ValueRef::Str(method)));
                    } else {
                        push("rpc.service", other);
                        push("rpc.method", other);
                    }
                }
                push("rpc.grpc.status_code", fields.int_value(GRPC_STATUS_CODE));
                push("error.type", fields.str_value(ERROR_TYPE));
                if metric == RedMetric::RpcClient {
                    let server = self.server_value(service, fields, buf);
                    push("server.address", server.0);
                    push("server.port", server.1);
                }
            }
            RedMetric::DnsLookup => {
                let name = match fields.str(DNS_QUESTION) {
                    Some(q) if self.bounded(service, Dimension::DnsName, q) => {
                        Some(ValueRef::Str(q))
                    }
                    Some(_) => other,
                    None => None,
                };
                push("dns.question.name", name);
                push("error.type", fields.str_value(ERROR_TYPE));
            }
        }
        attrs
    }

    /// `server.address` and `server.port`, bounded per service together;
    /// `buf` is scratch space.
    fn server_value<'a>(
        &mut self,
        service: &str,
        fields: &Fields<'a>,
        buf: &mut String,
    ) -> (Option<ValueRef<'a>>, Option<ValueRef<'a>>) {
        let Some(address) = fields.str(SERVER_ADDRESS) else {
            return (None, None);
        };
        let port = fields.int(SERVER_PORT);
        if !self.resolve(service, Dimension::Server, address, port, buf) {
            return (Some(ValueRef::Str(OTHER)), None);
        }
        (Some(ValueRef::Str(address)), port.map(ValueRef::Int))
    }

    fn record_edge(
        &mut self,
        span: &Span,
        fields: &Fields,
        value_s: f64,
        bucket: usize,
        error: bool,
    ) {
        let Some(peer_address) = fields.str(PEER_ADDRESS) else {
            return;
        };
        let peer_port = fields.int(PEER_PORT).unwrap_or(0) as u16;
        let key = EdgeKeyRef {
            caller: span.resource.service_name(),
            peer: (peer_address, peer_port),
            server: (
                fields.str(SERVER_ADDRESS).unwrap_or(peer_address),
                fields.int(SERVER_PORT).map_or(peer_port, |p| p as u16),
            ),
        };
        let peer = || (CompactString::from(peer_address), peer_port);
        if let Some(callee) = self.recent_servers.remove(&span.span_id) {
            self.learn_answering(peer(), callee);
        } else {
            remember(
                &mut self.recent_clients,
                &mut self.recent_clients_order,
                span.span_id,
                peer(),
            );
        }
        let now = span.end_unix_nano;
        if let Some(edge) = self.edges.get_mut(&key) {
            edge.add(value_s, bucket, error, now);
        } else if self.edges.len() < MAX_EDGES {
            let mut edge = EdgeState::new(now);
            edge.add(value_s, bucket, error, now);
            let key = EdgeKey {
                caller: key.caller.into(),
                peer: (key.peer.0.into(), key.peer.1),
                server: (key.server.0.into(), key.server.1),
            };
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
    fn repeated_paths_and_servers_fold_as_often_as_they_come() {
        let app = resource("app", 11);
        let mut red = RedAggregator::new(2);
        for path in ["/a", "/a", "/b", "/c", "/a", "/c", "/d/7", "/b/"] {
            red.record(&http(&app, SpanKind::Server, path, 200, 1), false);
        }
        let snap = red.snapshot();
        let count = |route: &str| {
            snap.series
                .iter()
                .find(|s| attr(s, "http.route") == Some(&PointValue::Str(route.into())))
                .map(|s| s.count)
        };
        assert_eq!(count("/a"), Some(3));
        assert_eq!(count("/b"), Some(1));
        assert_eq!(count(OTHER), Some(4));
        assert_eq!(snap.routes_folded, 4);
        // Servers are bounded per service as well, address and port together.
        let mut client = |address: &str, port: i64| {
            let mut span = http(&app, SpanKind::Client, "/", 200, 1);
            for a in &mut span.attributes {
                match a.key.as_ref() {
                    "server.address" => a.value = AttrValue::Str(address.into()),
                    "server.port" => a.value = AttrValue::Int(port),
                    _ => {}
                }
            }
            red.record(&span, false);
        };
        for (address, port) in [("x", 1), ("x", 2), ("x", 1), ("x", 3), ("y", 1), ("x", 3)] {
            client(address, port);
        }
        let snap = red.snapshot();
        let clients: Vec<_> = snap
            .series
            .iter()
            .filter(|s| s.metric == RedMetric::HttpClient)
            .map(|s| (attr(s, "server.address"), attr(s, "server.port"), s.count))
            .collect();
        assert_eq!(clients.len(), 3, "{clients:?}");
        assert!(clients.contains(&(Some(&PointValue::Str(OTHER.into())), None, 3)));
        assert!(clients.contains(&(
            Some(&PointValue::Str("x".into())),
            Some(&PointValue::Int(1)),
            2
        )));
        assert_eq!(snap.routes_folded, 7);
        // Turning metrics off and on forgets what was kept.
        red.set_enabled(false);
        red.set_enabled(true);
        red.record(&http(&app, SpanKind::Server, "/c", 200, 1), false);
        let snap = red.snapshot();
        assert_eq!(
            attr(&snap.series[0], "http.route"),
            Some(&PointValue::Str("/c".into()))
        );
        assert_eq!(snap.routes_folded, 7);
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
