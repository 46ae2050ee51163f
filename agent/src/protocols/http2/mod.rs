//! HTTP/2: captured socket bytes in, one [`Exchange`] per stream out.
//!
//! Pure and fuzzable: no I/O, no BPF, no clocks, nothing from the crate but
//! `super::exchange`. The caller feeds the chunks the kernel captured for
//! one TCP connection (both directions, in time order).
//!
//! * Frames ([`frames`]) are followed by count in each direction: a partial
//!   frame header (at most 9 octets) and header-block fragments are kept
//!   across chunks; DATA payloads, padding and everything else are skipped
//!   by count, never buffered. Uncaptured bytes of a chunk (`bytes` shorter
//!   than `total_len`) are skipped by count too while inside a payload, and
//!   the chunk's `tail` (its last bytes) is then parsed like the rest.
//! * A frame header that falls inside uncaptured bytes (or is malformed)
//!   loses that direction's sync: counted in `desyncs`, the streams open
//!   then end up `incomplete = "capture_gap"`, that direction's HPACK table
//!   is dropped for a fresh lenient one, and parsing resumes at the start
//!   of a later chunk that reads as a run of plausible frames (the same
//!   check as [`detect`]). A direction first seen mid-stream waits the same
//!   way, without counting a desync.
//! * HPACK ([`hpack`]): one decoder per direction, strict when the
//!   connection showed its preface (seen from its start), lenient
//!   otherwise or after an error or gap. A request whose `:method` or
//!   `:path` could not be read because of table entries we never saw is
//!   emitted with `incomplete = "hpack_state"` (counted); nothing is guessed.
//! * One exchange per client-initiated stream (`seq` = stream id), emitted
//!   when both END_STREAMs were seen, at RST_STREAM (either way;
//!   "stream_reset" unless the response had ended), at a GOAWAY from the
//!   responder for streams above its last-stream-id ("goaway"), or at
//!   [`Http2Connection::close`]. A GOAWAY from the requester names streams
//!   the responder initiated (pushes) and ends none of ours.
//! * PUSH_PROMISE header blocks are decoded (to keep the table in step)
//!   and dropped; pushed streams make no exchange (their responses arrive
//!   on streams no request opened and are ignored).
//! * Only `:method`, `:path` (query dropped), `:authority`/`host`,
//!   `user-agent`, `traceparent`, `content-length`, `:status` and
//!   `grpc-status` values are kept, and whether `content-type` starts with
//!   `application/grpc`. Never `grpc-message`, cookies, authorization or
//!   any other value.
//! * The side comes from the client preface, else the kernel's hint, else
//!   the first header block that shows `:method`/`:path` (requests) or
//!   `:status` (responses); blocks before that are not tracked.
//! * [`Feed::NotHttp`] only when `GIVE_UP_CHUNKS` chunks with data came and
//!   no frame was ever parsed on the connection.
//! * Bounded: at most `max_streams` streams per connection (a new one
//!   beyond it first evicts the oldest stream a desync left in doubt, else
//!   it is dropped and counted), at most `max_header_block` octets per header
//!   block (the rest is cut and counted, the stream is "header_too_large").

pub mod frames;
pub mod hpack;

use compact_str::CompactString;

pub use super::exchange::{Chunk, Direction, Exchange, Feed, HttpVersion, Side};
pub use frames::{Detected, detect};

use frames::{
    CONTINUATION, DATA, FLAG_END_HEADERS, FLAG_END_STREAM, FLAG_PADDED, FRAME_HEADER_LEN,
    FrameHeader, GOAWAY, HEADERS, PREFACE, PUSH_PROMISE, RST_STREAM, SETTINGS,
    SETTINGS_HEADER_TABLE_SIZE,
};
use hpack::{Field, HpackDecoder};

/// Chunks with data that show no frame before a connection is given up.
const GIVE_UP_CHUNKS: u32 = 16;

/// Bounds on what one connection may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Streams tracked per connection.
    pub max_streams: usize,
    /// Octets kept per header block (HEADERS or PUSH_PROMISE and its
    /// CONTINUATIONs).
    pub max_header_block: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams: 256,
            max_header_block: 16 * 1024,
        }
    }
}

/// What went wrong or was cut, cumulative over the connection's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Exchanges emitted with `incomplete = "hpack_state"`.
    pub hpack_incomplete: u64,
    /// New streams not tracked (over `max_streams`).
    pub streams_dropped: u64,
    /// Header-block octets beyond `max_header_block`.
    pub header_bytes_cut: u64,
    /// Times a direction lost frame sync (a frame header not captured, or malformed).
    pub desyncs: u64,
    /// Header blocks the HPACK decoder failed on (strict), or malformed.
    pub hpack_errors: u64,
}

/// HTTP/2 state of one TCP connection.
pub struct Http2Connection {
    halves: [Half; 2],
    sh: Shared,
    /// Exchanges complete but for values HPACK hid, waiting for the
    /// program's own decoded header blocks ([`Http2Connection::apply_decoded`]).
    parked: Vec<Stream>,
    hint: Option<Side>,
    dead: bool,
    unsynced_chunks: u32,
}

impl Http2Connection {
    pub fn new(limits: Limits) -> Self {
        let limits = Limits {
            max_streams: limits.max_streams.max(1),
            max_header_block: limits.max_header_block.max(64),
        };
        Http2Connection {
            halves: [Half::new(), Half::new()],
            sh: Shared {
                limits,
                streams: Vec::new(),
                side: None,
                counters: Counters::default(),
                synced: false,
                next_order: 0,
                blocks: 0,
                announced_table_size: None,
                other_unsynced: false,
                from_start: false,
                await_decoded: false,
                parked: Vec::new(),
            },
            parked: Vec::new(),
            hint: None,
            dead: false,
            unsynced_chunks: 0,
        }
    }

    /// From the kernel: connect => Client, accept => Server. The client
    /// preface, when seen, wins.
    pub fn set_side_hint(&mut self, side: Side) {
        self.hint = Some(side);
        if self.sh.side.is_none() {
            self.sh.side = Some(side);
        }
    }

    /// The process's side, once known (hint, preface, or the first header
    /// block that shows a request or a response).
    pub fn side(&self) -> Option<Side> {
        self.sh.side
    }

    /// Feed one captured chunk. Finished exchanges are appended to `out`;
    /// the stream id of each request whose header block was just decoded
    /// to `started`.
    pub fn feed(
        &mut self,
        chunk: Chunk<'_>,
        out: &mut Vec<Exchange>,
        started: &mut Vec<u64>,
    ) -> Feed {
        if self.dead {
            return Feed::NotHttp;
        }
        let bytes = chunk.bytes;
        let total = u64::from(chunk.total_len).max(bytes.len() as u64);
        let tail = if bytes.len() as u64 + chunk.tail.len() as u64 <= total {
            chunk.tail
        } else {
            &[]
        };
        let gap = total - bytes.len() as u64 - tail.len() as u64;
        let dir = chunk.direction;
        if dir == Direction::Ingress && !self.parked.is_empty() {
            // The program reads its next bytes only after it handled (and
            // reported) every header block of its previous read.
            self.release_parked(out);
        }
        let i = dir.idx();
        let mut cx = Ctx {
            dir,
            ts: chunk.ts_ns,
            call_start: chunk.start_ns.min(chunk.ts_ns),
            out,
            started,
        };
        let total32 = u32::try_from(total).unwrap_or(u32::MAX);
        let mut data = bytes;
        let half = &mut self.halves[i];
        let mut preface = false;
        let mut progress = false;
        match half.sync {
            Sync::Synced => {}
            Sync::Start if !data.is_empty() => {
                let want = &PREFACE[half.preface_at..];
                let k = want.len().min(data.len());
                if data[..k] == want[..k] {
                    half.preface_at += k;
                    data = &data[k..];
                    progress = true;
                    if half.preface_at == PREFACE.len() {
                        half.sync = Sync::Synced;
                        preface = true;
                    } else if gap > 0 {
                        half.sync = Sync::Lost;
                    }
                } else if half.preface_at == 0
                    && (self.sh.from_start || frames::plausible_run(data, total32))
                {
                    // Seen from the connection's start, this direction
                    // starts at a frame boundary.
                    half.sync = Sync::Synced;
                } else {
                    half.sync = Sync::Lost;
                }
            }
            Sync::Lost if !data.is_empty() && frames::plausible_run(data, total32) => {
                half.sync = Sync::Synced;
            }
            Sync::Start | Sync::Lost => {}
        }
        if half.sync != Sync::Synced && total > 0 && !progress {
            // Ignored while out of sync: the streams open now may have had
            // frames there.
            self.sh.mark_gap();
        }
        if preface {
            self.sh.from_start = true;
            self.sh.side = Some(match dir {
                Direction::Egress => Side::Client,
                Direction::Ingress => Side::Server,
            });
            // Seen from its start: both tables are known from empty.
            for h in &mut self.halves {
                if h.blocks_decoded == 0 && !h.desynced && h.sync != Sync::Lost {
                    h.hpack.set_strict();
                }
            }
        }
        self.sh.other_unsynced = self.halves[dir.other().idx()].sync != Sync::Synced;
        let half = &mut self.halves[i];
        if half.sync == Sync::Synced {
            self.sh.synced = true;
            half.input(data, &mut self.sh, &mut cx);
            if gap > 0 {
                half.skip(gap, &mut self.sh, &mut cx);
            }
            if !tail.is_empty() {
                half.input(tail, &mut self.sh, &mut cx);
            }
        }
        self.parked.append(&mut self.sh.parked);
        if let Some(size) = self.sh.announced_table_size.take() {
            // SETTINGS sent this way bound the table of the other direction.
            self.halves[dir.other().idx()]
                .hpack
                .set_allowed_table_size(size);
        }
        if !self.sh.synced && !bytes.is_empty() && !progress {
            self.unsynced_chunks += 1;
            if self.unsynced_chunks >= GIVE_UP_CHUNKS {
                self.dead = true;
                self.halves = [Half::new(), Half::new()];
                return Feed::NotHttp;
            }
        }
        Feed::Continue
    }

    /// The connection is gone at `ts_ns`: open streams are emitted
    /// ("connection_closed" if the response started, else "no_response").
    /// Afterwards the object is as new (side hint and counters kept).
    pub fn close(&mut self, ts_ns: u64, out: &mut Vec<Exchange>) {
        self.release_parked(out);
        let sh = &mut self.sh;
        sh.streams.sort_unstable_by_key(|s| s.id);
        for s in std::mem::take(&mut sh.streams) {
            let mut ex = s.ex;
            if s.stale && !s.resp_done {
                ex.incomplete.get_or_insert("capture_gap");
            }
            if !s.resp_started {
                ex.incomplete.get_or_insert("no_response");
            } else if !s.resp_done {
                ex.response_end_ns = Some(ts_ns);
                ex.incomplete.get_or_insert("connection_closed");
            }
            if !s.req_done {
                ex.incomplete.get_or_insert("connection_closed");
            }
            sh.count(&ex);
            out.push(ex);
        }
        self.halves = [Half::new(), Half::new()];
        sh.side = self.hint;
        sh.synced = false;
        sh.from_start = false;
        sh.announced_table_size = None;
        self.dead = false;
        self.unsynced_chunks = 0;
    }

    /// A started, unfinished stream's exchange so far (method, path,
    /// traceparent...).
    pub fn pending_request(&self, stream_id: u64) -> Option<&Exchange> {
        let id = u32::try_from(stream_id).ok()?;
        self.sh.streams.iter().find(|s| s.id == id).map(|s| &s.ex)
    }

    /// The request of `stream_id` was read and no final response HEADERS yet.
    pub fn awaiting_response(&self, stream_id: u64) -> bool {
        u32::try_from(stream_id).is_ok_and(|id| {
            self.sh
                .streams
                .iter()
                .any(|s| s.id == id && !s.resp_started)
        })
    }

    pub fn counters(&self) -> Counters {
        self.sh.counters
    }

    /// The program reports its header blocks decoded (grpc-go's probes):
    /// from now on an exchange that lacks a value HPACK hid waits for them.
    pub fn await_decoded_blocks(&mut self) {
        self.sh.await_decoded = true;
    }

    /// Exchanges waiting for decoded header blocks.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Emits the parked exchanges as they are.
    pub fn release_parked(&mut self, out: &mut Vec<Exchange>) {
        for s in std::mem::take(&mut self.parked) {
            self.sh.emit_stream(s, out);
        }
    }

    /// A header block as the program decoded it: fills in, on its stream,
    /// the values that HPACK state we never saw hid (what the bytes showed
    /// stays). A parked exchange that now has them all is emitted. Returns
    /// whether the block's stream was found.
    pub fn apply_decoded(&mut self, block: &DecodedBlock, out: &mut Vec<Exchange>) -> bool {
        let Some(req_dir) = self.sh.req_dir() else {
            return false;
        };
        let is_req = block.direction == req_dir;
        if let Some(k) = self.sh.find(block.stream) {
            fill_in(&mut self.sh.streams[k].ex, &block.fields, is_req);
            return true;
        }
        let Some(k) = self.parked.iter().position(|s| s.id == block.stream) else {
            return false;
        };
        fill_in(&mut self.parked[k].ex, &block.fields, is_req);
        if !lacks_decoded_values(&self.parked[k].ex) {
            let s = self.parked.swap_remove(k);
            self.sh.emit_stream(s, out);
        }
        true
    }

    /// Streams tracked now (at most `max_streams`).
    #[allow(dead_code)] // tests and the fuzz target
    pub fn tracked_streams(&self) -> usize {
        self.sh.streams.len()
    }

    /// Header blocks of HEADERS frames decoded so far (each exchange takes
    /// at least one).
    #[allow(dead_code)] // tests and the fuzz target
    pub fn header_blocks(&self) -> u64 {
        self.sh.blocks
    }
}

/// Summary only: buffered header blocks may hold secrets and are never printed.
impl std::fmt::Debug for Http2Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Connection")
            .field("side", &self.sh.side)
            .field("streams", &self.sh.streams.len())
            .field("counters", &self.sh.counters)
            .field("not_http2", &self.dead)
            .finish_non_exhaustive()
    }
}

fn req_dir_of(side: Side) -> Direction {
    match side {
        Side::Client => Direction::Egress,
        Side::Server => Direction::Ingress,
    }
}

/// The side of a process whose requests go `req_dir`.
fn side_of(req_dir: Direction) -> Side {
    match req_dir {
        Direction::Egress => Side::Client,
        Direction::Ingress => Side::Server,
    }
}

/// The chunk being fed.
struct Ctx<'a> {
    dir: Direction,
    ts: u64,
    /// When the call began (`start_ns`, never after `ts`).
    call_start: u64,
    out: &'a mut Vec<Exchange>,
    started: &'a mut Vec<u64>,
}

struct Stream {
    id: u32,
    ex: Exchange,
    req_done: bool,
    resp_started: bool,
    resp_done: bool,
    /// Open when a direction lost sync (or opened while the other
    /// direction was out of sync): its end may never be seen, so it is the
    /// first to go when `max_streams` is reached.
    stale: bool,
    order: u64,
}

/// Connection state both directions share.
struct Shared {
    limits: Limits,
    streams: Vec<Stream>,
    side: Option<Side>,
    counters: Counters,
    /// A frame was parsed on this connection.
    synced: bool,
    next_order: u64,
    blocks: u64,
    /// SETTINGS_HEADER_TABLE_SIZE announced in the chunk being fed.
    announced_table_size: Option<u32>,
    /// The direction opposite the chunk being fed is not in sync: a
    /// stream opened now may have frames there we will never see.
    other_unsynced: bool,
    /// The connection's program reports its decoded header blocks: an
    /// exchange missing what HPACK hid is parked, not emitted.
    await_decoded: bool,
    /// Parked by the chunk being fed; moved to `Http2Connection::parked`.
    parked: Vec<Stream>,
    /// The client preface was seen: the connection is known from its start.
    from_start: bool,
}

impl Shared {
    fn req_dir(&self) -> Option<Direction> {
        self.side.map(req_dir_of)
    }

    fn find(&self, id: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    /// Frames of the streams open now may have been missed. Such a stream
    /// is only marked `capture_gap` if it then lacks what a span shows (its
    /// request head or response status) or never shows its end: the gap
    /// may have held nothing of it but DATA, whose size no span carries.
    fn mark_gap(&mut self) {
        for s in &mut self.streams {
            s.stale = true;
        }
    }

    fn count(&mut self, ex: &Exchange) {
        if ex.incomplete == Some("hpack_state") {
            self.counters.hpack_incomplete += 1;
        }
    }

    fn emit(&mut self, k: usize, out: &mut Vec<Exchange>) {
        let s = self.streams.swap_remove(k);
        self.emit_stream(s, out);
    }

    fn emit_stream(&mut self, mut s: Stream, out: &mut Vec<Exchange>) {
        let ended = s.req_done && s.resp_done;
        // A stream cut short after a gap: the gap is the likelier reason.
        let replaceable = matches!(s.ex.incomplete, None | Some("connection_closed" | "no_response"));
        if s.stale && replaceable && (!ended || s.ex.status.is_none() || s.ex.path.is_empty()) {
            s.ex.incomplete = Some("capture_gap");
        }
        self.count(&s.ex);
        out.push(s.ex);
    }

    fn emit_if_done(&mut self, k: usize, out: &mut Vec<Exchange>) {
        let s = &mut self.streams[k];
        // A request whose end a gap hid is over once its response is.
        if s.resp_done && (s.req_done || s.stale) {
            s.req_done = true;
            if self.await_decoded && lacks_decoded_values(&s.ex) {
                let s = self.streams.swap_remove(k);
                self.parked.push(s);
                return;
            }
            self.emit(k, out);
        }
    }

    /// Room for one more stream: evicts the oldest stream a desync left
    /// in doubt if needed.
    fn make_room(&mut self, out: &mut Vec<Exchange>) -> bool {
        if self.streams.len() < self.limits.max_streams {
            return true;
        }
        let stale = (self.streams.iter().enumerate())
            .filter(|(_, s)| s.stale)
            .min_by_key(|(_, s)| s.order)
            .map(|(k, _)| k);
        match stale {
            Some(k) => {
                self.streams[k].ex.incomplete.get_or_insert("capture_gap");
                self.emit(k, out);
                true
            }
            None => false,
        }
    }

    /// A header block (HEADERS + CONTINUATIONs) was decoded.
    fn on_headers(
        &mut self,
        cx: &mut Ctx<'_>,
        b: BlockMeta,
        f: Fields,
        reason: Option<&'static str>,
    ) {
        self.blocks += 1;
        let is_req = match self.req_dir() {
            Some(r) => r == cx.dir,
            None if f.request_pseudo => {
                self.side = Some(side_of(cx.dir));
                true
            }
            None if f.status.is_some() => {
                self.side = Some(side_of(cx.dir.other()));
                false
            }
            None => return,
        };
        let found = self.find(b.stream);
        if is_req {
            if let Some(k) = found {
                // Trailers of the request (or a protocol error).
                let s = &mut self.streams[k];
                if !s.req_done {
                    s.ex.request_end_ns = cx.ts;
                    if let Some(r) = reason {
                        s.ex.incomplete.get_or_insert(r);
                    }
                    s.req_done = b.end_stream;
                    self.emit_if_done(k, cx.out);
                }
                return;
            }
            if !self.make_room(cx.out) {
                self.counters.streams_dropped += 1;
                return;
            }
            let incomplete = reason.or_else(|| {
                (f.unknown > 0 && (f.method.is_none() || f.path.is_none())).then_some("hpack_state")
            });
            let grpc = f.grpc || (f.unknown > 0 && looks_like_grpc_call(f.method.as_deref(), f.path.as_deref()));
            let ex = Exchange {
                side: self.side.unwrap_or(Side::Client),
                method: f.method.unwrap_or_default(),
                path: f.path.unwrap_or_default(),
                has_query: f.has_query,
                version: HttpVersion::Http2,
                host: f.authority.or(f.host),
                user_agent: f.user_agent,
                traceparent: f.traceparent,
                request_content_length: f.content_length,
                grpc,
                grpc_status: None,
                status: None,
                request_body_bytes: 0,
                response_body_bytes: 0,
                request_start_ns: b.start_ts,
                request_end_ns: cx.ts,
                response_start_ns: None,
                response_end_ns: None,
                incomplete,
                seq: u64::from(b.stream),
            };
            self.next_order += 1;
            self.streams.push(Stream {
                id: b.stream,
                ex,
                req_done: b.end_stream,
                resp_started: false,
                resp_done: false,
                stale: self.other_unsynced,
                order: self.next_order,
            });
            cx.started.push(u64::from(b.stream));
        } else {
            // A response to a request we did not see, or to a pushed
            // stream: no exchange.
            let Some(k) = found else {
                return;
            };
            let s = &mut self.streams[k];
            if s.resp_done {
                return;
            }
            if !s.resp_started {
                if matches!(f.status, Some(100..=199)) && !b.end_stream {
                    return; // informational
                }
                s.resp_started = true;
                s.ex.status = f.status;
                s.ex.response_start_ns = Some(b.start_ts);
            }
            if f.grpc_status.is_some() {
                s.ex.grpc_status = f.grpc_status;
            }
            s.ex.response_end_ns = Some(cx.ts);
            if let Some(r) = reason {
                s.ex.incomplete.get_or_insert(r);
            }
            s.resp_done = b.end_stream;
            self.emit_if_done(k, cx.out);
        }
    }

    fn on_data(&mut self, cx: &mut Ctx<'_>, stream: u32, body: u64, end_stream: bool) {
        let Some(k) = self.find(stream) else {
            return;
        };
        let is_req = self.req_dir() == Some(cx.dir);
        let s = &mut self.streams[k];
        if is_req {
            if s.req_done {
                return;
            }
            s.ex.request_body_bytes = s.ex.request_body_bytes.saturating_add(body);
            s.ex.request_end_ns = cx.ts;
            s.req_done = end_stream;
        } else {
            if !s.resp_started || s.resp_done {
                return;
            }
            s.ex.response_body_bytes = s.ex.response_body_bytes.saturating_add(body);
            s.ex.response_end_ns = Some(cx.ts);
            s.resp_done = end_stream;
        }
        self.emit_if_done(k, cx.out);
    }

    fn on_reset(&mut self, cx: &mut Ctx<'_>, stream: u32) {
        let Some(k) = self.find(stream) else {
            return;
        };
        let s = &mut self.streams[k];
        if !s.resp_done {
            s.ex.incomplete.get_or_insert("stream_reset");
            s.ex.response_end_ns = Some(cx.ts);
        }
        self.emit(k, cx.out);
    }

    fn on_goaway(&mut self, cx: &mut Ctx<'_>, last: u32) {
        // Only the responder's GOAWAY names streams the requester opened.
        if self.req_dir() != Some(cx.dir.other()) {
            return;
        }
        self.streams.sort_unstable_by_key(|s| s.id);
        let mut k = 0;
        while k < self.streams.len() {
            if self.streams[k].id > last {
                let mut s = self.streams.remove(k);
                s.ex.incomplete.get_or_insert("goaway");
                s.ex.response_end_ns = Some(cx.ts);
                self.count(&s.ex);
                cx.out.push(s.ex);
            } else {
                k += 1;
            }
        }
    }
}

/// One header block as the traced program's own HTTP/2 library decoded it
/// (grpc-go's probes report them), for [`Http2Connection::apply_decoded`].
pub struct DecodedBlock {
    pub stream: u32,
    /// Which way the block went, seen from the program.
    pub direction: Direction,
    fields: Fields,
}

impl DecodedBlock {
    pub fn new(stream: u32, direction: Direction) -> Self {
        DecodedBlock { stream, direction, fields: Fields::default() }
    }

    /// One decoded field (only the names [`Fields`] keeps matter).
    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        self.fields.on(Field::Known(name, value));
    }
}

/// Whether a finished exchange lacks what a decoded block could give: its
/// request's method or path, its status, or a gRPC call's grpc-status.
fn lacks_decoded_values(ex: &Exchange) -> bool {
    ex.incomplete == Some("hpack_state")
        || ex.method.is_empty()
        || ex.path.is_empty()
        || ex.status.is_none()
        || (ex.grpc && ex.grpc_status.is_none())
}

/// Fills `ex`'s missing values from a decoded block of its request
/// (`is_req`) or of its response.
fn fill_in(ex: &mut Exchange, f: &Fields, is_req: bool) {
    if is_req {
        if ex.method.is_empty()
            && let Some(m) = &f.method
        {
            ex.method = m.clone();
        }
        if ex.path.is_empty()
            && let Some(p) = &f.path
        {
            ex.path = p.clone();
            ex.has_query = f.has_query;
        }
        if ex.host.is_none() {
            ex.host = f.authority.clone().or_else(|| f.host.clone());
        }
        ex.grpc |= f.grpc;
        if ex.incomplete == Some("hpack_state") && !ex.method.is_empty() && !ex.path.is_empty() {
            ex.incomplete = None;
        }
    } else {
        if ex.status.is_none() {
            ex.status = f.status;
        }
        if ex.grpc_status.is_none() {
            ex.grpc_status = f.grpc_status;
        }
    }
}

/// The values kept from one header block.
#[derive(Default)]
struct Fields {
    method: Option<CompactString>,
    path: Option<CompactString>,
    has_query: bool,
    authority: Option<CompactString>,
    host: Option<CompactString>,
    user_agent: Option<CompactString>,
    traceparent: Option<CompactString>,
    content_length: Option<u64>,
    grpc: bool,
    status: Option<u16>,
    grpc_status: Option<u32>,
    /// A request pseudo-header was read.
    request_pseudo: bool,
    /// Fields that could not be read (HPACK state we never saw).
    unknown: u32,
}

impl Fields {
    fn on(&mut self, field: Field<'_>) {
        let (name, v) = match field {
            Field::Known(n, v) => (n, v),
            Field::Unknown => {
                self.unknown += 1;
                return;
            }
            Field::Restart => {
                *self = Fields::default();
                return;
            }
        };
        match name {
            b":method" => {
                self.request_pseudo = true;
                set_text(&mut self.method, v);
            }
            b":path" => {
                self.request_pseudo = true;
                if self.path.is_none() {
                    let end = v
                        .iter()
                        .position(|&c| c == b'?' || c == b'#')
                        .unwrap_or(v.len());
                    self.has_query = v.get(end) == Some(&b'?');
                    self.path = Some(text(&v[..end]));
                }
            }
            b":authority" => {
                self.request_pseudo = true;
                if !v.is_empty() {
                    set_text(&mut self.authority, v);
                }
            }
            b":scheme" => self.request_pseudo = true,
            b"host" if !v.is_empty() => set_text(&mut self.host, v),
            b"user-agent" => set_text(&mut self.user_agent, v),
            b"traceparent" => set_text(&mut self.traceparent, v),
            b"content-length" if self.content_length.is_none() => {
                self.content_length = parse_num(v)
            }
            b"content-type" => self.grpc |= v.starts_with(b"application/grpc"),
            b":status" if self.status.is_none() => {
                self.status = parse_num(v)
                    .and_then(|s| u16::try_from(s).ok())
                    .filter(|s| (100..1000).contains(s));
            }
            b"grpc-status" if self.grpc_status.is_none() => {
                self.grpc_status = parse_num(v).and_then(|s| u32::try_from(s).ok());
            }
            _ => {}
        }
    }
}

/// A request whose content-type could not be read (an HPACK entry made
/// before Periscope saw the connection) is a gRPC call when it has gRPC's
/// shape: POST to `/package.Service/Method`.
fn looks_like_grpc_call(method: Option<&str>, path: Option<&str>) -> bool {
    method == Some("POST") && path.and_then(super::exchange::grpc_path).is_some_and(|(service, _)| service.contains('.'))
}

fn text(v: &[u8]) -> CompactString {
    match std::str::from_utf8(v) {
        Ok(s) => CompactString::from(s),
        Err(_) => CompactString::from_utf8_lossy(v),
    }
}

fn set_text(slot: &mut Option<CompactString>, v: &[u8]) {
    if slot.is_none() {
        *slot = Some(text(v));
    }
}

/// Decimal digits only, at most 19 of them.
fn parse_num(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sync {
    /// Nothing parsed yet: the preface or a plausible run of frames starts it.
    Start,
    Synced,
    /// Frame sync lost: a later chunk must start with plausible frames.
    Lost,
}

/// The frame being read.
#[derive(Clone, Copy)]
struct Cur {
    h: FrameHeader,
    /// Payload octets consumed.
    pos: u32,
    /// Payload octets of fixed fields read (see [`FrameHeader::prefix_len`]),
    /// then `[pre_need, content_end)` is content, the rest padding.
    pre_need: u32,
    pre: [u8; 8],
    /// Part of the prefix was not captured.
    pre_lost: bool,
    content_end: u32,
    /// SETTINGS: part of the payload was not captured.
    settings_lost: bool,
}

/// The header block being assembled.
#[derive(Clone, Copy)]
struct BlockMeta {
    stream: u32,
    push: bool,
    end_stream: bool,
    /// Call start of the chunk holding the first frame's header.
    start_ts: u64,
    /// Longer than `max_header_block`.
    cut: bool,
    /// Part of it was not captured.
    gap: bool,
}

/// One direction of the connection.
struct Half {
    sync: Sync,
    /// Preface octets matched at the start of this direction.
    preface_at: usize,
    hdr: [u8; FRAME_HEADER_LEN],
    hdr_len: usize,
    frame: Option<Cur>,
    block: Vec<u8>,
    blk: Option<BlockMeta>,
    hpack: HpackDecoder,
    blocks_decoded: u64,
    desynced: bool,
}

impl Half {
    fn new() -> Self {
        Half {
            sync: Sync::Start,
            preface_at: 0,
            hdr: [0; FRAME_HEADER_LEN],
            hdr_len: 0,
            frame: None,
            block: Vec::new(),
            blk: None,
            hpack: HpackDecoder::new(true),
            blocks_decoded: 0,
            desynced: false,
        }
    }

    /// Captured bytes, in sync.
    fn input(&mut self, mut data: &[u8], sh: &mut Shared, cx: &mut Ctx<'_>) {
        while !data.is_empty() && self.sync == Sync::Synced {
            if let Some(cur) = &self.frame {
                let take = ((cur.h.len - cur.pos) as usize).min(data.len());
                let (now, rest) = data.split_at(take);
                self.payload(Some(now), take as u32, sh);
                data = rest;
                self.end_frame_if_done(sh, cx);
            } else {
                let take = (FRAME_HEADER_LEN - self.hdr_len).min(data.len());
                self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&data[..take]);
                self.hdr_len += take;
                data = &data[take..];
                if self.hdr_len == FRAME_HEADER_LEN {
                    self.hdr_len = 0;
                    let h = FrameHeader::parse(&self.hdr);
                    self.start_frame(h, sh, cx);
                }
            }
        }
    }

    /// `n` uncaptured bytes.
    fn skip(&mut self, mut n: u64, sh: &mut Shared, cx: &mut Ctx<'_>) {
        while n > 0 && self.sync == Sync::Synced {
            match &self.frame {
                Some(cur) => {
                    let take = u64::from(cur.h.len - cur.pos).min(n);
                    self.payload(None, take as u32, sh);
                    n -= take;
                    self.end_frame_if_done(sh, cx);
                }
                // A frame header is in the uncaptured bytes.
                None => self.lose_sync(sh, cx),
            }
        }
    }

    fn start_frame(&mut self, h: FrameHeader, sh: &mut Shared, cx: &mut Ctx<'_>) {
        if !h.is_valid() {
            self.lose_sync(sh, cx);
            return;
        }
        if let Some(b) = self.blk
            && (h.ty != CONTINUATION || h.stream != b.stream)
        {
            // A header block must go on with CONTINUATIONs of its stream.
            self.finish_block(sh, cx, Some("bad_framing"));
        }
        let mut cur = Cur {
            h,
            pos: 0,
            pre_need: h.prefix_len(),
            pre: [0; 8],
            pre_lost: false,
            content_end: h.len,
            settings_lost: false,
        };
        let malformed = h.len < cur.pre_need;
        if malformed {
            // Padding or fields longer than the frame: ignore its content.
            cur.pre_need = 0;
            cur.content_end = 0;
        }
        if (h.ty == HEADERS || h.ty == PUSH_PROMISE) && !malformed {
            self.block.clear();
            self.blk = Some(BlockMeta {
                stream: h.stream,
                push: h.ty == PUSH_PROMISE,
                end_stream: h.ty == HEADERS && h.has(FLAG_END_STREAM),
                start_ts: cx.call_start,
                cut: false,
                gap: false,
            });
        }
        self.frame = Some(cur);
        self.end_frame_if_done(sh, cx);
    }

    /// `n` payload octets of the current frame: `data` holds them, or
    /// they were not captured.
    fn payload(&mut self, data: Option<&[u8]>, n: u32, sh: &mut Shared) {
        let Some(cur) = self.frame.as_mut() else {
            return;
        };
        let mut off = 0u32;
        while off < n {
            let left = n - off;
            let piece = |off: u32, take: u32| data.map(|d| &d[off as usize..(off + take) as usize]);
            if cur.pos < cur.pre_need {
                let take = (cur.pre_need - cur.pos).min(left);
                match piece(off, take) {
                    Some(p) => {
                        cur.pre[cur.pos as usize..(cur.pos + take) as usize].copy_from_slice(p)
                    }
                    None => {
                        cur.pre_lost = true;
                        if let Some(b) = self.blk.as_mut() {
                            b.gap = true;
                        }
                    }
                }
                cur.pos += take;
                off += take;
                if cur.pos == cur.pre_need {
                    let pad = if cur.h.has(FLAG_PADDED) && !cur.pre_lost {
                        u32::from(cur.pre[0])
                    } else {
                        0
                    };
                    cur.content_end = if pad <= cur.h.len - cur.pre_need {
                        cur.h.len - pad
                    } else {
                        cur.pre_need
                    };
                }
            } else if cur.pos < cur.content_end {
                let take = (cur.content_end - cur.pos).min(left);
                match cur.h.ty {
                    HEADERS | PUSH_PROMISE | CONTINUATION => {
                        if let Some(b) = self.blk.as_mut()
                            && b.stream == cur.h.stream
                        {
                            match piece(off, take) {
                                None => b.gap = true,
                                Some(_) if b.gap => {}
                                Some(p) if b.cut => sh.counters.header_bytes_cut += p.len() as u64,
                                Some(p) => {
                                    let room =
                                        sh.limits.max_header_block.saturating_sub(self.block.len());
                                    let keep = room.min(p.len());
                                    self.block.extend_from_slice(&p[..keep]);
                                    if keep < p.len() {
                                        b.cut = true;
                                        sh.counters.header_bytes_cut += (p.len() - keep) as u64;
                                    }
                                }
                            }
                        }
                    }
                    SETTINGS => match piece(off, take) {
                        None => cur.settings_lost = true,
                        Some(_) if cur.settings_lost => {}
                        Some(p) => {
                            // 6-octet records; the partial one lives in `pre`.
                            for (j, &byte) in p.iter().enumerate() {
                                let at = ((cur.pos as usize) + j) % 6;
                                cur.pre[at] = byte;
                                if at == 5
                                    && u16::from_be_bytes([cur.pre[0], cur.pre[1]])
                                        == SETTINGS_HEADER_TABLE_SIZE
                                {
                                    let v = u32::from_be_bytes([
                                        cur.pre[2], cur.pre[3], cur.pre[4], cur.pre[5],
                                    ]);
                                    let a = sh.announced_table_size.get_or_insert(v);
                                    *a = (*a).max(v);
                                }
                            }
                        }
                    },
                    _ => {}
                }
                cur.pos += take;
                off += take;
            } else {
                let take = (cur.h.len - cur.pos).min(left);
                cur.pos += take;
                off += take;
            }
        }
    }

    fn end_frame_if_done(&mut self, sh: &mut Shared, cx: &mut Ctx<'_>) {
        let Some(cur) = self.frame else {
            return;
        };
        if cur.pos < cur.h.len {
            return;
        }
        self.frame = None;
        let h = cur.h;
        match h.ty {
            DATA => {
                let body = cur.content_end.saturating_sub(cur.pre_need);
                sh.on_data(cx, h.stream, u64::from(body), h.has(FLAG_END_STREAM));
            }
            HEADERS | PUSH_PROMISE | CONTINUATION
                if h.has(FLAG_END_HEADERS) && self.blk.is_some_and(|b| b.stream == h.stream) =>
            {
                self.finish_block(sh, cx, None);
            }
            RST_STREAM => sh.on_reset(cx, h.stream),
            GOAWAY if !cur.pre_lost && cur.pre_need == 8 => {
                let last = u32::from_be_bytes([cur.pre[0], cur.pre[1], cur.pre[2], cur.pre[3]])
                    & 0x7fff_ffff;
                sh.on_goaway(cx, last);
            }
            _ => {}
        }
    }

    /// The header block is over (END_HEADERS), or will never be
    /// (`reason`): decode it and hand the fields to the stream.
    fn finish_block(&mut self, sh: &mut Shared, cx: &mut Ctx<'_>, reason: Option<&'static str>) {
        let Some(b) = self.blk.take() else {
            return;
        };
        let reason = if b.cut {
            Some("header_too_large")
        } else if b.gap {
            Some("capture_gap")
        } else {
            reason
        };
        let mut f = Fields::default();
        // A direction known to carry responses only needs :status and
        // grpc-status: the request-only fields are not decoded there.
        self.hpack.set_responses_only(sh.req_dir().is_some_and(|d| d != cx.dir));
        if reason.is_none() {
            if self.hpack.decode_block(&self.block, &mut |e| f.on(e)) {
                sh.counters.hpack_errors += 1;
            }
        } else {
            self.hpack.decode_partial(&self.block, &mut |e| f.on(e));
        }
        self.blocks_decoded += 1;
        self.block.clear();
        if !b.push {
            sh.on_headers(cx, b, f, reason);
        }
    }

    fn lose_sync(&mut self, sh: &mut Shared, cx: &mut Ctx<'_>) {
        sh.counters.desyncs += 1;
        self.sync = Sync::Lost;
        self.desynced = true;
        self.frame = None;
        self.hdr_len = 0;
        if self.blk.is_some() {
            self.finish_block(sh, cx, Some("capture_gap"));
        }
        self.hpack.reset_lenient();
        sh.mark_gap();
    }
}

#[cfg(test)]
mod tests;
