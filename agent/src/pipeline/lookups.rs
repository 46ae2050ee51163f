//! DNS as the pipeline sees it: wire lookups (UDP datagrams and TCP
//! streams to port 53) paired query to answer, getaddrinfo calls, and the
//! resolutions they make, waiting for the connection they lead to.

use periscope_ebpf::{DataEvent, GetaddrinfoEvent, direction};
use log::warn;

use super::Pipeline;
use crate::connections::socket_addrs;
use crate::protocols::dns::{self, LookupTracker, Transport};
use crate::spans::resolutions::{Resolution, WireLookup};
use crate::stats::Stats;

impl Pipeline {
    /// DNS messages the TCP framer just cut out of a connection's stream.
    pub(super) fn on_dns_stream_messages(&mut self, event: &DataEvent, peer: std::net::SocketAddr) {
        let messages = std::mem::take(&mut self.dns_messages);
        for m in &messages {
            self.on_dns_payload(event, m, Transport::Tcp, Some(peer));
        }
        self.dns_messages = messages;
    }

    pub(super) fn on_getaddrinfo(&mut self, g: &GetaddrinfoEvent) {
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

    pub(super) fn on_dns_datagram(&mut self, event: &DataEvent, payload: &[u8]) {
        if !self.dns_enabled {
            return;
        }
        let (_, peer) = socket_addrs(&event.tuple);
        let peer = (peer.port() == periscope_ebpf::DNS_PORT).then_some(peer);
        self.on_dns_payload(event, payload, Transport::Udp, peer);
    }

    pub(super) fn on_dns_payload(&mut self, event: &DataEvent, payload: &[u8], transport: Transport, peer: Option<std::net::SocketAddr>) {
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
    pub(super) fn give_up_lookups(
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
    pub(super) fn lookup_finished(&mut self, lookup: dns::Lookup, end_ns: u64) {
        let resource = self.processes.resource(lookup.tgid);
        let w = WireLookup { lookup, end_ns, resource };
        if let Some(out) = self.resolutions.on_lookup(w) {
            Stats::inc(&self.stats.correlation_overflow);
            self.emit_lookup(out);
        }
    }
}
