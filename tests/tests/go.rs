//! End-to-end tests of Go programs: the real agent traces an unmodified Go
//! HTTPS server (`tests/go/httpsgo`, standard library only) through uprobes
//! on its own crypto/tls and net/http, built with several Go toolchains and
//! in three ways (with symbols, stripped with `-s -w`, PIE).
//!
//! The contract these tests hold the agent to (issue 13):
//! - a Go program's HTTPS requests give the same spans as any HTTPS server:
//!   SERVER spans for what it answered, CLIENT spans for what its handler
//!   asked of its backend (`url.scheme` https, `tls.protocol.version`,
//!   methods, paths, status codes), whatever the build;
//! - the handler's outgoing call is the child of the request it serves, even
//!   though net/http writes it from another goroutine; the backend's (nginx)
//!   server span is the child of the Go client span; the Go server span is
//!   the child of curl's client span;
//! - the first span of each TLS connection carries the handshake duration;
//! - `status` lists each Go executable with its Go version, the functions
//!   attached and where the struct offsets came from (`dwarf` when the
//!   binary has DWARF, `table` when stripped);
//! - HTTP/2 spoken by a Go server over TLS gives HTTP/2 spans;
//! - grpc-go over TLS: one span per call on each end, named
//!   `demo.Greeter/SayHello` with `rpc.grpc.status_code`, the server span
//!   the child of the client span, for a client process that starts after
//!   the agent and calls at once (a known executable's new process is read
//!   from its first call);
//! - a Go version without DWARF and without an entry in the offsets table
//!   is reported as not visible, with the reason, and not probed.

use periscope_tests::certs::TestCert;
use periscope_tests::clients::{curl, curl_version};
use periscope_tests::control::ControlSocket;
use periscope_tests::go::{GoHttpsServer, Variant, build_grpcgo, build_httpsgo, toolchain};
use periscope_tests::tls::HANDSHAKE_ATTR;
use periscope_tests::*;
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(240);
const SPAN_WAIT: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_millis(1500);
/// A new Go process is found and hooked within a second (plus a build's
/// inspection of a fresh executable).
const DISCOVERY: Duration = Duration::from_secs(10);
const LOOPBACK: &str = "127.0.0.1";

fn short(s: &Span) -> String {
    format!(
        "{:?} {} {:?} [pid {}] span {} parent {:?}",
        s.kind,
        s.name,
        s.path().unwrap_or("-"),
        s.pid().map(|p| p.to_string()).unwrap_or("?".into()),
        s.span_id,
        s.parent_span_id
    )
}

fn nginx_backend(cert: &TestCert) -> anyhow::Result<Nginx> {
    Nginx::start_with(NginxOptions {
        extra_locations: "location /backend/ { return 200 \"backend\\n\"; }".into(),
        tls: Some(NginxTls {
            cert: cert.cert().to_path_buf(),
            key: cert.key().to_path_buf(),
            protocols: vec![periscope_tests::tls::TlsVersion::Tls13],
            http2: false,
        }),
        ..Default::default()
    })
}

fn wait_attached(agent: &mut Agent, binary: &Path) -> anyhow::Result<String> {
    let path = binary.display().to_string();
    agent.wait_for_log(&format!("Go program attached: {path}"), DISCOVERY, |l| {
        l.contains("Go program attached: ") && l.contains(&path)
    })
}

/// The one span matching `pred`, or a failure.
fn one<'a>(
    e: &mut Expect,
    spans: &'a [Span],
    what: &str,
    pred: impl Fn(&Span) -> bool,
) -> Option<&'a Span> {
    let found: Vec<&Span> = spans.iter().filter(|s| pred(s)).collect();
    e.that(found.len() == 1, || {
        format!(
            "{what}: {} spans, want 1: {:?}",
            found.len(),
            found.iter().map(|s| short(s)).collect::<Vec<_>>()
        )
    });
    found.first().copied()
}

fn expect_child(e: &mut Expect, parent: &Span, child: &Span) {
    e.that(
        child.parent_span_id.as_deref() == Some(parent.span_id.as_str())
            && child.trace_id == parent.trace_id,
        || format!("{} is not the child of {}", short(child), short(parent)),
    );
}

fn expect_https(e: &mut Expect, s: &Span, path: &str, status: i64, version: &str) {
    e.that(s.name == "GET", || {
        format!("{}: name {:?}, want GET", short(s), s.name)
    });
    e.attr_str(s, "http.request.method", "GET");
    e.attr_str(s, "url.path", path);
    e.attr_str(s, "url.scheme", "https");
    e.attr_int(s, "http.response.status_code", status);
    e.attr_str(s, "network.protocol.version", version);
    e.attr_str(s, "tls.protocol.name", "tls");
    e.attr_str(s, "tls.protocol.version", "1.3");
    e.attr_absent(s, "periscope.incomplete");
}

/// Three builds of the test server with one toolchain (two running before
/// the agent starts, the PIE one started after), each asked by curl for a
/// call that goes to an nginx HTTPS backend, for a page and for a missing
/// page, on one keep-alive connection.
fn https_chain(version: &str) -> anyhow::Result<()> {
    let tc = toolchain(version)?;
    let cert = TestCert::generate()?;
    let rotel = Rotel::start()?;
    let nginx = nginx_backend(&cert)?;
    let backend = format!("https://127.0.0.1:{}/backend", nginx.port());
    let variants = [Variant::Symbols, Variant::Stripped, Variant::Pie];
    let mut binaries = Vec::new();
    for v in variants {
        binaries.push(build_httpsgo(&tc, v)?);
    }
    let mut servers = Vec::new();
    for binary in &binaries[..2] {
        servers.push(GoHttpsServer::start(
            binary,
            cert.cert(),
            cert.key(),
            &backend,
            &[],
        )?);
    }
    let socket = ControlSocket::new()?;
    let mut agent = Agent::start_with(&rotel.endpoint(), socket.agent_options())?;
    for binary in &binaries[..2] {
        wait_attached(&mut agent, binary)?;
    }
    // Started after the agent: found through its exec.
    servers.push(GoHttpsServer::start(
        &binaries[2],
        cert.cert(),
        cert.key(),
        &backend,
        &[],
    )?);
    wait_attached(&mut agent, &binaries[2])?;

    let mut curls = Vec::new();
    for (v, server) in variants.iter().zip(&servers) {
        let n = v.name();
        let urls = [
            format!("/call/one-{n}"),
            format!("/call/two-{n}"),
            format!("/hello?{n}"),
            format!("/missing?{n}"),
        ]
        .map(|p| server.url(&p));
        let run = curl(&urls, &["-k"])?;
        let codes: Vec<u16> = run.transfers.iter().map(|t| t.http_code).collect();
        anyhow::ensure!(
            codes == [200, 200, 200, 404],
            "curl to the {} server: status codes {codes:?}",
            v.name()
        );
        curls.push(run.pid);
    }
    // The plain-text report: one line per Go executable.
    let status = socket.ok(&["status"])?;
    let go_pids: Vec<u32> = servers.iter().map(GoHttpsServer::pid).collect();
    rotel.try_wait_for_spans(
        |s| s.kind == SpanKind::Client && s.pid().is_some_and(|p| go_pids.contains(&p)),
        2 * servers.len(),
        SPAN_WAIT,
    )?;
    rotel.try_wait_for_spans(
        |s| s.kind == SpanKind::Server && s.pid().is_some_and(|p| go_pids.contains(&p)),
        4 * servers.len(),
        SPAN_WAIT,
    )?;
    let spans = rotel.spans_after(SETTLE);
    let mut e = Expect::new();
    for ((v, server), curl_pid) in variants.iter().zip(&servers).zip(&curls) {
        let pid = server.pid();
        let name = v.name();
        let go_servers: Vec<&Span> = spans
            .iter()
            .filter(|s| s.kind == SpanKind::Server && s.pid() == Some(pid))
            .collect();
        e.that(go_servers.len() == 4, || {
            format!(
                "{name} ({}): {} server spans, want 4",
                tc.version,
                go_servers.len()
            )
        });
        for (i, part) in ["one", "two"].iter().enumerate() {
            let call_path = format!("/call/{part}-{name}");
            let backend_path = format!("/backend/{part}-{name}");
            let Some(srv) = one(
                &mut e,
                &spans,
                &format!("{name}: Go server span {call_path}"),
                |s| {
                    s.kind == SpanKind::Server
                        && s.pid() == Some(pid)
                        && s.path() == Some(&call_path)
                },
            ) else {
                continue;
            };
            expect_https(&mut e, srv, &call_path, 200, "1.1");
            e.attr_int(srv, "server.port", server.port as i64);
            e.attr_str(srv, "client.address", LOOPBACK);
            if i == 0 {
                e.that(srv.int_attr(HANDSHAKE_ATTR).is_some_and(|n| n > 0), || {
                    format!(
                        "{name}: first server span {} has no {HANDSHAKE_ATTR}",
                        short(srv)
                    )
                });
            } else {
                e.attr_absent(srv, HANDSHAKE_ATTR);
            }
            if let Some(c) = one(
                &mut e,
                &spans,
                &format!("{name}: curl client span {call_path}"),
                |s| {
                    s.kind == SpanKind::Client
                        && s.pid() == Some(*curl_pid)
                        && s.path() == Some(&call_path)
                },
            ) {
                expect_child(&mut e, c, srv);
            }
            let Some(cli) = one(
                &mut e,
                &spans,
                &format!("{name}: Go client span {backend_path}"),
                |s| {
                    s.kind == SpanKind::Client
                        && s.pid() == Some(pid)
                        && s.path() == Some(&backend_path)
                },
            ) else {
                continue;
            };
            expect_https(&mut e, cli, &backend_path, 200, "1.1");
            e.attr_int(cli, "server.port", nginx.port() as i64);
            e.status(cli, false);
            expect_child(&mut e, srv, cli);
            if i == 0 {
                e.that(cli.int_attr(HANDSHAKE_ATTR).is_some_and(|n| n > 0), || {
                    format!(
                        "{name}: first client span {} has no {HANDSHAKE_ATTR}",
                        short(cli)
                    )
                });
            }
            if let Some(ngx) = one(
                &mut e,
                &spans,
                &format!("{name}: nginx span {backend_path}"),
                |s| s.kind == SpanKind::Server && s.path() == Some(&backend_path),
            ) {
                expect_child(&mut e, cli, ngx);
            }
        }
        if let Some(s) = one(&mut e, &spans, &format!("{name}: /hello"), |s| {
            s.kind == SpanKind::Server && s.pid() == Some(pid) && s.path() == Some("/hello")
        }) {
            expect_https(&mut e, s, "/hello", 200, "1.1");
            e.that(
                !s.parent_span_id.as_deref().unwrap_or("").is_empty(),
                || format!("{}: no parent", short(s)),
            );
        }
        if let Some(s) = one(&mut e, &spans, &format!("{name}: /missing"), |s| {
            s.kind == SpanKind::Server && s.pid() == Some(pid) && s.path() == Some("/missing")
        }) {
            expect_https(&mut e, s, "/missing", 404, "1.1");
        }
        // What status says about this executable.
        let path = server.binary.display().to_string();
        let line = status
            .lines()
            .find(|l| l.contains(&path))
            .map(str::to_string);
        let offsets = if *v == Variant::Stripped {
            "table"
        } else {
            "dwarf"
        };
        e.that(
            line.as_deref().is_some_and(|l| {
                l.contains("attached")
                    && l.contains(&tc.version)
                    && l.contains(&format!("offsets: {offsets}"))
                    && l.contains("crypto/tls.(*Conn).Read")
                    && l.contains(&pid.to_string())
            }),
            || format!("status for {path}: {line:?}, want attached, {}, offsets: {offsets}, Read, pid {pid}", tc.version),
        );
    }
    e.finish(&spans)
}

#[test]
fn go1_19_https_server_and_client_traced_and_nested() {
    run_test(LIMIT, || https_chain("go1.19"));
}

#[test]
fn go1_24_https_server_and_client_traced_and_nested() {
    run_test(LIMIT, || https_chain("go1.24"));
}

#[test]
fn go1_27_https_server_and_client_traced_and_nested() {
    run_test(LIMIT, || https_chain("go1.27"));
}

/// curl speaks HTTP/2 (ALPN) to the Go server: its crypto/tls plaintext goes
/// through the HTTP/2 parser.
#[test]
fn go_http2_server_over_crypto_tls() {
    run_test(LIMIT, || {
        let tc = toolchain("go1.27")?;
        let cert = TestCert::generate()?;
        let rotel = Rotel::start()?;
        let binary = build_httpsgo(&tc, Variant::Stripped)?;
        let mut agent = Agent::start(&rotel.endpoint())?;
        let server =
            GoHttpsServer::start(&binary, cert.cert(), cert.key(), "https://127.0.0.1:1", &[])?;
        wait_attached(&mut agent, &binary)?;
        let urls = vec![
            server.url("/hello"),
            server.url("/hello"),
            server.url("/missing"),
        ];
        let run = curl_version("--http2", &urls, &["-k"])?;
        let codes: Vec<u16> = run.transfers.iter().map(|t| t.http_code).collect();
        anyhow::ensure!(
            codes == [200, 200, 404],
            "curl --http2 status codes {codes:?}"
        );
        let pid = server.pid();
        rotel.try_wait_for_spans(
            |s| s.kind == SpanKind::Server && s.pid() == Some(pid),
            3,
            SPAN_WAIT,
        )?;
        let spans = rotel.spans_after(SETTLE);
        let mut e = Expect::new();
        let mut mine: Vec<&Span> = spans
            .iter()
            .filter(|s| s.kind == SpanKind::Server && s.pid() == Some(pid))
            .collect();
        mine.sort_by_key(|s| s.start_ns);
        e.that(mine.len() == 3, || {
            format!("{} Go server spans, want 3", mine.len())
        });
        for (s, (path, code)) in
            mine.iter()
                .zip([("/hello", 200), ("/hello", 200), ("/missing", 404)])
        {
            expect_https(&mut e, s, path, code, "2");
        }
        let curl_spans: Vec<&Span> = spans.iter().filter(|s| s.pid() == Some(run.pid)).collect();
        for s in &mine {
            if let Some(c) = curl_spans
                .iter()
                .find(|c| Some(c.span_id.as_str()) == s.parent_span_id.as_deref())
            {
                e.that(c.path() == s.path(), || {
                    format!("{} under curl span {}", short(s), short(c))
                });
            } else {
                e.fail(format!("{}: not under any of curl's spans", short(s)));
            }
        }
        e.finish(&spans)
    });
}

/// A stripped build whose Go version is not in the offsets table (its
/// version string rewritten to a future `go1.99`): reported, never probed.
#[test]
fn go_version_without_offsets_is_reported_not_probed() {
    run_test(LIMIT, || {
        let tc = toolchain("go1.27")?;
        let cert = TestCert::generate()?;
        let rotel = Rotel::start()?;
        let stripped = build_httpsgo(&tc, Variant::Stripped)?;
        let dir = periscope_tests::proc::TempDir::new("go-future")?;
        let future = dir.join("httpsgo-future");
        let mut bytes = std::fs::read(&stripped)?;
        let magic = b"\xff Go buildinf:";
        let at = bytes
            .windows(magic.len())
            .position(|w| w == magic)
            .ok_or_else(|| anyhow::anyhow!("no buildinfo"))?;
        let old = tc.version.as_bytes();
        let rel = bytes[at..]
            .windows(old.len())
            .position(|w| w == old)
            .ok_or_else(|| anyhow::anyhow!("no version"))?;
        let new_version = format!("go1.99{}", &tc.version["go1.27".len()..]);
        bytes[at + rel..at + rel + old.len()].copy_from_slice(new_version.as_bytes());
        std::fs::write(&future, &bytes)?;
        std::fs::set_permissions(&future, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

        let socket = ControlSocket::new()?;
        let mut agent = Agent::start_with(&rotel.endpoint(), socket.agent_options())?;
        let server =
            GoHttpsServer::start(&future, cert.cert(), cert.key(), "https://127.0.0.1:1", &[])?;
        let path = future.display().to_string();
        let logged = agent.wait_for_log("TLS not visible: Go program", DISCOVERY, |l| {
            l.contains("TLS not visible: Go program") && l.contains(&path)
        })?;
        let run = curl(&[server.url("/hello")], &["-k"])?;
        anyhow::ensure!(
            run.transfers.first().map(|t| t.http_code) == Some(200),
            "curl /hello failed"
        );
        let status = socket.ok(&["status"])?;
        let spans = rotel.spans_after(Duration::from_secs(3));
        let mut e = Expect::new();
        e.that(
            logged.contains(&new_version) && logged.contains("offsets"),
            || format!("log line {logged:?} should name {new_version} and the missing offsets"),
        );
        // Its line under "Go programs" (the TLS libraries list may name it too).
        let line = status
            .lines()
            .find(|l| l.contains(&path) && l.contains(&new_version))
            .map(str::to_string);
        e.that(
            line.as_deref()
                .is_some_and(|l| l.contains("not visible") && l.contains("offsets")),
            || format!("status line for {path}: {line:?}, want `not visible` with {new_version}"),
        );
        let pid = server.pid();
        let http: Vec<&Span> = spans
            .iter()
            .filter(|s| s.pid() == Some(pid) && s.attr("http.request.method").is_some())
            .collect();
        e.that(http.is_empty(), || {
            format!(
                "{} HTTP spans from the unprobed Go server: {:?}",
                http.len(),
                http.iter().map(|s| short(s)).collect::<Vec<_>>()
            )
        });
        e.finish(&spans)
    });
}

/// grpc-go 1.33 (Debian) over TLS, server and client from one executable:
/// unary OK and NOT_FOUND, method and status right on both ends.
#[test]
fn grpc_go_over_tls_method_and_status_on_both_ends() {
    run_test(LIMIT, || {
        let tc = toolchain("go1.19")?;
        let cert = TestCert::generate()?;
        let rotel = Rotel::start()?;
        let binary = build_grpcgo(&tc)?;
        let mut agent = Agent::start(&rotel.endpoint())?;
        let server = GoHttpsServer::start(&binary, cert.cert(), cert.key(), "", &[])?;
        wait_attached(&mut agent, &binary)?;
        let port = server.port.to_string();
        let mut cmd = std::process::Command::new(&binary);
        cmd.args(["call", &port, "one", "missing-two", "three"]);
        let run =
            periscope_tests::proc::run_capture("grpcgo call", &mut cmd, Duration::from_secs(60))?
                .ok()?;
        let replies: Vec<&str> = run
            .stdout
            .lines()
            .filter(|l| l.starts_with("reply "))
            .collect();
        anyhow::ensure!(
            replies
                == [
                    "reply one OK",
                    "reply missing-two NotFound",
                    "reply three OK"
                ],
            "grpcgo call replied {replies:?}"
        );
        let is_grpc = |s: &Span| s.str_attr("rpc.system") == Some("grpc");
        let (client_pid, server_pid) = (run.pid, server.pid());
        rotel.try_wait_for_spans(|s| is_grpc(s) && s.pid() == Some(client_pid), 3, SPAN_WAIT)?;
        rotel.try_wait_for_spans(|s| is_grpc(s) && s.pid() == Some(server_pid), 3, SPAN_WAIT)?;
        let spans = rotel.spans_after(SETTLE);
        let mut e = Expect::new();
        let mut clients: Vec<&Span> = spans
            .iter()
            .filter(|s| s.kind == SpanKind::Client && s.pid() == Some(client_pid) && is_grpc(s))
            .collect();
        let mut servers: Vec<&Span> = spans
            .iter()
            .filter(|s| s.kind == SpanKind::Server && s.pid() == Some(server_pid) && is_grpc(s))
            .collect();
        clients.sort_by_key(|s| s.start_ns);
        servers.sort_by_key(|s| s.start_ns);
        e.that(clients.len() == 3 && servers.len() == 3, || {
            format!(
                "{} client and {} server gRPC spans, want 3 each",
                clients.len(),
                servers.len()
            )
        });
        for (i, code) in [0i64, 5, 0].into_iter().enumerate() {
            for (s, kind) in [
                (clients.get(i), SpanKind::Client),
                (servers.get(i), SpanKind::Server),
            ] {
                let Some(s) = s else { continue };
                e.that(s.name == "demo.Greeter/SayHello", || {
                    format!("{}: name {:?}", short(s), s.name)
                });
                e.attr_str(s, "rpc.service", "demo.Greeter");
                e.attr_str(s, "rpc.method", "SayHello");
                e.attr_int(s, "rpc.grpc.status_code", code);
                e.attr_int(s, "server.port", server.port as i64);
                e.attr_absent(s, "periscope.incomplete");
                // NOT_FOUND is an error for the client, not for the server.
                e.status(s, kind == SpanKind::Client && code != 0);
            }
            if let (Some(c), Some(s)) = (clients.get(i), servers.get(i)) {
                expect_child(&mut e, c, s);
            }
        }
        e.finish(&spans)
    });
}

/// grpc-go over TLS on a channel dialed, and used, before the agent
/// started: both ends' HPACK tables hold the call's `:path` and
/// `grpc-status` from then, so the bytes alone cannot name the calls made
/// after; grpc-go's own decoded header blocks do. Method and status right
/// on both ends, nothing marked incomplete.
#[test]
fn grpc_go_channel_dialed_before_the_agent() {
    run_test(LIMIT, || {
        let tc = toolchain("go1.19")?;
        let cert = TestCert::generate()?;
        let rotel = Rotel::start()?;
        let binary = build_grpcgo(&tc)?;
        let server = GoHttpsServer::start(&binary, cert.cert(), cert.key(), "", &[])?;
        let port = server.port.to_string();
        let mut cmd = std::process::Command::new(&binary);
        cmd.args(["session", &port, "one", "missing-two", "three"]);
        let mut client = periscope_tests::proc::Proc::spawn("grpcgo session", &mut cmd)?;
        client.wait_for_line("reply warm OK", Duration::from_secs(30), |l| l == "reply warm OK")?;
        let socket = ControlSocket::new()?;
        let mut agent = Agent::start_with(&rotel.endpoint(), socket.agent_options())?;
        let attached = wait_attached(&mut agent, &binary)?;
        anyhow::ensure!(
            attached.contains("operateHeaders") && attached.contains("writeHeader"),
            "grpc-go functions not attached: {attached}"
        );
        client.signal(libc::SIGUSR1);
        client.wait_for_line("reply three", Duration::from_secs(30), |l| l.starts_with("reply three"))?;
        let replies: Vec<String> = client.output().lines().into_iter().filter(|l| l.starts_with("reply ")).collect();
        anyhow::ensure!(
            replies == ["reply warm OK", "reply one OK", "reply missing-two NotFound", "reply three OK"],
            "grpcgo session replied {replies:?}"
        );
        let is_grpc = |s: &Span| s.str_attr("rpc.system") == Some("grpc");
        let (client_pid, server_pid) = (client.pid(), server.pid());
        let from = |pid: u32, kind: SpanKind| move |s: &Span| s.kind == kind && s.pid() == Some(pid);
        rotel.try_wait_for_spans(from(client_pid, SpanKind::Client), 3, SPAN_WAIT)?;
        rotel.try_wait_for_spans(from(server_pid, SpanKind::Server), 3, SPAN_WAIT)?;
        let spans = rotel.spans_after(SETTLE);
        let status = socket.ok(&["status"])?;
        let report = socket.status()?;
        let mut e = Expect::new();
        e.that(status.contains("grpc-go v1.33.3 hooked (offsets: dwarf)"), || format!("status says of grpc-go:\n{status}"));
        let mut clients: Vec<&Span> = spans.iter().filter(|s| from(client_pid, SpanKind::Client)(s)).collect();
        let mut servers: Vec<&Span> = spans.iter().filter(|s| from(server_pid, SpanKind::Server)(s)).collect();
        clients.sort_by_key(|s| s.start_ns);
        servers.sort_by_key(|s| s.start_ns);
        e.that(clients.len() == 3 && servers.len() == 3, || {
            format!("{} client and {} server spans, want 3 each", clients.len(), servers.len())
        });
        for (i, code) in [0i64, 5, 0].into_iter().enumerate() {
            for (s, kind) in [(clients.get(i), SpanKind::Client), (servers.get(i), SpanKind::Server)] {
                let Some(s) = s else { continue };
                e.that(is_grpc(s), || format!("{}: not a gRPC span", short(s)));
                e.that(s.name == "demo.Greeter/SayHello", || format!("{}: name {:?}", short(s), s.name));
                e.attr_str(s, "rpc.method", "SayHello");
                e.attr_int(s, "rpc.grpc.status_code", code);
                e.attr_absent(s, "periscope.incomplete");
                e.status(s, kind == SpanKind::Client && code != 0);
            }
            if let (Some(c), Some(s)) = (clients.get(i), servers.get(i)) {
                expect_child(&mut e, c, s);
            }
        }
        // On both ends, per call: the request, then the response headers and
        // trailers (one trailers-only block for NOT_FOUND): 6 + 4 + 6.
        let applied = report.counter("grpc_go_header_blocks")?;
        e.that(applied >= 16, || format!("grpc_go_header_blocks = {applied}, want at least 16"));
        e.finish(&spans)
    });
}

/// A Go server over plain HTTP (kernel socket probes only for its bytes):
/// its goroutines are told apart by the probes on `syscall.read`/`write`,
/// so each handler's call to the backend is the child of its own request,
/// with four curl processes asking at once.
#[test]
fn go_plain_http_handler_calls_nested_under_concurrency() {
    run_test(LIMIT, || {
        let tc = toolchain("go1.24")?;
        let rotel = Rotel::start()?;
        let nginx = Nginx::start_with(NginxOptions {
            extra_locations: "location /backend/ { return 200 \"backend\\n\"; }".into(),
            ..Default::default()
        })?;
        let binary = build_httpsgo(&tc, Variant::Stripped)?;
        let backend = format!("http://127.0.0.1:{}/backend", nginx.port());
        let mut agent = Agent::start(&rotel.endpoint())?;
        let server = GoHttpsServer::start_plain(&binary, &backend)?;
        wait_attached(&mut agent, &binary)?;
        const CLIENTS: usize = 4;
        const EACH: usize = 8;
        let runs: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let urls: Vec<String> = (0..EACH)
                    .map(|i| server.url(&format!("/call/c{c}-{i}")))
                    .collect();
                std::thread::spawn(move || curl(&urls, &[]))
            })
            .collect();
        for run in runs {
            let run = run
                .join()
                .map_err(|_| anyhow::anyhow!("curl thread panicked"))??;
            let codes: Vec<u16> = run.transfers.iter().map(|t| t.http_code).collect();
            anyhow::ensure!(
                codes.iter().all(|&c| c == 200),
                "curl status codes {codes:?}"
            );
        }
        let pid = server.pid();
        let n = CLIENTS * EACH;
        rotel.try_wait_for_spans(
            |s| s.kind == SpanKind::Client && s.pid() == Some(pid),
            n,
            SPAN_WAIT,
        )?;
        rotel.try_wait_for_spans(
            |s| s.kind == SpanKind::Server && s.pid() == Some(pid),
            n,
            SPAN_WAIT,
        )?;
        let spans = rotel.spans_after(SETTLE);
        let mut e = Expect::new();
        let mut linked = 0;
        for c in 0..CLIENTS {
            for i in 0..EACH {
                let (call, back) = (format!("/call/c{c}-{i}"), format!("/backend/c{c}-{i}"));
                let srv = one(&mut e, &spans, &format!("Go server span {call}"), |s| {
                    s.kind == SpanKind::Server && s.pid() == Some(pid) && s.path() == Some(&call)
                });
                let cli = one(&mut e, &spans, &format!("Go client span {back}"), |s| {
                    s.kind == SpanKind::Client && s.pid() == Some(pid) && s.path() == Some(&back)
                });
                let (Some(srv), Some(cli)) = (srv, cli) else {
                    continue;
                };
                e.attr_str(srv, "url.scheme", "http");
                e.attr_int(srv, "http.response.status_code", 200);
                // Exact or not at all: a parent, if any, is its own request.
                if cli.parent_span_id.is_some() {
                    expect_child(&mut e, srv, cli);
                    linked += 1;
                }
                if let Some(ngx) = one(&mut e, &spans, &format!("nginx span {back}"), |s| {
                    s.kind == SpanKind::Server && s.path() == Some(&back)
                }) {
                    expect_child(&mut e, cli, ngx);
                }
            }
        }
        // Every handler's call is linked: nothing here is ambiguous.
        e.that(linked == n, || {
            format!("{linked} of {n} Go client spans under their request")
        });
        e.finish(&spans)
    });
}
