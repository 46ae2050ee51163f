//! Who is whose parent, decided when a request starts.
//!
//! * In a process: a client request sent by a thread that is serving exactly
//!   one server request (read, not yet answered) is that request's child.
//!   Thread-per-request servers are therefore exact. An event-loop thread
//!   (nginx, Node) serving several requests at once gives no way to tell
//!   which one a call belongs to: the call is left unlinked and counted as
//!   ambiguous, never guessed.
//! * Across processes on this node: the client and server ends of one TCP
//!   connection are the same 4-tuple seen from both sides, and the n-th
//!   request on it is the n-th on both sides. Whichever end's event comes
//!   second links the server span under the client span.
//! * A request carrying a W3C traceparent joins that trace.

use rustc_hash::FxHashMap as HashMap;
use std::net::SocketAddr;

use rand::Rng;

use super::context::{Identity, IdentityRef, LinkRefused};

/// How long one end of a connection waits for the other end's request.
pub const LINK_TTL_NS: u64 = 5_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct LinkKey {
    client: SocketAddr,
    server: SocketAddr,
    seq: u64,
}

/// One end's view of request `seq`: its identity, a fingerprint of its
/// method and path (both ends must agree, or the request numbering of one
/// of them is off), and when it was seen.
struct End {
    identity: IdentityRef,
    fingerprint: u64,
    seen_ns: u64,
}

enum LinkEntry {
    /// The client sent request `seq`, for the server's span.
    ClientSent(End),
    /// The server read request `seq` first; its identity is unsettled.
    ServerWaiting(End),
}

/// A request's fingerprint for matching its two ends: its method and path.
pub fn fingerprint(method: &str, path: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    method.hash(&mut h);
    path.hash(&mut h);
    h.finish()
}

/// A server request a thread read and has not answered yet.
struct Serving {
    sock: u64,
    seq: u64,
    identity: IdentityRef,
    /// False for a request on a connection that lost events: it is never a
    /// parent, but while it is open the thread is serving more than one
    /// request as far as any call it makes is concerned.
    may_parent: bool,
}

/// What happened when a request started, for the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkOutcome {
    pub in_process: bool,
    pub cross_process: bool,
    pub ambiguous: bool,
    pub refused: bool,
    pub overflow: bool,
}

pub struct TraceLinks {
    ends: HashMap<LinkKey, LinkEntry>,
    serving: HashMap<u64, Vec<Serving>>,
    max_ends: usize,
}

/// Both ends of a connection can be on this node (loopback, or a peer that
/// is this host's own address).
fn peer_may_be_local(local: SocketAddr, peer: SocketAddr) -> bool {
    peer.ip().is_loopback() || peer.ip() == local.ip()
}

impl TraceLinks {
    pub fn new(max_ends: usize) -> Self {
        Self { ends: HashMap::default(), serving: HashMap::default(), max_ends }
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.ends.len()
    }

    /// Thread `tid` (or goroutine: see `pipeline::actor`; None when it
    /// cannot be told) sent request `seq` on the connection `local -> peer`.
    /// `is_open(sock, seq, identity)` says whether a server request is still
    /// being served. Returns the new request's identity.
    #[allow(clippy::too_many_arguments)]
    pub fn client_request(
        &mut self,
        tid: Option<u64>,
        local: SocketAddr,
        peer: SocketAddr,
        seq: u64,
        fingerprint: u64,
        now_ns: u64,
        rng: &mut impl Rng,
        is_open: impl Fn(u64, u64, &IdentityRef) -> bool,
        outcome: &mut LinkOutcome,
    ) -> IdentityRef {
        let parent = tid.and_then(|tid| self.serving_parent(tid, is_open, outcome));
        let identity = match parent {
            Some(p) => {
                outcome.in_process = true;
                Identity::child_of(&p, rng)
            }
            None => Identity::root(rng, true),
        };
        if peer_may_be_local(local, peer) {
            let key = LinkKey { client: local, server: peer, seq };
            match self.ends.remove(&key) {
                // Another request under this key (a stale end of an earlier
                // connection on the same ports, or numbering that is off):
                // not joined, and this end waits for its own peer instead.
                Some(LinkEntry::ServerWaiting(server)) if server.fingerprint != fingerprint => {
                    outcome.refused = true;
                    let end = End { identity: identity.clone(), fingerprint, seen_ns: now_ns };
                    self.remember(key, LinkEntry::ClientSent(end), outcome);
                }
                Some(LinkEntry::ServerWaiting(server)) => match server.identity.link_to(&identity) {
                    Ok(()) => outcome.cross_process = true,
                    Err(LinkRefused::AlreadyLinked) => {}
                    Err(_) => outcome.refused = true,
                },
                _ => {
                    let end = End { identity: identity.clone(), fingerprint, seen_ns: now_ns };
                    self.remember(key, LinkEntry::ClientSent(end), outcome)
                }
            }
        }
        identity
    }

    /// Thread `tid` read request `seq` on the connection `local <- peer`
    /// (this process is the server), with the request's traceparent if any.
    #[allow(clippy::too_many_arguments)]
    pub fn server_request(
        &mut self,
        tid: Option<u64>,
        sock: u64,
        local: SocketAddr,
        peer: SocketAddr,
        seq: u64,
        fingerprint: u64,
        traceparent: Option<([u8; 16], [u8; 8])>,
        now_ns: u64,
        rng: &mut impl Rng,
        is_open: impl Fn(u64, u64, &IdentityRef) -> bool,
        outcome: &mut LinkOutcome,
    ) -> IdentityRef {
        let key = LinkKey { client: peer, server: local, seq };
        let client = if peer_may_be_local(local, peer) {
            match self.ends.remove(&key) {
                Some(LinkEntry::ClientSent(end)) if end.fingerprint == fingerprint => Some(end.identity),
                // As on the client side: this end then waits for its own peer.
                Some(LinkEntry::ClientSent(_)) => {
                    outcome.refused = true;
                    None
                }
                _ => None,
            }
        } else {
            None
        };
        let identity = match (traceparent, client) {
            // The traced client on this node is the parent, unless the
            // request carries another trace's context (an instrumented
            // caller whose own span is the real parent): a proxy that
            // forwards the header leaves its client span in that trace.
            (Some((trace, parent)), Some(c)) if c.trace_id() != trace => Identity::remote_child(trace, parent, rng),
            (_, Some(c)) => {
                outcome.cross_process = true;
                Identity::child_of(&c, rng)
            }
            (Some((trace, parent)), None) => Identity::remote_child(trace, parent, rng),
            (None, None) if peer_may_be_local(local, peer) => {
                let id = Identity::root(rng, false);
                let end = End { identity: id.clone(), fingerprint, seen_ns: now_ns };
                self.remember(key, LinkEntry::ServerWaiting(end), outcome);
                id
            }
            (None, None) => Identity::root(rng, true),
        };
        if let Some(tid) = tid {
            self.note_serving(tid, Serving { sock, seq, identity: identity.clone(), may_parent: true }, is_open);
        }
        identity
    }

    /// Thread `tid` read request `seq` on `sock`, a connection that lost
    /// events and so takes part in no link: while it is open, a call the
    /// thread makes may be on its behalf, so no other request it serves is
    /// that call's parent.
    pub fn server_request_unlinked(
        &mut self,
        tid: u64,
        sock: u64,
        seq: u64,
        identity: &IdentityRef,
        is_open: impl Fn(u64, u64, &IdentityRef) -> bool,
    ) {
        self.note_serving(tid, Serving { sock, seq, identity: identity.clone(), may_parent: false }, is_open);
    }

    fn note_serving(&mut self, tid: u64, serving: Serving, is_open: impl Fn(u64, u64, &IdentityRef) -> bool) {
        let served = self.serving.entry(tid).or_default();
        // Requests this thread already answered leave first: the list stays
        // as long as what the thread has in flight.
        served.retain(|s| is_open(s.sock, s.seq, &s.identity));
        served.push(serving);
    }

    fn remember(&mut self, key: LinkKey, entry: LinkEntry, outcome: &mut LinkOutcome) {
        if self.ends.len() >= self.max_ends && !self.ends.contains_key(&key) {
            outcome.overflow = true;
            return;
        }
        self.ends.insert(key, entry);
    }

    /// The request thread `tid` is serving, for a call of its own that is
    /// not on any connection (a failed connect): exactly one, or none.
    pub fn in_process_parent(
        &mut self,
        tid: u64,
        is_open: impl Fn(u64, u64, &IdentityRef) -> bool,
        outcome: &mut LinkOutcome,
    ) -> Option<IdentityRef> {
        self.serving_parent(tid, is_open, outcome)
    }

    /// The one server request thread `tid` is serving, if exactly one.
    fn serving_parent(
        &mut self,
        tid: u64,
        is_open: impl Fn(u64, u64, &IdentityRef) -> bool,
        outcome: &mut LinkOutcome,
    ) -> Option<IdentityRef> {
        let entries = self.serving.get_mut(&tid)?;
        entries.retain(|s| is_open(s.sock, s.seq, &s.identity));
        match entries.len() {
            0 => {
                self.serving.remove(&tid);
                None
            }
            1 if entries[0].may_parent => Some(entries[0].identity.clone()),
            1 => None,
            _ => {
                outcome.ambiguous = true;
                None
            }
        }
    }

    /// Thread `tid` lost events: the requests it was serving may be answered
    /// already, so none is a parent any more.
    pub fn forget_thread(&mut self, tid: u64) {
        self.serving.remove(&tid);
    }

    /// Forgets link ends older than the TTL, and served requests that ended.
    pub fn expire(&mut self, now_ns: u64, is_open: impl Fn(u64, u64, &IdentityRef) -> bool) {
        let cutoff = now_ns.saturating_sub(LINK_TTL_NS);
        self.ends.retain(|_, e| match e {
            LinkEntry::ClientSent(end) | LinkEntry::ServerWaiting(end) => end.seen_ns >= cutoff,
        });
        self.serving.retain(|_, v| {
            v.retain(|s| is_open(s.sock, s.seq, &s.identity));
            !v.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn chain_across_processes_either_order() {
        let rng = &mut rand::rng();
        let mut links = TraceLinks::new(100);
        let (c, s) = (addr("127.0.0.1:40000"), addr("127.0.0.1:80"));
        let mut o = LinkOutcome::default();
        // Client first.
        let client = links.client_request(Some(1), c, s, 0, 7, 0, rng, |_, _, _| false, &mut o);
        let server = links.server_request(Some(2), 9, s, c, 0, 7, None, 0, rng, |_, _, _| true, &mut o);
        assert!(o.cross_process);
        assert_eq!(server.trace_id(), client.trace_id());
        assert_eq!(server.parent_span_id(), Some(client.span_id()));
        // Server first (its event came out of the ring first).
        let mut o = LinkOutcome::default();
        let server = links.server_request(Some(2), 9, s, c, 1, 7, None, 0, rng, |_, _, _| true, &mut o);
        assert!(!server.chain_settled());
        let client = links.client_request(Some(1), c, s, 1, 7, 0, rng, |_, _, _| false, &mut o);
        assert!(o.cross_process);
        assert_eq!(server.trace_id(), client.trace_id());
        assert!(server.chain_settled());
        assert_eq!(links.pending(), 0);
    }

    #[test]
    fn in_process_exact_for_one_open_request_ambiguous_for_two() {
        let rng = &mut rand::rng();
        let mut links = TraceLinks::new(100);
        let up = addr("10.0.0.9:5000");
        let mut o = LinkOutcome::default();
        let served = links.server_request(Some(7), 1, addr("10.0.0.1:80"), up, 0, 7, None, 0, rng, |_, _, _| true, &mut o);
        let call = links.client_request(Some(7), addr("10.0.0.1:41000"), addr("10.0.0.2:80"), 0, 7, 0, rng, |_, _, _| true, &mut o);
        assert!(o.in_process);
        assert_eq!(call.parent_span_id(), Some(served.span_id()));
        // A second open request on the same thread: no guess.
        let mut o = LinkOutcome::default();
        links.server_request(Some(7), 2, addr("10.0.0.1:80"), addr("10.0.0.9:5001"), 0, 7, None, 0, rng, |_, _, _| true, &mut o);
        let call = links.client_request(Some(7), addr("10.0.0.1:41001"), addr("10.0.0.2:80"), 0, 7, 0, rng, |_, _, _| true, &mut o);
        assert!(o.ambiguous && !o.in_process);
        assert!(!call.has_parent());
        // Another thread is not affected; closed requests are dropped.
        let mut o = LinkOutcome::default();
        let call = links.client_request(Some(8), addr("10.0.0.1:41002"), addr("10.0.0.2:80"), 0, 7, 0, rng, |_, _, _| true, &mut o);
        assert!(!call.has_parent() && !o.ambiguous);
        let call = links.client_request(Some(7), addr("10.0.0.1:41003"), addr("10.0.0.2:80"), 0, 7, 0, rng, |sock, _, _| sock == 2, &mut o);
        assert!(call.has_parent());
    }

    #[test]
    fn an_open_request_on_a_lossy_connection_blocks_in_process_links() {
        let rng = &mut rand::rng();
        let mut links = TraceLinks::new(100);
        let up = addr("10.0.0.9:5000");
        let mut o = LinkOutcome::default();
        let served = links.server_request(Some(7), 1, addr("10.0.0.1:80"), up, 0, 7, None, 0, rng, |_, _, _| true, &mut o);
        // Request 20 arrives on a connection that lost events: unlinked,
        // but the thread now serves two requests.
        let lossy = Identity::root(rng, true);
        links.server_request_unlinked(7, 2, 0, &lossy, |_, _, _| true);
        let call = links.client_request(Some(7), addr("10.0.0.1:41000"), addr("10.0.0.2:80"), 0, 7, 0, rng, |_, _, _| true, &mut o);
        assert!(!call.has_parent() && o.ambiguous);
        // Once it is answered, the other request is the parent again.
        let call = links.client_request(Some(7), addr("10.0.0.1:41002"), addr("10.0.0.2:80"), 0, 7, 0, rng, |sock, _, _| sock == 1, &mut o);
        assert_eq!(call.parent_span_id(), Some(served.span_id()));
        // Alone, it is no parent.
        let mut o = LinkOutcome::default();
        links.server_request_unlinked(9, 3, 0, &lossy, |_, _, _| true);
        let call = links.client_request(Some(9), addr("10.0.0.1:41001"), addr("10.0.0.2:80"), 0, 7, 0, rng, |_, _, _| true, &mut o);
        assert!(!call.has_parent() && !o.in_process);
    }

    #[test]
    fn traceparent_wins_and_remote_peers_are_not_waited_for() {
        let rng = &mut rand::rng();
        let mut links = TraceLinks::new(100);
        let mut o = LinkOutcome::default();
        let id = links.server_request(Some(1), 1, addr("10.0.0.1:80"), addr("10.0.0.7:5000"), 0, 7, Some(([1; 16], [2; 8])), 0, rng, |_, _, _| true, &mut o);
        assert_eq!(id.trace_id(), [1; 16]);
        let id = links.server_request(Some(1), 1, addr("10.0.0.1:80"), addr("10.0.0.7:5000"), 1, 7, None, 0, rng, |_, _, _| true, &mut o);
        assert!(id.chain_settled());
        assert_eq!(links.pending(), 0);
    }

    #[test]
    fn ends_that_disagree_on_the_request_are_not_joined() {
        let rng = &mut rand::rng();
        let mut links = TraceLinks::new(100);
        let (c, s) = (addr("127.0.0.1:40000"), addr("127.0.0.1:80"));
        let mut o = LinkOutcome::default();
        links.client_request(Some(1), c, s, 0, fingerprint("GET", "/a"), 0, rng, |_, _, _| false, &mut o);
        let server = links.server_request(Some(2), 9, s, c, 0, fingerprint("GET", "/b"), None, 0, rng, |_, _, _| true, &mut o);
        assert!(o.refused && !o.cross_process);
        assert!(!server.has_parent());
        // A stale server end under the key does not keep the right pair
        // apart: the client's end waits, and its own server joins it.
        let mut o = LinkOutcome::default();
        links.server_request(Some(2), 9, s, c, 1, fingerprint("GET", "/stale"), None, 0, rng, |_, _, _| true, &mut o);
        let client = links.client_request(Some(1), c, s, 1, fingerprint("GET", "/c"), 0, rng, |_, _, _| false, &mut o);
        assert!(o.refused);
        let mut o = LinkOutcome::default();
        let server = links.server_request(Some(2), 9, s, c, 1, fingerprint("GET", "/c"), None, 0, rng, |_, _, _| true, &mut o);
        assert!(o.cross_process);
        assert_eq!(server.parent_span_id(), Some(client.span_id()));
    }

    #[test]
    fn a_forwarded_traceparent_keeps_the_proxys_client_as_parent() {
        let rng = &mut rand::rng();
        let mut links = TraceLinks::new(100);
        let (c, s) = (addr("127.0.0.1:40000"), addr("127.0.0.1:80"));
        let mut o = LinkOutcome::default();
        let remote = Identity::remote_child([5; 16], [6; 8], rng);
        let proxy_client = Identity::child_of(&remote, rng);
        // The proxy's client span is in the header's trace: it is the parent.
        links.ends.insert(
            LinkKey { client: c, server: s, seq: 0 },
            LinkEntry::ClientSent(End { identity: proxy_client.clone(), fingerprint: 7, seen_ns: 0 }),
        );
        let id = links.server_request(Some(2), 9, s, c, 0, 7, Some(([5; 16], [6; 8])), 0, rng, |_, _, _| true, &mut o);
        assert_eq!(id.parent_span_id(), Some(proxy_client.span_id()));
        // An instrumented caller's own context (another trace) wins.
        let caller = Identity::root(rng, true);
        links.ends.insert(
            LinkKey { client: c, server: s, seq: 1 },
            LinkEntry::ClientSent(End { identity: caller, fingerprint: 7, seen_ns: 0 }),
        );
        let id = links.server_request(Some(2), 9, s, c, 1, 7, Some(([5; 16], [6; 8])), 0, rng, |_, _, _| true, &mut o);
        assert_eq!(id.parent_span_id(), Some([6; 8]));
        assert_eq!(id.trace_id(), [5; 16]);
    }

    #[test]
    fn bounded_and_expiring() {
        let rng = &mut rand::rng();
        let mut links = TraceLinks::new(1);
        let mut o = LinkOutcome::default();
        let s = addr("127.0.0.1:80");
        links.client_request(Some(1), addr("127.0.0.1:1"), s, 0, 7, 0, rng, |_, _, _| false, &mut o);
        links.client_request(Some(1), addr("127.0.0.1:2"), s, 0, 7, 0, rng, |_, _, _| false, &mut o);
        assert!(o.overflow);
        links.expire(LINK_TTL_NS + 1, |_, _, _| false);
        assert_eq!(links.pending(), 0);
    }
}
