//! Maps, load-time globals and helpers shared by the programs.

mod filter;
mod go_grpc;
mod go_tls;
mod lifecycle;
mod resolver;
mod socket_io;
mod tls;

use aya_ebpf::{
    Global,
    helpers::{bpf_probe_read_kernel, generated},
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use core::ffi::c_void;
use periscope_ebpf::{
    AF_INET, DEFAULT_PAYLOAD_CAP, DataEventBuf, KernelOffsets, SockTuple, probe,
};

/// The daemon's own process: never traced.
#[unsafe(no_mangle)]
static SELF_TGID: Global<u32> = Global::new(0);

/// Non-zero: every program returns at once (the benchmark's floor: the
/// cost of the hooks themselves, with no work done in them).
#[unsafe(no_mangle)]
static DO_NOTHING: Global<u32> = Global::new(0);

#[inline(always)]
fn do_nothing() -> bool {
    DO_NOTHING.load() != 0
}

/// Runtime cap on payload bytes copied per call (<= MAX_PAYLOAD).
#[unsafe(no_mangle)]
static PAYLOAD_CAP: Global<u32> = Global::new(DEFAULT_PAYLOAD_CAP);

/// Unread bytes in the ring beyond which a write wakes the daemon. Below it,
/// writes do not wake anyone and the daemon drains the ring on a timer: a
/// wake-up per event (the default) costs a context switch per event.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(1 << 20);

/// Field offsets in the sys_enter_mmap tracepoint record (from its format file).
#[unsafe(no_mangle)]
static MMAP_OFFSETS: Global<periscope_ebpf::MmapTracepointOffsets> =
    Global::new(periscope_ebpf::MmapTracepointOffsets { prot: 0, fd: 0 });

/// Field offsets from the running kernel's BTF, set by the loader.
#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_family: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    sk_protocol: 0,
    pt_regs_di: 0,
    pt_regs_si: 0,
    pt_regs_dx: 0,
    pt_regs_orig_ax: 0,
    binprm_file: 0,
    binprm_filename: 0,
    file_dentry: 0,
    dentry_name: 0,
    task_mm: 0,
    mm_env_start: 0,
    mm_env_end: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    fdtable_max_fds: 0,
    file_private_data: 0,
    socket_sk: 0,
    mm_exe_file: 0,
    file_inode: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    task_tgid: 0,
    sk_err: 0,
    sock_common_packed: 0,
    pt_regs_packed: 0,
});

/// Every event goes through this one ring buffer. The loader may resize it.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Failed ring-buffer writes, per emitting program (index: `probe::*`).
#[map]
static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(probe::COUNT, 0);

/// Things the programs chose not to send (`kernel_counter::*`).
#[map]
static KERNEL_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(periscope_ebpf::kernel_counter::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = KERNEL_COUNTERS.get_ptr_mut(index) {
        unsafe { *counter += 1 };
    }
}

/// Where a data event is assembled before it is copied out at its real size.
#[map]
static SCRATCH: PerCpuArray<DataEventBuf> = PerCpuArray::with_max_entries(1, 0);

/// Where an exec event is assembled (too large for the BPF stack).
#[map]
static EXEC_SCRATCH: PerCpuArray<periscope_ebpf::ProcessExecEvent> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectStart {
    pub tgid: u32,
    pub tid: u32,
    pub ts_ns: u64,
}

/// Sockets in SYN_SENT, keyed by `struct sock *`.
#[map]
static CONNECTING: LruHashMap<u64, ConnectStart> = LruHashMap::with_max_entries(65536, 0);

pub const IPPROTO_TCP: u16 = 6;

#[inline(always)]
fn count_lost(probe_id: u32) {
    if let Some(counter) = LOST_EVENTS.get_ptr_mut(probe_id) {
        unsafe { *counter += 1 };
    }
}

/// Copies `size` bytes starting at `data` into the ring buffer; counts a
/// failure against `probe_id`.
#[inline(always)]
fn output_bytes(data: *const c_void, size: u64, probe_id: u32) {
    output_bytes_flags(data, size, probe_id, false);
}

/// Like `output`, but wakes the daemon at once: for rare events it must act
/// on quickly (a new program or library to hook).
#[inline(always)]
fn output_now<T>(event: &T, probe_id: u32) {
    output_bytes_flags(event as *const T as *const c_void, core::mem::size_of::<T>() as u64, probe_id, true);
}

#[inline(always)]
fn output_bytes_flags(data: *const c_void, size: u64, probe_id: u32, wake_now: bool) -> bool {
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    const BPF_RB_AVAIL_DATA: u64 = 0;
    let ring = core::ptr::addr_of!(EVENTS) as *mut c_void;
    let unread = unsafe { generated::bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA) };
    let flags = if wake_now || unread >= WAKEUP_BYTES.load() { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    let ret = unsafe { generated::bpf_ringbuf_output(ring, data as *mut c_void, size, flags) };
    if ret < 0 {
        count_lost(probe_id);
        return false;
    }
    true
}

/// Sockets whose data events could not all be written (ring full); their
/// next event that is written says so. `ANY_LOSSY` keeps the lookup off the
/// hot path until a loss has happened at all.
#[map]
static LOSSY_SOCKS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);

/// The same by thread: a thread whose data event was lost may have answered
/// a request the daemon still thinks it is serving, so its next event says
/// so and the daemon forgets what the thread was serving (no link is then
/// made from a stale request).
#[map]
static LOSSY_THREADS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

#[map]
static ANY_LOSSY: aya_ebpf::maps::Array<u32> = aya_ebpf::maps::Array::with_max_entries(1, 0);

/// Writes a data event for `sk`, marking it when an earlier one of the
/// same socket was lost, and remembering the socket when this one is.
#[inline(always)]
fn output_data(data: *mut periscope_ebpf::DataEvent, size: u64, sk: u64, probe_id: u32) {
    let any = ANY_LOSSY.get(0).copied().unwrap_or(0) != 0;
    let tid = unsafe { (*data).tid };
    if any {
        if unsafe { LOSSY_SOCKS.get(&sk) }.is_some() {
            unsafe { (*data).flags |= periscope_ebpf::data_flags::LOST_BEFORE };
            let _ = LOSSY_SOCKS.remove(&sk);
        }
        if unsafe { LOSSY_THREADS.get(&tid) }.is_some() {
            unsafe { (*data).flags |= periscope_ebpf::data_flags::THREAD_LOST_BEFORE };
            let _ = LOSSY_THREADS.remove(&tid);
        }
    }
    if !output_bytes_flags(data as *const c_void, size, probe_id, false) {
        let _ = LOSSY_SOCKS.insert(&sk, &1, 0);
        let _ = LOSSY_THREADS.insert(&tid, &1, 0);
        if !any {
            if let Some(flag) = ANY_LOSSY.get_ptr_mut(0) {
                unsafe { *flag = 1 };
            }
        }
    }
}

/// `n` clamped to `max` in a way the verifier can follow: LLVM otherwise
/// proves a clamp redundant from earlier checks and passes the unclamped
/// register to a helper, whose bounds the verifier then cannot see.
#[inline(always)]
pub fn bounded(n: u32, max: u32) -> u32 {
    let n = core::hint::black_box(n);
    if n > max { max } else { n }
}

#[inline(always)]
pub(super) fn output<T>(event: &T, probe_id: u32) {
    output_bytes(
        event as *const T as *const c_void,
        core::mem::size_of::<T>() as u64,
        probe_id,
    );
}

#[inline(always)]
fn read_kernel<T>(base: u64, offset: u32) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }
}

/// The socket's family, if it is a TCP socket over IPv4/IPv6.
#[inline(always)]
fn tcp_family(sk: u64, off: &KernelOffsets) -> Option<u16> {
    match inet_socket(sk, off)? {
        (family, IPPROTO_TCP) => Some(family),
        _ => None,
    }
}

/// The socket's family and protocol, if it is TCP or UDP over IPv4/IPv6.
#[inline(always)]
fn inet_socket(sk: u64, off: &KernelOffsets) -> Option<(u16, u16)> {
    let family: u16 = read_kernel(sk, off.skc_family).ok()?;
    if family != AF_INET && family != periscope_ebpf::AF_INET6 {
        return None;
    }
    let protocol: u16 = read_kernel(sk, off.sk_protocol).ok()?;
    if protocol != IPPROTO_TCP && protocol != periscope_ebpf::IPPROTO_UDP {
        return None;
    }
    Some((family, protocol))
}

/// The start of `struct sock_common` when its fields are packed (see
/// `KernelOffsets::sock_common_packed`).
#[repr(C)]
#[derive(Clone, Copy)]
struct SockCommonHead {
    daddr: [u8; 4],
    rcv_saddr: [u8; 4],
    _hash: u32,
    /// Network byte order; with `num` it is `skc_portpair`.
    dport: u16,
    num: u16,
    family: u16,
}

/// What a data event needs of its socket, read with as few copies as the
/// kernel's layout allows: the tuple (written into `tuple`), the protocol,
/// and the port pair (`skc_portpair`, as the ignore map stores it). None for
/// sockets that are not TCP or UDP over IPv4/IPv6.
#[inline(always)]
fn read_socket(sk: u64, off: &KernelOffsets, tuple: &mut SockTuple) -> Option<(u16, u32)> {
    if off.sock_common_packed == 0 {
        let (family, protocol) = inet_socket(sk, off)?;
        read_tuple(sk, family, off, tuple);
        let pair: u32 = read_kernel(sk, off.skc_dport).unwrap_or(0);
        return Some((protocol, pair));
    }
    let head: SockCommonHead = read_kernel(sk, off.skc_daddr).ok()?;
    if head.family != AF_INET && head.family != periscope_ebpf::AF_INET6 {
        return None;
    }
    let protocol: u16 = read_kernel(sk, off.sk_protocol).ok()?;
    if protocol != IPPROTO_TCP && protocol != periscope_ebpf::IPPROTO_UDP {
        return None;
    }
    tuple.family = head.family;
    tuple.protocol = IPPROTO_TCP;
    tuple.src_port = head.num;
    tuple.dst_port = u16::from_be(head.dport);
    if head.family == AF_INET {
        tuple.src_addr = [0; 16];
        tuple.dst_addr = [0; 16];
        tuple.src_addr[..4].copy_from_slice(&head.rcv_saddr);
        tuple.dst_addr[..4].copy_from_slice(&head.daddr);
    } else {
        tuple.src_addr = read_kernel(sk, off.skc_v6_rcv_saddr).unwrap_or([0; 16]);
        tuple.dst_addr = read_kernel(sk, off.skc_v6_daddr).unwrap_or([0; 16]);
    }
    Some((protocol, head.dport as u32 | (head.num as u32) << 16))
}

/// Reads the socket's local and remote address and port.
#[inline(always)]
fn read_tuple(sk: u64, family: u16, off: &KernelOffsets, tuple: &mut SockTuple) {
    tuple.family = family;
    tuple.protocol = IPPROTO_TCP;
    tuple.src_port = read_kernel::<u16>(sk, off.skc_num).unwrap_or(0);
    tuple.dst_port = u16::from_be(read_kernel::<u16>(sk, off.skc_dport).unwrap_or(0));
    if family == AF_INET {
        tuple.src_addr = [0; 16];
        tuple.dst_addr = [0; 16];
        let src: [u8; 4] = read_kernel(sk, off.skc_rcv_saddr).unwrap_or([0; 4]);
        let dst: [u8; 4] = read_kernel(sk, off.skc_daddr).unwrap_or([0; 4]);
        tuple.src_addr[..4].copy_from_slice(&src);
        tuple.dst_addr[..4].copy_from_slice(&dst);
    } else {
        tuple.src_addr = read_kernel(sk, off.skc_v6_rcv_saddr).unwrap_or([0; 16]);
        tuple.dst_addr = read_kernel(sk, off.skc_v6_daddr).unwrap_or([0; 16]);
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
