//! Container and Kubernetes identity of a process, without the API server:
//! what the kubelet and the container runtimes write into a process's cgroup
//! path, its environment and its service-account mount.
//!
//! Only parsers live here, no I/O: `discovery::process` reads the small /proc
//! files once per process (the pod's files once per container) and hands
//! their contents to these functions. Everything that does not match one of
//! the shapes below gives no attribute: nothing is guessed.
//!
//! Attributes (all on the process's resource):
//!
//! | attribute | from |
//! |---|---|
//! | `container.id` | the cgroup path ([`parse_cgroup`]) |
//! | `k8s.pod.uid` | the cgroup path: the kubelet names the pod's cgroup after it |
//! | `k8s.pod.name` | the `HOSTNAME` variable the runtime gives every container |
//! | `k8s.namespace.name` | the service-account mount's `namespace` file |
//! | `k8s.deployment.name` | inferred from a ReplicaSet-style pod name ([`infer_deployment`]), with `periscope.k8s.owner.inferred=true` |
//! | `k8s.node.name` | the agent's own `NODE_NAME` (the DaemonSet sets it from `spec.nodeName`) |
//!
//! `k8s.container.name` is not produced here: the container's name in the
//! pod spec is known only to the kubelet and the API server (the runtime
//! keeps it in its own metadata, which we do not query), nothing in /proc
//! carries it. When the agent can reach the API server,
//! `discovery::kubernetes_api` adds it, with the pod's real owners.
//! The pod's own name and namespace come from inside the container, so a
//! workload can make them say something else (a `HOSTNAME` of its own, a
//! file at the service-account path when no token is mounted); the pod uid
//! and the container id come from the kubelet and the runtime.

use crate::spans::model::Attribute;

/// What a process's cgroup path says about its container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupIds {
    /// 64 lowercase hex digits, as the runtime names it.
    pub container_id: String,
    /// The pod's uid (`1a2b3c4d-5e6f-...`, dashes) when the container is a
    /// kubelet-created pod container.
    pub pod_uid: Option<String>,
}

/// The container (and pod) of a process from the text of `/proc/PID/cgroup`.
///
/// Shapes recognised, the container's cgroup always being the last part of
/// the path (a cgroup nested inside a container's, or a container nested in
/// another, is not read: a Kubernetes node inside a docker container would
/// otherwise give every pod on it the node's container id):
///
/// - kubelet, systemd cgroup driver:
///   `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/<scope>`,
///   `besteffort` likewise, guaranteed pods with no QoS level
///   (`/kubepods.slice/kubepods-pod<uid>.slice/<scope>`), the uid with `_`
///   for `-`; `<scope>` is `cri-containerd-<id>.scope` (containerd),
///   `crio-<id>.scope` (CRI-O) or `docker-<id>.scope` (cri-dockerd).
/// - kubelet, cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`
///   (containerd, docker), `/kubepods/burstable/pod<uid>/crio-<id>`
///   (CRI-O), `besteffort` likewise, guaranteed `/kubepods/pod<uid>/<id>`.
/// - plain docker: `/docker/<id>` (cgroupfs) and `docker-<id>.scope`
///   (systemd, `/system.slice/docker-<id>.scope`).
/// - podman: `/libpod_parent/libpod-<id>` (cgroupfs) and `libpod-<id>.scope`
///   (systemd): a container id, no pod.
///
/// A `*-<id>.scope` names its runtime and container by itself, so it gives
/// the container id under any parent; the pod uid needs the whole kubelet
/// hierarchy above it. A bare `<id>` (or `crio-<id>`, `libpod-<id>`) is a
/// container only under `docker`, `libpod_parent` or the kubelet's
/// hierarchy. A pod uid that is not a well-formed uid (a static pod's
/// 32-digit config hash, which is not the uid the API server shows) is left
/// out; the container id stays.
///
/// Paths may be relative: when the reader (the agent in a pod) has a cgroup
/// namespace of its own, the kernel shows other cgroups relative to it
/// (`0::/../../kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`)
/// and its own as `0::/`. What is visible after the `..` must then be the
/// tail of one of the shapes, and a cgroupfs pod directory must carry a
/// well-formed uid (it is the only mark left of the kubelet's hierarchy).
///
/// cgroup v1 lists one line per hierarchy: lines that show no container
/// (`/`, `/user.slice`) are skipped, and the others must agree (same
/// container, no two pod uids), else nothing is returned. cgroup v2 has one
/// line, `0::/path`. Lines that are not `ID:CONTROLLERS:/PATH` are skipped.
pub fn parse_cgroup(text: &str) -> Option<CgroupIds> {
    let mut found: Option<CgroupIds> = None;
    for line in text.lines() {
        let Some(ids) = cgroup_line_path(line).and_then(parse_cgroup_path) else {
            continue;
        };
        match &mut found {
            None => found = Some(ids),
            Some(f) => {
                if f.container_id != ids.container_id {
                    return None;
                }
                match (&f.pod_uid, ids.pod_uid) {
                    (Some(a), Some(b)) if *a != b => return None,
                    (None, Some(b)) => f.pod_uid = Some(b),
                    _ => {}
                }
            }
        }
    }
    found
}

/// The path of one `/proc/PID/cgroup` line: `hierarchy-ID:controllers:path`
/// (the path may itself hold `:`).
fn cgroup_line_path(line: &str) -> Option<&str> {
    let mut parts = line.splitn(3, ':');
    let id = parts.next()?;
    let _controllers = parts.next()?;
    let path = parts.next()?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && path.starts_with('/'))
        .then_some(path)
}

/// The last part of a container's cgroup path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaf {
    /// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`,
    /// `libpod-<id>.scope`: systemd scopes named by the runtime.
    Scope,
    /// `<id>`: containerd or docker with the cgroupfs driver.
    Bare,
    /// `crio-<id>`: CRI-O with the cgroupfs driver.
    Crio,
    /// `libpod-<id>`: podman with the cgroupfs driver.
    Libpod,
}

fn leaf(segment: &str) -> Option<(Leaf, &str)> {
    if let Some(unit) = segment.strip_suffix(".scope") {
        return ["cri-containerd-", "crio-", "docker-", "libpod-"]
            .iter()
            .find_map(|prefix| unit.strip_prefix(prefix))
            .filter(|id| is_container_id(id))
            .map(|id| (Leaf::Scope, id));
    }
    if is_container_id(segment) {
        return Some((Leaf::Bare, segment));
    }
    if let Some(id) = segment
        .strip_prefix("crio-")
        .filter(|id| is_container_id(id))
    {
        return Some((Leaf::Crio, id));
    }
    segment
        .strip_prefix("libpod-")
        .filter(|id| is_container_id(id))
        .map(|id| (Leaf::Libpod, id))
}

fn parse_cgroup_path(path: &str) -> Option<CgroupIds> {
    let path = path.strip_prefix('/')?;
    let mut relative = false;
    let mut visible: Vec<&str> = Vec::with_capacity(8);
    for segment in path.split('/') {
        if segment == ".." && visible.is_empty() {
            relative = true;
        } else if segment.is_empty() || segment == "." || segment == ".." {
            // `0::/` (our own cgroup), `//`, `..` after a name: no shape.
            return None;
        } else {
            visible.push(segment);
        }
    }
    let (last, parents) = visible.split_last()?;
    let (kind, id) = leaf(last)?;
    let found = |pod_uid: Option<String>| {
        Some(CgroupIds {
            container_id: id.to_string(),
            pod_uid,
        })
    };
    match kind {
        Leaf::Scope => found(systemd_pod(parents, relative).flatten()),
        Leaf::Bare if parents == ["docker"] => found(None),
        Leaf::Bare | Leaf::Crio => found(cgroupfs_pod(parents, relative)?),
        Leaf::Libpod if parents == ["libpod_parent"] => found(None),
        Leaf::Libpod => None,
    }
}

/// The kubelet's systemd hierarchy above a container scope (`parents`,
/// outermost first): `Some(uid)` when it is one (the uid `None` when the pod
/// slice's uid is malformed), `None` when it is not.
fn systemd_pod(parents: &[&str], relative: bool) -> Option<Option<String>> {
    let (pod, above) = parents.split_last()?;
    let name = pod.strip_suffix(".slice")?;
    let (expected, uid): (&[&str], &str) =
        if let Some(uid) = name.strip_prefix("kubepods-burstable-pod") {
            (&["kubepods-burstable.slice", "kubepods.slice"], uid)
        } else if let Some(uid) = name.strip_prefix("kubepods-besteffort-pod") {
            (&["kubepods-besteffort.slice", "kubepods.slice"], uid)
        } else if let Some(uid) = name.strip_prefix("kubepods-pod") {
            (&["kubepods.slice"], uid)
        } else {
            return None;
        };
    if uid.is_empty() {
        return None;
    }
    let uid = pod_uid(uid, b'_');
    hierarchy_above(above, expected, relative, uid.is_some()).then_some(uid)
}

/// The kubelet's cgroupfs hierarchy above a container directory, as
/// [`systemd_pod`]: `kubepods/[burstable|besteffort/]pod<uid>`.
fn cgroupfs_pod(parents: &[&str], relative: bool) -> Option<Option<String>> {
    let (pod, above) = parents.split_last()?;
    let uid = pod.strip_prefix("pod").filter(|u| !u.is_empty())?;
    let uid = pod_uid(uid, b'-');
    let expected: &[&str] = match above.last() {
        Some(&"burstable") => &["burstable", "kubepods"],
        Some(&"besteffort") => &["besteffort", "kubepods"],
        _ => &["kubepods"],
    };
    hierarchy_above(above, expected, relative, uid.is_some()).then_some(uid)
}

/// Whether the cgroups above a pod's (`above`, outermost first) are the
/// `expected` ones (innermost first). Above the kubelet's root anything may
/// come (a node inside a container, a custom parent). In a relative path the
/// view may stop early, which is accepted only when the pod's uid is
/// well-formed: with the kubelet's root out of sight, it is all that shows
/// the shape is the kubelet's.
fn hierarchy_above(above: &[&str], expected: &[&str], relative: bool, uid_ok: bool) -> bool {
    let mut outward = above.iter().rev();
    for want in expected {
        match outward.next() {
            Some(got) if got == want => {}
            Some(_) => return false,
            None => return relative && uid_ok,
        }
    }
    true
}

/// A container id: 64 lowercase hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A pod uid (8-4-4-4-12 lowercase hex digits) written with `separator`
/// (`_` in systemd unit names, `-` in cgroupfs directories), returned with
/// dashes.
fn pod_uid(s: &str, separator: u8) -> Option<String> {
    let b = s.as_bytes();
    let well_formed = b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == separator,
            _ => matches!(c, b'0'..=b'9' | b'a'..=b'f'),
        });
    well_formed.then(|| s.replace(separator as char, "-"))
}

/// The characters of Kubernetes' generated names (`rand.String`): no vowels.
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A pod-template-hash is that alphabet's encoding of the decimal FNV-32a
/// hash of the pod template (`SafeEncodeString`): each digit `0`..`9`
/// becomes one of `4 5 6 7 8 9 b c d f`, so only those ten occur.
const HASH_ALPHABET: &[u8] = b"456789bcdf";

/// The longest hostname the kubelet gives a pod: longer pod names are cut to
/// 63 characters (and trailing `-` or `.` removed).
const HOSTNAME_MAX: usize = 63;

/// The Deployment of a pod, inferred from its name alone:
/// `<deployment>-<pod-template-hash>-<5 characters>` is how the ReplicaSet
/// controller names the pods of the ReplicaSet `<deployment>-<hash>`.
///
/// - the suffix: 5 characters of [`NAME_ALPHABET`];
/// - the hash: 6 to 10 characters of [`HASH_ALPHABET`] (a 32-bit hash has
///   up to 10 decimal digits; fewer than 6 is rarer than one in 40,000 and
///   not accepted), with at least one letter: an all-digit middle is also
///   how a CronJob's Jobs name their pods (`<cronjob>-<minutes>-<5>`);
/// - the deployment: a DNS-style name (`a-z`, `0-9`, `-`, `.`, alphanumeric
///   at both ends).
///
/// A name of 63 characters or more is not read: the kubelet cuts longer
/// names to 63 and the ReplicaSet controller cuts its prefix to 58, so the
/// middle part may be a cut-off piece of the deployment's name.
///
/// Still an inference (a Job named `x-7d9f8b` has pods that look the same,
/// and Argo Rollouts name theirs this way too), hence
/// `periscope.k8s.owner.inferred=true` beside it. Other owners are not
/// inferred: a StatefulSet's `<name>-<ordinal>` is any name ending in a
/// number, and a DaemonSet's `<name>-<5 characters>` is also how Jobs,
/// CloneSets and any `generateName` pod are named.
pub fn infer_deployment(pod_name: &str) -> Option<&str> {
    if pod_name.len() >= HOSTNAME_MAX || !is_dns_name(pod_name) {
        return None;
    }
    let (rest, suffix) = pod_name.rsplit_once('-')?;
    let (deployment, hash) = rest.rsplit_once('-')?;
    let suffix_ok = suffix.len() == 5 && suffix.bytes().all(|b| NAME_ALPHABET.contains(&b));
    let hash_ok = (6..=10).contains(&hash.len())
        && hash.bytes().all(|b| HASH_ALPHABET.contains(&b))
        && hash.bytes().any(|b| b.is_ascii_alphabetic());
    (suffix_ok && hash_ok && is_dns_name(deployment)).then_some(deployment)
}

/// Lowercase letters, digits, `-` and `.`, alphanumeric at both ends, at most
/// 253 characters (a Kubernetes object name, a DNS subdomain).
fn is_dns_name(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    b.len() <= 253
        && edge(b.first())
        && edge(b.last())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
}

/// A namespace name (a DNS label): 1 to 63 of `a-z`, `0-9`, `-`,
/// alphanumeric at both ends.
fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns_name(s)
}

/// The pod name from a container's `HOSTNAME` variable. The runtime sets it
/// to the hostname the kubelet chose for the pod: the pod's name, unless the
/// pod sets `spec.hostname`, in which case this is that hostname (with
/// `setHostnameAsFQDN`, the full domain name) and not the pod's name; nothing
/// in /proc tells the two apart. Pods on the host's network get the node's
/// hostname instead: the caller passes `None` for a process that shares the
/// host's UTS namespace. A value of 63 characters may be a longer name cut
/// short by the kubelet and is not used.
pub fn pod_name_from_hostname(hostname: &str) -> Option<&str> {
    (hostname.len() < HOSTNAME_MAX && is_dns_name(hostname)).then_some(hostname)
}

/// The namespace from the content of the service-account mount's
/// `namespace` file (the bare name, no newline; surrounding whitespace is
/// tolerated). Anything else, or a file that is not UTF-8, gives `None`.
pub fn namespace_from_file(content: &[u8]) -> Option<&str> {
    let name = std::str::from_utf8(content).ok()?.trim();
    is_dns_label(name).then_some(name)
}

/// What the agent read about a pod, before any check.
#[derive(Clone, Copy, Debug, Default)]
pub struct PodSources<'a> {
    /// The first process's `HOSTNAME`; `None` when the process shares the
    /// host's UTS namespace (a `hostNetwork` pod: the node's hostname) or
    /// when that could not be told.
    pub hostname: Option<&'a str>,
    /// The content of `/var/run/secrets/kubernetes.io/serviceaccount/namespace`
    /// in the container's root; `None` when absent (a pod with
    /// `automountServiceAccountToken: false`) or unreadable.
    pub namespace_file: Option<&'a [u8]>,
    /// The agent's own `NODE_NAME`.
    pub node_name: Option<&'a str>,
}

/// What is known about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// Inferred from the name ([`infer_deployment`]).
    pub deployment: Option<String>,
    pub node_name: Option<String>,
}

/// What is known about a process's container, shared by all its processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerMeta {
    pub container_id: String,
    pub pod: Option<PodMeta>,
}

impl ContainerMeta {
    /// Checks what was read (a value that is not the shape it should be is
    /// dropped) and infers the owner. `sources` is only read for a pod.
    pub fn new(ids: CgroupIds, sources: PodSources<'_>) -> Self {
        let pod = ids.pod_uid.map(|uid| {
            let name = sources.hostname.and_then(pod_name_from_hostname);
            PodMeta {
                uid,
                name: name.map(str::to_string),
                namespace: sources
                    .namespace_file
                    .and_then(namespace_from_file)
                    .map(str::to_string),
                deployment: name.and_then(infer_deployment).map(str::to_string),
                node_name: sources
                    .node_name
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_string),
            }
        });
        Self {
            container_id: ids.container_id,
            pod,
        }
    }

    /// The name of the workload that owns the pod, for `service.name` when
    /// the process does not set `OTEL_SERVICE_NAME`.
    pub fn owner_name(&self) -> Option<&str> {
        self.pod.as_ref()?.deployment.as_deref()
    }

    /// Resource attributes, in a fixed order.
    pub fn attributes(&self) -> Vec<Attribute> {
        let mut out = vec![Attribute::str("container.id", self.container_id.as_str())];
        let Some(pod) = &self.pod else {
            return out;
        };
        out.push(Attribute::str("k8s.pod.uid", pod.uid.as_str()));
        if let Some(name) = &pod.name {
            out.push(Attribute::str("k8s.pod.name", name.as_str()));
        }
        if let Some(ns) = &pod.namespace {
            out.push(Attribute::str("k8s.namespace.name", ns.as_str()));
        }
        if let Some(d) = &pod.deployment {
            out.push(Attribute::str("k8s.deployment.name", d.as_str()));
            out.push(Attribute::bool("periscope.k8s.owner.inferred", true));
        }
        if let Some(node) = &pod.node_name {
            out.push(Attribute::str("k8s.node.name", node.as_str()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d";
    const UID_: &str = "1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d";

    fn ids(pod: bool) -> Option<CgroupIds> {
        Some(CgroupIds {
            container_id: ID.to_string(),
            pod_uid: pod.then(|| UID.to_string()),
        })
    }

    #[test]
    fn cgroup_shapes() {
        // (cgroup file, container found, pod found)
        let cases: Vec<(String, Option<CgroupIds>)> = vec![
            // kubelet, systemd driver, cgroup v2: containerd, CRI-O, cri-dockerd.
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                ids(true),
            ),
            (
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"
                ),
                ids(true),
            ),
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{ID}.scope"
                ),
                ids(true),
            ),
            // Guaranteed: no QoS level.
            (
                format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                ids(true),
            ),
            // kubelet, cgroupfs driver: containerd/docker, CRI-O, guaranteed.
            (format!("0::/kubepods/besteffort/pod{UID}/{ID}"), ids(true)),
            (
                format!("0::/kubepods/burstable/pod{UID}/crio-{ID}"),
                ids(true),
            ),
            (format!("0::/kubepods/pod{UID}/{ID}"), ids(true)),
            // A node inside a container (kind): the kubelet's hierarchy under a prefix.
            (
                format!(
                    "0::/docker/{}/kubepods/besteffort/pod{UID}/{ID}",
                    "f".repeat(64)
                ),
                ids(true),
            ),
            // Relative to the reader's cgroup namespace.
            (
                format!("0::/../../kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                ids(true),
            ),
            (
                format!(
                    "0::/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"
                ),
                ids(true),
            ),
            (format!("0::/../../pod{UID}/{ID}"), ids(true)),
            (format!("0::/../../../besteffort/pod{UID}/{ID}"), ids(true)),
            (format!("0::/../cri-containerd-{ID}.scope"), ids(false)),
            // Plain docker and podman: a container, no pod.
            (format!("0::/docker/{ID}"), ids(false)),
            (format!("0::/system.slice/docker-{ID}.scope"), ids(false)),
            (format!("0::/libpod_parent/libpod-{ID}"), ids(false)),
            (format!("0::/machine.slice/libpod-{ID}.scope"), ids(false)),
            // A malformed pod uid (a static pod's config hash): container only.
            (
                format!("0::/kubepods/burstable/pod{}/{ID}", "a".repeat(32)),
                ids(false),
            ),
            (
                format!(
                    "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope",
                    "a".repeat(32)
                ),
                ids(false),
            ),
            // A pod uid with dashes in a systemd unit name is not the kubelet's.
            (
                format!("0::/kubepods.slice/kubepods-pod{UID}.slice/cri-containerd-{ID}.scope"),
                ids(false),
            ),
            // Nothing.
            ("0::/".to_string(), None),
            (
                "0::/user.slice/user-0.slice/session-1.scope".to_string(),
                None,
            ),
            ("0::/system.slice/containerd.service".to_string(), None),
            (String::new(), None),
            ("garbage\n\0\u{fffd}::::".to_string(), None),
            // A container's conmon/monitor is not the container.
            (
                format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope"),
                None,
            ),
            (format!("0::/libpod_parent/libpod-conmon-{ID}"), None),
            // Not a container id: too short, upper case, not the last part.
            (format!("0::/docker/{}", &ID[..63]), None),
            (format!("0::/docker/{}", ID.to_uppercase()), None),
            (
                format!("0::/system.slice/docker-{ID}.scope/init.scope"),
                None,
            ),
            (format!("0::/kubepods/burstable/pod{UID}/{ID}/sub"), None),
            // A bare id outside docker's, podman's or the kubelet's hierarchy.
            (format!("0::/{ID}"), None),
            (format!("0::/custom/{ID}"), None),
            (format!("0::/../{ID}"), None),
            (format!("0::/docker/x/docker/{ID}"), None),
            (format!("0::/libpod_parent/x/libpod-{ID}"), None),
            // A pod directory outside the kubelet's hierarchy.
            (format!("0::/foo/pod{UID}/{ID}"), None),
            (format!("0::/pod{UID}/{ID}"), None),
            (format!("0::/kubepods/guaranteed/pod{UID}/{ID}"), None),
            // Out of sight above a malformed pod directory: not enough to tell.
            (format!("0::/../pod1/{ID}"), None),
            // Malformed paths.
            (format!("0::kubepods/pod{UID}/{ID}"), None),
            (format!("0::/kubepods//pod{UID}/{ID}"), None),
            (format!("0::/kubepods/../pod{UID}/{ID}"), None),
            (format!("x::/docker/{ID}"), None),
            (format!("/docker/{ID}"), None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_cgroup(&text), want, "{text}");
        }
    }

    #[test]
    fn cgroup_v1_picks_the_container_line() {
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        let v1 = format!(
            "12:misc:/\n11:pids:{systemd}\n10:memory:{systemd}\n9:cpu,cpuacct:{systemd}\n\
             8:rdma:/\n7:net_cls,net_prio:{systemd}\n1:name=systemd:{systemd}\n0::/\n"
        );
        assert_eq!(parse_cgroup(&v1), ids(true));

        // This machine's hybrid layout: podman under v1, `0::/` unified.
        let podman = format!(
            "9:name=systemd:/libpod_parent/libpod-{ID}\n4:memory:/libpod_parent/libpod-{ID}\n\
             3:cpuset:/libpod_parent/libpod-{ID}\n0::/\n"
        );
        assert_eq!(parse_cgroup(&podman), ids(false));

        let cgroupfs = format!(
            "5:devices:/kubepods/besteffort/pod{UID}/{ID}\n4:memory:/\n0::/system.slice/containerd.service\n"
        );
        assert_eq!(parse_cgroup(&cgroupfs), ids(true));

        // Not a container: the sandbox this test runs in.
        assert_eq!(
            parse_cgroup(
                "9:name=systemd:/\n4:memory:/process_api/11969877dc613299da4558f4c7fd89b8\n0::/\n"
            ),
            None
        );

        // Lines that disagree: no guess.
        let other = "e".repeat(64);
        assert_eq!(
            parse_cgroup(&format!("4:memory:/docker/{ID}\n3:pids:/docker/{other}\n")),
            None
        );
        let other_uid = UID.replace('1', "2");
        assert_eq!(
            parse_cgroup(&format!(
                "4:memory:/kubepods/pod{UID}/{ID}\n3:pids:/kubepods/pod{other_uid}/{ID}\n"
            )),
            None
        );
        // One line with the pod, one without (same container): the pod is kept.
        assert_eq!(
            parse_cgroup(&format!(
                "4:memory:/../cri-containerd-{ID}.scope\n3:pids:/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
            )),
            ids(true)
        );
    }

    #[test]
    fn deployment_inference() {
        let cases = [
            ("web-7d9f8b6c5d-x2x4z", Some("web")),
            ("my-app-5c6d7f8b9-bcdfg", Some("my-app")),
            ("coredns-5dd5756b68-7xkqz", Some("coredns")),
            ("api.v2-bc4d56-zzzzz", Some("api.v2")),
            // StatefulSet, DaemonSet/Job, bare pods: not inferred.
            ("my-app-0", None),
            ("web-12", None),
            ("fluentd-x2x4z", None),
            ("nginx", None),
            // CronJob's Job: an all-digit middle.
            ("backup-45678945-x2x4z", None),
            ("backup-28472910-x2x4z", None),
            // A hash with characters the encoding never makes, or too short/long.
            ("web-7d9f8g-x2x4z", None),
            ("web-7d9fb-x2x4z", None),
            ("web-7d9f8b6c5db-x2x4z", None),
            // A suffix that is not 5 generated characters.
            ("web-7d9f8b6c5d-x2x4", None),
            ("web-7d9f8b6c5d-x2x4a", None),
            // No deployment part, or a malformed one.
            ("-7d9f8b6c5d-x2x4z", None),
            ("7d9f8b6c5d-x2x4z", None),
            ("Web-7d9f8b6c5d-x2x4z", None),
            ("web--7d9f8b6c5d-x2x4z", None),
            ("web_x-7d9f8b6c5d-x2x4z", None),
            ("", None),
        ];
        for (name, want) in cases {
            assert_eq!(infer_deployment(name), want, "{name}");
        }
        // Possibly cut short by the kubelet (63 characters): not inferred.
        let long = format!("{}-7d9f8b6c5d-x2x4z", "a".repeat(46));
        assert_eq!(long.len(), 63);
        assert_eq!(infer_deployment(&long), None);
        assert_eq!(infer_deployment(&long[1..]), Some(&"a".repeat(45)[..]));
    }

    #[test]
    fn pod_name_and_namespace_checks() {
        assert_eq!(
            pod_name_from_hostname("web-7d9f8b6c5d-x2x4z"),
            Some("web-7d9f8b6c5d-x2x4z")
        );
        assert_eq!(
            pod_name_from_hostname("db-0.db.prod.svc.cluster.local"),
            Some("db-0.db.prod.svc.cluster.local")
        );
        assert_eq!(pod_name_from_hostname(""), None);
        assert_eq!(pod_name_from_hostname("My Host"), None);
        assert_eq!(pod_name_from_hostname(&"a".repeat(63)), None);
        assert_eq!(
            pod_name_from_hostname(&"a".repeat(62)),
            Some(&"a".repeat(62)[..])
        );

        assert_eq!(namespace_from_file(b"default"), Some("default"));
        assert_eq!(namespace_from_file(b"kube-system\n"), Some("kube-system"));
        assert_eq!(namespace_from_file(b""), None);
        assert_eq!(namespace_from_file(b"a.b"), None);
        assert_eq!(namespace_from_file(b"\xff\xfe"), None);
        assert_eq!(namespace_from_file("x".repeat(64).as_bytes()), None);
        assert_eq!(namespace_from_file(b"two words"), None);
    }

    #[test]
    fn container_meta_attributes() {
        let meta = ContainerMeta::new(
            ids(true).unwrap(),
            PodSources {
                hostname: Some("web-7d9f8b6c5d-x2x4z"),
                namespace_file: Some(b"shop"),
                node_name: Some("node-1"),
            },
        );
        assert_eq!(meta.owner_name(), Some("web"));
        assert_eq!(
            meta.attributes(),
            vec![
                Attribute::str("container.id", ID),
                Attribute::str("k8s.pod.uid", UID),
                Attribute::str("k8s.pod.name", "web-7d9f8b6c5d-x2x4z"),
                Attribute::str("k8s.namespace.name", "shop"),
                Attribute::str("k8s.deployment.name", "web"),
                Attribute::bool("periscope.k8s.owner.inferred", true),
                Attribute::str("k8s.node.name", "node-1"),
            ]
        );

        // A StatefulSet pod, no service-account mount, no NODE_NAME.
        let meta = ContainerMeta::new(
            ids(true).unwrap(),
            PodSources {
                hostname: Some("db-0"),
                namespace_file: None,
                node_name: Some(" "),
            },
        );
        assert_eq!(meta.owner_name(), None);
        assert_eq!(
            meta.attributes(),
            vec![
                Attribute::str("container.id", ID),
                Attribute::str("k8s.pod.uid", UID),
                Attribute::str("k8s.pod.name", "db-0"),
            ]
        );

        // Not a pod: the pod's sources are not read.
        let meta = ContainerMeta::new(
            ids(false).unwrap(),
            PodSources {
                hostname: Some("web-7d9f8b6c5d-x2x4z"),
                namespace_file: Some(b"shop"),
                node_name: Some("node-1"),
            },
        );
        assert_eq!(meta.attributes(), vec![Attribute::str("container.id", ID)]);
        assert_eq!(meta.owner_name(), None);
    }

    fn cgroup_like() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            Just("..".to_string()),
            Just("".to_string()),
            Just("kubepods".to_string()),
            Just("kubepods.slice".to_string()),
            Just("kubepods-burstable.slice".to_string()),
            Just("burstable".to_string()),
            Just("docker".to_string()),
            Just(format!("pod{UID}")),
            Just(format!("kubepods-burstable-pod{UID_}.slice")),
            Just(format!("cri-containerd-{ID}.scope")),
            Just(ID.to_string()),
            "[a-z0-9._:-]{0,12}",
        ];
        let line = (
            prop_oneof![Just("0".to_string()), "[0-9]{1,2}", ".{0,3}"],
            prop_oneof![Just(String::new()), "[a-z,=]{0,12}"],
            prop::collection::vec(segment, 0..7),
        )
            .prop_map(|(h, c, segs)| format!("{h}:{c}:/{}", segs.join("/")));
        prop::collection::vec(line, 0..6).prop_map(|lines| lines.join("\n"))
    }

    proptest! {
        #[test]
        fn arbitrary_cgroup_text_never_panics(text in ".*") {
            let _ = parse_cgroup(&text);
        }

        #[test]
        fn cgroup_like_text_never_panics(text in cgroup_like()) {
            if let Some(found) = parse_cgroup(&text) {
                prop_assert!(is_container_id(&found.container_id));
                if let Some(uid) = found.pod_uid {
                    prop_assert!(pod_uid(&uid, b'-').is_some());
                }
            }
        }

        #[test]
        fn arbitrary_names_never_panic(name in ".*", bytes in prop::collection::vec(any::<u8>(), 0..80)) {
            let _ = infer_deployment(&name);
            let _ = pod_name_from_hostname(&name);
            let _ = namespace_from_file(&bytes);
        }
    }
}
