//! Loading the kernel programs, handing them the running kernel's offsets,
//! attaching them, and reading their loss counters.

pub mod kernel_offsets;

use anyhow::{Context, Result};
use aya::{
    Btf, Ebpf, EbpfLoader, Pod,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use periscope_ebpf::{KernelOffsets, MAX_PAYLOAD, probe};

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

pub struct Probes {
    /// Keeps the programs loaded and attached for as long as it lives.
    _ebpf: Ebpf,
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
        // Wake the daemon early once a quarter of the ring is unread.
        let wakeup_bytes = settings.ring_buffer_bytes as u64 / 4;
        let mut ebpf = EbpfLoader::new()
            .override_global("SELF_TGID", &self_tgid, true)
            .override_global("PAYLOAD_CAP", &payload_cap, true)
            .override_global("OFFSETS", &offsets_pod, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
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
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map missing")?)?;
        let lost = PerCpuArray::try_from(ebpf.take_map("LOST_EVENTS").context("LOST_EVENTS map missing")?)?;
        Ok((Self { _ebpf: ebpf, attached, offsets, lost }, ring))
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
