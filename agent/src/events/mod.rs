//! Decoding ring-buffer records into typed events. Records come from our own
//! kernel programs, but are still checked: a short or unknown record is an
//! error value, never a panic.

use periscope_ebpf::{
    AcceptEvent, CloseEvent, ConnectEvent, DataEvent, EventHeader, GRPC_FIELDS, GRPC_NAME_CAP, GRPC_VALUE_CAP,
    GetaddrinfoEvent, GrpcField, GrpcHeadersEvent, MmapExecEvent, ProcessExecEvent, ProcessExitEvent, ProcessForkEvent, ResetEvent, TlsHandshakeEvent,
    kind,
};

pub enum Event<'a> {
    /// `payload` is the call's first bytes; `tail` its last bytes (empty
    /// when `payload` holds the whole call or no tail was captured).
    Data { event: DataEvent, payload: &'a [u8], tail: &'a [u8] },
    Connect(ConnectEvent),
    Accept(AcceptEvent),
    Close(CloseEvent),
    ProcessExit(ProcessExitEvent),
    ProcessExec(Box<ProcessExecEvent>),
    TlsHandshake(TlsHandshakeEvent),
    MmapExec(MmapExecEvent),
    Getaddrinfo(Box<GetaddrinfoEvent>),
    GrpcHeaders(GrpcHeaders<'a>),
    ProcessFork(ProcessForkEvent),
    Reset(ResetEvent),
}

/// A header block grpc-go decoded (see [`GrpcHeadersEvent`]), borrowed
/// from the record.
pub struct GrpcHeaders<'a> {
    pub header: EventHeader,
    pub goroutine: u64,
    pub stream_id: u32,
    pub egress: bool,
    /// (name, value); a value longer than the kernel copies is left out
    /// (never a cut value).
    pub fields: [(&'a [u8], &'a [u8]); GRPC_FIELDS],
    pub count: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Short { kind: u8, len: usize },
    UnknownKind(u8),
}

fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; the types are plain repr(C) data valid for any bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let header: EventHeader = read(bytes).ok_or(DecodeError::Short { kind: 0, len: bytes.len() })?;
    let short = || DecodeError::Short { kind: header.kind, len: bytes.len() };
    match header.kind {
        kind::DATA => {
            let event: DataEvent = read(bytes).ok_or_else(short)?;
            let payload = &bytes[size_of::<DataEvent>()..];
            let captured = (event.captured_len as usize).min(payload.len()).min(event.total_len as usize);
            let tail_len = event.tail_len as usize;
            let (head, tail) = if tail_len <= captured {
                payload[..captured].split_at(captured - tail_len)
            } else {
                (&payload[..captured], &payload[..0])
            };
            Ok(Event::Data { event, payload: head, tail })
        }
        kind::CONNECT => read(bytes).map(Event::Connect).ok_or_else(short),
        kind::ACCEPT => read(bytes).map(Event::Accept).ok_or_else(short),
        kind::CLOSE => read(bytes).map(Event::Close).ok_or_else(short),
        kind::PROCESS_EXIT => read(bytes).map(Event::ProcessExit).ok_or_else(short),
        kind::PROCESS_EXEC => read(bytes).map(|e| Event::ProcessExec(Box::new(e))).ok_or_else(short),
        kind::TLS_HANDSHAKE => read(bytes).map(Event::TlsHandshake).ok_or_else(short),
        kind::MMAP_EXEC => read(bytes).map(Event::MmapExec).ok_or_else(short),
        kind::GETADDRINFO => read(bytes).map(|e| Event::Getaddrinfo(Box::new(e))).ok_or_else(short),
        kind::GRPC_HEADERS => grpc_headers(header, bytes).ok_or_else(short),
        kind::PROCESS_FORK => read(bytes).map(Event::ProcessFork).ok_or_else(short),
        kind::RESET => read(bytes).map(Event::Reset).ok_or_else(short),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

fn grpc_headers(header: EventHeader, bytes: &[u8]) -> Option<Event<'_>> {
    use std::mem::offset_of;
    if bytes.len() < size_of::<GrpcHeadersEvent>() {
        return None;
    }
    let word = |at: usize, n: usize| bytes[at..at + n].iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
    let goroutine = word(offset_of!(GrpcHeadersEvent, goroutine), 8);
    let stream_id = word(offset_of!(GrpcHeadersEvent, stream_id), 4) as u32;
    let direction = bytes[offset_of!(GrpcHeadersEvent, direction)];
    let count = usize::from(bytes[offset_of!(GrpcHeadersEvent, count)]).min(GRPC_FIELDS);
    let mut fields: [(&[u8], &[u8]); GRPC_FIELDS] = [(&[], &[]); GRPC_FIELDS];
    let first = offset_of!(GrpcHeadersEvent, fields);
    for (i, slot) in fields.iter_mut().enumerate().take(count) {
        let f = &bytes[first + i * size_of::<GrpcField>()..][..size_of::<GrpcField>()];
        let name_len = usize::from(f[offset_of!(GrpcField, name_len)]).min(GRPC_NAME_CAP);
        let value_len = word(first + i * size_of::<GrpcField>() + offset_of!(GrpcField, value_len), 2) as usize;
        if value_len <= GRPC_VALUE_CAP {
            *slot = (
                &f[offset_of!(GrpcField, name)..][..name_len],
                &f[offset_of!(GrpcField, value)..][..value_len],
            );
        }
    }
    Some(Event::GrpcHeaders(GrpcHeaders {
        header,
        goroutine,
        stream_id,
        egress: direction == periscope_ebpf::direction::EGRESS,
        fields,
        count,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use periscope_ebpf::{SockTuple, direction};

    fn data_record(payload: &[u8], captured_len: u32) -> Vec<u8> {
        data_record_with_tail(payload, captured_len, 0)
    }

    fn data_record_with_tail(payload: &[u8], captured_len: u32, tail_len: u16) -> Vec<u8> {
        let ev = DataEvent {
            header: EventHeader { kind: kind::DATA, _pad: [0; 3], tgid: 42, ts_ns: 7 },
            sock: 0xffff_8888,
            tid: 43,
            fd: 5,
            total_len: 100,
            captured_len,
            direction: direction::EGRESS,
            syscall: 1,
            source: 0,
            flags: 0,
            tail_len,
            _pad2: 0,
            tuple: SockTuple::default(),
            call_start_ns: 7,
        };
        let mut out = vec![0u8; size_of::<DataEvent>()];
        unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast::<DataEvent>(), ev) };
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn data_event_with_payload() {
        let rec = data_record(b"GET / HTTP/1.1\r\n", 16);
        match decode(&rec).unwrap() {
            Event::Data { event, payload, tail } => {
                assert_eq!(event.header.tgid, 42);
                assert_eq!(payload, b"GET / HTTP/1.1\r\n");
                assert!(tail.is_empty());
            }
            _ => panic!("unexpected event kind"),
        }
    }

    #[test]
    fn captured_len_beyond_record_is_clamped() {
        let rec = data_record(b"abc", 4000);
        match decode(&rec).unwrap() {
            Event::Data { payload, .. } => assert_eq!(payload, b"abc"),
            _ => panic!("unexpected event kind"),
        }
    }

    #[test]
    fn head_and_tail_are_split() {
        let rec = data_record_with_tail(b"HTTP/1.1 200 OK\r\n0\r\n\r\n", 22, 5);
        match decode(&rec).unwrap() {
            Event::Data { payload, tail, .. } => {
                assert_eq!(payload, b"HTTP/1.1 200 OK\r\n");
                assert_eq!(tail, b"0\r\n\r\n");
            }
            _ => panic!("unexpected event kind"),
        }
        // A tail longer than what was captured is ignored, not trusted.
        let rec = data_record_with_tail(b"abc", 3, 9);
        match decode(&rec).unwrap() {
            Event::Data { payload, tail, .. } => {
                assert_eq!(payload, b"abc");
                assert!(tail.is_empty());
            }
            _ => panic!("unexpected event kind"),
        }
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        assert!(matches!(decode(&[1, 0, 0]), Err(DecodeError::Short { .. })));
        let rec = data_record(b"", 0);
        assert!(matches!(decode(&rec[..20]), Err(DecodeError::Short { kind: kind::DATA, .. })));
        let mut bad = rec.clone();
        bad[0] = 99;
        assert!(matches!(decode(&bad), Err(DecodeError::UnknownKind(99))));
    }
}
