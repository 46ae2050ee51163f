//! Optional Prometheus endpoint (`--metrics-address`): `GET /metrics`
//! renders the same [`StatusReport`] `periscope status` shows, and the RED
//! histograms; in OpenMetrics (with exemplars) when the scraper asks for it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::protocol::{Feature, Request, StatusReport};
use super::server::{ControlCall, call};
use crate::red::prometheus;
use crate::red::snapshot::RedSnapshot;
use crate::stats::Stats;

/// The daemon's counters by name, for [`StatusReport::counters`].
pub fn counters_from_stats(s: &Stats) -> BTreeMap<String, u64> {
    [
        ("events_received", &s.events_received),
        ("events_malformed", &s.events_malformed),
        ("events_unparsed", &s.events_unparsed),
        ("events_unmatched", &s.events_unmatched),
        ("http_parse_errors", &s.http_parse_errors),
        ("connections_not_http", &s.connections_not_http),
        ("http2_hpack_incomplete", &s.http2_hpack_incomplete),
        ("failed_connect_spans", &s.failed_connect_spans),
        ("failed_connects_folded", &s.failed_connects_folded),
        ("failed_handshake_spans", &s.failed_handshake_spans),
        ("grpc_go_header_blocks", &s.grpc_go_header_blocks),
        ("grpc_go_header_blocks_unmatched", &s.grpc_go_header_blocks_unmatched),
        ("http2_streams_dropped", &s.http2_streams_dropped),
        ("http2_header_bytes_cut", &s.http2_header_bytes_cut),
        ("http2_desyncs", &s.http2_desyncs),
        ("http2_hpack_errors", &s.http2_hpack_errors),
        ("tls_unlinked", &s.tls_unlinked),
        ("tls_not_visible_connections", &s.tls_not_visible_connections),
        ("spans_built", &s.spans_built),
        ("request_spans_built", &s.request_spans_built),
        ("spans_incomplete", &s.spans_incomplete),
        ("spans_sampled_out", &s.spans_sampled_out),
        ("spans_exported", &s.spans_exported),
        ("spans_dropped", &s.spans_dropped),
        ("export_errors", &s.export_errors),
        ("dns_parse_errors", &s.dns_parse_errors),
        ("dns_lookups", &s.dns_lookups),
        ("dns_unmatched_messages", &s.dns_unmatched_messages),
        ("resolver_calls", &s.resolver_calls),
        ("resolutions_linked", &s.resolutions_linked),
        ("trace_links_in_process", &s.trace_links_in_process),
        ("trace_links_cross_process", &s.trace_links_cross_process),
        ("trace_links_ambiguous", &s.trace_links_ambiguous),
        ("trace_links_refused", &s.trace_links_refused),
        ("connections_out_of_step", &s.connections_out_of_step),
        ("spans_held", &s.spans_held),
        ("spans_held_expired", &s.spans_held_expired),
        ("correlation_overflow", &s.correlation_overflow),
        ("k8s_api_lookups", &s.k8s_api_lookups),
        ("k8s_api_errors", &s.k8s_api_errors),
        ("k8s_api_dropped", &s.k8s_api_dropped),
    ]
    .into_iter()
    .map(|(name, c)| (name.to_string(), Stats::get(c)))
    .collect()
}

fn counter_help(name: &str) -> &'static str {
    match name {
        "events_received" => "Records read from the ring buffer.",
        "events_malformed" => "Records that could not be decoded.",
        "events_unparsed" => "Data events on connections carrying no protocol periscope parses.",
        "events_unmatched" => "Data events for connections no longer tracked.",
        "http_parse_errors" => "Protocol errors on connections that looked like HTTP/1 or HTTP/2.",
        "connections_not_http" => "Connections given up as not HTTP.",
        "http2_hpack_incomplete" => "HTTP/2 streams whose method or path sat in an HPACK entry made before periscope saw the connection.",
        "failed_connect_spans" => "Failed connects (refused, timed out...) turned into spans.",
        "failed_handshake_spans" => "Connections that closed after a TLS handshake that never completed, turned into spans.",
        "failed_connects_folded" => "Failed connects folded by the per-process, per-destination rate limit.",
        "grpc_go_header_blocks" => "HTTP/2 header blocks grpc-go's probes reported decoded, applied to their streams.",
        "grpc_go_header_blocks_unmatched" => "Header blocks from grpc-go's probes whose connection or stream was not found.",
        "http2_streams_dropped" => "HTTP/2 streams not tracked (too many open on one connection).",
        "http2_header_bytes_cut" => "HTTP/2 header block bytes beyond the per-block cap.",
        "http2_desyncs" => "Times an HTTP/2 direction lost frame sync and resynchronised.",
        "http2_hpack_errors" => "HPACK header blocks that could not be decoded.",
        "tls_unlinked" => "TLS plaintext or handshakes not tied to a socket.",
        "tls_not_visible_connections" => "Connections carrying TLS no uprobe saw.",
        "spans_built" => "Spans built.",
        "request_spans_built" => "Client and server spans built (phases and getaddrinfo calls excluded).",
        "spans_incomplete" => "Spans built from incomplete data.",
        "spans_sampled_out" => "Spans left out by head sampling.",
        "spans_exported" => "Spans delivered to the exporter's destination.",
        "spans_dropped" => "Spans dropped (queue full or refused by the backend).",
        "export_errors" => "Failed export attempts.",
        "dns_parse_errors" => "DNS messages that could not be parsed.",
        "dns_lookups" => "DNS lookups turned into spans.",
        "dns_unmatched_messages" => "DNS messages that are not a client lookup (server side, unmatched responses).",
        "resolver_calls" => "getaddrinfo calls seen.",
        "resolutions_linked" => "Name resolutions linked to the connection they led to.",
        "trace_links_in_process" => "Client spans parented to the server request their thread served.",
        "trace_links_cross_process" => "Server spans parented to the traced client span of the same connection.",
        "trace_links_ambiguous" => "Client requests left unlinked: several server requests open on their thread.",
        "trace_links_refused" => "Links not made: found too late, or the two ends disagreed on the request.",
        "connections_out_of_step" => "Connections that lost data events in the kernel, left out of trace links.",
        "spans_held" => "Spans held until their parent's trace was known.",
        "spans_held_expired" => "Spans exported before their parent's trace was known.",
        "correlation_overflow" => "Pending correlation entries dropped because a table was full.",
        "k8s_api_lookups" => "Pod lookups sent to the Kubernetes API server, retries included.",
        "k8s_api_errors" => "Pod lookups the Kubernetes API server refused or did not answer usably (retried with backoff).",
        "k8s_api_dropped" => "Pod lookup requests dropped because the lookup queue was full.",
        "red_routes_folded" => "Requests counted under _OTHER because their service had --max-routes routes (or RPC methods, DNS names, servers).",
        "red_series_overflow" => "Requests not counted in the RED metrics because the series table was full.",
        "recent_trace_spans_dropped" => "Spans left out of the local view's traces (more than 256 in one trace).",
        _ => "Periscope counter.",
    }
}

/// Metric-name-safe: `[a-zA-Z0-9_]`, anything else becomes `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
        .collect()
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A counter's HELP and TYPE: the Prometheus text format names the family
/// as its samples (`x_total`), OpenMetrics without the suffix.
fn counter_family(out: &mut String, sample_name: &str, help: &str, openmetrics: bool) {
    let name = if openmetrics { sample_name.strip_suffix("_total").unwrap_or(sample_name) } else { sample_name };
    family(out, name, "counter", help);
}

/// The Prometheus text exposition format (0.0.4) of a status report, or
/// the same in OpenMetrics' form (without its `# EOF`).
pub fn prometheus_text(r: &StatusReport, openmetrics: bool) -> String {
    let mut o = String::new();
    for (name, value) in &r.counters {
        let base = sanitize(name);
        let metric = format!("periscope_{}_total", base.strip_suffix("_total").unwrap_or(&base));
        counter_family(&mut o, &metric, counter_help(name), openmetrics);
        let _ = writeln!(o, "{metric} {value}");
    }
    counter_family(
        &mut o,
        "periscope_events_lost_total",
        "Events the kernel could not write to the ring buffer, per program.",
        openmetrics,
    );
    for (probe, n) in &r.lost_per_probe {
        let _ = writeln!(
            o,
            "periscope_events_lost_total{{probe=\"{}\"}} {n}",
            escape_label(probe)
        );
    }
    gauge(
        &mut o,
        "periscope_uptime_seconds",
        "Seconds since the daemon started.",
        r.uptime_s,
    );
    gauge(
        &mut o,
        "periscope_connections_open",
        "Connections tracked right now.",
        r.connections_open,
    );
    gauge(
        &mut o,
        "periscope_traced_processes",
        "Processes seen with traffic.",
        r.processes.len(),
    );
    gauge(
        &mut o,
        "periscope_export_queue_spans",
        "Spans waiting in the export queue.",
        r.exporter.queued,
    );
    gauge(
        &mut o,
        "periscope_export_queue_capacity_spans",
        "Export queue capacity.",
        r.exporter.queue_capacity,
    );
    gauge(
        &mut o,
        "periscope_exporter_healthy",
        "1 if no export has failed since the last success.",
        u8::from(r.exporter.healthy),
    );
    gauge(&mut o, "periscope_sample_ratio", "Head sampling ratio.", r.sample_ratio);
    family(
        &mut o,
        "periscope_feature_enabled",
        "gauge",
        "1 if the feature is enabled.",
    );
    for f in Feature::ALL {
        let enabled = r.features.get(&f).is_some_and(|s| s.enabled);
        let _ = writeln!(o, "periscope_feature_enabled{{feature=\"{f}\"}} {}", u8::from(enabled));
    }
    family(&mut o, "periscope_build_info", "gauge", "Periscope version.");
    let _ = writeln!(o, "periscope_build_info{{version=\"{}\"}} 1", escape_label(&r.version));
    o
}

type HttpResponse = hyper::Response<Full<Bytes>>;

fn text_response(status: StatusCode, content_type: &str, body: String) -> HttpResponse {
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

async fn respond(
    req: hyper::Request<Incoming>,
    handler: mpsc::Sender<ControlCall>,
) -> Result<HttpResponse, Infallible> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return Ok(text_response(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; metrics are at /metrics\n".into(),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text_response(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "use GET\n".into()));
    }
    let openmetrics = req
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(prometheus::wants_openmetrics);
    let response = call(&handler, Request::Status, Duration::from_secs(5)).await;
    let report = match response.into_result::<StatusReport>() {
        Ok(report) => report,
        Err((_, message)) => return Ok(text_response(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{message}\n"))),
    };
    let mut body = prometheus_text(&report, openmetrics);
    // The RED histograms; the daemon's counters are worth serving without them.
    let red = call(&handler, Request::Metrics, Duration::from_secs(5)).await;
    if let Ok(snapshot) = red.into_result::<RedSnapshot>() {
        prometheus::render(&snapshot, openmetrics, &mut body);
    }
    let content_type = if openmetrics {
        if !body.ends_with("# EOF\n") {
            body.push_str("# EOF\n");
        }
        prometheus::OPENMETRICS_CONTENT_TYPE
    } else {
        prometheus::TEXT_CONTENT_TYPE
    };
    Ok(text_response(StatusCode::OK, content_type, body))
}

/// Serves `GET /metrics` on `addr` (HTTP/1), answering from the same
/// [`ControlCall`] channel as the control socket. Returns the bound
/// address (useful with port 0) and the accept task (abort it on shutdown).
pub async fn serve_prometheus(
    addr: SocketAddr,
    handler: mpsc::Sender<ControlCall>,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    log::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| respond(req, handler.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    log::debug!("metrics endpoint: connection error: {e}");
                }
            });
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{ExporterStatus, FeatureStatus};
    use crate::control::server::tests::fake_handler;
    use std::collections::HashMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Parses the exposition text: every sample's family has HELP and TYPE before it.
    fn parse(text: &str) -> (HashMap<String, String>, Vec<(String, f64)>) {
        let mut types = HashMap::new();
        let mut helps = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                assert!(!help.is_empty());
                helps.insert(name.to_string(), help.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "duplicate TYPE {name}"
                );
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
                assert!(
                    types.contains_key(name) && helps.contains_key(name),
                    "no TYPE/HELP before {line}"
                );
                if series.contains('{') {
                    assert!(series.ends_with("\"}"), "{line}");
                }
                samples.push((series.to_string(), value.parse::<f64>().unwrap()));
            }
        }
        (types, samples)
    }

    #[test]
    fn counters_cover_stats() {
        let stats = Stats::default();
        Stats::add(&stats.spans_exported, 9);
        let c = counters_from_stats(&stats);
        assert_eq!(c["spans_exported"], 9);
        // Every field of Stats (read from its Debug form) is listed, with help text.
        let debug = format!("{stats:?}");
        let fields: Vec<&str> = debug
            .split(['{', ','])
            .skip(1)
            .filter_map(|f| f.split(':').next())
            .map(str::trim)
            .filter(|f| !f.is_empty() && !f.starts_with('}'))
            .collect();
        assert!(fields.len() >= 14, "{debug}");
        for f in &fields {
            assert!(c.contains_key(*f), "counters_from_stats misses Stats::{f}");
            assert_ne!(counter_help(f), "Periscope counter.", "no help text for {f}");
        }
        assert_eq!(c.len(), fields.len());
    }

    #[test]
    fn exposition_format() {
        let mut r = StatusReport {
            version: "0.1.0".into(),
            uptime_s: 12,
            connections_open: 3,
            sample_ratio: 0.5,
            exporter: ExporterStatus {
                healthy: true,
                queued: 4,
                queue_capacity: 2048,
                ..Default::default()
            },
            counters: counters_from_stats(&Stats::default()),
            ..Default::default()
        };
        r.counters.insert("spans_exported".into(), 42);
        r.counters.insert("odd-name.x".into(), 1);
        r.lost_per_probe.insert("sock_send_length".into(), 5);
        r.lost_per_probe.insert("tls_read_write".into(), 0);
        r.features.insert(
            Feature::Tls,
            FeatureStatus {
                enabled: true,
                available: true,
                ..Default::default()
            },
        );
        let text = prometheus_text(&r, false);
        let (types, samples) = parse(&text);
        let get = |s: &str| samples.iter().find(|(n, _)| n == s).map(|(_, v)| *v);
        assert_eq!(types["periscope_spans_exported_total"], "counter");
        assert_eq!(get("periscope_spans_exported_total"), Some(42.0));
        assert_eq!(get("periscope_odd_name_x_total"), Some(1.0));
        assert_eq!(types["periscope_events_lost_total"], "counter");
        assert_eq!(
            get("periscope_events_lost_total{probe=\"sock_send_length\"}"),
            Some(5.0)
        );
        assert_eq!(get("periscope_events_lost_total{probe=\"tls_read_write\"}"), Some(0.0));
        assert_eq!(types["periscope_export_queue_spans"], "gauge");
        assert_eq!(get("periscope_export_queue_spans"), Some(4.0));
        assert_eq!(get("periscope_connections_open"), Some(3.0));
        assert_eq!(get("periscope_exporter_healthy"), Some(1.0));
        assert_eq!(get("periscope_uptime_seconds"), Some(12.0));
        assert_eq!(get("periscope_sample_ratio"), Some(0.5));
        assert_eq!(get("periscope_feature_enabled{feature=\"tls\"}"), Some(1.0));
        assert_eq!(get("periscope_feature_enabled{feature=\"dns\"}"), Some(0.0));
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    async fn http_get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let (addr, task) = serve_prometheus("127.0.0.1:0".parse().unwrap(), fake_handler())
            .await
            .unwrap();
        let resp = http_get(addr, "/metrics").await;
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.contains("text/plain; version=0.0.4"), "{resp}");
        assert!(resp.contains("\nperiscope_events_received_total 5\n"), "{resp}");
        assert!(resp.contains("periscope_build_info{version=\"test\"} 1"), "{resp}");
        assert!(http_get(addr, "/").await.starts_with("HTTP/1.1 404"));
        // Event loop gone: 503, not a hang.
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let (addr2, task2) = serve_prometheus("127.0.0.1:0".parse().unwrap(), tx).await.unwrap();
        assert!(http_get(addr2, "/metrics").await.starts_with("HTTP/1.1 503"));
        task.abort();
        task2.abort();
    }
}
