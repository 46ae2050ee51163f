//! Real TLS programs for the TLS tests: OpenSSL's `s_server`/`s_client`,
//! GnuTLS's `gnutls-serv`/`gnutls-cli` (in a network namespace of the test's
//! own), Python HTTPS clients on the system OpenSSL, and a pip `grpcio`
//! program whose BoringSSL is statically linked without symbols (TLS the
//! agent cannot see by symbol).
//!
//! Facts these helpers rest on (checked with uprobes on these machines):
//! - `openssl s_server -www` (and `-WWW`, `-rev`) reads and writes through a
//!   `BIO_f_ssl`, which in OpenSSL 3.0 calls libssl's *internal*
//!   `ssl_read_internal`/`ssl_write_internal`: no exported `SSL_*` function
//!   runs for its plaintext. The agent hooks those internal functions where
//!   it can find them ([`OpensslServer::start_www`] checks it);
//!   [`OpensslServer::start`] runs `s_server` in its default mode
//!   (`sv_body`: `SSL_accept` -> `SSL_do_handshake`, `SSL_read`,
//!   `SSL_write`), which exported-symbol hooks see too, and feeds it the
//!   HTTP response through a FIFO on stdin once the request has arrived.
//! - `openssl s_client` never calls `SSL_connect`/`SSL_do_handshake`: its
//!   handshake runs inside its first `SSL_write` (of 0 bytes) and `SSL_read`.
//!   Node (both sides) likewise handshakes inside `SSL_read`/`SSL_write`.
//! - curl: `SSL_connect` -> `SSL_do_handshake`, `SSL_write`, `SSL_read`;
//!   Python `ssl`: `SSL_do_handshake`, `SSL_write_ex`, `SSL_read_ex`;
//!   nginx: `SSL_do_handshake`, `SSL_read`, `SSL_write`.
//! - `gnutls-serv` has no bind-address option and binds 0.0.0.0 and `::`:
//!   it runs inside a [`NetNs`], with its clients.
//! - pip's grpcio imports `asyncio`, which imports `ssl`: the system
//!   `libssl.so.3` *is* mapped in a grpcio process even though gRPC's TLS
//!   never goes through it. [`grpcio_tls`] can hide `ssl` from the script to
//!   get a process with no OpenSSL mapped at all.

use crate::proc::{Finished, Proc, StopWith, TempDir, free_port, run_capture};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const OPENSSL: &str = crate::certs::OPENSSL;
pub const GNUTLS_SERV: &str = "/usr/bin/gnutls-serv";
pub const GNUTLS_CLI: &str = "/usr/bin/gnutls-cli";
pub const IP: &str = "/usr/sbin/ip";

/// What the agent logs (stderr) for each TLS library file it hooked.
pub const LOG_ATTACHED: &str = "TLS library attached";
/// What the agent logs once per executable or library where TLS is in use
/// but cannot be hooked.
pub const LOG_NOT_VISIBLE: &str = "TLS not visible";
/// Int attribute on the first span of each TLS connection (per side).
pub const HANDSHAKE_ATTR: &str = "periscope.tls.handshake.duration_ns";

/// Agent log lines saying a TLS library was attached.
pub fn attached_lines(agent_log: &str) -> Vec<&str> {
    agent_log
        .lines()
        .filter(|l| l.contains(LOG_ATTACHED))
        .collect()
}

/// Agent log lines saying TLS is in use somewhere it cannot see.
pub fn not_visible_lines(agent_log: &str) -> Vec<&str> {
    agent_log
        .lines()
        .filter(|l| l.contains(LOG_NOT_VISIBLE))
        .collect()
}

/// Lines of the agent's log that look like a panic or a crash.
pub fn panic_lines(agent_log: &str) -> Vec<&str> {
    agent_log
        .lines()
        .filter(|l| {
            l.contains("panicked at")
                || l.contains("RUST_BACKTRACE")
                || l.contains("stack backtrace")
                || l.contains("SIGSEGV")
                || l.contains("fatal runtime error")
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    /// `tls.protocol.version` as the semantic conventions write it.
    pub fn attr(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }

    /// OpenSSL's name (nginx `ssl_protocols`, `$ssl_protocol`, Python's
    /// `SSLSocket.version()`, Node's `getProtocol()`).
    pub fn openssl_name(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "TLSv1.2",
            TlsVersion::Tls13 => "TLSv1.3",
        }
    }

    pub fn from_openssl_name(s: &str) -> Option<TlsVersion> {
        match s {
            "TLSv1.2" => Some(TlsVersion::Tls12),
            "TLSv1.3" => Some(TlsVersion::Tls13),
            _ => None,
        }
    }

    /// curl options that make curl use exactly this version.
    pub fn curl_args(self) -> &'static [&'static str] {
        match self {
            TlsVersion::Tls12 => &["--tlsv1.2", "--tls-max", "1.2"],
            TlsVersion::Tls13 => &["--tlsv1.3"],
        }
    }

    /// Python's `ssl.TLSVersion` member name.
    pub fn python_name(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "TLSv1_2",
            TlsVersion::Tls13 => "TLSv1_3",
        }
    }
}

/// The TLS version curl reports on stderr with `-v`
/// (`* SSL connection using TLSv1.3 / TLS_AES_256_GCM_SHA384`).
pub fn curl_negotiated(stderr: &str) -> Option<TlsVersion> {
    stderr.lines().find_map(|l| {
        let rest = l.split("SSL connection using ").nth(1)?;
        TlsVersion::from_openssl_name(rest.split_whitespace().next()?)
    })
}

fn require(path: &str, package: &str) -> Result<()> {
    if !Path::new(path).is_file() {
        bail!("{path} is missing: install {package} (`cargo xtask setup --test-deps`)");
    }
    Ok(())
}

/// `sh -c 'exec "$0" "$@" < FILE' PROGRAM ARGS...`: the program gets `file`
/// as stdin and keeps the pid of the spawned process (spans carry it).
fn with_stdin_from(file: &Path, program: &str, args: &[String]) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!(
            "exec \"$0\" \"$@\" < '{}'",
            file.display().to_string().replace('\'', "'\\''")
        ))
        .arg(program)
        .args(args);
    cmd
}

/// A plain HTTP/1.0 response with a body.
pub fn http10_response(status: u16, reason: &str, body: &str) -> String {
    format!(
        "HTTP/1.0 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

// ---------------------------------------------------------------------------
// OpenSSL s_server / s_client

/// `openssl s_server -accept 127.0.0.1:PORT -cert C -key K` in its default
/// mode, with stdin from a FIFO the harness writes the response into.
/// Serves one request: [`OpensslServer::respond`] waits for the request to
/// show up on s_server's stdout, writes the response, then closes the FIFO;
/// on stdin's EOF s_server closes the connection (without close_notify) and
/// its listening socket, and exits.
pub struct OpensslServer {
    proc: Proc,
    port: u16,
    /// s_server's stdin (none with `-www`).
    fifo: Option<File>,
    _dir: Option<TempDir>,
}

impl OpensslServer {
    pub fn start(cert: &Path, key: &Path) -> Result<OpensslServer> {
        let openssl = crate::certs::openssl()?;
        let dir = TempDir::new("s_server")?;
        let fifo_path = dir.join("stdin.fifo");
        let c = std::ffi::CString::new(fifo_path.to_string_lossy().as_bytes())?;
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mkfifo {}", fifo_path.display()));
        }
        // Read+write: opening does not block, and s_server's open for reading
        // finds a writer. std opens with O_CLOEXEC: no child inherits it, so
        // dropping it is the last writer gone (EOF for s_server).
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo_path)
            .with_context(|| format!("opening {}", fifo_path.display()))?;
        let port = free_port();
        let args = s_server_args(port, cert, key);
        let proc = start_s_server(&mut with_stdin_from(&fifo_path, openssl, &args))?;
        Ok(OpensslServer {
            proc,
            port,
            fifo: Some(fifo),
            _dir: Some(dir),
        })
    }

    /// `openssl s_server -www -accept 127.0.0.1:PORT -cert C -key K`:
    /// answers every `GET` with a status page (`HTTP/1.0 200 ok`, no
    /// Content-Length, then it closes the connection), reading the request
    /// and writing the page through a `BIO_f_ssl`, so only libssl's
    /// internal functions run. It serves any number of connections and
    /// takes no [`OpensslServer::respond`].
    pub fn start_www(cert: &Path, key: &Path) -> Result<OpensslServer> {
        let port = free_port();
        let mut cmd = Command::new(crate::certs::openssl()?);
        cmd.args(s_server_args(port, cert, key)).arg("-www");
        Ok(OpensslServer {
            proc: start_s_server(&mut cmd)?,
            port,
            fifo: None,
            _dir: None,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Wait (up to `timeout`) for a line starting with `request_line` in what
    /// s_server printed (it prints the plaintext it reads), then send
    /// `response` and end the connection.
    pub fn respond(&mut self, request_line: &str, response: &str, timeout: Duration) -> Result<()> {
        self.proc
            .wait_for_line(&format!("the request {request_line:?}"), timeout, |l| {
                l.starts_with(request_line)
            })?;
        let mut fifo = self
            .fifo
            .take()
            .context("OpensslServer::respond called twice, or on a -www server")?;
        // s_server treats a stdin chunk starting with some letters as a
        // command (`Q`, `q`, `r`, `P`, ...): an HTTP response starts with `H`.
        anyhow::ensure!(
            response.starts_with('H'),
            "the response must start with HTTP/"
        );
        fifo.write_all(response.as_bytes())?;
        fifo.flush()?;
        // Let s_server read the response on its own before EOF follows.
        std::thread::sleep(Duration::from_millis(300));
        drop(fifo);
        Ok(())
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

fn s_server_args(port: u16, cert: &Path, key: &Path) -> Vec<String> {
    vec![
        "s_server".into(),
        "-accept".into(),
        format!("127.0.0.1:{port}"),
        "-cert".into(),
        cert.display().to_string(),
        "-key".into(),
        key.display().to_string(),
    ]
}

/// Spawns `cmd` (an `s_server`) and waits until it listens.
fn start_s_server(cmd: &mut Command) -> Result<Proc> {
    let mut proc = Proc::spawn_with(
        "openssl-s_server",
        cmd,
        StopWith {
            signal: libc::SIGTERM,
            grace: Duration::from_secs(2),
        },
    )?;
    // `ACCEPT` once it listens; probing the port would make s_server
    // handshake with a prober.
    proc.wait_for_line("ACCEPT", Duration::from_secs(15), |l| l.trim() == "ACCEPT")?;
    Ok(proc)
}

/// Start `openssl s_client -connect 127.0.0.1:PORT -quiet -ign_eof` with
/// `request` on stdin. It writes the request, prints the response on stdout
/// and exits when the server closes; wait for it with `wait_exit`.
pub fn s_client(port: u16, request: &[u8], dir: &Path) -> Result<Proc> {
    let openssl = crate::certs::openssl()?;
    static N: AtomicU64 = AtomicU64::new(0);
    let req = dir.join(format!(
        "s_client-request-{}",
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&req, request)?;
    let args: Vec<String> = vec![
        "s_client".into(),
        "-connect".into(),
        format!("127.0.0.1:{port}"),
        "-quiet".into(),
        "-ign_eof".into(),
    ];
    let mut cmd = with_stdin_from(&req, openssl, &args);
    Proc::spawn("openssl-s_client", &mut cmd)
}

/// One request through s_client to s_server: returns (s_client's pid, its
/// stdout).
pub fn openssl_exchange(server: &mut OpensslServer, dir: &Path) -> Result<(u32, String)> {
    let mut client = s_client(server.port(), b"GET / HTTP/1.0\r\n\r\n", dir)?;
    let body = "hello from openssl s_server\n";
    server
        .respond(
            "GET / HTTP/1.0",
            &http10_response(200, "OK", body),
            Duration::from_secs(20),
        )
        .with_context(|| format!("s_client's output so far:\n{}", client.log()))?;
    // s_server closes without close_notify (it closes the socket on stdin's
    // EOF), so s_client reports `unexpected eof` and exits 1: judge by what
    // it printed.
    let st = client.wait_exit(Duration::from_secs(20))?;
    let out = client.stdout();
    if !out.contains("HTTP/1.0 200 OK") || !out.contains(body.trim()) {
        bail!(
            "s_client ({st}) did not get the response; its output:\n{}\ns_server's:\n{}",
            client.log(),
            server.log()
        );
    }
    Ok((client.pid(), out))
}

// ---------------------------------------------------------------------------
// Network namespaces and GnuTLS

/// A network namespace of the test's own, with `lo` up; deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new() -> Result<NetNs> {
        require(IP, "iproute2")?;
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "periscope-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let run = |args: &[&str]| -> Result<()> {
            let mut c = Command::new(IP);
            c.args(args);
            run_capture("ip", &mut c, Duration::from_secs(10))?
                .ok()
                .with_context(|| format!("ip {}", args.join(" ")))?;
            Ok(())
        };
        run(&["netns", "add", &name])?;
        let ns = NetNs { name };
        run(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME PROGRAM`: `ip` enters the namespace and execs the
    /// program, so the spawned pid is the program's.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(IP);
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new(IP)
            .args(["netns", "del", &self.name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `gnutls-serv --http` inside `ns` (it binds 0.0.0.0 and `::`).
pub struct GnutlsServer {
    proc: Proc,
    port: u16,
}

impl GnutlsServer {
    pub fn start(ns: &NetNs, cert: &Path, key: &Path) -> Result<GnutlsServer> {
        require(GNUTLS_SERV, "gnutls-bin")?;
        // Any port works inside the namespace; a host-free one keeps logs unambiguous.
        let port = free_port();
        let mut cmd = ns.command(GNUTLS_SERV);
        cmd.args(["--http", "--x509certfile"])
            .arg(cert)
            .arg("--x509keyfile")
            .arg(key)
            .args(["-p", &port.to_string()]);
        let mut proc = Proc::spawn_with(
            "gnutls-serv",
            &mut cmd,
            StopWith {
                signal: libc::SIGTERM,
                grace: Duration::from_secs(2),
            },
        )?;
        proc.wait_for_line(
            "`HTTP Server listening on IPv4`",
            Duration::from_secs(15),
            |l| l.contains("listening on IPv4") && l.contains("done"),
        )?;
        Ok(GnutlsServer { proc, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// `gnutls-cli --insecure -p PORT 127.0.0.1` inside `ns`, sending
/// `GET path HTTP/1.0`. Its stdin stays open for a few seconds after the
/// request (bash process substitution), so it exits when the server closes,
/// not when stdin ends. Returns the finished client (pid = gnutls-cli's).
pub fn gnutls_cli_get(ns: &NetNs, port: u16, path: &str) -> Result<Finished> {
    require(GNUTLS_CLI, "gnutls-bin")?;
    let mut cmd = ns.command("/bin/bash");
    cmd.arg("-c")
        .arg(format!(
            "exec {GNUTLS_CLI} --insecure -p {port} 127.0.0.1 < <(printf 'GET {path} HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n'; sleep 10)"
        ));
    let f = run_capture("gnutls-cli", &mut cmd, Duration::from_secs(30))?;
    if !f.stdout.contains("HTTP/1.0 200") {
        bail!(
            "gnutls-cli (pid {}, {}) got no HTTP/1.0 200:\nstdout:\n{}\nstderr:\n{}",
            f.pid,
            f.status,
            f.stdout,
            f.stderr
        );
    }
    Ok(f)
}

/// `curl -k` inside `ns` (curl uses OpenSSL). Returns (pid, HTTP status).
pub fn curl_in_netns(ns: &NetNs, url: &str) -> Result<(u32, u16)> {
    let mut cmd = ns.command(crate::clients::CURL);
    cmd.args([
        "-sS",
        "-k",
        "--http1.1",
        "--max-time",
        "20",
        "-o",
        "/dev/null",
    ])
    .args(["-w", "%{http_code}", url]);
    let f = run_capture("curl", &mut cmd, Duration::from_secs(30))?.ok()?;
    let code = f
        .stdout
        .trim()
        .parse()
        .with_context(|| format!("curl -w %{{http_code}} printed {:?}", f.stdout))?;
    Ok((f.pid, code))
}

// ---------------------------------------------------------------------------
// Python HTTPS clients (Debian's /usr/bin/python3, system libssl)

/// One URL fetched by [`python_https_get`].
#[derive(Clone, Debug)]
pub struct PyTransfer {
    pub url: String,
    pub status: u16,
    /// `SSLSocket.version()` right after the handshake.
    pub version: Option<TlsVersion>,
    pub local_port: u16,
}

#[derive(Clone, Debug)]
pub struct PyHttpsRun {
    pub pid: u32,
    pub transfers: Vec<PyTransfer>,
}

const PY_HTTPS_GET: &str = r#"
import ssl, sys, time, urllib.request, urllib.error
max_version = sys.argv[1]
# libssl is mapped (import ssl) before this pause: a process the agent has
# had time to find.
time.sleep(float(sys.argv[2]))
ctx = ssl._create_unverified_context()
if max_version != "-":
    ctx.maximum_version = getattr(ssl.TLSVersion, max_version)
seen = []
class Recording(ssl.SSLSocket):
    def do_handshake(self, *a, **k):
        r = super().do_handshake(*a, **k)
        seen.append((self.version(), self.getsockname()[1]))
        return r
ctx.sslsocket_class = Recording
for url in sys.argv[3:]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=20) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    version, port = seen[-1] if seen else ("-", 0)
    print("result %d %s %d %s" % (status, version, port, url), flush=True)
"#;

/// Fetch each URL with `urllib.request.urlopen` (a new connection each,
/// urllib sends `Connection: close`) and an unverified context, optionally
/// capped at `max_version`.
pub fn python_https_get(urls: &[String], max_version: Option<TlsVersion>) -> Result<PyHttpsRun> {
    python_https_get_after(urls, max_version, Duration::ZERO)
}

/// [`python_https_get`], but the script waits `delay` after loading `ssl`
/// (libssl mapped) before its first request.
pub fn python_https_get_after(
    urls: &[String],
    max_version: Option<TlsVersion>,
    delay: Duration,
) -> Result<PyHttpsRun> {
    let delay = format!("{:.3}", delay.as_secs_f64());
    let mut args = vec![max_version.map_or("-", |v| v.python_name()), delay.as_str()];
    args.extend(urls.iter().map(String::as_str));
    let f = crate::clients::python(PY_HTTPS_GET, &args)?;
    let mut transfers = Vec::new();
    for l in f.stdout.lines() {
        let Some(rest) = l.strip_prefix("result ") else {
            continue;
        };
        let p: Vec<&str> = rest.splitn(4, ' ').collect();
        if p.len() != 4 {
            bail!("unexpected python output line {l:?}");
        }
        transfers.push(PyTransfer {
            status: p[0].parse()?,
            version: TlsVersion::from_openssl_name(p[1]),
            local_port: p[2].parse()?,
            url: p[3].to_string(),
        });
    }
    if transfers.len() != urls.len() {
        bail!(
            "python reported {} results for {} URLs:\n{}\n{}",
            transfers.len(),
            urls.len(),
            f.stdout,
            f.stderr
        );
    }
    Ok(PyHttpsRun {
        pid: f.pid,
        transfers,
    })
}

// ---------------------------------------------------------------------------
// pip grpcio: gRPC over TLS the agent cannot see by symbol

/// The interpreter pip's `grpcio` is installed into (`python3` on PATH, or
/// `PERISCOPE_PYTHON`), resolved through pyenv's shims to the real file, so
/// the traced process is the interpreter itself.
pub fn grpcio_python() -> Result<PathBuf> {
    let py = crate::tool_python();
    let out = Command::new(&py)
        .args([
            "-c",
            "import os, sys, grpc; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .with_context(|| format!("running {py}"))?;
    if !out.status.success() {
        bail!(
            "`{py} -c 'import grpc'` failed: pip's grpcio is not installed (`cargo xtask setup --test-deps`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

const GRPC_TLS: &str = r#"
import sys, os
if sys.argv[3] == "hide-ssl":
    # Without this, grpc -> asyncio -> ssl maps the system libssl.so.3.
    sys.modules["ssl"] = None
    sys.modules["_ssl"] = None
from concurrent import futures
import grpc
cert = open(sys.argv[1], "rb").read()
key = open(sys.argv[2], "rb").read()
calls = int(sys.argv[4])
def ping(request, context):
    return b"pong:" + request
handler = grpc.method_handlers_generic_handler(
    "periscope.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
server.add_generic_rpc_handlers((handler,))
port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
server.start()
print("port %d" % port, flush=True)
creds = grpc.ssl_channel_credentials(root_certificates=cert)
opts = (("grpc.ssl_target_name_override", "localhost"),)
with grpc.secure_channel("127.0.0.1:%d" % port, creds, opts) as ch:
    call = ch.unary_unary("/periscope.Echo/Ping")
    for i in range(calls):
        print("reply %s" % call(b"hi%d" % i, timeout=20).decode(), flush=True)
maps = open("/proc/self/maps").read()
print("libssl_mapped %d" % ("libssl.so" in maps), flush=True)
print("exe %s" % os.path.realpath("/proc/self/exe"), flush=True)
print("pid %d" % os.getpid(), flush=True)
server.stop(0)
"#;

#[derive(Clone, Debug)]
pub struct GrpcRun {
    pub pid: u32,
    /// `/proc/self/exe` of the interpreter, resolved.
    pub exe: PathBuf,
    pub port: u16,
    pub replies: Vec<String>,
    /// Whether the system `libssl.so` was mapped in the process.
    pub libssl_mapped: bool,
}

/// Run a gRPC server and client over TLS in one pip-grpcio Python process
/// (generic handlers on raw bytes, no protoc): `calls` unary calls.
pub fn grpcio_tls(cert: &Path, key: &Path, hide_ssl: bool, calls: u32) -> Result<GrpcRun> {
    let py = grpcio_python()?;
    let mut cmd = Command::new(&py);
    cmd.arg("-c")
        .arg(GRPC_TLS)
        .arg(cert)
        .arg(key)
        .arg(if hide_ssl { "hide-ssl" } else { "as-is" })
        .arg(calls.to_string());
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "grpc_proxy",
    ] {
        cmd.env_remove(v);
    }
    let f = run_capture("python3-grpcio", &mut cmd, Duration::from_secs(60))?.ok()?;
    let fields: BTreeMap<&str, &str> = f
        .stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| *k != "reply")
        .collect();
    let get = |k: &str| -> Result<&str> {
        fields.get(k).copied().with_context(|| {
            format!(
                "no `{k}` in the grpc script's output:\n{}\n{}",
                f.stdout, f.stderr
            )
        })
    };
    let replies: Vec<String> = f
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("reply "))
        .map(str::to_string)
        .collect();
    if replies.len() != calls as usize {
        bail!(
            "{} gRPC replies for {calls} calls:\n{}\n{}",
            replies.len(),
            f.stdout,
            f.stderr
        );
    }
    let pid: u32 = get("pid")?.parse()?;
    anyhow::ensure!(
        pid == f.pid,
        "the grpc script ran as pid {pid}, not as the spawned pid {}",
        f.pid
    );
    Ok(GrpcRun {
        pid,
        exe: PathBuf::from(get("exe")?),
        port: get("port")?.parse()?,
        replies,
        libssl_mapped: get("libssl_mapped")? == "1",
    })
}

/// Start and kill short-lived processes that load the system libssl:
/// `/usr/bin/python3 -c 'import ssl, time; time.sleep(S)'`, killed after a
/// random delay of up to `max_life`, `count` times, `parallel` at a time.
/// Returns the pids. For "exits while being attached".
pub fn churn_ssl_processes(count: usize, parallel: usize, max_life: Duration) -> Result<Vec<u32>> {
    let py = crate::system_python()?;
    let mut pids = Vec::new();
    let mut live: Vec<(Proc, Instant)> = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut started = 0;
    while started < count || !live.is_empty() {
        while started < count && live.len() < parallel {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let life = Duration::from_micros(x % (max_life.as_micros() as u64).max(1));
            let mut cmd = Command::new(py);
            // Some exit by themselves (after importing ssl), most are killed.
            let sleep = if started % 4 == 0 { "0" } else { "5" };
            cmd.args(["-c", &format!("import ssl, time; time.sleep({sleep})")]);
            let p = Proc::spawn_with(
                "python3-ssl-churn",
                &mut cmd,
                StopWith {
                    signal: libc::SIGKILL,
                    grace: Duration::from_millis(200),
                },
            )?;
            pids.push(p.pid());
            live.push((p, Instant::now() + life));
            started += 1;
        }
        let now = Instant::now();
        live.retain_mut(|(p, until)| {
            if *until <= now || !p.is_running() {
                p.stop();
                false
            } else {
                true
            }
        });
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(pids)
}
