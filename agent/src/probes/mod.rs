//! Loading the kernel programs, handing them the running kernel's offsets,
//! attaching them, and reading their loss counters.

pub mod capabilities;
pub mod kernel_offsets;
pub mod tracepoint_format;

use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    Btf, Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};
use periscope_ebpf::{KernelOffsets, MAX_PAYLOAD, MmapTracepointOffsets, control, probe};

use crate::discovery::go_programs::GoTarget;
use crate::discovery::tls_libraries::{READ_INTERNAL, WRITE_INTERNAL};

/// The compiled kernel programs (built by build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/periscope-ebpf"));

/// Programs and the tracepoints they attach to, in attach order: lifecycle
/// first so that connections are known before their data arrives.
pub const PROGRAMS: &[&str] = &[
    "inet_sock_set_state",
    "tcp_destroy_sock",
    "sched_process_exit",
    "sched_process_exec",
    "sched_process_fork",
    "sock_send_length",
    "sock_recv_length",
];

/// Uprobe programs for each TLS library function: (symbol, entry program,
/// return program). Loaded at start, attached per library file when found.
/// OpenSSL's internal read/write functions take SSL_read_ex/SSL_write_ex's
/// arguments and return convention, so those programs serve them.
pub const TLS_UPROBES: &[(&str, &str, &str)] = &[
    ("SSL_read", "ssl_read", "ssl_rw_ret"),
    ("SSL_write", "ssl_write", "ssl_rw_ret"),
    ("SSL_read_ex", "ssl_read_ex", "ssl_rw_ex_ret"),
    ("SSL_write_ex", "ssl_write_ex", "ssl_rw_ex_ret"),
    (READ_INTERNAL, "ssl_read_ex", "ssl_rw_ex_ret"),
    (WRITE_INTERNAL, "ssl_write_ex", "ssl_rw_ex_ret"),
    ("SSL_do_handshake", "ssl_do_handshake", "ssl_handshake_ret"),
    ("gnutls_record_recv", "gnutls_record_recv", "gnutls_rw_ret"),
    ("gnutls_record_send", "gnutls_record_send", "gnutls_rw_ret"),
    ("gnutls_handshake", "gnutls_handshake", "gnutls_handshake_ret"),
];

/// Programs for Go executables' functions (see `discovery::go_programs`).
pub const GO_PROGRAMS: &[&str] = &[
    "go_tls_write",
    "go_tls_read",
    "go_tls_read_ret",
    "go_tls_read_copy",
    "go_tls_handshake",
    "go_tls_handshake_ret",
    "go_http_round_trip",
    "go_http1_write_request",
    "go_http2_write_request",
    "go_syscall_read",
    "go_syscall_write",
    "go_grpc_write_header",
    "go_grpc_server_headers",
    "go_grpc_client_headers",
];

/// libc's getaddrinfo: (symbol, entry program, return program).
const RESOLVER_UPROBE: (&str, &str, &str) = ("getaddrinfo", "getaddrinfo", "getaddrinfo_ret");

const MMAP_TRACEPOINT: (&str, &str) = ("syscalls", "sys_enter_mmap");

#[derive(Clone, Debug)]
pub struct ProbeSettings {
    /// Payload bytes copied per socket call (capped at MAX_PAYLOAD).
    pub payload_cap: u32,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
    /// Every program returns at once (the benchmark's floor).
    pub do_nothing: bool,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self { payload_cap: periscope_ebpf::DEFAULT_PAYLOAD_CAP, ring_buffer_bytes: 8 << 20, do_nothing: false }
    }
}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct OffsetsPod(KernelOffsets);
// SAFETY: KernelOffsets is repr(C), all u32 fields, no padding.
unsafe impl Pod for OffsetsPod {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct GoProcessPod(periscope_ebpf::GoProcess);
// SAFETY: repr(C), all u32 fields, no padding.
unsafe impl Pod for GoProcessPod {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct GoBinaryKeyPod(periscope_ebpf::GoBinaryKey);
// SAFETY: repr(C): u32, u32 padding field, u64; no implicit padding.
unsafe impl Pod for GoBinaryKeyPod {}

/// How the kernel names the file `file` (its `s_dev` is `MKDEV`, not the
/// `st_dev` encoding `stat` returns).
fn kernel_file_key(file: crate::discovery::tls_libraries::FileId) -> GoBinaryKeyPod {
    let dev = libc::major(file.dev) << 20 | libc::minor(file.dev);
    GoBinaryKeyPod(periscope_ebpf::GoBinaryKey { dev, _pad: 0, ino: file.inode })
}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct MmapOffsetsPod(MmapTracepointOffsets);
// SAFETY: repr(C), two u32 fields, no padding.
unsafe impl Pod for MmapOffsetsPod {}

/// `sock_common.skc_portpair` as the kernel keeps it: the remote port in
/// network byte order in the low half, the local port in host order in the
/// high half (as read from memory on a little-endian machine).
pub fn portpair(local_port: u16, remote_port: u16) -> u32 {
    u32::from(u16::from_ne_bytes(remote_port.to_be_bytes())) | (u32::from(local_port) << 16)
}

/// One library file with TLS uprobes: what it has, so they can be detached
/// (feature disabled) and attached again.
pub struct TlsAttachment {
    pub path: std::path::PathBuf,
    pub display_path: String,
    pub library: &'static str,
    pub symbols: Vec<(String, u64)>,
    links: Vec<(&'static str, UProbeLinkId)>,
}

impl TlsAttachment {
    pub fn attached(&self) -> bool {
        !self.links.is_empty()
    }
}

/// One Go executable with uprobes, and the processes running it.
pub struct GoAttachment {
    pub target: std::sync::Arc<GoTarget>,
    /// Functions with every one of their programs attached.
    pub functions: Vec<&'static str>,
    pub errors: Vec<String>,
    pub pids: std::collections::BTreeSet<u32>,
    links: Vec<(&'static str, UProbeLinkId)>,
}

impl GoAttachment {
    pub fn attached(&self) -> bool {
        !self.links.is_empty()
    }
}

/// What attaching one file's TLS uprobes gave.
#[derive(Default)]
struct UprobeLinks<'s> {
    /// (program, link) for every program attached.
    links: Vec<(&'static str, UProbeLinkId)>,
    /// The (symbol, file offset) pairs with both their programs attached.
    symbols: Vec<(&'s str, u64)>,
    /// What failed, one line per symbol.
    errors: Vec<String>,
}

/// Filter entries as the kernel maps hold them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelFilter {
    pub pids: Vec<(u32, u8)>,
    pub ports: Vec<(u16, u8)>,
    pub cgroups: Vec<u64>,
    /// `control::FILTER_*` bits.
    pub flags: u32,
}

pub struct Probes {
    /// Keeps the programs loaded and attached for as long as it lives.
    ebpf: Ebpf,
    pub attached: Vec<&'static str>,
    lost: PerCpuArray<MapData, u64>,
    kernel_counters: PerCpuArray<MapData, u64>,
    control: Array<MapData, u32>,
    pid_filter: BpfHashMap<MapData, u32, u8>,
    port_filter: BpfHashMap<MapData, u16, u8>,
    cgroup_filter: BpfHashMap<MapData, u64, u8>,
    ignored_socks: BpfHashMap<MapData, u64, u64>,
    go_binaries: BpfHashMap<MapData, GoBinaryKeyPod, GoProcessPod>,
    pub go: Vec<GoAttachment>,
    /// C libraries with the getaddrinfo uprobes (kept for the daemon's life).
    resolvers: Vec<String>,
    pub tls: Vec<TlsAttachment>,
    tls_enabled: bool,
    /// Set when the kernel refused a uprobe for lack of permission: why
    /// uprobe features are unavailable (further attaches are not tried).
    uprobes_refused: Option<String>,
    kernel_filter: KernelFilter,
}

impl Probes {
    /// Loads and attaches every program; returns them with the event ring.
    pub fn load(settings: &ProbeSettings) -> Result<(Self, RingBuf<MapData>)> {
        let offsets = kernel_offsets::from_running_kernel()?;
        let self_tgid = std::process::id();
        let payload_cap = settings.payload_cap.min(MAX_PAYLOAD as u32);
        let offsets_pod = OffsetsPod(offsets);
        let (category, name) = MMAP_TRACEPOINT;
        let mmap_offsets = MmapOffsetsPod(tracepoint_format::mmap_offsets(category, name)?);
        // Wake the daemon early once a quarter of the ring is unread.
        let wakeup_bytes = settings.ring_buffer_bytes as u64 / 4;
        let do_nothing = settings.do_nothing as u32;
        // One parse of the kernel's BTF serves the loader and the tp_btf
        // programs: each parse holds tens of MiB while it lives.
        let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("SELF_TGID", &self_tgid, true)
            .override_global("DO_NOTHING", &do_nothing, true)
            .override_global("PAYLOAD_CAP", &payload_cap, true)
            .override_global("OFFSETS", &offsets_pod, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("MMAP_OFFSETS", &mmap_offsets, true)
            .map_max_entries("EVENTS", settings.ring_buffer_bytes)
            .load(EBPF_OBJECT)
            .context("loading the kernel programs (are you root / CAP_BPF+CAP_PERFMON?)")?;

        let mut attached = Vec::new();
        for &name in PROGRAMS {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            program.load(name, &btf).with_context(|| format!("verifier rejected {name}"))?;
            program.attach().with_context(|| format!("attaching tp_btf/{name}"))?;
            attached.push(name);
        }
        let program: &mut TracePoint = ebpf.program_mut(name).context("sys_enter_mmap missing")?.try_into()?;
        program.load().context("verifier rejected sys_enter_mmap")?;
        program.attach(category, name).with_context(|| format!("attaching tracepoint {category}/{name}"))?;
        attached.push(name);
        let uprobe_programs = TLS_UPROBES
            .iter()
            .chain([&RESOLVER_UPROBE])
            .flat_map(|&(_, entry, ret)| [entry, ret])
            .chain(GO_PROGRAMS.iter().copied());
        for prog in uprobe_programs {
            let program: &mut UProbe =
                ebpf.program_mut(prog).with_context(|| format!("program {prog} missing"))?.try_into()?;
            if program.fd().is_err() {
                program.load().with_context(|| format!("verifier rejected {prog}"))?;
            }
        }
        drop(btf);
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map missing")?)?;
        let lost = PerCpuArray::try_from(ebpf.take_map("LOST_EVENTS").context("LOST_EVENTS map missing")?)?;
        let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("{name} map missing"));
        let control = Array::try_from(take("CONTROL")?)?;
        let kernel_counters = PerCpuArray::try_from(take("KERNEL_COUNTERS")?)?;
        let pid_filter = BpfHashMap::try_from(take("PID_FILTER")?)?;
        let port_filter = BpfHashMap::try_from(take("PORT_FILTER")?)?;
        let cgroup_filter = BpfHashMap::try_from(take("CGROUP_FILTER")?)?;
        let ignored_socks = BpfHashMap::try_from(take("IGNORED_SOCKS")?)?;
        let go_binaries = BpfHashMap::try_from(take("GO_BINARIES")?)?;
        log::debug!("kernel offsets: {offsets:?}");
        let probes = Self {
            ebpf,
            attached,
            lost,
            kernel_counters,
            control,
            pid_filter,
            port_filter,
            cgroup_filter,
            ignored_socks,
            go_binaries,
            go: Vec::new(),
            resolvers: Vec::new(),
            tls: Vec::new(),
            tls_enabled: true,
            uprobes_refused: None,
            kernel_filter: KernelFilter::default(),
        };
        Ok((probes, ring))
    }

    /// Features switched off in the kernel (`control::FEATURE_*` bits).
    /// TLS uprobes are also detached, so a disabled TLS feature costs no
    /// trap per library call.
    pub fn set_features_disabled(&mut self, disabled: u32) -> Result<()> {
        self.control.set(control::FEATURES_DISABLED, disabled, 0).context("writing CONTROL")?;
        let tls_on = disabled & control::FEATURE_TLS == 0;
        if tls_on != self.tls_enabled {
            self.tls_enabled = tls_on;
            for i in 0..self.tls.len() {
                if tls_on {
                    self.reattach_tls(i);
                } else {
                    self.detach_tls(i);
                }
            }
            for i in 0..self.go.len() {
                if tls_on {
                    let (links, _, _) = self.attach_go_hooks(&self.go[i].target.clone());
                    self.go[i].links = links;
                } else {
                    let links = std::mem::take(&mut self.go[i].links);
                    self.detach_links(links);
                }
            }
        }
        Ok(())
    }

    pub fn tls_enabled(&self) -> bool {
        self.tls_enabled
    }

    /// Hooks `getaddrinfo` (at file offset `offset`) in the C library at
    /// `path`, for every process that maps it.
    pub fn attach_resolver(&mut self, path: &std::path::Path, offset: u64) -> Result<()> {
        if let Some(reason) = &self.uprobes_refused {
            anyhow::bail!("{}: uprobes unavailable: {reason}", path.display());
        }
        let (_, entry, ret) = RESOLVER_UPROBE;
        for prog in [ret, entry] {
            let p: &mut UProbe =
                self.ebpf.program_mut(prog).with_context(|| format!("program {prog} missing"))?.try_into()?;
            let attached = p
                .attach(UProbeAttachLocation::AbsoluteOffset(offset), path, UProbeScope::AllProcesses)
                .with_context(|| format!("attaching {prog} to {}", path.display()));
            if let Err(e) = attached {
                self.note_attach_error(&e);
                return Err(e);
            }
        }
        self.resolvers.push(path.display().to_string());
        Ok(())
    }

    /// A uprobe failed to attach: if the kernel refused permission, uprobes
    /// are unavailable from now on (said once, and in `status`).
    fn note_attach_error(&mut self, e: &anyhow::Error) {
        if self.uprobes_refused.is_none() && capabilities::is_permission_error(e) {
            let reason = capabilities::uprobes_refused_reason();
            log::warn!("uprobes unavailable: {reason}");
            self.uprobes_refused = Some(reason);
        }
    }

    /// Why uprobes are unavailable, once the kernel refused one.
    pub fn uprobes_refused(&self) -> Option<&str> {
        self.uprobes_refused.as_deref()
    }

    /// C libraries whose getaddrinfo is hooked.
    pub fn resolver_attachments(&self) -> impl Iterator<Item = &str> {
        self.resolvers.iter().map(String::as_str)
    }

    /// Replaces the kernel's filter maps with `filter`.
    pub fn set_filter(&mut self, filter: KernelFilter) -> Result<()> {
        // Switch filtering off while the maps change, then on with the new flags.
        self.control.set(control::FILTERS, 0, 0)?;
        for (pid, _) in &self.kernel_filter.pids {
            let _ = self.pid_filter.remove(pid);
        }
        for (port, _) in &self.kernel_filter.ports {
            let _ = self.port_filter.remove(port);
        }
        for cgroup in &self.kernel_filter.cgroups {
            let _ = self.cgroup_filter.remove(cgroup);
        }
        for &(pid, mark) in &filter.pids {
            self.pid_filter.insert(pid, mark, 0).context("PID_FILTER full")?;
        }
        for &(port, mark) in &filter.ports {
            self.port_filter.insert(port, mark, 0).context("PORT_FILTER full")?;
        }
        for &cgroup in &filter.cgroups {
            self.cgroup_filter.insert(cgroup, control::INCLUDE, 0).context("CGROUP_FILTER full")?;
        }
        self.control.set(control::FILTERS, filter.flags, 0)?;
        self.kernel_filter = filter;
        Ok(())
    }

    /// Stops payload capture on sockets the daemon will not parse, given as
    /// (socket, local port, remote port). The kernel forgets them when they
    /// are destroyed; the map is an LRU, so a full map only means some
    /// payloads are copied for nothing.
    pub fn ignore_sockets(&mut self, socks: &[(u64, u16, u16)]) {
        self.mark_sockets(socks, periscope_ebpf::sock_mark::IGNORE);
    }

    /// Copies up to `WIDE_PAYLOAD_CAP` bytes per call on these sockets
    /// (HTTP/2 connections, plain or TLS), given like [`Self::ignore_sockets`].
    pub fn widen_sockets(&mut self, socks: &[(u64, u16, u16)]) {
        self.mark_sockets(socks, periscope_ebpf::sock_mark::WIDE);
    }

    /// Adds `mark` to what the kernel knows of each socket (a TLS socket can
    /// be both ignored, its ciphertext, and widened, its plaintext).
    fn mark_sockets(&mut self, socks: &[(u64, u16, u16)], mark: u32) {
        for &(sock, local_port, remote_port) in socks {
            let pair = portpair(local_port, remote_port);
            let marks = match self.ignored_socks.get(&sock, 0) {
                Ok(v) if v as u32 == pair => (v >> 32) as u32 | mark,
                _ => mark,
            };
            let _ = self.ignored_socks.insert(sock, u64::from(pair) | (u64::from(marks) << 32), 0);
        }
    }

    /// Adds one pid to the pid filter (a new process of a filtered executable).
    pub fn mark_pid(&mut self, pid: u32, mark: u8) -> Result<()> {
        self.pid_filter.insert(pid, mark, 0).context("PID_FILTER full")?;
        self.kernel_filter.pids.push((pid, mark));
        Ok(())
    }

    fn detach_tls(&mut self, index: usize) {
        let links = std::mem::take(&mut self.tls[index].links);
        self.detach_links(links);
    }

    /// Detaches every TLS and Go uprobe (at exit); returns how many. The
    /// kernel waits for a grace period for each uprobe it removes, under a
    /// lock, so this takes about 0.1 s per link here (50 in 5.5 s) whatever
    /// the order or the number of threads closing them.
    pub fn detach_uprobes(&mut self) -> usize {
        let links: Vec<(&'static str, UProbeLinkId)> = self
            .tls
            .iter_mut()
            .flat_map(|t| std::mem::take(&mut t.links))
            .chain(self.go.iter_mut().flat_map(|g| std::mem::take(&mut g.links)))
            .collect();
        let n = links.len();
        self.detach_links(links);
        n
    }

    fn detach_links(&mut self, links: Vec<(&'static str, UProbeLinkId)>) {
        for (prog, link) in links {
            if let Some(Ok(p)) = self.ebpf.program_mut(prog).map(<&mut UProbe>::try_from) {
                let _ = p.detach(link);
            }
        }
    }

    fn reattach_tls(&mut self, index: usize) {
        let t = &self.tls[index];
        let (path, symbols) = (t.path.clone(), t.symbols.clone());
        let symbols: Vec<(&str, u64)> = symbols.iter().map(|(s, o)| (s.as_str(), *o)).collect();
        let attached = self.attach_uprobes(&path, &symbols);
        for e in attached.errors {
            log::warn!("re-attaching TLS uprobes on {}: {e}", path.display());
        }
        self.tls[index].links = attached.links;
    }

    /// Attaches the TLS uprobes to one library or executable file, for every
    /// process that maps it (right away if TLS is enabled, else when it is).
    /// `symbols` are (name, file offset) pairs. Returns the symbols attached
    /// (an internal function with its offset, `ssl_read_internal at 0x35290`,
    /// since it has no symbol to look it up by); a symbol that fails is
    /// skipped and reported in the error list.
    pub fn attach_tls(
        &mut self,
        path: &Path,
        display_path: &str,
        library: &'static str,
        symbols: &[(&str, u64)],
    ) -> (Vec<String>, Vec<String>) {
        let attached = if self.tls_enabled { self.attach_uprobes(path, symbols) } else { Default::default() };
        let names = attached
            .symbols
            .iter()
            .map(|&(symbol, offset)| match symbol {
                READ_INTERNAL | WRITE_INTERNAL => format!("{symbol} at {offset:#x}"),
                _ => symbol.to_string(),
            })
            .collect();
        self.tls.push(TlsAttachment {
            path: path.to_path_buf(),
            display_path: display_path.to_string(),
            library,
            symbols: symbols.iter().map(|(s, o)| (s.to_string(), *o)).collect(),
            links: attached.links,
        });
        (names, attached.errors)
    }

    /// Attaches each symbol's return and entry programs.
    fn attach_uprobes<'s>(&mut self, path: &Path, symbols: &[(&'s str, u64)]) -> UprobeLinks<'s> {
        let mut links = Vec::new();
        let mut attached_symbols = Vec::new();
        let mut errors = Vec::new();
        if let Some(reason) = &self.uprobes_refused {
            errors.push(format!("uprobes unavailable: {reason}"));
            return UprobeLinks { links, symbols: attached_symbols, errors };
        }
        for &(symbol, offset) in symbols {
            let Some(&(_, entry, ret)) = TLS_UPROBES.iter().find(|(s, _, _)| *s == symbol) else { continue };
            // Return probe first: an entry without its return would leave
            // calls recorded that never complete.
            for prog in [ret, entry] {
                let attached = self
                    .ebpf
                    .program_mut(prog)
                    .ok_or_else(|| anyhow::anyhow!("program {prog} missing"))
                    .and_then(|p| -> Result<UProbeLinkId> {
                        let p: &mut UProbe = p.try_into()?;
                        Ok(p.attach(UProbeAttachLocation::AbsoluteOffset(offset), path, UProbeScope::AllProcesses)?)
                    });
                match attached {
                    Ok(link) => links.push((prog, link)),
                    Err(e) => {
                        errors.push(format!("{symbol} ({prog}): {e:#}"));
                        self.note_attach_error(&e);
                        break;
                    }
                }
                if prog == entry {
                    attached_symbols.push((symbol, offset));
                }
            }
        }
        UprobeLinks { links, symbols: attached_symbols, errors }
    }

    /// Hooks a Go executable's functions for every process running it (now
    /// if TLS is enabled, else when it is). Returns the functions attached.
    pub fn attach_go(&mut self, target: std::sync::Arc<GoTarget>) -> &GoAttachment {
        let (links, functions, mut errors) =
            if self.tls_enabled { self.attach_go_hooks(&target) } else { (Vec::new(), Vec::new(), Vec::new()) };
        if let Err(e) = self.go_binaries.insert(kernel_file_key(target.file), GoProcessPod(target.offsets), 0) {
            errors.push(format!("GO_BINARIES: {e}"));
        }
        self.go.push(GoAttachment { target, functions, errors, pids: Default::default(), links });
        &self.go[self.go.len() - 1]
    }

    /// Attaches every hook of `target`: return sites before entries, so no
    /// call is entered whose return goes unseen. A function with one hook
    /// that fails is taken out entirely.
    fn attach_go_hooks(
        &mut self,
        target: &GoTarget,
    ) -> (Vec<(&'static str, UProbeLinkId)>, Vec<&'static str>, Vec<String>) {
        let mut links = Vec::new();
        let mut functions = Vec::new();
        let mut errors = Vec::new();
        if let Some(reason) = &self.uprobes_refused {
            errors.push(format!("uprobes unavailable: {reason}"));
            return (links, functions, errors);
        }
        for &function in &target.functions {
            let mut hooks: Vec<_> = target.hooks.iter().filter(|h| h.function == function).collect();
            // Return and copy sites before entries: no call is entered whose
            // end goes unseen.
            hooks.sort_by_key(|h| !(h.program.ends_with("_ret") || h.program.ends_with("_copy")));
            let mut these = Vec::new();
            let mut failed = None;
            for hook in hooks {
                let attached = self
                    .ebpf
                    .program_mut(hook.program)
                    .ok_or_else(|| anyhow::anyhow!("program {} missing", hook.program))
                    .and_then(|p| -> Result<UProbeLinkId> {
                        let p: &mut UProbe = p.try_into()?;
                        Ok(p.attach(
                            UProbeAttachLocation::AbsoluteOffset(hook.offset),
                            &target.attach_path,
                            UProbeScope::AllProcesses,
                        )?)
                    });
                match attached {
                    Ok(link) => these.push((hook.program, link)),
                    Err(e) => {
                        failed = Some(format!("{function} at {:#x}: {e:#}", hook.offset));
                        self.note_attach_error(&e);
                        break;
                    }
                }
            }
            match failed {
                Some(e) => {
                    errors.push(e);
                    self.detach_links(these);
                }
                None => {
                    links.extend(these);
                    functions.push(function);
                }
            }
        }
        (links, functions, errors)
    }

    /// Process `pid` runs the hooked Go executable `file` (for status: the
    /// kernel finds a process's offsets by its executable itself).
    pub fn note_go_process(&mut self, pid: u32, file: crate::discovery::tls_libraries::FileId) {
        if let Some(go) = self.go.iter_mut().find(|g| g.target.file == file) {
            go.pids.insert(pid);
        }
    }

    /// Whether the Go executable `file` has its grpc-go probes attached.
    pub fn go_program_has_grpc(&self, file: crate::discovery::tls_libraries::FileId) -> bool {
        self.go.iter().any(|g| {
            g.target.file == file
                && matches!(g.target.grpc, crate::discovery::go_programs::GrpcSupport::Hooked { .. })
                && g.functions.iter().any(|f| f.starts_with("google.golang.org/grpc/"))
        })
    }

    /// Process `pid` is gone.
    pub fn forget_go_process(&mut self, pid: u32) {
        for go in &mut self.go {
            go.pids.remove(&pid);
        }
    }

    /// TLS library calls that could not be tied to any socket (in-memory
    /// TLS), counted in the kernel instead of being sent.
    pub fn tls_unlinked(&self) -> u64 {
        self.kernel_counter(periscope_ebpf::kernel_counter::TLS_UNLINKED)
    }

    /// One of the programs' `kernel_counter::*` counters, summed over CPUs.
    pub fn kernel_counter(&self, index: u32) -> u64 {
        self.kernel_counters.get(&index, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    }

    /// Failed ring-buffer writes so far, per emitting program (summed over CPUs).
    pub fn lost_events(&self) -> Vec<(&'static str, u64)> {
        (0..probe::COUNT)
            .map(|i| {
                let n = self.lost.get(&i, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0);
                (probe::NAMES[i as usize], n)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{TLS_UPROBES, portpair};
    use crate::discovery::tls_libraries::{GNUTLS_SYMBOLS, OPENSSL_SYMBOLS, READ_INTERNAL, WRITE_INTERNAL};

    #[test]
    fn every_tls_hook_has_its_programs() {
        let programs = |name: &str| TLS_UPROBES.iter().find(|(s, _, _)| *s == name).map(|&(_, e, r)| (e, r));
        for name in OPENSSL_SYMBOLS.iter().chain(GNUTLS_SYMBOLS).chain(&[READ_INTERNAL, WRITE_INTERNAL]) {
            assert!(programs(name).is_some(), "{name} has no TLS_UPROBES row");
        }
        // The internal functions take the _ex functions' arguments and return.
        assert_eq!(programs(READ_INTERNAL), programs("SSL_read_ex"));
        assert_eq!(programs(WRITE_INTERNAL), programs("SSL_write_ex"));
    }

    #[test]
    fn portpair_matches_the_kernel_layout() {
        // sock_common: skc_dport (network order) then skc_num (host order),
        // read as one little-endian u32.
        let (local, remote) = (8080u16, 443u16);
        let mut memory = [0u8; 4];
        memory[..2].copy_from_slice(&remote.to_be_bytes());
        memory[2..].copy_from_slice(&local.to_le_bytes());
        assert_eq!(portpair(local, remote), u32::from_le_bytes(memory));
        assert_ne!(portpair(local, remote), portpair(local, 444));
    }
}
