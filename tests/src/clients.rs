//! Real clients: curl and short Python scripts (Debian's `/usr/bin/python3`).

use crate::proc::{Finished, run_capture};
use anyhow::{Context, Result, bail};
use std::process::Command;
use std::time::Duration;

pub const CURL: &str = "/usr/bin/curl";
// Must not start with `@`: curl reads `-w @FILE` from a file.
const MARK: &str = "periscope-curl:";

/// What curl reported for one URL (`--write-out`).
#[derive(Clone, Debug)]
pub struct CurlTransfer {
    pub url: String,
    pub http_code: u16,
    /// Seconds from the start until the TCP connect completed (0 on a reused connection).
    pub time_connect: f64,
    /// Seconds from the start until the first response byte.
    pub time_starttransfer: f64,
    /// Seconds from the start until the transfer finished.
    pub time_total: f64,
    /// New connections made for this transfer (0 when one was reused).
    pub num_connects: u32,
    pub size_download: u64,
    pub local_port: u16,
    /// `%{http_version}`: `1.1`, `2`.
    pub http_version: String,
}

impl CurlTransfer {
    /// The time curl spent after connecting: request first byte to response
    /// last byte, plus curl's own overhead.
    pub fn after_connect_secs(&self) -> f64 {
        self.time_total - self.time_connect
    }
}

#[derive(Clone, Debug)]
pub struct CurlRun {
    pub pid: u32,
    pub transfers: Vec<CurlTransfer>,
    pub stderr: String,
}

/// Run one curl process fetching `urls` in order (one connection, reused),
/// bodies discarded. `extra` goes before the URLs (e.g. `-H`, `--compressed`).
pub fn curl(urls: &[String], extra: &[&str]) -> Result<CurlRun> {
    curl_version("--http1.1", urls, extra)
}

/// [`curl`] with another HTTP version option: `--http1.1`, `--http2`
/// (ALPN h2 over TLS), `--http2-prior-knowledge` (h2c).
pub fn curl_version(version: &str, urls: &[String], extra: &[&str]) -> Result<CurlRun> {
    if !std::path::Path::new(CURL).is_file() {
        bail!("{CURL} is missing: install curl (`cargo xtask setup --test-deps`)");
    }
    let mut cmd = Command::new(CURL);
    cmd.args(["-sS", version, "--noproxy", "*", "--max-time", "20"])
        .arg("--write-out")
        .arg(format!(
            "{MARK} %{{http_code}} %{{time_connect}} %{{time_starttransfer}} %{{time_total}} %{{num_connects}} %{{size_download}} %{{local_port}} %{{http_version}} %{{url_effective}}\\n"
        ))
        .args(extra);
    for u in urls {
        cmd.args(["-o", "/dev/null", u]);
    }
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(v);
    }
    let f = run_capture("curl", &mut cmd, Duration::from_secs(30))?.ok()?;
    let transfers =
        parse_write_out(&f.stdout).with_context(|| format!("curl stdout: {:?}", f.stdout))?;
    if transfers.len() != urls.len() {
        bail!(
            "curl reported {} transfers for {} URLs:\n{}\n{}",
            transfers.len(),
            urls.len(),
            f.stdout,
            f.stderr
        );
    }
    Ok(CurlRun {
        pid: f.pid,
        transfers,
        stderr: f.stderr,
    })
}

/// Shorthand: one URL.
pub fn curl1(url: &str, extra: &[&str]) -> Result<(u32, CurlTransfer)> {
    let r = curl(&[url.to_string()], extra)?;
    Ok((r.pid, r.transfers.into_iter().next().expect("one transfer")))
}

fn parse_write_out(stdout: &str) -> Result<Vec<CurlTransfer>> {
    let mut out = Vec::new();
    for line in stdout.lines() {
        let Some(rest) = line.find(MARK).map(|i| &line[i + MARK.len()..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() != 9 {
            bail!("unexpected curl --write-out line {line:?}");
        }
        let secs = |i: usize| -> Result<f64> {
            f[i].parse()
                .with_context(|| format!("field {i} of {line:?}"))
        };
        out.push(CurlTransfer {
            http_code: f[0].parse()?,
            time_connect: secs(1)?,
            time_starttransfer: secs(2)?,
            time_total: secs(3)?,
            num_connects: f[4].parse()?,
            size_download: f[5].parse()?,
            local_port: f[6].parse()?,
            http_version: f[7].to_string(),
            url: f[8].to_string(),
        });
    }
    Ok(out)
}

/// Run a Python script with Debian's `/usr/bin/python3` (service name
/// `python3.11`), with `args` as `sys.argv[1:]`.
pub fn python(script: &str, args: &[&str]) -> Result<Finished> {
    let py = crate::system_python()?;
    let mut cmd = Command::new(py);
    cmd.arg("-c").arg(script).args(args);
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "no_proxy",
        "NO_PROXY",
    ] {
        cmd.env_remove(v);
    }
    run_capture("python3", &mut cmd, Duration::from_secs(30))?.ok()
}

/// Write `data` to 127.0.0.1:port in one `sendall` from a Python process, then
/// (unless `shut_write` is false) shut the write side, and read the answer
/// until EOF or a 2 s silence. Prints `local_port=N` first, then the answer's
/// length. Returns (python pid, local port, bytes received).
pub fn python_raw_send(port: u16, data: &[u8], shut_write: bool) -> Result<(u32, u16, usize)> {
    const SCRIPT: &str = r#"
import socket, sys
port, shut = int(sys.argv[1]), sys.argv[3] == "1"
data = open(sys.argv[2], "rb").read()
s = socket.create_connection(("127.0.0.1", port))
print("local_port=%d" % s.getsockname()[1], flush=True)
try:
    s.sendall(data)
    if shut:
        s.shutdown(socket.SHUT_WR)
except (BrokenPipeError, ConnectionResetError) as e:
    print("send_error=%r" % e, flush=True)
s.settimeout(2.0)
n = 0
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        n += len(b)
except (socket.timeout, ConnectionResetError, BrokenPipeError):
    pass
s.close()
print("received=%d" % n, flush=True)
"#;
    // Through a file: one argument may not exceed 128 KiB.
    let dir = crate::proc::TempDir::new("raw")?;
    let file = dir.join("data");
    std::fs::write(&file, data)?;
    let f = python(
        SCRIPT,
        &[
            &port.to_string(),
            &file.to_string_lossy(),
            if shut_write { "1" } else { "0" },
        ],
    )?;
    let field = |k: &str| -> Result<u64> {
        f.stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .with_context(|| format!("no {k} in python output {:?}", f.stdout))?
            .trim()
            .parse()
            .context("number")
    };
    Ok((
        f.pid,
        field("local_port=")? as u16,
        field("received=")? as usize,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_curl_write_out() {
        let t = super::parse_write_out(
            "periscope-curl: 200 0.000123 0.000456 0.000789 1 102400 41234 1.1 http://127.0.0.1:8080/big.bin\nperiscope-curl: 404 0.000000 0.0001 0.0002 0 153 41234 2 http://127.0.0.1:8080/x?secret=xyz\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].http_code, 200);
        assert_eq!(t[0].size_download, 102400);
        assert_eq!(t[1].num_connects, 0);
        assert_eq!(t[1].local_port, 41234);
        assert_eq!((t[0].http_version.as_str(), t[1].http_version.as_str()), ("1.1", "2"));
        assert!((t[0].after_connect_secs() - 0.000666).abs() < 1e-9);
    }
}
