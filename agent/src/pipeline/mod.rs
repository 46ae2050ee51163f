//! The pipeline: ring buffer -> events -> connections -> protocols ->
//! spans -> export. One task owns all state; nothing on the per-event path
//! blocks or does I/O except the first /proc read for a new process.
//!
//! This module routes events: data to its connection, a connection's bytes
//! to the parser its first bytes chose ([`crate::protocols::detect`]),
//! lifecycle events to the connection table. It knows no protocol's details:
//! parsers hand it protocol-neutral exchanges, `requests` turns those into
//! spans, `dns` follows lookups and resolutions, `event_loop` drives it all.


mod failed_calls;
mod grpc_go;
mod lookups;
mod event_loop;
mod requests;

pub use event_loop::{Control, attach_initial_tls, run};

use std::sync::Arc;
use std::time::Duration;

use log::warn;
use periscope_ebpf::{IPPROTO_UDP, data_flags, direction, source};

use crate::connections::{Admit, ConnectTiming, Connection, ConnectionTable, ProtocolState, TlsState, socket_addrs};
use crate::discovery::process::ProcessCache;
use crate::control::daemon::ControlState;
use crate::events::{self, Event};
use crate::export::SpanSink;
use crate::protocols::dns::{self, LookupTracker};
use crate::protocols::exchange::{Chunk, Direction, Exchange, Feed, Side};
use crate::protocols::{self, ParserCounts};
use crate::protocols::tls_records;
use crate::spans::context::{Bundle, HeldSpans, Identity, IdentityRef};
use crate::spans::links::{LinkOutcome, TraceLinks};
use crate::spans::model::{Span, SpanKind};
use crate::spans::phases::{Phase, PhaseSpans};
use crate::spans::resolutions::Resolutions;
use crate::spans::{clock::Clock, http};
use crate::stats::Stats;

#[derive(Clone, Copy, Debug)]
pub struct PipelineSettings {
    pub max_connections: usize,
    /// Connections with no traffic for this long are forgotten.
    pub idle_timeout: Duration,
    /// Traces kept for `periscope traces`.
    pub traces_kept: usize,
    /// Distinct routes (and RPC methods, DNS names, servers) per service
    /// in the RED metrics before the rest fold into `_OTHER`.
    pub max_routes: usize,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self { max_connections: 65_536, idle_timeout: Duration::from_secs(300), traces_kept: 200, max_routes: 100 }
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
    /// Processes that exited since the last drain.
    exited: Vec<u32>,
    /// Processes running Go: their threads say nothing about which request
    /// a goroutine serves, so only goroutine-keyed events link in-process.
    go_processes: std::collections::HashSet<u32>,
    /// Failed connects made spans of, per (process, destination).
    failed_connects: failed_calls::FailedConnects,
    /// grpc-go's decoded header blocks and the goroutines they came from.
    grpc_go: grpc_go::GrpcGoBlocks,
    /// Go programs whose TLS cannot be seen: (path, Go version, reason).
    go_not_visible: Vec<(String, String, String)>,
    /// Sockets whose payloads the kernel may stop copying, with the ports
    /// of the connection that asked (the socket may carry another one by
    /// the end of the batch).
    ignore_requests: Vec<(u64, u16, u16)>,
    /// The same, with their ports, for the kernel (reused per drain).
    ignore_batch: Vec<(u64, u16, u16)>,
    /// Sockets whose calls the kernel should copy more of (HTTP/2), with
    /// their ports, as for `ignore_requests`.
    widen_requests: Vec<(u64, u16, u16)>,
    sampler: Sampler,
    tls_enabled: bool,
    dns_enabled: bool,
    grpc_enabled: bool,
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
    /// Requests the parser just started (their ids), reused per event.
    new_requests: Vec<u64>,
    phase_buf: Vec<Phase>,
    dns_messages: Vec<Vec<u8>>,
    finished_lookups: Vec<dns::Lookup>,
    dns_errors_logged: bool,
    /// Latest kernel timestamp seen (the clock for hold and link deadlines).
    now_ns: u64,
    /// Answers of the Kubernetes API lookup task (discovery::kubernetes_api),
    /// when the agent can reach the API server; drained each tick.
    k8s_results: Option<tokio::sync::mpsc::Receiver<Arc<crate::discovery::kubernetes_api::PodInfo>>>,
    /// RED metrics of every request span, before sampling.
    pub red: crate::red::aggregator::RedAggregator,
    /// The last traces exported, for `periscope traces`.
    pub recent: crate::local_view::recent::RecentTraces,
}

/// A connection parsed as HTTP/1 is checked for HTTP/2 frames in its first
/// chunks as long as no HTTP/1 message showed (HTTP/2 joined mid-stream).
const REDETECT_CHUNKS: u32 = 8;

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

/// Who did what a data event shows, for in-process links: its thread, or
/// for Go its goroutine (a goroutine id is per process, so the process is
/// part of the key). None for a thread of a Go process: goroutines move
/// between threads, so a thread does not tell which request it serves.
fn actor(event: &periscope_ebpf::DataEvent, go_processes: &std::collections::HashSet<u32>) -> Option<u64> {
    if event.flags & data_flags::GOROUTINE != 0 {
        Some(1 << 63 | u64::from(event.header.tgid) << 32 | u64::from(event.tid))
    } else if go_processes.contains(&event.header.tgid) {
        None
    } else {
        Some(u64::from(event.tid))
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
            exited: Vec::new(),
            go_processes: Default::default(),
            grpc_go: Default::default(),
            failed_connects: failed_calls::FailedConnects::new(),
            go_not_visible: Vec::new(),
            ignore_requests: Vec::new(),
            ignore_batch: Vec::new(),
            widen_requests: Vec::new(),
            sampler: Sampler::new(1.0),
            tls_enabled: true,
            dns_enabled: true,
            grpc_enabled: true,
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
            k8s_results: None,
            red: crate::red::aggregator::RedAggregator::new(settings.max_routes),
            recent: crate::local_view::recent::RecentTraces::new(settings.traces_kept),
        }
    }

    /// Pods are looked up in the Kubernetes API from now on: requests go
    /// out without waiting, answers are applied on each tick.
    pub fn set_kubernetes_api(&mut self, link: crate::discovery::kubernetes_api::ApiLink) {
        self.processes.set_kubernetes_api(link.requests);
        self.k8s_results = Some(link.results);
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
                // First, whatever this event is: the flag is the thread's, and
                // this event is the only one that carries it.
                if event.flags & data_flags::THREAD_LOST_BEFORE != 0
                    && let Some(actor) = actor(&event, &self.go_processes)
                {
                    self.links.forget_thread(actor);
                }
                if event.tuple.protocol == IPPROTO_UDP {
                    self.on_dns_datagram(&event, payload);
                    return;
                }
                if self.grpc_go.has_deferred(event.sock) {
                    self.start_deferred(event.sock, None);
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
                    self.dns_messages.clear();
                    if framing.framers[if egress { 0 } else { 1 }].feed(payload, event.total_len, &mut self.dns_messages).is_err() {
                        Stats::inc(&self.stats.dns_parse_errors);
                    }
                    let peer = conn.peer;
                    self.on_dns_stream_messages(&event, peer);
                    return;
                }
                if from_tls {
                    conn.start_plaintext();
                } else {
                    conn.socket_chunks += 1;
                    // A handshake record on a connection not being parsed
                    // (its first bytes, or one already found to be no
                    // protocol we know) starts TLS observation; a connection
                    // being parsed is never re-examined, so bodies can't.
                    let not_parsing = conn.socket_chunks == 1
                        || matches!(conn.protocol, ProtocolState::Ignored | ProtocolState::Undetected);
                    if conn.tls.is_none() && not_parsing && tls_records::starts_tls_record(payload) {
                        conn.tls = Some(TlsState::new());
                    }
                    if let Some(tls) = &mut conn.tls {
                        // Ciphertext: never parsed. Its handshake tells the version;
                        // after that the kernel can stop copying it.
                        tls.observe_ciphertext(egress, payload, event.call_start_ns, event.header.ts_ns);
                        if tls.observer.is_none() {
                            self.ignore_requests.push((event.sock, conn.local.port(), conn.peer.port()));
                        }
                        return;
                    }
                }
                let detect_now = match &conn.protocol {
                    ProtocolState::Undetected => true,
                    ProtocolState::Stream(parser) => {
                        conn.socket_chunks <= REDETECT_CHUNKS && protocols::redetect(parser, payload, event.total_len)
                    }
                    _ => false,
                };
                if detect_now {
                    let parser = protocols::detect(payload, event.total_len, conn.side);
                    if parser.wants_whole_calls() {
                        self.widen_requests.push((event.sock, conn.local.port(), conn.peer.port()));
                    }
                    conn.protocol = ProtocolState::Stream(parser);
                }
                let ProtocolState::Stream(parser) = &mut conn.protocol else {
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
                let counts_before = parser.counts();
                let feed = parser.feed(chunk, &mut self.exchanges, &mut self.new_requests);
                let counts = parser.counts();
                if counts != counts_before {
                    count_parser(&self.stats, &counts_before, &counts);
                }
                if event.flags & data_flags::GOROUTINE != 0 && self.grpc_go.tracks(event.header.tgid) {
                    let goroutine = actor(&event, &self.go_processes).unwrap_or(0);
                    self.grpc_go.on_goroutine_io(goroutine, event.sock, egress, parser, &mut self.exchanges, &self.stats);
                    if parser.parked() > 0 {
                        self.grpc_go.note_parked(event.sock);
                    }
                    if !egress && !self.new_requests.is_empty() {
                        self.grpc_go.defer_unnamed(event.sock, goroutine, &mut self.new_requests, parser);
                    }
                }
                if let Feed::NotHttp = feed {
                    conn.protocol = ProtocolState::Ignored;
                    Stats::inc(&self.stats.connections_not_http);
                    Stats::inc(&self.stats.events_unparsed);
                    self.ignore_requests.push((event.sock, conn.local.port(), conn.peer.port()));
                } else if parser.ignores_rest() {
                    // After 101 Switching Protocols or a CONNECT tunnel the
                    // parser ignores the bytes: the kernel need not copy them.
                    self.ignore_requests.push((event.sock, conn.local.port(), conn.peer.port()));
                }
                if !self.new_requests.is_empty() {
                    let actor = actor(&event, &self.go_processes);
                    self.start_requests(event.sock, actor);
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
                    if h.result == periscope_ebpf::handshake_result::DONE {
                        tls.handshake_seen = true;
                        tls.handshake_ns = Some(h.header.ts_ns.saturating_sub(h.start_ns));
                        tls.handshake = Some((h.start_ns, h.header.ts_ns));
                    } else {
                        let start = tls.handshake_attempt_ns.map_or(h.start_ns, |s| s.min(h.start_ns));
                        tls.handshake_attempt_ns = Some(start);
                        tls.handshake_failed |= h.result == periscope_ebpf::handshake_result::FAILED;
                    }
                }
            }
            Event::MmapExec(m) => self.tls_scan_requests.push(m.header.tgid),
            Event::Connect(c) => {
                self.now_ns = self.now_ns.max(c.header.ts_ns);
                if c.failed != 0 {
                    self.on_failed_connect(&c);
                }
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
            Event::GrpcHeaders(h) => self.on_grpc_headers(&h),
            Event::ProcessFork(f) => self.processes.on_fork(f.header.tgid, f.child_tgid),
            Event::Reset(r) => {
                if let Some(conn) = self.connections.get_mut(r.sock) {
                    conn.reset_error = Some(r.error);
                }
            }
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
                self.exited.push(e.header.tgid);
                self.go_processes.remove(&e.header.tgid);
                self.grpc_go.forget_process(e.header.tgid);
                self.failed_connects.forget_process(e.header.tgid);
            }
        }
    }



    /// Requests the parser just started on `sock`, read or sent by thread
    /// `tid`: each gets its identity (and parent) now.
    pub(super) fn start_requests(&mut self, sock: u64, tid: Option<u64>) {
        let requests = std::mem::take(&mut self.new_requests);
        for &seq in &requests {
            let Some(conn) = self.connections.get(sock) else { break };
            let (local, peer) = (conn.local, conn.peer);
            let ProtocolState::Stream(parser) = &conn.protocol else { break };
            let Some(ex) = parser.pending_request(seq) else { continue };
            let traceparent = ex.traceparent.as_deref().and_then(http::parse_traceparent);
            let fingerprint = crate::spans::links::fingerprint(&ex.method, &ex.path);
            let mut outcome = LinkOutcome::default();
            let identity = match parser.side() {
                // Events of this connection were lost: its request numbering
                // may be off, so it is linked to nothing; a request it serves
                // still makes the thread's calls ambiguous while open.
                Some(side) if conn.out_of_step => {
                    let identity = Identity::root(&mut self.rng, true);
                    if let (Side::Server, Some(tid)) = (side, tid) {
                        let connections = &self.connections;
                        let is_open = |sock: u64, seq: u64, id: &IdentityRef| connections.serving_request(sock, seq, id);
                        self.links.server_request_unlinked(tid, sock, seq, &identity, is_open);
                    }
                    identity
                }
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
        let keep = self.sampler.keep(&spans[0].trace_id);
        if self.red.enabled() {
            for span in spans.iter() {
                self.red.record(span, keep);
            }
        }
        if !keep {
            Stats::add(&self.stats.spans_sampled_out, spans.len() as u64);
            spans.clear();
            return;
        }
        if self.recent.capacity() > 0 {
            let now = std::time::Instant::now();
            for span in spans.iter() {
                self.recent.add(span, now);
            }
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






    /// Features the daemon applies itself (the kernel side is set by the
    /// control plane).
    pub fn set_features(&mut self, control: &ControlState) {
        use crate::control::protocol::Feature;
        self.dns_enabled = control.enabled(Feature::Dns);
        self.grpc_enabled = control.enabled(Feature::Grpc);
        self.phases_enabled = control.enabled(Feature::Phases);
        self.red.set_enabled(control.enabled(Feature::Metrics));
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
        if let Some(tls) = &conn.tls
            && let Some(start_ns) = tls.handshake_attempt_ns
            && !tls.handshake_seen
            && !tls.plaintext_seen
        {
            self.on_failed_handshake(&conn, start_ns, ts_ns);
        }
        if let ProtocolState::Stream(parser) = &mut conn.protocol {
            let before = parser.counts();
            parser.close(ts_ns, &mut self.exchanges);
            count_parser(&self.stats, &before, &parser.counts());
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
            if self.connections.carries(sock, local, peer) {
                self.ignore_batch.push((sock, local, peer));
            }
        }
        self.ignore_requests.clear();
        &self.ignore_batch
    }

    /// Sockets whose calls the kernel should copy more of, still carrying
    /// the connection that asked (see [`Self::take_ignore_batch`]).
    pub fn take_widen_batch(&mut self) -> Vec<(u64, u16, u16)> {
        let mut batch = std::mem::take(&mut self.widen_requests);
        batch.retain(|&(sock, local, peer)| self.connections.carries(sock, local, peer));
        batch
    }

    pub fn has_widen_requests(&self) -> bool {
        !self.widen_requests.is_empty()
    }

    /// Programs started since the last call: (pid, executable path).
    pub fn take_execs(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.execs)
    }

    /// Pids whose maps should be scanned for TLS libraries (new programs,
    /// new executable mappings), taken once per drain.
    pub fn take_exited(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.exited)
    }

    pub fn note_go_process(&mut self, pid: u32) {
        self.go_processes.insert(pid);
    }

    /// `pid` runs a Go program whose grpc-go probes are attached: the
    /// connections its goroutines read are followed from now.
    pub fn note_grpc_go_process(&mut self, pid: u32) {
        self.grpc_go.note_process(pid);
    }

    pub fn note_go_not_visible(&mut self, path: String, go_version: String, reason: String) {
        self.go_not_visible.push((path, go_version, reason));
    }

    pub fn go_not_visible(&self) -> &[(String, String, String)] {
        &self.go_not_visible
    }

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
        self.release_parked_exchanges();
        let connections = &self.connections;
        self.links.expire(now, |sock, seq, id| connections.serving_request(sock, seq, id));
        self.release_held(now);
        if let Some(results) = &mut self.k8s_results {
            // Bounded by the channel; each answer rewrites the resources of
            // that pod's cached processes (new Arcs, spans keep theirs).
            while let Ok(info) = results.try_recv() {
                self.processes.apply_pod(info);
            }
            self.processes.retry_pod_requests();
        }
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

/// Adds what a parser counted during one chunk to the daemon's metrics.
fn count_parser(s: &Stats, before: &ParserCounts, after: &ParserCounts) {
    Stats::add(&s.http_parse_errors, after.parse_errors.saturating_sub(before.parse_errors));
    let (b, a) = (&before.http2, &after.http2);
    Stats::add(&s.http2_hpack_incomplete, a.hpack_incomplete.saturating_sub(b.hpack_incomplete));
    Stats::add(&s.http2_streams_dropped, a.streams_dropped.saturating_sub(b.streams_dropped));
    Stats::add(&s.http2_header_bytes_cut, a.header_bytes_cut.saturating_sub(b.header_bytes_cut));
    Stats::add(&s.http2_desyncs, a.desyncs.saturating_sub(b.desyncs));
    Stats::add(&s.http2_hpack_errors, a.hpack_errors.saturating_sub(b.hpack_errors));
}

#[cfg(test)]
mod tests {
    use super::Sampler;

    #[test]
    fn actors_are_threads_or_goroutines_never_a_go_thread() {
        let mut event: periscope_ebpf::DataEvent = unsafe { std::mem::zeroed() };
        event.header.tgid = 40;
        event.tid = 7;
        let go: std::collections::HashSet<u32> = [40].into_iter().collect();
        let none = Default::default();
        assert_eq!(super::actor(&event, &none), Some(7));
        // A thread of a Go process serves whichever goroutine runs on it.
        assert_eq!(super::actor(&event, &go), None);
        event.flags = periscope_ebpf::data_flags::GOROUTINE;
        let goroutine = super::actor(&event, &go).expect("a goroutine");
        assert_ne!(goroutine, 7);
        // The same goroutine id in another process is another actor.
        event.header.tgid = 41;
        assert_ne!(super::actor(&event, &go), Some(goroutine));
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