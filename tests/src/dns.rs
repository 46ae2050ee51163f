//! Name resolution for the DNS and latency-breakdown tests (issue 4): dnsmasq
//! on a loopback address of its own, unmodified clients that resolve through
//! it, a small UDP/TCP DNS "rig" in Python in front of it (delaying,
//! dropping, or answering garbage), a Python HTTP backend whose handler
//! sleeps, and helpers to read DNS spans and phase spans back.
//!
//! Facts these helpers rest on (checked on these machines):
//! - glibc's resolver only talks to port 53, so every DNS server here binds
//!   port 53 of a loopback address of its own in 127.53.0.0/16 (any address
//!   of 127.0.0.0/8 is local on Linux; [`free_dns_addr`] picks one whose
//!   port 53 is free, so two test runs on one machine do not collide).
//! - Clients resolve through a resolv.conf of the test's own, bind-mounted
//!   over `/etc/resolv.conf` in a private mount namespace ([`resolving_via`]:
//!   `unshare -m sh -c 'mount --bind RESOLV /etc/resolv.conf && exec CLIENT'`).
//!   unshare and sh exec, so the pid the harness sees is the client's.
//! - dnsmasq's `--address=/zone/IP` answers REFUSED or NXDOMAIN to AAAA
//!   questions for names that only have an A address; `--host-record` answers
//!   NOERROR with no records (NODATA), as a real zone does. So every name is a
//!   host record ([`HOSTS`] numbered ones, [`WWW`], [`API`]) and everything
//!   else under `.test` is NXDOMAIN (`--local=/test/`).
//! - `getent hosts NAME` resolves through `gethostbyname2` (AAAA, then A),
//!   never `getaddrinfo`; `getent ahosts NAME` calls `getaddrinfo`.
//! - curl 7.88 (threaded resolver) calls `getaddrinfo` in a thread of its own;
//!   Node calls it in a libuv worker thread; Python and getent in the calling
//!   thread. glibc sends the A and AAAA questions in parallel on one UDP
//!   socket and, on a timeout, sends both again on the same socket with the
//!   same transaction ids.

use crate::expect::Expect;
use crate::proc::{Finished, Proc, StopWith, TempDir, free_port, run_capture};
use crate::rotel::Rotel;
use crate::span::{AttrValue, Span, SpanKind, StatusCode};
use anyhow::{Context, Result, bail};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";
pub const UNSHARE: &str = "/usr/bin/unshare";
pub const GETENT: &str = "/usr/bin/getent";
pub const SH: &str = "/bin/sh";

/// The zone every test name lives in.
pub const ZONE: &str = "example.test";
/// `www.example.test` -> 127.0.0.1 (where nginx and the backends listen).
pub const WWW: &str = "www.example.test";
/// `api.example.test` -> [`API_ADDR`]: a name whose answer is not the address
/// any test connects to (so a lookup of it stays a standalone span).
pub const API: &str = "api.example.test";
pub const API_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
/// The address every other test name resolves to.
pub const TARGET_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// How many numbered names ([`host`]) dnsmasq knows.
pub const HOSTS: usize = 64;
/// A name under `.test` that does not exist (NXDOMAIN).
pub const MISSING: &str = "missing.example.test";

/// `n{i}.example.test` -> 127.0.0.1: distinct names for distinct runs, so the
/// spans of one run are found by name.
pub fn host(i: usize) -> String {
    assert!(
        i < HOSTS,
        "dns::host({i}): only {HOSTS} numbered names exist"
    );
    format!("n{i}.{ZONE}")
}

/// A name under `.test` that does not exist, distinct per `i`.
pub fn missing(i: usize) -> String {
    format!("missing-{i}.{ZONE}")
}

// ------------------------------------------------------------------ addresses

/// A loopback address in 127.53.0.0/16 whose UDP and TCP port 53 are free
/// now, never handed out twice by this process.
pub fn free_dns_addr() -> Result<Ipv4Addr> {
    static N: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id()
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for _ in 0..200 {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let x = seed
            .wrapping_mul(2654435761)
            .wrapping_add(n.wrapping_mul(40503));
        // 127.53.a.b with b in 2..=254.
        let addr = Ipv4Addr::new(127, 53, (x >> 8) as u8, 2 + (x % 253) as u8);
        let udp = UdpSocket::bind((addr, 53));
        let tcp = TcpListener::bind((addr, 53));
        if udp.is_ok() && tcp.is_ok() {
            return Ok(addr);
        }
    }
    bail!("no loopback address in 127.53.0.0/16 with a free port 53 (are you root?)")
}

/// Wait until something accepts TCP connections on `addr`:53.
fn wait_for_dns_port(proc: &mut Proc, addr: Ipv4Addr, what: &str) -> Result<()> {
    let sa = SocketAddr::from((addr, 53));
    let t0 = Instant::now();
    loop {
        if TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if !proc.is_running() || t0.elapsed() > Duration::from_secs(15) {
            bail!(
                "{what} did not start listening on {addr}:53 (running: {}); its output:\n{}",
                proc.is_running(),
                proc.log()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ------------------------------------------------------------------ dnsmasq

/// One query dnsmasq logged (`query[A] NAME from ADDR`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedQuery {
    pub qtype: String,
    pub name: String,
    pub from: String,
}

/// dnsmasq (apt `dnsmasq-base`) on `ADDR:53`, UDP and TCP, answering only
/// from its own records: [`WWW`], [`API`], [`host`]`(0..HOSTS)`, and
/// NXDOMAIN for anything else under `.test`. No cache (`--cache-size=0`), no
/// upstream, every query logged.
pub struct Dnsmasq {
    proc: Proc,
    addr: Ipv4Addr,
}

impl Dnsmasq {
    pub fn start() -> Result<Dnsmasq> {
        Self::start_with(&[])
    }

    /// With extra host records.
    pub fn start_with(extra: &[(&str, Ipv4Addr)]) -> Result<Dnsmasq> {
        if !Path::new(DNSMASQ).is_file() {
            bail!("{DNSMASQ} is missing: install dnsmasq-base (`cargo xtask setup --test-deps`)");
        }
        let addr = free_dns_addr()?;
        let mut cmd = Command::new(DNSMASQ);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--port=53",
            "--cache-size=0",
            "--local=/test/",
            "--log-queries",
            "--log-facility=-",
            "--pid-file=",
            "--user=root",
        ])
        .arg(format!("--listen-address={addr}"))
        .arg(format!("--host-record={WWW},{TARGET_ADDR}"))
        .arg(format!("--host-record={API},{API_ADDR}"));
        for i in 0..HOSTS {
            cmd.arg(format!("--host-record={},{TARGET_ADDR}", host(i)));
        }
        for (name, a) in extra {
            cmd.arg(format!("--host-record={name},{a}"));
        }
        let mut proc = Proc::spawn_with(
            "dnsmasq",
            &mut cmd,
            StopWith {
                signal: libc::SIGTERM,
                grace: Duration::from_secs(3),
            },
        )?;
        wait_for_dns_port(&mut proc, addr, "dnsmasq")?;
        Ok(Dnsmasq { proc, addr })
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Everything dnsmasq printed (its query log).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The queries it logged so far.
    pub fn queries(&self) -> Vec<LoggedQuery> {
        self.proc
            .output()
            .lines()
            .iter()
            .filter_map(|l| parse_query_line(l))
            .collect()
    }

    pub fn check_running(&mut self) -> Result<()> {
        if let Some(st) = self.proc.try_status() {
            bail!("dnsmasq exited ({st}); its output:\n{}", self.log());
        }
        Ok(())
    }
}

/// `dnsmasq[123]: query[AAAA] www.example.test from 127.0.0.1`
fn parse_query_line(l: &str) -> Option<LoggedQuery> {
    let rest = &l[l.find("query[")? + "query[".len()..];
    let (qtype, rest) = rest.split_once("] ")?;
    let (name, from) = rest.split_once(" from ")?;
    Some(LoggedQuery {
        qtype: qtype.to_string(),
        name: name.to_string(),
        from: from.trim().to_string(),
    })
}

// ------------------------------------------------------------------ resolv.conf and clients

/// A resolv.conf of the test's own (in a temp dir, removed on drop).
pub struct ResolvConf {
    _dir: TempDir,
    path: PathBuf,
    text: String,
}

impl ResolvConf {
    /// `nameserver` lines in order, then `options OPTIONS...` if any
    /// (e.g. `timeout:1`, `attempts:2`). No `search` line: names are tried as
    /// given (and the host name has no domain to add).
    pub fn new(nameservers: &[Ipv4Addr], options: &[&str]) -> Result<ResolvConf> {
        let dir = TempDir::new("resolv")?;
        let path = dir.join("resolv.conf");
        let mut text = String::new();
        for ns in nameservers {
            text.push_str(&format!("nameserver {ns}\n"));
        }
        if !options.is_empty() {
            text.push_str(&format!("options {}\n", options.join(" ")));
        }
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        Ok(ResolvConf {
            _dir: dir,
            path,
            text,
        })
    }

    /// One nameserver, glibc's default timeouts.
    pub fn via(ns: Ipv4Addr) -> Result<ResolvConf> {
        Self::new(&[ns], &[])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

/// `unshare -m sh -c 'mount --bind RESOLV /etc/resolv.conf && exec ARGV...'`:
/// run an unmodified client that resolves names through `resolv_conf`
/// without touching the machine's `/etc/resolv.conf` (the mount is private to
/// the new mount namespace). The process keeps one pid from unshare to the
/// client. Proxy variables are removed.
pub fn resolving_via(resolv_conf: &Path, argv: &[&str]) -> Command {
    let mut cmd = Command::new(UNSHARE);
    cmd.args(["--mount", "--propagation", "private", SH, "-c"])
        .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
        .arg(resolv_conf)
        .args(argv);
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "no_proxy",
        "NO_PROXY",
        "NODE_OPTIONS",
        "LOCALDOMAIN",
        "RES_OPTIONS",
        "HOSTALIASES",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

fn check_tools(argv0: &str) -> Result<()> {
    for b in [UNSHARE, SH, argv0] {
        if !Path::new(b).is_file() {
            bail!(
                "{b} is missing (util-linux, dash, or the client itself): `cargo xtask setup --test-deps`"
            );
        }
    }
    Ok(())
}

/// Run `argv` through [`resolving_via`] to completion, whatever its exit code.
pub fn run_via(
    name: &str,
    resolv: &ResolvConf,
    argv: &[&str],
    timeout: Duration,
) -> Result<Finished> {
    check_tools(argv[0])?;
    let mut cmd = resolving_via(resolv.path(), argv);
    run_capture(name, &mut cmd, timeout)
}

/// `getent DB NAME` (DB `hosts`: gethostbyname2; `ahosts`: getaddrinfo),
/// whatever its exit code (2: not found).
pub fn getent_via(resolv: &ResolvConf, db: &str, name: &str) -> Result<Finished> {
    run_via(
        "getent",
        resolv,
        &[GETENT, db, name],
        Duration::from_secs(30),
    )
}

/// Debian's Python running `script` with `args`, through [`resolving_via`];
/// must exit 0.
pub fn python_via(resolv: &ResolvConf, script: &str, args: &[&str]) -> Result<Finished> {
    let py = crate::system_python()?;
    let mut argv = vec![py, "-c", script];
    argv.extend_from_slice(args);
    run_via("python3", resolv, &argv, Duration::from_secs(60))?
        .ok()
        .context("python script through the test resolv.conf")
}

/// `node -e SCRIPT ARGS...` through [`resolving_via`]; must exit 0.
/// `process.argv[1..]` are the args (node -e puts no script path there).
pub fn node_via(resolv: &ResolvConf, script: &str, args: &[&str]) -> Result<Finished> {
    let node = crate::node::NODE;
    let mut argv = vec![node, "-e", script];
    argv.extend_from_slice(args);
    run_via("node", resolv, &argv, Duration::from_secs(60))?
        .ok()
        .context("node script through the test resolv.conf")
}

const GAI_PY: &str = r#"
import socket, sys, time
t0 = time.monotonic()
try:
    infos = socket.getaddrinfo(sys.argv[1], 80, proto=socket.IPPROTO_TCP)
    print("addrs", " ".join(sorted({i[4][0] for i in infos})), flush=True)
except socket.gaierror as e:
    print("gaierror", e.errno, flush=True)
print("elapsed_ms", (time.monotonic() - t0) * 1000.0, flush=True)
"#;

/// What one `socket.getaddrinfo(NAME, 80)` in Debian's Python returned.
#[derive(Clone, Debug)]
pub struct GaiRun {
    pub pid: u32,
    /// The addresses returned (empty on error).
    pub addrs: Vec<String>,
    /// `socket.gaierror.errno` (e.g. -2 = EAI_NONAME), if it failed.
    pub error: Option<i32>,
    /// Time spent in the call, measured by Python.
    pub elapsed_ms: f64,
}

/// One `socket.getaddrinfo(name, 80, proto=TCP)` (AF_UNSPEC: glibc asks A
/// and AAAA) from a Python process resolving through `resolv`.
pub fn python_getaddrinfo(resolv: &ResolvConf, name: &str) -> Result<GaiRun> {
    let f = python_via(resolv, GAI_PY, &[name])?;
    let field = |k: &str| {
        f.stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
    };
    let elapsed_ms = field("elapsed_ms ")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no elapsed_ms in {:?}", f.stdout))?;
    Ok(GaiRun {
        pid: f.pid,
        addrs: field("addrs ")
            .map(|a| a.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
        error: field("gaierror ").and_then(|v| v.parse().ok()),
        elapsed_ms,
    })
}

// ------------------------------------------------------------------ curl with its own timings

const CURL_MARK: &str = "periscope-curl-dns:";

/// What curl reported for one URL (`--write-out`), seconds since the
/// transfer started.
#[derive(Clone, Debug)]
pub struct CurlTimes {
    pub url: String,
    pub http_code: u16,
    pub time_namelookup: f64,
    pub time_connect: f64,
    /// TLS handshake done (0 for plain HTTP).
    pub time_appconnect: f64,
    pub time_pretransfer: f64,
    pub time_starttransfer: f64,
    pub time_total: f64,
    pub num_connects: u32,
    pub local_port: u16,
}

#[derive(Clone, Debug)]
pub struct CurlDnsRun {
    pub pid: u32,
    pub transfers: Vec<CurlTimes>,
    pub stderr: String,
}

/// One curl (`--http1.1`, bodies discarded) fetching `urls` in order on one
/// connection when it can, resolving through `resolv`. `extra` goes before the
/// URLs (e.g. `-k`). Fails unless curl exits 0.
pub fn curl_via(resolv: &ResolvConf, urls: &[String], extra: &[&str]) -> Result<CurlDnsRun> {
    let write_out = format!(
        "{CURL_MARK} %{{http_code}} %{{time_namelookup}} %{{time_connect}} %{{time_appconnect}} %{{time_pretransfer}} %{{time_starttransfer}} %{{time_total}} %{{num_connects}} %{{local_port}} %{{url_effective}}\\n"
    );
    let mut argv: Vec<&str> = vec![
        crate::clients::CURL,
        "-sS",
        "--http1.1",
        "--noproxy",
        "*",
        "--max-time",
        "20",
        "--write-out",
        &write_out,
    ];
    argv.extend_from_slice(extra);
    for u in urls {
        argv.extend(["-o", "/dev/null", u.as_str()]);
    }
    let f = run_via("curl", resolv, &argv, Duration::from_secs(40))?
        .ok()
        .context("curl through the test resolv.conf")?;
    let transfers = parse_curl_times(&f.stdout)?;
    if transfers.len() != urls.len() {
        bail!(
            "curl reported {} transfers for {} URLs:\n{}\n{}",
            transfers.len(),
            urls.len(),
            f.stdout,
            f.stderr
        );
    }
    Ok(CurlDnsRun {
        pid: f.pid,
        transfers,
        stderr: f.stderr,
    })
}

/// Shorthand: one URL.
pub fn curl1_via(resolv: &ResolvConf, url: &str, extra: &[&str]) -> Result<(u32, CurlTimes)> {
    let r = curl_via(resolv, &[url.to_string()], extra)?;
    Ok((r.pid, r.transfers.into_iter().next().expect("one transfer")))
}

fn parse_curl_times(stdout: &str) -> Result<Vec<CurlTimes>> {
    let mut out = Vec::new();
    for line in stdout.lines() {
        let Some(rest) = line.find(CURL_MARK).map(|i| &line[i + CURL_MARK.len()..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() != 10 {
            bail!("unexpected curl --write-out line {line:?}");
        }
        let secs = |i: usize| -> Result<f64> {
            f[i].parse()
                .with_context(|| format!("field {i} of {line:?}"))
        };
        out.push(CurlTimes {
            http_code: f[0].parse()?,
            time_namelookup: secs(1)?,
            time_connect: secs(2)?,
            time_appconnect: secs(3)?,
            time_pretransfer: secs(4)?,
            time_starttransfer: secs(5)?,
            time_total: secs(6)?,
            num_connects: f[7].parse()?,
            local_port: f[8].parse()?,
            url: f[9].to_string(),
        });
    }
    Ok(out)
}

// ------------------------------------------------------------------ the Python DNS rig

/// A UDP+TCP DNS server on `ADDR:53`, in Python (`/usr/bin/python3`):
/// - `forward`: waits `delay_ms`, then forwards each query to the upstream
///   (over UDP) and relays the answer; queries are handled concurrently, so
///   glibc's parallel A and AAAA questions are both delayed by `delay_ms`,
///   not twice. With `drop_first = N` the first N copies of each question
///   (name and type) are dropped (the resolver's retry gets through).
/// - `drop`: reads every query and never answers (a resolver that times out).
/// - `garbage`: answers every datagram with the next of a fixed list of
///   malformed, truncated and compression-looping messages (the query's
///   transaction id patched in), and TCP queries likewise (length-prefixed,
///   one of them cut short).
///
/// It prints `ready`, then one line per event: `query NAME TYPE from
/// ADDR:PORT`, `dropped NAME TYPE`, `answered NAME TYPE LEN`, `garbage I LEN`.
const RIG_PY: &str = r#"
import argparse, socket, struct, sys, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("--listen", required=True)
ap.add_argument("--mode", choices=["forward", "drop", "garbage"], required=True)
ap.add_argument("--upstream", default="")
ap.add_argument("--delay-ms", type=float, default=0.0)
ap.add_argument("--drop-first", type=int, default=0)
a = ap.parse_args()

out_lock = threading.Lock()
def log(*parts):
    with out_lock:
        print(*parts, flush=True)

def question(q):
    """(name, type, raw question bytes) of a query, or None."""
    try:
        i, labels = 12, []
        while q[i]:
            n = q[i]
            if n >= 64 or i + 1 + n > len(q):
                return None
            labels.append(q[i + 1:i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        if i + 5 > len(q):
            return None
        qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
        return ".".join(labels), qtype, bytes(q[12:i + 5])
    except Exception:
        return None

TYPES = {1: "A", 28: "AAAA", 12: "PTR", 5: "CNAME", 16: "TXT"}
def describe(q):
    qs = question(q)
    return ("%s %s" % (qs[0], TYPES.get(qs[1], qs[1]))) if qs else ("? ?(len %d)" % len(q))

def garbage_list(q):
    tid = bytes(q[:2]) if len(q) >= 2 else b"\x12\x34"
    qs = question(q)
    qraw = qs[2] if qs else b"\x01a\x04test\x00\x00\x01\x00\x01"
    def hdr(qd, an):
        return tid + struct.pack(">HHHHH", 0x8180, qd, an, 0, 0)
    x = 12 + len(qraw)           # where the answer's name starts
    a_tail = struct.pack(">HHIH", 1, 1, 60, 4) + bytes([127, 0, 0, 1])
    return [
        # header promising a question and an answer, and nothing else
        hdr(1, 1),
        # answer name: a compression pointer to itself
        hdr(1, 1) + qraw + struct.pack(">H", 0xC000 | x) + a_tail,
        # question name: a pointer to itself (offset 12)
        hdr(1, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01",
        # two pointers pointing at each other
        hdr(1, 1) + qraw + struct.pack(">HH", 0xC000 | (x + 2), 0xC000 | x) + a_tail,
        # a label longer than the rest of the packet
        hdr(1, 0) + b"\x3fabc",
        # answer rdlength beyond the end of the packet
        hdr(1, 1) + qraw + b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 200) + bytes([127, 0, 0, 1]),
        # an A record with 3 bytes of address
        hdr(1, 1) + qraw + b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 3) + bytes([127, 0, 0]),
        # a pointer past the end of the packet
        hdr(1, 1) + qraw + b"\xff\xff" + a_tail,
        # a name of 5 x 63-byte labels (over 255 bytes)
        hdr(1, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01",
        # noise with the transaction id
        tid + bytes((i * 37 + 11) % 256 for i in range(46)),
        # one byte
        b"\x81",
    ]

udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((a.listen, 53))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((a.listen, 53))
tcp.listen(64)

seen = {}
seen_lock = threading.Lock()
counter = [0]

def should_drop(q):
    if a.mode == "drop":
        return True
    if a.drop_first <= 0:
        return False
    qs = question(q)
    key = (qs[0], qs[1]) if qs else bytes(q[2:])
    with seen_lock:
        seen[key] = seen.get(key, 0) + 1
        return seen[key] <= a.drop_first

def upstream(q):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    try:
        u.sendto(q, (a.upstream, 53))
        return u.recv(65535)
    finally:
        u.close()

def next_garbage(q):
    with seen_lock:
        i = counter[0]
        counter[0] += 1
    g = garbage_list(q)
    return i % len(g), g[i % len(g)]

def handle_udp(q, client):
    try:
        if a.mode == "garbage":
            i, g = next_garbage(q)
            udp.sendto(g, client)
            log("garbage", i, len(g))
            return
        if should_drop(q):
            log("dropped", describe(q))
            return
        if a.delay_ms > 0:
            time.sleep(a.delay_ms / 1000.0)
        r = upstream(q)
        udp.sendto(r, client)
        log("answered", describe(q), len(r))
    except Exception as e:
        log("error", repr(e))

def read_exact(c, n):
    b = b""
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d:
            return None
        b += d
    return b

def handle_tcp(c, client):
    try:
        while True:
            h = read_exact(c, 2)
            if h is None:
                return
            q = read_exact(c, struct.unpack(">H", h)[0])
            if q is None:
                return
            log("query", describe(q), "from %s:%d" % client, "tcp")
            if a.mode == "garbage":
                i, g = next_garbage(q)
                if i % 2 == 0:
                    # length prefix promising more than follows, then close
                    c.sendall(struct.pack(">H", len(g) + 100) + g)
                    log("garbage-tcp-cut", i, len(g))
                    return
                c.sendall(struct.pack(">H", len(g)) + g)
                log("garbage-tcp", i, len(g))
                continue
            if should_drop(q):
                log("dropped", describe(q))
                continue
            if a.delay_ms > 0:
                time.sleep(a.delay_ms / 1000.0)
            r = upstream(q)
            c.sendall(struct.pack(">H", len(r)) + r)
            log("answered", describe(q), len(r), "tcp")
    except Exception as e:
        log("error", repr(e))
    finally:
        c.close()

def tcp_loop():
    while True:
        c, client = tcp.accept()
        threading.Thread(target=handle_tcp, args=(c, client), daemon=True).start()

threading.Thread(target=tcp_loop, daemon=True).start()
log("ready")
while True:
    q, client = udp.recvfrom(65535)
    log("query", describe(q), "from %s:%d" % client)
    threading.Thread(target=handle_udp, args=(q, client), daemon=True).start()
"#;

/// What a [`DnsRig`] does with queries.
#[derive(Clone, Debug)]
pub enum RigMode {
    /// Forward to `upstream`:53 after `delay`, dropping the first
    /// `drop_first` copies of each question.
    Forward {
        upstream: Ipv4Addr,
        delay: Duration,
        drop_first: u32,
    },
    /// Never answer.
    Drop,
    /// Answer malformed messages.
    Garbage,
}

/// The Python DNS server of [`RIG_PY`] on a loopback address of its own.
pub struct DnsRig {
    proc: Proc,
    addr: Ipv4Addr,
    _dir: TempDir,
}

impl DnsRig {
    pub fn start(mode: RigMode) -> Result<DnsRig> {
        let py = crate::system_python()?;
        let addr = free_dns_addr()?;
        let dir = TempDir::new("dnsrig")?;
        let script = dir.join("dnsrig.py");
        std::fs::write(&script, RIG_PY)?;
        let mut cmd = Command::new(py);
        cmd.arg("-u")
            .arg(&script)
            .args(["--listen", &addr.to_string()]);
        match &mode {
            RigMode::Forward {
                upstream,
                delay,
                drop_first,
            } => {
                cmd.args(["--mode", "forward", "--upstream", &upstream.to_string()])
                    .args(["--delay-ms", &format!("{}", delay.as_secs_f64() * 1e3)])
                    .args(["--drop-first", &drop_first.to_string()]);
            }
            RigMode::Drop => {
                cmd.args(["--mode", "drop"]);
            }
            RigMode::Garbage => {
                cmd.args(["--mode", "garbage"]);
            }
        }
        let mut proc = Proc::spawn_with(
            "dnsrig",
            &mut cmd,
            StopWith {
                signal: libc::SIGKILL,
                grace: Duration::from_secs(1),
            },
        )?;
        proc.wait_for_line("`ready`", Duration::from_secs(15), |l| l == "ready")?;
        wait_for_dns_port(&mut proc, addr, "the DNS rig")?;
        Ok(DnsRig {
            proc,
            addr,
            _dir: dir,
        })
    }

    /// A forwarder in front of `upstream` that delays every answer by `delay`.
    pub fn delaying(upstream: Ipv4Addr, delay: Duration) -> Result<DnsRig> {
        Self::start(RigMode::Forward {
            upstream,
            delay,
            drop_first: 0,
        })
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Lines it printed starting with `word` (`query`, `dropped`, `answered`, `garbage`...).
    pub fn events(&self, word: &str) -> Vec<String> {
        self.proc
            .output()
            .lines()
            .into_iter()
            .filter(|l| l.split_whitespace().next() == Some(word))
            .collect()
    }

    pub fn check_running(&mut self) -> Result<()> {
        if let Some(st) = self.proc.try_status() {
            bail!("the DNS rig exited ({st}); its output:\n{}", self.log());
        }
        Ok(())
    }
}

/// A traced Python client that sends `server`:53 malformed queries over UDP,
/// then well-formed ones (whose answers, from a garbage [`DnsRig`], are
/// malformed), then a few over TCP (one cut short). Prints one line per
/// packet and `done`. Returns its run (exit 0 required).
pub const BAD_CLIENT_PY: &str = r#"
import socket, struct, sys
server = sys.argv[1]
rounds = int(sys.argv[2])

def query(name, qtype=1, tid=0x4242):
    labels = b"".join(bytes([len(l)]) + l.encode() for l in name.split("."))
    return struct.pack(">HHHHHH", tid, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack(">HH", qtype, 1)

bad = [
    b"\x01",                                                   # 1 byte
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00",           # 11 bytes: a short header
    struct.pack(">HHHHHH", 0x1111, 0x0100, 1, 0, 0, 0),        # promises a question, has none
    struct.pack(">HHHHHH", 0x2222, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",  # name points at itself
    struct.pack(">HHHHHH", 0x3333, 0x0100, 1, 0, 0, 0) + b"\x3fshort",                  # label past the end
    struct.pack(">HHHHHH", 0x4444, 0x0100, 1, 0, 0, 0) + (b"\x3f" + b"b" * 63) * 5 + b"\x00\x00\x01\x00\x01",
    bytes((i * 53 + 7) % 256 for i in range(40)),
]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(0.3)
n = 0
for b in bad:
    u.sendto(b, (server, 53)); n += 1
    try:
        r = u.recv(65535); print("bad-query", n, "reply", len(r), flush=True)
    except socket.timeout:
        print("bad-query", n, "no-reply", flush=True)
for i in range(rounds):
    u.sendto(query("bad-%d.test" % i, tid=0x5000 + i), (server, 53)); n += 1
    try:
        r = u.recv(65535); print("query", i, "reply", len(r), flush=True)
    except socket.timeout:
        print("query", i, "no-reply", flush=True)
u.close()
for i in range(4):
    t = socket.create_connection((server, 53), timeout=2)
    t.settimeout(1)
    m = query("tcp-bad-%d.test" % i, tid=0x6000 + i)
    t.sendall(struct.pack(">H", len(m)) + m)
    try:
        r = t.recv(65535); print("tcp", i, "reply", len(r), flush=True)
    except socket.timeout:
        print("tcp", i, "no-reply", flush=True)
    t.close()
# a TCP query cut short: the length promises 100 bytes, 5 follow
t = socket.create_connection((server, 53), timeout=2)
t.sendall(b"\x00\x64hello")
t.close()
print("done", flush=True)
"#;

// ------------------------------------------------------------------ a slow HTTP backend

/// A threading Python HTTP/1.1 server (`/usr/bin/python3`) on 127.0.0.1 whose
/// handler for `/sleep/MS` sleeps MS milliseconds before it answers 200 with
/// a small body (Content-Length, keep-alive). Other paths answer at once.
pub struct SlowHttpServer {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

const SLOW_HTTP_PY: &str = r#"
import http.server, re, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        m = re.match(r"^/sleep/(\d+)$", self.path)
        ms = int(m.group(1)) if m else 0
        if ms:
            time.sleep(ms / 1000.0)
        body = b"slept %d ms\n" % ms
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("listening", flush=True)
srv.serve_forever()
"#;

impl SlowHttpServer {
    pub fn start() -> Result<SlowHttpServer> {
        let py = crate::system_python()?;
        let dir = TempDir::new("slowhttp")?;
        let script = dir.join("slow_http.py");
        std::fs::write(&script, SLOW_HTTP_PY)?;
        let port = free_port();
        let mut cmd = Command::new(py);
        cmd.arg(&script).arg(port.to_string());
        let mut proc = Proc::spawn_with(
            "slow-http",
            &mut cmd,
            StopWith {
                signal: libc::SIGKILL,
                grace: Duration::from_secs(1),
            },
        )?;
        proc.wait_for_line("`listening`", Duration::from_secs(15), |l| l == "listening")?;
        if !crate::proc::wait_for_port(port, Duration::from_secs(10)) {
            bail!(
                "the slow HTTP server does not accept on 127.0.0.1:{port}: {}",
                proc.log()
            );
        }
        Ok(SlowHttpServer {
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

    /// `http://HOST:PORT/sleep/MS`.
    pub fn url(&self, host: &str, sleep: Duration) -> String {
        format!("http://{host}:{}/sleep/{}", self.port, sleep.as_millis())
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}

// ------------------------------------------------------------------ reading spans

/// Attribute naming a phase span's phase.
pub const PHASE_ATTR: &str = "periscope.phase";
/// Client phases in their contract order.
pub const CLIENT_PHASES: [&str; 6] = [
    "dns",
    "connect",
    "tls.handshake",
    "request.send",
    "server",
    "response.receive",
];
/// Server phases in their contract order.
pub const SERVER_PHASES: [&str; 3] = ["request.receive", "handler", "response.send"];

/// The elements of a string-array attribute as Rotel prints it
/// (`Slice(Str(a), Str(b))`); `None` if the value is not a string array.
/// A single string counts as an array of one only if `lenient`... it does
/// not: the contract says array.
pub fn str_array(v: &AttrValue) -> Option<Vec<String>> {
    let AttrValue::Other(raw) = v else {
        return None;
    };
    let inner = raw.strip_prefix("Slice(")?.strip_suffix(')')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    let mut rest = inner;
    loop {
        let r = rest.strip_prefix("Str(")?;
        // Items are `Str(...)` separated by `, `; an item ends at the `)`
        // followed by `, Str(` or by the end.
        match r.find("), Str(") {
            Some(end) => {
                out.push(r[..end].to_string());
                rest = &r[end + 3..];
            }
            None => {
                out.push(r.strip_suffix(')')?.to_string());
                return Some(out);
            }
        }
    }
}

/// `dns.answers` of a span: `Some(addresses)` if it is a string array,
/// `None` if absent or of another type.
pub fn answers(s: &Span) -> Option<Vec<String>> {
    s.attr("dns.answers").and_then(str_array)
}

/// A wire DNS span: kind CLIENT, named `DNS <QTYPE>`.
pub fn is_wire_dns(s: &Span) -> bool {
    s.kind == SpanKind::Client && s.name.starts_with("DNS ")
}

/// Wire DNS spans of process `pid` asking `name`.
pub fn wire_dns_of<'a>(all: &'a [Span], pid: u32, name: &str) -> Vec<&'a Span> {
    let mut v: Vec<&Span> = all
        .iter()
        .filter(|s| {
            is_wire_dns(s) && s.pid() == Some(pid) && s.str_attr("dns.question.name") == Some(name)
        })
        .collect();
    v.sort_by_key(|s| (s.start_ns, s.end_ns));
    v
}

/// Resolver spans (`getaddrinfo` standalone, or `dns` phases) of `pid` for `name`.
pub fn resolver_spans_of<'a>(all: &'a [Span], pid: u32, name: &str) -> Vec<&'a Span> {
    let mut v: Vec<&Span> = all
        .iter()
        .filter(|s| {
            (s.name == "getaddrinfo" || s.name == "dns")
                && s.pid() == Some(pid)
                && s.str_attr("dns.question.name") == Some(name)
        })
        .collect();
    v.sort_by_key(|s| (s.start_ns, s.end_ns));
    v
}

/// Spans whose parent is `parent` (any trace: the caller checks the trace).
pub fn children<'a>(all: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    let mut v: Vec<&Span> = all
        .iter()
        .filter(|s| s.parent_span_id.as_deref() == Some(parent.span_id.as_str()))
        .collect();
    v.sort_by_key(|s| (s.start_ns, s.end_ns));
    v
}

fn phase_rank(name: &str) -> usize {
    CLIENT_PHASES
        .iter()
        .chain(SERVER_PHASES.iter())
        .position(|p| *p == name)
        .unwrap_or(usize::MAX)
}

/// Is this a phase span (by its attribute, or by a phase name)?
pub fn is_phase(s: &Span) -> bool {
    s.attr(PHASE_ATTR).is_some() || phase_rank(&s.name) != usize::MAX
}

/// The phase spans under `parent`, by start time (ties: contract order).
pub fn phases_of<'a>(all: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    let mut v: Vec<&Span> = children(all, parent)
        .into_iter()
        .filter(|s| is_phase(s) && !is_wire_dns(s))
        .collect();
    v.sort_by_key(|s| (s.start_ns, phase_rank(&s.name), s.end_ns));
    v
}

/// The phase named `name` among `phases`.
pub fn phase<'a>(phases: &[&'a Span], name: &str) -> Option<&'a Span> {
    phases.iter().copied().find(|s| s.name == name)
}

/// Duration of the phase `name`, in ms (None if absent).
pub fn phase_ms(phases: &[&Span], name: &str) -> Option<f64> {
    phase(phases, name).map(|s| s.duration_ms())
}

/// How far two phase boundaries that must be equal may differ (rounding in
/// the agent's clock conversion).
pub const TILE_SLACK_NS: i128 = 20_000;

/// The phases under `parent` are exactly `want` (names, in order), each a
/// kind INTERNAL child of `parent` in its trace with `periscope.phase` = its
/// name, and they tile `parent`: the first starts where `parent` starts, each
/// starts where the previous ended (no overlap, no gap), the last ends where
/// `parent` ends, and their durations add up to `parent`'s within 5%.
pub fn expect_phases(e: &mut Expect, what: &str, parent: &Span, phases: &[&Span], want: &[&str]) {
    let got: Vec<&str> = phases.iter().map(|s| s.name.as_str()).collect();
    // On a mismatch, the checks below still run on the phases that are there.
    e.that(got == want, || {
        format!(
            "{what}: phases of {} (by start time) are {got:?}, want {want:?}",
            short(parent)
        )
    });
    for s in phases {
        e.that(s.kind == SpanKind::Internal, || {
            format!(
                "{what}: phase {} has kind {:?}, want Internal",
                short(s),
                s.kind
            )
        });
        let p = s.str_attr(PHASE_ATTR);
        e.that(p == Some(s.name.as_str()), || {
            format!(
                "{what}: phase {}: {PHASE_ATTR} = {:?}, want Str({:?})",
                short(s),
                s.attr(PHASE_ATTR),
                s.name
            )
        });
        e.that(s.trace_id == parent.trace_id, || {
            format!(
                "{what}: phase {} is in trace {}, its parent {} in trace {}",
                short(s),
                s.trace_id,
                short(parent),
                parent.trace_id
            )
        });
        e.that(s.end_ns >= s.start_ns, || {
            format!("{what}: phase {} ends before it starts", short(s))
        });
    }
    if phases.is_empty() {
        return;
    }
    let first = phases[0];
    let last = phases[phases.len() - 1];
    e.that(
        (first.start_ns as i128 - parent.start_ns as i128).abs() <= TILE_SLACK_NS,
        || {
            format!(
                "{what}: first phase {} starts at {}, {:+.3} ms from its parent {} (start {}); want equal",
                first.name,
                first.start_ns,
                (first.start_ns as i128 - parent.start_ns as i128) as f64 / 1e6,
                short(parent),
                parent.start_ns
            )
        },
    );
    e.that(
        (last.end_ns as i128 - parent.end_ns as i128).abs() <= TILE_SLACK_NS,
        || {
            format!(
                "{what}: last phase {} ends at {}, {:+.3} ms from its parent {} (end {}); want equal",
                last.name,
                last.end_ns,
                (last.end_ns as i128 - parent.end_ns as i128) as f64 / 1e6,
                short(parent),
                parent.end_ns
            )
        },
    );
    for w in phases.windows(2) {
        let (a, b) = (w[0], w[1]);
        let gap = b.start_ns as i128 - a.end_ns as i128;
        e.that(gap >= -TILE_SLACK_NS, || {
            format!(
                "{what}: phases overlap: {} ends at {}, {} starts at {} ({:.3} ms earlier)",
                a.name,
                a.end_ns,
                b.name,
                b.start_ns,
                -gap as f64 / 1e6
            )
        });
        e.that(gap <= TILE_SLACK_NS, || {
            format!(
                "{what}: gap of {:.3} ms between phase {} (end {}) and {} (start {}); phases must tile",
                gap as f64 / 1e6,
                a.name,
                a.end_ns,
                b.name,
                b.start_ns
            )
        });
    }
    let sum: f64 = phases.iter().map(|s| s.duration_ms()).sum();
    let total = parent.duration_ms();
    e.that((sum - total).abs() <= 0.05 * total.abs() + 0.001, || {
        format!(
            "{what}: phases add up to {sum:.3} ms, their parent {} lasts {total:.3} ms (want within 5%); phases: {}",
            short(parent),
            phases
                .iter()
                .map(|s| format!("{}={:.3}ms", s.name, s.duration_ms()))
                .collect::<Vec<_>>()
                .join(" ")
        )
    });
}

/// What a wire DNS span must say.
#[derive(Clone, Debug)]
pub struct WireWant<'a> {
    pub name: &'a str,
    /// `A`, `AAAA`.
    pub qtype: &'a str,
    /// `Some("NOERROR")`, `Some("NXDOMAIN")`; `None`: no response (timeout).
    pub rcode: Option<&'a str>,
    /// An address `dns.answers` must contain; `None`: `dns.answers` absent.
    pub answer: Option<&'a str>,
    /// The resolver it was sent to.
    pub server: Ipv4Addr,
    pub transport: &'a str,
}

/// Check one wire DNS span against the contract: kind CLIENT, name
/// `DNS <QTYPE>`, question name and type, response code, answers, transport,
/// server/peer address and port 53, attempts >= 1, and status/error.type.
pub fn expect_wire(e: &mut Expect, s: &Span, w: &WireWant) {
    let want_name = format!("DNS {}", w.qtype);
    e.that(s.name == want_name, || {
        format!("{}: name {:?}, want {want_name:?}", short(s), s.name)
    });
    e.that(s.kind == SpanKind::Client, || {
        format!("{}: kind {:?}, want Client", short(s), s.kind)
    });
    e.attr_str(s, "dns.question.name", w.name);
    e.attr_str(s, "periscope.dns.question.type", w.qtype);
    match w.rcode {
        Some(rc) => e.attr_str(s, "periscope.dns.response_code", rc),
        None => e.attr_absent(s, "periscope.dns.response_code"),
    }
    match w.answer {
        Some(addr) => {
            let got = answers(s);
            e.that(
                got.as_ref().is_some_and(|a| a.iter().any(|x| x == addr)),
                || {
                    format!(
                        "{}: dns.answers = {:?}, want a string array containing {addr:?}",
                        short(s),
                        s.attr("dns.answers")
                    )
                },
            );
        }
        None => e.attr_absent(s, "dns.answers"),
    }
    e.attr_str(s, "network.transport", w.transport);
    let server = w.server.to_string();
    e.attr_str(s, "server.address", &server);
    e.attr_int(s, "server.port", 53);
    e.attr_str(s, "network.peer.address", &server);
    e.attr_int(s, "network.peer.port", 53);
    let attempts = s.int_attr("periscope.dns.attempts");
    e.that(attempts.is_some_and(|n| n >= 1), || {
        format!(
            "{}: periscope.dns.attempts = {:?}, want an Int >= 1",
            short(s),
            s.attr("periscope.dns.attempts")
        )
    });
    match w.rcode {
        Some("NOERROR") => e.status(s, false),
        Some(rc) => {
            e.status(s, true);
            e.attr_str(s, "error.type", rc);
        }
        None => {
            e.status(s, true);
            e.attr_str(s, "error.type", "timeout");
        }
    }
}

/// Check a resolver span (`getaddrinfo` standalone, or the `dns` phase):
/// kind INTERNAL, `dns.question.name`, `periscope.dns.resolver` =
/// `getaddrinfo`, and either answers containing `answer` or status ERROR with
/// `error.type` = `error` (e.g. `EAI_NONAME`).
pub fn expect_resolver(
    e: &mut Expect,
    s: &Span,
    span_name: &str,
    name: &str,
    answer: Option<&str>,
    error: Option<&str>,
) {
    e.that(s.name == span_name, || {
        format!("{}: name {:?}, want {span_name:?}", short(s), s.name)
    });
    e.that(s.kind == SpanKind::Internal, || {
        format!("{}: kind {:?}, want Internal", short(s), s.kind)
    });
    e.attr_str(s, "dns.question.name", name);
    e.attr_str(s, "periscope.dns.resolver", "getaddrinfo");
    if let Some(addr) = answer {
        let got = answers(s);
        e.that(
            got.as_ref().is_some_and(|a| a.iter().any(|x| x == addr)),
            || {
                format!(
                    "{}: dns.answers = {:?}, want a string array containing {addr:?}",
                    short(s),
                    s.attr("dns.answers")
                )
            },
        );
    }
    match error {
        Some(err) => {
            e.status(s, true);
            e.attr_str(s, "error.type", err);
        }
        None => e.status(s, false),
    }
}

/// `child` is a child of `parent`: same trace, parent span id.
pub fn expect_child_of(e: &mut Expect, child: &Span, parent: &Span) {
    e.that(
        child.trace_id == parent.trace_id
            && child.parent_span_id.as_deref() == Some(parent.span_id.as_str()),
        || {
            format!(
                "{} (trace {}, parent {:?}) should be a child of {} (trace {}, span {})",
                short(child),
                child.trace_id,
                child.parent_span_id,
                short(parent),
                parent.trace_id,
                parent.span_id
            )
        },
    );
}

/// Error status (for messages).
pub fn is_error(s: &Span) -> bool {
    s.status.code == StatusCode::Error
}

/// One line naming a span, for messages.
pub fn short(s: &Span) -> String {
    format!(
        "{:?} {:?} span {} [{} pid {}] {:.3}ms",
        s.kind,
        s.name,
        s.span_id,
        s.service_name().unwrap_or("?"),
        s.pid().map(|p| p.to_string()).unwrap_or("?".into()),
        s.duration_ms()
    )
}

/// Wait until `pred` holds for at least `min_count` spans or `timeout`
/// passes, and return every span received (never fails: the checks that
/// follow report what is missing, with the spans).
pub fn settle(
    rotel: &Rotel,
    pred: impl Fn(&Span) -> bool,
    min_count: usize,
    timeout: Duration,
) -> Vec<Span> {
    let deadline = Instant::now() + timeout;
    loop {
        let all = rotel.spans();
        if all.iter().filter(|s| pred(s)).count() >= min_count || Instant::now() >= deadline {
            // Let the rest of a batch in flight arrive.
            std::thread::sleep(Duration::from_millis(300));
            return rotel.spans();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The median of some values (the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_string_arrays_as_rotel_prints_them() {
        let v = AttrValue::parse("Slice(Str(127.0.0.1), Str(::1))");
        assert_eq!(str_array(&v), Some(vec!["127.0.0.1".into(), "::1".into()]));
        assert_eq!(
            str_array(&AttrValue::parse("Slice(Str(x))")),
            Some(vec!["x".into()])
        );
        assert_eq!(str_array(&AttrValue::parse("Slice()")), Some(vec![]));
        assert_eq!(
            str_array(&AttrValue::parse("Slice(Str(a), Str(b (c)), Str(d))")),
            Some(vec!["a".into(), "b (c)".into(), "d".into()])
        );
        assert_eq!(str_array(&AttrValue::parse("Str(127.0.0.1)")), None);
        assert_eq!(str_array(&AttrValue::parse("Slice(Int(1))")), None);
    }

    #[test]
    fn parses_dnsmasq_query_lines() {
        let q = parse_query_line("dnsmasq[11349]: query[AAAA] www.example.test from 127.0.0.1")
            .unwrap();
        assert_eq!(q.qtype, "AAAA");
        assert_eq!(q.name, "www.example.test");
        assert_eq!(q.from, "127.0.0.1");
        assert!(parse_query_line("dnsmasq[1]: config www.example.test is 127.0.0.1").is_none());
    }

    #[test]
    fn parses_curl_write_out() {
        let t = parse_curl_times(
            "periscope-curl-dns: 200 0.001234 0.001500 0.000000 0.001600 0.002000 0.002100 1 40000 http://www.example.test:8080/\n",
        )
        .unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].http_code, 200);
        assert!((t[0].time_namelookup - 0.001234).abs() < 1e-9);
        assert_eq!(t[0].num_connects, 1);
        assert_eq!(t[0].local_port, 40000);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
