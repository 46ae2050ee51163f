//! Connection and process lifecycle: connect (with SYN_SENT -> ESTABLISHED
//! latency), passive open, socket destruction, process exit.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use periscope_ebpf::{
    AcceptEvent, CloseEvent, ConnectEvent, EventHeader, ProcessExitEvent, SockTuple, kind, probe,
};

use super::{CONNECTING, ConnectStart, OFFSETS, SELF_TGID, current_tgid, output, read_tuple, tcp_family};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;

fn header(kind: u8, tgid: u32, ts_ns: u64) -> EventHeader {
    EventHeader { kind, _pad: [0; 3], tgid, ts_ns }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let off = OFFSETS.load();
    let Some(family) = tcp_family(sk, &off) else { return 0 };
    let now = unsafe { bpf_ktime_get_ns() };
    match (old, new) {
        (TCP_CLOSE, TCP_SYN_SENT) => {
            // connect() runs in the owner's context: this pid is right.
            let tgid = current_tgid();
            if tgid != SELF_TGID.load() {
                let start = ConnectStart { tgid, _pad: 0, ts_ns: now };
                let _ = CONNECTING.insert(&sk, &start, 0);
            }
        }
        (TCP_SYN_SENT, TCP_ESTABLISHED) | (TCP_SYN_SENT, TCP_CLOSE) => {
            // May run in softirq: the pid comes from the SYN_SENT record.
            let Some(start) = (unsafe { CONNECTING.get(&sk) }).copied() else { return 0 };
            let _ = CONNECTING.remove(&sk);
            let mut ev = ConnectEvent {
                header: header(kind::CONNECT, start.tgid, now),
                sock: sk,
                syn_sent_ns: start.ts_ns,
                failed: (new == TCP_CLOSE) as u8,
                _pad: [0; 7],
                tuple: SockTuple::default(),
            };
            read_tuple(sk, family, &off, &mut ev.tuple);
            output(&ev, probe::STATE_CHANGE);
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
    let sk: u64 = ctx.arg(0);
    let off = OFFSETS.load();
    let Some(family) = tcp_family(sk, &off) else { return 0 };
    let _ = CONNECTING.remove(&sk);
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
    let group_dead: u64 = ctx.arg(1);
    if group_dead & 0xff == 0 {
        return 0;
    }
    let ev = ProcessExitEvent { header: header(kind::PROCESS_EXIT, current_tgid(), unsafe { bpf_ktime_get_ns() }) };
    output(&ev, probe::PROCESS_EXIT);
    0
}
