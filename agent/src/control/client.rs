//! `periscope status|enable|disable|filter|sample|traces|map`: the client side of the
//! control socket (blocking I/O, no runtime needed).

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::views::{MapArgs, TracesArgs};
use super::protocol::{
    ErrorKind, Feature, FeatureChange, Filter, FilterChange, Request, Response, SampleChange, StatusReport, TlsState,
};

pub const EXIT_OK: i32 = 0;
/// The daemon refused the request or reported an error.
pub const EXIT_ERROR: i32 = 1;
/// Bad command line (clap exits with this code on its own).
#[allow(dead_code)] // documents the code clap uses; checked by the tests
pub const EXIT_USAGE: i32 = 2;
/// No daemon answers on the socket.
pub const EXIT_UNREACHABLE: i32 = 3;
/// Not allowed to talk to the daemon (not root).
pub const EXIT_PERMISSION: i32 = 4;

/// How long the client waits for the daemon's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct SocketArg {
    /// Control socket of the running daemon.
    #[arg(long, value_name = "PATH", default_value = super::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// The control subcommands, flattened into the top-level `periscope` CLI.
#[derive(clap::Subcommand, Clone, Debug, PartialEq)]
pub enum ControlCommand {
    /// Show the running daemon's state: probes, TLS libraries, processes, counters, exporter.
    Status {
        /// Print the raw JSON report.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: SocketArg,
    },
    /// Turn a feature on: http, tls, dns, grpc, phases.
    Enable {
        #[arg(value_name = "FEATURE")]
        feature: Feature,
        #[command(flatten)]
        conn: SocketArg,
    },
    /// Turn a feature off: http, tls, dns, grpc.
    Disable {
        #[arg(value_name = "FEATURE")]
        feature: Feature,
        #[command(flatten)]
        conn: SocketArg,
    },
    /// Trace only / never trace some processes or connections; without options, show the filter.
    ///
    /// The options given replace the whole filter. Exclusions win; a process
    /// is included when its pid or its executable is listed (either), and
    /// --port and --cgroup, when given, must match as well.
    Filter(FilterArgs),
    /// Head sampling: keep this fraction of traces (0.0 to 1.0).
    Sample {
        #[arg(value_name = "RATIO", value_parser = parse_ratio)]
        ratio: f64,
        #[command(flatten)]
        conn: SocketArg,
    },
    /// Recent traces as a time-aligned waterfall (or an SVG file).
    Traces(TracesArgs),
    /// The service map seen on this node: caller -> callee with rate, errors, p50 and p99.
    Map(MapArgs),
}

#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct FilterArgs {
    /// Trace only this process (repeatable).
    #[arg(long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,
    /// Never trace this process (repeatable).
    #[arg(long = "exclude-pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub exclude_pids: Vec<u32>,
    /// Trace only this executable: base name or full path (repeatable).
    #[arg(long = "exe", value_name = "NAME")]
    pub exes: Vec<String>,
    /// Never trace this executable (repeatable).
    #[arg(long = "exclude-exe", value_name = "NAME")]
    pub exclude_exes: Vec<String>,
    /// Trace only connections with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,
    /// Never trace connections with this port (repeatable).
    #[arg(long = "exclude-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub exclude_ports: Vec<u16>,
    /// Trace only processes in this cgroup v2 path or below, e.g. /system.slice/nginx.service (repeatable).
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<String>,
    /// Remove the filter: trace everything.
    #[arg(long, conflicts_with_all = ["pids", "exclude_pids", "exes", "exclude_exes", "ports", "exclude_ports", "cgroups"])]
    pub clear: bool,
    #[command(flatten)]
    pub conn: SocketArg,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{r} is outside 0.0..=1.0"))
    }
}

impl ControlCommand {
    pub fn socket(&self) -> &Path {
        match self {
            ControlCommand::Status { conn, .. }
            | ControlCommand::Enable { conn, .. }
            | ControlCommand::Disable { conn, .. }
            | ControlCommand::Sample { conn, .. }
            | ControlCommand::Filter(FilterArgs { conn, .. })
            | ControlCommand::Traces(TracesArgs { conn, .. })
            | ControlCommand::Map(MapArgs { conn, .. }) => &conn.socket,
        }
    }

    pub fn request(&self) -> Request {
        match self {
            ControlCommand::Status { .. } => Request::Status,
            ControlCommand::Enable { feature, .. } => Request::Enable { feature: *feature },
            ControlCommand::Disable { feature, .. } => Request::Disable { feature: *feature },
            ControlCommand::Sample { ratio, .. } => Request::Sample { ratio: *ratio },
            ControlCommand::Traces(a) => a.request(None, None),
            ControlCommand::Map(_) => Request::Map,
            ControlCommand::Filter(a) => {
                let filter = Filter {
                    include_pids: a.pids.clone(),
                    exclude_pids: a.exclude_pids.clone(),
                    include_exes: a.exes.clone(),
                    exclude_exes: a.exclude_exes.clone(),
                    include_ports: a.ports.clone(),
                    exclude_ports: a.exclude_ports.clone(),
                    include_cgroups: a.cgroups.clone(),
                };
                if a.clear {
                    Request::Filter { set: None, clear: true }
                } else if filter.is_empty() {
                    Request::Filter {
                        set: None,
                        clear: false,
                    }
                } else {
                    Request::Filter {
                        set: Some(filter),
                        clear: false,
                    }
                }
            }
        }
    }
}

/// Runs `cmd` against the daemon at `socket`, prints the outcome, returns the exit code.
pub fn run_client(socket: &Path, cmd: &ControlCommand) -> i32 {
    if let ControlCommand::Traces(a @ TracesArgs { follow: true, .. }) = cmd {
        return super::views::follow(a);
    }
    let response = match exchange(socket, &cmd.request()) {
        Ok(r) => r,
        Err((code, message)) => {
            eprintln!("periscope: {message}");
            return code;
        }
    };
    match render(cmd, response) {
        Ok(text) => {
            println!("{}", text.trim_end());
            EXIT_OK
        }
        Err((kind, message)) => {
            eprintln!("periscope: {message}");
            if kind == ErrorKind::PermissionDenied {
                EXIT_PERMISSION
            } else {
                EXIT_ERROR
            }
        }
    }
}

/// [`run_client`] on the command's own `--socket`.
pub fn run(cmd: &ControlCommand) -> i32 {
    run_client(cmd.socket(), cmd)
}

/// What the command prints for a response, or the daemon's error.
pub fn render(cmd: &ControlCommand, response: Response) -> Result<String, (ErrorKind, String)> {
    Ok(match cmd {
        ControlCommand::Status { json: true, .. } => {
            let value: serde_json::Value = response.into_result()?;
            serde_json::to_string_pretty(&value).unwrap_or_default()
        }
        ControlCommand::Status { .. } => render_status(&response.into_result()?),
        ControlCommand::Enable { .. } | ControlCommand::Disable { .. } => {
            response.into_result::<FeatureChange>()?.message
        }
        ControlCommand::Filter(_) => response.into_result::<FilterChange>()?.message,
        ControlCommand::Sample { .. } => response.into_result::<SampleChange>()?.message,
        ControlCommand::Traces(a) => super::views::render_traces(a, response, super::views::color_for_stdout())?,
        ControlCommand::Map(a) => super::views::render_map(a, response, super::views::color_for_stdout())?,
    })
}

/// Sends one request, reads one response. Errors carry the exit code.
pub fn exchange(socket: &Path, request: &Request) -> Result<Response, (i32, String)> {
    let shown = socket.display();
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => (EXIT_UNREACHABLE, format!("periscope daemon is not running (no socket at {shown})")),
        io::ErrorKind::ConnectionRefused => {
            (EXIT_UNREACHABLE, format!("periscope daemon is not running (nothing answers on {shown})"))
        }
        io::ErrorKind::PermissionDenied => (
            EXIT_PERMISSION,
            format!("permission denied on {shown}: the control socket is root-only; run this command as root (e.g. with sudo)"),
        ),
        _ => (EXIT_UNREACHABLE, format!("cannot reach the periscope daemon at {shown}: {e}")),
    })?;
    let io_err = |e: io::Error| {
        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            (
                EXIT_ERROR,
                format!("the daemon did not answer within {}s", ANSWER_TIMEOUT.as_secs()),
            )
        } else {
            (
                EXIT_UNREACHABLE,
                format!("lost the connection to the daemon at {shown}: {e}"),
            )
        }
    };
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT)).map_err(io_err)?;
    let mut line = serde_json::to_string(request).map_err(|e| (EXIT_ERROR, format!("encoding the request: {e}")))?;
    line.push('\n');
    let mut reader = BufReader::new(&stream);
    // A refused peer gets its answer before the daemon reads: on a failed
    // write, still try to read it.
    let written = (&stream).write_all(line.as_bytes());
    let mut answer = String::new();
    match reader.read_line(&mut answer) {
        Ok(0) => {
            written.map_err(io_err)?;
            return Err((
                EXIT_UNREACHABLE,
                format!("the daemon at {shown} closed the connection without answering"),
            ));
        }
        Ok(_) => {}
        Err(e) => return Err(io_err(written.err().unwrap_or(e))),
    }
    serde_json::from_str(&answer).map_err(|e| (EXIT_ERROR, format!("unexpected answer from the daemon: {e}")))
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `1d 02h 03m`, `1h 02m 03s`, `2m 03s`, `42s`.
pub fn human_duration(s: u64) -> String {
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m"),
    }
}

fn short_list(items: &[String], max: usize) -> String {
    if items.len() <= max {
        items.join(", ")
    } else {
        format!("{}, ... (+{} more)", items[..max].join(", "), items.len() - max)
    }
}

/// The human-readable `periscope status`.
pub fn render_status(r: &StatusReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "periscope {} (pid {}), up {}",
        r.version,
        r.pid,
        human_duration(r.uptime_s)
    );
    let kernel: Vec<String> = r
        .kernel
        .iter()
        .map(|k| match &k.note {
            Some(note) => format!("{} {} ({note})", k.name, yes_no(k.available)),
            None => format!("{} {}", k.name, yes_no(k.available)),
        })
        .collect();
    let release = if r.kernel_release.is_empty() {
        String::new()
    } else {
        format!(" {}", r.kernel_release)
    };
    let _ = writeln!(
        o,
        "kernel{release}: {}",
        if kernel.is_empty() {
            "-".into()
        } else {
            kernel.join(", ")
        }
    );

    let _ = writeln!(o, "\nfeatures:");
    for f in Feature::ALL {
        let Some(s) = r.features.get(&f) else {
            let _ = writeln!(o, "  {:<5} unknown", f.as_str());
            continue;
        };
        let state = if s.enabled { "enabled" } else { "disabled" };
        let mut detail = if let Some(why) = &s.unavailable {
            format!("UNAVAILABLE: {why};")
        } else if !s.available {
            "not yet available".to_string()
        } else if s.programs.is_empty() {
            "no programs attached".to_string()
        } else {
            format!("{} program(s): {}", s.programs.len(), short_list(&s.programs, 6))
        };
        if let Some(note) = &s.note {
            let _ = write!(detail, " ({note})");
        }
        let _ = writeln!(o, "  {:<5} {state:<9} {detail}", f.as_str());
    }

    let _ = writeln!(o, "\nTLS libraries:");
    if r.tls_libraries.is_empty() {
        let _ = writeln!(o, "  none found");
    }
    for t in &r.tls_libraries {
        let state = match t.state {
            TlsState::Attached => "attached",
            TlsState::NotVisible => "not visible",
            TlsState::Detached => "detached",
        };
        let mut line = format!("  {state:<11} {:<10} {}", t.library, t.path);
        if !t.symbols.is_empty() {
            let _ = write!(line, " ({})", short_list(&t.symbols, 6));
        }
        if let Some(reason) = &t.reason {
            let _ = write!(line, ": {reason}");
        }
        let _ = writeln!(o, "{line}");
    }

    if !r.go_programs.is_empty() {
        let _ = writeln!(o, "\nGo programs:");
    }
    for g in &r.go_programs {
        let state = match g.state {
            TlsState::Attached => "attached",
            TlsState::NotVisible => "not visible",
            TlsState::Detached => "detached",
        };
        let mut line = format!("  {state:<11} {:<10} {}", g.go_version, g.path);
        if let Some(offsets) = &g.offsets {
            let _ = write!(line, " [offsets: {offsets}]");
        }
        if !g.functions.is_empty() {
            let _ = write!(line, " ({})", short_list(&g.functions, 7));
        }
        if !g.pids.is_empty() {
            let pids: Vec<String> = g.pids.iter().map(u32::to_string).collect();
            let _ = write!(line, " pids {}", short_list(&pids, 5));
        }
        if let Some(grpc) = &g.grpc_go {
            let _ = write!(line, " grpc-go {grpc}");
        }
        if let Some(reason) = &g.reason {
            let _ = write!(line, ": {reason}");
        }
        let _ = writeln!(o, "{line}");
    }

    let _ = writeln!(o, "\ntraced processes ({}):", r.processes.len());
    for p in &r.processes {
        let _ = writeln!(o, "  {:>7}  {:<20} {}", p.pid, p.service_name, p.executable);
    }

    let _ = writeln!(o);
    let _ = writeln!(o, "connections open: {}", r.connections_open);
    let _ = writeln!(o, "filter: {}", r.filter);
    let _ = writeln!(o, "sampling: ratio {}", r.sample_ratio);
    let e = &r.exporter;
    let health = if e.healthy {
        "healthy".to_string()
    } else {
        format!("FAILING: {}", e.last_error.as_deref().unwrap_or("unknown error"))
    };
    let _ = writeln!(
        o,
        "exporter: {} - {health}, queue {}/{}",
        e.destination, e.queued, e.queue_capacity
    );

    let _ = writeln!(o, "\ncounters:");
    let width = r.counters.keys().map(String::len).max().unwrap_or(0);
    for (name, n) in &r.counters {
        let _ = writeln!(o, "  {name:<width$}  {n}");
    }
    let lost: Vec<String> = r
        .lost_per_probe
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(p, n)| format!("{p} {n}"))
        .collect();
    let _ = writeln!(
        o,
        "events lost in kernel: {}",
        if lost.is_empty() {
            "none".into()
        } else {
            lost.join(", ")
        }
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{ExporterStatus, FeatureStatus, KernelFeature, ProcessStatus, TlsLibraryStatus};
    use crate::control::server::tests::{TempDir, fake_handler};
    use clap::Parser;

    #[derive(Parser, Debug)]
    #[command(name = "periscope")]
    struct Cli {
        #[command(subcommand)]
        command: Top,
    }
    #[derive(clap::Subcommand, Debug)]
    enum Top {
        Run,
        #[command(flatten)]
        Control(ControlCommand),
    }

    fn parse(args: &[&str]) -> Result<ControlCommand, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("periscope").chain(args.iter().copied()))?;
        match cli.command {
            Top::Control(c) => Ok(c),
            Top::Run => panic!("run"),
        }
    }

    #[test]
    fn command_line_to_requests() {
        let c = parse(&["status"]).unwrap();
        assert_eq!(c.request(), Request::Status);
        assert_eq!(c.socket(), Path::new("/run/periscope/control.sock"));
        let c = parse(&["status", "--json", "--socket", "/tmp/x.sock"]).unwrap();
        assert_eq!(c.socket(), Path::new("/tmp/x.sock"));
        assert_eq!(
            parse(&["enable", "tls"]).unwrap().request(),
            Request::Enable { feature: Feature::Tls }
        );
        assert_eq!(
            parse(&["disable", "dns"]).unwrap().request(),
            Request::Disable { feature: Feature::Dns }
        );
        assert_eq!(
            parse(&["sample", "0.25"]).unwrap().request(),
            Request::Sample { ratio: 0.25 }
        );
        assert_eq!(
            parse(&["filter"]).unwrap().request(),
            Request::Filter {
                set: None,
                clear: false
            }
        );
        assert_eq!(
            parse(&["filter", "--clear"]).unwrap().request(),
            Request::Filter { set: None, clear: true }
        );
        let c = parse(&[
            "filter",
            "--pid",
            "4",
            "--pid",
            "5",
            "--exclude-exe",
            "sshd",
            "--port",
            "443",
            "--cgroup",
            "/a",
        ]);
        let Request::Filter {
            set: Some(f),
            clear: false,
        } = c.unwrap().request()
        else {
            panic!()
        };
        assert_eq!(f.include_pids, [4, 5]);
        assert_eq!(f.exclude_exes, ["sshd"]);
        assert_eq!(f.include_ports, [443]);
        assert_eq!(f.include_cgroups, ["/a"]);
        // Usage errors: clap exits 2 with its message.
        for bad in [
            &["enable", "ftp"][..],
            &["enable"],
            &["sample", "2"],
            &["sample", "x"],
            &["filter", "--clear", "--pid", "3"],
            &["filter", "--port", "0"],
            &["filter", "--port", "70000"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), EXIT_USAGE, "{bad:?}");
        }
        assert!(
            parse(&["enable", "ftp"])
                .unwrap_err()
                .to_string()
                .contains("unknown feature")
        );
    }

    #[test]
    fn unreachable_daemon_messages_and_codes() {
        let dir = TempDir::new();
        let missing = dir.0.join("none.sock");
        let (code, msg) = exchange(&missing, &Request::Status).unwrap_err();
        assert_eq!(code, EXIT_UNREACHABLE);
        assert_eq!(
            msg,
            format!("periscope daemon is not running (no socket at {})", missing.display())
        );
        let stale = dir.0.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let (code, msg) = exchange(&stale, &Request::Status).unwrap_err();
        assert_eq!(code, EXIT_UNREACHABLE);
        assert!(msg.contains("not running"), "{msg}");
        let cmd = parse(&["status", "--socket", missing.to_str().unwrap()]).unwrap();
        assert_eq!(run(&cmd), EXIT_UNREACHABLE);
    }

    #[test]
    fn client_talks_to_a_server() {
        let dir = TempDir::new();
        let path = dir.0.join("c.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _server = rt
            .block_on(async { crate::control::server::serve(path.clone(), fake_handler()) })
            .unwrap();
        let sock = path.to_str().unwrap();
        let cmd = parse(&["status", "--socket", sock]).unwrap();
        let text = render(&cmd, exchange(&path, &cmd.request()).unwrap()).unwrap();
        assert!(text.starts_with("periscope test (pid 0), up 3s"), "{text}");
        let cmd = parse(&["status", "--json", "--socket", sock]).unwrap();
        let text = render(&cmd, exchange(&path, &cmd.request()).unwrap()).unwrap();
        assert_eq!(serde_json::from_str::<StatusReport>(&text).unwrap().version, "test");
        let cmd = parse(&["enable", "grpc", "--socket", sock]).unwrap();
        let text = render(&cmd, exchange(&path, &cmd.request()).unwrap()).unwrap();
        assert!(text.contains("grpc"), "{text}");
        assert_eq!(run_client(&path, &cmd), EXIT_OK);
        // The fake loop refuses filters: exit 1.
        assert_eq!(run(&parse(&["filter", "--socket", sock]).unwrap()), EXIT_ERROR);
        let denied = Response::error(ErrorKind::PermissionDenied, "permission denied: ...");
        assert_eq!(render(&cmd, denied).unwrap_err().0, ErrorKind::PermissionDenied);
    }

    #[test]
    fn status_rendering() {
        let mut r = StatusReport {
            version: "0.1.0".into(),
            pid: 99,
            uptime_s: 3723,
            kernel_release: "6.8.0".into(),
            kernel: vec![
                KernelFeature {
                    name: "btf".into(),
                    available: true,
                    note: None,
                },
                KernelFeature {
                    name: "kprobes".into(),
                    available: false,
                    note: Some("not used".into()),
                },
            ],
            connections_open: 4,
            sample_ratio: 0.5,
            exporter: ExporterStatus {
                destination: "otlp grpc http://c:4317".into(),
                healthy: false,
                last_error: Some("connection refused".into()),
                queued: 10,
                queue_capacity: 2048,
                ..Default::default()
            },
            ..Default::default()
        };
        r.features.insert(
            Feature::Http,
            FeatureStatus {
                enabled: true,
                available: true,
                programs: vec!["sock_send_length".into()],
                note: None,
                unavailable: None,
            },
        );
        r.features.insert(
            Feature::Dns,
            FeatureStatus {
                enabled: false,
                available: false,
                ..Default::default()
            },
        );
        r.tls_libraries.push(TlsLibraryStatus {
            path: "/usr/lib/libssl.so.3".into(),
            library: "openssl".into(),
            symbols: vec!["SSL_read".into(), "SSL_write".into()],
            state: TlsState::Attached,
            reason: None,
        });
        r.processes.push(ProcessStatus {
            pid: 12,
            service_name: "checkout".into(),
            executable: "/usr/bin/python3".into(),
        });
        r.counters.insert("events_received".into(), 7);
        r.lost_per_probe.insert("sock_send_length".into(), 0);
        r.lost_per_probe.insert("tls_read_write".into(), 3);
        let text = render_status(&r);
        for needle in [
            "periscope 0.1.0 (pid 99), up 1h 02m 03s",
            "kernel 6.8.0: btf yes, kprobes no (not used)",
            "  http  enabled   1 program(s): sock_send_length",
            "  tls   unknown",
            "  dns   disabled  not yet available",
            "  attached    openssl    /usr/lib/libssl.so.3 (SSL_read, SSL_write)",
            "traced processes (1):",
            "     12  checkout             /usr/bin/python3",
            "connections open: 4",
            "filter: none (everything is traced)",
            "sampling: ratio 0.5",
            "exporter: otlp grpc http://c:4317 - FAILING: connection refused, queue 10/2048",
            "  events_received  7",
            "events lost in kernel: tls_read_write 3",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(123), "2m 03s");
        assert_eq!(human_duration(90_061), "1d 01h 01m");
    }
}
