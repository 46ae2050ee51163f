//! Processes, /proc figures, signals and clocks for the bench.
//!
//! Child processes are `periscope_tests::proc::Proc` (the end-to-end
//! harness's): each in a process group of its own, killed if xtask dies
//! (`PR_SET_PDEATHSIG`) and stopped on drop. Ctrl-C sets a flag that the
//! bench checks between steps (every step is bounded in time); the guards
//! then stop what was started.

use super::parse::parse_stat_ticks;
use anyhow::{Context, Result, bail};
use periscope_tests::proc::{Proc, StopWith};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Milliseconds spent in [`wait_for_other_agents`].
static WAITED_MS: AtomicU64 = AtomicU64::new(0);
static STARTED: OnceLock<Instant> = OnceLock::new();

/// Seconds since the bench started, for log lines.
pub fn since_start() -> String {
    format!(
        "[{:4.0} s]",
        STARTED.get_or_init(Instant::now).elapsed().as_secs_f64()
    )
}

/// Time spent waiting for other agents to exit.
pub fn waited() -> Duration {
    Duration::from_millis(WAITED_MS.load(Ordering::Relaxed))
}

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn install_interrupt_handler() {
    STARTED.get_or_init(Instant::now);
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: stopping every process the bench started");
    }
    Ok(())
}

/// Sleep for `d`, in steps, failing early on Ctrl-C.
pub fn sleep_unless_interrupted(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(200)));
    }
}

/// Spawn with captured output, stopped by `signal` then SIGKILL after `grace`.
pub fn spawn(name: &str, cmd: &mut Command, signal: i32, grace: Duration) -> Result<Proc> {
    Proc::spawn_with(name, cmd, StopWith { signal, grace })
}

/// Wait until 127.0.0.1:port accepts connections; fail with the process's
/// output if it exits first or the time runs out.
pub fn wait_for_port(p: &mut Proc, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if periscope_tests::proc::wait_for_port(port, Duration::from_millis(200)) {
            return Ok(());
        }
        check_interrupted()?;
        if !p.is_running() {
            bail!(
                "{} exited before listening on {port}; its output:\n{}",
                p.name(),
                p.log()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} does not listen on {port} after {timeout:?}; its output:\n{}",
                p.name(),
                p.log()
            );
        }
    }
}

pub fn show(cmd: &Command) -> String {
    periscope_tests::proc::show(cmd)
}

pub fn clk_tck() -> u64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

pub fn ticks_ms(ticks: u64, clk_tck: u64) -> f64 {
    ticks as f64 * 1000.0 / clk_tck as f64
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat_ticks(&stat).with_context(|| format!("parsing /proc/{pid}/stat: {stat}"))
}

pub fn sum_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu_ticks(*p).ok()).sum()
}

/// CPU time (user + system, ms) of every child this process has reaped so
/// far: the difference around one load generator run is that run's CPU.
pub fn reaped_children_cpu_ms() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Whether the kernel counts BPF programs' run time (`kernel.bpf_stats_enabled`).
pub fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string(BPF_STATS).is_ok_and(|v| v.trim() == "1")
}

/// `kernel.bpf_stats_enabled=1` for as long as it lives; the old value
/// back on drop.
pub struct BpfStats {
    old: Option<String>,
}

impl BpfStats {
    /// Turn the stats on; a warning (and no kernel figures) if that fails.
    pub fn enable() -> BpfStats {
        let old = std::fs::read_to_string(BPF_STATS).map(|v| v.trim().to_string());
        match old.and_then(|old| std::fs::write(BPF_STATS, "1").map(|()| old)) {
            Ok(old) => BpfStats { old: Some(old) },
            Err(e) => {
                eprintln!(
                    "bench: WARNING: could not set {BPF_STATS} to 1 ({e}): the kernel programs' run time is not measured"
                );
                BpfStats { old: None }
            }
        }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(old) = self.old.take().filter(|o| o != "1")
            && let Err(e) = std::fs::write(BPF_STATS, &old)
        {
            eprintln!("bench: WARNING: could not restore {BPF_STATS} to {old}: {e}");
        }
    }
}

pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Another agent (an end-to-end test's, say) traces the servers too and
/// disturbs every configuration: wait for it to go away, up to `max`, then
/// go on (the run is flagged in the report).
pub fn wait_for_other_agents(max: Duration) -> Result<()> {
    let t = Instant::now();
    let r = wait_for_other_agents_inner(t, max);
    WAITED_MS.fetch_add(t.elapsed().as_millis() as u64, Ordering::Relaxed);
    r
}

fn wait_for_other_agents_inner(t: Instant, max: Duration) -> Result<()> {
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

/// Pids of `periscope` processes other than `ours`.
pub fn other_periscopes(ours: Option<u32>) -> Vec<u32> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if Some(pid) == ours {
                continue;
            }
            if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "periscope")
            {
                v.push(pid);
            }
        }
    }
    v.sort_unstable();
    v
}

/// `YYYYMMDD-HHMMSS`, or `YYYY-MM-DD HH:MM:SS` when `readable`, in UTC.
pub fn utc_stamp(t: SystemTime, readable: bool) -> String {
    // humantime gives `YYYY-MM-DDTHH:MM:SSZ`.
    let iso = humantime::format_rfc3339_seconds(t).to_string();
    let (date, time) = iso
        .trim_end_matches('Z')
        .split_once('T')
        .unwrap_or((&iso, ""));
    if readable {
        format!("{date} {time}")
    } else {
        format!("{}-{}", date.replace('-', ""), time.replace(':', ""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn stamps() {
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29 23:59:59
        assert_eq!(utc_stamp(t, false), "20240229-235959");
        assert_eq!(utc_stamp(UNIX_EPOCH, true), "1970-01-01 00:00:00");
    }

    #[test]
    fn children_cpu_grows() {
        // A child that burns some CPU, reaped by Command::status.
        let before = reaped_children_cpu_ms();
        let st = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(st.success());
        let after = reaped_children_cpu_ms();
        assert!(after > before, "{before} -> {after}");
    }
}
