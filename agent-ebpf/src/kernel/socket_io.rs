//! Every send and receive on a TCP socket, with a bounded payload copy.
//!
//! `sock:sock_send_length` / `sock:sock_recv_length` fire inside
//! `sock_sendmsg`/`sock_recvmsg` after the data has been copied to or from
//! the user's buffers, for socket calls only. The user buffers are found from
//! the system call's own arguments, read from the task's saved user registers:
//! no per-syscall enter/exit hooks and no map traffic on non-socket I/O.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, generated},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use core::ffi::c_void;
use periscope_ebpf::{
    DataEvent, DataEventBuf, EventHeader, KernelOffsets, MAX_IOVECS, MAX_PAYLOAD, TAIL_CAPTURE, WIDE_PAYLOAD_CAP,
    direction, kind, nr, probe, sock_mark, source, syscall,
};

use super::filter::{feature_enabled, ports_traced, process_traced, sock_marks};
use super::tls::{CALL_HANDSHAKE, ESTABLISHED, LAST_RECV, SessionKey, TLS_CALLS};
use periscope_ebpf::control::{FEATURE_DNS, FEATURE_HTTP, FEATURE_TLS};
use periscope_ebpf::{DNS_PORT, IPPROTO_UDP};
use super::{OFFSETS, PAYLOAD_CAP, SCRATCH, SELF_TGID, bounded, output_data, read_kernel, read_socket};

const MSG_PEEK: i32 = 2;

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> i32 {
    if super::do_nothing() {
        return 0;
    }
    on_socket_io(&ctx, direction::EGRESS, probe::SOCK_SEND);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    if super::do_nothing() {
        return 0;
    }
    on_socket_io(&ctx, direction::INGRESS, probe::SOCK_RECV);
    0
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

#[inline(always)]
fn on_socket_io(ctx: &BtfTracePointContext, dir: u8, probe_id: u32) -> Option<()> {
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if ret <= 0 || (dir == direction::INGRESS && flags & MSG_PEEK != 0) {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == 0 || tgid == SELF_TGID.load() {
        return None;
    }
    if !process_traced(tgid) {
        return None;
    }
    let off = OFFSETS.load();
    let buf = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    let (protocol, portpair) = read_socket(sk, &off, &mut buf.event.tuple)?;
    if protocol == IPPROTO_UDP {
        return on_dns_datagram(buf, sk, &off, tgid, pid_tgid, dir, probe_id, ret as u32);
    }
    let tls_on = feature_enabled(FEATURE_TLS);
    // Inside a TLS library call: remember the socket for the plaintext
    // event. The ciphertext itself is only wanted during handshakes, which
    // some programs (s_client, Node) leave to their first SSL_read/SSL_write.
    let mut in_handshake = false;
    if tls_on {
        if let Some(call) = TLS_CALLS.get_ptr_mut(&pid_tgid) {
            let call = unsafe { &mut *call };
            call.sock = sk;
            if dir == direction::EGRESS {
                call.sent_ns = unsafe { bpf_ktime_get_ns() };
            }
            let key = SessionKey { tgid, _pad: 0, session: call.ssl };
            if call.kind != CALL_HANDSHAKE && unsafe { ESTABLISHED.get(&key) }.is_some() {
                return None;
            }
            in_handshake = true;
        }
    }
    // Socket payloads serve HTTP, and the TLS version during handshakes;
    // sockets the daemon will not parse cost this lookup and nothing more.
    let wanted = if in_handshake { FEATURE_TLS } else { FEATURE_HTTP };
    if !feature_enabled(wanted) {
        return None;
    }
    let marks = sock_marks(sk, portpair);
    if marks & sock_mark::IGNORE != 0 {
        return None;
    }
    // Written only when it changes: a keep-alive connection's thread keeps
    // receiving from the same socket, and an LRU update costs far more than
    // the lookup.
    if dir == direction::INGRESS && tls_on && unsafe { LAST_RECV.get(&pid_tgid) }.copied() != Some(sk) {
        let _ = LAST_RECV.insert(&pid_tgid, &sk, 0);
    }

    start_data_event(buf, tgid, pid_tgid as u32, sk, dir, source::SOCKET, ret as u32);
    if !ports_traced(buf.event.tuple.src_port, buf.event.tuple.dst_port) {
        return None;
    }
    copy_and_send(buf, &off, ret as u32, payload_cap(marks), probe_id);
    widen_on_http2_preface(buf, sk, portpair, marks);
    Some(())
}

/// A call that starts with the HTTP/2 client preface ("PRI * HTTP/2.0"):
/// the socket's later calls are copied up to `WIDE_PAYLOAD_CAP` at once,
/// without waiting for the daemon (whose own request comes a drain later,
/// after a short exchange may be over). Costs a 4-byte compare per call.
#[inline(always)]
pub(super) fn widen_on_http2_preface(buf: &DataEventBuf, sk: u64, portpair: u32, marks: u32) {
    if marks & sock_mark::WIDE != 0 || buf.event.captured_len < 4 {
        return;
    }
    if buf.payload[0] == b'P' && buf.payload[1] == b'R' && buf.payload[2] == b'I' && buf.payload[3] == b' ' {
        let value = u64::from(portpair) | (u64::from(marks | sock_mark::WIDE) << 32);
        let _ = super::filter::IGNORED_SOCKS.insert(&sk, &value, 0);
    }
}

/// How many bytes of a call to copy on a socket with these marks.
#[inline(always)]
pub(super) fn payload_cap(marks: u32) -> u32 {
    if marks & sock_mark::WIDE != 0 { WIDE_PAYLOAD_CAP } else { PAYLOAD_CAP.load() }
}

/// A datagram on a UDP socket: copied only when it is connected to the DNS
/// port and DNS is enabled.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn on_dns_datagram(
    buf: &mut DataEventBuf,
    sk: u64,
    off: &KernelOffsets,
    tgid: u32,
    pid_tgid: u64,
    dir: u8,
    probe_id: u32,
    len: u32,
) -> Option<()> {
    if !feature_enabled(FEATURE_DNS) {
        return None;
    }
    // The port first: most UDP traffic is not DNS and stops here. Only
    // client sockets connected to a resolver's port 53 (glibc, Go, c-ares
    // and Node all connect theirs); a DNS server's own traffic is not copied.
    if buf.event.tuple.dst_port != DNS_PORT {
        return None;
    }
    start_data_event(buf, tgid, pid_tgid as u32, sk, dir, source::SOCKET, len);
    buf.event.tuple.protocol = IPPROTO_UDP;
    copy_and_send(buf, off, len, PAYLOAD_CAP.load(), probe_id);
    Some(())
}

#[inline(always)]
fn copy_and_send(buf: &mut DataEventBuf, off: &KernelOffsets, len: u32, cap: u32, probe_id: u32) {
    let want = Want::for_call(len, cap);
    let (sys, fd, head, tail) = copy_syscall_payload(buf, off, &want);
    buf.event.syscall = sys;
    buf.event.fd = fd;
    if sys == syscall::READ_WRITE {
        super::go_tls::tag_goroutine(&mut buf.event, bpf_get_current_pid_tgid());
    }
    finish_data_event(buf, head, tail, probe_id);
}

/// Fills the scratch event's header fields for one call (the tuple is the
/// caller's: it was read with the socket).
#[inline(always)]
pub(super) fn start_data_event(buf: &mut DataEventBuf, tgid: u32, tid: u32, sk: u64, dir: u8, src: u8, total: u32) {
    let ev: &mut DataEvent = &mut buf.event;
    let now = unsafe { bpf_ktime_get_ns() };
    ev.header = EventHeader { kind: kind::DATA, _pad: [0; 3], tgid, ts_ns: now };
    ev.call_start_ns = now;
    ev.sock = sk;
    ev.tid = tid;
    ev.fd = -1;
    ev.total_len = total;
    ev.direction = dir;
    ev.syscall = syscall::OTHER;
    ev.source = src;
    ev.flags = 0;
    ev._pad2 = 0;
}

/// Records what was copied and writes the event out at its real size.
#[inline(always)]
pub(super) fn finish_data_event(buf: &mut DataEventBuf, head: u32, tail: u32, probe_id: u32) {
    buf.event.captured_len = head + tail;
    buf.event.tail_len = tail as u16;
    let mut size = core::mem::size_of::<DataEvent>() as u64 + (head + tail) as u64;
    if size > core::mem::size_of::<DataEventBuf>() as u64 {
        size = core::mem::size_of::<DataEventBuf>() as u64;
    }
    let sk = buf.event.sock;
    output_data(&mut buf.event as *mut DataEvent, size, sk, probe_id);
}

/// Copies head and tail of a flat user buffer of `total` bytes.
#[inline(always)]
pub(super) fn copy_flat_call(buf: &mut DataEventBuf, src: u64, total: u32, cap: u32) -> (u32, u32) {
    let want = Want::for_call(total, cap);
    let head = copy_flat(buf, src, &want);
    let tail = if want.tail > 0 && head == want.head {
        copy_tail(buf, head, src + (want.total - want.tail) as u64)
    } else {
        0
    };
    (head, tail)
}

/// How much of a call to copy: its first `head` bytes and its last `tail`
/// bytes (of `total`).
pub(super) struct Want {
    head: u32,
    tail: u32,
    total: u32,
}

impl Want {
    /// A call larger than the cap keeps its head and its last bytes.
    #[inline(always)]
    fn for_call(total: u32, cap: u32) -> Self {
        let mut cap = cap;
        if cap > MAX_PAYLOAD as u32 {
            cap = MAX_PAYLOAD as u32;
        }
        if total <= cap {
            Want { head: total, tail: 0, total }
        } else if cap >= 2 * TAIL_CAPTURE {
            Want { head: cap - TAIL_CAPTURE, tail: TAIL_CAPTURE, total }
        } else {
            Want { head: cap, tail: 0, total }
        }
    }
}

/// Finds the user buffer(s) of the system call in progress and copies what
/// `want` asks for. Returns (syscall family, fd, head bytes, tail bytes).
#[inline(always)]
fn copy_syscall_payload(buf: &mut DataEventBuf, off: &KernelOffsets, want: &Want) -> (u8, i32, u32, u32) {
    let regs = unsafe { generated::bpf_task_pt_regs(generated::bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        return (syscall::OTHER, -1, 0, 0);
    }
    let Some(SyscallRegs { dx: arg2, si: arg1, di: arg0, orig_ax: nr }) = syscall_regs(regs, off) else {
        return (syscall::OTHER, -1, 0, 0);
    };
    let fd = arg0 as i32;
    // Vectored calls name their iovec array (pointer, count); the copy is
    // made in one place so that its loop is verified once.
    let (sys, fd, head, vector) = match nr {
        nr::READ | nr::WRITE => (syscall::READ_WRITE, fd, copy_flat(buf, arg1, want), None),
        nr::SENDTO | nr::RECVFROM => (syscall::SEND_RECV, fd, copy_flat(buf, arg1, want), None),
        nr::READV | nr::WRITEV => (syscall::VECTORED, fd, 0, Some((arg1, arg2))),
        nr::SENDMSG | nr::RECVMSG => {
            // struct user_msghdr: msg_name, msg_namelen (padded), msg_iov, msg_iovlen
            let iov = unsafe { bpf_probe_read_user((arg1 + 16) as *const u64) }.unwrap_or(0);
            let iovlen = unsafe { bpf_probe_read_user((arg1 + 24) as *const u64) }.unwrap_or(0);
            (syscall::MSG, fd, 0, Some((iov, iovlen)))
        }
        nr::SENDMMSG => {
            // struct mmsghdr { user_msghdr msg_hdr (56 bytes); u32 msg_len; }:
            // the tracepoint fires once per datagram, before its msg_len is
            // written, so the first entry still at 0 is the one being sent
            // (senders zero them, as glibc's resolver does).
            let mut hdr = arg1;
            for i in 0..4u64 {
                if i >= arg2 {
                    break;
                }
                let entry = arg1 + i * 64;
                let sent = unsafe { bpf_probe_read_user((entry + 56) as *const u32) }.unwrap_or(0);
                if sent == 0 {
                    hdr = entry;
                    break;
                }
            }
            let iov = unsafe { bpf_probe_read_user((hdr + 16) as *const u64) }.unwrap_or(0);
            let iovlen = unsafe { bpf_probe_read_user((hdr + 24) as *const u64) }.unwrap_or(0);
            (syscall::MSG, fd, 0, Some((iov, iovlen)))
        }
        nr::SENDFILE => (syscall::SENDFILE, fd, 0, None),
        _ => (syscall::OTHER, -1, 0, None),
    };
    let (head, tail) = match vector {
        Some((iov, iovcnt)) => copy_iovecs(buf, iov, iovcnt, want),
        None => (head, 0),
    };
    // Flat buffers: the tail is simply the buffer's last bytes.
    let tail = match sys {
        syscall::READ_WRITE | syscall::SEND_RECV if want.tail > 0 && head == want.head => {
            copy_tail(buf, head, arg1 + (want.total - want.tail) as u64)
        }
        _ => tail,
    };
    (sys, fd, head, tail)
}

/// The system call number and first three arguments, in pt_regs order.
#[repr(C)]
#[derive(Clone, Copy)]
struct SyscallRegs {
    dx: u64,
    si: u64,
    di: u64,
    orig_ax: u64,
}

/// Reads the saved user registers with one copy where they lie together.
#[inline(always)]
fn syscall_regs(regs: u64, off: &KernelOffsets) -> Option<SyscallRegs> {
    if off.pt_regs_packed != 0 {
        return read_kernel::<SyscallRegs>(regs, off.pt_regs_dx).ok();
    }
    Some(SyscallRegs {
        orig_ax: read_kernel::<u64>(regs, off.pt_regs_orig_ax).ok()?,
        di: read_kernel::<u64>(regs, off.pt_regs_di).unwrap_or(0),
        si: read_kernel::<u64>(regs, off.pt_regs_si).unwrap_or(0),
        dx: read_kernel::<u64>(regs, off.pt_regs_dx).unwrap_or(0),
    })
}

/// Copies `TAIL_CAPTURE` bytes from `src` into the payload at `at`.
#[inline(always)]
fn copy_tail(buf: &mut DataEventBuf, at: u32, src: u64) -> u32 {
    // `at` < MAX_PAYLOAD always; the mask keeps the verifier convinced.
    let at = (core::hint::black_box(at) as usize) & (MAX_PAYLOAD - 1);
    let ret = unsafe {
        generated::bpf_probe_read_user(
            buf.payload.as_mut_ptr().add(at) as *mut c_void,
            TAIL_CAPTURE,
            src as *const c_void,
        )
    };
    if ret < 0 { 0 } else { TAIL_CAPTURE }
}

#[inline(always)]
fn copy_flat(buf: &mut DataEventBuf, src: u64, want: &Want) -> u32 {
    let n = bounded(want.head, MAX_PAYLOAD as u32);
    if n == 0 || src == 0 {
        return 0;
    }
    let ret = unsafe {
        generated::bpf_probe_read_user(buf.payload.as_mut_ptr() as *mut c_void, n, src as *const c_void)
    };
    if ret < 0 { 0 } else { n }
}

/// The state of a walk over a call's iovecs (the context of `iovec_step`).
#[repr(C)]
struct IovecWalk {
    iov: u64,
    iovcnt: u64,
    /// Stream position where the next iovec starts.
    pos: u64,
    tail_src: u64,
    head: u32,
    tail: u32,
    total: u32,
    copied: u32,
}

/// One iovec of the walk, run by `bpf_loop`: the loop body is verified
/// once, whatever the number of iovecs (an unrolled loop ran out of
/// verifier budget past 8, and gRPC writes a frame header and its payload as
/// separate iovecs, dozens per call). Returns 1 to stop.
#[inline(never)]
extern "C" fn iovec_step(i: u64, ctx: *mut c_void) -> i64 {
    let w = unsafe { &mut *(ctx as *mut IovecWalk) };
    if i >= w.iovcnt || w.iov == 0 || w.pos >= w.total as u64 {
        return 1;
    }
    let Ok(v) = (unsafe { bpf_probe_read_user((w.iov + i * 16) as *const IoVec) }) else {
        return 1;
    };
    let (total, pos) = (w.total as u64, w.pos);
    let end = pos + v.len;
    if w.tail > 0 && end >= total && total - pos >= w.tail as u64 {
        w.tail_src = v.base + (total - pos) - w.tail as u64;
    }
    w.pos = end;
    if w.copied >= w.head {
        return 0;
    }
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return 1 };
    let buf = unsafe { &mut *buf };
    let at = (core::hint::black_box(w.copied) as usize) & (MAX_PAYLOAD - 1);
    let mut n = (w.head - w.copied) as u64;
    if n > v.len {
        n = v.len;
    }
    // Bounded right before the call: the verifier must see n <= MAX_PAYLOAD.
    if n == 0 || n > MAX_PAYLOAD as u64 {
        return 0;
    }
    let ret = unsafe {
        generated::bpf_probe_read_user(buf.payload.as_mut_ptr().add(at) as *mut c_void, n as u32, v.base as *const c_void)
    };
    if ret < 0 {
        return 1;
    }
    w.copied += n as u32;
    0
}

/// Copies the head from the first iovecs and, when asked, the tail from the
/// iovec holding the call's last byte (only if that iovec holds the whole
/// tail). Returns (head bytes, tail bytes).
#[inline(always)]
fn copy_iovecs(buf: &mut DataEventBuf, iov: u64, iovcnt: u64, want: &Want) -> (u32, u32) {
    let mut walk =
        IovecWalk { iov, iovcnt, pos: 0, tail_src: 0, head: want.head, tail: want.tail, total: want.total, copied: 0 };
    unsafe {
        generated::bpf_loop(
            MAX_IOVECS as u32,
            iovec_step as *mut c_void,
            &mut walk as *mut IovecWalk as *mut c_void,
            0,
        );
    }
    let copied = bounded(walk.copied, want.head);
    let tail = if walk.tail_src != 0 && copied == want.head { copy_tail(buf, copied, walk.tail_src) } else { 0 };
    (copied, tail)
}
