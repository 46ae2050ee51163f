//! End-to-end TLS tests: the real agent traces unmodified HTTPS programs
//! (nginx, curl, Python, `openssl s_server`/`s_client`, GnuTLS's
//! `gnutls-serv`/`gnutls-cli`, Node) through uprobes on their TLS libraries,
//! and reports pip-grpcio's statically linked BoringSSL as not visible.
//!
//! The contract these tests hold the agent to:
//! - HTTPS gives the same HTTP spans as plain HTTP (kinds, names,
//!   `http.request.method`, `url.path`, `http.response.status_code`,
//!   `server.address`/`server.port`, `network.peer.address`/`port`,
//!   `client.address` on servers, `url.full` on clients), with
//!   `url.scheme` = `https`, `tls.protocol.name` = `tls` and
//!   `tls.protocol.version` = the version negotiated (`1.2`, `1.3`);
//! - the first span of each TLS connection (per side) carries the int
//!   `periscope.tls.handshake.duration_ns` > 0 when the program called
//!   `SSL_do_handshake` (directly or through `SSL_connect`/`SSL_accept`) or
//!   `gnutls_handshake`; later spans on the connection never do. Programs
//!   that handshake inside `SSL_read`/`SSL_write` (Node, `s_client`) may
//!   lack it, but never on a later span;
//! - ciphertext is never parsed as HTTP: every span of these programs is
//!   `https` with a real method and path;
//! - the agent logs `TLS library attached: <path> (openssl|gnutls, N
//!   symbols)` per library file and `TLS not visible: <exe> (<reason>)` once
//!   per executable whose TLS it cannot hook, and keeps running.
//!
//! Each test starts its own Rotel, agent and programs, and stops them all.
//! Run them one at a time (`cargo xtask test` does): each agent traces the
//! whole host. Spans are filtered by the pids the test started.

use periscope_tests::certs::TestCert;
use periscope_tests::clients::{CURL, curl, curl1};
use periscope_tests::node::{NODE, NodeHttpsServer, node_https_get};
use periscope_tests::proc::TempDir;
use periscope_tests::tls::{
    GNUTLS_CLI, GNUTLS_SERV, GnutlsServer, HANDSHAKE_ATTR, NetNs, OPENSSL, OpensslServer,
    TlsVersion, attached_lines, churn_ssl_processes, curl_in_netns, curl_negotiated,
    gnutls_cli_get, grpcio_tls, not_visible_lines, openssl_exchange, panic_lines, python_https_get,
    python_https_get_after,
};
use periscope_tests::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);
/// How long spans may take to reach Rotel (agent batching + Rotel's 200 ms batch).
const SPAN_WAIT: Duration = Duration::from_secs(30);
const LOOPBACK: &str = "127.0.0.1";
/// A handshake on loopback takes well under this, even under load.
const MAX_HANDSHAKE_NS: i64 = 10_000_000_000;

fn is_server_of(s: &Span, pid: u32) -> bool {
    s.kind == SpanKind::Server && s.pid() == Some(pid)
}

fn is_client_of(s: &Span, pid: u32) -> bool {
    s.kind == SpanKind::Client && s.pid() == Some(pid)
}

fn by_start(mut v: Vec<Span>) -> Vec<Span> {
    v.sort_by_key(|s| (s.start_ns, s.end_ns));
    v
}

/// The traced process a span must come from.
struct Who {
    service: String,
    pid: u32,
    /// `process.executable.path`; its file name is `process.executable.name`.
    exe: String,
}

impl Who {
    fn new(exe: &str, pid: u32) -> Who {
        let exe = std::fs::canonicalize(exe)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| exe.to_string());
        Who {
            service: exe.rsplit('/').next().unwrap().to_string(),
            pid,
            exe,
        }
    }
}

fn expect_resource(e: &mut Expect, s: &Span, who: &Who) {
    e.res_str(s, "service.name", &who.service);
    e.res_int(s, "process.pid", who.pid as i64);
    e.res_str(s, "process.executable.path", &who.exe);
    e.res_str(s, "process.executable.name", &who.service);
    e.res_str(s, "host.name", &hostname());
}

/// What every HTTPS span carries, client or server.
fn expect_https(
    e: &mut Expect,
    s: &Span,
    path: &str,
    status: u16,
    http_version: &str,
    tls: TlsVersion,
) {
    e.that(s.name == "GET", || {
        format!("{}: name {:?}, want \"GET\"", s.span_id, s.name)
    });
    e.attr_str(s, "http.request.method", "GET");
    e.attr_str(s, "url.path", path);
    e.attr_str(s, "url.scheme", "https");
    e.attr_int(s, "http.response.status_code", status as i64);
    e.attr_str(s, "network.protocol.version", http_version);
    e.attr_str(s, "tls.protocol.name", "tls");
    e.attr_str(s, "tls.protocol.version", tls.attr());
    e.attr_absent(s, "periscope.incomplete");
}

#[allow(clippy::too_many_arguments)]
fn expect_server(
    e: &mut Expect,
    s: &Span,
    path: &str,
    status: u16,
    http_version: &str,
    tls: TlsVersion,
    who: &Who,
    port: u16,
    peer_port: Option<u16>,
) {
    e.that(s.kind == SpanKind::Server, || {
        format!("{s}: kind {:?}, want Server", s.kind)
    });
    expect_https(e, s, path, status, http_version, tls);
    e.status(s, status >= 500);
    e.attr_str(s, "server.address", LOOPBACK);
    e.attr_int(s, "server.port", port as i64);
    e.attr_str(s, "client.address", LOOPBACK);
    e.attr_str(s, "network.peer.address", LOOPBACK);
    match peer_port {
        Some(p) => e.attr_int(s, "network.peer.port", p as i64),
        None => e.attr_present(s, "network.peer.port"),
    }
    expect_resource(e, s, who);
}

#[allow(clippy::too_many_arguments)]
fn expect_client(
    e: &mut Expect,
    s: &Span,
    path: &str,
    status: u16,
    http_version: &str,
    tls: TlsVersion,
    who: &Who,
    port: u16,
) {
    e.that(s.kind == SpanKind::Client, || {
        format!("{s}: kind {:?}, want Client", s.kind)
    });
    expect_https(e, s, path, status, http_version, tls);
    e.status(s, status >= 400);
    e.attr_str(s, "server.address", LOOPBACK);
    e.attr_int(s, "server.port", port as i64);
    e.attr_str(s, "network.peer.address", LOOPBACK);
    e.attr_int(s, "network.peer.port", port as i64);
    let full = s.str_attr("url.full");
    e.that(
        full.is_some_and(|u| u.starts_with("https://") && u.ends_with(path)),
        || format!("{s}: url.full {full:?}, want https://...{path}"),
    );
    expect_resource(e, s, who);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Handshake {
    /// The program calls SSL_do_handshake / gnutls_handshake: the first span
    /// of the connection must carry the duration.
    Required,
    /// The handshake runs inside SSL_read/SSL_write (Node, s_client): the
    /// attribute may be missing, but never on a later span.
    IfSeen,
}

/// `conn`: the spans of one TLS connection on one side, in order.
fn expect_handshake(e: &mut Expect, conn: &[&Span], rule: Handshake, what: &str) {
    for (i, s) in conn.iter().enumerate() {
        let v = s.attr(HANDSHAKE_ATTR);
        if i == 0 {
            match (v, rule) {
                (None, Handshake::IfSeen) => {
                    eprintln!(
                        "note: {what}: no {HANDSHAKE_ATTR} on the first span (allowed: this program handshakes inside SSL_read/SSL_write)"
                    );
                }
                (v, _) => {
                    let ns = v.and_then(AttrValue::as_int);
                    e.that(ns.is_some_and(|n| n > 0 && n < MAX_HANDSHAKE_NS), || {
                        format!(
                            "{what}: first span {s}: {HANDSHAKE_ATTR} = {v:?}, want an Int in (0, {MAX_HANDSHAKE_NS})"
                        )
                    });
                }
            }
        } else {
            e.that(v.is_none(), || {
                format!("{what}: span #{i} on the connection {s} carries {HANDSHAKE_ATTR} = {v:?}; only the first may")
            });
        }
    }
}

/// True if `p` looks like a request path.
fn plausible_path(p: &str) -> bool {
    (p.starts_with('/') || p == "*")
        && !p.contains('?')
        && !p.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// No span of these processes comes from ciphertext parsed as HTTP: every
/// HTTP span is `https`, with a known method and a plausible path.
fn expect_no_garbage(e: &mut Expect, all: &[Span], pids: &HashSet<u32>) {
    for s in all
        .iter()
        .filter(|s| s.pid().is_some_and(|p| pids.contains(&p)))
    {
        let method = s.str_attr("http.request.method");
        let is_http = method.is_some() || s.attributes.keys().any(|k| k.starts_with("url."));
        if !is_http {
            continue;
        }
        e.that(method.is_some_and(|m| KNOWN_METHODS.contains(&m)), || {
            format!("{s}: http.request.method {method:?} is not a known method")
        });
        if let Some(p) = s.path() {
            e.that(plausible_path(p), || {
                format!("{s}: url.path {p:?} is not a plausible path (ciphertext parsed as HTTP?)")
            });
        }
        let scheme = s.str_attr("url.scheme");
        e.that(scheme == Some("https"), || {
            format!("{s}: url.scheme {scheme:?} on a TLS connection, want \"https\"")
        });
    }
}

/// The agent said it attached a TLS library whose path contains `lib` and
/// whose kind is `kind`.
fn expect_attached(e: &mut Expect, agent: &Agent, lib: &str, kind: &str) {
    let log = agent.log();
    let lines = attached_lines(&log);
    e.that(
        lines.iter().any(|l| l.contains(lib) && l.contains(kind)),
        || {
            format!(
                "the agent's log has no `TLS library attached: ...{lib}... ({kind}, N symbols)` line; its TLS lines: {lines:#?}"
            )
        },
    );
}

fn expect_agent_healthy(e: &mut Expect, agent: &mut Agent) -> anyhow::Result<()> {
    agent.check_running()?;
    let log = agent.log();
    let panics = panic_lines(&log);
    e.that(panics.is_empty(), || {
        format!("the agent's log shows a panic: {panics:#?}")
    });
    Ok(())
}

fn nginx_worker(worker: u32) -> Who {
    Who::new("/usr/sbin/nginx", worker)
}

fn https_nginx(cert: &TestCert, version: TlsVersion) -> anyhow::Result<Nginx> {
    Nginx::start_with(NginxOptions {
        tls: Some(NginxTls::only(cert.cert(), cert.key(), version)),
        ..Default::default()
    })
}

/// One curl over HTTPS with keep-alive, then Python urllib (one connection
/// per request), against an nginx that accepts only `version`.
fn nginx_https(version: TlsVersion) -> anyhow::Result<()> {
    let rotel = Rotel::start()?;
    let cert = TestCert::generate()?;
    // nginx runs before the agent starts, like any daemon on a real host.
    let nginx = https_nginx(&cert, version)?;
    let worker = nginx.worker_pid()?;
    let mut agent = Agent::start(&rotel.endpoint())?;
    let mut e = Expect::new();

    // curl: three URLs, one connection.
    let paths = ["/", "/status/404", "/status/500"];
    let statuses = [200u16, 404, 500];
    let urls: Vec<String> = paths.iter().map(|p| nginx.url(p)).collect();
    let mut extra = vec!["-k", "-v"];
    extra.extend(version.curl_args());
    let run = curl(&urls, &extra)?;
    let connects: Vec<u32> = run.transfers.iter().map(|t| t.num_connects).collect();
    anyhow::ensure!(
        connects == [1, 0, 0],
        "curl did not reuse its connection: {connects:?}"
    );
    let codes: Vec<u16> = run.transfers.iter().map(|t| t.http_code).collect();
    anyhow::ensure!(codes == statuses, "curl got {codes:?}");
    anyhow::ensure!(
        curl_negotiated(&run.stderr) == Some(version),
        "curl did not negotiate {version:?}:\n{}",
        run.stderr
    );
    let curl_port = run.transfers[0].local_port;

    // Python urllib: a new connection per request.
    let py_paths = ["/index.html", "/status/404", "/status/500"];
    let py_urls: Vec<String> = py_paths.iter().map(|p| nginx.url(p)).collect();
    let py = python_https_get(&py_urls, None)?;
    let got: Vec<(u16, Option<TlsVersion>)> =
        py.transfers.iter().map(|t| (t.status, t.version)).collect();
    anyhow::ensure!(
        got == [
            (200, Some(version)),
            (404, Some(version)),
            (500, Some(version))
        ],
        "python got {got:?}"
    );
    let tls_log = nginx.wait_for_tls_log(6, Duration::from_secs(10))?;
    anyhow::ensure!(
        tls_log.iter().all(|l| l.version() == Some(version)),
        "nginx negotiated other versions: {tls_log:#?}"
    );

    let curl_c = by_start(rotel.try_wait_for_spans(|s| is_client_of(s, run.pid), 3, SPAN_WAIT)?);
    let on_curl = |s: &Span| {
        is_server_of(s, worker) && s.int_attr("network.peer.port") == Some(curl_port as i64)
    };
    let curl_s = by_start(rotel.try_wait_for_spans(on_curl, 3, SPAN_WAIT)?);
    let py_c = by_start(rotel.try_wait_for_spans(|s| is_client_of(s, py.pid), 3, SPAN_WAIT)?);
    let py_ports: HashSet<i64> = py.transfers.iter().map(|t| t.local_port as i64).collect();
    let on_py = |s: &Span| {
        is_server_of(s, worker)
            && s.int_attr("network.peer.port")
                .is_some_and(|p| py_ports.contains(&p))
    };
    let py_s = by_start(rotel.try_wait_for_spans(on_py, 3, SPAN_WAIT)?);
    let all = rotel.spans_after(Duration::from_millis(500));

    // Exactly three spans per side for curl's connection.
    let n_c = all.iter().filter(|s| is_client_of(s, run.pid)).count();
    let n_s = all.iter().filter(|s| on_curl(s)).count();
    e.that(n_c == 3 && n_s == 3, || {
        format!("curl keep-alive: {n_c} client and {n_s} server spans, want 3 and 3")
    });
    let got_c: Vec<&str> = curl_c.iter().map(|s| s.path().unwrap_or("?")).collect();
    let got_s: Vec<&str> = curl_s.iter().map(|s| s.path().unwrap_or("?")).collect();
    e.that(got_c == paths && got_s == paths, || {
        format!("curl keep-alive: client paths {got_c:?}, server paths {got_s:?}, want {paths:?}")
    });
    let curl_who = Who::new(CURL, run.pid);
    for i in 0..paths.len().min(curl_c.len()).min(curl_s.len()) {
        expect_client(
            &mut e,
            &curl_c[i],
            paths[i],
            statuses[i],
            "1.1",
            version,
            &curl_who,
            nginx.port(),
        );
        expect_server(
            &mut e,
            &curl_s[i],
            paths[i],
            statuses[i],
            "1.1",
            version,
            &nginx_worker(worker),
            nginx.port(),
            Some(curl_port),
        );
    }
    expect_handshake(
        &mut e,
        &curl_c.iter().collect::<Vec<_>>(),
        Handshake::Required,
        "curl client side",
    );
    expect_handshake(
        &mut e,
        &curl_s.iter().collect::<Vec<_>>(),
        Handshake::Required,
        "nginx side of curl's connection",
    );

    // Python: one connection per request, so each span is a first span.
    let py_who = Who::new(periscope_tests::SYSTEM_PYTHON, py.pid);
    for t in &py.transfers {
        let path = t
            .url
            .split_once(&format!(":{}", nginx.port()))
            .map_or("?", |(_, p)| p);
        let c: Vec<&Span> = py_c.iter().filter(|s| s.path() == Some(path)).collect();
        let s: Vec<&Span> = py_s
            .iter()
            .filter(|s| s.int_attr("network.peer.port") == Some(t.local_port as i64))
            .collect();
        if !e.that(c.len() == 1 && s.len() == 1, || {
            format!(
                "python {path}: {} client spans, {} nginx server spans on its connection (port {}), want 1 and 1",
                c.len(),
                s.len(),
                t.local_port
            )
        }) {
            continue;
        }
        expect_client(
            &mut e,
            c[0],
            path,
            t.status,
            "1.1",
            version,
            &py_who,
            nginx.port(),
        );
        expect_server(
            &mut e,
            s[0],
            path,
            t.status,
            "1.1",
            version,
            &nginx_worker(worker),
            nginx.port(),
            Some(t.local_port),
        );
        expect_handshake(
            &mut e,
            &c,
            Handshake::Required,
            &format!("python client {path}"),
        );
        expect_handshake(
            &mut e,
            &s,
            Handshake::Required,
            &format!("nginx side of python's {path}"),
        );
    }

    expect_no_garbage(&mut e, &all, &HashSet::from([worker, run.pid, py.pid]));
    expect_attached(&mut e, &agent, "libssl.so", "openssl");
    expect_agent_healthy(&mut e, &mut agent)?;
    e.finish(&all)
}

/// 1a. nginx with `ssl_protocols TLSv1.3`: curl (keep-alive) and urllib.
#[test]
fn nginx_https_tls13() {
    run_test(LIMIT, || nginx_https(TlsVersion::Tls13));
}

/// 1b. nginx with `ssl_protocols TLSv1.2`: curl `--tlsv1.2 --tls-max 1.2`
///     (keep-alive) and urllib.
#[test]
fn nginx_https_tls12() {
    run_test(LIMIT, || nginx_https(TlsVersion::Tls12));
}

/// 2. `openssl s_server` (SSL_accept, SSL_read, SSL_write) answering
///    `openssl s_client` (handshake inside SSL_write/SSL_read).
#[test]
fn openssl_s_server_and_s_client() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let mut agent = Agent::start(&rotel.endpoint())?;
        let cert = TestCert::generate()?;
        let dir = TempDir::new("s_client")?;
        let mut server = OpensslServer::start(cert.cert(), cert.key())?;
        let (spid, port) = (server.pid(), server.port());
        let (cpid, _) = openssl_exchange(&mut server, dir.path())?;

        let mut e = Expect::new();
        let (srv, cli, all) = one_exchange(&rotel, &mut e, (spid, "s_server"), (cpid, "s_client"))?;
        let v = TlsVersion::Tls13;
        expect_server(
            &mut e,
            &srv[0],
            "/",
            200,
            "1.0",
            v,
            &Who::new(OPENSSL, spid),
            port,
            None,
        );
        expect_client(
            &mut e,
            &cli[0],
            "/",
            200,
            "1.0",
            v,
            &Who::new(OPENSSL, cpid),
            port,
        );
        expect_handshake(&mut e, &[&srv[0]], Handshake::Required, "s_server");
        expect_handshake(&mut e, &[&cli[0]], Handshake::IfSeen, "s_client");
        expect_no_garbage(&mut e, &all, &HashSet::from([spid, cpid]));
        expect_attached(&mut e, &agent, "libssl.so", "openssl");
        expect_agent_healthy(&mut e, &mut agent)?;
        e.finish(&all)
    });
}

/// The spans of one request: those of the server `spid` and of the client
/// `cpid` (one of each is expected), and every span received.
fn one_exchange(
    rotel: &Rotel,
    e: &mut Expect,
    (spid, server): (u32, &str),
    (cpid, client): (u32, &str),
) -> anyhow::Result<(Vec<Span>, Vec<Span>, Vec<Span>)> {
    let srv = rotel.try_wait_for_spans(|s| is_server_of(s, spid), 1, SPAN_WAIT)?;
    let cli = rotel.try_wait_for_spans(|s| is_client_of(s, cpid), 1, SPAN_WAIT)?;
    let all = rotel.spans_after(Duration::from_millis(500));
    e.that(srv.len() == 1 && cli.len() == 1, || {
        format!(
            "{} {server} and {} {client} spans, want 1 and 1",
            srv.len(),
            cli.len()
        )
    });
    Ok((srv, cli, all))
}

/// 2b. `openssl s_server -www` answering curl: s_server reads and writes
///     through a `BIO_f_ssl`, which calls libssl's internal
///     `ssl_read_internal`/`ssl_write_internal` and no exported `SSL_read`
///     or `SSL_write`: only hooks on the internal functions see it.
#[test]
fn openssl_s_server_www_through_the_bio_layer() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let mut agent = Agent::start(&rotel.endpoint())?;
        let cert = TestCert::generate()?;
        let server = OpensslServer::start_www(cert.cert(), cert.key())?;
        let (spid, port) = (server.pid(), server.port());
        let (cpid, transfer) = curl1(&format!("https://127.0.0.1:{port}/"), &["-k"])?;
        anyhow::ensure!(
            transfer.http_code == 200,
            "curl got {} from s_server -www:\n{}",
            transfer.http_code,
            server.log()
        );

        let mut e = Expect::new();
        let (srv, cli, all) =
            one_exchange(&rotel, &mut e, (spid, "s_server -www"), (cpid, "curl"))?;
        let v = TlsVersion::Tls13;
        // s_server answers HTTP/1.0 to curl's HTTP/1.1 request.
        let hv = srv[0]
            .str_attr("network.protocol.version")
            .unwrap_or("?")
            .to_string();
        e.that(hv == "1.0" || hv == "1.1", || {
            format!("{}: network.protocol.version {hv:?}", srv[0])
        });
        let who = Who::new(OPENSSL, spid);
        let peer = Some(transfer.local_port);
        expect_server(&mut e, &srv[0], "/", 200, &hv, v, &who, port, peer);
        expect_handshake(&mut e, &[&srv[0]], Handshake::IfSeen, "s_server -www");
        expect_client(
            &mut e,
            &cli[0],
            "/",
            200,
            "1.1",
            v,
            &Who::new(CURL, cpid),
            port,
        );
        expect_no_garbage(&mut e, &all, &HashSet::from([spid, cpid]));
        expect_attached(&mut e, &agent, "libssl.so", "openssl");
        let log = agent.log();
        let lines = attached_lines(&log);
        e.that(
            lines
                .iter()
                .any(|l| l.contains("libssl.so") && l.contains("ssl_read_internal at 0x")),
            || format!("libssl's read calls are not hooked at ssl_read_internal: {lines:#?}"),
        );
        expect_agent_healthy(&mut e, &mut agent)?;
        e.finish(&all)
    });
}

/// 3. `gnutls-serv --http` in a network namespace (it binds every address),
///    asked by `gnutls-cli` (GnuTLS on both sides) and by curl (OpenSSL).
#[test]
fn gnutls_serv_with_gnutls_cli_and_curl() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let mut agent = Agent::start(&rotel.endpoint())?;
        let cert = TestCert::generate()?;
        let ns = NetNs::new()?;
        let server = GnutlsServer::start(&ns, cert.cert(), cert.key())?;
        let (spid, port) = (server.pid(), server.port());
        let cli = gnutls_cli_get(&ns, port, "/")?;
        let (curl_pid, code) = curl_in_netns(&ns, &format!("https://127.0.0.1:{port}/"))?;
        anyhow::ensure!(code == 200, "curl got {code} from gnutls-serv");

        let srv = by_start(rotel.try_wait_for_spans(|s| is_server_of(s, spid), 2, SPAN_WAIT)?);
        let gc = rotel.try_wait_for_spans(|s| is_client_of(s, cli.pid), 1, SPAN_WAIT)?;
        let cc = rotel.try_wait_for_spans(|s| is_client_of(s, curl_pid), 1, SPAN_WAIT)?;
        let all = rotel.spans_after(Duration::from_millis(500));
        let mut e = Expect::new();
        e.that(srv.len() == 2 && gc.len() == 1 && cc.len() == 1, || {
            format!(
                "{} gnutls-serv, {} gnutls-cli, {} curl spans; want 2, 1, 1",
                srv.len(),
                gc.len(),
                cc.len()
            )
        });
        let v = TlsVersion::Tls13;
        let serv_who = Who::new(GNUTLS_SERV, spid);
        for s in &srv {
            // gnutls-serv answers HTTP/1.0 whatever the request said.
            let hv = s
                .str_attr("network.protocol.version")
                .unwrap_or("?")
                .to_string();
            e.that(hv == "1.0" || hv == "1.1", || {
                format!("{s}: network.protocol.version {hv:?}")
            });
            expect_server(&mut e, s, "/", 200, &hv, v, &serv_who, port, None);
            expect_handshake(&mut e, &[s], Handshake::Required, "gnutls-serv");
        }
        expect_client(
            &mut e,
            &gc[0],
            "/",
            200,
            "1.0",
            v,
            &Who::new(GNUTLS_CLI, cli.pid),
            port,
        );
        expect_handshake(&mut e, &[&gc[0]], Handshake::Required, "gnutls-cli");
        expect_client(
            &mut e,
            &cc[0],
            "/",
            200,
            "1.1",
            v,
            &Who::new(CURL, curl_pid),
            port,
        );
        expect_handshake(
            &mut e,
            &[&cc[0]],
            Handshake::Required,
            "curl in the namespace",
        );
        expect_no_garbage(&mut e, &all, &HashSet::from([spid, cli.pid, curl_pid]));
        expect_attached(&mut e, &agent, "libgnutls.so", "gnutls");
        expect_agent_healthy(&mut e, &mut agent)?;
        e.finish(&all)
    });
}

/// 4. Node's https server and a keep-alive https client (OpenSSL inside
///    `/usr/bin/node`, hooked through the executable's exported symbols).
#[test]
fn node_https_server_and_keep_alive_client() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let mut agent = Agent::start(&rotel.endpoint())?;
        let cert = TestCert::generate()?;
        let server = NodeHttpsServer::start(cert.cert(), cert.key())?;
        let (spid, port) = (server.pid(), server.port());
        let paths = ["/", "/status/404", "/status/500"];
        let statuses = [200u16, 404, 500];
        let run = node_https_get(port, &paths)?;
        let reused: Vec<bool> = run.transfers.iter().map(|t| t.reused).collect();
        anyhow::ensure!(
            reused == [false, true, true],
            "node did not keep its connection: {reused:?}"
        );
        let got: Vec<u16> = run.transfers.iter().map(|t| t.status).collect();
        anyhow::ensure!(got == statuses, "node client got {got:?}");
        let local = run.transfers[0].local_port;

        let srv = by_start(rotel.try_wait_for_spans(|s| is_server_of(s, spid), 3, SPAN_WAIT)?);
        let cli = by_start(rotel.try_wait_for_spans(|s| is_client_of(s, run.pid), 3, SPAN_WAIT)?);
        let all = rotel.spans_after(Duration::from_millis(500));
        let mut e = Expect::new();
        let got_s: Vec<&str> = srv.iter().map(|s| s.path().unwrap_or("?")).collect();
        let got_c: Vec<&str> = cli.iter().map(|s| s.path().unwrap_or("?")).collect();
        e.that(got_s == paths && got_c == paths, || {
            format!("node: server paths {got_s:?}, client paths {got_c:?}, want {paths:?} each")
        });
        let v = TlsVersion::Tls13;
        for i in 0..paths.len().min(srv.len()).min(cli.len()) {
            expect_server(
                &mut e,
                &srv[i],
                paths[i],
                statuses[i],
                "1.1",
                v,
                &Who::new(NODE, spid),
                port,
                Some(local),
            );
            expect_client(
                &mut e,
                &cli[i],
                paths[i],
                statuses[i],
                "1.1",
                v,
                &Who::new(NODE, run.pid),
                port,
            );
        }
        expect_handshake(
            &mut e,
            &srv.iter().collect::<Vec<_>>(),
            Handshake::IfSeen,
            "node server",
        );
        expect_handshake(
            &mut e,
            &cli.iter().collect::<Vec<_>>(),
            Handshake::IfSeen,
            "node client",
        );
        expect_no_garbage(&mut e, &all, &HashSet::from([spid, run.pid]));
        expect_attached(&mut e, &agent, "node", "openssl");
        expect_agent_healthy(&mut e, &mut agent)?;
        e.finish(&all)
    });
}

/// 5. Programs started after the agent is ready are traced: an HTTPS nginx
///    and then a fresh Python client, each exec'd well after `periscope
///    ready`; the client waits one second (the contract's allowance for
///    exec + map scan) after loading libssl before it connects.
#[test]
fn tls_programs_started_after_the_agent() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let mut agent = Agent::start(&rotel.endpoint())?;
        std::thread::sleep(Duration::from_secs(1));
        let cert = TestCert::generate()?;
        let nginx = https_nginx(&cert, TlsVersion::Tls13)?;
        let worker = nginx.worker_pid()?;
        std::thread::sleep(Duration::from_secs(1));
        let urls = vec![nginx.url("/"), nginx.url("/status/404")];
        let t0 = Instant::now();
        let py = python_https_get_after(&urls, None, Duration::from_secs(1))?;
        eprintln!("fresh python client ran {:?}", t0.elapsed());

        let cli = rotel.try_wait_for_spans(|s| is_client_of(s, py.pid), 2, SPAN_WAIT)?;
        let srv = rotel.try_wait_for_spans(|s| is_server_of(s, worker), 2, SPAN_WAIT)?;
        let all = rotel.spans_after(Duration::from_millis(500));
        let mut e = Expect::new();
        let v = TlsVersion::Tls13;
        for t in &py.transfers {
            let path = if t.status == 200 { "/" } else { "/status/404" };
            match cli.iter().find(|s| s.path() == Some(path)) {
                Some(c) => {
                    expect_client(
                        &mut e,
                        c,
                        path,
                        t.status,
                        "1.1",
                        v,
                        &Who::new(periscope_tests::SYSTEM_PYTHON, py.pid),
                        nginx.port(),
                    );
                    expect_handshake(&mut e, &[c], Handshake::Required, "fresh python client");
                }
                None => e.fail(format!(
                    "no client span from the fresh python (pid {}) for {path}",
                    py.pid
                )),
            }
            match srv
                .iter()
                .find(|s| s.int_attr("network.peer.port") == Some(t.local_port as i64))
            {
                Some(s) => {
                    expect_server(
                        &mut e,
                        s,
                        path,
                        t.status,
                        "1.1",
                        v,
                        &nginx_worker(worker),
                        nginx.port(),
                        Some(t.local_port),
                    );
                    expect_handshake(
                        &mut e,
                        &[s],
                        Handshake::Required,
                        "nginx started after the agent",
                    );
                }
                None => e.fail(format!(
                    "no server span from nginx (started after the agent) for {path}"
                )),
            }
        }
        expect_no_garbage(&mut e, &all, &HashSet::from([worker, py.pid]));
        expect_attached(&mut e, &agent, "libssl.so", "openssl");
        expect_agent_healthy(&mut e, &mut agent)?;
        e.finish(&all)
    });
}

/// After trouble, a normal HTTPS request still produces both spans.
fn https_still_traced(rotel: &Rotel, e: &mut Expect, cert: &TestCert) -> anyhow::Result<()> {
    let nginx = https_nginx(cert, TlsVersion::Tls13)?;
    let worker = nginx.worker_pid()?;
    std::fs::write(nginx.www().join("after.txt"), "still traced\n")?;
    let run = curl(&[nginx.url("/after.txt")], &["-k"])?;
    anyhow::ensure!(run.transfers[0].http_code == 200);
    let on_srv = |s: &Span| is_server_of(s, worker) && s.path() == Some("/after.txt");
    let srv = rotel.try_wait_for_spans(on_srv, 1, SPAN_WAIT)?;
    let cli = rotel.try_wait_for_spans(|s| is_client_of(s, run.pid), 1, SPAN_WAIT)?;
    let v = TlsVersion::Tls13;
    let port = run.transfers[0].local_port;
    expect_server(
        e,
        &srv[0],
        "/after.txt",
        200,
        "1.1",
        v,
        &nginx_worker(worker),
        nginx.port(),
        Some(port),
    );
    expect_client(
        e,
        &cli[0],
        "/after.txt",
        200,
        "1.1",
        v,
        &Who::new(CURL, run.pid),
        nginx.port(),
    );
    Ok(())
}

/// gRPC over TLS from pip's grpcio (BoringSSL linked in, no symbols): the
/// agent says `TLS not visible` naming the interpreter, exports nothing
/// parsed from the ciphertext, keeps running, and traces HTTPS afterwards.
fn grpcio_not_visible(hide_ssl: bool) -> anyhow::Result<()> {
    let rotel = Rotel::start()?;
    let mut agent = Agent::start(&rotel.endpoint())?;
    let cert = TestCert::generate()?;
    let grpc = grpcio_tls(cert.cert(), cert.key(), hide_ssl, 3)?;
    anyhow::ensure!(
        grpc.libssl_mapped != hide_ssl,
        "the grpc process had libssl mapped = {}, expected {}",
        grpc.libssl_mapped,
        !hide_ssl
    );
    let exe = grpc.exe.display().to_string();
    let line = agent.wait_for_log(
        &format!("`TLS not visible: {exe} (...)`"),
        Duration::from_secs(30),
        |l| {
            l.contains(periscope_tests::tls::LOG_NOT_VISIBLE)
                && (l.contains(&exe) || l.contains("cygrpc"))
        },
    );
    let mut e = Expect::new();
    match line {
        Ok(l) => eprintln!("agent said: {l}"),
        Err(err) => e.fail(format!(
            "no `TLS not visible` line naming {exe} (pid {}, libssl mapped: {}): {err:#}",
            grpc.pid, grpc.libssl_mapped
        )),
    }
    agent.check_running()?;
    https_still_traced(&rotel, &mut e, &cert)?;
    let all = rotel.spans_after(Duration::from_millis(500));
    // Nothing was parsed out of gRPC's ciphertext.
    let from_grpc: Vec<&Span> = all.iter().filter(|s| s.pid() == Some(grpc.pid)).collect();
    e.that(
        from_grpc
            .iter()
            .all(|s| s.attr("http.request.method").is_none() && s.path().is_none()),
        || format!("HTTP spans from the grpcio process (its TLS is not visible): {from_grpc:#?}"),
    );
    let log = agent.log();
    let nv = not_visible_lines(&log);
    let about_exe = nv.iter().filter(|l| l.contains(&exe)).count();
    e.that(about_exe <= 1, || {
        format!("`TLS not visible` for {exe} said {about_exe} times, want once: {nv:#?}")
    });
    expect_agent_healthy(&mut e, &mut agent)?;
    e.finish(&all)
}

/// 6a. pip grpcio as it comes: `import grpc` pulls in `asyncio` -> `ssl`, so
///     the system libssl is mapped (and hooked) but gRPC never calls it.
#[test]
fn grpcio_tls_not_visible() {
    run_test(LIMIT, || grpcio_not_visible(false));
}

/// 6b. The same with `ssl` hidden from the script: no OpenSSL mapped at all.
#[test]
fn grpcio_tls_not_visible_without_libssl_mapped() {
    run_test(LIMIT, || grpcio_not_visible(true));
}

/// 7. Processes that load libssl and exit (or are killed) while the agent
///    is finding and attaching to them: the agent keeps running, logs no
///    panic, and traces HTTPS fine afterwards.
#[test]
fn processes_exiting_while_being_attached() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let mut agent = Agent::start(&rotel.endpoint())?;
        let cert = TestCert::generate()?;
        let t0 = Instant::now();
        let pids = churn_ssl_processes(150, 4, Duration::from_millis(120))?;
        eprintln!(
            "started and killed {} python3 processes in {:?}",
            pids.len(),
            t0.elapsed()
        );
        // Let the agent catch up with the exec/exit burst.
        std::thread::sleep(Duration::from_secs(2));
        let mut e = Expect::new();
        expect_agent_healthy(&mut e, &mut agent)?;
        https_still_traced(&rotel, &mut e, &cert)?;
        let all = rotel.spans_after(Duration::from_millis(500));
        let ours: HashSet<u32> = pids.into_iter().collect();
        let strays: Vec<&Span> = all
            .iter()
            .filter(|s| s.pid().is_some_and(|p| ours.contains(&p)))
            .collect();
        e.that(strays.is_empty(), || {
            format!(
                "spans from the short-lived python processes, which made no requests: {strays:#?}"
            )
        });
        expect_agent_healthy(&mut e, &mut agent)?;
        e.finish(&all)
    });
}
