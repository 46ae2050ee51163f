//! `cargo xtask test [--release]`: set up (with test dependencies), build the
//! agent, run the unit tests of the workspace, then the end-to-end tests of the
//! `periscope-tests` package one at a time (each starts its own agent, which
//! attaches kernel programs host-wide, so they must not overlap).
//!
//! Prints a closing `summary: N passed, N failed` line and exits non-zero if
//! anything failed, did not build, or if not run as root.

use crate::cmd;
use crate::setup::Setup;
use anyhow::{Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::process::{ExitCode, Stdio};
use std::time::Instant;

#[derive(Default, Debug)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

pub fn run(release: bool) -> Result<ExitCode> {
    let t0 = Instant::now();
    if !cmd::is_root() {
        bail!(
            "`cargo xtask test` must run as root (euid is {}): the end-to-end tests load eBPF programs, \
             mount tracefs and install packages. Run it as root (e.g. `sudo -E cargo xtask test`).",
            cmd::euid()
        );
    }
    Setup { test_deps: true }.run()?;
    crate::build(release)?;

    let mut total = Counts::default();
    let mut failures = Vec::new();

    // 1. Unit tests of every host crate (the eBPF crate is built by the agent's
    //    build script, not for the host; the end-to-end package runs below).
    let mut unit = cmd::cargo();
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "periscope-ebpf",
        "--exclude",
        "periscope-tests",
    ]);
    stage("unit tests", &mut unit, &mut total, &mut failures)?;

    // 2. The harness's own tests and the end-to-end tests, one at a time.
    let mut e2e = cmd::cargo();
    e2e.args([
        "test",
        "--package",
        "periscope-tests",
        // Every suite runs even after one fails: CI reports all failures.
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ])
    .env("PERISCOPE_PROFILE", crate::profile_name(release));
    stage("end-to-end tests", &mut e2e, &mut total, &mut failures)?;

    eprintln!(
        "xtask test: finished in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        eprintln!("xtask test: FAILED: {}", failures.join("; "));
    }
    // The closing line CI reads.
    println!(
        "summary: {} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    Ok(if failures.is_empty() && total.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Run one `cargo test`, echo its stdout, and add up its `test result:` lines.
fn stage(
    name: &str,
    cmd: &mut std::process::Command,
    total: &mut Counts,
    failures: &mut Vec<String>,
) -> Result<()> {
    eprintln!("xtask test: {name}: $ {}", cmd::show(cmd));
    let t0 = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let mut counts = Counts::default();
    let stdout = std::io::stdout();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        {
            let mut out = stdout.lock();
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        if let Some(c) = parse_result_line(&line) {
            counts.passed += c.passed;
            counts.failed += c.failed;
            counts.ignored += c.ignored;
        }
    }
    let status = child.wait()?;
    eprintln!(
        "xtask test: {name}: {} passed, {} failed, {} ignored in {:.0} s ({status})",
        counts.passed,
        counts.failed,
        counts.ignored,
        t0.elapsed().as_secs_f64()
    );
    if !status.success() {
        failures.push(if counts.failed > 0 {
            format!("{name}: {} failed", counts.failed)
        } else {
            format!("{name}: cargo test exited with {status} (build failure?)")
        });
    }
    total.passed += counts.passed;
    total.failed += counts.failed;
    total.ignored += counts.ignored;
    Ok(())
}

/// `test result: ok. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s`
fn parse_result_line(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut c = Counts::default();
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        // `ok. 3 passed` or `FAILED. 3 passed` or `1 failed`
        let (n, what) = match words.as_slice() {
            [_, n, w] | [n, w] => (n, *w),
            _ => continue,
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => c.passed = n,
            "failed" => c.failed = n,
            "ignored" => c.ignored = n,
            _ => {}
        }
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_test_result_lines() {
        let c = parse_result_line("test result: ok. 3 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s").unwrap();
        assert_eq!((c.passed, c.failed, c.ignored), (3, 0, 2));
        let c = parse_result_line("test result: FAILED. 1 passed; 4 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.1s").unwrap();
        assert_eq!((c.passed, c.failed, c.ignored), (1, 4, 0));
        assert!(parse_result_line("running 3 tests").is_none());
    }
}
