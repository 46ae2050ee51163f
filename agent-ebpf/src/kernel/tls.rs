//! Plaintext inside TLS libraries (OpenSSL, GnuTLS), and handshake timing.
//!
//! Entry probes remember the call per thread; the socket probes, firing
//! inside the call on the same thread, record which socket it used; return
//! probes emit the plaintext as a data event with `source::TLS`. A call that
//! touched no socket (data already decrypted and buffered, or a library fed
//! through memory BIOs, as in Node) is linked through the session's last
//! known socket, or, for a session never linked yet, the socket this thread
//! last received from: where the handshake or data it just processed came
//! from. That last rule is a heuristic for event-loop programs; libraries
//! that do their own socket I/O never need it.
//!
//! SSL_connect and SSL_accept are wrappers around SSL_do_handshake, so
//! hooking SSL_do_handshake times all three.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use periscope_ebpf::{EventHeader, SockTuple, TlsHandshakeEvent, direction, handshake_result, kind, probe, source, tls_library};

use super::filter::{feature_enabled, ports_traced, process_traced};
use super::socket_io::{copy_flat_call, finish_data_event, start_data_event};
use periscope_ebpf::control::FEATURE_TLS;
use super::{OFFSETS, SCRATCH, SELF_TGID, count, output, read_socket, read_tuple, tcp_family};
use periscope_ebpf::kernel_counter;

pub const CALL_READ: u8 = 0;
pub const CALL_WRITE: u8 = 1;
pub const CALL_HANDSHAKE: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    pub ssl: u64,
    pub buf: u64,
    /// `size_t *` out-parameter of SSL_read_ex/SSL_write_ex, else 0.
    pub len_ptr: u64,
    /// Socket the call did I/O on (set by the socket probes), else 0.
    pub sock: u64,
    /// When the call was entered.
    pub start_ns: u64,
    /// When its last socket send completed (set by the socket probes), else 0.
    pub sent_ns: u64,
    pub kind: u8,
    pub library: u8,
    pub _pad: [u8; 6],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SessionKey {
    pub tgid: u32,
    pub _pad: u32,
    pub session: u64,
}

/// The TLS call each thread is in, keyed by pid_tgid.
#[map]
pub static TLS_CALLS: HashMap<u64, TlsCall> = HashMap::with_max_entries(16384, 0);

/// Socket of each TLS session (SSL* / gnutls_session_t), once known.
#[map]
static SESSION_SOCKS: LruHashMap<SessionKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// When each session's first handshake call started.
#[map]
static HANDSHAKE_STARTS: LruHashMap<SessionKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// Sessions known to be past their handshake (a call returned data, or a
/// handshake call succeeded): their ciphertext is no longer of interest.
#[map]
pub static ESTABLISHED: LruHashMap<SessionKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// The socket each thread last received from, keyed by pid_tgid.
#[map]
pub static LAST_RECV: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

const BPF_NOEXIST: u64 = 1;
const GNUTLS_E_AGAIN: i32 = -28;
const GNUTLS_E_INTERRUPTED: i32 = -52;

#[inline(always)]
fn enter(session: Option<u64>, buf: Option<u64>, len_ptr: u64, kind: u8, library: u8) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session) = session else { return 0 };
    if tgid == SELF_TGID.load() || !feature_enabled(FEATURE_TLS) || !process_traced(tgid) {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let call =
        TlsCall { ssl: session, buf: buf.unwrap_or(0), len_ptr, sock: 0, start_ns: now, sent_ns: 0, kind, library, _pad: [0; 6] };
    let _ = TLS_CALLS.insert(&pid_tgid, &call, 0);
    if kind == CALL_HANDSHAKE {
        let key = SessionKey { tgid, _pad: 0, session };
        let _ = HANDSHAKE_STARTS.insert(&key, &now, BPF_NOEXIST);
    }
    0
}

#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    enter(ctx.arg(0), ctx.arg(1), 0, CALL_READ, tls_library::OPENSSL)
}

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    enter(ctx.arg(0), ctx.arg(1), 0, CALL_WRITE, tls_library::OPENSSL)
}

#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    enter(ctx.arg(0), ctx.arg(1), ctx.arg(3).unwrap_or(0), CALL_READ, tls_library::OPENSSL)
}

#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    enter(ctx.arg(0), ctx.arg(1), ctx.arg(3).unwrap_or(0), CALL_WRITE, tls_library::OPENSSL)
}

#[uprobe]
pub fn ssl_do_handshake(ctx: ProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    enter(ctx.arg(0), None, 0, CALL_HANDSHAKE, tls_library::OPENSSL)
}

#[uprobe]
pub fn gnutls_record_recv(ctx: ProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    enter(ctx.arg(0), ctx.arg(1), 0, CALL_READ, tls_library::GNUTLS)
}

#[uprobe]
pub fn gnutls_record_send(ctx: ProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    enter(ctx.arg(0), ctx.arg(1), 0, CALL_WRITE, tls_library::GNUTLS)
}

#[uprobe]
pub fn gnutls_handshake(ctx: ProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    enter(ctx.arg(0), None, 0, CALL_HANDSHAKE, tls_library::GNUTLS)
}

/// SSL_read / SSL_write: the return value is the byte count.
#[uretprobe]
pub fn ssl_rw_ret(ctx: RetProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    let ret: i32 = ctx.ret();
    finish_read_write(if ret > 0 { ret as u32 } else { 0 })
}

/// SSL_read_ex / SSL_write_ex: 1 on success, the count in `*len_ptr`.
#[uretprobe]
pub fn ssl_rw_ex_ret(ctx: RetProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    let ret: i32 = ctx.ret();
    let pid_tgid = bpf_get_current_pid_tgid();
    let n = match unsafe { TLS_CALLS.get(&pid_tgid) } {
        Some(call) if ret == 1 && call.len_ptr != 0 => {
            unsafe { bpf_probe_read_user(call.len_ptr as *const u64) }.unwrap_or(0) as u32
        }
        _ => 0,
    };
    finish_read_write(n)
}

/// gnutls_record_recv / gnutls_record_send: ssize_t byte count.
#[uretprobe]
pub fn gnutls_rw_ret(ctx: RetProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    let ret: i64 = ctx.ret();
    finish_read_write(if ret > 0 { ret as u32 } else { 0 })
}

#[uretprobe]
pub fn ssl_handshake_ret(ctx: RetProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    let ret: i32 = ctx.ret();
    // <= 0 is either "call again" (non-blocking) or failure; only the
    // library knows which, so the start stays until success or eviction.
    finish_handshake(ret == 1, false)
}

#[uretprobe]
pub fn gnutls_handshake_ret(ctx: RetProbeContext) -> u32 {
    if super::do_nothing() {
        return 0;
    }
    let ret: i32 = ctx.ret();
    let failed = ret < 0 && ret != GNUTLS_E_AGAIN && ret != GNUTLS_E_INTERRUPTED;
    finish_handshake(ret == 0, failed)
}

/// The socket a TLS call belongs to (0 if it cannot be told).
#[inline(always)]
fn linked_socket(call: &TlsCall, key: &SessionKey, pid_tgid: u64) -> u64 {
    if call.sock != 0 {
        let _ = SESSION_SOCKS.insert(key, &call.sock, 0);
        return call.sock;
    }
    if let Some(sock) = unsafe { SESSION_SOCKS.get(key) } {
        return *sock;
    }
    if let Some(sock) = unsafe { LAST_RECV.get(&pid_tgid) }.copied() {
        let _ = SESSION_SOCKS.insert(key, &sock, 0);
        return sock;
    }
    0
}

#[inline(always)]
fn finish_read_write(n: u32) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { TLS_CALLS.get(&pid_tgid) }).copied() else { return 0 };
    let _ = TLS_CALLS.remove(&pid_tgid);
    if call.kind == CALL_HANDSHAKE {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let key = SessionKey { tgid, _pad: 0, session: call.ssl };
    // Reads that return nothing still tie the session to its socket: Node
    // completes handshakes inside such SSL_read calls, and its first
    // SSL_write must find the link. A first write on a session never linked
    // (Node's client finishes a TLS 1.3 handshake inside its first SSL_write)
    // takes the socket whose handshake flight this thread just received.
    let sock = linked_socket(&call, &key, pid_tgid);
    if n == 0 {
        return 0;
    }
    if unsafe { ESTABLISHED.get(&key) }.is_none() {
        let _ = ESTABLISHED.insert(&key, &1, 0);
    }
    if sock == 0 {
        count(kernel_counter::TLS_UNLINKED);
        return 0;
    }
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return 0 };
    let buf = unsafe { &mut *buf };
    let dir = if call.kind == CALL_READ { direction::INGRESS } else { direction::EGRESS };
    start_data_event(buf, tgid, pid_tgid as u32, sock, dir, source::TLS, n);
    // A write's bytes reached the peer when its last send completed; the
    // call's return comes later, and a woken reader (on loopback, another
    // traced process) may already have read them by then.
    if dir == direction::EGRESS && call.sent_ns != 0 {
        buf.event.header.ts_ns = call.sent_ns;
    }
    buf.event.syscall = call.library;
    buf.event.call_start_ns = call.start_ns;
    let off = OFFSETS.load();
    let (marks, portpair) = match read_socket(sock, &off, &mut buf.event.tuple) {
        Some((_, portpair)) => (super::filter::sock_marks(sock, portpair), Some(portpair)),
        None => {
            buf.event.tuple = SockTuple::default();
            (0, None)
        }
    };
    buf.event.tuple.protocol = periscope_ebpf::IPPROTO_TCP;
    if !ports_traced(buf.event.tuple.src_port, buf.event.tuple.dst_port) {
        return 0;
    }
    let (head, tail) = copy_flat_call(buf, call.buf, n, super::socket_io::payload_cap(marks));
    finish_data_event(buf, head, tail, probe::TLS_DATA);
    if let Some(portpair) = portpair {
        super::socket_io::widen_on_http2_preface(buf, sock, portpair, marks);
    }
    0
}

#[inline(always)]
fn finish_handshake(ok: bool, failed: bool) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { TLS_CALLS.get(&pid_tgid) }).copied() else { return 0 };
    let _ = TLS_CALLS.remove(&pid_tgid);
    let tgid = (pid_tgid >> 32) as u32;
    let key = SessionKey { tgid, _pad: 0, session: call.ssl };
    let now = unsafe { bpf_ktime_get_ns() };
    let start = unsafe { HANDSHAKE_STARTS.get(&key) }.copied().unwrap_or(now);
    let sock = linked_socket(&call, &key, pid_tgid);
    if failed {
        let _ = HANDSHAKE_STARTS.remove(&key);
        send_handshake(tgid, sock, start, now, call.library, handshake_result::FAILED);
        return 0;
    }
    if !ok {
        // Said so the daemon can tell a handshake that never completed
        // (the connection closes first) from one it never saw.
        send_handshake(tgid, sock, start, now, call.library, handshake_result::NOT_DONE);
        return 0;
    }
    let _ = HANDSHAKE_STARTS.remove(&key);
    let _ = ESTABLISHED.insert(&key, &1, 0);
    send_handshake(tgid, sock, start, now, call.library, handshake_result::DONE);
    0
}

/// A handshake of `library` on `sock` (0: not linked) ran from `start_ns`
/// to `end_ns`.
#[inline(always)]
pub(super) fn send_handshake(tgid: u32, sock: u64, start_ns: u64, end_ns: u64, library: u8, result: u8) {
    let mut ev = TlsHandshakeEvent {
        header: EventHeader { kind: kind::TLS_HANDSHAKE, _pad: [0; 3], tgid, ts_ns: end_ns },
        sock,
        start_ns,
        library,
        result,
        _pad: [0; 6],
        tuple: SockTuple::default(),
    };
    if sock != 0 {
        let off = OFFSETS.load();
        if let Some(family) = tcp_family(sock, &off) {
            read_tuple(sock, family, &off, &mut ev.tuple);
        }
    }
    output(&ev, probe::TLS_HANDSHAKE);
}
