//! Who talks to whom: TCP connections keyed by kernel socket, with their
//! owner, addresses, role and protocol state. Bounded: connections leave the
//! table when the socket is destroyed, the owner exits, they sit idle too
//! long, or the table is full.

use std::collections::VecDeque;

use compact_str::{CompactString, ToCompactString};
use rustc_hash::FxHashMap as HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use periscope_ebpf::{AF_INET, SockTuple};

use crate::protocols::dns::TcpFramer;
use crate::protocols::StreamParser;
use crate::protocols::exchange::Side;
use crate::protocols::tls_records::{HandshakeObserver, TlsAlert};
use crate::spans::context::IdentityRef;
use crate::spans::resolutions::Resolution;

/// What is known about a connection that speaks TLS.
#[derive(Default)]
pub struct TlsState {
    /// Plaintext arrived from a TLS library uprobe: HTTP is parsed from it.
    pub plaintext_seen: bool,
    /// Handshake duration (ns), until it is reported on the first span.
    pub handshake_ns: Option<u64>,
    /// When the handshake started and completed (kernel ns), until the
    /// first request's phases use it.
    pub handshake: Option<(u64, u64)>,
    pub handshake_seen: bool,
    /// A handshake function returned without completing (first such call's
    /// start), or said it failed: a connection that ends before a completed
    /// handshake had a failed one.
    pub handshake_attempt_ns: Option<u64>,
    pub handshake_failed: bool,
    /// Seen in the ciphertext: when this side sent its first handshake
    /// record (a client's ClientHello), and when the version became known
    /// (the ServerHello arrived). The handshake's span for programs that
    /// never call a handshake function (Node, s_client: their handshake
    /// runs inside SSL_read/SSL_write).
    pub hello_sent_ns: Option<u64>,
    pub version_seen_ns: Option<u64>,
    pub version: Option<&'static str>,
    /// An alert seen in plaintext during the handshake (TLS 1.2 and older,
    /// or a server refusing the ClientHello).
    pub alert: Option<TlsAlert>,
    /// The ClientHello's server name, kept from the observer when it is done.
    pub sni: Option<String>,
    /// Reads the handshake records in the ciphertext (version, SNI).
    pub observer: Option<Box<HandshakeObserver>>,
}

impl TlsState {
    pub fn new() -> Self {
        Self { observer: Some(Box::new(HandshakeObserver::new())), ..Default::default() }
    }

    /// The handshake's (start, end) for the first request's phase: from the
    /// handshake function when it was hooked, else, for a client, from its
    /// ClientHello to the ServerHello that answered it.
    pub fn take_handshake(&mut self) -> Option<(u64, u64)> {
        if let Some(h) = self.handshake.take() {
            return Some(h);
        }
        match (self.hello_sent_ns.take(), self.version_seen_ns.take()) {
            (Some(start), Some(end)) if end >= start => Some((start, end)),
            _ => None,
        }
    }

    /// The server name the client asked for (SNI), if its hello was seen.
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref().or_else(|| self.observer.as_ref().and_then(|o| o.sni()))
    }

    /// Ciphertext seen on the socket (`start_ns`: when the call began,
    /// `ts_ns`: when it completed): only the handshake is of interest.
    pub fn observe_ciphertext(&mut self, egress: bool, bytes: &[u8], start_ns: u64, ts_ns: u64) {
        if let Some(observer) = &mut self.observer {
            if egress && self.hello_sent_ns.is_none() && self.version.is_none() {
                self.hello_sent_ns = Some(start_ns);
            }
            observer.feed(egress, bytes);
            if let Some(v) = observer.version() {
                if self.version.is_none() {
                    self.version_seen_ns = Some(ts_ns);
                }
                self.version = Some(v.as_str());
            }
            self.alert = observer.alert();
            if observer.done() {
                self.sni = observer.take_sni();
                self.observer = None;
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectTiming {
    pub syn_sent_ns: u64,
    pub established_ns: u64,
}

/// DNS over TCP: one length-prefix framer per direction (egress, ingress).
pub struct DnsOverTcp {
    pub framers: [TcpFramer; 2],
}

pub enum ProtocolState {
    /// No plaintext seen yet: its first bytes choose the parser.
    Undetected,
    /// HTTP/1 or HTTP/2 (plain, or the plaintext of TLS).
    Stream(StreamParser),
    Dns(Box<DnsOverTcp>),
    /// Not a protocol we parse; its bytes are ignored until the socket goes.
    Ignored,
}

pub struct Connection {
    pub tgid: u32,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// `peer.ip()` as text, made once for every span of the connection.
    pub peer_ip_text: CompactString,
    /// From the kernel: Client if this process connected, Server if accepted.
    pub side: Option<Side>,
    pub connect: Option<ConnectTiming>,
    pub protocol: ProtocolState,
    pub last_seen_ns: u64,
    /// Socket-level data events seen (the first one decides TLS or not).
    pub socket_chunks: u32,
    pub tls: Option<TlsState>,
    /// Identities of the requests started and not yet turned into spans,
    /// by the parser's request `seq`, oldest first.
    pub requests: VecDeque<(u64, IdentityRef)>,
    /// The name resolution that led to this connection, for its first
    /// request's dns phase.
    pub resolution: Option<Box<Resolution>>,
    /// The first request's span (with connect and handshake phases) was built.
    pub first_exchange_done: bool,
    /// Some of its data events were lost in the kernel: which request is
    /// which may be off by some, so it takes part in no trace links.
    /// The peer reset the connection (`sk_err`, ECONNRESET): what was
    /// open on it failed.
    pub reset_error: Option<i32>,
    pub out_of_step: bool,
}

impl Connection {
    pub fn new(tgid: u32, local: SocketAddr, peer: SocketAddr, protocol: ProtocolState, now_ns: u64) -> Self {
        Connection {
            tgid,
            local,
            peer,
            peer_ip_text: peer.ip().to_compact_string(),
            side: None,
            connect: None,
            protocol,
            last_seen_ns: now_ns,
            socket_chunks: 0,
            tls: None,
            reset_error: None,
            requests: VecDeque::new(),
            resolution: None,
            first_exchange_done: false,
            out_of_step: false,
        }
    }

    /// The identity of request `seq`. On a connection whose exchanges end
    /// in request order (HTTP/1), older ones are left behind (requests the
    /// parser gave up on) and dropped; HTTP/2 streams end in any order.
    pub fn take_request(&mut self, seq: u64) -> Option<IdentityRef> {
        if matches!(&self.protocol, ProtocolState::Stream(p) if !p.ends_in_order()) {
            let at = self.requests.iter().position(|(s, _)| *s == seq)?;
            return self.requests.remove(at).map(|(_, id)| id);
        }
        while let Some((s, _)) = self.requests.front() {
            if *s < seq {
                self.requests.pop_front();
            } else {
                break;
            }
        }
        match self.requests.front() {
            Some((s, _)) if *s == seq => self.requests.pop_front().map(|(_, id)| id),
            _ => None,
        }
    }

    /// Plaintext from a TLS library: its first bytes choose the parser
    /// (whatever was made of the ciphertext is dropped).
    pub fn start_plaintext(&mut self) {
        let tls = self.tls.get_or_insert_with(TlsState::new);
        if !tls.plaintext_seen {
            tls.plaintext_seen = true;
            self.protocol = ProtocolState::Undetected;
        }
    }
}

/// An address as the kernel hands it over (IPv4 in the first 4 bytes);
/// IPv4 peers of dual-stack sockets (`::ffff:a.b.c.d`) become IPv4.
pub fn ip_from(family: u16, a: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        let v6 = Ipv6Addr::from(*a);
        v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
    }
}

pub fn socket_addrs(tuple: &SockTuple) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(ip_from(tuple.family, &tuple.src_addr), tuple.src_port),
        SocketAddr::new(ip_from(tuple.family, &tuple.dst_addr), tuple.dst_port),
    )
}

/// Facts learned from lifecycle events before any data was seen.
struct Pending {
    side: Side,
    connect: Option<ConnectTiming>,
    resolution: Option<Box<Resolution>>,
    seen_ns: u64,
}

pub struct ConnectionTable {
    by_sock: HashMap<u64, Connection>,
    /// Connections found replaced on their socket (the ports changed: the
    /// kernel reused the socket and its close was lost), to be finished.
    replaced: Vec<Connection>,
    pending: HashMap<u64, Pending>,
    max_connections: usize,
}

pub enum Admit<'a> {
    Tracked(&'a mut Connection),
    /// The table is full: this connection is not traced (counted by caller).
    Full,
}

impl ConnectionTable {
    pub fn new(max_connections: usize) -> Self {
        Self {
            by_sock: HashMap::default(),
            replaced: Vec::new(),
            pending: HashMap::default(),
            max_connections,
        }
    }

    pub fn len(&self) -> usize {
        self.by_sock.len()
    }

    /// A connection was established on `sock`. Returns the previous
    /// connection still tracked on the same socket object, if any: the kernel
    /// reuses socket memory, and an event that arrived after the old
    /// connection's close would otherwise hand its state to the new one.
    pub fn on_connect(
        &mut self,
        sock: u64,
        timing: ConnectTiming,
        resolution: Option<Box<Resolution>>,
        now_ns: u64,
    ) -> Option<Connection> {
        self.note(sock, Pending { side: Side::Client, connect: Some(timing), resolution, seen_ns: now_ns })
    }

    /// A connection was accepted on `sock`; see [`Self::on_connect`].
    pub fn on_accept(&mut self, sock: u64, now_ns: u64) -> Option<Connection> {
        self.note(sock, Pending { side: Side::Server, connect: None, resolution: None, seen_ns: now_ns })
    }

    fn note(&mut self, sock: u64, info: Pending) -> Option<Connection> {
        let stale = self.by_sock.remove(&sock);
        if self.pending.len() < self.max_connections {
            self.pending.insert(sock, info);
        }
        stale
    }

    /// The connection a data event belongs to, created on first sight.
    pub fn admit(&mut self, sock: u64, tgid: u32, tuple: &SockTuple, now_ns: u64) -> Admit<'_> {
        if let Some(old) = self.by_sock.get(&sock) {
            // Ports 0 are a socket not (yet) bound or connected: no verdict.
            let (local, peer) = (old.local.port(), old.peer.port());
            let moved = |was: u16, now: u16| was != 0 && now != 0 && was != now;
            if (moved(local, tuple.src_port) || moved(peer, tuple.dst_port))
                && let Some(old) = self.by_sock.remove(&sock) {
                    self.replaced.push(old);
                }
        }
        if !self.by_sock.contains_key(&sock) && self.by_sock.len() >= self.max_connections {
            return Admit::Full;
        }
        let pending = &mut self.pending;
        let conn = self.by_sock.entry(sock).or_insert_with(|| {
            let (local, peer) = socket_addrs(tuple);
            let known = pending.remove(&sock);
            let protocol = if local.port() == periscope_ebpf::DNS_PORT || peer.port() == periscope_ebpf::DNS_PORT {
                ProtocolState::Dns(Box::new(DnsOverTcp { framers: [TcpFramer::new(), TcpFramer::new()] }))
            } else {
                ProtocolState::Undetected
            };
            let mut conn = Connection::new(tgid, local, peer, protocol, now_ns);
            if let Some(k) = known {
                conn.side = Some(k.side);
                conn.connect = k.connect;
                conn.resolution = k.resolution;
            }
            conn
        });
        conn.tgid = tgid;
        conn.last_seen_ns = now_ns;
        Admit::Tracked(conn)
    }

    /// Connections `admit` found replaced on their socket since last asked.
    pub fn take_replaced(&mut self) -> Option<Vec<Connection>> {
        (!self.replaced.is_empty()).then(|| std::mem::take(&mut self.replaced))
    }

    /// Whether `sock` still carries the connection with these ports (a
    /// closed socket's memory can serve a new connection within one batch).
    pub fn carries(&self, sock: u64, local_port: u16, peer_port: u16) -> bool {
        self.by_sock.get(&sock).is_some_and(|c| c.local.port() == local_port && c.peer.port() == peer_port)
    }

    pub fn get(&self, sock: u64) -> Option<&Connection> {
        self.by_sock.get(&sock)
    }

    /// Whether server request `seq` with identity `id` is still being
    /// served on `sock` (read, its response not started).
    pub fn serving_request(&self, sock: u64, seq: u64, id: &IdentityRef) -> bool {
        let Some(conn) = self.by_sock.get(&sock) else { return false };
        let ProtocolState::Stream(parser) = &conn.protocol else { return false };
        conn.requests.iter().any(|(s, i)| *s == seq && std::rc::Rc::ptr_eq(i, id)) && parser.awaiting_response(seq)
    }

    pub fn get_mut(&mut self, sock: u64) -> Option<&mut Connection> {
        self.by_sock.get_mut(&sock)
    }

    /// The connection on `sock`, gone; a resolution noted for a connection
    /// that never carried data is returned in `orphans`.
    pub fn remove(&mut self, sock: u64, orphans: &mut Vec<Resolution>) -> Option<Connection> {
        if let Some(r) = self.pending.remove(&sock).and_then(|p| p.resolution) {
            orphans.push(*r);
        }
        self.by_sock.remove(&sock)
    }

    /// Removes and returns every connection owned by `tgid`.
    pub fn remove_process(&mut self, tgid: u32) -> Vec<Connection> {
        let socks: Vec<u64> = self.by_sock.iter().filter(|(_, c)| c.tgid == tgid).map(|(s, _)| *s).collect();
        socks.into_iter().filter_map(|s| self.by_sock.remove(&s)).collect()
    }

    /// Removes connections idle since before `cutoff_ns`, and stale pending
    /// facts (resolutions they held are returned in `orphans`).
    pub fn remove_idle(&mut self, cutoff_ns: u64, orphans: &mut Vec<Resolution>) -> Vec<Connection> {
        self.pending.retain(|_, p| {
            let keep = p.seen_ns >= cutoff_ns;
            if !keep
                && let Some(r) = p.resolution.take() {
                    orphans.push(*r);
                }
            keep
        });
        let socks: Vec<u64> =
            self.by_sock.iter().filter(|(_, c)| c.last_seen_ns < cutoff_ns).map(|(s, _)| *s).collect();
        socks.into_iter().filter_map(|s| self.by_sock.remove(&s)).collect()
    }

    pub fn drain(&mut self, orphans: &mut Vec<Resolution>) -> Vec<Connection> {
        for (_, p) in self.pending.drain() {
            if let Some(r) = p.resolution {
                orphans.push(*r);
            }
        }
        self.by_sock.drain().map(|(_, c)| c).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple_v4(sport: u16, dport: u16) -> SockTuple {
        let mut t = SockTuple { family: AF_INET, src_port: sport, dst_port: dport, ..Default::default() };
        t.src_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        t.dst_addr[..4].copy_from_slice(&[127, 0, 0, 2]);
        t
    }

    #[test]
    fn addresses_from_tuple() {
        let (l, p) = socket_addrs(&tuple_v4(5000, 80));
        assert_eq!(l, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(p, "127.0.0.2:80".parse().unwrap());
        let mut t6 = SockTuple { family: periscope_ebpf::AF_INET6, src_port: 1, dst_port: 2, ..Default::default() };
        t6.dst_addr[10] = 0xff;
        t6.dst_addr[11] = 0xff;
        t6.dst_addr[12..].copy_from_slice(&[10, 0, 0, 9]);
        t6.src_addr[15] = 1;
        let (l, p) = socket_addrs(&t6);
        assert_eq!(l, "[::1]:1".parse().unwrap());
        assert_eq!(p, "10.0.0.9:2".parse().unwrap());
    }

    #[test]
    fn connect_facts_reach_the_connection() {
        let mut table = ConnectionTable::new(10);
        let timing = ConnectTiming { syn_sent_ns: 10, established_ns: 20 };
        assert!(table.on_connect(7, timing, None, 20).is_none());
        let Admit::Tracked(c) = table.admit(7, 99, &tuple_v4(5000, 80), 30) else { panic!() };
        assert_eq!(c.side, Some(Side::Client));
        assert_eq!(c.connect, Some(timing));
        assert_eq!(c.tgid, 99);
    }

    #[test]
    fn http2_streams_take_their_identities_in_any_order() {
        use crate::protocols::{StreamParser, http1, http2};
        use crate::spans::context::Identity;
        let rng = &mut rand::rng();
        let (l, p) = ("127.0.0.1:5000".parse().unwrap(), "127.0.0.1:80".parse().unwrap());
        let h2 = StreamParser::Http2(Box::new(http2::Http2Connection::new(http2::Limits::default())));
        let mut c = Connection::new(1, l, p, ProtocolState::Stream(h2), 0);
        let ids: Vec<_> = [1u64, 3, 5].iter().map(|&s| (s, Identity::root(rng, true))).collect();
        c.requests.extend(ids.iter().cloned());
        for (seq, k) in [(5, 2), (1, 0), (3, 1)] {
            let got = c.take_request(seq).expect("each stream keeps its identity");
            assert!(std::rc::Rc::ptr_eq(&got, &ids[k].1));
        }
        // HTTP/1: a later request's exchange means the older ones were given up.
        let h1 = StreamParser::Http1(Box::new(http1::Http1Connection::new(http1::Limits::default())));
        let mut c = Connection::new(1, l, p, ProtocolState::Stream(h1), 0);
        c.requests.extend(ids.iter().cloned());
        assert!(c.take_request(3).is_some());
        assert!(c.take_request(1).is_none());
        assert_eq!(c.requests.len(), 1);
    }

    #[test]
    fn a_new_connection_on_a_reused_socket_starts_fresh() {
        let mut table = ConnectionTable::new(10);
        let Admit::Tracked(old) = table.admit(7, 1, &tuple_v4(5000, 80), 1) else { panic!() };
        old.socket_chunks = 3;
        old.protocol = ProtocolState::Ignored;
        let stale = table.on_accept(7, 2).expect("the old connection is handed back");
        assert_eq!(stale.socket_chunks, 3);
        let Admit::Tracked(new) = table.admit(7, 2, &tuple_v4(80, 6000), 3) else { panic!() };
        assert_eq!(new.socket_chunks, 0);
        assert_eq!(new.side, Some(Side::Server));
        assert!(matches!(new.protocol, ProtocolState::Undetected));
    }

    #[test]
    fn a_socket_seen_with_other_ports_is_a_new_connection() {
        let mut table = ConnectionTable::new(10);
        let Admit::Tracked(old) = table.admit(7, 1, &tuple_v4(5000, 80), 1) else { panic!() };
        old.socket_chunks = 3;
        assert!(table.take_replaced().is_none());
        let Admit::Tracked(new) = table.admit(7, 1, &tuple_v4(5001, 80), 2) else { panic!() };
        assert_eq!(new.socket_chunks, 0);
        assert_eq!(table.take_replaced().map(|v| v.len()), Some(1));
        // Same ports: the same connection.
        let Admit::Tracked(same) = table.admit(7, 1, &tuple_v4(5001, 80), 3) else { panic!() };
        same.socket_chunks = 9;
        let Admit::Tracked(same) = table.admit(7, 1, &tuple_v4(5001, 80), 4) else { panic!() };
        assert_eq!(same.socket_chunks, 9);
        assert!(table.take_replaced().is_none());
    }

    #[test]
    fn table_is_bounded_and_cleaned() {
        let mut table = ConnectionTable::new(2);
        assert!(matches!(table.admit(1, 1, &tuple_v4(1, 80), 0), Admit::Tracked(_)));
        assert!(matches!(table.admit(2, 2, &tuple_v4(2, 80), 5), Admit::Tracked(_)));
        assert!(matches!(table.admit(3, 1, &tuple_v4(3, 80), 5), Admit::Full));
        // An existing connection is still admitted when full.
        assert!(matches!(table.admit(1, 1, &tuple_v4(1, 80), 6), Admit::Tracked(_)));
        assert_eq!(table.remove_process(1).len(), 1);
        assert_eq!(table.remove_idle(6, &mut Vec::new()).len(), 1);
        assert_eq!(table.len(), 0);
    }
}
