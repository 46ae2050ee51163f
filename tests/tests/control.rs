//! End-to-end tests of the agent's run-time control: the control socket and
//! the `periscope status|enable|disable|filter|sample` CLI, against the real
//! agent tracing real nginx and curl, with spans checked at a real Rotel.
//!
//! The contract these tests hold the agent to (see shared/DESIGN.md):
//! - `disable tls` stops HTTPS spans within a second (the TLS uprobes are
//!   detached; ciphertext seen at the socket is never parsed as HTTP) while
//!   plain HTTP spans keep flowing; `enable tls` brings HTTPS spans back; the
//!   daemon is never restarted;
//! - `filter --pid P` traces only process P, `filter --clear` everything again;
//! - `sample 0` exports nothing and counts every span built as sampled out,
//!   `sample 1` exports everything again;
//! - `status --json` is one valid JSON object whose counters agree with what
//!   the OTLP receiver got, with a healthy exporter, attached TLS programs and
//!   the traced processes;
//! - only root may talk to the socket (exit 4 otherwise); garbage on the
//!   socket gets `{"ok":false,...}` and leaves the daemon undisturbed;
//! - unknown features are usage errors (exit 2); no daemon is exit 3;
//! - `--config FILE` applies `socket`, `disabled_features` and `sample_ratio`.
//!
//! Each test starts its own Rotel, agent (on a control socket of its own) and
//! servers, and stops them all; spans are attributed by the pids and client
//! ports of the programs the test started, because each agent traces the
//! whole host. Run them one at a time (`cargo xtask test` does).

use periscope_tests::certs::TestCert;
use periscope_tests::clients::{curl1, python};
use periscope_tests::control::{
    ControlSocket, CurlLoop, EXIT_NOT_RUNNING, EXIT_OK, EXIT_PERMISSION, EXIT_USAGE, Json, JsonPath, parse_json,
    LoopRequest, now_ns, periscope, periscope_as_nobody,
};
use periscope_tests::tls::TlsVersion;
use periscope_tests::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Hard cap per test; each normally takes well under a minute.
const LIMIT: Duration = Duration::from_secs(120);
/// How long spans may take to reach Rotel (agent batching + Rotel's 200 ms batch).
const SPAN_WAIT: Duration = Duration::from_secs(30);
/// "Changes apply within a second" (DESIGN.md).
const APPLY_NS: u64 = 1_000_000_000;
/// How long to wait before concluding that spans did *not* come.
const SETTLE: Duration = Duration::from_millis(2000);

fn is_server_of(s: &Span, pid: u32) -> bool {
    s.kind == SpanKind::Server && s.pid() == Some(pid)
}

/// The server span of `worker` for the connection from curl's `local_port`.
fn server_for(s: &Span, worker: u32, local_port: u16) -> bool {
    is_server_of(s, worker) && s.int_attr("network.peer.port") == Some(local_port as i64)
}

/// The server span of the loop's request `r`: its client port, and the
/// child of that curl's client span (`clients`: their span ids), or, if it
/// is not linked, within a second of the time curl ran. Ephemeral ports
/// come round within a test, so the port alone can match another curl's
/// request; and span times (kernel clock) and curl's (wall clock) may
/// disagree by a few hundred ms on a VM whose clock is being stepped.
fn server_of_request(s: &Span, worker: u32, r: &LoopRequest, clients: &[&str]) -> bool {
    const SLACK_NS: u64 = 1_000_000_000;
    if !server_for(s, worker, r.local_port) {
        return false;
    }
    match s.parent_span_id.as_deref() {
        Some(parent) if clients.contains(&parent) => true,
        _ => s.start_ns + SLACK_NS >= r.start_ns && s.start_ns <= r.end_ns + SLACK_NS,
    }
}

/// The span ids of `pid`'s client spans.
fn client_ids(spans: &[Span], pid: u32) -> Vec<&str> {
    spans.iter().filter(|s| is_client_of(s, pid)).map(|s| s.span_id.as_str()).collect()
}

fn is_client_of(s: &Span, pid: u32) -> bool {
    s.kind == SpanKind::Client && s.pid() == Some(pid)
}

fn scheme(s: &Span) -> Option<&str> {
    s.str_attr("url.scheme")
}

fn https_nginx(cert: &TestCert) -> anyhow::Result<Nginx> {
    Nginx::start_with(NginxOptions {
        tls: Some(NginxTls::only(cert.cert(), cert.key(), TlsVersion::Tls13)),
        ..Default::default()
    })
}

/// One request by a curl process of its own: (curl pid, curl's local port).
fn get(url: &str) -> anyhow::Result<(u32, u16)> {
    let (pid, t) = curl1(url, &["-k"])?;
    anyhow::ensure!(t.http_code == 200, "curl {url}: HTTP {}", t.http_code);
    Ok((pid, t.local_port))
}

/// Poll Rotel until `done(spans)` holds or `timeout` passes; return every
/// span received either way (the caller's checks then say what is missing).
fn wait_until(rotel: &Rotel, timeout: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let deadline = Instant::now() + timeout;
    loop {
        let spans = rotel.spans();
        if done(&spans) || Instant::now() >= deadline {
            return spans;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn short(s: &Span) -> String {
    format!(
        "{:?} {} {} pid {:?} scheme {:?} peer port {:?} start {}",
        s.kind,
        s.name,
        s.path().unwrap_or("-"),
        s.pid(),
        scheme(s),
        s.int_attr("network.peer.port"),
        s.start_ns
    )
}

/// The daemon answers with its own pid: the one the harness started.
fn expect_same_daemon(
    e: &mut Expect,
    ctl: &ControlSocket,
    agent: &mut Agent,
    when: &str,
) -> anyhow::Result<()> {
    agent.check_running()?;
    let pid = ctl.status()?.pid()?;
    e.that(pid == agent.pid(), || {
        format!(
            "{when}: status reports daemon pid {pid}, but the agent started as pid {} (restarted?)",
            agent.pid()
        )
    });
    Ok(())
}

/// 1. With HTTPS and plain HTTP traffic flowing, `disable tls` stops HTTPS
///    spans within a second while HTTP spans continue; `enable tls` brings
///    them back; the daemon keeps its pid throughout.
#[test]
fn disable_and_enable_tls_while_traffic_flows() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let cert = TestCert::generate()?;
        let https = https_nginx(&cert)?;
        let http = Nginx::start()?;
        let (hw, pw) = (https.worker_pid()?, http.worker_pid()?);
        let ctl = ControlSocket::new()?;
        let mut agent = Agent::start_with(&rotel.endpoint(), ctl.agent_options())?;
        let mut e = Expect::new();
        expect_same_daemon(&mut e, &ctl, &mut agent, "at start")?;
        anyhow::ensure!(
            ctl.status()?.feature_enabled("tls")?,
            "tls is not enabled at start"
        );

        // A curl process every 50 ms, alternating HTTPS and HTTP.
        let load = CurlLoop::start(
            vec![https.url("/index.html"), http.url("/index.html")],
            vec!["-k".into()],
            Duration::from_millis(50),
        );
        rotel.try_wait_for_spans(
            |s| is_server_of(s, hw) && scheme(s) == Some("https"),
            2,
            SPAN_WAIT,
        )?;
        rotel.try_wait_for_spans(|s| is_server_of(s, pw), 2, SPAN_WAIT)?;

        let t_disable = now_ns();
        let out = ctl.ok(&["disable", "tls"])?;
        e.that(out.contains("tls disabled"), || {
            format!("`disable tls` printed {out:?}, want \"tls disabled\"")
        });
        let st = ctl.status()?;
        e.that(!st.feature_enabled("tls")?, || {
            format!("after `disable tls`, status says tls enabled:\n{}", st.text)
        });
        let progs = st.feature_programs("tls")?;
        e.that(progs.is_empty(), || {
            format!("after `disable tls`, TLS uprobes are still listed as attached: {progs:?}")
        });
        std::thread::sleep(Duration::from_secs(4));

        let t_enable = now_ns();
        let out = ctl.ok(&["enable", "tls"])?;
        e.that(out.contains("tls enabled"), || {
            format!("`enable tls` printed {out:?}, want \"tls enabled\"")
        });
        let st = ctl.status()?;
        e.that(st.feature_enabled("tls")?, || {
            format!("after `enable tls`, status says tls disabled:\n{}", st.text)
        });
        let progs = st.feature_programs("tls")?;
        e.that(!progs.is_empty(), || {
            format!(
                "after `enable tls`, no TLS uprobes are attached:\n{}",
                st.text
            )
        });
        std::thread::sleep(Duration::from_secs(4));
        let reqs = load.stop()?;
        expect_same_daemon(&mut e, &ctl, &mut agent, "at the end")?;

        let is_https = |r: &LoopRequest| r.url.starts_with("https:");
        let disabled = |r: &&LoopRequest| r.start_ns > t_disable + APPLY_NS && r.end_ns < t_enable;
        let enabled_again = |r: &&LoopRequest| r.start_ns > t_enable + APPLY_NS;
        let http_off: Vec<&LoopRequest> = reqs
            .iter()
            .filter(disabled)
            .filter(|r| !is_https(r))
            .collect();
        let https_off: Vec<&LoopRequest> = reqs
            .iter()
            .filter(disabled)
            .filter(|r| is_https(r))
            .collect();
        let http_on: Vec<&LoopRequest> = reqs
            .iter()
            .filter(enabled_again)
            .filter(|r| !is_https(r))
            .collect();
        let https_on: Vec<&LoopRequest> = reqs
            .iter()
            .filter(enabled_again)
            .filter(|r| is_https(r))
            .collect();
        for (what, v) in [
            ("HTTP while tls was disabled", &http_off),
            ("HTTPS while tls was disabled", &https_off),
            ("HTTP after enable", &http_on),
            ("HTTPS after enable", &https_on),
        ] {
            anyhow::ensure!(
                v.len() >= 3,
                "the background loop made only {} requests for {what} (want >= 3; machine too busy?): {reqs:#?}",
                v.len()
            );
        }

        // Every request that should have spans: its server span (by client
        // port) and curl's client span.
        let want: Vec<(&LoopRequest, u32)> = http_off
            .iter()
            .chain(&http_on)
            .map(|r| (*r, pw))
            .chain(https_on.iter().map(|r| (*r, hw)))
            .collect();
        wait_until(&rotel, SPAN_WAIT, |spans| {
            want.iter().all(|(r, w)| {
                let clients = client_ids(spans, r.pid);
                !clients.is_empty() && spans.iter().any(|s| server_of_request(s, *w, r, &clients))
            })
        });
        std::thread::sleep(SETTLE);
        let all = rotel.spans();

        for (r, w) in &want {
            let https_req = *w == hw;
            let server: Vec<&Span> = all
                .iter()
                .filter(|s| server_of_request(s, *w, r, &client_ids(&all, r.pid)))
                .collect();
            let client: Vec<&Span> = all.iter().filter(|s| is_client_of(s, r.pid)).collect();
            let phase = if r.start_ns > t_enable {
                "after enable"
            } else {
                "while tls was disabled"
            };
            e.that(server.len() == 1, || {
                format!(
                    "{phase}: {} server spans for {} from curl port {} (pid {}), want 1: {:?}",
                    server.len(),
                    r.url,
                    r.local_port,
                    r.pid,
                    server.iter().map(|s| short(s)).collect::<Vec<_>>()
                )
            });
            e.that(client.len() == 1, || {
                format!(
                    "{phase}: {} client spans from curl pid {} ({}), want 1",
                    client.len(),
                    r.pid,
                    r.url
                )
            });
            let want_scheme = if https_req { "https" } else { "http" };
            for s in server.iter().chain(&client) {
                e.that(scheme(s) == Some(want_scheme), || {
                    format!(
                        "{phase}: {} has url.scheme {:?}, want {want_scheme:?}",
                        short(s),
                        scheme(s)
                    )
                });
            }
        }

        // While disabled (from one second after `disable`): no HTTPS span
        // from nginx or the loop's curls, and nothing at all from the HTTPS
        // server (its ciphertext must not be parsed as HTTP).
        let loop_pids: HashSet<u32> = reqs.iter().map(|r| r.pid).collect();
        // A second's margin at both ends: span times come from the kernel's
        // clock, t_disable and t_enable from the wall clock.
        let window = |s: &Span| s.start_ns > t_disable + APPLY_NS && s.start_ns + APPLY_NS < t_enable;
        for s in all.iter().filter(|s| window(s)) {
            let ours = s.pid() == Some(hw) || s.pid().is_some_and(|p| loop_pids.contains(&p));
            e.that(!(ours && scheme(s) == Some("https")), || {
                format!("HTTPS span while tls was disabled: {}", short(s))
            });
            e.that(s.pid() != Some(hw), || {
                format!(
                    "span from the HTTPS nginx while tls was disabled: {}",
                    short(s)
                )
            });
        }
        for r in &https_off {
            let n = all
                .iter()
                .filter(|s| server_of_request(s, hw, r, &client_ids(&all, r.pid)) || is_client_of(s, r.pid))
                .count();
            e.that(n == 0, || {
                format!(
                    "{n} spans for HTTPS request from curl pid {} port {} made while tls was disabled",
                    r.pid, r.local_port
                )
            });
        }
        // And HTTPS was traced before `disable`.
        let before = all
            .iter()
            .filter(|s| is_server_of(s, hw) && scheme(s) == Some("https") && s.start_ns < t_disable)
            .count();
        e.that(before > 0, || {
            "no HTTPS server spans before `disable tls`".into()
        });

        agent.check_running()?;
        e.finish(&all)
    });
}

/// 2. `filter --pid A`: only server A is traced, server B produces no spans;
///    `filter --clear`: B's spans come back.
#[test]
fn pid_filter_then_clear() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let a = Nginx::start()?;
        let b = Nginx::start()?;
        let (aw, bw) = (a.worker_pid()?, b.worker_pid()?);
        let ctl = ControlSocket::new()?;
        let mut agent = Agent::start_with(&rotel.endpoint(), ctl.agent_options())?;
        let mut e = Expect::new();

        // Both are traced before the filter.
        let (_, pa) = get(&a.url("/"))?;
        let (_, pb) = get(&b.url("/"))?;
        rotel.try_wait_for_spans(|s| server_for(s, aw, pa), 1, SPAN_WAIT)?;
        rotel.try_wait_for_spans(|s| server_for(s, bw, pb), 1, SPAN_WAIT)?;

        let t_filter = now_ns();
        let out = ctl.ok(&["filter", "--pid", &aw.to_string()])?;
        e.that(
            out.contains("filter set") && out.contains(&aw.to_string()),
            || {
                format!(
                    "`filter --pid {aw}` printed {out:?}, want \"filter set: trace only: pid {aw}\""
                )
            },
        );
        let st = ctl.status()?;
        let inc = st.req("filter.include_pids")?.to_string();
        e.that(inc == format!("[{aw}]"), || {
            format!("status filter.include_pids = {inc}, want [{aw}]")
        });
        let out = ctl.ok(&["filter"])?;
        e.that(out.contains(&format!("pid {aw}")), || {
            format!("`filter` (show) printed {out:?}, want it to show pid {aw}")
        });

        let mut to_a = Vec::new();
        let mut to_b = Vec::new();
        for _ in 0..5 {
            to_a.push(get(&a.url("/index.html"))?.1);
            to_b.push(get(&b.url("/index.html"))?.1);
        }
        wait_until(&rotel, SPAN_WAIT, |spans| {
            to_a.iter()
                .all(|p| spans.iter().any(|s| server_for(s, aw, *p)))
        });
        std::thread::sleep(SETTLE);
        let all = rotel.spans();
        for p in &to_a {
            let n = all.iter().filter(|s| server_for(s, aw, *p)).count();
            e.that(n == 1, || {
                format!("filtered in: {n} server spans from A (pid {aw}) for curl port {p}, want 1")
            });
        }
        for s in all
            .iter()
            .filter(|s| is_server_of(s, bw) && s.start_ns > t_filter)
        {
            e.fail(format!(
                "server B (pid {bw}) is filtered out but produced {}",
                short(s)
            ));
        }

        let t_clear = now_ns();
        let out = ctl.ok(&["filter", "--clear"])?;
        e.that(out.contains("cleared"), || {
            format!(
                "`filter --clear` printed {out:?}, want \"filter cleared: everything is traced\""
            )
        });
        let st = ctl.status()?;
        let inc = st.req("filter.include_pids")?.to_string();
        e.that(inc == "[]", || {
            format!("after --clear, filter.include_pids = {inc}")
        });
        let mut again_b = Vec::new();
        let mut again_a = Vec::new();
        for _ in 0..5 {
            again_b.push(get(&b.url("/index.html"))?.1);
            again_a.push(get(&a.url("/index.html"))?.1);
        }
        let all = wait_until(&rotel, SPAN_WAIT, |spans| {
            again_b
                .iter()
                .all(|p| spans.iter().any(|s| server_for(s, bw, *p)))
                && again_a
                    .iter()
                    .all(|p| spans.iter().any(|s| server_for(s, aw, *p)))
        });
        for (w, name, ports) in [(bw, "B", &again_b), (aw, "A", &again_a)] {
            for p in ports {
                let n = all.iter().filter(|s| server_for(s, w, *p)).count();
                e.that(n == 1, || {
                    format!(
                        "after --clear: {n} server spans from {name} (pid {w}) for curl port {p}, want 1"
                    )
                });
            }
        }
        let b_back = all
            .iter()
            .filter(|s| is_server_of(s, bw) && s.start_ns > t_clear)
            .count();
        e.that(b_back >= again_b.len(), || {
            format!(
                "after --clear: {b_back} spans from B, want >= {}",
                again_b.len()
            )
        });
        agent.check_running()?;
        e.finish(&all)
    });
}

/// 3. `sample 0`: requests produce no exported spans and every span built is
///    counted as sampled out; `sample 1`: spans are exported again.
#[test]
fn sample_zero_then_one() {
    run_test(LIMIT, || {
        const N: usize = 8;
        let rotel = Rotel::start()?;
        let nginx = Nginx::start()?;
        let worker = nginx.worker_pid()?;
        let ctl = ControlSocket::new()?;
        let mut agent = Agent::start_with(&rotel.endpoint(), ctl.agent_options())?;
        let mut e = Expect::new();

        let out = ctl.ok(&["sample", "0"])?;
        e.that(out.contains("sampling ratio 0"), || {
            format!("`sample 0` printed {out:?}, want \"sampling ratio 0 (was 1)\"")
        });
        let t_zero = now_ns();
        let s0 = ctl.status()?;
        e.that(s0.sample_ratio()? == 0.0, || {
            format!("status sample_ratio after `sample 0`:\n{}", s0.text)
        });
        let mut sampled: Vec<(u32, u16)> = Vec::new();
        for _ in 0..N {
            sampled.push(get(&nginx.url("/index.html"))?);
        }
        // One client (curl) and one server (nginx) span per request.
        let want = 2 * N as u64;
        let (built0, out0) = (s0.counter("spans_built")?, s0.counter("spans_sampled_out")?);
        let s1 = ctl.wait_status(
            &format!("spans_sampled_out grow by {want}"),
            SPAN_WAIT,
            |s| {
                s.counter("spans_sampled_out")
                    .is_ok_and(|n| n >= out0 + want)
            },
        )?;
        let (built1, out1) = (s1.counter("spans_built")?, s1.counter("spans_sampled_out")?);
        e.that(out1 - out0 == built1 - built0, || {
            format!(
                "ratio 0: spans built grew by {} but spans sampled out by {}: every span built must be sampled out",
                built1 - built0,
                out1 - out0
            )
        });
        let all = rotel.spans_after(SETTLE);
        for (pid, port) in &sampled {
            for s in all
                .iter()
                .filter(|s| server_for(s, worker, *port) || is_client_of(s, *pid))
            {
                e.fail(format!(
                    "exported although the sampling ratio is 0: {}",
                    short(s)
                ));
            }
        }
        for s in all
            .iter()
            .filter(|s| is_server_of(s, worker) && s.start_ns > t_zero)
        {
            e.that(
                sampled.iter().any(|(_, p)| server_for(s, worker, *p)),
                || format!("exported although the sampling ratio is 0: {}", short(s)),
            );
        }

        let out = ctl.ok(&["sample", "1"])?;
        e.that(out.contains("sampling ratio 1"), || {
            format!("`sample 1` printed {out:?}, want \"sampling ratio 1 (was 0)\"")
        });
        let s2 = ctl.status()?;
        e.that(s2.sample_ratio()? == 1.0, || {
            format!("status sample_ratio after `sample 1`:\n{}", s2.text)
        });
        let mut kept = Vec::new();
        for _ in 0..N {
            kept.push(get(&nginx.url("/index.html"))?);
        }
        let all = wait_until(&rotel, SPAN_WAIT, |spans| {
            kept.iter().all(|(pid, port)| {
                spans.iter().any(|s| server_for(s, worker, *port))
                    && spans.iter().any(|s| is_client_of(s, *pid))
            })
        });
        for (pid, port) in &kept {
            let ns = all.iter().filter(|s| server_for(s, worker, *port)).count();
            let nc = all.iter().filter(|s| is_client_of(s, *pid)).count();
            e.that(ns == 1 && nc == 1, || {
                format!("ratio 1: curl pid {pid} port {port}: {ns} server and {nc} client spans, want 1 and 1")
            });
        }
        let s3 = ctl.status()?;
        let out3 = s3.counter("spans_sampled_out")?;
        e.that(out3 == out1, || {
            format!("ratio 1: spans_sampled_out still grew from {out1} to {out3}")
        });
        agent.check_running()?;
        e.finish(&all)
    });
}

/// 4. `status --json` is valid JSON with the documented keys; after N curl
///    requests to nginx its counters account for them and agree with Rotel.
#[test]
fn status_json_reports_counters_exporter_and_processes() {
    run_test(LIMIT, || {
        const N: usize = 20;
        let rotel = Rotel::start()?;
        let nginx = Nginx::start()?;
        let worker = nginx.worker_pid()?;
        let ctl = ControlSocket::new()?;
        let mut agent = Agent::start_with(&rotel.endpoint(), ctl.agent_options())?;
        let mut e = Expect::new();

        let s0 = ctl.status()?;
        let obj = s0
            .json
            .as_object()
            .expect("status() checks it is an object");
        for key in [
            "version",
            "pid",
            "uptime_s",
            "kernel_release",
            "kernel",
            "features",
            "tls_libraries",
            "processes",
            "connections_open",
            "counters",
            "lost_per_probe",
            "exporter",
            "filter",
            "sample_ratio",
        ] {
            e.that(obj.contains_key(key), || {
                format!("status --json has no key {key:?}")
            });
        }
        for f in ["http", "tls", "dns", "grpc"] {
            for k in ["enabled", "available", "programs"] {
                e.that(s0.get(&format!("features.{f}.{k}")).is_some(), || {
                    format!("status --json has no features.{f}.{k}")
                });
            }
        }
        for k in ["destination", "healthy", "queued", "queue_capacity"] {
            e.that(s0.get(&format!("exporter.{k}")).is_some(), || {
                format!("status --json has no exporter.{k}")
            });
        }
        let counters = [
            "events_received",
            "spans_built",
            "spans_exported",
            "spans_sampled_out",
            "spans_dropped",
        ];
        for c in counters {
            e.that(s0.counter(c).is_ok(), || {
                format!("status --json has no integer counters.{c}")
            });
        }
        e.that(s0.pid()? == agent.pid(), || {
            format!(
                "status pid {} != the agent's pid {}",
                s0.pid().unwrap_or(0),
                agent.pid()
            )
        });
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_string();
        let got = s0.req("kernel_release")?.as_str().unwrap_or("").to_string();
        e.that(got == release, || {
            format!("kernel_release {got:?}, want {release:?}")
        });
        e.that(
            s0.req("version")?.as_str().is_some_and(|v| !v.is_empty()),
            || "empty version".into(),
        );
        e.that(s0.u64("uptime_s").is_ok(), || {
            "uptime_s is not an integer".into()
        });
        let dest = s0
            .req("exporter.destination")?
            .as_str()
            .unwrap_or("")
            .to_string();
        e.that(dest.contains(&rotel.grpc_port().to_string()), || {
            format!(
                "exporter.destination {dest:?} does not name Rotel's port {}",
                rotel.grpc_port()
            )
        });
        e.that(s0.sample_ratio()? == 1.0, || {
            "sample_ratio is not 1 by default".into()
        });
        e.that(
            s0.feature_enabled("http")? && s0.feature_enabled("tls")?,
            || "http and tls are not both enabled by default".into(),
        );
        // nginx links libssl: the TLS uprobes are attached.
        let st = ctl.wait_status(
            "features.tls.programs non-empty",
            Duration::from_secs(10),
            |s| s.feature_programs("tls").is_ok_and(|p| !p.is_empty()),
        )?;
        e.that(!st.feature_programs("tls")?.is_empty(), || {
            "no TLS programs".into()
        });

        let built0 = s0.counter("spans_built")?;
        let mut reqs = Vec::new();
        for _ in 0..N {
            reqs.push(get(&nginx.url("/index.html"))?);
        }
        let ours = |s: &Span| {
            reqs.iter()
                .any(|(pid, port)| server_for(s, worker, *port) || is_client_of(s, *pid))
        };
        rotel.try_wait_for_spans(ours, 2 * N, SPAN_WAIT)?;

        // The counters settle to what Rotel received: spans_exported equals
        // Rotel's total (Rotel gets spans only from this agent).
        let mut last;
        let deadline = Instant::now() + Duration::from_secs(20);
        let st = loop {
            let st = ctl.status()?;
            let exported = st.counter("spans_exported")?;
            let received = rotel.spans_after(Duration::from_millis(300)).len() as u64;
            let again = ctl.status()?.counter("spans_exported")?;
            last = (exported, received);
            if (exported == received && again == exported) || Instant::now() >= deadline {
                break st;
            }
        };
        let (exported, received) = last;
        e.that(exported == received, || {
            format!(
                "status counters.spans_exported = {exported}, but Rotel received {received} spans"
            )
        });
        let all = rotel.spans();
        let attributable = all.iter().filter(|s| ours(s)).count() as u64;
        e.that(attributable == 2 * N as u64, || {
            format!(
                "Rotel got {attributable} spans for the {N} requests, want {}",
                2 * N
            )
        });
        e.that(exported >= attributable, || {
            format!("spans_exported {exported} < the {attributable} spans of this test's requests")
        });
        let built = st.counter("spans_built")?;
        e.that(
            built >= 2 * N as u64 && built - built0 >= 2 * N as u64,
            || {
                format!(
                    "counters.spans_built {built} (was {built0}) did not grow by >= {}",
                    2 * N
                )
            },
        );
        e.that(st.counter("events_received")? > 0, || {
            "events_received is 0".into()
        });
        e.that(st.bool("exporter.healthy")?, || {
            format!("exporter not healthy:\n{}", st.text)
        });
        let tls_programs = st.feature_programs("tls")?;
        e.that(!tls_programs.is_empty(), || {
            "features.tls.programs is empty".into()
        });
        match st.process(worker) {
            None => e.fail(format!(
                "processes does not list the nginx worker {worker}: {:?}",
                st.process_pids()
            )),
            Some(p) => {
                let svc = p.at("service_name").and_then(Json::as_str);
                let exe = p.at("executable").and_then(Json::as_str);
                e.that(svc == Some("nginx") && exe == Some("/usr/sbin/nginx"), || {
                    format!("processes entry for {worker}: {p}, want service_name nginx, executable /usr/sbin/nginx")
                });
            }
        }
        // The human form works too.
        let text = ctl.ok(&["status"])?;
        e.that(
            text.contains(&format!("(pid {})", agent.pid())) && text.contains("counters:"),
            || format!("`periscope status` printed:\n{text}"),
        );
        agent.check_running()?;
        e.finish(&all)
    });
}

/// 5. A non-root client is refused (exit 4, a message about root); garbage
///    on the socket gets `{"ok":false,...}` and the daemon carries on.
#[test]
fn non_root_refused_and_garbage_answered() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let ctl = ControlSocket::new()?;
        let mut agent = Agent::start_with(&rotel.endpoint(), ctl.agent_options())?;
        let mut e = Expect::new();
        let pid0 = ctl.status()?.pid()?;

        for args in [
            &["status", "--socket", ctl.path_str()][..],
            &["disable", "tls", "--socket", ctl.path_str()],
        ] {
            let r = periscope_as_nobody(args)?;
            let msg = r.output().to_lowercase();
            e.that(r.code == Some(EXIT_PERMISSION), || {
                format!(
                    "`{}` as uid 65534 exited {:?}, want {EXIT_PERMISSION}:\n{}",
                    r.shown,
                    r.code,
                    r.output()
                )
            });
            e.that(msg.contains("permission") && msg.contains("root"), || {
                format!(
                    "`{}` as uid 65534: message does not mention permission and root:\n{}",
                    r.shown,
                    r.output()
                )
            });
        }
        e.that(ctl.status()?.feature_enabled("tls")?, || {
            "a refused non-root `disable tls` disabled tls".into()
        });

        // Garbage, then a valid request on the same connection.
        const SCRIPT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rb")
s.sendall(b"garbage\n")
print(f.readline().decode().strip(), flush=True)
s.sendall(b'{"cmd":"status"}\n')
print(f.readline().decode().strip()[:200], flush=True)
"#;
        let py = python(SCRIPT, &[ctl.path_str()])?;
        let lines: Vec<&str> = py.stdout.lines().collect();
        let first = lines.first().copied().unwrap_or("");
        match parse_json(first) {
            Err(err) => e.fail(format!(
                "answer to garbage is not JSON ({err:#}): {first:?}"
            )),
            Ok(v) => {
                e.that(v.at("ok") == Some(&Json::Bool(false)), || {
                    format!("answer to garbage: {first}, want \"ok\":false")
                });
                e.that(
                    v.at("error")
                        .and_then(Json::as_str)
                        .is_some_and(|s| !s.is_empty()),
                    || format!("answer to garbage has no error message: {first}"),
                );
                e.that(
                    v.at("kind").and_then(Json::as_str) == Some("malformed"),
                    || format!("answer to garbage: {first}, want \"kind\":\"malformed\""),
                );
            }
        }
        let second = lines.get(1).copied().unwrap_or("");
        e.that(second.starts_with(r#"{"ok":true"#), || {
            format!("status after garbage on the same connection: {second:?}")
        });
        // Half a request, then hang up.
        python(
            r#"
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'{"cmd":"sta'); s.close()
"#,
            &[ctl.path_str()],
        )?;

        agent.check_running()?;
        let st = ctl.status()?;
        e.that(st.pid()? == pid0 && pid0 == agent.pid(), || {
            format!(
                "daemon pid changed: {pid0} -> {} (agent {})",
                st.pid().unwrap_or(0),
                agent.pid()
            )
        });
        let panics: Vec<String> = agent
            .log()
            .lines()
            .filter(|l| l.contains("panicked") || l.contains("RUST_BACKTRACE"))
            .map(str::to_string)
            .collect();
        e.that(panics.is_empty(), || {
            format!("the agent's log shows a panic: {panics:#?}")
        });
        e.finish(&[])
    });
}

/// 6. An unknown feature is a usage error (exit 2) saying so; with no daemon
///    the CLI exits 3 saying it is not running.
#[test]
fn usage_errors_and_daemon_not_running() {
    run_test(LIMIT, || {
        let ctl = ControlSocket::new()?;
        let mut e = Expect::new();
        for args in [&["enable", "ftp"][..], &["disable", "ftp"]] {
            let r = ctl.run(args)?;
            let out = r.output();
            e.that(r.code == Some(EXIT_USAGE), || {
                format!(
                    "`{}` exited {:?}, want {EXIT_USAGE}:\n{out}",
                    r.shown, r.code
                )
            });
            e.that(
                out.contains("unknown feature")
                    && out.contains("ftp")
                    && out.contains("http, tls, dns, grpc"),
                || {
                    format!(
                        "`{}`: message should name the unknown feature and the known ones:\n{out}",
                        r.shown
                    )
                },
            );
        }
        let r = ctl.run(&["sample", "1.5"])?;
        e.that(r.code == Some(EXIT_USAGE), || {
            format!(
                "`{}` exited {:?}, want {EXIT_USAGE}:\n{}",
                r.shown,
                r.code,
                r.output()
            )
        });

        // Nothing at this path.
        for args in [
            &["status"][..],
            &["enable", "tls"],
            &["filter", "--clear"],
            &["sample", "0.5"],
        ] {
            let r = ctl.run(args)?;
            let out = r.output();
            e.that(r.code == Some(EXIT_NOT_RUNNING), || {
                format!(
                    "`{}` with no daemon exited {:?}, want {EXIT_NOT_RUNNING}:\n{out}",
                    r.shown, r.code
                )
            });
            e.that(out.contains("not running"), || {
                format!(
                    "`{}` with no daemon: message should say \"not running\":\n{out}",
                    r.shown
                )
            });
        }
        // A stale socket file nobody listens on.
        let stale = ctl.dir().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale)?);
        let r = periscope(&["status", "--socket", stale.to_str().unwrap()])?;
        e.that(r.code == Some(EXIT_NOT_RUNNING) && r.output().contains("not running"), || {
            format!("`{}` on a stale socket exited {:?}, want {EXIT_NOT_RUNNING} \"not running\":\n{}", r.shown, r.code, r.output())
        });
        e.that(r.code != Some(EXIT_OK), || {
            "status succeeded with no daemon".into()
        });
        e.finish(&[])
    });
}

/// 7. `--config FILE` with `socket`, `disabled_features = ["tls"]` and
///    `sample_ratio = 1.0`: the daemon listens there, tls is disabled, HTTPS
///    gives no spans while HTTP does; `enable tls` then turns HTTPS on.
#[test]
fn config_file_disables_tls() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        let cert = TestCert::generate()?;
        let https = https_nginx(&cert)?;
        let http = Nginx::start()?;
        let (hw, pw) = (https.worker_pid()?, http.worker_pid()?);
        let ctl = ControlSocket::new()?;
        let config = ctl.dir().join("periscope.toml");
        std::fs::write(
            &config,
            format!(
                "# periscope test config\nsocket = \"{}\"\ndisabled_features = [\"tls\"]\nsample_ratio = 1.0\n",
                ctl.path_str()
            ),
        )?;
        let mut agent = Agent::start_with(
            &rotel.endpoint(),
            AgentOptions {
                args: vec!["--config".into(), config.display().to_string()],
                env: Vec::new(),
            },
        )?;
        let mut e = Expect::new();
        let st = ctl.status()?;
        e.that(!st.feature_enabled("tls")?, || {
            format!("config disables tls, status:\n{}", st.text)
        });
        e.that(st.feature_enabled("http")?, || {
            format!("http should stay enabled, status:\n{}", st.text)
        });
        e.that(st.feature_programs("tls")?.is_empty(), || {
            format!(
                "tls disabled by the config, yet TLS uprobes are attached:\n{}",
                st.text
            )
        });
        e.that(st.sample_ratio()? == 1.0, || {
            format!("sample_ratio, status:\n{}", st.text)
        });

        let mut tls_reqs = Vec::new();
        let mut plain = Vec::new();
        for _ in 0..5 {
            tls_reqs.push(get(&https.url("/index.html"))?);
            plain.push(get(&http.url("/index.html"))?);
        }
        wait_until(&rotel, SPAN_WAIT, |spans| {
            plain.iter().all(|(pid, port)| {
                spans.iter().any(|s| server_for(s, pw, *port))
                    && spans.iter().any(|s| is_client_of(s, *pid))
            })
        });
        std::thread::sleep(SETTLE);
        let all = rotel.spans();
        for (pid, port) in &plain {
            let ns = all.iter().filter(|s| server_for(s, pw, *port)).count();
            let nc = all.iter().filter(|s| is_client_of(s, *pid)).count();
            e.that(ns == 1 && nc == 1, || {
                format!("HTTP with tls disabled: curl pid {pid} port {port}: {ns} server and {nc} client spans, want 1 and 1")
            });
        }
        for (pid, _) in &tls_reqs {
            for s in all.iter().filter(|s| is_client_of(s, *pid)) {
                e.fail(format!(
                    "HTTPS client span although the config disables tls: {}",
                    short(s)
                ));
            }
        }
        for s in all.iter().filter(|s| s.pid() == Some(hw)) {
            e.fail(format!(
                "span from the HTTPS nginx although the config disables tls: {}",
                short(s)
            ));
        }

        // Switched on at run time, HTTPS is traced.
        let out = ctl.ok(&["enable", "tls"])?;
        e.that(out.contains("tls enabled"), || {
            format!("`enable tls` printed {out:?}")
        });
        let (pid, port) = get(&https.url("/index.html"))?;
        let all = wait_until(&rotel, SPAN_WAIT, |spans| {
            spans.iter().any(|s| server_for(s, hw, port))
                && spans.iter().any(|s| is_client_of(s, pid))
        });
        let got: Vec<&Span> = all
            .iter()
            .filter(|s| server_for(s, hw, port) || is_client_of(s, pid))
            .collect();
        e.that(got.len() == 2 && got.iter().all(|s| scheme(s) == Some("https")), || {
            format!(
                "after `enable tls`: HTTPS request (curl pid {pid} port {port}) gave {:?}, want one https server and one https client span",
                got.iter().map(|s| short(s)).collect::<Vec<_>>()
            )
        });
        agent.check_running()?;
        e.finish(&all)
    });
}
