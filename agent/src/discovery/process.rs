//! Per-process OpenTelemetry resources, read once from /proc and cached until
//! the process exits. The container and Kubernetes part (discovery::kubernetes)
//! is read once per container and shared by its processes.

use rustc_hash::{FxHashMap as HashMap, FxHashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use periscope_ebpf::ProcessExecEvent;

use super::kubernetes::{self, CgroupIds, ContainerMeta, PodSources};
use super::kubernetes_api::{PodInfo, PodRef, PodRequests};
use crate::spans::model::{Attribute, Resource};

/// Where the kubelet mounts a pod's service-account token (and the pod's
/// namespace beside it), inside the container's root. Absent when the pod
/// sets `automountServiceAccountToken: false`.
const SERVICE_ACCOUNT_NAMESPACE: &str = "var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The namespace file is a name of at most 63 characters; anything longer is
/// not it, and is not read further.
const NAMESPACE_FILE_MAX: u64 = 256;

struct Entry {
    resource: Arc<Resource>,
    /// Shared with the other cached processes of the same container.
    container: Option<Arc<ContainerMeta>>,
    /// The process's own `OTEL_SERVICE_NAME` (not empty): it wins over what
    /// the Kubernetes API says.
    own_service_name: Option<Box<str>>,
}

/// A pod's lookup in the Kubernetes API (discovery::kubernetes_api).
enum PodState {
    /// Asked; no answer yet (or none to come: the pod is gone, the API
    /// refuses). Its processes keep what /proc gave.
    Requested,
    /// The request queue was full: asked again on the next tick.
    Dropped(PodRef),
    Known(Arc<PodInfo>),
}

/// Pods whose lookup is remembered (a node runs at most a few hundred).
const MAX_PODS: usize = 4096;

pub struct ProcessCache {
    by_pid: HashMap<u32, Entry>,
    /// Pids seen with network traffic (the others were only seen starting).
    with_traffic: FxHashSet<u32>,
    /// What is known about each container (by container id), read when its
    /// first process is and forgotten with its last cached process.
    containers: HashMap<String, Arc<ContainerMeta>>,
    host_name: String,
    /// The agent's own `NODE_NAME` (the DaemonSet sets it from
    /// `spec.nodeName`): `k8s.node.name` of processes in pods.
    node_name: Option<String>,
    /// The host's UTS namespace (`/proc/1/ns/uts`). A process in a pod that
    /// shares it is on the host's network, and its `HOSTNAME` is the node's.
    host_uts: Option<PathBuf>,
    /// Forked children (not yet exec'd) and their parents: a child gone
    /// before its /proc was read is described as its parent.
    parents: HashMap<u32, u32>,
    proc_root: PathBuf,
    /// Lookups in the Kubernetes API, when the agent can reach it.
    api: Option<PodRequests>,
    /// By pod uid, from a pod's first process met to its last one forgotten.
    pods: HashMap<String, PodState>,
    /// Some `pods` are `Dropped`.
    pods_dropped: bool,
}

/// Forks remembered at once (each is forgotten at the child's exit or exec).
const MAX_FORKS: usize = 65536;

impl ProcessCache {
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    pub fn with_proc_root(root: impl Into<PathBuf>) -> Self {
        let proc_root = root.into();
        let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let node_name = std::env::var("NODE_NAME").ok().filter(|n| !n.trim().is_empty());
        // In a pod of its own the agent's hostname is the pod's: the node's
        // name (DaemonSet: spec.nodeName) is the host's.
        let host_name = node_name.clone().unwrap_or(host_name);
        let host_uts = std::fs::read_link(proc_root.join("1/ns/uts")).ok();
        Self {
            by_pid: HashMap::default(),
            with_traffic: Default::default(),
            containers: HashMap::default(),
            host_name,
            node_name,
            host_uts,
            parents: HashMap::default(),
            proc_root,
            api: None,
            pods: HashMap::default(),
            pods_dropped: false,
        }
    }

    /// From now on, a pod's first process met asks the Kubernetes API
    /// about the pod (never waiting: see [`PodRequests::request`]).
    pub fn set_kubernetes_api(&mut self, requests: PodRequests) {
        self.api = Some(requests);
    }

    /// What the Kubernetes API said about a pod: the cached resources of its
    /// processes are replaced, and its processes met later get it too.
    /// Spans already built keep the resource (the `Arc`) they were built
    /// with; only spans built from now on carry the new attributes.
    pub fn apply_pod(&mut self, info: Arc<PodInfo>) {
        // No process of that pod cached any more: nothing to do.
        let Some(state) = self.pods.get_mut(&info.uid) else { return };
        *state = PodState::Known(info.clone());
        for e in self.by_pid.values_mut() {
            let Some(c) = &e.container else { continue };
            if c.pod.as_ref().is_some_and(|p| p.uid == info.uid) {
                e.resource = Arc::new(with_pod_info(&e.resource, e.own_service_name.as_deref(), &c.container_id, &info));
            }
        }
    }

    /// Asks again for the pods whose request found the queue full (once a
    /// tick); stops at the first that still does not fit.
    pub fn retry_pod_requests(&mut self) {
        let Some(api) = &self.api else { return };
        if !self.pods_dropped {
            return;
        }
        self.pods_dropped = false;
        for state in self.pods.values_mut() {
            let PodState::Dropped(pod) = state else { continue };
            if api.request(pod.clone()) {
                *state = PodState::Requested;
            } else {
                self.pods_dropped = true;
                return;
            }
        }
    }

    /// The API's answer for the pod of `container` when there is one; asks
    /// for it on the pod's first process.
    fn pod_info(&mut self, container: &ContainerMeta) -> Option<Arc<PodInfo>> {
        let api = self.api.as_ref()?;
        let pod = container.pod.as_ref()?;
        match self.pods.get(&pod.uid) {
            Some(PodState::Known(info)) => return Some(info.clone()),
            Some(_) => return None,
            None => {}
        }
        // Without its name and namespace (a pod on the host's network, one
        // without a service-account mount) a pod cannot be asked about.
        let (Some(name), Some(namespace)) = (&pod.name, &pod.namespace) else { return None };
        if self.pods.len() >= MAX_PODS {
            return None;
        }
        let request = PodRef { uid: pod.uid.clone(), namespace: namespace.clone(), name: name.clone() };
        let state = if api.request(request.clone()) {
            PodState::Requested
        } else {
            self.pods_dropped = true;
            PodState::Dropped(request)
        };
        self.pods.insert(pod.uid.clone(), state);
        None
    }

    /// The resource of `pid`, read from /proc on first use. A process that
    /// is already gone gets a minimal resource (pid and host only).
    pub fn resource(&mut self, pid: u32) -> Arc<Resource> {
        if let Some(e) = self.by_pid.get(&pid) {
            return e.resource.clone();
        }
        let dir = self.proc_root.join(pid.to_string());
        let facts = match facts_from_proc(&dir) {
            Some(facts) => facts,
            None => {
                if let Some(entry) = self.as_parent(pid) {
                    let r = entry.resource.clone();
                    self.by_pid.insert(pid, entry);
                    return r;
                }
                ProcessFacts {
                    exe_name: std::fs::read_to_string(dir.join("comm")).ok().map(|c| c.trim().to_string()),
                    ..Default::default()
                }
            }
        };
        let entry = self.entry(pid, &dir, facts);
        let r = entry.resource.clone();
        self.by_pid.insert(pid, entry);
        r
    }

    /// `parent` forked `child`: until it execs, the child runs the parent's
    /// program.
    pub fn on_fork(&mut self, parent: u32, child: u32) {
        if self.parents.len() >= MAX_FORKS {
            self.parents.clear();
        }
        self.parents.insert(child, parent);
    }

    /// A gone forked child described as its parent (read now if needed),
    /// with its own pid.
    fn as_parent(&mut self, pid: u32) -> Option<Entry> {
        let parent = self.parents.remove(&pid)?;
        if parent == pid {
            return None;
        }
        self.resource(parent);
        let p = self.by_pid.get(&parent)?;
        let mut attributes = p.resource.attributes.clone();
        for a in &mut attributes {
            if a.key == "process.pid" {
                *a = Attribute::int("process.pid", i64::from(pid));
            }
        }
        Some(Entry {
            resource: Arc::new(Resource { pid, attributes }),
            container: p.container.clone(),
            own_service_name: p.own_service_name.clone(),
        })
    }

    /// `pid` started a new program: its resource is read again, from /proc if
    /// the process is still there, else from what the kernel captured.
    pub fn on_exec(&mut self, pid: u32, ev: &ProcessExecEvent) {
        self.parents.remove(&pid);
        let dir = self.proc_root.join(pid.to_string());
        let facts = facts_from_proc(&dir).unwrap_or_else(|| facts_from_exec(ev));
        let entry = self.entry(pid, &dir, facts);
        if let Some(old) = self.by_pid.insert(pid, entry) {
            self.release(old);
        }
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
        self.by_pid.get(&pid)?.resource.executable_path().map(str::to_string)
    }

    /// Processes seen with network traffic.
    pub fn with_traffic(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.with_traffic.iter().filter_map(|pid| self.by_pid.get(pid)).map(|e| &e.resource)
    }

    pub fn forget(&mut self, pid: u32) {
        self.parents.remove(&pid);
        if let Some(old) = self.by_pid.remove(&pid) {
            self.release(old);
        }
        self.with_traffic.remove(&pid);
    }

    /// The agent's node name, as `NODE_NAME` would give it (tests).
    #[cfg(test)]
    fn with_node_name(mut self, node_name: Option<&str>) -> Self {
        self.node_name = node_name.map(str::to_string);
        self
    }

    fn entry(&mut self, pid: u32, dir: &Path, mut facts: ProcessFacts) -> Entry {
        let container = facts.cgroup.take().map(|ids| self.container(dir, ids, facts.pod_hostname.as_deref()));
        let own_service_name = facts.otel_service_name.as_deref().filter(|v| !v.is_empty()).map(Box::from);
        let info = container.as_deref().and_then(|c| self.pod_info(c));
        let mut resource = to_resource(pid, facts, container.as_deref(), &self.host_name);
        if let (Some(info), Some(c)) = (info, &container) {
            resource = with_pod_info(&resource, own_service_name.as_deref(), &c.container_id, &info);
        }
        Entry { resource: Arc::new(resource), container, own_service_name }
    }

    /// The container of a process (in `dir`) whose cgroup says `ids`: cached,
    /// or read now from this process's files.
    fn container(&mut self, dir: &Path, ids: CgroupIds, hostname: Option<&str>) -> Arc<ContainerMeta> {
        if let Some(c) = self.containers.get(&ids.container_id)
            && c.pod.as_ref().map(|p| &p.uid) == ids.pod_uid.as_ref()
        {
            return c.clone();
        }
        let (meta, settled) = self.read_container(dir, ids, hostname);
        let meta = Arc::new(meta);
        if settled {
            self.containers.insert(meta.container_id.clone(), meta.clone());
        }
        meta
    }

    /// The pod's part, read once per container: two small reads, no walk.
    /// `false` beside it when the process exited while it was read: that
    /// answer is kept for this process only, and the container's next
    /// process is read again.
    fn read_container(&self, dir: &Path, ids: CgroupIds, hostname: Option<&str>) -> (ContainerMeta, bool) {
        if ids.pod_uid.is_none() {
            return (ContainerMeta::new(ids, PodSources::default()), true);
        }
        let namespace = read_small_file_in_root(&dir.join("root"), SERVICE_ACCOUNT_NAMESPACE, NAMESPACE_FILE_MAX);
        if let Err(e) = &namespace
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log::debug!("{}: pod namespace not read: {e}", dir.display());
        }
        // `HOSTNAME` names the pod only in a UTS namespace of its own: a pod
        // on the host's network shares the host's and gets the node's
        // hostname. When either namespace cannot be read, it is not used.
        // Read last: a process's namespaces go when it exits, so a link
        // still there means the environment and the root above were its own.
        let own_uts = std::fs::read_link(dir.join("ns/uts")).ok();
        let own_namespace = matches!((&own_uts, &self.host_uts), (Some(own), Some(host)) if own != host);
        let meta = ContainerMeta::new(
            ids,
            PodSources {
                hostname: hostname.filter(|_| own_namespace),
                namespace_file: namespace.as_deref().ok(),
                node_name: self.node_name.as_deref(),
            },
        );
        (meta, own_uts.is_some())
    }

    /// Drops a cached process's share of its container, and the container
    /// with its last process.
    fn release(&mut self, old: Entry) {
        let Some(c) = old.container else { return };
        // Held by the table and by `c`: no other process left.
        if Arc::strong_count(&c) <= 2
            && self.containers.get(&c.container_id).is_some_and(|m| Arc::ptr_eq(m, &c))
        {
            self.containers.remove(&c.container_id);
            // The pod's last container: its lookup is forgotten too (the
            // lookup task still has the answer, should the pod come back).
            if let Some(pod) = &c.pod
                && !self.containers.values().any(|m| m.pod.as_ref().is_some_and(|p| p.uid == pod.uid))
            {
                self.pods.remove(&pod.uid);
            }
        }
    }
}

/// What identifies a process, from /proc or from the kernel's exec event.
#[derive(Default, Debug, PartialEq)]
pub struct ProcessFacts {
    pub exe_path: Option<String>,
    pub exe_name: Option<String>,
    pub otel_service_name: Option<String>,
    /// The container (and pod) its cgroup names.
    pub cgroup: Option<CgroupIds>,
    /// Its `HOSTNAME`, read only for a process in a pod.
    pub pod_hostname: Option<String>,
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
    let cgroup = std::fs::read_to_string(dir.join("cgroup")).ok().and_then(|c| kubernetes::parse_cgroup(&c));
    let in_pod = cgroup.as_ref().is_some_and(|c| c.pod_uid.is_some());
    Some(ProcessFacts {
        exe_path: Some(exe_path),
        exe_name,
        otel_service_name: env_value(&environ, b"OTEL_SERVICE_NAME"),
        pod_hostname: if in_pod { env_value(&environ, b"HOSTNAME") } else { None },
        cgroup,
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
    ProcessFacts { exe_path, exe_name, otel_service_name: env_value(env, b"OTEL_SERVICE_NAME"), ..Default::default() }
}

/// `service.name`: the process's own `OTEL_SERVICE_NAME`, else the workload
/// its pod's name points to (an inferred Deployment), else its executable.
fn to_resource(pid: u32, facts: ProcessFacts, container: Option<&ContainerMeta>, host_name: &str) -> Resource {
    let ProcessFacts { exe_path, exe_name, otel_service_name, .. } = facts;
    let service_name = otel_service_name
        .filter(|v| !v.is_empty())
        .or_else(|| container.and_then(ContainerMeta::owner_name).map(str::to_string))
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
    if let Some(c) = container {
        attributes.extend(c.attributes());
    }
    Resource { pid, attributes }
}

/// Attributes the Kubernetes API gives (or, for the inferred Deployment,
/// takes away): replaced as a whole on each answer.
const FROM_API: [&str; 9] = [
    "service.version",
    "k8s.container.name",
    "k8s.replicaset.name",
    "k8s.deployment.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.job.name",
    "k8s.cronjob.name",
    "periscope.k8s.owner.inferred",
];

/// A process's resource with what the Kubernetes API said about its pod:
/// `k8s.container.name` (by its container id), the owners found instead of
/// the inferred Deployment, and `service.name` by the OpenTelemetry
/// precedence: the process's own `OTEL_SERVICE_NAME`, then the pod's
/// `resource.opentelemetry.io/service.name` annotation, then its
/// `app.kubernetes.io/name` label, then its workload's name, then the
/// executable's. `service.version` from `app.kubernetes.io/version`, unless
/// the process named its service itself (the label may not describe it).
fn with_pod_info(old: &Resource, own_service_name: Option<&str>, container_id: &str, info: &PodInfo) -> Resource {
    let service_name = own_service_name
        .or(info.service_name_annotation.as_deref())
        .or(info.app_name.as_deref())
        .or(info.owner_name())
        .or(old.str_attr("process.executable.name"))
        .map(str::to_string)
        .unwrap_or_else(|| format!("unknown_service:pid{}", old.pid));
    let mut attributes: Vec<Attribute> = Vec::with_capacity(old.attributes.len() + 4);
    for a in &old.attributes {
        if a.key == "service.name" {
            attributes.push(Attribute::str("service.name", service_name.as_str()));
            if let Some(v) = info.app_version.as_deref().filter(|_| own_service_name.is_none()) {
                attributes.push(Attribute::str("service.version", v));
            }
        } else if !FROM_API.contains(&&*a.key) {
            attributes.push(a.clone());
        }
    }
    if let Some(name) = info.container_name(container_id) {
        attributes.push(Attribute::str("k8s.container.name", name));
    }
    for (key, name) in &info.owners {
        attributes.push(Attribute::str(*key, name.as_str()));
    }
    Resource { pid: old.pid, attributes }
}

/// The value of `key` in a NUL-separated environment block.
pub fn env_value(environ: &[u8], key: &[u8]) -> Option<String> {
    environ.split(|&b| b == 0).find_map(|entry| {
        let rest = entry.strip_prefix(key)?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(rest).into_owned())
    })
}

/// The container id a cgroup file names (kubernetes::parse_cgroup).
#[cfg(test)]
pub fn container_id(cgroup: &str) -> Option<String> {
    kubernetes::parse_cgroup(cgroup).map(|c| c.container_id)
}

/// Reads a small regular file at `path` inside `root` (a process's
/// /proc/PID/root), resolving symlinks inside that root as the process itself
/// would (openat2 with RESOLVE_IN_ROOT, Linux 5.6). A plain open would
/// resolve an absolute symlink from the agent's own root: many images have
/// `/var/run -> /run`, and that would read the agent's own namespace file.
/// Never blocks (a FIFO or a device planted there is refused) and reads at
/// most `max` bytes.
fn read_small_file_in_root(root: &Path, path: &str, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::OpenOptionsExt;

    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(root)?;
    let c_path = std::ffi::CString::new(path).map_err(|_| Error::from(ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain data (non_exhaustive, so not built by name);
    // all-zero is valid and means "no flags".
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let mut attempts = 0;
    let fd = loop {
        // SAFETY: valid descriptor, NUL-terminated path, `how` outlives the call and its size is passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                c_path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            break fd as libc::c_int;
        }
        let e = Error::last_os_error();
        // EAGAIN: a rename or mount raced the in-root lookup; worth one retry.
        attempts += 1;
        if e.raw_os_error() != Some(libc::EAGAIN) || attempts > 1 {
            return Err(e);
        }
    };
    // SAFETY: a descriptor openat2 just returned, owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    if !file.metadata()?.is_file() {
        return Err(Error::new(ErrorKind::InvalidData, "not a regular file"));
    }
    let mut out = Vec::new();
    file.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(Error::new(ErrorKind::InvalidData, "larger than expected"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;

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

    /// A fake /proc: `PID/{cgroup,environ,exe,ns/uts,root/...}` and the
    /// host's `1/ns/uts`. Removed when dropped.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("periscope-proc-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("1/ns")).unwrap();
            std::os::unix::fs::symlink("uts:[4026531838]", dir.join("1/ns/uts")).unwrap();
            Self(dir)
        }

        fn process(&self, pid: u32, exe: &str, cgroup: &str, environ: &[u8], uts: Option<&str>) -> PathBuf {
            let dir = self.0.join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns")).unwrap();
            std::fs::create_dir_all(dir.join("root")).unwrap();
            std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
            std::fs::write(dir.join("cgroup"), cgroup).unwrap();
            std::fs::write(dir.join("environ"), environ).unwrap();
            if let Some(uts) = uts {
                std::os::unix::fs::symlink(uts, dir.join("ns/uts")).unwrap();
            }
            dir
        }

        /// The service-account mount as the kubelet makes it (`namespace ->
        /// ..data/namespace`), under `/run` with the image's `/var/run ->
        /// /run`: an absolute symlink, to be resolved in the container's root.
        fn service_account(&self, pid: u32, namespace: &str) {
            let root = self.0.join(pid.to_string()).join("root");
            let sa = root.join("run/secrets/kubernetes.io/serviceaccount");
            std::fs::create_dir_all(sa.join("..2026_01_01_00_00_00.1")).unwrap();
            std::fs::write(sa.join("..2026_01_01_00_00_00.1/namespace"), namespace).unwrap();
            std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", sa.join("..data")).unwrap();
            std::os::unix::fs::symlink("..data/namespace", sa.join("namespace")).unwrap();
            std::fs::create_dir_all(root.join("var")).unwrap();
            std::os::unix::fs::symlink("/run", root.join("var/run")).unwrap();
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A forking server's child, gone before its /proc was read, is its
    /// parent's program with its own pid; once it execs, it is itself.
    #[test]
    fn a_gone_forked_child_is_described_as_its_parent() {
        let proc = FakeProc::new("fork");
        proc.process(700, "/bin/busybox", &pod_cgroup(CID), b"HOSTNAME=web-7d9f8b6c5d-x2x4z\0", Some("uts:[4026532999]"));
        let mut cache = ProcessCache::with_proc_root(&proc.0);
        cache.on_fork(700, 701);
        let child = cache.resource(701);
        assert_eq!(child.pid, 701);
        assert_eq!(child.str_attr("process.executable.path"), Some("/bin/busybox"));
        assert_eq!(child.str_attr("container.id"), Some(CID));
        assert!(child.attributes.iter().any(|a| a.key == "process.pid" && a.value == crate::spans::model::AttrValue::Int(701)));
        // Without a fork on record, a gone process is only its pid.
        assert_eq!(cache.resource(702).service_name(), "unknown_service:pid702");
        // An exec forgets the fork.
        cache.on_fork(700, 703);
        cache.forget(703);
        assert_eq!(cache.resource(703).service_name(), "unknown_service:pid703");
    }

    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const POD_UID: &str = "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d";

    fn pod_cgroup(cid: &str) -> String {
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{cid}.scope\n",
            POD_UID.replace('-', "_")
        )
    }

    fn keys(r: &Resource) -> Vec<&str> {
        r.attributes.iter().map(|a| &*a.key).collect()
    }

    #[test]
    fn pod_process_resource_from_fake_proc() {
        let proc = FakeProc::new("pod");
        proc.process(
            4242,
            "/usr/local/bin/server",
            &pod_cgroup(CID),
            b"PATH=/bin\0HOSTNAME=web-7d9f8b6c5d-x2x4z\0",
            Some("uts:[4026532999]"),
        );
        proc.service_account(4242, "shop");
        let mut cache = ProcessCache::with_proc_root(&proc.0).with_node_name(Some("node-1"));
        let r = cache.resource(4242);
        assert_eq!(r.service_name(), "web");
        assert_eq!(
            keys(&r),
            [
                "service.name",
                "process.pid",
                "host.name",
                "process.executable.name",
                "process.executable.path",
                "container.id",
                "k8s.pod.uid",
                "k8s.pod.name",
                "k8s.namespace.name",
                "k8s.deployment.name",
                "periscope.k8s.owner.inferred",
                "k8s.node.name",
            ]
        );
        assert_eq!(r.str_attr("process.executable.name"), Some("server"));
        assert_eq!(r.str_attr("container.id"), Some(CID));
        assert_eq!(r.str_attr("k8s.pod.uid"), Some(POD_UID));
        assert_eq!(r.str_attr("k8s.pod.name"), Some("web-7d9f8b6c5d-x2x4z"));
        assert_eq!(r.str_attr("k8s.namespace.name"), Some("shop"));
        assert_eq!(r.str_attr("k8s.deployment.name"), Some("web"));
        assert!(r.attributes.contains(&Attribute::bool("periscope.k8s.owner.inferred", true)));
        assert_eq!(r.str_attr("k8s.node.name"), Some("node-1"));

        // A second process of the same container shares the container's part
        // as read the first time (no mount or environment of its own here), and
        // its own OTEL_SERVICE_NAME wins over the inferred name.
        proc.process(4243, "/bin/sh", &pod_cgroup(CID), b"OTEL_SERVICE_NAME=checkout\0", Some("uts:[4026532999]"));
        let r2 = cache.resource(4243);
        assert_eq!(r2.service_name(), "checkout");
        assert_eq!(r2.attributes[5..], r.attributes[5..]);
        assert_eq!(cache.containers.len(), 1);

        // The container is forgotten with its last process.
        cache.forget(4242);
        assert_eq!(cache.containers.len(), 1);
        cache.forget(4243);
        assert!(cache.containers.is_empty());
    }

    #[test]
    fn pod_process_without_names() {
        let proc = FakeProc::new("hostnet");
        let other = "f".repeat(64);
        // On the host's network: HOSTNAME is the node's, not the pod's.
        proc.process(7, "/usr/bin/kube-proxy", &pod_cgroup(CID), b"HOSTNAME=node-1\0", Some("uts:[4026531838]"));
        // Something that is not a file where the namespace should be (a FIFO
        // would block a plain read) and no NODE_NAME.
        proc.process(8, "/app/server", &pod_cgroup(&other), b"HOSTNAME=api-5c6d7f8b9-bcdfg\0", Some("uts:[4026532001]"));
        let sa = proc.0.join("8/root/var/run/secrets/kubernetes.io/serviceaccount");
        std::fs::create_dir_all(&sa).unwrap();
        let fifo = std::ffi::CString::new(sa.join("namespace").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        let mut cache = ProcessCache::with_proc_root(&proc.0).with_node_name(None);
        let r = cache.resource(7);
        assert_eq!(r.service_name(), "kube-proxy");
        assert_eq!(r.str_attr("k8s.pod.uid"), Some(POD_UID));
        assert_eq!(r.str_attr("k8s.pod.name"), None);
        assert_eq!(r.str_attr("k8s.deployment.name"), None);
        assert_eq!(r.str_attr("k8s.namespace.name"), None);

        let r = cache.resource(8);
        assert_eq!(r.service_name(), "api");
        assert_eq!(r.str_attr("container.id"), Some(&other[..]));
        assert_eq!(r.str_attr("k8s.pod.name"), Some("api-5c6d7f8b9-bcdfg"));
        assert_eq!(r.str_attr("k8s.namespace.name"), None);
        assert_eq!(r.str_attr("k8s.node.name"), None);
    }

    #[test]
    fn container_process_outside_kubernetes() {
        let proc = FakeProc::new("docker");
        // HOSTNAME and a service-account file are not read outside a pod.
        proc.process(9, "/usr/sbin/nginx", &format!("0::/system.slice/docker-{CID}.scope\n"), b"HOSTNAME=web-7d9f8b6c5d-x2x4z\0", Some("uts:[4026532002]"));
        proc.service_account(9, "shop");
        proc.process(10, "/usr/bin/curl", "0::/user.slice/user-0.slice/session-1.scope\n", b"", None);
        let mut cache = ProcessCache::with_proc_root(&proc.0).with_node_name(Some("node-1"));
        let r = cache.resource(9);
        assert_eq!(r.service_name(), "nginx");
        assert_eq!(
            keys(&r),
            ["service.name", "process.pid", "host.name", "process.executable.name", "process.executable.path", "container.id"]
        );
        let r = cache.resource(10);
        assert_eq!(r.service_name(), "curl");
        assert_eq!(keys(&r), ["service.name", "process.pid", "host.name", "process.executable.name", "process.executable.path"]);
    }

    #[test]
    fn exec_rereads_and_keeps_container_count() {
        let proc = FakeProc::new("exec");
        proc.process(11, "/usr/local/bin/server", &pod_cgroup(CID), b"HOSTNAME=web-7d9f8b6c5d-x2x4z\0", Some("uts:[4026532999]"));
        let mut cache = ProcessCache::with_proc_root(&proc.0).with_node_name(None);
        cache.resource(11);
        cache.on_exec(11, &exec_event("server", "server", "/usr/local/bin/server", b""));
        assert_eq!(cache.containers.len(), 1);
        assert_eq!(cache.resource(11).str_attr("k8s.deployment.name"), Some("web"));
        cache.forget(11);
        assert!(cache.containers.is_empty());
    }

    #[test]
    fn a_process_gone_mid_read_does_not_speak_for_its_container() {
        let proc = FakeProc::new("gone");
        // No ns/uts link: the process exited while it was read.
        proc.process(12, "/bin/cat", &pod_cgroup(CID), b"HOSTNAME=web-7d9f8b6c5d-x2x4z\0", None);
        proc.process(13, "/usr/local/bin/server", &pod_cgroup(CID), b"HOSTNAME=web-7d9f8b6c5d-x2x4z\0", Some("uts:[4026532999]"));
        let mut cache = ProcessCache::with_proc_root(&proc.0).with_node_name(None);
        let r = cache.resource(12);
        assert_eq!(r.str_attr("k8s.pod.uid"), Some(POD_UID));
        assert_eq!(r.str_attr("k8s.pod.name"), None);
        assert!(cache.containers.is_empty());
        let r = cache.resource(13);
        assert_eq!(r.str_attr("k8s.pod.name"), Some("web-7d9f8b6c5d-x2x4z"));
        assert_eq!(cache.containers.len(), 1);
        cache.forget(12);
        assert_eq!(cache.containers.len(), 1);
        cache.forget(13);
        assert!(cache.containers.is_empty());
    }

    fn pod_cgroup_of(uid: &str, cid: &str) -> String {
        format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{cid}.scope\n",
            uid.replace('-', "_")
        )
    }

    fn api_requests(capacity: usize) -> (PodRequests, tokio::sync::mpsc::Receiver<PodRef>, Arc<crate::stats::Stats>) {
        let stats = Arc::new(crate::stats::Stats::default());
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (PodRequests::new(tx, stats.clone()), rx, stats)
    }

    /// The whole path: a pod's first process asks, the lookup task asks the
    /// (fake) API server, its answer rewrites the cached resources.
    #[tokio::test]
    async fn pod_resources_from_the_kubernetes_api() {
        use super::super::kubernetes_api::{self as api, tests as fake};
        let proc = FakeProc::new("k8s-api");
        proc.process(4242, "/usr/local/bin/server", &pod_cgroup(CID), b"HOSTNAME=web-7d9f8b6c5d-x2x4z\0", Some("uts:[4026532999]"));
        proc.service_account(4242, "shop");
        proc.process(4243, "/bin/sh", &pod_cgroup(CID), b"OTEL_SERVICE_NAME=checkout\0", Some("uts:[4026532999]"));
        let (addr, seen) = fake::serve(fake::deployment_routes()).await;
        let stats = Arc::new(crate::stats::Stats::default());
        let (mut link, task) = api::spawn(fake::client(addr, None), stats.clone());
        let mut cache = ProcessCache::with_proc_root(&proc.0).with_node_name(Some("node-1"));
        cache.set_kubernetes_api(link.requests.clone());

        // Until the answer: what /proc says.
        let before = cache.resource(4242);
        assert_eq!(before.service_name(), "web");
        assert_eq!(before.str_attr("k8s.deployment.name"), Some("web"));
        let before_sh = cache.resource(4243);
        let info = tokio::time::timeout(std::time::Duration::from_secs(10), link.results.recv()).await.unwrap().unwrap();
        cache.apply_pod(info);

        let r = cache.resource(4242);
        assert_eq!(r.service_name(), "storefront", "from app.kubernetes.io/name");
        assert_eq!(r.str_attr("service.version"), Some("1.4.2"));
        assert_eq!(r.str_attr("k8s.container.name"), Some("server"));
        assert_eq!(r.str_attr("k8s.replicaset.name"), Some("web-7d9f8b6c5d"));
        assert_eq!(r.str_attr("k8s.deployment.name"), Some("web"));
        assert!(!keys(&r).contains(&"periscope.k8s.owner.inferred"));
        assert_eq!(r.str_attr("k8s.pod.name"), Some("web-7d9f8b6c5d-x2x4z"));
        assert_eq!(r.str_attr("k8s.node.name"), Some("node-1"));
        assert_eq!(keys(&r).iter().filter(|k| **k == "k8s.deployment.name").count(), 1);
        // Its own OTEL_SERVICE_NAME still wins, and the label's version is
        // not claimed for it.
        let sh = cache.resource(4243);
        assert_eq!(sh.service_name(), "checkout");
        assert_eq!(sh.str_attr("service.version"), None);
        assert_eq!(sh.str_attr("k8s.container.name"), Some("server"));
        // What was handed out before (spans built) is unchanged.
        assert_eq!(before.service_name(), "web");
        assert!(before.attributes.contains(&Attribute::bool("periscope.k8s.owner.inferred", true)));
        assert_eq!(before_sh.str_attr("k8s.container.name"), None);

        // A process of the pod met later gets it at once, without a request.
        proc.process(4244, "/usr/local/bin/worker", &pod_cgroup(CID), b"", Some("uts:[4026532999]"));
        assert_eq!(cache.resource(4244).service_name(), "storefront");
        assert_eq!(Stats::get(&stats.k8s_api_lookups), 1);
        assert_eq!(seen.lock().unwrap().len(), 2, "pod and ReplicaSet, once");
        assert_eq!(Stats::get(&stats.k8s_api_dropped), 0);
        // The pod is forgotten with its last process.
        for pid in [4242, 4243, 4244] {
            cache.forget(pid);
        }
        assert!(cache.pods.is_empty());
        task.abort();
    }

    #[test]
    fn service_name_precedence_and_owners_from_the_api() {
        let proc = FakeProc::new("k8s-precedence");
        proc.process(20, "/usr/local/bin/server", &pod_cgroup(CID), b"HOSTNAME=web-7d9f8b6c5d-x2x4z\0", Some("uts:[4026532999]"));
        proc.service_account(20, "shop");
        let (requests, mut rx, _) = api_requests(8);
        let mut cache = ProcessCache::with_proc_root(&proc.0).with_node_name(None);
        cache.set_kubernetes_api(requests);
        cache.resource(20);
        assert_eq!(
            rx.try_recv().unwrap(),
            PodRef { uid: POD_UID.into(), namespace: "shop".into(), name: "web-7d9f8b6c5d-x2x4z".into() }
        );
        let base = PodInfo { uid: POD_UID.into(), containers: vec![(CID.into(), "server".into())], ..Default::default() };
        // No label: the owner's name; the inferred Deployment gives way to
        // what the API says (a StatefulSet here).
        cache.apply_pod(Arc::new(PodInfo { owners: vec![("k8s.statefulset.name", "db".into())], ..base.clone() }));
        let r = cache.resource(20);
        assert_eq!(r.service_name(), "db");
        assert_eq!(r.str_attr("k8s.statefulset.name"), Some("db"));
        assert_eq!(r.str_attr("k8s.deployment.name"), None);
        assert!(!keys(&r).contains(&"periscope.k8s.owner.inferred"));
        // The OpenTelemetry annotation before the label.
        cache.apply_pod(Arc::new(PodInfo {
            service_name_annotation: Some("annotated".into()),
            app_name: Some("labelled".into()),
            ..base.clone()
        }));
        assert_eq!(cache.resource(20).service_name(), "annotated");
        // Nothing but the container: the executable's name; an answer
        // applied again replaces the previous one rather than adding to it.
        cache.apply_pod(Arc::new(base.clone()));
        let r = cache.resource(20);
        assert_eq!(r.service_name(), "server");
        assert_eq!(r.str_attr("k8s.statefulset.name"), None);
        assert_eq!(keys(&r).iter().filter(|k| **k == "k8s.container.name").count(), 1);
        // Another pod's answer changes nothing here.
        cache.apply_pod(Arc::new(PodInfo { uid: "00000000-0000-0000-0000-000000000000".into(), app_name: Some("x".into()), ..base }));
        assert_eq!(cache.resource(20).service_name(), "server");
    }

    /// The event path never waits for the lookup task: a full queue is
    /// counted, and what did not fit is asked again on a later tick.
    #[test]
    fn a_full_request_queue_never_blocks() {
        let proc = FakeProc::new("k8s-full");
        let uids = ["1a2b3c4d-5e6f-7a8b-9c0d-000000000001", "1a2b3c4d-5e6f-7a8b-9c0d-000000000002", "1a2b3c4d-5e6f-7a8b-9c0d-000000000003"];
        for (i, uid) in uids.iter().enumerate() {
            let pid = 30 + i as u32;
            let cid = format!("{i}").repeat(64);
            proc.process(pid, "/app/server", &pod_cgroup_of(uid, &cid), format!("HOSTNAME=api-{i}\0").as_bytes(), Some("uts:[4026532999]"));
            proc.service_account(pid, "shop");
        }
        // Not in a pod's container (nothing to ask), and a pod on the host's
        // network (no name to ask with).
        proc.process(40, "/usr/bin/curl", "0::/user.slice\n", b"", None);
        proc.process(41, "/usr/bin/kube-proxy", &pod_cgroup_of("1a2b3c4d-5e6f-7a8b-9c0d-000000000004", &"9".repeat(64)), b"HOSTNAME=node-1\0", Some("uts:[4026531838]"));
        let (requests, mut rx, stats) = api_requests(1);
        let mut cache = ProcessCache::with_proc_root(&proc.0).with_node_name(None);
        cache.set_kubernetes_api(requests);
        let start = std::time::Instant::now();
        for pid in [30, 31, 32, 40, 41] {
            cache.resource(pid);
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(Stats::get(&stats.k8s_api_dropped), 2);
        assert_eq!(rx.try_recv().unwrap().name, "api-0");
        assert!(rx.try_recv().is_err());
        // A tick later: one more fits, the other is dropped again.
        cache.retry_pod_requests();
        assert_eq!(Stats::get(&stats.k8s_api_dropped), 3);
        assert!(rx.try_recv().unwrap().name.starts_with("api-"));
        cache.retry_pod_requests();
        assert!(rx.try_recv().unwrap().name.starts_with("api-"));
        cache.retry_pod_requests();
        assert!(rx.try_recv().is_err());
        assert_eq!(Stats::get(&stats.k8s_api_dropped), 3);
        // The task gone (channel closed): still no wait, only counts.
        drop(rx);
        proc.process(33, "/app/server", &pod_cgroup(CID), b"HOSTNAME=web-7d9f8b6c5d-x2x4z\0", Some("uts:[4026532999]"));
        proc.service_account(33, "shop");
        cache.resource(33);
        assert_eq!(Stats::get(&stats.k8s_api_dropped), 4);
    }
}
