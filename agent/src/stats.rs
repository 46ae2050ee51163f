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
    /// HTTP/2 streams whose method or path was in an HPACK table entry made
    /// before Periscope saw the connection (marked `periscope.incomplete=hpack_state`).
    pub http2_hpack_incomplete: AtomicU64,
    /// Header blocks grpc-go reported decoded (its probes) that filled in
    /// what HPACK hid, or confirmed what the bytes showed.
    pub grpc_go_header_blocks: AtomicU64,
    /// Such blocks whose connection or stream was not found.
    pub grpc_go_header_blocks_unmatched: AtomicU64,
    /// Failed connects (refused, timed out...) turned into spans.
    pub failed_connect_spans: AtomicU64,
    /// Connections that closed after a TLS handshake that never completed,
    /// turned into spans.
    pub failed_handshake_spans: AtomicU64,
    /// Failed connects folded into the previous span of the same process
    /// and destination (rate limit: a port scan does not flood the exporter).
    pub failed_connects_folded: AtomicU64,
    /// HTTP/2 streams not tracked because a connection had too many open.
    pub http2_streams_dropped: AtomicU64,
    /// HTTP/2 header block bytes beyond the per-block cap, not decoded.
    pub http2_header_bytes_cut: AtomicU64,
    /// Times an HTTP/2 direction lost frame sync (capture gaps) and resynchronised.
    pub http2_desyncs: AtomicU64,
    /// HPACK blocks that could not be decoded.
    pub http2_hpack_errors: AtomicU64,
    /// Connections given up as not HTTP after inspection.
    pub connections_not_http: AtomicU64,
    /// TLS plaintext or handshakes that could not be tied to a socket.
    pub tls_unlinked: AtomicU64,
    /// Connections that carried TLS no uprobe saw.
    pub tls_not_visible_connections: AtomicU64,
    pub spans_built: AtomicU64,
    /// Of `spans_built`, the spans of requests and lookups (client and
    /// server spans; not phases or getaddrinfo calls): what a load
    /// generator's request count can be checked against.
    pub request_spans_built: AtomicU64,
    /// Spans built from incomplete data (marked with an attribute).
    pub spans_incomplete: AtomicU64,
    /// Spans left out by head sampling.
    pub spans_sampled_out: AtomicU64,
    pub spans_exported: AtomicU64,
    /// Spans dropped because the export queue was full or the backend
    /// refused them for good.
    pub spans_dropped: AtomicU64,
    pub export_errors: AtomicU64,
    /// DNS messages (or TCP DNS framing) that could not be parsed.
    pub dns_parse_errors: AtomicU64,
    /// DNS lookups (question sent, answered or timed out) turned into spans.
    pub dns_lookups: AtomicU64,
    /// DNS messages of a process acting as a DNS server (not traced as lookups),
    /// and responses with no matching query.
    pub dns_unmatched_messages: AtomicU64,
    /// getaddrinfo calls seen.
    pub resolver_calls: AtomicU64,
    /// Name resolutions that became the dns phase of a connection's first request.
    pub resolutions_linked: AtomicU64,
    /// Client spans made a child of the server request their thread was serving.
    pub trace_links_in_process: AtomicU64,
    /// Server spans made a child of the traced client span on the other end.
    pub trace_links_cross_process: AtomicU64,
    /// Client requests whose thread had several open server requests: left unlinked.
    pub trace_links_ambiguous: AtomicU64,
    /// Connections that lost data events in the kernel (ring full): their
    /// requests are no longer linked across processes or threads.
    pub connections_out_of_step: AtomicU64,
    /// Links found too late (the span's children were already exported): not made.
    pub trace_links_refused: AtomicU64,
    /// Spans held until their parent's trace was known.
    pub spans_held: AtomicU64,
    /// Spans exported before their parent's trace was known (hold full or timed out).
    pub spans_held_expired: AtomicU64,
    /// Pending lookups, resolutions or link entries dropped because a table was full.
    pub correlation_overflow: AtomicU64,
    /// Pod lookups sent to the Kubernetes API server (first tries and retries).
    pub k8s_api_lookups: AtomicU64,
    /// Pod lookups that failed (refused, unreachable, timed out, unexpected
    /// answer); retried with backoff.
    pub k8s_api_errors: AtomicU64,
    /// Pod lookup requests dropped because the lookup queue was full (asked
    /// again on the next tick).
    pub k8s_api_dropped: AtomicU64,
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
