//! Exporter tests against in-process OTLP receivers (gRPC via tonic's
//! generated server, HTTP via hyper) and an in-memory stdout.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::{OtlpConfig, Protocol, otlp_url};
use super::*;
use crate::spans::model::{Resource, SpanKind, SpanStatus};

pub(super) fn resource(pid: u32, name: &str) -> Arc<Resource> {
    Arc::new(Resource {
        pid,
        attributes: vec![
            Attribute::str("service.name", name.to_string()),
            Attribute::int("process.pid", pid as i64),
        ],
    })
}

fn span(n: u32, resource: &Arc<Resource>) -> Span {
    let mut trace_id = [0u8; 16];
    trace_id[..4].copy_from_slice(&n.to_be_bytes());
    let mut span_id = [0u8; 8];
    span_id[..4].copy_from_slice(&n.to_be_bytes());
    Span {
        trace_id,
        span_id,
        parent_span_id: None,
        name: "GET".into(),
        kind: SpanKind::Server,
        start_unix_nano: 1_795_561_800_000_000_000,
        end_unix_nano: 1_795_561_800_001_000_000,
        attributes: vec![
            Attribute::str("http.request.method", "GET"),
            Attribute::str("url.path", format!("/{n}")),
        ],
        status: SpanStatus::Unset,
        resource: resource.clone(),
    }
}

fn config(destination: Destination, queue: usize, batch: usize, delay_ms: u64) -> ExportConfig {
    ExportConfig {
        destination,
        resource_attributes: vec![Attribute::str("deployment.environment.name", "test")],
        max_queue_size: queue,
        max_export_batch_size: batch,
        schedule_delay: Duration::from_millis(delay_ms),
        flush_timeout: Duration::from_secs(5),
    }
}

fn grpc_dest(addr: SocketAddr) -> Destination {
    Destination::Otlp(OtlpConfig {
        protocol: Protocol::Grpc,
        url: format!("http://{addr}"),
        headers: vec![("x-tenant".into(), "t 1".into())],
        timeout: Duration::from_secs(2),
        tls: Default::default(),
        gzip: false,
    })
}

fn http_dest(addr: SocketAddr) -> Destination {
    Destination::Otlp(OtlpConfig {
        protocol: Protocol::HttpProtobuf,
        url: otlp_url(&format!("http://{addr}"), Protocol::HttpProtobuf, false).unwrap(),
        headers: vec![("x-tenant".into(), "t 1".into())],
        timeout: Duration::from_secs(2),
        tls: Default::default(),
        gzip: false,
    })
}

struct Counts {
    exported: u64,
    dropped: u64,
    errors: u64,
}

fn counts(stats: &Stats) -> Counts {
    Counts {
        exported: Stats::get(&stats.spans_exported),
        dropped: Stats::get(&stats.spans_dropped),
        errors: Stats::get(&stats.export_errors),
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn span_count(req: &ExportTraceServiceRequest) -> usize {
    req.resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum()
}

fn service_names(req: &ExportTraceServiceRequest) -> Vec<String> {
    req.resource_spans
        .iter()
        .map(|rs| {
            let attrs = &rs.resource.as_ref().unwrap().attributes;
            let kv = attrs.iter().find(|kv| kv.key == "service.name").unwrap();
            match kv.value.as_ref().unwrap().value.as_ref().unwrap() {
                opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                    s.clone()
                }
                v => panic!("service.name is {v:?}"),
            }
        })
        .collect()
}

type Responder = dyn Fn(usize) -> Result<ExportTraceServiceResponse, tonic::Status> + Send + Sync;

/// A gRPC collector that records requests and answers with `respond(n)`
/// for the n-th request (0-based).
#[derive(Clone)]
struct Collector {
    received: Arc<Mutex<Vec<(tonic::metadata::MetadataMap, ExportTraceServiceRequest)>>>,
    calls: Arc<Mutex<usize>>,
    respond: Arc<Responder>,
}

impl Collector {
    fn new() -> Self {
        Self::answering(|_| Ok(ExportTraceServiceResponse::default()))
    }
    fn answering(
        respond: impl Fn(usize) -> Result<ExportTraceServiceResponse, tonic::Status>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            received: Default::default(),
            calls: Default::default(),
            respond: Arc::new(respond),
        }
    }
    fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }
    fn spans(&self) -> usize {
        self.requests().iter().map(span_count).sum()
    }
    fn calls(&self) -> usize {
        *self.calls.lock().unwrap()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            *calls - 1
        };
        let answer = (self.respond)(n);
        if answer.is_ok() {
            let metadata = request.metadata().clone();
            self.received
                .lock()
                .unwrap()
                .push((metadata, request.into_inner()));
        }
        answer.map(tonic::Response::new)
    }
}

async fn serve_grpc(listener: TcpListener, collector: Collector) -> JoinHandle<()> {
    // Served with hyper directly: tonic's `Server` needs its `router`
    // feature (axum), which nothing else wants.
    let service = TraceServiceServer::new(collector);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    })
}

/// Serves `collector` on a free port and returns the port's address.
async fn grpc_collector(collector: &Collector) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_grpc(listener, collector.clone()).await;
    addr
}

/// An address nothing listens on (yet).
async fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn grpc_spans_arrive_batched_and_grouped() {
    let collector = Collector::new();
    let addr = grpc_collector(&collector).await;

    let stats = Arc::new(Stats::default());
    let (sink, worker) = spawn(config(grpc_dest(addr), 100, 4, 100), stats.clone());
    let (a, b) = (resource(100, "alpha"), resource(200, "beta"));
    // A current-thread runtime: all ten are queued before the worker runs.
    for n in 0..10 {
        sink.submit(span(n, if n % 2 == 0 { &a } else { &b }));
    }
    wait_for("10 spans", || collector.spans() == 10).await;
    // The collector has them before the exporter has its answer.
    wait_for("the counters", || counts(&stats).exported == 10).await;

    let requests = collector.requests();
    assert_eq!(
        requests.iter().map(span_count).collect::<Vec<_>>(),
        vec![4, 4, 2]
    );
    for req in &requests {
        assert_eq!(
            service_names(req),
            vec!["alpha", "beta"],
            "one ResourceSpans per process"
        );
        for rs in &req.resource_spans {
            let res = rs.resource.as_ref().unwrap();
            assert!(
                res.attributes
                    .iter()
                    .any(|kv| kv.key == "deployment.environment.name")
            );
            assert_eq!(rs.scope_spans.len(), 1);
            assert_eq!(rs.scope_spans[0].scope.as_ref().unwrap().name, "periscope");
            assert_eq!(rs.scope_spans[0].spans.len(), span_count(req) / 2);
        }
    }
    let ids: HashSet<Vec<u8>> = requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans[0].spans)
        .map(|s| s.span_id.clone())
        .collect();
    assert_eq!(ids.len(), 10);
    let metadata = collector.received.lock().unwrap()[0].0.clone();
    assert_eq!(metadata.get("x-tenant").unwrap(), "t 1");

    let c = counts(&stats);
    assert_eq!((c.exported, c.dropped, c.errors), (10, 0, 0));
    let state = sink.state();
    assert_eq!(state.health, ExporterHealth::Healthy);
    assert!(state.last_success.is_some());
    assert_eq!(state.destination, format!("otlp grpc http://{addr}"));
    assert_eq!((state.queued, state.queue_capacity), (0, 100));
    sink.shutdown(worker).await;
}

#[tokio::test]
async fn submit_all_hands_over_a_whole_drain_within_the_bound() {
    let collector = Collector::new();
    let addr = grpc_collector(&collector).await;
    let stats = Arc::new(Stats::default());
    let (sink, worker) = spawn(config(grpc_dest(addr), 8, 4, 50), stats.clone());
    let r = resource(1, "svc");

    // A current-thread runtime: the worker has not run yet. Of ten, the
    // first eight fit into the queue of eight.
    let mut drained: Vec<Span> = (0..10).map(|n| span(n, &r)).collect();
    let capacity = drained.capacity();
    sink.submit_all(&mut drained);
    assert!(drained.is_empty());
    assert_eq!(drained.capacity(), capacity, "the caller keeps its buffer");
    assert_eq!(counts(&stats).dropped, 2);
    assert_eq!(sink.state().queued, 8);

    wait_for("8 spans", || collector.spans() == 8).await;
    wait_for("the counters", || counts(&stats).exported == 8).await;
    let requests = collector.requests();
    assert_eq!(requests.iter().map(span_count).collect::<Vec<_>>(), vec![4, 4]);
    let got: HashSet<u32> = requests
        .iter()
        .flat_map(|r| &r.resource_spans[0].scope_spans[0].spans)
        .map(|s| u32::from_be_bytes(s.span_id[..4].try_into().unwrap()))
        .collect();
    assert_eq!(got, (0..8).collect());

    sink.submit_all(&mut drained);
    let other = sink.clone();
    sink.shutdown(worker).await;
    other.submit_all(&mut vec![span(98, &r), span(99, &r)]);
    let c = counts(&stats);
    assert_eq!((c.exported, c.dropped, c.errors), (8, 4, 0), "after shutdown, dropped and counted");
}

#[tokio::test]
async fn grpc_endpoint_down_then_up() {
    let _ = env_logger::builder().is_test(true).try_init();
    let addr = free_addr().await;
    let stats = Arc::new(Stats::default());
    let (sink, worker) = spawn(config(grpc_dest(addr), 4, 2, 20), stats.clone());
    let r = resource(1, "svc");

    // Queue of 4: six of these ten are dropped at once.
    for n in 0..10 {
        sink.submit(span(n, &r));
    }
    assert_eq!(counts(&stats).dropped, 6);
    assert_eq!(sink.state().queued, 4);

    // The worker takes a batch of two and keeps retrying it.
    wait_for("a failed attempt", || counts(&stats).errors >= 2).await;
    let state = sink.state();
    let ExporterHealth::Failing { last_error, .. } = &state.health else {
        panic!("expected failing, got {state:?}");
    };
    assert!(
        last_error.contains("Unavailable") || last_error.contains("connect"),
        "{last_error}"
    );
    assert_eq!(state.queued, 2);
    assert_eq!(counts(&stats).exported, 0);

    // Two more fit into the queue, the third does not.
    for n in 10..13 {
        sink.submit(span(n, &r));
    }
    assert_eq!(counts(&stats).dropped, 7);

    // The endpoint comes up: everything that was queued arrives.
    let collector = Collector::new();
    let _server = serve_grpc(TcpListener::bind(addr).await.unwrap(), collector.clone()).await;
    wait_for("6 spans", || collector.spans() == 6).await;
    wait_for("healthy", || sink.state().health == ExporterHealth::Healthy).await;
    let c = counts(&stats);
    assert_eq!((c.exported, c.dropped), (6, 7));
    assert!(c.errors >= 2);
    assert_eq!(sink.state().queued, 0);

    let got: HashSet<u32> = collector
        .requests()
        .iter()
        .flat_map(|r| r.resource_spans.clone())
        .flat_map(|rs| rs.scope_spans[0].spans.clone())
        .map(|s| u32::from_be_bytes(s.span_id[..4].try_into().unwrap()))
        .collect();
    assert_eq!(got, HashSet::from([0, 1, 2, 3, 10, 11]));
    sink.shutdown(worker).await;
}

#[tokio::test]
async fn grpc_fatal_errors_and_partial_success_count_as_dropped() {
    let collector = Collector::answering(|n| match n {
        0 => Err(tonic::Status::invalid_argument("bad batch")),
        1 => Ok(ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 1,
                error_message: "one bad span".into(),
            }),
        }),
        _ => Ok(ExportTraceServiceResponse::default()),
    });
    let addr = grpc_collector(&collector).await;
    let stats = Arc::new(Stats::default());
    let (sink, worker) = spawn(config(grpc_dest(addr), 100, 2, 10), stats.clone());
    let r = resource(1, "svc");
    for n in 0..6 {
        sink.submit(span(n, &r));
    }
    wait_for("three requests", || collector.calls() == 3).await;
    wait_for("counters", || counts(&stats).exported == 3).await;
    let c = counts(&stats);
    assert_eq!((c.exported, c.dropped, c.errors), (3, 3, 1));
    assert_eq!(sink.state().health, ExporterHealth::Healthy);
    sink.shutdown(worker).await;
}

#[tokio::test]
async fn shutdown_flushes_what_is_queued() {
    let collector = Collector::new();
    let addr = grpc_collector(&collector).await;
    let stats = Arc::new(Stats::default());
    // A minute's delay: only the shutdown can send these.
    let (sink, worker) = spawn(config(grpc_dest(addr), 100, 50, 60_000), stats.clone());
    let r = resource(1, "svc");
    for n in 0..5 {
        sink.submit(span(n, &r));
    }
    let other = sink.clone();
    let started = Instant::now();
    sink.shutdown(worker).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(collector.spans(), 5);
    other.submit(span(99, &r));
    let c = counts(&stats);
    assert_eq!(
        (c.exported, c.dropped),
        (5, 1),
        "a span after shutdown is dropped and counted"
    );
}

#[tokio::test]
async fn shutdown_with_dead_endpoint_is_bounded() {
    let addr = free_addr().await;
    let stats = Arc::new(Stats::default());
    let mut cfg = config(grpc_dest(addr), 100, 2, 10);
    cfg.flush_timeout = Duration::from_millis(600);
    let (sink, worker) = spawn(cfg, stats.clone());
    let r = resource(1, "svc");
    for n in 0..5 {
        sink.submit(span(n, &r));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    sink.shutdown(worker).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let c = counts(&stats);
    assert_eq!((c.exported, c.dropped), (0, 5));
    assert!(c.errors >= 1);
}

#[tokio::test]
async fn dropping_every_sink_flushes_and_ends_the_worker() {
    let collector = Collector::new();
    let addr = grpc_collector(&collector).await;
    let stats = Arc::new(Stats::default());
    let (sink, worker) = spawn(config(grpc_dest(addr), 100, 50, 60_000), stats.clone());
    sink.submit(span(1, &resource(1, "svc")));
    drop(sink);
    tokio::time::timeout(Duration::from_secs(3), worker)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(collector.spans(), 1);
    assert_eq!(Stats::get(&stats.spans_exported), 1);
}

/// One recorded OTLP/HTTP request: path, content type, x-tenant, body.
type HttpSeen = Arc<Mutex<Vec<(String, String, String, ExportTraceServiceRequest)>>>;

/// An OTLP/HTTP receiver answering the n-th request with `status(n)`.
async fn serve_http(status: fn(usize) -> u16) -> (SocketAddr, HttpSeen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: HttpSeen = Default::default();
    let calls = Arc::new(Mutex::new(0usize));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (seen, calls) = (seen2.clone(), calls.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (seen, calls) = (seen.clone(), calls.clone());
                        async move {
                            let n = {
                                let mut c = calls.lock().unwrap();
                                *c += 1;
                                *c - 1
                            };
                            let header = |h: &str| {
                                req.headers()
                                    .get(h)
                                    .map(|v| v.to_str().unwrap().to_string())
                                    .unwrap_or_default()
                            };
                            let (path, ct, tenant) = (
                                req.uri().path().to_string(),
                                header("content-type"),
                                header("x-tenant"),
                            );
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let code = status(n);
                            let mut resp = hyper::Response::builder().status(code);
                            let body = if code == 200 {
                                seen.lock().unwrap().push((
                                    path,
                                    ct,
                                    tenant,
                                    ExportTraceServiceRequest::decode(body).unwrap(),
                                ));
                                resp = resp.header("content-type", "application/x-protobuf");
                                Bytes::from(ExportTraceServiceResponse::default().encode_to_vec())
                            } else {
                                resp = resp.header("retry-after", "0");
                                Bytes::from_static(b"try later")
                            };
                            Ok::<_, std::convert::Infallible>(resp.body(Full::new(body)).unwrap())
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn http_protobuf_export_with_retry() {
    // 503 first (retryable), then OK.
    let (addr, seen) = serve_http(|n| if n == 0 { 503 } else { 200 }).await;
    let stats = Arc::new(Stats::default());
    let (sink, worker) = spawn(config(http_dest(addr), 100, 10, 20), stats.clone());
    let (a, b) = (resource(1, "alpha"), resource(2, "beta"));
    for n in 0..3 {
        sink.submit(span(n, if n == 1 { &b } else { &a }));
    }
    wait_for("3 spans over HTTP", || {
        seen.lock()
            .unwrap()
            .iter()
            .map(|s| span_count(&s.3))
            .sum::<usize>()
            == 3
    })
    .await;
    wait_for("the counters", || counts(&stats).exported == 3).await;
    let (path, ct, tenant, req) = seen.lock().unwrap()[0].clone();
    assert_eq!(
        (path.as_str(), ct.as_str(), tenant.as_str()),
        ("/v1/traces", "application/x-protobuf", "t 1")
    );
    assert_eq!(service_names(&req), vec!["alpha", "beta"]);
    let c = counts(&stats);
    assert_eq!((c.exported, c.dropped, c.errors), (3, 0, 1));
    sink.shutdown(worker).await;
}

#[tokio::test]
async fn http_client_error_drops_the_batch() {
    let (addr, seen) = serve_http(|n| if n == 0 { 400 } else { 200 }).await;
    let stats = Arc::new(Stats::default());
    let (sink, worker) = spawn(config(http_dest(addr), 100, 10, 20), stats.clone());
    let r = resource(1, "svc");
    sink.submit(span(0, &r));
    sink.submit(span(1, &r));
    wait_for("the failure", || counts(&stats).errors == 1).await;
    let state = sink.state();
    match &state.health {
        ExporterHealth::Failing { last_error, .. } => {
            assert!(last_error.contains("400"), "{last_error}")
        }
        h => panic!("expected failing, got {h:?}"),
    }
    sink.submit(span(2, &r));
    wait_for("the next batch", || counts(&stats).exported == 1).await;
    let c = counts(&stats);
    assert_eq!((c.exported, c.dropped, c.errors), (1, 2, 1));
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(sink.state().health, ExporterHealth::Healthy);
    sink.shutdown(worker).await;
}

/// An in-memory stdout.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl AsyncWrite for Buffer {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn stdout_lines() {
    for format in [OutputFormat::Text, OutputFormat::Json] {
        let buf = Buffer::default();
        let stats = Arc::new(Stats::default());
        let cfg = config(Destination::Stdout(format), 100, 512, 1000);
        let (sink, worker) = spawn_inner(cfg, stats.clone(), Some(Box::new(buf.clone())));
        assert_eq!(
            sink.state().destination,
            if format == OutputFormat::Text {
                "stdout (text)"
            } else {
                "stdout (json)"
            }
        );
        let r = resource(7, "web");
        sink.submit(span(1, &r));
        sink.submit(span(2, &r));
        // Written promptly, without waiting for the schedule delay.
        wait_for("two lines", || {
            buf.0
                .lock()
                .unwrap()
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                == 2
        })
        .await;
        sink.submit(span(3, &r));
        sink.shutdown(worker).await;
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        match format {
            OutputFormat::Text => {
                assert!(
                    lines[0].starts_with(
                        "2026-11-24T23:10:00.000Z SERVER web[7] GET /1 - 1.000ms -> ? trace="
                    ),
                    "{}",
                    lines[0]
                );
            }
            OutputFormat::Json => {
                let v: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
                assert_eq!(v["attributes"]["url.path"], "/3");
                assert_eq!(v["resource"]["deployment.environment.name"], "test");
            }
        }
        assert_eq!(Stats::get(&stats.spans_exported), 3);
    }
}
