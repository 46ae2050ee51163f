//! Other real servers: Python's `http.server` and Redis.

use crate::proc::{Proc, StopWith, TempDir, free_port, run_capture, wait_for_port};
use anyhow::{Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn wait_listening(proc: &mut Proc, port: u16, what: &str) -> Result<()> {
    let t0 = Instant::now();
    while !wait_for_port(port, Duration::from_millis(100)) {
        if !proc.is_running() || t0.elapsed() > Duration::from_secs(15) {
            bail!(
                "{what} did not start listening on 127.0.0.1:{port}; output:\n{}",
                proc.log()
            );
        }
    }
    Ok(())
}

/// `/usr/bin/python3 -m http.server PORT --bind 127.0.0.1 --directory DIR`.
pub struct PyHttpServer {
    proc: Proc,
    port: u16,
    dir: TempDir,
}

impl PyHttpServer {
    /// Serves a temp dir holding `hello.txt`.
    pub fn start() -> Result<PyHttpServer> {
        let py = crate::system_python()?;
        let dir = TempDir::new("pyhttp")?;
        std::fs::write(dir.join("hello.txt"), "hello from python http.server\n")?;
        let port = free_port();
        let mut cmd = Command::new(py);
        cmd.args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir.path());
        let mut proc = Proc::spawn_with(
            "python-http.server",
            &mut cmd,
            StopWith {
                signal: libc::SIGINT,
                grace: Duration::from_secs(3),
            },
        )?;
        wait_listening(&mut proc, port, "python3 -m http.server")?;
        Ok(PyHttpServer { proc, port, dir })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// `redis-server --port P --bind 127.0.0.1 --save ''` in a temp dir.
pub struct Redis {
    proc: Proc,
    port: u16,
    cli_pids: std::sync::Mutex<Vec<u32>>,
    _dir: TempDir,
}

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
pub const REDIS_CLI: &str = "/usr/bin/redis-cli";

impl Redis {
    pub fn start() -> Result<Redis> {
        for b in [REDIS_SERVER, REDIS_CLI] {
            if !Path::new(b).is_file() {
                bail!(
                    "{b} is missing: install redis-server and redis-tools (`cargo xtask setup --test-deps`)"
                );
            }
        }
        let dir = TempDir::new("redis")?;
        let port = free_port();
        let mut cmd = Command::new(REDIS_SERVER);
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path());
        let mut proc = Proc::spawn_with(
            "redis-server",
            &mut cmd,
            StopWith {
                signal: libc::SIGTERM,
                grace: Duration::from_secs(3),
            },
        )?;
        wait_listening(&mut proc, port, "redis-server")?;
        Ok(Redis {
            proc,
            port,
            cli_pids: Default::default(),
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Run `redis-cli -p PORT ARGS...` and return its trimmed output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(REDIS_CLI);
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args);
        let f = run_capture("redis-cli", &mut cmd, Duration::from_secs(10))?.ok()?;
        self.cli_pids.lock().unwrap().push(f.pid);
        Ok(f.stdout.trim().to_string())
    }

    /// Pids of every `redis-cli` run through [`Redis::cli`].
    pub fn cli_pids(&self) -> Vec<u32> {
        self.cli_pids.lock().unwrap().clone()
    }
}
