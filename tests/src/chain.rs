//! Traces across processes (issue 5): a chain of real, unmodified servers on
//! loopback, a load client, and the analysis of the spans they produce.
//!
//! The chain: client (curl or [`python_load`]) -> nginx (`proxy_pass`, see
//! [`chain_nginx`]) -> [`Backend`] (Python `http.server`, thread per
//! connection: the thread serving a request makes the downstream call) ->
//! [`Backend2`] (Python `http.server`). [`NodeChainServer`] is the event-loop
//! variant of the middle tier (Node `http` server calling backend2 with
//! `http.get`).
//!
//! Paths: the client asks for `/chain/N`; nginx forwards it unchanged; the
//! backend (and the Node server) calls backend2 for `/leaf/N`. Every request
//! has its own N, so the spans of one request are found by process, kind,
//! `server.port` and `url.path` ([`Tier`]), and [`analyze`] checks each
//! request's parent links hop by hop ([`ChainReport`]).
//!
//! All Python servers run Debian's `/usr/bin/python3` (service name
//! `python3.11`); they are told apart by pid.

use crate::certs::TestCert;
use crate::expect::Expect;
use crate::nginx::{Nginx, NginxOptions, NginxTls};
use crate::proc::{Finished, Proc, StopWith, TempDir, run_capture};
use crate::rotel::Rotel;
use crate::span::{Span, SpanKind};
use crate::tls::TlsVersion;
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub const CHAIN_PREFIX: &str = "/chain/";
pub const LEAF_PREFIX: &str = "/leaf/";

/// `/chain/N`: what a client asks the front tier for.
pub fn chain_path(n: u64) -> String {
    format!("{CHAIN_PREFIX}{n}")
}

/// `/leaf/N`: what the middle tier asks backend2 for while serving `/chain/N`.
pub fn leaf_path(n: u64) -> String {
    format!("{LEAF_PREFIX}{n}")
}

const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "all_proxy",
    "no_proxy",
    "NO_PROXY",
    "NODE_OPTIONS",
];

// ------------------------------------------------------------------ servers

/// One script for both Python tiers: `server.py leaf` (backend2) or
/// `server.py backend DOWNSTREAM_PORT keepalive|new`.
/// HTTP/1.1 with Content-Length, so clients may keep connections alive.
const PY_SERVER: &str = r#"
import sys, threading, http.client, urllib.request
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

role = sys.argv[1]
down = int(sys.argv[2]) if role == "backend" else 0
mode = sys.argv[3] if role == "backend" else ""
local = threading.local()
# urllib must not go through a proxy, whatever the environment says.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def fresh():
    local.conn = http.client.HTTPConnection("127.0.0.1", down, timeout=20)
    return local.conn

def call_down(path):
    if mode == "new":
        # urllib: a new connection per call (Connection: close).
        with opener.open("http://127.0.0.1:%d%s" % (down, path), timeout=20) as r:
            return r.status, r.read()
    # One kept-alive connection per serving thread.
    c = getattr(local, "conn", None) or fresh()
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    except (http.client.HTTPException, OSError):
        c.close()
        c = fresh()
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes: without TCP_NODELAY the second
    # waits for the peer's delayed ACK (40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True

    def do_GET(self):
        path = self.path.split("?")[0]
        if role == "backend":
            leaf = "/leaf/" + path[len("/chain/"):] if path.startswith("/chain/") else "/leaf" + path
            status, body = call_down(leaf)
            out = ("backend got %d (%d bytes) from %s\n" % (status, len(body), leaf)).encode()
        else:
            out = ("leaf says hello for %s\n" % path).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, fmt, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

srv = Server(("127.0.0.1", 0), Handler)
print("listening %d" % srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// How the backend calls backend2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Downstream {
    /// `http.client`, one connection per serving thread, kept alive.
    KeepAlive,
    /// `urllib`: a new connection for every call.
    NewConnection,
}

/// A server that prints `listening PORT` once bound.
struct Listening {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

fn start_listening(name: &str, dir: TempDir, mut cmd: Command) -> Result<Listening> {
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
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
    let port = line["listening ".len()..]
        .trim()
        .parse()
        .with_context(|| format!("{name} printed {line:?}"))?;
    Ok(Listening {
        proc,
        port,
        _dir: dir,
    })
}

fn start_python(name: &str, args: &[String]) -> Result<Listening> {
    let py = crate::system_python()?;
    let dir = TempDir::new(name)?;
    let script = dir.join("server.py");
    std::fs::write(&script, PY_SERVER)?;
    let mut cmd = Command::new(py);
    cmd.arg(&script).args(args);
    start_listening(name, dir, cmd)
}

/// The last tier: Python `http.server` (ThreadingHTTPServer) answering 200
/// `leaf says hello for PATH` to any GET.
pub struct Backend2(Listening);

impl Backend2 {
    pub fn start() -> Result<Backend2> {
        Ok(Backend2(start_python("backend2", &["leaf".into()])?))
    }

    pub fn port(&self) -> u16 {
        self.0.port
    }

    pub fn pid(&self) -> u32 {
        self.0.proc.pid()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.0.port)
    }

    pub fn log(&self) -> String {
        self.0.proc.log()
    }

    pub fn check_running(&mut self) -> Result<()> {
        check_running(&mut self.0.proc)
    }
}

/// The middle tier: Python ThreadingHTTPServer whose handler, for
/// `/chain/N`, calls backend2 for `/leaf/N` and then answers 200.
pub struct Backend {
    inner: Listening,
    downstream_port: u16,
    mode: Downstream,
}

impl Backend {
    pub fn start(backend2_port: u16, mode: Downstream) -> Result<Backend> {
        let m = match mode {
            Downstream::KeepAlive => "keepalive",
            Downstream::NewConnection => "new",
        };
        let inner = start_python(
            "backend",
            &["backend".into(), backend2_port.to_string(), m.into()],
        )?;
        Ok(Backend {
            inner,
            downstream_port: backend2_port,
            mode,
        })
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    pub fn pid(&self) -> u32 {
        self.inner.proc.pid()
    }

    pub fn downstream_port(&self) -> u16 {
        self.downstream_port
    }

    pub fn mode(&self) -> Downstream {
        self.mode
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.inner.port)
    }

    pub fn log(&self) -> String {
        self.inner.proc.log()
    }

    pub fn check_running(&mut self) -> Result<()> {
        check_running(&mut self.inner.proc)
    }
}

fn check_running(p: &mut Proc) -> Result<()> {
    if let Some(st) = p.try_status() {
        bail!("{} exited ({st}); its output:\n{}", p.name(), p.log());
    }
    Ok(())
}

const NODE_SERVER_JS: &str = r#"
const http = require('http');
const down = +process.argv[2];
// Kept-alive connections to backend2, as many as requests in flight.
const agent = new http.Agent({keepAlive: true});
const srv = http.createServer((req, res) => {
  const p = req.url.split('?')[0];
  const leaf = p.startsWith('/chain/') ? '/leaf/' + p.slice('/chain/'.length) : '/leaf' + p;
  http.get({host: '127.0.0.1', port: down, path: leaf, agent}, r => {
    let n = 0;
    r.on('data', c => { n += c.length; });
    r.on('end', () => {
      const body = `node got ${r.statusCode} (${n} bytes) from ${leaf}\n`;
      res.writeHead(200, {'content-type': 'text/plain', 'content-length': Buffer.byteLength(body)});
      res.end(body);
    });
  }).on('error', e => { res.writeHead(502); res.end(String(e) + '\n'); });
});
srv.keepAliveTimeout = 30000;
srv.listen(0, '127.0.0.1', () => console.log('listening ' + srv.address().port));
process.on('SIGTERM', () => process.exit(0));
"#;

/// The event-loop middle tier: a Node `http` server that, per request
/// `/chain/N`, calls backend2 for `/leaf/N` with `http.get` (keep-alive
/// agent) and answers 200 when that returns.
pub struct NodeChainServer(Listening);

impl NodeChainServer {
    pub fn start(backend2_port: u16) -> Result<NodeChainServer> {
        let node = crate::node::NODE;
        if !Path::new(node).is_file() {
            bail!("{node} is missing: install nodejs (`cargo xtask setup --test-deps`)");
        }
        let dir = TempDir::new("node-chain")?;
        let script = dir.join("server.js");
        std::fs::write(&script, NODE_SERVER_JS)?;
        let mut cmd = Command::new(node);
        cmd.arg(&script).arg(backend2_port.to_string());
        Ok(NodeChainServer(start_listening("node-chain", dir, cmd)?))
    }

    pub fn port(&self) -> u16 {
        self.0.port
    }

    pub fn pid(&self) -> u32 {
        self.0.proc.pid()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.0.port)
    }

    pub fn log(&self) -> String {
        self.0.proc.log()
    }

    pub fn check_running(&mut self) -> Result<()> {
        check_running(&mut self.0.proc)
    }
}

/// How nginx talks to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// `proxy_pass http://127.0.0.1:PORT`: HTTP/1.0, a new connection per request.
    Close,
    /// An `upstream` block with `keepalive`, `proxy_http_version 1.1` and an
    /// empty `Connection` header: connections to the backend are reused.
    KeepAlive,
}

/// nginx (one worker) proxying `/chain/` to the backend on 127.0.0.1:`backend_port`;
/// HTTPS on its port when `tls` is given (TLS 1.3, HTTP/1.1), the hop to the
/// backend is plain HTTP either way. Request headers (e.g. `traceparent`)
/// are forwarded as nginx does by default.
pub fn chain_nginx(backend_port: u16, upstream: Upstream, tls: Option<&TestCert>) -> Result<Nginx> {
    let (extra_http, location) = match upstream {
        Upstream::Close => (
            String::new(),
            format!(
                "location /chain/ {{\n            proxy_pass http://127.0.0.1:{backend_port};\n        }}"
            ),
        ),
        Upstream::KeepAlive => (
            format!(
                "upstream periscope_backend {{\n        server 127.0.0.1:{backend_port};\n        keepalive 32;\n    }}"
            ),
            "location /chain/ {\n            proxy_pass http://periscope_backend;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n        }"
                .to_string(),
        ),
    };
    Nginx::start_with(NginxOptions {
        extra_http,
        extra_locations: location,
        tls: tls.map(|c| NginxTls::only(c.cert(), c.key(), TlsVersion::Tls13)),
        ..Default::default()
    })
}

// ------------------------------------------------------------------ clients

/// `curl -sS URL` printing the body: for checks that the chain answers.
pub fn curl_body(url: &str, extra: &[&str]) -> Result<Finished> {
    let mut cmd = Command::new(crate::clients::CURL);
    cmd.args([
        "-sS",
        "--http1.1",
        "--noproxy",
        "*",
        "--max-time",
        "20",
        "--fail",
    ])
    .args(extra)
    .arg(url);
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    run_capture("curl", &mut cmd, Duration::from_secs(30))?
        .ok()
        .with_context(|| format!("curl {url}"))
}

/// Many GETs in parallel from one Python process: a thread pool of
/// `concurrency` threads, each with its own kept-alive `http.client`
/// connection, issuing `GET /chain/N` for every N in `ns`.
const PY_LOAD: &str = r#"
import sys, threading, http.client
from concurrent.futures import ThreadPoolExecutor
port, conc = int(sys.argv[1]), int(sys.argv[2])
ns = [int(x) for x in sys.argv[3].split(",")]
local = threading.local()
def one(n):
    c = getattr(local, "c", None)
    if c is None:
        c = local.c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/chain/%d" % n)
    r = c.getresponse()
    body = r.read()
    return n, r.status, c.sock.getsockname()[1] if c.sock else 0, len(body)
with ThreadPoolExecutor(conc) as ex:
    for n, status, lport, size in ex.map(one, ns):
        print("result %d %d %d %d" % (n, status, lport, size), flush=True)
"#;

#[derive(Clone, Debug)]
pub struct LoadResult {
    pub n: u64,
    pub status: u16,
    pub local_port: u16,
    pub size: usize,
}

#[derive(Clone, Debug)]
pub struct LoadRun {
    /// The client's pid: its client spans carry it.
    pub pid: u32,
    pub results: Vec<LoadResult>,
    pub elapsed: Duration,
}

/// Run the Python load client (Debian's python3) against 127.0.0.1:`port`;
/// fails unless every request got a 200.
pub fn python_load(port: u16, ns: &[u64], concurrency: usize) -> Result<LoadRun> {
    let py = crate::system_python()?;
    let list: Vec<String> = ns.iter().map(u64::to_string).collect();
    let mut cmd = Command::new(py);
    cmd.args(["-c", PY_LOAD])
        .arg(port.to_string())
        .arg(concurrency.to_string())
        .arg(list.join(","));
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    let t0 = Instant::now();
    let f = run_capture("python-load", &mut cmd, Duration::from_secs(180))?
        .ok()
        .context("the Python load client failed")?;
    let elapsed = t0.elapsed();
    let mut results = Vec::new();
    for l in f.stdout.lines() {
        let Some(rest) = l.strip_prefix("result ") else {
            continue;
        };
        let p: Vec<&str> = rest.split(' ').collect();
        if p.len() != 4 {
            bail!("unexpected load client line {l:?}");
        }
        results.push(LoadResult {
            n: p[0].parse()?,
            status: p[1].parse()?,
            local_port: p[2].parse()?,
            size: p[3].parse()?,
        });
    }
    if results.len() != ns.len() {
        bail!(
            "the load client reported {} results for {} requests:\n{}\n{}",
            results.len(),
            ns.len(),
            f.stdout,
            f.stderr
        );
    }
    let bad: Vec<&LoadResult> = results.iter().filter(|r| r.status != 200).collect();
    if !bad.is_empty() {
        bail!("requests without a 200: {bad:?}");
    }
    Ok(LoadRun {
        pid: f.pid,
        results,
        elapsed,
    })
}

/// A W3C `traceparent` with random ids (from /dev/urandom): (header value,
/// trace id, parent span id).
pub fn random_traceparent() -> Result<(String, String, String)> {
    use std::io::Read;
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    // Never all zeros (invalid); the first byte set makes sure.
    b[0] |= 0x10;
    b[16] |= 0x10;
    let hex = |s: &[u8]| s.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let (trace, span) = (hex(&b[..16]), hex(&b[16..]));
    Ok((format!("00-{trace}-{span}-01"), trace, span))
}

// ------------------------------------------------------------------ analysis

/// How a tier's span is linked to the span of the tier before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Link {
    /// The first tier: a root span (or, with a `traceparent`, its parent).
    Root,
    /// Client and server ends of one connection, in two traced processes.
    CrossProcess,
    /// Same process, the thread serving the request makes the call: exact.
    Thread,
    /// Same process, an event loop: best effort.
    EventLoop,
}

impl Link {
    pub fn describe(self) -> &'static str {
        match self {
            Link::Root => "root",
            Link::CrossProcess => "cross-process",
            Link::Thread => "in-process, thread per request",
            Link::EventLoop => "in-process, event loop (best effort)",
        }
    }
}

/// One tier of a chain: which span of request N it is.
#[derive(Clone, Debug)]
pub struct Tier {
    /// e.g. `nginx server`.
    pub label: String,
    pub kind: SpanKind,
    /// `process.pid` (any of these).
    pub pids: Vec<u32>,
    /// `server.port` (the listening port for servers, the peer's for clients).
    pub server_port: u16,
    /// `url.path` is this prefix followed by N.
    pub prefix: &'static str,
    /// How it hangs off the tier before it.
    pub link: Link,
}

impl Tier {
    pub fn new(
        label: &str,
        kind: SpanKind,
        pids: &[u32],
        server_port: u16,
        prefix: &'static str,
        link: Link,
    ) -> Tier {
        Tier {
            label: label.to_string(),
            kind,
            pids: pids.to_vec(),
            server_port,
            prefix,
            link,
        }
    }

    /// The request number if `s` is this tier's span of some request.
    fn request_of(&self, s: &Span) -> Option<u64> {
        if s.kind != self.kind
            || !s.pid().is_some_and(|p| self.pids.contains(&p))
            || s.int_attr("server.port") != Some(self.server_port as i64)
        {
            return None;
        }
        s.path()?.strip_prefix(self.prefix)?.parse().ok()
    }
}

/// The six tiers of client -> nginx -> backend -> backend2.
pub fn nginx_chain_tiers(
    client_label: &str,
    client_pids: &[u32],
    nginx: &Nginx,
    backend: &Backend,
    backend2_pid: u32,
) -> Vec<Tier> {
    let workers = nginx.worker_pids();
    vec![
        Tier::new(
            &format!("{client_label} client"),
            SpanKind::Client,
            client_pids,
            nginx.port(),
            CHAIN_PREFIX,
            Link::Root,
        ),
        Tier::new(
            "nginx server",
            SpanKind::Server,
            &workers,
            nginx.port(),
            CHAIN_PREFIX,
            Link::CrossProcess,
        ),
        Tier::new(
            "nginx client",
            SpanKind::Client,
            &workers,
            backend.port(),
            CHAIN_PREFIX,
            Link::EventLoop,
        ),
        Tier::new(
            "backend server",
            SpanKind::Server,
            &[backend.pid()],
            backend.port(),
            CHAIN_PREFIX,
            Link::CrossProcess,
        ),
        Tier::new(
            "backend client",
            SpanKind::Client,
            &[backend.pid()],
            backend.downstream_port(),
            LEAF_PREFIX,
            Link::Thread,
        ),
        Tier::new(
            "backend2 server",
            SpanKind::Server,
            &[backend2_pid],
            backend.downstream_port(),
            LEAF_PREFIX,
            Link::CrossProcess,
        ),
    ]
}

/// Counts for one hop (tier i-1 -> tier i) over all requests where both
/// spans were found.
#[derive(Clone, Debug, Default)]
pub struct HopStats {
    pub label: String,
    pub link: Option<Link>,
    /// Requests where both spans were found.
    pub pairs: usize,
    /// Child's parent = the expected span, same trace.
    pub linked: usize,
    /// Child has no parent.
    pub unlinked: usize,
    /// Child has another parent, or the right parent in another trace.
    pub wrong: usize,
    /// The expected parent was not received, and the child names another
    /// request's (or tier's) span as its parent: wrong too.
    pub wrong_unpaired: usize,
}

impl HopStats {
    pub fn share(&self) -> f64 {
        if self.pairs == 0 {
            0.0
        } else {
            100.0 * self.linked as f64 / self.pairs as f64
        }
    }
}

/// What [`analyze`] found.
#[derive(Clone, Debug, Default)]
pub struct ChainReport {
    pub name: String,
    pub tiers: Vec<Tier>,
    pub requests: Vec<u64>,
    /// (tier index, request) -> the spans found (one expected).
    pub found: BTreeMap<(usize, u64), Vec<Span>>,
    /// Per tier; index 0 is the root check.
    pub hops: Vec<HopStats>,
    /// One line per wrong link.
    pub wrong: Vec<String>,
    /// One line per trace holding spans of more than one request.
    pub mixed: Vec<String>,
    pub missing: Vec<String>,
    pub duplicates: Vec<String>,
    /// Requests whose spans are not all in one trace.
    pub split: Vec<String>,
    /// Every span received (for naming what a wrong parent id points at).
    all: BTreeMap<String, Span>,
}

fn short(s: &Span) -> String {
    format!(
        "{:?} {} span {} trace {} parent {} [{} pid {}]",
        s.kind,
        s.path().unwrap_or("-"),
        s.span_id,
        s.trace_id,
        s.parent_span_id.as_deref().unwrap_or("-"),
        s.service_name().unwrap_or("?"),
        s.pid().map(|p| p.to_string()).unwrap_or("?".into())
    )
}

/// Check the parent links of every request `ns` through `tiers`.
/// `root_parents`: requests sent with a `traceparent` -> (trace id, parent
/// span id) the first tier must carry; other requests' first span must be a root.
pub fn analyze(
    name: &str,
    spans: &[Span],
    tiers: &[Tier],
    ns: &[u64],
    root_parents: &BTreeMap<u64, (String, String)>,
) -> ChainReport {
    let wanted: BTreeSet<u64> = ns.iter().copied().collect();
    let mut r = ChainReport {
        name: name.to_string(),
        tiers: tiers.to_vec(),
        requests: ns.to_vec(),
        ..Default::default()
    };
    for s in spans {
        r.all.insert(s.span_id.clone(), s.clone());
        for (i, t) in tiers.iter().enumerate() {
            if let Some(n) = t.request_of(s)
                && wanted.contains(&n)
            {
                r.found.entry((i, n)).or_default().push(s.clone());
            }
        }
    }
    // span id -> (tier, request) of every span found.
    let index: BTreeMap<String, (usize, u64)> = r
        .found
        .iter()
        .flat_map(|(k, v)| v.iter().map(move |s| (s.span_id.clone(), *k)))
        .collect();
    for (i, t) in tiers.iter().enumerate() {
        r.hops.push(HopStats {
            label: if i == 0 {
                t.label.clone()
            } else {
                format!("{} -> {}", tiers[i - 1].label, t.label)
            },
            link: Some(t.link),
            ..Default::default()
        });
    }
    let describe_parent = |r: &ChainReport, id: &str| -> String {
        match r.all.get(id) {
            Some(p) => format!("it names {}", short(p)),
            None => "no span received has that id".to_string(),
        }
    };
    for &n in ns {
        let one = |i: usize| -> Option<&Span> {
            r.found
                .get(&(i, n))
                .and_then(|v| (v.len() == 1).then(|| &v[0]))
        };
        let mut missing = Vec::new();
        let mut dups = Vec::new();
        for (i, t) in tiers.iter().enumerate() {
            match r.found.get(&(i, n)).map(Vec::len).unwrap_or(0) {
                0 => missing.push(t.label.clone()),
                1 => {}
                k => dups.push(format!(
                    "request {n}: {k} {} spans: {}",
                    t.label,
                    r.found[&(i, n)]
                        .iter()
                        .map(short)
                        .collect::<Vec<_>>()
                        .join("; ")
                )),
            }
        }
        if !missing.is_empty() {
            r.missing
                .push(format!("request {n}: no span for {}", missing.join(", ")));
        }
        let mut new_wrong = Vec::new();
        // The root.
        if let Some(s) = one(0) {
            let h = &mut r.hops[0];
            h.pairs += 1;
            match (root_parents.get(&n), &s.parent_span_id) {
                (None, None) => h.linked += 1,
                (Some((t, p)), Some(got)) if *t == s.trace_id && p == got => h.linked += 1,
                (Some(_), None) => h.unlinked += 1,
                (want, Some(got)) => {
                    h.wrong += 1;
                    new_wrong.push(format!(
                        "request {n}: {} {} should be {}, but has parent {got} ({})",
                        tiers[0].label,
                        short(s),
                        match want {
                            Some((t, p)) => format!("in trace {t} with parent {p} (traceparent)"),
                            None => "a root".to_string(),
                        },
                        describe_parent(&r, got)
                    ));
                }
            }
        }
        for i in 1..tiers.len() {
            let Some(child) = one(i) else {
                continue;
            };
            let Some(parent) = one(i - 1) else {
                // The expected parent is missing: a parent id that names
                // another request's span is still a wrong link.
                if let Some(p) = &child.parent_span_id
                    && let Some(&(j, m)) = index.get(p.as_str())
                    && (j, m) != (i - 1, n)
                {
                    r.hops[i].wrong_unpaired += 1;
                    new_wrong.push(format!(
                        "request {n}: {} {} (its {} span was not received) has parent {p}, the {} span of request {m}: {}",
                        tiers[i].label,
                        short(child),
                        tiers[i - 1].label,
                        tiers[j].label,
                        describe_parent(&r, p)
                    ));
                }
                continue;
            };
            let h = &mut r.hops[i];
            h.pairs += 1;
            match &child.parent_span_id {
                None => h.unlinked += 1,
                Some(p) if *p == parent.span_id && child.trace_id == parent.trace_id => {
                    h.linked += 1
                }
                Some(p) => {
                    h.wrong += 1;
                    new_wrong.push(format!(
                        "request {n}: {} {} should be the child of {} {} ({}), but has parent {p} ({})",
                        tiers[i].label,
                        short(child),
                        tiers[i - 1].label,
                        short(parent),
                        tiers[i].link.describe(),
                        describe_parent(&r, p)
                    ));
                }
            }
        }
        r.wrong.extend(new_wrong);
        r.duplicates.extend(dups);
        let traces: BTreeSet<&str> = (0..tiers.len())
            .filter_map(|i| r.found.get(&(i, n)))
            .flatten()
            .map(|s| s.trace_id.as_str())
            .collect();
        if traces.len() > 1 {
            r.split.push(format!(
                "request {n}: spans in {} traces: {}",
                traces.len(),
                (0..tiers.len())
                    .filter_map(|i| r.found.get(&(i, n)).map(|v| (i, v)))
                    .flat_map(|(i, v)| v.iter().map(move |s| format!(
                        "{} {}",
                        tiers[i].label,
                        short(s)
                    )))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
    }
    // Mixing: a trace with spans of two requests.
    let mut by_trace: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for ((_, n), v) in &r.found {
        for s in v {
            by_trace.entry(s.trace_id.as_str()).or_default().insert(*n);
        }
    }
    let mut mixed = Vec::new();
    for (t, reqs) in by_trace {
        if reqs.len() > 1 {
            let members: Vec<String> = r
                .found
                .iter()
                .flat_map(|((i, _), v)| v.iter().map(move |s| (i, s)))
                .filter(|(_, s)| s.trace_id == t)
                .map(|(i, s)| format!("{} {}", r.tiers[*i].label, short(s)))
                .collect();
            mixed.push(format!(
                "trace {t} holds spans of requests {reqs:?}: {}",
                members.join("; ")
            ));
        }
    }
    r.mixed = mixed;
    r
}

impl ChainReport {
    /// Every span that belongs to some tier of some request.
    pub fn spans(&self) -> Vec<Span> {
        let mut v: Vec<Span> = self.found.values().flatten().cloned().collect();
        v.sort_by_key(|s| s.start_ns);
        v
    }

    /// Number of requests whose spans all were found exactly once.
    pub fn complete(&self) -> usize {
        self.requests
            .iter()
            .filter(|n| {
                (0..self.tiers.len())
                    .all(|i| self.found.get(&(i, **n)).is_some_and(|v| v.len() == 1))
            })
            .count()
    }

    /// `PARENTING ...` lines, one per hop, for the README.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "PARENTING [{}] {} requests, {} with all {} spans\n",
            self.name,
            self.requests.len(),
            self.complete(),
            self.tiers.len()
        );
        for h in &self.hops {
            s.push_str(&format!(
                "PARENTING [{}] {} ({}): {:.1}% of {} spans linked, {} wrong, {} unlinked{}\n",
                self.name,
                h.label,
                h.link.map(Link::describe).unwrap_or("?"),
                h.share(),
                h.pairs,
                h.wrong,
                h.unlinked,
                if h.wrong_unpaired > 0 {
                    format!(
                        " (+{} wrong whose expected parent was not received)",
                        h.wrong_unpaired
                    )
                } else {
                    String::new()
                }
            ));
        }
        s.push_str(&format!(
            "PARENTING [{}] traces mixing requests: {}, requests split over traces: {}\n",
            self.name,
            self.mixed.len(),
            self.split.len()
        ));
        s
    }

    pub fn print(&self) {
        // cargo test shows it with --nocapture, and for a failing test.
        print!("{}", self.summary());
    }

    /// Record up to 20 of `items` as failures, each prefixed with `what`.
    pub fn list_into(e: &mut Expect, what: &str, items: &[String]) {
        Self::list(e, what, items)
    }

    fn list(e: &mut Expect, what: &str, items: &[String]) {
        const MAX: usize = 20;
        for it in items.iter().take(MAX) {
            e.fail(format!("{what}: {it}"));
        }
        if items.len() > MAX {
            e.fail(format!("{what}: ... and {} more", items.len() - MAX));
        }
    }

    /// The properties that hold under any load: every span there once, no
    /// wrong link, no trace mixing two requests.
    pub fn expect_no_mixing(&self, e: &mut Expect) {
        Self::list(e, "missing span", &self.missing);
        Self::list(e, "duplicate span", &self.duplicates);
        Self::list(e, "WRONG LINK", &self.wrong);
        Self::list(e, "MIXED TRACE", &self.mixed);
    }

    /// Every hop of these kinds linked for every request.
    pub fn expect_all_linked(&self, e: &mut Expect, kinds: &[Link]) {
        for (i, h) in self.hops.iter().enumerate() {
            let Some(link) = h.link else { continue };
            if kinds.contains(&link) && (h.linked != h.pairs || h.pairs == 0) {
                let unlinked: Vec<u64> = self
                    .requests
                    .iter()
                    .copied()
                    .filter(|n| {
                        i > 0
                            && self
                                .found
                                .get(&(i, *n))
                                .is_some_and(|v| v.len() == 1 && v[0].parent_span_id.is_none())
                    })
                    .take(10)
                    .collect();
                e.fail(format!(
                    "{} ({}): {} of {} spans linked ({} unlinked, {} wrong), want all; first unlinked requests: {unlinked:?}",
                    h.label,
                    link.describe(),
                    h.linked,
                    h.pairs,
                    h.unlinked,
                    h.wrong
                ));
            }
        }
    }

    /// The exact chain: every span once, every hop linked, one trace per request.
    pub fn expect_exact(&self, e: &mut Expect) {
        self.expect_no_mixing(e);
        self.expect_all_linked(
            e,
            &[
                Link::Root,
                Link::CrossProcess,
                Link::Thread,
                Link::EventLoop,
            ],
        );
        Self::list(e, "SPLIT TRACE", &self.split);
    }
}

/// Wait until every tier's span of every request in `ns` has arrived (or
/// `timeout`), then `settle` more so late duplicates show; return all spans.
pub fn wait_for_chain(
    rotel: &Rotel,
    tiers: &[Tier],
    ns: &[u64],
    timeout: Duration,
    settle: Duration,
) -> Vec<Span> {
    let wanted: BTreeSet<u64> = ns.iter().copied().collect();
    let need = tiers.len() * ns.len();
    let deadline = Instant::now() + timeout;
    loop {
        let spans = rotel.spans();
        let have: BTreeSet<(usize, u64)> = spans
            .iter()
            .flat_map(|s| {
                tiers
                    .iter()
                    .enumerate()
                    .filter_map(move |(i, t)| t.request_of(s).map(|n| (i, n)))
            })
            .filter(|(_, n)| wanted.contains(n))
            .collect();
        if have.len() >= need || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    rotel.spans_after(settle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{AttrValue, Attributes, Status};

    fn span(
        id: &str,
        trace: &str,
        parent: Option<&str>,
        kind: SpanKind,
        pid: u32,
        port: u16,
        path: &str,
    ) -> Span {
        let mut attributes = Attributes::new();
        attributes.insert("server.port".into(), AttrValue::Int(port as i64));
        attributes.insert("url.path".into(), AttrValue::Str(path.into()));
        let mut resource = Attributes::new();
        resource.insert("process.pid".into(), AttrValue::Int(pid as i64));
        Span {
            trace_id: trace.into(),
            span_id: id.into(),
            parent_span_id: parent.map(str::to_string),
            name: "GET".into(),
            kind,
            start_ns: 1,
            end_ns: 2,
            attributes,
            resource,
            scope_name: "periscope".into(),
            status: Status::default(),
        }
    }

    /// client (pid 1) -> server (pid 2, port 80) -> its client (pid 2 to port 81) -> leaf (pid 3, port 81).
    fn tiers() -> Vec<Tier> {
        vec![
            Tier::new("c", SpanKind::Client, &[1], 80, CHAIN_PREFIX, Link::Root),
            Tier::new(
                "s",
                SpanKind::Server,
                &[2],
                80,
                CHAIN_PREFIX,
                Link::CrossProcess,
            ),
            Tier::new("sc", SpanKind::Client, &[2], 81, LEAF_PREFIX, Link::Thread),
            Tier::new(
                "leaf",
                SpanKind::Server,
                &[3],
                81,
                LEAF_PREFIX,
                Link::CrossProcess,
            ),
        ]
    }

    fn request(n: u64, t: &str) -> Vec<Span> {
        let id = |k: &str| format!("{k}{n}");
        vec![
            span(&id("c"), t, None, SpanKind::Client, 1, 80, &chain_path(n)),
            span(
                &id("s"),
                t,
                Some(&id("c")),
                SpanKind::Server,
                2,
                80,
                &chain_path(n),
            ),
            span(
                &id("sc"),
                t,
                Some(&id("s")),
                SpanKind::Client,
                2,
                81,
                &leaf_path(n),
            ),
            span(
                &id("l"),
                t,
                Some(&id("sc")),
                SpanKind::Server,
                3,
                81,
                &leaf_path(n),
            ),
        ]
    }

    #[test]
    fn a_correct_chain_passes() {
        let spans: Vec<Span> = [request(1, "t1"), request(2, "t2")].concat();
        let r = analyze("t", &spans, &tiers(), &[1, 2], &BTreeMap::new());
        let mut e = Expect::new();
        r.expect_exact(&mut e);
        assert!(e.is_empty(), "{}", r.summary());
        assert!(r.hops.iter().all(|h| h.linked == 2 && h.pairs == 2));
    }

    #[test]
    fn unlinked_is_counted_and_wrong_links_and_mixing_fail() {
        let mut a = request(1, "t1");
        let mut b = request(2, "t2");
        // Request 1's in-process hop left unlinked (a new trace below it).
        a[2].parent_span_id = None;
        a[2].trace_id = "t3".into();
        a[3].trace_id = "t3".into();
        // Request 2's leaf hangs off request 1's client call: wrong and mixed.
        b[3].parent_span_id = Some("sc1".into());
        b[3].trace_id = "t3".into();
        let spans: Vec<Span> = [a, b].concat();
        let r = analyze("t", &spans, &tiers(), &[1, 2], &BTreeMap::new());
        assert_eq!(r.hops[2].unlinked, 1);
        assert_eq!(r.hops[3].wrong, 1);
        assert_eq!(r.wrong.len(), 1, "{:?}", r.wrong);
        assert_eq!(r.mixed.len(), 1, "{:?}", r.mixed);
        let mut e = Expect::new();
        r.expect_no_mixing(&mut e);
        assert!(!e.is_empty());
        // Best effort on the thread hop would still fail the exact check.
        let mut e = Expect::new();
        r.expect_all_linked(&mut e, &[Link::Thread]);
        assert!(!e.is_empty());
    }

    #[test]
    fn a_wrong_parent_is_caught_when_the_right_one_is_missing() {
        let a = request(1, "t1");
        let mut b = request(2, "t2");
        b.remove(2); // request 2's client call never arrived
        b[2].parent_span_id = Some("sc1".into());
        let spans: Vec<Span> = [a, b].concat();
        let r = analyze("t", &spans, &tiers(), &[1, 2], &BTreeMap::new());
        assert_eq!(r.hops[3].wrong_unpaired, 1);
        assert_eq!(r.missing.len(), 1);
        assert!(
            r.wrong.iter().any(|w| w.contains("request 2")),
            "{:?}",
            r.wrong
        );
    }

    #[test]
    fn traceparent_roots() {
        let mut a = request(1, "tp");
        a[0].parent_span_id = Some("p1".into());
        let roots = BTreeMap::from([(1u64, ("tp".to_string(), "p1".to_string()))]);
        let r = analyze("t", &a, &tiers(), &[1], &roots);
        let mut e = Expect::new();
        r.expect_exact(&mut e);
        assert!(e.is_empty(), "{}", r.summary());
        let r = analyze("t", &a, &tiers(), &[1], &BTreeMap::new());
        assert_eq!(r.hops[0].wrong, 1);
    }
}
