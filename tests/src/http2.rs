//! HTTP/2 programs for the HTTP/2 tests: `h2load` (nghttp2's load generator,
//! many concurrent streams on one connection) and a slow HTTP/1.1 backend
//! for nginx to proxy (a response whose body ends well after its headers).
//! nginx itself speaks HTTP/2 through [`crate::NginxOptions::http2`]; curl
//! through [`crate::clients::curl_version`].

use crate::proc::{Proc, StopWith, TempDir, run_capture};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub const H2LOAD: &str = "/usr/bin/h2load";

/// What `h2load` reported.
#[derive(Clone, Debug)]
pub struct H2loadRun {
    pub pid: u32,
    /// `requests: N total, N started, N done, N succeeded, ...`
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    /// `status codes: A 2xx, B 3xx, C 4xx, D 5xx`
    pub status_2xx: u64,
    pub status_4xx: u64,
    /// The protocol it negotiated (`Application protocol: h2c`).
    pub protocol: String,
    pub stdout: String,
}

/// `h2load -n REQUESTS -c 1 -m STREAMS URLS...`: one connection, up to
/// `streams` requests in flight on it, the URLs used in turn.
pub fn h2load(urls: &[String], requests: u32, streams: u32) -> Result<H2loadRun> {
    if !Path::new(H2LOAD).is_file() {
        bail!("{H2LOAD} is missing: install nghttp2-client (`cargo xtask setup --test-deps`)");
    }
    let mut cmd = Command::new(H2LOAD);
    cmd.args(["-n", &requests.to_string(), "-c", "1", "-t", "1"])
        .args(["-m", &streams.to_string()])
        .args(urls);
    let f = run_capture("h2load", &mut cmd, Duration::from_secs(60))?
        .ok()
        .context("h2load failed")?;
    parse_h2load(f.pid, &f.stdout)
        .with_context(|| format!("h2load output:\n{}\n{}", f.stdout, f.stderr))
}

fn parse_h2load(pid: u32, out: &str) -> Result<H2loadRun> {
    // "requests: 200 total, 200 started, 200 done, 150 succeeded, 50 failed, 0 errored, 0 timeout"
    let line = |prefix: &str| -> Result<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .with_context(|| format!("no `{prefix}` line"))
    };
    let count = |text: &str, what: &str| -> Result<u64> {
        text.split(',')
            .map(str::trim)
            .find_map(|p| p.strip_suffix(what).map(str::trim))
            .with_context(|| format!("no `{what}` in {text:?}"))?
            .parse()
            .with_context(|| format!("`{what}` in {text:?}"))
    };
    let req = line("requests:")?;
    let codes = line("status codes:")?;
    Ok(H2loadRun {
        pid,
        done: count(req, "done")?,
        succeeded: count(req, "succeeded")?,
        failed: count(req, "failed")?,
        errored: count(req, "errored")?,
        status_2xx: count(codes, "2xx")?,
        status_4xx: count(codes, "4xx")?,
        protocol: line("Application protocol:")?.trim().to_string(),
        stdout: out.to_string(),
    })
}

const SLOW_BACKEND_PY: &str = r#"
import socket, sys, threading, time
head, rest, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000.0
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(16)
print("listening %d" % srv.getsockname()[1], flush=True)
def serve(c):
    with c:
        buf = b""
        while b"\r\n\r\n" not in buf:
            b = c.recv(65536)
            if not b:
                return
            buf += b
        body1, body2 = b"a" * head, b"z" * rest
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (head + rest) + body1)
        time.sleep(delay)
        c.sendall(body2)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// An HTTP/1.1 server (Debian's Python, raw sockets) that answers any GET
/// with 200, its headers and the first `head` body bytes at once, then the
/// last `rest` bytes after `delay`; one request per connection.
pub struct SlowBackend {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl SlowBackend {
    pub fn start(head: usize, rest: usize, delay: Duration) -> Result<SlowBackend> {
        let py = crate::system_python()?;
        let dir = TempDir::new("slow-backend")?;
        let script = dir.join("backend.py");
        std::fs::write(&script, SLOW_BACKEND_PY)?;
        let mut cmd = Command::new(py);
        cmd.arg(&script)
            .arg(head.to_string())
            .arg(rest.to_string())
            .arg(delay.as_millis().to_string());
        let mut proc = Proc::spawn_with(
            "slow-backend",
            &mut cmd,
            StopWith {
                signal: libc::SIGKILL,
                grace: Duration::from_secs(1),
            },
        )?;
        let line = proc.wait_for_line("`listening PORT`", Duration::from_secs(20), |l| {
            l.starts_with("listening ")
        })?;
        let port = line["listening ".len()..]
            .trim()
            .parse()
            .with_context(|| format!("backend printed {line:?}"))?;
        Ok(SlowBackend {
            proc,
            port,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_h2load_output() {
        let out = "starting benchmark...\nApplication protocol: h2c\nprogress: 10% done\n\nfinished in 50.2ms, 3984.06 req/s, 1.05MB/s\nrequests: 200 total, 200 started, 200 done, 150 succeeded, 50 failed, 0 errored, 0 timeout\nstatus codes: 150 2xx, 0 3xx, 50 4xx, 0 5xx\n";
        let r = super::parse_h2load(1, out).unwrap();
        assert_eq!(
            (r.done, r.succeeded, r.failed, r.errored),
            (200, 150, 50, 0)
        );
        assert_eq!((r.status_2xx, r.status_4xx), (150, 50));
        assert_eq!(r.protocol, "h2c");
    }
}
