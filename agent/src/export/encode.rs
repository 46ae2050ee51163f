//! OTLP `ExportTraceServiceRequest` bytes written straight from spans into
//! a reused buffer: no intermediate protobuf structs and no string copies
//! other than the one into the buffer.
//!
//! Protobuf prefixes every message with its length, so a batch takes two
//! passes: one measures each span and groups the spans by resource, the
//! other writes. Fields go in tag order and proto3 defaults are left out,
//! as prost does, so the bytes are exactly what `prost::Message::encode`
//! would produce for the equivalent message (the tests check this).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encoded_len_varint, key_len};

use super::merged_resource;
use crate::spans::model::{AttrValue, Attribute, Resource, Span, SpanKind, SpanStatus};

pub const SCOPE_NAME: &str = "periscope";
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// W3C trace flags: every span we export is, by definition, sampled.
const FLAG_SAMPLED: u32 = 0x01;
/// `Status.code`: STATUS_CODE_ERROR.
const STATUS_CODE_ERROR: u64 = 2;
/// Prune the resource cache once it holds this many entries (or twice as
/// many as were alive at the last pruning, whichever is more).
const MIN_PRUNE_AT: usize = 256;
/// More live resources than this and the cache starts over (a bound; a
/// node rarely runs this many traced processes at once).
const MAX_CACHED_RESOURCES: usize = 16_384;

/// Field numbers, from opentelemetry-proto's `trace_service.proto`,
/// `trace.proto`, `resource.proto` and `common.proto`.
mod tag {
    pub const REQUEST_RESOURCE_SPANS: u32 = 1;
    pub const RESOURCE_SPANS_RESOURCE: u32 = 1;
    pub const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
    pub const RESOURCE_ATTRIBUTES: u32 = 1;
    pub const SCOPE_SPANS_SCOPE: u32 = 1;
    pub const SCOPE_SPANS_SPANS: u32 = 2;
    pub const SCOPE_NAME: u32 = 1;
    pub const SCOPE_VERSION: u32 = 2;
    pub const SPAN_TRACE_ID: u32 = 1;
    pub const SPAN_SPAN_ID: u32 = 2;
    pub const SPAN_PARENT_SPAN_ID: u32 = 4;
    pub const SPAN_NAME: u32 = 5;
    pub const SPAN_KIND: u32 = 6;
    pub const SPAN_START_TIME: u32 = 7;
    pub const SPAN_END_TIME: u32 = 8;
    pub const SPAN_ATTRIBUTES: u32 = 9;
    pub const SPAN_STATUS: u32 = 15;
    pub const SPAN_FLAGS: u32 = 16;
    pub const STATUS_MESSAGE: u32 = 2;
    pub const STATUS_CODE: u32 = 3;
    pub const KEY_VALUE_KEY: u32 = 1;
    pub const KEY_VALUE_VALUE: u32 = 2;
    pub const ANY_VALUE_STRING: u32 = 1;
    pub const ANY_VALUE_BOOL: u32 = 2;
    pub const ANY_VALUE_INT: u32 = 3;
    pub const ANY_VALUE_DOUBLE: u32 = 4;
    pub const ANY_VALUE_ARRAY: u32 = 5;
    pub const ARRAY_VALUES: u32 = 1;
}

/// Encodes export requests, reusing its buffers from batch to batch.
pub(crate) struct OtlpEncoder {
    /// `OTEL_RESOURCE_ATTRIBUTES`, merged into every resource.
    extra_resource: Vec<Attribute>,
    /// The `InstrumentationScope` message, the same in every request.
    scope: Vec<u8>,
    resources: ResourceCache,
    // Per batch, kept for their capacity:
    groups: Vec<Group>,
    group_by_address: HashMap<usize, usize>,
    /// Each span's group and encoded length, by position in the batch.
    span_groups: Vec<usize>,
    span_lens: Vec<usize>,
    /// Positions in the batch, grouped by resource.
    order: Vec<usize>,
    buf: BytesMut,
}

/// The spans of one resource: one `ResourceSpans` in the request.
struct Group {
    resource_slot: usize,
    /// The group's first span, whose resource later ones are compared with.
    first_span: usize,
    span_count: usize,
    /// Bytes the `spans` fields of its `ScopeSpans` take.
    spans_len: usize,
}

impl OtlpEncoder {
    pub fn new(extra_resource: Vec<Attribute>) -> Self {
        let mut scope = Vec::new();
        put_string_field(&mut scope, tag::SCOPE_NAME, SCOPE_NAME);
        put_string_field(&mut scope, tag::SCOPE_VERSION, SCOPE_VERSION);
        Self {
            extra_resource,
            scope,
            resources: ResourceCache::default(),
            groups: Vec::new(),
            group_by_address: HashMap::new(),
            span_groups: Vec::new(),
            span_lens: Vec::new(),
            order: Vec::new(),
            buf: BytesMut::new(),
        }
    }

    /// The request for `spans`: one `ResourceSpans` per distinct resource
    /// (the same `Arc<Resource>`, or an equal resource of the same pid) in
    /// order of first appearance, each with one `ScopeSpans` for scope
    /// `periscope`. The buffer is reused once the returned bytes (and
    /// their clones) are dropped.
    pub fn encode(&mut self, spans: &[Span]) -> Bytes {
        self.resources.prune();
        self.measure(spans);
        self.order_by_group();
        self.write(spans);
        self.buf.split().freeze()
    }

    fn measure(&mut self, spans: &[Span]) {
        self.groups.clear();
        self.group_by_address.clear();
        self.span_groups.clear();
        self.span_lens.clear();
        let mut last: Option<(usize, usize)> = None;
        for (i, span) in spans.iter().enumerate() {
            let address = address_of(&span.resource);
            let group = match last {
                Some((a, group)) if a == address => group,
                _ => self.group_for(spans, i),
            };
            last = Some((address, group));
            let len = span_len(span);
            let g = &mut self.groups[group];
            g.span_count += 1;
            g.spans_len += delimited_len(tag::SCOPE_SPANS_SPANS, len);
            self.span_groups.push(group);
            self.span_lens.push(len);
        }
    }

    /// The group of `spans[i]`, a new one if no earlier span shares its resource.
    fn group_for(&mut self, spans: &[Span], i: usize) -> usize {
        let resource = &spans[i].resource;
        let address = address_of(resource);
        if let Some(&group) = self.group_by_address.get(&address) {
            return group;
        }
        let group = self
            .groups
            .iter()
            .position(|g| {
                let other = &spans[g.first_span].resource;
                other.pid == resource.pid && **other == **resource
            })
            .unwrap_or_else(|| {
                let resource_slot = self.resources.slot(resource, &self.extra_resource);
                self.groups.push(Group {
                    resource_slot,
                    first_span: i,
                    span_count: 0,
                    spans_len: 0,
                });
                self.groups.len() - 1
            });
        self.group_by_address.insert(address, group);
        group
    }

    fn order_by_group(&mut self) {
        let groups = &self.span_groups;
        self.order.clear();
        self.order.extend(0..groups.len());
        self.order.sort_unstable_by_key(|&i| (groups[i], i));
    }

    fn write(&mut self, spans: &[Span]) {
        let lens = |g: &Group| {
            group_lens(self.resources.encoded(g.resource_slot).len(), self.scope.len(), g.spans_len)
        };
        let total: usize = self
            .groups
            .iter()
            .map(|g| delimited_len(tag::REQUEST_RESOURCE_SPANS, lens(g).resource_spans))
            .sum();
        let buf = &mut self.buf;
        buf.reserve(total);
        let mut positions = self.order.as_slice();
        for g in &self.groups {
            let (these, rest) = positions.split_at(g.span_count);
            positions = rest;
            let GroupLens { resource_spans, scope_spans } = lens(g);
            put_delimited_header(buf, tag::REQUEST_RESOURCE_SPANS, resource_spans);
            put_delimited(buf, tag::RESOURCE_SPANS_RESOURCE, self.resources.encoded(g.resource_slot));
            put_delimited_header(buf, tag::RESOURCE_SPANS_SCOPE_SPANS, scope_spans);
            put_delimited(buf, tag::SCOPE_SPANS_SCOPE, &self.scope);
            for &i in these {
                put_delimited_header(buf, tag::SCOPE_SPANS_SPANS, self.span_lens[i]);
                put_span(buf, &spans[i]);
            }
        }
        debug_assert_eq!(buf.len(), total, "measured and written lengths differ");
    }
}

/// Body lengths of a group's `ResourceSpans` and of its `ScopeSpans`.
struct GroupLens {
    resource_spans: usize,
    scope_spans: usize,
}

fn group_lens(resource_len: usize, scope_len: usize, spans_len: usize) -> GroupLens {
    let scope_spans = delimited_len(tag::SCOPE_SPANS_SCOPE, scope_len) + spans_len;
    GroupLens {
        resource_spans: delimited_len(tag::RESOURCE_SPANS_RESOURCE, resource_len)
            + delimited_len(tag::RESOURCE_SPANS_SCOPE_SPANS, scope_spans),
        scope_spans,
    }
}

fn address_of(resource: &Arc<Resource>) -> usize {
    Arc::as_ptr(resource) as usize
}

/// Encoded `Resource` messages (with the extra attributes merged in) by the
/// address of their `Arc<Resource>`. An entry holds a `Weak`, which keeps
/// the address from being reused by another resource while the entry
/// exists, and tells when the process's resource is gone.
#[derive(Default)]
struct ResourceCache {
    entries: Vec<CachedResource>,
    slot_by_address: HashMap<usize, usize>,
    prune_at: usize,
}

struct CachedResource {
    resource: Weak<Resource>,
    encoded: Vec<u8>,
}

impl ResourceCache {
    fn slot(&mut self, resource: &Arc<Resource>, extra: &[Attribute]) -> usize {
        let address = address_of(resource);
        if let Some(&slot) = self.slot_by_address.get(&address) {
            return slot;
        }
        self.entries.push(CachedResource {
            resource: Arc::downgrade(resource),
            encoded: encode_resource(resource, extra),
        });
        let slot = self.entries.len() - 1;
        self.slot_by_address.insert(address, slot);
        slot
    }

    fn encoded(&self, slot: usize) -> &[u8] {
        &self.entries[slot].encoded
    }

    /// Forgets resources no span refers to any more. Only between batches:
    /// slots must stay valid while one is encoded.
    fn prune(&mut self) {
        if self.entries.len() < self.prune_at.max(MIN_PRUNE_AT) {
            return;
        }
        self.entries.retain(|e| e.resource.strong_count() > 0);
        if self.entries.len() > MAX_CACHED_RESOURCES {
            self.entries.clear();
        }
        self.slot_by_address.clear();
        self.slot_by_address.extend(
            self.entries
                .iter()
                .enumerate()
                .map(|(slot, e)| (e.resource.as_ptr() as usize, slot)),
        );
        self.prune_at = 2 * self.entries.len();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

fn encode_resource(resource: &Resource, extra: &[Attribute]) -> Vec<u8> {
    let len: usize = merged_resource(resource, extra)
        .map(|a| delimited_len(tag::RESOURCE_ATTRIBUTES, key_value_len(a)))
        .sum();
    let mut out = Vec::with_capacity(len);
    for a in merged_resource(resource, extra) {
        put_key_value_field(&mut out, tag::RESOURCE_ATTRIBUTES, a);
    }
    out
}

// Messages: each `*_len` is the length of what the matching `put_*` writes.

fn span_len(s: &Span) -> usize {
    let parent = s.parent_span_id.map_or(0, |p| delimited_len(tag::SPAN_PARENT_SPAN_ID, p.len()));
    let status = match &s.status {
        SpanStatus::Unset => 0,
        SpanStatus::Error { message } => delimited_len(tag::SPAN_STATUS, status_len(message)),
    };
    let attributes: usize = s
        .attributes
        .iter()
        .map(|a| delimited_len(tag::SPAN_ATTRIBUTES, key_value_len(a)))
        .sum();
    delimited_len(tag::SPAN_TRACE_ID, s.trace_id.len())
        + delimited_len(tag::SPAN_SPAN_ID, s.span_id.len())
        + parent
        + string_field_len(tag::SPAN_NAME, &s.name)
        + key_len(tag::SPAN_KIND)
        + encoded_len_varint(kind_number(s.kind))
        + fixed64_field_len(tag::SPAN_START_TIME, s.start_unix_nano)
        + fixed64_field_len(tag::SPAN_END_TIME, s.end_unix_nano)
        + attributes
        + status
        + key_len(tag::SPAN_FLAGS)
        + 4
}

fn put_span(buf: &mut impl BufMut, s: &Span) {
    put_delimited(buf, tag::SPAN_TRACE_ID, &s.trace_id);
    put_delimited(buf, tag::SPAN_SPAN_ID, &s.span_id);
    if let Some(parent) = &s.parent_span_id {
        put_delimited(buf, tag::SPAN_PARENT_SPAN_ID, parent);
    }
    put_string_field(buf, tag::SPAN_NAME, &s.name);
    encode_key(tag::SPAN_KIND, WireType::Varint, buf);
    encode_varint(kind_number(s.kind), buf);
    put_fixed64_field(buf, tag::SPAN_START_TIME, s.start_unix_nano);
    put_fixed64_field(buf, tag::SPAN_END_TIME, s.end_unix_nano);
    for a in &s.attributes {
        put_key_value_field(buf, tag::SPAN_ATTRIBUTES, a);
    }
    if let SpanStatus::Error { message } = &s.status {
        put_delimited_header(buf, tag::SPAN_STATUS, status_len(message));
        put_string_field(buf, tag::STATUS_MESSAGE, message);
        encode_key(tag::STATUS_CODE, WireType::Varint, buf);
        encode_varint(STATUS_CODE_ERROR, buf);
    }
    encode_key(tag::SPAN_FLAGS, WireType::ThirtyTwoBit, buf);
    buf.put_u32_le(FLAG_SAMPLED);
}

/// `Span.SpanKind`.
fn kind_number(kind: SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
    }
}

fn status_len(message: &str) -> usize {
    string_field_len(tag::STATUS_MESSAGE, message)
        + key_len(tag::STATUS_CODE)
        + encoded_len_varint(STATUS_CODE_ERROR)
}

fn key_value_len(a: &Attribute) -> usize {
    key_value_len_with(a, any_value_len(&a.value))
}

fn key_value_len_with(a: &Attribute, value_len: usize) -> usize {
    string_field_len(tag::KEY_VALUE_KEY, &a.key) + delimited_len(tag::KEY_VALUE_VALUE, value_len)
}

/// A `KeyValue` as field `field` of the enclosing message.
fn put_key_value_field(buf: &mut impl BufMut, field: u32, a: &Attribute) {
    let value_len = any_value_len(&a.value);
    put_delimited_header(buf, field, key_value_len_with(a, value_len));
    put_string_field(buf, tag::KEY_VALUE_KEY, &a.key);
    put_delimited_header(buf, tag::KEY_VALUE_VALUE, value_len);
    put_any_value(buf, &a.value);
}

fn any_value_len(v: &AttrValue) -> usize {
    match v {
        AttrValue::Str(s) => string_value_len(s),
        AttrValue::Bool(_) => key_len(tag::ANY_VALUE_BOOL) + 1,
        AttrValue::Int(i) => key_len(tag::ANY_VALUE_INT) + encoded_len_varint(*i as u64),
        AttrValue::Double(_) => key_len(tag::ANY_VALUE_DOUBLE) + 8,
        AttrValue::StrArray(values) => delimited_len(tag::ANY_VALUE_ARRAY, array_len(values)),
    }
}

// Set members of a oneof are written even when they hold the default.
fn put_any_value(buf: &mut impl BufMut, v: &AttrValue) {
    match v {
        AttrValue::Str(s) => put_delimited(buf, tag::ANY_VALUE_STRING, s.as_bytes()),
        AttrValue::Bool(b) => {
            encode_key(tag::ANY_VALUE_BOOL, WireType::Varint, buf);
            encode_varint(u64::from(*b), buf);
        }
        AttrValue::Int(i) => {
            encode_key(tag::ANY_VALUE_INT, WireType::Varint, buf);
            encode_varint(*i as u64, buf);
        }
        AttrValue::Double(d) => {
            encode_key(tag::ANY_VALUE_DOUBLE, WireType::SixtyFourBit, buf);
            buf.put_f64_le(*d);
        }
        AttrValue::StrArray(values) => {
            put_delimited_header(buf, tag::ANY_VALUE_ARRAY, array_len(values));
            for s in values {
                put_delimited_header(buf, tag::ARRAY_VALUES, string_value_len(s));
                put_delimited(buf, tag::ANY_VALUE_STRING, s.as_bytes());
            }
        }
    }
}

/// An `AnyValue` holding a string.
fn string_value_len(s: &str) -> usize {
    delimited_len(tag::ANY_VALUE_STRING, s.len())
}

/// An `ArrayValue` of strings.
fn array_len(values: &[String]) -> usize {
    values
        .iter()
        .map(|s| delimited_len(tag::ARRAY_VALUES, string_value_len(s)))
        .sum()
}

// Fields.

/// Bytes a length-delimited field takes: key, length and body.
fn delimited_len(field: u32, body_len: usize) -> usize {
    key_len(field) + encoded_len_varint(body_len as u64) + body_len
}

// prost's `encode_key`/`encode_varint` were not inlined here and took a
// third of the encoding time; with constant tags these fold to a store or two.
#[inline(always)]
fn encode_key(field: u32, wire_type: WireType, buf: &mut impl BufMut) {
    encode_varint(u64::from(field << 3 | wire_type as u32), buf);
}

#[inline(always)]
fn encode_varint(mut v: u64, buf: &mut impl BufMut) {
    while v >= 0x80 {
        buf.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn put_delimited_header(buf: &mut impl BufMut, field: u32, body_len: usize) {
    encode_key(field, WireType::LengthDelimited, buf);
    encode_varint(body_len as u64, buf);
}

fn put_delimited(buf: &mut impl BufMut, field: u32, body: &[u8]) {
    put_delimited_header(buf, field, body.len());
    buf.put_slice(body);
}

/// A plain (not oneof) string field: left out when empty.
fn string_field_len(field: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { delimited_len(field, s.len()) }
}

fn put_string_field(buf: &mut impl BufMut, field: u32, s: &str) {
    if !s.is_empty() {
        put_delimited(buf, field, s.as_bytes());
    }
}

/// A plain fixed64 field: left out when zero.
fn fixed64_field_len(field: u32, v: u64) -> usize {
    if v == 0 { 0 } else { key_len(field) + 8 }
}

fn put_fixed64_field(buf: &mut impl BufMut, field: u32, v: u64) {
    if v != 0 {
        encode_key(field, WireType::SixtyFourBit, buf);
        buf.put_u64_le(v);
    }
}


#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use opentelemetry_proto::tonic as pb;
    use pb::collector::trace::v1::ExportTraceServiceRequest;
    use pb::common::v1::{AnyValue, KeyValue, any_value};
    use prop::collection::vec;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::export::tests::resource;

    /// The conversion the exporter used before it encoded directly: the
    /// message the encoded bytes must decode to.
    fn reference_request(spans: &[Span], extra: &[Attribute]) -> ExportTraceServiceRequest {
        let mut groups: Vec<(Arc<Resource>, Vec<pb::trace::v1::Span>)> = Vec::new();
        let mut by_ptr: HashMap<*const Resource, usize> = HashMap::new();
        for s in spans {
            let idx = *by_ptr.entry(Arc::as_ptr(&s.resource)).or_insert_with(|| {
                groups
                    .iter()
                    .position(|(r, _)| r.pid == s.resource.pid && **r == *s.resource)
                    .unwrap_or_else(|| {
                        groups.push((s.resource.clone(), Vec::new()));
                        groups.len() - 1
                    })
            });
            groups[idx].1.push(reference_span(s.clone()));
        }
        let resource_spans = groups
            .into_iter()
            .map(|(resource, spans)| pb::trace::v1::ResourceSpans {
                resource: Some(pb::resource::v1::Resource {
                    attributes: merged_resource(&resource, extra).cloned().map(reference_key_value).collect(),
                    ..Default::default()
                }),
                scope_spans: vec![pb::trace::v1::ScopeSpans {
                    scope: Some(pb::common::v1::InstrumentationScope {
                        name: SCOPE_NAME.into(),
                        version: SCOPE_VERSION.into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect();
        ExportTraceServiceRequest { resource_spans }
    }

    fn reference_span(s: Span) -> pb::trace::v1::Span {
        use pb::trace::v1::{span, status};
        let kind = match s.kind {
            SpanKind::Server => span::SpanKind::Server,
            SpanKind::Client => span::SpanKind::Client,
            SpanKind::Internal => span::SpanKind::Internal,
        };
        let status = match s.status {
            SpanStatus::Unset => None,
            SpanStatus::Error { message } => Some(pb::trace::v1::Status {
                message,
                code: status::StatusCode::Error as i32,
            }),
        };
        pb::trace::v1::Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            flags: FLAG_SAMPLED,
            name: s.name.to_string(),
            kind: kind as i32,
            start_time_unix_nano: s.start_unix_nano,
            end_time_unix_nano: s.end_unix_nano,
            attributes: s.attributes.into_iter().map(reference_key_value).collect(),
            status,
            ..Default::default()
        }
    }

    fn reference_key_value(a: Attribute) -> KeyValue {
        let string = |s: String| AnyValue {
            value: Some(any_value::Value::StringValue(s)),
        };
        let value = match a.value {
            AttrValue::Str(s) => any_value::Value::StringValue(s.to_string()),
            AttrValue::Int(i) => any_value::Value::IntValue(i),
            AttrValue::Bool(b) => any_value::Value::BoolValue(b),
            AttrValue::Double(d) => any_value::Value::DoubleValue(d),
            AttrValue::StrArray(v) => any_value::Value::ArrayValue(pb::common::v1::ArrayValue {
                values: v.into_iter().map(string).collect(),
            }),
        };
        KeyValue {
            key: a.key.into_owned(),
            value: Some(AnyValue { value: Some(value) }),
        }
    }

    /// Encodes `spans` and checks the bytes against the reference: the
    /// same message, and the same bytes prost writes for it.
    fn assert_matches_reference(spans: &[Span], extra: &[Attribute]) -> ExportTraceServiceRequest {
        let encoded = OtlpEncoder::new(extra.to_vec()).encode(spans);
        let expected = reference_request(spans, extra);
        let decoded = ExportTraceServiceRequest::decode(encoded.clone()).expect("decodes");
        assert_eq!(decoded, expected);
        assert_eq!(encoded, expected.encode_to_vec(), "not the bytes prost writes");
        decoded
    }

    fn span(n: u8, resource: &Arc<Resource>) -> Span {
        Span {
            trace_id: [n; 16],
            span_id: [n; 8],
            parent_span_id: None,
            name: format!("span{n}").into(),
            kind: SpanKind::Server,
            start_unix_nano: 1_000 + n as u64,
            end_unix_nano: 2_000 + n as u64,
            attributes: vec![],
            status: SpanStatus::Unset,
            resource: resource.clone(),
        }
    }

    /// A server span as the HTTP parser builds it: 12 attributes.
    fn http_span(n: u32, resource: &Arc<Resource>) -> Span {
        let mut s = span(n as u8, resource);
        s.name = "GET".into();
        s.start_unix_nano = 1_795_561_800_000_000_000 + n as u64;
        s.end_unix_nano = s.start_unix_nano + 1_234_567;
        s.attributes = vec![
            Attribute::str("http.request.method", "GET"),
            Attribute::str("url.path", format!("/api/v1/items/{n}")),
            Attribute::str("url.scheme", "http"),
            Attribute::int("http.response.status_code", 200),
            Attribute::str("server.address", "10.0.3.17"),
            Attribute::int("server.port", 8080),
            Attribute::str("client.address", "10.0.1.4"),
            Attribute::str("network.peer.address", "10.0.1.4"),
            Attribute::int("network.peer.port", 43210 + (n % 1000) as i64),
            Attribute::str("network.protocol.version", "1.1"),
            Attribute::str("user_agent.original", "curl/8.5.0"),
            Attribute::int("http.response.body.size", 5120),
        ];
        s
    }

    fn str_value(kv: &KeyValue) -> Option<&str> {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn span_fields() {
        let r = resource(1, "a");
        let mut s = span(7, &r);
        s.kind = SpanKind::Client;
        s.parent_span_id = Some([9; 8]);
        s.status = SpanStatus::Error {
            message: "reset".into(),
        };
        s.attributes = vec![
            Attribute::str("url.path", "/x"),
            Attribute::int("http.response.status_code", 503),
            Attribute::bool("periscope.incomplete", true),
            Attribute {
                key: "ratio".into(),
                value: AttrValue::Double(0.25),
            },
        ];
        let req = assert_matches_reference(&[s], &[]);
        let p = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(p.trace_id, vec![7; 16]);
        assert_eq!(p.span_id, vec![7; 8]);
        assert_eq!(p.parent_span_id, vec![9; 8]);
        assert_eq!(p.name, "span7");
        assert_eq!(p.kind, pb::trace::v1::span::SpanKind::Client as i32);
        assert_eq!(p.start_time_unix_nano, 1_007);
        assert_eq!(p.end_time_unix_nano, 2_007);
        assert_eq!(p.flags, 1);
        assert_eq!(
            p.status,
            Some(pb::trace::v1::Status {
                message: "reset".into(),
                code: 2
            })
        );
        let values: Vec<_> = p
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone().unwrap().value.unwrap()))
            .collect();
        assert_eq!(
            values,
            vec![
                ("url.path", any_value::Value::StringValue("/x".into())),
                ("http.response.status_code", any_value::Value::IntValue(503)),
                ("periscope.incomplete", any_value::Value::BoolValue(true)),
                ("ratio", any_value::Value::DoubleValue(0.25)),
            ]
        );

        let mut s = span(1, &r);
        s.kind = SpanKind::Internal;
        let req = assert_matches_reference(&[s, span(2, &r)], &[]);
        let spans = &req.resource_spans[0].scope_spans[0].spans;
        assert!(spans[0].parent_span_id.is_empty());
        assert_eq!(spans[0].status, None);
        assert_eq!((spans[0].kind, spans[1].kind), (1, 2));
    }

    #[test]
    fn groups_by_resource() {
        let a = resource(10, "a");
        let b = resource(20, "b");
        // An equal resource in a different Arc joins the same group...
        let a2 = Arc::new((*a).clone());
        // ...but the same pid with other attributes (exec'd) does not.
        let a_exec = resource(10, "a-new");
        let spans = vec![
            span(1, &a),
            span(2, &b),
            span(3, &a2),
            span(4, &a_exec),
            span(5, &b),
            span(6, &a),
        ];
        let extra = vec![
            Attribute::str("service.name", "env"),
            Attribute::str("k8s.cluster.name", "c1"),
        ];
        let req = assert_matches_reference(&spans, &extra);
        let summary: Vec<(&str, Vec<&str>)> = req
            .resource_spans
            .iter()
            .map(|rs| {
                let attrs = &rs.resource.as_ref().unwrap().attributes;
                let name = attrs
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .and_then(str_value)
                    .unwrap();
                assert_eq!(rs.scope_spans.len(), 1);
                let scope = rs.scope_spans[0].scope.as_ref().unwrap();
                assert_eq!(
                    (scope.name.as_str(), scope.version.as_str()),
                    ("periscope", env!("CARGO_PKG_VERSION"))
                );
                (name, rs.scope_spans[0].spans.iter().map(|s| s.name.as_str()).collect())
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a", vec!["span1", "span3", "span6"]),
                ("b", vec!["span2", "span5"]),
                ("a-new", vec!["span4"]),
            ]
        );
        // Env attributes are merged in, the process's own win.
        let attrs = &req.resource_spans[0].resource.as_ref().unwrap().attributes;
        let keys: Vec<&str> = attrs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, vec!["service.name", "process.pid", "k8s.cluster.name"]);
        assert_eq!(assert_matches_reference(&[], &extra).resource_spans.len(), 0);
    }

    #[test]
    fn every_kind_of_value_and_empty_fields() {
        let r = Arc::new(Resource {
            pid: 0,
            attributes: vec![
                Attribute::str("service.name", "größe-服务"),
                Attribute::str("", ""),
                Attribute::int("process.pid", 0),
            ],
        });
        let empty = Arc::new(Resource { pid: 5, attributes: vec![] });
        let mut s = span(0, &r);
        s.name = "".into();
        s.start_unix_nano = 0;
        s.end_unix_nano = 0;
        s.status = SpanStatus::Error { message: String::new() };
        s.attributes = vec![
            Attribute::str("", ""),
            Attribute::str("url.path", "/ünïcödé/😀"),
            Attribute::int("zero", 0),
            Attribute::int("negative", i64::MIN),
            Attribute::int("max", i64::MAX),
            Attribute::bool("no", false),
            Attribute { key: "zero.double".into(), value: AttrValue::Double(0.0) },
            Attribute { key: "minus".into(), value: AttrValue::Double(-1.5e300) },
            Attribute::str_array("dns.answers", vec!["10.0.0.1".into(), String::new(), "ß".into()]),
            Attribute::str_array("none", vec![]),
        ];
        let mut t = span(255, &empty);
        t.parent_span_id = Some([0; 8]);
        t.status = SpanStatus::Error { message: "τimeout".into() };
        let extra = [
            Attribute::str("deployment.environment.name", "prod"),
            Attribute::int("process.pid", 1),
        ];
        assert_matches_reference(&[s.clone(), t.clone(), s], &extra);
        assert_matches_reference(&[t], &[]);
    }

    #[test]
    fn reuses_its_buffer_between_batches() {
        let resources: Vec<_> = (0..4).map(|p| resource(p, "web")).collect();
        let batch: Vec<Span> = (0..1024).map(|n| http_span(n, &resources[n as usize % 4])).collect();
        let mut encoder = OtlpEncoder::new(vec![Attribute::str("k8s.cluster.name", "c1")]);
        let first = encoder.encode(&batch);
        let (address, len) = (first.as_ptr(), first.len());
        drop(first);
        for _ in 0..2 {
            let again = encoder.encode(&batch);
            assert_eq!(again.len(), len);
            assert_eq!(again.as_ptr(), address, "a new buffer for the same batch");
        }
        assert_eq!(encoder.resources.len(), 4, "each resource encoded once");
    }

    #[test]
    fn forgets_resources_of_finished_processes() {
        let mut encoder = OtlpEncoder::new(vec![]);
        let live = resource(1, "live");
        for pid in 2..(MIN_PRUNE_AT as u32 + 10) {
            let gone = resource(pid, "short-lived");
            encoder.encode(&[span(1, &gone), span(2, &live)]);
        }
        assert!(encoder.resources.len() < MIN_PRUNE_AT, "{}", encoder.resources.len());
        let req = ExportTraceServiceRequest::decode(encoder.encode(&[span(3, &live)])).unwrap();
        assert_eq!(req, reference_request(&[span(3, &live)], &[]));
    }

    fn any_cow() -> impl Strategy<Value = Cow<'static, str>> {
        any::<String>().prop_map(Cow::Owned)
    }

    fn any_attribute() -> impl Strategy<Value = Attribute> {
        let value = prop_oneof![
            any::<String>().prop_map(|s| AttrValue::Str(s.into())),
            any::<i64>().prop_map(AttrValue::Int),
            any::<bool>().prop_map(AttrValue::Bool),
            // NaN would not equal itself in the comparison.
            any::<f64>().prop_filter("not NaN", |d| !d.is_nan()).prop_map(AttrValue::Double),
            vec(any::<String>(), 0..4).prop_map(AttrValue::StrArray),
        ];
        (any_cow(), value).prop_map(|(key, value)| Attribute { key, value })
    }

    fn any_resource() -> impl Strategy<Value = Resource> {
        (0..3u32, vec(any_attribute(), 0..4)).prop_map(|(pid, attributes)| Resource { pid, attributes })
    }

    /// A span, with the index of its resource in a pool and whether it
    /// gets its own (equal) copy of that resource.
    fn any_span() -> impl Strategy<Value = (Span, usize, bool)> {
        let kind = prop_oneof![Just(SpanKind::Client), Just(SpanKind::Server), Just(SpanKind::Internal)];
        let status = prop_oneof![
            Just(SpanStatus::Unset),
            any::<String>().prop_map(|message| SpanStatus::Error { message }),
        ];
        let ids = (any::<[u8; 16]>(), any::<[u8; 8]>(), any::<Option<[u8; 8]>>());
        let times = (any::<u64>(), any::<u64>());
        (ids, any::<String>().prop_map(Into::into), kind, times, vec(any_attribute(), 0..6), status, 0..4usize, any::<bool>()).prop_map(
            |((trace_id, span_id, parent_span_id), name, kind, (start, end), attributes, status, pool, copy)| {
                let span = Span {
                    trace_id,
                    span_id,
                    parent_span_id,
                    name,
                    kind,
                    start_unix_nano: start,
                    end_unix_nano: end,
                    attributes,
                    status,
                    resource: Arc::new(Resource { pid: 0, attributes: vec![] }),
                };
                (span, pool, copy)
            },
        )
    }

    proptest! {
        #[test]
        fn decodes_to_the_reference_message(
            pool in vec(any_resource(), 4),
            spans in vec(any_span(), 0..12),
            extra in vec(any_attribute(), 0..3),
        ) {
            let pool: Vec<Arc<Resource>> = pool.into_iter().map(Arc::new).collect();
            let spans: Vec<Span> = spans
                .into_iter()
                .map(|(mut span, i, copy)| {
                    span.resource = if copy { Arc::new((*pool[i]).clone()) } else { pool[i].clone() };
                    span
                })
                .collect();
            assert_matches_reference(&spans, &extra);
        }
    }
}
