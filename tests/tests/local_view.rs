//! End-to-end tests of the local view (issue 15): `periscope traces` and
//! `periscope map` against the running agent, while it traces the chain
//! curl -> nginx -> Python backend -> Python backend2 (see
//! `periscope_tests::chain`), with and without an OTLP endpoint.
//!
//! The contract:
//! - `traces` prints each trace as a waterfall: one line per span, a child
//!   indented under its parent, spans in the order of the chain; filters
//!   (`--service`, `--errors`, `--min-duration`, `--last`) select traces;
//!   `--follow` prints a trace that completes after it started;
//! - `traces --svg FILE` writes an SVG that parses as XML and names the spans;
//! - `map` shows the edges curl -> nginx -> python3.11 -> python3.11, and
//!   `map --svg FILE` draws them;
//! - with no OTLP endpoint (spans printed on stdout) the view is the same.

use periscope_tests::chain::{Backend, Backend2, Downstream, Upstream, chain_nginx, chain_path};
use periscope_tests::clients::curl;
use periscope_tests::control::ControlSocket;
use periscope_tests::proc::{Proc, StopWith};
use periscope_tests::*;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(30);

/// Polls `periscope traces ARGS` until its output satisfies `done`.
fn wait_for_traces(
    ctl: &ControlSocket,
    args: &[&str],
    done: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let t0 = Instant::now();
    loop {
        let mut all = vec!["traces"];
        all.extend_from_slice(args);
        let out = ctl.ok(&all)?;
        if done(&out) {
            return Ok(out);
        }
        anyhow::ensure!(
            t0.elapsed() < WAIT,
            "`periscope traces {}` never showed what was expected:\n{out}",
            args.join(" ")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The waterfall lines of the trace whose root is curl's request for `path`:
/// (indentation, line), from the trace's header to the next header.
fn trace_block<'a>(out: &'a str, path: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = out.lines().collect();
    let Some(at) = lines
        .iter()
        .position(|l| l.contains(&format!("GET {path}")) && l.contains("curl"))
    else {
        return Vec::new();
    };
    let start = lines[..at]
        .iter()
        .rposition(|l| l.starts_with("trace "))
        .unwrap_or(at);
    let end = lines[at..]
        .iter()
        .position(|l| l.starts_with("trace "))
        .map_or(lines.len(), |i| at + i);
    lines[start..end].to_vec()
}

/// The column (in characters: the bars are multi-byte) where a span line's
/// `service label` starts; deeper spans are indented further.
fn depth(line: &str, service: &str, label: &str) -> Option<usize> {
    let i = line.find(&format!("{service} {label}"))?;
    Some(line[..i].chars().count())
}

fn chain_view(with_endpoint: bool) -> anyhow::Result<()> {
    let rotel = Rotel::start()?;
    let b2 = Backend2::start()?;
    let backend = Backend::start(b2.port(), Downstream::NewConnection)?;
    let nginx = chain_nginx(backend.port(), Upstream::Close, None)?;
    let ctl = ControlSocket::new()?;
    let mut agent = if with_endpoint {
        Agent::start_with(&rotel.endpoint(), ctl.agent_options())?
    } else {
        Agent::start_stdout(ctl.agent_options())?
    };
    let urls: Vec<String> = (1..=3).map(|n| nginx.url(&chain_path(n))).collect();
    curl(&urls, &[])?;

    let path = chain_path(2);
    let out = wait_for_traces(&ctl, &["--last", "50"], |o| {
        trace_block(o, &path).len() >= 7
    })?;
    let block = trace_block(&out, &path);
    // Header, then curl's client span, nginx's server and client spans, the
    // backend's server and client spans, backend2's server span.
    let labels = [
        ("curl", format!("GET {path}")),
        ("nginx", format!("GET {path}")),
        ("nginx", format!("GET {path}")),
        ("python3.11", format!("GET {path}")),
        ("python3.11", "GET /leaf/2".to_string()),
        ("python3.11", "GET /leaf/2".to_string()),
    ];
    let span_lines: Vec<&str> = block
        .iter()
        .skip(1)
        .copied()
        .filter(|l| l.contains("GET "))
        .collect();
    anyhow::ensure!(
        span_lines.len() == labels.len(),
        "want {} request spans in the trace:\n{}",
        labels.len(),
        block.join("\n")
    );
    let mut last_indent = None;
    for ((service, label), line) in labels.iter().zip(&span_lines) {
        anyhow::ensure!(
            line.contains(service) && line.contains(label.as_str()),
            "{line:?} is not {service} {label}:\n{}",
            block.join("\n")
        );
        let indent = depth(line, service, label).unwrap_or(0);
        if let Some(prev) = last_indent {
            anyhow::ensure!(
                indent > prev,
                "each hop is nested under the previous one:\n{}",
                block.join("\n")
            );
        }
        last_indent = Some(indent);
    }
    anyhow::ensure!(
        !out.contains('\u{1b}'),
        "colour codes when stdout is not a terminal"
    );

    // Filters.
    let none = ctl.ok(&["traces", "--errors"])?;
    anyhow::ensure!(
        !none.contains(&format!("GET {path}")),
        "--errors showed a trace without errors:\n{none}"
    );
    let nginx_only = ctl.ok(&["traces", "--service", "nginx", "--last", "1"])?;
    anyhow::ensure!(
        nginx_only
            .lines()
            .filter(|l| l.starts_with("trace "))
            .count()
            == 1,
        "--last 1:\n{nginx_only}"
    );
    let slow = ctl.ok(&["traces", "--min-duration", "10s"])?;
    anyhow::ensure!(
        !slow.contains("GET /chain/"),
        "--min-duration 10s showed fast traces:\n{slow}"
    );

    // SVG of the waterfall.
    let dir = periscope_tests::proc::TempDir::new("local-view")?;
    let svg = dir.join("traces.svg");
    ctl.ok(&["traces", "--last", "50", "--svg", svg.to_str().unwrap()])?;
    check_svg(
        &svg,
        &[&format!("GET {path}"), "GET /leaf/2", "nginx", "python3.11"],
    )?;

    // --follow prints a trace made after it started.
    let bin = periscope_tests::agent::binary()?;
    let mut follow_cmd = std::process::Command::new(bin);
    follow_cmd.args(["traces", "--follow", "--socket", ctl.path_str()]);
    let mut follow = Proc::spawn_with(
        "traces-follow",
        &mut follow_cmd,
        StopWith {
            signal: libc::SIGINT,
            grace: Duration::from_secs(2),
        },
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    curl(&[nginx.url(&chain_path(9))], &[])?;
    follow.wait_for_line("the new trace from --follow", WAIT, |l| {
        l.contains("GET /chain/9") && l.contains("curl")
    })?;
    follow.stop();

    // The service map.
    let t0 = Instant::now();
    let map = loop {
        let map = ctl.ok(&["map"])?;
        if [
            "curl -> nginx",
            "nginx -> python3.11",
            "python3.11 -> python3.11",
        ]
        .iter()
        .all(|e| map.contains(e))
        {
            break map;
        }
        anyhow::ensure!(
            t0.elapsed() < WAIT,
            "the map lacks the chain's edges:\n{map}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let edge = map
        .lines()
        .find(|l| l.contains("curl -> nginx"))
        .unwrap_or_default();
    anyhow::ensure!(
        edge.contains(" 4 "),
        "curl -> nginx should count 4 requests: {edge:?}\n{map}"
    );
    let map_svg = dir.join("map.svg");
    ctl.ok(&["map", "--svg", map_svg.to_str().unwrap()])?;
    check_svg(&map_svg, &["curl", "nginx", "python3.11"])?;
    agent.check_running()
}

/// Parses `path` with Python's XML parser (fails on malformed XML) and
/// checks that its text names every one of `want`.
fn check_svg(path: &std::path::Path, want: &[&str]) -> anyhow::Result<()> {
    let script = "import sys, xml.etree.ElementTree as E\n\
                  root = E.parse(sys.argv[1]).getroot()\n\
                  assert root.tag.endswith('svg'), root.tag\n\
                  print('\\n'.join(t for t in root.itertext()))\n";
    let out = periscope_tests::clients::python(script, &[path.to_str().unwrap()])?;
    anyhow::ensure!(
        out.status.success(),
        "{} is not valid XML: {}",
        path.display(),
        out.stderr
    );
    for w in want {
        anyhow::ensure!(
            out.stdout.contains(w),
            "{} does not show {w:?}; its text:\n{}",
            path.display(),
            out.stdout
        );
    }
    Ok(())
}

#[test]
fn traces_waterfall_svg_and_map_of_the_chain() {
    run_test(LIMIT, || chain_view(true))
}

#[test]
fn local_view_works_without_an_otlp_endpoint() {
    run_test(LIMIT, || chain_view(false))
}
