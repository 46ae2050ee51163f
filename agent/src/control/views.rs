//! `periscope traces` and `periscope map`: the local view's client side.
//! Asks the daemon over the control socket and draws what it answers (a
//! waterfall or a table in the terminal, or an SVG file).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::client::{EXIT_ERROR, EXIT_OK, SocketArg, exchange};
use super::protocol::{ErrorKind, Request, Response, TracesQuery, TracesResult};
use crate::local_view::model::ServiceMap;
use crate::local_view::{map_view, svg, waterfall};

/// Columns of the waterfall's bar.
const BAR_WIDTH: usize = 40;
/// How often `--follow` asks for new traces.
const FOLLOW_POLL: Duration = Duration::from_millis(500);
/// A trace is printed by `--follow` once it got no span for this long.
const FOLLOW_QUIET_MS: u64 = 1000;

#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct TracesArgs {
    /// Only traces with a span of this service (service.name).
    #[arg(long)]
    pub service: Option<String>,
    /// Only traces at least this long, e.g. 50ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_duration: Option<Duration>,
    /// Only traces with an error.
    #[arg(long)]
    pub errors: bool,
    /// The newest N traces.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub last: usize,
    /// Keep printing traces as they complete (Ctrl-C to stop).
    #[arg(long, conflicts_with = "svg")]
    pub follow: bool,
    /// Write the waterfall as an SVG file instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    #[command(flatten)]
    pub conn: SocketArg,
}

#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct MapArgs {
    /// Write the map as an SVG file instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    #[command(flatten)]
    pub conn: SocketArg,
}

impl TracesArgs {
    pub fn request(&self, after_seq: Option<u64>, quiet_ms: Option<u64>) -> Request {
        Request::Traces(TracesQuery {
            last: Some(self.last),
            service: self.service.clone(),
            min_duration_ms: self.min_duration.map(|d| d.as_secs_f64() * 1e3),
            errors: self.errors,
            after_seq,
            quiet_ms,
        })
    }
}

/// Colours only for a terminal, and never with `NO_COLOR` set.
fn use_color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn write_file(path: &Path, text: &str) -> Result<(), (ErrorKind, String)> {
    std::fs::write(path, text).map_err(|e| {
        (
            ErrorKind::Refused,
            format!("writing {}: {e}", path.display()),
        )
    })
}

/// The text (or SVG) for one `traces` answer.
pub fn render_traces(
    args: &TracesArgs,
    response: Response,
    color: bool,
) -> Result<String, (ErrorKind, String)> {
    let result: TracesResult = response.into_result()?;
    if let Some(path) = &args.svg {
        write_file(path, &svg::traces_svg(&result.traces))?;
        return Ok(format!(
            "wrote {} trace(s) to {}",
            result.traces.len(),
            path.display()
        ));
    }
    if result.kept == 0 {
        return Ok("the daemon keeps no traces (--traces-kept 0)".into());
    }
    if result.traces.is_empty() {
        return Ok("no traces yet".into());
    }
    Ok(result
        .traces
        .iter()
        .map(|t| waterfall::render_trace(t, BAR_WIDTH, color))
        .collect::<Vec<_>>()
        .join("\n"))
}

pub fn render_map(
    args: &MapArgs,
    response: Response,
    color: bool,
) -> Result<String, (ErrorKind, String)> {
    let map: ServiceMap = response.into_result()?;
    if let Some(path) = &args.svg {
        write_file(path, &svg::map_svg(&map))?;
        return Ok(format!(
            "wrote the map ({} edge(s)) to {}",
            map.edges.len(),
            path.display()
        ));
    }
    Ok(map_view::render_map(&map, color))
}

/// `traces --follow`: prints each trace once it is quiet, then again if it
/// grows later; stops on an error talking to the daemon.
pub fn follow(args: &TracesArgs) -> i32 {
    let color = use_color();
    let mut after = 0u64;
    // Traces already there when following starts are shown first.
    loop {
        let response = match exchange(
            &args.conn.socket,
            &args.request(Some(after), Some(FOLLOW_QUIET_MS)),
        ) {
            Ok(r) => r,
            Err((code, message)) => {
                eprintln!("periscope: {message}");
                return code;
            }
        };
        let result: TracesResult = match response.into_result() {
            Ok(r) => r,
            Err((_, message)) => {
                eprintln!("periscope: {message}");
                return EXIT_ERROR;
            }
        };
        let mut out = std::io::stdout().lock();
        for trace in &result.traces {
            after = after.max(trace.updated_seq);
            if writeln!(out, "{}", waterfall::render_trace(trace, BAR_WIDTH, color)).is_err() {
                return EXIT_OK;
            }
        }
        let _ = out.flush();
        drop(out);
        std::thread::sleep(FOLLOW_POLL);
    }
}

pub fn color_for_stdout() -> bool {
    use_color()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_view::model::{SpanView, TraceView, ViewKind};

    fn args() -> TracesArgs {
        TracesArgs {
            service: Some("nginx".into()),
            min_duration: Some(Duration::from_millis(5)),
            errors: true,
            last: 3,
            follow: false,
            svg: None,
            conn: SocketArg {
                socket: "/x".into(),
            },
        }
    }

    #[test]
    fn arguments_become_the_query() {
        let Request::Traces(q) = args().request(Some(7), None) else {
            panic!()
        };
        assert_eq!(q.last, Some(3));
        assert_eq!(q.service.as_deref(), Some("nginx"));
        assert_eq!(q.min_duration_ms, Some(5.0));
        assert!(q.errors);
        assert_eq!(q.after_seq, Some(7));
    }

    #[test]
    fn answers_are_drawn_or_written() {
        let trace = TraceView {
            trace_id: "ab".repeat(16),
            updated_seq: 1,
            spans: vec![SpanView {
                span_id: "01".repeat(8),
                parent_span_id: None,
                name: "GET".into(),
                label: "GET /chain".into(),
                service: "nginx".into(),
                pid: 1,
                kind: ViewKind::Server,
                start_unix_nano: 1_000,
                end_unix_nano: 2_000_000,
                status: "200".into(),
                error: false,
            }],
        };
        let response = || {
            Response::ok(&TracesResult {
                kept: 200,
                traces: vec![trace.clone()],
            })
        };
        let text = render_traces(&args(), response(), false).unwrap();
        assert!(
            text.contains("GET /chain") && text.contains("nginx"),
            "{text}"
        );
        let dir = std::env::temp_dir().join(format!("periscope-views-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = args();
        a.svg = Some(dir.join("t.svg"));
        let said = render_traces(&a, response(), false).unwrap();
        assert!(said.contains("wrote 1 trace"), "{said}");
        assert!(
            std::fs::read_to_string(dir.join("t.svg"))
                .unwrap()
                .contains("GET /chain")
        );
        let empty = render_traces(
            &args(),
            Response::ok(&TracesResult {
                kept: 0,
                traces: vec![],
            }),
            false,
        )
        .unwrap();
        assert!(empty.contains("keeps no traces"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
