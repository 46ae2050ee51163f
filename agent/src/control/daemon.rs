//! The daemon's side of the control protocol: applies feature switches,
//! filters and sampling to the kernel programs and the pipeline, and
//! reports status. Runs on the event loop, between ring-buffer drains, so
//! every change applies at once and nothing in flight is lost.

use crate::discovery::go_programs::GrpcSupport;
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use periscope_ebpf::control::{
    EXCLUDE, FEATURE_DNS, FEATURE_HTTP, FEATURE_TLS, FILTER_CGROUPS_INCLUDE_ONLY, FILTER_PIDS, FILTER_PIDS_INCLUDE_ONLY,
    FILTER_PORTS, FILTER_PORTS_INCLUDE_ONLY, INCLUDE,
};

use super::metrics::counters_from_stats;
use super::protocol::{
    ExporterStatus, Feature, FeatureChange, FeatureStatus, Filter, FilterChange, KernelFeature, ProcessStatus,
    GoProgramStatus, Request, Response, SampleChange, StatusReport, TlsLibraryStatus, TlsState, TracesResult,
};
use crate::export::{ExporterHealth, SpanSink};
use crate::pipeline::{Pipeline, Sampler};
use crate::probes::{KernelFilter, PROGRAMS, Probes, TLS_UPROBES};
use crate::stats::Stats;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Most cgroups a subtree filter expands to.
const MAX_CGROUPS: usize = 1000;

pub struct ControlState {
    started: Instant,
    features: BTreeMap<Feature, bool>,
    filter: Filter,
}

impl ControlState {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            features: Feature::ALL.into_iter().map(|f| (f, true)).collect(),
            filter: Filter::default(),
        }
    }

    pub fn handle(
        &mut self,
        request: Request,
        probes: &mut Probes,
        pipeline: &mut Pipeline,
        sink: &SpanSink,
        stats: &Stats,
    ) -> Response {
        match request {
            Request::Status => Response::ok(&self.status(probes, pipeline, sink, stats)),
            Request::Enable { feature } => self.set_feature(feature, true, probes),
            Request::Disable { feature } => self.set_feature(feature, false, probes),
            Request::Filter { set: None, clear: false } => Response::ok(&FilterChange::shown(&self.filter)),
            Request::Filter { set, clear } => {
                let new = if clear { Filter::default() } else { set.unwrap_or_default() };
                match self.apply_filter(&new, probes) {
                    Ok(()) => {
                        let change = FilterChange::set(&new, &self.filter);
                        self.filter = new;
                        Response::ok(&change)
                    }
                    Err(e) => Response::refused(format!("filter not applied: {e:#}")),
                }
            }
            Request::Sample { ratio } => {
                let previous = pipeline.sampler().ratio();
                pipeline.set_sampler(Sampler::new(ratio));
                Response::ok(&SampleChange::new(pipeline.sampler().ratio(), previous))
            }
            Request::Traces(q) => {
                let query = crate::local_view::recent::TraceQuery {
                    last: q.last.unwrap_or(20),
                    service: q.service,
                    min_duration_ns: q.min_duration_ms.map_or(0, |ms| (ms * 1e6) as u64),
                    errors: q.errors,
                    after_seq: q.after_seq.unwrap_or(0),
                    quiet: std::time::Duration::from_millis(q.quiet_ms.unwrap_or(0)),
                };
                let traces = pipeline.recent.query(&query, Instant::now());
                Response::ok(&TracesResult { kept: pipeline.recent.capacity(), traces })
            }
            Request::Map => Response::ok(&pipeline.red.service_map()),
            Request::Metrics => Response::ok(&pipeline.red.snapshot()),
        }
    }

    pub fn tls_enabled(&self) -> bool {
        self.features[&Feature::Tls]
    }

    pub fn enabled(&self, feature: Feature) -> bool {
        self.features.get(&feature).copied().unwrap_or(true)
    }

    pub fn set_feature(&mut self, feature: Feature, enabled: bool, probes: &mut Probes) -> Response {
        let was = self.features.get(&feature).copied().unwrap_or(true);
        self.features.insert(feature, enabled);
        if let Err(e) = probes.set_features_disabled(self.kernel_disabled_bits()) {
            self.features.insert(feature, was);
            return Response::refused(format!("{feature} not changed: {e:#}"));
        }
        log::info!("feature {feature} {}", if enabled { "enabled" } else { "disabled" });
        Response::ok(&FeatureChange::new(feature, enabled, was))
    }

    fn kernel_disabled_bits(&self) -> u32 {
        let mut bits = 0;
        if !self.features[&Feature::Http] {
            bits |= FEATURE_HTTP;
        }
        if !self.features[&Feature::Tls] {
            bits |= FEATURE_TLS;
        }
        if !self.features[&Feature::Dns] {
            bits |= FEATURE_DNS;
        }
        bits
    }

    fn apply_filter(&self, filter: &Filter, probes: &mut Probes) -> anyhow::Result<()> {
        let mut k = KernelFilter::default();
        let exe_pids = |names: &[String]| -> Vec<u32> {
            if names.is_empty() {
                return Vec::new();
            }
            pids_running(|exe| names.iter().any(|n| exe_matches(n, exe)))
        };
        for pid in filter.include_pids.iter().copied().chain(exe_pids(&filter.include_exes)) {
            k.pids.push((pid, INCLUDE));
        }
        for pid in filter.exclude_pids.iter().copied().chain(exe_pids(&filter.exclude_exes)) {
            k.pids.push((pid, EXCLUDE));
        }
        if !k.pids.is_empty() {
            k.flags |= FILTER_PIDS;
        }
        if !filter.include_pids.is_empty() || !filter.include_exes.is_empty() {
            k.flags |= FILTER_PIDS | FILTER_PIDS_INCLUDE_ONLY;
        }
        for &port in &filter.include_ports {
            k.ports.push((port, INCLUDE));
        }
        for &port in &filter.exclude_ports {
            k.ports.push((port, EXCLUDE));
        }
        if !k.ports.is_empty() {
            k.flags |= FILTER_PORTS;
        }
        if !filter.include_ports.is_empty() {
            k.flags |= FILTER_PORTS_INCLUDE_ONLY;
        }
        for path in &filter.include_cgroups {
            let ids = cgroup_ids(path)?;
            k.cgroups.extend(ids);
        }
        if !filter.include_cgroups.is_empty() {
            k.flags |= FILTER_CGROUPS_INCLUDE_ONLY;
        }
        probes.set_filter(k)
    }

    /// A process started a new program: executables in the filter apply to it.
    pub fn on_exec(&self, pid: u32, exe: &str, probes: &mut Probes) {
        let f = &self.filter;
        let mark = if f.exclude_exes.iter().any(|n| exe_matches(n, exe)) {
            EXCLUDE
        } else if f.include_exes.iter().any(|n| exe_matches(n, exe)) {
            INCLUDE
        } else {
            return;
        };
        if let Err(e) = probes.mark_pid(pid, mark) {
            log::warn!("filter: cannot mark pid {pid} ({exe}): {e:#}");
        }
    }

    pub fn filter_has_exes(&self) -> bool {
        !self.filter.include_exes.is_empty() || !self.filter.exclude_exes.is_empty()
    }

    fn status(&self, probes: &Probes, pipeline: &Pipeline, sink: &SpanSink, stats: &Stats) -> StatusReport {
        let mut features = BTreeMap::new();
        let socket_programs = ["tp_btf/sock_send_length", "tp_btf/sock_recv_length"];
        for f in Feature::ALL {
            let programs: Vec<String> = match f {
                Feature::Http | Feature::Grpc => socket_programs.iter().map(|s| s.to_string()).collect(),
                Feature::Dns => socket_programs
                    .iter()
                    .map(|s| s.to_string())
                    .chain(probes.resolver_attachments().map(|p| format!("uprobe {p} (getaddrinfo)")))
                    .collect(),
                Feature::Tls => probes
                    .tls
                    .iter()
                    .filter(|t| t.attached())
                    .map(|t| format!("uprobe {} ({} symbols)", t.display_path, t.symbols.len()))
                    .collect(),
                _ => Vec::new(),
            };
            let note = match f {
                Feature::Grpc => Some(
                    "gRPC calls (HTTP/2, content-type application/grpc) from the socket probes and TLS plaintext (daemon only: off, they make no spans)"
                        .to_string(),
                ),
                Feature::Dns => Some("UDP/TCP port 53 payloads and libc getaddrinfo uprobes".to_string()),
                Feature::Phases => Some("latency-breakdown child spans (daemon only)".to_string()),
                Feature::Metrics => Some(format!(
                    "RED duration histograms from every span, before sampling (daemon only): {} series",
                    pipeline.red.series_count()
                )),
                Feature::Tls => Some(format!(
                    "uprobes on those of these functions a library has: {}",
                    TLS_UPROBES.iter().map(|(s, _, _)| *s).collect::<Vec<_>>().join(", ")
                )),
                Feature::Http => None,
            };
            let unavailable = match f {
                Feature::Tls => probes.uprobes_refused().map(str::to_string),
                Feature::Dns => probes.uprobes_refused().map(|r| format!("getaddrinfo uprobes: {r}")),
                _ => None,
            };
            features.insert(
                f,
                FeatureStatus {
                    enabled: self.features[&f],
                    available: f.available() && !(f == Feature::Tls && unavailable.is_some()),
                    programs,
                    note,
                    unavailable,
                },
            );
        }
        // A library whose uprobes failed while TLS is enabled is listed
        // below with the reason (not as "detached").
        let mut tls_libraries: Vec<TlsLibraryStatus> = probes
            .tls
            .iter()
            .filter(|t| t.attached() || !probes.tls_enabled())
            .map(|t| TlsLibraryStatus {
                path: t.display_path.clone(),
                library: t.library.to_string(),
                symbols: t.symbols.iter().map(|(s, _)| s.clone()).collect(),
                state: if t.attached() { TlsState::Attached } else { TlsState::Detached },
                reason: (!t.attached()).then(|| "tls is disabled".to_string()),
            })
            .collect();
        tls_libraries.extend(pipeline.tls_not_visible().iter().map(|(path, reason)| TlsLibraryStatus {
            path: path.clone(),
            library: "unknown".into(),
            state: TlsState::NotVisible,
            reason: Some(reason.clone()),
            ..Default::default()
        }));
        let mut go_programs: Vec<GoProgramStatus> = probes
            .go
            .iter()
            .map(|g| GoProgramStatus {
                path: g.target.display_path.clone(),
                go_version: g.target.go_version.clone(),
                state: match (g.attached(), probes.tls_enabled()) {
                    (true, _) => TlsState::Attached,
                    (false, false) => TlsState::Detached,
                    (false, true) => TlsState::NotVisible,
                },
                functions: g.functions.iter().map(|f| f.to_string()).collect(),
                offsets: Some(g.target.offsets_source.as_str().to_string()),
                pids: g.pids.iter().copied().collect(),
                grpc_go: match &g.target.grpc {
                    GrpcSupport::Absent => None,
                    GrpcSupport::Hooked { version, offsets_source } => {
                        Some(format!("{version} hooked (offsets: {})", offsets_source.as_str()))
                    }
                    GrpcSupport::NotVisible { version, reason } => {
                        Some(format!("{version} not hooked: {reason}"))
                    }
                },
                reason: match (g.attached(), probes.tls_enabled()) {
                    (false, false) => Some("tls is disabled".into()),
                    _ if !g.errors.is_empty() => Some(g.errors.join("; ")),
                    _ => None,
                },
            })
            .collect();
        go_programs.extend(pipeline.go_not_visible().iter().map(|(path, version, reason)| GoProgramStatus {
            path: path.clone(),
            go_version: version.clone(),
            state: TlsState::NotVisible,
            reason: Some(reason.clone()),
            ..Default::default()
        }));
        let state = sink.state();
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).ok();
        let (healthy, last_error, failing_since) = match &state.health {
            ExporterHealth::Healthy => (true, None, None),
            ExporterHealth::Failing { since, last_error } => (false, Some(last_error.clone()), unix(*since)),
        };
        let mut kernel = vec![
            KernelFeature { name: "btf".into(), available: true, note: Some("/sys/kernel/btf/vmlinux".into()) },
            KernelFeature { name: "tp_btf".into(), available: true, note: Some(PROGRAMS.join(", ")) },
            KernelFeature { name: "ring_buffer".into(), available: true, note: None },
            KernelFeature { name: "uprobes".into(), available: true, note: None },
        ];
        kernel.push(KernelFeature {
            name: "kprobes".into(),
            available: Path::new("/sys/kernel/tracing/kprobe_events").exists(),
            note: Some("not used: tracepoints and uprobes only".into()),
        });
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            kernel,
            features,
            tls_libraries,
            go_programs,
            processes: pipeline
                .processes()
                .map(|r| ProcessStatus {
                    pid: r.pid,
                    service_name: r.service_name().to_string(),
                    executable: r.executable_path().unwrap_or_default().to_string(),
                })
                .collect(),
            connections_open: pipeline.connections_open() as u64,
            counters: {
                let mut c = counters_from_stats(stats);
                // Unlinked TLS calls are counted in the kernel (never sent).
                *c.entry("tls_unlinked".to_string()).or_default() += probes.tls_unlinked();
                use periscope_ebpf::kernel_counter::{GO_NO_OFFSETS, GO_NO_SOCKET};
                c.insert("go_tls_calls_without_offsets".into(), probes.kernel_counter(GO_NO_OFFSETS));
                c.insert("go_tls_calls_without_socket".into(), probes.kernel_counter(GO_NO_SOCKET));
                c.insert("red_routes_folded".into(), pipeline.red.routes_folded());
                c.insert("red_series_overflow".into(), pipeline.red.series_overflow());
                c.insert("recent_trace_spans_dropped".into(), pipeline.recent.spans_dropped());
                c
            },
            lost_per_probe: probes.lost_events().into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
            exporter: ExporterStatus {
                destination: state.destination.clone(),
                healthy,
                last_error,
                failing_since_unix_s: failing_since,
                last_success_unix_s: state.last_success.and_then(unix),
                queued: state.queued as u64,
                queue_capacity: state.queue_capacity as u64,
            },
            filter: self.filter.clone(),
            sample_ratio: pipeline.sampler().ratio(),
        }
    }
}

/// `name` is an executable's file name or full path.
pub fn exe_matches(name: &str, exe: &str) -> bool {
    if name.contains('/') { exe == name } else { exe.rsplit('/').next() == Some(name) }
}

/// Pids of running processes whose executable path satisfies `matches`.
fn pids_running(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| matches(&exe.to_string_lossy()))
        })
        .collect()
}

/// The cgroup ids (cgroup v2 directory inodes) of `path` and everything
/// below it.
fn cgroup_ids(path: &str) -> anyhow::Result<Vec<u64>> {
    let root = Path::new(CGROUP_ROOT).join(path.trim_start_matches('/'));
    let meta = std::fs::metadata(&root).map_err(|e| anyhow::anyhow!("cgroup {path}: {e}"))?;
    let mut ids = vec![meta.ino()];
    let mut stack = vec![root];
    let mut seen = HashSet::new();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() && seen.insert(meta.ino()) {
                if ids.len() >= MAX_CGROUPS {
                    anyhow::bail!("cgroup {path} has more than {MAX_CGROUPS} cgroups below it");
                }
                ids.push(meta.ino());
                stack.push(entry.path());
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_names_and_paths() {
        assert!(exe_matches("nginx", "/usr/sbin/nginx"));
        assert!(exe_matches("/usr/sbin/nginx", "/usr/sbin/nginx"));
        assert!(!exe_matches("ngin", "/usr/sbin/nginx"));
        assert!(!exe_matches("/usr/bin/nginx", "/usr/sbin/nginx"));
    }

    #[test]
    fn own_process_found_by_executable() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let pids = pids_running(|e| e == exe.to_string_lossy());
        assert!(pids.contains(&std::process::id()));
    }

    #[test]
    fn cgroup_root_expands_and_missing_cgroup_fails() {
        let ids = cgroup_ids("/").expect("cgroup v2 mounted at /sys/fs/cgroup");
        assert!(!ids.is_empty());
        assert!(cgroup_ids("/no/such/cgroup").is_err());
    }
}
