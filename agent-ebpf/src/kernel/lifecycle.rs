//! Connection and process lifecycle: connect (with SYN_SENT -> ESTABLISHED
//! latency), passive open, socket destruction, process exit.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns, generated},
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use core::ffi::c_void;
use periscope_ebpf::{
    AcceptEvent, CloseEvent, ConnectEvent, EXEC_ENV_MAX, EXEC_FILENAME_MAX, EXEC_NAME_MAX, EventHeader,
    MmapExecEvent, ProcessExitEvent, ProcessForkEvent, ResetEvent, SockTuple, kind, probe,
};

use super::{
    CONNECTING, ConnectStart, EXEC_SCRATCH, MMAP_OFFSETS, OFFSETS, SELF_TGID, bounded, current_tgid, output,
    output_now, read_kernel, read_tuple, tcp_family,
};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_FIN_WAIT2: i32 = 5;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;

fn header(kind: u8, tgid: u32, ts_ns: u64) -> EventHeader {
    EventHeader { kind, _pad: [0; 3], tgid, ts_ns }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    if super::do_nothing() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let off = OFFSETS.load();
    let Some(family) = tcp_family(sk, &off) else { return 0 };
    let now = unsafe { bpf_ktime_get_ns() };
    match (old, new) {
        (TCP_CLOSE, TCP_SYN_SENT) => {
            // connect() runs in the owner's context: this pid is right.
            let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
            let tgid = (pid_tgid >> 32) as u32;
            // Only processes the filters trace: a failed connect of any
            // other (or of the daemon) makes no span.
            if tgid != SELF_TGID.load() && super::filter::process_traced(tgid) {
                let start = ConnectStart { tgid, tid: pid_tgid as u32, ts_ns: now };
                let _ = CONNECTING.insert(&sk, &start, 0);
            }
        }
        (TCP_SYN_SENT, TCP_ESTABLISHED) | (TCP_SYN_SENT, TCP_CLOSE) => {
            // May run in softirq: the pid comes from the SYN_SENT record.
            let Some(start) = (unsafe { CONNECTING.get(&sk) }).copied() else { return 0 };
            let _ = CONNECTING.remove(&sk);
            let failed = new == TCP_CLOSE;
            let mut ev = ConnectEvent {
                header: header(kind::CONNECT, start.tgid, now),
                sock: sk,
                syn_sent_ns: start.ts_ns,
                failed: failed as u8,
                _pad: [0; 3],
                error: if failed { read_kernel::<i32>(sk, off.sk_err).unwrap_or(0) } else { 0 },
                tid: start.tid,
                _pad2: 0,
                tuple: SockTuple::default(),
            };
            read_tuple(sk, family, &off, &mut ev.tuple);
            if failed && !super::filter::ports_traced(ev.tuple.src_port, ev.tuple.dst_port) {
                return 0;
            }
            output(&ev, probe::STATE_CHANGE);
        }
        (TCP_ESTABLISHED | TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSE_WAIT, TCP_CLOSE) => {
            // A RST received sets sk_err before the state changes; a close
            // of our own leaves it 0 (nothing sent).
            let error = read_kernel::<i32>(sk, off.sk_err).unwrap_or(0);
            if error != 0 {
                let ev = ResetEvent { header: header(kind::RESET, 0, now), sock: sk, error, _pad: 0 };
                output(&ev, probe::STATE_CHANGE);
            }
        }
        (TCP_SYN_RECV, TCP_ESTABLISHED) => {
            let mut ev = AcceptEvent { header: header(kind::ACCEPT, 0, now), sock: sk, tuple: SockTuple::default() };
            read_tuple(sk, family, &off, &mut ev.tuple);
            output(&ev, probe::STATE_CHANGE);
        }
        _ => {}
    }
    0
}

#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    if super::do_nothing() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let off = OFFSETS.load();
    let Some(family) = tcp_family(sk, &off) else { return 0 };
    let _ = CONNECTING.remove(&sk);
    let _ = super::filter::IGNORED_SOCKS.remove(&sk);
    let mut ev = CloseEvent {
        header: header(kind::CLOSE, 0, unsafe { bpf_ktime_get_ns() }),
        sock: sk,
        tuple: SockTuple::default(),
    };
    read_tuple(sk, family, &off, &mut ev.tuple);
    output(&ev, probe::DESTROY_SOCK);
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    if super::do_nothing() {
        return 0;
    }
    let group_dead: u64 = ctx.arg(1);
    if group_dead & 0xff == 0 {
        return 0;
    }
    let ev = ProcessExitEvent { header: header(kind::PROCESS_EXIT, current_tgid(), unsafe { bpf_ktime_get_ns() }) };
    output(&ev, probe::PROCESS_EXIT);
    0
}

/// A process forked another (a thread is not a fork): the daemon describes
/// a child that exits before /proc is read (a forking server's
/// per-connection process) as its parent, until it execs.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    if super::do_nothing() {
        return 0;
    }
    let child: u64 = ctx.arg(1);
    let parent_tgid = current_tgid();
    if parent_tgid == SELF_TGID.load() {
        return 0;
    }
    let off = OFFSETS.load();
    let Ok(child_tgid) = read_kernel::<i32>(child, off.task_tgid) else { return 0 };
    let child_tgid = child_tgid as u32;
    if child_tgid == parent_tgid || child_tgid == 0 {
        return 0;
    }
    let ev = ProcessForkEvent {
        header: header(kind::PROCESS_FORK, parent_tgid, unsafe { bpf_ktime_get_ns() }),
        child_tgid,
        _pad: 0,
    };
    output(&ev, probe::PROCESS_FORK);
    0
}

/// A process started a new program: its name, executable and environment,
/// so that even a process that exits before the daemon reads /proc is
/// described (the daemon prefers /proc when it is still there).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    if super::do_nothing() {
        return 0;
    }
    let bprm: u64 = ctx.arg(2);
    let tgid = current_tgid();
    if tgid == SELF_TGID.load() {
        return 0;
    }
    // A new program in this process: the Go offsets of the old one (if any)
    // no longer apply.
    let _ = super::go_tls::GO_PROCESSES.remove(&tgid);
    let off = OFFSETS.load();
    let Some(ev) = EXEC_SCRATCH.get_ptr_mut(0) else { return 0 };
    let ev = unsafe { &mut *ev };
    ev.header = header(kind::PROCESS_EXEC, tgid, unsafe { bpf_ktime_get_ns() });
    ev.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    ev.exe_name[0] = 0;
    ev.filename[0] = 0;
    ev.env_len = 0;
    ev._pad = 0;

    if let Ok(filename) = read_kernel::<u64>(bprm, off.binprm_filename) {
        unsafe {
            generated::bpf_probe_read_kernel_str(
                ev.filename.as_mut_ptr() as *mut c_void,
                EXEC_FILENAME_MAX as u32,
                filename as *const c_void,
            )
        };
    }
    let name = read_kernel::<u64>(bprm, off.binprm_file)
        .and_then(|file| read_kernel::<u64>(file, off.file_dentry))
        .and_then(|dentry| read_kernel::<u64>(dentry, off.dentry_name));
    if let Ok(name) = name {
        unsafe {
            generated::bpf_probe_read_kernel_str(
                ev.exe_name.as_mut_ptr() as *mut c_void,
                EXEC_NAME_MAX as u32,
                name as *const c_void,
            )
        };
    }
    let task = unsafe { generated::bpf_get_current_task_btf() } as u64;
    let env = read_kernel::<u64>(task, off.task_mm).and_then(|mm| {
        Ok((read_kernel::<u64>(mm, off.mm_env_start)?, read_kernel::<u64>(mm, off.mm_env_end)?))
    });
    if let Ok((start, end)) = env {
        if end > start {
            let len = bounded((end - start).min(EXEC_ENV_MAX as u64) as u32, EXEC_ENV_MAX as u32);
            let ret = unsafe {
                generated::bpf_probe_read_user(ev.env.as_mut_ptr() as *mut c_void, len, start as *const c_void)
            };
            if ret == 0 {
                ev.env_len = len;
            }
        }
    }
    output_now(ev, probe::PROCESS_EXEC);
    0
}

const PROT_EXEC: u64 = 4;

/// A file mapped executable: the dynamic loader or dlopen bringing in a
/// library. The daemon rescans the process's maps for TLS libraries.
#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    let off = MMAP_OFFSETS.load();
    if off.prot == 0 {
        return 0;
    }
    let prot: u64 = unsafe { ctx.read_at(off.prot as usize) }.unwrap_or(0);
    let fd: u64 = unsafe { ctx.read_at(off.fd as usize) }.unwrap_or(u64::MAX);
    if prot & PROT_EXEC == 0 || (fd as i64 as i32) < 0 {
        return 0;
    }
    let tgid = current_tgid();
    if tgid == SELF_TGID.load() {
        return 0;
    }
    let ev = MmapExecEvent { header: header(kind::MMAP_EXEC, tgid, unsafe { bpf_ktime_get_ns() }) };
    output_now(&ev, probe::MMAP_EXEC);
    0
}
