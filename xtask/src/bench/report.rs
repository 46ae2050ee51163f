//! Aggregates over rounds, the targets, and the Markdown and JSON reports.

use super::agent_cpu::CpuSplit;
use super::env::{Machine, SYSTEM_PYTHON};
use super::parse::StopLine;
use super::profile::Profile;
use super::tls_calls::TlsCallSample;
use super::{
    AgentRun, CONFIGS, Config, IdleSample, SCALING, Sample, ScalingSample, WORKLOADS, WorkloadKind,
    fmt_f, fmt_us, median,
};
use serde_json::{Value, json};
use std::time::Duration;

/// Targets from the issue. HTTP keep-alive throughput against none's,
/// HTTPS keep-alive throughput against the floor's.
pub const TARGET_HTTP_RATIO: f64 = 0.90;
pub const TARGET_HTTPS_RATIO: f64 = 0.90;
/// Agent CPU (all its threads) per HTTP keep-alive request, µs.
pub const TARGET_AGENT_US_PER_REQUEST: f64 = 2.0;
/// Agent CPU per second at CPU_TARGET_RATE, and idle, ms.
pub const TARGET_CPU_MS_PER_S: f64 = 10.0;
pub const CPU_TARGET_RATE: u32 = 1000;
pub const TARGET_IDLE_MS_PER_S: f64 = 2.0;
/// Periscope's added latency per request at most this many times the floor's.
pub const TARGET_FLOOR_FACTOR: f64 = 2.0;
/// Periscope's overhead on the Python service at most this fraction of OTel's.
pub const TARGET_OTEL_FRACTION: f64 = 0.2;
pub const TARGET_RSS_MIB: f64 = 40.0;
/// "RSS < TARGET_RSS_MIB" as "<=": VmHWM counts KiB.
const RSS_MAX_MIB: f64 = TARGET_RSS_MIB - 1.0 / 1024.0;
/// The rate at which the RSS and no-drop targets hold, and the one with
/// zero lost events.
pub const RSS_TARGET_RATE: u32 = 20_000;
pub const LOSSLESS_RATE: u32 = 5000;
/// A disabled feature must cost almost nothing: within 2% of no agent.
pub const TARGET_TLS_OFF_RATIO: f64 = 0.98;
/// Agent CPU per HTTP/2 request at most this many times per HTTP/1.1
/// request (h2c against HTTP/1.1 keep-alive, h2 against HTTPS keep-alive).
pub const TARGET_H2_FACTOR: f64 = 1.5;
/// (HTTP/2 workload, the HTTP/1.1 workload it is compared with).
pub const H2_PAIRS: [(WorkloadKind, WorkloadKind); 2] = [
    (WorkloadKind::H2c, WorkloadKind::Http),
    (WorkloadKind::H2Tls, WorkloadKind::Https),
];
/// (Go's crypto/tls server, nginx's OpenSSL one): the same keep-alive load
/// (wrk over TLS 1.3), the agent's CPU per request side by side.
pub const GO_PAIR: (WorkloadKind, WorkloadKind) = (WorkloadKind::GoHttps, WorkloadKind::Https);
/// (the grpc-go server, nginx's HTTP/2 over TLS): the same load generator
/// (h2load over TLS 1.3, h2 by ALPN, traced the same way), the agent's CPU
/// per request side by side.
pub const GRPC_GO_PAIR: (WorkloadKind, WorkloadKind) = (WorkloadKind::GrpcGo, WorkloadKind::H2Tls);
/// A rate counts as reached when hey achieved this fraction of it.
const RATE_REACHED: f64 = 0.9;

pub struct Report {
    pub quick: bool,
    pub rounds: usize,
    pub secs: u32,
    /// Seconds per HTTP/2 and gRPC run.
    pub h2_secs: u32,
    /// The agent took `--noop-probes`.
    pub floor_measured: bool,
    /// `kernel.bpf_stats_enabled` was 1: the kernel programs' run time was counted.
    pub bpf_stats: bool,
    pub started: String,
    pub elapsed: Duration,
    /// Of `elapsed`: building the agent, and waiting for other agents on the
    /// machine to exit.
    pub build_time: Duration,
    pub waited: Duration,
    pub machine: Machine,
    /// (what, command line)
    pub commands: Vec<(String, String)>,
    pub samples: Vec<Sample>,
    pub scaling: Vec<ScalingSample>,
    pub idle: Vec<IdleSample>,
    pub tls_calls: Vec<TlsCallSample>,
    /// `--profile`: what it found, or why it failed.
    pub profile: Option<Result<Profile, String>>,
    /// The chart's file name in the results folder, if it was drawn.
    pub chart: Option<String>,
}

/// Aggregates for one (workload, config) over the rounds.
#[derive(Default)]
pub struct Agg {
    pub runs: usize,
    pub rps: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub requests: u64,
    pub errors: u64,
    pub non_2xx: u64,
    pub server_cpu_1k: Option<f64>,
    pub client_cpu_1k: Option<f64>,
    pub agent_cpu_1k: Option<f64>,
    pub total_cpu_1k: Option<f64>,
    pub rotel_cpu_1k: Option<f64>,
    /// The agent's CPU split, µs per request (medians).
    pub split: SplitUs,
    pub peak_rss_mib: Option<f64>,
    pub lost: Option<u64>,
    pub exported: Option<u64>,
    pub built: Option<u64>,
    pub dropped: Option<u64>,
    /// Events the agent received, summed over runs.
    pub events: Option<u64>,
    /// Agent runs without a `stopped:` line.
    pub missing_stop: usize,
    /// Spans Rotel received for the measured requests, summed over runs.
    pub rotel_spans: Option<u64>,
    /// SERVER + CLIENT spans built, summed over runs (when the agent reports them).
    pub request_spans: Option<u64>,
}

/// CPU per request by part, µs (medians over rounds).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SplitUs {
    /// The BPF programs' own run time (charged to the traced processes).
    pub kernel: Option<f64>,
    pub event_loop: Option<f64>,
    pub export: Option<f64>,
    pub other: Option<f64>,
    /// Kernel program runs per request.
    pub prog_runs: Option<f64>,
    /// Names of the other threads that used CPU, over all rounds.
    pub other_threads: Vec<String>,
}

impl SplitUs {
    fn of(runs: &[&Sample]) -> SplitUs {
        let med = |part: fn(&CpuSplit) -> Option<f64>| -> Option<f64> {
            median(runs.iter().filter_map(|s| s.split_us(part)))
        };
        let mut other_threads: Vec<String> = runs
            .iter()
            .filter_map(|s| s.agent.as_ref())
            .flat_map(|a| a.split.other_threads.iter().map(|(n, _)| n.clone()))
            .collect();
        other_threads.sort();
        other_threads.dedup();
        SplitUs {
            kernel: med(|c| c.kernel.map(|k| k.ms())),
            event_loop: med(|c| Some(c.event_loop_ms)),
            export: med(|c| Some(c.export_ms)),
            other: med(|c| Some(c.other_ms)),
            prog_runs: median(runs.iter().filter_map(|s| s.prog_runs_per_request())),
            other_threads,
        }
    }
}

/// One configuration against `none` in the same workload.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Overhead {
    pub throughput_ratio: Option<f64>,
    /// Median p50 with minus median p50 without, microseconds.
    pub added_p50_us: Option<f64>,
    pub added_p99_us: Option<f64>,
    /// Server + load generator + agent CPU per 1000 requests, minus none's.
    pub added_cpu_1k: Option<f64>,
}

impl Overhead {
    pub fn throughput_loss(&self) -> Option<f64> {
        self.throughput_ratio.map(|r| 1.0 - r)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verdict {
    Met,
    Missed,
    Unknown,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Met => "yes",
            Verdict::Missed => "**NO**",
            Verdict::Unknown => "unknown",
        }
    }
}

pub struct Target {
    pub name: String,
    pub measured: String,
    pub verdict: Verdict,
}

/// `a <= factor * b` for overheads, where 0 or less means "nothing
/// measurable": Met if `a` is nothing; Missed if `a` is something and `b`
/// is nothing (or `a` is more than allowed); Unknown without figures.
pub fn judge_at_most(a: Option<f64>, b: Option<f64>, factor: f64) -> Verdict {
    match (a, b) {
        (Some(a), _) if a <= 0.0 => Verdict::Met,
        (Some(a), Some(b)) => {
            if a <= factor * b.max(0.0) {
                Verdict::Met
            } else {
                Verdict::Missed
            }
        }
        _ => Verdict::Unknown,
    }
}

/// `v <= max`: Missed whenever it is over; Met only when the figure was
/// measured where the target applies (`applies`: the rate was reached).
fn judge_max(v: Option<f64>, max: f64, applies: bool) -> Verdict {
    match v {
        Some(v) if v > max => Verdict::Missed,
        Some(_) if applies => Verdict::Met,
        _ => Verdict::Unknown,
    }
}

/// The scaling runs at `rate` achieved enough of it to judge a target there.
fn reached(a: &ScaleAgg, rate: u32) -> bool {
    a.rps.is_some_and(|r| r >= rate as f64 * RATE_REACHED)
}

/// A target against the floor when the floor was not measured.
fn floor_unmeasured(name: String) -> Target {
    Target {
        name,
        measured: "floor not measured (the agent does not take `run --noop-probes`)".into(),
        verdict: Verdict::Unknown,
    }
}

/// "N WHAT at R req/s achieved", or why there is no count.
fn count_at(n: Option<u64>, what: &str, a: &ScaleAgg) -> String {
    match n {
        Some(n) => format!("{n} {what} at {} req/s achieved", fmt_f(a.rps, 0)),
        None => format!(
            "n/a ({} agent run(s) without a `stopped:` line)",
            a.missing_stop
        ),
    }
}

fn judge_ratio(r: Option<f64>, min: f64) -> Verdict {
    match r {
        Some(r) if r >= min => Verdict::Met,
        Some(_) => Verdict::Missed,
        None => Verdict::Unknown,
    }
}

/// `a / b` when both are known and b is positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_pct(r: Option<f64>) -> String {
    r.map_or("n/a".into(), |r| format!("{:.1}%", r * 100.0))
}

fn fmt_added_us(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 0.0 => format!("+{}", fmt_us(Some(v))),
        other => fmt_us(other),
    }
}

fn fmt_x(r: Option<f64>) -> String {
    r.map_or("n/a".into(), |r| format!("{r:.2}x"))
}

/// Aggregates of scaling runs at one asked rate.
#[derive(Default)]
pub struct ScaleAgg {
    pub runs: usize,
    pub rps: Option<f64>,
    pub requests: u64,
    pub agent_cpu_per_s: Option<f64>,
    pub agent_cpu_1k: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    pub lost: Option<u64>,
    pub exported: Option<u64>,
    pub dropped: Option<u64>,
    pub rotel_spans: Option<u64>,
    pub request_spans: Option<u64>,
    pub errors: u64,
    pub missing_stop: usize,
}

fn sum_request_spans(agents: &[&AgentRun]) -> Option<u64> {
    let v: Vec<u64> = agents
        .iter()
        .filter_map(|a| a.stop.as_ref()?.request_spans)
        .collect();
    (!agents.is_empty() && v.len() == agents.len()).then(|| v.iter().sum())
}

/// Notes on one run: the agent did not exit cleanly, other agents ran.
fn run_notes(notes: &mut Vec<String>, run: &str, agent: Option<&AgentRun>, others: &[u32]) {
    if let Some(a) = agent
        && a.exit != "exit status: 0"
    {
        notes.push(format!("{run}: agent {}", a.exit));
    }
    if !others.is_empty() {
        notes.push(format!(
            "{run}: other periscope process(es) were running ({others:?}): figures of this run are disturbed"
        ));
    }
}

fn max_rss_mib(agents: &[&AgentRun]) -> Option<f64> {
    agents
        .iter()
        .map(|a| a.peak_rss_kib as f64 / 1024.0)
        .reduce(f64::max)
}

fn sum_stops(agents: &[&AgentRun], f: impl Fn(&StopLine) -> u64) -> Option<u64> {
    let stops: Vec<&StopLine> = agents.iter().filter_map(|a| a.stop.as_ref()).collect();
    (!agents.is_empty() && stops.len() == agents.len()).then(|| stops.iter().map(|s| f(s)).sum())
}

impl Report {
    fn runs(&self, w: WorkloadKind, c: Config) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |s| s.workload == w && s.config == c)
    }

    pub fn measured(&self, w: WorkloadKind, c: Config) -> bool {
        self.runs(w, c).next().is_some()
    }

    pub fn agg(&self, w: WorkloadKind, c: Config) -> Agg {
        let runs: Vec<&Sample> = self.runs(w, c).collect();
        let agents: Vec<&AgentRun> = runs.iter().filter_map(|s| s.agent.as_ref()).collect();
        let with_stop = agents.iter().filter(|a| a.stop.is_some()).count();
        let rotel: Vec<u64> = runs
            .iter()
            .filter_map(|s| s.rotel_spans_for_run())
            .collect();
        Agg {
            runs: runs.len(),
            rps: median(runs.iter().map(|s| s.load.rps)),
            p50: median(runs.iter().filter_map(|s| s.load.p50_us)),
            p99: median(runs.iter().filter_map(|s| s.load.p99_us)),
            requests: runs.iter().map(|s| s.load.requests).sum(),
            errors: runs.iter().map(|s| s.load.errors).sum(),
            non_2xx: runs.iter().map(|s| s.load.non_2xx).sum(),
            server_cpu_1k: median(runs.iter().filter_map(|s| s.server_cpu_per_1k())),
            client_cpu_1k: median(runs.iter().filter_map(|s| s.client_cpu_per_1k())),
            agent_cpu_1k: median(runs.iter().filter_map(|s| s.agent_cpu_per_1k())),
            total_cpu_1k: median(runs.iter().filter_map(|s| s.total_cpu_per_1k())),
            rotel_cpu_1k: median(runs.iter().filter_map(|s| s.rotel_cpu_per_1k())),
            split: SplitUs::of(&runs),
            peak_rss_mib: max_rss_mib(&agents),
            lost: sum_stops(&agents, |s| s.lost),
            exported: sum_stops(&agents, |s| s.exported),
            built: sum_stops(&agents, |s| s.spans_built),
            dropped: sum_stops(&agents, |s| s.dropped),
            events: sum_stops(&agents, |s| s.events),
            missing_stop: agents.len() - with_stop,
            rotel_spans: (!runs.is_empty() && rotel.len() == runs.len())
                .then(|| rotel.iter().sum()),
            request_spans: sum_request_spans(&agents),
        }
    }

    pub fn overhead(&self, w: WorkloadKind, c: Config) -> Overhead {
        let none = self.agg(w, Config::None);
        let a = self.agg(w, c);
        if a.runs == 0 || none.runs == 0 {
            return Overhead::default();
        }
        let diff = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| x - y);
        Overhead {
            throughput_ratio: ratio(a.rps, none.rps),
            added_p50_us: diff(a.p50, none.p50),
            added_p99_us: diff(a.p99, none.p99),
            added_cpu_1k: diff(a.total_cpu_1k, none.total_cpu_1k),
        }
    }

    fn scale_runs(&self, rate: Option<u32>) -> impl Iterator<Item = &ScalingSample> {
        self.scaling.iter().filter(move |s| s.rate == rate)
    }

    pub fn scale_agg(&self, rate: Option<u32>) -> ScaleAgg {
        let runs: Vec<&ScalingSample> = self.scale_runs(rate).collect();
        let agents: Vec<&AgentRun> = runs.iter().map(|s| &s.agent).collect();
        let rotel: Vec<u64> = runs.iter().filter_map(|s| s.rotel_spans).collect();
        ScaleAgg {
            runs: runs.len(),
            rps: median(runs.iter().map(|s| s.load.rps)),
            requests: runs.iter().map(|s| s.load.requests).sum(),
            agent_cpu_per_s: median(runs.iter().filter_map(|s| s.agent_cpu_per_s())),
            agent_cpu_1k: median(runs.iter().filter_map(|s| s.agent_cpu_per_1k())),
            peak_rss_mib: max_rss_mib(&agents),
            lost: sum_stops(&agents, |s| s.lost),
            exported: sum_stops(&agents, |s| s.exported),
            dropped: sum_stops(&agents, |s| s.dropped),
            rotel_spans: (!runs.is_empty() && rotel.len() == runs.len())
                .then(|| rotel.iter().sum()),
            request_spans: sum_request_spans(&agents),
            errors: runs.iter().map(|s| s.load.errors + s.load.non_2xx).sum(),
            missing_stop: agents.iter().filter(|a| a.stop.is_none()).count(),
        }
    }

    /// The first asked rate (in scaling order) with events lost in the
    /// kernel, and the first with spans dropped by the exporter.
    pub fn drops_start(&self) -> (Option<Option<u32>>, Option<Option<u32>>) {
        let mut lost = None;
        let mut dropped = None;
        for (rate, _) in SCALING {
            let a = self.scale_agg(rate);
            if a.runs == 0 {
                continue;
            }
            if lost.is_none() && a.lost.is_some_and(|l| l > 0) {
                lost = Some(rate);
            }
            if dropped.is_none() && a.dropped.is_some_and(|d| d > 0) {
                dropped = Some(rate);
            }
        }
        (lost, dropped)
    }

    /// Median extra CPU per hooked TLS call, from the in-memory loop.
    fn tls_call_ns(&self) -> Option<f64> {
        median(self.tls_calls.iter().filter_map(|t| t.ns_per_call()))
    }

    pub fn targets(&self) -> Vec<Target> {
        let mut t = self.throughput_targets();
        t.extend(self.cpu_targets());
        t.push(self.h2_cpu_target());
        t.extend(self.latency_targets());
        t.extend(self.scaling_targets());
        let off = self
            .overhead(WorkloadKind::Https, Config::TlsOff)
            .throughput_ratio;
        t.push(Target {
            name: format!(
                "HTTPS keep-alive with the tls feature disabled >= {:.0}% of none (wrk, median req/s)",
                TARGET_TLS_OFF_RATIO * 100.0
            ),
            measured: fmt_pct(off),
            verdict: judge_ratio(off, TARGET_TLS_OFF_RATIO),
        });
        t
    }

    /// What the RED metrics cost on HTTP keep-alive: the agent's CPU per
    /// request (all its threads, median µs) with every feature on, with the
    /// `metrics` feature disabled, and the difference; None unless both ran.
    pub fn metrics_cost(&self) -> Option<(Option<f64>, Option<f64>, Option<f64>)> {
        let w = WorkloadKind::Http;
        let (on, off) = (
            self.agg(w, Config::Periscope),
            self.agg(w, Config::MetricsOff),
        );
        if on.runs == 0 || off.runs == 0 {
            return None;
        }
        let diff = on.agent_cpu_1k.zip(off.agent_cpu_1k).map(|(a, b)| a - b);
        Some((diff, on.agent_cpu_1k, off.agent_cpu_1k))
    }

    fn metrics_cost_markdown(&self) -> String {
        let Some((diff, on, off)) = self.metrics_cost() else {
            return String::new();
        };
        format!(
            "RED metrics cost ({}, agent CPU, all its threads, median): {} µs/request (Periscope {} µs vs metrics \
             disabled {} µs).\n\n",
            WorkloadKind::Http.short(),
            fmt_f(diff, 2),
            fmt_f(on, 2),
            fmt_f(off, 2)
        )
    }

    /// HTTP keep-alive against none, HTTPS keep-alive against the floor.
    fn throughput_targets(&self) -> Vec<Target> {
        let http = self
            .overhead(WorkloadKind::Http, Config::Periscope)
            .throughput_ratio;
        let https_name = format!(
            "HTTPS keep-alive throughput with Periscope >= {:.0}% of the floor's (wrk, TLS 1.3, median req/s)",
            TARGET_HTTPS_RATIO * 100.0
        );
        let https = if self.floor_measured {
            let w = WorkloadKind::Https;
            let r = ratio(
                self.agg(w, Config::Periscope).rps,
                self.agg(w, Config::Floor).rps,
            );
            Target {
                name: https_name,
                measured: fmt_pct(r),
                verdict: judge_ratio(r, TARGET_HTTPS_RATIO),
            }
        } else {
            floor_unmeasured(https_name)
        };
        vec![
            Target {
                name: format!(
                    "HTTP/1.1 keep-alive throughput with Periscope >= {:.0}% of none (wrk, median req/s)",
                    TARGET_HTTP_RATIO * 100.0
                ),
                measured: fmt_pct(http),
                verdict: judge_ratio(http, TARGET_HTTP_RATIO),
            },
            https,
        ]
    }

    /// Agent CPU per HTTP keep-alive request, at 1k req/s and idle.
    fn cpu_targets(&self) -> Vec<Target> {
        let a = self.agg(WorkloadKind::Http, Config::Periscope);
        let s1 = self.scale_agg(Some(CPU_TARGET_RATE));
        let idle = self.idle_cpu_per_s();
        vec![
            Target {
                name: format!(
                    "agent CPU <= {TARGET_AGENT_US_PER_REQUEST:.0} µs per HTTP/1.1 keep-alive request (all its threads, median)"
                ),
                measured: format!(
                    "{} µs (kernel programs: another {} µs, charged to nginx and wrk)",
                    fmt_f(a.agent_cpu_1k, 2),
                    fmt_f(a.split.kernel, 2)
                ),
                verdict: judge_max(a.agent_cpu_1k, TARGET_AGENT_US_PER_REQUEST, true),
            },
            Target {
                name: format!(
                    "agent CPU <= {TARGET_CPU_MS_PER_S:.0} ms per second at {}k req/s (scaling, hey)",
                    CPU_TARGET_RATE / 1000
                ),
                measured: format!(
                    "{} ms/s at {} req/s achieved",
                    fmt_f(s1.agent_cpu_per_s, 1),
                    fmt_f(s1.rps, 0)
                ),
                verdict: judge_max(
                    s1.agent_cpu_per_s,
                    TARGET_CPU_MS_PER_S,
                    reached(&s1, CPU_TARGET_RATE),
                ),
            },
            Target {
                name: format!(
                    "agent CPU <= {TARGET_IDLE_MS_PER_S:.0} ms per second idle (agent running, no load, {} s)",
                    super::IDLE_SECS
                ),
                measured: format!("{} ms/s", fmt_f(idle, 2)),
                verdict: judge_max(idle, TARGET_IDLE_MS_PER_S, true),
            },
        ]
    }

    /// Agent CPU per request (all its threads), `a`'s over `b`'s in this
    /// run (HTTP/2 over HTTP/1.1, Go over nginx).
    pub fn agent_cpu_ratio(&self, a: WorkloadKind, b: WorkloadKind) -> Option<f64> {
        ratio(
            self.agg(a, Config::Periscope).agent_cpu_1k,
            self.agg(b, Config::Periscope).agent_cpu_1k,
        )
    }

    /// HTTP/2's agent CPU per request against HTTP/1.1's, for each pair of
    /// H2_PAIRS: missed if any pair is over, met if every pair was measured.
    fn h2_cpu_target(&self) -> Target {
        let mut measured = Vec::new();
        let mut verdicts = Vec::new();
        for (h2, h1) in H2_PAIRS {
            let r = self.agent_cpu_ratio(h2, h1);
            measured.push(format!(
                "{} {} µs / {} {} µs = {}",
                h2.short(),
                fmt_f(self.agg(h2, Config::Periscope).agent_cpu_1k, 2),
                h1.short(),
                fmt_f(self.agg(h1, Config::Periscope).agent_cpu_1k, 2),
                fmt_x(r)
            ));
            verdicts.push(judge_max(r, TARGET_H2_FACTOR, true));
        }
        let verdict = if verdicts.contains(&Verdict::Missed) {
            Verdict::Missed
        } else if verdicts.iter().all(|v| *v == Verdict::Met) {
            Verdict::Met
        } else {
            Verdict::Unknown
        };
        Target {
            name: format!(
                "HTTP/2 agent CPU per request <= {TARGET_H2_FACTOR}x HTTP/1's (all its threads, median µs per request, \
                 same run: h2c against HTTP/1.1 keep-alive, h2 over TLS against HTTPS keep-alive)"
            ),
            measured: measured.join("; "),
            verdict,
        }
    }

    /// Periscope's added latency against the floor's, and against OTel's on
    /// the Python service.
    fn latency_targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        for w in WORKLOADS {
            let name = format!(
                "{}: Periscope's added latency per request (p50) <= {TARGET_FLOOR_FACTOR:.0}x the floor's",
                w.short()
            );
            if !self.floor_measured {
                t.push(floor_unmeasured(name));
                continue;
            }
            let p = self.overhead(w, Config::Periscope).added_p50_us;
            let f = self.overhead(w, Config::Floor).added_p50_us;
            t.push(Target {
                name,
                measured: format!("Periscope {}, floor {}", fmt_added_us(p), fmt_added_us(f)),
                verdict: judge_at_most(p, f, TARGET_FLOOR_FACTOR),
            });
        }
        let p = self.overhead(WorkloadKind::Python, Config::Periscope);
        let o = self.overhead(WorkloadKind::Python, Config::Otel);
        t.push(Target {
            name: format!(
                "Flask/gunicorn: Periscope's added latency per request (p50) <= {:.0}% of OTel auto-instrumentation's",
                TARGET_OTEL_FRACTION * 100.0
            ),
            measured: format!(
                "Periscope {}, OTel {} ({} of OTel's)",
                fmt_added_us(p.added_p50_us),
                fmt_added_us(o.added_p50_us),
                fmt_pct(ratio(p.added_p50_us, o.added_p50_us))
            ),
            verdict: judge_at_most(p.added_p50_us, o.added_p50_us, TARGET_OTEL_FRACTION),
        });
        t.push(Target {
            name: format!(
                "Flask/gunicorn: Periscope's throughput loss <= {:.0}% of OTel auto-instrumentation's",
                TARGET_OTEL_FRACTION * 100.0
            ),
            measured: format!(
                "Periscope {}, OTel {} ({} of OTel's)",
                fmt_pct(p.throughput_loss()),
                fmt_pct(o.throughput_loss()),
                fmt_pct(ratio(p.throughput_loss(), o.throughput_loss()))
            ),
            verdict: judge_at_most(p.throughput_loss(), o.throughput_loss(), TARGET_OTEL_FRACTION),
        });
        t
    }

    /// RSS, spans dropped and events lost at the scaling rates.
    fn scaling_targets(&self) -> Vec<Target> {
        let s20 = self.scale_agg(Some(RSS_TARGET_RATE));
        let reached20 = reached(&s20, RSS_TARGET_RATE);
        let worst = self
            .samples
            .iter()
            .filter_map(|s| s.agent.as_ref())
            .chain(self.scaling.iter().map(|s| &s.agent))
            .chain(self.idle.iter().map(|s| &s.agent))
            .map(|a| a.peak_rss_kib as f64 / 1024.0)
            .reduce(f64::max);
        let worst_startup = self
            .samples
            .iter()
            .filter_map(|s| s.agent.as_ref())
            .chain(self.scaling.iter().map(|s| &s.agent))
            .map(|a| a.startup_peak_rss_kib as f64 / 1024.0)
            .reduce(f64::max);
        let s5 = self.scale_agg(Some(LOSSLESS_RATE));
        vec![
            Target {
                name: format!(
                    "agent peak RSS < {TARGET_RSS_MIB:.0} MiB at {}k req/s (scaling, VmHWM)",
                    RSS_TARGET_RATE / 1000
                ),
                measured: match s20.peak_rss_mib {
                    Some(m) => format!("{m:.1} MiB at {} req/s achieved", fmt_f(s20.rps, 0)),
                    None => "n/a".into(),
                },
                verdict: judge_max(
                    s20.peak_rss_mib.filter(|m| *m > 0.0),
                    RSS_MAX_MIB,
                    reached20,
                ),
            },
            Target {
                name: format!(
                    "no spans dropped at {}k req/s (scaling, hey, all rounds)",
                    RSS_TARGET_RATE / 1000
                ),
                measured: count_at(s20.dropped, "dropped", &s20),
                verdict: judge_max(s20.dropped.map(|d| d as f64), 0.0, reached20),
            },
            Target {
                name: format!(
                    "agent peak RSS < {TARGET_RSS_MIB:.0} MiB in every run (VmHWM after start-up, worst run)"
                ),
                measured: worst.map_or("n/a".into(), |m| {
                    format!(
                        "{m:.1} MiB (start-up peak, kernel BTF parsed: {})",
                        fmt_f(worst_startup, 1) + " MiB"
                    )
                }),
                verdict: judge_max(worst.filter(|m| *m > 0.0), RSS_MAX_MIB, true),
            },
            Target {
                name: format!(
                    "zero events lost at {}k req/s (scaling, hey, all rounds)",
                    LOSSLESS_RATE / 1000
                ),
                measured: count_at(s5.lost, "lost", &s5),
                verdict: judge_max(s5.lost.map(|l| l as f64), 0.0, reached(&s5, LOSSLESS_RATE)),
            },
        ]
    }

    /// Median agent CPU per second with no load.
    pub fn idle_cpu_per_s(&self) -> Option<f64> {
        median(self.idle.iter().filter_map(|s| s.agent_cpu_per_s()))
    }

    /// What the bench prints when it ends: the title, the targets, the
    /// results and the comparisons (summary.md has everything).
    pub fn summary(&self) -> String {
        let mut m = self.title();
        m.push_str(&self.bench_sections());
        m.push_str(&self.profile_markdown());
        m
    }

    /// Whether the rounds ran (not with `--profile` alone).
    fn bench_ran(&self) -> bool {
        !self.samples.is_empty() || !self.scaling.is_empty()
    }

    /// The targets, the results and the comparisons: what both the printed
    /// summary and summary.md give first.
    fn bench_sections(&self) -> String {
        if !self.bench_ran() {
            return String::new();
        }
        let mut m = self.targets_markdown();
        m.push_str(&self.metrics_cost_markdown());
        m.push_str(&self.protocols_markdown());
        m.push_str(&self.results_markdown());
        m.push_str(&self.cpu_split_markdown());
        m.push_str(&self.floor_markdown());
        m.push_str(&self.otel_markdown());
        m.push_str(&self.scaling_markdown());
        m.push_str(&self.notes_markdown());
        m
    }

    pub fn markdown(&self) -> String {
        let mut m = self.title();
        if self.bench_ran() {
            m.push_str(&self.description());
        }
        if let Some(c) = &self.chart {
            m.push_str(&format!(
                "![throughput, added latency and scaling]({c})\n\n"
            ));
        }
        m.push_str(&self.bench_sections());
        m.push_str(&self.profile_markdown());
        if self.bench_ran() {
            m.push_str(&self.tls_call_markdown());
            m.push_str(&self.every_run_markdown());
        }

        m.push_str("## Commands\n\n```\n");
        for (what, c) in &self.commands {
            m.push_str(&format!("# {what}\n{c}\n"));
        }
        m.push_str("```\n");
        if !self.machine.versions.is_empty() {
            m.push_str("\nVersions: ");
            m.push_str(
                &self
                    .machine
                    .versions
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            m.push('\n');
        }
        m
    }

    fn title(&self) -> String {
        let mut m = String::new();
        let mode = if self.quick { "quick" } else { "full" };
        let what = if self.bench_ran() {
            format!(
                "benchmark ({mode}: {} round(s) of {} s runs, HTTP/2 and gRPC {} s, ",
                self.rounds, self.secs, self.h2_secs
            )
        } else {
            "profile (".to_string()
        };
        m.push_str(&format!(
            "# Periscope {what}started {} UTC, took {:.0} s)\n\n",
            self.started,
            self.elapsed.as_secs_f64()
        ));
        if self.build_time.as_secs() > 0 || self.waited.as_secs() > 0 {
            m.push_str(&format!(
                "Of those {:.0} s: {:.0} s building the agent, {:.0} s waiting for other periscope processes on the \
                 machine to exit; the bench itself took {:.0} s.\n\n",
                self.elapsed.as_secs_f64(),
                self.build_time.as_secs_f64(),
                self.waited.as_secs_f64(),
                self.elapsed.saturating_sub(self.build_time + self.waited).as_secs_f64()
            ));
        }
        m
    }

    fn description(&self) -> String {
        format!(
            "Everything on 127.0.0.1: nginx (1 worker, static 42-byte page; HTTP/1.1 keep-alive with nginx's default 1000 \
             requests per connection; HTTPS on a second port with TLS 1.3 and a self-signed RSA-2048 certificate), loaded \
             by wrk (keep-alive) and ab (a new connection per request); a Flask app under gunicorn ({} sync workers, a \
             fresh start per run) loaded by wrk; a Go HTTPS server (the end-to-end tests' `tests/go/httpsgo`: net/http and \
             crypto/tls only, built stripped with go1.27, same certificate, a 14-byte `/hello`, up for the whole bench) \
             loaded by wrk over TLS as nginx is. The agent exports OTLP/gRPC to Rotel (blackhole exporter), which runs for \
             the whole bench. Configurations: `none` (no agent), `Periscope` (every feature on), `floor` (`periscope run \
             --noop-probes`: the same kernel programs attached, each returning at once), `Periscope, tls disabled` \
             (HTTPS keep-alive only), `Periscope, metrics disabled` (HTTP keep-alive only: the RED metrics off), and \
             for the Python service `OTel` (gunicorn under `opentelemetry-instrument` with the \
             Flask instrumentation, exporting to the same Rotel). They are interleaved per round (the order rotates each \
             round); figures are medians over rounds, every ratio and difference is against `none` of this run. HTTP/2: \
             h2load ({} connections x {} streams in flight, {} s per run, no warm-up: every request counts, as with wrk) \
             against the same nginx on two more listeners, `http2` over cleartext (h2c, prior knowledge) and `ssl http2` \
             over TLS 1.3 (h2 by ALPN), both with `keepalive_requests` lifted (h2load does not reconnect when nginx closes \
             a connection after its default 1000 requests, which the HTTP/1.1 listeners keep); gRPC: h2load sending unary \
             calls (`content-type: application/grpc`, `te: trailers`, one length-prefixed 17-byte message; {} connections \
             x {} calls in flight) over h2c to a server on Debian's python3-grpcio (generic handler echoing the message, \
             {} worker threads, up for the whole bench); gRPC, Go: the same calls (one length-prefixed {}-byte message, \
             answered with `hello` and the message) over TLS 1.3 (h2 by ALPN) to the end-to-end tests' grpc-go server \
             (`tests/go/grpcgo`: Debian's grpc-go 1.33 sources, a hand-written service and a bytes codec, built stripped \
             with Debian's go1.19 in GOPATH mode, same certificate, up for the whole bench, checked first with one call from \
             its own grpc-go client); a call that brings no message back (a gRPC error: a 200 with the status in the \
             trailers) counts as failed. p50/p99 of h2load come from its per-request log. {} CPU(s), nothing pinned: the \
             servers, the load generators, the agent and Rotel share them. Kernel {}, load average at start {}.\n\n",
            super::GUNICORN_WORKERS,
            super::H2_CONNECTIONS,
            super::H2_STREAMS,
            self.h2_secs,
            super::GRPC_CONNECTIONS,
            super::GRPC_STREAMS,
            super::env::GRPC_SERVER_THREADS,
            super::env::GRPCGO_MESSAGE.len() - 5,
            self.machine.nproc,
            self.machine.kernel,
            self.machine.loadavg
        )
    }

    fn targets_markdown(&self) -> String {
        let mut m = String::from("## Targets\n\n| target | measured | met |\n|---|---|---|\n");
        let targets = self.targets();
        for t in &targets {
            m.push_str(&format!(
                "| {} | {} | {} |\n",
                t.name,
                t.measured,
                t.verdict.word()
            ));
        }
        let missed: Vec<&Target> = targets
            .iter()
            .filter(|t| t.verdict != Verdict::Met)
            .collect();
        if missed.is_empty() {
            m.push_str("\nAll targets met.\n\n");
        } else {
            m.push('\n');
            for t in missed {
                let what = if t.verdict == Verdict::Missed {
                    "MISSED"
                } else {
                    "NOT ESTABLISHED"
                };
                m.push_str(&format!(
                    "- Target {what}: {} (measured: {}).\n",
                    t.name, t.measured
                ));
            }
            m.push('\n');
        }
        m
    }

    /// HTTP/1.1 (nginx and Go over TLS), HTTP/2 and gRPC keep-alive side
    /// by side: throughput against none and the floor, the agent's CPU per
    /// request by part and the spans per request. Shown when a workload
    /// besides nginx's HTTP/1.1 ones was measured.
    fn protocols_markdown(&self) -> String {
        let rows = [
            WorkloadKind::Http,
            WorkloadKind::Https,
            WorkloadKind::GoHttps,
            WorkloadKind::H2c,
            WorkloadKind::H2Tls,
            WorkloadKind::Grpc,
            WorkloadKind::GrpcGo,
        ];
        if !rows.iter().any(|w| {
            !matches!(w, WorkloadKind::Http | WorkloadKind::Https)
                && self.measured(*w, Config::None)
        }) {
            return String::new();
        }
        let mut m = String::from(
            "## HTTP/2, gRPC and Go HTTPS next to HTTP/1.1 (keep-alive, medians over rounds)\n\n\
             | workload | req/s none | Periscope | floor | Periscope / floor | added p50: Periscope / floor \
             | agent CPU µs / req | event loop | export | kernel programs | spans exported / req | request spans / req \
             | events lost |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for w in rows {
            let (none, p, f) = (
                self.agg(w, Config::None),
                self.agg(w, Config::Periscope),
                self.agg(w, Config::Floor),
            );
            if none.runs == 0 && p.runs == 0 {
                continue;
            }
            let (po, fo) = (
                self.overhead(w, Config::Periscope),
                self.overhead(w, Config::Floor),
            );
            let with_pct = |a: &Agg, o: &Overhead| {
                if a.runs == 0 {
                    "-".to_string()
                } else {
                    format!("{} ({})", fmt_f(a.rps, 0), fmt_pct(o.throughput_ratio))
                }
            };
            let per_req = |n: Option<u64>| match n {
                Some(n) if p.requests > 0 => format!("{:.3}", n as f64 / p.requests as f64),
                _ => "n/a".into(),
            };
            m.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |\n",
                w.short(),
                fmt_f(none.rps, 0),
                with_pct(&p, &po),
                with_pct(&f, &fo),
                fmt_pct(ratio(p.rps, f.rps)),
                fmt_added_us(po.added_p50_us),
                fmt_added_us(fo.added_p50_us),
                fmt_f(p.agent_cpu_1k, 2),
                fmt_f(p.split.event_loop, 2),
                fmt_f(p.split.export, 2),
                fmt_f(p.split.kernel, 2),
                per_req(p.exported),
                per_req(p.request_spans),
                p.lost.map_or("n/a".into(), |l| l.to_string()),
            ));
        }
        let pairs: Vec<String> = H2_PAIRS
            .iter()
            .map(|(h2, h1)| {
                format!(
                    "{} / {}: {}",
                    h2.short(),
                    h1.short(),
                    fmt_x(self.agent_cpu_ratio(*h2, *h1))
                )
            })
            .collect();
        let (go, nginx) = GO_PAIR;
        let (grpc_go, h2_tls) = GRPC_GO_PAIR;
        m.push_str(&format!(
            "\nPeriscope and floor: req/s (% of none). Agent CPU per request, HTTP/2 over HTTP/1.1: {}; Go's crypto/tls \
             server over nginx's OpenSSL one (the same wrk load over TLS 1.3), {} / {}: {}; the grpc-go server (grpc-go \
             and crypto/tls uprobes) over nginx's HTTP/2 one (the same h2load over TLS 1.3), {} / {}: {}. Agent CPU µs / \
             req is all the agent's threads (event loop + export + other); kernel programs run in the traced processes, on \
             top. Spans per request should be {} (the server's and the load generator's); fewer means requests it did not \
             see as requests.\n\n",
            pairs.join(", "),
            go.short(),
            nginx.short(),
            fmt_x(self.agent_cpu_ratio(go, nginx)),
            grpc_go.short(),
            h2_tls.short(),
            fmt_x(self.agent_cpu_ratio(grpc_go, h2_tls)),
            WorkloadKind::H2c.spans_per_request(),
        ));
        m
    }

    fn results_markdown(&self) -> String {
        let mut m = String::from("## Results (medians over rounds)\n\n");
        m.push_str(
            "| workload | config | req/s | vs none | p50 | p99 | added p50 | added p99 | CPU ms / 1k req | added CPU ms / 1k req \
             | agent CPU µs / req | agent peak RSS MiB | events lost | spans exported per request | spans dropped |\n",
        );
        m.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for w in WORKLOADS {
            for c in w.configs() {
                let a = self.agg(w, *c);
                if a.runs == 0 {
                    continue;
                }
                let o = self.overhead(w, *c);
                let is_none = *c == Config::None;
                let per_req = |n: u64| {
                    if a.requests > 0 {
                        format!("{:.3}", n as f64 / a.requests as f64)
                    } else {
                        "n/a".into()
                    }
                };
                let spans = match (*c, a.exported, a.rotel_spans) {
                    (Config::Otel, _, Some(r)) => per_req(r),
                    (c, Some(e), _) if c.is_agent() => per_req(e),
                    (c, _, _) if c.is_agent() || c == Config::Otel => "n/a".into(),
                    _ => "-".into(),
                };
                let dropped = match a.dropped {
                    Some(d) if c.is_agent() => d.to_string(),
                    _ if c.is_agent() => "n/a".into(),
                    _ => "-".into(),
                };
                let dash = |s: String| if is_none { "-".to_string() } else { s };
                let agent = |s: String| if c.is_agent() { s } else { "-".to_string() };
                m.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    w.label(),
                    c.label(),
                    fmt_f(a.rps, 0),
                    if is_none { "100%".into() } else { fmt_pct(o.throughput_ratio) },
                    fmt_us(a.p50),
                    fmt_us(a.p99),
                    dash(fmt_added_us(o.added_p50_us)),
                    dash(fmt_added_us(o.added_p99_us)),
                    fmt_f(a.total_cpu_1k, 1),
                    dash(o.added_cpu_1k.map_or("n/a".into(), |v| format!("{v:+.1}"))),
                    agent(fmt_f(a.agent_cpu_1k, 2)),
                    agent(fmt_f(a.peak_rss_mib, 1)),
                    agent(a.lost.map_or("n/a".into(), |l| l.to_string())),
                    spans,
                    dropped,
                ));
            }
        }
        m.push_str(
            "\nrequests = responses the load generator received. Spans exported per request: Periscope's include its \
             phase spans (see Span accounting below); OTel's are those Rotel received (one per request, gunicorn's server \
             span). CPU ms / 1k req = server (nginx workers; gunicorn master and workers, the OTel SDK's export thread \
             included; the Go servers) + load generator + agent, user + system time; the kernel programs' own cost is \
             charged to the traced processes. Agent CPU counts from `periscope ready` + 1 s to when its CPU use settled \
             after the load.\n\n",
        );
        m.push_str(&self.accounting_markdown());
        m
    }

    fn accounting_markdown(&self) -> String {
        let mut m = String::from(
            "### Span accounting (sums over rounds)\n\n| workload | config | requests | request spans (SERVER + CLIENT) | per request \
             | spans built | per request | exported | dropped | Rotel received | events lost |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for w in WORKLOADS {
            for c in w.configs() {
                let a = self.agg(w, *c);
                if a.runs == 0 || !(c.is_agent() || *c == Config::Otel) {
                    continue;
                }
                let per_req = |n: Option<u64>| match n {
                    Some(n) if a.requests > 0 => format!("{:.3}", n as f64 / a.requests as f64),
                    _ => "n/a".into(),
                };
                let n = |v: Option<u64>| v.map_or("n/a".into(), |v| v.to_string());
                let agent = |s: String| if c.is_agent() { s } else { "-".to_string() };
                m.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    w.short(),
                    c.label(),
                    a.requests,
                    agent(n(a.request_spans)),
                    agent(per_req(a.request_spans)),
                    agent(n(a.built)),
                    agent(per_req(a.built)),
                    agent(n(a.exported)),
                    agent(n(a.dropped)),
                    n(a.rotel_spans),
                    agent(n(a.lost)),
                ));
            }
        }
        m.push_str(&format!(
            "\nEvery request should give {} request spans with Periscope (the server's SERVER span and the load generator's \
             CLIENT span: both sides are traced), a few more for requests in flight when the load generator stopped; \
             phase spans (INTERNAL: connect, request.send, handler, ...) come on top; `metrics disabled` builds the \
             same. The floor and `tls disabled` (on HTTPS) build none. \"Rotel received\" counts the spans the \
             receiver logged between the start of the run and \
             the end of the agent's (or gunicorn's) flush; OTel's exclude the {} warm-up requests it also traced. Spans \
             dropped are counted by the agent (export queue full), never silent.\n\n",
            WorkloadKind::Http.spans_per_request(),
            super::PY_WARMUP_REQUESTS,
        ));
        m
    }

    fn cpu_split_markdown(&self) -> String {
        let mut m = String::from(
            "## CPU per request by part (µs per request, medians over rounds)\n\n| workload | config | kernel programs \
             | program runs / req | agent event loop | agent export | agent other | agent total | receiver (Rotel) \
             | other agent threads |\n|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for w in WORKLOADS {
            for c in w.configs() {
                let a = self.agg(w, *c);
                if a.runs == 0 || *c == Config::None {
                    continue;
                }
                let agent = |v: Option<f64>, decimals: usize| {
                    if c.is_agent() {
                        fmt_f(v, decimals)
                    } else {
                        "-".into()
                    }
                };
                let s = &a.split;
                m.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    w.short(),
                    c.label(),
                    agent(s.kernel, 2),
                    agent(s.prog_runs, 1),
                    agent(s.event_loop, 2),
                    agent(s.export, 2),
                    agent(s.other, 2),
                    agent(a.agent_cpu_1k, 2),
                    fmt_f(a.rotel_cpu_1k, 2),
                    if c.is_agent() {
                        s.other_threads.join(", ")
                    } else {
                        "-".into()
                    },
                ));
            }
        }
        m.push_str(
            "\nKernel programs: the BPF programs' own run time (`run_time_ns` and `run_cnt` of the agent's program fds in \
             /proc/PID/fdinfo, counted while `kernel.bpf_stats_enabled` is 1, which the bench sets for its duration and \
             restores after). The kernel charges it to the traced processes (nginx, the Go servers, wrk, ab, h2load, gunicorn: \
             their CPU above), not to the agent, so it is not part of agent total. For uprobes it counts the BPF program only, not the \
             trap into the kernel and back (nor the uretprobe trampoline), which the traced process pays on top: see the \
             TLS call cost. Counting adds two clock reads to every program run, in every configuration with programs. \
             Agent event loop: its main thread; agent export: the `periscope-io` threads (tokio workers: OTLP export, \
             control socket, metrics); agent other: the rest, threads that ended within the window included (`(ended)`). \
             The agent parts are utime + stime from /proc/PID/task/*/stat over the same window as agent total (from \
             `periscope ready` + 1 s until its CPU use settled after the load), in 10 ms clock ticks. Receiver: Rotel's \
             CPU over the run, the agent's final flush included.\n\n",
        );
        if !self.bpf_stats {
            m.push_str(
                "BPF stats could not be enabled on this machine: the kernel programs' run time was not measured.\n\n",
            );
        }
        m
    }

    fn profile_markdown(&self) -> String {
        match &self.profile {
            None => String::new(),
            Some(Ok(p)) => p.markdown(),
            Some(Err(e)) => format!("## Profile\n\nNo profile: {e}\n\n"),
        }
    }

    fn floor_markdown(&self) -> String {
        let mut m =
            String::from("## Periscope against the floor (the same probes doing nothing)\n\n");
        if !self.floor_measured {
            m.push_str("Not measured: the agent binary does not take `run --noop-probes`.\n\n");
            return m;
        }
        m.push_str(
            "| workload | throughput: Periscope | floor | added p50: Periscope | floor | Periscope / floor | added CPU ms / 1k req: Periscope | floor | Periscope / floor |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for w in WORKLOADS {
            let p = self.overhead(w, Config::Periscope);
            let f = self.overhead(w, Config::Floor);
            m.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                w.short(),
                fmt_pct(p.throughput_ratio),
                fmt_pct(f.throughput_ratio),
                fmt_added_us(p.added_p50_us),
                fmt_added_us(f.added_p50_us),
                fmt_x(ratio(p.added_p50_us, f.added_p50_us)),
                p.added_cpu_1k.map_or("n/a".into(), |v| format!("{v:+.1}")),
                f.added_cpu_1k.map_or("n/a".into(), |v| format!("{v:+.1}")),
                fmt_x(ratio(p.added_cpu_1k, f.added_cpu_1k)),
            ));
        }
        m.push_str(
            "\nThe floor is what any agent using these hooks pays (the traps and the programs' entry) before doing \
             any work; Periscope / floor says how much its own work adds on top. A ratio is n/a when the floor added \
             nothing measurable.\n\n",
        );
        m
    }

    fn otel_markdown(&self) -> String {
        let mut m = String::from(
            "## Periscope against the OpenTelemetry Python auto-instrumentation (Flask/gunicorn)\n\n",
        );
        let w = WorkloadKind::Python;
        if !self.measured(w, Config::Otel) {
            m.push_str("Not measured.\n\n");
            return m;
        }
        let p = self.overhead(w, Config::Periscope);
        let o = self.overhead(w, Config::Otel);
        let (pa, oa) = (self.agg(w, Config::Periscope), self.agg(w, Config::Otel));
        m.push_str("| overhead | Periscope | OTel auto-instrumentation | Periscope / OTel |\n|---|---|---|---|\n");
        m.push_str(&format!(
            "| throughput loss | {} | {} | {} |\n",
            fmt_pct(p.throughput_loss()),
            fmt_pct(o.throughput_loss()),
            fmt_pct(ratio(p.throughput_loss(), o.throughput_loss()))
        ));
        m.push_str(&format!(
            "| added latency per request (p50) | {} | {} | {} |\n",
            fmt_added_us(p.added_p50_us),
            fmt_added_us(o.added_p50_us),
            fmt_pct(ratio(p.added_p50_us, o.added_p50_us))
        ));
        m.push_str(&format!(
            "| added latency (p99) | {} | {} | {} |\n",
            fmt_added_us(p.added_p99_us),
            fmt_added_us(o.added_p99_us),
            fmt_pct(ratio(p.added_p99_us, o.added_p99_us))
        ));
        m.push_str(&format!(
            "| added CPU ms / 1k req (server + client + agent) | {} | {} | {} |\n",
            p.added_cpu_1k.map_or("n/a".into(), |v| format!("{v:+.1}")),
            o.added_cpu_1k.map_or("n/a".into(), |v| format!("{v:+.1}")),
            fmt_pct(ratio(p.added_cpu_1k, o.added_cpu_1k))
        ));
        let spans = |n: Option<u64>, reqs: u64| match n {
            Some(n) if reqs > 0 => format!("{:.3}", n as f64 / reqs as f64),
            _ => "n/a".into(),
        };
        m.push_str(&format!(
            "| spans received by Rotel per request | {} | {} | |\n\n",
            spans(pa.rotel_spans, pa.requests),
            spans(oa.rotel_spans, oa.requests)
        ));
        m.push_str(
            "Periscope's spans cover gunicorn (server) and wrk (client) without touching either; the OTel \
             instrumentation gives gunicorn's server span from inside the process. Periscope's CPU is in its own \
             process (agent CPU), OTel's in the workers.\n\n",
        );
        m
    }

    fn scaling_markdown(&self) -> String {
        let mut m = String::from(
            "## Scaling (nginx HTTP keep-alive, hey at fixed rates, with Periscope)\n\n",
        );
        if self.scaling.is_empty() {
            m.push_str("Not measured.\n\n");
            return m;
        }
        m.push_str(
            "| asked | achieved req/s | requests | agent CPU ms / s | agent CPU ms / 1k req | agent peak RSS MiB | events lost | request spans per request | spans exported / requests | spans dropped | Rotel received | failed |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        m.push_str(&self.idle_row());
        for (rate, workers) in SCALING {
            let a = self.scale_agg(rate);
            if a.runs == 0 {
                continue;
            }
            let per_req = |n: u64| {
                if a.requests > 0 {
                    format!("{:.3}", n as f64 / a.requests as f64)
                } else {
                    "n/a".into()
                }
            };
            m.push_str(&format!(
                "| {} (hey -c {workers}) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                ScalingSample::rate_label(rate),
                fmt_f(a.rps, 0),
                a.requests,
                fmt_f(a.agent_cpu_per_s, 1),
                fmt_f(a.agent_cpu_1k, 2),
                fmt_f(a.peak_rss_mib, 1),
                a.lost.map_or("n/a".into(), |l| l.to_string()),
                a.request_spans.map_or("n/a".into(), per_req),
                a.exported.map_or("n/a".into(), |e| format!("{e} / {} ({})", a.requests, per_req(e))),
                a.dropped.map_or("n/a".into(), |d| d.to_string()),
                a.rotel_spans.map_or("n/a".into(), |r| r.to_string()),
                a.errors,
            ));
        }
        let (lost, dropped) = self.drops_start();
        let at = |r: Option<Option<u32>>| match r {
            None => "none up to the highest rate measured".to_string(),
            Some(rate) => format!("from {}", ScalingSample::rate_label(rate)),
        };
        m.push_str(&format!(
            "\nEvents lost in the kernel (ring buffer full): {}. Spans dropped by the exporter (queue full): {}. \
             agent CPU ms / s is CPU time per second of load (1000 = one core); idle: per second of the window from \
             `periscope ready` + 1 s, with nothing loaded. hey's latency has 0.1 ms resolution and is not reported here.\n\n",
            at(lost),
            at(dropped)
        ));
        m
    }

    /// The scaling table's row for the agent with no load.
    fn idle_row(&self) -> String {
        if self.idle.is_empty() {
            return String::new();
        }
        let agents: Vec<&AgentRun> = self.idle.iter().map(|s| &s.agent).collect();
        let n = |v: Option<u64>| v.map_or("n/a".into(), |v| v.to_string());
        format!(
            "| idle, no load ({} s) | - | 0 | {} | - | {} | {} | - | {} | {} | - | - |\n",
            super::IDLE_SECS,
            fmt_f(self.idle_cpu_per_s(), 2),
            fmt_f(max_rss_mib(&agents), 1),
            n(sum_stops(&agents, |s| s.lost)),
            n(sum_stops(&agents, |s| s.exported)),
            n(sum_stops(&agents, |s| s.dropped)),
        )
    }

    fn notes_markdown(&self) -> String {
        let mut notes = Vec::new();
        if !self.floor_measured {
            notes.push(
                "The agent does not take `run --noop-probes`: the floor configuration was not measured.".to_string(),
            );
        }
        let agent_runs = self
            .samples
            .iter()
            .filter_map(|s| s.agent.as_ref())
            .chain(self.scaling.iter().map(|s| &s.agent));
        if agent_runs
            .filter_map(|a| a.stop.as_ref())
            .any(|st| st.request_spans.is_none())
        {
            notes.push(
                "The agent's `stopped:` line does not count request spans (SERVER + CLIENT) apart from phase spans: spans \
                 per request are given, but they cannot show that every request was traced."
                    .to_string(),
            );
        }
        for w in WORKLOADS {
            for c in CONFIGS {
                let a = self.agg(w, c);
                if a.runs == 0 {
                    continue;
                }
                if a.errors > 0 || a.non_2xx > 0 {
                    notes.push(format!(
                        "{} {}: {} socket errors / failed requests, {} non-2xx/3xx responses",
                        w.label(),
                        c.label(),
                        a.errors,
                        a.non_2xx
                    ));
                }
                if c.is_agent() {
                    if let Some(d) = a.dropped.filter(|d| *d > 0) {
                        notes.push(format!(
                            "{} {}: the exporter dropped {d} spans",
                            w.label(),
                            c.label()
                        ));
                    }
                    if let Some(l) = a.lost.filter(|l| *l > 0) {
                        notes.push(format!(
                            "{} {}: {l} events lost in the kernel",
                            w.label(),
                            c.label()
                        ));
                    }
                    let builds = matches!(c, Config::Periscope | Config::MetricsOff);
                    let want = if builds {
                        w.spans_per_request() * a.requests
                    } else {
                        0
                    };
                    if let Some(r) = a.request_spans
                        && c != Config::TlsOff
                        && (r < want || r > want + want / 100 + 100)
                    {
                        notes.push(format!(
                            "{} {}: {} requests completed but {r} request spans built ({:.3} per request; expected {})",
                            w.label(),
                            c.label(),
                            a.requests,
                            if a.requests > 0 { r as f64 / a.requests as f64 } else { 0.0 },
                            if builds { w.spans_per_request() } else { 0 },
                        ));
                    }
                    if let (Some(e), Some(r)) = (a.exported, a.rotel_spans)
                        && e != r
                    {
                        notes.push(format!(
                            "{} {}: the agent says it exported {e} spans, Rotel logged {r}",
                            w.label(),
                            c.label()
                        ));
                    }
                    if a.missing_stop > 0 {
                        notes.push(format!(
                            "{} {}: {} run(s) ended without a `stopped:` line (see logs/)",
                            w.label(),
                            c.label(),
                            a.missing_stop
                        ));
                    }
                }
                if c == Config::Otel
                    && let Some(r) = a.rotel_spans
                    && r < a.requests
                {
                    notes.push(format!(
                        "{} OTel: Rotel received {r} spans for {} requests: the OTel SDK did not export every request",
                        w.label(),
                        a.requests
                    ));
                }
            }
        }
        for s in &self.samples {
            let run = format!("round {} {} {}", s.round, s.workload.key(), s.config.key());
            run_notes(&mut notes, &run, s.agent.as_ref(), &s.others);
        }
        for s in &self.scaling {
            let run = format!(
                "round {} scaling {}",
                s.round,
                ScalingSample::rate_label(s.rate)
            );
            run_notes(&mut notes, &run, Some(&s.agent), &s.others);
        }
        for s in &self.idle {
            let run = format!("round {} idle", s.round);
            run_notes(&mut notes, &run, Some(&s.agent), &s.others);
        }
        if notes.is_empty() {
            return String::new();
        }
        let mut m = String::from("## Notes\n\n");
        for n in notes {
            m.push_str(&format!("- {n}\n"));
        }
        m.push('\n');
        m
    }

    /// The proxy from the HTTPS runs: nginx's extra CPU per request with the
    /// agent over its estimated hooked calls per request.
    fn tls_call_proxy(&self) -> TlsProxy {
        let delta_ns = |w: WorkloadKind| -> Option<f64> {
            let b = self.agg(w, Config::None).server_cpu_1k?;
            let a = self.agg(w, Config::Periscope).server_cpu_1k?;
            Some((a - b) * 1e6 / 1000.0)
        };
        let per_req = |w: WorkloadKind| -> Option<f64> {
            let a = self.agg(w, Config::Periscope);
            let e = a.events?;
            (a.requests > 0).then(|| e as f64 / a.requests as f64)
        };
        let https = delta_ns(WorkloadKind::Https);
        let http = delta_ns(WorkloadKind::Http);
        let (ev_https, ev_http) = (per_req(WorkloadKind::Https), per_req(WorkloadKind::Http));
        // On a TLS connection the agent's events are the plaintext of the
        // SSL_read/SSL_write calls that moved data, and nginx and wrk each
        // make half of them. Calls that moved nothing trap too but send no
        // event: the count is low, so the cost per call is, if anything,
        // overstated.
        let calls = ev_https.filter(|e| *e > 0.0).map(|e| e / 2.0);
        let per_call = |d: Option<f64>| match (d, calls) {
            (Some(d), Some(c)) if c > 0.0 => Some(d / c),
            _ => None,
        };
        TlsProxy {
            nginx_extra_ns_https: https,
            nginx_extra_ns_http: http,
            events_per_req_https: ev_https,
            events_per_req_http: ev_http,
            nginx_calls_per_req: calls,
            ns_per_call: per_call(https),
            ns_per_call_net: per_call(https.zip(http).map(|(a, b)| a - b)),
        }
    }

    fn tls_call_markdown(&self) -> String {
        let mut m = String::from("## Uprobe cost per TLS library call\n\n");
        let direct = self.tls_call_ns();
        m.push_str(&format!(
            "- **Measured directly: {} ns of CPU per hooked call** (one uprobe + one uretprobe + the agent's kernel program), \
             median over {} round(s). Method: Debian's Python (`{SYSTEM_PYTHON}`, system libssl) pushes 64-byte records through \
             an in-memory TLS 1.3 pair (`ssl.MemoryBIO`: no socket, no syscalls), `SSL_write_ex` + `SSL_read_ex` per iteration; \
             the loop's CPU time (`time.process_time`) with the agent minus without, over the number of calls. The agent \
             cannot tie these calls to a socket, so it does less with them than with real traffic: this is the cost of the \
             trap and the program's first steps, the floor for any hooked call.\n",
            fmt_f(direct, 0),
            self.tls_calls.len()
        ));
        m.push_str(&format!(
            "- The same with the agent's probes forced onto the exported wrappers (`PERISCOPE_TLS_PROBE_WRAPPERS=1`, the \
             placement before libssl's internal functions were hooked; the kernel single-steps the wrappers' first \
             instruction): {} ns per call.\n",
            fmt_f(median(self.tls_calls.iter().filter_map(|t| t.ns_per_call_wrappers())), 0)
        ));
        let p = self.tls_call_proxy();
        m.push_str(&format!(
            "- Proxy from the HTTPS keep-alive runs: {} ns per call = nginx's extra CPU per HTTPS request with the agent ({} ns) / \
             nginx's estimated hooked calls per request ({}). Calls per request are estimated from the agent's event count: \
             events per HTTPS request ({}) / 2, because each SSL_read/SSL_write that moves data is one event and nginx and wrk \
             each make half of them (events per plain HTTP request, for comparison: {}). Calls that move nothing trap too \
             but send no event, so the calls are undercounted and the cost overstated. nginx's extra CPU also includes the \
             socket tracepoints that plain HTTP pays too ({} ns per plain request); without that part: {} ns per call.\n",
            fmt_f(p.ns_per_call, 0),
            fmt_f(p.nginx_extra_ns_https, 0),
            fmt_f(p.nginx_calls_per_req, 2),
            fmt_f(p.events_per_req_https, 2),
            fmt_f(p.events_per_req_http, 2),
            fmt_f(p.nginx_extra_ns_http, 0),
            fmt_f(p.ns_per_call_net, 0),
        ));
        if !self.tls_calls.is_empty() {
            m.push_str("\n| round | calls | CPU s without agent | CPU s with agent | ns per call | agent events | CPU s, probes on the wrappers | ns per call, probes on the wrappers |\n|---|---|---|---|---|---|---|---|\n");
            for t in &self.tls_calls {
                m.push_str(&format!(
                    "| {} | {} | {:.3} | {:.3} | {} | {} | {} | {} |\n",
                    t.round,
                    t.calls,
                    t.baseline_cpu_s,
                    t.agent_cpu_s,
                    fmt_f(t.ns_per_call(), 0),
                    t.agent_events.map_or("n/a".into(), |e| e.to_string()),
                    fmt_f(t.wrappers_cpu_s, 3),
                    fmt_f(t.ns_per_call_wrappers(), 0),
                ));
            }
            for t in self.tls_calls.iter().filter(|t| !t.others.is_empty()) {
                m.push_str(&format!(
                    "\nRound {}: other periscope process(es) {:?} were running during the TLS call loop: its figures are disturbed.\n",
                    t.round, t.others
                ));
            }
        }
        m.push('\n');
        m
    }

    fn every_run_markdown(&self) -> String {
        let mut m = String::from(
            "## Every run\n\n| round | workload | config | req/s | requests | p50 | p99 | server CPU ms | client CPU ms | agent CPU ms | \
             agent ms / 1k req | peak RSS MiB | drain ms | events | spans exported | lost | Rotel received | Rotel CPU ms |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for s in &self.samples {
            let (cpu, per1k, rss, drain, events, exported, lost) = match &s.agent {
                Some(a) => (
                    format!("{:.0}", a.cpu_ms),
                    fmt_f(s.agent_cpu_per_1k(), 2),
                    format!("{:.1}", a.peak_rss_kib as f64 / 1024.0),
                    a.drain_ms.to_string(),
                    a.stop
                        .as_ref()
                        .map_or("n/a".into(), |x| x.events.to_string()),
                    a.stop
                        .as_ref()
                        .map_or("n/a".into(), |x| x.exported.to_string()),
                    a.stop.as_ref().map_or("n/a".into(), |x| x.lost.to_string()),
                ),
                None => Default::default(),
            };
            m.push_str(&format!(
                "| {} | {} | {} | {:.0} | {} | {} | {} | {:.0} | {:.0} | {cpu} | {per1k} | {rss} | {drain} | {events} | {exported} | {lost} | {} | {:.0} |\n",
                s.round,
                s.workload.key(),
                s.config.key(),
                s.load.rps,
                s.load.requests,
                fmt_us(s.load.p50_us),
                fmt_us(s.load.p99_us),
                s.server_cpu_ms,
                s.client_cpu_ms,
                s.rotel_spans_for_run().map_or("n/a".into(), |r| r.to_string()),
                s.rotel_cpu_ms,
            ));
        }
        for s in &self.scaling {
            let a = &s.agent;
            m.push_str(&format!(
                "| {} | scaling {} | periscope | {:.0} | {} | {} | {} | | | {:.0} | {} | {:.1} | {} | {} | {} | {} | {} | |\n",
                s.round,
                ScalingSample::rate_label(s.rate),
                s.load.rps,
                s.load.requests,
                fmt_us(s.load.p50_us),
                fmt_us(s.load.p99_us),
                a.cpu_ms,
                fmt_f(s.agent_cpu_per_1k(), 2),
                a.peak_rss_kib as f64 / 1024.0,
                a.drain_ms,
                a.stop.as_ref().map_or("n/a".into(), |x| x.events.to_string()),
                a.stop.as_ref().map_or("n/a".into(), |x| x.exported.to_string()),
                a.stop.as_ref().map_or("n/a".into(), |x| x.lost.to_string()),
                s.rotel_spans.map_or("n/a".into(), |r| r.to_string()),
            ));
        }
        m.push('\n');
        m
    }

    fn tls_call_json(&self) -> Value {
        let p = self.tls_call_proxy();
        json!({
            "ns_per_call_direct_median": self.tls_call_ns(),
            "rounds": self.tls_calls.iter().map(|t| json!({
                "round": t.round,
                "calls": t.calls,
                "baseline_cpu_s": t.baseline_cpu_s,
                "agent_cpu_s": t.agent_cpu_s,
                "ns_per_call": t.ns_per_call(),
                "wrappers_cpu_s": t.wrappers_cpu_s,
                "ns_per_call_wrappers": t.ns_per_call_wrappers(),
                "agent_events": t.agent_events,
                "other_periscope_pids": t.others,
            })).collect::<Vec<_>>(),
            "proxy": {
                "nginx_extra_ns_per_https_request": p.nginx_extra_ns_https,
                "nginx_extra_ns_per_http_request": p.nginx_extra_ns_http,
                "agent_events_per_https_request": p.events_per_req_https,
                "agent_events_per_http_request": p.events_per_req_http,
                "nginx_hooked_calls_per_request_estimate": p.nginx_calls_per_req,
                "method": "nginx extra CPU per HTTPS request (periscope - none) / (agent events per HTTPS request / 2)",
                "ns_per_call": p.ns_per_call,
                "ns_per_call_without_the_http_delta": p.ns_per_call_net,
            },
        })
    }

    pub fn json(&self) -> Value {
        let agent_json = |a: &AgentRun, requests: u64| {
            json!({
                "startup_ms": a.startup_ms,
                "cpu_ms": a.cpu_ms,
                "cpu_ms_per_1k_requests": super::per_1k(a.cpu_ms, requests),
                "window_ms": a.window_ms,
                "cpu_split": split_json(&a.split),
                "drain_ms": a.drain_ms,
                "peak_rss_kib": a.peak_rss_kib,
                "startup_peak_rss_kib": a.startup_peak_rss_kib,
                "end_rss_kib": a.end_rss_kib,
                "exit": a.exit,
                "stopped": a.stop.as_ref().map(|st| json!({
                    "events": st.events,
                    "spans_built": st.spans_built,
                    "exported": st.exported,
                    "dropped": st.dropped,
                    "events_lost_in_kernel": st.lost,
                    "request_spans": st.request_spans,
                })),
            })
        };
        let runs: Vec<Value> = self
            .samples
            .iter()
            .map(|s| {
                json!({
                    "round": s.round,
                    "workload": s.workload.key(),
                    "config": s.config.key(),
                    "command": s.command,
                    "requests": s.load.requests,
                    "requests_per_sec": s.load.rps,
                    "latency_p50_us": s.load.p50_us,
                    "latency_p99_us": s.load.p99_us,
                    "errors": s.load.errors,
                    "non_2xx_3xx": s.load.non_2xx,
                    "server_cpu_ms": s.server_cpu_ms,
                    "client_cpu_ms": s.client_cpu_ms,
                    "rotel_cpu_ms": s.rotel_cpu_ms,
                    "total_cpu_ms_per_1k_requests": s.total_cpu_per_1k(),
                    "rotel_spans_received": s.rotel_spans,
                    "warmup_requests_traced": s.warmup_traced,
                    "other_periscope_pids": s.others,
                    "loadavg_before": s.loadavg,
                    "agent": s.agent.as_ref().map(|a| agent_json(a, s.load.requests)),
                    "raw_output": s.raw_output,
                })
            })
            .collect();
        let mut summary = serde_json::Map::new();
        for w in WORKLOADS {
            for c in w.configs() {
                let a = self.agg(w, *c);
                if a.runs == 0 {
                    continue;
                }
                let o = self.overhead(w, *c);
                summary.insert(
                    format!("{}_{}", w.key(), c.key()),
                    json!({
                        "runs": a.runs,
                        "median_requests_per_sec": a.rps,
                        "throughput_ratio": o.throughput_ratio,
                        "median_latency_p50_us": a.p50,
                        "median_latency_p99_us": a.p99,
                        "added_latency_p50_us": o.added_p50_us,
                        "added_latency_p99_us": o.added_p99_us,
                        "requests": a.requests,
                        "errors": a.errors,
                        "non_2xx_3xx": a.non_2xx,
                        "median_server_cpu_ms_per_1k_requests": a.server_cpu_1k,
                        "median_client_cpu_ms_per_1k_requests": a.client_cpu_1k,
                        "median_agent_cpu_ms_per_1k_requests": a.agent_cpu_1k,
                        "median_total_cpu_ms_per_1k_requests": a.total_cpu_1k,
                        "added_cpu_ms_per_1k_requests": o.added_cpu_1k,
                        "median_rotel_cpu_ms_per_1k_requests": a.rotel_cpu_1k,
                        "cpu_us_per_request": {
                            "kernel_programs": a.split.kernel,
                            "kernel_program_runs_per_request": a.split.prog_runs,
                            "agent_event_loop": a.split.event_loop,
                            "agent_export": a.split.export,
                            "agent_other": a.split.other,
                            "agent_other_threads": a.split.other_threads,
                            "agent_total": a.agent_cpu_1k,
                            "receiver": a.rotel_cpu_1k,
                        },
                        "max_agent_peak_rss_mib": a.peak_rss_mib,
                        "events_lost": a.lost,
                        "spans_built": a.built,
                        "spans_exported": a.exported,
                        "spans_dropped": a.dropped,
                        "request_spans": a.request_spans,
                        "rotel_spans_received": a.rotel_spans,
                    }),
                );
            }
            if self.floor_measured {
                let p = self.overhead(w, Config::Periscope);
                let f = self.overhead(w, Config::Floor);
                summary.insert(
                    format!("{}_periscope_over_floor", w.key()),
                    json!({
                        "added_latency_p50": ratio(p.added_p50_us, f.added_p50_us),
                        "added_cpu": ratio(p.added_cpu_1k, f.added_cpu_1k),
                    }),
                );
            }
        }
        summary.insert(
            "http2_over_http1_agent_cpu_per_request".into(),
            H2_PAIRS
                .iter()
                .map(|(h2, h1)| {
                    (
                        format!("{}_over_{}", h2.key(), h1.key()),
                        json!(self.agent_cpu_ratio(*h2, *h1)),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into(),
        );
        for (a, b) in [GO_PAIR, GRPC_GO_PAIR] {
            summary.insert(
                format!("{}_over_{}_agent_cpu_per_request", a.key(), b.key()),
                json!(self.agent_cpu_ratio(a, b)),
            );
        }
        let p = self.overhead(WorkloadKind::Python, Config::Periscope);
        let o = self.overhead(WorkloadKind::Python, Config::Otel);
        summary.insert(
            "python_flask_periscope_over_otel".into(),
            json!({
                "added_latency_p50": ratio(p.added_p50_us, o.added_p50_us),
                "throughput_loss": ratio(p.throughput_loss(), o.throughput_loss()),
                "added_cpu": ratio(p.added_cpu_1k, o.added_cpu_1k),
            }),
        );
        if let Some((diff, on, off)) = self.metrics_cost() {
            summary.insert(
                "http_keepalive_red_metrics_cost".into(),
                json!({
                    "agent_cpu_us_per_request": diff,
                    "periscope_agent_cpu_us_per_request": on,
                    "metrics_off_agent_cpu_us_per_request": off,
                }),
            );
        }
        let scaling: Vec<Value> = SCALING
            .iter()
            .filter_map(|(rate, workers)| {
                let a = self.scale_agg(*rate);
                (a.runs > 0).then(|| {
                    json!({
                        "asked_requests_per_sec": rate,
                        "hey_workers": workers,
                        "runs": a.runs,
                        "median_requests_per_sec": a.rps,
                        "requests": a.requests,
                        "median_agent_cpu_ms_per_s": a.agent_cpu_per_s,
                        "median_agent_cpu_ms_per_1k_requests": a.agent_cpu_1k,
                        "max_agent_peak_rss_mib": a.peak_rss_mib,
                        "events_lost": a.lost,
                        "spans_exported": a.exported,
                        "spans_dropped": a.dropped,
                        "request_spans": a.request_spans,
                        "rotel_spans_received": a.rotel_spans,
                        "failed_or_non_2xx": a.errors,
                    })
                })
            })
            .collect();
        let scaling_runs: Vec<Value> = self
            .scaling
            .iter()
            .map(|s| {
                json!({
                    "round": s.round,
                    "asked_requests_per_sec": s.rate,
                    "hey_workers": s.workers,
                    "secs": s.secs,
                    "command": s.command,
                    "requests": s.load.requests,
                    "requests_per_sec": s.load.rps,
                    "latency_p50_us": s.load.p50_us,
                    "latency_p99_us": s.load.p99_us,
                    "errors": s.load.errors,
                    "non_2xx_3xx": s.load.non_2xx,
                    "agent": agent_json(&s.agent, s.load.requests),
                    "agent_cpu_ms_per_s": s.agent_cpu_per_s(),
                    "rotel_spans_received": s.rotel_spans,
                    "other_periscope_pids": s.others,
                    "raw_output": s.raw_output,
                })
            })
            .collect();
        let (lost_from, dropped_from) = self.drops_start();
        let targets: Vec<Value> = self
            .targets()
            .iter()
            .map(|t| {
                json!({
                    "target": t.name,
                    "measured": t.measured,
                    "met": match t.verdict { Verdict::Met => json!(true), Verdict::Missed => json!(false), Verdict::Unknown => Value::Null },
                })
            })
            .collect();
        json!({
            "started_utc": self.started,
            "quick": self.quick,
            "rounds": self.rounds,
            "secs_per_run": self.secs,
            "h2_secs_per_run": self.h2_secs,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "build_s": self.build_time.as_secs_f64(),
            "waited_for_other_agents_s": self.waited.as_secs_f64(),
            "floor_measured": self.floor_measured,
            "bpf_stats_enabled": self.bpf_stats,
            "machine": {
                "cpus": self.machine.nproc,
                "kernel": self.machine.kernel,
                "loadavg_at_start": self.machine.loadavg,
                "versions": self.machine.versions.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            },
            "commands": self.commands.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "tls_call_cost": self.tls_call_json(),
            "targets": targets,
            "summary": summary,
            "scaling": {
                "rates": scaling,
                "idle": {
                    "secs": super::IDLE_SECS,
                    "median_agent_cpu_ms_per_s": self.idle_cpu_per_s(),
                    "runs": self.idle.iter().map(|s| json!({
                        "round": s.round,
                        "agent": agent_json(&s.agent, 0),
                        "agent_cpu_ms_per_s": s.agent_cpu_per_s(),
                        "other_periscope_pids": s.others,
                    })).collect::<Vec<_>>(),
                },
                "events_lost_from_asked_rate": lost_from.map(|r| r.map_or(json!("max"), |r| json!(r))),
                "spans_dropped_from_asked_rate": dropped_from.map(|r| r.map_or(json!("max"), |r| json!(r))),
                "runs": scaling_runs,
            },
            "runs": runs,
            "profile": match &self.profile {
                None => Value::Null,
                Some(Ok(p)) => p.json(),
                Some(Err(e)) => json!({ "error": e }),
            },
        })
    }
}

fn split_json(s: &CpuSplit) -> Value {
    json!({
        "event_loop_ms": s.event_loop_ms,
        "export_ms": s.export_ms,
        "other_ms": s.other_ms,
        "other_threads_ms": s.other_threads.iter().map(|(n, ms)| (n.clone(), json!(ms))).collect::<serde_json::Map<_, _>>(),
        "kernel_programs": s.kernel.map(|k| json!({
            "run_time_ns": k.run_time_ns,
            "run_cnt": k.run_cnt,
            "programs": k.programs,
        })),
    })
}

/// See [`Report::tls_call_proxy`].
struct TlsProxy {
    nginx_extra_ns_https: Option<f64>,
    nginx_extra_ns_http: Option<f64>,
    events_per_req_https: Option<f64>,
    events_per_req_http: Option<f64>,
    nginx_calls_per_req: Option<f64>,
    ns_per_call: Option<f64>,
    ns_per_call_net: Option<f64>,
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::bench::agent_cpu::KernelRun;
    use crate::bench::parse::LoadResult;

    pub fn sample(
        w: WorkloadKind,
        c: Config,
        round: usize,
        rps: f64,
        p50: f64,
        cpu_ms: f64,
    ) -> Sample {
        let requests = (rps * 10.0) as u64;
        // The metrics feature off builds and exports the same spans.
        let spans = matches!(c, Config::Periscope | Config::MetricsOff);
        Sample {
            round,
            workload: w,
            config: c,
            command: String::new(),
            load: LoadResult {
                requests,
                rps,
                p50_us: Some(p50),
                p99_us: Some(p50 * 3.0),
                errors: 0,
                non_2xx: 0,
                body_bytes: None,
            },
            server_cpu_ms: cpu_ms,
            client_cpu_ms: cpu_ms / 2.0,
            rotel_cpu_ms: 0.0,
            agent: c.is_agent().then(|| AgentRun {
                cpu_ms: 100.0,
                split: CpuSplit {
                    event_loop_ms: 60.0,
                    export_ms: 30.0,
                    other_ms: 10.0,
                    other_threads: vec![("tls-discovery".into(), 10.0)],
                    kernel: Some(KernelRun {
                        run_time_ns: requests * 500,
                        run_cnt: requests * 4,
                        programs: 12,
                    }),
                },
                peak_rss_kib: 30 * 1024,
                stop: Some(StopLine {
                    events: requests * 4,
                    spans_built: requests * 2,
                    exported: if spans { requests * 2 } else { 0 },
                    dropped: 0,
                    lost: 0,
                    request_spans: Some(if spans { requests * 2 } else { 0 }),
                }),
                exit: "exit status: 0".into(),
                ..Default::default()
            }),
            rotel_spans: Some(match c {
                Config::Periscope | Config::MetricsOff => requests * 2,
                Config::Otel => requests + 50,
                _ => 0,
            }),
            warmup_traced: if c == Config::Otel { 50 } else { 0 },
            others: Vec::new(),
            loadavg: String::new(),
            raw_output: String::new(),
        }
    }

    pub fn scaling(
        rate: Option<u32>,
        rps: f64,
        rss_mib: u64,
        lost: u64,
        dropped: u64,
    ) -> ScalingSample {
        let requests = (rps * 10.0) as u64;
        ScalingSample {
            round: 1,
            rate,
            workers: 10,
            secs: 10,
            command: String::new(),
            load: LoadResult {
                requests,
                rps,
                ..Default::default()
            },
            agent: AgentRun {
                cpu_ms: rps / 10.0,
                peak_rss_kib: rss_mib * 1024,
                stop: Some(StopLine {
                    exported: requests * 2 - dropped,
                    dropped,
                    lost,
                    request_spans: Some(requests * 2),
                    ..Default::default()
                }),
                exit: "exit status: 0".into(),
                ..Default::default()
            },
            rotel_spans: Some(requests * 2 - dropped),
            others: Vec::new(),
            raw_output: String::new(),
        }
    }

    pub fn report(samples: Vec<Sample>, scaling: Vec<ScalingSample>) -> Report {
        Report {
            quick: true,
            rounds: 1,
            secs: 10,
            h2_secs: 8,
            floor_measured: true,
            bpf_stats: true,
            started: "2026-01-01 00:00:00".into(),
            elapsed: Duration::from_secs(100),
            build_time: Duration::ZERO,
            waited: Duration::ZERO,
            machine: Machine {
                nproc: 2,
                kernel: "6.18".into(),
                loadavg: "0 0 0".into(),
                versions: Vec::new(),
            },
            commands: vec![("wrk".into(), "wrk -t1".into())],
            samples,
            scaling,
            idle: vec![IdleSample {
                round: 1,
                agent: AgentRun {
                    cpu_ms: 10.0,
                    window_ms: 10_000,
                    peak_rss_kib: 20 * 1024,
                    exit: "exit status: 0".into(),
                    ..Default::default()
                },
                others: Vec::new(),
            }],
            tls_calls: Vec::new(),
            profile: None,
            chart: Some("chart.png".into()),
        }
    }

    /// Every workload: none 10000 req/s p50 100 us; Periscope 9700 / 110 us;
    /// floor 9900 / 104 us; tls off 9900 / 101 us; metrics off (HTTP) 9750 /
    /// 108 us; OTel (Python) 6000 / 200 us.
    pub fn full_report() -> Report {
        let mut samples = Vec::new();
        for w in WORKLOADS {
            for c in w.configs() {
                let (rps, p50, cpu) = match c {
                    Config::None => (10_000.0, 100.0, 1000.0),
                    Config::Periscope => (9700.0, 110.0, 1100.0),
                    Config::Floor => (9900.0, 104.0, 1000.0),
                    Config::TlsOff => (9900.0, 101.0, 1000.0),
                    Config::MetricsOff => (9750.0, 108.0, 1080.0),
                    Config::Otel => (6000.0, 200.0, 1500.0),
                };
                samples.push(sample(w, *c, 1, rps, p50, cpu));
            }
        }
        let scaling = vec![
            scaling(Some(1000), 1000.0, 30, 0, 0),
            scaling(Some(5000), 4990.0, 32, 0, 0),
            scaling(Some(20_000), 19_500.0, 35, 0, 10),
            scaling(None, 40_000.0, 38, 7, 1000),
        ];
        report(samples, scaling)
    }

    #[test]
    fn span_accounting_notes() {
        let mut r = full_report();
        // One Periscope run traced half of its requests; another agent has no request-span count.
        for s in r.samples.iter_mut() {
            if let Some(st) = s.agent.as_mut().and_then(|a| a.stop.as_mut()) {
                match (s.workload, s.config) {
                    (WorkloadKind::Http, Config::Periscope) => {
                        st.request_spans = Some(s.load.requests)
                    }
                    (WorkloadKind::Https, Config::Floor) => st.request_spans = None,
                    _ => {}
                }
            }
        }
        let md = r.markdown();
        assert!(
            md.contains(
                "requests completed but 97000 request spans built (1.000 per request; expected 2)"
            ),
            "{md}"
        );
        assert!(md.contains("does not count request spans"), "{md}");
        assert_eq!(
            r.agg(WorkloadKind::Https, Config::Floor).request_spans,
            None
        );
    }

    #[test]
    fn judging() {
        assert_eq!(judge_at_most(Some(10.0), Some(6.0), 2.0), Verdict::Met);
        assert_eq!(judge_at_most(Some(13.0), Some(6.0), 2.0), Verdict::Missed);
        // Nothing measurable added: met, whatever the other.
        assert_eq!(judge_at_most(Some(-1.0), Some(6.0), 2.0), Verdict::Met);
        assert_eq!(judge_at_most(Some(0.0), None, 2.0), Verdict::Met);
        // Something added where the other added nothing: missed.
        assert_eq!(judge_at_most(Some(3.0), Some(-2.0), 2.0), Verdict::Missed);
        assert_eq!(judge_at_most(None, Some(1.0), 2.0), Verdict::Unknown);
        assert_eq!(judge_at_most(Some(1.0), None, 2.0), Verdict::Unknown);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
    }

    #[test]
    fn overheads_and_targets() {
        let r = full_report();
        let o = r.overhead(WorkloadKind::Http, Config::Periscope);
        assert!((o.throughput_ratio.unwrap() - 0.97).abs() < 1e-9);
        assert!((o.added_p50_us.unwrap() - 10.0).abs() < 1e-9);
        // total CPU per 1k: (1100 + 550 + 100) / 97 req * 1000 vs (1000 + 500) / 100 req * 1000.
        let want = (1750.0 / 97_000.0 - 1500.0 / 100_000.0) * 1000.0;
        assert!(
            (o.added_cpu_1k.unwrap() - want).abs() < 1e-9,
            "{:?}",
            o.added_cpu_1k
        );
        let t = r.targets();
        let find = |needle: &str| {
            t.iter()
                .find(|t| t.name.contains(needle))
                .unwrap_or_else(|| panic!("{needle}"))
        };
        assert_eq!(find("HTTP/1.1 keep-alive throughput").verdict, Verdict::Met);
        assert_eq!(find("HTTPS keep-alive throughput").verdict, Verdict::Met);
        // +10 us against a floor of +4 us: more than 2x.
        assert_eq!(
            find("HTTP keep-alive: Periscope's added latency").verdict,
            Verdict::Missed
        );
        // Python: +10 us against OTel's +100 us (10%); loss 3% against 40% (7.5%).
        assert_eq!(
            find("Flask/gunicorn: Periscope's added latency per request (p50) <= 20%").verdict,
            Verdict::Met
        );
        assert_eq!(
            find("Flask/gunicorn: Periscope's throughput loss").verdict,
            Verdict::Met
        );
        assert_eq!(find("RSS < 40 MiB at 20k req/s").verdict, Verdict::Met);
        // 10 spans dropped at 20k req/s.
        assert_eq!(find("no spans dropped at 20k").verdict, Verdict::Missed);
        assert_eq!(
            find("no spans dropped at 20k").measured,
            "10 dropped at 19500 req/s achieved"
        );
        // 100 ms over 97000 requests; 100 ms over 10 s at 1k req/s; 10 ms over 10 s idle.
        assert_eq!(find("µs per HTTP/1.1 keep-alive").verdict, Verdict::Met);
        assert!(
            find("µs per HTTP/1.1 keep-alive")
                .measured
                .starts_with("1.03 µs (kernel programs: another 0.50 µs")
        );
        assert_eq!(find("per second at 1k req/s").verdict, Verdict::Met);
        assert_eq!(find("per second idle").verdict, Verdict::Met);
        assert_eq!(find("per second idle").measured, "1.00 ms/s");
        assert_eq!(find("in every run").verdict, Verdict::Met);
        assert_eq!(find("zero events lost").verdict, Verdict::Met);
        assert_eq!(find("tls feature disabled").verdict, Verdict::Met);
        assert_eq!(find("HTTP/2 agent CPU per request").verdict, Verdict::Met);
        assert_eq!(
            find("HTTP/2 agent CPU per request").measured,
            "HTTP/2 h2c 1.03 µs / HTTP keep-alive 1.03 µs = 1.00x; HTTP/2 TLS 1.03 µs / HTTPS keep-alive 1.03 µs = 1.00x"
        );
        assert_eq!(r.drops_start(), (Some(None), Some(Some(20_000))));
        // OTel's spans exclude the warm-up it traced.
        let a = r.agg(WorkloadKind::Python, Config::Otel);
        assert_eq!(a.rotel_spans, Some(a.requests));
    }

    #[test]
    fn http2_cpu_target() {
        let mut r = full_report();
        let find = |r: &Report| {
            r.targets()
                .into_iter()
                .find(|t| {
                    t.name
                        .starts_with("HTTP/2 agent CPU per request <= 1.5x HTTP/1's")
                })
                .unwrap()
        };
        // h2 over TLS at twice HTTPS's CPU per request.
        for s in r.samples.iter_mut() {
            if (s.workload, s.config) == (WorkloadKind::H2Tls, Config::Periscope) {
                s.agent.as_mut().unwrap().cpu_ms = 200.0;
            }
        }
        let t = find(&r);
        assert_eq!(t.verdict, Verdict::Missed);
        assert!(
            t.measured.ends_with("HTTPS keep-alive 1.03 µs = 2.00x"),
            "{}",
            t.measured
        );
        assert_eq!(
            r.json()["summary"]["http2_over_http1_agent_cpu_per_request"]["h2_tls_keepalive_over_https_keepalive"],
            json!(2.0)
        );
        // No HTTP/2 runs at all: not established; the Go row still has its table.
        r.samples.retain(|s| !s.workload.is_http2());
        assert_eq!(find(&r).verdict, Verdict::Unknown);
        let section = "## HTTP/2, gRPC and Go HTTPS next to HTTP/1.1";
        assert!(r.markdown().contains(section));
        // nginx's HTTP/1.1 workloads alone: no table.
        r.samples.retain(|s| s.workload != WorkloadKind::GoHttps);
        assert!(!r.markdown().contains(section));
    }

    #[test]
    fn go_https_next_to_nginx_https() {
        let mut r = full_report();
        // Go's server at 1.5x nginx's agent CPU per request.
        for s in r.samples.iter_mut() {
            if (s.workload, s.config) == (WorkloadKind::GoHttps, Config::Periscope) {
                s.agent.as_mut().unwrap().cpu_ms = 150.0;
            }
        }
        let md = r.summary();
        let https = md
            .find("| HTTPS keep-alive | 10000 | 9700 (97.0%) |")
            .expect("nginx HTTPS row");
        let go = md
            .find("| Go HTTPS keep-alive | 10000 | 9700 (97.0%) | 9900 (99.0%) | 98.0% | +10 us / +4 us | 1.55 |")
            .unwrap_or_else(|| panic!("Go HTTPS row in\n{md}"));
        assert!(go > https, "{md}");
        assert!(
            md.contains("Go HTTPS keep-alive / HTTPS keep-alive: 1.50x"),
            "{md}"
        );
        let x =
            r.json()["summary"]["go_https_keepalive_over_https_keepalive_agent_cpu_per_request"]
                .as_f64()
                .unwrap();
        assert!((x - 1.5).abs() < 1e-9, "{x}");
        // Every table lists it, with its full label where workloads have theirs.
        let full = r.markdown();
        assert!(full.contains(
            "| Go net/http HTTPS keep-alive (crypto/tls, stripped go1.27; wrk, 16 conns) | Periscope |"
        ));
        assert!(full.contains("| Go HTTPS keep-alive | Periscope | 0.50 | 4.0 |"));
        assert!(r.json()["summary"]["go_https_keepalive_floor"].is_object());
        assert_eq!(r.agg(WorkloadKind::GoHttps, Config::TlsOff).runs, 0);
    }

    /// HTTP keep-alive with the metrics feature disabled: the agent's CPU per
    /// request with and without the RED metrics, and the difference.
    #[test]
    fn red_metrics_cost() {
        let mut r = full_report();
        // 100 ms over 97000 requests with the metrics, 80 ms over 97500 without.
        for s in r.samples.iter_mut() {
            if (s.workload, s.config) == (WorkloadKind::Http, Config::MetricsOff) {
                s.agent.as_mut().unwrap().cpu_ms = 80.0;
            }
        }
        let (diff, on, off) = r.metrics_cost().unwrap();
        assert!((on.unwrap() - 100_000.0 / 97_000.0).abs() < 1e-9, "{on:?}");
        assert!((off.unwrap() - 80_000.0 / 97_500.0).abs() < 1e-9, "{off:?}");
        assert!((diff.unwrap() - (on.unwrap() - off.unwrap())).abs() < 1e-9);
        let line = "RED metrics cost (HTTP keep-alive, agent CPU, all its threads, median): 0.21 µs/request \
                    (Periscope 1.03 µs vs metrics disabled 0.82 µs).";
        let md = r.markdown();
        assert!(md.contains(line), "{md}");
        assert!(r.summary().contains(line));
        // Right after the targets.
        assert!(md.find("## Targets").unwrap() < md.find(line).unwrap());
        assert!(md.find(line).unwrap() < md.find("## Results").unwrap());
        assert!(md.contains(
            "| nginx HTTP/1.1 keep-alive (wrk, 16 conns) | Periscope, metrics disabled | 9750 |"
        ));
        assert!(md.contains("| HTTP keep-alive | Periscope, metrics disabled | 0.50 |"));
        // It builds and exports the spans Periscope does: no note.
        assert!(!md.contains("request spans built"), "{md}");
        let j = r.json();
        let cost = &j["summary"]["http_keepalive_red_metrics_cost"];
        let d = cost["agent_cpu_us_per_request"].as_f64().unwrap();
        assert!((d - diff.unwrap()).abs() < 1e-9, "{d}");
        assert!(
            j["summary"]["http_keepalive_metrics_off"]["median_requests_per_sec"].is_number()
        );
        assert!(j["summary"]["https_keepalive_metrics_off"].is_null());
        assert_eq!(r.agg(WorkloadKind::Https, Config::MetricsOff).runs, 0);
        // Without the metrics-off runs: no line.
        r.samples.retain(|s| s.config != Config::MetricsOff);
        assert_eq!(r.metrics_cost(), None);
        assert!(!r.markdown().contains("RED metrics cost"));
        assert!(r.json()["summary"]["http_keepalive_red_metrics_cost"].is_null());
    }

    #[test]
    fn grpc_go_next_to_h2_tls() {
        let mut r = full_report();
        // The grpc-go server at 2x nginx's HTTP/2-over-TLS agent CPU per request.
        for s in r.samples.iter_mut() {
            if (s.workload, s.config) == (WorkloadKind::GrpcGo, Config::Periscope) {
                s.agent.as_mut().unwrap().cpu_ms = 200.0;
            }
        }
        let md = r.summary();
        let table = md
            .find("## HTTP/2, gRPC and Go HTTPS next to HTTP/1.1")
            .expect("the HTTP/2, gRPC and Go table");
        let python = md
            .find("| gRPC unary | 10000 | 9700 (97.0%) |")
            .expect("Python gRPC row");
        let go = md
            .find("| gRPC unary, Go | 10000 | 9700 (97.0%) | 9900 (99.0%) | 98.0% | +10 us / +4 us | 2.06 | 0.62 | 0.31 | 0.50 | 2.000 | 2.000 | 0 |")
            .unwrap_or_else(|| panic!("grpc-go row in\n{md}"));
        assert!(table < python && python < go, "{md}");
        assert!(md.contains("gRPC unary, Go / HTTP/2 TLS: 2.00x"), "{md}");
        let j = r.json();
        let x = j["summary"]["grpc_go_unary_over_h2_tls_keepalive_agent_cpu_per_request"]
            .as_f64()
            .unwrap();
        assert!((x - 2.0).abs() < 1e-9, "{x}");
        for c in ["none", "periscope", "floor"] {
            let k = format!("grpc_go_unary_{c}");
            assert!(
                j["summary"][&k]["median_requests_per_sec"].is_number(),
                "{k}"
            );
        }
        let p = &j["summary"]["grpc_go_unary_periscope"];
        assert_eq!(p["throughput_ratio"], json!(0.97));
        assert_eq!(p["cpu_us_per_request"]["kernel_programs"], json!(0.5));
        assert!(j["summary"]["grpc_go_unary_periscope_over_floor"].is_object());
        assert!(j["summary"]["grpc_go_unary_tls_off"].is_null());
        // Every table lists it, with its full label where workloads have theirs.
        let full = r.markdown();
        assert!(full.contains(
            "| gRPC unary, grpc-go 1.33 over TLS (h2, stripped go1.19; h2load, 4 conns x 10 streams) | Periscope |"
        ));
        assert!(full.contains("| gRPC unary, Go | Periscope | 0.50 | 4.0 |"));
        assert!(full.contains(
            "gRPC unary, Go: Periscope's added latency per request (p50) <= 2x the floor's"
        ));
        // Only the grpc-go workload besides nginx's HTTP/1.1 ones: the table still shows.
        r.samples.retain(|s| {
            matches!(
                s.workload,
                WorkloadKind::Http | WorkloadKind::Https | WorkloadKind::GrpcGo
            )
        });
        assert!(r.summary().contains("| gRPC unary, Go | 10000 |"));
        assert!(!r.summary().contains("| gRPC unary | 10000 |"));
    }

    #[test]
    fn targets_missed_and_unknown() {
        let mut r = full_report();
        r.scaling = vec![
            scaling(Some(5000), 3000.0, 70, 0, 0),
            scaling(Some(20_000), 12_000.0, 63, 0, 0),
        ];
        let t = r.targets();
        let find = |needle: &str| t.iter().find(|t| t.name.contains(needle)).unwrap();
        // 5k asked, 3k reached: nothing lost, but not established.
        assert_eq!(find("zero events lost").verdict, Verdict::Unknown);
        // 63 MiB at 12k req/s: over the limit even below the rate.
        assert_eq!(find("RSS < 40 MiB at 20k").verdict, Verdict::Missed);
        assert_eq!(find("no spans dropped at 20k").verdict, Verdict::Unknown);
        assert_eq!(find("in every run").verdict, Verdict::Missed);
        // Under the limit, but the rate was not reached.
        r.scaling = vec![scaling(Some(20_000), 12_000.0, 35, 0, 0)];
        let t = r.targets();
        let find = |needle: &str| t.iter().find(|t| t.name.contains(needle)).unwrap();
        assert_eq!(find("RSS < 40 MiB at 20k").verdict, Verdict::Unknown);
        // No 1k run, no idle run.
        assert_eq!(find("per second at 1k req/s").verdict, Verdict::Unknown);
        r.idle.clear();
        let t = r.targets();
        assert_eq!(
            t.iter()
                .find(|t| t.name.contains("per second idle"))
                .unwrap()
                .verdict,
            Verdict::Unknown
        );
        r.floor_measured = false;
        let t = r.targets();
        assert!(
            t.iter()
                .filter(|t| t.name.contains("the floor's"))
                .all(|t| t.verdict == Verdict::Unknown && t.measured.contains("--noop-probes"))
        );
    }

    #[test]
    fn markdown_and_json() {
        let r = full_report();
        let md = r.markdown();
        for needle in [
            "## Targets",
            "## Results (medians over rounds)",
            "## Periscope against the floor",
            "## Periscope against the OpenTelemetry Python auto-instrumentation",
            "## Scaling",
            "![throughput, added latency and scaling](chart.png)",
            "HTTP/2: h2load (8 connections x 10 streams in flight, 8 s per run",
            "## HTTP/2, gRPC and Go HTTPS next to HTTP/1.1 (keep-alive, medians over rounds)",
            "| HTTP keep-alive | 10000 | 9700 (97.0%) | 9900 (99.0%) | 98.0% | +10 us / +4 us | 1.03 | 0.62 | 0.31 | 0.50 | 2.000 | 2.000 | 0 |",
            "| gRPC unary | 10000 | 9700 (97.0%) | 9900 (99.0%) | 98.0% | +10 us / +4 us | 1.03 | 0.62 | 0.31 | 0.50 | 2.000 | 2.000 | 0 |",
            "| gRPC unary, Go | 10000 | 9700 (97.0%) | 9900 (99.0%) | 98.0% | +10 us / +4 us | 1.03 | 0.62 | 0.31 | 0.50 | 2.000 | 2.000 | 0 |",
            "over nginx's HTTP/2 one (the same h2load over TLS 1.3), gRPC unary, Go / HTTP/2 TLS: 1.00x.",
            "over TLS 1.3 (h2 by ALPN) to the end-to-end tests' grpc-go server",
            "HTTP/2 h2c / HTTP keep-alive: 1.00x, HTTP/2 TLS / HTTPS keep-alive: 1.00x; Go's crypto/tls",
            "| Go HTTPS keep-alive | 10000 | 9700 (97.0%) | 9900 (99.0%) | 98.0% | +10 us / +4 us | 1.03 | 0.62 | 0.31 | 0.50 | 2.000 | 2.000 | 0 |",
            "| HTTP/2 h2c | Periscope | 0.50 | 4.0 | 0.62 | 0.31 | 0.10 | 1.03 | 0.00 | tls-discovery |",
            "| throughput loss | 3.0% | 40.0% | 7.5% |",
            "Events lost in the kernel (ring buffer full): from max",
            "Spans dropped by the exporter (queue full): from 20k req/s",
            "## CPU per request by part (µs per request, medians over rounds)",
            "| HTTP keep-alive | Periscope | 0.50 | 4.0 | 0.62 | 0.31 | 0.10 | 1.03 | 0.00 | tls-discovery |",
            "| Flask/gunicorn | OTel auto-instrumentation | - | - | - | - | - | - | 0.00 | - |",
            "| idle, no load (10 s) | - | 0 | 1.00 | - | 20.0 | n/a | - | n/a | n/a | - | - |",
            "counts the BPF program only, not the trap",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
        assert!(!md.contains("does not count request spans"), "{md}");
        assert!(!md.contains("request spans built"), "{md}");
        let short = r.summary();
        assert!(
            short.contains("## Targets") && short.contains("## Scaling"),
            "{short}"
        );
        assert!(!short.contains("## Every run"), "{short}");
        let j = r.json();
        assert_eq!(
            j["summary"]["http_keepalive_periscope"]["throughput_ratio"],
            json!(0.97)
        );
        assert_eq!(j["scaling"]["spans_dropped_from_asked_rate"], json!(20_000));
        assert_eq!(
            j["scaling"]["idle"]["median_agent_cpu_ms_per_s"],
            json!(1.0)
        );
        let split = &j["summary"]["http_keepalive_periscope"]["cpu_us_per_request"];
        assert_eq!(split["kernel_programs"], json!(0.5));
        assert_eq!(split["agent_other_threads"], json!(["tls-discovery"]));
        assert_eq!(
            j["runs"][1]["agent"]["cpu_split"]["kernel_programs"]["programs"],
            json!(12)
        );
        assert_eq!(j["scaling"]["events_lost_from_asked_rate"], json!("max"));
        assert!(
            j["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["met"] == json!(false))
        );
    }
}
