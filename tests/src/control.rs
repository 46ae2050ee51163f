//! Steering the agent under test at run time: its control socket and CLI
//! (`periscope status|enable|disable|filter|sample --socket PATH`), the
//! `status --json` report, and a background loop of curl requests whose
//! times and pids are recorded (traffic that keeps flowing while a test
//! changes the agent's settings).
//!
//! Each test gets a control socket of its own in a temp dir
//! ([`ControlSocket`]), so tests never talk to another test's daemon or to a
//! system-wide one at `/run/periscope/control.sock`.
//!
//! The tests crate has no JSON dependency; [`Json`] is a small strict
//! RFC 8259 parser, enough to check that `status --json` is valid JSON and
//! to read it.

use crate::agent::{AgentOptions, binary};
use crate::clients::curl1;
use crate::proc::{Finished, TempDir, run_capture};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Exit codes of the control CLI (the contract in the agent's `control::client`).
pub const EXIT_OK: i32 = 0;
pub const EXIT_REFUSED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_NOT_RUNNING: i32 = 3;
pub const EXIT_PERMISSION: i32 = 4;

pub const SETPRIV: &str = "/usr/bin/setpriv";

/// Wall clock now, Unix nanoseconds (comparable with span times).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

// ------------------------------------------------------------------ CLI

/// One run of the `periscope` CLI.
#[derive(Clone, Debug)]
pub struct CliRun {
    /// The command line, for messages.
    pub shown: String,
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    fn from(shown: String, f: Finished) -> CliRun {
        CliRun {
            shown,
            code: f.status.code(),
            stdout: f.stdout,
            stderr: f.stderr,
        }
    }

    /// Fail unless the exit code is `want`.
    pub fn expect_code(&self, want: i32) -> Result<&CliRun> {
        if self.code != Some(want) {
            bail!(
                "`{}` exited with {:?}, want {want}\nstdout:\n{}\nstderr:\n{}",
                self.shown,
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// stdout and stderr together, for message checks.
    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Run `periscope ARGS...` (no socket added) to completion.
pub fn periscope(args: &[&str]) -> Result<CliRun> {
    let bin = binary()?;
    let mut cmd = Command::new(&bin);
    cmd.args(args).env("RUST_LOG", "warn");
    let shown = format!("periscope {}", args.join(" "));
    let f = run_capture("periscope-cli", &mut cmd, Duration::from_secs(30))?;
    Ok(CliRun::from(shown, f))
}

/// Run `periscope ARGS...` as uid/gid 65534 (nobody) with no groups, through
/// `setpriv`.
pub fn periscope_as_nobody(args: &[&str]) -> Result<CliRun> {
    if !Path::new(SETPRIV).is_file() {
        bail!("{SETPRIV} is missing: install util-linux (`cargo xtask setup --test-deps`)");
    }
    let bin = binary()?;
    let mut cmd = Command::new(SETPRIV);
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(args)
        .env("RUST_LOG", "warn");
    let shown = format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups periscope {}",
        args.join(" ")
    );
    let f = run_capture("periscope-cli-nobody", &mut cmd, Duration::from_secs(30))?;
    Ok(CliRun::from(shown, f))
}

/// A control socket path in a temp dir of its own (removed on drop).
pub struct ControlSocket {
    dir: TempDir,
    path: PathBuf,
}

impl ControlSocket {
    pub fn new() -> Result<ControlSocket> {
        let dir = TempDir::new("control")?;
        let path = dir.join("control.sock");
        Ok(ControlSocket { dir, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Agent options that make `periscope run` listen on this socket.
    pub fn agent_options(&self) -> AgentOptions {
        AgentOptions {
            args: vec!["--socket".into(), self.path_str().into()],
            env: Vec::new(),
        }
    }

    /// `periscope ARGS... --socket PATH`, whatever its exit code.
    pub fn run(&self, args: &[&str]) -> Result<CliRun> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--socket", self.path_str()]);
        periscope(&all)
    }

    /// `periscope ARGS... --socket PATH`, which must exit 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let r = self.run(args)?;
        r.expect_code(EXIT_OK)?;
        Ok(r.stdout)
    }

    /// `periscope status --json --socket PATH`, parsed.
    pub fn status(&self) -> Result<Status> {
        let out = self.ok(&["status", "--json"])?;
        let json = parse_json(&out)
            .with_context(|| format!("`periscope status --json` printed invalid JSON:\n{out}"))?;
        if !matches!(json, Json::Object(_)) {
            bail!("`periscope status --json` printed JSON that is not an object:\n{out}");
        }
        Ok(Status { json, text: out })
    }

    /// Poll `status` until `pred` holds; fail with the last report.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Status) -> bool,
    ) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status()?;
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "status never showed {what} within {timeout:?}; last report:\n{}",
                    s.text
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A parsed `status --json` report.
#[derive(Clone, Debug)]
pub struct Status {
    pub json: Json,
    /// What the CLI printed.
    pub text: String,
}

impl Status {
    pub fn get(&self, path: &str) -> Option<&Json> {
        self.json.at(path)
    }

    /// A field that must be there; the error shows the report.
    pub fn req(&self, path: &str) -> Result<&Json> {
        self.get(path)
            .with_context(|| format!("status --json has no `{path}`:\n{}", self.text))
    }

    pub fn u64(&self, path: &str) -> Result<u64> {
        self.req(path)?.as_u64().with_context(|| {
            format!(
                "status --json `{path}` is not a non-negative integer:\n{}",
                self.text
            )
        })
    }

    pub fn bool(&self, path: &str) -> Result<bool> {
        self.req(path)?
            .as_bool()
            .with_context(|| format!("status --json `{path}` is not a boolean:\n{}", self.text))
    }

    pub fn pid(&self) -> Result<u32> {
        Ok(self.u64("pid")? as u32)
    }

    /// `counters.NAME`.
    pub fn counter(&self, name: &str) -> Result<u64> {
        self.u64(&format!("counters.{name}"))
    }

    /// `features.NAME.enabled`.
    pub fn feature_enabled(&self, name: &str) -> Result<bool> {
        self.bool(&format!("features.{name}.enabled"))
    }

    /// `features.NAME.programs`.
    pub fn feature_programs(&self, name: &str) -> Result<Vec<String>> {
        let p = self.req(&format!("features.{name}.programs"))?;
        let arr = p
            .as_array()
            .with_context(|| format!("features.{name}.programs is not an array:\n{}", self.text))?;
        Ok(arr
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect())
    }

    /// `processes[].pid`.
    pub fn process_pids(&self) -> Vec<u32> {
        self.get("processes")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.at("pid").and_then(Json::as_u64))
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The `processes[]` entry of `pid`.
    pub fn process(&self, pid: u32) -> Option<&Json> {
        self.get("processes")?
            .as_array()?
            .iter()
            .find(|p| p.at("pid").and_then(Json::as_u64) == Some(pid as u64))
    }

    pub fn sample_ratio(&self) -> Result<f64> {
        self.req("sample_ratio")?
            .as_f64()
            .with_context(|| format!("sample_ratio is not a number:\n{}", self.text))
    }
}

// ------------------------------------------------------------------ JSON

/// A JSON value (`serde_json`), read with dotted paths through [`JsonPath`].
pub use serde_json::Value as Json;

/// `value.at("counters.spans_built")`: a dotted path of object keys.
pub trait JsonPath {
    fn at(&self, path: &str) -> Option<&Json>;
}

impl JsonPath for Json {
    fn at(&self, path: &str) -> Option<&Json> {
        path.split('.').try_fold(self, |v, key| v.as_object()?.get(key))
    }
}

/// Parses a whole document (trailing garbage is an error).
pub fn parse_json(text: &str) -> Result<Json> {
    Ok(serde_json::from_str(text)?)
}

/// One request the [`CurlLoop`] made.
#[derive(Clone, Debug)]
pub struct LoopRequest {
    pub url: String,
    /// The curl process (one per request, so one connection per request).
    pub pid: u32,
    /// Wall clock around the curl process, Unix ns.
    pub start_ns: u64,
    pub end_ns: u64,
    pub http_code: u16,
    /// curl's local port: a server span's `network.peer.port`.
    pub local_port: u16,
}

/// Runs one curl process per request in a background thread, round-robin
/// over `urls`, one every `interval`, until stopped. Stopped (and joined) on
/// drop too.
pub struct CurlLoop {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(Vec<LoopRequest>, Vec<String>)>>,
}

impl CurlLoop {
    /// `extra`: curl options for every request (e.g. `-k`).
    pub fn start(urls: Vec<String>, extra: Vec<String>, interval: Duration) -> CurlLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("curl-loop".into())
            .spawn(move || {
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                let (mut done, mut errors) = (Vec::new(), Vec::new());
                let mut next = Instant::now();
                let mut i = 0usize;
                while !flag.load(Ordering::Relaxed) {
                    let url = &urls[i % urls.len()];
                    i += 1;
                    let start_ns = now_ns();
                    match curl1(url, &extra) {
                        Ok((pid, t)) => done.push(LoopRequest {
                            url: url.clone(),
                            pid,
                            start_ns,
                            end_ns: now_ns(),
                            http_code: t.http_code,
                            local_port: t.local_port,
                        }),
                        Err(e) => errors.push(format!("{url}: {e:#}")),
                    }
                    next += interval;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                (done, errors)
            })
            .expect("spawn curl loop");
        CurlLoop {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop and return every request made; fail if any curl failed.
    pub fn stop(mut self) -> Result<Vec<LoopRequest>> {
        self.stop.store(true, Ordering::Relaxed);
        let (done, errors) = self
            .handle
            .take()
            .expect("not stopped yet")
            .join()
            .map_err(|_| anyhow::anyhow!("the curl loop panicked"))?;
        if !errors.is_empty() {
            bail!(
                "{} of {} curl requests in the background loop failed:\n{}",
                errors.len(),
                errors.len() + done.len(),
                errors.join("\n")
            );
        }
        Ok(done)
    }
}

impl Drop for CurlLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{JsonPath, parse_json};

    #[test]
    fn dotted_paths() {
        let v = parse_json(r#"{"a": {"b": [1, true]}, "n": 0}"#).unwrap();
        assert_eq!(v.at("n").and_then(|n| n.as_u64()), Some(0));
        assert_eq!(v.at("a.b").and_then(|b| b.as_array()).map(|a| a.len()), Some(2));
        assert!(v.at("a.c").is_none() && v.at("n.x").is_none());
        assert!(parse_json("{\"a\":1} x").is_err());
    }
}
