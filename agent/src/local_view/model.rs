//! What `periscope traces` and `periscope map` receive from the daemon:
//! recent traces as spans with their times, and the service map's edges.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewKind {
    Client,
    Server,
    Internal,
}

/// One span as the local view shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpanView {
    /// Lowercase hex, 16 characters.
    pub span_id: String,
    /// Lowercase hex; None for a root span.
    pub parent_span_id: Option<String>,
    /// The span's name (`GET`, `connect`, `DNS A`, a phase such as `server`).
    pub name: String,
    /// What identifies the call: `GET /path`, the RPC's full method, the DNS
    /// question, the phase; never longer than 120 characters.
    pub label: String,
    pub service: String,
    pub pid: u32,
    pub kind: ViewKind,
    /// ns since the Unix epoch.
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// Status text: the HTTP status code, the gRPC status, `error.type`, or empty.
    pub status: String,
    pub error: bool,
}

/// One trace: the spans this node saw of it, in the order they were built.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceView {
    /// Lowercase hex, 32 characters.
    pub trace_id: String,
    /// Increases every time a trace gets spans, across traces; `--follow`
    /// asks for traces updated after the last one it printed.
    pub updated_seq: u64,
    pub spans: Vec<SpanView>,
}

/// One caller -> callee edge of the service map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapEdge {
    /// The calling process's service.name.
    pub caller: String,
    /// The called service's service.name when this node saw it answer,
    /// else `server.address:server.port`.
    pub callee: String,
    pub requests: u64,
    pub errors: u64,
    /// Requests per second over the window the edge was seen in.
    pub rate_per_s: f64,
    /// Estimated from the duration histogram, milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceMap {
    /// Seconds the edges' counts cover (the daemon's uptime, or the time
    /// since metrics were last enabled).
    pub window_s: f64,
    pub edges: Vec<MapEdge>,
}
