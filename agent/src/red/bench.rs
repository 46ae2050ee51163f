//! A measuring tool: the CPU cost per span of the RED aggregator and of
//! the local view's recent traces, on spans shaped like the ones
//! `spans::http::build` makes (attribute order and phase durations
//! included). It prints nanoseconds of the thread's CPU time per span and
//! asserts nothing about time. As a plain test it runs a short workload and
//! checks only that repeated requests add no series; to measure:
//!
//! ```text
//! PERISCOPE_SPAN_COST_ITERATIONS=1000000 cargo test --release -p periscope red::bench -- --nocapture
//! ```

use std::borrow::Cow;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::aggregator::RedAggregator;
use crate::local_view::recent::RecentTraces;
use crate::spans::model::{Attribute, Resource, Span, SpanKind, SpanStatus};

/// Requests measured, unless `PERISCOPE_SPAN_COST_ITERATIONS` says.
const ITERATIONS: usize = 2_000;

fn iterations() -> usize {
    std::env::var("PERISCOPE_SPAN_COST_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(ITERATIONS)
}
/// Distinct request paths cycled through (40 routes after `{id}` folding).
const PATHS: usize = 400;

fn resource(service: &str, pid: u32, exe: &str) -> Arc<Resource> {
    Arc::new(Resource {
        pid,
        attributes: vec![
            Attribute::str("service.name", service),
            Attribute::int("process.pid", pid as i64),
            Attribute::str("host.name", "bench-host"),
            Attribute::str("process.executable.name", exe),
            Attribute::str("process.executable.path", format!("/usr/bin/{exe}")),
            Attribute::str("container.id", "3f1c9a0e5b7d"),
        ],
    })
}

fn path(i: usize) -> String {
    format!("/api/v1/resource{}/{}", i % 40, 1000 + i)
}

/// A server span as `spans::http::build` makes it, with the phase
/// durations the pipeline adds.
fn server_span(resource: &Arc<Resource>, path: &str, status: i64) -> Span {
    let mut attributes = vec![
        Attribute::str("http.request.method", "GET"),
        Attribute::str("url.scheme", "http"),
        Attribute::str("network.protocol.version", "1.1"),
        Attribute::int("http.response.status_code", status),
        Attribute::int("network.peer.port", 40123),
        Attribute::str("network.peer.address", "10.0.0.7"),
        Attribute::str("client.address", "10.0.0.7"),
        Attribute::str("user_agent.original", "curl/7.88.1"),
        Attribute::str("server.address", "shop.example"),
        Attribute::int("server.port", 8080),
        Attribute::str("url.path", path),
        Attribute::int("periscope.phase.request.receive.duration_ns", 12_000),
        Attribute::int("periscope.phase.handler.duration_ns", 850_000),
        Attribute::int("periscope.phase.response.send.duration_ns", 9_000),
    ];
    let error = status >= 500;
    if error {
        attributes.push(Attribute::str("error.type", status.to_string()));
    }
    span(SpanKind::Server, attributes, error, resource)
}

/// A client span as `spans::http::build` makes it, with phase durations.
fn client_span(resource: &Arc<Resource>, path: &str, status: i64) -> Span {
    let mut attributes = vec![
        Attribute::str("http.request.method", "GET"),
        Attribute::str("url.scheme", "http"),
        Attribute::str("network.protocol.version", "1.1"),
        Attribute::int("http.response.status_code", status),
        Attribute::int("network.peer.port", 8080),
        Attribute::str("network.peer.address", "10.0.0.9"),
        Attribute::str("url.full", format!("http://shop.example:8080{path}")),
        Attribute::str("server.address", "shop.example"),
        Attribute::int("server.port", 8080),
        Attribute::str("url.path", path),
        Attribute::int("periscope.phase.connect.duration_ns", 40_000),
        Attribute::int("periscope.phase.request.send.duration_ns", 8_000),
        Attribute::int("periscope.phase.server.duration_ns", 900_000),
        Attribute::int("periscope.phase.response.receive.duration_ns", 11_000),
    ];
    let error = status >= 400;
    if error {
        attributes.push(Attribute::str("error.type", status.to_string()));
    }
    span(SpanKind::Client, attributes, error, resource)
}

fn span(kind: SpanKind, attributes: Vec<Attribute>, error: bool, resource: &Arc<Resource>) -> Span {
    let start = 1_700_000_000_000_000_000u64;
    Span {
        trace_id: [0; 16],
        span_id: [0; 8],
        parent_span_id: None,
        name: Cow::Borrowed("GET"),
        kind,
        start_unix_nano: start,
        end_unix_nano: start + 1_200_000,
        attributes,
        status: if error {
            SpanStatus::Error {
                message: "HTTP 500".into(),
            }
        } else {
            SpanStatus::Unset
        },
        resource: resource.clone(),
    }
}

/// Client and server spans of one request each, ids set per request.
struct Workload {
    servers: Vec<Span>,
    clients: Vec<Span>,
}

impl Workload {
    fn new() -> Self {
        let web = resource("web", 100, "nginx");
        let curl = resource("loadgen", 200, "curl");
        let status = |i: usize| if i % 50 == 0 { 503 } else { 200 };
        Self {
            servers: (0..PATHS)
                .map(|i| server_span(&web, &path(i), status(i)))
                .collect(),
            clients: (0..PATHS)
                .map(|i| client_span(&curl, &path(i), status(i)))
                .collect(),
        }
    }

    /// The client and server span of request `i`: one trace, the server's
    /// parent is the client.
    fn request(&mut self, i: usize) -> (&Span, &Span) {
        let n = i % PATHS;
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let client_id = (2 * i as u64 + 1).to_le_bytes();
        let server_id = (2 * i as u64 + 2).to_le_bytes();
        let c = &mut self.clients[n];
        c.trace_id = trace_id;
        c.span_id = client_id;
        let s = &mut self.servers[n];
        s.trace_id = trace_id;
        s.span_id = server_id;
        s.parent_span_id = Some(client_id);
        (&self.clients[n], &self.servers[n])
    }
}

/// This thread's CPU time: the machine may be busy, and wall time would
/// count the time the thread waited for a core.
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A stopwatch on the thread's CPU time, less the cost of reading it.
struct Stopwatch {
    total: Duration,
    overhead: Duration,
}

impl Stopwatch {
    fn new() -> Self {
        const N: u32 = 10_000;
        let t = cpu_now();
        for _ in 0..N {
            black_box(cpu_now());
        }
        Self {
            total: Duration::ZERO,
            overhead: t.elapsed_cpu() / N,
        }
    }

    fn time(&mut self, f: impl FnOnce()) {
        let t = cpu_now();
        f();
        self.total += t.elapsed_cpu().saturating_sub(self.overhead);
    }
}

trait ElapsedCpu {
    fn elapsed_cpu(&self) -> Duration;
}

impl ElapsedCpu for Duration {
    fn elapsed_cpu(&self) -> Duration {
        cpu_now().saturating_sub(*self)
    }
}

fn report(what: &str, elapsed: Duration, spans: usize) {
    println!(
        "{what:<32} {:>8.1} ns/span",
        elapsed.as_nanos() as f64 / spans as f64
    );
}

/// Spans are cloned in blocks of `block` requests outside the timed part;
/// small blocks keep them in cache as in the pipeline (which counts a span
/// right after building it), large ones measure them cold.
fn measure(block: usize, label: &str) {
    let mut w = Workload::new();
    // Warm-up: the series, routes and edges exist, as in a running daemon.
    let mut red = RedAggregator::new(100);
    for i in 0..PATHS * 4 {
        let (c, s) = w.request(i);
        red.record(c, i % 10 == 0);
        red.record(s, i % 10 == 0);
    }
    let warm_series = red.series_count();

    let mut server = Stopwatch::new();
    let mut client = Stopwatch::new();
    let mut spans: Vec<(Span, Span)> = Vec::with_capacity(block);
    let blocks = (iterations() / block).max(1);
    for b in 0..blocks {
        spans.clear();
        for j in 0..block {
            let (c, s) = w.request(b * block + j);
            spans.push((c.clone(), s.clone()));
        }
        client.time(|| {
            for (j, (c, _)) in spans.iter().enumerate() {
                red.record(black_box(c), j % 10 == 0);
            }
        });
        server.time(|| {
            for (j, (_, s)) in spans.iter().enumerate() {
                red.record(black_box(s), j % 10 == 0);
            }
        });
    }
    let n = blocks * block;
    report(&format!("{label} record client"), client.total, n);
    report(&format!("{label} record server"), server.total, n);
    assert_eq!(red.series_count(), warm_series, "requests to known routes made new series");

    let mut recent = RecentTraces::new(200);
    let now = Instant::now();
    let mut add = Stopwatch::new();
    for b in 0..blocks {
        spans.clear();
        for j in 0..block {
            let (c, s) = w.request(b * block + j);
            spans.push((c.clone(), s.clone()));
        }
        add.time(|| {
            for (c, s) in &spans {
                recent.add(black_box(c), now);
                recent.add(black_box(s), now);
            }
        });
    }
    report(&format!("{label} RecentTraces::add"), add.total, 2 * n);
}

#[test]
fn span_cost() {
    println!("clock read: {:?} (subtracted)", Stopwatch::new().overhead);
    measure(32, "hot ");
    measure(1000, "cold");
}
