//! Calls that fail before any answer, and answers cut short.
//!
//! - A connect that fails (the kernel's SYN_SENT -> CLOSE) becomes a CLIENT
//!   span in the calling process, from the SYN to the failure:
//!   `error.type` `connection_refused` (a RST to the SYN), `connect_timeout`
//!   (the kernel gave up retrying the SYN, or the program closed the socket
//!   before an answer: its own timeout), else the errno's name; with the
//!   name from the DNS resolution that led to it, and that resolution as its
//!   `dns` child. Each retry is a span of its own.
//! - Rate limit: per (process, destination) at most [`PER_WINDOW`] spans a
//!   second; the rest are counted (`failed_connects_folded`) and the next
//!   span says how many it stands for (`periscope.folded_count`), so a port
//!   scan does not flood the exporter. The table is bounded.
//! - A request open on a connection the peer reset ends with
//!   `error.type=connection_reset`; a client's request whose connection
//!   closed before its response was complete, with `incomplete_response`.

use std::collections::HashMap;
use std::net::SocketAddr;

use periscope_ebpf::ConnectEvent;

use super::Pipeline;
use crate::connections::socket_addrs;
use crate::protocols::exchange::{Exchange, Side};
use crate::spans::context::Identity;
use crate::spans::http;
use crate::spans::links::LinkOutcome;
use crate::spans::model::{Attribute, Span, SpanKind, SpanStatus};
use crate::stats::Stats;

/// Spans per (process, destination) per window.
const PER_WINDOW: u32 = 10;
const WINDOW_NS: u64 = 1_000_000_000;
/// (process, destination) pairs followed at once.
const MAX_KEYS: usize = 4096;

const ECONNRESET: i32 = 104;

struct Window {
    start_ns: u64,
    spans: u32,
    /// Failures folded since the last span.
    folded: u64,
}

pub(super) struct FailedConnects {
    windows: HashMap<(u32, SocketAddr), Window>,
    /// Names that recent resolutions gave to addresses, per process: a
    /// program trying each address of a name in turn (::1, then
    /// 127.0.0.1) names the server in every attempt, though the resolution
    /// is the child of the first only.
    recent_names: std::collections::VecDeque<(u32, std::net::IpAddr, String, u64)>,
}

/// How long, and how many, resolved names are remembered for later attempts.
const NAME_TTL_NS: u64 = 10_000_000_000;
const MAX_NAMES: usize = 256;

impl FailedConnects {
    pub(super) fn new() -> Self {
        FailedConnects { windows: HashMap::new(), recent_names: Default::default() }
    }

    /// Whether a failure of `tgid` reaching `peer` at `now_ns` gets a span:
    /// `Some(n)` with the failures folded since the previous span, or None
    /// (folded, counted).
    fn admit(&mut self, tgid: u32, peer: SocketAddr, now_ns: u64) -> Option<u64> {
        if self.windows.len() >= MAX_KEYS && !self.windows.contains_key(&(tgid, peer)) {
            self.windows.retain(|_, w| now_ns.saturating_sub(w.start_ns) < WINDOW_NS);
            if self.windows.len() >= MAX_KEYS {
                self.windows.clear();
            }
        }
        let w = self.windows.entry((tgid, peer)).or_insert(Window { start_ns: now_ns, spans: 0, folded: 0 });
        if now_ns.saturating_sub(w.start_ns) >= WINDOW_NS {
            w.start_ns = now_ns;
            w.spans = 0;
        }
        if w.spans >= PER_WINDOW {
            w.folded += 1;
            return None;
        }
        w.spans += 1;
        Some(std::mem::take(&mut w.folded))
    }

    pub(super) fn forget_process(&mut self, tgid: u32) {
        self.windows.retain(|(t, _), _| *t != tgid);
        self.recent_names.retain(|(t, ..)| *t != tgid);
    }

    fn remember_names(&mut self, tgid: u32, addresses: &[std::net::IpAddr], name: &str, now_ns: u64) {
        for a in addresses {
            if self.recent_names.len() >= MAX_NAMES {
                self.recent_names.pop_front();
            }
            self.recent_names.push_back((tgid, *a, name.to_string(), now_ns));
        }
    }

    fn recent_name(&self, tgid: u32, ip: std::net::IpAddr, now_ns: u64) -> Option<String> {
        self.recent_names
            .iter()
            .rev()
            .find(|(t, a, _, at)| *t == tgid && *a == ip && now_ns.saturating_sub(*at) < NAME_TTL_NS)
            .map(|(_, _, name, _)| name.clone())
    }
}

/// `error.type` of a failed connect from its `sk_err`.
pub(super) fn connect_error_type(errno: i32) -> &'static str {
    match errno {
        0 | 110 => "connect_timeout",
        111 => "connection_refused",
        113 => "EHOSTUNREACH",
        101 => "ENETUNREACH",
        104 => "ECONNRESET",
        _ => "connect_error",
    }
}

/// Why an exchange that ended with its connection failed, if it did.
pub(super) fn transport_failure(ex: &Exchange, reset_error: Option<i32>) -> Option<&'static str> {
    if !matches!(ex.incomplete, Some("connection_closed" | "no_response")) {
        return None;
    }
    match reset_error {
        Some(ECONNRESET) => Some("connection_reset"),
        Some(_) => Some("connection_error"),
        None if ex.side == Side::Client => Some("incomplete_response"),
        None => None,
    }
}

/// Marks `span` failed with `error_type` (replacing any other).
pub(super) fn mark_failed(span: &mut Span, error_type: &'static str) {
    span.attributes.retain(|a| a.key != "error.type");
    span.attributes.push(Attribute::str("error.type", error_type));
    span.status = SpanStatus::Error { message: error_type.replace('_', " ") };
}

impl Pipeline {
    /// A connection closed after a TLS handshake that never completed: a
    /// span in the process that attempted it (client or server).
    pub(super) fn on_failed_handshake(&mut self, conn: &crate::connections::Connection, start_ns: u64, end_ns: u64) {
        let tgid = conn.tgid;
        if tgid == 0 || self.failed_connects.admit(tgid, conn.peer, end_ns).is_none() {
            Stats::inc(&self.stats.failed_connects_folded);
            return;
        }
        Stats::inc(&self.stats.failed_handshake_spans);
        let resource = self.processes.resource(tgid);
        let (kind, server) = match conn.side {
            Some(Side::Server) => (SpanKind::Server, conn.local),
            _ => (SpanKind::Client, conn.peer),
        };
        // The name the client asked for (SNI) when its hello was seen.
        let server_address = match conn.tls.as_ref().and_then(|t| t.server_name()) {
            Some(name) => name.to_owned(),
            None => server.ip().to_string(),
        };
        let mut attributes = vec![
            Attribute::str("server.address", server_address),
            Attribute::int("server.port", i64::from(server.port())),
            Attribute::str("network.peer.address", conn.peer_ip_text.clone()),
            Attribute::int("network.peer.port", i64::from(conn.peer.port())),
            Attribute::str("tls.protocol.name", "tls"),
        ];
        if let Some(v) = conn.tls.as_ref().and_then(|t| t.version) {
            attributes.push(Attribute::str("tls.protocol.version", v));
        }
        let alert = conn.tls.as_ref().and_then(|t| t.alert).map(|alert| {
            let sender = match (conn.side, alert.sent) {
                (Some(Side::Server), true) | (Some(Side::Client) | None, false) => "server",
                _ => "client",
            };
            let name = alert.description_name();
            attributes.push(Attribute::str("periscope.tls.alert", name.clone()));
            attributes.push(Attribute::str("periscope.tls.alert.sender", sender));
            (name, sender)
        });
        let mut span = Span {
            trace_id: [0; 16],
            span_id: [0; 8],
            parent_span_id: None,
            name: "tls.handshake".into(),
            kind,
            start_unix_nano: self.clock.to_unix_nanos(start_ns),
            end_unix_nano: self.clock.to_unix_nanos(end_ns.max(start_ns)),
            attributes,
            status: SpanStatus::Unset,
            resource,
        };
        mark_failed(&mut span, "tls_handshake_failed");
        if let Some((name, sender)) = alert {
            span.status = SpanStatus::Error { message: format!("tls handshake failed: {name} alert from the {sender}") };
        }
        let identity = Identity::root(&mut self.rng, true);
        let mut bundle = std::mem::take(&mut self.bundle);
        bundle.push(span);
        self.submit(&mut bundle, identity);
        self.bundle = bundle;
    }

    /// A connect of a traced process failed: its span (rate-limited).
    pub(super) fn on_failed_connect(&mut self, c: &ConnectEvent) {
        let tgid = c.header.tgid;
        if tgid == 0 {
            return;
        }
        let (local, peer) = socket_addrs(&c.tuple);
        let resolution = self.resolutions.take_for_connect(tgid, peer.ip(), c.syn_sent_ns);
        if let Some(r) = &resolution {
            self.failed_connects.remember_names(tgid, &r.addresses, &r.name, c.header.ts_ns);
        }
        let Some(folded) = self.failed_connects.admit(tgid, peer, c.header.ts_ns) else {
            Stats::inc(&self.stats.failed_connects_folded);
            if let Some(r) = resolution {
                self.emit_resolution(r);
            }
            return;
        };
        Stats::inc(&self.stats.failed_connect_spans);
        self.processes.observe(tgid);
        let resource = self.processes.resource(tgid);
        let error_type = connect_error_type(c.error);
        let actor = (!self.go_processes.contains(&tgid)).then_some(u64::from(c.tid));
        let mut outcome = LinkOutcome::default();
        let parent = actor.and_then(|tid| {
            let connections = &self.connections;
            self.links.in_process_parent(tid, |s, q, id| connections.serving_request(s, q, id), &mut outcome)
        });
        self.count_link(outcome);
        let identity = match &parent {
            Some(p) => Identity::child_of(p, &mut self.rng),
            None => Identity::root(&mut self.rng, true),
        };
        let start_ns = resolution.as_ref().map_or(c.syn_sent_ns, |r| r.start_ns.min(c.syn_sent_ns));
        let server_address = match &resolution {
            Some(r) => r.name.clone(),
            None => self
                .failed_connects
                .recent_name(tgid, peer.ip(), c.header.ts_ns)
                .unwrap_or_else(|| peer.ip().to_string()),
        };
        let mut attributes = vec![
            Attribute::str("server.address", server_address),
            Attribute::int("server.port", i64::from(peer.port())),
            Attribute::str("network.peer.address", peer.ip().to_string()),
            Attribute::int("network.peer.port", i64::from(peer.port())),
            Attribute::str("network.transport", "tcp"),
            Attribute::int("periscope.phase.connect.duration_ns", c.header.ts_ns.saturating_sub(c.syn_sent_ns) as i64),
        ];
        if local.port() != 0 {
            attributes.push(Attribute::int("network.local.port", i64::from(local.port())));
        }
        if folded > 0 {
            attributes.push(Attribute::int("periscope.folded_count", folded as i64));
        }
        let mut span = Span {
            trace_id: [0; 16],
            span_id: http::new_span_id(&mut self.rng),
            parent_span_id: None,
            name: "connect".into(),
            kind: SpanKind::Client,
            start_unix_nano: self.clock.to_unix_nanos(start_ns),
            end_unix_nano: self.clock.to_unix_nanos(c.header.ts_ns),
            attributes,
            status: SpanStatus::Unset,
            resource: resource.clone(),
        };
        mark_failed(&mut span, error_type);
        let mut bundle = std::mem::take(&mut self.bundle);
        bundle.push(span);
        if let Some(r) = resolution {
            if self.phases_enabled {
                self.resolution_spans(&r, true, identity.span_id(), &resource, &mut bundle);
            } else {
                self.emit_resolution(r);
            }
        }
        self.submit(&mut bundle, identity);
        self.bundle = bundle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_connects_are_rate_limited_per_process_and_destination() {
        let mut f = FailedConnects::new();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        for _ in 0..PER_WINDOW {
            assert_eq!(f.admit(7, a, 100), Some(0));
        }
        assert_eq!(f.admit(7, a, 200), None);
        assert_eq!(f.admit(7, a, 300), None);
        // Another destination, another process: their own budgets.
        assert_eq!(f.admit(7, b, 300), Some(0));
        assert_eq!(f.admit(8, a, 300), Some(0));
        // The next window's first span tells how many were folded.
        assert_eq!(f.admit(7, a, 100 + WINDOW_NS), Some(2));
        assert_eq!(f.admit(7, a, 101 + WINDOW_NS), Some(0));
        // Bounded: many destinations never grow the table past its cap.
        for port in 0..(2 * MAX_KEYS as u16) {
            f.admit(9, SocketAddr::from(([10, 0, 0, 1], port)), 5 * WINDOW_NS);
        }
        assert!(f.windows.len() <= MAX_KEYS);
    }

    #[test]
    fn error_types() {
        assert_eq!(connect_error_type(111), "connection_refused");
        assert_eq!(connect_error_type(110), "connect_timeout");
        assert_eq!(connect_error_type(0), "connect_timeout");
        assert_eq!(connect_error_type(113), "EHOSTUNREACH");
        assert_eq!(connect_error_type(-5), "connect_error");
    }
}
