//! The event loop: ring buffer -> events -> connections -> protocols ->
//! spans -> export. One task owns all state; nothing on the per-event path
//! blocks or does I/O except the first /proc read for a new process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use periscope_ebpf::{direction, source};
use tokio::io::unix::AsyncFd;

use crate::connections::{Admit, ConnectTiming, Connection, ConnectionTable, ProtocolState, TlsState};
use crate::discovery::process::ProcessCache;
use crate::control::daemon::ControlState;
use crate::control::server::ControlCall;
use crate::discovery::tls_watch::{Discovered, TlsWatch};
use crate::events::{self, Event};
use crate::export::SpanSink;
use crate::probes::Probes;
use crate::protocols::http1::{Chunk, Direction, Exchange, Feed, Limits};
use crate::protocols::tls_records;
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
    rng: rand::rngs::ThreadRng,
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
}

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
            rng: rand::rng(),
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
        }
    }

    pub fn handle_record(&mut self, record: &[u8]) {
        Stats::inc(&self.stats.events_received);
        match events::decode(record) {
            Ok(event) => self.handle(event),
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
                        tls.observe_ciphertext(egress, payload);
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
                } else if parser.is_upgraded() {
                    // After 101 Switching Protocols or a CONNECT tunnel the
                    // parser ignores the bytes: the kernel need not copy them.
                    self.ignore_requests.push((event.sock, conn.local.port(), conn.peer.port()));
                }
                let tgid = conn.tgid;
                self.emit_exchanges(event.sock, tgid);
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
                }
            }
            Event::MmapExec(m) => self.tls_scan_requests.push(m.header.tgid),
            Event::Connect(c) => {
                if c.failed == 0 {
                    let timing = ConnectTiming { syn_sent_ns: c.syn_sent_ns, established_ns: c.header.ts_ns };
                    if let Some(stale) = self.connections.on_connect(c.sock, timing, c.header.ts_ns) {
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
                if let Some(conn) = self.connections.remove(c.sock) {
                    self.finish(conn, c.header.ts_ns);
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
                self.processes.forget(e.header.tgid);
            }
        }
    }

    /// Builds spans for the exchanges the parser just completed on `sock`.
    fn emit_exchanges(&mut self, sock: u64, tgid: u32) {
        if self.exchanges.is_empty() {
            return;
        }
        let resource = self.processes.resource(tgid);
        let Some(conn) = self.connections.get_mut(sock) else {
            self.exchanges.clear();
            return;
        };
        emit(&mut self.exchanges, conn, &resource, &self.clock, &mut self.rng, &self.sink, &self.stats, self.sampler);
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
        if self.exchanges.is_empty() {
            return;
        }
        let resource = self.processes.resource(conn.tgid);
        emit(&mut self.exchanges, &mut conn, &resource, &self.clock, &mut self.rng, &self.sink, &self.stats, self.sampler);
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
        let cutoff = now.saturating_sub(self.settings.idle_timeout.as_nanos() as u64);
        for conn in self.connections.remove_idle(cutoff) {
            self.finish(conn, now);
        }
    }

    pub fn into_sink(self) -> SpanSink {
        self.sink
    }

    /// Daemon stopping: flush every connection's completed exchanges.
    pub fn shutdown(&mut self) {
        let now = Clock::monotonic_now_ns();
        for conn in self.connections.drain() {
            self.finish(conn, now);
        }
    }
}

/// How often the ring is drained. The kernel side only signals readiness
/// when the ring is a quarter full, so this bounds how late spans are built.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

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

#[allow(clippy::too_many_arguments)]
/// Spans for `exchanges` on `conn`; the first span of a TLS connection
/// carries its handshake duration.
fn emit(
    exchanges: &mut Vec<Exchange>,
    conn: &mut Connection,
    resource: &std::sync::Arc<crate::spans::model::Resource>,
    clock: &Clock,
    rng: &mut rand::rngs::ThreadRng,
    sink: &SpanSink,
    stats: &Stats,
    sampler: Sampler,
) {
    for ex in exchanges.drain(..) {
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
        let span = http::build(&ex, conn, tls, resource.clone(), clock, rng);
        Stats::inc(&stats.spans_built);
        if ex.incomplete.is_some() {
            Stats::inc(&stats.spans_incomplete);
        }
        if !sampler.keep(&span.trace_id) {
            Stats::inc(&stats.spans_sampled_out);
            continue;
        }
        sink.submit(span);
    }
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
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_lost: u64 = 0;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(record) = ring.next() {
                    pipeline.handle_record(&record);
                }
                guard.clear_ready();
                after_batch(probes, &mut pipeline, &tls_watch, &control.state);
            }
            _ = drain.tick() => {
                let ring = ring.get_mut();
                while let Some(record) = ring.next() {
                    pipeline.handle_record(&record);
                }
                after_batch(probes, &mut pipeline, &tls_watch, &control.state);
            }
            Some(found) = tls_watch.found.recv() => attach_tls(probes, &mut pipeline, found),
            Some(call) = control.calls.recv() => {
                // Events already in the ring are handled before the change.
                let ring = ring.get_mut();
                while let Some(record) = ring.next() {
                    pipeline.handle_record(&record);
                }
                let response = control.state.handle(call.request, probes, &mut pipeline, &control.sink, &control.stats);
                pipeline.set_tls_enabled(control.state.tls_enabled());
                let _ = call.reply.send(response);
            }
            _ = tick.tick() => {
                pipeline.tick();
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
    use super::Sampler;

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
