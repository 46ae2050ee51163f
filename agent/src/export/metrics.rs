//! The daemon's own counters and the RED metrics as OTLP metrics, when an
//! OTLP endpoint is set (gRPC or HTTP), every `interval` and at shutdown:
//! the snapshot `periscope status` shows as cumulative sums (counters,
//! kernel losses per program) and gauges (open connections, export queue),
//! and the RED histograms of every traced process (see [`crate::red`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric,
    number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

use super::config::{OtlpConfig, Protocol};
use crate::red::otlp::{DeltaState, Temporality};
use crate::red::snapshot::RedSnapshot;
use crate::control::protocol::{Request, Response, StatusReport};
use crate::control::server::ControlCall;
use crate::spans::model::{AttrValue, Attribute};

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_string())) }),
    }
}

fn point(start: u64, now: u64, value: u64, attributes: Vec<KeyValue>) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsInt(value as i64)),
        ..Default::default()
    }
}

fn sum(name: String, description: &str, points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name,
        description: description.to_string(),
        unit: "1".to_string(),
        data: Some(metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    }
}

fn gauge(name: &str, description: &str, now: u64, value: u64) -> Metric {
    Metric {
        name: name.to_string(),
        description: description.to_string(),
        unit: "1".to_string(),
        data: Some(metric::Data::Gauge(Gauge { data_points: vec![point(0, now, value, Vec::new())] })),
        ..Default::default()
    }
}

/// One export request from a status snapshot.
pub fn to_request(report: &StatusReport, host: &str, extra: &[Attribute], now: u64) -> ExportMetricsServiceRequest {
    let start = now.saturating_sub(report.uptime_s * 1_000_000_000);
    let mut metrics: Vec<Metric> = report
        .counters
        .iter()
        .map(|(name, v)| sum(format!("periscope.{name}"), "", vec![point(start, now, *v, Vec::new())]))
        .collect();
    metrics.push(sum(
        "periscope.events_lost".into(),
        "Events the kernel could not write to the ring buffer, per program.",
        report.lost_per_probe.iter().map(|(probe, n)| point(start, now, *n, vec![kv("probe", probe)])).collect(),
    ));
    metrics.push(gauge("periscope.connections_open", "Connections tracked now.", now, report.connections_open));
    metrics.push(gauge("periscope.export_queue_depth", "Spans waiting to be exported.", now, report.exporter.queued));
    let mut attributes = vec![kv("service.name", "periscope"), kv("host.name", host), kv("process.pid", &report.pid.to_string())];
    for a in extra {
        if let AttrValue::Str(v) = &a.value {
            attributes.push(kv(&a.key, v));
        }
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource { attributes, ..Default::default() }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "periscope".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Where metrics go: OTLP/gRPC's metrics service, or OTLP/HTTP's
/// `/v1/metrics`.
enum Transport {
    Grpc(MetricsServiceClient<tonic::transport::Channel>),
    Http(super::otlp::HttpExporter),
}

impl Transport {
    async fn export(&mut self, request: ExportMetricsServiceRequest) -> Result<(), String> {
        match self {
            Transport::Grpc(client) => client.export(request).await.map(|_| ()).map_err(|e| e.message().to_string()),
            Transport::Http(http) => {
                let body = bytes::Bytes::from(prost::Message::encode_to_vec(&request));
                http.export(body).await.map(|_| ()).map_err(|e| e.message)
            }
        }
    }
}

/// The URL OTLP/HTTP metrics go to: `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`
/// as given, else the traces URL with `/v1/metrics` for `/v1/traces`, else
/// the generic endpoint's `/v1/metrics`.
pub fn metrics_http_url(traces_url: &str, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    if let Some(url) = env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").filter(|u| !u.trim().is_empty()) {
        return Some(url.trim().to_string());
    }
    if let Some(base) = traces_url.strip_suffix("/v1/traces") {
        return Some(format!("{base}/v1/metrics"));
    }
    let generic = env("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|u| !u.trim().is_empty())?;
    super::config::otlp_url(&generic, Protocol::HttpProtobuf, false)
        .ok()
        .and_then(|u| u.strip_suffix("/v1/traces").map(|b| format!("{b}/v1/metrics")))
}

/// The running metrics exporter; [`MetricsExport::finish`] sends the last
/// RED snapshot at shutdown.
pub struct MetricsExport {
    task: JoinHandle<()>,
    last: oneshot::Sender<RedSnapshot>,
}

impl MetricsExport {
    /// Sends `last` (taken after the event loop stopped) and waits for it,
    /// at most `deadline`.
    pub async fn finish(self, last: RedSnapshot, deadline: Duration) {
        if self.last.send(last).is_ok() {
            let mut task = self.task;
            if tokio::time::timeout(deadline, &mut task).await.is_err() {
                log::warn!("OTLP metrics: the last export did not finish within {deadline:?}");
                task.abort();
            }
        } else {
            self.task.abort();
        }
    }
}

/// Sends the daemon's own counters and the RED metrics every `interval`
/// and once at shutdown. Failures are logged once per failing period; the
/// span exporter reports the endpoint's health.
pub fn spawn(
    cfg: &OtlpConfig,
    extra: Vec<Attribute>,
    calls: mpsc::Sender<ControlCall>,
    interval: Duration,
    temporality: Temporality,
) -> anyhow::Result<Option<MetricsExport>> {
    let mut transport = match cfg.protocol {
        Protocol::Grpc => {
            let endpoint = Endpoint::from_shared(cfg.url.clone())?.timeout(cfg.timeout);
            let channel = super::tls::grpc_endpoint(endpoint, cfg)?.connect_lazy();
            let mut client = MetricsServiceClient::new(channel);
            if cfg.gzip {
                client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
            }
            Transport::Grpc(client)
        }
        Protocol::HttpProtobuf => {
            let Some(url) = metrics_http_url(&cfg.url, |k| std::env::var(k).ok()) else {
                log::info!(
                    "OTLP metrics: no URL for them (set OTEL_EXPORTER_OTLP_METRICS_ENDPOINT); only traces are exported"
                );
                return Ok(None);
            };
            let metrics_cfg = OtlpConfig { url, ..cfg.clone() };
            Transport::Http(super::otlp::HttpExporter::new(&metrics_cfg)?)
        }
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
    let (last_tx, mut last_rx) = oneshot::channel::<RedSnapshot>();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        let mut failing = false;
        let mut delta = DeltaState::default();
        loop {
            let (report, red, finishing) = tokio::select! {
                _ = tick.tick() => {
                    let report = ask::<StatusReport>(&calls, Request::Status).await;
                    let red = ask::<RedSnapshot>(&calls, Request::Metrics).await;
                    if report.is_none() && red.is_none() {
                        continue;
                    }
                    (report, red, false)
                }
                last = &mut last_rx => match last {
                    Ok(red) => (None, Some(red), true),
                    Err(_) => return,
                },
            };
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
            let mut request = match &report {
                Some(report) => to_request(report, &host, &extra, now),
                None => ExportMetricsServiceRequest::default(),
            };
            if let Some(red) = red.filter(|r| r.enabled) {
                let mut red_request = crate::red::otlp::to_request(&red, temporality, &mut delta);
                request.resource_metrics.append(&mut red_request.resource_metrics);
            }
            if !request.resource_metrics.is_empty() {
                match transport.export(request).await {
                    Ok(()) if failing => {
                        failing = false;
                        log::info!("OTLP metrics export works again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        log::warn!("OTLP metrics export failed: {e}; will keep trying");
                    }
                    Err(_) => {}
                }
            }
            if finishing {
                return;
            }
        }
    });
    Ok(Some(MetricsExport { task, last: last_tx }))
}

/// One request to the event loop, its answer decoded; None if it did not answer.
async fn ask<T: serde::de::DeserializeOwned>(calls: &mpsc::Sender<ControlCall>, request: Request) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    calls.send(ControlCall { request, reply }).await.ok()?;
    let Ok(Response { ok: true, result: Some(value), .. }) = answer.await else { return None };
    serde_json::from_value(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_becomes_cumulative_sums_and_gauges() {
        let mut report = StatusReport { pid: 7, uptime_s: 10, connections_open: 3, ..Default::default() };
        report.counters.insert("spans_exported".into(), 42);
        report.lost_per_probe.insert("sock_send_length".into(), 1);
        let now = 100_000_000_000;
        let req = to_request(&report, "node-1", &[Attribute::str("k8s.node.name", "n1")], now);
        let rm = &req.resource_metrics[0];
        let res = &rm.resource.as_ref().unwrap().attributes;
        assert!(res.iter().any(|a| a.key == "k8s.node.name"));
        let metrics = &rm.scope_metrics[0].metrics;
        let exported = metrics.iter().find(|m| m.name == "periscope.spans_exported").unwrap();
        let Some(metric::Data::Sum(s)) = &exported.data else { panic!("not a sum") };
        assert!(s.is_monotonic);
        assert_eq!(s.aggregation_temporality, AggregationTemporality::Cumulative as i32);
        assert_eq!(s.data_points[0].value, Some(number_data_point::Value::AsInt(42)));
        assert_eq!(s.data_points[0].start_time_unix_nano, now - 10_000_000_000);
        let lost = metrics.iter().find(|m| m.name == "periscope.events_lost").unwrap();
        let Some(metric::Data::Sum(l)) = &lost.data else { panic!("not a sum") };
        assert_eq!(l.data_points[0].attributes[0].key, "probe");
        assert!(metrics.iter().any(|m| m.name == "periscope.connections_open"));
    }
}
