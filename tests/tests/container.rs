//! The DaemonSet contract, with a real container engine (podman and runc
//! here): the agent's image (built `FROM scratch` from the agent under
//! test, as `cargo xtask image` does) runs the way deploy/daemonset.yaml
//! runs it: host PID namespace, not privileged, all capabilities dropped
//! but BPF, PERFMON, SYS_ADMIN, SYS_PTRACE and DAC_READ_SEARCH, read-only
//! root filesystem, seccomp unconfined, the host's BTF and tracefs mounted
//! read-only and the control socket's directory from the host. It traces
//! an HTTP server (busybox httpd) running in another container, delivers
//! the spans to a real Rotel on the host with the workload's container id,
//! and `periscope status` works through `exec`. Without SYS_ADMIN the agent
//! still starts, traces plain HTTP, and says uprobes are unavailable and why.

use periscope_tests::clients::curl1;
use periscope_tests::container::{Container, Engine, build_agent_image, build_busybox_image};
use periscope_tests::proc::{TempDir, free_port};
use periscope_tests::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(400);
const SPAN_WAIT: Duration = Duration::from_secs(30);
const AGENT_TEST_IMAGE: &str = "localhost/periscope:e2e";
const WORKLOAD_IMAGE: &str = "localhost/periscope-e2e-busybox:latest";
/// The DaemonSet's capabilities (deploy/daemonset.yaml).
const CAPS: &str = "BPF,PERFMON,SYS_ADMIN,SYS_PTRACE,DAC_READ_SEARCH";

/// `run` options of the DaemonSet's pod, for the agent container.
fn agent_args(caps: &str, socket_dir: &std::path::Path, rotel: &Rotel) -> Vec<String> {
    [
        "--pid=host",
        "--network=host",
        "--cap-drop=all",
        &format!("--cap-add={caps}"),
        "--read-only",
        "--security-opt=seccomp=unconfined",
        "--volume=/sys/kernel/btf:/sys/kernel/btf:ro",
        "--volume=/sys/kernel/tracing:/sys/kernel/tracing:ro",
        &format!("--volume={}:/run/periscope", socket_dir.display()),
        "--env=NODE_NAME=e2e-node",
        "--env=RUST_LOG=info",
        &format!("--env=OTEL_EXPORTER_OTLP_ENDPOINT={}", rotel.endpoint()),
        AGENT_TEST_IMAGE,
        "run",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A busybox httpd in its own container (host network, a free port).
fn workload(engine: Engine, name: &str) -> anyhow::Result<(Container, u16)> {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let c = Container::start(engine, name, &["--network=host", WORKLOAD_IMAGE, "httpd", "-f", "-p", &listen, "-h", "/www"])
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    anyhow::ensure!(
        periscope_tests::proc::wait_for_port(port, Duration::from_secs(20)),
        "busybox httpd in {name} never listened on {listen}"
    );
    Ok((c, port))
}

/// The images (from the agent under test), a Rotel, and the agent
/// container with `caps`, ready.
fn start_agent(name: &str, caps: &str) -> anyhow::Result<(Engine, Rotel, TempDir, Container)> {
    let engine = Engine::find()?;
    build_agent_image(engine, &periscope_tests::agent::binary()?, &[AGENT_TEST_IMAGE])?;
    build_busybox_image(engine, WORKLOAD_IMAGE)?;
    let rotel = Rotel::start()?;
    let socket_dir = TempDir::new("agent-socket")?;
    let agent = Container::start(engine, name, &refs(&agent_args(caps, socket_dir.path(), &rotel)))?;
    agent.wait_for_log("periscope ready", Duration::from_secs(60))?;
    Ok((engine, rotel, socket_dir, agent))
}

#[test]
fn agent_image_runs_as_the_daemonset_and_traces_another_container() {
    run_test(LIMIT, || {
        let (engine, rotel, socket_dir, agent) = start_agent("periscope-e2e-agent", CAPS)?;
        let (web, port) = workload(engine, "periscope-e2e-web")?;
        // busybox httpd serves each connection in a forked child.
        let served = move |s: &Span| s.kind == SpanKind::Server && s.int_attr("server.port") == Some(i64::from(port));
        for i in 0..3 {
            let (_, t) = curl1(&format!("http://127.0.0.1:{port}/index.html?n={i}"), &[])?;
            anyhow::ensure!(t.http_code == 200, "curl to busybox in a container: {}", t.http_code);
        }
        let found = rotel.try_wait_for_spans(served, 3, SPAN_WAIT);
        if let Err(e) = found {
            anyhow::bail!("{e:#}\nagent container log:\n{}", agent.logs());
        }
        let server_spans: Vec<Span> = rotel.spans().into_iter().filter(|s| served(s)).collect();
        let mut e = Expect::new();
        for s in &server_spans {
            e.attr_str(s, "http.request.method", "GET");
            e.attr_str(s, "url.path", "/index.html");
            e.attr_int(s, "http.response.status_code", 200);
            e.that(s.res_str("process.executable.name") == Some("busybox"), || {
                format!("server span's executable {:?}, want busybox", s.res_str("process.executable.name"))
            });
            let container = s.res_str("container.id");
            e.that(container == Some(web.id.as_str()), || {
                format!("server span's container.id {container:?}, want the workload container {}", web.id)
            });
        }
        // status through exec, as `kubectl exec ds/periscope -- periscope status`.
        let (code, out, err) = agent.exec(&["/usr/local/bin/periscope", "status", "--json"])?;
        e.that(code == 0, || format!("periscope status in the container exited {code}: {err}"));
        let status = periscope_tests::control::parse_json(&out).unwrap_or_default();
        use periscope_tests::control::JsonPath;
        e.that(status.at("features.tls.unavailable").is_none(), || format!("tls unavailable with every capability: {out}"));
        e.that(status.at("features.tls.available").and_then(|v| v.as_bool()) == Some(true), || {
            format!("tls not available: {out}")
        });
        // The control socket is on the host too (the hostPath in the DaemonSet).
        e.that(socket_dir.join("control.sock").exists(), || "no control socket in the host directory".into());
        // Shutdown as Kubernetes does it: SIGTERM, then SIGKILL after the
        // grace period (30 s in the DaemonSet). A request made just before
        // still reaches the collector, and the agent exits 0, in time.
        let (_, last) = curl1(&format!("http://127.0.0.1:{port}/index.html?last"), &[])?;
        e.that(last.http_code == 200, || format!("last curl: {}", last.http_code));
        let (code, took) = agent.stop(Duration::from_secs(30))?;
        e.that(code == 0, || format!("the agent exited {code} on SIGTERM; logs:\n{}", agent.logs()));
        e.that(took < Duration::from_secs(20), || format!("stopping the agent took {took:?}"));
        let last_port = i64::from(last.local_port);
        // Rotel prints what it received in batches of up to 200 ms.
        let arrived = rotel.try_wait_for_spans(|s| served(s) && s.int_attr("network.peer.port") == Some(last_port), 1, Duration::from_secs(5));
        e.that(arrived.is_ok(), || "the request made just before the stop never reached Rotel".into());
        e.finish(&rotel.spans())
    });
}

#[test]
fn without_sys_admin_the_agent_starts_and_says_uprobes_are_unavailable() {
    run_test(LIMIT, || {
        let (engine, rotel, _socket_dir, agent) =
            start_agent("periscope-e2e-agent-noadmin", &CAPS.replace("SYS_ADMIN,", ""))?;
        let logs = agent.logs();
        anyhow::ensure!(
            logs.contains("running without CAP_SYS_ADMIN"),
            "the agent did not say it runs without CAP_SYS_ADMIN:\n{logs}"
        );
        // Plain HTTP still traced (tracepoints need no SYS_ADMIN).
        let (web, port) = workload(engine, "periscope-e2e-web-noadmin")?;
        let _web = web;
        let (_, t) = curl1(&format!("http://127.0.0.1:{port}/index.html"), &[])?;
        anyhow::ensure!(t.http_code == 200, "curl: {}", t.http_code);
        rotel
            .try_wait_for_spans(
                move |s| s.kind == SpanKind::Server && s.int_attr("server.port") == Some(i64::from(port)),
                1,
                SPAN_WAIT,
            )
            .map_err(|e| anyhow::anyhow!("{e:#}\nagent log:\n{}", agent.logs()))?;
        let (code, out, err) = agent.exec(&["/usr/local/bin/periscope", "status"])?;
        anyhow::ensure!(code == 0, "status exited {code}: {err}");
        let tls_line = out.lines().find(|l| l.trim_start().starts_with("tls ")).unwrap_or_default();
        anyhow::ensure!(
            tls_line.contains("UNAVAILABLE") && tls_line.contains("CAP_SYS_ADMIN"),
            "status does not say why TLS is unavailable:\n{out}"
        );
        Ok(())
    });
}
