//! End-to-end gRPC tests: the real agent traces unmodified gRPC programs
//! (Debian's python3-grpcio over h2c and over TLS on the system OpenSSL;
//! Node's @grpc/grpc-js over TLS) on loopback and exports to a real Rotel.
//!
//! The contract these tests hold the agent to (issue 12, OpenTelemetry RPC
//! conventions):
//! - one span per call (per stream), named `demo.Greeter/METHOD`, kind
//!   SERVER in the server process and CLIENT in the client process, with
//!   `rpc.system`=`grpc`, `rpc.service`=`demo.Greeter`, `rpc.method`,
//!   `rpc.grpc.status_code` (int, from the trailers), `server.address`,
//!   `server.port`, `network.peer.address`, `network.peer.port`;
//! - status: a client span is ERROR for any code but OK; a server span only
//!   for UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
//!   DATA_LOSS (so NOT_FOUND: client ERROR, server not; UNIMPLEMENTED: both);
//! - both ends on this node: the server span is the child of its client span;
//! - a server-streaming call is one span that ends with the trailers;
//! - 50 concurrent calls on one channel give 50 client and 50 server spans,
//!   each server span the child of its own client span;
//! - `grpc-message` and message payloads are never exported;
//! - a channel opened before the agent started gives one span per call made
//!   after, never with a wrong method (unknown HPACK state is marked
//!   `periscope.incomplete`=`hpack_state`);
//! - `periscope disable grpc` stops gRPC spans, `enable grpc` brings them back.
//!
//! Each test starts its own Rotel, agent and programs, and stops them all;
//! spans are attributed by the pids of the programs the test started. Run
//! them one at a time (`cargo xtask test` does): each agent traces the whole
//! host.

use periscope_tests::control::{ControlSocket, now_ns};
use periscope_tests::grpc::{
    ERROR_MARK, GrpcRun, GrpcServer, GrpcTls, PAYLOAD_MARK, PythonClient, SERVER_ERROR_CODES,
    SERVICE, node_client, python_client,
};
use periscope_tests::*;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
/// How long spans may take to reach Rotel (agent batching + Rotel's 200 ms batch).
const SPAN_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for spans that should *not* come, after the expected ones.
const SETTLE: Duration = Duration::from_millis(1500);
/// "Changes apply within a second" (DESIGN.md).
const APPLY: Duration = Duration::from_millis(1200);
const LOOPBACK: &str = "127.0.0.1";

fn short(s: &Span) -> String {
    format!(
        "{:?} {} [{} pid {}] span {} code {:?}",
        s.kind,
        s.name,
        s.service_name().unwrap_or("?"),
        s.pid().map(|p| p.to_string()).unwrap_or("?".into()),
        s.span_id,
        s.int_attr("rpc.grpc.status_code")
    )
}

/// Any span that says it is gRPC (by attribute or by name).
fn is_grpc(s: &Span) -> bool {
    s.str_attr("rpc.system") == Some("grpc") || s.name.starts_with(&format!("{SERVICE}/"))
}

fn grpc_of(s: &Span, kind: SpanKind, pid: u32) -> bool {
    s.kind == kind && s.pid() == Some(pid) && is_grpc(s)
}

fn method_of(s: &Span) -> Option<&str> {
    s.str_attr("rpc.method")
}

/// What every complete gRPC span must carry.
fn expect_grpc(
    e: &mut Expect,
    s: &Span,
    kind: SpanKind,
    method: &str,
    code: i64,
    server_port: u16,
) {
    let name = format!("{SERVICE}/{method}");
    e.that(s.kind == kind, || {
        format!("{}: kind {:?}, want {kind:?}", short(s), s.kind)
    });
    e.that(s.name == name, || {
        format!("{}: name {:?}, want {name:?}", short(s), s.name)
    });
    e.attr_str(s, "rpc.system", "grpc");
    e.attr_str(s, "rpc.service", SERVICE);
    e.attr_str(s, "rpc.method", method);
    e.attr_int(s, "rpc.grpc.status_code", code);
    e.attr_str(s, "server.address", LOOPBACK);
    e.attr_int(s, "server.port", server_port as i64);
    e.attr_str(s, "network.peer.address", LOOPBACK);
    match kind {
        SpanKind::Client => e.attr_int(s, "network.peer.port", server_port as i64),
        _ => e.attr_present(s, "network.peer.port"),
    }
    e.attr_absent(s, "periscope.incomplete");
    let error = match kind {
        SpanKind::Client => code != 0,
        _ => SERVER_ERROR_CODES.contains(&code),
    };
    e.status(s, error);
}

/// The server span is the child of the client span, in its trace.
fn expect_child(e: &mut Expect, client: &Span, server: &Span) {
    e.that(
        server.parent_span_id.as_deref() == Some(client.span_id.as_str())
            && server.trace_id == client.trace_id,
        || {
            format!(
                "{}: trace {} parent {:?}, want the child of client span {} (trace {})",
                short(server),
                server.trace_id,
                server.parent_span_id,
                client.span_id,
                client.trace_id
            )
        },
    );
}

/// No attribute, name or status message holds a payload or `grpc-message`.
fn expect_nothing_leaked(e: &mut Expect, spans: &[Span]) {
    for s in spans {
        for k in s.attributes.keys() {
            e.that(
                !k.to_ascii_lowercase().contains("grpc-message") && !k.contains("grpc.message"),
                || format!("{}: exports attribute {k}", short(s)),
            );
        }
        for (k, v) in s.all_values() {
            for mark in [PAYLOAD_MARK, ERROR_MARK, "no such greeting"] {
                e.that(!v.contains(mark), || {
                    format!(
                        "{}: {k} = {v:?} leaks payload or grpc-message text {mark:?}",
                        short(s)
                    )
                });
            }
        }
    }
}

/// The client spans of `run` and the server spans of `server` for its
/// calls, once `n` of each arrived (and nothing more came for a while).
fn wait_pairs(
    rotel: &Rotel,
    run_pid: u32,
    server_pid: u32,
    n: usize,
) -> anyhow::Result<(Vec<Span>, Vec<Span>, Vec<Span>)> {
    rotel.try_wait_for_spans(|s| grpc_of(s, SpanKind::Client, run_pid), n, SPAN_WAIT)?;
    rotel.try_wait_for_spans(|s| grpc_of(s, SpanKind::Server, server_pid), n, SPAN_WAIT)?;
    let all = rotel.spans_after(SETTLE);
    let mut clients: Vec<Span> = all
        .iter()
        .filter(|s| grpc_of(s, SpanKind::Client, run_pid))
        .cloned()
        .collect();
    let mut servers: Vec<Span> = all
        .iter()
        .filter(|s| grpc_of(s, SpanKind::Server, server_pid))
        .cloned()
        .collect();
    clients.sort_by_key(|s| s.start_ns);
    servers.sort_by_key(|s| s.start_ns);
    Ok((clients, servers, all))
}

/// Unary OK, unary NOT_FOUND (trailers-only: client ERROR, server not),
/// a call to a method the server lacks (UNIMPLEMENTED: ERROR on both
/// sides), a server-streaming call of 5 messages 100 ms apart (one span
/// each side, lasting the whole stream) and 50 concurrent calls that each
/// take 200 ms in the server, all on one channel of one Python client.
fn python_calls(tls: bool) -> anyhow::Result<()> {
    let rotel = Rotel::start()?;
    let creds = if tls {
        Some(GrpcTls::generate()?)
    } else {
        None
    };
    // The server runs before the agent starts, like any daemon.
    let mut server = GrpcServer::python(creds.as_ref())?;
    let mut agent = Agent::start(&rotel.endpoint())?;

    let run = python_client(
        server.port(),
        creds.as_ref(),
        &[
            "hello:one",
            "notfound:two",
            "missing:three",
            "sleep:300",
            "stream:5,100",
            "sleep:300",
            "concurrent:50",
        ],
    )?;
    // The programs did what the test says (before any span is looked at).
    run.expect("hello:one", "OK", 1, "hello hi one")?;
    let nf = run.call("notfound:two")?;
    anyhow::ensure!(
        nf.code == "NOT_FOUND"
            && nf
                .details
                .as_deref()
                .is_some_and(|d| d.contains(ERROR_MARK)),
        "notfound call: {nf:?}"
    );
    let missing = run.call("missing:three")?;
    anyhow::ensure!(
        missing.code == "UNIMPLEMENTED",
        "call to a method the server lacks: {missing:?}"
    );
    let stream = run.expect("stream:5,100", "OK", 5, "hello #")?;
    let streamed_ms = match (stream.reply_ns.first(), stream.reply_ns.last()) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6,
        _ => 0.0,
    };
    anyhow::ensure!(
        streamed_ms >= 380.0,
        "the stream's replies came within {streamed_ms:.0} ms, want ~400"
    );
    let conc = run.expect("concurrent:50", "OK", 50, "hello slow")?;
    let (conc_start, conc_end) = (conc.start_ns.unwrap_or(0), conc.end_ns.unwrap_or(0));
    anyhow::ensure!(
        conc_end - conc_start < 2_000_000_000,
        "50 concurrent 200 ms calls took {} ms: they did not run concurrently",
        (conc_end - conc_start) / 1_000_000
    );
    server.check_running()?;
    let client_port = run.one_connection()?;

    const N: usize = 54;
    let (clients, servers, all) = wait_pairs(&rotel, run.pid, server.pid(), N)?;
    let mut e = Expect::new();
    e.that(clients.len() == N && servers.len() == N, || {
        format!(
            "{} gRPC client spans from pid {} and {} server spans from pid {}, want {N} each (1 OK + 1 NOT_FOUND + 1 UNIMPLEMENTED + 1 stream + 50 concurrent)",
            clients.len(),
            run.pid,
            servers.len(),
            server.pid()
        )
    });
    let by_id: HashMap<&str, &Span> = clients.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent_of = |s: &Span| {
        s.parent_span_id
            .as_deref()
            .and_then(|p| by_id.get(p).copied())
    };

    // Which call a client span is: by method and code, and for the OK
    // SayHello calls by time (the unary one came 700 ms before the 50).
    let split = stream.end_ns.unwrap_or(0);
    let hello_ok = |s: &Span| {
        method_of(s) == Some("SayHello") && s.int_attr("rpc.grpc.status_code") == Some(0)
    };
    let unary: Vec<&Span> = clients
        .iter()
        .filter(|s| hello_ok(s) && s.start_ns < split)
        .collect();
    let many: Vec<&Span> = clients
        .iter()
        .filter(|s| hello_ok(s) && s.start_ns >= split)
        .collect();
    let notfound: Vec<&Span> = clients
        .iter()
        .filter(|s| s.int_attr("rpc.grpc.status_code") == Some(5))
        .collect();
    let unimplemented: Vec<&Span> = clients
        .iter()
        .filter(|s| method_of(s) == Some("Missing"))
        .collect();
    let streams: Vec<&Span> = clients
        .iter()
        .filter(|s| method_of(s) == Some("StreamHellos"))
        .collect();
    let port = server.port();
    let py_name = system_python_exe_name();

    // Every server span is the child of a distinct client span and agrees
    // with it on method and code, and names the client's port as its peer.
    let mut reported_peer = Vec::new();
    let mut parents = HashSet::new();
    for s in &servers {
        if s.int_attr("network.peer.port") != Some(client_port as i64) && reported_peer.len() < 3 {
            reported_peer.push(format!(
                "{}: network.peer.port {:?}, want the client's port {client_port}",
                short(s),
                s.int_attr("network.peer.port")
            ));
        }
        match parent_of(s) {
            Some(c) => {
                expect_child(&mut e, c, s);
                e.that(parents.insert(c.span_id.clone()), || {
                    format!(
                        "{}: parent {} is shared with another server span",
                        short(s),
                        c.span_id
                    )
                });
                e.that(
                    method_of(s) == method_of(c)
                        && s.int_attr("rpc.grpc.status_code") == c.int_attr("rpc.grpc.status_code"),
                    || format!("{} disagrees with its client span {}", short(s), short(c)),
                );
            }
            None => e.fail(format!(
                "{}: parent {:?} is not one of the client's spans",
                short(s),
                s.parent_span_id
            )),
        }
    }
    for m in reported_peer {
        e.fail(m);
    }
    let child_of = |c: &Span| {
        servers
            .iter()
            .find(|s| s.parent_span_id.as_deref() == Some(c.span_id.as_str()))
    };

    e.that(unary.len() == 1, || {
        format!("{} spans for the unary OK call, want 1", unary.len())
    });
    e.that(notfound.len() == 1, || {
        format!("{} spans with code 5 (NOT_FOUND), want 1", notfound.len())
    });
    e.that(unimplemented.len() == 1, || {
        format!(
            "{} client spans for the Missing method, want 1",
            unimplemented.len()
        )
    });
    e.that(streams.len() == 1, || {
        format!(
            "{} StreamHellos client spans, want 1 (one span per stream)",
            streams.len()
        )
    });
    e.that(many.len() == 50, || {
        format!(
            "{} client spans for the 50 concurrent calls, want 50",
            many.len()
        )
    });
    for (c, method, code) in [
        (unary.first(), "SayHello", 0),
        (notfound.first(), "SayHello", 5),
        // UNIMPLEMENTED (12): an error on both sides.
        (unimplemented.first(), "Missing", 12),
        (streams.first(), "StreamHellos", 0),
    ] {
        let Some(c) = c else { continue };
        expect_grpc(&mut e, c, SpanKind::Client, method, code, port);
        e.res_str(c, "service.name", &py_name);
        match child_of(c) {
            Some(s) => {
                expect_grpc(&mut e, s, SpanKind::Server, method, code, port);
                e.res_str(s, "service.name", &py_name);
            }
            None => e.fail(format!("no server span is the child of {}", short(c))),
        }
    }
    // The stream ends with its trailers, after the last message.
    if let Some(c) = streams.first() {
        for sp in std::iter::once(*c).chain(child_of(c)) {
            e.that(sp.duration_ms() >= streamed_ms - 20.0, || {
                format!(
                    "{}: lasts {:.1} ms, but the server streamed for {streamed_ms:.1} ms: a stream's span ends at its trailers",
                    short(sp),
                    sp.duration_ms()
                )
            });
        }
    }
    // The 50: each took >= 200 ms on the server (it sleeps), each its own pair.
    let mut reported = 0;
    for c in &many {
        let mut one = Expect::new();
        expect_grpc(&mut one, c, SpanKind::Client, "SayHello", 0, port);
        match child_of(c) {
            Some(s) => {
                expect_grpc(&mut one, s, SpanKind::Server, "SayHello", 0, port);
                one.that(s.duration_ms() >= 190.0, || {
                    format!(
                        "{}: lasts {:.1} ms, but the server slept 200 ms in it",
                        short(s),
                        s.duration_ms()
                    )
                });
            }
            None => one.fail(format!("no server span is the child of {}", short(c))),
        }
        if !one.is_empty() && reported < 10 {
            reported += 1;
            e.fail(one.failures().join("; "));
        }
    }
    expect_nothing_leaked(&mut e, &all);
    agent.check_running()?;
    e.finish(&all)
}

/// 1. Python (Debian's grpcio) client and server over h2c.
#[test]
fn python_grpc_h2c() {
    run_test(LIMIT, || python_calls(false));
}

/// 2. The same over TLS (system OpenSSL, seen through the uprobes).
#[test]
fn python_grpc_tls() {
    run_test(LIMIT, || python_calls(true));
}

/// 3. A channel opened before the agent started: one call before, then the
///    agent starts, then on the SAME channel (connection) calls to the
///    method already called (its `:path` is in HPACK's dynamic table the
///    agent never saw), to a new method (sent literally), and to the old
///    one again. One span per call after the start on each side; none names
///    a wrong method (unknown fields are marked `hpack_state`); the new
///    method's spans are named correctly.
#[test]
fn grpc_channel_opened_before_the_agent() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let server = GrpcServer::python(None)?;
        let client = PythonClient::start_paused(
            server.port(),
            None,
            &["hello:before"],
            &[
                "hello:after1",
                "sleep:200",
                "goodbye:new",
                "sleep:200",
                "hello:after2",
            ],
        )?;
        let before = client.so_far()?;
        before.expect("hello:before", "OK", 1, "hello hi before")?;
        let client_pid = client.pid();
        let mut agent = Agent::start(&rotel.endpoint())?;
        let t_go = now_ns();
        let run = client.go()?;
        run.expect("hello:after1", "OK", 1, "hello hi after1")?;
        run.expect("goodbye:new", "OK", 1, "goodbye hi new")?;
        run.expect("hello:after2", "OK", 1, "hello hi after2")?;
        // The premise: every call, before and after, went over one connection.
        let port_before = before.one_connection()?;
        let port_after = run.one_connection()?;
        anyhow::ensure!(
            port_before == port_after,
            "the client's connection changed from local port {port_before} to {port_after}: not the same channel"
        );

        // Spans of this client and server, gRPC or not (a span whose method
        // could not be read may not say gRPC in its name).
        let of_client = |s: &Span| s.kind == SpanKind::Client && s.pid() == Some(client_pid);
        let of_server = |s: &Span| s.kind == SpanKind::Server && s.pid() == Some(server.pid());
        rotel.try_wait_for_spans(of_client, 3, SPAN_WAIT)?;
        rotel.try_wait_for_spans(of_server, 3, SPAN_WAIT)?;
        let all = rotel.spans_after(SETTLE);
        let mut e = Expect::new();
        let want = ["SayHello", "SayGoodbye", "SayHello"];
        for (side, pred) in [
            ("client", &of_client as &dyn Fn(&Span) -> bool),
            ("server", &of_server),
        ] {
            let mut spans: Vec<&Span> = all.iter().filter(|s| pred(s)).collect();
            spans.sort_by_key(|s| s.start_ns);
            e.that(spans.len() == want.len(), || {
                format!(
                    "{} {side} spans, want {} (one per call after the agent started)",
                    spans.len(),
                    want.len()
                )
            });
            for s in &spans {
                e.that(s.start_ns + 1_000_000_000 >= t_go, || {
                    format!("{}: starts before the calls after the agent started (the call before it must not give a span)", short(s))
                });
            }
            if spans.len() != want.len() {
                continue;
            }
            for (s, method) in spans.iter().zip(want) {
                let incomplete = s.str_attr("periscope.incomplete");
                let named = s.name == format!("{SERVICE}/{method}") && method_of(s) == Some(method);
                if method == "SayGoodbye" {
                    // A new method: `:path` is a literal, readable whatever the table.
                    e.that(named, || {
                        format!("{side}: {}: the new method's span must be named {SERVICE}/{method} with rpc.method {method}", short(s))
                    });
                } else {
                    e.that(named || incomplete == Some("hpack_state"), || {
                        format!(
                            "{side}: {}: want {SERVICE}/{method} or periscope.incomplete=hpack_state, got incomplete={incomplete:?}",
                            short(s)
                        )
                    });
                }
                // Never a wrong method, whatever else is missing.
                let wrong_name = s.name.starts_with(&format!("{SERVICE}/"))
                    && s.name != format!("{SERVICE}/{method}");
                let wrong_method = method_of(s).is_some_and(|m| m != method);
                e.that(!wrong_name && !wrong_method, || {
                    format!(
                        "{side}: {}: names a method other than {method} (rpc.method {:?})",
                        short(s),
                        method_of(s)
                    )
                });
                if let Some(code) = s.int_attr("rpc.grpc.status_code") {
                    e.that(code == 0, || {
                        format!(
                            "{side}: {}: status code {code}, every call was OK",
                            short(s)
                        )
                    });
                }
            }
        }
        expect_nothing_leaked(&mut e, &all);
        agent.check_running()?;
        e.finish(&all)
    });
}

/// 4. Node's @grpc/grpc-js client and server over TLS (OpenSSL inside
///    /usr/bin/node): a unary OK call and a NOT_FOUND one, each a client
///    span and its server child.
#[test]
fn node_grpc_js_tls() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let creds = GrpcTls::generate()?;
        let mut server = GrpcServer::node(&creds)?;
        let mut agent = Agent::start(&rotel.endpoint())?;
        let run = node_client(server.port(), &creds, &["hi", "notfound"])?;
        run.expect("hi", "OK", 1, "hello hi")?;
        let nf = run.call("notfound")?;
        anyhow::ensure!(nf.code == "NOT_FOUND", "notfound call: {nf:?}");
        server.check_running()?;

        let (clients, servers, all) = wait_pairs(&rotel, run.pid, server.pid(), 2)?;
        let mut e = Expect::new();
        e.that(clients.len() == 2 && servers.len() == 2, || {
            format!(
                "{} client and {} server gRPC spans, want 2 each",
                clients.len(),
                servers.len()
            )
        });
        for (code, label) in [(0, "OK"), (5, "NOT_FOUND")] {
            let c: Vec<&Span> = clients
                .iter()
                .filter(|s| s.int_attr("rpc.grpc.status_code") == Some(code))
                .collect();
            if !e.that(c.len() == 1, || {
                format!(
                    "{} client spans with code {code} ({label}), want 1",
                    c.len()
                )
            }) {
                continue;
            }
            expect_grpc(
                &mut e,
                c[0],
                SpanKind::Client,
                "SayHello",
                code,
                server.port(),
            );
            match servers
                .iter()
                .find(|s| s.parent_span_id.as_deref() == Some(c[0].span_id.as_str()))
            {
                Some(s) => {
                    expect_grpc(&mut e, s, SpanKind::Server, "SayHello", code, server.port());
                    expect_child(&mut e, c[0], s);
                }
                None => e.fail(format!("no server span is the child of {}", short(c[0]))),
            }
        }
        for s in clients.iter().chain(&servers) {
            e.res_str(s, "service.name", "node");
        }
        expect_nothing_leaked(&mut e, &all);
        agent.check_running()?;
        e.finish(&all)
    });
}

/// 5. `periscope disable grpc`: calls made while disabled give no gRPC span
///    (client or server); `enable grpc`: calls give their spans again. The
///    daemon keeps running throughout.
#[test]
fn disable_then_enable_grpc() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let server = GrpcServer::python(None)?;
        let ctl = ControlSocket::new()?;
        let mut agent = Agent::start_with(&rotel.endpoint(), ctl.agent_options())?;
        let mut e = Expect::new();
        let st = ctl.status()?;
        e.that(st.bool("features.grpc.available")?, || {
            format!("status says grpc is not available:\n{}", st.text)
        });
        anyhow::ensure!(
            st.feature_enabled("grpc")?,
            "grpc is not enabled at start:\n{}",
            st.text
        );
        let calls = |tag: &str| -> anyhow::Result<GrpcRun> {
            let steps = [
                format!("hello:{tag}1"),
                format!("hello:{tag}2"),
                format!("notfound:{tag}3"),
            ];
            let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
            let run = python_client(server.port(), None, &steps)?;
            run.expect(steps[0], "OK", 1, "hello")?;
            run.expect(steps[1], "OK", 1, "hello")?;
            anyhow::ensure!(
                run.call(steps[2])?.code == "NOT_FOUND",
                "{tag}: {:?}",
                run.calls
            );
            Ok(run)
        };

        // Enabled: traced.
        let before = calls("on")?;
        let traced = rotel
            .try_wait_for_spans(|s| grpc_of(s, SpanKind::Client, before.pid), 3, SPAN_WAIT)
            .and_then(|_| {
                rotel.try_wait_for_spans(
                    |s| grpc_of(s, SpanKind::Server, server.pid()),
                    3,
                    SPAN_WAIT,
                )
            });
        if let Err(err) = traced {
            e.fail(format!("before `disable grpc`: {err:#}"));
            return e.finish(&rotel.spans());
        }

        let out = ctl.ok(&["disable", "grpc"])?;
        e.that(out.contains("grpc disabled"), || {
            format!("`disable grpc` printed {out:?}, want \"grpc disabled\"")
        });
        let st = ctl.status()?;
        e.that(!st.feature_enabled("grpc")?, || {
            format!(
                "after `disable grpc`, status says grpc enabled:\n{}",
                st.text
            )
        });
        std::thread::sleep(APPLY);
        let t_off = now_ns();
        let off = calls("off")?;
        let t_off_end = now_ns();
        std::thread::sleep(Duration::from_millis(300));

        let out = ctl.ok(&["enable", "grpc"])?;
        e.that(out.contains("grpc enabled"), || {
            format!("`enable grpc` printed {out:?}, want \"grpc enabled\"")
        });
        let st = ctl.status()?;
        e.that(st.feature_enabled("grpc")?, || {
            format!(
                "after `enable grpc`, status says grpc disabled:\n{}",
                st.text
            )
        });
        std::thread::sleep(APPLY);
        let after = calls("again")?;

        let after_c =
            rotel.try_wait_for_spans(|s| grpc_of(s, SpanKind::Client, after.pid), 3, SPAN_WAIT);
        let after_s = rotel.try_wait_for_spans(
            |s| grpc_of(s, SpanKind::Server, server.pid()) && s.start_ns > t_off_end,
            3,
            SPAN_WAIT,
        );
        let all = rotel.spans_after(SETTLE);
        for (what, r) in [
            ("client spans after enable", after_c),
            ("server spans after enable", after_s),
        ] {
            if let Err(err) = r {
                e.fail(format!("{what}: {err:#}"));
            }
        }
        let off_client: Vec<&Span> = all
            .iter()
            .filter(|s| grpc_of(s, SpanKind::Client, off.pid))
            .collect();
        let off_server: Vec<&Span> = all
            .iter()
            .filter(|s| {
                grpc_of(s, SpanKind::Server, server.pid())
                    && s.start_ns >= t_off
                    && s.start_ns <= t_off_end
            })
            .collect();
        e.that(off_client.is_empty() && off_server.is_empty(), || {
            format!(
                "gRPC spans for calls made while grpc was disabled: {:?}",
                off_client
                    .iter()
                    .chain(&off_server)
                    .map(|s| short(s))
                    .collect::<Vec<_>>()
            )
        });
        for (label, run) in [("before disable", &before), ("after enable", &after)] {
            let n = all
                .iter()
                .filter(|s| grpc_of(s, SpanKind::Client, run.pid))
                .count();
            e.that(n == 3, || {
                format!(
                    "{label}: {n} gRPC client spans from pid {}, want 3",
                    run.pid
                )
            });
        }
        agent.check_running()?;
        e.that(ctl.status()?.pid()? == agent.pid(), || {
            "the daemon was restarted".into()
        });
        e.finish(&all)
    });
}
