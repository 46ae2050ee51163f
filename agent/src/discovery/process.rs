//! Per-process OpenTelemetry resources, read once from /proc and cached until
//! the process exits.

use rustc_hash::{FxHashMap as HashMap, FxHashSet};
use std::path::Path;
use std::sync::Arc;

use periscope_ebpf::ProcessExecEvent;

use crate::spans::model::{Attribute, Resource};

pub struct ProcessCache {
    by_pid: HashMap<u32, Arc<Resource>>,
    /// Pids seen with network traffic (the others were only seen starting).
    with_traffic: FxHashSet<u32>,
    host_name: String,
    proc_root: std::path::PathBuf,
}

impl ProcessCache {
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    pub fn with_proc_root(root: impl Into<std::path::PathBuf>) -> Self {
        let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Self { by_pid: HashMap::default(), with_traffic: Default::default(), host_name, proc_root: root.into() }
    }

    /// The resource of `pid`, read from /proc on first use. A process that
    /// is already gone gets a minimal resource (pid and host only).
    pub fn resource(&mut self, pid: u32) -> Arc<Resource> {
        if let Some(r) = self.by_pid.get(&pid) {
            return r.clone();
        }
        let r = Arc::new(read_resource(&self.proc_root.join(pid.to_string()), pid, &self.host_name));
        self.by_pid.insert(pid, r.clone());
        r
    }

    /// `pid` started a new program: its resource is read again, from /proc if
    /// the process is still there, else from what the kernel captured.
    pub fn on_exec(&mut self, pid: u32, ev: &ProcessExecEvent) {
        let dir = self.proc_root.join(pid.to_string());
        let facts = facts_from_proc(&dir).unwrap_or_else(|| facts_from_exec(ev));
        self.by_pid.insert(pid, Arc::new(to_resource(pid, facts, &self.host_name)));
    }

    /// Reads `pid`'s resource now if it is not cached yet: called on a
    /// process's first event, while it is surely alive, so that short-lived
    /// clients (curl) are described even if they exit before their span is built.
    pub fn observe(&mut self, pid: u32) {
        // Every data event comes here: a known process costs one lookup.
        if self.with_traffic.contains(&pid) {
            return;
        }
        if !self.by_pid.contains_key(&pid) {
            self.resource(pid);
        }
        self.with_traffic.insert(pid);
    }

    /// The executable path of `pid`, if known.
    pub fn executable_path(&self, pid: u32) -> Option<String> {
        self.by_pid.get(&pid)?.executable_path().map(str::to_string)
    }

    /// Processes seen with network traffic.
    pub fn with_traffic(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.with_traffic.iter().filter_map(|pid| self.by_pid.get(pid))
    }

    pub fn forget(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
        self.with_traffic.remove(&pid);
    }

}

/// What identifies a process, from /proc or from the kernel's exec event.
#[derive(Default, Debug, PartialEq)]
pub struct ProcessFacts {
    pub exe_path: Option<String>,
    pub exe_name: Option<String>,
    pub otel_service_name: Option<String>,
    pub container_id: Option<String>,
}

/// Facts from /proc/PID; None when the process is gone (or a zombie).
fn facts_from_proc(dir: &Path) -> Option<ProcessFacts> {
    let exe_path = std::fs::read_link(dir.join("exe")).ok().map(|p| {
        let s = p.to_string_lossy().into_owned();
        // A replaced binary shows as "/usr/bin/x (deleted)".
        s.strip_suffix(" (deleted)").map(str::to_string).unwrap_or(s)
    })?;
    let exe_name = exe_path.rsplit('/').next().map(str::to_string);
    let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
    let container_id = std::fs::read_to_string(dir.join("cgroup")).ok().and_then(|c| container_id(&c));
    Some(ProcessFacts {
        exe_path: Some(exe_path),
        exe_name,
        otel_service_name: env_value(&environ, b"OTEL_SERVICE_NAME"),
        container_id,
    })
}

fn c_string(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    (end > 0).then(|| String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// Facts from the kernel's exec event. The executable's own file name comes
/// from the opened file (symlinks resolved, like /proc/PID/exe); its path is
/// the execve path with that name, when the path is absolute.
pub fn facts_from_exec(ev: &ProcessExecEvent) -> ProcessFacts {
    let exe_name = c_string(&ev.exe_name).or_else(|| c_string(&ev.comm));
    let exe_path = c_string(&ev.filename).filter(|p| p.starts_with('/')).map(|p| match (&exe_name, p.rsplit_once('/')) {
        (Some(name), Some((dir, base))) if base != name => format!("{dir}/{name}"),
        _ => p,
    });
    let env = &ev.env[..(ev.env_len as usize).min(ev.env.len())];
    ProcessFacts { exe_path, exe_name, otel_service_name: env_value(env, b"OTEL_SERVICE_NAME"), container_id: None }
}

fn read_resource(dir: &Path, pid: u32, host_name: &str) -> Resource {
    let facts = facts_from_proc(dir).unwrap_or_else(|| ProcessFacts {
        exe_name: std::fs::read_to_string(dir.join("comm")).ok().map(|c| c.trim().to_string()),
        ..Default::default()
    });
    to_resource(pid, facts, host_name)
}

fn to_resource(pid: u32, facts: ProcessFacts, host_name: &str) -> Resource {
    let ProcessFacts { exe_path, exe_name, otel_service_name, container_id } = facts;
    let service_name = otel_service_name
        .filter(|v| !v.is_empty())
        .or_else(|| exe_name.clone())
        .unwrap_or_else(|| format!("unknown_service:pid{pid}"));

    let mut attributes = vec![
        Attribute::str("service.name", service_name),
        Attribute::int("process.pid", pid as i64),
        Attribute::str("host.name", host_name.to_string()),
    ];
    if let Some(name) = exe_name {
        attributes.push(Attribute::str("process.executable.name", name));
    }
    if let Some(path) = exe_path {
        attributes.push(Attribute::str("process.executable.path", path));
    }
    if let Some(id) = container_id {
        attributes.push(Attribute::str("container.id", id));
    }
    Resource { pid, attributes }
}

/// The value of `key` in a NUL-separated environment block.
pub fn env_value(environ: &[u8], key: &[u8]) -> Option<String> {
    environ.split(|&b| b == 0).find_map(|entry| {
        let rest = entry.strip_prefix(key)?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(rest).into_owned())
    })
}

/// A 64-hex-digit container id in a cgroup path (docker, containerd, cri-o).
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.rsplit(':').next()?;
        path.split(['/', '-', '.']).find(|part| part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit())).map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_value_finds_exact_key() {
        let env = b"PATH=/bin\0OTEL_SERVICE_NAME_X=no\0OTEL_SERVICE_NAME=checkout\0";
        assert_eq!(env_value(env, b"OTEL_SERVICE_NAME").as_deref(), Some("checkout"));
        assert_eq!(env_value(env, b"HOME"), None);
    }

    #[test]
    fn container_id_from_cgroup_paths() {
        let id = "a".repeat(64);
        assert_eq!(container_id(&format!("0::/system.slice/docker-{id}.scope")), Some(id.clone()));
        assert_eq!(container_id(&format!("0::/kubepods/burstable/pod1/{id}")), Some(id));
        assert_eq!(container_id("0::/user.slice/user-0.slice/session-1.scope"), None);
    }

    #[test]
    fn own_process_resource() {
        let mut cache = ProcessCache::new();
        let pid = std::process::id();
        let r = cache.resource(pid);
        assert_eq!(r.pid, pid);
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(r.service_name(), std::env::var("OTEL_SERVICE_NAME").unwrap_or(name));
    }

    fn exec_event(comm: &str, exe_name: &str, filename: &str, env: &[u8]) -> ProcessExecEvent {
        // SAFETY: plain repr(C) data, all-zero is valid.
        let mut ev: ProcessExecEvent = unsafe { std::mem::zeroed() };
        ev.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        ev.exe_name[..exe_name.len()].copy_from_slice(exe_name.as_bytes());
        ev.filename[..filename.len()].copy_from_slice(filename.as_bytes());
        ev.env[..env.len()].copy_from_slice(env);
        ev.env_len = env.len() as u32;
        ev
    }

    #[test]
    fn exec_facts_resolve_symlinked_name_and_service() {
        let ev = exec_event("python3", "python3.11", "/usr/bin/python3", b"A=1\0OTEL_SERVICE_NAME=billing\0");
        let facts = facts_from_exec(&ev);
        assert_eq!(facts.exe_name.as_deref(), Some("python3.11"));
        assert_eq!(facts.exe_path.as_deref(), Some("/usr/bin/python3.11"));
        assert_eq!(facts.otel_service_name.as_deref(), Some("billing"));
        let ev = exec_event("curl", "", "./curl", b"");
        let facts = facts_from_exec(&ev);
        assert_eq!(facts.exe_name.as_deref(), Some("curl"));
        assert_eq!(facts.exe_path, None);
    }

    #[test]
    fn exec_of_vanished_process_uses_kernel_facts() {
        let mut cache = ProcessCache::with_proc_root("/nonexistent-proc");
        cache.on_exec(77, &exec_event("curl", "curl", "/usr/bin/curl", b""));
        let r = cache.resource(77);
        assert_eq!(r.service_name(), "curl");
        assert!(r.attributes.contains(&Attribute::str("process.executable.path", "/usr/bin/curl")));
    }

    #[test]
    fn vanished_process_gets_minimal_resource() {
        let mut cache = ProcessCache::with_proc_root("/nonexistent-proc");
        let r = cache.resource(4242);
        assert_eq!(r.service_name(), "unknown_service:pid4242");
    }
}
