//! Wire DNS lookups to spans (see the span contract, "DNS on the wire"):
//! one CLIENT span per lookup, named `DNS <QTYPE>`, from the first send of
//! the query to its response (or to the moment it was given up).

use std::net::SocketAddr;
use std::sync::Arc;

use super::clock::Clock;
use super::model::{Attribute, Resource, Span, SpanKind, SpanStatus};
use crate::protocols::dns::Lookup;

/// `error.type` of a lookup that got no response.
pub const TIMEOUT: &str = "timeout";

/// The span of one lookup. `peer` is the resolver the query went to;
/// `end_ns` (kernel monotonic) is the response time for an answered lookup
/// and the time it was given up (expiry, socket close, process exit) for an
/// unanswered one.
#[allow(clippy::too_many_arguments)]
pub fn build(
    lookup: &Lookup,
    peer: SocketAddr,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    resource: Arc<Resource>,
    clock: &Clock,
    end_ns: u64,
) -> Span {
    let mut attributes = Vec::with_capacity(13);
    attributes.push(Attribute::str(
        "dns.question.name",
        lookup.question.name.clone(),
    ));
    attributes.push(Attribute::str(
        "periscope.dns.question.type",
        lookup.question.qtype.clone(),
    ));
    let peer_ip = peer.ip().to_string();
    attributes.push(Attribute::str(
        "network.transport",
        lookup.transport.as_str(),
    ));
    attributes.push(Attribute::str("server.address", peer_ip.clone()));
    attributes.push(Attribute::int("server.port", i64::from(peer.port())));
    attributes.push(Attribute::str("network.peer.address", peer_ip));
    attributes.push(Attribute::int("network.peer.port", i64::from(peer.port())));
    attributes.push(Attribute::int(
        "periscope.dns.attempts",
        i64::from(lookup.attempts),
    ));
    let status = match &lookup.response {
        Some(answer) => {
            attributes.push(Attribute::str(
                "periscope.dns.response_code",
                answer.rcode.clone(),
            ));
            if !answer.addresses.is_empty() {
                attributes.push(Attribute::str_array(
                    "dns.answers",
                    answer.addresses.iter().map(|a| a.to_string()).collect(),
                ));
            }
            if answer.truncated {
                attributes.push(Attribute::bool("periscope.dns.truncated", true));
            }
            if answer.rcode == "NOERROR" {
                SpanStatus::Unset
            } else {
                attributes.push(Attribute::str("error.type", answer.rcode.clone()));
                SpanStatus::Error {
                    message: format!("DNS response {}", answer.rcode),
                }
            }
        }
        None => {
            attributes.push(Attribute::str("error.type", TIMEOUT));
            SpanStatus::Error {
                message: "no DNS response".to_string(),
            }
        }
    };
    Span {
        trace_id,
        span_id,
        parent_span_id,
        name: format!("DNS {}", lookup.question.qtype).into(),
        kind: SpanKind::Client,
        start_unix_nano: clock.to_unix_nanos(lookup.first_query_ns),
        end_unix_nano: clock.to_unix_nanos(end_ns.max(lookup.first_query_ns)),
        attributes,
        status,
        resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::dns::{Answer, Question, Transport};
    use crate::spans::model::AttrValue;
    use std::net::IpAddr;

    fn resource() -> Arc<Resource> {
        Arc::new(Resource {
            pid: 42,
            attributes: vec![Attribute::str("service.name", "curl")],
        })
    }

    fn lookup(response: Option<Answer>) -> Lookup {
        Lookup {
            sock: 1,
            tgid: 42,
            tid: 43,
            id: 0x8a1f,
            transport: Transport::Udp,
            question: Question {
                name: "example.com".into(),
                qtype: "A".into(),
            },
            first_query_ns: 1_000_000,
            last_query_ns: 1_000_000,
            attempts: 1,
            response,
            peer: None,
        }
    }

    fn answer(rcode: &str, addresses: Vec<IpAddr>) -> Answer {
        Answer {
            ts_ns: 3_500_000,
            rcode: rcode.into(),
            addresses,
            truncated: false,
        }
    }

    fn keys(span: &Span) -> Vec<&str> {
        span.attributes.iter().map(|a| a.key.as_ref()).collect()
    }

    const TRACE: [u8; 16] = [7; 16];
    const SPAN: [u8; 8] = [9; 8];

    #[test]
    fn answered_lookup() {
        let clock = Clock::new();
        let resolver: SocketAddr = "127.0.0.53:53".parse().unwrap();
        let l = lookup(Some(answer(
            "NOERROR",
            vec![
                "93.184.215.14".parse().unwrap(),
                "2606:2800::1".parse().unwrap(),
            ],
        )));
        let span = build(
            &l,
            resolver,
            TRACE,
            SPAN,
            Some([1; 8]),
            resource(),
            &clock,
            3_500_000,
        );
        assert_eq!(span.name, "DNS A");
        assert_eq!(span.kind, SpanKind::Client);
        assert_eq!(
            (span.trace_id, span.span_id, span.parent_span_id),
            (TRACE, SPAN, Some([1; 8]))
        );
        assert_eq!(span.end_unix_nano - span.start_unix_nano, 2_500_000);
        assert_eq!(span.start_unix_nano, clock.to_unix_nanos(1_000_000));
        assert_eq!(span.status, SpanStatus::Unset);
        assert_eq!(span.resource.pid, 42);
        assert_eq!(
            keys(&span),
            [
                "dns.question.name",
                "periscope.dns.question.type",
                "network.transport",
                "server.address",
                "server.port",
                "network.peer.address",
                "network.peer.port",
                "periscope.dns.attempts",
                "periscope.dns.response_code",
                "dns.answers",
            ]
        );
        assert_eq!(
            span.attr("dns.question.name"),
            Some(&AttrValue::Str("example.com".into()))
        );
        assert_eq!(
            span.attr("periscope.dns.question.type"),
            Some(&AttrValue::Str("A".into()))
        );
        assert_eq!(
            span.attr("network.transport"),
            Some(&AttrValue::Str("udp".into()))
        );
        assert_eq!(
            span.attr("server.address"),
            Some(&AttrValue::Str("127.0.0.53".into()))
        );
        assert_eq!(
            span.attr("network.peer.address"),
            Some(&AttrValue::Str("127.0.0.53".into()))
        );
        assert_eq!(span.attr("server.port"), Some(&AttrValue::Int(53)));
        assert_eq!(span.attr("network.peer.port"), Some(&AttrValue::Int(53)));
        assert_eq!(
            span.attr("periscope.dns.attempts"),
            Some(&AttrValue::Int(1))
        );
        assert_eq!(
            span.attr("periscope.dns.response_code"),
            Some(&AttrValue::Str("NOERROR".into()))
        );
        assert_eq!(
            span.attr("dns.answers"),
            Some(&AttrValue::StrArray(vec![
                "93.184.215.14".into(),
                "2606:2800::1".into()
            ]))
        );
    }

    #[test]
    fn nxdomain_is_an_error_without_answers() {
        let mut l = lookup(Some(answer("NXDOMAIN", vec![])));
        l.question.qtype = "AAAA".into();
        l.attempts = 2;
        let span = build(
            &l,
            "[2001:4860:4860::8888]:53".parse().unwrap(),
            TRACE,
            SPAN,
            None,
            resource(),
            &Clock::new(),
            3_500_000,
        );
        assert_eq!(span.name, "DNS AAAA");
        assert_eq!(span.parent_span_id, None);
        assert_eq!(
            span.attr("error.type"),
            Some(&AttrValue::Str("NXDOMAIN".into()))
        );
        assert!(matches!(span.status, SpanStatus::Error { .. }));
        assert_eq!(span.attr("dns.answers"), None);
        assert_eq!(
            span.attr("periscope.dns.attempts"),
            Some(&AttrValue::Int(2))
        );
        assert_eq!(
            span.attr("server.address"),
            Some(&AttrValue::Str("2001:4860:4860::8888".into()))
        );
        for code in ["SERVFAIL", "REFUSED", "RCODE12"] {
            let span = build(
                &lookup(Some(answer(code, vec![]))),
                "10.0.0.2:53".parse().unwrap(),
                TRACE,
                SPAN,
                None,
                resource(),
                &Clock::new(),
                0,
            );
            assert_eq!(span.attr("error.type"), Some(&AttrValue::Str(code.into())));
            assert_eq!(
                span.status,
                SpanStatus::Error {
                    message: format!("DNS response {code}")
                }
            );
        }
    }

    #[test]
    fn timeout_ends_when_given_up() {
        let mut l = lookup(None);
        l.attempts = 3;
        l.last_query_ns = 11_000_000;
        let clock = Clock::new();
        let span = build(
            &l,
            "10.0.0.2:53".parse().unwrap(),
            TRACE,
            SPAN,
            None,
            resource(),
            &clock,
            16_000_000,
        );
        assert_eq!(
            span.attr("error.type"),
            Some(&AttrValue::Str("timeout".into()))
        );
        assert_eq!(span.attr("periscope.dns.response_code"), None);
        assert_eq!(span.attr("dns.answers"), None);
        assert_eq!(
            span.attr("periscope.dns.attempts"),
            Some(&AttrValue::Int(3))
        );
        assert!(matches!(span.status, SpanStatus::Error { .. }));
        assert_eq!(span.end_unix_nano, clock.to_unix_nanos(16_000_000));
        // An end before the start (clock skew between CPUs) is clamped.
        let span = build(
            &l,
            "10.0.0.2:53".parse().unwrap(),
            TRACE,
            SPAN,
            None,
            resource(),
            &clock,
            5,
        );
        assert_eq!(span.end_unix_nano, span.start_unix_nano);
    }

    #[test]
    fn truncated_and_tcp() {
        let mut a = answer("NOERROR", vec![]);
        a.truncated = true;
        let mut l = lookup(Some(a));
        let span = build(
            &l,
            "10.0.0.2:53".parse().unwrap(),
            TRACE,
            SPAN,
            None,
            resource(),
            &Clock::new(),
            3_500_000,
        );
        assert_eq!(
            span.attr("periscope.dns.truncated"),
            Some(&AttrValue::Bool(true))
        );
        assert_eq!(span.status, SpanStatus::Unset);
        l.transport = Transport::Tcp;
        l.response = Some(answer("NOERROR", vec![]));
        let span = build(
            &l,
            "10.0.0.2:53".parse().unwrap(),
            TRACE,
            SPAN,
            None,
            resource(),
            &Clock::new(),
            3_500_000,
        );
        assert_eq!(
            span.attr("network.transport"),
            Some(&AttrValue::Str("tcp".into()))
        );
        assert_eq!(span.attr("periscope.dns.truncated"), None);
    }
}
