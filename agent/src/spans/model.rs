//! The span as the daemon builds it, independent of any export format.

use std::borrow::Cow;

use compact_str::CompactString;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Client,
    Server,
    Internal,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// Inline up to 24 bytes (methods, schemes, paths, addresses), so most
    /// values cost no allocation.
    Str(CompactString),
    Int(i64),
    Bool(bool),
    Double(f64),
    /// A list of strings (e.g. `dns.answers`).
    StrArray(Vec<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    pub key: Cow<'static, str>,
    pub value: AttrValue,
}

impl Attribute {
    pub fn str(key: impl Into<Cow<'static, str>>, value: impl Into<CompactString>) -> Self {
        Self { key: key.into(), value: AttrValue::Str(value.into()) }
    }
    pub fn int(key: impl Into<Cow<'static, str>>, value: i64) -> Self {
        Self { key: key.into(), value: AttrValue::Int(value) }
    }
    pub fn bool(key: impl Into<Cow<'static, str>>, value: bool) -> Self {
        Self { key: key.into(), value: AttrValue::Bool(value) }
    }
    pub fn str_array(key: impl Into<Cow<'static, str>>, values: Vec<String>) -> Self {
        Self { key: key.into(), value: AttrValue::StrArray(values) }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpanStatus {
    Unset,
    Error { message: String },
}

/// Resource attributes of one traced process (service.name, process.pid, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub pid: u32,
    pub attributes: Vec<Attribute>,
}

impl Resource {
    /// The value of a string attribute.
    pub fn str_attr(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|a| a.key == key).and_then(|a| match &a.value {
            AttrValue::Str(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn service_name(&self) -> &str {
        self.str_attr("service.name").unwrap_or("unknown_service")
    }

    pub fn executable_path(&self) -> Option<&str> {
        self.str_attr("process.executable.path")
    }
}

#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    /// Low-cardinality name, e.g. `GET` (static for every HTTP and phase span).
    pub name: Cow<'static, str>,
    pub kind: SpanKind,
    /// Wall-clock times (ns since the Unix epoch), converted from kernel
    /// monotonic timestamps.
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Vec<Attribute>,
    pub status: SpanStatus,
    pub resource: Arc<Resource>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.iter().find(|a| a.key == key).map(|a| &a.value)
    }
}
