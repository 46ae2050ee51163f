use super::frames::{FLAG_ACK, FLAG_PRIORITY, PING, PRIORITY, WINDOW_UPDATE};
use super::*;
use loona_hpack::Encoder;
use proptest::prelude::*;

const E: Direction = Direction::Egress;
const I: Direction = Direction::Ingress;
const CLOSE_TS: u64 = 1_000_000;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut v = len.to_be_bytes()[1..].to_vec();
    v.extend([ty, flags]);
    v.extend(stream.to_be_bytes());
    v.extend(payload);
    v
}

fn data(stream: u32, flags: u8, len: usize) -> Vec<u8> {
    frame(DATA, flags, stream, &vec![b'x'; len])
}

fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in entries {
        p.extend(id.to_be_bytes());
        p.extend(v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

fn enc(e: &mut Encoder<'_>, fields: &[(&str, &str)]) -> Vec<u8> {
    e.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
}

#[derive(Clone, Debug)]
struct Seg {
    dir: Direction,
    bytes: Vec<u8>,
    ts: u64,
}

/// A conversation as the traced process sees it: the client's frames go
/// `req_dir`, the server's the other way.
struct Conv {
    req_dir: Direction,
    enc: [Encoder<'static>; 2],
    segs: Vec<Seg>,
    ts: u64,
}

impl Conv {
    fn new(side: Side) -> Conv {
        Conv {
            req_dir: req_dir_of(side),
            enc: [Encoder::new(), Encoder::new()],
            segs: Vec::new(),
            ts: 0,
        }
    }

    /// Preface and SETTINGS both ways.
    fn start(side: Side) -> Conv {
        let mut c = Conv::new(side);
        c.client([PREFACE.to_vec(), settings(&[])].concat());
        c.server([settings(&[(3, 100)]), frame(SETTINGS, FLAG_ACK, 0, &[])].concat());
        c.client(frame(SETTINGS, FLAG_ACK, 0, &[]));
        c
    }

    fn push(&mut self, dir: Direction, bytes: Vec<u8>) -> u64 {
        self.ts += 100;
        self.segs.push(Seg {
            dir,
            bytes,
            ts: self.ts,
        });
        self.ts
    }

    fn client(&mut self, bytes: Vec<u8>) -> u64 {
        self.push(self.req_dir, bytes)
    }

    fn server(&mut self, bytes: Vec<u8>) -> u64 {
        self.push(self.req_dir.other(), bytes)
    }

    /// A HEADERS frame (END_HEADERS) from the client (`client`) or the server.
    fn hdrs(
        &mut self,
        client: bool,
        stream: u32,
        end_stream: bool,
        fields: &[(&str, &str)],
    ) -> Vec<u8> {
        let block = enc(&mut self.enc[usize::from(!client)], fields);
        let flags = FLAG_END_HEADERS | if end_stream { FLAG_END_STREAM } else { 0 };
        frame(HEADERS, flags, stream, &block)
    }
}

/// `start_ns` of a chunk: egress calls began 7 ns before they completed.
fn start_of(dir: Direction, ts: u64) -> u64 {
    if dir == E { ts.saturating_sub(7) } else { ts }
}

fn chunk(dir: Direction, bytes: &[u8], ts: u64) -> Chunk<'_> {
    Chunk {
        direction: dir,
        total_len: bytes.len() as u32,
        bytes,
        tail: &[],
        ts_ns: ts,
        start_ns: start_of(dir, ts),
    }
}

struct Run {
    out: Vec<Exchange>,
    started: Vec<u64>,
    counters: Counters,
}

fn feed_all(
    conn: &mut Http2Connection,
    segs: &[Seg],
    split: impl Fn(usize, usize) -> Vec<usize>,
) -> Run {
    let mut out = Vec::new();
    let mut started = Vec::new();
    for (k, s) in segs.iter().enumerate() {
        let mut cuts: Vec<usize> = split(k, s.bytes.len())
            .into_iter()
            .map(|c| c.min(s.bytes.len()))
            .collect();
        cuts.push(0);
        cuts.push(s.bytes.len());
        cuts.sort_unstable();
        for w in cuts.windows(2) {
            if w[0] < w[1] {
                assert_eq!(
                    conn.feed(
                        chunk(s.dir, &s.bytes[w[0]..w[1]], s.ts),
                        &mut out,
                        &mut started
                    ),
                    Feed::Continue
                );
            }
        }
        assert!(conn.tracked_streams() <= conn.sh.limits.max_streams);
    }
    conn.close(CLOSE_TS, &mut out);
    Run {
        out,
        started,
        counters: conn.counters(),
    }
}

fn run(segs: &[Seg], hint: Option<Side>) -> Run {
    run_with(segs, hint, Limits::default())
}

fn run_with(segs: &[Seg], hint: Option<Side>, limits: Limits) -> Run {
    let mut conn = Http2Connection::new(limits);
    if let Some(h) = hint {
        conn.set_side_hint(h);
    }
    feed_all(&mut conn, segs, |_, _| Vec::new())
}

fn base(side: Side, stream: u32, method: &str, path: &str) -> Exchange {
    Exchange {
        side,
        method: method.into(),
        path: path.into(),
        has_query: false,
        version: HttpVersion::Http2,
        host: None,
        user_agent: None,
        traceparent: None,
        request_content_length: None,
        grpc: false,
        grpc_status: None,
        status: None,
        request_body_bytes: 0,
        response_body_bytes: 0,
        request_start_ns: 0,
        request_end_ns: 0,
        response_start_ns: None,
        response_end_ns: None,
        incomplete: None,
        seq: u64::from(stream),
    }
}

const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn basic(side: Side) -> (Conv, Exchange) {
    let mut c = Conv::start(side);
    let h = c.hdrs(
        true,
        1,
        true,
        &[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/a/b?q=1"),
            (":authority", "example.com"),
            ("user-agent", "curl/8"),
            ("traceparent", TP),
            ("cookie", "secret-cookie"),
            ("authorization", "secret-auth"),
        ],
    );
    let t_req = c.client(h);
    let h = c.hdrs(
        false,
        1,
        false,
        &[(":status", "200"), ("set-cookie", "secret-set")],
    );
    let t_resp = c.server([h, data(1, 0, 5)].concat());
    let t_end = c.server(data(1, FLAG_END_STREAM, 7));
    let want = Exchange {
        has_query: true,
        host: Some("example.com".into()),
        user_agent: Some("curl/8".into()),
        traceparent: Some(TP.into()),
        status: Some(200),
        response_body_bytes: 12,
        request_start_ns: start_of(c.req_dir, t_req),
        request_end_ns: t_req,
        response_start_ns: Some(start_of(c.req_dir.other(), t_resp)),
        response_end_ns: Some(t_end),
        ..base(side, 1, "GET", "/a/b")
    };
    (c, want)
}

#[test]
fn a_request_and_its_response() {
    for side in [Side::Client, Side::Server] {
        let (c, want) = basic(side);
        for hint in [None, Some(side)] {
            let r = run(&c.segs, hint);
            assert_eq!(r.out, vec![want.clone()]);
            assert_eq!(r.started, vec![1]);
            assert_eq!(r.counters, Counters::default());
            assert!(!format!("{:?}", r.out).contains("secret"));
        }
    }
}

#[test]
fn the_preface_gives_the_side() {
    let (c, _) = basic(Side::Server);
    let mut conn = Http2Connection::new(Limits::default());
    let mut out = Vec::new();
    let mut started = Vec::new();
    let s = &c.segs[0];
    conn.feed(chunk(s.dir, &s.bytes, s.ts), &mut out, &mut started);
    assert_eq!(conn.side(), Some(Side::Server));
    assert!(!conn.halves[0].hpack.is_lenient() && !conn.halves[1].hpack.is_lenient());
}

#[test]
fn the_server_may_speak_first() {
    // The server's SETTINGS reach us before the client's preface: still
    // known from the start, both tables strict.
    let (c, want) = basic(Side::Server);
    let mut segs = c.segs.clone();
    segs.swap(0, 1);
    segs[0].ts = 50;
    let r = run(&segs, None);
    assert_eq!(r.out, vec![want]);
    assert_eq!(r.counters, Counters::default());
}

#[test]
fn frames_split_at_every_byte_give_the_same_exchanges() {
    let (mut c, want) = basic(Side::Client);
    // A gRPC call with trailers, padding and CONTINUATION too.
    let h = c.hdrs(
        true,
        3,
        false,
        &[
            (":method", "POST"),
            (":path", "/pkg.Svc/M"),
            ("content-type", "application/grpc"),
        ],
    );
    let (a, b) = h[9..].split_at(3);
    let mut padded = vec![4u8, 0, 0, 0, 0, 16];
    padded.extend(a);
    padded.extend([0; 4]);
    let first = frame(HEADERS, FLAG_PADDED | FLAG_PRIORITY, 3, &padded);
    c.client([first, frame(CONTINUATION, FLAG_END_HEADERS, 3, b)].concat());
    c.client(frame(
        DATA,
        FLAG_END_STREAM | FLAG_PADDED,
        3,
        &[2, 1, 2, 3, 0, 0],
    ));
    let h = c.hdrs(
        false,
        3,
        false,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    c.server([h, data(3, 0, 10), frame(PING, 0, 0, &[0; 8])].concat());
    let t = c.hdrs(
        false,
        3,
        true,
        &[("grpc-status", "7"), ("grpc-message", "secret")],
    );
    c.server(t);
    let whole = run(&c.segs, None);
    assert_eq!(whole.out.len(), 2);
    assert_eq!(whole.out[0], want);
    let g = &whole.out[1];
    assert_eq!(
        (g.grpc, g.grpc_status, g.status),
        (true, Some(7), Some(200))
    );
    assert_eq!((g.request_body_bytes, g.response_body_bytes), (3, 10));
    assert_eq!((g.method.as_str(), g.path.as_str()), ("POST", "/pkg.Svc/M"));
    assert_eq!(whole.counters, Counters::default());
    let bytewise = feed_all(
        &mut Http2Connection::new(Limits::default()),
        &c.segs,
        |_, len| (1..len).collect(),
    );
    assert_eq!(bytewise.out, whole.out);
    let longest = c.segs.iter().map(|s| s.bytes.len()).max().unwrap_or(0);
    for k in 1..longest {
        let r = feed_all(
            &mut Http2Connection::new(Limits::default()),
            &c.segs,
            |_, _| vec![k],
        );
        assert_eq!(r.out, whole.out, "split at {k}");
        assert_eq!(r.started, whole.started);
    }
}

#[test]
fn interleaved_concurrent_streams_each_get_their_exchange() {
    let mut c = Conv::start(Side::Client);
    let ids: Vec<u32> = (0..20).map(|k| 2 * k + 1).collect();
    let mut req_ts = Vec::new();
    for (k, &id) in ids.iter().enumerate() {
        let path = format!("/s/{id}");
        let h = c.hdrs(
            true,
            id,
            false,
            &[
                (":method", "POST"),
                (":path", &path),
                ("content-type", "application/grpc+proto"),
            ],
        );
        req_ts.push(c.client([h, data(id, FLAG_END_STREAM, id as usize)].concat()));
        // Responses to earlier streams, in a scrambled order, their frames
        // interleaved in one write.
        if k % 4 == 3 {
            let mut w = Vec::new();
            for &j in ids[k - 3..=k].iter().rev() {
                let status = (200 + j % 7).to_string();
                w.extend(c.hdrs(false, j, false, &[(":status", &status)]));
            }
            for &j in &ids[k - 3..=k] {
                w.extend(data(j, 0, 3));
            }
            for &j in ids[k - 3..=k].iter().rev() {
                w.extend(data(j, 0, j as usize));
                let st = (j % 17).to_string();
                w.extend(c.hdrs(false, j, true, &[("grpc-status", &st)]));
            }
            c.server(w);
        }
    }
    let r = run(&c.segs, None);
    assert_eq!(r.out.len(), ids.len());
    assert_eq!(
        r.started,
        ids.iter().map(|&i| u64::from(i)).collect::<Vec<_>>()
    );
    for (k, &id) in ids.iter().enumerate() {
        let e = r
            .out
            .iter()
            .find(|e| e.seq == u64::from(id))
            .expect("exchange");
        assert_eq!(e.path, format!("/s/{id}"));
        assert_eq!(e.status, Some(200 + (id % 7) as u16));
        assert_eq!(e.grpc_status, Some(id % 17));
        assert!(e.grpc);
        assert_eq!(e.request_body_bytes, u64::from(id));
        assert_eq!(e.response_body_bytes, 3 + u64::from(id));
        assert_eq!(e.request_end_ns, req_ts[k]);
        assert_eq!(e.incomplete, None);
    }
    assert_eq!(r.counters, Counters::default());
}

#[test]
fn a_streaming_response_ends_with_its_trailers() {
    let mut c = Conv::start(Side::Client);
    let h = c.hdrs(
        true,
        1,
        true,
        &[
            (":method", "POST"),
            (":path", "/s.S/Watch"),
            ("content-type", "application/grpc"),
        ],
    );
    c.client(h);
    let h = c.hdrs(
        false,
        1,
        false,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    let t_start = c.server(h);
    c.server(data(1, 0, 50));
    c.server(data(1, 0, 60));
    let mut conn = Http2Connection::new(Limits::default());
    let mut out = Vec::new();
    let mut started = Vec::new();
    for s in &c.segs {
        conn.feed(chunk(s.dir, &s.bytes, s.ts), &mut out, &mut started);
    }
    assert!(out.is_empty(), "ended before its trailers");
    assert!(!conn.awaiting_response(1));
    let t = c.hdrs(false, 1, true, &[("grpc-status", "0")]);
    let t_end = c.server(t);
    let s = &c.segs[c.segs.len() - 1];
    conn.feed(chunk(s.dir, &s.bytes, s.ts), &mut out, &mut started);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].response_start_ns, Some(t_start));
    assert_eq!(out[0].response_end_ns, Some(t_end));
    assert_eq!(out[0].response_body_bytes, 110);
    assert_eq!(out[0].grpc_status, Some(0));
}

#[test]
fn trailers_only_and_informational_responses() {
    let mut c = Conv::start(Side::Client);
    let h = c.hdrs(
        true,
        1,
        true,
        &[
            (":method", "POST"),
            (":path", "/s.S/M"),
            ("content-type", "application/grpc"),
        ],
    );
    c.client(h);
    let h = c.hdrs(
        false,
        1,
        true,
        &[
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", "12"),
        ],
    );
    let t1 = c.server(h);
    let h = c.hdrs(
        true,
        3,
        false,
        &[
            (":method", "PUT"),
            (":path", "/up"),
            ("content-length", "4"),
        ],
    );
    c.client(h);
    let h = c.hdrs(false, 3, false, &[(":status", "100")]);
    c.server(h);
    c.client(data(3, FLAG_END_STREAM, 4));
    let h = c.hdrs(false, 3, true, &[(":status", "201")]);
    let t3 = c.server(h);
    let r = run(&c.segs, Some(Side::Client));
    assert_eq!(r.out.len(), 2);
    let (a, b) = (&r.out[0], &r.out[1]);
    assert_eq!(
        (a.status, a.grpc_status, a.grpc),
        (Some(200), Some(12), true)
    );
    assert_eq!(
        (a.response_start_ns, a.response_end_ns),
        (Some(t1), Some(t1))
    );
    assert_eq!(
        (b.status, b.request_content_length, b.request_body_bytes),
        (Some(201), Some(4), 4)
    );
    assert_eq!(b.response_start_ns, Some(t3));
}

#[test]
fn rst_stream_ends_a_stream() {
    let mut c = Conv::start(Side::Client);
    let h = c.hdrs(true, 1, true, &[(":method", "GET"), (":path", "/1")]);
    c.client(h);
    let rst = c.server(frame(RST_STREAM, 0, 1, &[0, 0, 0, 7]));
    // Response complete, request still open: the server's RST (NO_ERROR)
    // ends a complete exchange.
    let h = c.hdrs(true, 3, false, &[(":method", "POST"), (":path", "/3")]);
    c.client(h);
    let h = c.hdrs(false, 3, true, &[(":status", "200")]);
    let t3 = c.server(h);
    c.server(frame(RST_STREAM, 0, 3, &[0; 4]));
    // Cancelled by the client after the response started.
    let h = c.hdrs(true, 5, true, &[(":method", "GET"), (":path", "/5")]);
    c.client(h);
    let h = c.hdrs(false, 5, false, &[(":status", "200")]);
    c.server(h);
    let cancel = c.client(frame(RST_STREAM, 0, 5, &[0, 0, 0, 8]));
    let r = run(&c.segs, None);
    assert_eq!(r.out.len(), 3);
    assert_eq!(
        (r.out[0].seq, r.out[0].incomplete, r.out[0].response_end_ns),
        (1, Some("stream_reset"), Some(rst))
    );
    assert_eq!(r.out[0].status, None);
    assert_eq!(
        (r.out[1].seq, r.out[1].incomplete, r.out[1].response_end_ns),
        (3, None, Some(t3))
    );
    assert_eq!(
        (r.out[2].seq, r.out[2].incomplete, r.out[2].response_end_ns),
        (5, Some("stream_reset"), Some(cancel))
    );
    assert_eq!(r.out[2].status, Some(200));
}

#[test]
fn goaway_ends_the_streams_above_its_last_stream_id() {
    let mut c = Conv::start(Side::Client);
    for id in [1, 3, 5] {
        let h = c.hdrs(true, id, true, &[(":method", "GET"), (":path", "/")]);
        c.client(h);
    }
    // The client's GOAWAY names server streams: ends none of ours.
    c.client(frame(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0]));
    let g = c.server(frame(
        GOAWAY,
        0,
        0,
        &[0, 0, 0, 1, 0, 0, 0, 0, b'b', b'y', b'e'],
    ));
    let h = c.hdrs(false, 1, true, &[(":status", "204")]);
    c.server(h);
    let r = run(&c.segs, None);
    let got: Vec<_> = r
        .out
        .iter()
        .map(|e| (e.seq, e.incomplete, e.status))
        .collect();
    assert_eq!(
        got,
        vec![
            (3, Some("goaway"), None),
            (5, Some("goaway"), None),
            (1, None, Some(204))
        ]
    );
    assert_eq!(r.out[0].response_end_ns, Some(g));
}

#[test]
fn other_frames_are_skipped() {
    let (mut c, want) = basic(Side::Client);
    let mut segs = Vec::new();
    for s in c.segs.drain(..) {
        let mut b = s.bytes;
        if !b.starts_with(PREFACE) {
            let mut pre = frame(WINDOW_UPDATE, 0, 0, &[0, 1, 0, 0]);
            pre.extend(frame(PRIORITY, 0, 1, &[0, 0, 0, 0, 9]));
            pre.extend(frame(0xfa, 0xff, 1, b"unknown type"));
            pre.extend(frame(PING, FLAG_ACK, 0, &[1; 8]));
            pre.extend(b);
            b = pre;
        }
        segs.push(Seg { bytes: b, ..s });
    }
    let r = run(&segs, None);
    assert_eq!(r.out, vec![want]);
    assert_eq!(r.counters, Counters::default());
}

#[test]
fn a_payload_gap_is_skipped_by_count_and_the_tail_is_read() {
    let mut c = Conv::start(Side::Client);
    let h = c.hdrs(true, 1, true, &[(":method", "GET"), (":path", "/big")]);
    c.client(h);
    let h = c.hdrs(
        false,
        1,
        false,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    let mut call = [h, data(1, 0, 10_000)].concat();
    call.extend(c.hdrs(false, 1, true, &[("grpc-status", "3")]));
    c.server(call);
    // The server's call: 4096 bytes captured, then the last 64 (holding
    // the trailers).
    let mut conn = Http2Connection::new(Limits::default());
    let mut out = Vec::new();
    let mut started = Vec::new();
    let last = c.segs.len() - 1;
    for s in &c.segs[..last] {
        conn.feed(chunk(s.dir, &s.bytes, s.ts), &mut out, &mut started);
    }
    let s = &c.segs[last];
    let n = s.bytes.len();
    let cut = Chunk {
        total_len: n as u32,
        bytes: &s.bytes[..4096],
        tail: &s.bytes[n - 64..],
        ..chunk(s.dir, &s.bytes, s.ts)
    };
    conn.feed(cut, &mut out, &mut started);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (
            out[0].response_body_bytes,
            out[0].grpc_status,
            out[0].incomplete
        ),
        (10_000, Some(3), None)
    );
    assert_eq!(out[0].response_end_ns, Some(s.ts));
    assert_eq!(conn.counters(), Counters::default());
}

#[test]
fn truncated_capture_loses_sync_then_resyncs() {
    let mut c = Conv::start(Side::Client);
    let h = c.hdrs(true, 1, true, &[(":method", "GET"), (":path", "/1")]);
    c.client(h);
    let h = c.hdrs(false, 1, false, &[(":status", "200"), ("x-srv", "a")]);
    let big = [
        h,
        data(1, 0, 8000),
        data(1, 0, 8000),
        data(1, FLAG_END_STREAM, 10),
    ]
    .concat();
    let big_at = c.segs.len();
    c.server(big);
    let h = c.hdrs(true, 3, true, &[(":method", "GET"), (":path", "/3")]);
    c.client(h);
    // The server's table was dropped: x-srv (indexed now) is unknown, the
    // rest is static or literal.
    let h = c.hdrs(false, 3, true, &[(":status", "404"), ("x-srv", "a")]);
    c.server(h);
    let mut segs = c.segs.clone();
    let n = segs[big_at].bytes.len();
    segs[big_at].bytes.truncate(4096);
    let mut conn = Http2Connection::new(Limits::default());
    let mut out = Vec::new();
    let mut started = Vec::new();
    for (k, s) in segs.iter().enumerate() {
        let mut ch = chunk(s.dir, &s.bytes, s.ts);
        if k == big_at {
            ch.total_len = n as u32;
        }
        conn.feed(ch, &mut out, &mut started);
    }
    assert_eq!(conn.counters().desyncs, 1);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].seq, out[0].status, out[0].incomplete),
        (3, Some(404), None)
    );
    conn.close(CLOSE_TS, &mut out);
    assert_eq!(
        (out[1].seq, out[1].status, out[1].incomplete),
        (1, Some(200), Some("capture_gap"))
    );
    assert_eq!(out[1].response_end_ns, Some(CLOSE_TS));
}

/// Hand-made HPACK representations (the crate's encoder never indexes
/// fields whose names are in the static table, as real encoders do).
fn lit_inc(name_index: u8, value: &str) -> Vec<u8> {
    let mut v = vec![0x40 | name_index, value.len() as u8];
    v.extend(value.as_bytes());
    v
}

fn lit(name_index: u8, value: &str) -> Vec<u8> {
    let mut v = vec![name_index, value.len() as u8];
    v.extend(value.as_bytes());
    v
}

fn hf(stream: u32, end_stream: bool, block: &[&[u8]]) -> Vec<u8> {
    let flags = FLAG_END_HEADERS | if end_stream { FLAG_END_STREAM } else { 0 };
    frame(HEADERS, flags, stream, &block.concat())
}

#[test]
fn joined_mid_stream_lenient_hpack() {
    // Static indices: 2 GET, 3 POST, 4 :path, 1 :authority, 8 :status 200.
    // Before we joined, the client sent (stream 1):
    //   GET, :path /a/b1 (inserted), :authority example.com (inserted)
    // so its table is [example.com, /a/b1].
    let _unseen = hf(
        1,
        true,
        &[&[0x82], &lit_inc(4, "/a/b1"), &lit_inc(1, "example.com")],
    );
    let segs = [
        // Stream 3 reuses both entries: :path unknown.
        Seg {
            dir: E,
            bytes: hf(3, true, &[&[0x82, 0x80 | 63, 0x80 | 62]]),
            ts: 100,
        },
        Seg {
            dir: I,
            bytes: hf(3, true, &[&[0x88]]),
            ts: 200,
        },
        // Stream 5: literal path, unknown authority.
        Seg {
            dir: E,
            bytes: hf(5, true, &[&[0x82], &lit(4, "/c"), &[0x80 | 62]]),
            ts: 300,
        },
        Seg {
            dir: I,
            bytes: hf(5, true, &[&[0x88]]),
            ts: 400,
        },
        // Stream 7 inserts /d; stream 9 refers to it: known.
        Seg {
            dir: E,
            bytes: hf(7, true, &[&[0x83], &lit_inc(4, "/d")]),
            ts: 500,
        },
        Seg {
            dir: E,
            bytes: hf(9, true, &[&[0x82, 0x80 | 62, 0x80 | 64]]),
            ts: 600,
        },
        Seg {
            dir: I,
            bytes: [hf(7, true, &[&[0x88]]), hf(9, true, &[&[0x88]])].concat(),
            ts: 700,
        },
    ];
    for hint in [None, Some(Side::Client)] {
        let r = run(&segs, hint);
        let got: Vec<_> = r
            .out
            .iter()
            .map(|e| {
                (
                    e.seq,
                    e.method.as_str(),
                    e.path.as_str(),
                    e.host.clone(),
                    e.incomplete,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (3, "GET", "", None, Some("hpack_state")),
                (5, "GET", "/c", None, None),
                (7, "POST", "/d", None, None),
                (9, "GET", "/d", None, None),
            ]
        );
        assert!(
            r.out
                .iter()
                .all(|e| e.status == Some(200) && e.side == Side::Client)
        );
        assert_eq!(
            r.counters,
            Counters {
                hpack_incomplete: 1,
                ..Counters::default()
            }
        );
    }
}

#[test]
fn a_connection_joined_inside_a_frame_waits_for_a_frame_start() {
    let (c, want) = basic(Side::Client);
    // No preface seen: skip the first three segments; the request arrives
    // after some bytes from the middle of a frame.
    let mut segs: Vec<Seg> = c.segs[3..].to_vec();
    segs.insert(
        0,
        Seg {
            dir: I,
            bytes: vec![b'x'; 100],
            ts: 1,
        },
    );
    segs.insert(
        0,
        Seg {
            dir: E,
            bytes: b"\0\0\0garbage from the middle of a frame".to_vec(),
            ts: 1,
        },
    );
    let r = run(&segs, None);
    assert_eq!(r.out, vec![want]);
    assert_eq!(r.counters.desyncs, 0);
}

#[test]
fn limits_cut_and_count() {
    let mut c = Conv::start(Side::Client);
    for id in [1, 3, 5] {
        let h = c.hdrs(true, id, true, &[(":method", "GET"), (":path", "/x")]);
        c.client(h);
    }
    let r = run_with(
        &c.segs,
        None,
        Limits {
            max_streams: 2,
            ..Limits::default()
        },
    );
    assert_eq!(r.started, vec![1, 3]);
    assert_eq!(r.counters.streams_dropped, 1);
    assert_eq!(
        r.out
            .iter()
            .map(|e| (e.seq, e.incomplete))
            .collect::<Vec<_>>(),
        vec![(1, Some("no_response")), (3, Some("no_response"))]
    );

    let mut c = Conv::start(Side::Client);
    let ua = "u".repeat(300);
    let h = c.hdrs(
        true,
        1,
        true,
        &[(":method", "GET"), (":path", "/long"), ("user-agent", &ua)],
    );
    c.client(h);
    let h = c.hdrs(false, 1, true, &[(":status", "200")]);
    c.server(h);
    let h = c.hdrs(true, 3, true, &[(":method", "GET"), (":path", "/next")]);
    c.client(h);
    let h = c.hdrs(false, 3, true, &[(":status", "200")]);
    c.server(h);
    let r = run_with(
        &c.segs,
        None,
        Limits {
            max_header_block: 128,
            ..Limits::default()
        },
    );
    assert_eq!(r.out.len(), 2);
    assert_eq!(
        (
            r.out[0].path.as_str(),
            r.out[0].user_agent.as_deref(),
            r.out[0].incomplete
        ),
        ("/long", None, Some("header_too_large"))
    );
    assert_eq!(
        (r.out[1].path.as_str(), r.out[1].incomplete),
        ("/next", None)
    );
    assert!(r.counters.header_bytes_cut > 150);
}

#[test]
fn close_flushes_open_streams() {
    let mut c = Conv::start(Side::Client);
    let h = c.hdrs(true, 3, true, &[(":method", "GET"), (":path", "/3")]);
    c.client(h);
    let h = c.hdrs(true, 1, false, &[(":method", "POST"), (":path", "/1")]);
    c.client(h);
    let h = c.hdrs(false, 1, false, &[(":status", "200")]);
    c.server(h);
    let r = run(&c.segs, None);
    let got: Vec<_> = r
        .out
        .iter()
        .map(|e| (e.seq, e.incomplete, e.response_end_ns))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, Some("connection_closed"), Some(CLOSE_TS)),
            (3, Some("no_response"), None)
        ]
    );
}

#[test]
fn pending_request_and_awaiting_response() {
    let (c, _) = basic(Side::Client);
    let mut conn = Http2Connection::new(Limits::default());
    let mut out = Vec::new();
    let mut started = Vec::new();
    for s in &c.segs[..4] {
        conn.feed(chunk(s.dir, &s.bytes, s.ts), &mut out, &mut started);
    }
    assert_eq!(started, vec![1]);
    let p = conn.pending_request(1).expect("pending");
    assert_eq!(
        (p.method.as_str(), p.path.as_str(), p.traceparent.as_deref()),
        ("GET", "/a/b", Some(TP))
    );
    assert!(conn.awaiting_response(1));
    assert!(!conn.awaiting_response(3) && conn.pending_request(u64::MAX).is_none());
    let s = &c.segs[4];
    conn.feed(chunk(s.dir, &s.bytes, s.ts), &mut out, &mut started);
    assert!(!conn.awaiting_response(1));
    assert!(conn.pending_request(1).is_some());
}

#[test]
fn push_promise_blocks_keep_the_table_in_step() {
    let mut c = Conv::start(Side::Client);
    let h = c.hdrs(true, 1, true, &[(":method", "GET"), (":path", "/")]);
    c.client(h);
    let block = enc(
        &mut c.enc[1],
        &[
            (":method", "GET"),
            (":path", "/style.css"),
            ("x-push", "yes"),
        ],
    );
    let mut pp = 2u32.to_be_bytes().to_vec();
    pp.extend(block);
    let h = c.hdrs(
        false,
        1,
        false,
        &[(":status", "200"), ("x-push", "yes"), ("grpc-status", "0")],
    );
    c.server([frame(PUSH_PROMISE, FLAG_END_HEADERS, 1, &pp), h].concat());
    let h = c.hdrs(false, 2, true, &[(":status", "200"), ("x-pushed", "1")]);
    c.server(h);
    c.server(data(1, FLAG_END_STREAM, 1));
    let h = c.hdrs(true, 3, true, &[(":method", "GET"), (":path", "/b")]);
    c.client(h);
    // grpc-status 0 indexed from the dynamic table now.
    let h = c.hdrs(false, 3, true, &[(":status", "200"), ("grpc-status", "0")]);
    assert_eq!(h[9..].len(), 2);
    c.server(h);
    let r = run(&c.segs, None);
    let got: Vec<_> = r
        .out
        .iter()
        .map(|e| (e.seq, e.grpc_status, e.incomplete))
        .collect();
    assert_eq!(got, vec![(1, Some(0), None), (3, Some(0), None)]);
    assert_eq!(r.counters, Counters::default());
}

#[test]
fn settings_header_table_size_allows_a_bigger_table() {
    for announce in [true, false] {
        let mut c = Conv::new(Side::Client);
        c.client([PREFACE.to_vec(), settings(&[])].concat());
        if announce {
            c.server(settings(&[(1, 65536), (4, 1 << 20)]));
        }
        // The client's encoder takes the bigger table: a size update first.
        let mut block = vec![0x3f, 0xe1, 0xff, 0x03];
        block.extend(enc(
            &mut c.enc[0],
            &[(":method", "GET"), (":path", "/"), ("x-a", "1")],
        ));
        c.client(frame(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &block,
        ));
        let h = c.hdrs(false, 1, true, &[(":status", "200")]);
        c.server(h);
        let r = run(&c.segs, None);
        assert_eq!(r.out.len(), 1);
        assert_eq!((r.out[0].path.as_str(), r.out[0].incomplete), ("/", None));
        assert_eq!(r.counters.hpack_errors, u64::from(!announce));
    }
}

#[test]
fn garbage_is_not_http2() {
    let mut conn = Http2Connection::new(Limits::default());
    let mut out = Vec::new();
    let mut started = Vec::new();
    let mut last = Feed::Continue;
    for k in 0..GIVE_UP_CHUNKS {
        last = conn.feed(
            chunk(E, b"GET / HTTP/1.1\r\n\r\n", u64::from(k)),
            &mut out,
            &mut started,
        );
    }
    assert_eq!(last, Feed::NotHttp);
    // A malformed frame header in sync: a desync, then a resync.
    let (c, want) = basic(Side::Client);
    let mut segs = c.segs.clone();
    segs.insert(
        3,
        Seg {
            dir: E,
            bytes: frame(PING, 0, 1, &[0; 8]),
            ts: 1,
        },
    );
    let r = run(&segs, None);
    assert_eq!(r.counters.desyncs, 1);
    assert_eq!(r.out.len(), 1);
    assert_eq!(r.out[0].path, want.path);
}

/// A real conversation: Python grpcio (C core) client and server on
/// loopback, three unary calls on one channel, the last NOT_FOUND
/// (trailers-only); recorded through a proxy, one line per read
/// ("C" client to server, "S" back). The server speaks first.
const GRPCIO_CAPTURE: &[&str] = &[
    "S 0000180400000000000004003fffff0005003fffff000600002000fe0300000001000004080000000000003f0000",
    "C 505249202a20485454502f322e300d0a0d0a534d0d0a0d0a0000240400000000000002000000000003000000000004003fffff0005003fffff000600002000fe0300000001000004080000000000003f0000",
    "S 000000040100000000",
    "C 0000000401000000000000d301040000000140053a70617468162f64656d6f2e477265657465722f53617948656c6c6f400a3a617574686f726974790f3132372e302e302e313a33353234378386400c636f6e74656e742d74797065106170706c69636174696f6e2f677270634002746508747261696c6572734014677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c20677a6970400a757365722d6167656e7430677270632d707974686f6e2f312e35312e3120677270632d632f32392e302e3020286c696e75783b20636874747032290000040800000000010000000500000600010000000100000000016100000408000000000000000005",
    "S 0000080600000000000000000000000000",
    "S 00004e01040000000188400c636f6e74656e742d74797065106170706c69636174696f6e2f677270634014677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c20677a697000000c000000000001000000000768656c6c6f206100000f010500000001400b677270632d737461747573013000000408000000000000000006",
    "C 0000080601000000000000000000000000000004080000000000000000070000080600000000000000000000000000",
    "S 0000080601000000000000000000000000",
    "C 000008010400000003c3c28386c1c0bfbe0000040800000000030000000500000600010000000300000000016200000408000000000000000005",
    "S 00000301040000000388c0bf00000c000000000003000000000768656c6c6f2062000001010500000003be00000408000000000000000006",
    "C 000008010400000005c3c28386c1c0bfbe0000040800000000050000000500000700010000000500000000026e660000040800000000000000000c",
    "S 00002401050000000588c0400b677270632d7374617475730135000c677270632d6d657373616765046e6f706500000408000000000000000007",
    "S 0000080600000000000000000000000001",
    "C 00000806010000000000000000000000010000080600000000000000000000000001",
    "S 0000080601000000000000000000000001",
];

#[test]
fn a_grpcio_capture_replays() {
    for side in [Side::Client, Side::Server] {
        let client_dir = req_dir_of(side);
        let segs: Vec<Seg> = GRPCIO_CAPTURE
            .iter()
            .enumerate()
            .map(|(k, line)| {
                let (tag, hex) = line.split_once(' ').unwrap_or_default();
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap_or(0))
                    .collect();
                let dir = if tag == "C" {
                    client_dir
                } else {
                    client_dir.other()
                };
                Seg {
                    dir,
                    bytes,
                    ts: 10 * (k as u64 + 1),
                }
            })
            .collect();
        let r = run(&segs, None);
        let got: Vec<_> = r
            .out
            .iter()
            .map(|e| {
                (
                    e.seq,
                    e.method.as_str(),
                    e.path.as_str(),
                    e.status,
                    e.grpc,
                    e.grpc_status,
                    e.incomplete,
                )
            })
            .collect();
        let call = |id, status| {
            (
                id,
                "POST",
                "/demo.Greeter/SayHello",
                Some(200),
                true,
                Some(status),
                None,
            )
        };
        assert_eq!(got, vec![call(1, 0), call(3, 0), call(5, 5)]);
        assert!(
            r.out
                .iter()
                .all(|e| e.side == side && e.host.as_deref() == Some("127.0.0.1:35247"))
        );
        assert_eq!(
            r.out[0].user_agent.as_deref(),
            Some("grpc-python/1.51.1 grpc-c/29.0.0 (linux; chttp2)")
        );
        assert_eq!(
            (r.out[0].request_body_bytes, r.out[0].response_body_bytes),
            (6, 12)
        );
        assert_eq!(r.started, vec![1, 3, 5]);
        assert_eq!(r.counters, Counters::default());
    }
}

// ---------------------------------------------------------------------
// Property tests.

#[derive(Clone, Debug)]
struct GenStream {
    method: &'static str,
    path: &'static str,
    query: bool,
    grpc: bool,
    req_data: Vec<usize>,
    interim: bool,
    status: u16,
    resp_data: Vec<usize>,
    trailers: Option<u32>,
    padded: bool,
}

fn gen_stream() -> impl Strategy<Value = GenStream> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE"]),
        prop::sample::select(vec!["/", "/a", "/pkg.Svc/Method", "/x/y/z"]),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(0usize..300, 0..3),
        any::<bool>(),
        prop::sample::select(vec![200u16, 204, 404, 500]),
        prop::collection::vec(0usize..300, 0..3),
        prop::option::of(0u32..17),
        any::<bool>(),
    )
        .prop_map(
            |(
                method,
                path,
                query,
                grpc,
                req_data,
                interim,
                status,
                resp_data,
                trailers,
                padded,
            )| GenStream {
                method,
                path,
                query,
                grpc,
                req_data,
                interim,
                status,
                resp_data,
                trailers,
                padded,
            },
        )
}

/// One stream's frames, in order: (from the client, frame).
enum Step {
    ReqHeaders(bool),
    ReqData(usize, bool),
    Interim,
    RespHeaders(bool),
    RespData(usize, bool),
    Trailers,
}

fn steps(g: &GenStream) -> Vec<Step> {
    let mut v = vec![Step::ReqHeaders(g.req_data.is_empty())];
    for (k, &n) in g.req_data.iter().enumerate() {
        v.push(Step::ReqData(n, k + 1 == g.req_data.len()));
    }
    if g.interim {
        v.push(Step::Interim);
    }
    let end_at_headers = g.resp_data.is_empty() && g.trailers.is_none();
    v.push(Step::RespHeaders(end_at_headers));
    for (k, &n) in g.resp_data.iter().enumerate() {
        v.push(Step::RespData(
            n,
            k + 1 == g.resp_data.len() && g.trailers.is_none(),
        ));
    }
    if g.trailers.is_some() {
        v.push(Step::Trailers);
    }
    v
}

/// Builds the conversation: streams' frames interleaved by `order` (each
/// entry picks the stream whose next frame goes next), frames grouped into
/// calls while the direction does not change and `group` says so.
fn conversation(
    gs: &[GenStream],
    order: &[usize],
    group: &[bool],
    side: Side,
) -> (Vec<Seg>, Vec<Exchange>) {
    let mut c = Conv::start(side);
    let all: Vec<Vec<Step>> = gs.iter().map(steps).collect();
    let mut next = vec![0usize; gs.len()];
    let mut want: Vec<Exchange> = gs
        .iter()
        .enumerate()
        .map(|(k, g)| Exchange {
            has_query: g.query,
            grpc: g.grpc,
            host: Some("h.example".into()),
            status: Some(g.status),
            grpc_status: g.trailers,
            request_body_bytes: g.req_data.iter().sum::<usize>() as u64,
            response_body_bytes: g.resp_data.iter().sum::<usize>() as u64,
            response_start_ns: Some(0),
            response_end_ns: Some(0),
            ..base(side, 2 * k as u32 + 1, g.method, g.path)
        })
        .collect();
    let mut pending: Option<(bool, Vec<u8>)> = None;
    let mut oi = 0;
    let mut gi = 0;
    let flush = |c: &mut Conv, p: &mut Option<(bool, Vec<u8>)>| -> u64 {
        match p.take() {
            Some((client, b)) if client => c.client(b),
            Some((_, b)) => c.server(b),
            None => c.ts,
        }
    };
    loop {
        let live: Vec<usize> = (0..gs.len()).filter(|&k| next[k] < all[k].len()).collect();
        if live.is_empty() {
            break;
        }
        let k = live[order.get(oi).copied().unwrap_or(0) % live.len()];
        oi += 1;
        let g = &gs[k];
        let id = 2 * k as u32 + 1;
        let step = &all[k][next[k]];
        next[k] += 1;
        let (client, bytes) = match *step {
            Step::ReqHeaders(end) => {
                let path = if g.query {
                    format!("{}?q=1", g.path)
                } else {
                    g.path.to_string()
                };
                let mut f = vec![
                    (":method", g.method),
                    (":scheme", "http"),
                    (":path", path.as_str()),
                    (":authority", "h.example"),
                ];
                if g.grpc {
                    f.push(("content-type", "application/grpc"));
                }
                (true, c.hdrs(true, id, end, &f))
            }
            Step::ReqData(n, end) => (true, padded_data(id, n, end, g.padded)),
            Step::Interim => (false, c.hdrs(false, id, false, &[(":status", "103")])),
            Step::RespHeaders(end) => {
                let st = g.status.to_string();
                (
                    false,
                    c.hdrs(false, id, end, &[(":status", st.as_str()), ("server", "s")]),
                )
            }
            Step::RespData(n, end) => (false, padded_data(id, n, end, g.padded)),
            Step::Trailers => {
                let st = g.trailers.unwrap_or(0).to_string();
                (
                    false,
                    c.hdrs(
                        false,
                        id,
                        true,
                        &[("grpc-status", st.as_str()), ("grpc-message", "m")],
                    ),
                )
            }
        };
        let same = matches!(&pending, Some((cl, _)) if *cl == client);
        let join = same && group.get(gi).copied().unwrap_or(false);
        gi += 1;
        if !join {
            flush(&mut c, &mut pending);
        }
        match &mut pending {
            Some((_, b)) => b.extend(bytes),
            None => pending = Some((client, bytes)),
        }
        // Timings: this frame goes out with the next call pushed.
        let ts = 100 * (c.segs.len() as u64 + 1);
        let dir = if client { c.req_dir } else { c.req_dir.other() };
        let e = &mut want[k];
        match *step {
            Step::ReqHeaders(end) => {
                e.request_start_ns = start_of(dir, ts);
                if end {
                    e.request_end_ns = ts;
                }
            }
            Step::ReqData(_, true) => e.request_end_ns = ts,
            Step::RespHeaders(end) => {
                e.response_start_ns = Some(start_of(dir, ts));
                if end {
                    e.response_end_ns = Some(ts);
                }
            }
            Step::RespData(_, true) | Step::Trailers => e.response_end_ns = Some(ts),
            _ => {}
        }
    }
    flush(&mut c, &mut pending);
    (c.segs, want)
}

fn padded_data(id: u32, n: usize, end: bool, padded: bool) -> Vec<u8> {
    let flags = if end { FLAG_END_STREAM } else { 0 };
    if padded {
        let mut p = vec![3u8];
        p.extend(vec![b'd'; n]);
        p.extend([0; 3]);
        frame(DATA, flags | FLAG_PADDED, id, &p)
    } else {
        data(id, flags, n)
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Sorted by stream id (emission order depends on completion order only).
fn by_id(mut v: Vec<Exchange>) -> Vec<Exchange> {
    v.sort_by_key(|e| e.seq);
    v
}

const FRAGMENTS: &[&[u8]] = &[
    PREFACE,
    &[0, 0, 0, 4, 0, 0, 0, 0, 0],
    &[0, 0, 2, 1, 5, 0, 0, 0, 1, 0x82, 0x84],
    &[0, 0, 1, 1, 4, 0, 0, 0, 3, 0x88],
    &[0, 0, 2, 1, 1, 0, 0, 0, 5, 0xbf, 0x84],
    &[0, 0, 3, 9, 4, 0, 0, 0, 5, 0x40, 0x01, b'a'],
    &[0, 0, 4, 0, 1, 0, 0, 0, 1, 1, 2, 3, 4],
    &[0, 0, 4, 3, 0, 0, 0, 0, 3, 0, 0, 0, 8],
    &[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
    &[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff],
    &[0x3f, 0xe1, 0x1f, 0x80 | 70, 0x41],
    &[0xff, 0xff, 0xff],
];

fn gen_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(prop::sample::select(FRAGMENTS.to_vec()), 0..8)
            .prop_map(|v| v.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_chunking_gives_identical_exchanges(
        gs in prop::collection::vec(gen_stream(), 1..5),
        order in prop::collection::vec(any::<usize>(), 0..40),
        group in prop::collection::vec(any::<bool>(), 0..40),
        server in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let side = if server { Side::Server } else { Side::Client };
        let (segs, want) = conversation(&gs, &order, &group, side);
        let whole = run(&segs, None);
        prop_assert_eq!(&by_id(whole.out.clone()), &want);
        prop_assert_eq!(whole.counters, Counters::default());
        let mut x = seed | 1;
        let cuts: Vec<Vec<usize>> = segs
            .iter()
            .map(|s| (0..xorshift(&mut x) % 6).map(|_| (xorshift(&mut x) % (s.bytes.len() as u64 + 1)) as usize).collect())
            .collect();
        let split = feed_all(&mut Http2Connection::new(Limits::default()), &segs, |k, _| cuts[k].clone());
        prop_assert_eq!(&split.out, &whole.out);
        prop_assert_eq!(&split.started, &whole.started);
    }

    #[test]
    fn capture_gaps_never_make_wrong_exchanges(
        gs in prop::collection::vec(gen_stream(), 1..5),
        order in prop::collection::vec(any::<usize>(), 0..40),
        group in prop::collection::vec(any::<bool>(), 0..40),
        seed in any::<u64>(),
    ) {
        let (segs, want) = conversation(&gs, &order, &group, Side::Client);
        let mut conn = Http2Connection::new(Limits::default());
        let mut out = Vec::new();
        let mut started = Vec::new();
        let mut x = seed | 1;
        for s in &segs {
            let b = &s.bytes[..];
            let keep = if xorshift(&mut x).is_multiple_of(3) {
                (xorshift(&mut x) % (b.len() as u64 + 1)) as usize
            } else {
                b.len()
            };
            let tail = ((xorshift(&mut x) % 65) as usize).min(b.len() - keep);
            let c = Chunk {
                total_len: b.len() as u32,
                bytes: &b[..keep],
                tail: &b[b.len() - tail..],
                ..chunk(s.dir, b, s.ts)
            };
            prop_assert_eq!(conn.feed(c, &mut out, &mut started), Feed::Continue);
        }
        conn.close(CLOSE_TS, &mut out);
        for e in &out {
            let w = want.iter().find(|w| w.seq == e.seq);
            prop_assert!(w.is_some(), "invented {:?}", e);
            let w = w.unwrap_or(&want[0]);
            if e.incomplete.is_none() {
                // grpc-status read through a table entry we lost stays None;
                // body sizes (no span carries them) may be off after a gap.
                // A request's END_STREAM in a gap: it ends at its last frame seen.
                prop_assert!(e.request_end_ns <= w.request_end_ns);
                let w = Exchange {
                    grpc_status: e.grpc_status.and(w.grpc_status),
                    request_end_ns: e.request_end_ns,
                    request_body_bytes: e.request_body_bytes,
                    response_body_bytes: e.response_body_bytes,
                    ..w.clone()
                };
                prop_assert_eq!(e, &w);
            }
            if !e.method.is_empty() {
                prop_assert_eq!(&e.method, &w.method);
            }
            if !e.path.is_empty() {
                prop_assert_eq!(&e.path, &w.path);
            }
            if let Some(st) = e.status {
                prop_assert_eq!(Some(st), w.status);
            }
            if e.grpc_status.is_some() {
                prop_assert_eq!(e.grpc_status, w.grpc_status);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic_and_stay_bounded(
        chunks in prop::collection::vec(
            (
                any::<bool>(),
                gen_bytes(),
                prop_oneof![4 => Just(0u32), 1 => 0u32..100],
                prop::bool::weighted(0.05),
                prop_oneof![3 => Just(Vec::new()), 1 => gen_bytes()],
            ),
            0..40,
        ),
        small in any::<bool>(),
        hint in prop::option::of(any::<bool>()),
    ) {
        let limits = if small { Limits { max_streams: 2, max_header_block: 64 } } else { Limits::default() };
        let mut conn = Http2Connection::new(limits);
        if let Some(h) = hint {
            conn.set_side_hint(if h { Side::Client } else { Side::Server });
        }
        let mut out = Vec::new();
        let mut started = Vec::new();
        let mut blocks = 0;
        for (k, (egress, bytes, gap, close, tail)) in chunks.iter().enumerate() {
            let d = if *egress { E } else { I };
            let total_len = (bytes.len() + tail.len()) as u32 + gap;
            let total_len = if *gap == 1 { 1 } else { total_len };
            let c = Chunk { direction: d, total_len, bytes, tail, ts_ns: k as u64, start_ns: k as u64 };
            let _ = conn.feed(c, &mut out, &mut started);
            prop_assert!(conn.tracked_streams() <= limits.max_streams);
            prop_assert!(conn.halves.iter().all(|h| h.block.len() <= limits.max_header_block));
            if *close {
                blocks += conn.header_blocks();
                conn.sh.blocks = 0;
                conn.close(k as u64, &mut out);
            }
        }
        conn.close(1000, &mut out);
        blocks += conn.header_blocks();
        prop_assert!(out.len() as u64 <= blocks, "{} exchanges from {} blocks", out.len(), blocks);
        prop_assert!(started.len() as u64 <= blocks);
        for e in &out {
            prop_assert!(e.request_start_ns <= e.request_end_ns);
        }
    }
}


/// A gRPC call on a connection joined mid-stream, every value in HPACK
/// entries made before: grpc-go's decoded blocks fill them in; the exchange
/// waits (parked) for the blocks of its response, and is let go as it is
/// by the connection's next read, or its end.
#[test]
fn decoded_blocks_fill_in_what_hpack_hid() {
    fn block(stream: u32, dir: Direction, fields: &[(&str, &str)]) -> DecodedBlock {
        let mut b = DecodedBlock::new(stream, dir);
        for (n, v) in fields {
            b.field(n.as_bytes(), v.as_bytes());
        }
        b
    }
    let request = [hf(3, false, &[&[0x83, 0x80 | 62, 0x80 | 63]]), data(3, FLAG_END_STREAM, 5)].concat();
    let response = [hf(3, false, &[&[0x80 | 64]]), data(3, 0, 7), hf(3, true, &[&[0x80 | 65]])].concat();
    let (mut out, mut started) = (Vec::new(), Vec::new());
    let mut conn = Http2Connection::new(Limits::default());
    conn.set_side_hint(Side::Client);
    conn.await_decoded_blocks();
    conn.feed(chunk(E, &request, 100), &mut out, &mut started);
    assert_eq!(started, vec![3]);
    let req = block(3, E, &[(":method", "POST"), (":path", "/demo.Greeter/SayHello?x"), ("content-type", "application/grpc")]);
    assert!(conn.apply_decoded(&req, &mut out));
    conn.feed(chunk(I, &response, 200), &mut out, &mut started);
    assert!(out.is_empty(), "status and grpc-status unknown: parked");
    assert_eq!(conn.parked(), 1);
    assert!(conn.apply_decoded(&block(3, I, &[(":status", "200"), ("content-type", "application/grpc")]), &mut out));
    assert!(out.is_empty(), "grpc-status still unknown");
    assert!(conn.apply_decoded(&block(3, I, &[("grpc-status", "5")]), &mut out));
    assert_eq!(out.len(), 1);
    let ex = &out[0];
    assert_eq!(
        (ex.method.as_str(), ex.path.as_str(), ex.has_query, ex.grpc, ex.status, ex.grpc_status, ex.incomplete),
        ("POST", "/demo.Greeter/SayHello", true, true, Some(200), Some(5), None)
    );
    assert_eq!(conn.counters().hpack_incomplete, 0);
    // A block for no stream is said so.
    assert!(!conn.apply_decoded(&block(99, I, &[(":status", "200")]), &mut out));

    // Stream 5: no block comes; the next read lets it go as it is.
    let request5 = [hf(5, true, &[&[0x83, 0x80 | 62]])].concat();
    let response5 = [hf(5, false, &[&[0x88]]), hf(5, true, &[&[0x80 | 65]])].concat();
    out.clear();
    conn.feed(chunk(E, &request5, 300), &mut out, &mut started);
    conn.feed(chunk(I, &response5, 400), &mut out, &mut started);
    assert!(out.is_empty());
    conn.feed(chunk(I, &data(7, 0, 1), 500), &mut out, &mut started);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].seq, out[0].incomplete, out[0].status), (5, Some("hpack_state"), Some(200)));
    assert_eq!(conn.counters().hpack_incomplete, 1);

    // Stream 9, parked at the connection's end: emitted by close.
    out.clear();
    conn.feed(chunk(E, &hf(9, true, &[&[0x83, 0x80 | 62]]), 600), &mut out, &mut started);
    conn.feed(chunk(I, &hf(9, true, &[&[0x88]]), 700), &mut out, &mut started);
    assert!(out.is_empty());
    conn.close(800, &mut out);
    assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![9]);

    // Without decoded blocks announced, nothing waits.
    let mut plain = Http2Connection::new(Limits::default());
    plain.set_side_hint(Side::Client);
    out.clear();
    plain.feed(chunk(E, &request5, 300), &mut out, &mut started);
    plain.feed(chunk(I, &response5, 400), &mut out, &mut started);
    assert_eq!(out.len(), 1);
}
