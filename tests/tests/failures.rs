//! Calls that fail before any answer, with real clients and servers: the
//! agent makes an ERROR span of each, in the process that made the call.
//! - curl, Python and Node connecting to a closed port on loopback:
//!   `connect` spans with `error.type=connection_refused` (curl also to
//!   `localhost`: the name from its resolution, and the resolution under it);
//! - a connect whose SYN is dropped (iptables in a network namespace) that
//!   curl gives up on after 1 s: `connect_timeout`, about 1 s long;
//! - a server that resets the connection after reading the request
//!   (SO_LINGER 0): curl's request span is `connection_reset`; one that
//!   closes mid-response: `incomplete_response`;
//! - 10,000 refused connects in a few seconds: a handful of spans, the rest
//!   folded and counted, the agent's memory bounded.

use periscope_tests::clients::python;
use periscope_tests::control::ControlSocket;
use periscope_tests::proc::{Proc, free_port, run_capture, wait_for_port};
use periscope_tests::tls::NetNs;
use periscope_tests::*;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(150);
const SPAN_WAIT: Duration = Duration::from_secs(30);

fn connect_spans(rotel: &Rotel, pid: u32) -> Vec<Span> {
    rotel.spans().into_iter().filter(|s| s.pid() == Some(pid) && s.name == "connect").collect()
}

fn expect_failed_connect(e: &mut Expect, s: &Span, error_type: &str, port: u16) {
    e.that(s.kind == SpanKind::Client, || format!("{}: kind {:?}", s.name, s.kind));
    e.attr_str(s, "error.type", error_type);
    e.attr_int(s, "server.port", i64::from(port));
    e.attr_int(s, "network.peer.port", i64::from(port));
    e.status(s, true);
}

#[test]
fn refused_connects_from_curl_python_and_node_are_error_spans() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let mut agent = Agent::start(&rotel.endpoint())?;
        let port = free_port();
        let mut clients = Vec::new();
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}/")]);
        let run = run_capture("curl", &mut cmd, Duration::from_secs(20))?;
        anyhow::ensure!(!run.status.success(), "curl to a closed port succeeded");
        clients.push(("curl", run.pid));
        // By name, through getaddrinfo: Python tries each address of
        // localhost (::1, 127.0.0.1), one span per attempt.
        let by_name = python(
            "import socket, sys\ntry:\n    socket.create_connection(('localhost', int(sys.argv[1])))\nexcept ConnectionRefusedError:\n    print('refused')\n",
            &[&port.to_string()],
        )?;
        anyhow::ensure!(by_name.stdout.contains("refused"), "python by name: {}", by_name.stdout);
        clients.push(("python by name", by_name.pid));
        let py = python(
            "import socket, sys\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', int(sys.argv[1])))\nexcept ConnectionRefusedError:\n    print('refused')\n",
            &[&port.to_string()],
        )?;
        anyhow::ensure!(py.stdout.contains("refused"), "python: {}", py.stdout);
        clients.push(("python", py.pid));
        let mut node = Command::new("node");
        node.args([
            "-e",
            &format!(
                "require('net').connect({port}, '127.0.0.1').on('error', e => console.log(e.code))"
            ),
        ]);
        let node = run_capture("node", &mut node, Duration::from_secs(20))?;
        anyhow::ensure!(node.stdout.contains("ECONNREFUSED"), "node: {} {}", node.stdout, node.stderr);
        clients.push(("node", node.pid));
        let pids: Vec<u32> = clients.iter().map(|c| c.1).collect();
        rotel
            .try_wait_for_spans(|s| s.name == "connect" && s.pid().is_some_and(|p| pids.contains(&p)), clients.len(), SPAN_WAIT)
            .map_err(|e| anyhow::anyhow!("{e:#}\nagent log:\n{}", agent.log()))?;
        std::thread::sleep(Duration::from_secs(2));
        let mut e = Expect::new();
        for (i, (what, pid)) in clients.iter().enumerate() {
            let spans = connect_spans(&rotel, *pid);
            e.that(!spans.is_empty() && (i == 1 || spans.len() == 1), || {
                format!("{what} (pid {pid}): {} connect spans", spans.len())
            });
            for s in &spans {
                expect_failed_connect(&mut e, s, "connection_refused", port);
            }
            if i == 1 {
                // By name: every attempt names the server; the resolution
                // is the first attempt's child.
                for s in &spans {
                    e.attr_str(s, "server.address", "localhost");
                }
                let under = spans.iter().filter(|s| {
                    rotel.spans().iter().any(|c| c.parent_span_id.as_deref() == Some(s.span_id.as_str()))
                });
                e.that(under.count() == 1, || "python localhost: its resolution is not under exactly one attempt".into());
            }
        }
        agent.check_running()?;
        e.finish(&rotel.spans())
    });
}

#[test]
fn a_dropped_syn_is_a_connect_timeout_after_the_clients_own_timeout() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let _agent = Agent::start(&rotel.endpoint())?;
        let ns = NetNs::new()?;
        let mut ipt = ns.command("iptables");
        ipt.args(["-A", "OUTPUT", "-p", "tcp", "--syn", "-j", "DROP"]);
        run_capture("iptables", &mut ipt, Duration::from_secs(10))?.ok()?;
        let mut curl = ns.command("curl");
        curl.args(["-sS", "--connect-timeout", "1", "http://127.0.0.1:9/"]);
        let run = run_capture("curl", &mut curl, Duration::from_secs(20))?;
        anyhow::ensure!(run.stderr.contains("Timeout") || run.stderr.contains("timed out"), "curl: {}", run.stderr);
        rotel.try_wait_for_spans(|s| s.pid() == Some(run.pid) && s.name == "connect", 1, SPAN_WAIT)?;
        let spans = connect_spans(&rotel, run.pid);
        let mut e = Expect::new();
        e.that(spans.len() == 1, || format!("{} connect spans", spans.len()));
        for s in &spans {
            expect_failed_connect(&mut e, s, "connect_timeout", 9);
            let ms = s.duration_ms();
            e.that((900.0..1500.0).contains(&ms), || format!("connect_timeout span lasts {ms:.0} ms, want about 1000"));
        }
        e.finish(&rotel.spans())
    });
}

/// A Python server on `port` that reads one request, then does `then`.
fn python_server(port: u16, then: &str) -> anyhow::Result<Proc> {
    let script = format!(
        "import socket, struct, sys\n\
         l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('127.0.0.1', {port})); l.listen(8)\n\
         while True:\n    c, _ = l.accept(); c.recv(65536)\n    {then}\n"
    );
    let mut cmd = Command::new(periscope_tests::system_python()?);
    cmd.arg("-c").arg(script);
    let p = Proc::spawn("python-server", &mut cmd)?;
    anyhow::ensure!(wait_for_port(port, Duration::from_secs(10)), "the python server never listened");
    Ok(p)
}

#[test]
fn resets_and_cut_responses_fail_the_open_request() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let _agent = Agent::start(&rotel.endpoint())?;
        let reset_port = free_port();
        let _reset = python_server(
            reset_port,
            "c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); c.close()",
        )?;
        let cut_port = free_port();
        let _cut = python_server(
            cut_port,
            "c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 100\\r\\n\\r\\nshort'); c.close()",
        )?;
        let mut e = Expect::new();
        for (port, want) in [(reset_port, "connection_reset"), (cut_port, "incomplete_response")] {
            let mut cmd = Command::new("curl");
            cmd.args(["-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}/x")]);
            let run = run_capture("curl", &mut cmd, Duration::from_secs(20))?;
            anyhow::ensure!(!run.status.success(), "curl to the {want} server succeeded");
            rotel.try_wait_for_spans(|s| s.pid() == Some(run.pid) && s.kind == SpanKind::Client, 1, SPAN_WAIT)?;
            let spans: Vec<Span> =
                rotel.spans().into_iter().filter(|s| s.pid() == Some(run.pid) && s.kind == SpanKind::Client).collect();
            e.that(spans.len() == 1, || format!("{want}: {} client spans", spans.len()));
            for s in &spans {
                e.attr_str(s, "http.request.method", "GET");
                e.attr_str(s, "error.type", want);
                e.status(s, true);
            }
        }
        e.finish(&rotel.spans())
    });
}

#[test]
fn a_flood_of_refused_connects_is_folded_and_counted() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let socket = ControlSocket::new()?;
        let agent = Agent::start_with(&rotel.endpoint(), socket.agent_options())?;
        let rss = |pid: u32| -> u64 {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
                .unwrap_or(0)
        };
        let before_kib = rss(agent.pid());
        let port = free_port();
        let flood = python(
            "import socket, sys, time\nport = int(sys.argv[1])\nt = time.time()\nn = 0\nfor _ in range(10000):\n    s = socket.socket()\n    try:\n        s.connect(('127.0.0.1', port))\n    except ConnectionRefusedError:\n        n += 1\n    s.close()\nprint(n, time.time() - t)\n",
            &[&port.to_string()],
        )?;
        let refused: u64 = flood.stdout.split_whitespace().next().unwrap_or("0").parse().unwrap_or(0);
        anyhow::ensure!(refused == 10_000, "the flood was refused {refused} times: {}", flood.stdout);
        let seconds: f64 = flood.stdout.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0.0);
        let status = socket.wait_status("every failed connect counted", SPAN_WAIT, |s| {
            s.counter("failed_connect_spans").unwrap_or(0) + s.counter("failed_connects_folded").unwrap_or(0) >= 10_000
        })?;
        let spans = status.counter("failed_connect_spans")?;
        let folded = status.counter("failed_connects_folded")?;
        let after_kib = rss(agent.pid());
        let mut e = Expect::new();
        e.that(spans + folded == 10_000, || format!("{spans} spans + {folded} folded, want 10000"));
        // At most 10 a second per (process, destination), per window begun.
        let bound = 10 * (seconds.ceil() as u64 + 1);
        e.that(spans <= bound, || format!("{spans} spans for a {seconds:.1} s flood, want at most {bound}"));
        e.that(after_kib < before_kib + 64 * 1024, || format!("agent RSS grew from {before_kib} to {after_kib} KiB"));
        std::thread::sleep(Duration::from_secs(3));
        let received = rotel.spans().into_iter().filter(|s| s.pid() == Some(flood.pid) && s.name == "connect").count() as u64;
        e.that(received == spans, || format!("Rotel got {received} connect spans, the agent built {spans}"));
        let with_fold = rotel.spans().into_iter().filter(|s| s.pid() == Some(flood.pid) && s.int_attr("periscope.folded_count").is_some()).count();
        e.that(seconds < 1.0 || with_fold > 0, || "no span says how many failures it stands for".into());
        e.finish(&rotel.spans())
    });
}

/// A failed connect made while serving a request is that request's child:
/// nginx proxying to a port nobody listens on answers 502, and its refused
/// connect is under its server span.
#[test]
fn a_failed_connect_while_serving_is_the_requests_child() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let _agent = Agent::start(&rotel.endpoint())?;
        let down = free_port();
        let nginx = periscope_tests::Nginx::start_with(periscope_tests::NginxOptions {
            extra_locations: format!("location /down {{ proxy_pass http://127.0.0.1:{down}; }}"),
            ..Default::default()
        })?;
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", &nginx.url("/down")]);
        let run = run_capture("curl", &mut cmd, Duration::from_secs(20))?;
        anyhow::ensure!(run.stdout.trim() == "502", "nginx answered {}", run.stdout);
        let worker = nginx.worker_pid()?;
        rotel.try_wait_for_spans(|s| s.pid() == Some(worker) && s.name == "connect", 1, SPAN_WAIT)?;
        rotel.try_wait_for_spans(|s| s.pid() == Some(worker) && s.kind == SpanKind::Server, 1, SPAN_WAIT)?;
        let spans = rotel.spans();
        let connect = spans.iter().find(|s| s.pid() == Some(worker) && s.name == "connect");
        let server = spans.iter().find(|s| s.pid() == Some(worker) && s.kind == SpanKind::Server && s.str_attr("url.path") == Some("/down"));
        let mut e = Expect::new();
        if let (Some(c), Some(srv)) = (connect, server) {
            expect_failed_connect(&mut e, c, "connection_refused", down);
            e.that(c.parent_span_id.as_deref() == Some(srv.span_id.as_str()) && c.trace_id == srv.trace_id, || {
                format!("nginx's refused connect (parent {:?}) is not under its /down request ({})", c.parent_span_id, srv.span_id)
            });
            e.attr_int(srv, "http.response.status_code", 502);
        } else {
            e.that(false, || format!("connect span {connect:?}, server span {server:?}"));
        }
        e.finish(&spans)
    });
}

/// Handshakes that fail with a plaintext alert: curl refusing an untrusted
/// certificate over TLS 1.2 (it sends `unknown_ca`), and nginx refusing a
/// client that offers only TLS 1.2 when it speaks only 1.3 (it answers the
/// ClientHello with `protocol_version`). Both ends name the alert and who
/// sent it.
#[test]
fn plaintext_alerts_are_named_on_both_ends() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let _agent = Agent::start(&rotel.endpoint())?;
        let cert = periscope_tests::certs::TestCert::generate()?;
        use periscope_tests::tls::TlsVersion;
        // (server's only version, curl's extra arguments, curl's exit code,
        // alert, its sender, the version the spans carry)
        let cases: [(TlsVersion, &[&str], i32, &str, &str, Option<&str>); 2] = [
            (TlsVersion::Tls12, &[], 60, "unknown_ca", "client", Some("1.2")),
            (TlsVersion::Tls13, &["--tls-max", "1.2"], 35, "protocol_version", "server", None),
        ];
        let mut e = Expect::new();
        for (server_version, extra, exit, alert, sender, version) in cases {
            let nginx = periscope_tests::Nginx::start_with(periscope_tests::NginxOptions {
                tls: Some(periscope_tests::NginxTls::only(cert.cert(), cert.key(), server_version)),
                ..Default::default()
            })?;
            let mut cmd = Command::new("curl");
            // By name, so the ClientHello carries it (SNI): the spans'
            // server.address.
            let resolve = format!("localhost:{}:127.0.0.1", nginx.port());
            cmd.args(["-sS", "--max-time", "5", "--resolve", &resolve]).args(extra);
            cmd.arg(format!("https://localhost:{}/", nginx.port()));
            let run = run_capture("curl", &mut cmd, Duration::from_secs(20))?;
            anyhow::ensure!(run.status.code() == Some(exit), "curl {extra:?}: want exit {exit}: {:?} {}", run.status, run.stderr);
            let worker = nginx.worker_pid()?;
            let handshake = |pid: u32| move |s: &Span| s.pid() == Some(pid) && s.name == "tls.handshake";
            rotel.try_wait_for_spans(handshake(run.pid), 1, SPAN_WAIT)?;
            rotel.try_wait_for_spans(handshake(worker), 1, SPAN_WAIT)?;
            let spans = rotel.spans();
            for (pid, kind) in [(run.pid, SpanKind::Client), (worker, SpanKind::Server)] {
                let mine: Vec<&Span> = spans.iter().filter(|s| handshake(pid)(s)).collect();
                e.that(mine.len() == 1, || format!("{alert}: pid {pid}: {} tls.handshake spans", mine.len()));
                for s in mine {
                    e.that(s.kind == kind, || format!("{alert}: pid {pid}: kind {:?}, want {kind:?}", s.kind));
                    e.attr_str(s, "error.type", "tls_handshake_failed");
                    e.attr_str(s, "periscope.tls.alert", alert);
                    e.attr_str(s, "periscope.tls.alert.sender", sender);
                    e.attr_str(s, "server.address", "localhost");
                    e.status(s, true);
                    let message = format!("tls handshake failed: {alert} alert from the {sender}");
                    e.that(s.status.message == message, || {
                        format!("{alert}: pid {pid}: status message {:?}, want {message:?}", s.status.message)
                    });
                    match version {
                        Some(v) => e.attr_str(s, "tls.protocol.version", v),
                        None => {
                            e.that(s.attr("tls.protocol.version").is_none(), || {
                                format!("{alert}: pid {pid}: a version without a ServerHello: {s:?}")
                            });
                        }
                    }
                }
            }
        }
        e.finish(&rotel.spans())
    });
}

/// curl verifying the certificate of an nginx HTTPS server it does not
/// trust: the handshake fails on both ends, and each end has a
/// `tls.handshake` error span naming curl's `unknown_ca` alert.
#[test]
fn an_untrusted_certificate_fails_the_handshake_on_both_ends() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let _agent = Agent::start(&rotel.endpoint())?;
        let cert = periscope_tests::certs::TestCert::generate()?;
        let nginx = periscope_tests::Nginx::start_with(periscope_tests::NginxOptions {
            tls: Some(periscope_tests::NginxTls::only(
                cert.cert(),
                cert.key(),
                periscope_tests::tls::TlsVersion::Tls13,
            )),
            ..Default::default()
        })?;
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "5", &nginx.url("/")]);
        let run = run_capture("curl", &mut cmd, Duration::from_secs(20))?;
        anyhow::ensure!(run.status.code() == Some(60), "curl should refuse the certificate (exit 60): {:?} {}", run.status, run.stderr);
        let worker = nginx.worker_pid()?;
        let handshake = |pid: u32| move |s: &Span| s.pid() == Some(pid) && s.name == "tls.handshake";
        rotel.try_wait_for_spans(handshake(run.pid), 1, SPAN_WAIT)?;
        rotel.try_wait_for_spans(handshake(worker), 1, SPAN_WAIT)?;
        // A handshake that succeeds (curl -k) makes no such span on either end.
        let mut ok = Command::new("curl");
        ok.args(["-sS", "-k", "-o", "/dev/null", &nginx.url("/")]);
        let trusting = run_capture("curl -k", &mut ok, Duration::from_secs(20))?.ok()?;
        rotel.try_wait_for_spans(|s| s.pid() == Some(trusting.pid) && s.kind == SpanKind::Client, 1, SPAN_WAIT)?;
        std::thread::sleep(Duration::from_secs(2));
        let spans = rotel.spans();
        let mut e = Expect::new();
        e.that(!spans.iter().any(|s| handshake(trusting.pid)(s)), || "curl -k has a failed-handshake span".into());
        for (pid, kind) in [(run.pid, SpanKind::Client), (worker, SpanKind::Server)] {
            let mine: Vec<&Span> = spans.iter().filter(|s| handshake(pid)(s)).collect();
            e.that(mine.len() == 1, || format!("pid {pid}: {} tls.handshake spans", mine.len()));
            for s in mine {
                e.that(s.kind == kind, || format!("pid {pid}: kind {:?}, want {kind:?}", s.kind));
                e.attr_str(s, "error.type", "tls_handshake_failed");
                e.attr_int(s, "server.port", i64::from(nginx.port()));
                e.status(s, true);
                // Even over TLS 1.3 the refusing client's alert is
                // plaintext: it goes out before the client's keys change.
                e.attr_str(s, "periscope.tls.alert", "unknown_ca");
                e.attr_str(s, "periscope.tls.alert.sender", "client");
                e.attr_str(s, "tls.protocol.version", "1.3");
            }
        }
        // The refusing curl sent no request: no HTTP span.
        e.that(!spans.iter().any(|s| s.pid() == Some(run.pid) && s.attr("http.request.method").is_some()), || {
            "the refusing curl has an HTTP span after its failed handshake".into()
        });
        e.finish(&spans)
    });
}
