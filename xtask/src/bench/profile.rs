//! `cargo xtask bench --profile`: where the agent spends its CPU under load.
//!
//! The agent runs as in the `periscope` configuration while wrk loads nginx
//! over HTTP/1.1 keep-alive for PROFILE_SECS; `perf record -F 999` samples
//! the agent's threads only (`-p PID`) with DWARF call graphs (frame
//! pointers if perf refuses DWARF; hardware cycles if the machine has them,
//! `cpu-clock` otherwise). `perf script` and the `inferno` crate turn that
//! into `OUT_DIR/profile.folded` (collapsed stacks; the first frame is the
//! thread's name) and `OUT_DIR/flamegraph.svg`; the report gets the
//! functions with the most samples. `OUT_DIR/logs/perf.data` is kept for
//! `perf report -i`.

use super::agent_cpu::Snapshot;
use super::parse::{LoadResult, parse_perf_record_samples, perf_stat_counted};
use super::sys::{show, spawn, wait_for_other_agents};
use super::{Bench, PROFILE_SECS, WorkloadKind, finish_agent, run_load};
use anyhow::{Context, Result, bail};
use inferno::collapse::Collapse;
use periscope_tests::proc::{Proc, run_capture};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Sampling frequency (Hz): not a multiple of the timer tick.
const PERF_FREQ: u32 = 999;
/// Bytes of stack perf copies per sample for DWARF unwinding: the event
/// loop's stack holds the agent's whole async state machine, and perf's
/// default 8 KiB leaves most of its stacks unwound.
const DWARF_STACK: &str = "dwarf,32768";
/// Rows of the top-functions table.
const TOP_FUNCTIONS: usize = 15;
pub const SVG: &str = "flamegraph.svg";
pub const FOLDED: &str = "profile.folded";

/// What the profile recorded.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub secs: u32,
    /// The `perf record` command line.
    pub perf_command: String,
    /// The event sampled: `cycles` or `cpu-clock`.
    pub event: String,
    /// Samples perf wrote, from its closing line.
    pub samples: Option<u64>,
    /// The load during the recording.
    pub load: LoadResult,
    /// What made that load ("wrk, HTTP/1.1 keep-alive").
    pub load_label: String,
    /// The agent's CPU over the recording (perf's own cost not included).
    pub agent_cpu_ms: f64,
    pub stacks: FoldedStats,
}

/// A function's weight: where it was the leaf (self) and anywhere on the
/// stack (total).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopFn {
    pub name: String,
    pub self_weight: u64,
    pub total_weight: u64,
}

/// Totals of collapsed stacks. Their counts are the samples' periods
/// (ns for `cpu-clock`, cycles for `cycles`), not sample counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoldedStats {
    pub weight: u64,
    /// Weight by thread name (the stacks' first frame), most first.
    pub threads: Vec<(String, u64)>,
    /// The functions with the most self weight, most first.
    pub top: Vec<TopFn>,
}

/// The load profiled: HTTP/1.1 keep-alive, or what
/// `PERISCOPE_BENCH_PROFILE_LOAD` names (`http`, `https`, `h2c`, `h2tls`).
pub(super) fn profile_workload() -> Result<WorkloadKind> {
    Ok(match std::env::var("PERISCOPE_BENCH_PROFILE_LOAD").as_deref() {
        Err(_) | Ok("http") => WorkloadKind::Http,
        Ok("https") => WorkloadKind::Https,
        Ok("h2c") => WorkloadKind::H2c,
        Ok("h2tls") => WorkloadKind::H2Tls,
        Ok(other) => bail!("PERISCOPE_BENCH_PROFILE_LOAD={other}: want http, https, h2c or h2tls"),
    })
}

/// Record the agent under the chosen load; write the SVG and the
/// collapsed stacks into `b.out_dir`.
pub fn record(b: &mut Bench) -> Result<Profile> {
    wait_for_other_agents(Duration::from_secs(180))?;
    let out = b.out_dir.clone();
    let data = out.join("logs/perf.data");
    let agent_log = out.join("logs/agent-profile.log");
    let event = perf_event();
    let (agent, startup) = b.agent.start_timed(&[], &agent_log)?;
    let before = Snapshot::take(agent.pid())?;
    let (perf, perf_command) = start_perf(agent.pid(), event, &data)?;
    eprintln!(
        "bench: {} profile: {perf_command}",
        super::sys::since_start()
    );
    let kind = profile_workload()?;
    let (program, args, log) = b.load_command(kind, PROFILE_SECS, "profile");
    let run = run_load(program, &args, log.as_deref(), PROFILE_SECS, &out, "profile");
    let samples = stop_perf(perf, &out);
    let agent_run = finish_agent(agent, startup, &before, b.clk, &agent_log);
    let (_, _, load) = run?;
    let folded = collapse(&data)?;
    std::fs::write(out.join(FOLDED), &folded)?;
    let load_label = match kind {
        WorkloadKind::H2c => "h2load, nginx over HTTP/2 h2c",
        WorkloadKind::H2Tls => "h2load, nginx over HTTP/2 over TLS",
        WorkloadKind::Https => "wrk, nginx over HTTPS keep-alive",
        _ => "wrk, nginx over HTTP/1.1 keep-alive",
    };
    let title = format!("periscope under {load_label} ({:.0} req/s), {PROFILE_SECS} s, agent only", load.rps);
    flame_graph(&folded, &title, &out.join(SVG))?;
    let p = Profile {
        secs: PROFILE_SECS,
        perf_command,
        event: event.to_string(),
        samples,
        load,
        load_label: load_label.to_string(),
        agent_cpu_ms: agent_run.cpu_ms,
        stacks: folded_stats(&String::from_utf8_lossy(&folded), TOP_FUNCTIONS),
    };
    eprintln!(
        "bench: profile: {} samples, {} and {} written",
        fmt_count(p.samples),
        out.join(SVG).display(),
        out.join(FOLDED).display()
    );
    Ok(p)
}

/// `cycles` when the machine counts it (not in most VMs), else `cpu-clock`.
fn perf_event() -> &'static str {
    let out = Command::new("perf")
        .args(["stat", "-x,", "-e", "cycles", "--", "true"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if perf_stat_counted(&String::from_utf8_lossy(&o.stderr), "cycles") => "cycles",
        _ => "cpu-clock",
    }
}

/// `perf record` on `pid` until stopped (SIGINT): DWARF call graphs, or
/// frame pointers if perf does not stay up with DWARF.
fn start_perf(pid: u32, event: &str, data: &Path) -> Result<(Proc, String)> {
    let mut failures = Vec::new();
    for call_graph in [&["--call-graph", DWARF_STACK][..], &["-g"][..]] {
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-F", &PERF_FREQ.to_string(), "-e", event])
            .args(call_graph)
            .args(["-p", &pid.to_string(), "-o"])
            .arg(data);
        let shown = show(&cmd);
        let mut p = spawn("perf", &mut cmd, libc::SIGINT, Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_secs(1));
        if p.is_running() {
            return Ok((p, shown));
        }
        failures.push(format!("`{shown}` exited at once:\n{}", p.log()));
    }
    bail!("perf record does not run here:\n{}", failures.join("\n"))
}

/// SIGINT: perf writes perf.data and exits; its output goes to logs/.
/// Returns the samples it says it wrote.
fn stop_perf(mut perf: Proc, out_dir: &Path) -> Option<u64> {
    let status = perf.stop();
    let log = perf.log();
    std::fs::write(
        out_dir.join("logs/perf-record.txt"),
        format!("{log}\nexit: {status:?}\n"),
    )
    .ok();
    parse_perf_record_samples(&log)
}

fn fmt_count(n: Option<u64>) -> String {
    n.map_or("n/a".into(), |n| n.to_string())
}

/// `perf script` of `data`, collapsed by inferno.
fn collapse(data: &Path) -> Result<Vec<u8>> {
    let mut cmd = Command::new("perf");
    cmd.args(["script", "--no-inline", "-i"]).arg(data);
    let script = run_capture("perf-script", &mut cmd, Duration::from_secs(600))?
        .ok()
        .context("perf script")?
        .stdout;
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::default()
        .collapse(script.as_bytes(), &mut folded)
        .context("collapsing perf script's output")?;
    if folded.is_empty() {
        bail!(
            "no samples in {} (perf script printed {} bytes)",
            data.display(),
            script.len()
        );
    }
    Ok(folded)
}

fn flame_graph(folded: &[u8], title: &str, svg: &Path) -> Result<()> {
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_string();
    opts.count_name = "samples".into();
    let file = std::fs::File::create(svg).with_context(|| format!("creating {}", svg.display()))?;
    inferno::flamegraph::from_reader(&mut opts, folded, std::io::BufWriter::new(file))
        .with_context(|| format!("writing {}", svg.display()))
}

/// Weight per thread and the `n` functions with the most self weight,
/// from collapsed stacks (`thread;outer;...;leaf COUNT` per line; lines
/// that do not parse are skipped).
pub fn folded_stats(folded: &str, n: usize) -> FoldedStats {
    let mut threads: BTreeMap<&str, u64> = BTreeMap::new();
    let mut self_weight: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total: BTreeMap<&str, u64> = BTreeMap::new();
    let mut weight = 0;
    for (stack, count) in folded.lines().filter_map(parse_folded_line) {
        let mut frames = stack.split(';');
        let thread = frames.next().unwrap_or_default();
        let functions: Vec<&str> = frames.collect();
        weight += count;
        *threads.entry(thread).or_default() += count;
        *self_weight
            .entry(functions.last().copied().unwrap_or("[thread only]"))
            .or_default() += count;
        for f in functions.iter().copied().collect::<BTreeSet<&str>>() {
            *total.entry(f).or_default() += count;
        }
    }
    let mut top: Vec<TopFn> = self_weight
        .into_iter()
        .map(|(name, s)| TopFn {
            name: name.to_string(),
            self_weight: s,
            total_weight: total.get(name).copied().unwrap_or(s),
        })
        .collect();
    top.sort_by(|a, b| b.self_weight.cmp(&a.self_weight).then(a.name.cmp(&b.name)));
    top.truncate(n);
    let mut threads: Vec<(String, u64)> = threads
        .into_iter()
        .map(|(t, c)| (t.to_string(), c))
        .collect();
    threads.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    FoldedStats {
        weight,
        threads,
        top,
    }
}

fn parse_folded_line(line: &str) -> Option<(&str, u64)> {
    let (stack, count) = line.trim_end().rsplit_once(' ')?;
    Some((stack, count.parse().ok()?))
}

fn pct(part: u64, all: u64) -> String {
    if all == 0 {
        return "n/a".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / all as f64)
}

impl Profile {
    /// The report's section.
    pub fn markdown(&self) -> String {
        let s = &self.stacks;
        let mut m = String::from("## Profile (perf, the agent's threads only)\n\n");
        m.push_str(&format!(
            "`{}` for {} s under load ({}: {:.0} req/s; the agent used {:.0} ms of CPU, \
             {:.0} ms per second, perf's sampling included). {} samples of `{}`, each weighted by its period{}; by \
             thread: {}. Flame graph: [{SVG}]({SVG}); collapsed stacks: `{FOLDED}` (first frame: the thread; \
             `[unknown]`: frames DWARF unwinding did not reach, above the event loop's `block_on`); perf data: \
             `logs/perf.data` (`perf report -i`). The kernel programs run in the traced processes, not in the agent, \
             so they are not in this profile.\n\n",
            self.perf_command,
            self.secs,
            self.load_label,
            self.load.rps,
            self.agent_cpu_ms,
            self.agent_cpu_ms / self.secs.max(1) as f64,
            fmt_count(self.samples),
            self.event,
            if self.event == "cpu-clock" {
                format!(" ({:.0} ms of CPU in all)", s.weight as f64 / 1e6)
            } else {
                String::new()
            },
            s.threads
                .iter()
                .map(|(t, c)| format!("{t} {}", pct(*c, s.weight)))
                .collect::<Vec<_>>()
                .join(", "),
        ));
        m.push_str(
            "| function (top by self time) | self | total (on the stack) |\n|---|---|---|\n",
        );
        for f in &s.top {
            m.push_str(&format!(
                "| `{}` | {} | {} |\n",
                f.name.replace('|', "\\|"),
                pct(f.self_weight, s.weight),
                pct(f.total_weight, s.weight)
            ));
        }
        m.push('\n');
        m
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "secs": self.secs,
            "perf_command": self.perf_command,
            "requests_per_sec": self.load.rps,
            "agent_cpu_ms": self.agent_cpu_ms,
            "event": self.event,
            "samples": self.samples,
            "weight": self.stacks.weight,
            "threads": self.stacks.threads.iter().map(|(t, c)| serde_json::json!({"thread": t, "weight": c})).collect::<Vec<_>>(),
            "top_functions": self.stacks.top.iter().map(|f| serde_json::json!({
                "function": f.name,
                "self_weight": f.self_weight,
                "total_weight": f.total_weight,
            })).collect::<Vec<_>>(),
            "flamegraph": SVG,
            "folded": FOLDED,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOLDED_TEXT: &str = "\
periscope;main;periscope::run;periscope::events::decode 30
periscope;main;periscope::run;periscope::spans::build 20
periscope;main;periscope::run 10
periscope-io;tokio::worker;periscope::export::otlp::encode 25
periscope-io;tokio::worker;periscope::export::otlp::encode;memcpy 15
tls-discovery 2
not a folded line
periscope;x NaN
";

    #[test]
    fn stats_from_folded_stacks() {
        let s = folded_stats(FOLDED_TEXT, 3);
        assert_eq!(s.weight, 102);
        assert_eq!(
            s.threads,
            vec![
                ("periscope".to_string(), 60),
                ("periscope-io".to_string(), 40),
                ("tls-discovery".to_string(), 2)
            ]
        );
        let top: Vec<(&str, u64, u64)> = s
            .top
            .iter()
            .map(|f| (f.name.as_str(), f.self_weight, f.total_weight))
            .collect();
        assert_eq!(
            top,
            vec![
                ("periscope::events::decode", 30, 30),
                ("periscope::export::otlp::encode", 25, 40),
                ("periscope::spans::build", 20, 20),
            ]
        );
        assert_eq!(folded_stats("", 5), FoldedStats::default());
    }

    #[test]
    fn markdown_table() {
        let p = Profile {
            secs: 10,
            perf_command: "perf record -F 999 -e cpu-clock --call-graph dwarf -p 1 -o perf.data"
                .into(),
            event: "cpu-clock".into(),
            samples: Some(3),
            agent_cpu_ms: 2000.0,
            stacks: folded_stats(FOLDED_TEXT, 15),
            ..Default::default()
        };
        let md = p.markdown();
        assert!(
            md.contains("| `periscope::events::decode` | 29.4% | 29.4% |"),
            "{md}"
        );
        assert!(md.contains("periscope 58.8%, periscope-io 39.2%"), "{md}");
        assert!(md.contains("[flamegraph.svg](flamegraph.svg)"), "{md}");
        assert_eq!(p.json()["weight"], serde_json::json!(102));
        assert_eq!(p.json()["samples"], serde_json::json!(3));
    }

    #[test]
    fn flame_graph_svg() {
        let dir = periscope_tests::proc::TempDir::new("bench-profile").unwrap();
        let svg = dir.join("f.svg");
        flame_graph(FOLDED_TEXT.as_bytes(), "test", &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("<svg") && text.contains("periscope::spans::build"));
    }
}
