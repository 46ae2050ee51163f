//! Fuzz the lenient HPACK layer around `loona-hpack`.
//!
//! Input: one byte (bit 0: start lenient; bits 1..: a size announced by
//! SETTINGS_HEADER_TABLE_SIZE, in KiB), then blocks `[len] bytes[len]`
//! (bit 7 of len: the block is decoded as cut short, `decode_partial`).
//!
//! Checked: no panic; and a strict decoder and a lenient one fed the same
//! blocks from the same empty table report the same fields for as long as
//! strict decoding has not failed (lenient decoding changes nothing while
//! every index is known).
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

use http2::hpack::{Field, HpackDecoder};

type Fields = Vec<Option<(Vec<u8>, Vec<u8>)>>;

fn decode(d: &mut HpackDecoder, block: &[u8], partial: bool) -> (Fields, bool) {
    let mut got = Vec::new();
    let mut sink = |f: Field<'_>| match f {
        Field::Known(n, v) => got.push(Some((n.to_vec(), v.to_vec()))),
        Field::Unknown => got.push(None),
        Field::Restart => got.clear(),
    };
    let err = if partial {
        d.decode_partial(block, &mut sink);
        false
    } else {
        d.decode_block(block, &mut sink)
    };
    (got, err)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let mut fuzzed = HpackDecoder::new(first & 1 != 0);
    fuzzed.set_allowed_table_size(u32::from(first >> 1) * 1024);
    let mut strict = HpackDecoder::new(false);
    let mut lenient = HpackDecoder::new(true);
    let mut agree = true;
    while let [len, more @ ..] = rest {
        let n = usize::from(len & 0x7f).min(more.len());
        let (block, next) = more.split_at(n);
        rest = next;
        let partial = len & 0x80 != 0;
        let _ = decode(&mut fuzzed, block, partial);
        if agree && !partial {
            let (s, s_err) = decode(&mut strict, block, false);
            let (l, _) = decode(&mut lenient, block, false);
            if s_err {
                agree = false;
            } else {
                // (Unknown fields in both only for a peer that sends the
                // placeholder name itself.)
                assert_eq!(s, l, "strict and lenient differ on {block:02x?}");
            }
        }
    }
});
