//! Event types shared by the kernel programs and the daemon.
//!
//! Every record in the ring buffer starts with an [`EventHeader`]; its `kind`
//! says which struct follows. All structs are `#[repr(C)]`, 8-byte aligned,
//! and contain no pointers the daemon would dereference.
#![no_std]

/// Largest payload prefix one data event can carry. The runtime cap
/// (`PAYLOAD_CAP` global) is at most this.
pub const MAX_PAYLOAD: usize = 8192;
/// Default runtime cap on copied payload bytes per socket call.
pub const DEFAULT_PAYLOAD_CAP: u32 = 4096;
/// The cap on sockets the daemon marked `sock_mark::WIDE` (HTTP/2: one call
/// holds many frames, and a frame header beyond the capture loses the
/// stream's framing and its HPACK state).
pub const WIDE_PAYLOAD_CAP: u32 = MAX_PAYLOAD as u32;

/// What the daemon asked of a socket (the high half of an `IGNORED_SOCKS`
/// value; the low half is the socket's port pair).
pub mod sock_mark {
    /// Its socket-level payloads are not copied (not parsed, or TLS past
    /// its handshake).
    pub const IGNORE: u32 = 1;
    /// Its payloads (socket or TLS plaintext) are copied up to `WIDE_PAYLOAD_CAP`.
    pub const WIDE: u32 = 2;
}
/// At most this many iovecs are copied from for readv/writev/sendmsg/recvmsg.
pub const MAX_IOVECS: usize = 64;
/// When a call moves more bytes than the cap, its last `TAIL_CAPTURE` bytes
/// are copied too (after the head): message ends (a chunked body's `0\r\n\r\n`)
/// sit at the end of a call, beyond a head-only capture.
pub const TAIL_CAPTURE: u32 = 64;

pub mod kind {
    pub const DATA: u8 = 1;
    pub const CONNECT: u8 = 2;
    pub const ACCEPT: u8 = 3;
    pub const CLOSE: u8 = 4;
    pub const PROCESS_EXIT: u8 = 5;
    pub const PROCESS_EXEC: u8 = 6;
    pub const TLS_HANDSHAKE: u8 = 7;
    pub const MMAP_EXEC: u8 = 8;
    pub const GETADDRINFO: u8 = 9;
    pub const GRPC_HEADERS: u8 = 10;
    pub const PROCESS_FORK: u8 = 11;
    pub const RESET: u8 = 12;
}

/// Direction of a data event, seen from the traced process.
pub mod direction {
    /// The process sent these bytes.
    pub const EGRESS: u8 = 0;
    /// The process received these bytes.
    pub const INGRESS: u8 = 1;
}

/// Flags of a data event.
pub mod data_flags {
    /// An earlier data event of this socket could not be written (the ring
    /// was full): the daemon's view of the byte stream has a hole.
    pub const LOST_BEFORE: u8 = 1;
    /// An earlier data event of this thread could not be written: what the
    /// daemon thinks the thread is serving may be stale.
    pub const THREAD_LOST_BEFORE: u8 = 2;
    /// `tid` is a Go goroutine id (its low 32 bits), not a thread: Go moves
    /// goroutines between threads, so requests are followed by goroutine.
    pub const GOROUTINE: u8 = 4;
}

/// Which system call family carried a data event (decides how its user
/// buffer was found).
pub mod syscall {
    pub const OTHER: u8 = 0;
    pub const READ_WRITE: u8 = 1;
    pub const SEND_RECV: u8 = 2;
    pub const VECTORED: u8 = 3;
    pub const MSG: u8 = 4;
    pub const SENDFILE: u8 = 5;
}

/// Where the payload bytes came from.
pub mod source {
    /// Socket system calls (what the kernel sends or received).
    pub const SOCKET: u8 = 0;
    /// Plaintext inside a TLS library.
    pub const TLS: u8 = 1;
}

/// Index of each program that emits events into the loss counters
/// (`LOST_EVENTS`, a per-CPU array indexed by these).
pub mod probe {
    pub const SOCK_SEND: u32 = 0;
    pub const SOCK_RECV: u32 = 1;
    pub const STATE_CHANGE: u32 = 2;
    pub const DESTROY_SOCK: u32 = 3;
    pub const PROCESS_EXIT: u32 = 4;
    pub const PROCESS_EXEC: u32 = 5;
    pub const TLS_DATA: u32 = 6;
    pub const TLS_HANDSHAKE: u32 = 7;
    pub const MMAP_EXEC: u32 = 8;
    pub const GETADDRINFO: u32 = 9;
    pub const GRPC_HEADERS: u32 = 10;
    pub const PROCESS_FORK: u32 = 11;
    pub const COUNT: u32 = 12;
    pub const NAMES: [&str; COUNT as usize] = [
        "sock_send_length",
        "sock_recv_length",
        "inet_sock_set_state",
        "tcp_destroy_sock",
        "sched_process_exit",
        "sched_process_exec",
        "tls_read_write",
        "tls_handshake",
        "sys_enter_mmap",
        "getaddrinfo",
        "grpc_go_headers",
        "sched_process_fork",
    ];
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u8,
    pub _pad: [u8; 3],
    /// Process id (thread group id) the event belongs to; 0 when unknown
    /// (events raised in softirq context).
    pub tgid: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the event happened.
    pub ts_ns: u64,
}

pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;
/// UDP sockets are only traced when connected to this port (DNS clients).
pub const DNS_PORT: u16 = 53;

/// A TCP connection's (or a DNS UDP socket's) addresses as the kernel socket sees them: `src` is the
/// local end. Ports in host byte order; addresses in network byte order
/// (IPv4 in the first 4 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub family: u16,
    pub src_port: u16,
    pub dst_port: u16,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub protocol: u16,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// One send or receive on a TCP socket. The payload's first
/// `captured_len` bytes follow the struct in the ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DataEvent {
    pub header: EventHeader,
    /// Kernel `struct sock *`, the connection's identity while it lives.
    pub sock: u64,
    pub tid: u32,
    pub fd: i32,
    /// Bytes the call transferred (may exceed `captured_len`).
    pub total_len: u32,
    /// Bytes that follow the struct: the call's first bytes, then its last
    /// `tail_len` bytes (positions `total_len - tail_len..total_len`).
    pub captured_len: u32,
    pub direction: u8,
    pub syscall: u8,
    pub source: u8,
    /// `data_flags::*`.
    pub flags: u8,
    pub tail_len: u16,
    pub _pad2: u16,
    pub tuple: SockTuple,
    /// When the call began, if known (TLS library calls), else `header.ts_ns`.
    pub call_start_ns: u64,
}

/// A [`DataEvent`] with room for its payload; the kernel side builds it in a
/// per-CPU scratch buffer and outputs only the used prefix. The buffer is
/// twice `MAX_PAYLOAD` so that bounded offsets keep the verifier content.
#[repr(C)]
pub struct DataEventBuf {
    pub event: DataEvent,
    pub payload: [u8; MAX_PAYLOAD * 2],
}

/// An outgoing connection reached ESTABLISHED (or failed in SYN_SENT).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    /// `ts_ns` is when the connection was established (or failed).
    pub header: EventHeader,
    pub sock: u64,
    /// When the SYN was sent.
    pub syn_sent_ns: u64,
    /// 0 when established, 1 when the connect failed.
    pub failed: u8,
    pub _pad: [u8; 3],
    /// A failed connect's `sk_err` at the failure: ECONNREFUSED (a RST to
    /// the SYN), ETIMEDOUT (SYN retries exhausted), EHOSTUNREACH...; 0 when
    /// the program closed the socket before an answer (its own timeout).
    pub error: i32,
    /// The thread that called connect().
    pub tid: u32,
    pub _pad2: u32,
    pub tuple: SockTuple,
}

/// An established connection ended with an error the peer caused (a RST
/// received: `error` ECONNRESET), seen by the process owning `sock`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ResetEvent {
    /// `tgid` is 0 (raised in softirq): the connection's owner is known.
    pub header: EventHeader,
    pub sock: u64,
    pub error: i32,
    pub _pad: u32,
}

/// A passively opened connection reached ESTABLISHED (server side).
/// Raised in softirq context: `tgid` is 0, the owner is learned from the
/// first data event on `sock`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AcceptEvent {
    pub header: EventHeader,
    pub sock: u64,
    pub tuple: SockTuple,
}

/// A TCP socket was destroyed (`tcp:tcp_destroy_sock`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CloseEvent {
    pub header: EventHeader,
    pub sock: u64,
    pub tuple: SockTuple,
}

/// The last thread of a process exited.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessExitEvent {
    pub header: EventHeader,
}

/// A process forked a new process (not a thread): until it execs, the child
/// runs its parent's program (a forking server's per-connection child).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessForkEvent {
    /// `tgid` is the parent's.
    pub header: EventHeader,
    pub child_tgid: u32,
    pub _pad: u32,
}

pub const EXEC_FILENAME_MAX: usize = 256;
pub const EXEC_NAME_MAX: usize = 64;
pub const EXEC_ENV_MAX: usize = 2048;

/// A process started a new program. Carries what the daemon needs to
/// describe the process even if it exits before /proc is read.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessExecEvent {
    pub header: EventHeader,
    pub comm: [u8; 16],
    /// File name of the executable actually opened (symlinks resolved),
    /// NUL-terminated.
    pub exe_name: [u8; EXEC_NAME_MAX],
    /// The path as given to execve, NUL-terminated.
    pub filename: [u8; EXEC_FILENAME_MAX],
    /// Bytes of `env` that hold the start of the environment block.
    pub env_len: u32,
    pub _pad: u32,
    pub env: [u8; EXEC_ENV_MAX],
}

/// Events the kernel programs chose not to send, counted in the
/// `KERNEL_COUNTERS` per-CPU array (index: these).
pub mod kernel_counter {
    /// TLS library calls that touched no socket and could not be tied to one
    /// (in-memory TLS): not network traffic the daemon could place.
    pub const TLS_UNLINKED: u32 = 0;
    /// Go crypto/tls calls in a process whose offsets the daemon has not
    /// set (yet): nothing could be read.
    pub const GO_NO_OFFSETS: u32 = 1;
    /// Go crypto/tls calls whose connection did not lead to a TCP socket
    /// (a net.Conn that is not a *net.TCPConn, or a closed descriptor).
    pub const GO_NO_SOCKET: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Which TLS library a uprobe event came from.
pub mod tls_library {
    pub const OPENSSL: u8 = 1;
    pub const GNUTLS: u8 = 2;
    pub const GO: u8 = 3;
}

/// What the Go uprobes read in one Go executable (struct field offsets for
/// its Go version, from its DWARF or the checked-in table), set by the daemon
/// in the `GO_BINARIES` map when it hooks the file.
/// An executable file as the kernel names it: its superblock's `s_dev`
/// (`MKDEV(major, minor)` = major << 20 | minor) and inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GoBinaryKey {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoProcess {
    /// `runtime.g.goid`
    pub g_goid: u32,
    /// `crypto/tls.Conn.conn`, a `net.Conn` interface (itab, data).
    pub tls_conn_conn: u32,
    /// `net.conn.fd` (`*net.TCPConn` embeds `net.conn` at offset 0).
    pub net_conn_fd: u32,
    /// `net.netFD.pfd`
    pub netfd_pfd: u32,
    /// `internal/poll.FD.Sysfd`
    pub pfd_sysfd: u32,
    /// grpc-go's probes, 0 when not hooked: which register holds the
    /// `*http2.MetaHeadersFrame` of `(*http2Server).operateHeaders`
    /// ([`grpc_frame_arg`]).
    pub grpc_server_frame_arg: u32,
    /// `http2.MetaHeadersFrame.HeadersFrame` (a pointer)
    pub meta_headers_frame: u32,
    /// `http2.MetaHeadersFrame.Fields` (a `[]hpack.HeaderField`)
    pub meta_fields: u32,
    /// `http2.HeadersFrame.FrameHeader` + `http2.FrameHeader.StreamID`
    pub headers_stream_id: u32,
    /// `hpack.HeaderField.Value` (`Name` is at 0)
    pub header_field_value: u32,
    /// Size of one `hpack.HeaderField` in a slice.
    pub header_field_size: u32,
}

/// Where grpc-go's server `operateHeaders` takes its frame argument.
pub mod grpc_frame_arg {
    /// Second argument after the receiver (grpc-go < 1.60).
    pub const RBX: u32 = 1;
    /// After a `context.Context` (two words, grpc-go >= 1.60).
    pub const RDI: u32 = 2;
}

/// Header fields kept per grpc-go header block, and their caps.
pub const GRPC_FIELDS: usize = 6;
pub const GRPC_NAME_CAP: usize = 16;
pub const GRPC_VALUE_CAP: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GrpcField {
    /// Length of the name (at most [`GRPC_NAME_CAP`]).
    pub name_len: u8,
    pub _pad: u8,
    /// Length of the value in the program; only the first
    /// [`GRPC_VALUE_CAP`] bytes are in `value`.
    pub value_len: u16,
    pub _pad2: u32,
    pub name: [u8; GRPC_NAME_CAP],
    pub value: [u8; GRPC_VALUE_CAP],
}

/// One HTTP/2 header block as grpc-go itself holds it, decoded: written
/// (`(*loopyWriter).writeHeader`, before its bytes go out) or read
/// (`operateHeaders`, after its bytes came in), by one goroutine.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GrpcHeadersEvent {
    pub header: EventHeader,
    /// The goroutine (id) that writes or read the block.
    pub goroutine: u64,
    pub stream_id: u32,
    /// `direction::EGRESS` (written) or `direction::INGRESS` (read).
    pub direction: u8,
    pub end_stream: u8,
    /// Entries of `fields` filled: the pseudo-headers, `content-type`
    /// and `grpc-status` among the block's first fields.
    pub count: u8,
    pub _pad: u8,
    pub fields: [GrpcField; GRPC_FIELDS],
}

/// A TLS handshake completed (the call to SSL_do_handshake or
/// gnutls_handshake that succeeded).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TlsHandshakeEvent {
    /// `ts_ns` is when the handshake completed.
    pub header: EventHeader,
    /// The connection's socket; 0 when it could not be linked.
    pub sock: u64,
    /// When the first handshake call for this TLS session started.
    pub start_ns: u64,
    pub library: u8,
    /// [`handshake_result`].
    pub result: u8,
    pub _pad: [u8; 6],
    pub tuple: SockTuple,
}

/// How a handshake call ended.
pub mod handshake_result {
    /// The handshake completed.
    pub const DONE: u8 = 0;
    /// The call returned without completing: call again (non-blocking) or
    /// failure, which only the library knows (OpenSSL's `<= 0`).
    pub const NOT_DONE: u8 = 1;
    /// The library said it failed (GnuTLS fatal error, Go's error).
    pub const FAILED: u8 = 2;
}

/// A process mapped a file executable (a library being loaded, possibly by
/// dlopen): its maps are worth scanning for TLS libraries.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MmapExecEvent {
    pub header: EventHeader,
}

/// Offsets of the `prot` and `fd` fields in the `syscalls:sys_enter_mmap`
/// tracepoint record, from its format file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmapTracepointOffsets {
    pub prot: u32,
    pub fd: u32,
}

/// Kernel struct field offsets (bytes) the programs need, read by the daemon
/// from the running kernel's BTF and written into the `OFFSETS` global before
/// load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub sk_protocol: u32,
    pub pt_regs_di: u32,
    pub pt_regs_si: u32,
    pub pt_regs_dx: u32,
    pub pt_regs_orig_ax: u32,
    pub binprm_file: u32,
    pub binprm_filename: u32,
    /// file.f_path.dentry
    pub file_dentry: u32,
    /// dentry.d_name.name
    pub dentry_name: u32,
    pub task_mm: u32,
    pub mm_env_start: u32,
    pub mm_env_end: u32,
    /// task_struct.files, files_struct.fdt, fdtable.fd, fdtable.max_fds,
    /// file.private_data, socket.sk: from a file descriptor to its socket.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// mm_struct.exe_file, file.f_inode, inode.i_ino, inode.i_sb,
    /// super_block.s_dev: which executable file a process runs.
    pub mm_exe_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `sock.sk_err`
    pub sk_err: u32,
    /// Non-zero when `sock_common` starts with daddr, rcv_saddr, hash,
    /// dport, num, family back to back (as on x86_64 since 2.6): the
    /// programs then read all of them with one copy.
    pub sock_common_packed: u32,
    /// Non-zero when pt_regs holds dx, si, di, orig_ax back to back (x86_64):
    /// the system call number and first three arguments take one copy.
    pub pt_regs_packed: u32,
}

/// Runtime control, shared with the daemon through the `CONTROL` array map
/// (index `control::FEATURES_DISABLED` and `control::FILTERS`) and the
/// filter hash maps.
pub mod control {
    /// Index of the disabled-features bitmask in `CONTROL`.
    pub const FEATURES_DISABLED: u32 = 0;
    /// Index of the active-filters bitmask in `CONTROL`.
    pub const FILTERS: u32 = 1;
    pub const CONTROL_LEN: u32 = 2;

    /// Socket-level payload capture (plain HTTP).
    pub const FEATURE_HTTP: u32 = 1 << 0;
    /// TLS plaintext uprobes.
    pub const FEATURE_TLS: u32 = 1 << 1;
    /// DNS: UDP port 53 payloads and the getaddrinfo uprobes.
    pub const FEATURE_DNS: u32 = 1 << 2;

    /// `PID_FILTER` has entries (include or exclude).
    pub const FILTER_PIDS: u32 = 1 << 0;
    /// Only pids marked `INCLUDE` in `PID_FILTER` are traced.
    pub const FILTER_PIDS_INCLUDE_ONLY: u32 = 1 << 1;
    /// `PORT_FILTER` has entries.
    pub const FILTER_PORTS: u32 = 1 << 2;
    /// Only connections with a port marked `INCLUDE` are traced.
    pub const FILTER_PORTS_INCLUDE_ONLY: u32 = 1 << 3;
    /// Only processes in a cgroup listed in `CGROUP_FILTER` are traced.
    pub const FILTER_CGROUPS_INCLUDE_ONLY: u32 = 1 << 4;

    pub const INCLUDE: u8 = 1;
    pub const EXCLUDE: u8 = 2;
}

/// x86_64 system call numbers the socket probes recognise.
pub mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const SENDFILE: u64 = 40;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    pub const SENDMMSG: u64 = 307;
}

pub const GAI_NAME_MAX: usize = 256;
pub const GAI_MAX_ADDRS: usize = 8;

/// A call to libc's `getaddrinfo` returned. `header.ts_ns` is the return.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GetaddrinfoEvent {
    pub header: EventHeader,
    pub start_ns: u64,
    pub tid: u32,
    /// getaddrinfo's return value (0 or an EAI_* code).
    pub ret: i32,
    /// Entries of `addrs`/`families` filled (from the result list, in order,
    /// duplicates included).
    pub n_addrs: u32,
    /// Bytes of `name` (the node argument) that hold the name, without NUL.
    pub name_len: u32,
    /// AF_INET (address in the first 4 bytes) or AF_INET6.
    pub families: [u16; GAI_MAX_ADDRS],
    pub addrs: [[u8; 16]; GAI_MAX_ADDRS],
    pub name: [u8; GAI_NAME_MAX],
}
