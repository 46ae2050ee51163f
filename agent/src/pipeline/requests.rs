//! Exchanges to spans: what every protocol's parser hands over becomes the
//! request's span (HTTP or RPC conventions), its latency phases, and the
//! resolution that led to its connection; then it waits for its trace or
//! goes to export.

use super::{Pipeline, failed_calls};
use crate::connections::{Connection, ConnectionTable};
use crate::spans::clock::Clock;
use crate::spans::context::Identity;
use crate::spans::model::{Attribute, Span, SpanKind, SpanStatus};
use crate::spans::phases::{self, ClientTimings, Phase, ServerTimings};
use crate::spans::resolutions::{self, Resolution, WireLookup};
use crate::spans::{http, rpc};
use crate::protocols::exchange::Side;
use crate::stats::Stats;

impl Pipeline {
    /// Builds spans for the exchanges the parser just completed on `sock`.
    pub(super) fn emit_exchanges(&mut self, sock: u64) {
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

    /// Spans for the exchanges the parser completed on `conn`: the request's
    /// span, its phases, and the resolution that led to the connection.
    pub(super) fn emit(&mut self, conn: &mut Connection) {
        let resource = self.processes.resource(conn.tgid);
        let mut exchanges = std::mem::take(&mut self.exchanges);
        for mut ex in exchanges.drain(..) {
            let identity = conn.take_request(ex.seq).unwrap_or_else(|| Identity::root(&mut self.rng, true));
            // Its span is being built: whatever it is linked to now stays.
            // Except a server request read through a TLS library: its
            // client's TLS library reports the write when the call returns,
            // which can come after a fast server answered; its span waits for
            // that client (held, at most HOLD_SPANS_NS) as it would have
            // before being built.
            let read_from_tls = conn.tls.as_ref().is_some_and(|t| t.plaintext_seen);
            if !(read_from_tls && ex.side == Side::Server) {
                identity.settle();
            }
            if ex.grpc && !self.grpc_enabled {
                continue;
            }
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
            let mut span = if ex.grpc {
                rpc::build(phase_attributes, &mut ex, conn, tls, start_ns, resource.clone(), &self.clock)
            } else {
                http::build(phase_attributes, &mut ex, conn, tls, start_ns, resource.clone(), &self.clock)
            };
            if ex.incomplete.is_some() {
                Stats::inc(&self.stats.spans_incomplete);
            }
            if let Some(failure) = failed_calls::transport_failure(&ex, conn.reset_error) {
                failed_calls::mark_failed(&mut span, failure);
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
    pub(super) fn resolution_spans(
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
    pub(super) fn emit_resolution(&mut self, r: Resolution) {
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
    pub(super) fn lookup_spans(
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

    pub(super) fn lookup_span(
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
    pub(super) fn emit_lookup(&mut self, w: WireLookup) {
        let identity = Identity::root(&mut self.rng, true);
        let span = self.lookup_span(&w, identity.span_id(), None, w.resource.clone());
        self.submit(&mut vec![span], identity);
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
