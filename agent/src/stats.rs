//! Counters the daemon keeps about itself. Everything that is lost or
//! rejected is counted here, never dropped silently.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct Stats {
    /// Records read from the ring buffer.
    pub events_received: AtomicU64,
    /// Records that could not be decoded (short, unknown kind).
    pub events_malformed: AtomicU64,
    /// Data events on connections whose bytes are not a protocol we parse.
    pub events_unparsed: AtomicU64,
    /// Data events for a connection the daemon had stopped tracking.
    pub events_unmatched: AtomicU64,
    /// Protocol errors on connections that had looked like HTTP/1.
    pub http_parse_errors: AtomicU64,
    /// Connections given up as not HTTP after inspection.
    pub connections_not_http: AtomicU64,
    /// TLS plaintext or handshakes that could not be tied to a socket.
    pub tls_unlinked: AtomicU64,
    /// Connections that carried TLS no uprobe saw.
    pub tls_not_visible_connections: AtomicU64,
    pub spans_built: AtomicU64,
    /// Spans built from incomplete data (marked with an attribute).
    pub spans_incomplete: AtomicU64,
    /// Spans left out by head sampling.
    pub spans_sampled_out: AtomicU64,
    pub spans_exported: AtomicU64,
    /// Spans dropped because the export queue was full or the backend
    /// refused them for good.
    pub spans_dropped: AtomicU64,
    pub export_errors: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
