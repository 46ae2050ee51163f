//! Time spent in libc's `getaddrinfo`: what the application waited for a
//! name, including /etc/hosts, caches and retries. The entry probe remembers
//! the call per thread; the return probe sends the name, the result code and
//! the first addresses of the result list.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, generated},
    macros::{map, uprobe, uretprobe},
    maps::{LruHashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};
use core::ffi::c_void;
use periscope_ebpf::{
    AF_INET, AF_INET6, EventHeader, GAI_MAX_ADDRS, GAI_NAME_MAX, GetaddrinfoEvent, control::FEATURE_DNS, kind, probe,
};

use super::filter::{feature_enabled, process_traced};
use super::{SELF_TGID, output_bytes};

#[repr(C)]
#[derive(Clone, Copy)]
struct GaiCall {
    start_ns: u64,
    /// `const char *node`
    node: u64,
    /// `struct addrinfo **res`
    res: u64,
}

#[map]
static GAI_CALLS: LruHashMap<u64, GaiCall> = LruHashMap::with_max_entries(16384, 0);

#[map]
static GAI_SCRATCH: PerCpuArray<GetaddrinfoEvent> = PerCpuArray::with_max_entries(1, 0);

#[uprobe]
pub fn getaddrinfo(ctx: ProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == SELF_TGID.load() || !feature_enabled(FEATURE_DNS) || !process_traced(tgid) {
        return 0;
    }
    let node: u64 = ctx.arg(0).unwrap_or(0);
    let res: u64 = ctx.arg(3).unwrap_or(0);
    let call = GaiCall { start_ns: unsafe { bpf_ktime_get_ns() }, node, res };
    let _ = GAI_CALLS.insert(&pid_tgid, &call, 0);
    0
}

#[uretprobe]
pub fn getaddrinfo_ret(ctx: RetProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { GAI_CALLS.get(&pid_tgid) }).copied() else { return 0 };
    let _ = GAI_CALLS.remove(&pid_tgid);
    let ret: i32 = ctx.ret();
    let Some(ev) = GAI_SCRATCH.get_ptr_mut(0) else { return 0 };
    let ev = unsafe { &mut *ev };
    ev.header = EventHeader {
        kind: kind::GETADDRINFO,
        _pad: [0; 3],
        tgid: (pid_tgid >> 32) as u32,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    ev.start_ns = call.start_ns;
    ev.tid = pid_tgid as u32;
    ev.ret = ret;
    ev.n_addrs = 0;
    ev.name_len = 0;
    if call.node != 0 {
        let n = unsafe {
            generated::bpf_probe_read_user_str(
                ev.name.as_mut_ptr() as *mut c_void,
                GAI_NAME_MAX as u32,
                call.node as *const c_void,
            )
        };
        if n > 1 {
            ev.name_len = (n - 1) as u32;
        }
    }
    if ret == 0 && call.res != 0 {
        // struct addrinfo: ai_family at 4, ai_addr at 24, ai_next at 40.
        let mut ai = unsafe { bpf_probe_read_user(call.res as *const u64) }.unwrap_or(0);
        let mut n: usize = 0;
        for _ in 0..GAI_MAX_ADDRS {
            if ai == 0 {
                break;
            }
            let family = unsafe { bpf_probe_read_user((ai + 4) as *const i32) }.unwrap_or(0) as u16;
            let addr = unsafe { bpf_probe_read_user((ai + 24) as *const u64) }.unwrap_or(0);
            let slot = core::hint::black_box(n) & (GAI_MAX_ADDRS - 1);
            if addr != 0 && (family == AF_INET || family == AF_INET6) {
                let mut bytes = [0u8; 16];
                let ok = if family == AF_INET {
                    // sockaddr_in: sin_addr at 4
                    match unsafe { bpf_probe_read_user((addr + 4) as *const [u8; 4]) } {
                        Ok(a) => {
                            bytes[..4].copy_from_slice(&a);
                            true
                        }
                        Err(_) => false,
                    }
                } else {
                    // sockaddr_in6: sin6_addr at 8
                    match unsafe { bpf_probe_read_user((addr + 8) as *const [u8; 16]) } {
                        Ok(a) => {
                            bytes = a;
                            true
                        }
                        Err(_) => false,
                    }
                };
                if ok {
                    ev.families[slot] = family;
                    ev.addrs[slot] = bytes;
                    n += 1;
                }
            }
            ai = unsafe { bpf_probe_read_user((ai + 40) as *const u64) }.unwrap_or(0);
        }
        ev.n_addrs = n as u32;
    }
    output_bytes(
        ev as *const GetaddrinfoEvent as *const c_void,
        core::mem::size_of::<GetaddrinfoEvent>() as u64,
        probe::GETADDRINFO,
    );
    0
}
