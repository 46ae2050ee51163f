//! What one hooked TLS library call costs: Debian's Python pushes records
//! through an in-memory TLS pair (`ssl.MemoryBIO`, so no socket and no
//! syscalls: `SSL_write_ex` + `SSL_read_ex` per iteration) without and with
//! the agent; the difference in CPU time per call is the uprobe + uretprobe
//! cost.

use super::env::SYSTEM_PYTHON;
use super::parse::{parse_stop_line, parse_tls_calls};
use super::sys::{other_periscopes, spawn, wait_for_other_agents};
use super::{AgentCmd, fmt_f};
use anyhow::{Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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
    /// Events the agent counted while it ran (from its `stopped:` line).
    pub agent_events: Option<u64>,
    pub others: Vec<u32>,
}

impl TlsCallSample {
    /// Extra CPU per library call with the agent (one uprobe + one uretprobe).
    pub fn ns_per_call(&self) -> Option<f64> {
        (self.calls > 0).then(|| (self.agent_cpu_s - self.baseline_cpu_s) * 1e9 / self.calls as f64)
    }
    pub fn one_line(&self) -> String {
        format!(
            "round {} TLS calls: {} calls, {:.3} s CPU without agent, {:.3} s with: {} ns extra per call{}",
            self.round,
            self.calls,
            self.baseline_cpu_s,
            self.agent_cpu_s,
            fmt_f(self.ns_per_call(), 0),
            self.agent_events
                .map_or(String::new(), |e| format!(" ({e} agent events)"))
        )
    }
}

fn run_tls_calls(
    iterations: u32,
    cert: &Path,
    key: &Path,
    out_dir: &Path,
    tag: &str,
) -> Result<(u64, f64)> {
    let mut cmd = Command::new(SYSTEM_PYTHON);
    cmd.arg("-c")
        .arg(TLS_CALLS_SCRIPT)
        .arg(iterations.to_string())
        .arg(cert)
        .arg(key);
    let mut p = spawn(
        "python3-tls-calls",
        &mut cmd,
        libc::SIGTERM,
        Duration::from_secs(2),
    )?;
    let st = p.wait_exit(Duration::from_secs(600))?;
    let out = p.log();
    std::fs::write(out_dir.join(format!("logs/{tag}-tls-calls.txt")), &out).ok();
    if !st.success() {
        bail!("the TLS call loop failed ({st}):\n{out}");
    }
    parse_tls_calls(&out)
        .map_err(|e| e.context(format!("parsing the TLS call loop's output:\n{out}")))
}

/// The loop without the agent, then with it (started and stopped around it).
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
    eprintln!("bench: {tag}: TLS call loop, {iterations} iterations, without and with the agent");
    let (calls, baseline_cpu_s) =
        run_tls_calls(iterations, cert, key, out_dir, &format!("{tag}-base"))?;
    let log_path = out_dir.join(format!("logs/agent-{tag}-tls-calls.log"));
    let mut p = agent.start(&[], &log_path)?;
    others.extend(other_periscopes(Some(p.pid())));
    let run = run_tls_calls(iterations, cert, key, out_dir, &format!("{tag}-agent"));
    p.stop();
    let log = p.log();
    std::fs::write(&log_path, &log).ok();
    let (_, agent_cpu_s) = run?;
    others.sort_unstable();
    others.dedup();
    Ok(TlsCallSample {
        round,
        calls,
        baseline_cpu_s,
        agent_cpu_s,
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
        assert_eq!(TlsCallSample::default().ns_per_call(), None);
    }
}
