//! Where the agent's CPU goes: its threads (the event loop on the main
//! thread, the tokio workers named `periscope-io` that export, serve the
//! control socket and metrics, and the rest), and the run time of its BPF
//! programs, which the kernel charges to the traced processes.
//!
//! Threads from `/proc/PID/task/TID/stat` (utime + stime) and
//! `/proc/PID/task/TID/comm`; programs from `/proc/PID/fdinfo/FD` of the
//! agent's program fds (`run_time_ns`, `run_cnt`: counted only while
//! `kernel.bpf_stats_enabled` is 1, which the bench sets for its duration).

use super::parse::{ProgStats, parse_fdinfo_prog, parse_stat_ticks};
use super::sys::ticks_ms;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::time::Instant;

/// The name the agent gives its tokio workers.
pub const IO_THREAD: &str = "periscope-io";

/// The agent's counters at one instant.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at: Instant,
    /// utime + stime of the whole process (exited threads included), ticks.
    pub total_ticks: u64,
    /// (tid, comm, ticks) of every live thread.
    pub threads: Vec<(u32, String, u64)>,
    /// The agent's programs, or None when BPF stats are off (or unreadable).
    pub progs: Option<Vec<ProgStats>>,
}

/// The BPF programs' own run time over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelRun {
    pub run_time_ns: u64,
    pub run_cnt: u64,
    /// Programs counted.
    pub programs: usize,
}

impl KernelRun {
    pub fn ms(&self) -> f64 {
        self.run_time_ns as f64 / 1e6
    }
}

/// The agent's CPU over a window, by thread kind, in ms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuSplit {
    /// The main thread: the event loop.
    pub event_loop_ms: f64,
    /// The `periscope-io` threads: export, control, metrics.
    pub export_ms: f64,
    /// Everything else: the process total minus the two above, so threads
    /// that ended within the window count here too (at least the named
    /// threads' sum).
    pub other_ms: f64,
    /// Of `other_ms`, by thread name (`(ended)`: threads gone by the end).
    pub other_threads: Vec<(String, f64)>,
    pub kernel: Option<KernelRun>,
}

impl Snapshot {
    pub fn take(pid: u32) -> Result<Snapshot> {
        let stat_path = format!("/proc/{pid}/stat");
        let stat =
            std::fs::read_to_string(&stat_path).with_context(|| format!("reading {stat_path}"))?;
        let total_ticks =
            parse_stat_ticks(&stat).with_context(|| format!("parsing {stat_path}: {stat}"))?;
        Ok(Snapshot {
            at: Instant::now(),
            total_ticks,
            threads: threads(pid),
            progs: super::sys::bpf_stats_enabled().then(|| programs(pid)),
        })
    }
}

/// Every live thread's (tid, comm, utime + stime); threads that end while
/// they are read are left out.
fn threads(pid: u32) -> Vec<(u32, String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut v: Vec<(u32, String, u64)> = dir
        .flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse().ok()?;
            let ticks = parse_stat_ticks(&std::fs::read_to_string(e.path().join("stat")).ok()?)?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            Some((tid, comm.trim().to_string(), ticks))
        })
        .collect();
    v.sort_unstable();
    v
}

/// The counters of every BPF program the process holds an fd of, once each.
fn programs(pid: u32) -> Vec<ProgStats> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut v: Vec<ProgStats> = dir
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog")
        })
        .filter_map(|e| {
            let info = format!("/proc/{pid}/fdinfo/{}", e.file_name().to_str()?);
            parse_fdinfo_prog(&std::fs::read_to_string(info).ok()?)
        })
        .collect();
    v.sort_unstable_by_key(|p| p.id);
    v.dedup_by_key(|p| p.id);
    v
}

/// What the programs ran between two snapshots (programs loaded in
/// between count from zero).
pub fn kernel_run(before: &[ProgStats], after: &[ProgStats]) -> KernelRun {
    let mut k = KernelRun::default();
    for a in after {
        let b = before
            .iter()
            .find(|b| b.id == a.id)
            .copied()
            .unwrap_or_default();
        k.run_time_ns += a.run_time_ns.saturating_sub(b.run_time_ns);
        k.run_cnt += a.run_cnt.saturating_sub(b.run_cnt);
        k.programs += 1;
    }
    k
}

/// The split between two snapshots of process `pid`.
pub fn split(pid: u32, before: &Snapshot, after: &Snapshot, clk: u64) -> CpuSplit {
    let mut event_loop = 0;
    let mut export = 0;
    let mut others: BTreeMap<String, u64> = BTreeMap::new();
    for (tid, comm, ticks) in &after.threads {
        let was = before
            .threads
            .iter()
            .find(|(t, _, _)| t == tid)
            .map_or(0, |(_, _, t)| *t);
        let d = ticks.saturating_sub(was);
        if *tid == pid {
            event_loop += d;
        } else if comm == IO_THREAD {
            export += d;
        } else {
            *others.entry(comm.clone()).or_default() += d;
        }
    }
    // The process's figure and the threads' are rounded to ticks apart: the
    // named threads may add up to a tick or two more than the rest.
    let total = after.total_ticks.saturating_sub(before.total_ticks);
    let named: u64 = others.values().sum();
    let other = total.saturating_sub(event_loop + export).max(named);
    let ended = other - named;
    if ended > 0 {
        others.insert("(ended)".into(), ended);
    }
    CpuSplit {
        event_loop_ms: ticks_ms(event_loop, clk),
        export_ms: ticks_ms(export, clk),
        other_ms: ticks_ms(other, clk),
        other_threads: others
            .into_iter()
            .filter(|(_, t)| *t > 0)
            .map(|(n, t)| (n, ticks_ms(t, clk)))
            .collect(),
        kernel: before
            .progs
            .as_deref()
            .zip(after.progs.as_deref())
            .map(|(b, a)| kernel_run(b, a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(total: u64, threads: &[(u32, &str, u64)], progs: Option<Vec<ProgStats>>) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            total_ticks: total,
            threads: threads
                .iter()
                .map(|(t, c, n)| (*t, c.to_string(), *n))
                .collect(),
            progs,
        }
    }

    fn prog(id: u32, run_time_ns: u64, run_cnt: u64) -> ProgStats {
        ProgStats {
            id,
            run_time_ns,
            run_cnt,
        }
    }

    #[test]
    fn splits_by_thread() {
        let before = snap(
            100,
            &[
                (10, "periscope", 60),
                (11, "periscope-io", 20),
                (12, "periscope-io", 5),
                (13, "tls-discovery", 15),
            ],
            Some(vec![prog(1, 1000, 10), prog(2, 500, 5)]),
        );
        // Thread 12 ended; thread 14 started; program 3 was loaded.
        let after = snap(
            250,
            &[
                (10, "periscope", 150),
                (11, "periscope-io", 60),
                (13, "tls-discovery", 16),
                (14, "periscope-io", 3),
            ],
            Some(vec![prog(1, 4000, 40), prog(2, 500, 5), prog(3, 100, 1)]),
        );
        let s = split(10, &before, &after, 100);
        assert_eq!(s.event_loop_ms, 900.0);
        assert_eq!(s.export_ms, 430.0);
        // 150 ticks in all: 90 + 43 + 1 (tls-discovery) + 16 from ended threads.
        assert_eq!(s.other_ms, 170.0);
        assert_eq!(
            s.other_threads,
            vec![
                ("(ended)".to_string(), 160.0),
                ("tls-discovery".to_string(), 10.0)
            ]
        );
        assert_eq!(
            s.kernel,
            Some(KernelRun {
                run_time_ns: 3100,
                run_cnt: 31,
                programs: 3
            })
        );
    }

    #[test]
    fn other_covers_its_threads() {
        // Rounded apart: the process says 30 ticks, its threads 40.
        let before = snap(
            0,
            &[
                (10, "periscope", 0),
                (11, "periscope-io", 0),
                (12, "tls-discovery", 0),
            ],
            None,
        );
        let after = snap(
            30,
            &[
                (10, "periscope", 10),
                (11, "periscope-io", 10),
                (12, "tls-discovery", 20),
            ],
            None,
        );
        let s = split(10, &before, &after, 100);
        assert_eq!(s.other_ms, 200.0);
        assert_eq!(s.other_threads, vec![("tls-discovery".to_string(), 200.0)]);
        assert_eq!(s.kernel, None);
    }

    #[test]
    fn odd_counters_do_not_underflow() {
        let before = snap(100, &[(10, "periscope", 90)], None);
        let after = snap(95, &[(10, "periscope", 80)], Some(Vec::new()));
        let s = split(10, &before, &after, 100);
        assert_eq!(s, CpuSplit::default());
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let s = Snapshot::take(me).unwrap();
        assert!(
            s.threads.iter().any(|(t, _, _)| *t == me),
            "{:?}",
            s.threads
        );
        assert!(Snapshot::take(u32::MAX).is_err());
    }
}
