//! Plaintext inside Go's crypto/tls, and which request a Go client call is
//! made for.
//!
//! Go programs carry their own TLS, so the library uprobes never see them.
//! These uprobes sit in the program itself: at the entry of
//! `crypto/tls.(*Conn).Write` (the plaintext is all there), at the entry of
//! `(*Conn).Read` and at its copy of the plaintext into the caller's buffer
//! (or, where that copy is not found, at every `RET`: a uretprobe rewrites
//! the return address on the goroutine's stack, which Go's movable stacks
//! do not survive), and around the handshake functions. Arguments and results follow Go's
//! register ABI (Go 1.17+ on amd64): RAX, RBX, RCX... and the current
//! goroutine in R14.
//!
//! A goroutine may run on any thread, and may move between threads inside a
//! call, so calls are keyed by goroutine, and the socket comes from the
//! connection itself: `tls.Conn.conn` (a `*net.TCPConn`) -> `netFD` ->
//! `poll.FD.Sysfd`, then the process's file table. Events carry the
//! goroutine id in place of the thread id (`data_flags::GOROUTINE`).
//!
//! net/http writes a client request from its connection's own goroutine,
//! not from the handler that asked for it: `(*Transport).roundTrip` records
//! which goroutine asked for a `*Request`, and the functions that write one
//! (`(*Request).write` for HTTP/1, `(*http2clientStream).doRequest` for
//! HTTP/2) make the writing goroutine stand for the asking one, so the call
//! is linked to what the handler is serving.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::{map, uprobe},
    maps::{HashMap, LruHashMap},
    programs::ProbeContext,
};
use periscope_ebpf::{
    GoBinaryKey, GoProcess, KernelOffsets, control::FEATURE_TLS, data_flags, direction, handshake_result, kernel_counter, probe,
    source, tls_library,
};

use super::filter::{feature_enabled, ports_traced, process_traced};
use super::socket_io::{
    copy_flat_call, finish_data_event, payload_cap, start_data_event, widen_on_http2_preface,
};
use super::{OFFSETS, SCRATCH, SELF_TGID, count, do_nothing, read_kernel, read_socket, tcp_family};

/// Offsets for each hooked Go executable, set by the daemon when it hooks
/// the file: a process started from it later is read from its first call.
#[map]
pub static GO_BINARIES: HashMap<GoBinaryKey, GoProcess> = HashMap::with_max_entries(1024, 0);

/// The same by process, filled on a process's first call; an exec forgets
/// the process's entry.
#[map]
pub static GO_PROCESSES: LruHashMap<u32, GoProcess> = LruHashMap::with_max_entries(16384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoroutineKey {
    pub tgid: u32,
    pub _pad: u32,
    /// The goroutine's `runtime.g` (R14): unique among live goroutines.
    pub g: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoCall {
    pub conn: u64,
    pub buf: u64,
    pub start_ns: u64,
}

/// Reads and handshakes in progress, by goroutine.
#[map]
static GO_READS: LruHashMap<GoroutineKey, GoCall> = LruHashMap::with_max_entries(16384, 0);
#[map]
static GO_HANDSHAKES: LruHashMap<GoroutineKey, GoCall> = LruHashMap::with_max_entries(16384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessPointer {
    pub tgid: u32,
    pub _pad: u32,
    pub ptr: u64,
}

/// The goroutine (id) that asked for each `*http.Request` to be sent.
#[map]
static REQUEST_CALLERS: LruHashMap<ProcessPointer, u64> = LruHashMap::with_max_entries(16384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoroutineId {
    pub tgid: u32,
    pub _pad: u32,
    pub goid: u64,
}

/// Goroutines writing a request on another's behalf: writer -> asker.
#[map]
static WRITING_FOR: LruHashMap<GoroutineId, u64> = LruHashMap::with_max_entries(16384, 0);

/// A Go read or write system call about to happen on this thread: which
/// goroutine (acting, see `acting_goroutine`) makes it, on which descriptor.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoThreadIo {
    pub goroutine: u64,
    pub fd: i64,
    pub direction: u8,
    /// A socket event took it.
    pub used: u8,
    pub _pad: [u8; 6],
}

/// Keyed by pid_tgid; taken by the socket tracepoint of that very call.
#[map]
pub static GO_THREAD_IO: LruHashMap<u64, GoThreadIo> = LruHashMap::with_max_entries(16384, 0);

/// Non-zero once any Go system call was noted: until then the socket
/// tracepoints skip the lookup.
#[map]
pub static GO_ACTIVE: aya_ebpf::maps::Array<u32> = aya_ebpf::maps::Array::with_max_entries(1, 0);

pub(super) struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub g: u64,
}

#[inline(always)]
pub(super) fn regs(ctx: &ProbeContext) -> Regs {
    let r = unsafe { &*ctx.regs };
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        g: r.r14,
    }
}

/// The current process, if it is a Go process being traced, with its offsets.
#[inline(always)]
pub(super) fn go_process() -> Option<(u32, GoProcess)> {
    if do_nothing() {
        return None;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == SELF_TGID.load() || !feature_enabled(FEATURE_TLS) || !process_traced(tgid) {
        return None;
    }
    if let Some(p) = unsafe { GO_PROCESSES.get(&tgid) } {
        return Some((tgid, *p));
    }
    match executable()
        .and_then(|key| unsafe { GO_BINARIES.get(&key) })
        .copied()
    {
        Some(p) => {
            let _ = GO_PROCESSES.insert(&tgid, &p, 0);
            Some((tgid, p))
        }
        None => {
            count(kernel_counter::GO_NO_OFFSETS);
            None
        }
    }
}

/// The file the current process runs (`mm->exe_file`).
#[inline(always)]
fn executable() -> Option<GoBinaryKey> {
    let off = OFFSETS.load();
    let task = unsafe { bpf_get_current_task() };
    let mm: u64 = read_kernel(task, off.task_mm).ok()?;
    let file: u64 = read_kernel(mm, off.mm_exe_file).ok()?;
    let inode: u64 = read_kernel(file, off.file_inode).ok()?;
    let ino: u64 = read_kernel(inode, off.inode_ino).ok()?;
    let sb: u64 = read_kernel(inode, off.inode_sb).ok()?;
    let dev: u32 = read_kernel(sb, off.sb_dev).ok()?;
    Some(GoBinaryKey { dev, _pad: 0, ino })
}

#[inline(always)]
pub(super) fn user<T>(addr: u64) -> Option<T> {
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

#[inline(always)]
pub(super) fn goid(g: u64, go: &GoProcess) -> u64 {
    user::<u64>(g + go.g_goid as u64).unwrap_or(0)
}

/// The kernel socket behind a `*tls.Conn`: its `net.Conn` must be a
/// `*net.TCPConn` (or anything starting with a `net.conn`), whose
/// descriptor is looked up in the process's file table.
#[inline(always)]
fn conn_socket(conn: u64, go: &GoProcess) -> Option<u64> {
    // The interface's data word: a *net.TCPConn, which starts with net.conn.
    let tcp_conn: u64 = user(conn + go.tls_conn_conn as u64 + 8)?;
    let net_fd: u64 = user(tcp_conn + go.net_conn_fd as u64)?;
    if net_fd == 0 {
        return None;
    }
    let fd: i64 = user(net_fd + go.netfd_pfd as u64 + go.pfd_sysfd as u64)?;
    fd_socket(fd, &OFFSETS.load())
}

/// The `struct sock *` of descriptor `fd` in the current process.
#[inline(always)]
fn fd_socket(fd: i64, off: &KernelOffsets) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task, off.task_files).ok()?;
    let fdt: u64 = read_kernel(files, off.files_fdt).ok()?;
    let max_fds: u32 = read_kernel(fdt, off.fdtable_max_fds).ok()?;
    if fd as u64 >= max_fds as u64 {
        return None;
    }
    let fd_array: u64 = read_kernel(fdt, off.fdtable_fd).ok()?;
    let file: u64 = read_kernel(fd_array + (fd as u64) * 8, 0).ok()?;
    if file == 0 {
        return None;
    }
    let socket: u64 = read_kernel(file, off.file_private_data).ok()?;
    if socket == 0 {
        return None;
    }
    let sk: u64 = read_kernel(socket, off.socket_sk).ok()?;
    if sk == 0 || tcp_family(sk, off).is_none() {
        return None;
    }
    Some(sk)
}

/// The goroutine a call stands for: the one that asked for the request the
/// current goroutine is writing, else itself.
#[inline(always)]
fn acting_goroutine(tgid: u32, goid: u64) -> u64 {
    let key = GoroutineId {
        tgid,
        _pad: 0,
        goid,
    };
    match unsafe { WRITING_FOR.get(&key) } {
        Some(asker) => *asker,
        None => goid,
    }
}

/// Sends `len` plaintext bytes at `buf`, read or written on `conn`.
#[inline(always)]
fn emit(
    tgid: u32,
    go: &GoProcess,
    g: u64,
    conn: u64,
    buf_ptr: u64,
    len: u64,
    dir: u8,
    start_ns: u64,
) {
    if len == 0 || len > u32::MAX as u64 {
        return;
    }
    let Some(sock) = conn_socket(conn, go) else {
        count(kernel_counter::GO_NO_SOCKET);
        return;
    };
    let goroutine = acting_goroutine(tgid, goid(g, go));
    emit_on_socket(tgid, goroutine, sock, buf_ptr, len, dir, start_ns);
}

/// Sends `len` plaintext bytes at `buf`, read or written on `sock` by
/// `goroutine` (acting).
#[inline(always)]
fn emit_on_socket(tgid: u32, goroutine: u64, sock: u64, buf_ptr: u64, len: u64, dir: u8, start_ns: u64) {
    if len == 0 || len > u32::MAX as u64 {
        return;
    }
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let buf = unsafe { &mut *buf };
    start_data_event(
        buf,
        tgid,
        goroutine as u32,
        sock,
        dir,
        source::TLS,
        len as u32,
    );
    buf.event.flags = data_flags::GOROUTINE;
    buf.event.syscall = tls_library::GO;
    if start_ns != 0 {
        buf.event.call_start_ns = start_ns;
    }
    let off = OFFSETS.load();
    let Some((_, portpair)) = read_socket(sock, &off, &mut buf.event.tuple) else {
        return;
    };
    buf.event.tuple.protocol = periscope_ebpf::IPPROTO_TCP;
    if !ports_traced(buf.event.tuple.src_port, buf.event.tuple.dst_port) {
        return;
    }
    let marks = super::filter::sock_marks(sock, portpair);
    let (head, tail) = copy_flat_call(buf, buf_ptr, len as u32, payload_cap(marks));
    finish_data_event(buf, head, tail, probe::TLS_DATA);
    widen_on_http2_preface(buf, sock, portpair, marks);
}

/// Remembers the call the current goroutine entered: its `*tls.Conn` (RAX)
/// and `buf`, from now.
#[inline(always)]
fn begin_call(calls: &LruHashMap<GoroutineKey, GoCall>, ctx: &ProbeContext, buf: u64) -> u32 {
    let Some((tgid, _)) = go_process() else {
        return 0;
    };
    let r = regs(ctx);
    let call = GoCall {
        conn: r.rax,
        buf,
        start_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = calls.insert(
        &GoroutineKey {
            tgid,
            _pad: 0,
            g: r.g,
        },
        &call,
        0,
    );
    0
}

/// The call the current goroutine is ending, forgotten; with its process,
/// offsets and registers.
#[inline(always)]
fn end_call(
    calls: &LruHashMap<GoroutineKey, GoCall>,
    ctx: &ProbeContext,
) -> Option<(u32, GoProcess, Regs, GoCall)> {
    let (tgid, go) = go_process()?;
    let r = regs(ctx);
    let key = GoroutineKey {
        tgid,
        _pad: 0,
        g: r.g,
    };
    let call = (unsafe { calls.get(&key) }).copied()?;
    let _ = calls.remove(&key);
    Some((tgid, go, r, call))
}

/// `func (c *Conn) Write(b []byte) (int, error)`: the bytes are sent as they
/// are passed (a failed write is rare, and its connection ends).
#[uprobe]
pub fn go_tls_write(ctx: ProbeContext) -> u32 {
    let Some((tgid, go)) = go_process() else {
        return 0;
    };
    let r = regs(&ctx);
    emit(tgid, &go, r.g, r.rax, r.rbx, r.rcx, direction::EGRESS, 0);
    0
}

/// `(*Conn).Read` at its one call to `runtime.memmove(to, from, n)`: the
/// record's plaintext being copied out to the caller, `n` bytes at `from`.
/// A direct call is emulated by the kernel where a `RET` would be
/// single-stepped, so this site is preferred to the returns.
#[uprobe]
pub fn go_tls_read_copy(ctx: ProbeContext) -> u32 {
    let Some((tgid, go, r, call)) = end_call(&GO_READS, &ctx) else {
        read_copy_without_entry(&ctx);
        return 0;
    };
    emit(
        tgid,
        &go,
        r.g,
        call.conn,
        r.rbx,
        r.rcx,
        direction::INGRESS,
        call.start_ns,
    );
    0
}

/// A Read entered before its probe was attached (a connection's reader
/// blocked in Read while Periscope started): its `*tls.Conn` is unknown,
/// but the read system call that brought the record in was this very
/// goroutine's, on this thread, and named its descriptor. Anything else
/// (the goroutine moved threads since) sends nothing.
#[inline(always)]
fn read_copy_without_entry(ctx: &ProbeContext) {
    let Some((tgid, go)) = go_process() else {
        return;
    };
    let r = regs(ctx);
    let goroutine = acting_goroutine(tgid, goid(r.g, &go));
    let Some(io) = (unsafe { GO_THREAD_IO.get(&bpf_get_current_pid_tgid()) }).copied() else {
        return;
    };
    if io.goroutine != goroutine || io.direction != direction::INGRESS {
        return;
    }
    let Some(sock) = fd_socket(io.fd, &OFFSETS.load()) else {
        return;
    };
    emit_on_socket(tgid, goroutine, sock, r.rbx, r.rcx, direction::INGRESS, 0);
}

/// `func (c *Conn) Read(b []byte) (int, error)`, entry.
#[uprobe]
pub fn go_tls_read(ctx: ProbeContext) -> u32 {
    let buf = regs(&ctx).rbx;
    begin_call(&GO_READS, &ctx, buf)
}

/// `(*Conn).Read` at one of its RET instructions: RAX is the count read.
#[uprobe]
pub fn go_tls_read_ret(ctx: ProbeContext) -> u32 {
    let Some((tgid, go, r, call)) = end_call(&GO_READS, &ctx) else {
        return 0;
    };
    emit(
        tgid,
        &go,
        r.g,
        call.conn,
        call.buf,
        r.rax,
        direction::INGRESS,
        call.start_ns,
    );
    0
}

/// `(*Conn).clientHandshake` / `serverHandshake(ctx)`, entry: only called for
/// a handshake that really happens (unlike `handshakeContext`, which every
/// Read and Write passes through).
#[uprobe]
pub fn go_tls_handshake(ctx: ProbeContext) -> u32 {
    begin_call(&GO_HANDSHAKES, &ctx, 0)
}

/// The handshake function at a RET: RAX is the error's type word, 0 for nil.
#[uprobe]
pub fn go_tls_handshake_ret(ctx: ProbeContext) -> u32 {
    let Some((tgid, go, r, call)) = end_call(&GO_HANDSHAKES, &ctx) else {
        return 0;
    };
    let sock = conn_socket(call.conn, &go).unwrap_or(0);
    let now = unsafe { bpf_ktime_get_ns() };
    // RAX: the error's type word, 0 for nil.
    let result = if r.rax == 0 { handshake_result::DONE } else { handshake_result::FAILED };
    super::tls::send_handshake(tgid, sock, call.start_ns, now, tls_library::GO, result);
    0
}

/// `func (t *Transport) roundTrip(req *Request) (*Response, error)`: the
/// calling goroutine asks for `req`.
#[uprobe]
pub fn go_http_round_trip(ctx: ProbeContext) -> u32 {
    let Some((tgid, go)) = go_process() else {
        return 0;
    };
    let r = regs(&ctx);
    let asker = goid(r.g, &go);
    let _ = REQUEST_CALLERS.insert(
        &ProcessPointer {
            tgid,
            _pad: 0,
            ptr: r.rbx,
        },
        &asker,
        0,
    );
    0
}

/// A goroutine starts writing the request in `req`: until its next request,
/// it writes for the goroutine that asked (or for itself).
#[inline(always)]
fn writing_request(req: u64, g: u64) -> u32 {
    let Some((tgid, go)) = go_process() else {
        return 0;
    };
    let writer = GoroutineId {
        tgid,
        _pad: 0,
        goid: goid(g, &go),
    };
    match unsafe {
        REQUEST_CALLERS.get(&ProcessPointer {
            tgid,
            _pad: 0,
            ptr: req,
        })
    } {
        Some(asker) => {
            let _ = WRITING_FOR.insert(&writer, asker, 0);
        }
        None => {
            let _ = WRITING_FOR.remove(&writer);
        }
    }
    0
}

/// `func (r *Request) write(w io.Writer, ...)` (HTTP/1, in the connection's
/// write goroutine).
#[uprobe]
pub fn go_http1_write_request(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    writing_request(r.rax, r.g)
}

/// `func (cs *http2clientStream) doRequest(req *Request, ...)`: the goroutine
/// that writes one HTTP/2 request.
#[uprobe]
pub fn go_http2_write_request(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    writing_request(r.rbx, r.g)
}

/// `syscall.read(fd int, p []byte)` / `syscall.write`, entry: the next
/// system call on this thread is this goroutine's (a goroutine stays on its
/// thread from here into the system call), so plain sockets' events name
/// the goroutine too.
#[inline(always)]
fn go_syscall(ctx: &ProbeContext, direction: u8) -> u32 {
    let Some((tgid, go)) = go_process() else {
        return 0;
    };
    let r = regs(ctx);
    let io = GoThreadIo {
        goroutine: acting_goroutine(tgid, goid(r.g, &go)),
        fd: r.rax as i64,
        direction,
        used: 0,
        _pad: [0; 6],
    };
    let _ = GO_THREAD_IO.insert(&bpf_get_current_pid_tgid(), &io, 0);
    if let Some(active) = GO_ACTIVE.get_ptr_mut(0)
        && unsafe { *active } == 0
    {
        unsafe { *active = 1 };
    }
    0
}

#[uprobe]
pub fn go_syscall_read(ctx: ProbeContext) -> u32 {
    go_syscall(&ctx, direction::INGRESS)
}

#[uprobe]
pub fn go_syscall_write(ctx: ProbeContext) -> u32 {
    go_syscall(&ctx, direction::EGRESS)
}

/// Marks a socket data event with the goroutine that made its system call,
/// when a Go `syscall.read`/`write` on this thread announced exactly this
/// call (same descriptor, same direction).
#[inline(always)]
pub(super) fn tag_goroutine(event: &mut periscope_ebpf::DataEvent, pid_tgid: u64) {
    if GO_ACTIVE.get(0).copied().unwrap_or(0) == 0 {
        return;
    }
    let Some(entry) = GO_THREAD_IO.get_ptr_mut(&pid_tgid) else {
        return;
    };
    // Kept (marked used, not removed): a crypto/tls Read entered before its
    // probe was attached finds its descriptor here.
    let io = unsafe { *entry };
    if io.used != 0 {
        return;
    }
    unsafe { (*entry).used = 1 };
    if io.fd == event.fd as i64 && io.direction == event.direction {
        event.tid = io.goroutine as u32;
        event.flags |= data_flags::GOROUTINE;
    }
}
