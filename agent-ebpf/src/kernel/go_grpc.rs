//! grpc-go's own view of its HTTP/2 header blocks, decoded.
//!
//! On a connection opened before Periscope started, HPACK entries made
//! earlier are unknown, so a gRPC call's `:path` and `grpc-status` may not
//! be readable from the bytes. grpc-go holds every header block decoded:
//! `(*loopyWriter).writeHeader(streamID, endStream, hf []hpack.HeaderField, ...)`
//! just before it writes one (client requests, server responses and
//! trailers), and `operateHeaders(frame *http2.MetaHeadersFrame)` just after
//! it read one (`frame.Fields`). These uprobes send the few fields spans are
//! made of, with the stream id and the goroutine; the daemon ties the
//! goroutine to the connection it reads or writes.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated},
    macros::{map, uprobe},
    maps::PerCpuArray,
    programs::ProbeContext,
};
use core::ffi::c_void;
use periscope_ebpf::{
    EventHeader, GRPC_FIELDS, GRPC_NAME_CAP, GRPC_VALUE_CAP, GoProcess, GrpcHeadersEvent,
    direction, grpc_frame_arg, kind, probe,
};

use super::bounded;
use super::go_tls::{go_process, goid, regs, user};

#[map]
static GRPC_SCRATCH: PerCpuArray<GrpcHeadersEvent> = PerCpuArray::with_max_entries(1, 0);

/// Fields looked at per block: grpc-go puts the pseudo-headers and
/// `content-type` first, and `grpc-status` first in trailers.
const SCAN_FIELDS: u64 = 10;

/// Names worth sending, by length and first bytes (the daemon matches them
/// exactly): `:method`, `:path`, `:authority`, `:status` (not `:scheme`),
/// `content-type`, `grpc-status`.
#[inline(always)]
fn wanted(name: &[u8; GRPC_NAME_CAP], len: u64) -> bool {
    match (name[0], len) {
        (b':', _) => name[1] != b's' || len == 7 && name[2] == b't',
        (b'c', 12) => true,
        (b'g', 11) => true,
        _ => false,
    }
}

#[inline(always)]
fn read_into(dst: *mut u8, len: u32, src: u64) -> bool {
    unsafe { generated::bpf_probe_read_user(dst as *mut c_void, len, src as *const c_void) == 0 }
}

/// Sends the wanted fields among the first of `count` at `fields`.
#[inline(always)]
fn send_headers(
    tgid: u32,
    go: &GoProcess,
    g: u64,
    stream_id: u32,
    end_stream: bool,
    dir: u8,
    fields: u64,
    count: u64,
) {
    if stream_id == 0 || fields == 0 || go.header_field_size == 0 {
        return;
    }
    let Some(ev) = GRPC_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let ev = unsafe { &mut *ev };
    ev.header = EventHeader {
        kind: kind::GRPC_HEADERS,
        _pad: [0; 3],
        tgid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    ev.goroutine = goid(g, go);
    ev.stream_id = stream_id;
    ev.direction = dir;
    ev.end_stream = end_stream as u8;
    ev._pad = 0;
    let size = go.header_field_size as u64;
    let value_at = go.header_field_value as u64;
    let mut n: usize = 0;
    for i in 0..SCAN_FIELDS {
        if i >= count || n >= GRPC_FIELDS {
            break;
        }
        let field = fields + i * size;
        let (Some(name_ptr), Some(name_len)) = (user::<u64>(field), user::<u64>(field + 8)) else {
            break;
        };
        if name_len < 5 || name_len > GRPC_NAME_CAP as u64 {
            continue;
        }
        let Some(slot) = ev.fields.get_mut(n) else {
            break;
        };
        let name_n = bounded(name_len as u32, GRPC_NAME_CAP as u32);
        if !read_into(slot.name.as_mut_ptr(), name_n, name_ptr) || !wanted(&slot.name, name_len) {
            continue;
        }
        let (Some(value_ptr), Some(value_len)) =
            (user::<u64>(field + value_at), user::<u64>(field + value_at + 8))
        else {
            break;
        };
        let value_n = bounded(value_len.min(GRPC_VALUE_CAP as u64) as u32, GRPC_VALUE_CAP as u32);
        if value_n > 0 && !read_into(slot.value.as_mut_ptr(), value_n, value_ptr) {
            continue;
        }
        slot.name_len = name_n as u8;
        slot.value_len = value_len.min(u16::MAX as u64) as u16;
        n += 1;
    }
    if n == 0 {
        return;
    }
    ev.count = n as u8;
    super::output(ev, probe::GRPC_HEADERS);
}

/// `func (l *loopyWriter) writeHeader(streamID uint32, endStream bool,
/// hf []hpack.HeaderField, onWrite func()) error`, entry.
#[uprobe]
pub fn go_grpc_write_header(ctx: ProbeContext) -> u32 {
    let Some((tgid, go)) = go_process() else {
        return 0;
    };
    let r = regs(&ctx);
    let raw = unsafe { &*ctx.regs };
    send_headers(
        tgid,
        &go,
        r.g,
        r.rbx as u32,
        r.rcx & 0xff != 0,
        direction::EGRESS,
        raw.rdi,
        raw.rsi,
    );
    0
}

/// A `*http2.MetaHeadersFrame` just read: its stream and decoded fields.
#[inline(always)]
fn frame_read(ctx: &ProbeContext, frame_of: impl Fn(&GoProcess) -> u64) -> u32 {
    let Some((tgid, go)) = go_process() else {
        return 0;
    };
    let frame = frame_of(&go);
    if frame == 0 || go.header_field_size == 0 {
        return 0;
    }
    let r = regs(ctx);
    let Some(headers) = user::<u64>(frame + go.meta_headers_frame as u64) else {
        return 0;
    };
    let Some(stream_id) = user::<u32>(headers + go.headers_stream_id as u64) else {
        return 0;
    };
    let fields_at = frame + go.meta_fields as u64;
    let (Some(fields), Some(count)) = (user::<u64>(fields_at), user::<u64>(fields_at + 8)) else {
        return 0;
    };
    send_headers(tgid, &go, r.g, stream_id, false, direction::INGRESS, fields, count);
    0
}

/// `func (t *http2Server) operateHeaders(frame *http2.MetaHeadersFrame, ...)`
/// (grpc-go < 1.60), or `(ctx context.Context, frame, ...)` after.
#[uprobe]
pub fn go_grpc_server_headers(ctx: ProbeContext) -> u32 {
    let raw = unsafe { &*ctx.regs };
    let (rbx, rdi) = (raw.rbx, raw.rdi);
    frame_read(&ctx, |go| match go.grpc_server_frame_arg {
        grpc_frame_arg::RBX => rbx,
        grpc_frame_arg::RDI => rdi,
        _ => 0,
    })
}

/// `func (t *http2Client) operateHeaders(frame *http2.MetaHeadersFrame)`.
#[uprobe]
pub fn go_grpc_client_headers(ctx: ProbeContext) -> u32 {
    let rbx = unsafe { &*ctx.regs }.rbx;
    frame_read(&ctx, |_| rbx)
}
