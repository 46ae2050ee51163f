//! gRPC programs for the gRPC tests, without generated code, written to temp
//! dirs and run unmodified:
//!
//! - Python on Debian's `python3-grpcio` (`/usr/bin/python3`): the gRPC C
//!   core with its own HTTP/2, linked to the system `libssl.so.3`, so the
//!   agent's OpenSSL uprobes see its plaintext. A pip `grpcio` (BoringSSL
//!   inside, no symbols) may also be installed for the tooling Python; the
//!   script puts Debian's `dist-packages` first and refuses to run on any
//!   other grpcio, or if `libssl.so.3` is not mapped ([`grpc/demo.py`]).
//! - Node's `@grpc/grpc-js` (pure JavaScript HTTP/2 on Node's `http2`, TLS
//!   from the OpenSSL inside `/usr/bin/node`), installed by
//!   `cargo xtask setup --test-deps` into `<target dir>/test-node`
//!   ([`NODE_GRPC_PACKAGES`]).
//!
//! The service is `demo.Greeter` with byte-identity (de)serializers:
//! - `SayHello` (unary): replies `hello REQUEST`; a request containing
//!   `notfound` is aborted with NOT_FOUND and a message holding
//!   [`ERROR_MARK`]; one containing `slow` waits 200 ms first;
//! - `SayGoodbye` (unary, Python only): replies `goodbye REQUEST`;
//! - `StreamHellos` (server streaming, Python only): request `N MS ...`,
//!   N replies MS milliseconds apart.
//!
//! Every request and reply carries [`PAYLOAD_MARK`]: no span may contain it.
//! The Python client runs a list of steps and prints one JSON line per step
//! ([`GrpcCall`]): `hello:X`, `goodbye:X`, `notfound:X`, `missing:X` (a
//! method the server does not have: UNIMPLEMENTED), `stream:N,MS`,
//! `concurrent:N` (N `SayHello` futures at once on its one channel),
//! `wait:FILE` (prints `waiting FILE`, then waits until FILE exists),
//! `sleep:MS`. All steps of one client share one channel (one connection).

use crate::proc::{Proc, StopWith, TempDir, run_capture};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const SERVICE: &str = "demo.Greeter";
/// In every request and reply payload.
pub const PAYLOAD_MARK: &str = "PAYLOAD-MARK-5e1f";
/// In the NOT_FOUND status message (`grpc-message`).
pub const ERROR_MARK: &str = "ERRMSG-MARK-8c2d";

/// Where Debian's `python3-grpcio` lives.
pub const DEBIAN_GRPC: &str = "/usr/lib/python3/dist-packages/grpc/__init__.py";

/// npm packages for the Node gRPC programs, pinned; installed by
/// `cargo xtask setup --test-deps` into [`node_dir`].
pub const NODE_GRPC_PACKAGES: &[&str] = &["@grpc/grpc-js@1.14.7", "@grpc/proto-loader@0.8.1"];

const DEMO_PY: &str = include_str!("grpc/demo.py");
const NODE_SERVER_JS: &str = include_str!("grpc/node_server.js");
const NODE_CLIENT_JS: &str = include_str!("grpc/node_client.js");

/// `<target dir>/test-node`: the npm prefix the Node gRPC packages go into
/// (its `node_modules` is the scripts' `NODE_PATH`).
pub fn node_dir() -> PathBuf {
    crate::target_dir().join("test-node")
}

/// `require()` works for every package of [`NODE_GRPC_PACKAGES`] at its
/// pinned version, with `NODE_PATH=<node_dir>/node_modules`.
pub fn node_grpc_installed() -> bool {
    node_grpc_check().is_ok()
}

fn node_grpc_check() -> Result<()> {
    let modules = node_dir().join("node_modules");
    let mut script = String::new();
    for p in NODE_GRPC_PACKAGES {
        let (name, version) = p.rsplit_once('@').expect("name@version");
        script.push_str(&format!(
            "require({name:?}); if (require({:?}).version !== {version:?}) throw new Error({:?});\n",
            format!("{name}/package.json"),
            format!("{name} is not {version}")
        ));
    }
    let out = Command::new(crate::node::NODE)
        .args(["-e", &script])
        .env("NODE_PATH", &modules)
        .output()
        .with_context(|| format!("running {}", crate::node::NODE))?;
    if !out.status.success() {
        bail!(
            "the Node gRPC packages ({}) are not installed in {}: run `cargo xtask setup --test-deps`\n{}",
            NODE_GRPC_PACKAGES.join(" "),
            modules.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn debian_python() -> Result<&'static str> {
    let py = crate::system_python()?;
    if !Path::new(DEBIAN_GRPC).is_file() {
        bail!("{DEBIAN_GRPC} is missing: install python3-grpcio (`cargo xtask setup --test-deps`)");
    }
    Ok(py)
}

fn clean_env(cmd: &mut Command) {
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "no_proxy",
        "NO_PROXY",
        "grpc_proxy",
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
        "NODE_OPTIONS",
        "PYTHONPATH",
        "OTEL_SERVICE_NAME",
    ] {
        cmd.env_remove(v);
    }
}

/// TLS material for a gRPC server (key and certificate) and its clients
/// (the certificate as their only root). The certificate names
/// `IP:127.0.0.1` (and `DNS:localhost`), so clients dial `127.0.0.1:PORT`
/// and verify it without `grpc.ssl_target_name_override`, which would also
/// change the `:authority` they send (and so `server.address`).
pub struct GrpcTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: TempDir,
}

impl GrpcTls {
    /// A self-signed certificate for 127.0.0.1, made by `openssl req`.
    pub fn generate() -> Result<GrpcTls> {
        let dir = TempDir::new("grpc-cert")?;
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let mut cmd = Command::new(crate::certs::openssl()?);
        cmd.args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
            .args(["-subj", "/CN=localhost", "-days", "1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert);
        run_capture("openssl-req", &mut cmd, Duration::from_secs(60))?
            .ok()
            .context("making the gRPC test certificate")?;
        Ok(GrpcTls {
            cert,
            key,
            _dir: dir,
        })
    }
}

/// A gRPC server process (Python or Node) on 127.0.0.1.
pub struct GrpcServer {
    proc: Proc,
    port: u16,
    tls: bool,
    _dir: TempDir,
}

impl GrpcServer {
    /// Debian's Python gRPC server, h2c (`tls` None) or TLS.
    pub fn python(tls: Option<&GrpcTls>) -> Result<GrpcServer> {
        let py = debian_python()?;
        let dir = TempDir::new("grpc-py-server")?;
        let script = dir.join("demo.py");
        std::fs::write(&script, DEMO_PY)?;
        let mut cmd = Command::new(py);
        cmd.arg(&script).arg("server");
        match tls {
            None => cmd.arg("-"),
            Some(t) => cmd.arg(&t.cert).arg(&t.key),
        };
        clean_env(&mut cmd);
        Self::spawn("python-grpc-server", cmd, dir, tls.is_some())
    }

    /// A Node `@grpc/grpc-js` server over TLS (`SayHello` only).
    pub fn node(tls: &GrpcTls) -> Result<GrpcServer> {
        node_grpc_check()?;
        let dir = TempDir::new("grpc-node-server")?;
        let script = dir.join("server.js");
        std::fs::write(&script, NODE_SERVER_JS)?;
        let mut cmd = Command::new(crate::node::NODE);
        cmd.arg(&script)
            .arg(&tls.cert)
            .arg(&tls.key)
            .env("NODE_PATH", node_dir().join("node_modules"));
        clean_env(&mut cmd);
        Self::spawn("node-grpc-server", cmd, dir, true)
    }

    fn spawn(name: &str, mut cmd: Command, dir: TempDir, tls: bool) -> Result<GrpcServer> {
        let mut proc = Proc::spawn_with(
            name,
            &mut cmd,
            StopWith {
                signal: libc::SIGTERM,
                grace: Duration::from_secs(3),
            },
        )?;
        let line = proc.wait_for_line("`listening PORT`", Duration::from_secs(20), |l| {
            l.starts_with("listening ")
        })?;
        let port: u16 = line["listening ".len()..]
            .trim()
            .parse()
            .with_context(|| format!("{name} printed {line:?}"))?;
        if port == 0 {
            bail!("{name} could not bind a port: {line:?}\n{}", proc.log());
        }
        Ok(GrpcServer {
            proc,
            port,
            tls,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Fail, with its output, if the server has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(st) = self.proc.try_status() {
            bail!(
                "{} exited ({st}); its output:\n{}",
                self.proc.name(),
                self.log()
            );
        }
        Ok(())
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// One step of a gRPC client, as it printed it.
#[derive(Clone, Debug)]
pub struct GrpcCall {
    /// The step as given (`hello:x`, `stream:5,100`, ...).
    pub step: String,
    /// The status code's name (`OK`, `NOT_FOUND`); for `concurrent`, `OK`
    /// only if every call was OK.
    pub code: String,
    /// The status message, when not OK.
    pub details: Option<String>,
    pub replies: Vec<String>,
    /// Wall clock (Unix ns) around the call, when the client reports it.
    pub start_ns: Option<u64>,
    pub end_ns: Option<u64>,
    /// Streaming: when each reply arrived.
    pub reply_ns: Vec<u64>,
    /// Python client: the local ports of its TCP connections to the server
    /// right after the step (one, the channel's, for every step).
    pub conns: Vec<u16>,
}

impl GrpcCall {
    fn parse(line: &str) -> Result<GrpcCall> {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("client printed {line:?}"))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let strs = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(|x| x.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let n = |k: &str| v.get(k).and_then(|x| x.as_u64());
        Ok(GrpcCall {
            step: s("step").with_context(|| format!("no step in {line:?}"))?,
            code: s("code").with_context(|| format!("no code in {line:?}"))?,
            details: s("details"),
            replies: strs("replies"),
            start_ns: n("start_ns"),
            end_ns: n("end_ns"),
            reply_ns: v
                .get("reply_ns")
                .and_then(|x| x.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                .unwrap_or_default(),
            conns: v
                .get("conns")
                .and_then(|x| x.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .map(|p| p as u16)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// What a client process did.
#[derive(Clone, Debug)]
pub struct GrpcRun {
    pub pid: u32,
    pub calls: Vec<GrpcCall>,
    pub stdout: String,
    pub stderr: String,
}

impl GrpcRun {
    fn parse(pid: u32, stdout: String, stderr: String) -> Result<GrpcRun> {
        let calls = stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(GrpcCall::parse)
            .collect::<Result<Vec<_>>>()?;
        Ok(GrpcRun {
            pid,
            calls,
            stdout,
            stderr,
        })
    }

    /// The result of `step`; fails if the client did not report it.
    pub fn call(&self, step: &str) -> Result<&GrpcCall> {
        self.calls.iter().find(|c| c.step == step).with_context(|| {
            format!(
                "the gRPC client (pid {}) reported no step {step:?}\nstdout:\n{}\nstderr:\n{}",
                self.pid, self.stdout, self.stderr
            )
        })
    }

    /// The one TCP connection (its local port) every step used; fails if a
    /// step saw none or several, or they differ.
    pub fn one_connection(&self) -> Result<u16> {
        let all: Vec<(&str, &[u16])> = self
            .calls
            .iter()
            .map(|c| (c.step.as_str(), c.conns.as_slice()))
            .collect();
        match all.first() {
            Some((_, [port])) if all.iter().all(|(_, c)| c == &[*port]) => Ok(*port),
            _ => bail!(
                "the gRPC client (pid {}) did not use one and the same connection for every step (local ports per step): {all:?}",
                self.pid
            ),
        }
    }

    /// `step` ended with `code` and, if OK, `replies` replies each holding
    /// `want_in_reply` and the payload mark.
    pub fn expect(
        &self,
        step: &str,
        code: &str,
        replies: usize,
        want_in_reply: &str,
    ) -> Result<&GrpcCall> {
        let c = self.call(step)?;
        let ok = c.code == code
            && c.replies.len() == replies
            && c.replies
                .iter()
                .all(|r| r.contains(want_in_reply) && r.contains(PAYLOAD_MARK));
        if !ok {
            bail!(
                "gRPC client pid {} step {step:?}: code {:?} ({:?}) with {} replies {:?}; want {code} with {replies} replies containing {want_in_reply:?} and {PAYLOAD_MARK:?}\nstderr:\n{}",
                self.pid,
                c.code,
                c.details,
                c.replies.len(),
                c.replies.iter().take(5).collect::<Vec<_>>(),
                self.stderr
            );
        }
        Ok(c)
    }
}

fn python_client_cmd(
    port: u16,
    tls: Option<&GrpcTls>,
    steps: &[&str],
    dir: &TempDir,
) -> Result<Command> {
    let py = debian_python()?;
    let script = dir.join("demo.py");
    std::fs::write(&script, DEMO_PY)?;
    let mut cmd = Command::new(py);
    cmd.arg(&script).arg("client").arg(port.to_string());
    match tls {
        None => cmd.arg("-"),
        Some(t) => cmd.arg(&t.cert),
    };
    cmd.args(steps);
    clean_env(&mut cmd);
    Ok(cmd)
}

/// Run Debian's Python gRPC client to completion: `steps` on one channel to
/// 127.0.0.1:`port` (TLS if `tls`). Fails if it exits non-zero.
pub fn python_client(port: u16, tls: Option<&GrpcTls>, steps: &[&str]) -> Result<GrpcRun> {
    let dir = TempDir::new("grpc-py-client")?;
    let mut cmd = python_client_cmd(port, tls, steps, &dir)?;
    let f = run_capture("python-grpc-client", &mut cmd, Duration::from_secs(60))?
        .ok()
        .context("the Python gRPC client failed")?;
    GrpcRun::parse(f.pid, f.stdout, f.stderr)
}

/// A Python gRPC client still running: started with a `wait:FILE` step, it
/// holds its channel open until [`PythonClient::go`].
pub struct PythonClient {
    proc: Proc,
    go_file: PathBuf,
    dir: TempDir,
}

impl PythonClient {
    /// Start the client with `before` steps, then a wait, then `after` steps;
    /// returns once it waits (the `before` steps are done).
    pub fn start_paused(
        port: u16,
        tls: Option<&GrpcTls>,
        before: &[&str],
        after: &[&str],
    ) -> Result<PythonClient> {
        let dir = TempDir::new("grpc-py-client")?;
        let go_file = dir.join("go");
        let wait = format!("wait:{}", go_file.display());
        let mut steps: Vec<&str> = before.to_vec();
        steps.push(&wait);
        steps.extend_from_slice(after);
        let mut cmd = python_client_cmd(port, tls, &steps, &dir)?;
        let mut proc = Proc::spawn("python-grpc-client", &mut cmd)?;
        proc.wait_for_line("`waiting FILE`", Duration::from_secs(30), |l| {
            l.starts_with("waiting ")
        })?;
        Ok(PythonClient { proc, go_file, dir })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// What the client reported so far (the steps before the wait).
    pub fn so_far(&self) -> Result<GrpcRun> {
        GrpcRun::parse(self.proc.pid(), self.proc.stdout(), self.proc.stderr())
    }

    /// Let it run the steps after the wait, and wait for it to exit.
    pub fn go(mut self) -> Result<GrpcRun> {
        std::fs::write(&self.go_file, b"go")?;
        let st = self.proc.wait_exit(Duration::from_secs(60))?;
        let run = GrpcRun::parse(self.proc.pid(), self.proc.stdout(), self.proc.stderr())?;
        if !st.success() {
            bail!(
                "the Python gRPC client (pid {}) exited with {st}\nstdout:\n{}\nstderr:\n{}",
                run.pid,
                run.stdout,
                run.stderr
            );
        }
        let _ = &self.dir;
        Ok(run)
    }
}

/// Run a Node `@grpc/grpc-js` client over TLS to completion: one unary
/// `SayHello` per request text, in order, on one channel.
pub fn node_client(port: u16, tls: &GrpcTls, requests: &[&str]) -> Result<GrpcRun> {
    node_grpc_check()?;
    let dir = TempDir::new("grpc-node-client")?;
    let script = dir.join("client.js");
    std::fs::write(&script, NODE_CLIENT_JS)?;
    let mut cmd = Command::new(crate::node::NODE);
    cmd.arg(&script)
        .arg(port.to_string())
        .arg(&tls.cert)
        .args(requests)
        .env("NODE_PATH", node_dir().join("node_modules"));
    clean_env(&mut cmd);
    let f = run_capture("node-grpc-client", &mut cmd, Duration::from_secs(60))?
        .ok()
        .context("the Node gRPC client failed")?;
    GrpcRun::parse(f.pid, f.stdout, f.stderr)
}

/// The gRPC status codes a server span is an error for (OpenTelemetry RPC
/// conventions): UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
/// UNAVAILABLE, DATA_LOSS.
pub const SERVER_ERROR_CODES: &[i64] = &[2, 4, 12, 13, 14, 15];

/// A gRPC status code's number from its name.
pub fn code_number(name: &str) -> Option<i64> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as i64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_client_lines() {
        let r = super::GrpcRun::parse(
            7,
            "waiting /x\n{\"step\": \"stream:2,100\", \"code\": \"OK\", \"replies\": [\"a\", \"b\"], \"reply_ns\": [1, 2], \"start_ns\": 1796402542215996770, \"end_ns\": 1796402542223001448}\n{\"step\":\"notfound\",\"code\":\"NOT_FOUND\",\"replies\":[]}\n".into(),
            String::new(),
        )
        .unwrap();
        assert_eq!(r.calls.len(), 2);
        let s = r.call("stream:2,100").unwrap();
        assert_eq!(s.replies, ["a", "b"]);
        assert_eq!(s.reply_ns, [1, 2]);
        assert_eq!(s.start_ns, Some(1796402542215996770));
        assert_eq!(r.call("notfound").unwrap().code, "NOT_FOUND");
        assert_eq!(super::code_number("NOT_FOUND"), Some(5));
        assert_eq!(super::code_number("OK"), Some(0));
        assert_eq!(super::code_number("DATA_LOSS"), Some(15));
    }
}
