//! Metrics as the tests see them: histogram data points parsed from Rotel's
//! detailed debug log, and the agent's Prometheus endpoint scraped in
//! either format.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One histogram data point as Rotel printed it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramPoint {
    pub metric: String,
    pub unit: String,
    /// `AGGREGATION_TEMPORALITY_CUMULATIVE` or `..._DELTA`.
    pub temporality: String,
    /// Resource attributes, values as Rotel shows them without the type
    /// (`Str(nginx)` -> `nginx`, `Int(42)` -> `42`).
    pub resource: BTreeMap<String, String>,
    pub attributes: BTreeMap<String, String>,
    pub start_ns: u64,
    pub time_ns: u64,
    pub count: u64,
    pub sum: f64,
    pub bucket_counts: Vec<u64>,
    /// (trace id, span id), lowercase hex.
    pub exemplars: Vec<(String, String)>,
}

impl HistogramPoint {
    pub fn resource_int(&self, key: &str) -> Option<i64> {
        self.resource.get(key).and_then(|v| v.parse().ok())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
enum Section {
    #[default]
    Outside,
    Resource,
    Descriptor,
    PointAttributes,
    Point,
    Exemplar,
}

/// Line-by-line parser of the metric part of Rotel's detailed debug log
/// (`--debug-log metrics --debug-log-verbosity detailed`); span dumps and
/// Rotel's own log lines are skipped.
#[derive(Default)]
pub struct MetricsLogParser {
    points: Vec<HistogramPoint>,
    in_metrics: bool,
    section: Section,
    resource: BTreeMap<String, String>,
    metric: (String, String, String, String),
    current: Option<HistogramPoint>,
    exemplar: (String, String),
}

/// `Str(x)` -> `x`, `Int(4)` -> `4`; anything else as printed.
fn bare_value(raw: &str) -> String {
    for prefix in ["Str(", "Int(", "Double(", "Bool("] {
        if let Some(v) = raw.strip_prefix(prefix).and_then(|v| v.strip_suffix(')')) {
            return v.to_string();
        }
    }
    raw.to_string()
}

impl MetricsLogParser {
    fn finish_point(&mut self) {
        self.finish_exemplar();
        if let Some(p) = self.current.take() {
            self.points.push(p);
        }
    }

    fn finish_exemplar(&mut self) {
        let (trace, span) = std::mem::take(&mut self.exemplar);
        if !trace.is_empty()
            && let Some(p) = self.current.as_mut()
        {
            p.exemplars.push((trace, span));
        }
    }

    pub fn feed(&mut self, line: &str) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with("{\"v\":") {
            return;
        }
        if line.starts_with("ResourceMetrics #") {
            self.finish_point();
            self.in_metrics = true;
            self.resource.clear();
            self.section = Section::Outside;
            return;
        }
        if line.starts_with("ResourceSpans #") || line.starts_with("ResourceLogs #") {
            self.finish_point();
            self.in_metrics = false;
            return;
        }
        if !self.in_metrics {
            return;
        }
        if line == "Resource attributes:" {
            self.section = Section::Resource;
            return;
        }
        if line.starts_with("Metric #") {
            self.finish_point();
            self.metric = Default::default();
            return;
        }
        if line == "Descriptor:" {
            self.section = Section::Descriptor;
            return;
        }
        if line.starts_with("HistogramDataPoints #") {
            self.finish_point();
            self.current = Some(HistogramPoint {
                metric: self.metric.0.clone(),
                unit: self.metric.1.clone(),
                temporality: self.metric.3.clone(),
                resource: self.resource.clone(),
                ..Default::default()
            });
            self.section = Section::Point;
            return;
        }
        if line.starts_with("NumberDataPoints #") || line.starts_with("ScopeMetrics #") {
            self.finish_point();
            self.section = Section::Outside;
            return;
        }
        if line == "Data point attributes:" {
            self.section = Section::PointAttributes;
            return;
        }
        if line == "Exemplars:" {
            self.section = Section::Exemplar;
            return;
        }
        if line.starts_with("Exemplar #") {
            self.finish_exemplar();
            self.section = Section::Exemplar;
            return;
        }
        if let Some(attr) = line.strip_prefix("     -> ") {
            let Some((key, raw)) = attr.split_once(": ") else {
                return;
            };
            match self.section {
                Section::Resource => {
                    self.resource.insert(key.to_string(), bare_value(raw));
                }
                Section::Descriptor => match key {
                    "Name" => self.metric.0 = raw.to_string(),
                    "Unit" => self.metric.1 = raw.to_string(),
                    "DataType" => self.metric.2 = raw.to_string(),
                    "AggregationTemporality" => self.metric.3 = raw.to_string(),
                    _ => {}
                },
                Section::PointAttributes => {
                    if let Some(p) = self.current.as_mut() {
                        p.attributes.insert(key.to_string(), bare_value(raw));
                    }
                }
                Section::Exemplar => match key {
                    "Trace ID" => self.exemplar.0 = raw.trim().to_string(),
                    "Span ID" => self.exemplar.1 = raw.trim().to_string(),
                    _ => {}
                },
                Section::Point | Section::Outside => {}
            }
            return;
        }
        let Some(p) = self.current.as_mut() else {
            return;
        };
        if let Some(v) = line.strip_prefix("StartTimestamp: ") {
            p.start_ns = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Timestamp: ") {
            p.time_ns = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Count: ") {
            p.count = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Sum: ") {
            p.sum = v.trim().parse().unwrap_or(0.0);
        } else if let Some((_, v)) = line
            .strip_prefix("Buckets #")
            .and_then(|r| r.split_once(", Count: "))
        {
            p.bucket_counts.push(v.trim().parse().unwrap_or(0));
        }
    }

    /// Points read so far, the one being read included: Rotel prints a
    /// request's metrics in one go, so callers poll until what they wait
    /// for is there.
    pub fn points(&self) -> Vec<HistogramPoint> {
        let mut out = self.points.clone();
        if let Some(p) = &self.current {
            let mut p = p.clone();
            if !self.exemplar.0.is_empty() {
                p.exemplars.push(self.exemplar.clone());
            }
            out.push(p);
        }
        out
    }
}

/// `GET /metrics` from the agent's Prometheus endpoint on 127.0.0.1:`port`;
/// with `openmetrics`, asking for OpenMetrics. Returns (Content-Type, body).
pub fn scrape(port: u16, openmetrics: bool) -> Result<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = if openmetrics {
        "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
    } else {
        "text/plain"
    };
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no HTTP header in {text:?}")
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics: {head}\n{body}");
    }
    let content_type = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.trim())
        })
        .unwrap_or_default()
        .to_string();
    Ok((content_type, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &[&str] = &[
        "ResourceSpans #0",
        "Resource attributes:",
        "     -> service.name: Str(x)",
        "ResourceMetrics #0",
        "Resource SchemaURL: ",
        "Resource attributes:",
        "     -> service.name: Str(nginx)",
        "     -> process.pid: Int(42)",
        "ScopeMetrics #0",
        "InstrumentationScope periscope 0.1.0",
        "Metric #0",
        "Descriptor:",
        "     -> Name: http.server.request.duration",
        "     -> Unit: s",
        "     -> DataType: Histogram",
        "     -> AggregationTemporality: AGGREGATION_TEMPORALITY_CUMULATIVE",
        "HistogramDataPoints #0",
        "Data point attributes:",
        "     -> http.request.method: Str(GET)",
        "     -> http.response.status_code: Int(200)",
        "StartTimestamp: 10",
        "Timestamp: 20",
        "Count: 2",
        "Sum: 0.006",
        "ExplicitBounds #0: 0.005",
        "Buckets #0, Count: 1",
        "Buckets #1, Count: 1",
        "Exemplars:",
        "Exemplar #0",
        "     -> Trace ID: aa",
        "     -> Span ID: bb",
        "     -> Value: 0.003",
        "HistogramDataPoints #1",
        "Data point attributes:",
        "     -> http.response.status_code: Int(500)",
        "Count: 1",
        "ResourceSpans #0",
    ];

    #[test]
    fn parses_points_with_attributes_and_exemplars() {
        let mut p = MetricsLogParser::default();
        for l in DUMP {
            p.feed(l);
        }
        let points = p.points();
        assert_eq!(points.len(), 2);
        let a = &points[0];
        assert_eq!(a.metric, "http.server.request.duration");
        assert_eq!(a.unit, "s");
        assert_eq!(a.resource_int("process.pid"), Some(42));
        assert_eq!(a.resource["service.name"], "nginx");
        assert_eq!(a.attributes["http.response.status_code"], "200");
        assert_eq!(
            (a.count, a.time_ns, a.bucket_counts.clone()),
            (2, 20, vec![1, 1])
        );
        assert_eq!(a.exemplars, vec![("aa".to_string(), "bb".to_string())]);
        assert_eq!(points[1].count, 1);
        assert!(points[1].exemplars.is_empty());
    }
}
