//! Name resolutions and what they led to. A `getaddrinfo` call (from the
//! libc uprobe) claims the wire lookups its thread made while it ran; a
//! connection the same process opens shortly after, to an address the
//! resolution returned, takes it as its `dns` phase. Resolutions and lookups
//! that nothing takes within the hold time are exported on their own.
//!
//! Everything here is bounded; what a full table pushes out is exported at
//! once, unlinked, and counted by the caller.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

use super::clock::Clock;
use super::model::{Attribute, Resource, Span, SpanKind, SpanStatus};
use crate::protocols::dns::Lookup;

/// How long a resolution waits for the connection it led to, and a wire
/// lookup for the getaddrinfo call that made it.
pub const HOLD_NS: u64 = 2_000_000_000;
/// Wire lookups of one resolver (A and AAAA sent together by a resolver that
/// is not getaddrinfo) belong together when they start this close.
const SIBLING_WINDOW_NS: u64 = 50_000_000;

/// A wire lookup (with the resolver it asked, `lookup.peer`) and when it
/// ended (response or given up).
#[derive(Clone, Debug)]
pub struct WireLookup {
    pub lookup: Lookup,
    pub end_ns: u64,
    /// The process, captured when the lookup ended (it may exit before the
    /// span is exported).
    pub resource: Arc<Resource>,
}

impl WireLookup {
    fn addresses(&self) -> &[IpAddr] {
        self.lookup.response.as_ref().map(|a| a.addresses.as_slice()).unwrap_or(&[])
    }
}

/// What one application lookup resolved.
#[derive(Clone, Debug)]
pub struct Resolution {
    pub tgid: u32,
    pub tid: u32,
    pub name: String,
    pub start_ns: u64,
    pub end_ns: u64,
    /// getaddrinfo's result; None when the resolution is wire lookups alone
    /// (a resolver other than libc's).
    pub gai_ret: Option<i32>,
    pub addresses: Vec<IpAddr>,
    /// The wire lookups it made, in order.
    pub lookups: Vec<WireLookup>,
    /// The process, captured when the call returned.
    pub resource: Arc<Resource>,
}

pub struct Resolutions {
    pending: VecDeque<(u64, Resolution)>,
    unclaimed: VecDeque<(u64, WireLookup)>,
    max: usize,
}

impl Resolutions {
    pub fn new(max: usize) -> Self {
        Self { pending: VecDeque::new(), unclaimed: VecDeque::new(), max }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len() + self.unclaimed.len()
    }

    /// A getaddrinfo call returned: it claims its thread's wire lookups made
    /// while it ran. Returns a resolution pushed out by the bound.
    pub fn on_getaddrinfo(&mut self, mut res: Resolution) -> Option<Resolution> {
        let mut i = 0;
        while i < self.unclaimed.len() {
            let l = &self.unclaimed[i].1.lookup;
            if l.tgid == res.tgid
                && l.tid == res.tid
                && l.first_query_ns >= res.start_ns
                && l.first_query_ns <= res.end_ns
            {
                if let Some((_, w)) = self.unclaimed.remove(i) {
                    res.lookups.push(w);
                }
            } else {
                i += 1;
            }
        }
        res.lookups.sort_by_key(|w| w.lookup.first_query_ns);
        let out = if self.pending.len() >= self.max { self.pending.pop_front().map(|(_, r)| r) } else { None };
        self.pending.push_back((res.end_ns.saturating_add(HOLD_NS), res));
        out
    }

    /// A wire lookup finished. Returns one pushed out by the bound.
    pub fn on_lookup(&mut self, w: WireLookup) -> Option<WireLookup> {
        let out = if self.unclaimed.len() >= self.max { self.unclaimed.pop_front().map(|(_, w)| w) } else { None };
        self.unclaimed.push_back((w.end_ns.saturating_add(HOLD_NS), w));
        out
    }

    /// When the not yet claimed lookups of one thread, begun in a window,
    /// were sent.
    pub fn query_starts(&self, tgid: u32, tid: u32, from_ns: u64, to_ns: u64) -> Vec<u64> {
        self.unclaimed
            .iter()
            .map(|(_, w)| &w.lookup)
            .filter(|l| l.tgid == tgid && l.tid == tid && l.first_query_ns >= from_ns && l.first_query_ns <= to_ns)
            .map(|l| l.first_query_ns)
            .collect()
    }

    /// The resolution that led process `tgid` to connect to `ip` (SYN sent at
    /// `syn_ns`): the latest one that returned `ip` before the SYN, from
    /// getaddrinfo, else from wire lookups alone.
    pub fn take_for_connect(&mut self, tgid: u32, ip: IpAddr, syn_ns: u64) -> Option<Resolution> {
        let found = self
            .pending
            .iter()
            .rposition(|(_, r)| r.tgid == tgid && r.end_ns <= syn_ns && r.addresses.contains(&ip));
        if let Some(i) = found {
            return self.pending.remove(i).map(|(_, r)| r);
        }
        let i = self.unclaimed.iter().rposition(|(_, w)| {
            w.lookup.tgid == tgid && w.end_ns <= syn_ns && w.addresses().contains(&ip)
        })?;
        let (_, chosen) = self.unclaimed.remove(i)?;
        let mut lookups = vec![chosen];
        let (tid, name, start) = {
            let c = &lookups[0].lookup;
            (c.tid, c.question.name.clone(), c.first_query_ns)
        };
        let mut j = 0;
        while j < self.unclaimed.len() {
            let w = &self.unclaimed[j].1;
            let l = &w.lookup;
            if l.tgid == tgid
                && l.tid == tid
                && l.question.name.eq_ignore_ascii_case(&name)
                && l.first_query_ns.abs_diff(start) <= SIBLING_WINDOW_NS
                && w.end_ns <= syn_ns
            {
                if let Some((_, w)) = self.unclaimed.remove(j) {
                    lookups.push(w);
                }
            } else {
                j += 1;
            }
        }
        lookups.sort_by_key(|w| w.lookup.first_query_ns);
        let start_ns = lookups.iter().map(|w| w.lookup.first_query_ns).min().unwrap_or(start);
        let end_ns = lookups.iter().map(|w| w.end_ns).max().unwrap_or(start);
        let resource = lookups[0].resource.clone();
        let mut addresses: Vec<IpAddr> = Vec::new();
        for w in &lookups {
            for a in w.addresses() {
                if !addresses.contains(a) {
                    addresses.push(*a);
                }
            }
        }
        Some(Resolution { tgid, tid, name, start_ns, end_ns, gai_ret: None, addresses, lookups, resource })
    }

    /// What waited past its hold time, to be exported on its own.
    pub fn expire(&mut self, now_ns: u64, resolutions: &mut Vec<Resolution>, lookups: &mut Vec<WireLookup>) {
        while self.pending.front().is_some_and(|(deadline, _)| *deadline <= now_ns) {
            if let Some((_, r)) = self.pending.pop_front() {
                resolutions.push(r);
            }
        }
        // Deadlines are in arrival order only roughly (lookups end out of
        // order), so look at all of them.
        let mut i = 0;
        while i < self.unclaimed.len() {
            if self.unclaimed[i].0 <= now_ns {
                if let Some((_, w)) = self.unclaimed.remove(i) {
                    lookups.push(w);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Everything still held (daemon stopping).
    pub fn drain(&mut self, resolutions: &mut Vec<Resolution>, lookups: &mut Vec<WireLookup>) {
        resolutions.extend(self.pending.drain(..).map(|(_, r)| r));
        lookups.extend(self.unclaimed.drain(..).map(|(_, w)| w));
    }
}

/// `error.type` for a getaddrinfo result code (glibc values).
pub fn eai_name(code: i32) -> &'static str {
    match code {
        -1 => "EAI_BADFLAGS",
        -2 => "EAI_NONAME",
        -3 => "EAI_AGAIN",
        -4 => "EAI_FAIL",
        -5 => "EAI_NODATA",
        -6 => "EAI_FAMILY",
        -7 => "EAI_SOCKTYPE",
        -8 => "EAI_SERVICE",
        -9 => "EAI_ADDRFAMILY",
        -10 => "EAI_MEMORY",
        -11 => "EAI_SYSTEM",
        -12 => "EAI_OVERFLOW",
        _ => "EAI_UNKNOWN",
    }
}

/// The span of a resolution: named `dns` when it is a request's dns phase,
/// `getaddrinfo` (or `dns` for wire lookups alone) when exported on its own.
/// Ids are filled in by the caller.
pub fn build(res: &Resolution, as_phase: bool, clock: &Clock) -> Span {
    let resource = res.resource.clone();
    let mut attributes = Vec::with_capacity(6);
    if as_phase {
        attributes.push(Attribute::str("periscope.phase", super::phases::name::DNS));
    }
    attributes.push(Attribute::str("dns.question.name", res.name.clone()));
    if !res.addresses.is_empty() {
        let mut answers: Vec<String> = Vec::with_capacity(res.addresses.len());
        for a in &res.addresses {
            let s = a.to_string();
            if !answers.contains(&s) {
                answers.push(s);
            }
        }
        attributes.push(Attribute::str_array("dns.answers", answers));
    }
    attributes.push(Attribute::str("periscope.dns.resolver", if res.gai_ret.is_some() { "getaddrinfo" } else { "wire" }));
    let status = match res.gai_ret {
        Some(0) | None => SpanStatus::Unset,
        Some(code) => {
            let name = eai_name(code);
            attributes.push(Attribute::str("error.type", name));
            SpanStatus::Error { message: format!("getaddrinfo failed: {name}") }
        }
    };
    let name = if as_phase || res.gai_ret.is_none() { "dns" } else { "getaddrinfo" };
    Span {
        trace_id: [0; 16],
        span_id: [0; 8],
        parent_span_id: None,
        name: name.into(),
        kind: SpanKind::Internal,
        start_unix_nano: clock.to_unix_nanos(res.start_ns),
        end_unix_nano: clock.to_unix_nanos(res.end_ns.max(res.start_ns)),
        attributes,
        status,
        resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::dns::{Answer, Question, Transport};

    fn lookup(tgid: u32, tid: u32, qtype: &str, start: u64, end: u64, addrs: &[&str]) -> WireLookup {
        WireLookup {
            lookup: Lookup {
                sock: 1,
                tgid,
                tid,
                id: 7,
                transport: Transport::Udp,
                question: Question { name: "www.example.test".into(), qtype: qtype.into() },
                first_query_ns: start,
                last_query_ns: start,
                attempts: 1,
                response: Some(Answer {
                    ts_ns: end,
                    rcode: "NOERROR".into(),
                    addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
                    truncated: false,
                }),
                peer: None,
            },
            end_ns: end,
            resource: Arc::new(Resource { pid: tgid, attributes: vec![] }),
        }
    }

    fn gai(tgid: u32, tid: u32, start: u64, end: u64, addrs: &[&str]) -> Resolution {
        Resolution {
            tgid,
            tid,
            name: "www.example.test".into(),
            start_ns: start,
            end_ns: end,
            gai_ret: Some(0),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            lookups: Vec::new(),
            resource: Arc::new(Resource { pid: tgid, attributes: vec![] }),
        }
    }

    #[test]
    fn getaddrinfo_claims_its_threads_lookups_and_links_to_the_connect() {
        let mut r = Resolutions::new(16);
        assert!(r.on_lookup(lookup(10, 11, "A", 110, 150, &["127.0.0.1"])).is_none());
        assert!(r.on_lookup(lookup(10, 11, "AAAA", 111, 152, &[])).is_none());
        assert!(r.on_lookup(lookup(10, 99, "A", 120, 130, &["127.0.0.1"])).is_none()); // another thread
        assert!(r.on_getaddrinfo(gai(10, 11, 100, 160, &["127.0.0.1"])).is_none());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(r.take_for_connect(11, ip, 200).is_none(), "another process");
        let res = r.take_for_connect(10, ip, 200).expect("linked");
        assert_eq!(res.lookups.len(), 2);
        assert_eq!(res.start_ns, 100);
        // The other thread's lookup is still there, and expires on its own.
        let (mut rs, mut ls) = (Vec::new(), Vec::new());
        r.expire(160 + HOLD_NS, &mut rs, &mut ls);
        assert_eq!(ls.len(), 1);
        assert!(rs.is_empty());
    }

    #[test]
    fn wire_lookups_alone_resolve_a_connect() {
        let mut r = Resolutions::new(16);
        r.on_lookup(lookup(10, 11, "A", 100, 140, &["10.0.0.5"]));
        r.on_lookup(lookup(10, 11, "AAAA", 101, 150, &[]));
        let res = r.take_for_connect(10, "10.0.0.5".parse().unwrap(), 300).expect("linked");
        assert_eq!(res.gai_ret, None);
        assert_eq!((res.start_ns, res.end_ns), (100, 150));
        assert_eq!(res.lookups.len(), 2);
        assert_eq!(r.len(), 0);
        // A connect before the answer, or to another address, does not link.
        r.on_lookup(lookup(10, 11, "A", 100, 140, &["10.0.0.5"]));
        assert!(r.take_for_connect(10, "10.0.0.5".parse().unwrap(), 120).is_none());
        assert!(r.take_for_connect(10, "10.0.0.6".parse().unwrap(), 300).is_none());
    }

    #[test]
    fn bounded() {
        let mut r = Resolutions::new(2);
        assert!(r.on_getaddrinfo(gai(1, 1, 0, 1, &[])).is_none());
        assert!(r.on_getaddrinfo(gai(2, 2, 0, 1, &[])).is_none());
        assert_eq!(r.on_getaddrinfo(gai(3, 3, 0, 1, &[])).map(|x| x.tgid), Some(1));
    }

    #[test]
    fn failed_getaddrinfo_span() {
        let mut res = gai(1, 1, 1_000, 2_000, &[]);
        res.gai_ret = Some(-2);
        let span = build(&res, false, &Clock::new());
        assert_eq!(span.name, "getaddrinfo");
        assert!(matches!(span.status, SpanStatus::Error { .. }));
        assert_eq!(span.attr("error.type"), Some(&super::super::model::AttrValue::Str("EAI_NONAME".into())));
    }
}
