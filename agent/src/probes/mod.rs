//! Loading the kernel programs, handing them the running kernel's offsets,
//! attaching them, and reading their loss counters.

pub mod kernel_offsets;
pub mod tracepoint_format;

use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    Btf, Ebpf, EbpfLoader, Pod,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, TracePoint, UProbe, uprobe::UProbeAttachLocation, uprobe::UProbeScope},
};
use periscope_ebpf::{KernelOffsets, MAX_PAYLOAD, MmapTracepointOffsets, probe};

/// The compiled kernel programs (built by build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/periscope-ebpf"));

/// Programs and the tracepoints they attach to, in attach order: lifecycle
/// first so that connections are known before their data arrives.
pub const PROGRAMS: &[&str] = &[
    "inet_sock_set_state",
    "tcp_destroy_sock",
    "sched_process_exit",
    "sched_process_exec",
    "sock_send_length",
    "sock_recv_length",
];

/// Uprobe programs for each TLS library function: (symbol, entry program,
/// return program). Loaded at start, attached per library file when found.
pub const TLS_UPROBES: &[(&str, &str, &str)] = &[
    ("SSL_read", "ssl_read", "ssl_rw_ret"),
    ("SSL_write", "ssl_write", "ssl_rw_ret"),
    ("SSL_read_ex", "ssl_read_ex", "ssl_rw_ex_ret"),
    ("SSL_write_ex", "ssl_write_ex", "ssl_rw_ex_ret"),
    ("SSL_do_handshake", "ssl_do_handshake", "ssl_handshake_ret"),
    ("gnutls_record_recv", "gnutls_record_recv", "gnutls_rw_ret"),
    ("gnutls_record_send", "gnutls_record_send", "gnutls_rw_ret"),
    ("gnutls_handshake", "gnutls_handshake", "gnutls_handshake_ret"),
];

const MMAP_TRACEPOINT: (&str, &str) = ("syscalls", "sys_enter_mmap");

#[derive(Clone, Debug)]
pub struct ProbeSettings {
    /// Payload bytes copied per socket call (capped at MAX_PAYLOAD).
    pub payload_cap: u32,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self { payload_cap: periscope_ebpf::DEFAULT_PAYLOAD_CAP, ring_buffer_bytes: 8 << 20 }
    }
}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct OffsetsPod(KernelOffsets);
// SAFETY: KernelOffsets is repr(C), all u32 fields, no padding.
unsafe impl Pod for OffsetsPod {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct MmapOffsetsPod(MmapTracepointOffsets);
// SAFETY: repr(C), two u32 fields, no padding.
unsafe impl Pod for MmapOffsetsPod {}

pub struct Probes {
    /// Keeps the programs loaded and attached for as long as it lives.
    ebpf: Ebpf,
    pub attached: Vec<&'static str>,
    pub offsets: KernelOffsets,
    lost: PerCpuArray<MapData, u64>,
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
        let mut ebpf = EbpfLoader::new()
            .override_global("SELF_TGID", &self_tgid, true)
            .override_global("PAYLOAD_CAP", &payload_cap, true)
            .override_global("OFFSETS", &offsets_pod, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("MMAP_OFFSETS", &mmap_offsets, true)
            .map_max_entries("EVENTS", settings.ring_buffer_bytes)
            .load(EBPF_OBJECT)
            .context("loading the kernel programs (are you root / CAP_BPF+CAP_PERFMON?)")?;

        let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
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
        for &(_, entry, ret) in TLS_UPROBES {
            for prog in [entry, ret] {
                let program: &mut UProbe =
                    ebpf.program_mut(prog).with_context(|| format!("program {prog} missing"))?.try_into()?;
                if program.fd().is_err() {
                    program.load().with_context(|| format!("verifier rejected {prog}"))?;
                }
            }
        }
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map missing")?)?;
        let lost = PerCpuArray::try_from(ebpf.take_map("LOST_EVENTS").context("LOST_EVENTS map missing")?)?;
        Ok((Self { ebpf, attached, offsets, lost }, ring))
    }

    /// Attaches the TLS uprobes to one library or executable file, for every
    /// process that maps it. `symbols` are (name, file offset) pairs.
    /// Returns the symbols attached; a symbol that fails is skipped and
    /// reported in the error list.
    pub fn attach_tls(&mut self, path: &Path, symbols: &[(&str, u64)]) -> (Vec<String>, Vec<String>) {
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        for &(symbol, offset) in symbols {
            let Some(&(_, entry, ret)) = TLS_UPROBES.iter().find(|(s, _, _)| *s == symbol) else { continue };
            let mut result = Ok(());
            for prog in [entry, ret] {
                let attached = self
                    .ebpf
                    .program_mut(prog)
                    .ok_or_else(|| anyhow::anyhow!("program {prog} missing"))
                    .and_then(|p| -> Result<()> {
                        let p: &mut UProbe = p.try_into()?;
                        p.attach(UProbeAttachLocation::AbsoluteOffset(offset), path, UProbeScope::AllProcesses)?;
                        Ok(())
                    });
                if let Err(e) = attached {
                    result = Err(format!("{symbol} ({prog}): {e:#}"));
                    break;
                }
            }
            match result {
                Ok(()) => ok.push(symbol.to_string()),
                Err(e) => errors.push(e),
            }
        }
        (ok, errors)
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
