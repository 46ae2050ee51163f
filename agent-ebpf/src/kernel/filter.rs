//! What the daemon asked not to trace, checked before any copying: disabled
//! features and pid / port / cgroup filters. With nothing set this costs one
//! array lookup per event.

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id,
    macros::map,
    maps::{Array, HashMap},
};
use periscope_ebpf::control::*;

#[map]
static CONTROL: Array<u32> = Array::with_max_entries(CONTROL_LEN, 0);

/// tgid -> INCLUDE / EXCLUDE (executables are resolved to pids by the daemon).
#[map]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);

/// TCP port (local or remote) -> INCLUDE / EXCLUDE.
#[map]
static PORT_FILTER: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// Sockets the daemon asked something of (`sock_mark`): not to copy their
/// payloads (not parsed, or TLS past its handshake), or to copy more of
/// them (HTTP/2). The value's low half is the socket's port pair
/// (`skc_portpair`): the daemon's request can arrive after the socket is
/// gone and its memory reused by a new connection, which the port pair tells
/// apart. Entries also leave when the socket is destroyed.
#[map]
pub static IGNORED_SOCKS: aya_ebpf::maps::LruHashMap<u64, u64> = aya_ebpf::maps::LruHashMap::with_max_entries(65536, 0);

/// The `sock_mark` bits the daemon set on `sk`, now with port pair
/// `current` (0 if none, or if they were for an earlier connection).
#[inline(always)]
pub fn sock_marks(sk: u64, current: u32) -> u32 {
    let Some(&value) = (unsafe { IGNORED_SOCKS.get(&sk) }) else { return 0 };
    if current == value as u32 {
        return (value >> 32) as u32;
    }
    let _ = IGNORED_SOCKS.remove(&sk);
    0
}

/// cgroup id -> INCLUDE.
#[map]
static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

#[inline(always)]
fn control(index: u32) -> u32 {
    CONTROL.get(index).copied().unwrap_or(0)
}

/// A filter map's mark for `key` (0 when absent). The value is made opaque
/// to LLVM, which otherwise merges it with pointers in one register and
/// masks that, which the verifier rejects.
#[inline(always)]
fn mark<K>(map: &HashMap<K, u8>, key: &K) -> u8 {
    match unsafe { map.get(key) } {
        Some(v) => core::hint::black_box(*v),
        None => 0,
    }
}

#[inline(always)]
pub fn feature_enabled(feature: u32) -> bool {
    control(FEATURES_DISABLED) & feature == 0
}

/// Whether the current process may be traced (pid and cgroup filters).
#[inline(always)]
pub fn process_traced(tgid: u32) -> bool {
    let filters = control(FILTERS);
    if filters == 0 {
        return true;
    }
    if filters & FILTER_PIDS != 0 {
        let m = mark(&PID_FILTER, &tgid);
        if m == EXCLUDE || (m != INCLUDE && filters & FILTER_PIDS_INCLUDE_ONLY != 0) {
            return false;
        }
    }
    if filters & FILTER_CGROUPS_INCLUDE_ONLY != 0 {
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        if mark(&CGROUP_FILTER, &cgroup) != INCLUDE {
            return false;
        }
    }
    true
}

/// Whether a connection between these ports may be traced.
#[inline(always)]
pub fn ports_traced(local: u16, remote: u16) -> bool {
    let filters = control(FILTERS);
    if filters & FILTER_PORTS == 0 {
        return true;
    }
    let l = mark(&PORT_FILTER, &local);
    let r = mark(&PORT_FILTER, &remote);
    if l == EXCLUDE || r == EXCLUDE {
        return false;
    }
    if filters & FILTER_PORTS_INCLUDE_ONLY != 0 {
        return l == INCLUDE || r == INCLUDE;
    }
    true
}
