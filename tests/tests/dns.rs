//! End-to-end tests for DNS spans and the per-request latency breakdown
//! (issue 4): the real agent, real eBPF, spans read back from a real Rotel;
//! dnsmasq on a loopback address of its own and unmodified clients (curl,
//! Python, getent, Node) resolving through it by a bind-mounted resolv.conf
//! in a private mount namespace (see `periscope_tests::dns`).
//!
//! The contract these tests hold the agent to (notes/span-contract.md):
//! - a wire lookup (one question a client socket sent, matched to its answer
//!   by socket, transaction id and question) is a CLIENT span `DNS <QTYPE>`
//!   with `dns.question.name`, `periscope.dns.question.type`,
//!   `periscope.dns.response_code`, `dns.answers` (string array, absent when
//!   empty), `network.transport`, `server.address`/`network.peer.address`,
//!   `server.port`/`network.peer.port` = 53, `periscope.dns.attempts`;
//!   status ERROR with `error.type` = the code name when it is not NOERROR,
//!   or `timeout` when no answer came; its parent is the `getaddrinfo`/`dns`
//!   span open in the same thread, else it is a root;
//! - `getaddrinfo` (libc uprobe) is an INTERNAL span `getaddrinfo` with
//!   `dns.question.name`, `dns.answers`, `periscope.dns.resolver` =
//!   `getaddrinfo`, ERROR + `error.type` = `EAI_NONAME` etc. on failure;
//! - an HTTP client span has phase children (INTERNAL, `periscope.phase`):
//!   `dns`, `connect`, `tls.handshake`, `request.send`, `server`,
//!   `response.receive`, those that happened, tiling the span exactly (no
//!   overlap, no gap, sum = duration within 5%); when the lookup was a
//!   getaddrinfo call, that span *is* the `dns` phase; a reused connection
//!   has only `request.send`, `server`, `response.receive`;
//! - server spans have `request.receive`, `handler`, `response.send` when
//!   reading the request or writing the response took 1 ms or more, and no
//!   phases otherwise (the handler is then the whole span);
//! - malformed DNS never crashes the agent and is counted
//!   (`counters.dns_parse_errors` in `periscope status --json`);
//! - `periscope disable|enable phases` and `dns` switch phase spans and DNS
//!   spans (wire and getaddrinfo) at run time.
//!
//! Timing checks compare with what the clients measured themselves (curl's
//! `-w` figures, Python's clock) and with injected delays: a forwarder that
//! holds every answer 300 ms, a handler that sleeps 300 ms.
//!
//! The `rig_*` tests check the harness itself (no agent). Each other test
//! starts its own Rotel, agent, dnsmasq and servers, and stops them all; run
//! them one at a time (`cargo xtask test` does).

use anyhow::{Context, ensure};
use periscope_tests::certs::TestCert;
use periscope_tests::control::ControlSocket;
use periscope_tests::dns::*;
use periscope_tests::tls::{TlsVersion, panic_lines};
use periscope_tests::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(240);
/// How long spans may take to reach Rotel (agent batching + Rotel's batch).
const SPAN_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for the rest of a span's family once the span is there.
const FAMILY_WAIT: Duration = Duration::from_secs(10);
/// How long a lookup that got no answer may take to be reported.
const TIMEOUT_WAIT: Duration = Duration::from_secs(45);
const TARGET: &str = "127.0.0.1";
const API_ADDR_S: &str = "127.0.0.10";

const HTTP_PHASES: &[&str] = &[
    "dns",
    "connect",
    "request.send",
    "server",
    "response.receive",
];
const HTTPS_PHASES: &[&str] = &[
    "dns",
    "connect",
    "tls.handshake",
    "request.send",
    "server",
    "response.receive",
];
const REUSED_PHASES: &[&str] = &["request.send", "server", "response.receive"];

/// An agent that makes the phase waterfall of every request (these tests
/// check the phases of fast requests too); the default rule, waterfalls
/// only for slow or failed requests, has its own test.
fn start_agent(rotel: &Rotel) -> anyhow::Result<(Agent, ControlSocket)> {
    start_agent_with(rotel, &["--phase-spans-min-duration", "0s"])
}

fn start_agent_with(rotel: &Rotel, args: &[&str]) -> anyhow::Result<(Agent, ControlSocket)> {
    let control = ControlSocket::new()?;
    let mut options = control.agent_options();
    options.args.extend(args.iter().map(|a| a.to_string()));
    let agent = Agent::start_with(&rotel.endpoint(), options)?;
    Ok((agent, control))
}

fn https_nginx(cert: &TestCert) -> anyhow::Result<Nginx> {
    Nginx::start_with(NginxOptions {
        tls: Some(NginxTls::only(cert.cert(), cert.key(), TlsVersion::Tls13)),
        ..Default::default()
    })
}

fn is_http_client_of(s: &Span, pid: u32) -> bool {
    s.kind == SpanKind::Client && s.pid() == Some(pid) && !is_wire_dns(s)
}

fn is_server_of(s: &Span, pid: u32) -> bool {
    s.kind == SpanKind::Server && s.pid() == Some(pid)
}

/// The spans of these processes, for failure messages (the agent traces the
/// whole host, and other programs may be busy).
fn of_pids(all: &[Span], pids: &[u32]) -> Vec<Span> {
    all.iter()
        .filter(|s| s.pid().is_some_and(|p| pids.contains(&p)))
        .cloned()
        .collect()
}

/// Print the test's own spans (shown with --nocapture or on failure), then
/// fail with every mismatch if there was one.
fn finish(e: Expect, all: &[Span], pids: &[u32]) -> anyhow::Result<()> {
    let mine = of_pids(all, pids);
    eprintln!(
        "{}",
        with_spans("the spans of this test's processes", &mine)
    );
    e.finish(&mine)
}

fn by_start(mut v: Vec<Span>) -> Vec<Span> {
    v.sort_by_key(|s| (s.start_ns, s.end_ns));
    v
}

/// Wait for `n` HTTP client spans of `pid`, then for their phase children
/// (`want_phases` in all), and return them (by start) with every span.
fn http_clients(
    rotel: &Rotel,
    pid: u32,
    n: usize,
    want_phases: usize,
) -> anyhow::Result<(Vec<Span>, Vec<Span>)> {
    let clients =
        by_start(rotel.try_wait_for_spans(|s| is_http_client_of(s, pid), n, SPAN_WAIT)?);
    let ids: Vec<String> = clients.iter().map(|c| c.span_id.clone()).collect();
    let all = settle(
        rotel,
        |s| s.parent_span_id.as_ref().is_some_and(|p| ids.contains(p)) && is_phase(s),
        want_phases,
        FAMILY_WAIT,
    );
    Ok((clients, all))
}

/// The wire DNS spans that are children of `parent`.
fn wire_children<'a>(all: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    children(all, parent)
        .into_iter()
        .filter(|s| is_wire_dns(s))
        .collect()
}

/// Under the resolver span `r` (a `getaddrinfo` or `dns` phase), exactly one
/// `DNS A` and one `DNS AAAA` for `name`, sent to `server`, answered NOERROR,
/// the A one with `answer`.
fn expect_wire_pair(
    e: &mut Expect,
    all: &[Span],
    r: &Span,
    name: &str,
    answer: &str,
    server: std::net::Ipv4Addr,
) {
    let kids = wire_children(all, r);
    for (qtype, ans) in [("A", Some(answer)), ("AAAA", None)] {
        let mine: Vec<&&Span> = kids
            .iter()
            .filter(|s| s.name == format!("DNS {qtype}"))
            .collect();
        if !e.that(mine.len() == 1, || {
            format!(
                "{} for {name}: {} `DNS {qtype}` children, want 1 (children: {:?})",
                short(r),
                mine.len(),
                kids.iter().map(|s| short(s)).collect::<Vec<_>>()
            )
        }) {
            continue;
        }
        let s = mine[0];
        expect_wire(
            e,
            s,
            &WireWant {
                name,
                qtype,
                rcode: Some("NOERROR"),
                answer: ans,
                server,
                transport: "udp",
            },
        );
        e.attr_int(s, "periscope.dns.attempts", 1);
        expect_child_of(e, s, r);
        // A child lies within its parent.
        e.that(
            s.start_ns + 20_000 >= r.start_ns && s.end_ns <= r.end_ns + 20_000,
            || {
                format!(
                    "{} [{}..{}] is not inside {} [{}..{}]",
                    short(s),
                    s.start_ns,
                    s.end_ns,
                    short(r),
                    r.start_ns,
                    r.end_ns
                )
            },
        );
    }
}

/// Check the `dns` phase of a client span: it is the getaddrinfo call for
/// `name`, answered with `answer`, with its wire lookups as children.
fn expect_dns_phase(
    e: &mut Expect,
    all: &[Span],
    phases: &[&Span],
    name: &str,
    answer: &str,
    server: std::net::Ipv4Addr,
) {
    let Some(d) = phase(phases, "dns") else {
        return; // expect_phases reported it
    };
    expect_resolver(e, d, "dns", name, Some(answer), None);
    expect_wire_pair(e, all, d, name, answer, server);
}

/// The server span (of `pid`, path `path`) and its phases, which must be
/// `want` (all three, or none for a quick transfer).
fn expect_server_phases(e: &mut Expect, all: &[Span], pid: u32, path: &str, what: &str, want: &[&str]) {
    let servers: Vec<&Span> = all
        .iter()
        .filter(|s| is_server_of(s, pid) && s.path() == Some(path))
        .collect();
    if !e.that(servers.len() == 1, || {
        format!(
            "{what}: {} server spans of pid {pid} for {path}, want 1",
            servers.len()
        )
    }) {
        return;
    }
    let s = servers[0];
    let ph = phases_of(all, s);
    expect_phases(e, what, s, &ph, want);
}

// ====================================================================== the harness itself

/// dnsmasq answers through a bind-mounted resolv.conf (getent, Python), the
/// machine's own resolv.conf is untouched, and unknown names are NXDOMAIN.
#[test]
fn rig_dnsmasq_answers_through_private_resolv_conf() {
    run_test(LIMIT, || {
        let before = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let mut dns = Dnsmasq::start()?;
        let resolv = ResolvConf::via(dns.addr())?;
        let f = getent_via(&resolv, "ahosts", WWW)?;
        ensure!(
            f.status.success() && f.stdout.contains(TARGET),
            "getent ahosts {WWW}: {f:?}"
        );
        let f = getent_via(&resolv, "hosts", API)?;
        ensure!(
            f.status.success() && f.stdout.contains(API_ADDR_S),
            "getent hosts {API}: {f:?}"
        );
        let f = getent_via(&resolv, "hosts", MISSING)?;
        ensure!(
            f.status.code() == Some(2),
            "getent hosts {MISSING} must fail with 2: {f:?}"
        );
        let g = python_getaddrinfo(&resolv, &host(0))?;
        ensure!(g.addrs == [TARGET] && g.error.is_none(), "{g:?}");
        let g = python_getaddrinfo(&resolv, &missing(0))?;
        ensure!(
            g.error == Some(-2) && g.addrs.is_empty(),
            "want EAI_NONAME (-2): {g:?}"
        );
        let q = dns.queries();
        for (t, n) in [
            ("A", WWW),
            ("AAAA", WWW),
            ("A", host(0).as_str()),
            ("A", MISSING),
        ] {
            ensure!(
                q.iter().any(|x| x.qtype == t && x.name == n),
                "dnsmasq never saw {t} {n}; its log:\n{}",
                dns.log()
            );
        }
        let after = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        ensure!(
            before == after,
            "the machine's /etc/resolv.conf changed:\n{before}\n---\n{after}"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        ensure!(
            !mounts
                .lines()
                .any(|l| l.contains(" /etc/resolv.conf ") && l.contains("periscope-resolv")),
            "the bind mount leaked out of its namespace:\n{mounts}"
        );
        dns.check_running()
    });
}

/// The delaying forwarder adds its delay once to a lookup (A and AAAA go in
/// parallel), and the dropping one makes glibc retry.
#[test]
fn rig_forwarder_delays_and_drops() {
    run_test(LIMIT, || {
        let dns = Dnsmasq::start()?;
        let delay = Duration::from_millis(300);
        let mut slow = DnsRig::delaying(dns.addr(), delay)?;
        let direct = ResolvConf::via(dns.addr())?;
        let delayed = ResolvConf::via(slow.addr())?;
        let mut d = Vec::new();
        let mut s = Vec::new();
        for i in 0..3 {
            let a = python_getaddrinfo(&direct, &host(i))?;
            let b = python_getaddrinfo(&delayed, &host(10 + i))?;
            ensure!(a.addrs == [TARGET] && b.addrs == [TARGET], "{a:?} {b:?}");
            d.push(a.elapsed_ms);
            s.push(b.elapsed_ms);
        }
        let grew = median(s.clone()) - median(d.clone());
        ensure!(
            (grew - 300.0).abs() <= 60.0,
            "the forwarder should add 300 ms ± 20%: direct {d:?} ms, delayed {s:?} ms; its log:\n{}",
            slow.log()
        );
        ensure!(
            slow.events("answered").len() >= 6,
            "forwarder log:\n{}",
            slow.log()
        );
        slow.check_running()?;

        let mut dropping = DnsRig::start(RigMode::Forward {
            upstream: dns.addr(),
            delay: Duration::ZERO,
            drop_first: 1,
        })?;
        let retry = ResolvConf::new(&[dropping.addr()], &["timeout:1", "attempts:3"])?;
        let g = python_getaddrinfo(&retry, &host(20))?;
        ensure!(g.addrs == [TARGET], "{g:?}; rig log:\n{}", dropping.log());
        ensure!(
            g.elapsed_ms >= 900.0 && g.elapsed_ms < 3000.0,
            "one dropped try with timeout:1 should cost about 1 s: {g:?}"
        );
        ensure!(
            !dropping.events("dropped").is_empty() && !dropping.events("answered").is_empty(),
            "rig log:\n{}",
            dropping.log()
        );
        dropping.check_running()?;

        let black = DnsRig::start(RigMode::Drop)?;
        let two = ResolvConf::new(&[black.addr(), dns.addr()], &["timeout:1", "attempts:1"])?;
        let g = python_getaddrinfo(&two, &host(21))?;
        ensure!(
            g.addrs == [TARGET] && g.elapsed_ms >= 900.0,
            "dead first nameserver: {g:?}"
        );
        Ok(())
    });
}

/// The garbage server answers the bad client's packets (UDP and TCP).
#[test]
fn rig_garbage_server_answers_garbage() {
    run_test(LIMIT, || {
        let mut rig = DnsRig::start(RigMode::Garbage)?;
        let f = periscope_tests::clients::python(BAD_CLIENT_PY, &[&rig.addr().to_string(), "12"])?;
        ensure!(f.stdout.lines().any(|l| l == "done"), "{f:?}");
        let replies = f.stdout.lines().filter(|l| l.contains(" reply ")).count();
        ensure!(
            replies >= 12,
            "the bad client got {replies} replies:\n{}",
            f.stdout
        );
        ensure!(rig.events("garbage").len() >= 11, "rig log:\n{}", rig.log());
        ensure!(
            !rig.events("garbage-tcp-cut").is_empty(),
            "rig log:\n{}",
            rig.log()
        );
        rig.check_running()
    });
}

/// The slow backend sleeps as told; curl through the unshare recipe works.
#[test]
fn rig_slow_http_server_and_curl_by_name() {
    run_test(LIMIT, || {
        let dns = Dnsmasq::start()?;
        let srv = SlowHttpServer::start()?;
        let resolv = ResolvConf::via(dns.addr())?;
        // Warm up (the first request costs Python some imports).
        curl1_via(
            &resolv,
            &format!("http://{}:{}/warmup", host(0), srv.port()),
            &[],
        )?;
        let (_, fast) = curl1_via(&resolv, &srv.url(&host(1), Duration::ZERO), &[])?;
        let (_, slow) = curl1_via(&resolv, &srv.url(&host(2), Duration::from_millis(300)), &[])?;
        ensure!(
            fast.http_code == 200 && slow.http_code == 200,
            "{fast:?} {slow:?}"
        );
        let grew = (slow.time_starttransfer - slow.time_pretransfer)
            - (fast.time_starttransfer - fast.time_pretransfer);
        ensure!(
            (0.28..0.5).contains(&grew),
            "the handler should add 300 ms: {fast:?} {slow:?}"
        );
        ensure!(
            fast.time_namelookup > 0.0 && fast.num_connects == 1,
            "{fast:?}"
        );
        Ok(())
    });
}

// ====================================================================== the agent

/// 1. curl by name over HTTP: DNS A and AAAA spans, and the client span's
///    phases dns, connect, request.send, server, response.receive tiling it,
///    the dns phase being curl's getaddrinfo with the wire lookups under it;
///    nginx's server span has its own three phases.
#[test]
fn curl_by_name_http_phases_and_dns_spans() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let mut dns = Dnsmasq::start()?;
        let mut nginx = Nginx::start()?;
        let worker = nginx.worker_pid()?;
        let (mut agent, _control) = start_agent(&rotel)?;
        let resolv = ResolvConf::via(dns.addr())?;

        let url = format!("http://{WWW}:{}/", nginx.port());
        let (pid, t) = curl1_via(&resolv, &url, &[])?;
        ensure!(
            t.http_code == 200 && t.num_connects == 1,
            "curl {url}: {t:?}"
        );

        let (clients, _) = http_clients(&rotel, pid, 1, HTTP_PHASES.len())?;
        let all = settle(
            &rotel,
            |s| is_wire_dns(s) && s.pid() == Some(pid),
            2,
            FAMILY_WAIT,
        );
        let all = settle_server(&rotel, all, worker);
        let mut e = Expect::new();
        e.that(clients.len() == 1, || {
            format!("{} HTTP client spans from curl, want 1", clients.len())
        });
        let c = &clients[0];
        e.that(c.name == "GET", || {
            format!("{}: name {:?}", short(c), c.name)
        });
        e.attr_int(c, "http.response.status_code", 200);
        e.attr_int(c, "server.port", nginx.port() as i64);
        e.attr_str(c, "network.peer.address", TARGET);

        let ph = phases_of(&all, c);
        expect_phases(&mut e, "curl http by name", c, &ph, HTTP_PHASES);
        expect_dns_phase(&mut e, &all, &ph, WWW, TARGET, dns.addr());

        // Loosely against curl's own measures (curl counts from its transfer
        // start, a little before it calls getaddrinfo).
        if let Some(d) = phase(&ph, "dns") {
            e.close_ms(
                "dns phase vs curl time_namelookup",
                d,
                d.duration_ms(),
                t.time_namelookup * 1e3,
                0.5,
                2.0,
            );
        }
        if let Some(cn) = phase(&ph, "connect") {
            let want = (t.time_connect - t.time_namelookup) * 1e3;
            e.close_ms(
                "connect phase vs curl time_connect - time_namelookup",
                cn,
                cn.duration_ms(),
                want,
                0.5,
                2.0,
            );
        }
        e.close_ms(
            "client span vs curl time_total",
            c,
            c.duration_ms(),
            t.time_total * 1e3,
            0.2,
            3.0,
        );

        // Every wire lookup curl made is under its dns phase.
        let wire = wire_dns_of(&all, pid, WWW);
        e.that(wire.len() == 2, || {
            format!(
                "curl's wire lookups of {WWW}: {} spans, want 2 (A, AAAA)",
                wire.len()
            )
        });
        // dnsmasq saw what the spans say was sent.
        let q = dns.queries();
        for t in ["A", "AAAA"] {
            e.that(q.iter().any(|x| x.qtype == t && x.name == WWW), || {
                format!("dnsmasq never logged {t} {WWW}:\n{}", dns.log())
            });
        }

        // A small page leaves at once: no server phases.
        expect_server_phases(&mut e, &all, worker, "/", "nginx server span", &[]);
        agent.check_running()?;
        nginx.check_running()?;
        dns.check_running()?;
        finish(e, &all, &[pid, worker, dns.pid()])
    });
}

/// Wait for a server span of `pid` (its phases, if any, come in the same
/// export batch); return every span.
fn settle_server(rotel: &Rotel, all: Vec<Span>, pid: u32) -> Vec<Span> {
    if all.iter().any(|s| is_server_of(s, pid)) {
        return all;
    }
    settle(rotel, |s| is_server_of(s, pid), 1, SPAN_WAIT)
}

/// 2. curl by name over HTTPS, two URLs on one connection: the first has a
///    `tls.handshake` phase between connect and request.send, the second
///    (reused) only request.send, server, response.receive.
#[test]
fn curl_by_name_https_phases_and_reuse() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let cert = TestCert::generate()?;
        let nginx = https_nginx(&cert)?;
        let worker = nginx.worker_pid()?;
        let (mut agent, _control) = start_agent(&rotel)?;
        let resolv = ResolvConf::via(dns.addr())?;

        let name = host(3);
        let urls = vec![
            format!("https://{name}:{}/", nginx.port()),
            format!("https://{name}:{}/index.html", nginx.port()),
        ];
        let run = curl_via(&resolv, &urls, &["-k"])?;
        let connects: Vec<u32> = run.transfers.iter().map(|t| t.num_connects).collect();
        ensure!(
            connects == [1, 0],
            "curl did not reuse its connection: {connects:?}"
        );
        let t = &run.transfers[0];
        ensure!(t.time_appconnect > 0.0, "curl did no TLS handshake? {t:?}");

        let (clients, all) =
            http_clients(&rotel, run.pid, 2, HTTPS_PHASES.len() + REUSED_PHASES.len())?;
        let mut e = Expect::new();
        e.that(clients.len() == 2, || {
            format!("{} HTTP client spans from curl, want 2", clients.len())
        });
        let first = &clients[0];
        let ph = phases_of(&all, first);
        expect_phases(
            &mut e,
            "curl https, first request",
            first,
            &ph,
            HTTPS_PHASES,
        );
        expect_dns_phase(&mut e, &all, &ph, &name, TARGET, dns.addr());
        e.attr_str(first, "url.scheme", "https");
        if let Some(h) = phase(&ph, "tls.handshake") {
            let want = (t.time_appconnect - t.time_connect) * 1e3;
            e.close_ms(
                "tls.handshake phase vs curl time_appconnect - time_connect",
                h,
                h.duration_ms(),
                want,
                0.5,
                2.0,
            );
        }
        if let Some(second) = clients.get(1) {
            let ph2 = phases_of(&all, second);
            expect_phases(
                &mut e,
                "curl https, reused connection",
                second,
                &ph2,
                REUSED_PHASES,
            );
            e.that(resolver_spans_of(&all, run.pid, &name).len() == 1, || {
                format!(
                    "curl resolved {name} once; resolver spans: {}",
                    resolver_spans_of(&all, run.pid, &name).len()
                )
            });
        }
        agent.check_running()?;
        finish(e, &all, &[run.pid, worker])
    });
}

/// 3a. Python: a standalone `socket.getaddrinfo` (a `getaddrinfo` span,
///     root, with its wire lookups as children) and `urllib` by name (a
///     client span whose `dns` phase is its getaddrinfo).
#[test]
fn python_getaddrinfo_and_urllib_by_name() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let nginx = Nginx::start()?;
        let (mut agent, _control) = start_agent(&rotel)?;
        let resolv = ResolvConf::via(dns.addr())?;

        const SCRIPT: &str = r#"
import socket, sys, urllib.request
port = int(sys.argv[1])
infos = socket.getaddrinfo(sys.argv[2], 80, proto=socket.IPPROTO_TCP)
print("api", " ".join(sorted({i[4][0] for i in infos})), flush=True)
with urllib.request.urlopen("http://%s:%d/" % (sys.argv[3], port), timeout=10) as r:
    body = r.read()
print("status", r.status, len(body), flush=True)
"#;
        let f = python_via(&resolv, SCRIPT, &[&nginx.port().to_string(), API, WWW])?;
        ensure!(
            f.stdout.contains(&format!("api {API_ADDR_S}")) && f.stdout.contains("status 200"),
            "python: {f:?}"
        );
        let pid = f.pid;
        let (clients, _) = http_clients(&rotel, pid, 1, HTTP_PHASES.len())?;
        // A and AAAA for each name, and the standalone getaddrinfo.
        let all = settle(
            &rotel,
            |s| s.pid() == Some(pid) && (is_wire_dns(s) || s.name == "getaddrinfo"),
            5,
            FAMILY_WAIT,
        );
        let mut e = Expect::new();

        // The standalone lookup.
        let gai: Vec<&Span> = resolver_spans_of(&all, pid, API);
        if e.that(gai.len() == 1, || {
            format!("{} resolver spans for {API} from python, want 1", gai.len())
        }) {
            let g = gai[0];
            expect_resolver(&mut e, g, "getaddrinfo", API, Some(API_ADDR_S), None);
            e.that(g.parent_span_id.is_none(), || {
                format!("{}: a standalone getaddrinfo must be a root", short(g))
            });
            expect_wire_pair(&mut e, &all, g, API, API_ADDR_S, dns.addr());
        }
        // urllib's request.
        e.that(clients.len() == 1, || {
            format!("{} HTTP client spans from python, want 1", clients.len())
        });
        let c = &clients[0];
        let ph = phases_of(&all, c);
        expect_phases(&mut e, "python urllib by name", c, &ph, HTTP_PHASES);
        expect_dns_phase(&mut e, &all, &ph, WWW, TARGET, dns.addr());
        agent.check_running()?;
        finish(e, &all, &[pid])
    });
}

/// 3b. getent: `ahosts` calls getaddrinfo (a `getaddrinfo` span with the wire
///     lookups under it); `hosts` calls gethostbyname2, so its wire lookups
///     (AAAA, then A) are roots of their own.
#[test]
fn getent_ahosts_and_hosts() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let (mut agent, _control) = start_agent(&rotel)?;
        let resolv = ResolvConf::via(dns.addr())?;

        let a = getent_via(&resolv, "ahosts", API)?;
        ensure!(
            a.status.success() && a.stdout.contains(API_ADDR_S),
            "getent ahosts: {a:?}"
        );
        let name = host(4);
        let h = getent_via(&resolv, "hosts", &name)?;
        ensure!(
            h.status.success() && h.stdout.contains(TARGET),
            "getent hosts: {h:?}"
        );

        settle(
            &rotel,
            |s| is_wire_dns(s) && (s.pid() == Some(a.pid) || s.pid() == Some(h.pid)),
            4,
            SPAN_WAIT,
        );
        let all = settle(
            &rotel,
            |s| s.name == "getaddrinfo" && s.pid() == Some(a.pid),
            1,
            FAMILY_WAIT,
        );
        let mut e = Expect::new();

        let gai = resolver_spans_of(&all, a.pid, API);
        if e.that(gai.len() == 1, || {
            format!(
                "{} resolver spans from `getent ahosts {API}`, want 1",
                gai.len()
            )
        }) {
            let g = gai[0];
            expect_resolver(&mut e, g, "getaddrinfo", API, Some(API_ADDR_S), None);
            e.that(g.parent_span_id.is_none(), || {
                format!("{}: must be a root", short(g))
            });
            expect_wire_pair(&mut e, &all, g, API, API_ADDR_S, dns.addr());
        }

        e.that(resolver_spans_of(&all, h.pid, &name).is_empty(), || {
            format!(
                "`getent hosts` never calls getaddrinfo, yet there is a resolver span for {name}"
            )
        });
        let wire = wire_dns_of(&all, h.pid, &name);
        let names: Vec<&str> = wire.iter().map(|s| s.name.as_str()).collect();
        e.that(names == ["DNS AAAA", "DNS A"], || {
            format!("`getent hosts {name}` wire spans {names:?}, want [\"DNS AAAA\", \"DNS A\"] (gethostbyname2 asks AAAA first)")
        });
        for s in &wire {
            let (qtype, answer) = if s.name == "DNS A" {
                ("A", Some(TARGET))
            } else {
                ("AAAA", None)
            };
            expect_wire(
                &mut e,
                s,
                &WireWant {
                    name: &name,
                    qtype,
                    rcode: Some("NOERROR"),
                    answer,
                    server: dns.addr(),
                    transport: "udp",
                },
            );
            e.that(s.parent_span_id.is_none(), || {
                format!(
                    "{}: no getaddrinfo was open, so it must be a root",
                    short(s)
                )
            });
        }
        agent.check_running()?;
        finish(e, &all, &[a.pid, h.pid])
    });
}

/// 3c. Node: `dns.lookup` (a standalone `getaddrinfo` span, from a libuv
///     worker thread), then `http.get` and `https.get` by name: client spans
///     with a `dns` phase (the lookup Node made for them) and the rest.
#[test]
fn node_dns_lookup_and_get_by_name() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let nginx = Nginx::start()?;
        let cert = TestCert::generate()?;
        let tls_nginx = https_nginx(&cert)?;
        let (mut agent, _control) = start_agent(&rotel)?;
        let resolv = ResolvConf::via(dns.addr())?;

        const SCRIPT: &str = r#"
const dns = require('dns'), http = require('http'), https = require('https');
const [api, hname, hport, sname, sport] = process.argv.slice(1);
const fail = e => { console.error(e); process.exit(1); };
dns.lookup(api, {all: true}, (err, addrs) => {
  if (err) fail(err);
  console.log('api ' + addrs.map(a => a.address).join(','));
  http.get({host: hname, port: +hport, path: '/', agent: false}, res => {
    res.resume();
    res.on('end', () => {
      console.log('http ' + res.statusCode);
      https.get({host: sname, port: +sport, path: '/', agent: false, rejectUnauthorized: false}, res2 => {
        res2.resume();
        res2.on('end', () => console.log('https ' + res2.statusCode));
      }).on('error', fail);
    });
  }).on('error', fail);
});
"#;
        let sname = host(5);
        let f = node_via(
            &resolv,
            SCRIPT,
            &[
                API,
                WWW,
                &nginx.port().to_string(),
                &sname,
                &tls_nginx.port().to_string(),
            ],
        )?;
        ensure!(
            f.stdout.contains(&format!("api {API_ADDR_S}"))
                && f.stdout.contains("http 200")
                && f.stdout.contains("https 200"),
            "node: {f:?}"
        );
        let pid = f.pid;
        let (clients, _) = http_clients(&rotel, pid, 2, 2 * HTTP_PHASES.len())?;
        // A and AAAA for each of three names, and the standalone getaddrinfo.
        let all = settle(
            &rotel,
            |s| s.pid() == Some(pid) && (is_wire_dns(s) || s.name == "getaddrinfo"),
            7,
            FAMILY_WAIT,
        );
        let mut e = Expect::new();

        let gai = resolver_spans_of(&all, pid, API);
        if e.that(gai.len() == 1, || {
            format!("{} resolver spans for {API} from node, want 1", gai.len())
        }) {
            let g = gai[0];
            expect_resolver(&mut e, g, "getaddrinfo", API, Some(API_ADDR_S), None);
            e.that(g.parent_span_id.is_none(), || {
                format!("{}: a standalone lookup must be a root", short(g))
            });
            let kids = wire_children(&all, g);
            e.that(kids.iter().any(|s| s.name == "DNS A"), || {
                format!(
                    "{}: no `DNS A` child; children: {:?}",
                    short(g),
                    kids.iter().map(|s| short(s)).collect::<Vec<_>>()
                )
            });
            for s in kids {
                expect_child_of(&mut e, s, g);
            }
        }

        e.that(clients.len() == 2, || {
            format!("{} HTTP client spans from node, want 2", clients.len())
        });
        for c in &clients {
            let ph = phases_of(&all, c);
            let https = c.str_attr("url.scheme") == Some("https");
            let (what, name) = if https {
                ("node https.get by name", sname.as_str())
            } else {
                ("node http.get by name", WWW)
            };
            // Node handshakes inside SSL_read/SSL_write; the agent sees that
            // handshake from the ciphertext (ClientHello to ServerHello).
            let want: &[&str] = if https { HTTPS_PHASES } else { HTTP_PHASES };
            expect_phases(&mut e, what, c, &ph, want);
            if let Some(d) = phase(&ph, "dns") {
                expect_resolver(&mut e, d, "dns", name, Some(TARGET), None);
                let kids = wire_children(&all, d);
                e.that(
                    kids.iter().any(|s| {
                        s.name == "DNS A" && s.str_attr("dns.question.name") == Some(name)
                    }),
                    || {
                        format!(
                            "{what}: the dns phase {} has no `DNS A` child for {name}",
                            short(d)
                        )
                    },
                );
            }
        }
        agent.check_running()?;
        finish(e, &all, &[pid])
    });
}

/// 4. A name that does not exist: NXDOMAIN wire spans (ERROR, error.type
///    NXDOMAIN), a failed getaddrinfo (ERROR, EAI_NONAME), from Python, curl
///    (which then sends no request) and getent.
#[test]
fn nxdomain() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let nginx = Nginx::start()?;
        let (mut agent, _control) = start_agent(&rotel)?;
        let resolv = ResolvConf::via(dns.addr())?;

        let py_name = missing(1);
        let g = python_getaddrinfo(&resolv, &py_name)?;
        ensure!(
            g.error == Some(-2),
            "python getaddrinfo({py_name}) should fail with EAI_NONAME: {g:?}"
        );
        let curl_name = missing(2);
        let url = format!("http://{curl_name}:{}/", nginx.port());
        let c = run_via(
            "curl",
            &resolv,
            &[
                periscope_tests::clients::CURL,
                "-sS",
                "--noproxy",
                "*",
                "-o",
                "/dev/null",
                &url,
            ],
            Duration::from_secs(30),
        )?;
        ensure!(
            c.status.code() == Some(6),
            "curl {url} should fail to resolve (exit 6): {c:?}"
        );
        let getent_name = missing(3);
        let h = getent_via(&resolv, "hosts", &getent_name)?;
        ensure!(
            h.status.code() == Some(2),
            "getent hosts {getent_name}: {h:?}"
        );

        settle(
            &rotel,
            |s| is_wire_dns(s) && [g.pid, c.pid, h.pid].contains(&s.pid().unwrap_or(0)),
            5,
            SPAN_WAIT,
        );
        let all = settle(
            &rotel,
            |s| s.name == "getaddrinfo" && [g.pid, c.pid].contains(&s.pid().unwrap_or(0)),
            2,
            FAMILY_WAIT,
        );
        let mut e = Expect::new();
        for (who, pid, name) in [
            ("python", g.pid, py_name.as_str()),
            ("curl", c.pid, curl_name.as_str()),
        ] {
            let r = resolver_spans_of(&all, pid, name);
            if !e.that(r.len() == 1, || {
                format!("{who}: {} getaddrinfo spans for {name}, want 1", r.len())
            }) {
                continue;
            }
            let r = r[0];
            expect_resolver(&mut e, r, "getaddrinfo", name, None, Some("EAI_NONAME"));
            e.attr_absent(r, "dns.answers");
            let kids = wire_children(&all, r);
            let a: Vec<&&Span> = kids.iter().filter(|s| s.name == "DNS A").collect();
            e.that(!a.is_empty(), || {
                format!("{who}: {} has no `DNS A` child", short(r))
            });
            for s in kids {
                let qtype = s.name.trim_start_matches("DNS ");
                expect_wire(
                    &mut e,
                    s,
                    &WireWant {
                        name,
                        qtype,
                        rcode: Some("NXDOMAIN"),
                        answer: None,
                        server: dns.addr(),
                        transport: "udp",
                    },
                );
            }
        }
        e.that(!all.iter().any(|s| is_http_client_of(s, c.pid)), || {
            format!("curl could not resolve {curl_name}, yet there is an HTTP client span from it")
        });
        let wire = wire_dns_of(&all, h.pid, &getent_name);
        e.that(!wire.is_empty(), || {
            format!("no wire DNS span from `getent hosts {getent_name}`")
        });
        for s in wire {
            let qtype = s.name.trim_start_matches("DNS ");
            expect_wire(
                &mut e,
                s,
                &WireWant {
                    name: &getent_name,
                    qtype,
                    rcode: Some("NXDOMAIN"),
                    answer: None,
                    server: dns.addr(),
                    transport: "udp",
                },
            );
        }
        agent.check_running()?;
        finish(e, &all, &[g.pid, c.pid, h.pid])
    });
}

/// Server phases appear when a transfer takes time: a Python client with a
/// small receive buffer reads an 8 MiB file from nginx 16 KiB at a time,
/// pausing 2 ms between reads, so nginx (whose send buffer holds at most a
/// few MiB) spends a good part of a second writing the response. (curl's
/// `--limit-rate` is no slow reader: it reads what has arrived at once and
/// sleeps afterwards.)
#[test]
fn server_phases_when_the_response_takes_time() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let nginx = Nginx::start()?;
        let worker = nginx.worker_pid()?;
        let (mut agent, _control) = start_agent(&rotel)?;
        let resolv = ResolvConf::via(dns.addr())?;
        std::fs::write(nginx.www().join("huge.bin"), vec![7u8; 8 << 20])?;
        const SLOW_READER: &str = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: " + sys.argv[1].encode() + b"\r\nConnection: close\r\n\r\n")
n = 0
while True:
    b = s.recv(16384)
    if not b:
        break
    n += len(b)
    time.sleep(0.002)
print("read", n, flush=True)
"#;
        let f = python_via(&resolv, SLOW_READER, &[&host(8), &nginx.port().to_string()])?;
        ensure!(f.stdout.contains("read 838"), "slow reader: {f:?}");
        let pid = f.pid;
        let (clients, _) = http_clients(&rotel, pid, 1, HTTP_PHASES.len())?;
        let _ = settle(&rotel, |s| is_server_of(s, worker) && s.path() == Some("/huge.bin"), 1, SPAN_WAIT);
        let all = settle(&rotel, |s| s.pid() == Some(worker) && is_phase(s), SERVER_PHASES.len(), FAMILY_WAIT);
        let mut e = Expect::new();
        expect_server_phases(&mut e, &all, worker, "/huge.bin", "nginx, slow download", &SERVER_PHASES);
        if let Some(s) = all.iter().find(|s| is_server_of(s, worker) && s.path() == Some("/huge.bin")) {
            let ph = phases_of(&all, s);
            let send = phase_ms(&ph, "response.send").unwrap_or(0.0);
            // How much the socket buffers absorb varies (autotuning), so
            // only "most of the span, and well past the 1 ms rule".
            e.that(send >= 50.0 && send >= 0.8 * s.duration_ms(), || {
                format!("nginx's response.send took {send:.1} ms of a {:.1} ms span; want most of it (>= 50 ms)", s.duration_ms())
            });
        }
        if let Some(c) = clients.first() {
            let ph = phases_of(&all, c);
            let receive = phase_ms(&ph, "response.receive").unwrap_or(0.0);
            e.that(receive >= 500.0, || {
                format!("the slow reader's response.receive took {receive:.1} ms, want >= 500 ms (512 reads, 2 ms apart)")
            });
        }
        agent.check_running()?;
        finish(e, &all, &[pid, worker, dns.pid()])
    });
}

/// 5. A first request and a reuse of its connection, by curl (two URLs) and
///    Python's http.client (two requests on one HTTPConnection): the first
///    has dns and connect phases, the second only request.send, server,
///    response.receive.
#[test]
fn first_request_then_reused_connection() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let nginx = Nginx::start()?;
        let (mut agent, _control) = start_agent(&rotel)?;
        let resolv = ResolvConf::via(dns.addr())?;
        let mut e = Expect::new();

        let name = host(6);
        let urls = vec![
            format!("http://{name}:{}/", nginx.port()),
            format!("http://{name}:{}/big.bin", nginx.port()),
        ];
        let run = curl_via(&resolv, &urls, &[])?;
        let connects: Vec<u32> = run.transfers.iter().map(|t| t.num_connects).collect();
        ensure!(
            connects == [1, 0],
            "curl did not reuse its connection: {connects:?}"
        );

        const SCRIPT: &str = r#"
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
for p in ("/", "/index.html"):
    c.request("GET", p)
    r = c.getresponse()
    r.read()
    print("status", r.status, flush=True)
c.close()
"#;
        let pyname = host(7);
        let f = python_via(&resolv, SCRIPT, &[&pyname, &nginx.port().to_string()])?;
        ensure!(f.stdout.matches("status 200").count() == 2, "python: {f:?}");

        let want = HTTP_PHASES.len() + REUSED_PHASES.len();
        let (curl_spans, _) = http_clients(&rotel, run.pid, 2, want)?;
        let (py_spans, all) = http_clients(&rotel, f.pid, 2, want)?;
        for (who, spans, name) in [
            ("curl", &curl_spans, &name),
            ("python http.client", &py_spans, &pyname),
        ] {
            if !e.that(spans.len() == 2, || {
                format!("{who}: {} HTTP client spans, want 2", spans.len())
            }) {
                continue;
            }
            let ph = phases_of(&all, &spans[0]);
            expect_phases(
                &mut e,
                &format!("{who}, first request"),
                &spans[0],
                &ph,
                HTTP_PHASES,
            );
            expect_dns_phase(&mut e, &all, &ph, name, TARGET, dns.addr());
            let ph2 = phases_of(&all, &spans[1]);
            expect_phases(
                &mut e,
                &format!("{who}, reused connection"),
                &spans[1],
                &ph2,
                REUSED_PHASES,
            );
        }
        agent.check_running()?;
        finish(e, &all, &[run.pid, f.pid])
    });
}

/// The default rule: every request carries its phase durations as
/// attributes (`periscope.phase.<phase>.duration_ns`, adding up to the
/// span); only a request that took 100 ms or more, or failed, also gets them
/// as child spans. A resolution stays the request's child either way (it is
/// a call of its own, with its wire lookups).
#[test]
fn phase_spans_only_for_slow_or_failed_requests() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let nginx = Nginx::start()?;
        let srv = SlowHttpServer::start()?;
        let (mut agent, _control) = start_agent_with(&rotel, &[])?;
        let resolv = ResolvConf::via(dns.addr())?;
        let mut e = Expect::new();

        let (fast_pid, _) = curl1_via(&resolv, &format!("http://{}:{}/", host(50), nginx.port()), &[])?;
        let (slow_pid, _) = curl1_via(&resolv, &srv.url(&host(51), Duration::from_millis(300)), &[])?;
        let (failed_pid, t) = curl1_via(&resolv, &format!("http://{}:{}/no-such-page", host(52), nginx.port()), &[])?;
        ensure!(t.http_code == 404, "nginx answered {} for a missing page", t.http_code);

        let (fast, _) = http_clients(&rotel, fast_pid, 1, 1)?;
        let (slow, _) = http_clients(&rotel, slow_pid, 1, HTTP_PHASES.len())?;
        let (failed, all) = http_clients(&rotel, failed_pid, 1, HTTP_PHASES.len())?;
        let fast = &fast[0];
        e.that(fast.duration_ms() < 100.0, || format!("the fast request took {:.1} ms", fast.duration_ms()));
        let children: Vec<&str> = phases_of(&all, fast).iter().map(|s| s.name.as_str()).collect();
        e.that(children == ["dns"], || {
            format!("fast request: phase children {children:?}, want only its resolution [\"dns\"]")
        });
        let mut sum_ns = 0i64;
        for phase in HTTP_PHASES {
            let key = format!("periscope.phase.{phase}.duration_ns");
            match fast.int_attr(&key) {
                Some(ns) if ns >= 0 => sum_ns += ns,
                other => e.fail(format!("fast request: {key} = {other:?}, want a duration")),
            }
        }
        let span_ns = fast.duration_ns() as f64;
        e.that((sum_ns as f64 - span_ns).abs() <= span_ns * 0.05 + 2_000.0, || {
            format!("fast request: phase attributes add up to {sum_ns} ns, the span lasts {span_ns} ns")
        });
        for (what, span) in [("slow request (300 ms handler)", &slow[0]), ("failed request (404)", &failed[0])] {
            let ph = phases_of(&all, span);
            expect_phases(&mut e, what, span, &ph, HTTP_PHASES);
            e.that(span.int_attr("periscope.phase.server.duration_ns").is_some(), || {
                format!("{what}: no periscope.phase.server.duration_ns attribute")
            });
        }
        agent.check_running()?;
        finish(e, &all, &[fast_pid, slow_pid, failed_pid, srv.pid()])
    });
}

/// One curl by name and what the agent made of it: the client span, its
/// phases' durations (ms, by name) and every span.
struct Measured {
    client: Span,
    phases: Vec<(String, f64)>,
}

impl Measured {
    fn ms(&self, name: &str) -> Option<f64> {
        self.phases.iter().find(|(n, _)| n == name).map(|(_, d)| *d)
    }
}

fn measure(
    rotel: &Rotel,
    e: &mut Expect,
    resolv: &ResolvConf,
    url: &str,
    what: &str,
) -> anyhow::Result<(Measured, Vec<Span>)> {
    let (pid, t) = curl1_via(resolv, url, &[])?;
    ensure!(t.http_code == 200, "{what}: curl {url}: {t:?}");
    let (clients, all) = http_clients(rotel, pid, 1, HTTP_PHASES.len())?;
    let c = clients[0].clone();
    let ph = phases_of(&all, &c);
    expect_phases(e, what, &c, &ph, HTTP_PHASES);
    let phases = ph
        .iter()
        .map(|s| (s.name.clone(), s.duration_ms()))
        .collect();
    Ok((Measured { client: c, phases }, all))
}

fn medians(runs: &[Measured], name: &str) -> f64 {
    median(runs.iter().filter_map(|m| m.ms(name)).collect())
}

/// Compare the phases of two sets of runs: `grows` must grow by `by` ± 20%,
/// every other phase by less than 20 ms either way.
fn expect_only_grows(
    e: &mut Expect,
    what: &str,
    base: &[Measured],
    slow: &[Measured],
    grows: &str,
    by: Duration,
) {
    let by_ms = by.as_secs_f64() * 1e3;
    let table = |runs: &[Measured]| {
        runs.iter()
            .map(|m| {
                m.phases
                    .iter()
                    .map(|(n, d)| format!("{n}={d:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    for name in HTTP_PHASES {
        let (b, s) = (medians(base, name), medians(slow, name));
        let diff = s - b;
        eprintln!("{what}: phase {name}: median {b:.3} ms -> {s:.3} ms ({diff:+.3} ms)");
        if *name == grows {
            e.that((diff - by_ms).abs() <= 0.2 * by_ms, || {
                format!("{what}: phase {name} grew by {diff:.2} ms (median {b:.2} -> {s:.2}), want {by_ms:.0} ms ± 20%\n  base: {}\n  slow: {}", table(base), table(slow))
            });
        } else {
            e.that(diff.abs() < 20.0, || {
                format!("{what}: phase {name} changed by {diff:.2} ms (median {b:.2} -> {s:.2}), want < 20 ms\n  base: {}\n  slow: {}", table(base), table(slow))
            });
        }
    }
    let (b, s) = (
        median(base.iter().map(|m| m.client.duration_ms()).collect()),
        median(slow.iter().map(|m| m.client.duration_ms()).collect()),
    );
    e.that(((s - b) - by_ms).abs() <= 0.2 * by_ms + 20.0, || {
        format!("{what}: the client span grew by {:.2} ms (median {b:.2} -> {s:.2}), want about {by_ms:.0} ms", s - b)
    });
}

/// 6. A slow resolver (a forwarder adding 300 ms in front of dnsmasq) makes
///    only the `dns` phase grow, by 300 ms ± 20%; a slow handler (300 ms)
///    makes only the `server` phase grow (and the server span's `handler`).
#[test]
fn slow_resolver_and_slow_server_grow_only_their_phase() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let nginx = Nginx::start()?;
        let srv = SlowHttpServer::start()?;
        let delay = Duration::from_millis(300);
        let mut fwd = DnsRig::delaying(dns.addr(), delay)?;
        let (mut agent, _control) = start_agent(&rotel)?;
        let direct = ResolvConf::via(dns.addr())?;
        let slow = ResolvConf::via(fwd.addr())?;
        let mut e = Expect::new();

        // Warm up nginx, the page cache, the Python server and the agent's
        // view of curl.
        curl1_via(&direct, &format!("http://{WWW}:{}/", nginx.port()), &[])?;
        curl1_via(&direct, &format!("http://{WWW}:{}/warmup", srv.port()), &[])?;

        let (mut base, mut delayed) = (Vec::new(), Vec::new());
        for i in 0..3 {
            let url = format!("http://{}:{}/", host(10 + i), nginx.port());
            base.push(measure(&rotel, &mut e, &direct, &url, "direct resolver")?.0);
            let url = format!("http://{}:{}/", host(20 + i), nginx.port());
            delayed.push(measure(&rotel, &mut e, &slow, &url, "resolver + 300 ms")?.0);
        }
        expect_only_grows(&mut e, "slow resolver", &base, &delayed, "dns", delay);
        e.that(fwd.events("answered").len() >= 6, || {
            format!("the forwarder answered too little:\n{}", fwd.log())
        });
        fwd.check_running()?;

        // The slow handler, through the direct resolver.
        let (mut fast, mut slowh) = (Vec::new(), Vec::new());
        for i in 0..3 {
            let url = srv.url(&host(30 + i), Duration::ZERO);
            fast.push(measure(&rotel, &mut e, &direct, &url, "handler 0 ms")?.0);
            let url = srv.url(&host(40 + i), delay);
            slowh.push(measure(&rotel, &mut e, &direct, &url, "handler 300 ms")?.0);
        }
        expect_only_grows(&mut e, "slow handler", &fast, &slowh, "server", delay);

        // The backend's own server spans carry the sleep; their request and
        // response move at once, so they get no phases.
        settle(&rotel, |s| is_server_of(s, srv.pid()), 7, SPAN_WAIT);
        let all = rotel.spans_after(Duration::from_secs(1));
        let took = |path: &str| -> Vec<f64> {
            all.iter()
                .filter(|s| is_server_of(s, srv.pid()) && s.path() == Some(path))
                .map(|s| s.duration_ms())
                .collect()
        };
        let (h0, h300) = (took("/sleep/0"), took("/sleep/300"));
        e.that(h0.len() == 3 && h300.len() == 3, || {
            format!("python server spans: {} for /sleep/0, {} for /sleep/300, want 3 each", h0.len(), h300.len())
        });
        let grew = median(h300.clone()) - median(h0.clone());
        e.that((grew - 300.0).abs() <= 60.0, || {
            format!("the python server span grew by {grew:.2} ms ({h0:?} -> {h300:?}), want 300 ms ± 20%")
        });
        for s in all.iter().filter(|s| is_server_of(s, srv.pid())) {
            let ph = phases_of(&all, s);
            expect_phases(&mut e, "python server span", s, &ph, &[]);
        }
        let mut pids: Vec<u32> = [&base, &delayed, &fast, &slowh]
            .iter()
            .flat_map(|runs| runs.iter().filter_map(|m| m.client.pid()))
            .collect();
        pids.extend([srv.pid(), fwd.pid()]);
        agent.check_running()?;
        finish(e, &all, &pids)
    });
}

/// 7. Retries and timeouts: a forwarder that drops the first copy of each
///    question makes glibc send it again (`periscope.dns.attempts` >= 2 on
///    one span); a first nameserver that never answers gives a span with
///    status ERROR and `error.type` = `timeout`, and the second nameserver's
///    answer a span of its own.
#[test]
fn retries_and_timeouts() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let mut dropping = DnsRig::start(RigMode::Forward {
            upstream: dns.addr(),
            delay: Duration::ZERO,
            drop_first: 1,
        })?;
        let mut black = DnsRig::start(RigMode::Drop)?;
        let (mut agent, _control) = start_agent(&rotel)?;
        let mut e = Expect::new();

        let retry = ResolvConf::new(&[dropping.addr()], &["timeout:1", "attempts:3"])?;
        let rname = host(50);
        let g = python_getaddrinfo(&retry, &rname)?;
        ensure!(
            g.addrs == [TARGET] && g.elapsed_ms >= 900.0,
            "retried lookup: {g:?}; rig:\n{}",
            dropping.log()
        );

        let two = ResolvConf::new(&[black.addr(), dns.addr()], &["timeout:1", "attempts:1"])?;
        let tname = host(51);
        let t = python_getaddrinfo(&two, &tname)?;
        ensure!(
            t.addrs == [TARGET] && t.elapsed_ms >= 900.0,
            "lookup past a dead nameserver: {t:?}"
        );

        settle(
            &rotel,
            |s| is_wire_dns(s) && s.pid() == Some(g.pid),
            2,
            SPAN_WAIT,
        );
        // The lookup that got no answer: a wire span without a response code.
        let all = settle(
            &rotel,
            |s| {
                is_wire_dns(s)
                    && s.pid() == Some(t.pid)
                    && s.attr("periscope.dns.response_code").is_none()
            },
            1,
            TIMEOUT_WAIT,
        );

        // Retried: one span per question, attempts >= 2, answered.
        let wire = wire_dns_of(&all, g.pid, &rname);
        let a: Vec<&&Span> = wire.iter().filter(|s| s.name == "DNS A").collect();
        if e.that(a.len() == 1, || {
            format!(
                "retried lookup of {rname}: {} `DNS A` spans, want 1 (one lookup, sent twice)",
                a.len()
            )
        }) {
            let s = a[0];
            expect_wire(
                &mut e,
                s,
                &WireWant {
                    name: &rname,
                    qtype: "A",
                    rcode: Some("NOERROR"),
                    answer: Some(TARGET),
                    server: dropping.addr(),
                    transport: "udp",
                },
            );
            let n = s.int_attr("periscope.dns.attempts");
            e.that(n.is_some_and(|n| n >= 2), || format!("{}: periscope.dns.attempts = {n:?}, want >= 2 (the rig dropped the first copy)", short(s)));
            e.that(s.duration_ms() >= 900.0, || {
                format!(
                    "{}: lasts {:.1} ms; the answer came after a 1 s timeout",
                    short(s),
                    s.duration_ms()
                )
            });
        }
        if let [r] = resolver_spans_of(&all, g.pid, &rname)[..] {
            expect_resolver(&mut e, r, "getaddrinfo", &rname, Some(TARGET), None);
            e.that(r.duration_ms() >= 900.0, || {
                format!("{}: getaddrinfo waited for the retry (~1 s)", short(r))
            });
        } else {
            e.fail(format!("no single getaddrinfo span for {rname}"));
        }

        // Timed out on the dead nameserver, answered by the next; all of it
        // under the getaddrinfo call that was open when the queries were sent.
        let wire = wire_dns_of(&all, t.pid, &tname);
        let (dead, live): (Vec<&Span>, Vec<&Span>) = wire
            .iter()
            .filter(|s| s.name == "DNS A")
            .partition(|s| s.attr("periscope.dns.response_code").is_none());
        if e.that(dead.len() == 1, || {
            format!(
                "{} unanswered `DNS A` spans for {tname} (sent to the dead nameserver {}), want 1",
                dead.len(),
                black.addr()
            )
        }) {
            expect_wire(
                &mut e,
                dead[0],
                &WireWant {
                    name: &tname,
                    qtype: "A",
                    rcode: None,
                    answer: None,
                    server: black.addr(),
                    transport: "udp",
                },
            );
        }
        if e.that(live.len() == 1, || {
            format!(
                "{} answered `DNS A` spans for {tname} (from dnsmasq), want 1",
                live.len()
            )
        }) {
            expect_wire(
                &mut e,
                live[0],
                &WireWant {
                    name: &tname,
                    qtype: "A",
                    rcode: Some("NOERROR"),
                    answer: Some(TARGET),
                    server: dns.addr(),
                    transport: "udp",
                },
            );
        }
        if let [r] = resolver_spans_of(&all, t.pid, &tname)[..] {
            expect_resolver(&mut e, r, "getaddrinfo", &tname, Some(TARGET), None);
            for s in &wire {
                expect_child_of(&mut e, s, r);
            }
        } else {
            e.fail(format!("no single getaddrinfo span for {tname}"));
        }
        dropping.check_running()?;
        black.check_running()?;
        agent.check_running()?;
        finish(e, &all, &[g.pid, t.pid, dropping.pid(), black.pid()])
    });
}

/// 8. Bad input: malformed, truncated and compression-looping DNS messages
///    (queries from a traced client, answers from a garbage server, over UDP
///    and TCP): the agent keeps running, counts them
///    (`counters.dns_parse_errors`), and later lookups still give spans.
#[test]
fn malformed_dns_is_counted_and_harmless() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let mut garbage = DnsRig::start(RigMode::Garbage)?;
        let (mut agent, control) = start_agent(&rotel)?;
        let before = control.status()?;
        let errors_before = before.counter("dns_parse_errors").unwrap_or(0);

        let mut pids = vec![garbage.pid()];
        for round in 0..2 {
            let f = periscope_tests::clients::python(
                BAD_CLIENT_PY,
                &[&garbage.addr().to_string(), "12"],
            )
            .with_context(|| format!("bad client, round {round}"))?;
            ensure!(f.stdout.lines().any(|l| l == "done"), "bad client: {f:?}");
            pids.push(f.pid);
            agent.check_running()?;
        }
        garbage.check_running()?;

        // Still alive and still tracing.
        let resolv = ResolvConf::via(dns.addr())?;
        let name = host(60);
        let g = python_getaddrinfo(&resolv, &name)?;
        ensure!(g.addrs == [TARGET], "{g:?}");
        pids.push(g.pid);
        let all = settle(
            &rotel,
            |s| s.pid() == Some(g.pid) && (is_wire_dns(s) || s.name == "getaddrinfo"),
            3,
            SPAN_WAIT,
        );
        let mut e = Expect::new();
        let r = resolver_spans_of(&all, g.pid, &name);
        if e.that(r.len() == 1, || {
            format!(
                "after the garbage: {} getaddrinfo spans for {name}, want 1",
                r.len()
            )
        }) {
            expect_resolver(&mut e, r[0], "getaddrinfo", &name, Some(TARGET), None);
            expect_wire_pair(&mut e, &all, r[0], &name, TARGET, dns.addr());
        }

        let st = control.wait_status(
            "counters.dns_parse_errors > 0",
            Duration::from_secs(15),
            |s| {
                s.counter("dns_parse_errors")
                    .is_ok_and(|n| n > errors_before)
            },
        );
        match st {
            Ok(s) => {
                let n = s.counter("dns_parse_errors")?;
                eprintln!("dns_parse_errors: {errors_before} -> {n}");
            }
            Err(err) => e.fail(format!("{err:#}")),
        }
        agent.check_running()?;
        let log = agent.log();
        let panics = panic_lines(&log);
        e.that(panics.is_empty(), || {
            format!("the agent's log shows a crash:\n{}", panics.join("\n"))
        });
        finish(e, &all, &pids)
    });
}

/// 9. The `phases` and `dns` features switch at run time (within a second):
///    with `phases` disabled a client span has no phase children while DNS
///    spans still come; with `dns` disabled no wire DNS span and no
///    getaddrinfo span comes while HTTP spans still do; enabling both brings
///    everything back.
#[test]
fn phases_and_dns_features_switch_at_run_time() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let dns = Dnsmasq::start()?;
        let nginx = Nginx::start()?;
        let (mut agent, control) = start_agent(&rotel)?;
        let resolv = ResolvConf::via(dns.addr())?;
        let mut e = Expect::new();
        let mut pids = Vec::new();
        // Changes apply within a second.
        let apply = Duration::from_millis(1500);

        let mut run = |name: &str| -> anyhow::Result<(u32, Span)> {
            let url = format!("http://{name}:{}/", nginx.port());
            let (pid, t) = curl1_via(&resolv, &url, &[])?;
            ensure!(t.http_code == 200, "curl {url}: {t:?}");
            pids.push(pid);
            let c = rotel.try_wait_for_spans(|s| is_http_client_of(s, pid), 1, SPAN_WAIT)?;
            Ok((pid, c[0].clone()))
        };

        // Everything on.
        let (p0, c0) = run(&host(52))?;
        let all = settle(
            &rotel,
            |s| s.parent_span_id.as_deref() == Some(c0.span_id.as_str()),
            HTTP_PHASES.len(),
            FAMILY_WAIT,
        );
        expect_phases(
            &mut e,
            "all features on",
            &c0,
            &phases_of(&all, &c0),
            HTTP_PHASES,
        );
        e.that(!wire_dns_of(&all, p0, &host(52)).is_empty(), || {
            "no wire DNS span with dns enabled".into()
        });

        // phases off: no phase children; DNS spans still come.
        control.ok(&["disable", "phases"])?;
        std::thread::sleep(apply);
        let (p1, c1) = run(&host(53))?;
        settle(
            &rotel,
            |s| is_wire_dns(s) && s.pid() == Some(p1),
            2,
            FAMILY_WAIT,
        );
        let all = rotel.spans_after(Duration::from_secs(2));
        let ph = phases_of(&all, &c1);
        e.that(ph.is_empty(), || {
            format!(
                "phases disabled, yet {} has phases {:?}",
                short(&c1),
                ph.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
            )
        });
        e.that(wire_dns_of(&all, p1, &host(53)).len() == 2, || {
            format!(
                "phases disabled, dns enabled: want the A and AAAA spans for {}, got {}",
                host(53),
                wire_dns_of(&all, p1, &host(53)).len()
            )
        });

        // The lookup is no phase now: a standalone getaddrinfo span.
        let r = resolver_spans_of(&all, p1, &host(53));
        if e.that(r.len() == 1, || {
            format!(
                "phases disabled, dns enabled: {} resolver spans for {}, want 1",
                r.len(),
                host(53)
            )
        }) {
            expect_resolver(&mut e, r[0], "getaddrinfo", &host(53), Some(TARGET), None);
            e.attr_absent(r[0], PHASE_ATTR);
        }

        // dns off (phases back on): no DNS spans, HTTP spans still come.
        control.ok(&["enable", "phases"])?;
        control.ok(&["disable", "dns"])?;
        std::thread::sleep(apply);
        let (p2, c2) = run(&host(54))?;
        let all = rotel.spans_after(Duration::from_secs(3));
        e.that(wire_dns_of(&all, p2, &host(54)).is_empty(), || {
            format!("dns disabled, yet wire DNS spans for {} came", host(54))
        });
        let gai: Vec<&Span> = all
            .iter()
            .filter(|s| s.pid() == Some(p2) && s.name == "getaddrinfo")
            .collect();
        e.that(gai.is_empty(), || {
            format!("dns disabled, yet {} getaddrinfo spans came", gai.len())
        });
        let ph = phases_of(&all, &c2);
        e.that(!ph.is_empty() && phase(&ph, "connect").is_some(), || {
            format!(
                "phases enabled again, yet {} has phases {:?}",
                short(&c2),
                ph.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
            )
        });

        // Both back on.
        control.ok(&["enable", "dns"])?;
        std::thread::sleep(apply);
        let (p3, c3) = run(&host(55))?;
        settle(
            &rotel,
            |s| s.parent_span_id.as_deref() == Some(c3.span_id.as_str()),
            HTTP_PHASES.len(),
            FAMILY_WAIT,
        );
        let all = settle(
            &rotel,
            |s| is_wire_dns(s) && s.pid() == Some(p3),
            2,
            FAMILY_WAIT,
        );
        let ph = phases_of(&all, &c3);
        expect_phases(&mut e, "all features on again", &c3, &ph, HTTP_PHASES);
        expect_dns_phase(&mut e, &all, &ph, &host(55), TARGET, dns.addr());
        agent.check_running()?;
        finish(e, &all, &pids)
    });
}
