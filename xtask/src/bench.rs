//! `cargo xtask bench [--quick]`: what the agent costs an unmodified server.
//!
//! nginx (one worker, static page, loopback) is loaded by wrk (HTTP/1.1
//! keep-alive, as fast as it goes), by hey (rate-limited to 5000 req/s) and
//! by wrk over HTTPS (TLS 1.3 on a second nginx port, keep-alive; the agent
//! then runs uprobes in both nginx and wrk, which use the system libssl),
//! without the agent and with it, interleaved in rounds within one run on one
//! machine: every figure is compared with a baseline measured minutes apart,
//! never with a number from another day. The agent exports to a real OTLP
//! receiver (Rotel, blackhole exporter) that runs for the whole bench, the
//! baseline runs included.
//!
//! Per configuration it reports medians over the rounds of requests/s and of
//! wrk's/hey's p50 and p99 latency, the ratio with/without; for the agent the
//! CPU time it used (utime+stime from /proc) per 1000 requests, its peak RSS
//! (VmHWM), the events it lost in the kernel and the spans it exported against
//! the requests the load generator completed (both from the line the agent
//! logs when it stops). The targets (throughput >= 95% of baseline, HTTPS
//! throughput >= 90% of baseline, RSS < 64 MiB, no lost events at 5k req/s)
//! are judged and a miss is reported as one.
//!
//! It also measures what one hooked TLS library call costs: Debian's Python
//! pushes records through an in-memory TLS pair (`ssl.MemoryBIO`, so no
//! socket and no syscalls: `SSL_write_ex` + `SSL_read_ex` per iteration)
//! without and with the agent, and the difference in CPU time per call is the
//! uprobe + uretprobe cost. A proxy from the HTTPS runs is reported beside it
//! (nginx's extra CPU per request over its estimated uprobe hits per request).
//!
//! `PERISCOPE_BIN=PATH` benches that agent binary instead of building
//! `target/release/periscope`.
//!
//! Results go to `OUT_DIR/summary.md` (also printed), `OUT_DIR/raw.json`
//! (every run's numbers and raw tool output) and `OUT_DIR/logs/`.
//!
//! Every process started here runs in a process group of its own, dies with
//! xtask (`PR_SET_PDEATHSIG`) and is stopped by a guard on drop; Ctrl-C stops
//! the bench between steps and the guards clean up.

use periscope_tests::proc::children_of;
use periscope_tests::workspace_root;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Targets from the issue.
const TARGET_THROUGHPUT_RATIO: f64 = 0.95;
const TARGET_HTTPS_THROUGHPUT_RATIO: f64 = 0.90;
/// Iterations of the in-memory TLS loop (two library calls each).
const UPROBE_ITERATIONS: u32 = 100_000;
const UPROBE_ITERATIONS_QUICK: u32 = 30_000;
const TARGET_RSS_MIB: f64 = 64.0;
const RATE_LIMITED_RPS: u32 = 5000;
/// hey rate-limits per worker: `-c HEY_WORKERS -q RATE/HEY_WORKERS`.
const HEY_WORKERS: u32 = 10;
const WRK_CONNECTIONS: u32 = 16;
/// The pip requirement for Rotel (the same pin as `cargo xtask setup`).
const ROTEL_REQUIREMENT: &str = "rotel==0.0.1a15";

/// What `cargo xtask bench` was asked to do.
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// One round of 5 s runs instead of three rounds of 10 s.
    pub quick: bool,
    /// Where summary.md, raw.json and logs go.
    pub out_dir: PathBuf,
    /// Override the number of rounds (default 3, or 1 with `quick`).
    pub rounds: Option<usize>,
    /// Run `cargo build --release -p periscope` first (default true).
    pub build: bool,
}

impl BenchArgs {
    pub fn new(quick: bool) -> BenchArgs {
        BenchArgs { quick, out_dir: default_out_dir(), rounds: None, build: true }
    }
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs::new(false)
    }
}

/// `<workspace>/results/bench-YYYYMMDD-HHMMSS` (UTC).
pub fn default_out_dir() -> PathBuf {
    workspace_root().join("results").join(format!("bench-{}", utc_stamp(SystemTime::now(), false)))
}

pub fn run(args: BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    install_interrupt_handler();
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "`cargo xtask bench` must run as root (euid is {euid}): the agent loads eBPF programs \
             and missing packages are installed with apt. Try `sudo -E cargo xtask bench`."
        );
    }
    let plan = Plan::new(&args);
    eprintln!(
        "bench: {} round(s) of [no agent, agent] x [wrk {} s, hey {} req/s {} s, wrk https {} s] + TLS call cost; results in {}",
        plan.rounds,
        plan.wrk_secs,
        RATE_LIMITED_RPS,
        plan.hey_secs,
        plan.wrk_secs,
        args.out_dir.display()
    );

    // 1. Tools, tracefs and the agent binary.
    ensure_apt_tools()?;
    let rotel_agent = ensure_rotel()?;
    ensure_tracefs()?;
    // PERISCOPE_BIN (as in the end-to-end tests): bench that binary, unbuilt.
    let given_bin = std::env::var_os("PERISCOPE_BIN").filter(|p| !p.is_empty()).map(PathBuf::from);
    if args.build && given_bin.is_none() {
        build_agent()?;
    }
    let agent_bin = given_bin.unwrap_or_else(|| crate::cmd::target_dir().join("release").join("periscope"));
    if !agent_bin.is_file() {
        bail!("{} is missing: build it with `cargo build --release -p periscope`", agent_bin.display());
    }
    std::fs::create_dir_all(args.out_dir.join("logs"))
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let out_dir = args.out_dir.canonicalize()?;

    let started = utc_stamp(SystemTime::now(), true);
    let machine = machine_facts();
    let tmp = TempDir::new()?;

    // 2. The receiver and the server, up for the whole bench.
    let grpc_port = free_port()?;
    let http_port = free_port()?;
    let mut rotel_cmd = Command::new(&rotel_agent);
    rotel_cmd.args([
        "start",
        "--otlp-grpc-endpoint",
        &format!("127.0.0.1:{grpc_port}"),
        "--otlp-http-endpoint",
        &format!("127.0.0.1:{http_port}"),
        "--exporter",
        "blackhole",
    ]);
    let rotel_shown = show(&rotel_cmd);
    let mut rotel = Proc::spawn("rotel", &mut rotel_cmd, libc::SIGTERM, Duration::from_secs(5))?;
    wait_for_port(&mut rotel, grpc_port, Duration::from_secs(30))?;

    let nginx_port = free_port()?;
    let https_port = free_port()?;
    let (cert, key) = make_test_cert(&tmp.0)?;
    let nginx_conf = write_nginx_files(&tmp.0, nginx_port, Some((https_port, &cert, &key)))?;
    let mut nginx_cmd = Command::new("nginx");
    nginx_cmd.arg("-c").arg(&nginx_conf).arg("-p").arg(&tmp.0).arg("-e").arg(tmp.0.join("error.log"));
    let nginx_shown = show(&nginx_cmd);
    let mut nginx = Proc::spawn("nginx", &mut nginx_cmd, libc::SIGTERM, Duration::from_secs(5))?;
    wait_for_port(&mut nginx, nginx_port, Duration::from_secs(15))?;
    check_http_ok(nginx_port).context("nginx does not answer GET / with 200")?;
    let url = format!("http://127.0.0.1:{nginx_port}/");
    let https_url = format!("https://127.0.0.1:{https_port}/");

    let wrk_to = |secs: u32, url: &str| -> Vec<String> {
        vec!["-t1".into(), format!("-c{WRK_CONNECTIONS}"), format!("-d{secs}s"), "--latency".into(), url.to_string()]
    };
    let wrk_args = |secs: u32| wrk_to(secs, &url);
    let hey_args = |secs: u32| -> Vec<String> {
        vec![
            "-z".into(),
            format!("{secs}s"),
            "-c".into(),
            HEY_WORKERS.to_string(),
            "-q".into(),
            (RATE_LIMITED_RPS / HEY_WORKERS).to_string(),
            url.clone(),
        ]
    };
    let agent_args: Vec<String> = vec!["run".into(), "--otlp-endpoint".into(), format!("http://127.0.0.1:{grpc_port}")];
    let tls_off_config = out_dir.join("tls-off.toml");
    std::fs::write(&tls_off_config, "disabled_features = [\"tls\"]\n")?;
    let workloads = [
        Workload {
            kind: WorkloadKind::Wrk,
            program: "wrk",
            args: wrk_args(plan.wrk_secs),
            secs: plan.wrk_secs,
            agent_extra: Vec::new(),
        },
        Workload {
            kind: WorkloadKind::Hey,
            program: "hey",
            args: hey_args(plan.hey_secs),
            secs: plan.hey_secs,
            agent_extra: Vec::new(),
        },
        Workload {
            kind: WorkloadKind::WrkHttps,
            program: "wrk",
            args: wrk_to(plan.wrk_secs, &https_url),
            secs: plan.wrk_secs,
            agent_extra: Vec::new(),
        },
        Workload {
            kind: WorkloadKind::WrkHttpsTlsOff,
            program: "wrk",
            args: wrk_to(plan.wrk_secs, &https_url),
            secs: plan.wrk_secs,
            agent_extra: vec!["--config".into(), tls_off_config.display().to_string()],
        },
    ];

    // 3. Warm nginx up (page cache, first connections); not measured.
    eprintln!("bench: warm-up (wrk 2 s, not measured)");
    let warm = Workload { kind: WorkloadKind::Wrk, program: "wrk", args: wrk_args(2), secs: 2, agent_extra: Vec::new() };
    run_load(&warm, &out_dir, "warmup")?;
    let warm = Workload {
        kind: WorkloadKind::WrkHttps,
        program: "wrk",
        args: wrk_to(2, &https_url),
        secs: 2,
        agent_extra: Vec::new(),
    };
    let (_, _, w) = run_load(&warm, &out_dir, "warmup-https")?;
    if w.requests == 0 || w.errors > 0 || w.non_2xx > 0 {
        bail!(
            "nginx over HTTPS does not answer wrk cleanly ({} requests, {} errors, {} non-2xx): see {}",
            w.requests,
            w.errors,
            w.non_2xx,
            out_dir.join("logs/warmup-https-wrk.txt").display()
        );
    }

    // 4. The rounds.
    let ctx = RunCtx {
        agent_bin: &agent_bin,
        agent_args: &agent_args,
        nginx_pid: nginx.pid,
        out_dir: &out_dir,
        clk_tck: clk_tck(),
    };
    let mut samples: Vec<Sample> = Vec::new();
    let mut tls_calls: Vec<TlsCallSample> = Vec::new();
    for round in 1..=plan.rounds {
        for w in &workloads {
            for config in [Config::Baseline, Config::Agent] {
                check_interrupted()?;
                let s = measure(&ctx, round, w, config)?;
                eprintln!("bench: {}", s.one_line());
                samples.push(s);
                if config == Config::Agent {
                    // Let the detached programs and the receiver settle.
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        check_interrupted()?;
        let t = measure_tls_calls(&ctx, round, plan.uprobe_iterations, &cert, &key)?;
        eprintln!("bench: {}", t.one_line());
        tls_calls.push(t);
    }

    // 5. Stop the servers (their logs go with the results), then report.
    rotel.stop();
    nginx.stop();
    std::fs::write(out_dir.join("logs/rotel.log"), rotel.text()).ok();
    std::fs::copy(tmp.0.join("error.log"), out_dir.join("logs/nginx-error.log")).ok();
    std::fs::copy(&nginx_conf, out_dir.join("logs/nginx.conf")).ok();

    let commands = Commands {
        wrk: format!("wrk {}", workloads[0].args.join(" ")),
        hey: format!("hey {}", workloads[1].args.join(" ")),
        wrk_https: format!("wrk {}", workloads[2].args.join(" ")),
        tls_calls: format!("{SYSTEM_PYTHON} -c <in-memory TLS loop, see bench.rs> {} CERT KEY", plan.uprobe_iterations),
        agent: format!("{} {}", agent_bin.display(), agent_args.join(" ")),
        rotel: rotel_shown,
        nginx: nginx_shown,
    };
    let report = Report::new(&plan, started, machine, commands, samples, tls_calls, t0.elapsed());
    let md = report.markdown();
    std::fs::write(out_dir.join("summary.md"), &md)?;
    std::fs::write(out_dir.join("raw.json"), serde_json::to_string_pretty(&report.json())? + "\n")?;
    println!("{md}");
    eprintln!("bench: wrote {} and {}", out_dir.join("summary.md").display(), out_dir.join("raw.json").display());
    Ok(())
}

// ---------------------------------------------------------------------------
// Plan and measurement

struct Plan {
    quick: bool,
    rounds: usize,
    wrk_secs: u32,
    hey_secs: u32,
    uprobe_iterations: u32,
}

impl Plan {
    fn new(args: &BenchArgs) -> Plan {
        let (rounds, secs) = if args.quick { (1, 5) } else { (3, 10) };
        Plan {
            quick: args.quick,
            rounds: args.rounds.unwrap_or(rounds).max(1),
            wrk_secs: secs,
            hey_secs: secs,
            uprobe_iterations: if args.quick { UPROBE_ITERATIONS_QUICK } else { UPROBE_ITERATIONS },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WorkloadKind {
    /// Closed loop, as fast as nginx answers.
    Wrk,
    /// Open loop at RATE_LIMITED_RPS.
    Hey,
    /// Closed loop over HTTPS (TLS 1.3, keep-alive).
    WrkHttps,
    /// The same HTTPS load, the agent running with the tls feature disabled
    /// (from a config file): what a switched-off feature still costs.
    WrkHttpsTlsOff,
}

/// Every workload, in report order.
const WORKLOADS: [WorkloadKind; 4] =
    [WorkloadKind::Wrk, WorkloadKind::Hey, WorkloadKind::WrkHttps, WorkloadKind::WrkHttpsTlsOff];

/// A disabled feature must cost almost nothing: within 2% of no agent.
const TARGET_TLS_OFF_RATIO: f64 = 0.98;

impl WorkloadKind {
    fn label(self) -> String {
        match self {
            WorkloadKind::Wrk => format!("wrk max, {WRK_CONNECTIONS} conns"),
            WorkloadKind::Hey => format!("hey {}k req/s", RATE_LIMITED_RPS / 1000),
            WorkloadKind::WrkHttps => format!("wrk https max, {WRK_CONNECTIONS} conns"),
            WorkloadKind::WrkHttpsTlsOff => format!("wrk https max, {WRK_CONNECTIONS} conns, tls disabled"),
        }
    }
    fn key(self) -> &'static str {
        match self {
            WorkloadKind::Wrk => "wrk",
            WorkloadKind::Hey => "hey",
            WorkloadKind::WrkHttps => "wrk_https",
            WorkloadKind::WrkHttpsTlsOff => "wrk_https_tls_off",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Baseline,
    Agent,
}

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::Baseline => "no agent",
            Config::Agent => "agent",
        }
    }
}

struct Workload {
    kind: WorkloadKind,
    program: &'static str,
    args: Vec<String>,
    secs: u32,
    /// Extra `periscope run` arguments for this workload's agent runs.
    agent_extra: Vec<String>,
}

struct RunCtx<'a> {
    agent_bin: &'a Path,
    agent_args: &'a [String],
    nginx_pid: u32,
    out_dir: &'a Path,
    clk_tck: u64,
}

/// What the load generator reported, in one shape for wrk and hey.
#[derive(Clone, Debug, Default, PartialEq)]
struct LoadResult {
    /// Completed requests (responses received).
    requests: u64,
    rps: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    /// Socket errors (wrk) or failed requests (hey).
    errors: u64,
    /// Responses that were not 2xx/3xx.
    non_2xx: u64,
}

/// The agent's own figures for one run.
#[derive(Clone, Debug, Default)]
struct AgentRun {
    startup_ms: u64,
    cpu_ms: f64,
    /// Time after the load ended until the agent's CPU use settled.
    drain_ms: u64,
    peak_rss_kib: u64,
    end_rss_kib: u64,
    stop: Option<StopLine>,
    /// How the agent ended after SIGINT ("exit status: 0", or "killed after 10 s").
    exit: String,
}

/// `stopped: N events, N spans built, N exported, N dropped, N events lost in kernel`
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct StopLine {
    events: u64,
    spans_built: u64,
    exported: u64,
    dropped: u64,
    lost: u64,
}

struct Sample {
    round: usize,
    workload: WorkloadKind,
    config: Config,
    command: String,
    load: LoadResult,
    nginx_cpu_ms: f64,
    agent: Option<AgentRun>,
    /// Other `periscope` processes seen on the machine during the run (noise).
    others: Vec<u32>,
    /// /proc/loadavg (1, 5, 15 min) just before the run.
    loadavg: String,
    raw_output: String,
}

impl Sample {
    fn agent_cpu_per_1k(&self) -> Option<f64> {
        let a = self.agent.as_ref()?;
        (self.load.requests > 0).then(|| a.cpu_ms * 1000.0 / self.load.requests as f64)
    }
    fn nginx_cpu_per_1k(&self) -> Option<f64> {
        (self.load.requests > 0).then(|| self.nginx_cpu_ms * 1000.0 / self.load.requests as f64)
    }
    fn one_line(&self) -> String {
        let mut s = format!(
            "round {} {} {}: {:.0} req/s, {} requests, p50 {}, p99 {}",
            self.round,
            self.workload.key(),
            self.config.label(),
            self.load.rps,
            self.load.requests,
            fmt_us(self.load.p50_us),
            fmt_us(self.load.p99_us)
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
        s
    }
}

fn measure(ctx: &RunCtx, round: usize, w: &Workload, config: Config) -> Result<Sample> {
    let tag = format!("r{round}-{}-{}", w.kind.key(), if config == Config::Agent { "agent" } else { "base" });
    wait_for_other_agents(Duration::from_secs(180))?;
    eprintln!("bench: {tag}: {} {}", w.program, w.args.join(" "));
    let loadavg = loadavg();
    let mut others = other_periscopes(None);

    let mut agent = None;
    let mut startup_ms = 0;
    if config == Config::Agent {
        let mut cmd = Command::new(ctx.agent_bin);
        cmd.args(ctx.agent_args).args(&w.agent_extra).env("RUST_LOG", "info");
        let t = Instant::now();
        let mut p = Proc::spawn("periscope", &mut cmd, libc::SIGINT, Duration::from_secs(10))?;
        if let Err(e) = p.wait_line(Duration::from_secs(120), |l| l.contains("periscope ready")) {
            p.stop();
            std::fs::write(ctx.out_dir.join(format!("logs/agent-{tag}.log")), p.text()).ok();
            return Err(e);
        }
        startup_ms = t.elapsed().as_millis() as u64;
        // Let start-up work (process discovery, first allocations) finish.
        std::thread::sleep(Duration::from_secs(1));
        others = other_periscopes(Some(p.pid));
        agent = Some(p);
    }

    let nginx_workers = children_of(ctx.nginx_pid);
    let nginx0 = sum_ticks(&nginx_workers);
    let agent0 = match &agent {
        Some(p) => cpu_ticks(p.pid)?,
        None => 0,
    };

    let run = run_load(w, ctx.out_dir, &tag);

    let nginx1 = sum_ticks(&nginx_workers);
    let mut agent_run = None;
    if let Some(mut p) = agent {
        // The agent may still be draining the ring buffer and exporting: count
        // that too, until its CPU use settles (at most 15 s).
        let t_end = Instant::now();
        let mut last = cpu_ticks(p.pid).unwrap_or(agent0);
        let mut settled_at = t_end;
        while t_end.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(500));
            let now = cpu_ticks(p.pid).unwrap_or(last);
            if now.saturating_sub(last) <= 1 {
                break;
            }
            last = now;
            settled_at = Instant::now();
        }
        let drain_ms = (settled_at - t_end).as_millis() as u64;
        let agent1 = cpu_ticks(p.pid).unwrap_or(last);
        let peak_rss_kib = proc_status_kib(p.pid, "VmHWM:").unwrap_or(0);
        let end_rss_kib = proc_status_kib(p.pid, "VmRSS:").unwrap_or(0);
        let still_running = p.is_running();
        let exit = match p.stop() {
            Some(st) if still_running && p.killed => format!("killed: no exit within 10 s of SIGINT ({st})"),
            Some(st) if !still_running => format!("exited before SIGINT ({st})"),
            Some(st) => st.to_string(),
            None => "unknown".into(),
        };
        let log = p.text();
        std::fs::write(ctx.out_dir.join(format!("logs/agent-{tag}.log")), &log).ok();
        let stop = log.lines().rev().find_map(parse_stop_line);
        agent_run = Some(AgentRun {
            startup_ms,
            cpu_ms: ticks_ms(agent1.saturating_sub(agent0), ctx.clk_tck),
            drain_ms,
            peak_rss_kib,
            end_rss_kib,
            stop,
            exit,
        });
    }
    let (command, raw_output, load) = run?;
    Ok(Sample {
        round,
        workload: w.kind,
        config,
        command,
        load,
        nginx_cpu_ms: ticks_ms(nginx1.saturating_sub(nginx0), ctx.clk_tck),
        agent: agent_run,
        others,
        loadavg,
        raw_output,
    })
}

/// Run wrk or hey to completion; returns (command line, raw stdout, parsed).
fn run_load(w: &Workload, out_dir: &Path, tag: &str) -> Result<(String, String, LoadResult)> {
    let mut cmd = Command::new(w.program);
    cmd.args(&w.args);
    let shown = show(&cmd);
    let mut p = Proc::spawn(w.program, &mut cmd, libc::SIGTERM, Duration::from_secs(2))?;
    let status = p.wait_exit(Duration::from_secs(w.secs as u64 + 60))?;
    let out = p.stdout_text();
    std::fs::write(out_dir.join(format!("logs/{tag}-{}.txt", w.program)), p.text()).ok();
    if !status.success() {
        bail!("`{shown}` failed ({status}):\n{}", p.text());
    }
    let parsed = match w.kind {
        WorkloadKind::Wrk | WorkloadKind::WrkHttps | WorkloadKind::WrkHttpsTlsOff => parse_wrk(&out),
        WorkloadKind::Hey => parse_hey(&out),
    }
    .with_context(|| format!("parsing the output of `{shown}`:\n{out}"))?;
    Ok((shown, out, parsed))
}

// ---------------------------------------------------------------------------
// The cost of one hooked TLS call

/// Debian's Python: its `ssl` module calls the system libssl (hooked by the
/// agent); the Python on PATH may be another build.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// An in-memory TLS 1.3 pair (no socket, no syscalls), then N iterations of
/// `client.write(64 bytes)` (`SSL_write_ex`) and `server.read(64)`
/// (`SSL_read_ex`); prints the CPU time of the loop alone.
const TLS_CALLS_SCRIPT: &str = r#"
import ssl, sys, time
n = int(sys.argv[1])
sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
sctx.load_cert_chain(sys.argv[2], sys.argv[3])
cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
cctx.check_hostname = False
cctx.verify_mode = ssl.CERT_NONE
c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
c = cctx.wrap_bio(c_in, c_out, server_side=False)
s = sctx.wrap_bio(s_in, s_out, server_side=True)
done = {c: False, s: False}
for _ in range(50):
    for o in (c, s):
        if not done[o]:
            try:
                o.do_handshake()
                done[o] = True
            except ssl.SSLWantReadError:
                pass
    d = c_out.read()
    if d:
        s_in.write(d)
    d = s_out.read()
    if d:
        c_in.write(d)
    if all(done.values()):
        break
assert all(done.values()), "in-memory handshake did not finish"
msg = b"x" * 64
t0 = time.process_time()
for _ in range(n):
    c.write(msg)
    s_in.write(c_out.read())
    s.read(64)
cpu = time.process_time() - t0
print("tls-calls %d cpu_s %.6f version %s" % (2 * n, cpu, c.version()), flush=True)
"#;

/// One round of the TLS call measurement.
#[derive(Clone, Debug, Default)]
struct TlsCallSample {
    round: usize,
    calls: u64,
    baseline_cpu_s: f64,
    agent_cpu_s: f64,
    /// Events the agent counted while it ran (from its `stopped:` line).
    agent_events: Option<u64>,
    others: Vec<u32>,
}

impl TlsCallSample {
    /// Extra CPU per library call with the agent (one uprobe + one uretprobe).
    fn ns_per_call(&self) -> Option<f64> {
        (self.calls > 0).then(|| (self.agent_cpu_s - self.baseline_cpu_s) * 1e9 / self.calls as f64)
    }
    fn one_line(&self) -> String {
        format!(
            "round {} TLS calls: {} calls, {:.3} s CPU without agent, {:.3} s with: {} ns extra per call{}",
            self.round,
            self.calls,
            self.baseline_cpu_s,
            self.agent_cpu_s,
            fmt_f(self.ns_per_call(), 0),
            self.agent_events.map_or(String::new(), |e| format!(" ({e} agent events)"))
        )
    }
}

fn run_tls_calls(iterations: u32, cert: &Path, key: &Path, out_dir: &Path, tag: &str) -> Result<(u64, f64)> {
    let mut cmd = Command::new(SYSTEM_PYTHON);
    cmd.arg("-c").arg(TLS_CALLS_SCRIPT).arg(iterations.to_string()).arg(cert).arg(key);
    let mut p = Proc::spawn("python3-tls-calls", &mut cmd, libc::SIGTERM, Duration::from_secs(2))?;
    let st = p.wait_exit(Duration::from_secs(600))?;
    let out = p.text();
    std::fs::write(out_dir.join(format!("logs/{tag}-tls-calls.txt")), &out).ok();
    if !st.success() {
        bail!("the TLS call loop failed ({st}):\n{out}");
    }
    parse_tls_calls(&out).with_context(|| format!("parsing the TLS call loop's output:\n{out}"))
}

/// `tls-calls N cpu_s S version V` -> (N, S).
fn parse_tls_calls(text: &str) -> Result<(u64, f64)> {
    let line = text.lines().find(|l| l.starts_with("tls-calls ")).context("no `tls-calls` line")?;
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 4 || f[2] != "cpu_s" {
        bail!("unexpected line {line:?}");
    }
    Ok((f[1].parse()?, f[3].parse()?))
}

/// The loop without the agent, then with it (started and stopped around it).
fn measure_tls_calls(ctx: &RunCtx, round: usize, iterations: u32, cert: &Path, key: &Path) -> Result<TlsCallSample> {
    wait_for_other_agents(Duration::from_secs(180))?;
    let mut others = other_periscopes(None);
    let tag = format!("r{round}");
    eprintln!("bench: {tag}: TLS call loop, {iterations} iterations, without and with the agent");
    let (calls, baseline_cpu_s) = run_tls_calls(iterations, cert, key, ctx.out_dir, &format!("{tag}-base"))?;
    let mut cmd = Command::new(ctx.agent_bin);
    cmd.args(ctx.agent_args).env("RUST_LOG", "info");
    let mut p = Proc::spawn("periscope", &mut cmd, libc::SIGINT, Duration::from_secs(10))?;
    let log_path = ctx.out_dir.join(format!("logs/agent-{tag}-tls-calls.log"));
    if let Err(e) = p.wait_line(Duration::from_secs(120), |l| l.contains("periscope ready")) {
        p.stop();
        std::fs::write(&log_path, p.text()).ok();
        return Err(e);
    }
    std::thread::sleep(Duration::from_secs(1));
    others.extend(other_periscopes(Some(p.pid)));
    let run = run_tls_calls(iterations, cert, key, ctx.out_dir, &format!("{tag}-agent"));
    p.stop();
    let log = p.text();
    std::fs::write(&log_path, &log).ok();
    let (_, agent_cpu_s) = run?;
    others.sort_unstable();
    others.dedup();
    Ok(TlsCallSample {
        round,
        calls,
        baseline_cpu_s,
        agent_cpu_s,
        agent_events: log.lines().rev().find_map(parse_stop_line).map(|s| s.events),
        others,
    })
}

// ---------------------------------------------------------------------------
// Parsers (unit-tested below with captured output)

/// A wrk duration (`179.00us`, `1.23ms`, `2.00s`, `1.50m`, `1.00h`) in microseconds.
fn parse_wrk_time(s: &str) -> Option<f64> {
    let s = s.trim().trim_end_matches(',');
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(v * scale)
}

fn parse_wrk(text: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    let mut in_dist = false;
    let (mut have_rps, mut have_requests) = (false, false);
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let mut it = t.split_whitespace();
            if let (Some(pct), Some(val)) = (it.next(), it.next())
                && let Some(p) = pct.strip_suffix('%')
            {
                let v = parse_wrk_time(val);
                match p {
                    "50" => r.p50_us = v,
                    "99" => r.p99_us = v,
                    _ => {}
                }
                continue;
            }
            in_dist = false;
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("Requests/sec")?;
            have_rps = true;
        } else if let Some((n, rest)) = t.split_once(" requests in ") {
            if rest.split_whitespace().next().and_then(parse_wrk_time).is_some() {
                r.requests = n.trim().parse().context("N requests in")?;
                have_requests = true;
            }
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    r.errors += n.parse::<u64>().context("Socket errors")?;
                }
            }
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("Non-2xx")?;
        }
    }
    if !have_rps || !have_requests {
        bail!("no `Requests/sec:` or `N requests in` line in wrk's output");
    }
    Ok(r)
}

fn parse_hey(text: &str) -> Result<LoadResult> {
    #[derive(PartialEq)]
    enum Section {
        Other,
        Latency,
        Status,
        Errors,
    }
    let mut r = LoadResult::default();
    let mut section = Section::Other;
    let mut have_rps = false;
    let mut total_s = None;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        match t {
            "Latency distribution:" => {
                section = Section::Latency;
                continue;
            }
            "Status code distribution:" => {
                section = Section::Status;
                continue;
            }
            "Error distribution:" => {
                section = Section::Errors;
                continue;
            }
            _ => {}
        }
        if t.ends_with(':') || t.starts_with("Details") || t.starts_with("Response time histogram") {
            section = Section::Other;
            continue;
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("Requests/sec")?;
            have_rps = true;
            continue;
        }
        if let Some(v) = t.strip_prefix("Total:") {
            total_s = v.split_whitespace().next().and_then(|v| v.parse::<f64>().ok());
            continue;
        }
        match section {
            Section::Latency => {
                // "50% in 0.0002 secs"
                let mut it = t.split_whitespace();
                if let (Some(pct), Some("in"), Some(v), Some("secs")) = (it.next(), it.next(), it.next(), it.next()) {
                    let us = v.parse::<f64>().ok().map(|s| s * 1e6);
                    match pct {
                        "50%" => r.p50_us = us,
                        "99%" => r.p99_us = us,
                        _ => {}
                    }
                }
            }
            Section::Status | Section::Errors => {
                // "[200]\t24944 responses" / "[3]\tGet http://...: EOF"
                if let Some(rest) = t.strip_prefix('[')
                    && let Some((a, b)) = rest.split_once(']')
                {
                    if section == Section::Status {
                        let code: u32 = a.parse().context("status code")?;
                        let n: u64 = b.split_whitespace().next().unwrap_or("").parse().context("response count")?;
                        r.requests += n;
                        if !(200..400).contains(&code) {
                            r.non_2xx += n;
                        }
                    } else {
                        r.errors += a.parse::<u64>().context("error count")?;
                    }
                }
            }
            Section::Other => {}
        }
    }
    if !have_rps {
        bail!("no `Requests/sec:` line in hey's output");
    }
    // hey's Requests/sec counts failed requests too; count responses, as wrk does.
    if let Some(t) = total_s.filter(|t| *t > 0.0) {
        r.rps = r.requests as f64 / t;
    }
    Ok(r)
}

/// The agent's last words: `... stopped: 1 events, 2 spans built, 3 exported, 4 dropped, 5 events lost in kernel`.
fn parse_stop_line(line: &str) -> Option<StopLine> {
    let (_, rest) = line.split_once("stopped:")?;
    let mut s = StopLine::default();
    let mut seen = 0;
    for part in rest.split(',') {
        let part = part.trim();
        let (n, label) = part.split_once(' ')?;
        let n: u64 = n.parse().ok()?;
        let slot = match label.trim() {
            "events" => &mut s.events,
            "spans built" => &mut s.spans_built,
            "exported" => &mut s.exported,
            "dropped" => &mut s.dropped,
            l if l.starts_with("events lost") => &mut s.lost,
            _ => continue,
        };
        *slot = n;
        seen += 1;
    }
    (seen == 5).then_some(s)
}

// ---------------------------------------------------------------------------
// Report

struct Commands {
    wrk: String,
    hey: String,
    wrk_https: String,
    tls_calls: String,
    agent: String,
    rotel: String,
    nginx: String,
}

struct Machine {
    nproc: usize,
    kernel: String,
    loadavg: String,
    versions: Vec<(String, String)>,
}

struct Report {
    quick: bool,
    rounds: usize,
    started: String,
    elapsed: Duration,
    machine: Machine,
    commands: Commands,
    samples: Vec<Sample>,
    tls_calls: Vec<TlsCallSample>,
}

/// Aggregates for one (workload, config) over the rounds.
struct Agg {
    runs: usize,
    rps: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    requests: u64,
    errors: u64,
    non_2xx: u64,
    nginx_cpu_1k: Option<f64>,
    agent_cpu_1k: Option<f64>,
    peak_rss_mib: Option<f64>,
    lost: Option<u64>,
    exported: Option<u64>,
    built: Option<u64>,
    dropped: Option<u64>,
    /// Events the agent received, summed over runs.
    events: Option<u64>,
    /// Agent runs without a `stopped:` line.
    missing_stop: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Verdict {
    Met,
    Missed,
    Unknown,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Met => "yes",
            Verdict::Missed => "**NO**",
            Verdict::Unknown => "unknown",
        }
    }
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

struct Target {
    name: String,
    measured: String,
    verdict: Verdict,
}

impl Report {
    fn new(
        plan: &Plan,
        started: String,
        machine: Machine,
        commands: Commands,
        samples: Vec<Sample>,
        tls_calls: Vec<TlsCallSample>,
        elapsed: Duration,
    ) -> Report {
        Report { quick: plan.quick, rounds: plan.rounds, started, elapsed, machine, commands, samples, tls_calls }
    }

    /// Median extra CPU per hooked TLS call, from the in-memory loop.
    fn tls_call_ns(&self) -> Option<f64> {
        median(self.tls_calls.iter().filter_map(|t| t.ns_per_call()))
    }

    /// The proxy from the HTTPS runs: nginx's extra CPU per request with the
    /// agent, over its estimated hooked calls per request (see [`TlsProxy`]).
    fn tls_call_proxy(&self) -> TlsProxy {
        let delta_ns = |w: WorkloadKind| -> Option<f64> {
            let b = self.agg(w, Config::Baseline).nginx_cpu_1k?;
            let a = self.agg(w, Config::Agent).nginx_cpu_1k?;
            Some((a - b) * 1e6 / 1000.0)
        };
        let per_req = |w: WorkloadKind| -> Option<f64> {
            let a = self.agg(w, Config::Agent);
            let e = a.events?;
            (a.requests > 0).then(|| e as f64 / a.requests as f64)
        };
        let https = delta_ns(WorkloadKind::WrkHttps);
        let http = delta_ns(WorkloadKind::Wrk);
        let (ev_https, ev_http) = (per_req(WorkloadKind::WrkHttps), per_req(WorkloadKind::Wrk));
        // On a TLS connection the agent's events are the plaintext of the
        // SSL_read/SSL_write calls that moved data (it stops sending the
        // ciphertext once the handshake is seen: events per HTTPS request
        // are about those per plain HTTP request), and nginx and wrk each
        // make half of them. Calls that moved nothing (a read that would
        // block) trap too but send no event: the count is low, so the cost
        // per call is, if anything, overstated.
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

    fn runs(&self, w: WorkloadKind, c: Config) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.workload == w && s.config == c)
    }

    fn agg(&self, w: WorkloadKind, c: Config) -> Agg {
        let runs: Vec<&Sample> = self.runs(w, c).collect();
        let agents: Vec<&AgentRun> = runs.iter().filter_map(|s| s.agent.as_ref()).collect();
        let stops: Vec<&StopLine> = agents.iter().filter_map(|a| a.stop.as_ref()).collect();
        let all_stopped = !agents.is_empty() && stops.len() == agents.len();
        Agg {
            runs: runs.len(),
            rps: median(runs.iter().map(|s| s.load.rps)),
            p50: median(runs.iter().filter_map(|s| s.load.p50_us)),
            p99: median(runs.iter().filter_map(|s| s.load.p99_us)),
            requests: runs.iter().map(|s| s.load.requests).sum(),
            errors: runs.iter().map(|s| s.load.errors).sum(),
            non_2xx: runs.iter().map(|s| s.load.non_2xx).sum(),
            nginx_cpu_1k: median(runs.iter().filter_map(|s| s.nginx_cpu_per_1k())),
            agent_cpu_1k: median(runs.iter().filter_map(|s| s.agent_cpu_per_1k())),
            peak_rss_mib: agents.iter().map(|a| a.peak_rss_kib as f64 / 1024.0).reduce(f64::max),
            lost: all_stopped.then(|| stops.iter().map(|s| s.lost).sum()),
            exported: all_stopped.then(|| stops.iter().map(|s| s.exported).sum()),
            built: all_stopped.then(|| stops.iter().map(|s| s.spans_built).sum()),
            dropped: all_stopped.then(|| stops.iter().map(|s| s.dropped).sum()),
            events: all_stopped.then(|| stops.iter().map(|s| s.events).sum()),
            missing_stop: agents.len() - stops.len(),
        }
    }

    fn ratio(&self, w: WorkloadKind) -> Option<f64> {
        let b = self.agg(w, Config::Baseline).rps?;
        let a = self.agg(w, Config::Agent).rps?;
        (b > 0.0).then(|| a / b)
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let wrk_ratio = self.ratio(WorkloadKind::Wrk);
        t.push(Target {
            name: format!(
                "throughput with agent >= {:.0}% of without (wrk, median req/s)",
                TARGET_THROUGHPUT_RATIO * 100.0
            ),
            measured: wrk_ratio.map_or("n/a".into(), |r| format!("{:.1}%", r * 100.0)),
            verdict: match wrk_ratio {
                Some(r) if r >= TARGET_THROUGHPUT_RATIO => Verdict::Met,
                Some(_) => Verdict::Missed,
                None => Verdict::Unknown,
            },
        });
        let rss = WORKLOADS.iter().filter_map(|w| self.agg(*w, Config::Agent).peak_rss_mib).reduce(f64::max);
        t.push(Target {
            name: format!("agent peak RSS < {TARGET_RSS_MIB:.0} MiB (VmHWM, worst run)"),
            measured: rss.map_or("n/a".into(), |m| format!("{m:.1} MiB")),
            verdict: match rss {
                Some(m) if m > 0.0 && m < TARGET_RSS_MIB => Verdict::Met,
                Some(m) if m > 0.0 => Verdict::Missed,
                _ => Verdict::Unknown,
            },
        });
        let hey = self.agg(WorkloadKind::Hey, Config::Agent);
        let achieved = hey.rps.unwrap_or(0.0);
        let https_ratio = self.ratio(WorkloadKind::WrkHttps);
        let rate_ok = achieved >= RATE_LIMITED_RPS as f64 * 0.9;
        t.push(Target {
            name: format!("zero events lost at {}k req/s (hey, all runs)", RATE_LIMITED_RPS / 1000),
            measured: match hey.lost {
                Some(l) => format!("{l} lost at {achieved:.0} req/s achieved"),
                None => format!("n/a ({} agent run(s) without a `stopped:` line)", hey.missing_stop),
            },
            verdict: match hey.lost {
                Some(0) if rate_ok => Verdict::Met,
                Some(0) => Verdict::Unknown,
                Some(_) => Verdict::Missed,
                None => Verdict::Unknown,
            },
        });
        t.push(Target {
            name: format!(
                "HTTPS throughput with agent >= {:.0}% of without (wrk https, TLS 1.3, median req/s)",
                TARGET_HTTPS_THROUGHPUT_RATIO * 100.0
            ),
            measured: https_ratio.map_or("n/a".into(), |r| format!("{:.1}%", r * 100.0)),
            verdict: match https_ratio {
                Some(r) if r >= TARGET_HTTPS_THROUGHPUT_RATIO => Verdict::Met,
                Some(_) => Verdict::Missed,
                None => Verdict::Unknown,
            },
        });
        let off_ratio = self.ratio(WorkloadKind::WrkHttpsTlsOff);
        t.push(Target {
            name: format!(
                "HTTPS with tls disabled >= {:.0}% of no agent (wrk https, median req/s)",
                TARGET_TLS_OFF_RATIO * 100.0
            ),
            measured: off_ratio.map_or("n/a".into(), |r| format!("{:.1}%", r * 100.0)),
            verdict: match off_ratio {
                Some(r) if r >= TARGET_TLS_OFF_RATIO => Verdict::Met,
                Some(_) => Verdict::Missed,
                None => Verdict::Unknown,
            },
        });
        t
    }

    fn markdown(&self) -> String {
        let mut m = String::new();
        let mode = if self.quick { "quick" } else { "full" };
        m.push_str(&format!(
            "# Periscope benchmark ({mode}: {} round(s), started {} UTC, took {:.0} s)\n\n",
            self.rounds,
            self.started,
            self.elapsed.as_secs_f64()
        ));
        m.push_str(&format!(
            "nginx (1 worker, static 47-byte page, keep-alive with nginx's default 1000 requests per connection; HTTPS on a \
             second port with TLS 1.3 and a self-signed RSA-2048 certificate) on 127.0.0.1; \
             the agent exports OTLP/gRPC to Rotel (blackhole exporter). {} CPU(s): nginx has 1 worker and wrk 1 thread, \
             the agent and Rotel share what is left: nothing is pinned. Kernel {}, load average at start {}. \
             Configurations are interleaved per round ([no agent, agent] for each workload); figures are medians over rounds, \
             every ratio is against the baseline of this run.\n\n",
            self.machine.nproc, self.machine.kernel, self.machine.loadavg
        ));

        m.push_str("## Targets\n\n| target | measured | met |\n|---|---|---|\n");
        let targets = self.targets();
        for t in &targets {
            m.push_str(&format!("| {} | {} | {} |\n", t.name, t.measured, t.verdict.word()));
        }
        let missed: Vec<&Target> = targets.iter().filter(|t| t.verdict != Verdict::Met).collect();
        if missed.is_empty() {
            m.push_str("\nAll targets met.\n\n");
        } else {
            m.push('\n');
            for t in missed {
                let what = if t.verdict == Verdict::Missed { "MISSED" } else { "NOT ESTABLISHED" };
                m.push_str(&format!("- Target {what}: {} (measured: {}).\n", t.name, t.measured));
            }
            m.push('\n');
        }

        m.push_str("## Results (medians over rounds)\n\n");
        m.push_str("| workload | config | req/s | ratio | p50 | p99 | agent CPU ms / 1k req | agent peak RSS MiB | events lost | spans exported / requests | nginx CPU ms / 1k req | target met |\n");
        m.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for w in WORKLOADS {
            for c in [Config::Baseline, Config::Agent] {
                let a = self.agg(w, c);
                let ratio = match c {
                    Config::Baseline => "100%".to_string(),
                    Config::Agent => fmt_f(self.ratio(w).map(|r| r * 100.0), 1) + "%",
                };
                let spans = match (c, a.exported) {
                    (Config::Baseline, _) => "-".to_string(),
                    (Config::Agent, Some(e)) => format!(
                        "{e} / {} ({})",
                        a.requests,
                        if a.requests > 0 { format!("{:.3}", e as f64 / a.requests as f64) } else { "n/a".into() }
                    ),
                    (Config::Agent, None) => "n/a".into(),
                };
                let target = match (w, c) {
                    (_, Config::Baseline) => "-".to_string(),
                    (WorkloadKind::Wrk, Config::Agent) => format!("throughput: {}", targets[0].verdict.word()),
                    (WorkloadKind::Hey, Config::Agent) => format!("zero lost: {}", targets[2].verdict.word()),
                    (WorkloadKind::WrkHttps, Config::Agent) => {
                        format!("https throughput: {}", targets[3].verdict.word())
                    }
                    (WorkloadKind::WrkHttpsTlsOff, Config::Agent) => {
                        format!("tls off cost: {}", targets[4].verdict.word())
                    }
                };
                m.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    w.label(),
                    c.label(),
                    fmt_f(a.rps, 0),
                    ratio,
                    fmt_us(a.p50),
                    fmt_us(a.p99),
                    if c == Config::Agent { fmt_f(a.agent_cpu_1k, 2) } else { "-".into() },
                    if c == Config::Agent { fmt_f(a.peak_rss_mib, 1) } else { "-".into() },
                    if c == Config::Agent { a.lost.map_or("n/a".into(), |l| l.to_string()) } else { "-".into() },
                    spans,
                    fmt_f(a.nginx_cpu_1k, 2),
                    target
                ));
            }
        }
        m.push_str(
            "\nrequests = responses the load generator received, summed over rounds. Each request can give two spans \
             (nginx's server span and the load generator's client span), so 2.000 spans per request means every request \
             was accounted for on both sides. Agent CPU counts from `periscope ready` + 1 s to when its CPU use settled \
             after the load (user + system time of all its threads); the kernel programs' own cost is charged to the \
             traced processes (see nginx CPU) and shows in the throughput ratio. hey reports latency in 0.1 ms steps.\n\n",
        );

        let mut notes = Vec::new();
        for w in WORKLOADS {
            for c in [Config::Baseline, Config::Agent] {
                let a = self.agg(w, c);
                if a.errors > 0 || a.non_2xx > 0 {
                    notes.push(format!(
                        "{} {}: {} socket errors / failed requests, {} non-2xx/3xx responses",
                        w.label(),
                        c.label(),
                        a.errors,
                        a.non_2xx
                    ));
                }
                if c == Config::Agent {
                    if let Some(d) = a.dropped.filter(|d| *d > 0) {
                        notes.push(format!("{} agent: the exporter dropped {d} spans", w.label()));
                    }
                    if let (Some(e), Some(b)) = (a.exported, a.built)
                        && e != 2 * a.requests
                    {
                        let per = |n: u64| if a.requests > 0 { n as f64 / a.requests as f64 } else { 0.0 };
                        notes.push(format!(
                            "{} agent: {} requests completed; {b} spans built ({:.3} per request), {e} exported ({:.3}), \
                             {} dropped by the exporter. 2 per request is exact; a few more are requests in flight \
                             when the load generator stopped, or other traffic on the machine",
                            w.label(),
                            a.requests,
                            per(b),
                            per(e),
                            a.dropped.unwrap_or(0)
                        ));
                    }
                    if a.missing_stop > 0 {
                        notes.push(format!(
                            "{} agent: {} run(s) ended without a `stopped:` line (see logs/)",
                            w.label(),
                            a.missing_stop
                        ));
                    }
                }
            }
        }
        for s in &self.samples {
            if let Some(a) = &s.agent
                && a.exit != "exit status: 0"
            {
                notes.push(format!("round {} {}: agent {}", s.round, s.workload.key(), a.exit));
            }
            if !s.others.is_empty() {
                notes.push(format!(
                    "round {} {} {}: other periscope process(es) were running ({:?}): figures of this run are disturbed",
                    s.round,
                    s.workload.key(),
                    s.config.label(),
                    s.others
                ));
            }
        }
        if !notes.is_empty() {
            m.push_str("## Notes\n\n");
            for n in notes {
                m.push_str(&format!("- {n}\n"));
            }
            m.push('\n');
        }

        m.push_str(&self.tls_call_markdown());

        m.push_str("## Every run\n\n| round | workload | config | req/s | requests | p50 | p99 | agent CPU ms | ms / 1k req | peak RSS MiB | drain ms | events | spans exported | lost |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for s in &self.samples {
            let (cpu, per1k, rss, drain, events, exported, lost) = match &s.agent {
                Some(a) => (
                    format!("{:.0}", a.cpu_ms),
                    fmt_f(s.agent_cpu_per_1k(), 2),
                    format!("{:.1}", a.peak_rss_kib as f64 / 1024.0),
                    a.drain_ms.to_string(),
                    a.stop.as_ref().map_or("n/a".into(), |x| x.events.to_string()),
                    a.stop.as_ref().map_or("n/a".into(), |x| x.exported.to_string()),
                    a.stop.as_ref().map_or("n/a".into(), |x| x.lost.to_string()),
                ),
                None => Default::default(),
            };
            m.push_str(&format!(
                "| {} | {} | {} | {:.0} | {} | {} | {} | {cpu} | {per1k} | {rss} | {drain} | {events} | {exported} | {lost} |\n",
                s.round,
                s.workload.key(),
                s.config.label(),
                s.load.rps,
                s.load.requests,
                fmt_us(s.load.p50_us),
                fmt_us(s.load.p99_us)
            ));
        }
        m.push_str(&format!(
            "\n## Commands\n\n```\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n```\n",
            self.commands.nginx,
            self.commands.rotel,
            self.commands.agent,
            self.commands.wrk,
            self.commands.hey,
            self.commands.wrk_https,
            self.commands.tls_calls
        ));
        if !self.machine.versions.is_empty() {
            m.push_str("\nVersions: ");
            m.push_str(&self.machine.versions.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
            m.push('\n');
        }
        m
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
        let p = self.tls_call_proxy();
        m.push_str(&format!(
            "- Proxy from the HTTPS runs: {} ns per call = nginx's extra CPU per HTTPS request with the agent ({} ns) / \
             nginx's estimated hooked calls per request ({}). Calls per request are estimated from the agent's event count: \
             events per HTTPS request ({}) / 2, because each SSL_read/SSL_write that moves data is one event, nginx and wrk \
             each make half of them, and the ciphertext is no longer sent once the handshake is seen (events per plain \
             HTTP request, for comparison: {}). Calls that move nothing (a read that would block) trap too but send no \
             event, so the calls are undercounted and the cost overstated. nginx's extra CPU also includes the socket \
             tracepoints that plain HTTP pays too ({} ns per plain request); without that part: {} ns per call.\n",
            fmt_f(p.ns_per_call, 0),
            fmt_f(p.nginx_extra_ns_https, 0),
            fmt_f(p.nginx_calls_per_req, 2),
            fmt_f(p.events_per_req_https, 2),
            fmt_f(p.events_per_req_http, 2),
            fmt_f(p.nginx_extra_ns_http, 0),
            fmt_f(p.ns_per_call_net, 0),
        ));
        if !self.tls_calls.is_empty() {
            m.push_str("\n| round | calls | CPU s without agent | CPU s with agent | ns per call | agent events |\n|---|---|---|---|---|---|\n");
            for t in &self.tls_calls {
                m.push_str(&format!(
                    "| {} | {} | {:.3} | {:.3} | {} | {} |\n",
                    t.round,
                    t.calls,
                    t.baseline_cpu_s,
                    t.agent_cpu_s,
                    fmt_f(t.ns_per_call(), 0),
                    t.agent_events.map_or("n/a".into(), |e| e.to_string())
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
                "agent_events": t.agent_events,
                "other_periscope_pids": t.others,
            })).collect::<Vec<_>>(),
            "proxy": {
                "nginx_extra_ns_per_https_request": p.nginx_extra_ns_https,
                "nginx_extra_ns_per_http_request": p.nginx_extra_ns_http,
                "agent_events_per_https_request": p.events_per_req_https,
                "agent_events_per_http_request": p.events_per_req_http,
                "nginx_hooked_calls_per_request_estimate": p.nginx_calls_per_req,
                "method": "nginx extra CPU per HTTPS request (agent - baseline) / (agent events per HTTPS request / 2)",
                "ns_per_call": p.ns_per_call,
                "ns_per_call_without_the_http_delta": p.ns_per_call_net,
            },
        })
    }

    fn json(&self) -> Value {
        let runs: Vec<Value> = self
            .samples
            .iter()
            .map(|s| {
                json!({
                    "round": s.round,
                    "workload": s.workload.key(),
                    "config": if s.config == Config::Agent { "agent" } else { "baseline" },
                    "command": s.command,
                    "requests": s.load.requests,
                    "requests_per_sec": s.load.rps,
                    "latency_p50_us": s.load.p50_us,
                    "latency_p99_us": s.load.p99_us,
                    "errors": s.load.errors,
                    "non_2xx_3xx": s.load.non_2xx,
                    "nginx_cpu_ms": s.nginx_cpu_ms,
                    "nginx_cpu_ms_per_1k_requests": s.nginx_cpu_per_1k(),
                    "other_periscope_pids": s.others,
                    "loadavg_before": s.loadavg,
                    "agent": s.agent.as_ref().map(|a| json!({
                        "startup_ms": a.startup_ms,
                        "cpu_ms": a.cpu_ms,
                        "cpu_ms_per_1k_requests": s.agent_cpu_per_1k(),
                        "drain_ms": a.drain_ms,
                        "peak_rss_kib": a.peak_rss_kib,
                        "end_rss_kib": a.end_rss_kib,
                        "exit": a.exit,
                        "stopped": a.stop.as_ref().map(|st| json!({
                            "events": st.events,
                            "spans_built": st.spans_built,
                            "exported": st.exported,
                            "dropped": st.dropped,
                            "events_lost_in_kernel": st.lost,
                        })),
                    })),
                    "raw_output": s.raw_output,
                })
            })
            .collect();
        let mut summary = serde_json::Map::new();
        for w in WORKLOADS {
            for c in [Config::Baseline, Config::Agent] {
                let a = self.agg(w, c);
                summary.insert(
                    format!("{}_{}", w.key(), if c == Config::Agent { "agent" } else { "baseline" }),
                    json!({
                        "runs": a.runs,
                        "median_requests_per_sec": a.rps,
                        "median_latency_p50_us": a.p50,
                        "median_latency_p99_us": a.p99,
                        "requests": a.requests,
                        "errors": a.errors,
                        "median_nginx_cpu_ms_per_1k_requests": a.nginx_cpu_1k,
                        "median_agent_cpu_ms_per_1k_requests": a.agent_cpu_1k,
                        "max_agent_peak_rss_mib": a.peak_rss_mib,
                        "events_lost": a.lost,
                        "spans_built": a.built,
                        "spans_exported": a.exported,
                        "spans_dropped": a.dropped,
                    }),
                );
            }
            summary.insert(format!("{}_throughput_ratio", w.key()), json!(self.ratio(w)));
        }
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
            "elapsed_s": self.elapsed.as_secs_f64(),
            "machine": {
                "cpus": self.machine.nproc,
                "kernel": self.machine.kernel,
                "loadavg_at_start": self.machine.loadavg,
                "versions": self.machine.versions.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            },
            "commands": {
                "nginx": self.commands.nginx,
                "rotel": self.commands.rotel,
                "agent": self.commands.agent,
                "wrk": self.commands.wrk,
                "hey": self.commands.hey,
                "wrk_https": self.commands.wrk_https,
                "tls_calls": self.commands.tls_calls,
            },
            "tls_call_cost": self.tls_call_json(),
            "targets": targets,
            "summary": summary,
            "runs": runs,
        })
    }
}

fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn fmt_f(v: Option<f64>, decimals: usize) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.decimals$}"))
}

fn fmt_us(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(us) if us < 1000.0 => format!("{us:.0} us"),
        Some(us) if us < 1e6 => format!("{:.2} ms", us / 1e3),
        Some(us) => format!("{:.2} s", us / 1e6),
    }
}

// ---------------------------------------------------------------------------
// Set-up: packages, tracefs, build

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

fn ensure_apt_tools() -> Result<()> {
    let wanted = [("wrk", "wrk"), ("nginx", "nginx-light"), ("hey", "hey"), ("openssl", "openssl")];
    let mut missing: Vec<&str> = wanted.iter().filter(|(bin, _)| which(bin).is_none()).map(|(_, pkg)| *pkg).collect();
    // The TLS call loop needs Debian's own Python (the one on PATH may be another build).
    if !Path::new(SYSTEM_PYTHON).is_file() {
        missing.push("python3");
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("bench: installing {}", missing.join(" "));
    run_cmd(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    for (bin, pkg) in wanted {
        if which(bin).is_none() {
            bail!("installed {pkg} but `{bin}` is still not on PATH");
        }
    }
    if !Path::new(SYSTEM_PYTHON).is_file() {
        bail!("installed python3 but {SYSTEM_PYTHON} is still missing");
    }
    Ok(())
}

/// The `rotel-agent` binary shipped in the rotel wheel; pip-installs it when missing.
fn ensure_rotel() -> Result<PathBuf> {
    let py = std::env::var("PERISCOPE_PYTHON").unwrap_or_else(|_| "python3".into());
    let locate = || -> Option<PathBuf> {
        let out = Command::new(&py)
            .args(["-c", "import rotel,os;print(os.path.dirname(rotel.__file__))"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("rotel-agent");
        (out.status.success() && p.is_file()).then_some(p)
    };
    if let Some(p) = locate() {
        return Ok(p);
    }
    eprintln!("bench: installing {ROTEL_REQUIREMENT} for {py}");
    let pip = |extra: &[&str]| {
        run_cmd(
            Command::new(&py)
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore"])
                .args(extra)
                .arg(ROTEL_REQUIREMENT),
        )
    };
    if pip(&[]).is_err() {
        // Debian's own python3 refuses pip without this (PEP 668).
        pip(&["--break-system-packages"])?;
    }
    locate().with_context(|| format!("pip installed {ROTEL_REQUIREMENT} but its rotel-agent binary is not found"))
}

fn ensure_tracefs() -> Result<()> {
    const DIR: &str = "/sys/kernel/tracing";
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if info.lines().any(|l| l.split(' ').nth(4) == Some(DIR)) {
        return Ok(());
    }
    run_cmd(Command::new("mount").args(["-t", "tracefs", "nodev", DIR]))
}

fn build_agent() -> Result<()> {
    // bpf-linker lives in ~/.cargo/bin.
    let bin = crate::cmd::cargo_home().join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut parts = vec![bin];
    parts.extend(std::env::split_paths(&path));
    let mut c = crate::cmd::cargo();
    c.args(["build", "--release", "-p", "periscope"]).env("PATH", std::env::join_paths(parts)?);
    run_cmd(&mut c).context("building the agent (if bpf-linker is missing, run `cargo xtask setup` first)")
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("bench: $ {}", show(cmd));
    let st = cmd.status().with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !st.success() {
        bail!("`{}` failed: {st}", show(cmd));
    }
    Ok(())
}

/// A self-signed certificate for the HTTPS server: (cert, key).
fn make_test_cert(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .context("running openssl req")?;
    if !out.status.success() {
        bail!("openssl req failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok((cert, key))
}

/// The nginx config; with `https` = (port, cert, key) a second server
/// serves the same page over TLS 1.3.
fn write_nginx_files(dir: &Path, port: u16, https: Option<(u16, &Path, &Path)>) -> Result<PathBuf> {
    let d = dir.display();
    std::fs::create_dir_all(dir.join("html"))?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::write(dir.join("html/index.html"), "<html><body>periscope bench</body></html>\n")?;
    // nginx workers run as nobody: everything must be readable.
    use std::os::unix::fs::PermissionsExt;
    for p in [dir.to_path_buf(), dir.join("html"), dir.join("tmp")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::set_permissions(dir.join("html/index.html"), std::fs::Permissions::from_mode(0o644))?;
    let https_server = match https {
        None => String::new(),
        Some((tls_port, cert, key)) => format!(
            "    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.3;
        root {d}/html;
        index index.html;
    }}
",
            cert.display(),
            key.display()
        ),
    };
    let conf = format!(
        "# Written by `cargo xtask bench`: one worker, static page, nginx's keep-alive defaults.
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {d}/html;
        index index.html;
    }}
{https_server}}}
"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

fn check_http_ok(port: u16) -> Result<()> {
    use std::io::Write;
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    if !resp.starts_with("HTTP/1.1 200") {
        bail!("unexpected answer: {}", resp.lines().next().unwrap_or(""));
    }
    Ok(())
}

fn machine_facts() -> Machine {
    let out = |p: &str, a: &[&str]| -> Option<String> {
        let o = Command::new(p).args(a).stdin(Stdio::null()).output().ok()?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        text.lines().next().map(|l| l.trim().to_string())
    };
    let mut versions = Vec::new();
    // "nginx version: nginx/1.22.1", "wrk debian/4.1.0-3+b2 [epoll] Copyright ...", "0.1.4-2+b4"
    for (name, prog, args, word) in [
        ("nginx", "nginx", &["-v"][..], 2),
        ("wrk", "wrk", &["-v"][..], 1),
        ("hey", "dpkg-query", &["-W", "-f", "${Version}", "hey"][..], 0),
    ] {
        if let Some(v) = out(prog, args).and_then(|l| l.split_whitespace().nth(word).map(str::to_string)) {
            versions.push((name.to_string(), v));
        }
    }
    Machine {
        nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        loadavg: loadavg(),
        versions,
    }
}

// ---------------------------------------------------------------------------
// /proc

fn clk_tck() -> u64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

fn ticks_ms(ticks: u64, clk_tck: u64) -> f64 {
    ticks as f64 * 1000.0 / clk_tck as f64
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat_ticks(&stat).with_context(|| format!("parsing /proc/{pid}/stat: {stat}"))
}

fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the parenthesised comm start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn sum_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu_ticks(*p).ok()).sum()
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Another agent (an end-to-end test's, say) traces nginx too and disturbs
/// both configurations: wait for it to go away, up to `max`, then go on (the
/// run is flagged in the report).
fn wait_for_other_agents(max: Duration) -> Result<()> {
    let t = Instant::now();
    let mut said = false;
    loop {
        let others = other_periscopes(None);
        if others.is_empty() {
            return Ok(());
        }
        if t.elapsed() >= max {
            eprintln!(
                "bench: WARNING: other periscope process(es) {others:?} still running after {max:?}: measuring anyway, the report flags it"
            );
            return Ok(());
        }
        if !said {
            eprintln!(
                "bench: waiting (up to {max:?}) for other periscope process(es) {others:?} to exit: they would trace the baseline too"
            );
            said = true;
        }
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Pids of `periscope` processes other than `ours` (another agent on the
/// machine would trace the baseline too).
fn other_periscopes(ours: Option<u32>) -> Vec<u32> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if Some(pid) == ours {
                continue;
            }
            if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "periscope") {
                v.push(pid);
            }
        }
    }
    v.sort_unstable();
    v
}

// ---------------------------------------------------------------------------
// Processes

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_interrupt_handler() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: stopping every process the bench started");
    }
    Ok(())
}

#[derive(Default)]
struct Captured {
    /// (from stderr, line)
    state: Mutex<(Vec<(bool, String)>, usize)>,
    cv: Condvar,
}

/// A child in its own process group, with stdout and stderr captured line by
/// line; stopped on drop (its stop signal, then SIGKILL to the group).
struct Proc {
    name: String,
    pid: u32,
    child: Child,
    out: Arc<Captured>,
    stop_signal: i32,
    grace: Duration,
    status: Option<ExitStatus>,
    /// True if it had to be SIGKILLed.
    killed: bool,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, stop_signal: i32, grace: Duration) -> Result<Proc> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("{name}: could not start `{}`", show(cmd)))?;
        let out = Arc::new(Captured::default());
        out.state.lock().unwrap().1 = 2;
        for (is_err, pipe) in [
            (false, Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>),
            (true, Box::new(child.stderr.take().expect("piped")) as Box<dyn Read + Send>),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                            out.state.lock().unwrap().0.push((is_err, line));
                            out.cv.notify_all();
                        }
                    }
                }
                out.state.lock().unwrap().1 -= 1;
                out.cv.notify_all();
            });
        }
        Ok(Proc {
            name: name.to_string(),
            pid: child.id(),
            child,
            out,
            stop_signal,
            grace,
            status: None,
            killed: false,
        })
    }

    fn is_running(&mut self) -> bool {
        if self.status.is_none()
            && let Ok(Some(st)) = self.child.try_wait()
        {
            self.status = Some(st);
        }
        self.status.is_none()
    }

    /// Wait for a line (stdout or stderr) matching `pred`.
    fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            {
                let g = self.out.state.lock().unwrap();
                while seen < g.0.len() {
                    if pred(&g.0[seen].1) {
                        return Ok(g.0[seen].1.clone());
                    }
                    seen += 1;
                }
                let open = g.1;
                let _ = self.out.cv.wait_timeout(g, Duration::from_millis(100)).unwrap();
                if open == 0 {
                    bail!(
                        "{} (pid {}) ended without the expected line; its output:\n{}",
                        self.name,
                        self.pid,
                        self.text()
                    );
                }
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}): no expected line within {timeout:?}; its output:\n{}",
                    self.name,
                    self.pid,
                    self.text()
                );
            }
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            check_interrupted()?;
            if Instant::now() >= deadline {
                bail!("{} (pid {}) still running after {timeout:?}", self.name, self.pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.drain_readers(Duration::from_secs(2));
        Ok(self.status.expect("exited"))
    }

    fn drain_readers(&self, max: Duration) {
        let until = Instant::now() + max;
        while self.out.state.lock().unwrap().1 > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The stop signal, up to `grace` to exit, then SIGKILL to the whole group.
    fn stop(&mut self) -> Option<ExitStatus> {
        if self.is_running() {
            unsafe { libc::kill(self.pid as i32, self.stop_signal) };
            let deadline = Instant::now() + self.grace;
            while self.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.is_running() {
                eprintln!("bench: {} (pid {}) did not stop within {:?}: SIGKILL", self.name, self.pid, self.grace);
                unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
                self.killed = true;
                self.status = self.child.wait().ok();
            }
        }
        // Whatever it left in its group (nginx's worker).
        unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
        self.drain_readers(Duration::from_secs(1));
        self.status
    }

    fn lines(&self, only_stdout: bool) -> String {
        let g = self.out.state.lock().unwrap();
        let mut s = String::new();
        for (is_err, l) in &g.0 {
            if !(only_stdout && *is_err) {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    fn text(&self) -> String {
        self.lines(false)
    }

    fn stdout_text(&self) -> String {
        self.lines(true)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_for_port(p: &mut Proc, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        check_interrupted()?;
        if !p.is_running() {
            p.drain_readers(Duration::from_secs(1));
            bail!("{} exited before listening on {port}; its output:\n{}", p.name, p.text());
        }
        if Instant::now() >= deadline {
            bail!("{} does not listen on {port} after {timeout:?}; its output:\n{}", p.name, p.text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A private directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("periscope-bench-{}", std::process::id()));
        if p.exists() {
            std::fs::remove_dir_all(&p).ok();
        }
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\;&|<>*?".contains(c)) {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// `YYYYMMDD-HHMMSS`, or `YYYY-MM-DD HH:MM:SS` when `readable`, in UTC.
fn utc_stamp(t: SystemTime, readable: bool) -> String {
    // humantime gives `YYYY-MM-DDTHH:MM:SSZ`.
    let iso = humantime::format_rfc3339_seconds(t).to_string();
    let (date, time) = iso.trim_end_matches('Z').split_once('T').unwrap_or((&iso, ""));
    if readable { format!("{date} {time}") } else { format!("{}-{}", date.replace('-', ""), time.replace(':', "")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn wrk_times() {
        assert_eq!(parse_wrk_time("179.00us"), Some(179.0));
        assert_eq!(parse_wrk_time("1.50ms"), Some(1500.0));
        assert_eq!(parse_wrk_time("2.00s"), Some(2e6));
        assert_eq!(parse_wrk_time("1.00m"), Some(60e6));
        assert_eq!(parse_wrk_time("5.10s,"), Some(5.1e6));
        assert_eq!(parse_wrk_time("98.71%"), None);
        assert_eq!(parse_wrk_time("12"), None);
    }

    /// Real output captured from wrk 4.1.0 and hey 0.1.4 on the project's machines.
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../bench/testdata/", $name))
        };
    }

    #[test]
    fn wrk_outputs() {
        let r = parse_wrk(fixture!("wrk-16conns.txt")).unwrap();
        assert_eq!(
            r,
            LoadResult {
                requests: 433_365,
                rps: 84_961.63,
                p50_us: Some(179.0),
                p99_us: Some(351.0),
                errors: 0,
                non_2xx: 0
            }
        );
        let r = parse_wrk(fixture!("wrk-400conns-ms.txt")).unwrap();
        assert_eq!((r.requests, r.p50_us, r.p99_us), (238_041, Some(4550.0), Some(10_490.0)));
        let r = parse_wrk(fixture!("wrk-404.txt")).unwrap();
        assert_eq!((r.requests, r.non_2xx, r.errors), (206_612, 206_612, 0));
        let r = parse_wrk(fixture!("wrk-socket-errors.txt")).unwrap();
        assert_eq!((r.requests, r.errors, r.rps), (134_038, 640, 64_876.02));
        assert!((r.p99_us.unwrap() - 990_660.0).abs() < 1e-6);
        assert!(parse_wrk("unable to connect to 127.0.0.1:18099 Connection refused\n").is_err());
    }

    #[test]
    fn hey_outputs() {
        let r = parse_hey(fixture!("hey-5k.txt")).unwrap();
        assert_eq!((r.requests, r.errors, r.non_2xx), (24_944, 0, 0));
        assert!((r.rps - 24_944.0 / 5.0017).abs() < 1e-6, "{}", r.rps);
        assert!((r.p50_us.unwrap() - 200.0).abs() < 1e-6);
        assert!((r.p99_us.unwrap() - 1000.0).abs() < 1e-6);
        let r = parse_hey(fixture!("hey-404.txt")).unwrap();
        assert_eq!((r.requests, r.non_2xx), (200, 200));
        let r = parse_hey(fixture!("hey-refused.txt")).unwrap();
        assert_eq!((r.requests, r.errors, r.rps, r.p50_us), (0, 40, 0.0, None));
    }

    #[test]
    fn stop_line() {
        let l = "[2025-06-01T10:00:00Z INFO  periscope] stopped: 1200 events, 400 spans built, 398 exported, 2 dropped, 7 events lost in kernel";
        assert_eq!(
            parse_stop_line(l),
            Some(StopLine { events: 1200, spans_built: 400, exported: 398, dropped: 2, lost: 7 })
        );
        assert_eq!(parse_stop_line("periscope ready: 9 kernel programs attached"), None);
        assert_eq!(parse_stop_line("stopped: 1 events, 2 spans built"), None);
    }

    #[test]
    fn tls_calls_line() {
        let (calls, cpu) = parse_tls_calls("noise\ntls-calls 200000 cpu_s 2.593399 version TLSv1.3\n").unwrap();
        assert_eq!((calls, cpu), (200_000, 2.593399));
        assert!(parse_tls_calls("tls-calls x\n").is_err());
        assert!(parse_tls_calls("").is_err());
        let t = TlsCallSample { calls: 200_000, baseline_cpu_s: 0.2, agent_cpu_s: 2.2, ..Default::default() };
        assert!((t.ns_per_call().unwrap() - 10_000.0).abs() < 1e-6);
    }

    #[test]
    fn proc_stat() {
        // A comm with spaces and parentheses.
        let stat = "1234 (tokio (x) 1) S 1 1234 1234 0 -1 4194560 2000 0 0 0 150 37 0 0 20 0 3 0 100 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(187));
    }

    #[test]
    fn stamps() {
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29 23:59:59
        assert_eq!(utc_stamp(t, false), "20240229-235959");
        assert_eq!(utc_stamp(UNIX_EPOCH, true), "1970-01-01 00:00:00");
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), Some(2.0));
        assert_eq!(median([4.0, 1.0].into_iter()), Some(2.5));
        assert_eq!(median(std::iter::empty()), None);
    }
}
