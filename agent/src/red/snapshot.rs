//! What the RED aggregator hands to its readers (the OTLP metrics exporter
//! and the Prometheus endpoint): every series with its cumulative counts.
//! Plain data, serialisable, so it can cross the control channel.

use serde::{Deserialize, Serialize};

/// The OpenTelemetry semantic conventions' advice for HTTP (and RPC, DNS)
/// duration histograms, in seconds.
pub const DURATION_BOUNDS_S: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Which histogram a series belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedMetric {
    HttpServer,
    HttpClient,
    RpcServer,
    RpcClient,
    DnsLookup,
}

impl RedMetric {
    pub const ALL: [RedMetric; 5] = [
        RedMetric::HttpServer,
        RedMetric::HttpClient,
        RedMetric::RpcServer,
        RedMetric::RpcClient,
        RedMetric::DnsLookup,
    ];

    /// The OpenTelemetry metric name.
    pub fn name(self) -> &'static str {
        match self {
            RedMetric::HttpServer => "http.server.request.duration",
            RedMetric::HttpClient => "http.client.request.duration",
            RedMetric::RpcServer => "rpc.server.duration",
            RedMetric::RpcClient => "rpc.client.duration",
            RedMetric::DnsLookup => "dns.lookup.duration",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            RedMetric::HttpServer => "Duration of HTTP server requests.",
            RedMetric::HttpClient => "Duration of HTTP client requests.",
            RedMetric::RpcServer => "Duration of RPCs served.",
            RedMetric::RpcClient => "Duration of RPCs made.",
            RedMetric::DnsLookup => "Duration of DNS lookups.",
        }
    }
}

/// An attribute value on a data point.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PointValue {
    Int(i64),
    Str(String),
}

/// A span that was exported, in a given bucket: the way from a bucket to a
/// trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exemplar {
    /// The span's duration, seconds.
    pub value: f64,
    /// When the span ended, ns since the Unix epoch.
    pub time_unix_nano: u64,
    /// Lowercase hex, 32 characters.
    pub trace_id: String,
    /// Lowercase hex, 16 characters.
    pub span_id: String,
}

/// One histogram data point (one metric, one process, one attribute set),
/// cumulative since `start_unix_nano`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Stable for the series' life; a series that is dropped and made again
    /// gets a new id (and a new start time).
    pub id: u64,
    pub metric: RedMetric,
    /// Index into [`RedSnapshot::resources`].
    pub resource: usize,
    /// At most 8, in a stable order.
    pub attributes: Vec<(String, PointValue)>,
    pub start_unix_nano: u64,
    pub count: u64,
    /// Seconds.
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// `DURATION_BOUNDS_S.len() + 1` counts (the last one is above the last bound).
    pub bucket_counts: Vec<u64>,
    /// At most one per bucket: the latest exported span that fell in it,
    /// with the bucket's index.
    pub exemplars: Vec<(usize, Exemplar)>,
}

/// Resource attributes of a traced process, as strings and integers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PointResource {
    pub attributes: Vec<(String, PointValue)>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RedSnapshot {
    /// When the snapshot was taken, ns since the Unix epoch.
    pub time_unix_nano: u64,
    /// Whether the aggregator is on (`periscope disable metrics` turns it off).
    pub enabled: bool,
    pub resources: Vec<PointResource>,
    pub series: Vec<Series>,
    /// Routes folded into `_OTHER` because their service had too many.
    pub routes_folded: u64,
    /// Spans not counted because the series table was full.
    pub series_overflow: u64,
}
