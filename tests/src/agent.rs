//! The Periscope agent under test: `periscope run --otlp-endpoint URL`.

use crate::proc::{Proc, StopWith};
use anyhow::{Result, bail};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The line the agent prints on stderr once its kernel programs are attached.
pub const READY_LINE: &str = "periscope ready";
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The agent binary: `PERISCOPE_BIN` if set, else
/// `<target dir>/<PERISCOPE_PROFILE or debug>/periscope`, where the target dir
/// is `CARGO_TARGET_DIR` or `<workspace>/target`. `cargo xtask test` builds it
/// and sets `PERISCOPE_PROFILE`.
pub fn binary() -> Result<PathBuf> {
    let path = match std::env::var_os("PERISCOPE_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let profile = std::env::var("PERISCOPE_PROFILE").unwrap_or_else(|_| "debug".into());
            crate::target_dir().join(profile).join("periscope")
        }
    };
    if !path.is_file() {
        bail!(
            "the agent binary {} is missing: build it first (`cargo xtask build`, or run everything with `cargo xtask test`; \
             PERISCOPE_PROFILE=release selects target/release, PERISCOPE_BIN=PATH any binary)",
            path.display()
        );
    }
    Ok(path)
}

pub struct Agent {
    proc: Proc,
    /// The control socket's directory when the test did not choose one.
    _socket_dir: Option<tempfile_dir::Dir>,
}

/// A private directory for a default control socket, removed on drop, so
/// that agents under test never meet each other (or a real daemon) on
/// `/run/periscope/control.sock`.
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> std::io::Result<Dir> {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "periscope-agent-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Options beyond the OTLP endpoint.
#[derive(Default, Clone)]
pub struct AgentOptions {
    /// Extra arguments after `run --otlp-endpoint URL`.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl Agent {
    /// Start `periscope run --otlp-endpoint ENDPOINT` and wait for `periscope ready`.
    pub fn start(otlp_endpoint: &str) -> Result<Agent> {
        Self::start_with(otlp_endpoint, AgentOptions::default())
    }

    pub fn start_with(otlp_endpoint: &str, opts: AgentOptions) -> Result<Agent> {
        Self::start_inner(Some(otlp_endpoint), opts)
    }

    /// Start `periscope run` with no OTLP endpoint: spans are printed on
    /// its stdout (see [`Agent::log`]).
    pub fn start_stdout(opts: AgentOptions) -> Result<Agent> {
        Self::start_inner(None, opts)
    }

    fn start_inner(otlp_endpoint: Option<&str>, opts: AgentOptions) -> Result<Agent> {
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the agent loads eBPF programs and must run as root; run the end-to-end tests as root (`cargo xtask test`)"
            );
        }
        let bin = binary()?;
        let mut cmd = Command::new(&bin);
        cmd.arg("run");
        if let Some(endpoint) = otlp_endpoint {
            cmd.args(["--otlp-endpoint", endpoint]);
        }
        cmd.args(&opts.args);
        // A test that picks the socket (flag or config file) keeps it.
        let chosen = |a: &String| a == "--socket" || a.starts_with("--socket=") || a == "--config";
        let socket_dir = if opts.args.iter().any(chosen) {
            None
        } else {
            let dir = tempfile_dir::Dir::new()?;
            cmd.arg("--socket").arg(dir.0.join("control.sock"));
            Some(dir)
        };
        cmd
            .env(
                "RUST_LOG",
                std::env::var("PERISCOPE_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // The agent's own exporter must not pick up the test runner's OTEL_* settings.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
            .env_remove("OTEL_SERVICE_NAME")
            .envs(opts.env.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn_with(
            "periscope",
            &mut cmd,
            StopWith {
                signal: libc::SIGINT,
                grace: Duration::from_secs(5),
            },
        )?;
        proc.wait_for_line(&format!("`{READY_LINE}`"), READY_TIMEOUT, |l| {
            l.contains(READY_LINE)
        })?;
        Ok(Agent { proc, _socket_dir: socket_dir })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Everything the agent printed (stderr and stdout).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Fail, with the agent's log, if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(st) = self.proc.try_status() {
            bail!("the agent exited ({st}); its log:\n{}", self.log());
        }
        Ok(())
    }

    /// Wait for a log line matching `pred`.
    pub fn wait_for_log(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        self.proc.wait_for_line(what, timeout, pred)
    }

    /// Stop with SIGINT (SIGKILL after 5 s) and return the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.stop()
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

impl Drop for Agent {
    /// Stop the agent and print its log. cargo test shows a test's output only
    /// when the test fails, so this is the agent's side of every failure.
    fn drop(&mut self) {
        self.proc.stop();
        let lines = self.proc.output().lines();
        let skip = lines.len().saturating_sub(300);
        eprintln!(
            "---- periscope agent (pid {}) log, last {} of {} lines ----",
            self.proc.pid(),
            lines.len() - skip,
            lines.len()
        );
        for l in &lines[skip..] {
            eprintln!("{l}");
        }
        eprintln!("---- end of agent log ----");
    }
}
