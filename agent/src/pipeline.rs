//! The event loop: ring buffer -> events -> connections -> protocols ->
//! spans -> export. One task owns all state; nothing on the per-event path
//! blocks or does I/O except the first /proc read for a new process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use periscope_ebpf::{DataEvent, GetaddrinfoEvent, IPPROTO_UDP, data_flags, direction, source};
use tokio::io::unix::AsyncFd;

use crate::connections::{Admit, ConnectTiming, Connection, ConnectionTable, ProtocolState, TlsState, socket_addrs};
use crate::discovery::process::ProcessCache;
use crate::control::daemon::ControlState;
use crate::control::server::ControlCall;
use crate::discovery::tls_watch::{Discovered, TlsWatch};
use crate::events::{self, Event};
use crate::export::SpanSink;
use crate::probes::Probes;
use crate::protocols::dns::{self, LookupTracker, Transport};
use crate::protocols::http1::{Chunk, Direction, Exchange, Feed, Limits, Side};
use crate::protocols::tls_records;
use crate::spans::context::{Bundle, HeldSpans, Identity, IdentityRef};
use crate::spans::links::{LinkOutcome, TraceLinks};
use crate::spans::model::{Attribute, Span, SpanKind, SpanStatus};
use crate::spans::phases::{self, ClientTimings, Phase, PhaseSpans, ServerTimings};
use crate::spans::resolutions::{self, Resolution, Resolutions, WireLookup};
use crate::spans::{clock::Clock, http};
use crate::stats::Stats;

pub struct PipelineSettings {
    pub max_connections: usize,
    /// Connections with no traffic for this long are forgotten.
    pub idle_timeout: Duration,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self { max_connections: 65_536, idle_timeout: Duration::from_secs(300) }
    }
}

pub struct Pipeline {
    connections: ConnectionTable,
    processes: ProcessCache,
    clock: Clock,
    sink: SpanSink,
    stats: Arc<Stats>,
    rng: rand::rngs::SmallRng,
    exchanges: Vec<Exchange>,
    settings: PipelineSettings,
    decode_errors_logged: bool,
    table_full_logged: bool,
    tls_scan_requests: Vec<u32>,
    tls_not_visible_reported: std::collections::HashSet<String>,
    /// Executables or libraries whose TLS cannot be seen, with the reason.
    tls_not_visible: Vec<(String, String)>,
    /// Programs started since the last drain: (pid, executable path).
    execs: Vec<(u32, String)>,
    /// Sockets whose payloads the kernel may stop copying, with the ports
    /// of the connection that asked (the socket may carry another one by
    /// the end of the batch).
    ignore_requests: Vec<(u64, u16, u16)>,
    /// The same, with their ports, for the kernel (reused per drain).
    ignore_batch: Vec<(u64, u16, u16)>,
    sampler: Sampler,
    tls_enabled: bool,
    dns_enabled: bool,
    phases_enabled: bool,
    phase_spans: PhaseSpans,
    /// Spans ready for export, handed to the sink once per drain.
    outbox: Vec<Span>,
    /// The spans of the request being built (reused).
    bundle: Vec<Span>,
    /// Client DNS lookups in flight, by socket and transaction id.
    lookups: LookupTracker,
    /// Resolutions and lookups waiting for the connection they led to.
    resolutions: Resolutions,
    links: TraceLinks,
    held: HeldSpans,
    /// Requests the parser just started, reused per event.
    new_requests: Vec<NewRequest>,
    phase_buf: Vec<Phase>,
    dns_messages: Vec<Vec<u8>>,
    finished_lookups: Vec<dns::Lookup>,
    dns_errors_logged: bool,
    /// Latest kernel timestamp seen (the clock for hold and link deadlines).
    now_ns: u64,
}

/// A request whose head the parser just read: its number on the connection,
/// the (trace id, parent span id) of its traceparent header if any, and the
/// fingerprint of its method and path.
type NewRequest = (u64, Option<([u8; 16], [u8; 8])>, u64);

/// Lookups with no answer for this long are given up (glibc's default
/// timeout is 5 s per attempt; a retry re-arms it).
const LOOKUP_TIMEOUT_NS: u64 = 10_000_000_000;
/// Longest a span waits for its parent's trace to be known.
const HOLD_SPANS_NS: u64 = 1_000_000_000;
const MAX_HELD_BUNDLES: usize = 8192;
const MAX_PENDING_LOOKUPS: usize = 8192;
const MAX_PENDING_RESOLUTIONS: usize = 4096;
const MAX_LINK_ENDS: usize = 65_536;

/// Head sampling by trace id (like the OpenTelemetry TraceIdRatioBased
/// sampler): the same decision for every span of one trace.
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    ratio: f64,
    threshold: u64,
}

impl Sampler {
    pub fn new(ratio: f64) -> Self {
        let ratio = if ratio.is_nan() { 1.0 } else { ratio.clamp(0.0, 1.0) };
        Self { ratio, threshold: (ratio * u64::MAX as f64) as u64 }
    }

    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    pub fn keep(&self, trace_id: &[u8; 16]) -> bool {
        if self.ratio >= 1.0 {
            return true;
        }
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        u64::from_be_bytes(low) < self.threshold
    }
}

impl Pipeline {
    pub fn new(settings: PipelineSettings, sink: SpanSink, stats: Arc<Stats>) -> Self {
        Self {
            connections: ConnectionTable::new(settings.max_connections),
            processes: ProcessCache::new(),
            clock: Clock::new(),
            sink,
            stats,
            rng: rand::SeedableRng::from_os_rng(),
            exchanges: Vec::with_capacity(8),
            settings,
            decode_errors_logged: false,
            table_full_logged: false,
            tls_scan_requests: Vec::new(),
            tls_not_visible_reported: Default::default(),
            tls_not_visible: Vec::new(),
            execs: Vec::new(),
            ignore_requests: Vec::new(),
            ignore_batch: Vec::new(),
            sampler: Sampler::new(1.0),
            tls_enabled: true,
            dns_enabled: true,
            phases_enabled: true,
            phase_spans: PhaseSpans::default(),
            outbox: Vec::with_capacity(1024),
            bundle: Vec::with_capacity(8),
            lookups: LookupTracker::new(MAX_PENDING_LOOKUPS),
            resolutions: Resolutions::new(MAX_PENDING_RESOLUTIONS),
            links: TraceLinks::new(MAX_LINK_ENDS),
            held: HeldSpans::new(MAX_HELD_BUNDLES),
            new_requests: Vec::new(),
            phase_buf: Vec::with_capacity(8),
            dns_messages: Vec::new(),
            finished_lookups: Vec::new(),
            dns_errors_logged: false,
            now_ns: 0,
        }
    }

    pub fn handle_record(&mut self, record: &[u8]) {
        Stats::inc(&self.stats.events_received);
        match events::decode(record) {
            Ok(event) => {
                self.handle(event);
                if let Some(replaced) = self.connections.take_replaced() {
                    let now = self.now_ns;
                    for conn in replaced {
                        self.finish(conn, now);
                    }
                }
            }
            Err(e) => {
                Stats::inc(&self.stats.events_malformed);
                if !self.decode_errors_logged {
                    warn!("undecodable ring buffer record ({e:?}); further ones are only counted");
                    self.decode_errors_logged = true;
                }
            }
        }
    }

    fn handle(&mut self, event: Event<'_>) {
        match event {
            Event::Data { event, payload, tail } => {
                self.processes.observe(event.header.tgid);
                self.now_ns = self.now_ns.max(event.header.ts_ns);
                if event.tuple.protocol == IPPROTO_UDP {
                    self.on_dns_datagram(&event, payload);
                    return;
                }
                let from_tls = event.source == source::TLS;
                if from_tls && event.sock == 0 {
                    Stats::inc(&self.stats.tls_unlinked);
                    return;
                }
                let conn = match self.connections.admit(event.sock, event.header.tgid, &event.tuple, event.header.ts_ns) {
                    Admit::Tracked(conn) => conn,
                    Admit::Full => {
                        Stats::inc(&self.stats.events_unmatched);
                        if !self.table_full_logged {
                            warn!("connection table full ({} entries): new connections are not traced", self.settings.max_connections);
                            self.table_full_logged = true;
                        }
                        return;
                    }
                };
                let egress = event.direction == direction::EGRESS;
                if event.flags & data_flags::LOST_BEFORE != 0 && !conn.out_of_step {
                    conn.out_of_step = true;
                    Stats::inc(&self.stats.connections_out_of_step);
                }
                if let ProtocolState::Dns(framing) = &mut conn.protocol {
                    let framer = &mut framing.framers[if egress { 0 } else { 1 }];
                    self.dns_messages.clear();
                    if framer.feed(payload, event.total_len, &mut self.dns_messages).is_err() {
                        Stats::inc(&self.stats.dns_parse_errors);
                    }
                    let peer = conn.peer;
                    let messages = std::mem::take(&mut self.dns_messages);
                    for m in &messages {
                        self.on_dns_payload(&event, m, Transport::Tcp, Some(peer));
                    }
                    self.dns_messages = messages;
                    return;
                }
                if from_tls {
                    conn.start_plaintext(Limits::default());
                } else {
                    conn.socket_chunks += 1;
                    // A handshake record on a connection not being parsed as
                    // HTTP (its first bytes, or one already found not to be
                    // HTTP) starts TLS observation; a connection that is
                    // parsing HTTP is never re-examined, so bodies can't.
                    let not_parsing_http =
                        conn.socket_chunks == 1 || matches!(conn.protocol, ProtocolState::Ignored);
                    if conn.tls.is_none() && not_parsing_http && tls_records::starts_tls_record(payload) {
                        conn.tls = Some(TlsState::new());
                    }
                    if let Some(tls) = &mut conn.tls {
                        // Ciphertext: never HTTP. Its handshake tells the version;
                        // after that the kernel can stop copying it.
                        tls.observe_ciphertext(egress, payload, event.call_start_ns, event.header.ts_ns);
                        if tls.observer.is_none() {
                            self.ignore_requests.push((event.sock, conn.local.port(), conn.peer.port()));
                        }
                        return;
                    }
                }
                let ProtocolState::Http1(parser) = &mut conn.protocol else {
                    Stats::inc(&self.stats.events_unparsed);
                    self.ignore_requests.push((event.sock, conn.local.port(), conn.peer.port()));
                    return;
                };
                let chunk = Chunk {
                    direction: if egress { Direction::Egress } else { Direction::Ingress },
                    total_len: event.total_len,
                    bytes: payload,
                    tail,
                    ts_ns: event.header.ts_ns,
                    // A write's bytes start leaving when the call begins; a
                    // read's are there when it returns.
                    start_ns: if egress { event.call_start_ns } else { event.header.ts_ns },
                };
                let errors_before = parser.errors();
                let feed = parser.feed(chunk, &mut self.exchanges);
                Stats::add(&self.stats.http_parse_errors, parser.errors() - errors_before);
                if let Feed::NotHttp = feed {
                    conn.protocol = ProtocolState::Ignored;
                    Stats::inc(&self.stats.connections_not_http);
                    Stats::inc(&self.stats.events_unparsed);
                    self.ignore_requests.push((event.sock, conn.local.port(), conn.peer.port()));
                } else {
                    if parser.is_upgraded() {
                        // After 101 Switching Protocols or a CONNECT tunnel the
                        // parser ignores the bytes: the kernel need not copy them.
                        self.ignore_requests.push((event.sock, conn.local.port(), conn.peer.port()));
                    }
                    let seen = parser.requests_seen();
                    for seq in conn.requests_noted..seen {
                        if let Some(ex) = parser.pending_request(seq) {
                            let traceparent = ex.traceparent.as_deref().and_then(http::parse_traceparent);
                            let fingerprint = crate::spans::links::fingerprint(&ex.method, &ex.path);
                            self.new_requests.push((seq, traceparent, fingerprint));
                        }
                    }
                    conn.requests_noted = seen;
                }
                if !self.new_requests.is_empty() {
                    self.start_requests(event.sock, event.tid);
                }
                self.emit_exchanges(event.sock);
            }
            Event::TlsHandshake(h) => {
                if h.sock == 0 {
                    Stats::inc(&self.stats.tls_unlinked);
                    return;
                }
                if let Admit::Tracked(conn) = self.connections.admit(h.sock, h.header.tgid, &h.tuple, h.header.ts_ns) {
                    let tls = conn.tls.get_or_insert_with(TlsState::new);
                    tls.handshake_seen = true;
                    tls.handshake_ns = Some(h.header.ts_ns.saturating_sub(h.start_ns));
                    tls.handshake = Some((h.start_ns, h.header.ts_ns));
                }
            }
            Event::MmapExec(m) => self.tls_scan_requests.push(m.header.tgid),
            Event::Connect(c) => {
                self.now_ns = self.now_ns.max(c.header.ts_ns);
                if c.failed == 0 {
                    let timing = ConnectTiming { syn_sent_ns: c.syn_sent_ns, established_ns: c.header.ts_ns };
                    let (_, peer) = socket_addrs(&c.tuple);
                    let resolution = self.resolutions.take_for_connect(c.header.tgid, peer.ip(), c.syn_sent_ns);
                    if resolution.is_some() {
                        Stats::inc(&self.stats.resolutions_linked);
                    }
                    if let Some(stale) =
                        self.connections.on_connect(c.sock, timing, resolution.map(Box::new), c.header.ts_ns)
                    {
                        self.finish(stale, c.header.ts_ns);
                    }
                }
            }
            Event::Accept(a) => {
                if let Some(stale) = self.connections.on_accept(a.sock, a.header.ts_ns) {
                    self.finish(stale, a.header.ts_ns);
                }
            }
            Event::Close(c) => {
                let mut orphans = Vec::new();
                if let Some(conn) = self.connections.remove(c.sock, &mut orphans) {
                    if matches!(conn.protocol, ProtocolState::Dns(_)) {
                        // DNS over TCP: what was never answered on it is given up.
                        let (sock, ts) = (c.sock, c.header.ts_ns);
                        self.give_up_lookups(|t, out| t.close_socket(sock, out), |_| ts);
                    }
                    self.finish(conn, c.header.ts_ns);
                }
                for r in orphans {
                    self.emit_resolution(r);
                }
            }
            Event::Getaddrinfo(g) => self.on_getaddrinfo(&g),
            Event::ProcessExec(e) => {
                self.processes.on_exec(e.header.tgid, &e);
                self.tls_scan_requests.push(e.header.tgid);
                if let Some(exe) = self.processes.executable_path(e.header.tgid) {
                    self.execs.push((e.header.tgid, exe));
                }
            }
            Event::ProcessExit(e) => {
                for conn in self.connections.remove_process(e.header.tgid) {
                    self.finish(conn, e.header.ts_ns);
                }
                let tgid = e.header.tgid;
                self.give_up_lookups(|t, out| t.remove_process(tgid, out), |_| e.header.ts_ns);
                self.processes.forget(e.header.tgid);
            }
        }
    }

    /// Builds spans for the exchanges the parser just completed on `sock`.
    fn emit_exchanges(&mut self, sock: u64) {
        if self.exchanges.is_empty() {
            return;
        }
        // The table is set aside while the spans are built (they need the
        // connection and the rest of the pipeline at once); swapping in an
        // empty one allocates nothing.
        let mut table = std::mem::replace(&mut self.connections, ConnectionTable::new(0));
        match table.get_mut(sock) {
            Some(conn) => self.emit(conn),
            None => self.exchanges.clear(),
        }
        self.connections = table;
    }


    /// Requests the parser just started on `sock`, read or sent by thread
    /// `tid`: each gets its identity (and parent) now.
    fn start_requests(&mut self, sock: u64, tid: u32) {
        let requests = std::mem::take(&mut self.new_requests);
        for &(seq, traceparent, fingerprint) in &requests {
            let Some(conn) = self.connections.get(sock) else { break };
            let (local, peer) = (conn.local, conn.peer);
            let side = match &conn.protocol {
                ProtocolState::Http1(p) => p.side(),
                _ => None,
            };
            let mut outcome = LinkOutcome::default();
            let identity = match side {
                // Events of this connection were lost: its request numbering
                // may be off, so it is linked to nothing.
                Some(_) if conn.out_of_step => Identity::root(&mut self.rng, true),
                Some(Side::Client) => {
                    let connections = &self.connections;
                    let is_open = |sock: u64, seq: u64, id: &IdentityRef| connections.serving_request(sock, seq, id);
                    self.links.client_request(
                        tid,
                        local,
                        peer,
                        seq,
                        fingerprint,
                        self.now_ns,
                        &mut self.rng,
                        is_open,
                        &mut outcome,
                    )
                }
                Some(Side::Server) => {
                    let connections = &self.connections;
                    let is_open = |sock: u64, seq: u64, id: &IdentityRef| connections.serving_request(sock, seq, id);
                    self.links.server_request(
                        tid,
                        sock,
                        local,
                        peer,
                        seq,
                        fingerprint,
                        traceparent,
                        self.now_ns,
                        &mut self.rng,
                        is_open,
                        &mut outcome,
                    )
                }
                None => continue,
            };
            self.count_link(outcome);
            if let Some(conn) = self.connections.get_mut(sock) {
                conn.requests.push_back((seq, identity));
            }
        }
        self.new_requests = requests;
        self.new_requests.clear();
    }

    fn count_link(&self, o: LinkOutcome) {
        if o.in_process {
            Stats::inc(&self.stats.trace_links_in_process);
        }
        if o.cross_process {
            Stats::inc(&self.stats.trace_links_cross_process);
        }
        if o.ambiguous {
            Stats::inc(&self.stats.trace_links_ambiguous);
        }
        if o.refused {
            Stats::inc(&self.stats.trace_links_refused);
        }
        if o.overflow {
            Stats::inc(&self.stats.correlation_overflow);
        }
    }

    /// Spans for the exchanges the parser completed on `conn`: the request's
    /// span, its phases, and the resolution that led to the connection.
    fn emit(&mut self, conn: &mut Connection) {
        let resource = self.processes.resource(conn.tgid);
        let mut exchanges = std::mem::take(&mut self.exchanges);
        for mut ex in exchanges.drain(..) {
            let identity = conn.take_request(ex.seq).unwrap_or_else(|| Identity::root(&mut self.rng, true));
            // Its span is being built: whatever it is linked to now stays.
            identity.settle();
            let tls = conn.tls.as_mut().filter(|t| t.plaintext_seen).map(|t| http::TlsSpanInfo {
                version: t.version,
                handshake_ns: t.handshake_ns.take(),
            });
            if let Some(t) = conn.tls.as_ref().filter(|t| t.plaintext_seen && t.version.is_none()) {
                log::debug!(
                    "TLS version unknown on {} -> {} (pid {}): {} socket chunks seen, observer {}",
                    conn.local,
                    conn.peer,
                    conn.tgid,
                    conn.socket_chunks,
                    match &t.observer {
                        Some(o) => o.gave_up().unwrap_or("still waiting for the hellos"),
                        None => "finished without a version",
                    }
                );
            }
            self.phase_buf.clear();
            let mut resolution = None;
            match ex.side {
                Side::Client => {
                    let first = !conn.first_exchange_done;
                    conn.first_exchange_done = true;
                    if first {
                        resolution = conn.resolution.take();
                    }
                    let handshake = if first { conn.tls.as_mut().and_then(|t| t.take_handshake()) } else { None };
                    let timings = ClientTimings {
                        dns: resolution.as_ref().map(|r| (r.start_ns, r.end_ns)),
                        connect: if first { conn.connect.map(|c| (c.syn_sent_ns, c.established_ns)) } else { None },
                        handshake,
                        request_start_ns: ex.request_start_ns,
                        request_end_ns: ex.request_end_ns,
                        response_start_ns: ex.response_start_ns,
                        response_end_ns: ex.response_end_ns,
                    };
                    phases::client(&timings, &mut self.phase_buf);
                }
                Side::Server => {
                    conn.first_exchange_done = true;
                    let timings = ServerTimings {
                        request_start_ns: ex.request_start_ns,
                        request_end_ns: ex.request_end_ns,
                        response_start_ns: ex.response_start_ns,
                        response_end_ns: ex.response_end_ns,
                    };
                    phases::server(&timings, &mut self.phase_buf);
                }
            }
            let start_ns = self.phase_buf.first().map(|p| p.start_ns).unwrap_or(ex.request_start_ns);
            let phase_attributes = if self.phases_enabled { self.phase_buf.len() } else { 0 };
            let mut span = http::build(phase_attributes, &mut ex, conn, tls, start_ns, resource.clone(), &self.clock);
            if ex.incomplete.is_some() {
                Stats::inc(&self.stats.spans_incomplete);
            }
            let failed = ex.incomplete.is_some() || matches!(span.status, SpanStatus::Error { .. });
            let waterfall = self.phases_enabled
                && self.phase_spans.wanted(span.end_unix_nano.saturating_sub(span.start_unix_nano), failed);
            if self.phases_enabled {
                span.attributes.extend(self.phase_buf.iter().map(|p| {
                    Attribute::int(phases::duration_key(p.name), p.end_ns.saturating_sub(p.start_ns) as i64)
                }));
            }
            let mut bundle = std::mem::take(&mut self.bundle);
            bundle.push(span);
            let parent_id = identity.span_id();
            if self.phases_enabled {
                let phase_list = std::mem::take(&mut self.phase_buf);
                for phase in &phase_list {
                    // A resolution is a call of its own (with its wire
                    // lookups): it stays the request's child even when the
                    // other phases are only attributes.
                    if phase.name == phases::name::DNS
                        && let Some(r) = resolution.take() {
                            self.resolution_spans(&r, true, parent_id, &resource, &mut bundle);
                            continue;
                        }
                    if waterfall {
                        bundle.push(phase_span(phase, parent_id, &resource, &self.clock, &mut self.rng));
                    }
                }
                self.phase_buf = phase_list;
            }
            self.submit(&mut bundle, identity);
            self.bundle = bundle;
            // Without phases the resolution is not part of the request's
            // breakdown: it goes out on its own, as getaddrinfo.
            if let Some(r) = resolution.take() {
                self.emit_resolution(*r);
            }
        }
        self.exchanges = exchanges;
    }

    /// Appends the spans of a resolution under `parent` (itself, then its
    /// wire lookups as its children) to `bundle`.
    fn resolution_spans(
        &mut self,
        r: &Resolution,
        as_phase: bool,
        parent: [u8; 8],
        resource: &std::sync::Arc<crate::spans::model::Resource>,
        bundle: &mut Vec<Span>,
    ) {
        let mut span = resolutions::build(r, as_phase, &self.clock);
        span.resource = resource.clone();
        span.span_id = http::new_span_id(&mut self.rng);
        span.parent_span_id = Some(parent);
        let id = span.span_id;
        bundle.push(span);
        self.lookup_spans(&r.lookups, id, Some(resource), bundle);
    }

    /// A resolution nothing linked: exported on its own, with its lookups.
    fn emit_resolution(&mut self, r: Resolution) {
        let identity = Identity::root(&mut self.rng, true);
        let mut bundle = Vec::with_capacity(1 + r.lookups.len());
        let mut span = resolutions::build(&r, false, &self.clock);
        span.span_id = identity.span_id();
        bundle.push(span);
        let own = identity.span_id();
        self.lookup_spans(&r.lookups, own, None, &mut bundle);
        self.submit(&mut bundle, identity);
    }

    /// Spans of wire lookups under `parent`, with the given resource (the
    /// request's process) or each lookup's own.
    fn lookup_spans(
        &mut self,
        lookups: &[WireLookup],
        parent: [u8; 8],
        resource: Option<&std::sync::Arc<crate::spans::model::Resource>>,
        bundle: &mut Vec<Span>,
    ) {
        for w in lookups {
            let span_id = http::new_span_id(&mut self.rng);
            let resource = resource.cloned().unwrap_or_else(|| w.resource.clone());
            bundle.push(self.lookup_span(w, span_id, Some(parent), resource));
        }
    }

    fn lookup_span(
        &self,
        w: &WireLookup,
        span_id: [u8; 8],
        parent: Option<[u8; 8]>,
        resource: std::sync::Arc<crate::spans::model::Resource>,
    ) -> Span {
        Stats::inc(&self.stats.dns_lookups);
        let peer = w.lookup.peer.unwrap_or(std::net::SocketAddr::from(([0, 0, 0, 0], 53)));
        crate::spans::dns::build(&w.lookup, peer, [0; 16], span_id, parent, resource, &self.clock, w.end_ns)
    }

    /// A wire lookup nothing claimed: exported on its own.
    fn emit_lookup(&mut self, w: WireLookup) {
        let identity = Identity::root(&mut self.rng, true);
        let span = self.lookup_span(&w, identity.span_id(), None, w.resource.clone());
        self.submit(&mut vec![span], identity);
    }

    /// Exports a bundle now if its trace is settled, else holds it (bounded).
    /// `spans` is left empty (its capacity kept); a bundle is only moved
    /// into a new allocation when it has to wait.
    fn submit(&mut self, spans: &mut Vec<Span>, identity: IdentityRef) {
        Stats::add(&self.stats.spans_built, spans.len() as u64);
        let requests = spans.iter().filter(|s| s.kind != SpanKind::Internal).count();
        Stats::add(&self.stats.request_spans_built, requests as u64);
        if identity.chain_settled() {
            self.send(spans, &identity);
        } else {
            Stats::inc(&self.stats.spans_held);
            let waiting = std::mem::take(spans);
            if let Some((mut spans, identity)) = self.held.hold(self.now_ns + HOLD_SPANS_NS, waiting, identity) {
                Stats::inc(&self.stats.spans_held_expired);
                self.send(&mut spans, &identity);
            }
        }
    }

    /// Stamps the bundle with its trace and moves it to the outbox (or
    /// drops it, sampled out), leaving `spans` empty.
    fn send(&mut self, spans: &mut Vec<Span>, identity: &Identity) {
        if spans.is_empty() {
            return;
        }
        crate::spans::context::stamp(spans, identity);
        identity.mark_exported();
        if !self.sampler.keep(&spans[0].trace_id) {
            Stats::add(&self.stats.spans_sampled_out, spans.len() as u64);
            spans.clear();
            return;
        }
        self.outbox.append(spans);
    }

    /// Hands the spans built since the last call to the exporter.
    pub fn flush_outbox(&mut self) {
        if !self.outbox.is_empty() {
            self.sink.submit_all(&mut self.outbox);
        }
    }

    /// When phases become child spans as well as attributes.
    pub fn set_phase_spans(&mut self, rule: PhaseSpans) {
        self.phase_spans = rule;
    }

    /// Held bundles whose trace became known, or whose time is up.
    fn release_held(&mut self, now_ns: u64) {
        if self.held.is_empty() {
            return;
        }
        let (mut settled, mut expired): (Vec<Bundle>, Vec<Bundle>) = (Vec::new(), Vec::new());
        self.held.release(now_ns, &mut settled, &mut expired);
        Stats::add(&self.stats.spans_held_expired, expired.len() as u64);
        for (mut spans, identity) in settled.into_iter().chain(expired) {
            self.send(&mut spans, &identity);
        }
    }

    fn on_getaddrinfo(&mut self, g: &GetaddrinfoEvent) {
        Stats::inc(&self.stats.resolver_calls);
        self.now_ns = self.now_ns.max(g.header.ts_ns);
        if !self.dns_enabled {
            return;
        }
        let len = (g.name_len as usize).min(g.name.len());
        let name = String::from_utf8_lossy(&g.name[..len]).into_owned();
        // A numeric address resolves to itself: nothing was looked up.
        if name.is_empty() || name.parse::<std::net::IpAddr>().is_ok() {
            return;
        }
        let n = (g.n_addrs as usize).min(g.addrs.len());
        let mut addresses = Vec::with_capacity(n);
        for i in 0..n {
            let ip = crate::connections::ip_from(g.families[i], &g.addrs[i]);
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
        // Queries its thread sent during the call and that are still
        // unanswered were given up when it returned (glibc moved on to the
        // next server or attempt): each ends where the thread's next query
        // began, or at the return.
        let (tgid, tid, start, end) = (g.header.tgid, g.tid, g.start_ns, g.header.ts_ns);
        let mut starts = self.resolutions.query_starts(tgid, tid, start, end);
        starts.extend(self.lookups.pending_starts(tgid, tid, start, end));
        starts.sort_unstable();
        self.give_up_lookups(
            |t, out| t.take_started_by(tgid, tid, start, end, out),
            |l| starts.iter().copied().find(|&t| t > l.last_query_ns).unwrap_or(end).min(end),
        );
        let r = Resolution {
            tgid: g.header.tgid,
            tid: g.tid,
            name,
            start_ns: g.start_ns,
            end_ns: g.header.ts_ns,
            gai_ret: Some(g.ret),
            addresses,
            lookups: Vec::new(),
            resource: self.processes.resource(g.header.tgid),
        };
        if let Some(out) = self.resolutions.on_getaddrinfo(r) {
            Stats::inc(&self.stats.correlation_overflow);
            self.emit_resolution(out);
        }
    }

    fn on_dns_datagram(&mut self, event: &DataEvent, payload: &[u8]) {
        if !self.dns_enabled {
            return;
        }
        let (_, peer) = socket_addrs(&event.tuple);
        let peer = (peer.port() == periscope_ebpf::DNS_PORT).then_some(peer);
        self.on_dns_payload(event, payload, Transport::Udp, peer);
    }

    fn on_dns_payload(&mut self, event: &DataEvent, payload: &[u8], transport: Transport, peer: Option<std::net::SocketAddr>) {
        // A datagram larger than the capture arrives cut: its header and
        // question still pair it, with the answers that fit.
        let parsed = if (payload.len() as u32) < event.total_len {
            dns::parse_prefix(payload).map(|(m, _)| m)
        } else {
            dns::parse(payload)
        };
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => {
                Stats::inc(&self.stats.dns_parse_errors);
                if !self.dns_errors_logged {
                    warn!("unparsable DNS message from pid {} ({e}); further ones are only counted", event.header.tgid);
                    self.dns_errors_logged = true;
                }
                return;
            }
        };
        let egress = event.direction == direction::EGRESS;
        let ts = if egress { event.call_start_ns.min(event.header.ts_ns) } else { event.header.ts_ns };
        let before = self.lookups.counters();
        let done = self.lookups.on_message(event.sock, event.header.tgid, event.tid, transport, egress, ts, &msg);
        if let (true, false, Some(peer)) = (egress, msg.response, peer) {
            self.lookups.note_peer(event.sock, msg.id, peer);
        }
        let after = self.lookups.counters();
        let unmatched = (after.responses_without_query - before.responses_without_query)
            + (after.mismatched_question - before.mismatched_question)
            + (after.server_side_messages - before.server_side_messages);
        Stats::add(&self.stats.dns_unmatched_messages, unmatched);
        Stats::add(&self.stats.correlation_overflow, after.dropped_overflow - before.dropped_overflow);
        if let Some(mut lookup) = done {
            lookup.peer = lookup.peer.or(peer);
            let end = lookup.response.as_ref().map(|a| a.ts_ns).unwrap_or(ts);
            self.lookup_finished(lookup, end);
        }
    }

    /// Unanswered lookups `take` removes from the tracker are given up, each
    /// ending at `end_of(lookup)`.
    fn give_up_lookups(
        &mut self,
        take: impl FnOnce(&mut LookupTracker, &mut Vec<dns::Lookup>),
        end_of: impl Fn(&dns::Lookup) -> u64,
    ) {
        let mut gone = std::mem::take(&mut self.finished_lookups);
        take(&mut self.lookups, &mut gone);
        for lookup in gone.drain(..) {
            let end = end_of(&lookup);
            self.lookup_finished(lookup, end);
        }
        self.finished_lookups = gone;
    }

    /// A lookup got its answer or was given up: it waits for a
    /// getaddrinfo call or a connection to claim it.
    fn lookup_finished(&mut self, lookup: dns::Lookup, end_ns: u64) {
        let resource = self.processes.resource(lookup.tgid);
        let w = WireLookup { lookup, end_ns, resource };
        if let Some(out) = self.resolutions.on_lookup(w) {
            Stats::inc(&self.stats.correlation_overflow);
            self.emit_lookup(out);
        }
    }

    /// Features the daemon applies itself (the kernel side is set by the
    /// control plane).
    pub fn set_features(&mut self, control: &ControlState) {
        use crate::control::protocol::Feature;
        self.dns_enabled = control.enabled(Feature::Dns);
        self.phases_enabled = control.enabled(Feature::Phases);
    }

    /// Whether TLS uprobes are on (a TLS connection they miss is then worth
    /// reporting as not visible).
    pub fn set_tls_enabled(&mut self, enabled: bool) {
        self.tls_enabled = enabled;
    }

    pub fn set_sampler(&mut self, sampler: Sampler) {
        self.sampler = sampler;
    }

    pub fn sampler(&self) -> Sampler {
        self.sampler
    }

    /// A connection ended: flush what its parser still holds.
    fn finish(&mut self, mut conn: Connection, ts_ns: u64) {
        if let ProtocolState::Http1(parser) = &mut conn.protocol {
            parser.close(ts_ns, &mut self.exchanges);
        }
        if let Some(tls) = &conn.tls {
            // With TLS switched off nothing is expected to see it.
            if self.tls_enabled && !tls.plaintext_seen && !tls.handshake_seen {
                self.report_tls_not_visible(conn.tgid);
            }
        }
        if !self.exchanges.is_empty() {
            self.emit(&mut conn);
        }
        if let Some(r) = conn.resolution.take() {
            self.emit_resolution(*r);
        }
    }

    /// A connection carried TLS that no uprobe saw: the process's TLS is
    /// not visible (statically linked without symbols, or an unsupported
    /// library). Said once per executable.
    fn report_tls_not_visible(&mut self, tgid: u32) {
        Stats::inc(&self.stats.tls_not_visible_connections);
        let exe = self
            .processes
            .executable_path(tgid)
            .unwrap_or_else(|| self.processes.resource(tgid).service_name().to_string());
        if self.tls_not_visible_reported.insert(exe.clone()) {
            let reason = format!(
                "pid {tgid} used TLS on a connection, but no hooked TLS library saw it: statically linked or stripped TLS"
            );
            warn!("TLS not visible: {exe} ({reason})");
            self.note_tls_not_visible(exe, reason);
        }
    }

    pub fn note_tls_not_visible(&mut self, what: String, reason: String) {
        self.tls_not_visible.push((what, reason));
    }

    pub fn tls_not_visible(&self) -> &[(String, String)] {
        &self.tls_not_visible
    }

    /// Processes seen with network traffic.
    pub fn processes(&self) -> impl Iterator<Item = &std::sync::Arc<crate::spans::model::Resource>> {
        self.processes.with_traffic()
    }

    pub fn connections_open(&self) -> usize {
        self.connections.len()
    }

    /// Sockets to stop copying, with their ports, for connections still
    /// open (a closed one's socket memory may already serve another).
    pub fn take_ignore_batch(&mut self) -> &[(u64, u16, u16)] {
        self.ignore_requests.sort_unstable();
        self.ignore_requests.dedup();
        self.ignore_batch.clear();
        for &(sock, local, peer) in &self.ignore_requests {
            // Only if the socket still carries the connection that asked: a
            // closed socket's memory can serve a new connection within one
            // batch, and that one must not be ignored.
            if self.connections.get_mut(sock).is_some_and(|c| c.local.port() == local && c.peer.port() == peer) {
                self.ignore_batch.push((sock, local, peer));
            }
        }
        self.ignore_requests.clear();
        &self.ignore_batch
    }

    /// Programs started since the last call: (pid, executable path).
    pub fn take_execs(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.execs)
    }

    /// Pids whose maps should be scanned for TLS libraries (new programs,
    /// new executable mappings), taken once per drain.
    pub fn take_tls_scan_requests(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.tls_scan_requests)
    }

    /// Periodic upkeep: forget idle connections, refresh the clock offset.
    pub fn tick(&mut self) {
        self.clock.refresh();
        let now = Clock::monotonic_now_ns();
        self.now_ns = self.now_ns.max(now);
        let cutoff = now.saturating_sub(self.settings.idle_timeout.as_nanos() as u64);
        let mut orphans = Vec::new();
        for conn in self.connections.remove_idle(cutoff, &mut orphans) {
            self.finish(conn, now);
        }
        for r in orphans {
            self.emit_resolution(r);
        }
        self.give_up_lookups(|t, out| t.expire(now, LOOKUP_TIMEOUT_NS, out), |_| now);
        let (mut rs, mut ls) = (Vec::new(), Vec::new());
        self.resolutions.expire(now, &mut rs, &mut ls);
        for r in rs {
            self.emit_resolution(r);
        }
        for w in ls {
            self.emit_lookup(w);
        }
        let connections = &self.connections;
        self.links.expire(now, |sock, seq, id| connections.serving_request(sock, seq, id));
        self.release_held(now);
    }

    pub fn into_sink(self) -> SpanSink {
        self.sink
    }

    /// Daemon stopping: flush every connection's completed exchanges.
    pub fn shutdown(&mut self) {
        let now = Clock::monotonic_now_ns();
        let mut orphans = Vec::new();
        for conn in self.connections.drain(&mut orphans) {
            self.finish(conn, now);
        }
        let (mut rs, mut ls) = (Vec::new(), Vec::new());
        self.resolutions.drain(&mut rs, &mut ls);
        for r in orphans.into_iter().chain(rs) {
            self.emit_resolution(r);
        }
        for w in ls {
            self.emit_lookup(w);
        }
        let held: Vec<Bundle> = self.held.drain().collect();
        for (mut spans, identity) in held {
            self.send(&mut spans, &identity);
        }
        self.flush_outbox();
    }
}

/// How often the ring is drained while events flow. The kernel side only
/// signals readiness when a quarter of the ring is unread (a busy node), so
/// this bounds how late spans are built at low rates (export batches wait
/// up to a second anyway). Each wake-up costs far more than an event, so
/// a quiet node's events are handled in batches.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);
/// While the ring stays empty the interval doubles up to this: an idle node
/// pays two or three wake-ups a second.
const IDLE_DRAIN_INTERVAL: Duration = Duration::from_millis(400);

/// The next drain's delay: back to the short interval as soon as a drain
/// found events, doubling while they found none.
fn next_drain_interval(current: Duration, found_events: bool) -> Duration {
    if found_events { DRAIN_INTERVAL } else { (current * 2).min(IDLE_DRAIN_INTERVAL) }
}

/// The daemon's control plane as the event loop sees it.
pub struct Control {
    pub state: ControlState,
    pub calls: tokio::sync::mpsc::Receiver<ControlCall>,
    pub sink: SpanSink,
    pub stats: std::sync::Arc<Stats>,
}

/// Work after each drain of the ring: TLS scans of new programs, and the
/// executable filter applied to them.
fn after_batch(probes: &mut Probes, pipeline: &mut Pipeline, tls_watch: &TlsWatch, control: &ControlState) {
    let now = pipeline.now_ns;
    pipeline.release_held(now);
    pipeline.flush_outbox();
    tls_watch.scan(pipeline.take_tls_scan_requests());
    if !pipeline.ignore_requests.is_empty() {
        probes.ignore_sockets(pipeline.take_ignore_batch());
    }
    let execs = pipeline.take_execs();
    if control.filter_has_exes() {
        for (pid, exe) in execs {
            control.on_exec(pid, &exe, probes);
        }
    }
}

/// Hooks a TLS library found by discovery, or reports why it cannot be.
fn attach_tls(probes: &mut Probes, pipeline: &mut Pipeline, found: Discovered) {
    match found {
        Discovered::Attach(target) => {
            let symbols: Vec<(&str, u64)> = target.symbols.iter().map(|&(s, o)| (s, o)).collect();
            let (attached, errors) =
                probes.attach_tls(&target.attach_path, &target.display_path, target.kind.as_str(), &symbols);
            if !probes.tls_enabled() {
                info!("TLS library found: {} ({}); not attached while tls is disabled", target.display_path, target.kind.as_str());
            } else if attached.is_empty() {
                let reason = format!("attaching failed: {}", errors.join("; "));
                warn!("TLS not visible: {} ({reason})", target.display_path);
                pipeline.note_tls_not_visible(target.display_path.clone(), reason);
            } else {
                info!(
                    "TLS library attached: {} ({}, {} symbols: {})",
                    target.display_path,
                    target.kind.as_str(),
                    attached.len(),
                    attached.join(", ")
                );
                for e in errors {
                    warn!("TLS library {}: could not attach {e}", target.display_path);
                }
            }
        }
        Discovered::NotVisible { display_path, reason } => {
            warn!("TLS not visible: {display_path} ({reason})");
            pipeline.note_tls_not_visible(display_path, reason);
        }
        Discovered::InitialScanDone => {}
    }
}

/// Attaches everything TLS discovery finds at start, so that "ready" means
/// the TLS libraries already on the machine are hooked.
pub async fn attach_initial_tls(probes: &mut Probes, pipeline: &mut Pipeline, tls_watch: &mut TlsWatch) {
    while let Some(found) = tls_watch.found.recv().await {
        if let Discovered::InitialScanDone = found {
            return;
        }
        attach_tls(probes, pipeline, found);
    }
}

/// Records handled per pass over the ring: under a flood the loop still
/// gets back to control calls, ticks and TLS attachments (what is left is
/// read on the next pass, at most a drain interval later).
const MAX_RECORDS_PER_PASS: usize = 32_768;

/// Records handled between two hand-offs of spans to the exporter within a
/// pass: a busy pass would otherwise hold thousands of finished spans (and
/// their memory) until it ends.
const RECORDS_PER_HAND_OFF: usize = 2048;

/// Handles what the ring holds (at most a pass's worth); returns how many
/// records that was.
fn drain_ring(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline) -> usize {
    for n in 0..MAX_RECORDS_PER_PASS {
        let Some(record) = ring.next() else { return n };
        pipeline.handle_record(&record);
        if n % RECORDS_PER_HAND_OFF == RECORDS_PER_HAND_OFF - 1 {
            pipeline.flush_outbox();
        }
    }
    MAX_RECORDS_PER_PASS
}

/// Reads the ring buffer until `stop` resolves: every `DRAIN_INTERVAL`, and
/// at once when the kernel signals a filling ring. Never busy-polls.
pub async fn run(
    probes: &mut Probes,
    ring: RingBuf<MapData>,
    mut pipeline: Pipeline,
    mut tls_watch: TlsWatch,
    mut control: Control,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Pipeline> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged
    // for as long as the AsyncFd owns the ring.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with epoll: {e}"))?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut drain_every = DRAIN_INTERVAL;
    let drain = tokio::time::sleep(drain_every);
    tokio::pin!(drain);
    let mut last_lost: u64 = 0;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain_ring(guard.get_inner_mut(), &mut pipeline);
                drain_every = DRAIN_INTERVAL;
                guard.clear_ready();
                after_batch(probes, &mut pipeline, &tls_watch, &control.state);
            }
            _ = &mut drain => {
                let found = drain_ring(ring.get_mut(), &mut pipeline) > 0;
                after_batch(probes, &mut pipeline, &tls_watch, &control.state);
                drain_every = next_drain_interval(drain_every, found);
                drain.as_mut().reset(tokio::time::Instant::now() + drain_every);
            }
            Some(found) = tls_watch.found.recv() => attach_tls(probes, &mut pipeline, found),
            Some(call) = control.calls.recv() => {
                // Events already in the ring are handled before the change.
                drain_ring(ring.get_mut(), &mut pipeline);
                let response = control.state.handle(call.request, probes, &mut pipeline, &control.sink, &control.stats);
                pipeline.set_tls_enabled(control.state.tls_enabled());
                pipeline.set_features(&control.state);
                pipeline.flush_outbox();
                let _ = call.reply.send(response);
            }
            _ = tick.tick() => {
                pipeline.tick();
                pipeline.flush_outbox();
                let lost: u64 = probes.lost_events().iter().map(|(_, n)| n).sum();
                if lost > last_lost {
                    warn!("{} events lost in the kernel (ring buffer full) so far: {:?}", lost, probes.lost_events());
                    last_lost = lost;
                }
            }
            _ = &mut stop => {
                info!("stopping");
                // Drain what the kernel already wrote.
                let ring = ring.get_mut();
                while let Some(record) = ring.next() {
                    pipeline.handle_record(&record);
                }
                pipeline.shutdown();
                return Ok(pipeline);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DRAIN_INTERVAL, IDLE_DRAIN_INTERVAL, Sampler, next_drain_interval};

    #[test]
    fn drain_interval_backs_off_when_idle_and_resets_on_events() {
        let mut d = DRAIN_INTERVAL;
        let mut steps = 0;
        while d < IDLE_DRAIN_INTERVAL {
            d = next_drain_interval(d, false);
            steps += 1;
        }
        assert_eq!(d, IDLE_DRAIN_INTERVAL);
        assert!(steps <= 5, "{steps}");
        assert_eq!(next_drain_interval(d, false), IDLE_DRAIN_INTERVAL);
        assert_eq!(next_drain_interval(d, true), DRAIN_INTERVAL);
    }

    #[test]
    fn sampler_ratio_is_by_trace_id() {
        let all = Sampler::new(1.0);
        let none = Sampler::new(0.0);
        let half = Sampler::new(0.5);
        let low = [0u8; 16];
        let mut high = [0u8; 16];
        high[8] = 0xff;
        assert!(all.keep(&high) && all.keep(&low));
        assert!(!none.keep(&low) && !none.keep(&high));
        assert!(half.keep(&low) && !half.keep(&high));
        // Roughly the ratio over many random ids, and the same id always
        // gets the same decision.
        let kept = (0..10_000u32)
            .filter(|i| {
                let mut id = [0u8; 16];
                id[8..12].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
                half.keep(&id) && half.keep(&id)
            })
            .count();
        assert!((4_000..6_000).contains(&kept), "{kept}");
        assert_eq!(Sampler::new(f64::NAN).ratio(), 1.0);
        assert_eq!(Sampler::new(7.0).ratio(), 1.0);
    }
}

/// A phase as a child span of the request's span.
fn phase_span(
    phase: &Phase,
    parent: [u8; 8],
    resource: &std::sync::Arc<crate::spans::model::Resource>,
    clock: &Clock,
    rng: &mut rand::rngs::SmallRng,
) -> Span {
    Span {
        trace_id: [0; 16],
        span_id: http::new_span_id(rng),
        parent_span_id: Some(parent),
        name: phase.name.into(),
        kind: SpanKind::Internal,
        start_unix_nano: clock.to_unix_nanos(phase.start_ns),
        end_unix_nano: clock.to_unix_nanos(phase.end_ns),
        attributes: vec![Attribute::str("periscope.phase", phase.name)],
        status: SpanStatus::Unset,
        resource: resource.clone(),
    }
}
