//! `cargo xtask bench [--quick] [--profile]`: what the agent costs unmodified servers,
//! side by side with the bare cost of its probes and with what a user would
//! deploy instead.
//!
//! Workloads, all on 127.0.0.1 with real servers and load generators:
//! - nginx (one worker, static page), HTTP/1.1 keep-alive, wrk as fast as it goes;
//! - the same over HTTPS (TLS 1.3; the agent then runs uprobes in both nginx
//!   and wrk, which use the system libssl);
//! - HTTPS keep-alive against a Go server: the end-to-end tests' program
//!   `tests/go/httpsgo` (net/http and crypto/tls, standard library only),
//!   built stripped with Go 1.27 (`/opt/periscope-go`, installed by `cargo
//!   xtask setup --test-deps`; the bench fails without it) and up for the
//!   whole bench, loaded by wrk as nginx is: the agent's Go uprobes on the
//!   server side, its OpenSSL ones in wrk;
//! - a new connection per request, HTTP and HTTPS (ab without `-k`: connect,
//!   accept, close and, over TLS, a full handshake per request);
//! - a Python web service: a Flask app under gunicorn (2 sync workers),
//!   loaded by wrk at a fixed concurrency;
//! - HTTP/2 against the same nginx: h2load over cleartext (h2c, prior
//!   knowledge) and over TLS 1.3 (h2 by ALPN), many streams per connection;
//! - gRPC unary calls: h2load (`content-type: application/grpc`, a
//!   length-prefixed message as the body) against a server on Debian's
//!   python3-grpcio (the C core's own HTTP/2, over h2c), up for the whole
//!   bench;
//! - the same gRPC load over TLS (h2 by ALPN) against a grpc-go server: the
//!   end-to-end tests' program `tests/go/grpcgo` (demo.Greeter/SayHello,
//!   bytes codec), built stripped in GOPATH mode with Debian's Go 1.19
//!   against Debian's grpc-go 1.33 sources (both installed with apt when
//!   missing), with nginx's certificate, up for the whole bench: the agent's
//!   grpc-go and crypto/tls uprobes in the server, its OpenSSL ones in
//!   h2load.
//!
//! The HTTP/2 and gRPC workloads run H2_SECS per run (H2_SECS_QUICK with
//! `--quick`), shorter than the others to keep the bench's length.
//!
//! Configurations, interleaved per round (the order rotates each round) so
//! that machine drift cancels out; figures are medians over rounds:
//! - `none`: no agent;
//! - `periscope`: the agent with every feature on, exporting OTLP/gRPC to a
//!   real receiver (Rotel, blackhole exporter, up for the whole bench);
//! - `floor`: `periscope run --noop-probes`: the same kernel programs
//!   loaded and attached, each returning at once; what any eBPF agent on
//!   these hooks pays;
//! - `tls off` (HTTPS keep-alive only): the agent with the `tls` feature
//!   disabled from a config file: what a switched-off feature still costs;
//! - `metrics off` (HTTP keep-alive only): the agent with the `metrics`
//!   feature (RED metrics from every span) disabled from a config file: what
//!   the metrics cost;
//! - `otel` (the Python service only): gunicorn under `opentelemetry-instrument`
//!   with the Flask instrumentation, exporting to the same Rotel.
//!
//! Per run: requests/s and p50/p99 latency from the load generator; CPU time
//! (utime+stime from /proc) of the server, of the load generator (getrusage
//! of reaped children), of the agent (from `periscope ready` + 1 s until its
//! CPU use settles after the load) and of Rotel; the agent's peak RSS
//! (VmHWM); the agent's `stopped:` line (events, spans built, exported,
//! dropped, events lost in the kernel); and the spans Rotel received in the
//! run (its `--debug-log traces` summary lines).
//!
//! CPU per request by part (see `agent_cpu`), per workload and agent
//! configuration: the kernel programs' own run time (BPF stats, which the
//! bench turns on with `kernel.bpf_stats_enabled=1` for its duration and
//! restores after; charged to the traced processes), the agent's event loop
//! (its main thread), its export (the `periscope-io` tokio workers), its
//! other threads, and the receiver (Rotel).
//!
//! Scaling: hey at 1k, 5k and 20k req/s and unlimited against nginx with the
//! agent: agent CPU per second and per 1000 requests, RSS, events lost and
//! spans exported against requests, and where drops start; and the agent
//! idle (running, no load, IDLE_SECS): CPU per second.
//!
//! And the cost of one hooked TLS library call (see `tls_calls`).
//!
//! `--profile` (see `profile`): perf records the agent's threads while wrk
//! loads nginx over HTTP/1.1 keep-alive for PROFILE_SECS, and the `inferno`
//! crate turns that into `OUT_DIR/flamegraph.svg`, `OUT_DIR/profile.folded`
//! and a top-functions table in summary.md. `--profile` alone runs only the
//! profile (no rounds, no chart); `--quick --profile` runs the quick bench,
//! then the profile. For a full bench and a profile, run `bench`, then
//! `bench --profile`: the profile does not depend on the rounds.
//!
//! `PERISCOPE_BIN=PATH` benches that agent binary instead of building
//! `target/release/periscope`.
//!
//! Results go to `OUT_DIR/summary.md` (its targets and tables are printed
//! at the end), `OUT_DIR/chart.png`, with `--profile` `OUT_DIR/flamegraph.svg`
//! and `OUT_DIR/profile.folded`,
//! `OUT_DIR/raw.json` (every run's numbers and raw tool output) and
//! `OUT_DIR/logs/`.

mod agent_cpu;
mod chart;
mod env;
mod parse;
mod profile;
mod report;
mod sys;
mod tls_calls;

use agent_cpu::{CpuSplit, Snapshot};
use anyhow::{Context, Result, bail};
use env::{SYSTEM_PYTHON, check_http_ok};
use parse::{
    LoadResult, StopLine, grpc_responses_without_message, h2load_protocol, parse_ab, parse_h2load,
    parse_hey, parse_listening, parse_rotel_spans, parse_stop_line, parse_wrk,
};
use periscope_tests::proc::{Proc, Stream, TempDir, children_of, free_port};
use periscope_tests::workspace_root;
use report::Report;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};
use sys::{
    check_interrupted, clk_tck, cpu_ticks, loadavg, other_periscopes, proc_status_kib,
    reaped_children_cpu_ms, show, spawn, sum_ticks, ticks_ms, utc_stamp, wait_for_other_agents,
    wait_for_port,
};
use tls_calls::{TlsCallSample, measure_tls_calls};

/// Iterations of the in-memory TLS loop (two library calls each).
const UPROBE_ITERATIONS: u32 = 100_000;
const UPROBE_ITERATIONS_QUICK: u32 = 30_000;
/// Connections of wrk and ab against nginx.
const WRK_CONNECTIONS: u32 = 16;
const AB_CONCURRENCY: u32 = 16;
/// The Python service: gunicorn sync workers and wrk's connections.
const GUNICORN_WORKERS: u32 = 2;
const PY_CONNECTIONS: u32 = 4;
/// Requests sent to a freshly started gunicorn before it is measured.
const PY_WARMUP_REQUESTS: u64 = 50;
/// h2load against nginx: connections, and streams in flight on each.
const H2_CONNECTIONS: u32 = 8;
const H2_STREAMS: u32 = 10;
/// h2load against the gRPC server: connections (channels) and calls in
/// flight on each.
const GRPC_CONNECTIONS: u32 = 4;
const GRPC_STREAMS: u32 = 10;
/// Seconds per HTTP/2 and gRPC run: 12 runs per round, each with about 5 s
/// of agent start, drain and settling on top; at 5 s the three rounds of
/// the full bench take about 6 minutes more, the quick one under 2.
const H2_SECS: u32 = 5;
const H2_SECS_QUICK: u32 = 4;
/// Scaling: (requests/s asked of hey, or unlimited; hey workers). hey
/// rate-limits per worker: `-c W -q RATE/W`.
const SCALING: [(Option<u32>, u32); 4] = [
    (Some(1000), 10),
    (Some(5000), 10),
    (Some(20_000), 50),
    (None, 50),
];
/// Seconds of the idle measurement (the agent running, no load): long
/// enough for 10 ms clock ticks to resolve 1 ms of CPU per second.
const IDLE_SECS: u64 = 10;
/// Seconds of load the profile records.
const PROFILE_SECS: u32 = 10;

/// What `cargo xtask bench` was asked to do.
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// One round of 5 s runs instead of three rounds of 10 s.
    pub quick: bool,
    /// Where summary.md, chart.png, raw.json and logs go.
    pub out_dir: PathBuf,
    /// Override the number of rounds (default 3, or 1 with `quick`).
    pub rounds: Option<usize>,
    /// Run `cargo build --release -p periscope` first (default true).
    pub build: bool,
    /// Record the agent with perf under load: flamegraph.svg, profile.folded
    /// and the top functions. Alone (without `quick`) it is all that runs.
    pub profile: bool,
}

impl BenchArgs {
    pub fn new(quick: bool, profile: bool) -> BenchArgs {
        BenchArgs {
            quick,
            out_dir: default_out_dir(),
            rounds: None,
            build: true,
            profile,
        }
    }
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs::new(false, false)
    }
}

/// `<workspace>/results/bench-YYYYMMDD-HHMMSS` (UTC).
pub fn default_out_dir() -> PathBuf {
    workspace_root()
        .join("results")
        .join(format!("bench-{}", utc_stamp(SystemTime::now(), false)))
}

// ---------------------------------------------------------------------------
// Workloads and configurations

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// nginx, HTTP/1.1 keep-alive, wrk closed loop as fast as it goes.
    Http,
    /// nginx over TLS 1.3, keep-alive, wrk.
    Https,
    /// A Go net/http server (crypto/tls, stripped go1.27 binary) over TLS
    /// 1.3, keep-alive, wrk.
    GoHttps,
    /// nginx, a new connection per request (ab without -k).
    HttpConnPerReq,
    /// nginx over TLS 1.3, a new connection and handshake per request (ab).
    HttpsConnPerReq,
    /// Flask under gunicorn (sync workers), wrk at a fixed concurrency.
    Python,
    /// nginx, HTTP/2 over cleartext (h2c, prior knowledge), h2load, many
    /// streams per connection.
    H2c,
    /// nginx, HTTP/2 over TLS 1.3 (h2 by ALPN), h2load.
    H2Tls,
    /// gRPC unary calls (h2c) to a python3-grpcio server, h2load.
    Grpc,
    /// gRPC unary calls over TLS 1.3 (h2) to a grpc-go 1.33 server
    /// (stripped go1.19 binary), h2load.
    GrpcGo,
}

/// Every workload, in report order.
pub const WORKLOADS: [WorkloadKind; 10] = [
    WorkloadKind::Http,
    WorkloadKind::Https,
    WorkloadKind::GoHttps,
    WorkloadKind::HttpConnPerReq,
    WorkloadKind::HttpsConnPerReq,
    WorkloadKind::Python,
    WorkloadKind::H2c,
    WorkloadKind::H2Tls,
    WorkloadKind::Grpc,
    WorkloadKind::GrpcGo,
];

impl WorkloadKind {
    pub fn key(self) -> &'static str {
        match self {
            WorkloadKind::Http => "http_keepalive",
            WorkloadKind::Https => "https_keepalive",
            WorkloadKind::GoHttps => "go_https_keepalive",
            WorkloadKind::HttpConnPerReq => "http_conn_per_request",
            WorkloadKind::HttpsConnPerReq => "https_conn_per_request",
            WorkloadKind::Python => "python_flask",
            WorkloadKind::H2c => "h2c_keepalive",
            WorkloadKind::H2Tls => "h2_tls_keepalive",
            WorkloadKind::Grpc => "grpc_unary",
            WorkloadKind::GrpcGo => "grpc_go_unary",
        }
    }

    /// Loaded over HTTP/2 (by h2load).
    pub fn is_http2(self) -> bool {
        matches!(
            self,
            WorkloadKind::H2c | WorkloadKind::H2Tls | WorkloadKind::Grpc | WorkloadKind::GrpcGo
        )
    }

    /// For the gRPC workloads, the bytes of DATA one successful call brings
    /// back (the length-prefixed response message): a failed call is a 200
    /// with grpc-status in the trailers and no message.
    pub fn grpc_response_len(self) -> Option<u64> {
        match self {
            // The Python server echoes the request.
            WorkloadKind::Grpc => Some(env::GRPC_MESSAGE.len() as u64),
            // grpc-go's answers "hello NAME".
            WorkloadKind::GrpcGo => Some(env::GRPCGO_RESPONSE_LEN),
            _ => None,
        }
    }

    /// Over TLS, with the protocol h2load must negotiate (`h2` by ALPN),
    /// or over cleartext (`h2c`); None for the HTTP/1.1 workloads.
    pub fn h2_protocol(self) -> Option<&'static str> {
        match self {
            WorkloadKind::H2Tls | WorkloadKind::GrpcGo => Some("h2"),
            WorkloadKind::H2c | WorkloadKind::Grpc => Some("h2c"),
            _ => None,
        }
    }

    pub fn label(self) -> String {
        match self {
            WorkloadKind::Http => {
                format!("nginx HTTP/1.1 keep-alive (wrk, {WRK_CONNECTIONS} conns)")
            }
            WorkloadKind::Https => format!("nginx HTTPS keep-alive (wrk, {WRK_CONNECTIONS} conns)"),
            WorkloadKind::GoHttps => format!(
                "Go net/http HTTPS keep-alive (crypto/tls, stripped go1.27; wrk, {WRK_CONNECTIONS} conns)"
            ),
            WorkloadKind::HttpConnPerReq => {
                format!("nginx HTTP, new conn per request (ab -c {AB_CONCURRENCY})")
            }
            WorkloadKind::HttpsConnPerReq => {
                format!("nginx HTTPS, new conn + handshake per request (ab -c {AB_CONCURRENCY})")
            }
            WorkloadKind::Python => {
                format!(
                    "Flask/gunicorn ({GUNICORN_WORKERS} sync workers; wrk, {PY_CONNECTIONS} conns)"
                )
            }
            WorkloadKind::H2c => format!(
                "nginx HTTP/2 cleartext (h2c; h2load, {H2_CONNECTIONS} conns x {H2_STREAMS} streams)"
            ),
            WorkloadKind::H2Tls => format!(
                "nginx HTTP/2 over TLS (h2; h2load, {H2_CONNECTIONS} conns x {H2_STREAMS} streams)"
            ),
            WorkloadKind::Grpc => format!(
                "gRPC unary, python3-grpcio over h2c (h2load, {GRPC_CONNECTIONS} conns x {GRPC_STREAMS} streams)"
            ),
            WorkloadKind::GrpcGo => format!(
                "gRPC unary, grpc-go 1.33 over TLS (h2, stripped go1.19; h2load, {GRPC_CONNECTIONS} conns x {GRPC_STREAMS} streams)"
            ),
        }
    }

    /// For the chart.
    pub fn short(self) -> &'static str {
        match self {
            WorkloadKind::Http => "HTTP keep-alive",
            WorkloadKind::Https => "HTTPS keep-alive",
            WorkloadKind::GoHttps => "Go HTTPS keep-alive",
            WorkloadKind::HttpConnPerReq => "HTTP conn/req",
            WorkloadKind::HttpsConnPerReq => "HTTPS conn/req",
            WorkloadKind::Python => "Flask/gunicorn",
            WorkloadKind::H2c => "HTTP/2 h2c",
            WorkloadKind::H2Tls => "HTTP/2 TLS",
            WorkloadKind::Grpc => "gRPC unary",
            WorkloadKind::GrpcGo => "gRPC unary, Go",
        }
    }

    /// The configurations measured for this workload, `none` first.
    pub fn configs(self) -> &'static [Config] {
        match self {
            WorkloadKind::Https => &[
                Config::None,
                Config::Periscope,
                Config::Floor,
                Config::TlsOff,
            ],
            WorkloadKind::Http => &[
                Config::None,
                Config::Periscope,
                Config::Floor,
                Config::MetricsOff,
            ],
            WorkloadKind::Python => &[Config::None, Config::Periscope, Config::Floor, Config::Otel],
            _ => &[Config::None, Config::Periscope, Config::Floor],
        }
    }

    /// Spans one request should give with Periscope: the server's and the
    /// load generator's (every client here is traced too; wrk and h2load
    /// use the system libssl over TLS, also against the Go servers).
    pub fn spans_per_request(self) -> u64 {
        2
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Config {
    None,
    Periscope,
    Floor,
    TlsOff,
    MetricsOff,
    Otel,
}

/// Every configuration, in report order.
pub const CONFIGS: [Config; 6] = [
    Config::None,
    Config::Periscope,
    Config::Floor,
    Config::TlsOff,
    Config::MetricsOff,
    Config::Otel,
];

impl Config {
    pub fn key(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Periscope => "periscope",
            Config::Floor => "floor",
            Config::TlsOff => "tls_off",
            Config::MetricsOff => "metrics_off",
            Config::Otel => "otel",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Periscope => "Periscope",
            Config::Floor => "floor (no-op probes)",
            Config::TlsOff => "Periscope, tls disabled",
            Config::MetricsOff => "Periscope, metrics disabled",
            Config::Otel => "OTel auto-instrumentation",
        }
    }

    /// Runs the Periscope agent.
    pub fn is_agent(self) -> bool {
        matches!(
            self,
            Config::Periscope | Config::Floor | Config::TlsOff | Config::MetricsOff
        )
    }
}

// ---------------------------------------------------------------------------
// Samples

/// The agent's own figures for one run.
#[derive(Clone, Debug, Default)]
pub struct AgentRun {
    pub startup_ms: u64,
    pub cpu_ms: f64,
    /// The window `cpu_ms` and `split` were measured over.
    pub window_ms: u64,
    /// `cpu_ms` by thread kind, and the kernel programs' run time.
    pub split: CpuSplit,
    /// Time after the load ended until the agent's CPU use settled.
    pub drain_ms: u64,
    /// VmHWM from `periscope ready` + 1 s on (the start-up peak is reset).
    pub peak_rss_kib: u64,
    /// VmHWM at `periscope ready` + 1 s: what start-up needed.
    pub startup_peak_rss_kib: u64,
    pub end_rss_kib: u64,
    pub stop: Option<StopLine>,
    /// How the agent ended after SIGINT ("exit status: 0", or "killed ...").
    pub exit: String,
}

pub struct Sample {
    pub round: usize,
    pub workload: WorkloadKind,
    pub config: Config,
    pub command: String,
    pub load: LoadResult,
    /// CPU of the server's processes (nginx workers; gunicorn master and
    /// workers; the Go server's one process).
    pub server_cpu_ms: f64,
    /// CPU of the load generator.
    pub client_cpu_ms: f64,
    /// CPU of the receiver (Rotel), including the agent's final flush.
    pub rotel_cpu_ms: f64,
    pub agent: Option<AgentRun>,
    /// Spans Rotel received from the start of the run until everything was
    /// flushed (the agent stopped, gunicorn stopped).
    pub rotel_spans: Option<u64>,
    /// Requests before the measured load that this configuration's tracer
    /// saw too (the OTel instrumentation traces gunicorn's warm-up).
    pub warmup_traced: u64,
    /// Other `periscope` processes seen on the machine during the run (noise).
    pub others: Vec<u32>,
    /// /proc/loadavg (1, 5, 15 min) just before the run.
    pub loadavg: String,
    pub raw_output: String,
}

/// ms per 1000 requests, which is also µs per request.
fn per_1k(ms: f64, requests: u64) -> Option<f64> {
    (requests > 0).then(|| ms * 1000.0 / requests as f64)
}

impl Sample {
    pub fn agent_cpu_per_1k(&self) -> Option<f64> {
        per_1k(self.agent.as_ref()?.cpu_ms, self.load.requests)
    }
    pub fn server_cpu_per_1k(&self) -> Option<f64> {
        per_1k(self.server_cpu_ms, self.load.requests)
    }
    pub fn client_cpu_per_1k(&self) -> Option<f64> {
        per_1k(self.client_cpu_ms, self.load.requests)
    }
    pub fn rotel_cpu_per_1k(&self) -> Option<f64> {
        per_1k(self.rotel_cpu_ms, self.load.requests)
    }
    /// A part of the agent's CPU split (ms), in µs per request.
    pub fn split_us(&self, part: impl Fn(&CpuSplit) -> Option<f64>) -> Option<f64> {
        per_1k(part(&self.agent.as_ref()?.split)?, self.load.requests)
    }
    /// Kernel program runs per request.
    pub fn prog_runs_per_request(&self) -> Option<f64> {
        let k = self.agent.as_ref()?.split.kernel?;
        (self.load.requests > 0).then(|| k.run_cnt as f64 / self.load.requests as f64)
    }
    /// Server + load generator + agent CPU per 1000 requests: what the
    /// machine spent on each request, the tracer included (the kernel
    /// programs' cost is charged to the traced processes).
    pub fn total_cpu_per_1k(&self) -> Option<f64> {
        let agent = self.agent.as_ref().map_or(0.0, |a| a.cpu_ms);
        per_1k(
            self.server_cpu_ms + self.client_cpu_ms + agent,
            self.load.requests,
        )
    }
    /// Spans Rotel received for the measured requests.
    pub fn rotel_spans_for_run(&self) -> Option<u64> {
        self.rotel_spans
            .map(|s| s.saturating_sub(self.warmup_traced))
    }

    fn one_line(&self) -> String {
        let mut s = format!(
            "round {} {} {}: {:.0} req/s, {} requests, p50 {}, p99 {}, CPU/1k req: server {} client {}",
            self.round,
            self.workload.key(),
            self.config.key(),
            self.load.rps,
            self.load.requests,
            fmt_us(self.load.p50_us),
            fmt_us(self.load.p99_us),
            fmt_f(self.server_cpu_per_1k(), 1),
            fmt_f(self.client_cpu_per_1k(), 1),
        );
        if let Some(a) = &self.agent {
            s.push_str(&format!(
                "; agent {:.0} ms CPU ({} ms/1k req), peak RSS {:.1} MiB",
                a.cpu_ms,
                fmt_f(self.agent_cpu_per_1k(), 2),
                a.peak_rss_kib as f64 / 1024.0
            ));
            match &a.stop {
                Some(st) => s.push_str(&format!(
                    ", {} events, {} spans exported, {} dropped, {} lost",
                    st.events, st.exported, st.dropped, st.lost
                )),
                None => s.push_str(", no `stopped:` line"),
            }
        }
        if let Some(r) = self.rotel_spans_for_run() {
            s.push_str(&format!("; Rotel received {r} spans"));
        }
        s
    }
}

/// One scaling run: hey at a rate against nginx, with the agent.
pub struct ScalingSample {
    pub round: usize,
    /// Asked rate (None: as fast as hey goes).
    pub rate: Option<u32>,
    pub workers: u32,
    pub secs: u32,
    pub command: String,
    pub load: LoadResult,
    pub agent: AgentRun,
    pub rotel_spans: Option<u64>,
    pub others: Vec<u32>,
    pub raw_output: String,
}

impl ScalingSample {
    pub fn rate_label(rate: Option<u32>) -> String {
        match rate {
            Some(r) if r % 1000 == 0 => format!("{}k req/s", r / 1000),
            Some(r) => format!("{r} req/s"),
            None => "max".into(),
        }
    }
    /// Agent CPU in ms per second of load.
    pub fn agent_cpu_per_s(&self) -> Option<f64> {
        (self.secs > 0).then(|| self.agent.cpu_ms / self.secs as f64)
    }
    pub fn agent_cpu_per_1k(&self) -> Option<f64> {
        per_1k(self.agent.cpu_ms, self.load.requests)
    }
    fn one_line(&self) -> String {
        format!(
            "round {} scaling {}: {:.0} req/s achieved, {} requests; agent {} ms CPU/s ({} ms/1k req), peak RSS {:.1} MiB, {}",
            self.round,
            Self::rate_label(self.rate),
            self.load.rps,
            self.load.requests,
            fmt_f(self.agent_cpu_per_s(), 0),
            fmt_f(self.agent_cpu_per_1k(), 2),
            self.agent.peak_rss_kib as f64 / 1024.0,
            match &self.agent.stop {
                Some(st) => format!(
                    "{} spans exported, {} dropped, {} events lost",
                    st.exported, st.dropped, st.lost
                ),
                None => "no `stopped:` line".into(),
            }
        )
    }
}

/// The agent running with no load at all.
pub struct IdleSample {
    pub round: usize,
    pub agent: AgentRun,
    pub others: Vec<u32>,
}

impl IdleSample {
    /// Agent CPU in ms per second of the window.
    pub fn agent_cpu_per_s(&self) -> Option<f64> {
        (self.agent.window_ms > 0).then(|| self.agent.cpu_ms * 1000.0 / self.agent.window_ms as f64)
    }
    fn one_line(&self) -> String {
        format!(
            "round {} idle: agent {} ms CPU/s over {:.1} s, peak RSS {:.1} MiB",
            self.round,
            fmt_f(self.agent_cpu_per_s(), 2),
            self.agent.window_ms as f64 / 1000.0,
            self.agent.peak_rss_kib as f64 / 1024.0,
        )
    }
}

// ---------------------------------------------------------------------------
// The plan

pub struct Plan {
    pub quick: bool,
    /// Run the rounds (workloads, idle, scaling, TLS call cost).
    pub bench: bool,
    /// Record the profile.
    pub profile: bool,
    pub rounds: usize,
    /// Seconds per measured run.
    pub secs: u32,
    /// Seconds per HTTP/2 and gRPC run.
    pub h2_secs: u32,
    pub scaling_secs: u32,
    pub uprobe_iterations: u32,
}

impl Plan {
    /// Seconds per run of workload `w`.
    pub fn secs_for(&self, w: WorkloadKind) -> u32 {
        if w.is_http2() {
            self.h2_secs
        } else {
            self.secs
        }
    }

    fn new(args: &BenchArgs) -> Plan {
        let (rounds, secs) = if args.quick { (1, 5) } else { (3, 10) };
        Plan {
            quick: args.quick,
            bench: args.quick || !args.profile,
            profile: args.profile,
            rounds: args.rounds.unwrap_or(rounds).max(1),
            secs,
            h2_secs: if args.quick { H2_SECS_QUICK } else { H2_SECS },
            scaling_secs: secs,
            uprobe_iterations: if args.quick {
                UPROBE_ITERATIONS_QUICK
            } else {
                UPROBE_ITERATIONS
            },
        }
    }
}

// ---------------------------------------------------------------------------
// The agent, the receiver and the Python service

/// How to start the agent: `BIN run --otlp-endpoint URL [extra]`.
pub struct AgentCmd {
    pub bin: PathBuf,
    pub args: Vec<String>,
}

impl AgentCmd {
    fn command(&self, extra: &[String]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args).args(extra).env("RUST_LOG", "info");
        cmd
    }

    pub fn shown(&self, extra: &[String]) -> String {
        show(&self.command(extra))
    }

    /// Start, wait for `periscope ready`, then 1 s for start-up work
    /// (process discovery, first allocations) to finish. Returns the agent
    /// and how long it took to be ready.
    pub fn start_timed(&self, extra: &[String], log_path: &Path) -> Result<(Proc, Startup)> {
        let t = Instant::now();
        let mut p = spawn(
            "periscope",
            &mut self.command(extra),
            libc::SIGINT,
            Duration::from_secs(10),
        )?;
        if let Err(e) = p.wait_for_line("`periscope ready`", Duration::from_secs(120), |l| {
            l.contains("periscope ready")
        }) {
            p.stop();
            std::fs::write(log_path, p.log()).ok();
            return Err(e);
        }
        let ms = t.elapsed().as_millis() as u64;
        std::thread::sleep(Duration::from_secs(1));
        // Start-up (the kernel's BTF parsed, programs loaded) has its own
        // peak; reset the high-water mark so that the run's VmHWM is what
        // the agent needs while it works.
        let peak_rss_kib = proc_status_kib(p.pid(), "VmHWM:").unwrap_or(0);
        std::fs::write(format!("/proc/{}/clear_refs", p.pid()), "5").ok();
        Ok((p, Startup { ms, peak_rss_kib }))
    }

    pub fn start(&self, extra: &[String], log_path: &Path) -> Result<Proc> {
        Ok(self.start_timed(extra, log_path)?.0)
    }
}

/// The agent's start: how long until `periscope ready`, and its peak RSS
/// until then (start-up only).
#[derive(Clone, Copy, Debug, Default)]
pub struct Startup {
    pub ms: u64,
    pub peak_rss_kib: u64,
}

/// After the load: let the agent drain (its CPU use settles, at most 15 s),
/// read its figures against `before` (taken when the load started), stop it
/// (SIGINT) and parse its `stopped:` line.
fn finish_agent(
    mut p: Proc,
    startup: Startup,
    before: &Snapshot,
    clk: u64,
    log_path: &Path,
) -> AgentRun {
    let t_end = Instant::now();
    let mut last = cpu_ticks(p.pid()).unwrap_or(before.total_ticks);
    let mut settled_at = t_end;
    while t_end.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(500));
        let now = cpu_ticks(p.pid()).unwrap_or(last);
        if now.saturating_sub(last) <= 1 {
            break;
        }
        last = now;
        settled_at = Instant::now();
    }
    let drain_ms = (settled_at - t_end).as_millis() as u64;
    let after = Snapshot::take(p.pid()).unwrap_or_else(|_| Snapshot {
        at: Instant::now(),
        total_ticks: last,
        threads: Vec::new(),
        progs: None,
    });
    let peak_rss_kib = proc_status_kib(p.pid(), "VmHWM:").unwrap_or(0);
    let end_rss_kib = proc_status_kib(p.pid(), "VmRSS:").unwrap_or(0);
    let still_running = p.is_running();
    let t_stop = Instant::now();
    let status = p.stop();
    let exit = {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Some(st) if !still_running => format!("exited before SIGINT ({st})"),
            Some(st) if st.signal() == Some(libc::SIGKILL) => {
                format!(
                    "killed: no exit within {:.0} s of SIGINT ({st})",
                    t_stop.elapsed().as_secs_f64()
                )
            }
            Some(st) => st.to_string(),
            None => "unknown".into(),
        }
    };
    let log = p.log();
    std::fs::write(log_path, &log).ok();
    AgentRun {
        startup_ms: startup.ms,
        startup_peak_rss_kib: startup.peak_rss_kib,
        cpu_ms: ticks_ms(after.total_ticks.saturating_sub(before.total_ticks), clk),
        window_ms: (after.at - before.at).as_millis() as u64,
        split: agent_cpu::split(p.pid(), before, &after, clk),
        drain_ms,
        peak_rss_kib,
        end_rss_kib,
        stop: log.lines().rev().find_map(parse_stop_line),
        exit,
    }
}

/// Rotel, up for the whole bench; its `--debug-log traces` summary lines
/// count the spans it receives.
struct Receiver {
    proc: Proc,
    grpc_port: u16,
    shown: String,
}

impl Receiver {
    fn start(rotel_agent: &Path) -> Result<Receiver> {
        let grpc_port = free_port();
        let http_port = free_port();
        let mut cmd = Command::new(rotel_agent);
        cmd.args([
            "start",
            "--otlp-grpc-endpoint",
            &format!("127.0.0.1:{grpc_port}"),
        ])
        .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
        .args(["--exporter", "blackhole", "--debug-log", "traces"])
        .env("NO_COLOR", "1");
        let shown = show(&cmd);
        let mut proc = spawn("rotel", &mut cmd, libc::SIGTERM, Duration::from_secs(5))?;
        wait_for_port(&mut proc, grpc_port, Duration::from_secs(30))?;
        Ok(Receiver {
            proc,
            grpc_port,
            shown,
        })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// How many lines it has printed so far.
    fn mark(&self) -> usize {
        self.proc.output().since(Stream::Stdout, usize::MAX).1
    }

    /// Spans received since `mark`, once its output has been quiet for 300 ms
    /// (at most 5 s).
    fn spans_since(&self, mark: usize) -> u64 {
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            let (_, _, age) = self.proc.output().since(Stream::Stdout, usize::MAX);
            if age.is_none_or(|a| a >= Duration::from_millis(300)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = self.proc.output();
        [Stream::Stdout, Stream::Stderr]
            .into_iter()
            .flat_map(|s| out.since(s, mark).0)
            .filter_map(|l| parse_rotel_spans(&l))
            .sum()
    }

    fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.proc.pid()).unwrap_or(0)
    }

    fn check_running(&mut self) -> Result<()> {
        if !self.proc.is_running() {
            bail!(
                "Rotel exited during the bench; its output:\n{}",
                self.proc.log()
            );
        }
        Ok(())
    }
}

/// The Flask app under gunicorn, started afresh for every run (the OTel
/// configuration needs its own start anyway).
struct PythonService {
    venv: PathBuf,
    app_dir: PathBuf,
    port: u16,
    otlp_endpoint: String,
}

impl PythonService {
    fn command(&self, otel: bool) -> Command {
        let bin = self.venv.join("bin");
        let mut cmd = if otel {
            let mut c = Command::new(bin.join("opentelemetry-instrument"));
            c.arg(bin.join("gunicorn"));
            c
        } else {
            Command::new(bin.join("gunicorn"))
        };
        cmd.args([
            "--workers",
            &GUNICORN_WORKERS.to_string(),
            "--worker-class",
            "sync",
            "--no-control-socket",
        ])
        .args(["--bind", &format!("127.0.0.1:{}", self.port)])
        .arg("--chdir")
        .arg(&self.app_dir)
        .arg("app:app")
        .env("OTEL_SERVICE_NAME", "flask-bench");
        if otel {
            cmd.env("OTEL_TRACES_EXPORTER", "otlp")
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", &self.otlp_endpoint)
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
                .env("OTEL_METRICS_EXPORTER", "none")
                .env("OTEL_LOGS_EXPORTER", "none");
        }
        cmd
    }

    /// Start, wait until it answers, and send PY_WARMUP_REQUESTS requests.
    fn start(&self, otel: bool) -> Result<Proc> {
        let mut p = spawn(
            "gunicorn",
            &mut self.command(otel),
            libc::SIGTERM,
            Duration::from_secs(15),
        )?;
        wait_for_port(&mut p, self.port, Duration::from_secs(60))?;
        for i in 0..PY_WARMUP_REQUESTS {
            check_http_ok(self.port).with_context(|| {
                format!(
                    "warm-up request {} to gunicorn; its output:\n{}",
                    i + 1,
                    p.log()
                )
            })?;
        }
        Ok(p)
    }
}

// ---------------------------------------------------------------------------
// The bench

struct Bench {
    plan: Plan,
    agent: AgentCmd,
    /// The agent takes `--noop-probes`.
    floor: bool,
    tls_off_config: PathBuf,
    metrics_off_config: PathBuf,
    nginx_pid: u32,
    http_url: String,
    https_url: String,
    /// nginx's HTTP/2 listeners (cleartext, TLS).
    h2c_url: String,
    h2_tls_url: String,
    grpc: GrpcServer,
    /// The Go HTTPS server (only when the rounds run).
    go: Option<GoServer>,
    /// The grpc-go server (only when the rounds run).
    grpc_go: Option<GrpcGoServer>,
    python: PythonService,
    rotel: Receiver,
    out_dir: PathBuf,
    clk: u64,
}

impl Bench {
    fn agent_extra(&self, c: Config) -> Vec<String> {
        match c {
            Config::Floor => vec!["--noop-probes".into()],
            Config::TlsOff => vec!["--config".into(), self.tls_off_config.display().to_string()],
            Config::MetricsOff => vec![
                "--config".into(),
                self.metrics_off_config.display().to_string(),
            ],
            _ => Vec::new(),
        }
    }

    fn configs(&self, w: WorkloadKind, round: usize) -> Vec<Config> {
        run_order(w, round, self.floor)
    }

    /// (program, args, CSV file for ab) for one run.
    fn load_command(
        &self,
        w: WorkloadKind,
        secs: u32,
        tag: &str,
    ) -> (&'static str, Vec<String>, Option<PathBuf>) {
        let wrk = |conns: u32, url: &str| -> Vec<String> {
            vec![
                "-t1".into(),
                format!("-c{conns}"),
                format!("-d{secs}s"),
                "--latency".into(),
                url.to_string(),
            ]
        };
        let ab = |url: &str, csv: &Path| -> Vec<String> {
            vec![
                "-q".into(),
                "-r".into(),
                "-t".into(),
                secs.to_string(),
                // -t alone caps the run at 50000 requests.
                "-n".into(),
                (secs as u64 * 200_000).to_string(),
                "-c".into(),
                AB_CONCURRENCY.to_string(),
                "-e".into(),
                csv.display().to_string(),
                url.to_string(),
            ]
        };
        let csv = self.out_dir.join(format!("logs/{tag}-ab.csv"));
        // Per-request times (for p50/p99), read and removed after the run.
        let h2_log = self.out_dir.join(format!("logs/{tag}-h2load-requests.tsv"));
        let h2load = |conns: u32, streams: u32, url: &str, extra: &[String]| -> Vec<String> {
            let mut v: Vec<String> = vec![
                "-c".into(),
                conns.to_string(),
                "-m".into(),
                streams.to_string(),
                "-D".into(),
                secs.to_string(),
                "--log-file".into(),
                h2_log.display().to_string(),
            ];
            v.extend(extra.iter().cloned());
            v.push(url.to_string());
            v
        };
        match w {
            WorkloadKind::Http => ("wrk", wrk(WRK_CONNECTIONS, &self.http_url), None),
            WorkloadKind::Https => ("wrk", wrk(WRK_CONNECTIONS, &self.https_url), None),
            WorkloadKind::GoHttps => ("wrk", wrk(WRK_CONNECTIONS, self.go_url()), None),
            WorkloadKind::HttpConnPerReq => ("ab", ab(&self.http_url, &csv), Some(csv)),
            WorkloadKind::HttpsConnPerReq => ("ab", ab(&self.https_url, &csv), Some(csv)),
            WorkloadKind::Python => (
                "wrk",
                wrk(
                    PY_CONNECTIONS,
                    &format!("http://127.0.0.1:{}/", self.python.port),
                ),
                None,
            ),
            WorkloadKind::H2c => (
                "h2load",
                h2load(H2_CONNECTIONS, H2_STREAMS, &self.h2c_url, &[]),
                Some(h2_log),
            ),
            WorkloadKind::H2Tls => (
                "h2load",
                h2load(H2_CONNECTIONS, H2_STREAMS, &self.h2_tls_url, &[]),
                Some(h2_log),
            ),
            WorkloadKind::Grpc => (
                "h2load",
                h2load(
                    GRPC_CONNECTIONS,
                    GRPC_STREAMS,
                    &self.grpc.url,
                    &self.grpc.h2load_args(),
                ),
                Some(h2_log),
            ),
            WorkloadKind::GrpcGo => {
                let (url, extra) = match &self.grpc_go {
                    Some(g) => (g.server.url.as_str(), g.h2load_args()),
                    None => ("", Vec::new()),
                };
                (
                    "h2load",
                    h2load(GRPC_CONNECTIONS, GRPC_STREAMS, url, &extra),
                    Some(h2_log),
                )
            }
        }
    }

    /// The Go server's URL for wrk; empty when it was not started (the
    /// rounds do not run).
    fn go_url(&self) -> &str {
        self.go.as_ref().map_or("", |g| g.url.as_str())
    }

    fn check_go_running(&mut self) -> Result<()> {
        match self.go.as_mut() {
            Some(g) => g.check_running(),
            None => bail!("the Go HTTPS server was not started"),
        }
    }

    fn check_grpc_go_running(&mut self) -> Result<()> {
        match self.grpc_go.as_mut() {
            Some(g) => g.server.check_running(),
            None => bail!("the grpc-go server was not started"),
        }
    }

    /// The server process(es) whose CPU counts for `w`, but gunicorn's
    /// (started per run).
    fn server_pids(&self, w: WorkloadKind) -> Vec<u32> {
        match w {
            WorkloadKind::Grpc => vec![self.grpc.proc.pid()],
            WorkloadKind::GoHttps => self.go.iter().map(|g| g.proc.pid()).collect(),
            WorkloadKind::GrpcGo => self.grpc_go.iter().map(|g| g.server.proc.pid()).collect(),
            _ => children_of(self.nginx_pid),
        }
    }

    fn measure(&mut self, round: usize, w: WorkloadKind, config: Config) -> Result<Sample> {
        let tag = format!("r{round}-{}-{}", w.key(), config.key());
        wait_for_other_agents(Duration::from_secs(180))?;
        self.rotel.check_running()?;
        if w == WorkloadKind::GoHttps {
            self.check_go_running()?;
        }
        if w == WorkloadKind::GrpcGo {
            self.check_grpc_go_running()?;
        }
        let secs = self.plan.secs_for(w);
        let (program, args, csv) = self.load_command(w, secs, &tag);
        eprintln!(
            "bench: {} {tag}: {program} {}",
            sys::since_start(),
            args.join(" ")
        );
        let loadavg = loadavg();
        let mut others = other_periscopes(None);
        let rotel_mark = self.rotel.mark();

        // The server (gunicorn is started per run), then the agent.
        let mut gunicorn = None;
        let mut warmup_traced = 0;
        if w == WorkloadKind::Python {
            gunicorn = Some(self.python.start(config == Config::Otel)?);
            if config == Config::Otel {
                warmup_traced = PY_WARMUP_REQUESTS;
            }
        }
        let agent_log = self.out_dir.join(format!("logs/agent-{tag}.log"));
        let agent = if config.is_agent() {
            let (p, startup) = self
                .agent
                .start_timed(&self.agent_extra(config), &agent_log)?;
            others = other_periscopes(Some(p.pid()));
            Some((p, startup))
        } else {
            None
        };
        let server_pids = match &gunicorn {
            Some(g) => {
                let mut v = vec![g.pid()];
                v.extend(children_of(g.pid()));
                v
            }
            None => self.server_pids(w),
        };
        let server0 = sum_ticks(&server_pids);
        let agent0 = match &agent {
            Some((p, _)) => Some(Snapshot::take(p.pid())?),
            None => None,
        };
        let rotel0 = self.rotel.cpu_ticks();
        let client0 = reaped_children_cpu_ms();

        let run = run_load(program, &args, csv.as_deref(), secs, &self.out_dir, &tag);

        let client_cpu_ms = reaped_children_cpu_ms() - client0;
        let server1 = sum_ticks(&server_pids);
        let agent_run = agent
            .zip(agent0)
            .map(|((p, startup), before)| finish_agent(p, startup, &before, self.clk, &agent_log));
        if let Some(mut g) = gunicorn {
            // SIGTERM: gunicorn's workers exit gracefully and the OTel SDK
            // flushes what it still holds.
            g.stop();
            std::fs::write(
                self.out_dir.join(format!("logs/{tag}-gunicorn.log")),
                g.log(),
            )
            .ok();
        }
        let rotel_spans = self.rotel.spans_since(rotel_mark);
        let rotel1 = self.rotel.cpu_ticks();
        let (command, raw_output, mut load) = run?;
        if let Some(len) = w.grpc_response_len() {
            // A failed call is a 200 with grpc-status in the trailers: count
            // the responses that brought no message back as failed.
            load.errors += grpc_responses_without_message(&load, len).unwrap_or(0);
        }
        Ok(Sample {
            round,
            workload: w,
            config,
            command,
            load,
            server_cpu_ms: ticks_ms(server1.saturating_sub(server0), self.clk),
            client_cpu_ms,
            rotel_cpu_ms: ticks_ms(rotel1.saturating_sub(rotel0), self.clk),
            agent: agent_run,
            rotel_spans: Some(rotel_spans),
            warmup_traced,
            others,
            loadavg,
            raw_output,
        })
    }

    /// The agent started, then IDLE_SECS with no load.
    fn measure_idle(&mut self, round: usize) -> Result<IdleSample> {
        let tag = format!("r{round}-idle");
        wait_for_other_agents(Duration::from_secs(180))?;
        eprintln!(
            "bench: {} {tag}: the agent with no load for {IDLE_SECS} s",
            sys::since_start()
        );
        let agent_log = self.out_dir.join(format!("logs/agent-{tag}.log"));
        let (p, startup) = self.agent.start_timed(&[], &agent_log)?;
        let others = other_periscopes(Some(p.pid()));
        let before = Snapshot::take(p.pid())?;
        sys::sleep_unless_interrupted(Duration::from_secs(IDLE_SECS))?;
        Ok(IdleSample {
            round,
            agent: finish_agent(p, startup, &before, self.clk, &agent_log),
            others,
        })
    }

    fn measure_scaling(
        &mut self,
        round: usize,
        rate: Option<u32>,
        workers: u32,
    ) -> Result<ScalingSample> {
        let secs = self.plan.scaling_secs;
        let tag = format!(
            "r{round}-scaling-{}",
            rate.map_or("max".to_string(), |r| r.to_string())
        );
        wait_for_other_agents(Duration::from_secs(180))?;
        self.rotel.check_running()?;
        let mut args = vec![
            "-z".into(),
            format!("{secs}s"),
            "-c".into(),
            workers.to_string(),
        ];
        if let Some(r) = rate {
            args.extend(["-q".into(), (r / workers).max(1).to_string()]);
        }
        args.push(self.http_url.clone());
        eprintln!(
            "bench: {} {tag}: hey {}",
            sys::since_start(),
            args.join(" ")
        );
        let rotel_mark = self.rotel.mark();
        let agent_log = self.out_dir.join(format!("logs/agent-{tag}.log"));
        let (p, startup) = self.agent.start_timed(&[], &agent_log)?;
        let others = other_periscopes(Some(p.pid()));
        let agent0 = Snapshot::take(p.pid())?;
        let run = run_load("hey", &args, None, secs, &self.out_dir, &tag);
        let agent = finish_agent(p, startup, &agent0, self.clk, &agent_log);
        let rotel_spans = self.rotel.spans_since(rotel_mark);
        let (command, raw_output, load) = run?;
        Ok(ScalingSample {
            round,
            rate,
            workers,
            secs,
            command,
            load,
            agent,
            rotel_spans: Some(rotel_spans),
            others,
            raw_output,
        })
    }
}

/// The configurations of `w` in the order round `round` (from 1) runs them:
/// A B C, B C A, C A B, ...: no configuration always runs first.
fn run_order(w: WorkloadKind, round: usize, floor: bool) -> Vec<Config> {
    let mut v: Vec<Config> = w
        .configs()
        .iter()
        .copied()
        .filter(|c| floor || *c != Config::Floor)
        .collect();
    let n = v.len();
    v.rotate_left(round.saturating_sub(1) % n);
    v
}

/// Run wrk, hey, ab or h2load to completion; returns (command line, raw
/// stdout, parsed). `csv` is ab's percentile CSV, or h2load's request log
/// (removed once read: a few MB per run).
fn run_load(
    program: &str,
    args: &[String],
    csv: Option<&Path>,
    secs: u32,
    out_dir: &Path,
    tag: &str,
) -> Result<(String, String, LoadResult)> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let shown = show(&cmd);
    let mut p = spawn(program, &mut cmd, libc::SIGTERM, Duration::from_secs(2))?;
    let status = p.wait_exit(Duration::from_secs(secs as u64 + 60))?;
    let out = p.stdout();
    std::fs::write(out_dir.join(format!("logs/{tag}-{program}.txt")), p.log()).ok();
    if !status.success() {
        bail!("`{shown}` failed ({status}):\n{}", p.log());
    }
    let parsed = match program {
        "wrk" => parse_wrk(&out),
        "hey" => parse_hey(&out),
        "ab" => {
            let csv_text = match csv {
                Some(c) => std::fs::read_to_string(c)
                    .with_context(|| format!("reading {}", c.display()))?,
                None => String::new(),
            };
            parse_ab(&out, &csv_text)
        }
        "h2load" => {
            let log = match csv {
                Some(c) => {
                    let text = std::fs::read_to_string(c).unwrap_or_default();
                    std::fs::remove_file(c).ok();
                    text
                }
                None => String::new(),
            };
            parse_h2load(&out, &log)
        }
        other => bail!("no parser for {other}"),
    }
    .with_context(|| format!("parsing the output of `{shown}`:\n{out}"))?;
    Ok((shown, out, parsed))
}

pub fn run(args: BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    sys::install_interrupt_handler();
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "`cargo xtask bench` must run as root (euid is {euid}): the agent loads eBPF programs \
             and missing packages are installed with apt. Try `sudo -E cargo xtask bench`."
        );
    }
    let plan = Plan::new(&args);
    announce(&plan, &args.out_dir);
    // Counted for the whole bench; the old value is back when this drops.
    let _bpf_stats = sys::BpfStats::enable();

    // 1. Tools, tracefs, the venv and the agent binary.
    env::ensure_apt_tools()?;
    let rotel_agent = env::ensure_rotel()?;
    env::ensure_tracefs()?;
    let grpcgo_go = if plan.bench {
        // Before the agent's build: the servers are built once out_dir exists.
        env::ensure_go()?;
        Some(env::ensure_grpcgo_deps()?)
    } else {
        None
    };
    let venv = if plan.bench {
        env::ensure_venv()?
    } else {
        PathBuf::new()
    };
    let t_build = Instant::now();
    let agent_bin = agent_binary(args.build)?;
    let build_time = t_build.elapsed();
    let floor = env::agent_has_noop_probes(&agent_bin);
    if !floor && plan.bench {
        eprintln!(
            "bench: WARNING: {} does not take `run --noop-probes`: the floor configuration is left out and the report says so",
            agent_bin.display()
        );
    }
    std::fs::create_dir_all(args.out_dir.join("logs"))
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let out_dir = args.out_dir.canonicalize()?;
    let go_build = if plan.bench {
        Some(env::build_go_https(&out_dir)?)
    } else {
        None
    };
    let grpc_go_build = match &grpcgo_go {
        Some(go) => Some(env::build_grpcgo(go, &out_dir)?),
        None => None,
    };

    let started = utc_stamp(SystemTime::now(), true);
    let machine = env::machine_facts();
    let tmp = TempDir::new("bench")?;

    // 2. The receiver and the servers, up for the whole bench.
    let rotel = Receiver::start(&rotel_agent)?;
    let nginx = Nginx::start(tmp.path())?;
    let grpc = GrpcServer::start(tmp.path())?;
    let go = match go_build {
        Some((binary, shown)) => Some(GoServer::start(
            "httpsgo",
            &binary,
            shown,
            &nginx.cert,
            &nginx.key,
            "/hello",
        )?),
        None => None,
    };
    let grpc_go = match grpc_go_build {
        Some((binary, shown)) => Some(GrpcGoServer::start(
            &binary,
            shown,
            &nginx.cert,
            &nginx.key,
            tmp.path(),
        )?),
        None => None,
    };
    let tls_off_config = out_dir.join("tls-off.toml");
    std::fs::write(&tls_off_config, "disabled_features = [\"tls\"]\n")?;
    let metrics_off_config = out_dir.join("metrics-off.toml");
    std::fs::write(&metrics_off_config, "disabled_features = [\"metrics\"]\n")?;
    let app_dir = env::write_flask_app(tmp.path())?;
    let mut b = Bench {
        agent: AgentCmd {
            bin: agent_bin.clone(),
            args: vec!["run".into(), "--otlp-endpoint".into(), rotel.endpoint()],
        },
        python: PythonService {
            venv,
            app_dir,
            port: free_port(),
            otlp_endpoint: rotel.endpoint(),
        },
        plan,
        floor,
        tls_off_config,
        metrics_off_config,
        nginx_pid: nginx.proc.pid(),
        http_url: format!("http://127.0.0.1:{}/", nginx.port),
        https_url: format!("https://127.0.0.1:{}/", nginx.https_port),
        h2c_url: format!("http://127.0.0.1:{}/", nginx.h2c_port),
        h2_tls_url: format!("https://127.0.0.1:{}/", nginx.h2_tls_port),
        grpc,
        go,
        grpc_go,
        rotel,
        out_dir: out_dir.clone(),
        clk: clk_tck(),
    };

    // 3. The rounds (after warm-ups, not measured), then the profile.
    let rounds = if b.plan.bench {
        warm_up(&mut b)?;
        run_rounds(&mut b, &nginx)?
    } else {
        Rounds::default()
    };
    let profile = if b.plan.profile {
        check_interrupted()?;
        match profile::record(&mut b) {
            Ok(p) => Some(Ok(p)),
            Err(e) if b.plan.bench => {
                eprintln!("bench: WARNING: no profile: {e:#}");
                Some(Err(format!("{e:#}")))
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };

    // 4. Stop the servers (their logs go with the results), then report.
    let commands = commands(&b, &nginx.shown);
    std::fs::write(out_dir.join("logs/flask-app.py"), env::FLASK_APP).ok();
    b.rotel.proc.stop();
    std::fs::write(out_dir.join("logs/rotel.log"), b.rotel.proc.log()).ok();
    b.grpc.stop(&out_dir);
    if let Some(g) = b.go.as_mut() {
        g.stop(&out_dir);
    }
    if let Some(g) = b.grpc_go.as_mut() {
        g.server.stop(&out_dir);
    }
    nginx.stop(&out_dir);

    let report = Report {
        quick: b.plan.quick,
        rounds: b.plan.rounds,
        secs: b.plan.secs,
        h2_secs: b.plan.h2_secs,
        floor_measured: b.floor,
        bpf_stats: sys::bpf_stats_enabled(),
        started,
        elapsed: t0.elapsed(),
        build_time,
        waited: sys::waited(),
        machine,
        commands,
        samples: rounds.samples,
        scaling: rounds.scaling,
        idle: rounds.idle,
        tls_calls: rounds.tls_calls,
        profile,
        chart: None,
    };
    write_report(report, &out_dir, t0)
}

/// What the bench will do, on stderr.
fn announce(plan: &Plan, out_dir: &Path) {
    let runs = |h2: bool| -> usize {
        WORKLOADS
            .iter()
            .filter(|w| w.is_http2() == h2)
            .map(|w| w.configs().len())
            .sum()
    };
    if plan.bench {
        eprintln!(
            "bench: {} round(s) of {} runs of {} s and {} HTTP/2 runs of {} s ({} workloads x their configurations), \
             scaling at {} x {} s and idle {IDLE_SECS} s, TLS call cost; results in {}",
            plan.rounds,
            runs(false),
            plan.secs,
            runs(true),
            plan.h2_secs,
            WORKLOADS.len(),
            SCALING.len(),
            plan.scaling_secs,
            out_dir.display()
        );
    }
    if plan.profile {
        eprintln!(
            "bench: profile: perf on the agent under {} for {PROFILE_SECS} s; flame graph in {}",
            profile::profile_workload().unwrap_or(WorkloadKind::Http).label(),
            out_dir.join("flamegraph.svg").display()
        );
    }
}

/// `PERISCOPE_BIN` (as in the end-to-end tests): that binary, unbuilt;
/// otherwise `target/release/periscope`, built first when `build`.
fn agent_binary(build: bool) -> Result<PathBuf> {
    let given_bin = std::env::var_os("PERISCOPE_BIN")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    if build && given_bin.is_none() {
        env::build_agent()?;
    }
    let agent_bin =
        given_bin.unwrap_or_else(|| crate::cmd::target_dir().join("release").join("periscope"));
    if !agent_bin.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p periscope`",
            agent_bin.display()
        );
    }
    Ok(agent_bin)
}

/// nginx (one worker, HTTP and HTTPS), up for the whole bench.
struct Nginx {
    proc: Proc,
    port: u16,
    https_port: u16,
    /// HTTP/2 listeners: cleartext (prior knowledge) and TLS (ALPN h2).
    h2c_port: u16,
    h2_tls_port: u16,
    /// The HTTPS server's certificate and key.
    cert: PathBuf,
    key: PathBuf,
    conf: PathBuf,
    error_log: PathBuf,
    shown: String,
}

impl Nginx {
    fn start(dir: &Path) -> Result<Nginx> {
        let port = free_port();
        let https_port = free_port();
        let h2c_port = free_port();
        let h2_tls_port = free_port();
        let (cert, key) = env::make_test_cert(dir)?;
        let ports = env::NginxPorts {
            http: port,
            https: https_port,
            h2c: h2c_port,
            h2_tls: h2_tls_port,
        };
        let conf = env::write_nginx_files(dir, &ports, &cert, &key)?;
        let error_log = dir.join("error.log");
        let mut cmd = Command::new("nginx");
        cmd.arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(&error_log);
        let shown = show(&cmd);
        let mut proc = spawn("nginx", &mut cmd, libc::SIGTERM, Duration::from_secs(5))?;
        wait_for_port(&mut proc, port, Duration::from_secs(15))?;
        check_http_ok(port).context("nginx does not answer GET / with 200")?;
        Ok(Nginx {
            proc,
            port,
            https_port,
            h2c_port,
            h2_tls_port,
            cert,
            key,
            conf,
            error_log,
            shown,
        })
    }

    /// Stop it; its configuration and error log go to `out_dir/logs`.
    fn stop(mut self, out_dir: &Path) {
        self.proc.stop();
        std::fs::copy(&self.error_log, out_dir.join("logs/nginx-error.log")).ok();
        std::fs::copy(&self.conf, out_dir.join("logs/nginx.conf")).ok();
    }
}

/// The gRPC server (Debian's python3-grpcio, generic handler, h2c), up for
/// the whole bench, and what h2load sends it.
struct GrpcServer {
    proc: Proc,
    /// `http://127.0.0.1:PORT/bench.Echo/Say`
    url: String,
    /// The request body: one length-prefixed gRPC message.
    request: PathBuf,
    shown: String,
}

impl GrpcServer {
    fn start(dir: &Path) -> Result<GrpcServer> {
        let port = free_port();
        let (script, request) = env::write_grpc_files(dir)?;
        let mut cmd = Command::new(SYSTEM_PYTHON);
        cmd.arg(&script)
            .arg(port.to_string())
            .arg(env::GRPC_SERVER_THREADS.to_string());
        let shown = show(&cmd);
        let mut proc = spawn(
            "grpc-server",
            &mut cmd,
            libc::SIGTERM,
            Duration::from_secs(5),
        )?;
        wait_for_port(&mut proc, port, Duration::from_secs(30))?;
        env::check_grpc_call(port).with_context(|| {
            format!(
                "the gRPC server does not answer a unary call; its output:\n{}",
                proc.log()
            )
        })?;
        Ok(GrpcServer {
            proc,
            url: format!("http://127.0.0.1:{port}/{}", env::GRPC_METHOD),
            request,
            shown,
        })
    }

    /// h2load's options for a unary call (POST with the message as body).
    fn h2load_args(&self) -> Vec<String> {
        grpc_h2load_args(&self.request)
    }

    /// Stop it; its script and output go to `out_dir/logs`.
    fn stop(&mut self, out_dir: &Path) {
        self.proc.stop();
        std::fs::write(out_dir.join("logs/grpc-server.py"), env::GRPC_SERVER).ok();
        std::fs::write(out_dir.join("logs/grpc-server.log"), self.proc.log()).ok();
    }
}

/// h2load's options for a gRPC unary call: POST with `request` (one
/// length-prefixed message) as the body.
fn grpc_h2load_args(request: &Path) -> Vec<String> {
    vec![
        "-H".into(),
        "content-type: application/grpc".into(),
        "-H".into(),
        "te: trailers".into(),
        "-d".into(),
        request.display().to_string(),
    ]
}

/// A Go server from the end-to-end tests' programs, up for the whole bench
/// with nginx's certificate: the Go HTTPS server (`tests/go/httpsgo serve
/// CERT KEY`, built by `env::build_go_https`) or the grpc-go one
/// (`tests/go/grpcgo serve CERT KEY`, built by `env::build_grpcgo`).
struct GoServer {
    /// `httpsgo` or `grpcgo`: its process's name and log file.
    name: &'static str,
    proc: Proc,
    port: u16,
    /// `https://127.0.0.1:PORT/hello`, `https://127.0.0.1:PORT/demo.Greeter/SayHello`
    url: String,
    /// The build command, and the server's.
    build_shown: String,
    shown: String,
}

impl GoServer {
    /// Start `binary` and wait for its `listening PORT` line (printed once
    /// it listens); the load goes to `path` on it.
    fn start(
        name: &'static str,
        binary: &Path,
        build_shown: String,
        cert: &Path,
        key: &Path,
        path: &str,
    ) -> Result<GoServer> {
        let mut cmd = Command::new(binary);
        cmd.arg("serve").arg(cert).arg(key);
        let shown = show(&cmd);
        let mut proc = spawn(name, &mut cmd, libc::SIGTERM, Duration::from_secs(5))?;
        let line = proc.wait_for_line("`listening PORT`", Duration::from_secs(20), |l| {
            l.starts_with("listening ")
        })?;
        let port = parse_listening(&line)
            .with_context(|| format!("no port in the Go server's line {line:?}"))?;
        Ok(GoServer {
            name,
            proc,
            port,
            url: format!("https://127.0.0.1:{port}{path}"),
            build_shown,
            shown,
        })
    }

    fn check_running(&mut self) -> Result<()> {
        if !self.proc.is_running() {
            bail!(
                "the Go server {} exited during the bench; its output:\n{}",
                self.name,
                self.proc.log()
            );
        }
        Ok(())
    }

    /// Stop it; its output goes to `out_dir/logs`.
    fn stop(&mut self, out_dir: &Path) {
        self.proc.stop();
        std::fs::write(
            out_dir.join(format!("logs/{}.log", self.name)),
            self.proc.log(),
        )
        .ok();
    }
}

/// The grpc-go server (`tests/go/grpcgo`, over TLS), and what h2load sends
/// it.
struct GrpcGoServer {
    server: GoServer,
    /// The request body: one length-prefixed gRPC message.
    request: PathBuf,
    /// The call that checked it (`grpcgo call PORT NAME`).
    check_shown: String,
}

impl GrpcGoServer {
    /// Start it (see `GoServer::start`), then make one real call with the
    /// program's own grpc-go client: it must come back OK.
    fn start(
        binary: &Path,
        build_shown: String,
        cert: &Path,
        key: &Path,
        dir: &Path,
    ) -> Result<GrpcGoServer> {
        let request = env::write_grpcgo_request(dir)?;
        let path = format!("/{}", env::GRPCGO_METHOD);
        let server = GoServer::start("grpcgo", binary, build_shown, cert, key, &path)?;
        let check_shown = env::check_grpcgo_call(binary, server.port).with_context(|| {
            format!(
                "the grpc-go server does not answer a unary call with OK; its output:\n{}",
                server.proc.log()
            )
        })?;
        Ok(GrpcGoServer {
            server,
            request,
            check_shown,
        })
    }

    fn h2load_args(&self) -> Vec<String> {
        grpc_h2load_args(&self.request)
    }
}

/// Everything the rounds measured.
#[derive(Default)]
struct Rounds {
    samples: Vec<Sample>,
    scaling: Vec<ScalingSample>,
    idle: Vec<IdleSample>,
    tls_calls: Vec<TlsCallSample>,
}

fn run_rounds(b: &mut Bench, nginx: &Nginx) -> Result<Rounds> {
    let mut r = Rounds::default();
    for round in 1..=b.plan.rounds {
        for w in WORKLOADS {
            for config in b.configs(w, round) {
                check_interrupted()?;
                let s = b.measure(round, w, config)?;
                eprintln!("bench: {} {}", sys::since_start(), s.one_line());
                r.samples.push(s);
                if config.is_agent() {
                    // Let the detached programs and the receiver settle.
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        check_interrupted()?;
        let s = b.measure_idle(round)?;
        eprintln!("bench: {} {}", sys::since_start(), s.one_line());
        r.idle.push(s);
        for (rate, workers) in SCALING {
            check_interrupted()?;
            let s = b.measure_scaling(round, rate, workers)?;
            eprintln!("bench: {} {}", sys::since_start(), s.one_line());
            r.scaling.push(s);
            std::thread::sleep(Duration::from_secs(1));
        }
        check_interrupted()?;
        let t = measure_tls_calls(
            &b.agent,
            &b.out_dir,
            round,
            b.plan.uprobe_iterations,
            &nginx.cert,
            &nginx.key,
        )?;
        eprintln!("bench: {} {}", sys::since_start(), t.one_line());
        r.tls_calls.push(t);
    }
    Ok(r)
}

/// Every command the bench ran, for the report: (what, command line).
fn commands(b: &Bench, nginx_shown: &str) -> Vec<(String, String)> {
    let mut commands: Vec<(String, String)> = vec![
        ("nginx".into(), nginx_shown.to_string()),
        ("rotel".into(), b.rotel.shown.clone()),
        ("agent".into(), b.agent.shown(&[])),
    ];
    if b.plan.bench {
        commands.extend(bench_commands(b));
    }
    if b.plan.profile {
        let (program, args, _) = b.load_command(WorkloadKind::Http, PROFILE_SECS, "TAG");
        commands.push((
            "profile load".into(),
            format!("{program} {}", args.join(" ")),
        ));
    }
    commands
}

fn bench_commands(b: &Bench) -> Vec<(String, String)> {
    let mut commands: Vec<(String, String)> = vec![
        (
            "agent, floor".into(),
            b.agent.shown(&b.agent_extra(Config::Floor)),
        ),
        (
            "agent, tls disabled".into(),
            b.agent.shown(&b.agent_extra(Config::TlsOff)),
        ),
        (
            "agent, metrics disabled".into(),
            b.agent.shown(&b.agent_extra(Config::MetricsOff)),
        ),
        ("gunicorn".into(), show(&b.python.command(false))),
        ("gRPC server".into(), b.grpc.shown.clone()),
        (
            "gunicorn, OTel".into(),
            format!(
                "OTEL_SERVICE_NAME=flask-bench OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT={} \
                 OTEL_EXPORTER_OTLP_PROTOCOL=grpc OTEL_METRICS_EXPORTER=none OTEL_LOGS_EXPORTER=none {}",
                b.python.otlp_endpoint,
                show(&b.python.command(true))
            ),
        ),
    ];
    if let Some(g) = &b.go {
        commands.push(("Go HTTPS server, build".into(), g.build_shown.clone()));
        commands.push(("Go HTTPS server".into(), g.shown.clone()));
    }
    if let Some(g) = &b.grpc_go {
        commands.push(("grpc-go server, build".into(), g.server.build_shown.clone()));
        commands.push(("grpc-go server".into(), g.server.shown.clone()));
        commands.push(("grpc-go server, check".into(), g.check_shown.clone()));
    }
    for w in WORKLOADS {
        let (program, args, _) = b.load_command(w, b.plan.secs_for(w), "TAG");
        // Quoted where needed (h2load's `-H 'content-type: application/grpc'`).
        commands.push((w.key().into(), show(Command::new(program).args(&args))));
    }
    commands.push((
        "tls calls".into(),
        format!(
            "{SYSTEM_PYTHON} -c <in-memory TLS loop, see xtask/src/bench/tls_calls.rs> {} CERT KEY",
            b.plan.uprobe_iterations
        ),
    ));
    commands
}

/// summary.md, chart.png (when the rounds ran) and raw.json; the summary
/// on stdout.
fn write_report(mut report: Report, out_dir: &Path, t0: Instant) -> Result<()> {
    let chart_path = out_dir.join("chart.png");
    if !report.samples.is_empty() {
        match chart::draw(&report, &chart_path) {
            Ok(()) => report.chart = Some("chart.png".into()),
            Err(e) => eprintln!("bench: WARNING: no chart: {e:#}"),
        }
    }
    let md = report.markdown();
    std::fs::write(out_dir.join("summary.md"), &md)?;
    std::fs::write(
        out_dir.join("raw.json"),
        serde_json::to_string_pretty(&report.json())? + "\n",
    )?;
    println!("{}", report.summary());
    eprintln!(
        "bench: wrote {} and {} in {:.0} s",
        out_dir.join("summary.md").display(),
        out_dir.join("raw.json").display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// wrk over HTTP and HTTPS (nginx and the Go server), ab over both, h2load
/// over HTTP/2 (h2c and h2) and gRPC (Python over h2c, grpc-go over h2),
/// and the Python service without and with the OTel instrumentation (whose
/// spans must reach Rotel: otherwise the comparison would be with an
/// instrumentation that does nothing).
fn warm_up(b: &mut Bench) -> Result<()> {
    eprintln!("bench: warm-up (not measured)");
    for w in [
        WorkloadKind::Http,
        WorkloadKind::Https,
        WorkloadKind::GoHttps,
        WorkloadKind::HttpConnPerReq,
        WorkloadKind::HttpsConnPerReq,
        WorkloadKind::H2c,
        WorkloadKind::H2Tls,
        WorkloadKind::Grpc,
        WorkloadKind::GrpcGo,
    ] {
        let tag = format!("warmup-{}", w.key());
        let (program, args, csv) = b.load_command(w, 2, &tag);
        let (_, out, mut r) = run_load(program, &args, csv.as_deref(), 2, &b.out_dir, &tag)?;
        if let Some(want) = w.h2_protocol() {
            // h2load falls back to HTTP/1.1 when the server does not offer h2.
            let got = h2load_protocol(&out);
            if r.requests > 0 && got != Some(want) {
                bail!(
                    "{}: h2load negotiated {got:?}, not {want}: see {}",
                    w.label(),
                    b.out_dir.join(format!("logs/{tag}-h2load.txt")).display()
                );
            }
        }
        if let Some(len) = w.grpc_response_len() {
            // Every call must be gRPC OK: h2load counts a failed call as a
            // 2xx (grpc-status is in the trailers), but it brings no message.
            r.errors += grpc_responses_without_message(&r, len)
                .context("h2load did not report the bytes of the gRPC responses")?;
        }
        if r.requests == 0 || r.errors > 0 || r.non_2xx > 0 {
            bail!(
                "{} does not run cleanly ({} requests, {} errors, {} non-2xx): see {}",
                w.label(),
                r.requests,
                r.errors,
                r.non_2xx,
                b.out_dir
                    .join(format!("logs/{tag}-{program}.txt"))
                    .display()
            );
        }
    }
    for otel in [false, true] {
        let tag = format!("warmup-python{}", if otel { "-otel" } else { "" });
        let mark = b.rotel.mark();
        let mut g = b.python.start(otel)?;
        let (program, args, _) = b.load_command(WorkloadKind::Python, 2, &tag);
        let run = run_load(program, &args, None, 2, &b.out_dir, &tag);
        g.stop();
        std::fs::write(b.out_dir.join(format!("logs/{tag}-gunicorn.log")), g.log()).ok();
        let (_, _, r) = run?;
        if r.requests == 0 || r.errors > 0 || r.non_2xx > 0 {
            bail!(
                "the Flask service does not run cleanly ({} requests, {} errors, {} non-2xx): see {}",
                r.requests,
                r.errors,
                r.non_2xx,
                b.out_dir.join(format!("logs/{tag}-wrk.txt")).display()
            );
        }
        let spans = b.rotel.spans_since(mark);
        let sent = r.requests + PY_WARMUP_REQUESTS;
        eprintln!(
            "bench: {tag}: {} requests, Rotel received {spans} spans",
            sent
        );
        if otel && spans < sent {
            bail!(
                "the OpenTelemetry instrumentation of gunicorn sent {spans} spans to Rotel for {sent} requests: \
                 it does not export every request (see {})",
                b.out_dir.join(format!("logs/{tag}-gunicorn.log")).display()
            );
        }
    }
    Ok(())
}

pub fn fmt_f(v: Option<f64>, decimals: usize) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.decimals$}"))
}

pub fn fmt_us(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(us) if us.abs() < 1000.0 => format!("{us:.0} us"),
        Some(us) if us.abs() < 1e6 => format!("{:.2} ms", us / 1e3),
        Some(us) => format!("{:.2} s", us / 1e6),
    }
}

pub fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), Some(2.0));
        assert_eq!(median([4.0, 1.0].into_iter()), Some(2.5));
        assert_eq!(median(std::iter::empty()), None);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_us(Some(12.4)), "12 us");
        assert_eq!(fmt_us(Some(-12.4)), "-12 us");
        assert_eq!(fmt_us(Some(1500.0)), "1.50 ms");
        assert_eq!(fmt_us(None), "n/a");
        assert_eq!(fmt_f(Some(1.234), 1), "1.2");
    }

    #[test]
    fn workloads_have_none_first() {
        for w in WORKLOADS {
            assert_eq!(w.configs()[0], Config::None, "{w:?}");
            assert!(w.configs().contains(&Config::Periscope));
            assert!(w.configs().contains(&Config::Floor));
        }
        assert!(WorkloadKind::Python.configs().contains(&Config::Otel));
        assert!(!WorkloadKind::Http.configs().contains(&Config::Otel));
    }

    /// The agent with the RED metrics disabled runs on nginx's HTTP
    /// keep-alive workload only, after TlsOff in report order.
    #[test]
    fn metrics_off_on_http_keepalive() {
        let c = Config::MetricsOff;
        assert_eq!(c.key(), "metrics_off");
        assert_eq!(c.label(), "Periscope, metrics disabled");
        assert!(c.is_agent());
        for w in WORKLOADS {
            assert_eq!(w.configs().contains(&c), w == WorkloadKind::Http, "{w:?}");
        }
        assert_eq!(
            WorkloadKind::Http.configs(),
            &[
                Config::None,
                Config::Periscope,
                Config::Floor,
                Config::MetricsOff
            ]
        );
        let at = |c| CONFIGS.iter().position(|x| *x == c).unwrap();
        assert_eq!(at(c), at(Config::TlsOff) + 1);
    }

    #[test]
    fn workload_keys_are_unique() {
        let mut keys: Vec<&str> = WORKLOADS.iter().map(|w| w.key()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), WORKLOADS.len());
    }

    /// Go HTTPS: wrk as for nginx's HTTPS, HTTP/1.1, the same run length.
    #[test]
    fn go_https_workload() {
        let w = WorkloadKind::GoHttps;
        assert_eq!(w.key(), "go_https_keepalive");
        assert_eq!(w.short(), "Go HTTPS keep-alive");
        assert_eq!(
            w.label(),
            "Go net/http HTTPS keep-alive (crypto/tls, stripped go1.27; wrk, 16 conns)"
        );
        assert_eq!(
            w.configs(),
            &[Config::None, Config::Periscope, Config::Floor]
        );
        assert!(!w.is_http2());
        assert_eq!(w.spans_per_request(), 2);
        let plan = Plan::new(&BenchArgs::new(true, false));
        assert_eq!(plan.secs_for(w), plan.secs_for(WorkloadKind::Https));
        let at = |w| WORKLOADS.iter().position(|x| *x == w).unwrap();
        assert_eq!(at(w), at(WorkloadKind::Https) + 1);
    }

    /// gRPC unary on grpc-go: h2load over TLS as the Python gRPC workload
    /// over h2c, the same connections and streams and run length, listed
    /// right after it.
    #[test]
    fn grpc_go_workload() {
        let w = WorkloadKind::GrpcGo;
        assert_eq!(w.key(), "grpc_go_unary");
        assert_eq!(w.short(), "gRPC unary, Go");
        assert_eq!(
            w.label(),
            "gRPC unary, grpc-go 1.33 over TLS (h2, stripped go1.19; h2load, 4 conns x 10 streams)"
        );
        assert_eq!(
            w.configs(),
            &[Config::None, Config::Periscope, Config::Floor]
        );
        assert!(w.is_http2());
        assert_eq!(w.h2_protocol(), Some("h2"));
        assert_eq!(WorkloadKind::Grpc.h2_protocol(), Some("h2c"));
        assert_eq!(WorkloadKind::H2Tls.h2_protocol(), Some("h2"));
        assert_eq!(WorkloadKind::GoHttps.h2_protocol(), None);
        assert_eq!(w.spans_per_request(), 2);
        assert_eq!(w.grpc_response_len(), Some(26));
        assert_eq!(WorkloadKind::Grpc.grpc_response_len(), Some(22));
        assert_eq!(WorkloadKind::H2Tls.grpc_response_len(), None);
        for quick in [true, false] {
            let plan = Plan::new(&BenchArgs::new(quick, false));
            assert_eq!(plan.secs_for(w), plan.secs_for(WorkloadKind::Grpc));
            assert!(plan.bench);
        }
        let at = |w| WORKLOADS.iter().position(|x| *x == w).unwrap();
        assert_eq!(at(w), at(WorkloadKind::Grpc) + 1);
        assert_eq!(
            grpc_h2load_args(Path::new("/r/grpcgo-request.bin")),
            [
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-d",
                "/r/grpcgo-request.bin"
            ]
        );
    }

    #[test]
    fn rotation() {
        use Config::*;
        let w = WorkloadKind::Http;
        assert_eq!(
            run_order(w, 1, true),
            vec![None, Periscope, Floor, MetricsOff]
        );
        assert_eq!(
            run_order(w, 2, true),
            vec![Periscope, Floor, MetricsOff, None]
        );
        assert_eq!(
            run_order(w, 3, true),
            vec![Floor, MetricsOff, None, Periscope]
        );
        assert_eq!(
            run_order(w, 4, true),
            vec![MetricsOff, None, Periscope, Floor]
        );
        assert_eq!(
            run_order(w, 5, true),
            vec![None, Periscope, Floor, MetricsOff]
        );
        assert_eq!(run_order(w, 2, false), vec![Periscope, MetricsOff, None]);
        assert_eq!(
            run_order(WorkloadKind::Https, 1, true),
            vec![None, Periscope, Floor, TlsOff]
        );
        // Every configuration runs first once in as many rounds as there are.
        for w in WORKLOADS {
            for floor in [true, false] {
                let n = run_order(w, 1, floor).len();
                let first: Vec<Config> = (1..=n).map(|r| run_order(w, r, floor)[0]).collect();
                for c in w.configs() {
                    let times = first.iter().filter(|x| *x == c).count();
                    let want = usize::from(floor || *c != Floor);
                    assert_eq!(times, want, "{w:?} {c:?}");
                }
            }
        }
        assert_eq!(
            run_order(WorkloadKind::Python, 1, true),
            vec![None, Periscope, Floor, Otel]
        );
    }

    #[test]
    fn scaling_labels() {
        assert_eq!(ScalingSample::rate_label(Some(20_000)), "20k req/s");
        assert_eq!(ScalingSample::rate_label(Some(1500)), "1500 req/s");
        assert_eq!(ScalingSample::rate_label(None), "max");
    }
}
