//! Fuzz the HTTP/1.x parser with arbitrary chunk sequences.
//!
//! Input: one byte whose bits 0..2 pick the limits and the side hint, then
//! records `[flags] [len] [gap] bytes[len]`: bit 0 of flags is the
//! direction, bit 1 closes the connection after the chunk, and `gap` adds
//! that many uncaptured bytes to the chunk. With bit 2 of flags, the record
//! goes on with `[tlen] tail[tlen]`: the captured last bytes of the call,
//! after the gap (bit 3 makes `total_len` too small for them, so they must be
//! ignored).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/protocols/exchange.rs"]
#[allow(dead_code)]
mod exchange;

#[path = "../../src/protocols/http1.rs"]
#[allow(dead_code)]
mod http1;

use http1::{Chunk, Direction, Feed, Http1Connection, Limits, Side};

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let limits = if first & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            max_header_bytes: 64,
            max_pending: 2,
            resync_chunks: 2,
        }
    };
    let mut conn = Http1Connection::new(limits);
    match first >> 1 & 3 {
        1 => conn.set_side_hint(Side::Client),
        2 => conn.set_side_hint(Side::Server),
        _ => {}
    }
    let mut out = Vec::new();
    let mut seen: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut emitted = 0usize;
    let mut ts = 0u64;
    while let [flags, len, gap, more @ ..] = rest {
        let n = usize::from(*len).min(more.len());
        let (bytes, next) = more.split_at(n);
        rest = next;
        let mut tail: &[u8] = &[];
        if flags & 4 != 0
            && let [tlen, more @ ..] = rest
        {
            let t = usize::from(*tlen).min(more.len());
            (tail, rest) = more.split_at(t);
        }
        ts += 1;
        let direction = if flags & 1 == 0 {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        seen[usize::from(flags & 1)].extend_from_slice(bytes);
        seen[usize::from(flags & 1)].extend_from_slice(tail);
        let total_len = if flags & 8 != 0 {
            n as u32
        } else {
            (n + tail.len()) as u32 + u32::from(*gap)
        };
        let chunk = Chunk {
            direction,
            total_len,
            bytes,
            tail,
            ts_ns: ts,
            start_ns: ts.saturating_sub(u64::from(*flags)),
        };
        if conn.feed(chunk, &mut out) == Feed::NotHttp {
            break;
        }
        if flags & 2 != 0 {
            conn.close(ts, &mut out);
        }
        emitted += out.len();
        out.clear();
    }
    conn.close(ts + 1, &mut out);
    emitted += out.len();
    // Every exchange comes from a request line ("... HTTP/1.x") in the input.
    let requests: usize = seen
        .iter()
        .map(|s| s.windows(8).filter(|w| *w == b" HTTP/1.").count())
        .sum();
    assert!(
        emitted <= requests,
        "{emitted} exchanges from {requests} request lines"
    );
});
