//! HTTP/1.x: captured socket bytes in, request/response exchanges out.
//!
//! Pure and fuzzable: no I/O, no BPF, no clocks. The caller feeds the chunks
//! the kernel captured for one TCP connection (both directions, in time
//! order) and gets back [`Exchange`]s: one per request, paired FIFO with its
//! response.
//!
//! Heads (request line, status line, header fields, chunked trailers) are
//! parsed by `httparse`; body framing (Content-Length, chunked, close
//! delimited) is done here, by byte count, so a body never has to be buffered
//! and a capture gap inside a body costs nothing.
//!
//! Rules worth knowing:
//! * Only head bytes are buffered (at most `max_header_bytes` per direction);
//!   at most `max_pending` requests wait for their responses.
//! * Only four header values are kept (Host, User-Agent, traceparent,
//!   Content-Length); never Authorization, Cookie or any other. Query strings
//!   are dropped, only their existence is recorded.
//! * A direction that loses sync (gap inside a head or chunked framing,
//!   malformed data) resynchronises at the start of a later chunk that begins
//!   a message. Exchanges touched by this say so in `incomplete`.
//! * A chunk may also carry the last bytes of its call (`tail`), after an
//!   uncaptured middle. Framing that can be followed by count (Content-Length
//!   bodies, chunk data) continues into the tail, and a message that begins
//!   there is parsed. A chunked body whose framing a gap hid ends where the
//!   end of a later call (its tail, or the whole call when fully captured) in
//!   that direction shows the last-chunk line, trailers and final CRLF; its
//!   body size is then approximate (uncaptured framing counts as body).
//! * A message whose end could not be seen ends at the last chunk that
//!   belonged to it, not at the event that revealed it was over.
//! * A connection first seen mid-stream is given `resync_chunks` chunks per
//!   direction to show a message start; well-known non-HTTP openings (TLS
//!   records, PostgreSQL startup, Redis RESP, the HTTP/2 preface) end it at
//!   once.

use std::collections::VecDeque;

use std::mem::MaybeUninit;

use compact_str::CompactString;
use httparse::{EMPTY_HEADER, Header, ParserConfig, Status};

pub use super::exchange::{Chunk, Direction, Exchange, Feed, HttpVersion, Side};

/// Header fields one head may carry; more is a protocol error.
const MAX_HEADERS: usize = 128;
/// A head buffer that grew past this is given back after use.
const KEEP_BUF_CAPACITY: usize = 8 * 1024;

/// Bounds on what one connection may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest head (request/status line plus header fields) accepted.
    pub max_header_bytes: usize,
    /// Requests waiting for a response; beyond it the oldest is dropped.
    pub max_pending: usize,
    /// Chunks per direction without a message start before giving up on a
    /// connection that has not shown any HTTP yet.
    pub resync_chunks: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_pending: 64,
            resync_chunks: 8,
        }
    }
}

/// HTTP/1.x state of one TCP connection.
pub struct Http1Connection {
    streams: [Stream; 2],
    sh: Shared,
    hint: Option<Side>,
    dead: bool,
}

impl Http1Connection {
    pub fn new(limits: Limits) -> Self {
        let limits = Limits {
            max_pending: limits.max_pending.max(1),
            ..limits
        };
        let mut cfg = ParserConfig::default();
        cfg.allow_spaces_after_header_name_in_responses(true)
            .allow_obsolete_multiline_headers_in_responses(true)
            .allow_multiple_spaces_in_response_status_delimiters(true)
            .ignore_invalid_headers_in_responses(true)
            .ignore_invalid_headers_in_requests(true);
        Http1Connection {
            streams: [
                Stream::new(Direction::Egress),
                Stream::new(Direction::Ingress),
            ],
            sh: Shared {
                limits,
                cfg,
                pending: VecDeque::new(),
                next_id: 0,
                req_dir: None,
                errors: 0,
                upgraded: false,
                synced: false,
            },
            hint: None,
            dead: false,
        }
    }

    /// Optional hint from the kernel (who connected); without it, the side
    /// is inferred from which direction carries requests. With it, only
    /// requests are accepted in the request direction and only responses in
    /// the other. Ignored once the side is known.
    pub fn set_side_hint(&mut self, side: Side) {
        if self.sh.req_dir.is_none() {
            self.hint = Some(side);
            self.sh.req_dir = Some(req_dir_of(side));
        }
    }

    /// The process's side, once known (hint or first message).
    pub fn side(&self) -> Option<Side> {
        self.sh.side()
    }

    /// True after 101 Switching Protocols or a successful CONNECT: the rest
    /// of the connection is not HTTP/1.x and every later chunk is ignored.
    pub fn is_upgraded(&self) -> bool {
        self.sh.upgraded
    }

    /// Feed one captured chunk. Finished exchanges are appended to `out`.
    pub fn feed(&mut self, chunk: Chunk<'_>, out: &mut Vec<Exchange>) -> Feed {
        if self.dead {
            return Feed::NotHttp;
        }
        if self.sh.upgraded {
            return Feed::Continue;
        }
        let bytes = chunk.bytes;
        let total = u64::from(chunk.total_len).max(bytes.len() as u64);
        let tail = if bytes.len() as u64 + chunk.tail.len() as u64 <= total {
            chunk.tail
        } else {
            &[]
        };
        let gap = total - bytes.len() as u64 - tail.len() as u64;
        let i = chunk.direction.idx();
        let unsynced_seek = !self.sh.synced && matches!(self.streams[i].state, State::Seeking);
        if unsynced_seek && !bytes.is_empty() && looks_like_other_protocol(bytes) {
            return self.give_up();
        }
        self.streams[i].call_start_ts = chunk.start_ns.min(chunk.ts_ns);
        self.streams[i].feed(&mut self.sh, bytes, gap, tail, chunk.ts_ns);
        if !self.sh.synced && !bytes.is_empty() && matches!(self.streams[i].state, State::Seeking) {
            let s = &mut self.streams[i];
            s.misses = s.misses.saturating_add(1);
            if s.misses >= self.sh.limits.resync_chunks {
                return self.give_up();
            }
        }
        self.sh.emit_ready(out);
        Feed::Continue
    }

    /// The connection closed at `ts_ns`: finish a response delimited by
    /// close, flush pending requests as incomplete. Afterwards the object is
    /// as new (side hint and error count kept).
    pub fn close(&mut self, ts_ns: u64, out: &mut Vec<Exchange>) {
        if !self.dead {
            for s in &mut self.streams {
                s.close(&mut self.sh, ts_ns);
            }
            let side = self.sh.side().unwrap_or(Side::Client);
            for p in self.sh.pending.drain(..) {
                if p.placeholder {
                    continue;
                }
                let (req, resp) = (p.req, p.resp);
                let mut ex = p.into_exchange(side);
                if resp == Phase::NotStarted {
                    ex.incomplete.get_or_insert("no_response");
                } else if resp != Phase::Done {
                    ex.response_end_ns = Some(ts_ns);
                    ex.incomplete.get_or_insert("connection_closed");
                }
                if req == Phase::InProgress {
                    ex.incomplete.get_or_insert("connection_closed");
                }
                out.push(ex);
            }
        }
        self.reset();
    }

    /// Protocol errors seen: malformed or oversized heads, bad framing,
    /// responses without a request, requests lost to gaps or dropped
    /// beyond `max_pending`.
    pub fn errors(&self) -> u64 {
        self.sh.errors
    }

    /// Requests started on this connection so far (the next one's `seq`).
    pub fn requests_seen(&self) -> u64 {
        self.sh.next_id
    }

    /// A request still waiting for the end of its exchange: its head (method,
    /// path, traceparent, ...) is known from the moment it was parsed.
    pub fn pending_request(&self, seq: u64) -> Option<&Exchange> {
        self.sh.pending.iter().find(|p| p.id == seq && !p.placeholder).map(|p| &p.ex)
    }

    /// Whether request `seq` is known and no response to it has started.
    pub fn awaiting_response(&self, seq: u64) -> bool {
        self.sh.pending.iter().any(|p| p.id == seq && !p.placeholder && p.resp == Phase::NotStarted)
    }

    fn give_up(&mut self) -> Feed {
        self.dead = true;
        self.sh.pending.clear();
        for s in &mut self.streams {
            s.buf = Vec::new();
        }
        Feed::NotHttp
    }

    fn reset(&mut self) {
        for s in &mut self.streams {
            s.reset();
        }
        self.sh.pending.clear();
        self.sh.req_dir = self.hint.map(req_dir_of);
        self.sh.upgraded = false;
        self.sh.synced = false;
        self.dead = false;
    }
}

/// Summary only: buffered head bytes may hold secrets and are never printed.
impl std::fmt::Debug for Http1Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Connection")
            .field("side", &self.sh.side())
            .field("pending", &self.sh.pending.len())
            .field("errors", &self.sh.errors)
            .field("upgraded", &self.sh.upgraded)
            .field("not_http", &self.dead)
            .finish_non_exhaustive()
    }
}

fn req_dir_of(side: Side) -> Direction {
    match side {
        Side::Client => Direction::Egress,
        Side::Server => Direction::Ingress,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Request,
    Response,
}

/// Progress of one half (request or response) of a pending exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    NotStarted,
    InProgress,
    /// Sync lost: its end is not knowable from the bytes.
    Lost,
    Done,
}

struct Pending {
    id: u64,
    ex: Exchange,
    /// Stands for a request we know started but could not read; absorbs
    /// its response to keep FIFO pairing, never emitted.
    placeholder: bool,
    req: Phase,
    resp: Phase,
    /// Per [`Kind`]: a gap hid that message's chunked framing and its end
    /// has not been seen (yet); the exchange is a "capture_gap" unless a
    /// later call's end shows the last chunk.
    chunked_gap: [bool; 2],
}

impl Pending {
    fn into_exchange(self, side: Side) -> Exchange {
        let mut ex = self.ex;
        ex.side = side;
        if self.chunked_gap.contains(&true) {
            ex.incomplete.get_or_insert("capture_gap");
        }
        ex
    }
}

impl Kind {
    fn idx(self) -> usize {
        match self {
            Kind::Request => 0,
            Kind::Response => 1,
        }
    }
}

struct Shared {
    limits: Limits,
    cfg: ParserConfig,
    pending: VecDeque<Pending>,
    next_id: u64,
    /// Direction that carries requests, once known.
    req_dir: Option<Direction>,
    errors: u64,
    upgraded: bool,
    /// A head was parsed on this connection at least once.
    synced: bool,
}

impl Shared {
    fn side(&self) -> Option<Side> {
        self.req_dir.map(|d| match d {
            Direction::Egress => Side::Client,
            Direction::Ingress => Side::Server,
        })
    }

    fn kind_of(&self, dir: Direction) -> Option<Kind> {
        self.req_dir.map(|r| {
            if r == dir {
                Kind::Request
            } else {
                Kind::Response
            }
        })
    }

    fn get(&mut self, id: Option<u64>) -> Option<&mut Pending> {
        let id = id?;
        self.pending.iter_mut().find(|p| p.id == id)
    }

    fn push(&mut self, ex: Exchange, req: Phase, placeholder: bool) -> u64 {
        while self.pending.len() >= self.limits.max_pending {
            self.pending.pop_front();
            self.errors += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut ex = ex;
        ex.seq = id;
        self.pending.push_back(Pending {
            id,
            ex,
            placeholder,
            req,
            resp: Phase::NotStarted,
            chunked_gap: [false; 2],
        });
        id
    }

    /// Bytes of the message `id` (of `kind`) were seen in a chunk at `ts`.
    fn touch(&mut self, id: Option<u64>, kind: Kind, body: u64, ts: u64) {
        if let Some(p) = self.get(id) {
            match kind {
                Kind::Request => {
                    p.ex.request_body_bytes = p.ex.request_body_bytes.saturating_add(body);
                    p.ex.request_end_ns = ts;
                }
                Kind::Response => {
                    p.ex.response_body_bytes = p.ex.response_body_bytes.saturating_add(body);
                    p.ex.response_end_ns = Some(ts);
                }
            }
        }
    }

    fn emit_ready(&mut self, out: &mut Vec<Exchange>) {
        let side = self.side().unwrap_or(Side::Client);
        while let Some(front) = self.pending.front() {
            if front.resp != Phase::Done || front.req == Phase::InProgress {
                break;
            }
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            if !p.placeholder {
                out.push(p.into_exchange(side));
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkedPart {
    Size,
    Data(u64),
    Cr,
    Lf,
    Trailers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked(ChunkedPart),
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Out of sync: only the start of a later chunk can begin a message.
    Seeking,
    /// At a message boundary or inside a head (bytes so far in `buf`).
    Head,
    Body(Body),
    /// Upgraded: nothing more to parse.
    Done,
}

/// One direction of the connection.
struct Stream {
    dir: Direction,
    state: State,
    /// Head bytes so far; in chunked bodies, a partial size or trailer line.
    buf: Vec<u8>,
    /// ts of the chunk holding the first byte of the head in `buf`.
    head_ts: u64,
    /// When the call being fed began (see `Chunk::start_ns`).
    call_start_ts: u64,
    /// ts of the last chunk appended to `buf`.
    head_last_ts: u64,
    /// The head in `buf` began at a chunk start while out of sync.
    from_seek: bool,
    /// Pending exchange whose message this direction is in (body, or lost).
    cur: Option<u64>,
    /// Chunks that showed no message start before the connection synced.
    misses: u32,
    /// `cur` lost its chunked framing to a gap: look for its end at the end
    /// of later calls.
    chunked_lost: Option<u64>,
}

/// What parsing a head gave.
enum HeadParse {
    Partial,
    Invalid,
    Request(ReqHead, usize),
    Response(RespHead, usize),
}

struct ReqHead {
    method: CompactString,
    path: CompactString,
    has_query: bool,
    version_minor: u8,
    host: Option<CompactString>,
    user_agent: Option<CompactString>,
    traceparent: Option<CompactString>,
    content_length: Option<u64>,
    cl: Cl,
    te: Te,
}

struct RespHead {
    code: u16,
    cl: Cl,
    te: Te,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cl {
    Absent,
    Value(u64),
    Invalid,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Te {
    Absent,
    Chunked,
    Other,
}

impl Stream {
    fn new(dir: Direction) -> Self {
        Stream {
            dir,
            state: State::Seeking,
            buf: Vec::new(),
            head_ts: 0,
            call_start_ts: 0,
            head_last_ts: 0,
            from_seek: true,
            cur: None,
            misses: 0,
            chunked_lost: None,
        }
    }

    fn reset(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        *self = Stream::new(self.dir);
        self.buf = buf;
        self.clear_buf();
    }

    fn clear_buf(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > KEEP_BUF_CAPACITY {
            self.buf.shrink_to(1024);
        }
    }

    fn kind(&self, sh: &Shared) -> Kind {
        sh.kind_of(self.dir).unwrap_or(Kind::Request)
    }

    /// One call: its captured start `bytes`, `gap` uncaptured bytes, then
    /// its captured end `tail`.
    fn feed(&mut self, sh: &mut Shared, bytes: &[u8], gap: u64, tail: &[u8], ts: u64) {
        let lost_before = self.in_lost_chunked().then_some(self.cur);
        if self.state == State::Seeking && !bytes.is_empty() {
            // Maybe a message starts here.
            self.clear_buf();
            self.state = State::Head;
            self.from_seek = true;
        }
        self.steps(sh, bytes, ts);
        if bytes.is_empty() && self.state == State::Seeking {
            self.touch_lost(sh, ts);
        }
        if gap > 0 && !sh.upgraded {
            self.gap(sh, gap, ts);
        }
        // The tail continues whatever the gap left us in; it never starts a
        // resync (its first byte is no call start).
        self.steps(sh, tail, ts);
        if self.in_lost_chunked() && !sh.upgraded {
            let total = bytes.len() as u64 + gap + tail.len() as u64;
            // Body bytes of this call: all of it, or (sync lost in its gap,
            // whose rest `gap` already counted) its tail.
            let body = if lost_before == Some(self.cur) {
                total
            } else {
                tail.len() as u64
            };
            let end = if !tail.is_empty() {
                Some((tail, bytes.is_empty() && gap == 0))
            } else if gap == 0 {
                Some((bytes, true))
            } else {
                None
            };
            match end.and_then(|(end, at_start)| chunked_end(end, at_start)) {
                Some(framing) => self.end_lost_chunked(sh, body.saturating_sub(framing as u64), ts),
                None => {
                    let kind = self.kind(sh);
                    sh.touch(self.cur, kind, body, ts);
                }
            }
        }
    }

    /// Run the parser over `bytes` (from where the last call left off).
    fn steps(&mut self, sh: &mut Shared, bytes: &[u8], ts: u64) {
        let mut pos = 0;
        while pos < bytes.len() && !sh.upgraded {
            pos = match self.state {
                State::Seeking => {
                    self.touch_lost(sh, ts);
                    break;
                }
                State::Done => break,
                State::Head => self.head_step(sh, bytes, pos, ts),
                State::Body(body) => self.body_step(sh, body, bytes, pos, ts),
            };
        }
    }

    /// Out of sync inside the chunked body of `cur` after a gap (seeking, or
    /// only line ends seen since the call start).
    fn in_lost_chunked(&self) -> bool {
        let seeking = match self.state {
            State::Seeking => true,
            State::Head => self.from_seek && self.buf.is_empty(),
            _ => false,
        };
        seeking && self.cur.is_some() && self.chunked_lost == self.cur
    }

    /// A gap hid the chunked framing of the current message.
    fn lose_chunked(&mut self, sh: &mut Shared, body: u64, ts: u64) {
        let kind = self.kind(sh);
        sh.touch(self.cur, kind, body, ts);
        self.clear_buf();
        self.state = State::Seeking;
        if let Some(p) = sh.get(self.cur) {
            let phase = match kind {
                Kind::Request => &mut p.req,
                Kind::Response => &mut p.resp,
            };
            if *phase == Phase::InProgress {
                *phase = Phase::Lost;
                p.chunked_gap[kind.idx()] = true;
                self.chunked_lost = Some(p.id);
            }
        }
    }

    /// The end of this call (at `ts`) ends the chunked message whose framing
    /// was lost; `body` more payload bytes (approximately) belonged to it.
    fn end_lost_chunked(&mut self, sh: &mut Shared, body: u64, ts: u64) {
        let kind = self.kind(sh);
        sh.touch(self.cur, kind, body, ts);
        if let Some(p) = sh.get(self.cur.take()) {
            p.chunked_gap[kind.idx()] = false;
            match kind {
                Kind::Request => p.req = Phase::Done,
                Kind::Response => p.resp = Phase::Done,
            }
        }
        self.chunked_lost = None;
        // The next call may begin the next message; resync as usual.
        self.clear_buf();
        self.state = State::Seeking;
    }

    /// A chunk at `ts` went by while out of sync: it extends a lost message.
    fn touch_lost(&mut self, sh: &mut Shared, ts: u64) {
        let kind = self.kind(sh);
        if let Some(p) = sh.get(self.cur) {
            match kind {
                Kind::Request if p.req == Phase::Lost => p.ex.request_end_ns = ts,
                Kind::Response if p.resp == Phase::Lost => p.ex.response_end_ns = Some(ts),
                _ => {}
            }
        }
    }

    fn head_step(&mut self, sh: &mut Shared, bytes: &[u8], start: usize, ts: u64) -> usize {
        let mut pos = start;
        let old = self.buf.len();
        let mut prev_ts = self.head_last_ts;
        if old == 0 {
            // Empty lines between messages are allowed and skipped.
            while pos < bytes.len() && matches!(bytes[pos], b'\r' | b'\n') {
                pos += 1;
            }
            if pos == bytes.len() {
                return pos;
            }
            self.head_ts = self.call_start_ts.min(ts);
            prev_ts = ts;
        }
        self.head_last_ts = ts;
        let max = sh.limits.max_header_bytes;
        let avail = bytes.len() - pos;
        let take = avail.min(max.saturating_sub(old));
        let new = &bytes[pos..pos + take];
        let full = old + take >= max;
        let must_parse = old == 0 || full || new.contains(&b'\n');
        // A head that starts in this chunk is parsed where it lies; only one
        // that continues in a later chunk is copied into the buffer.
        let parsed = if old == 0 {
            parse_head(&sh.cfg, new, sh.kind_of(self.dir), self.from_seek)
        } else {
            self.buf.extend_from_slice(new);
            if !must_parse {
                return pos + take;
            }
            parse_head(&sh.cfg, &self.buf, sh.kind_of(self.dir), self.from_seek)
        };
        if old == 0 && matches!(parsed, HeadParse::Partial) {
            self.buf.extend_from_slice(new);
        }
        match parsed {
            HeadParse::Partial => {
                if full {
                    sh.errors += 1;
                    self.clear_buf();
                    if self.from_seek {
                        self.state = State::Seeking;
                        self.touch_lost(sh, ts);
                    } else {
                        let head_ts = self.head_ts;
                        self.lost_start(sh, head_ts, "header_too_large", false);
                    }
                    return bytes.len();
                }
                pos + take
            }
            HeadParse::Invalid => {
                let in_sync = !self.from_seek;
                if in_sync {
                    sh.errors += 1;
                }
                self.clear_buf();
                if old > 0 {
                    // The head began in an earlier chunk. Those chunks were
                    // not a message; this chunk's start may still be one.
                    if in_sync {
                        self.lost_start(sh, self.head_ts, "parse_error", false);
                    }
                    self.touch_lost(sh, prev_ts);
                    self.state = State::Head;
                    self.from_seek = true;
                    return start;
                }
                if in_sync {
                    let head_ts = self.head_ts;
                    self.lost_start(sh, head_ts, "parse_error", false);
                } else {
                    self.state = State::Seeking;
                }
                self.touch_lost(sh, ts);
                bytes.len()
            }
            HeadParse::Request(h, n) => {
                let end = pos + n.saturating_sub(old).min(take);
                self.clear_buf();
                self.on_request(sh, h, ts, false);
                end
            }
            HeadParse::Response(h, n) => {
                let end = pos + n.saturating_sub(old).min(take);
                self.clear_buf();
                self.on_response(sh, h, ts, false);
                end
            }
        }
    }

    /// Finish the lost message this direction was in (a new head arrived).
    /// Its end stays at the last chunk that belonged to it.
    fn end_lost(&mut self, sh: &mut Shared, kind: Kind) {
        self.chunked_lost = None;
        if let Some(p) = sh.get(self.cur.take()) {
            match kind {
                Kind::Request => {
                    if p.req != Phase::Done {
                        p.req = Phase::Done;
                    }
                }
                Kind::Response => {
                    if p.resp == Phase::Lost || p.resp == Phase::InProgress {
                        p.resp = Phase::Done;
                    }
                }
            }
        }
    }

    fn on_request(&mut self, sh: &mut Shared, h: ReqHead, ts: u64, salvaged: bool) {
        sh.req_dir.get_or_insert(self.dir);
        sh.synced = true;
        self.end_lost(sh, Kind::Request);
        self.from_seek = false;
        let side = sh.side().unwrap_or(Side::Client);
        let mut ex = Exchange {
            side,
            method: h.method,
            path: h.path,
            has_query: h.has_query,
            version: HttpVersion::http1(h.version_minor),
            host: h.host,
            user_agent: h.user_agent,
            traceparent: h.traceparent,
            request_content_length: h.content_length,
            grpc: false,
            grpc_status: None,
            status: None,
            request_body_bytes: 0,
            response_body_bytes: 0,
            request_start_ns: self.head_ts,
            request_end_ns: ts,
            response_start_ns: None,
            response_end_ns: None,
            incomplete: None,
            seq: 0,
        };
        let body = match (h.te, h.cl) {
            _ if salvaged => Err("capture_gap"),
            (Te::Chunked, _) => Ok(Some(Body::Chunked(ChunkedPart::Size))),
            (Te::Other, _) | (Te::Absent, Cl::Invalid) => Err("bad_framing"),
            (Te::Absent, Cl::Value(n)) if n > 0 => Ok(Some(Body::Length(n))),
            (Te::Absent, _) => Ok(None),
        };
        let (phase, state) = match body {
            Ok(None) => (Phase::Done, State::Head),
            Ok(Some(b)) => (Phase::InProgress, State::Body(b)),
            Err(reason) => {
                if !salvaged {
                    sh.errors += 1;
                }
                ex.incomplete = Some(reason);
                (Phase::Lost, State::Seeking)
            }
        };
        let id = sh.push(ex, phase, false);
        self.cur = (phase != Phase::Done).then_some(id);
        self.state = state;
    }

    fn on_response(&mut self, sh: &mut Shared, h: RespHead, ts: u64, salvaged: bool) {
        sh.req_dir.get_or_insert(self.dir.other());
        sh.synced = true;
        self.end_lost(sh, Kind::Response);
        self.from_seek = false;
        let code = h.code;
        if (100..200).contains(&code) && code != 101 {
            // Interim: the final response is still to come.
            self.state = if salvaged {
                State::Seeking
            } else {
                State::Head
            };
            return;
        }
        let head_ts = self.head_ts;
        let target = sh.pending.iter_mut().find(|p| p.resp == Phase::NotStarted);
        let (is_head, is_connect) = match &target {
            Some(p) => (p.ex.method == "HEAD", p.ex.method == "CONNECT"),
            None => (false, false),
        };
        let upgrade = code == 101 || (is_connect && (200..300).contains(&code));
        let body = if salvaged {
            Err("capture_gap")
        } else if upgrade || is_head || code == 204 || code == 304 {
            Ok(None)
        } else {
            match (h.te, h.cl) {
                (Te::Chunked, _) => Ok(Some(Body::Chunked(ChunkedPart::Size))),
                (Te::Other, _) | (Te::Absent, Cl::Absent) => Ok(Some(Body::UntilClose)),
                (Te::Absent, Cl::Value(0)) => Ok(None),
                (Te::Absent, Cl::Value(n)) => Ok(Some(Body::Length(n))),
                (Te::Absent, Cl::Invalid) => Err("bad_framing"),
            }
        };
        let (phase, state) = match body {
            Ok(None) => (Phase::Done, State::Head),
            Ok(Some(b)) => (Phase::InProgress, State::Body(b)),
            Err(_) => (Phase::Lost, State::Seeking),
        };
        if body.is_err() && !salvaged {
            sh.errors += 1;
        }
        self.cur = None;
        match target {
            Some(p) => {
                p.ex.status = Some(code);
                p.ex.response_start_ns = Some(head_ts);
                p.ex.response_end_ns = Some(ts);
                if let Err(reason) = body {
                    p.ex.incomplete.get_or_insert(reason);
                }
                p.resp = if upgrade { Phase::Done } else { phase };
                if upgrade && p.req == Phase::InProgress {
                    p.req = Phase::Done;
                }
                if phase != Phase::Done {
                    self.cur = Some(p.id);
                }
            }
            None => sh.errors += 1,
        }
        if upgrade {
            sh.upgraded = true;
            self.state = State::Done;
        } else {
            self.state = state;
        }
    }

    /// A message began where we could not read it (inside a gap, or its head
    /// was unreadable): keep FIFO pairing right and go out of sync.
    fn lost_start(&mut self, sh: &mut Shared, start_ts: u64, reason: &'static str, count: bool) {
        self.clear_buf();
        self.state = State::Seeking;
        self.cur = None;
        match sh.kind_of(self.dir) {
            Some(Kind::Request) => {
                let ex = Exchange {
                    side: Side::Client,
                    method: CompactString::default(),
                    path: CompactString::default(),
                    has_query: false,
                    version: HttpVersion::Http1_1,
                    host: None,
                    user_agent: None,
                    traceparent: None,
                    request_content_length: None,
                    grpc: false,
                    grpc_status: None,
                    status: None,
                    request_body_bytes: 0,
                    response_body_bytes: 0,
                    request_start_ns: start_ts,
                    request_end_ns: start_ts,
                    response_start_ns: None,
                    response_end_ns: None,
                    incomplete: Some(reason),
                    seq: 0,
                };
                if count {
                    sh.errors += 1;
                }
                self.cur = Some(sh.push(ex, Phase::Lost, true));
            }
            Some(Kind::Response) => {
                match sh.pending.iter_mut().find(|p| p.resp == Phase::NotStarted) {
                    Some(p) => {
                        p.resp = Phase::Lost;
                        p.ex.response_start_ns = Some(start_ts);
                        p.ex.response_end_ns = Some(start_ts);
                        p.ex.incomplete.get_or_insert(reason);
                        self.cur = Some(p.id);
                    }
                    None => {
                        if count {
                            sh.errors += 1;
                        }
                    }
                }
            }
            None => {}
        }
    }

    /// Sync lost inside the current message (framing error or gap).
    fn lose_sync(&mut self, sh: &mut Shared, reason: &'static str) {
        self.clear_buf();
        self.state = State::Seeking;
        let kind = self.kind(sh);
        if let Some(p) = sh.get(self.cur) {
            p.ex.incomplete.get_or_insert(reason);
            match kind {
                Kind::Request if p.req == Phase::InProgress => p.req = Phase::Lost,
                Kind::Response if p.resp == Phase::InProgress => p.resp = Phase::Lost,
                _ => {}
            }
        }
    }

    /// The current message ended cleanly in a chunk at `ts`.
    fn finish(&mut self, sh: &mut Shared, ts: u64) {
        let kind = self.kind(sh);
        sh.touch(self.cur, kind, 0, ts);
        if let Some(p) = sh.get(self.cur.take()) {
            match kind {
                Kind::Request => p.req = Phase::Done,
                Kind::Response => p.resp = Phase::Done,
            }
        }
        self.clear_buf();
        self.state = State::Head;
    }

    fn body_step(
        &mut self,
        sh: &mut Shared,
        body: Body,
        bytes: &[u8],
        pos: usize,
        ts: u64,
    ) -> usize {
        let kind = self.kind(sh);
        let avail = (bytes.len() - pos) as u64;
        match body {
            Body::Length(rem) => {
                let n = rem.min(avail);
                sh.touch(self.cur, kind, n, ts);
                if n == rem {
                    self.finish(sh, ts);
                } else {
                    self.state = State::Body(Body::Length(rem - n));
                }
                pos + n as usize
            }
            Body::UntilClose => {
                sh.touch(self.cur, kind, avail, ts);
                bytes.len()
            }
            Body::Chunked(part) => self.chunked_step(sh, part, bytes, pos, ts),
        }
    }

    fn chunked_step(
        &mut self,
        sh: &mut Shared,
        part: ChunkedPart,
        bytes: &[u8],
        pos: usize,
        ts: u64,
    ) -> usize {
        let kind = self.kind(sh);
        let rest = &bytes[pos..];
        let max = sh.limits.max_header_bytes;
        let set = |s: &mut Stream, p: ChunkedPart| s.state = State::Body(Body::Chunked(p));
        match part {
            ChunkedPart::Size => {
                sh.touch(self.cur, kind, 0, ts);
                let Some(i) = rest.iter().position(|&b| b == b'\n') else {
                    if self.buf.len() + rest.len() > max {
                        sh.errors += 1;
                        self.lose_sync(sh, "bad_framing");
                    } else {
                        self.buf.extend_from_slice(rest);
                    }
                    return bytes.len();
                };
                let line = &rest[..=i];
                let parsed = if self.buf.is_empty() {
                    httparse::parse_chunk_size(line)
                } else if self.buf.len() + line.len() > max {
                    Err(httparse::InvalidChunkSize)
                } else {
                    self.buf.extend_from_slice(line);
                    httparse::parse_chunk_size(&self.buf)
                };
                self.buf.clear();
                match parsed {
                    Ok(Status::Complete((_, 0))) => set(self, ChunkedPart::Trailers),
                    Ok(Status::Complete((_, size))) => set(self, ChunkedPart::Data(size)),
                    _ => {
                        sh.errors += 1;
                        self.lose_sync(sh, "bad_framing");
                        return bytes.len();
                    }
                }
                pos + i + 1
            }
            ChunkedPart::Data(rem) => {
                let n = rem.min(rest.len() as u64);
                sh.touch(self.cur, kind, n, ts);
                set(
                    self,
                    if n == rem {
                        ChunkedPart::Cr
                    } else {
                        ChunkedPart::Data(rem - n)
                    },
                );
                pos + n as usize
            }
            ChunkedPart::Cr | ChunkedPart::Lf => {
                sh.touch(self.cur, kind, 0, ts);
                match (part, rest[0]) {
                    (ChunkedPart::Cr, b'\r') => set(self, ChunkedPart::Lf),
                    (_, b'\n') => set(self, ChunkedPart::Size),
                    _ => {
                        sh.errors += 1;
                        self.lose_sync(sh, "bad_framing");
                        return bytes.len();
                    }
                }
                pos + 1
            }
            ChunkedPart::Trailers => {
                sh.touch(self.cur, kind, 0, ts);
                let old = self.buf.len();
                if old == 0 && rest.starts_with(b"\r\n") {
                    self.finish(sh, ts);
                    return pos + 2;
                }
                let take = rest.len().min(max.saturating_sub(old));
                let new = &rest[..take];
                let full = old + take >= max;
                self.buf.extend_from_slice(new);
                if !(full || new.contains(&b'\n')) {
                    return pos + take;
                }
                let mut headers = [EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(&self.buf, &mut headers) {
                    Ok(Status::Complete((n, _))) => {
                        let end = pos + n.saturating_sub(old).min(take);
                        self.finish(sh, ts);
                        end
                    }
                    Ok(Status::Partial) if !full => pos + take,
                    _ => {
                        sh.errors += 1;
                        self.lose_sync(sh, "bad_framing");
                        bytes.len()
                    }
                }
            }
        }
    }

    /// `n` bytes after the captured prefix of a chunk at `ts` were not captured.
    fn gap(&mut self, sh: &mut Shared, n: u64, ts: u64) {
        let kind = self.kind(sh);
        match self.state {
            State::Done => {}
            State::Seeking => self.touch_lost(sh, ts),
            State::Head => {
                if !self.buf.is_empty() {
                    self.salvage(sh, ts);
                } else if self.from_seek {
                    self.state = State::Seeking;
                    self.touch_lost(sh, ts);
                } else {
                    // A new message began inside the gap.
                    self.lost_start(sh, ts, "capture_gap", true);
                }
            }
            State::Body(Body::Length(rem)) => {
                sh.touch(self.cur, kind, n.min(rem), ts);
                if n < rem {
                    self.state = State::Body(Body::Length(rem - n));
                } else {
                    self.finish(sh, ts);
                    if n > rem {
                        self.lost_start(sh, ts, "capture_gap", true);
                    }
                }
            }
            State::Body(Body::UntilClose) => sh.touch(self.cur, kind, n, ts),
            State::Body(Body::Chunked(
                part @ (ChunkedPart::Data(_) | ChunkedPart::Cr | ChunkedPart::Lf),
            )) => {
                // Data and the CRLF after it can be skipped by count; only a
                // size line inside the gap loses sync.
                let (data_left, crlf_left) = match part {
                    ChunkedPart::Data(rem) => (rem, 2),
                    ChunkedPart::Cr => (0, 2),
                    _ => (0, 1),
                };
                let data = n.min(data_left);
                let after = n - data;
                if data == data_left && after > crlf_left {
                    // A size line was in the gap. The rest of the gap is
                    // counted as body: framing can no longer be told apart.
                    self.lose_chunked(sh, data + (after - crlf_left), ts);
                    return;
                }
                sh.touch(self.cur, kind, data, ts);
                let next = if data < data_left {
                    ChunkedPart::Data(data_left - data)
                } else {
                    match crlf_left - after {
                        2 => ChunkedPart::Cr,
                        1 => ChunkedPart::Lf,
                        _ => ChunkedPart::Size,
                    }
                };
                self.state = State::Body(Body::Chunked(next));
            }
            State::Body(Body::Chunked(_)) => self.lose_chunked(sh, n, ts),
        }
    }

    /// A gap cut a head short: keep what its complete lines tell.
    fn salvage(&mut self, sh: &mut Shared, ts: u64) {
        let parsed = match self.buf.iter().rposition(|&b| b == b'\n') {
            Some(i) => {
                self.buf.truncate(i + 1);
                self.buf.extend_from_slice(b"\r\n");
                parse_head(&sh.cfg, &self.buf, sh.kind_of(self.dir), self.from_seek)
            }
            None => HeadParse::Invalid,
        };
        self.clear_buf();
        match parsed {
            HeadParse::Request(h, _) => self.on_request(sh, h, ts, true),
            HeadParse::Response(h, _) => self.on_response(sh, h, ts, true),
            HeadParse::Partial | HeadParse::Invalid => {
                if self.from_seek {
                    self.state = State::Seeking;
                    self.touch_lost(sh, ts);
                } else {
                    let head_ts = self.head_ts;
                    self.lost_start(sh, head_ts, "capture_gap", true);
                }
            }
        }
    }

    fn close(&mut self, sh: &mut Shared, ts: u64) {
        let kind = self.kind(sh);
        let state = self.state;
        let Some(p) = sh.get(self.cur) else { return };
        match (kind, state) {
            (Kind::Response, State::Body(Body::UntilClose)) => {
                p.resp = Phase::Done;
                p.ex.response_end_ns = Some(ts);
            }
            (Kind::Response, State::Body(_)) => {
                p.resp = Phase::Done;
                p.ex.response_end_ns = Some(ts);
                p.ex.incomplete.get_or_insert("connection_closed");
            }
            (Kind::Response, _) => {
                if p.resp == Phase::Lost {
                    // Its end is unknown: it stays at its last chunk.
                    p.resp = Phase::Done;
                }
            }
            (Kind::Request, State::Body(_)) => {
                p.req = Phase::Done;
                p.ex.incomplete.get_or_insert("connection_closed");
            }
            (Kind::Request, _) => {
                if p.req == Phase::Lost {
                    p.req = Phase::Done;
                }
            }
        }
    }
}

/// Trailer lines looked at behind a last chunk.
const MAX_TRAILERS: usize = 16;

/// If `end`, the last bytes of a call, ends a chunked message (last-chunk
/// line `0[;ext]`, trailer lines, empty line), the length of that framing
/// including the CRLF that ended the data before it. The last-chunk line must
/// follow a CRLF within `end`, or begin `end` when `at_start` (`end` begins
/// the call: the previous call may have ended with that CRLF).
fn chunked_end(end: &[u8], at_start: bool) -> Option<usize> {
    let mut lines = end.strip_suffix(b"\r\n")?;
    for _ in 0..=MAX_TRAILERS {
        let text = lines.strip_suffix(b"\r\n")?;
        let start = text.windows(2).rposition(|w| w == b"\r\n").map(|i| i + 2);
        let line = &text[start.unwrap_or(0)..];
        if line.contains(&b'\r') || line.contains(&b'\n') {
            return None;
        }
        if is_last_chunk_line(line) {
            return match start {
                Some(s) => Some(end.len() - (s - 2)),
                None if at_start => Some(end.len()),
                None => None,
            };
        }
        if !is_trailer_line(line) {
            return None;
        }
        lines = &text[..start?];
    }
    None
}

/// `0`, `000`, `0;name=value`, `0 ;x`.
fn is_last_chunk_line(line: &[u8]) -> bool {
    let zeros = line.iter().take_while(|&&b| b == b'0').count();
    zeros > 0 && (zeros == line.len() || matches!(line[zeros], b';' | b' ' | b'\t'))
}

/// `Name: value` with a token name.
fn is_trailer_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    colon > 0
        && line[..colon]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parse a head; `kind` restricts what is accepted once the roles are known.
/// A head found while out of sync (`resync`) may begin mid-line, so there
/// only registered methods count as a request start ("DELETE" cut to "LETE"
/// must not).
fn parse_head(cfg: &ParserConfig, buf: &[u8], kind: Option<Kind>, resync: bool) -> HeadParse {
    // Left uninitialised: httparse writes the entries it returns, and
    // zeroing 128 of them (4 KiB) per head showed in the profile.
    let mut headers: [MaybeUninit<Header<'_>>; MAX_HEADERS] = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut partial = false;
    if kind != Some(Kind::Response) {
        let mut req = httparse::Request::new(&mut []);
        let res = cfg.parse_request_with_uninit_headers(&mut req, buf, &mut headers);
        let method_ok = !resync || req.method.is_none_or(known_method);
        match res {
            Ok(Status::Complete(n)) if method_ok => {
                if let (Some(method), Some(target), Some(v)) = (req.method, req.path, req.version) {
                    return HeadParse::Request(req_head(method, target, v, req.headers), n);
                }
                return HeadParse::Invalid;
            }
            Ok(Status::Partial) if method_ok => partial = true,
            _ => {}
        }
    }
    if kind != Some(Kind::Request) {
        let mut resp = httparse::Response::new(&mut []);
        match cfg.parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
            Ok(Status::Complete(n)) => {
                let Some(code) = resp.code else {
                    return HeadParse::Invalid;
                };
                let (cl, te) = framing(resp.headers);
                return HeadParse::Response(RespHead { code, cl, te }, n);
            }
            Ok(Status::Partial) => partial = true,
            Err(_) => {}
        }
    }
    if partial {
        HeadParse::Partial
    } else {
        HeadParse::Invalid
    }
}

/// Methods of the IANA HTTP method registry (less PRI, the HTTP/2 preface),
/// plus PURGE, which caches use.
fn known_method(m: &str) -> bool {
    matches!(
        m,
        "GET"
            | "HEAD"
            | "POST"
            | "PUT"
            | "DELETE"
            | "CONNECT"
            | "OPTIONS"
            | "TRACE"
            | "PATCH"
            | "QUERY"
            | "PURGE"
            | "ACL"
            | "BASELINE-CONTROL"
            | "BIND"
            | "CHECKIN"
            | "CHECKOUT"
            | "COPY"
            | "LABEL"
            | "LINK"
            | "LOCK"
            | "MERGE"
            | "MKACTIVITY"
            | "MKCALENDAR"
            | "MKCOL"
            | "MKREDIRECTREF"
            | "MKWORKSPACE"
            | "MOVE"
            | "ORDERPATCH"
            | "PROPFIND"
            | "PROPPATCH"
            | "REBIND"
            | "REPORT"
            | "SEARCH"
            | "UNBIND"
            | "UNCHECKOUT"
            | "UNLINK"
            | "UNLOCK"
            | "UPDATE"
            | "UPDATEREDIRECTREF"
            | "VERSION-CONTROL"
    )
}

fn req_head(method: &str, target: &str, version: u8, headers: &[Header<'_>]) -> ReqHead {
    let (path, has_query, authority) = split_target(method, target);
    let (cl, te) = framing(headers);
    let mut host = None;
    let mut user_agent = None;
    let mut traceparent = None;
    for h in headers {
        let slot = if h.name.eq_ignore_ascii_case("host") {
            &mut host
        } else if h.name.eq_ignore_ascii_case("user-agent") {
            &mut user_agent
        } else if h.name.eq_ignore_ascii_case("traceparent") {
            &mut traceparent
        } else {
            continue;
        };
        if slot.is_none() {
            *slot = Some(text(trim(h.value)));
        }
    }
    if host.is_none() {
        host = authority.filter(|a| !a.is_empty()).map(CompactString::from);
    }
    ReqHead {
        method: CompactString::from(method),
        path,
        has_query,
        version_minor: version,
        host,
        user_agent,
        traceparent,
        content_length: match cl {
            Cl::Value(n) => Some(n),
            _ => None,
        },
        cl,
        te,
    }
}

/// A header value as text: almost always ASCII, which takes the fast path.
fn text(bytes: &[u8]) -> CompactString {
    match std::str::from_utf8(bytes) {
        Ok(s) => CompactString::from(s),
        Err(_) => CompactString::from_utf8_lossy(bytes),
    }
}

/// Split a request target into (path, has_query, authority).
fn split_target<'a>(method: &str, target: &'a str) -> (CompactString, bool, Option<&'a str>) {
    if method == "CONNECT" {
        return (CompactString::default(), false, Some(strip_userinfo(target)));
    }
    if target == "*" {
        return (CompactString::const_new("*"), false, None);
    }
    let mut rest = target;
    let mut authority = None;
    if !target.starts_with('/')
        && let Some(i) = target.find("://")
        && i > 0
        && target[..i]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        let after = &target[i + 3..];
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        authority = Some(strip_userinfo(&after[..end]));
        rest = &after[end..];
    }
    let rest = rest.split('#').next().unwrap_or("");
    let (path, has_query) = match rest.find('?') {
        Some(q) => (&rest[..q], true),
        None => (rest, false),
    };
    let path = if path.is_empty() { "/" } else { path };
    (CompactString::from(path), has_query, authority)
}

fn strip_userinfo(authority: &str) -> &str {
    authority.rsplit('@').next().unwrap_or(authority)
}

/// Body framing headers: Content-Length and the last Transfer-Encoding coding.
fn framing(headers: &[Header<'_>]) -> (Cl, Te) {
    let mut cl = Cl::Absent;
    let mut te = Te::Absent;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|&b| b == b',') {
                cl = match (cl, parse_u64(trim(part))) {
                    (Cl::Absent, Some(n)) => Cl::Value(n),
                    (Cl::Value(a), Some(b)) if a == b => Cl::Value(a),
                    _ => Cl::Invalid,
                };
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            for part in h.value.split(|&b| b == b',') {
                let coding = trim(part);
                if !coding.is_empty() {
                    te = if coding.eq_ignore_ascii_case(b"chunked") {
                        Te::Chunked
                    } else {
                        Te::Other
                    };
                }
            }
        }
    }
    (cl, te)
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

/// Openings of common non-HTTP protocols, so such connections are dropped at
/// once instead of after `resync_chunks` chunks.
fn looks_like_other_protocol(b: &[u8]) -> bool {
    // TLS record: ChangeCipherSpec/Alert/Handshake/ApplicationData, version 3.x.
    if b.len() >= 3 && (0x14..=0x17).contains(&b[0]) && b[1] == 0x03 && b[2] <= 0x04 {
        return true;
    }
    // PostgreSQL StartupMessage / SSLRequest / GSSENCRequest / CancelRequest.
    if b.len() >= 8 {
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let code = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        if (8..=10_000).contains(&len)
            && matches!(code, 0x0003_0000 | 80_877_102 | 80_877_103 | 80_877_104)
        {
            return true;
        }
    }
    // Redis RESP array or bulk string: "*<n>\r\n" / "$<n>\r\n".
    if matches!(b.first(), Some(b'*' | b'$')) {
        let digits = b[1..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || **c == b'-')
            .count();
        if digits > 0 && b[1 + digits..].starts_with(b"\r\n") {
            return true;
        }
    }
    // HTTP/2 connection preface (prior knowledge).
    b.starts_with(b"PRI * HTTP/2.0\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::{Egress as E, Ingress as I};
    use proptest::prelude::*;

    fn ch(direction: Direction, bytes: &[u8], ts_ns: u64) -> Chunk<'_> {
        Chunk {
            direction,
            total_len: bytes.len() as u32,
            bytes,
            tail: &[],
            ts_ns,
            start_ns: ts_ns,
        }
    }

    /// A chunk of `total` bytes of which only `bytes` were captured.
    fn cut(direction: Direction, bytes: &[u8], total: usize, ts_ns: u64) -> Chunk<'_> {
        Chunk {
            direction,
            total_len: total as u32,
            bytes,
            tail: &[],
            ts_ns,
            start_ns: ts_ns,
        }
    }

    /// Feeds the chunks; the exchanges come back with `seq` cleared (most
    /// tests compare whole exchanges; `seq_counts_requests` checks it).
    fn feed(conn: &mut Http1Connection, chunks: &[Chunk<'_>]) -> Vec<Exchange> {
        let mut out = Vec::new();
        for c in chunks {
            assert_eq!(
                conn.feed(*c, &mut out),
                Feed::Continue,
                "chunk at {}",
                c.ts_ns
            );
        }
        for ex in &mut out {
            ex.seq = 0;
        }
        out
    }

    #[test]
    fn seq_counts_requests() {
        let mut conn = Http1Connection::new(Limits::default());
        let mut out = Vec::new();
        let req = b"GET /x HTTP/1.1\r\nHost: a\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        for (i, ts) in [(0u64, 10u64), (1, 30)] {
            assert_eq!(conn.requests_seen(), i);
            conn.feed(ch(Direction::Egress, req, ts), &mut out);
            assert_eq!(conn.requests_seen(), i + 1);
            assert!(conn.awaiting_response(i));
            assert_eq!(conn.pending_request(i).and_then(|e| e.traceparent.as_deref()).map(|t| &t[..2]), Some("00"));
            conn.feed(ch(Direction::Ingress, resp, ts + 5), &mut out);
            assert!(!conn.awaiting_response(i));
        }
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1]);
    }

    /// Feed everything to a new connection, then close at `close_ts`.
    fn run(chunks: &[Chunk<'_>], close_ts: u64) -> Vec<Exchange> {
        let mut conn = Http1Connection::new(Limits::default());
        let mut out = feed(&mut conn, chunks);
        conn.close(close_ts, &mut out);
        for ex in &mut out {
            ex.seq = 0;
        }
        out
    }

    fn ex(side: Side, method: &str, path: &str) -> Exchange {
        Exchange {
            side,
            method: CompactString::from(method),
            path: path.into(),
            has_query: false,
            version: HttpVersion::Http1_1,
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
            seq: 0,
        }
    }

    /// GET with status, request at `req_ts`, response at `resp_ts`.
    fn get(side: Side, path: &str, status: u16, req_ts: u64, resp_ts: u64) -> Exchange {
        Exchange {
            status: Some(status),
            request_start_ns: req_ts,
            request_end_ns: req_ts,
            response_start_ns: Some(resp_ts),
            response_end_ns: Some(resp_ts),
            ..ex(side, "GET", path)
        }
    }

    const REQ1: &[u8] =
        b"GET /a/b?x=topsecret HTTP/1.1\r\nHost: example.com:8080\r\nUser-Agent: curl/8.5\r\n\
traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
Authorization: Bearer topsecret\r\nCookie: sid=topsecret\r\n\r\n";
    const RESP1: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: s=topsecret\r\n\r\nhello";

    fn exchange1(side: Side, req: (u64, u64), resp: (u64, u64)) -> Exchange {
        Exchange {
            has_query: true,
            host: Some("example.com:8080".into()),
            user_agent: Some("curl/8.5".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            status: Some(200),
            response_body_bytes: 5,
            request_start_ns: req.0,
            request_end_ns: req.1,
            response_start_ns: Some(resp.0),
            response_end_ns: Some(resp.1),
            ..ex(side, "GET", "/a/b")
        }
    }

    #[test]
    fn client_keep_alive_and_no_secrets() {
        let mut conn = Http1Connection::new(Limits::default());
        let mut out = Vec::new();
        assert_eq!(conn.feed(ch(E, REQ1, 10), &mut out), Feed::Continue);
        assert!(out.is_empty());
        assert_eq!(conn.side(), Some(Side::Client));
        conn.feed(ch(I, RESP1, 20), &mut out);
        assert_eq!(out, vec![exchange1(Side::Client, (10, 10), (20, 20))]);
        conn.feed(
            ch(E, b"GET /c HTTP/1.0\r\nHost: example.com\r\n\r\n", 30),
            &mut out,
        );
        conn.feed(
            ch(
                I,
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                40,
            ),
            &mut out,
        );
        conn.close(50, &mut out);
        let second = Exchange {
            version: HttpVersion::Http1_0,
            host: Some("example.com".into()),
            seq: 1,
            ..get(Side::Client, "/c", 404, 30, 40)
        };
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], second);
        assert!(!format!("{out:?}").contains("secret"));
        assert_eq!(conn.errors(), 0);
    }

    #[test]
    fn server_side_inferred() {
        let out = run(&[ch(I, REQ1, 10), ch(E, RESP1, 20)], 30);
        assert_eq!(out, vec![exchange1(Side::Server, (10, 10), (20, 20))]);
    }

    #[test]
    fn every_split_point_of_request_and_response() {
        for i in 0..=REQ1.len() {
            for j in [
                0,
                1,
                8,
                16,
                17,
                40,
                64,
                RESP1.len() - 5,
                RESP1.len() - 1,
                RESP1.len(),
            ] {
                let mut chunks = Vec::new();
                for (d, msg, k, ts) in [(E, REQ1, i, 10), (I, RESP1, j, 20)] {
                    for (part, t) in [(&msg[..k], ts), (&msg[k..], ts + 1)] {
                        if !part.is_empty() {
                            chunks.push(ch(d, part, t));
                        }
                    }
                }
                let req = (
                    if i == 0 { 11 } else { 10 },
                    if i == REQ1.len() { 10 } else { 11 },
                );
                let resp = (
                    if j == 0 { 21 } else { 20 },
                    if j == RESP1.len() { 20 } else { 21 },
                );
                assert_eq!(
                    run(&chunks, 99),
                    vec![exchange1(Side::Client, req, resp)],
                    "split {i}/{j}"
                );
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let mut chunks = Vec::new();
        for (d, msg, base) in [(E, REQ1, 1000), (I, RESP1, 2000)] {
            for k in 0..msg.len() {
                chunks.push(ch(d, &msg[k..=k], base + k as u64));
            }
        }
        let req = (1000, 1000 + REQ1.len() as u64 - 1);
        let resp = (2000, 2000 + RESP1.len() as u64 - 1);
        assert_eq!(run(&chunks, 9999), vec![exchange1(Side::Client, req, resp)]);
    }

    #[test]
    fn pipelining_several_messages_per_chunk_fifo() {
        let reqs = b"GET /1 HTTP/1.1\r\n\r\nHEAD /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n";
        let resps = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc\
HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n\
HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n";
        let out = run(&[ch(E, reqs, 10), ch(I, resps, 20)], 30);
        assert_eq!(
            out,
            vec![
                Exchange {
                    response_body_bytes: 3,
                    ..get(Side::Client, "/1", 200, 10, 20)
                },
                Exchange {
                    method: "HEAD".into(),
                    ..get(Side::Client, "/2", 200, 10, 20)
                },
                Exchange {
                    response_body_bytes: 2,
                    ..get(Side::Client, "/3", 500, 10, 20)
                },
            ]
        );
    }

    #[test]
    fn request_bodies_content_length_and_chunked() {
        let post = b"POST /up HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123";
        let chunked = b"PUT /c HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
4;name=val\r\nWiki\r\n5\r\npedia\r\n0\r\nX-Checksum: 1\r\n\r\n";
        let ok = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        let out = run(
            &[
                ch(E, post, 10),
                ch(E, b"456789", 11),
                ch(I, ok, 20),
                ch(E, &chunked[..60], 30),
                ch(E, &chunked[60..], 31),
                ch(I, ok, 40),
            ],
            50,
        );
        assert_eq!(
            out,
            vec![
                Exchange {
                    method: "POST".into(),
                    request_content_length: Some(10),
                    grpc: false,
                    grpc_status: None,
                    request_body_bytes: 10,
                    request_end_ns: 11,
                    ..get(Side::Client, "/up", 201, 10, 20)
                },
                Exchange {
                    method: "PUT".into(),
                    request_body_bytes: 9,
                    request_end_ns: 31,
                    ..get(Side::Client, "/c", 201, 30, 40)
                },
            ]
        );
    }

    #[test]
    fn responses_without_body() {
        let reqs = b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n";
        let resps = b"HTTP/1.1 204 No Content\r\n\r\n\
HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n\
HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let out = run(&[ch(E, reqs, 10), ch(I, resps, 20)], 30);
        assert_eq!(
            out,
            vec![
                get(Side::Client, "/1", 204, 10, 20),
                get(Side::Client, "/2", 304, 10, 20),
                Exchange {
                    response_body_bytes: 2,
                    ..get(Side::Client, "/3", 200, 10, 20)
                },
            ]
        );
    }

    #[test]
    fn interim_100_continue_is_skipped() {
        let head = b"POST /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        let out = run(
            &[
                ch(E, head, 10),
                ch(I, b"HTTP/1.1 100 Continue\r\n\r\n", 15),
                ch(E, b"abc", 20),
                ch(I, b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", 30),
            ],
            40,
        );
        assert_eq!(
            out,
            vec![Exchange {
                method: "POST".into(),
                request_content_length: Some(3),
                grpc: false,
                grpc_status: None,
                request_body_bytes: 3,
                request_end_ns: 20,
                ..get(Side::Client, "/u", 201, 10, 30)
            }]
        );
    }

    #[test]
    fn response_delimited_by_close() {
        let mut conn = Http1Connection::new(Limits::default());
        let mut out = feed(
            &mut conn,
            &[
                ch(I, b"GET /old HTTP/1.0\r\n\r\n", 10),
                ch(
                    E,
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nabc",
                    20,
                ),
                ch(E, b"HTTP/1.1 200 OK\r\n", 25),
            ],
        );
        assert!(out.is_empty());
        conn.close(40, &mut out);
        let want = Exchange {
            version: HttpVersion::Http1_0,
            response_body_bytes: 3 + 17,
            response_end_ns: Some(40),
            ..get(Side::Server, "/old", 200, 10, 20)
        };
        assert_eq!(out, vec![want]);
    }

    #[test]
    fn switching_protocols_ends_parsing() {
        let mut conn = Http1Connection::new(Limits::default());
        let mut out = feed(
            &mut conn,
            &[
                ch(E, b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 10),
                ch(I, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello", 20),
                ch(E, b"\x81\x85\x01\x02\x03\x04abcde", 30),
                ch(E, b"GET / HTTP/1.1\r\n\r\n", 40),
                ch(I, b"HTTP/1.1 200 OK\r\n\r\n", 50),
            ],
        );
        assert!(conn.is_upgraded());
        conn.close(60, &mut out);
        assert_eq!(
            out,
            vec![Exchange {
                host: Some("h".into()),
                ..get(Side::Client, "/ws", 101, 10, 20)
            }]
        );
        assert_eq!(conn.errors(), 0);
    }

    #[test]
    fn connect_tunnel_and_target_forms() {
        let out = run(
            &[
                ch(E, b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", 1),
                ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2),
                ch(
                    E,
                    b"GET http://user:pw@example.com:8080/p/q?token=1#f HTTP/1.1\r\n\r\n",
                    3,
                ),
                ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 4),
                ch(E, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", 5),
                ch(I, b"HTTP/1.1 200 Connection established\r\n\r\n", 6),
                ch(E, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 7),
            ],
            8,
        );
        assert_eq!(
            out,
            vec![
                Exchange {
                    method: "OPTIONS".into(),
                    host: Some("h".into()),
                    ..get(Side::Client, "*", 200, 1, 2)
                },
                Exchange {
                    has_query: true,
                    host: Some("example.com:8080".into()),
                    ..get(Side::Client, "/p/q", 200, 3, 4)
                },
                Exchange {
                    method: "CONNECT".into(),
                    host: Some("example.com:443".into()),
                    ..get(Side::Client, "", 200, 5, 6)
                },
            ]
        );
        assert!(!format!("{out:?}").contains("pw"));
    }

    #[test]
    fn gap_inside_content_length_body_is_fine() {
        let post = b"POST /f HTTP/1.1\r\nContent-Length: 10000\r\n\r\nxxxx";
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 9000\r\n\r\nyyy";
        let out = run(
            &[
                cut(E, post, post.len() - 4 + 6000, 10),
                cut(E, b"zz", 4000, 11),
                cut(I, resp, resp.len() - 3 + 4096, 20),
                cut(I, b"", 4904, 21),
                ch(E, b"GET /next HTTP/1.1\r\n\r\n", 30),
                ch(I, b"HTTP/1.1 204 No Content\r\n\r\n", 40),
            ],
            50,
        );
        assert_eq!(
            out,
            vec![
                Exchange {
                    method: "POST".into(),
                    request_content_length: Some(10000),
                    grpc: false,
                    grpc_status: None,
                    request_body_bytes: 10000,
                    request_end_ns: 11,
                    response_body_bytes: 9000,
                    response_end_ns: Some(21),
                    ..get(Side::Client, "/f", 200, 10, 20)
                },
                get(Side::Client, "/next", 204, 30, 40),
            ]
        );
    }

    #[test]
    fn gap_inside_request_head_keeps_what_was_seen() {
        let mut big = b"GET /big?q=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: ua\r\nCookie: ".to_vec();
        let captured = big.len() + 100;
        big.resize(captured, b'c');
        let out = run(
            &[
                cut(E, &big, captured + 5000, 10),
                cut(E, b"", 3000, 12),
                ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 20),
                ch(E, b"GET /next HTTP/1.1\r\n\r\n", 30),
                ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 40),
            ],
            50,
        );
        assert_eq!(
            out,
            vec![
                Exchange {
                    has_query: true,
                    host: Some("h".into()),
                    user_agent: Some("ua".into()),
                    request_end_ns: 12,
                    response_body_bytes: 2,
                    incomplete: Some("capture_gap"),
                    ..get(Side::Client, "/big", 200, 10, 20)
                },
                get(Side::Client, "/next", 200, 30, 40),
            ]
        );
    }

    #[test]
    fn gap_inside_chunked_framing_resyncs_at_next_response() {
        let resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";
        let out = run(
            &[
                ch(E, b"GET /1 HTTP/1.1\r\n\r\n", 10),
                cut(I, resp, resp.len() + 3000, 20),
                ch(I, b"ab\r\n5\r\nhello\r\n", 25),
                ch(E, b"GET /2 HTTP/1.1\r\n\r\n", 30),
                ch(I, b"HTTP/1.1 204 No Content\r\n\r\n", 40),
            ],
            50,
        );
        assert_eq!(
            out,
            vec![
                Exchange {
                    // "hel", the gap less the CRLF after "lo", all of ts 25.
                    response_body_bytes: 3 + 2998 + 14,
                    // The end was not seen: the last chunk of the body.
                    response_end_ns: Some(25),
                    incomplete: Some("capture_gap"),
                    ..get(Side::Client, "/1", 200, 10, 20)
                },
                get(Side::Client, "/2", 204, 30, 40),
            ]
        );
    }

    #[test]
    fn gap_swallowing_a_response_start() {
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab";
        let reqs = b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n";
        let out = run(
            &[
                ch(E, reqs, 10),
                cut(I, resp, resp.len() + 1 + 60, 20),
                ch(I, b"more of it", 21),
                ch(E, b"GET /3 HTTP/1.1\r\n\r\n", 30),
                ch(I, b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n", 40),
            ],
            50,
        );
        assert_eq!(
            out,
            vec![
                Exchange {
                    response_body_bytes: 3,
                    ..get(Side::Client, "/1", 200, 10, 20)
                },
                Exchange {
                    status: None,
                    response_end_ns: Some(21),
                    incomplete: Some("capture_gap"),
                    ..get(Side::Client, "/2", 0, 10, 20)
                },
                get(Side::Client, "/3", 202, 30, 40),
            ]
        );
    }

    #[test]
    fn gap_swallowing_a_request_start_keeps_pairing() {
        let two = b"POST /1 HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET /lost HTTP/1.1\r\n\r\n";
        let out = run(
            &[
                cut(E, &two[..40], two.len(), 10),
                ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 20),
                ch(
                    I,
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                    21,
                ),
                ch(E, b"GET /3 HTTP/1.1\r\n\r\n", 30),
                ch(I, b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n", 40),
            ],
            50,
        );
        assert_eq!(
            out,
            vec![
                Exchange {
                    method: "POST".into(),
                    request_content_length: Some(2),
                    grpc: false,
                    grpc_status: None,
                    request_body_bytes: 2,
                    ..get(Side::Client, "/1", 200, 10, 20)
                },
                get(Side::Client, "/3", 202, 30, 40),
            ]
        );
    }

    #[test]
    fn joined_mid_stream_waits_for_a_message_start() {
        let out = run(
            &[
                ch(I, b"ello world, the end of a response body", 5),
                ch(E, b"{\"json\": \"tail of a request body\"}", 6),
                ch(E, b"GET /x HTTP/1.1\r\n\r\n", 10),
                ch(I, b"more body HTTP/1.1 200 OK\r\n", 12),
                ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 20),
            ],
            30,
        );
        assert_eq!(out, vec![get(Side::Client, "/x", 200, 10, 20)]);
    }

    #[test]
    fn resync_needs_a_registered_method() {
        // "DELETE" cut by a capture gap: "LETE /x HTTP/1.1" is not a start.
        let out = run(
            &[
                cut(E, b"", 2, 5),
                ch(E, b"LETE /x HTTP/1.1\r\nHost: h\r\n\r\n", 6),
                ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 7),
                ch(E, b"PURGE /y HTTP/1.1\r\n\r\n", 10),
                ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 20),
                // In sync, any token is a method.
                ch(E, b"FROB /z HTTP/1.1\r\n\r\n", 30),
                ch(I, b"HTTP/1.1 405 No\r\nContent-Length: 0\r\n\r\n", 40),
            ],
            50,
        );
        assert_eq!(
            out,
            vec![
                Exchange {
                    method: "PURGE".into(),
                    ..get(Side::Client, "/y", 200, 10, 20)
                },
                Exchange {
                    method: "FROB".into(),
                    ..get(Side::Client, "/z", 405, 30, 40)
                },
            ]
        );
    }

    #[test]
    fn never_syncing_gives_up_after_resync_chunks() {
        let mut conn = Http1Connection::new(Limits::default());
        let mut out = Vec::new();
        for k in 0..7 {
            assert_eq!(
                conn.feed(ch(E, b"lorem ipsum dolor sit amet", k), &mut out),
                Feed::Continue
            );
            // Chunks of the other direction have their own allowance.
            assert_eq!(conn.feed(ch(I, b"", k), &mut out), Feed::Continue);
            assert_eq!(
                conn.feed(ch(I, b"still no HTTP", k), &mut out),
                Feed::Continue
            );
        }
        assert_eq!(
            conn.feed(ch(E, b"lorem ipsum dolor sit amet", 8), &mut out),
            Feed::NotHttp
        );
        assert_eq!(
            conn.feed(ch(E, b"GET / HTTP/1.1\r\n\r\n", 9), &mut out),
            Feed::NotHttp
        );
        assert!(out.is_empty());
    }

    #[test]
    fn other_protocols_are_not_http_at_once() {
        let pg_startup =
            b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00postgres\x00database\x00db\x00\x00";
        let pg_ssl = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
        let tls = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8a\x1b";
        let redis = b"*1\r\n$4\r\nPING\r\n";
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        for (d, bytes) in [
            (E, &pg_startup[..]),
            (E, pg_ssl),
            (E, tls),
            (I, tls),
            (E, redis),
            (E, h2),
        ] {
            let mut conn = Http1Connection::new(Limits::default());
            let mut out = Vec::new();
            assert_eq!(
                conn.feed(ch(d, bytes, 1), &mut out),
                Feed::NotHttp,
                "{bytes:?}"
            );
            conn.close(2, &mut out);
            assert!(out.is_empty());
        }
    }

    #[test]
    fn random_bytes_are_not_http() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut conn = Http1Connection::new(Limits::default());
        let mut out = Vec::new();
        let mut verdict = Feed::Continue;
        for k in 0..40 {
            let bytes: Vec<u8> = (0..200)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let d = if k % 2 == 0 { E } else { I };
            verdict = conn.feed(ch(d, &bytes, k), &mut out);
            if verdict == Feed::NotHttp {
                assert!(k <= 2 * 9, "took {k} chunks");
                break;
            }
        }
        assert_eq!(verdict, Feed::NotHttp);
        assert!(out.is_empty());
    }

    #[test]
    fn oversized_headers_are_an_error_not_an_exchange() {
        let limits = Limits {
            max_header_bytes: 1024,
            ..Limits::default()
        };
        let mut big = b"GET /big HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 2000));
        big.extend_from_slice(b"\r\n\r\n");
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        for first_ok in [false, true] {
            let mut conn = Http1Connection::new(limits);
            let mut chunks = Vec::new();
            if first_ok {
                chunks.extend([ch(E, b"GET /a HTTP/1.1\r\n\r\n", 1), ch(I, ok, 2)]);
            }
            chunks.extend([
                ch(E, &big, 10),
                ch(
                    I,
                    b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n",
                    20,
                ),
                ch(E, b"GET /ok HTTP/1.1\r\n\r\n", 30),
                ch(I, ok, 40),
            ]);
            let mut out = feed(&mut conn, &chunks);
            conn.close(50, &mut out);
            let paths: Vec<_> = out.iter().map(|e| (e.path.as_str(), e.status)).collect();
            let mut want = vec![("/ok", Some(200))];
            if first_ok {
                want.insert(0, ("/a", Some(200)));
            }
            assert_eq!(paths, want);
            assert!(conn.errors() >= 1);
            assert!(out.iter().all(|e| e.incomplete.is_none()));
        }
    }

    #[test]
    fn truncated_request_gives_nothing_and_missing_response_is_reported() {
        assert!(run(&[ch(E, b"GET /trunc HTTP/1.1\r\nHost: a\r\n", 10)], 20).is_empty());
        let out = run(&[ch(E, b"GET /lonely HTTP/1.1\r\n\r\n", 10)], 20);
        let want = Exchange {
            request_start_ns: 10,
            request_end_ns: 10,
            incomplete: Some("no_response"),
            ..ex(Side::Client, "GET", "/lonely")
        };
        assert_eq!(out, vec![want]);
    }

    #[test]
    fn truncated_bodies_at_close() {
        let out = run(
            &[
                ch(E, b"GET /1 HTTP/1.1\r\n\r\n", 10),
                ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123", 20),
                ch(I, b"45", 25),
            ],
            30,
        );
        let want = Exchange {
            response_body_bytes: 6,
            response_end_ns: Some(30),
            incomplete: Some("connection_closed"),
            ..get(Side::Client, "/1", 200, 10, 20)
        };
        assert_eq!(out, vec![want]);
        let out = run(
            &[
                ch(I, b"POST /p HTTP/1.1\r\nContent-Length: 10\r\n\r\n01", 10),
                ch(I, b"23", 15),
            ],
            30,
        );
        let want = Exchange {
            method: "POST".into(),
            request_content_length: Some(10),
            grpc: false,
            grpc_status: None,
            request_body_bytes: 4,
            request_start_ns: 10,
            request_end_ns: 15,
            incomplete: Some("connection_closed"),
            ..ex(Side::Server, "POST", "/p")
        };
        assert_eq!(out, vec![want]);
    }

    #[test]
    fn pending_requests_are_bounded() {
        let limits = Limits {
            max_pending: 2,
            ..Limits::default()
        };
        let mut conn = Http1Connection::new(limits);
        let mut out = feed(
            &mut conn,
            &[ch(
                E,
                b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n",
                10,
            )],
        );
        conn.close(20, &mut out);
        let paths: Vec<_> = out.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/2", "/3"]);
        assert_eq!(conn.errors(), 1);
    }

    #[test]
    fn unmatched_response_is_counted() {
        let mut conn = Http1Connection::new(Limits::default());
        let out = feed(
            &mut conn,
            &[ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 10)],
        );
        assert!(out.is_empty());
        assert_eq!(conn.errors(), 1);
        assert_eq!(conn.side(), Some(Side::Client));
    }

    #[test]
    fn side_hint_fixes_roles() {
        let mut conn = Http1Connection::new(Limits::default());
        conn.set_side_hint(Side::Server);
        assert_eq!(conn.side(), Some(Side::Server));
        // A request in the egress direction is not what a server sends.
        let mut out = feed(&mut conn, &[ch(E, b"GET /wrong HTTP/1.1\r\n\r\n", 5)]);
        out.extend(feed(
            &mut conn,
            &[
                ch(I, b"GET /right HTTP/1.1\r\n\r\n", 10),
                ch(E, b"HTTP/1.1 204 No\r\n\r\n", 20),
            ],
        ));
        assert_eq!(out, vec![get(Side::Server, "/right", 204, 10, 20)]);
    }

    #[test]
    fn chunked_gap_inside_data_is_fine_but_not_in_size_line() {
        let resp =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n";
        let data_at = resp.len() - 19;
        let out = run(
            &[
                ch(E, b"GET /1 HTTP/1.1\r\n\r\n", 10),
                cut(I, &resp[..data_at + 4], data_at + 7, 20),
                ch(I, &resp[data_at + 7..], 21),
            ],
            30,
        );
        assert_eq!(
            out,
            vec![Exchange {
                response_body_bytes: 10,
                response_end_ns: Some(21),
                ..get(Side::Client, "/1", 200, 10, 20)
            }]
        );
    }

    #[test]
    fn chunked_one_chunk_per_send_survives_capture_cap() {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut send1 = format!("{:x}\r\n", 3000).into_bytes();
        send1.extend(filler(3000));
        send1.extend(b"\r\n");
        let mut send2 = format!("{:x}\r\n", 5000).into_bytes();
        send2.extend(filler(5000));
        let out = run(
            &[
                ch(E, b"GET /1 HTTP/1.1\r\n\r\n", 10),
                ch(I, head, 20),
                cut(I, &send1[..1000], send1.len(), 21),
                cut(I, &send2[..1000], send2.len() + 1, 22),
                ch(I, b"\n0\r\n\r\n", 23),
            ],
            30,
        );
        assert_eq!(
            out,
            vec![Exchange {
                response_body_bytes: 8000,
                response_end_ns: Some(23),
                ..get(Side::Client, "/1", 200, 10, 20)
            }]
        );
    }

    #[test]
    fn bad_framing_is_reported() {
        let out = run(
            &[
                ch(E, b"GET /1 HTTP/1.1\r\n\r\n", 10),
                ch(
                    I,
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                    20,
                ),
                ch(E, b"GET /2 HTTP/1.1\r\n\r\n", 30),
                ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 40),
            ],
            50,
        );
        assert_eq!(
            out,
            vec![
                Exchange {
                    response_end_ns: Some(20),
                    incomplete: Some("bad_framing"),
                    ..get(Side::Client, "/1", 200, 10, 20)
                },
                get(Side::Client, "/2", 200, 30, 40),
            ]
        );
    }

    #[test]
    fn head_buffer_is_reused() {
        let mut conn = Http1Connection::new(Limits::default());
        let mut out = Vec::new();
        for k in 0..4u64 {
            conn.feed(ch(E, &REQ1[..50], 10 * k), &mut out);
            conn.feed(ch(E, &REQ1[50..], 10 * k + 1), &mut out);
            conn.feed(ch(I, RESP1, 10 * k + 2), &mut out);
        }
        let cap = conn.streams[0].buf.capacity();
        for k in 4..50u64 {
            conn.feed(ch(E, &REQ1[..50], 10 * k), &mut out);
            conn.feed(ch(E, &REQ1[50..], 10 * k + 1), &mut out);
            conn.feed(ch(I, RESP1, 10 * k + 2), &mut out);
        }
        assert_eq!(out.len(), 50);
        assert_eq!(conn.streams[0].buf.capacity(), cap);
    }

    /// `call` as the kernel captures it: its first `head` bytes and, when
    /// more remain, up to `tail` of its last bytes.
    fn capt(direction: Direction, call: &[u8], head: usize, tail: usize, ts_ns: u64) -> Chunk<'_> {
        let head = head.min(call.len());
        let tail = tail.min(call.len() - head);
        Chunk {
            direction,
            total_len: call.len() as u32,
            bytes: &call[..head],
            tail: &call[call.len() - tail..],
            ts_ns,
            start_ns: ts_ns,
        }
    }

    /// A chunked body of `n` chunks of `size` bytes each, then `end`.
    fn chunked_body(n: usize, size: usize, end: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for _ in 0..n {
            b.extend(format!("{size:x}\r\n").bytes());
            b.extend(tricky_filler(size, false));
            b.extend(b"\r\n");
        }
        b.extend(end);
        b
    }

    const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";

    /// One GET /1 at 10 answered by `resp_chunks`, then GET /2 answered 204.
    fn chunked_then_204(resp_chunks: &[Chunk<'_>]) -> Vec<Exchange> {
        let mut chunks = vec![ch(E, b"GET /1 HTTP/1.1\r\n\r\n", 10)];
        chunks.extend_from_slice(resp_chunks);
        chunks.push(ch(E, b"GET /2 HTTP/1.1\r\n\r\n", 30));
        chunks.push(ch(I, b"HTTP/1.1 204 No Content\r\n\r\n", 40));
        run(&chunks, 1_000_000)
    }

    /// Body bytes counted after lost framing: the payload plus the framing
    /// that was never captured, never less than the payload.
    fn assert_approx_body(got: u64, payload: usize, hidden_framing: usize) {
        assert!(
            (payload as u64..=(payload + hidden_framing) as u64).contains(&got),
            "{got} not in {payload}..={}",
            payload + hidden_framing
        );
    }

    #[test]
    fn chunked_end_recognises_only_a_final_last_chunk() {
        let yes: &[(&[u8], bool, usize)] = &[
            (b"abc\r\n0\r\n\r\n", false, 7),
            (b"0\r\n\r\n", true, 5),
            (b"000\r\n\r\n", true, 7),
            (b"xy\r\n0;ext=1\r\n\r\n", false, 13),
            (b"z\r\n0\r\nX-Sum: 1\r\nEtag: \"a\"\r\n\r\n", false, 28),
            (b"0\r\nX-Sum: 1\r\n\r\n", true, 15),
        ];
        for &(end, at_start, n) in yes {
            assert_eq!(
                chunked_end(end, at_start),
                Some(n),
                "{:?}",
                end.escape_ascii()
            );
        }
        let no: &[(&[u8], bool)] = &[
            (b"0\r\n\r\n", false),
            (b"x0\r\n\r\n", true),
            (b"\r\n10\r\n\r\n", false),
            (b"\r\n0\r\n\r\nmore", false),
            (b"\r\n0\r\n\r\n\r\n", false),
            (b"\r\n0\r\n", false),
            (b"\r\nGET / HTTP/1.1\r\n\r\n", false),
            (b"\r\n0\r\nnot a trailer\r\n\r\n", false),
            (b"\r\n0\n\n", false),
            (b"X-Sum: 1\r\n\r\n", true),
            (b"", true),
        ];
        for &(end, at_start) in no {
            assert_eq!(chunked_end(end, at_start), None, "{:?}", end.escape_ascii());
        }
    }

    #[test]
    fn lost_chunked_ends_at_terminator_in_a_later_tail() {
        let mut resp = CHUNKED_HEAD.to_vec();
        resp.extend(chunked_body(6, 4000, b"0\r\n\r\n"));
        let (a, b) = resp.split_at(9000);
        let out = chunked_then_204(&[capt(I, a, 4096, 64, 20), capt(I, b, 4096, 64, 25)]);
        assert_approx_body(out[0].response_body_bytes, 24_000, 7 * 6);
        assert_eq!(
            out,
            vec![
                Exchange {
                    response_body_bytes: out[0].response_body_bytes,
                    response_end_ns: Some(25),
                    ..get(Side::Client, "/1", 200, 10, 20)
                },
                get(Side::Client, "/2", 204, 30, 40),
            ]
        );
    }

    #[test]
    fn lost_chunked_ends_at_terminator_in_the_same_tail() {
        // curl reading a 22 KB response in one recv.
        let mut resp = CHUNKED_HEAD.to_vec();
        resp.extend(chunked_body(11, 2000, b"0\r\n\r\n"));
        let out = chunked_then_204(&[capt(I, &resp, 4096, 64, 20)]);
        assert_approx_body(out[0].response_body_bytes, 22_000, 11 * 7);
        assert_eq!(
            out,
            vec![
                Exchange {
                    response_body_bytes: out[0].response_body_bytes,
                    ..get(Side::Client, "/1", 200, 10, 20)
                },
                get(Side::Client, "/2", 204, 30, 40),
            ]
        );
    }

    #[test]
    fn lost_chunked_ends_at_a_call_of_just_the_last_chunk() {
        let mut resp = CHUNKED_HEAD.to_vec();
        resp.extend(chunked_body(3, 5000, b""));
        for tail in [0, 64] {
            let out = chunked_then_204(&[capt(I, &resp, 4096, tail, 20), ch(I, b"0\r\n\r\n", 25)]);
            assert_approx_body(out[0].response_body_bytes, 15_000, 3 * 8);
            assert_eq!(
                out,
                vec![
                    Exchange {
                        response_body_bytes: out[0].response_body_bytes,
                        response_end_ns: Some(25),
                        ..get(Side::Client, "/1", 200, 10, 20)
                    },
                    get(Side::Client, "/2", 204, 30, 40),
                ]
            );
        }
    }

    #[test]
    fn lost_chunked_ends_at_terminator_with_trailers() {
        let mut resp = CHUNKED_HEAD.to_vec();
        resp.extend(chunked_body(
            3,
            5000,
            b"0;done\r\nX-Checksum: abc\r\nServer-Timing: db;dur=53\r\n\r\n",
        ));
        let (a, b) = resp.split_at(6000);
        let out = chunked_then_204(&[capt(I, a, 4096, 0, 20), capt(I, b, 4096, 64, 25)]);
        assert_approx_body(out[0].response_body_bytes, 15_000, 3 * 8);
        assert_eq!(out[0].response_end_ns, Some(25));
        assert_eq!(out[0].incomplete, None);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn last_chunk_inside_a_tail_is_not_an_end() {
        let mut resp = CHUNKED_HEAD.to_vec();
        resp.extend(chunked_body(5, 2000, b""));
        // Payload holding a last chunk, but the call goes on after it.
        let mut more = tricky_filler(4030, false);
        more.extend(b"\r\n0\r\n\r\nstill the body");
        let out = chunked_then_204(&[capt(I, &resp, 4096, 64, 20), capt(I, &more, 10, 64, 25)]);
        assert_eq!(
            out,
            vec![
                Exchange {
                    response_body_bytes: out[0].response_body_bytes,
                    response_end_ns: Some(25),
                    incomplete: Some("capture_gap"),
                    ..get(Side::Client, "/1", 200, 10, 20)
                },
                get(Side::Client, "/2", 204, 30, 40),
            ]
        );
    }

    #[test]
    fn lost_request_body_ends_at_terminator() {
        let mut req = b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend(chunked_body(4, 3000, b"0\r\n\r\n"));
        let out = run(
            &[
                capt(E, &req, 4096, 64, 10),
                ch(I, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", 20),
            ],
            1_000_000,
        );
        assert_approx_body(out[0].request_body_bytes, 12_000, 4 * 8);
        assert_eq!(
            out,
            vec![Exchange {
                method: "POST".into(),
                request_body_bytes: out[0].request_body_bytes,
                ..get(Side::Client, "/up", 201, 10, 20)
            }]
        );
    }

    #[test]
    fn unknowable_end_is_the_last_chunk_not_the_close() {
        let mut resp = CHUNKED_HEAD.to_vec();
        resp.extend(chunked_body(3, 5000, b""));
        let out = run(
            &[
                ch(E, b"GET /1 HTTP/1.1\r\n\r\n", 10),
                capt(I, &resp, 4096, 0, 20),
                cut(I, b"1000\r\n", 4102, 21),
                // Idle keep-alive connection, closed much later.
            ],
            60_000_000_000,
        );
        assert_eq!(
            out,
            vec![Exchange {
                response_body_bytes: out[0].response_body_bytes,
                response_end_ns: Some(21),
                incomplete: Some("capture_gap"),
                ..get(Side::Client, "/1", 200, 10, 20)
            }]
        );
    }

    #[test]
    fn egress_message_starts_when_its_call_began() {
        let req = Chunk { start_ns: 4, ..ch(E, b"GET /a HTTP/1.1\r\n\r\n", 10) };
        let resp = ch(I, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 30);
        let out = run(&[req, resp], 40);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].request_start_ns, 4);
        assert_eq!(out[0].request_end_ns, 10);
        assert_eq!(out[0].response_end_ns, Some(30));
    }

    #[test]
    fn bad_tail_is_ignored() {
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let c = Chunk {
            tail: b"HTTP/1.1 500 X\r\nContent-Length: 0\r\n\r\n",
            ..ch(I, resp, 20)
        };
        let out = run(&[ch(E, b"GET /1 HTTP/1.1\r\n\r\n", 10), c], 30);
        assert_eq!(
            out,
            vec![Exchange {
                response_body_bytes: 5,
                ..get(Side::Client, "/1", 200, 10, 20)
            }]
        );
    }

    #[test]
    fn messages_after_a_content_length_body_in_the_tail() {
        let reqs = b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\nGET /4 HTTP/1.1\r\n\r\n";
        let mut resps = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n".to_vec();
        resps.extend(tricky_filler(10_000, true));
        let small = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnopHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        resps.extend(small);
        let last = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n";
        resps.extend(&last[..10]);
        let want = |tail_known: bool| {
            let mut w = vec![
                Exchange {
                    response_body_bytes: 10_000,
                    ..get(Side::Client, "/1", 200, 10, 20)
                },
                Exchange {
                    response_body_bytes: 3,
                    ..get(Side::Client, "/2", 404, 10, 20)
                },
                Exchange {
                    response_body_bytes: 2,
                    ..get(Side::Client, "/3", 200, 10, 20)
                },
                Exchange {
                    response_end_ns: Some(21),
                    ..get(Side::Client, "/4", 202, 10, 20)
                },
            ];
            if !tail_known {
                // The next response began in the gap.
                w[1] = Exchange {
                    status: None,
                    response_end_ns: Some(21),
                    incomplete: Some("capture_gap"),
                    ..get(Side::Client, "/2", 0, 10, 20)
                };
                w.truncate(2);
            }
            w
        };
        // The tail holds the body's end, two responses and a head's start
        // that the next call completes.
        for tail in [small.len() + 10, small.len() + 10 + 7] {
            let out = run(
                &[
                    ch(E, reqs, 10),
                    capt(I, &resps, 4096, tail, 20),
                    ch(I, &last[10..], 21),
                ],
                30,
            );
            assert_eq!(out, want(true));
        }
        // The body ends before the tail: as without a tail.
        let out = run(
            &[
                ch(E, reqs, 10),
                capt(I, &resps, 4096, small.len(), 20),
                ch(I, &last[10..], 21),
            ],
            30,
        );
        assert_eq!(out[..2], want(false)[..]);
    }

    // ---- property tests -------------------------------------------------

    #[derive(Clone, Debug)]
    enum GenBody {
        Empty,
        Len(usize),
        Chunked(Vec<usize>, bool, bool),
    }

    #[derive(Clone, Debug)]
    struct GenEx {
        method: &'static str,
        path: &'static str,
        query: bool,
        ua: bool,
        req_body: GenBody,
        interim: bool,
        status: u16,
        resp_body: GenBody,
    }

    /// Body content that looks like HTTP, to catch bodies being parsed.
    fn filler(n: usize) -> Vec<u8> {
        tricky_filler(n, true)
    }

    /// `tricky`: the body holds message starts, which in-sync parsing must
    /// skip (after a capture gap, a chunk starting with one would resync).
    fn tricky_filler(n: usize, tricky: bool) -> Vec<u8> {
        let pat: &[u8] = if tricky {
            b"HTTP/1.1 200 OK\r\nGET / HTTP/1.1\r\n\r\n0\r\n\r\n"
        } else {
            b"lorem ipsum dolor sit amet\r\n\r\n0\r\n"
        };
        (0..n).map(|i| pat[i % pat.len()]).collect()
    }

    /// Render a body; returns (framing header, bytes, payload length).
    fn render_body(b: &GenBody, tricky: bool) -> (String, Vec<u8>, u64) {
        match b {
            GenBody::Empty => (String::new(), Vec::new(), 0),
            GenBody::Len(n) => (
                format!("Content-Length: {n}\r\n"),
                tricky_filler(*n, tricky),
                *n as u64,
            ),
            GenBody::Chunked(sizes, trailer, ext) => {
                let mut out = Vec::new();
                for &s in sizes {
                    out.extend(format!("{s:x}{}\r\n", if *ext { ";a=b" } else { "" }).bytes());
                    out.extend(tricky_filler(s, tricky));
                    out.extend(b"\r\n");
                }
                out.extend(b"0\r\n");
                if *trailer {
                    out.extend(b"X-Sum: 1\r\n");
                }
                out.extend(b"\r\n");
                (
                    "Transfer-Encoding: chunked\r\n".into(),
                    out,
                    sizes.iter().sum::<usize>() as u64,
                )
            }
        }
    }

    struct Seg {
        dir: Direction,
        bytes: Vec<u8>,
        ts: u64,
        /// Length of a Content-Length / close-delimited body at the end.
        tail_body: usize,
    }

    const CLOSE_TS: u64 = 1_000_000;

    /// Render a conversation; returns segments and the expected exchanges.
    fn conversation(
        exs: &[GenEx],
        pipelined: bool,
        server: bool,
        last_close: bool,
        tricky: bool,
    ) -> (Vec<Seg>, Vec<Exchange>) {
        let (side, req_dir) = if server {
            (Side::Server, I)
        } else {
            (Side::Client, E)
        };
        let mut reqs = Vec::new();
        let mut resps = Vec::new();
        let mut want = Vec::new();
        for (k, g) in exs.iter().enumerate() {
            let k = k as u64;
            let (req_ts, resp_ts) = if pipelined {
                (10 + k, 10_000 + 10 * k)
            } else {
                (100 * k + 10, 100 * k + 50)
            };
            let (framing, body, req_len) = render_body(&g.req_body, tricky);
            let mut req = format!(
                "{} {}{} HTTP/1.1\r\nHost: h.example\r\n",
                g.method,
                g.path,
                if g.query { "?k=v" } else { "" }
            );
            if g.ua {
                req.push_str("User-Agent: ua/1\r\n");
            }
            req.push_str("Authorization: Basic c2VjcmV0\r\n");
            req.push_str(&framing);
            req.push_str("\r\n");
            let mut req = req.into_bytes();
            req.extend(&body);
            let tail = if matches!(g.req_body, GenBody::Len(_)) {
                body.len()
            } else {
                0
            };
            reqs.push(Seg {
                dir: req_dir,
                bytes: req,
                ts: req_ts,
                tail_body: tail,
            });

            let mut resp = Vec::new();
            if g.interim {
                resp.extend(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            resp.extend(format!("HTTP/1.1 {} X\r\nSet-Cookie: a=b\r\n", g.status).bytes());
            let is_last = k as usize == exs.len() - 1;
            let no_body = g.method == "HEAD" || g.status == 204 || g.status == 304;
            let close = is_last && last_close && !no_body;
            let (resp_len, tail) = if g.method == "HEAD" {
                resp.extend(b"Content-Length: 123\r\n\r\n");
                (0, 0)
            } else if g.status == 204 {
                resp.extend(b"\r\n");
                (0, 0)
            } else if g.status == 304 {
                resp.extend(b"Content-Length: 42\r\n\r\n");
                (0, 0)
            } else if close {
                let n = match &g.resp_body {
                    GenBody::Len(n) => *n,
                    _ => 7,
                };
                resp.extend(b"Connection: close\r\n\r\n");
                resp.extend(tricky_filler(n, tricky));
                (n as u64, n)
            } else {
                let (framing, body, len) = render_body(&g.resp_body, tricky);
                let framing = if framing.is_empty() {
                    "Content-Length: 0\r\n".to_owned()
                } else {
                    framing
                };
                resp.extend(framing.bytes());
                resp.extend(b"\r\n");
                resp.extend(&body);
                (
                    len,
                    if matches!(g.resp_body, GenBody::Len(_)) {
                        body.len()
                    } else {
                        0
                    },
                )
            };
            resps.push(Seg {
                dir: req_dir.other(),
                bytes: resp,
                ts: resp_ts,
                tail_body: tail,
            });
            want.push(Exchange {
                has_query: g.query,
                host: Some("h.example".into()),
                user_agent: g.ua.then(|| "ua/1".into()),
                request_content_length: match g.req_body {
                    GenBody::Len(n) => Some(n as u64),
                    _ => None,
                },
                status: Some(g.status),
                request_body_bytes: req_len,
                response_body_bytes: resp_len,
                request_start_ns: req_ts,
                request_end_ns: req_ts,
                response_start_ns: Some(resp_ts),
                response_end_ns: Some(if close { CLOSE_TS } else { resp_ts }),
                ..ex(side, g.method, g.path)
            });
        }
        let segs = if pipelined {
            reqs.into_iter().chain(resps).collect()
        } else {
            reqs.into_iter()
                .zip(resps)
                .flat_map(|(a, b)| [a, b])
                .collect()
        };
        (segs, want)
    }

    fn gen_body() -> impl Strategy<Value = GenBody> {
        prop_oneof![
            Just(GenBody::Empty),
            (0usize..300).prop_map(GenBody::Len),
            (
                prop::collection::vec(1usize..40, 0..4),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(v, t, e)| GenBody::Chunked(v, t, e)),
        ]
    }

    fn gen_ex() -> impl Strategy<Value = GenEx> {
        (
            prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]),
            prop::sample::select(vec!["/", "/a", "/a/b/c", "/x.y"]),
            any::<bool>(),
            any::<bool>(),
            gen_body(),
            any::<bool>(),
            prop::sample::select(vec![200u16, 201, 204, 304, 404, 500]),
            gen_body(),
        )
            .prop_map(
                |(method, path, query, ua, req_body, interim, status, resp_body)| GenEx {
                    method,
                    path,
                    query,
                    ua,
                    req_body,
                    interim,
                    status,
                    resp_body,
                },
            )
    }

    fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Feed segments; `split` cuts each into random pieces (same ts);
    /// `gaps` leaves part of each trailing Content-Length body uncaptured.
    fn feed_segs(segs: &[Seg], split: Option<u64>, gaps: Option<u64>) -> Vec<Exchange> {
        let mut conn = Http1Connection::new(Limits::default());
        let mut out = Vec::new();
        let mut seed = split.or(gaps).unwrap_or(1) | 1;
        for s in segs {
            let b = &s.bytes[..];
            if gaps.is_some() && s.tail_body > 0 {
                let keep = b.len() - (xorshift(&mut seed) % (s.tail_body as u64 + 1)) as usize;
                assert_eq!(
                    conn.feed(cut(s.dir, &b[..keep], b.len(), s.ts), &mut out),
                    Feed::Continue
                );
                continue;
            }
            let mut cuts = vec![0, b.len()];
            if split.is_some() {
                for _ in 0..xorshift(&mut seed) % 6 {
                    cuts.push((xorshift(&mut seed) % (b.len() as u64 + 1)) as usize);
                }
            }
            cuts.sort_unstable();
            for w in cuts.windows(2) {
                if w[0] < w[1] {
                    assert_eq!(
                        conn.feed(ch(s.dir, &b[w[0]..w[1]], s.ts), &mut out),
                        Feed::Continue
                    );
                }
            }
        }
        conn.close(CLOSE_TS, &mut out);
        assert_eq!(conn.errors(), 0);
        for ex in &mut out {
            ex.seq = 0;
        }
        out
    }

    const FRAGMENTS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n",
        b"POST /p?q=1 HTTP/1.0\r\n",
        b"HEAD / HTTP/1.1\r\n",
        b"CONNECT a:1 HTTP/1.1\r\n",
        b"Host: a\r\n",
        b"Content-Length: 5\r\n",
        b"Content-Length: x\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 100 Continue\r\n",
        b"HTTP/1.1 101 Switching\r\n",
        b"HTTP/1.0 204 No\r\n",
        b"5\r\nhello\r\n",
        b"0\r\n\r\n",
        b"hello",
        b"ffffffffffffffff\r\n",
        b"\x16\x03\x01",
        b" ",
    ];

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// End of the last head of a rendered message (after a 100 Continue).
    fn final_head_end(b: &[u8]) -> usize {
        let mut end = find(b, b"\r\n\r\n").map_or(b.len(), |i| i + 4);
        if b.starts_with(b"HTTP/1.1 100") {
            end += find(&b[end..], b"\r\n\r\n").map_or(0, |i| i + 4);
        }
        end.min(b.len())
    }

    /// Bytes a tail must hold to show the end of a rendered chunked message
    /// (0 for other framings: their end is found by count).
    fn chunked_framing(b: &[u8]) -> usize {
        let head = &b[..final_head_end(b)];
        if find(head, b"Transfer-Encoding: chunked").is_none() {
            0
        } else if b.ends_with(b"\r\n0\r\nX-Sum: 1\r\n\r\n") {
            17
        } else {
            7
        }
    }

    impl Exchange {
        fn side_req_dir(&self) -> Direction {
            req_dir_of(self.side)
        }
    }

    fn gen_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(prop::sample::select(FRAGMENTS.to_vec()), 0..8)
                .prop_map(|v| v.concat()),
        ]
    }

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_split_gives_the_same_exchanges(
            exs in prop::collection::vec(gen_ex(), 1..5),
            pipelined in any::<bool>(),
            server in any::<bool>(),
            last_close in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let (segs, want) = conversation(&exs, pipelined, server, last_close, true);
            let whole = feed_segs(&segs, None, None);
            prop_assert_eq!(&whole, &want);
            let split = feed_segs(&segs, Some(seed), None);
            prop_assert_eq!(&split, &want);
        }

        #[test]
        fn gaps_in_content_length_bodies_change_nothing(
            exs in prop::collection::vec(gen_ex(), 1..5),
            pipelined in any::<bool>(),
            server in any::<bool>(),
            last_close in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let (segs, want) = conversation(&exs, pipelined, server, last_close, true);
            prop_assert_eq!(&feed_segs(&segs, None, Some(seed)), &want);
        }

        #[test]
        fn arbitrary_input_never_panics_nor_invents_requests(
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
            let limits = if small {
                Limits { max_header_bytes: 64, max_pending: 2, resync_chunks: 2 }
            } else {
                Limits::default()
            };
            let mut conn = Http1Connection::new(limits);
            if let Some(h) = hint {
                conn.set_side_hint(if h { Side::Client } else { Side::Server });
            }
            let mut out = Vec::new();
            let mut seen = [Vec::new(), Vec::new()];
            for (k, (egress, bytes, gap, close, tail)) in chunks.iter().enumerate() {
                let d = if *egress { E } else { I };
                seen[d.idx()].extend_from_slice(bytes);
                seen[d.idx()].extend_from_slice(tail);
                // Sometimes a tail that does not fit (must be ignored).
                let total_len = (bytes.len() + tail.len()) as u32 + gap;
                let total_len = if *gap == 1 { 1 } else { total_len };
                let c = Chunk { direction: d, total_len, bytes, tail, ts_ns: k as u64, start_ns: k as u64 };
                let _ = conn.feed(c, &mut out);
                if *close {
                    conn.close(k as u64, &mut out);
                }
                for s in &conn.streams {
                    prop_assert!(s.buf.len() <= limits.max_header_bytes + 2);
                }
                prop_assert!(conn.sh.pending.len() <= limits.max_pending);
            }
            conn.close(1000, &mut out);
            let starts = count(&seen[0], b" HTTP/1.") + count(&seen[1], b" HTTP/1.");
            prop_assert!(out.len() <= starts, "{} exchanges, {} starts", out.len(), starts);
            for e in &out {
                prop_assert!(e.request_start_ns <= e.request_end_ns);
            }
        }

        #[test]
        fn head_and_tail_caps_keep_the_exchanges(
            exs in prop::collection::vec(gen_ex(), 1..5),
            pipelined in any::<bool>(),
            server in any::<bool>(),
            tricky in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let (segs, want) = conversation(&exs, pipelined, server, false, tricky);
            let mut conn = Http1Connection::new(Limits::default());
            let mut out = Vec::new();
            let mut x = seed | 1;
            // Per message (request k, response k): whole head captured and
            // the end either contiguous or showing the whole last chunk.
            let mut clean = [vec![true; want.len()], vec![true; want.len()]];
            let mut counts = [0usize; 2];
            // A head cut by the capture (say a 1xx, or the first message
            // of a direction) may hide a message start: pairing is only best
            // effort from that exchange on. Body caps and tails never
            // affect it.
            let mut head_cut = want.len();
            for s in &segs {
                let b = &s.bytes[..];
                let head = final_head_end(b);
                let cap = if xorshift(&mut x).is_multiple_of(3) {
                    (xorshift(&mut x) % (b.len() as u64 + 1)) as usize
                } else {
                    head + (xorshift(&mut x) % ((b.len() - head) as u64 + 1)) as usize
                };
                let tail = (xorshift(&mut x) % 65) as usize;
                let c = capt(s.dir, b, cap, tail, s.ts);
                let gap = b.len() - c.bytes.len() - c.tail.len();
                let framing = chunked_framing(b);
                let is_req = usize::from(s.dir != want[0].side_req_dir());
                let k = counts[is_req];
                counts[is_req] += 1;
                clean[is_req][k] = cap >= head && (gap == 0 || c.tail.len() >= framing);
                if cap < head {
                    head_cut = head_cut.min(k);
                }
                prop_assert_eq!(conn.feed(c, &mut out), Feed::Continue);
            }
            conn.close(CLOSE_TS, &mut out);
            prop_assert!(out.len() <= want.len());
            let mut next = 0;
            for e in &out {
                let k = (next..want.len()).find(|&k| {
                    let w = &want[k];
                    (w.method.as_str(), w.path.as_str(), w.request_start_ns)
                        == (e.method.as_str(), e.path.as_str(), e.request_start_ns)
                });
                prop_assert!(k.is_some(), "invented {:?}", e);
                let k = k.unwrap_or(0);
                next = k + 1;
                let w = &want[k];
                if e.status.is_some() && k < head_cut {
                    prop_assert_eq!(e.status, w.status, "{:?}", e);
                }
                if clean[0][k] && clean[1][k] && k < head_cut {
                    prop_assert!(e.request_body_bytes >= w.request_body_bytes);
                    prop_assert!(e.response_body_bytes >= w.response_body_bytes);
                    let e = Exchange {
                        request_body_bytes: w.request_body_bytes,
                        response_body_bytes: w.response_body_bytes,
                        seq: w.seq,
                        ..e.clone()
                    };
                    prop_assert_eq!(&e, w);
                }
            }
            // Nothing lost when every message was clean.
            if clean.iter().all(|c| c.iter().all(|&c| c)) {
                prop_assert_eq!(out.len(), want.len());
            }
        }

        #[test]
        fn capture_caps_anywhere_never_invent_exchanges(
            exs in prop::collection::vec(gen_ex(), 1..5),
            pipelined in any::<bool>(),
            server in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let (segs, want) = conversation(&exs, pipelined, server, false, false);
            let mut conn = Http1Connection::new(Limits::default());
            let mut out = Vec::new();
            let mut x = seed | 1;
            'feed: for s in &segs {
                let b = &s.bytes[..];
                let mut cuts = vec![0, b.len()];
                for _ in 0..xorshift(&mut x) % 4 {
                    cuts.push((xorshift(&mut x) % (b.len() as u64 + 1)) as usize);
                }
                cuts.sort_unstable();
                for w in cuts.windows(2) {
                    let piece = &b[w[0]..w[1]];
                    let keep = if xorshift(&mut x).is_multiple_of(3) {
                        (xorshift(&mut x) % (piece.len() as u64 + 1)) as usize
                    } else {
                        piece.len()
                    };
                    let c = cut(s.dir, &piece[..keep], piece.len(), s.ts);
                    if conn.feed(c, &mut out) == Feed::NotHttp {
                        // Allowed only while no message start was ever seen
                        // (every head so far cut short by the capture).
                        prop_assert!(out.is_empty());
                        break 'feed;
                    }
                }
            }
            conn.close(CLOSE_TS, &mut out);
            prop_assert!(out.len() <= want.len());
            let mut next = 0;
            for e in &out {
                // Emitted in request order, each one a real request.
                let k = (next..want.len()).find(|&k| {
                    let w = &want[k];
                    (w.method.as_str(), w.path.as_str(), w.request_start_ns)
                        == (e.method.as_str(), e.path.as_str(), e.request_start_ns)
                });
                prop_assert!(k.is_some(), "invented {:?}", e);
                next = k.unwrap_or(0) + 1;
                if e.incomplete.is_none() {
                    prop_assert_eq!(e.host.as_deref(), Some("h.example"));
                }
            }
        }
    }
}
