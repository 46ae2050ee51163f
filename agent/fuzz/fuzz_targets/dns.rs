//! Fuzz the DNS stage: message parsing, DNS-over-TCP framing and lookup
//! pairing, with arbitrary chunk sequences.
//!
//! Input: the whole input is first parsed as one DNS message. Then it is
//! read as records `[flags] [len] [gap] bytes[len]`: bit 0 of flags is the
//! direction (one framer each, as on a connection), bit 1 multiplies the gap
//! (uncaptured bytes after the chunk) by 256, bit 2 makes `total_len` smaller
//! than the captured bytes (the excess must be ignored). Every framed message
//! is parsed and fed to a small lookup tracker.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/protocols/dns.rs"]
#[allow(dead_code)]
mod dns;

use dns::{LookupTracker, TcpFramer, Transport};

const MAX_PENDING: usize = 16;

fn check_parse(bytes: &[u8]) -> Option<dns::Message> {
    let strict = dns::parse(bytes);
    let prefix = dns::parse_prefix(bytes);
    match (&strict, &prefix) {
        (Ok(m), Ok((p, None))) => assert_eq!(m, p),
        (Ok(_), other) => panic!("complete parse but prefix parse gave {other:?}"),
        (Err(_), Ok((_, None))) => panic!("prefix parse complete but strict parse failed"),
        (Err(_), _) => {}
    }
    if let Ok(m) = &strict {
        assert!(m.addresses.len() <= dns::MAX_RECORDS);
        if let Some(q) = &m.question {
            assert!(
                q.name.bytes().all(|b| (32..=126).contains(&b)),
                "{:?}",
                q.name
            );
        }
    }
    strict.ok()
}

fuzz_target!(|data: &[u8]| {
    check_parse(data);

    let mut framers = [TcpFramer::new(), TcpFramer::new()];
    let mut captured = [0usize; 2];
    let mut emitted = [0usize; 2];
    let mut tracker = LookupTracker::new(MAX_PENDING);
    let mut frames = Vec::new();
    let mut done = Vec::new();
    let mut rest = data;
    let mut ts = 0u64;
    while let [flags, len, gap, more @ ..] = rest {
        let n = usize::from(*len).min(more.len());
        let (bytes, next) = more.split_at(n);
        rest = next;
        ts += 1_000;
        let dir = usize::from(flags & 1);
        let gap = u32::from(*gap) * if flags & 2 != 0 { 256 } else { 1 };
        let total_len = if flags & 4 != 0 {
            (n / 2) as u32
        } else {
            n as u32 + gap
        };
        captured[dir] += n.min(total_len as usize);
        let _ = framers[dir].feed(bytes, total_len, &mut frames);
        assert!(framers[dir].buffered() <= dns::MAX_TCP_MESSAGE);
        for frame in frames.drain(..) {
            assert!(frame.len() >= dns::HEADER_LEN && frame.len() <= dns::MAX_TCP_MESSAGE);
            emitted[dir] += frame.len() + 2;
            if let Some(msg) = check_parse(&frame) {
                let egress = dir == 0;
                if let Some(lookup) = tracker.on_message(7, 1, 2, Transport::Tcp, egress, ts, &msg)
                {
                    assert!(lookup.response.is_some());
                    assert!(lookup.attempts >= 1);
                }
            }
            assert!(tracker.pending() <= MAX_PENDING);
        }
        if flags & 8 != 0 {
            tracker.expire(ts, 5_000, &mut done);
            assert!(done.iter().all(|l| l.response.is_none()));
            done.clear();
        }
    }
    for dir in 0..2 {
        assert!(
            emitted[dir] <= captured[dir],
            "{} framed bytes from {} captured",
            emitted[dir],
            captured[dir]
        );
    }
    tracker.close_socket(7, &mut done);
    assert_eq!(tracker.pending(), 0);
});
