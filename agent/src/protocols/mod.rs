//! Protocol parsers: bytes in, messages out. No I/O, no BPF, fuzzable.
//!
//! Each stream protocol owns its parser state and hands the pipeline
//! protocol-neutral [`exchange::Exchange`]s. The pipeline only knows
//! [`StreamParser`] and [`detect`]: adding a protocol is a new module, a
//! variant here and a line in the detector.

pub mod dns;
pub mod exchange;
pub mod http1;
pub mod http2;
pub mod tls_records;

use exchange::{Chunk, Exchange, Feed, Side};

/// The parser of a TCP connection's (plaintext) byte stream.
pub enum StreamParser {
    Http1(Box<http1::Http1Connection>),
    Http2(Box<http2::Http2Connection>),
}

/// What the parsers counted, for the daemon's own metrics (cumulative per
/// connection; the pipeline adds the differences).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParserCounts {
    pub parse_errors: u64,
    pub http2: http2::Counters,
}

/// Which parser the first plaintext bytes of a connection call for: HTTP/2
/// (its client preface, or a run of well-formed frames on a connection that
/// started before Periscope), else HTTP/1, whose parser gives up on bytes
/// that are not HTTP.
pub fn detect(first: &[u8], total_len: u32, side: Option<Side>) -> StreamParser {
    let mut parser = match http2::detect(first, total_len) {
        http2::Detected::Preface | http2::Detected::Frames => {
            StreamParser::Http2(Box::new(http2::Http2Connection::new(http2::Limits::default())))
        }
        http2::Detected::No => StreamParser::Http1(Box::new(http1::Http1Connection::new(http1::Limits::default()))),
    };
    if let Some(side) = side {
        parser.set_side_hint(side);
    }
    parser
}

/// A connection parsed as HTTP/1 that has shown no HTTP/1 message yet may
/// turn out to be HTTP/2 joined mid-stream: its later chunks are checked.
pub fn redetect(parser: &StreamParser, bytes: &[u8], total_len: u32) -> bool {
    matches!(parser, StreamParser::Http1(p) if p.requests_seen() == 0)
        && matches!(http2::detect(bytes, total_len), http2::Detected::Frames | http2::Detected::Preface)
}

impl StreamParser {
    /// Feeds one chunk: finished exchanges go to `out`, the ids of requests
    /// whose head was just read to `started`.
    pub fn feed(&mut self, chunk: Chunk<'_>, out: &mut Vec<Exchange>, started: &mut Vec<u64>) -> Feed {
        match self {
            StreamParser::Http1(p) => {
                let before = p.requests_seen();
                let feed = p.feed(chunk, out);
                started.extend(before..p.requests_seen());
                feed
            }
            StreamParser::Http2(p) => p.feed(chunk, out, started),
        }
    }

    /// The connection ended: what is still open is flushed to `out`.
    pub fn close(&mut self, ts_ns: u64, out: &mut Vec<Exchange>) {
        match self {
            StreamParser::Http1(p) => p.close(ts_ns, out),
            StreamParser::Http2(p) => p.close(ts_ns, out),
        }
    }

    pub fn side(&self) -> Option<Side> {
        match self {
            StreamParser::Http1(p) => p.side(),
            StreamParser::Http2(p) => p.side(),
        }
    }

    pub fn set_side_hint(&mut self, side: Side) {
        match self {
            StreamParser::Http1(p) => p.set_side_hint(side),
            StreamParser::Http2(p) => p.set_side_hint(side),
        }
    }

    /// A started request's exchange so far (method, path, traceparent).
    pub fn pending_request(&self, seq: u64) -> Option<&Exchange> {
        match self {
            StreamParser::Http1(p) => p.pending_request(seq),
            StreamParser::Http2(p) => p.pending_request(seq),
        }
    }

    /// Whether request `seq` was read and its response has not started.
    pub fn awaiting_response(&self, seq: u64) -> bool {
        match self {
            StreamParser::Http1(p) => p.awaiting_response(seq),
            StreamParser::Http2(p) => p.awaiting_response(seq),
        }
    }

    /// Whether the kernel should copy more of each call (up to
    /// `WIDE_PAYLOAD_CAP`): an HTTP/2 call holds many frames, and a frame
    /// header beyond the capture costs the stream's framing and HPACK state.
    pub fn wants_whole_calls(&self) -> bool {
        matches!(self, StreamParser::Http2(_))
    }

    /// Whether exchanges end in the order their requests started (HTTP/1);
    /// HTTP/2 streams end in any order.
    pub fn ends_in_order(&self) -> bool {
        matches!(self, StreamParser::Http1(_))
    }

    /// The parser ignores the rest of the stream (an upgraded or tunnelled
    /// HTTP/1 connection): the kernel need not copy it.
    pub fn ignores_rest(&self) -> bool {
        match self {
            StreamParser::Http1(p) => p.is_upgraded(),
            StreamParser::Http2(_) => false,
        }
    }

    /// HTTP/2 only: see [`http2::Http2Connection::apply_decoded`]; false
    /// (nothing applied) for HTTP/1.
    pub fn apply_decoded(&mut self, block: &http2::DecodedBlock, out: &mut Vec<Exchange>) -> bool {
        match self {
            StreamParser::Http1(_) => false,
            StreamParser::Http2(p) => {
                p.await_decoded_blocks();
                p.apply_decoded(block, out)
            }
        }
    }

    /// Exchanges an HTTP/2 parser holds for decoded header blocks.
    pub fn parked(&self) -> usize {
        match self {
            StreamParser::Http1(_) => 0,
            StreamParser::Http2(p) => p.parked(),
        }
    }

    /// Emits what waits for decoded header blocks, as it is.
    pub fn release_parked(&mut self, out: &mut Vec<Exchange>) {
        if let StreamParser::Http2(p) = self {
            p.release_parked(out);
        }
    }

    pub fn counts(&self) -> ParserCounts {
        match self {
            StreamParser::Http1(p) => ParserCounts { parse_errors: p.errors(), ..Default::default() },
            StreamParser::Http2(p) => {
                let http2 = p.counters();
                ParserCounts { parse_errors: http2.desyncs + http2.hpack_errors, http2 }
            }
        }
    }
}
