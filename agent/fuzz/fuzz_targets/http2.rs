//! Fuzz the HTTP/2 connection parser with arbitrary chunk sequences.
//!
//! Input: one byte whose bits pick the limits (bit 0), the side hint (bits
//! 1..2) and whether the input starts with the client preface in egress
//! (bit 3, so that strict HPACK decoding is reached too). Then records
//! `[flags] [len] [gap] bytes[len]`: bit 0 of flags is the direction, bit 1
//! closes the connection after the chunk, and `gap` adds that many
//! uncaptured bytes (times 64 with bit 4). With bit 2 of flags, the record
//! goes on with `[tlen] tail[tlen]`: the captured last bytes of the call,
//! after the gap (bit 3 makes `total_len` too small for them, so they must
//! be ignored).
//!
//! Checked: no panic; tracked streams within `max_streams`; every exchange
//! and every started request comes from a decoded header block; request
//! timings in order.
#![no_main]

use libfuzzer_sys::fuzz_target;

// `http2` reaches `super::exchange`: both sit at the root here, as
// under `protocols` in the agent.
#[path = "../../src/protocols/exchange.rs"]
#[allow(dead_code)]
mod exchange;
#[path = "../../src/protocols/http2/mod.rs"]
#[allow(dead_code, unused_imports)]
mod http2;

use http2::{Chunk, Direction, Http2Connection, Limits, Side};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let limits = if first & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            max_streams: 2,
            max_header_block: 64,
        }
    };
    let mut conn = Http2Connection::new(limits);
    match first >> 1 & 3 {
        1 => conn.set_side_hint(Side::Client),
        2 => conn.set_side_hint(Side::Server),
        _ => {}
    }
    let mut out = Vec::new();
    let mut started = Vec::new();
    let mut ts = 0u64;
    if first & 8 != 0 {
        let c = Chunk {
            direction: Direction::Egress,
            total_len: PREFACE.len() as u32,
            bytes: PREFACE,
            tail: &[],
            ts_ns: 0,
            start_ns: 0,
        };
        let _ = conn.feed(c, &mut out, &mut started);
    }
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
        let gap = u32::from(*gap) << if flags & 16 != 0 { 6 } else { 0 };
        let total_len = if flags & 8 != 0 {
            n as u32
        } else {
            (n + tail.len()) as u32 + gap
        };
        let chunk = Chunk {
            direction,
            total_len,
            bytes,
            tail,
            ts_ns: ts,
            start_ns: ts.saturating_sub(u64::from(*flags)),
        };
        let _ = conn.feed(chunk, &mut out, &mut started);
        assert!(conn.tracked_streams() <= limits.max_streams);
        if flags & 2 != 0 {
            conn.close(ts, &mut out);
        }
    }
    conn.close(ts + 1, &mut out);
    let blocks = conn.header_blocks();
    assert!(
        out.len() as u64 <= blocks,
        "{} exchanges from {blocks} header blocks",
        out.len()
    );
    assert!(started.len() as u64 <= blocks);
    for e in &out {
        assert!(e.request_start_ns <= e.request_end_ns, "{e:?}");
    }
});
