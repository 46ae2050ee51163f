//! What one hooked TLS library call costs: Debian's Python pushes records
//! through an in-memory TLS pair (`ssl.MemoryBIO`, so no socket and no
//! syscalls: `SSL_write_ex` + `SSL_read_ex` per iteration) without and with
//! the agent; the difference in CPU time per call is the uprobe + uretprobe
//! cost. The agent runs twice: as it is (the probes on libssl's internal
//! `ssl_read_internal`/`ssl_write_internal`, which start with an instruction
//! the kernel emulates) and with the probes forced onto the exported
//! wrappers (`PERISCOPE_TLS_PROBE_WRAPPERS=1`, which the kernel
//! single-steps), the placement before internal functions.
//!
//! Both placements are measured in every bench run (`--quick` included).

use super::env::SYSTEM_PYTHON;
use super::parse::{parse_stop_line, parse_tls_calls};
use super::sys::{other_periscopes, spawn, wait_for_other_agents};
use super::{AgentCmd, fmt_f};
use anyhow::{Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The agent's hidden setting that hooks OpenSSL's exported wrappers
/// (`PLACEMENT_ENV` in agent/src/discovery/tls_libraries.rs).
const WRAPPERS_ENV: &str = "PERISCOPE_TLS_PROBE_WRAPPERS=1";

/// An in-memory TLS 1.3 pair (no socket, no syscalls), then N iterations of
/// `client.write(64 bytes)` (`SSL_write_ex`) and `server.read(64)`
/// (`SSL_read_ex`); prints the CPU time of the loop alone.
pub const TLS_CALLS_SCRIPT: &str = r#"
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
pub struct TlsCallSample {
    pub round: usize,
    pub calls: u64,
    pub baseline_cpu_s: f64,
    pub agent_cpu_s: f64,
    /// The loop's CPU with the agent's probes forced onto the exported
    /// wrappers (None when that run failed).
    pub wrappers_cpu_s: Option<f64>,
    /// Events the agent counted while it ran (from its `stopped:` line).
    pub agent_events: Option<u64>,
    pub others: Vec<u32>,
}

impl TlsCallSample {
    /// Extra CPU per library call with the agent (one uprobe + one uretprobe).
    pub fn ns_per_call(&self) -> Option<f64> {
        self.extra_ns_per_call(self.agent_cpu_s)
    }

    /// The same with the probes on the exported wrappers.
    pub fn ns_per_call_wrappers(&self) -> Option<f64> {
        self.extra_ns_per_call(self.wrappers_cpu_s?)
    }

    fn extra_ns_per_call(&self, cpu_s: f64) -> Option<f64> {
        (self.calls > 0).then(|| (cpu_s - self.baseline_cpu_s) * 1e9 / self.calls as f64)
    }

    pub fn one_line(&self) -> String {
        format!(
            "round {} TLS calls: {} calls, {:.3} s CPU without agent, {:.3} s with: {} ns extra per call{}; \
             probes on the exported wrappers: {} s, {} ns per call",
            self.round,
            self.calls,
            self.baseline_cpu_s,
            self.agent_cpu_s,
            fmt_f(self.ns_per_call(), 0),
            self.agent_events
                .map_or(String::new(), |e| format!(" ({e} agent events)")),
            fmt_f(self.wrappers_cpu_s, 3),
            fmt_f(self.ns_per_call_wrappers(), 0),
        )
    }
}

/// The in-memory TLS loop and where its output goes.
#[derive(Clone, Copy)]
struct TlsLoop<'a> {
    iterations: u32,
    cert: &'a Path,
    key: &'a Path,
    out_dir: &'a Path,
}

impl TlsLoop<'_> {
    /// Runs the loop once: (library calls, CPU seconds).
    fn run(&self, tag: &str) -> Result<(u64, f64)> {
        let mut cmd = Command::new(SYSTEM_PYTHON);
        cmd.arg("-c")
            .arg(TLS_CALLS_SCRIPT)
            .arg(self.iterations.to_string())
            .arg(self.cert)
            .arg(self.key);
        let mut p = spawn(
            "python3-tls-calls",
            &mut cmd,
            libc::SIGTERM,
            Duration::from_secs(2),
        )?;
        let st = p.wait_exit(Duration::from_secs(600))?;
        let out = p.log();
        std::fs::write(self.out_dir.join(format!("logs/{tag}-tls-calls.txt")), &out).ok();
        if !st.success() {
            bail!("the TLS call loop failed ({st}):\n{out}");
        }
        parse_tls_calls(&out)
            .map_err(|e| e.context(format!("parsing the TLS call loop's output:\n{out}")))
    }

    /// Runs the loop with `agent` started and stopped around it; other
    /// periscope processes seen meanwhile go to `others`. Returns the
    /// loop's CPU seconds and the agent's log.
    fn under_agent(
        &self,
        agent: &AgentCmd,
        tag: &str,
        others: &mut Vec<u32>,
    ) -> Result<(f64, String)> {
        let log_path = self.out_dir.join(format!("logs/agent-{tag}-tls-calls.log"));
        let mut p = agent.start(&[], &log_path)?;
        others.extend(other_periscopes(Some(p.pid())));
        let run = self.run(&format!("{tag}-agent"));
        p.stop();
        let log = p.log();
        std::fs::write(&log_path, &log).ok();
        Ok((run?.1, log))
    }
}

/// The same agent command with the probes forced onto OpenSSL's exported
/// wrappers (`env` execs the agent: the pid stays the agent's).
fn with_wrapper_probes(agent: &AgentCmd) -> AgentCmd {
    let mut args = vec![WRAPPERS_ENV.to_string(), agent.bin.display().to_string()];
    args.extend(agent.args.iter().cloned());
    AgentCmd {
        bin: "/usr/bin/env".into(),
        args,
    }
}

/// The loop without the agent, then with it (started and stopped around
/// it), then with it and its probes on the exported wrappers.
pub fn measure_tls_calls(
    agent: &AgentCmd,
    out_dir: &Path,
    round: usize,
    iterations: u32,
    cert: &Path,
    key: &Path,
) -> Result<TlsCallSample> {
    wait_for_other_agents(Duration::from_secs(180))?;
    let mut others = other_periscopes(None);
    let tag = format!("r{round}");
    eprintln!(
        "bench: {tag}: TLS call loop, {iterations} iterations, without the agent, with it, with its probes on the wrappers"
    );
    let tls_loop = TlsLoop {
        iterations,
        cert,
        key,
        out_dir,
    };
    let (calls, baseline_cpu_s) = tls_loop.run(&format!("{tag}-base"))?;
    let (agent_cpu_s, log) = tls_loop.under_agent(agent, &tag, &mut others)?;
    let wrappers_tag = format!("{tag}-wrappers");
    let wrappers = tls_loop.under_agent(&with_wrapper_probes(agent), &wrappers_tag, &mut others);
    others.sort_unstable();
    others.dedup();
    Ok(TlsCallSample {
        round,
        calls,
        baseline_cpu_s,
        agent_cpu_s,
        wrappers_cpu_s: wrappers
            .map_err(|e| {
                eprintln!("bench: WARNING: {tag}: TLS call loop with wrapper probes: {e:#}")
            })
            .ok()
            .map(|(cpu_s, _)| cpu_s),
        agent_events: log
            .lines()
            .rev()
            .find_map(parse_stop_line)
            .map(|s| s.events),
        others,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_per_call() {
        let t = TlsCallSample {
            calls: 200_000,
            baseline_cpu_s: 0.2,
            agent_cpu_s: 2.2,
            ..Default::default()
        };
        assert!((t.ns_per_call().unwrap() - 10_000.0).abs() < 1e-6);
        assert_eq!(t.ns_per_call_wrappers(), None);
        let w = TlsCallSample {
            wrappers_cpu_s: Some(3.2),
            ..t
        };
        assert!((w.ns_per_call_wrappers().unwrap() - 15_000.0).abs() < 1e-6);
        assert_eq!(TlsCallSample::default().ns_per_call(), None);
    }

    #[test]
    fn wrapper_probes_run_the_same_agent_under_env() {
        let agent = AgentCmd {
            bin: "/x/periscope".into(),
            args: vec!["run".into(), "--otlp-endpoint".into(), "http://e".into()],
        };
        let w = with_wrapper_probes(&agent);
        assert_eq!(w.bin, Path::new("/usr/bin/env"));
        assert_eq!(
            w.args,
            [
                WRAPPERS_ENV,
                "/x/periscope",
                "run",
                "--otlp-endpoint",
                "http://e"
            ]
        );
    }
}
