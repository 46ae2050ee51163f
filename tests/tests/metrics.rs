//! End-to-end tests of the RED metrics (issue 15): real nginx answering
//! 200, 404 and 500 to real curl, the agent's duration histograms checked
//! where they arrive — at Rotel over OTLP, and on the Prometheus endpoint in
//! both formats, parsed by the Prometheus project's own Python parsers.
//!
//! The contract:
//! - `http.server.request.duration` (nginx) and `http.client.request.duration`
//!   (curl) carry one data point per status code with the right counts, at
//!   most 8 attributes each, paths never as they are;
//! - exemplars carry trace and span ids of spans Rotel received;
//! - the counts include requests whose traces were sampled out (`sample 0`);
//! - `disable metrics` stops them, `enable metrics` starts them again;
//! - 10,000 distinct paths to one server keep its routes within
//!   `--max-routes`, the rest counted in one `_OTHER` series and in
//!   `red_routes_folded`.

use periscope_tests::clients::{curl, python};
use periscope_tests::control::ControlSocket;
use periscope_tests::metrics::{HistogramPoint, scrape};
use periscope_tests::nginx::{Nginx, NginxOptions};
use periscope_tests::proc::free_port;
use periscope_tests::*;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

const SPAN_WAIT: Duration = Duration::from_secs(30);
/// `OTEL_METRIC_EXPORT_INTERVAL` for the agents here (ms).
const EXPORT_INTERVAL_MS: &str = "1000";

fn nginx_with_statuses() -> anyhow::Result<Nginx> {
    Nginx::start_with(NginxOptions {
        extra_locations: "location /ok/ { return 200 \"ok\\n\"; }\n\
                          location /fail/ { return 500; }\n\
                          location /any/ { return 200 \"any\\n\"; }\n"
            .into(),
        ..Default::default()
    })
}

/// Rotel, nginx answering 200/404/500, and the agent exporting to Rotel
/// (metrics every second) with its Prometheus endpoint on.
struct Setup {
    rotel: Rotel,
    nginx: Nginx,
    ctl: ControlSocket,
    metrics_port: u16,
    agent: Agent,
    /// nginx's worker: the process whose server spans count.
    worker: u32,
}

fn setup(extra_args: &[&str]) -> anyhow::Result<Setup> {
    let rotel = Rotel::start()?;
    let nginx = nginx_with_statuses()?;
    let ctl = ControlSocket::new()?;
    let metrics_port = free_port();
    let mut opts = ctl.agent_options();
    opts.args.extend([
        "--metrics-address".into(),
        format!("127.0.0.1:{metrics_port}"),
    ]);
    opts.args.extend(extra_args.iter().map(|a| a.to_string()));
    opts.env.push((
        "OTEL_METRIC_EXPORT_INTERVAL".into(),
        EXPORT_INTERVAL_MS.into(),
    ));
    let agent = Agent::start_with(&rotel.endpoint(), opts)?;
    let worker = nginx.worker_pid()?;
    Ok(Setup {
        rotel,
        nginx,
        ctl,
        metrics_port,
        agent,
        worker,
    })
}

/// The newest cumulative point of `metric` for each attribute set, for the
/// process `pid`, keyed by status code.
fn counts_by_status(points: &[HistogramPoint], metric: &str, pid: u32) -> BTreeMap<i64, u64> {
    let mut newest: BTreeMap<String, &HistogramPoint> = BTreeMap::new();
    for p in points
        .iter()
        .filter(|p| p.metric == metric && p.resource_int("process.pid") == Some(pid as i64))
    {
        let key = format!("{:?}", p.attributes);
        if newest.get(&key).is_none_or(|q| q.time_ns <= p.time_ns) {
            newest.insert(key, p);
        }
    }
    let mut by_status = BTreeMap::new();
    for p in newest.values() {
        let status = p
            .attributes
            .get("http.response.status_code")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        *by_status.entry(status).or_default() += p.count;
    }
    by_status
}

fn wait_for_counts(
    rotel: &Rotel,
    metric: &str,
    pid: u32,
    want: &BTreeMap<i64, u64>,
) -> anyhow::Result<Vec<HistogramPoint>> {
    let t0 = Instant::now();
    loop {
        let points = rotel.histogram_points();
        let got = counts_by_status(&points, metric, pid);
        if &got == want {
            // The exemplars follow the counts in Rotel's dump.
            std::thread::sleep(Duration::from_millis(300));
            return Ok(rotel.histogram_points());
        }
        if t0.elapsed() > SPAN_WAIT {
            anyhow::bail!(
                "{metric} for pid {pid}: want counts {want:?}, got {got:?}; points of that metric:\n{:#?}",
                points
                    .iter()
                    .filter(|p| p.metric == metric)
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Runs Python's parser of `format` ("text" or "openmetrics") on `body`;
/// prints `family sample count` per family, fails on a parse error.
fn parse_with_prometheus_client(format: &str, body: &str) -> anyhow::Result<String> {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families as text
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
body = sys.stdin.read()
parse = om if sys.argv[1] == "openmetrics" else text
exemplars = 0
for family in parse(body):
    for s in family.samples:
        if getattr(s, "exemplar", None) is not None:
            exemplars += 1
            assert len(s.exemplar.labels["trace_id"]) == 32, s
    print(family.name, family.type, len(family.samples))
print("exemplars", exemplars)
"#;
    let out = python_stdin(script, &[format], body)?;
    Ok(out)
}

fn python_stdin(script: &str, args: &[&str], stdin: &str) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new(tool_python())
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "the Prometheus parser refused the answer: {}\n---- body ----\n{stdin}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn red_histograms_reach_otlp_and_prometheus_with_exemplars() {
    run_test(LIMIT, red_histograms)
}

fn red_histograms() -> anyhow::Result<()> {
    let Setup {
        rotel,
        nginx,
        ctl,
        metrics_port,
        mut agent,
        worker,
    } = setup(&[])?;

    let mut urls = Vec::new();
    for i in 0..6 {
        urls.push(nginx.url(&format!("/ok/{i}")));
    }
    for i in 0..3 {
        urls.push(nginx.url(&format!("/missing/{i}")));
    }
    for i in 0..2 {
        urls.push(nginx.url(&format!("/fail/{i}")));
    }
    let run = curl(&urls, &[])?;
    let codes: Vec<u16> = run.transfers.iter().map(|t| t.http_code).collect();
    anyhow::ensure!(
        codes.iter().filter(|c| **c == 200).count() == 6,
        "curl got {codes:?}"
    );

    let want: BTreeMap<i64, u64> = [(200, 6), (404, 3), (500, 2)].into();
    let points = wait_for_counts(&rotel, "http.server.request.duration", worker, &want)?;
    wait_for_counts(&rotel, "http.client.request.duration", run.pid, &want)?;
    let spans = rotel.try_wait_for_spans(
        |s| s.pid() == Some(worker) || s.pid() == Some(run.pid),
        22,
        SPAN_WAIT,
    )?;
    let ids: HashSet<(&str, &str)> = spans
        .iter()
        .map(|s| (s.trace_id.as_str(), s.span_id.as_str()))
        .collect();

    let ours: Vec<&HistogramPoint> = points
        .iter()
        .filter(|p| p.resource_int("process.pid") == Some(worker as i64))
        .collect();
    for p in &ours {
        anyhow::ensure!(p.attributes.len() <= 8, "more than 8 attributes: {p:#?}");
        anyhow::ensure!(
            !p.attributes.contains_key("url.path"),
            "a path as a label: {p:#?}"
        );
        anyhow::ensure!(p.unit == "s", "unit {:?}", p.unit);
        anyhow::ensure!(
            p.resource.get("service.name").map(String::as_str) == Some("nginx"),
            "{p:#?}"
        );
        anyhow::ensure!(!p.exemplars.is_empty(), "no exemplar on {p:#?}");
        for (trace, span) in &p.exemplars {
            anyhow::ensure!(
                ids.contains(&(trace.as_str(), span.as_str())),
                "exemplar {trace}/{span} is not a span Rotel received"
            );
        }
    }
    let routes: HashSet<&str> = ours
        .iter()
        .filter_map(|p| p.attributes.get("http.route").map(String::as_str))
        .collect();
    anyhow::ensure!(
        routes == HashSet::from(["/ok/{id}", "/missing/{id}", "/fail/{id}"]),
        "routes {routes:?}"
    );
    let fail = ours.iter().find(|p| {
        p.attributes
            .get("http.response.status_code")
            .map(String::as_str)
            == Some("500")
    });
    anyhow::ensure!(
        fail.and_then(|p| p.attributes.get("error.type"))
            .map(String::as_str)
            == Some("500"),
        "5xx without error.type: {fail:#?}"
    );

    // Prometheus text: the same counts, parsed by prometheus_client.
    let (content_type, text) = scrape(metrics_port, false)?;
    anyhow::ensure!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content type {content_type}"
    );
    let parsed = parse_with_prometheus_client("text", &text)?;
    anyhow::ensure!(
        parsed.contains("http_server_request_duration_seconds histogram"),
        "{parsed}"
    );
    anyhow::ensure!(
        !text.contains(" # {"),
        "exemplars in the text format:\n{text}"
    );
    let count_line = text.lines().find(|l| {
        l.starts_with("http_server_request_duration_seconds_count{")
            && l.contains(&format!("process_pid=\"{worker}\""))
            && l.contains("http_response_status_code=\"404\"")
    });
    anyhow::ensure!(
        count_line.is_some_and(|l| l.ends_with(" 3")),
        "no 404 count of 3 for nginx:\n{text}"
    );
    // OpenMetrics, with exemplars.
    let (content_type, om) = scrape(metrics_port, true)?;
    anyhow::ensure!(
        content_type.starts_with("application/openmetrics-text"),
        "content type {content_type}"
    );
    anyhow::ensure!(om.ends_with("# EOF\n"), "OpenMetrics must end with # EOF");
    let parsed = parse_with_prometheus_client("openmetrics", &om)?;
    let exemplars: usize = parsed
        .lines()
        .find_map(|l| l.strip_prefix("exemplars "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    anyhow::ensure!(
        exemplars >= 3,
        "OpenMetrics answer with {exemplars} exemplars:\n{om}"
    );

    // Sampled out: no spans, still counted.
    ctl.ok(&["sample", "0"])?;
    let urls: Vec<String> = (0..4).map(|i| nginx.url(&format!("/ok/{i}"))).collect();
    curl(&urls, &[])?;
    let want: BTreeMap<i64, u64> = [(200, 10), (404, 3), (500, 2)].into();
    wait_for_counts(&rotel, "http.server.request.duration", worker, &want)?;
    ctl.ok(&["sample", "1"])?;

    // Switched off: the histograms go from the endpoint; back on, they count again.
    ctl.ok(&["disable", "metrics"])?;
    let (_, off) = scrape(metrics_port, false)?;
    anyhow::ensure!(
        !off.contains("http_server_request_duration_seconds_count{"),
        "still there:\n{off}"
    );
    ctl.ok(&["enable", "metrics"])?;
    curl(&[nginx.url("/ok/1")], &[])?;
    let t0 = Instant::now();
    loop {
        let (_, on) = scrape(metrics_port, false)?;
        let line = on.lines().find(|l| {
            l.starts_with("http_server_request_duration_seconds_count{")
                && l.contains(&format!("process_pid=\"{worker}\""))
        });
        if line.is_some_and(|l| l.ends_with(" 1")) {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < SPAN_WAIT,
            "metrics did not come back after enable:\n{on}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.check_running()
}

/// 10,000 distinct paths, none of them id-like, on one keep-alive
/// connection: nginx keeps `--max-routes` routes and one `_OTHER`.
#[test]
fn ten_thousand_paths_keep_the_routes_within_the_cap() {
    run_test(LIMIT, ten_thousand_paths)
}

fn ten_thousand_paths() -> anyhow::Result<()> {
    const MAX_ROUTES: usize = 50;
    const REQUESTS: usize = 10_000;
    let Setup {
        rotel: _rotel,
        nginx,
        ctl,
        metrics_port,
        mut agent,
        worker,
    } = setup(&["--max-routes", &MAX_ROUTES.to_string()])?;
    let script = r#"
import http.client, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
ok = 0
for i in range(n):
    if i % 50 == 0:
        time.sleep(0.01)  # about 4,000 a second at most: a slow CI machine keeps up
    c.request("GET", f"/any/page{i}x")
    r = c.getresponse(); r.read()
    ok += r.status == 200
print(ok)
"#;
    let out = python(script, &[&nginx.port().to_string(), &REQUESTS.to_string()])?;
    anyhow::ensure!(
        out.stdout.trim() == REQUESTS.to_string(),
        "python got {} 200s",
        out.stdout.trim()
    );

    let prefix = "http_server_request_duration_seconds_count{";
    let pid_label = format!("process_pid=\"{worker}\"");
    let t0 = Instant::now();
    let (routes, total, other) = loop {
        let (_, text) = scrape(metrics_port, false)?;
        let ours: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(&pid_label))
            .collect();
        let count = |l: &str| {
            l.rsplit(' ')
                .next()
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        let total: u64 = ours.iter().map(|l| count(l)).sum();
        let other: u64 = ours
            .iter()
            .filter(|l| l.contains("http_route=\"_OTHER\""))
            .map(|l| count(l))
            .sum();
        let routes: HashSet<&str> = ours
            .iter()
            .filter_map(|l| l.split("http_route=\"").nth(1)?.split('"').next())
            .collect();
        if total >= REQUESTS as u64 || t0.elapsed() > SPAN_WAIT {
            break (routes.len(), total, other);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    // Series differ by status too (a request cut by lost events has none),
    // so the cap is checked on the routes.
    anyhow::ensure!(
        routes == MAX_ROUTES + 1,
        "{routes} routes for nginx, want {MAX_ROUTES} and _OTHER"
    );
    let status = ctl.status()?;
    let lost: u64 = serde_json::from_str::<serde_json::Value>(&status.text)?["lost_per_probe"]
        .as_object()
        .map_or(0, |o| o.values().filter_map(|v| v.as_u64()).sum());
    if lost == 0 {
        anyhow::ensure!(
            total == REQUESTS as u64,
            "nginx's histograms counted {total} of {REQUESTS} requests, no events lost"
        );
        anyhow::ensure!(
            other == (REQUESTS - MAX_ROUTES) as u64,
            "_OTHER counted {other}"
        );
    } else {
        // The kernel dropped events (the ring buffer was full): the
        // requests they carried are not seen, by the metrics or anything else.
        anyhow::ensure!(
            total >= REQUESTS as u64 * 9 / 10,
            "nginx's histograms counted {total} of {REQUESTS} requests ({lost} events lost)"
        );
    }
    let folded = status.u64("counters.red_routes_folded")?;
    anyhow::ensure!(
        folded == other,
        "red_routes_folded {folded}, _OTHER {other}"
    );
    agent.check_running()
}
