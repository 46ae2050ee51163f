//! nginx (Debian's `nginx-light`) with a config of its own in a temp dir.
//!
//! Routes: `/` static files (`/index.html`, `/big.bin` = 100 KiB),
//! `/status/404`, `/status/500` (body `boom`), `/chunked` (a text file passed
//! through `sub_filter`, which drops Content-Length so nginx sends it with
//! `Transfer-Encoding: chunked`), plus whatever location blocks the caller adds.
//! `sendfile on` as in Debian's default nginx.conf: static bodies leave through
//! sendfile(2), not write(2).
//!
//! With [`NginxOptions::tls`] the server listens with TLS instead
//! (`listen ... ssl`, the given certificate and `ssl_protocols`, HTTP/2
//! optional), and a second log, `tls.log`, records per request the TLS
//! protocol nginx negotiated ([`Nginx::tls_log`]).
//!
//! With [`NginxOptions::http2`] and no TLS, the listener speaks cleartext
//! HTTP/2 with prior knowledge only (h2c, nginx 1.22's `listen ... http2`).

use crate::proc::{Proc, StopWith, TempDir, children_of, free_port, wait_for_port};
use crate::tls::TlsVersion;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const NGINX: &str = "/usr/sbin/nginx";
pub const BIG_SIZE: usize = 100 * 1024;
pub const INDEX_HTML: &str = "<!doctype html>\n<html><head><title>periscope</title></head><body><h1>periscope test page</h1></body></html>\n";

#[derive(Clone, Debug)]
pub struct NginxOptions {
    /// Extra `location` blocks (or any server-level directives).
    pub extra_locations: String,
    /// Extra http-level directives.
    pub extra_http: String,
    pub sendfile: bool,
    /// Serve HTTPS instead of HTTP.
    pub tls: Option<NginxTls>,
    /// Speak HTTP/2 on the listener (`listen ... http2`): without `tls`,
    /// cleartext HTTP/2 with prior knowledge (h2c) and no HTTP/1.1; with
    /// `tls`, the same as [`NginxTls::http2`].
    pub http2: bool,
}

impl Default for NginxOptions {
    fn default() -> Self {
        NginxOptions {
            extra_locations: String::new(),
            extra_http: String::new(),
            sendfile: true,
            tls: None,
            http2: false,
        }
    }
}

/// HTTPS for [`Nginx`]: `listen 127.0.0.1:PORT ssl [http2]`.
#[derive(Clone, Debug)]
pub struct NginxTls {
    /// PEM certificate and key (e.g. from [`crate::certs::TestCert`]).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `ssl_protocols`: only these versions are accepted.
    pub protocols: Vec<TlsVersion>,
    /// Offer HTTP/2 through ALPN (`listen ... ssl http2`). Off by default:
    /// clients then speak HTTP/1.1.
    pub http2: bool,
}

impl NginxTls {
    /// Only `version`, HTTP/1.1.
    pub fn only(cert: &Path, key: &Path, version: TlsVersion) -> NginxTls {
        NginxTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            protocols: vec![version],
            http2: false,
        }
    }
}

/// One `tls.log` line: what nginx negotiated for a request.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsLogEntry {
    /// Connection serial number (`$connection`), as in the access log.
    pub connection: u64,
    pub connection_requests: u64,
    /// `$ssl_protocol`: `TLSv1.2`, `TLSv1.3`.
    pub protocol: String,
    /// `$ssl_session_reused`: `r` if the session was resumed, else `.`.
    pub session_reused: bool,
    pub request_uri: String,
    pub status: u16,
    pub pid: u32,
}

impl TlsLogEntry {
    pub fn parse(line: &str) -> Result<TlsLogEntry> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 7 {
            bail!("tls log line has {} fields, want 7: {line:?}", f.len());
        }
        let num = |i: usize| -> Result<u64> {
            f[i].parse()
                .with_context(|| format!("field {i} of {line:?}"))
        };
        Ok(TlsLogEntry {
            connection: num(0)?,
            connection_requests: num(1)?,
            protocol: f[2].into(),
            session_reused: f[3] == "r",
            request_uri: f[4].into(),
            status: num(5)? as u16,
            pid: num(6)? as u32,
        })
    }

    /// The negotiated version, if nginx logged a known one.
    pub fn version(&self) -> Option<TlsVersion> {
        TlsVersion::from_openssl_name(&self.protocol)
    }
}

pub struct Nginx {
    proc: Proc,
    port: u16,
    dir: TempDir,
    tls: bool,
}

/// One access-log line (`log_format periscope`, tab-separated).
#[derive(Clone, Debug, PartialEq)]
pub struct AccessLogEntry {
    pub remote_addr: String,
    /// The worker that served it (`$pid`).
    pub pid: u32,
    /// Unix time in seconds, ms resolution, when the line was written (`$msec`).
    pub msec: f64,
    /// Seconds, ms resolution (`$request_time`).
    pub request_time: f64,
    pub status: u16,
    pub request_length: u64,
    pub bytes_sent: u64,
    /// `-` when nginx could not parse one.
    pub method: String,
    /// With the query string, as the client sent it.
    pub request_uri: String,
    /// The normalised path without the query string.
    pub uri: String,
    pub protocol: String,
    /// Connection serial number: equal for requests on one connection.
    pub connection: u64,
    /// Number of this request on its connection (1-based).
    pub connection_requests: u64,
    pub raw: String,
}

impl AccessLogEntry {
    /// `$request_uri` without the query string.
    pub fn path(&self) -> &str {
        self.request_uri.split('?').next().unwrap_or("")
    }

    pub fn parse(line: &str) -> Result<AccessLogEntry> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 13 {
            bail!("access log line has {} fields, want 13: {line:?}", f.len());
        }
        let num = |i: usize| -> Result<u64> {
            f[i].parse()
                .with_context(|| format!("field {i} of {line:?}"))
        };
        let flt = |i: usize| -> Result<f64> {
            f[i].parse()
                .with_context(|| format!("field {i} of {line:?}"))
        };
        Ok(AccessLogEntry {
            remote_addr: f[0].into(),
            pid: num(1)? as u32,
            msec: flt(2)?,
            request_time: flt(3)?,
            status: num(4)? as u16,
            request_length: num(5)?,
            bytes_sent: num(6)?,
            method: f[7].into(),
            request_uri: f[8].into(),
            uri: f[9].into(),
            protocol: f[10].into(),
            connection: num(11)?,
            connection_requests: num(12)?,
            raw: line.into(),
        })
    }
}

fn write(path: &Path, data: impl AsRef<[u8]>) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

/// Deterministic, incompressible-looking bytes.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

impl Nginx {
    pub fn start() -> Result<Nginx> {
        Self::start_with(NginxOptions::default())
    }

    pub fn start_with(opts: NginxOptions) -> Result<Nginx> {
        if !Path::new(NGINX).is_file() {
            bail!("{NGINX} is missing: install nginx-light (`cargo xtask setup --test-deps`)");
        }
        let dir = TempDir::new("nginx")?;
        let port = free_port();
        let www = dir.join("www");
        write(&www.join("index.html"), INDEX_HTML)?;
        write(&www.join("big.bin"), pseudo_random_bytes(BIG_SIZE, 1))?;
        let mut chunked = String::new();
        for i in 0..400 {
            chunked.push_str(&format!(
                "line {i:04} of a periscope response nginx sends chunked\n"
            ));
        }
        write(&www.join("chunked.txt"), chunked)?;
        for d in [
            "tmp/client_body",
            "tmp/proxy",
            "tmp/fastcgi",
            "tmp/uwsgi",
            "tmp/scgi",
        ] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let d = dir.path().display();
        let (listen_opts, tls_server, tls_http) = match &opts.tls {
            None => (
                if opts.http2 { " http2".to_string() } else { String::new() },
                String::new(),
                String::new(),
            ),
            Some(t) => {
                if t.protocols.is_empty() {
                    bail!("NginxTls::protocols is empty");
                }
                let protocols: Vec<&str> = t.protocols.iter().map(|v| v.openssl_name()).collect();
                (
                    format!(" ssl{}", if t.http2 || opts.http2 { " http2" } else { "" }),
                    format!(
                        "ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_protocols {};",
                        t.cert.display(),
                        t.key.display(),
                        protocols.join(" ")
                    ),
                    format!(
                        "log_format periscope_tls \"$connection\\t$connection_requests\\t$ssl_protocol\\t$ssl_session_reused\\t$request_uri\\t$status\\t$pid\";\n    access_log {d}/tls.log periscope_tls;"
                    ),
                )
            }
        };
        let conf = format!(
            r#"daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 512; }}
http {{
    types {{ text/html html; text/plain txt; application/octet-stream bin; }}
    default_type application/octet-stream;
    log_format periscope "$remote_addr\t$pid\t$msec\t$request_time\t$status\t$request_length\t$bytes_sent\t$request_method\t$request_uri\t$uri\t$server_protocol\t$connection\t$connection_requests";
    access_log {d}/access.log periscope;
    {tls_http}
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    sendfile {sendfile};
    keepalive_timeout 65;
    {extra_http}
    server {{
        listen 127.0.0.1:{port}{listen_opts};
        server_name localhost;
        {tls_server}
        root {d}/www;
        location / {{ index index.html; }}
        location = /status/404 {{ return 404; }}
        location = /status/500 {{ return 500 "boom\n"; }}
        location = /chunked {{
            default_type text/plain;
            alias {d}/www/chunked.txt;
            sub_filter_types *;
            sub_filter_once off;
            sub_filter "periscope" "PERISCOPE";
        }}
        {extra_locations}
    }}
}}
"#,
            sendfile = if opts.sendfile { "on" } else { "off" },
            extra_http = opts.extra_http,
            extra_locations = opts.extra_locations,
        );
        let conf_path = dir.join("nginx.conf");
        write(&conf_path, &conf)?;
        let mut cmd = Command::new(NGINX);
        cmd.arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .args(["-e", &format!("{d}/error.log")]);
        let mut proc = Proc::spawn_with(
            "nginx",
            &mut cmd,
            StopWith {
                signal: libc::SIGTERM,
                grace: Duration::from_secs(5),
            },
        )?;
        let t0 = Instant::now();
        while !wait_for_port(port, Duration::from_millis(100)) {
            if !proc.is_running() || t0.elapsed() > Duration::from_secs(15) {
                let err = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!(
                    "nginx did not start on 127.0.0.1:{port}; output:\n{}\nerror.log:\n{err}\nconfig:\n{conf}",
                    proc.log()
                );
            }
        }
        let nginx = Nginx {
            proc,
            port,
            dir,
            tls: opts.tls.is_some(),
        };
        // The worker must exist before tests look for it.
        crate::proc::poll(Duration::from_secs(5), Duration::from_millis(20), || {
            (!nginx.worker_pids().is_empty()).then_some(())
        })
        .context("nginx has no worker process")?;
        Ok(nginx)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme(), self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The document root: write files here to serve them.
    pub fn www(&self) -> PathBuf {
        self.dir.join("www")
    }

    pub fn master_pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The worker processes (the ones that serve requests and so own the spans).
    pub fn worker_pids(&self) -> Vec<u32> {
        children_of(self.proc.pid())
    }

    /// The single worker (worker_processes 1).
    pub fn worker_pid(&self) -> Result<u32> {
        match self.worker_pids().as_slice() {
            [w] => Ok(*w),
            other => bail!("expected one nginx worker, found {other:?}"),
        }
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    pub fn access_log(&self) -> Result<Vec<AccessLogEntry>> {
        let text = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        text.lines()
            .filter(|l| !l.is_empty())
            .map(AccessLogEntry::parse)
            .collect()
    }

    /// `tls.log` (HTTPS only): the TLS protocol of every request.
    pub fn tls_log(&self) -> Result<Vec<TlsLogEntry>> {
        let text = std::fs::read_to_string(self.dir.join("tls.log")).unwrap_or_default();
        text.lines()
            .filter(|l| !l.is_empty())
            .map(TlsLogEntry::parse)
            .collect()
    }

    /// Wait until `tls.log` has at least `n` lines.
    pub fn wait_for_tls_log(&self, n: usize, timeout: Duration) -> Result<Vec<TlsLogEntry>> {
        let deadline = Instant::now() + timeout;
        loop {
            let entries = self.tls_log()?;
            if entries.len() >= n {
                return Ok(entries);
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx tls.log has {} lines after {timeout:?}, want {n}:\n{entries:#?}",
                    entries.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until the access log has at least `n` lines.
    pub fn wait_for_access_log(&self, n: usize, timeout: Duration) -> Result<Vec<AccessLogEntry>> {
        let deadline = Instant::now() + timeout;
        loop {
            let entries = self.access_log()?;
            if entries.len() >= n {
                return Ok(entries);
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx access log has {} lines after {timeout:?}, want {n}:\n{entries:#?}",
                    entries.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn check_running(&mut self) -> Result<()> {
        if let Some(st) = self.proc.try_status() {
            bail!("nginx exited ({st}); error.log:\n{}", self.error_log());
        }
        Ok(())
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Stop now (also done on drop).
    pub fn stop(&mut self) {
        self.proc.stop();
    }
}
