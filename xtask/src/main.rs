//! `cargo xtask COMMAND`: set up, build, run, test and bench Periscope.
//!
//! - `setup [--test-deps]`  mount tracefs, add rust-src, install bpf-linker;
//!   with `--test-deps` also the Debian and Python packages the tests run
//! - `build [--release]`    setup, then build the agent (its build script builds the eBPF side)
//! - `run [-- ARGS]`        setup, release build, exec `periscope run ARGS` (needs root)
//! - `test [--release]`     setup --test-deps, build, unit tests, then end-to-end tests (needs root)
//! - `bench [--quick] [--profile]`  the agent's cost: nginx (wrk, ab, hey, h2load), a Go HTTPS server (wrk), gRPC (Python, and grpc-go over TLS) and Flask/gunicorn against no agent, the no-op floor and OTel;
//!   scaling; CPU per request by part; `--profile`: a perf flame graph of the agent under load (alone: only that)
//! - `image`              release build, then the container image (deploy/Containerfile) with podman or docker: localhost/periscope:dev
//! - `go-offsets [--check]`  regenerate the agent's Go struct offsets table from
//!   every Go toolchain's DWARF; `--check`: fail if the checked-in table differs

mod bench;
mod cmd;
mod go_offsets;
mod setup;
mod test;

use anyhow::{Result, bail};
use setup::Setup;
use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <setup [--test-deps] | build [--release] | run [-- ARGS] | test [--release] | bench [--quick] [--profile] | go-offsets [--check] | image>";

fn main() -> ExitCode {
    // Everything below (bpf-linker, nested cargo, aya-build) needs ~/.cargo/bin on PATH.
    cmd::prepend_path(&cmd::cargo_home().join("bin"));
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return Ok(ExitCode::from(2));
    };
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    match command.as_str() {
        "setup" => {
            let test_deps = flags(&rest, &["--test-deps"])?.contains(&"--test-deps");
            Setup { test_deps }.run()?;
        }
        "build" => {
            let release = flags(&rest, &["--release"])?.contains(&"--release");
            Setup { test_deps: false }.run()?;
            build(release)?;
        }
        "run" => {
            let agent_args = match rest.split_first() {
                None => &[][..],
                Some((&"--", tail)) => tail,
                Some(_) => rest.as_slice(),
            };
            Setup { test_deps: false }.run()?;
            build(true)?;
            return exec_agent(agent_args);
        }
        "test" => {
            let release = flags(&rest, &["--release"])?.contains(&"--release");
            return test::run(release);
        }
        "bench" => {
            let given = flags(&rest, &["--quick", "--profile"])?;
            Setup { test_deps: false }.run()?;
            bench::run(bench::BenchArgs::new(
                given.contains(&"--quick"),
                given.contains(&"--profile"),
            ))?;
        }
        "image" => {
            flags(&rest, &[])?;
            Setup { test_deps: false }.run()?;
            build(true)?;
            image()?;
        }
        "go-offsets" => {
            let check = flags(&rest, &["--check"])?.contains(&"--check");
            go_offsets::run(check)?;
        }
        "-h" | "--help" | "help" => eprintln!("{USAGE}"),
        other => {
            eprintln!("xtask: unknown command `{other}`\n{USAGE}");
            return Ok(ExitCode::from(2));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask image`: the agent's container image, built offline from the
/// release build (`deploy/Containerfile`: scratch, the agent and glibc) with
/// podman or docker, tagged `localhost/periscope:dev` and `:VERSION`.
fn image() -> Result<()> {
    use periscope_tests::container::{AGENT_IMAGE, Engine, build_agent_image};
    let engine = Engine::find()?;
    let bin = periscope_tests::target_dir().join("release").join("periscope");
    let version = cmd::output_of(bin.to_str().unwrap_or_default(), ["--version"])
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let versioned = format!("localhost/periscope:{version}");
    let id = build_agent_image(engine, &bin, &[AGENT_IMAGE, &versioned])?;
    eprintln!(
        "xtask image: built {AGENT_IMAGE} and {versioned} ({}) with {}",
        &id[..id.len().min(12)],
        engine.program()
    );
    Ok(())
}

/// Accept only the given flags.
fn flags<'a>(args: &[&'a str], allowed: &[&str]) -> Result<Vec<&'a str>> {
    for a in args {
        if !allowed.contains(a) {
            bail!("unexpected argument `{a}`\n{USAGE}");
        }
    }
    Ok(args.to_vec())
}

pub fn profile_name(release: bool) -> &'static str {
    if release { "release" } else { "debug" }
}

/// Build the agent; its build script compiles the eBPF crate with aya-build.
pub fn build(release: bool) -> Result<()> {
    let mut c = cmd::cargo();
    c.args(["build", "--package", "periscope"]);
    if release {
        c.arg("--release");
    }
    cmd::run(&mut c)?;
    let bin = agent_binary(release);
    if !bin.is_file() {
        bail!("build succeeded but {} is missing", bin.display());
    }
    eprintln!("xtask: built {}", bin.display());
    Ok(())
}

pub fn agent_binary(release: bool) -> std::path::PathBuf {
    cmd::target_dir()
        .join(profile_name(release))
        .join("periscope")
}

fn exec_agent(args: &[&str]) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    if !cmd::is_root() {
        eprintln!(
            "xtask: WARNING: you are not root (euid {}): loading eBPF programs needs root \
             (or CAP_BPF + CAP_PERFMON + CAP_SYS_RESOURCE); expect the agent to fail. Try `sudo -E cargo xtask run`.",
            cmd::euid()
        );
    }
    let bin = agent_binary(true);
    let mut c = std::process::Command::new(&bin);
    c.arg("run").args(args);
    eprintln!("xtask: exec {}", cmd::show(&c));
    let err = c.exec();
    bail!("could not exec {}: {err}", bin.display())
}
