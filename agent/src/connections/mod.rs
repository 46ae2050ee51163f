//! Who talks to whom: TCP connections keyed by kernel socket, with their
//! owner, addresses, role and protocol state. Bounded: connections leave the
//! table when the socket is destroyed, the owner exits, they sit idle too
//! long, or the table is full.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use periscope_ebpf::{AF_INET, SockTuple};

use crate::protocols::http1::{Http1Connection, Limits, Side};
use crate::protocols::tls_records::HandshakeObserver;

/// What is known about a connection that speaks TLS.
#[derive(Default)]
pub struct TlsState {
    /// Plaintext arrived from a TLS library uprobe: HTTP is parsed from it.
    pub plaintext_seen: bool,
    /// Handshake duration (ns), until it is reported on the first span.
    pub handshake_ns: Option<u64>,
    pub handshake_seen: bool,
    pub version: Option<&'static str>,
    /// Reads the handshake records in the ciphertext (version, SNI).
    pub observer: Option<Box<HandshakeObserver>>,
}

impl TlsState {
    pub fn new() -> Self {
        Self { observer: Some(Box::new(HandshakeObserver::new())), ..Default::default() }
    }

    /// Ciphertext seen on the socket: only the handshake is of interest.
    pub fn observe_ciphertext(&mut self, egress: bool, bytes: &[u8]) {
        if let Some(observer) = &mut self.observer {
            observer.feed(egress, bytes);
            if let Some(v) = observer.version() {
                self.version = Some(v.as_str());
            }
            if observer.done() {
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

pub enum ProtocolState {
    Http1(Box<Http1Connection>),
    /// Not a protocol we parse; its bytes are ignored until the socket goes.
    Ignored,
}

pub struct Connection {
    pub tgid: u32,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// From the kernel: Client if this process connected, Server if accepted.
    pub side: Option<Side>,
    pub connect: Option<ConnectTiming>,
    pub protocol: ProtocolState,
    pub last_seen_ns: u64,
    /// Socket-level data events seen (the first one decides TLS or not).
    pub socket_chunks: u32,
    pub tls: Option<TlsState>,
}

impl Connection {
    /// Starts parsing HTTP from TLS plaintext (the ciphertext parser, if
    /// any, had given up on this connection or was never fed).
    pub fn start_plaintext(&mut self, limits: Limits) {
        let tls = self.tls.get_or_insert_with(TlsState::new);
        if !tls.plaintext_seen {
            tls.plaintext_seen = true;
            let mut http = Http1Connection::new(limits);
            if let Some(side) = self.side {
                http.set_side_hint(side);
            }
            self.protocol = ProtocolState::Http1(Box::new(http));
        }
    }
}

pub fn socket_addrs(tuple: &SockTuple) -> (SocketAddr, SocketAddr) {
    let ip = |a: &[u8; 16]| -> IpAddr {
        if tuple.family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
        } else {
            let v6 = Ipv6Addr::from(*a);
            // IPv4 peers of dual-stack sockets appear as ::ffff:a.b.c.d.
            v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
        }
    };
    (
        SocketAddr::new(ip(&tuple.src_addr), tuple.src_port),
        SocketAddr::new(ip(&tuple.dst_addr), tuple.dst_port),
    )
}

/// Facts learned from lifecycle events before any data was seen.
#[derive(Clone, Copy)]
struct Pending {
    side: Side,
    connect: Option<ConnectTiming>,
    seen_ns: u64,
}

pub struct ConnectionTable {
    by_sock: HashMap<u64, Connection>,
    pending: HashMap<u64, Pending>,
    max_connections: usize,
    limits: fn() -> Limits,
}

pub enum Admit<'a> {
    Tracked(&'a mut Connection),
    /// The table is full: this connection is not traced (counted by caller).
    Full,
}

impl ConnectionTable {
    pub fn new(max_connections: usize) -> Self {
        Self { by_sock: HashMap::new(), pending: HashMap::new(), max_connections, limits: Limits::default }
    }

    pub fn len(&self) -> usize {
        self.by_sock.len()
    }

    /// A connection was established on `sock`. Returns the previous
    /// connection still tracked on the same socket object, if any: the kernel
    /// reuses socket memory, and an event that arrived after the old
    /// connection's close would otherwise hand its state to the new one.
    pub fn on_connect(&mut self, sock: u64, timing: ConnectTiming, now_ns: u64) -> Option<Connection> {
        self.note(sock, Pending { side: Side::Client, connect: Some(timing), seen_ns: now_ns })
    }

    /// A connection was accepted on `sock`; see [`Self::on_connect`].
    pub fn on_accept(&mut self, sock: u64, now_ns: u64) -> Option<Connection> {
        self.note(sock, Pending { side: Side::Server, connect: None, seen_ns: now_ns })
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
        if !self.by_sock.contains_key(&sock) && self.by_sock.len() >= self.max_connections {
            return Admit::Full;
        }
        let limits = self.limits;
        let pending = &mut self.pending;
        let conn = self.by_sock.entry(sock).or_insert_with(|| {
            let (local, peer) = socket_addrs(tuple);
            let known = pending.remove(&sock);
            let mut http = Http1Connection::new(limits());
            if let Some(side) = known.map(|k| k.side) {
                http.set_side_hint(side);
            }
            Connection {
                tgid,
                local,
                peer,
                side: known.map(|k| k.side),
                connect: known.and_then(|k| k.connect),
                protocol: ProtocolState::Http1(Box::new(http)),
                last_seen_ns: now_ns,
                socket_chunks: 0,
                tls: None,
            }
        });
        conn.tgid = tgid;
        conn.last_seen_ns = now_ns;
        Admit::Tracked(conn)
    }

    pub fn get_mut(&mut self, sock: u64) -> Option<&mut Connection> {
        self.by_sock.get_mut(&sock)
    }

    pub fn remove(&mut self, sock: u64) -> Option<Connection> {
        self.pending.remove(&sock);
        self.by_sock.remove(&sock)
    }

    /// Removes and returns every connection owned by `tgid`.
    pub fn remove_process(&mut self, tgid: u32) -> Vec<Connection> {
        let socks: Vec<u64> = self.by_sock.iter().filter(|(_, c)| c.tgid == tgid).map(|(s, _)| *s).collect();
        socks.into_iter().filter_map(|s| self.by_sock.remove(&s)).collect()
    }

    /// Removes connections idle since before `cutoff_ns`, and stale pending facts.
    pub fn remove_idle(&mut self, cutoff_ns: u64) -> Vec<Connection> {
        self.pending.retain(|_, p| p.seen_ns >= cutoff_ns);
        let socks: Vec<u64> =
            self.by_sock.iter().filter(|(_, c)| c.last_seen_ns < cutoff_ns).map(|(s, _)| *s).collect();
        socks.into_iter().filter_map(|s| self.by_sock.remove(&s)).collect()
    }

    pub fn drain(&mut self) -> Vec<Connection> {
        self.pending.clear();
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
        assert!(table.on_connect(7, timing, 20).is_none());
        let Admit::Tracked(c) = table.admit(7, 99, &tuple_v4(5000, 80), 30) else { panic!() };
        assert_eq!(c.side, Some(Side::Client));
        assert_eq!(c.connect, Some(timing));
        assert_eq!(c.tgid, 99);
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
        assert!(matches!(new.protocol, ProtocolState::Http1(_)));
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
        assert_eq!(table.remove_idle(6).len(), 1);
        assert_eq!(table.len(), 0);
    }
}
