//! The daemon's own counters as OTLP metrics, when an OTLP/gRPC endpoint is
//! set: every `interval`, the same snapshot `periscope status` shows is
//! sent as cumulative sums (counters, kernel losses per program) and gauges
//! (open connections, export queue).

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

/// Sends the daemon's metrics every `interval` (OTLP/gRPC only). Failures
/// are logged once per failing period; the span exporter reports the
/// endpoint's health.
pub fn spawn(
    cfg: &OtlpConfig,
    extra: Vec<Attribute>,
    calls: mpsc::Sender<ControlCall>,
    interval: Duration,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    if cfg.protocol != Protocol::Grpc {
        log::info!("OTLP metrics are sent over gRPC only; with {} only traces are exported", cfg.protocol.as_str());
        return Ok(None);
    }
    let endpoint = Endpoint::from_shared(cfg.url.clone())?.timeout(cfg.timeout);
    let channel = super::tls::grpc_endpoint(endpoint, cfg)?.connect_lazy();
    let mut client = MetricsServiceClient::new(channel);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
    Ok(Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        let mut failing = false;
        loop {
            tick.tick().await;
            let (reply, answer) = oneshot::channel();
            if calls.send(ControlCall { request: Request::Status, reply }).await.is_err() {
                return;
            }
            let Ok(Response { ok: true, result: Some(value), .. }) = answer.await else { continue };
            let Ok(report) = serde_json::from_value::<StatusReport>(value) else { continue };
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
            match client.export(to_request(&report, &host, &extra, now)).await {
                Ok(_) if failing => {
                    failing = false;
                    log::info!("OTLP metrics export works again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    log::warn!("OTLP metrics export failed: {}; will keep trying", e.message());
                }
                Err(_) => {}
            }
        }
    })))
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
