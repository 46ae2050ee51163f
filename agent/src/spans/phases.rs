//! Where a request's time went: its latency split into phases that tile the
//! span, like curl's `-w` timings. Each phase ends at a measured kernel event
//! (getaddrinfo returned, ESTABLISHED, handshake done, last request byte
//! written, first response byte read, last response byte read) and starts
//! where the previous phase ended, so phases never overlap and add up to the
//! span. The few microseconds an application spends between two events (say,
//! between getaddrinfo returning and calling connect) count toward the next
//! phase, as they do in curl's figures.
//!
//! Phases that did not happen for a request (a reused keep-alive connection
//! has no connect or handshake) are absent, not zero.

/// The phase names, in the order they happen.
pub mod name {
    pub const DNS: &str = "dns";
    pub const CONNECT: &str = "connect";
    pub const TLS_HANDSHAKE: &str = "tls.handshake";
    pub const REQUEST_SEND: &str = "request.send";
    pub const SERVER: &str = "server";
    pub const RESPONSE_RECEIVE: &str = "response.receive";
    pub const REQUEST_RECEIVE: &str = "request.receive";
    pub const HANDLER: &str = "handler";
    pub const RESPONSE_SEND: &str = "response.send";
}

/// The attribute that carries a phase's duration on its request's span
/// (every span has these; child spans only where [`PhaseSpans`] says).
pub fn duration_key(phase: &str) -> &'static str {
    match phase {
        name::DNS => "periscope.phase.dns.duration_ns",
        name::CONNECT => "periscope.phase.connect.duration_ns",
        name::TLS_HANDSHAKE => "periscope.phase.tls.handshake.duration_ns",
        name::REQUEST_SEND => "periscope.phase.request.send.duration_ns",
        name::SERVER => "periscope.phase.server.duration_ns",
        name::RESPONSE_RECEIVE => "periscope.phase.response.receive.duration_ns",
        name::REQUEST_RECEIVE => "periscope.phase.request.receive.duration_ns",
        name::HANDLER => "periscope.phase.handler.duration_ns",
        name::RESPONSE_SEND => "periscope.phase.response.send.duration_ns",
        _ => "periscope.phase.other.duration_ns",
    }
}

/// Default of [`PhaseSpans::min_duration_ns`]: a request this slow gets its
/// phases as a waterfall of child spans.
pub const DEFAULT_PHASE_SPANS_MIN_NS: u64 = 100_000_000;

/// When a request's phases become child spans (a waterfall in the backend)
/// rather than only duration attributes on its span: when it took at least
/// `min_duration_ns`, or failed. Fast, healthy requests, the bulk of a busy
/// node's traffic, then cost one span each instead of four to seven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseSpans {
    pub min_duration_ns: u64,
}

impl Default for PhaseSpans {
    fn default() -> Self {
        Self { min_duration_ns: DEFAULT_PHASE_SPANS_MIN_NS }
    }
}

impl PhaseSpans {
    pub fn wanted(&self, duration_ns: u64, failed: bool) -> bool {
        failed || duration_ns >= self.min_duration_ns
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phase {
    pub name: &'static str,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// What was measured for one client request (kernel monotonic ns).
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientTimings {
    /// The name lookup that led to this connection: (start, end).
    pub dns: Option<(u64, u64)>,
    /// SYN sent, ESTABLISHED (first request on a connection this process opened).
    pub connect: Option<(u64, u64)>,
    /// First handshake call, handshake done (first request on a TLS connection).
    pub handshake: Option<(u64, u64)>,
    /// The first request byte started leaving / the last one was written.
    pub request_start_ns: u64,
    pub request_end_ns: u64,
    /// First and last response byte read, if a response came.
    pub response_start_ns: Option<u64>,
    pub response_end_ns: Option<u64>,
}

/// What was measured for one request a server answered.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerTimings {
    pub request_start_ns: u64,
    pub request_end_ns: u64,
    /// The response started being written / its last byte was written.
    pub response_start_ns: Option<u64>,
    pub response_end_ns: Option<u64>,
}

/// Appends phases that tile `[first start, last end]`, from (name, first
/// measured start, measured end) steps: a step starts where the previous
/// one ended (its own start only for the first step), and an end earlier
/// than that start is moved up to it.
fn tile(steps: &[Option<(&'static str, u64, u64)>], out: &mut Vec<Phase>) {
    let mut cursor: Option<u64> = None;
    for &(name, start, end) in steps.iter().flatten() {
        let start = cursor.unwrap_or(start);
        let end = end.max(start);
        out.push(Phase { name, start_ns: start, end_ns: end });
        cursor = Some(end);
    }
}

/// The phases of a client request, in order.
pub fn client(t: &ClientTimings, out: &mut Vec<Phase>) {
    let steps = [
        t.dns.map(|(s, e)| (name::DNS, s, e)),
        t.connect.map(|(s, e)| (name::CONNECT, s, e)),
        t.handshake.map(|(s, e)| (name::TLS_HANDSHAKE, s, e)),
        Some((name::REQUEST_SEND, t.request_start_ns, t.request_end_ns)),
        t.response_start_ns.map(|first| (name::SERVER, t.request_end_ns, first)),
        t.response_start_ns.zip(t.response_end_ns).map(|(first, last)| (name::RESPONSE_RECEIVE, first, last)),
    ];
    tile(&steps, out);
}

/// A server's phases are worth their spans only when moving the request or
/// the response took time: otherwise `handler` is the whole span and the
/// split says nothing the server span does not.
pub const SERVER_TRANSFER_WORTH_NS: u64 = 1_000_000;

/// The phases of a request a server answered, in order; none when reading
/// the request and writing the response each took less than
/// [`SERVER_TRANSFER_WORTH_NS`].
pub fn server(t: &ServerTimings, out: &mut Vec<Phase>) {
    let receive = t.request_end_ns.saturating_sub(t.request_start_ns);
    let send = match (t.response_start_ns, t.response_end_ns) {
        (Some(first), Some(last)) => last.saturating_sub(first),
        _ => 0,
    };
    if receive < SERVER_TRANSFER_WORTH_NS && send < SERVER_TRANSFER_WORTH_NS {
        return;
    }
    let steps = [
        Some((name::REQUEST_RECEIVE, t.request_start_ns, t.request_end_ns)),
        t.response_start_ns.map(|first| (name::HANDLER, t.request_end_ns, first)),
        t.response_start_ns.zip(t.response_end_ns).map(|(first, last)| (name::RESPONSE_SEND, first, last)),
    ];
    tile(&steps, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(p: &[Phase]) -> Vec<&str> {
        p.iter().map(|p| p.name).collect()
    }

    #[test]
    fn first_request_has_every_phase_tiled() {
        let t = ClientTimings {
            dns: Some((100, 300)),
            connect: Some((310, 400)),
            handshake: Some((420, 900)),
            request_start_ns: 910,
            request_end_ns: 950,
            response_start_ns: Some(1500),
            response_end_ns: Some(1600),
        };
        let mut p = Vec::new();
        client(&t, &mut p);
        assert_eq!(names(&p), ["dns", "connect", "tls.handshake", "request.send", "server", "response.receive"]);
        assert_eq!(p[0].start_ns, 100);
        assert_eq!(p[1], Phase { name: "connect", start_ns: 300, end_ns: 400 });
        assert_eq!(p[3], Phase { name: "request.send", start_ns: 900, end_ns: 950 });
        assert_eq!(p[5].end_ns, 1600);
        for w in p.windows(2) {
            assert_eq!(w[0].end_ns, w[1].start_ns);
        }
    }

    #[test]
    fn reused_connection_has_no_dns_connect_or_handshake() {
        let t = ClientTimings {
            request_start_ns: 10,
            request_end_ns: 20,
            response_start_ns: Some(50),
            response_end_ns: Some(60),
            ..Default::default()
        };
        let mut p = Vec::new();
        client(&t, &mut p);
        assert_eq!(names(&p), ["request.send", "server", "response.receive"]);
        assert_eq!(p[0].start_ns, 10);
    }

    #[test]
    fn no_response_stops_after_send() {
        let t = ClientTimings { request_start_ns: 10, request_end_ns: 20, ..Default::default() };
        let mut p = Vec::new();
        client(&t, &mut p);
        assert_eq!(names(&p), ["request.send"]);
        // A server split is only made when a transfer took time.
        let mut s = Vec::new();
        server(&ServerTimings { request_start_ns: 5, request_end_ns: 9, response_start_ns: Some(30), response_end_ns: Some(31) }, &mut s);
        assert!(s.is_empty());
        let slow_send = ServerTimings {
            request_start_ns: 5,
            request_end_ns: 9,
            response_start_ns: Some(30),
            response_end_ns: Some(30 + SERVER_TRANSFER_WORTH_NS),
        };
        server(&slow_send, &mut s);
        assert_eq!(names(&s), ["request.receive", "handler", "response.send"]);
        assert_eq!(s[1], Phase { name: "handler", start_ns: 9, end_ns: 30 });
    }

    proptest! {
        /// Whatever the measurements (even out of order), phases never
        /// overlap, never run backwards, and cover first start to last end.
        #[test]
        fn phases_tile(
            dns in proptest::option::of((0u64..1000, 0u64..1000)),
            connect in proptest::option::of((0u64..1000, 0u64..1000)),
            hs in proptest::option::of((0u64..1000, 0u64..1000)),
            rs in 0u64..1000, re in 0u64..1000,
            resp in proptest::option::of((0u64..1000, proptest::option::of(0u64..1000))),
        ) {
            let t = ClientTimings {
                dns, connect, handshake: hs,
                request_start_ns: rs, request_end_ns: re,
                response_start_ns: resp.map(|r| r.0),
                response_end_ns: resp.and_then(|r| r.1),
            };
            let mut p = Vec::new();
            client(&t, &mut p);
            prop_assert!(!p.is_empty());
            for ph in &p {
                prop_assert!(ph.end_ns >= ph.start_ns);
            }
            for w in p.windows(2) {
                prop_assert_eq!(w[0].end_ns, w[1].start_ns);
            }
            let total: u64 = p.iter().map(|ph| ph.end_ns - ph.start_ns).sum();
            prop_assert_eq!(total, p[p.len() - 1].end_ns - p[0].start_ns);
        }
    }
}
