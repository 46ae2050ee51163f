//! What the bench needs on the machine (packages, Rotel, the Python venv,
//! tracefs, the agent binary) and the files its servers run from.

use super::parse::{grpcgo_reply_code, noop_flag_accepted};
use super::sys::show;
use crate::setup::{BENCH_APT, BENCH_PIP, BENCH_VENV_PACKAGE};
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Debian's Python: its `ssl` module calls the system libssl (hooked by the
/// agent), and the bench's venv is made from it; the Python on PATH may be
/// another build.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// The pip requirement for Rotel (the same pin as `cargo xtask setup`).
const ROTEL_REQUIREMENT: &str = "rotel==0.0.1a15";

/// What the HTTP/2 and gRPC workloads need besides `BENCH_APT`: (program,
/// Debian package).
const H2_APT: &[(&str, &str)] = &[("h2load", "nghttp2-client")];
/// Debian's gRPC for Python (the C core, on the system OpenSSL), for the
/// system Python: the gRPC server and its check.
const GRPC_APT: &str = "python3-grpcio";

fn python_grpc_ok() -> bool {
    Command::new(SYSTEM_PYTHON)
        .args(["-c", "import grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn which(program: &str) -> Option<PathBuf> {
    if program.starts_with('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn venv_module_ok() -> bool {
    Command::new(SYSTEM_PYTHON)
        .args(["-c", "import ensurepip, venv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn ensure_apt_tools() -> Result<()> {
    let mut missing: Vec<&str> = BENCH_APT
        .iter()
        .chain(H2_APT)
        .filter(|(bin, _)| which(bin).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if !venv_module_ok() {
        missing.push(BENCH_VENV_PACKAGE);
    }
    if !python_grpc_ok() {
        missing.push(GRPC_APT);
    }
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)?;
    for (bin, pkg) in BENCH_APT.iter().chain(H2_APT) {
        if which(bin).is_none() {
            bail!("installed {pkg} but `{bin}` is still missing");
        }
    }
    if !python_grpc_ok() {
        bail!("installed {GRPC_APT} but `{SYSTEM_PYTHON} -c 'import grpc'` still fails");
    }
    if !venv_module_ok() {
        bail!(
            "installed {BENCH_VENV_PACKAGE} but `{SYSTEM_PYTHON} -c 'import ensurepip, venv'` still fails"
        );
    }
    Ok(())
}

/// The `rotel-agent` binary shipped in the rotel wheel; pip-installs it when missing.
pub fn ensure_rotel() -> Result<PathBuf> {
    let py = crate::setup::tool_python();
    let locate = || -> Option<PathBuf> {
        let out = Command::new(&py)
            .args([
                "-c",
                "import rotel,os;print(os.path.dirname(rotel.__file__))",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("rotel-agent");
        (out.status.success() && p.is_file()).then_some(p)
    };
    if let Some(p) = locate() {
        return Ok(p);
    }
    eprintln!("bench: installing {ROTEL_REQUIREMENT} for {py}");
    let pip = |extra: &[&str]| {
        run_cmd(
            Command::new(&py)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--root-user-action=ignore",
                ])
                .args(extra)
                .arg(ROTEL_REQUIREMENT),
        )
    };
    if pip(&[]).is_err() {
        // Debian's own python3 refuses pip without this (PEP 668).
        pip(&["--break-system-packages"])?;
    }
    locate().with_context(|| {
        format!("pip installed {ROTEL_REQUIREMENT} but its rotel-agent binary is not found")
    })
}

/// The venv with Flask, gunicorn and the OpenTelemetry auto-instrumentation:
/// `<target>/bench-venv`, made from Debian's Python; remade when the pinned
/// requirements change (a marker file holds the ones it was made with).
pub fn ensure_venv() -> Result<PathBuf> {
    let venv = crate::cmd::target_dir().join("bench-venv");
    let marker = venv.join("periscope-bench-requirements.txt");
    let wanted = BENCH_PIP.join("\n") + "\n";
    let py = venv.join("bin/python");
    let imports_ok = || {
        Command::new(&py)
            .args(["-c", "import flask, gunicorn, opentelemetry.instrumentation.flask, opentelemetry.exporter.otlp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted)
        && imports_ok()
        && venv.join("bin/gunicorn").is_file()
        && venv.join("bin/opentelemetry-instrument").is_file()
    {
        return Ok(venv);
    }
    eprintln!(
        "bench: making the Python venv {} ({})",
        venv.display(),
        BENCH_PIP.join(" ")
    );
    if venv.exists() {
        std::fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    std::fs::create_dir_all(venv.parent().unwrap_or(Path::new("/")))?;
    run_cmd(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&venv))?;
    run_cmd(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
            ])
            .args(BENCH_PIP),
    )?;
    if !imports_ok() {
        bail!(
            "pip installed {} into {} but the imports still fail",
            BENCH_PIP.join(" "),
            venv.display()
        );
    }
    std::fs::write(&marker, wanted)?;
    Ok(venv)
}

pub fn ensure_tracefs() -> Result<()> {
    const DIR: &str = "/sys/kernel/tracing";
    if crate::cmd::is_mountpoint(DIR) {
        return Ok(());
    }
    run_cmd(Command::new("mount").args(["-t", "tracefs", "nodev", DIR]))
}

pub fn build_agent() -> Result<()> {
    let mut c = crate::cmd::cargo();
    c.args(["build", "--release", "-p", "periscope"]);
    run_cmd(&mut c)
        .context("building the agent (if bpf-linker is missing, run `cargo xtask setup` first)")
}

/// Does this agent binary take `run --noop-probes` (the do-nothing floor)?
pub fn agent_has_noop_probes(agent_bin: &Path) -> bool {
    let out = Command::new(agent_bin)
        .args(["run", "--noop-probes", "--help"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => noop_flag_accepted(o.status.success(), &String::from_utf8_lossy(&o.stderr)),
        Err(_) => false,
    }
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("bench: $ {}", show(cmd));
    let st = cmd
        .status()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !st.success() {
        bail!("`{}` failed: {st}", show(cmd));
    }
    Ok(())
}

/// The Go the Go HTTPS workload builds its server with: where `cargo xtask
/// setup --test-deps` installs Go 1.27 for the end-to-end tests (see
/// `periscope_tests::go::TOOLCHAINS`).
pub const GO_BIN: &str = "/opt/periscope-go/go1.27.3/bin/go";

/// The Go HTTPS server's source: the end-to-end tests' program (standard
/// library only).
pub fn go_https_source() -> PathBuf {
    periscope_tests::workspace_root().join("tests/go/httpsgo/main.go")
}

/// `go build` of `source` into `binary`: stripped (`-s -w`, no symbol table
/// and no DWARF, like a production binary), in GOPATH mode (no module, no
/// proxy: nothing is downloaded), with GOPATH and the build cache in
/// `gopath`, no cgo.
pub fn go_build_command(go: &Path, source: &Path, binary: &Path, gopath: &Path) -> Command {
    let mut cmd = Command::new(go);
    cmd.arg("build")
        .arg("-ldflags=-s -w")
        .arg("-o")
        .arg(binary)
        .arg(source)
        .env("GO111MODULE", "off")
        .env("GOPATH", gopath)
        .env("GOCACHE", gopath.join("cache"))
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0");
    cmd
}

/// A command line with the variables it sets in front, as a shell takes it.
pub fn show_with_env(cmd: &Command) -> String {
    let mut vars: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    vars.sort();
    vars.push(show(cmd));
    vars.join(" ")
}

/// GO_BIN is there; the bench does not install it.
pub fn ensure_go() -> Result<()> {
    if !Path::new(GO_BIN).is_file() {
        bail!(
            "{GO_BIN} is missing: the Go HTTPS keep-alive workload builds its server with Go 1.27; \
             install the Go toolchains with `cargo xtask setup --test-deps`"
        );
    }
    Ok(())
}

/// Build the Go HTTPS server into `out_dir/httpsgo` with GO_BIN (see
/// `go_build_command`); its GOPATH and build cache, `out_dir/go`, are
/// removed after. Fails when Go 1.27 is not installed. Returns the binary
/// and the build command.
pub fn build_go_https(out_dir: &Path) -> Result<(PathBuf, String)> {
    ensure_go()?;
    let source = go_https_source();
    if !source.is_file() {
        bail!(
            "{} is missing: the Go HTTPS server's source",
            source.display()
        );
    }
    let (binary, gopath) = (out_dir.join("httpsgo"), out_dir.join("go"));
    let mut cmd = go_build_command(Path::new(GO_BIN), &source, &binary, &gopath);
    let shown = show_with_env(&cmd);
    eprintln!("bench: building the Go HTTPS server");
    run_cmd(&mut cmd).context("building the Go HTTPS server (tests/go/httpsgo)")?;
    // The build cache holds the standard library compiled: nothing the
    // results need.
    std::fs::remove_dir_all(&gopath).ok();
    Ok((binary, shown))
}

/// The Go release the grpc-go server is built with: Debian's golang-go
/// (`periscope_tests::go::GO_TOOLCHAINS`), the toolchain Debian's grpc-go
/// 1.33 sources are packaged for.
pub const GRPCGO_GO_VERSION: &str = "go1.19";
/// Its `go`.
pub const GRPCGO_GO_BIN: &str = "/usr/lib/go-1.19/bin/go";

/// What building the grpc-go server needs: Debian's Go 1.19 and the sources
/// of grpc-go and of the protobuf runtimes it imports, under
/// `/usr/share/gocode` (without the protobuf-1-5 package the server builds
/// but panics). (a directory the package installs, the package.)
pub const GRPCGO_APT: &[(&str, &str)] = &[
    (GRPCGO_GO_BIN, "golang-go"),
    (
        "/usr/share/gocode/src/google.golang.org/grpc",
        "golang-google-grpc-dev",
    ),
    (
        "/usr/share/gocode/src/google.golang.org/protobuf",
        "golang-google-protobuf-dev",
    ),
    (
        "/usr/share/gocode/src/github.com/golang/protobuf",
        "golang-github-golang-protobuf-1-5-dev",
    ),
];

/// Go 1.19 and Debian's grpc-go sources, installed with apt when missing
/// (as the bench installs what else it runs). Returns the toolchain.
pub fn ensure_grpcgo_deps() -> Result<periscope_tests::go::InstalledGo> {
    let missing = || -> Vec<&'static str> {
        GRPCGO_APT
            .iter()
            .filter(|(path, _)| !Path::new(path).exists())
            .map(|(_, pkg)| *pkg)
            .collect()
    };
    let absent = missing();
    if !absent.is_empty() {
        apt_install(&absent)?;
        let still = missing();
        if !still.is_empty() {
            bail!(
                "installed {} but {} still missing",
                absent.join(" "),
                still.join(" ")
            );
        }
    }
    periscope_tests::go::toolchain(GRPCGO_GO_VERSION)
        .context("the gRPC unary, Go workload builds its server with Debian's Go 1.19")
}

/// The grpc-go server's source: the end-to-end tests' program (a
/// hand-written ServiceDesc, a bytes codec, TLS).
pub fn grpcgo_source() -> PathBuf {
    periscope_tests::workspace_root().join("tests/go/grpcgo/main.go")
}

/// `go build` of `source` into `binary` with `go`, as the end-to-end tests
/// build it (`periscope_tests::go::go_command`: GOPATH mode, Debian's Go
/// sources on the GOPATH, nothing downloaded, the tests' build cache under
/// the target dir) but stripped (`-s -w`), like the Go HTTPS server.
pub fn grpcgo_build_command(
    go: &periscope_tests::go::InstalledGo,
    source: &Path,
    binary: &Path,
) -> Command {
    let mut cmd = periscope_tests::go::go_command(go);
    cmd.arg("build")
        .arg("-ldflags=-s -w")
        .arg("-o")
        .arg(binary)
        .arg(source);
    cmd
}

/// Build the grpc-go server into `out_dir/grpcgo` with `go` (see
/// `grpcgo_build_command`). Returns the binary and the build command.
pub fn build_grpcgo(
    go: &periscope_tests::go::InstalledGo,
    out_dir: &Path,
) -> Result<(PathBuf, String)> {
    let source = grpcgo_source();
    if !source.is_file() {
        bail!(
            "{} is missing: the grpc-go server's source",
            source.display()
        );
    }
    let binary = out_dir.join("grpcgo");
    let mut cmd = grpcgo_build_command(go, &source, &binary);
    let shown = show_with_env(&cmd);
    eprintln!("bench: building the grpc-go server");
    run_cmd(&mut cmd).context("building the grpc-go server (tests/go/grpcgo)")?;
    Ok((binary, shown))
}

/// The method h2load calls on the grpc-go server (the `:path`).
pub const GRPCGO_METHOD: &str = "demo.Greeter/SayHello";
/// What h2load sends it: a length-prefixed gRPC message (flag 0, 4-byte
/// big-endian length) of 15 bytes; the bytes codec takes them as the name
/// (a name starting with "missing" would get NOT_FOUND).
pub const GRPCGO_MESSAGE: &[u8] = b"\x00\x00\x00\x00\x0fperiscope bench";
/// The name `grpcgo call` checks the server with: the message's bytes.
pub const GRPCGO_NAME: &str = "periscope bench";
/// The server answers "hello NAME": the length-prefixed response's bytes.
pub const GRPCGO_RESPONSE_LEN: u64 = (GRPCGO_MESSAGE.len() + "hello ".len()) as u64;

/// `dir/grpcgo-request.bin`.
pub fn write_grpcgo_request(dir: &Path) -> Result<PathBuf> {
    let request = dir.join("grpcgo-request.bin");
    std::fs::write(&request, GRPCGO_MESSAGE)?;
    Ok(request)
}

/// One unary call with the program's own grpc-go client (`grpcgo call PORT
/// NAME`, over TLS): it must print `reply NAME OK`. Returns the command.
pub fn check_grpcgo_call(binary: &Path, port: u16) -> Result<String> {
    let mut cmd = Command::new(binary);
    cmd.arg("call").arg(port.to_string()).arg(GRPCGO_NAME);
    let shown = show(&cmd);
    let out = periscope_tests::proc::run_capture("grpcgo-call", &mut cmd, Duration::from_secs(30))?
        .ok()?;
    match grpcgo_reply_code(&out.stdout, GRPCGO_NAME) {
        Some("OK") => Ok(shown),
        Some(code) => bail!("`{shown}` got {code}, not OK"),
        None => bail!("`{shown}` printed no reply line:\n{}", out.stdout),
    }
}

/// A self-signed certificate for the HTTPS server: (cert, key).
pub fn make_test_cert(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-days",
            "1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .context("running openssl req")?;
    if !out.status.success() {
        bail!(
            "openssl req failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // nginx workers run as nobody.
    use std::os::unix::fs::PermissionsExt;
    for p in [&cert, &key] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok((cert, key))
}

/// nginx's listeners on 127.0.0.1.
pub struct NginxPorts {
    /// HTTP/1.1.
    pub http: u16,
    /// HTTP/1.1 over TLS 1.3.
    pub https: u16,
    /// HTTP/2 over cleartext (prior knowledge only).
    pub h2c: u16,
    /// HTTP/2 over TLS 1.3 (ALPN h2, http/1.1 offered too).
    pub h2_tls: u16,
}

/// The nginx config: one worker, a static page over HTTP/1.1 and HTTP/1.1
/// over TLS 1.3, and the same page over HTTP/2, cleartext and TLS. nginx
/// closes a connection after `keepalive_requests` (default 1000), which
/// applies to HTTP/2 too; wrk and ab reconnect, h2load does not (the streams
/// in flight then fail and the connection is gone), so the HTTP/2 listeners
/// lift it.
pub fn write_nginx_files(
    dir: &Path,
    ports: &NginxPorts,
    cert: &Path,
    key: &Path,
) -> Result<PathBuf> {
    let NginxPorts {
        http: port,
        https: tls_port,
        h2c: h2c_port,
        h2_tls: h2_tls_port,
    } = *ports;
    let d = dir.display();
    std::fs::create_dir_all(dir.join("html"))?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::write(
        dir.join("html/index.html"),
        "<html><body>periscope bench</body></html>\n",
    )?;
    // nginx workers run as nobody: everything must be readable.
    use std::os::unix::fs::PermissionsExt;
    for p in [dir.to_path_buf(), dir.join("html"), dir.join("tmp")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::set_permissions(
        dir.join("html/index.html"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    let conf = format!(
        "# Written by `cargo xtask bench`: one worker, static page, nginx's keep-alive defaults.
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {d}/html;
        index index.html;
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        root {d}/html;
        index index.html;
    }}
    server {{
        listen 127.0.0.1:{h2c_port} http2;
        keepalive_requests {H2_KEEPALIVE_REQUESTS};
        root {d}/html;
        index index.html;
    }}
    server {{
        listen 127.0.0.1:{h2_tls_port} ssl http2;
        keepalive_requests {H2_KEEPALIVE_REQUESTS};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        root {d}/html;
        index index.html;
    }}
}}
",
        cert = cert.display(),
        key = key.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// Requests per HTTP/2 connection before nginx closes it: more than any run sends.
const H2_KEEPALIVE_REQUESTS: u64 = 1_000_000_000;

/// The gRPC server: Debian's python3-grpcio without generated code (a
/// generic handler, bytes in and out), echoing the request message, over
/// h2c. argv: port, worker threads.
pub const GRPC_SERVER: &str = r#"# Written by `cargo xtask bench`: the gRPC server it traces.
import signal
import sys
from concurrent import futures

import grpc


def ident(b):
    return b


def say(request, context):
    return request


port, threads = int(sys.argv[1]), int(sys.argv[2])
handler = grpc.method_handlers_generic_handler(
    "bench.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say, ident, ident)}
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), handlers=[handler])
server.add_insecure_port(f"127.0.0.1:{port}")
server.start()
signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
print(f"grpc server on 127.0.0.1:{port}, {threads} threads, grpcio {grpc.__version__}", flush=True)
server.wait_for_termination()
"#;

/// The method h2load calls (the `:path`).
pub const GRPC_METHOD: &str = "bench.Echo/Say";
/// The gRPC server's worker threads.
pub const GRPC_SERVER_THREADS: u32 = 2;
/// The request (and echoed response) message: a length-prefixed gRPC
/// message (flag 0, 4-byte big-endian length) holding a protobuf string
/// field 1 of 15 bytes.
pub const GRPC_MESSAGE: &[u8] = b"\x00\x00\x00\x00\x11\x0a\x0fperiscope bench";

/// `dir/grpc-server.py` and `dir/grpc-request.bin`.
pub fn write_grpc_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let script = dir.join("grpc-server.py");
    let request = dir.join("grpc-request.bin");
    std::fs::write(&script, GRPC_SERVER)?;
    std::fs::write(&request, GRPC_MESSAGE)?;
    Ok((script, request))
}

/// One unary call to the server with python3-grpcio's client: the message
/// must come back.
pub fn check_grpc_call(port: u16) -> Result<()> {
    let code = format!(
        "import grpc, sys\n\
         ch = grpc.insecure_channel('127.0.0.1:{port}')\n\
         f = ch.unary_unary('/{GRPC_METHOD}', lambda b: b, lambda b: b)\n\
         m = bytes.fromhex(sys.argv[1])\n\
         r = f(m, timeout=10)\n\
         sys.exit(0 if r == m else 'echoed %r for %r' % (r, m))\n"
    );
    let hex: String = GRPC_MESSAGE[5..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    periscope_tests::proc::run_capture(
        "grpc-check",
        Command::new(SYSTEM_PYTHON).args(["-c", &code, &hex]),
        Duration::from_secs(30),
    )?
    .ok()?;
    Ok(())
}

/// The Flask service: one route, a 16-byte body.
pub const FLASK_APP: &str = r#"# Written by `cargo xtask bench`: the Python web service it traces.
from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return "periscope bench\n"
"#;

/// Write `app.py` into `dir/flask` and return that directory.
pub fn write_flask_app(dir: &Path) -> Result<PathBuf> {
    let app = dir.join("flask");
    std::fs::create_dir_all(&app)?;
    std::fs::write(app.join("app.py"), FLASK_APP)?;
    Ok(app)
}

/// One `GET /` with `Connection: close`; the status line must say 200.
pub fn check_http_ok(port: u16) -> Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    if !resp.starts_with("HTTP/1.1 200") && !resp.starts_with("HTTP/1.0 200") {
        bail!("unexpected answer: {}", resp.lines().next().unwrap_or(""));
    }
    Ok(())
}

pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub loadavg: String,
    pub versions: Vec<(String, String)>,
}

pub fn machine_facts() -> Machine {
    let out = |p: &str, a: &[&str]| -> Option<String> {
        let o = Command::new(p).args(a).stdin(Stdio::null()).output().ok()?;
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        text.lines().next().map(|l| l.trim().to_string())
    };
    let mut versions = Vec::new();
    // "nginx version: nginx/1.22.1", "wrk debian/4.1.0-3+b2 [epoll] Copyright ...", "0.1.4-2+b4",
    // "This is ApacheBench, Version 2.3 <$Revision$>"
    for (name, prog, args, word) in [
        ("nginx", "nginx", &["-v"][..], 2),
        ("wrk", "wrk", &["-v"][..], 1),
        (
            "hey",
            "dpkg-query",
            &["-W", "-f", "${Version}", "hey"][..],
            0,
        ),
        ("ab", "ab", &["-V"][..], 4),
        // "h2load nghttp2/1.52.0"
        ("h2load", "h2load", &["--version"][..], 1),
        (
            "python3-grpcio",
            "dpkg-query",
            &["-W", "-f", "${Version}", "python3-grpcio"][..],
            0,
        ),
        ("python", SYSTEM_PYTHON, &["--version"][..], 1),
        // "go version go1.27.3 linux/amd64"
        ("go", GO_BIN, &["version"][..], 2),
        // The grpc-go server's: Debian's Go and grpc-go sources.
        ("go (grpc-go server)", GRPCGO_GO_BIN, &["version"][..], 2),
        (
            "grpc-go",
            "dpkg-query",
            &["-W", "-f", "${Version}", "golang-google-grpc-dev"][..],
            0,
        ),
    ] {
        if let Some(v) =
            out(prog, args).and_then(|l| l.split_whitespace().nth(word).map(str::to_string))
        {
            versions.push((name.to_string(), v));
        }
    }
    for req in BENCH_PIP {
        if let Some((name, v)) = req.split_once("==") {
            versions.push((name.to_string(), v.to_string()));
        }
    }
    Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        loadavg: super::sys::loadavg(),
        versions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Flask app is valid Python for Debian's python3 (which makes the venv).
    #[test]
    fn flask_app_compiles() {
        let out = Command::new(SYSTEM_PYTHON)
            .args([
                "-c",
                "import sys; compile(sys.stdin.read(), 'app.py', 'exec'); print('ok')",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin
                    .take()
                    .expect("piped")
                    .write_all(FLASK_APP.as_bytes())?;
                c.wait_with_output()
            })
            .expect("run /usr/bin/python3 (apt-get install python3)");
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok");
    }

    #[test]
    fn nginx_config() {
        let dir = periscope_tests::proc::TempDir::new("bench-nginx-conf").unwrap();
        let ports = NginxPorts {
            http: 18080,
            https: 18443,
            h2c: 18082,
            h2_tls: 18444,
        };
        let conf = write_nginx_files(dir.path(), &ports, Path::new("/c.pem"), Path::new("/k.pem"))
            .unwrap();
        let text = std::fs::read_to_string(conf).unwrap();
        assert!(text.contains("listen 127.0.0.1:18080;"));
        assert!(text.contains("listen 127.0.0.1:18443 ssl;"));
        assert!(text.contains("listen 127.0.0.1:18082 http2;"));
        assert!(text.contains("listen 127.0.0.1:18444 ssl http2;"));
        assert_eq!(text.matches("keepalive_requests 1000000000;").count(), 2);
        assert_eq!(text.matches("ssl_certificate /c.pem;").count(), 2);
        assert!(text.contains("ssl_protocols TLSv1.3;"));
        assert!(dir.join("html/index.html").is_file());
    }

    /// The gRPC server is valid Python, and the message is length-prefixed.
    #[test]
    fn grpc_files() {
        let out = Command::new(SYSTEM_PYTHON)
            .args([
                "-c",
                "import sys; compile(sys.stdin.read(), 'grpc-server.py', 'exec'); print('ok')",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin
                    .take()
                    .expect("piped")
                    .write_all(GRPC_SERVER.as_bytes())?;
                c.wait_with_output()
            })
            .expect("run /usr/bin/python3");
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok");
        assert_eq!(GRPC_MESSAGE[0], 0);
        let len = u32::from_be_bytes(GRPC_MESSAGE[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, GRPC_MESSAGE.len() - 5);
        assert_eq!(&GRPC_MESSAGE[7..], b"periscope bench");
    }

    /// Stripped, GOPATH mode, nothing downloaded, everything under `gopath`.
    #[test]
    fn go_build() {
        let cmd = go_build_command(
            Path::new(GO_BIN),
            &go_https_source(),
            Path::new("/r/httpsgo"),
            Path::new("/r/go"),
        );
        let shown = show_with_env(&cmd);
        assert_eq!(
            shown,
            format!(
                "CGO_ENABLED=0 GO111MODULE=off GOCACHE=/r/go/cache GOPATH=/r/go GOTOOLCHAIN=local \
                 {GO_BIN} build '-ldflags=-s -w' -o /r/httpsgo {}",
                go_https_source().display()
            )
        );
        assert!(go_https_source().is_file());
    }

    /// The grpc-go workload: a length-prefixed message that is not a
    /// "missing..." name, the answer's length, and the build: Debian's Go
    /// 1.19 as the tests know it, GOPATH mode with Debian's sources,
    /// stripped.
    #[test]
    fn grpcgo_files_and_build() {
        assert_eq!(GRPCGO_MESSAGE[0], 0);
        let len = u32::from_be_bytes(GRPCGO_MESSAGE[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, GRPCGO_MESSAGE.len() - 5);
        assert_eq!(&GRPCGO_MESSAGE[5..], GRPCGO_NAME.as_bytes());
        assert!(!GRPCGO_NAME.starts_with("missing"));
        // "hello periscope bench" behind its 5-byte prefix.
        assert_eq!(GRPCGO_RESPONSE_LEN, 26);
        let dir = periscope_tests::proc::TempDir::new("bench-grpcgo-files").unwrap();
        let request = write_grpcgo_request(dir.path()).unwrap();
        assert_eq!(std::fs::read(request).unwrap(), GRPCGO_MESSAGE);

        let debian = periscope_tests::go::GO_TOOLCHAINS
            .iter()
            .find(|t| t.version == GRPCGO_GO_VERSION)
            .expect("go1.19 in GO_TOOLCHAINS");
        assert_eq!(debian.go, GRPCGO_GO_BIN);
        assert!(
            GRPCGO_APT
                .iter()
                .any(|(p, pkg)| *p == GRPCGO_GO_BIN && *pkg == "golang-go")
        );
        for pkg in [
            "golang-google-grpc-dev",
            "golang-google-protobuf-dev",
            "golang-github-golang-protobuf-1-5-dev",
        ] {
            assert!(periscope_tests::go::GO_APT_PACKAGES.contains(&pkg), "{pkg}");
            assert!(GRPCGO_APT.iter().any(|(_, p)| *p == pkg), "{pkg}");
        }

        let go = periscope_tests::go::InstalledGo {
            go: PathBuf::from(GRPCGO_GO_BIN),
            version: "go1.19.8".into(),
        };
        let cmd = grpcgo_build_command(&go, &grpcgo_source(), Path::new("/r/grpcgo"));
        let shown = show_with_env(&cmd);
        let work = periscope_tests::go::go_work_dir();
        assert_eq!(
            shown,
            format!(
                "CGO_ENABLED=0 GO111MODULE=off GOCACHE={cache} GOPATH={gopath}:/usr/share/gocode GOPROXY=off \
                 GOTOOLCHAIN=local {GRPCGO_GO_BIN} build '-ldflags=-s -w' -o /r/grpcgo {}",
                grpcgo_source().display(),
                cache = work.join("cache/go1.19.8").display(),
                gopath = work.join("gopath").display(),
            )
        );
        // GOROOT and GOFLAGS are removed from the environment, not set.
        assert!(cmd.get_envs().any(|(k, v)| k == "GOFLAGS" && v.is_none()));
        assert!(grpcgo_source().is_file());
        assert_eq!(
            std::fs::read_to_string(grpcgo_source()).unwrap(),
            periscope_tests::go::GRPCGO_GO
        );
    }

    #[test]
    fn which_finds_programs_and_paths() {
        assert!(which("sh").is_some());
        assert!(which("/bin/sh").is_some());
        assert!(which("/no/such/program").is_none());
        assert!(which("no-such-program-periscope").is_none());
    }
}

/// `apt-get update` and `apt-get install` of `packages`.
fn apt_install<S: AsRef<std::ffi::OsStr>>(packages: &[S]) -> Result<()> {
    let names: Vec<String> = packages.iter().map(|p| p.as_ref().to_string_lossy().into_owned()).collect();
    eprintln!("bench: installing {}", names.join(" "));
    run_cmd(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
