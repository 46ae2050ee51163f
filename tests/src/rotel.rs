//! Rotel, a real OTLP receiver (`pip install rotel`), started on free ports;
//! the spans it prints are parsed back into [`Span`]s (see [`crate::span`]).

use crate::proc::{Proc, StopWith, Stream, TempDir, free_port, wait_for_port};
use crate::metrics::{HistogramPoint, MetricsLogParser};
use crate::span::{DebugLogParser, Span, dump};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long the output must have been quiet before the last span printed is
/// taken as complete (Rotel prints a batch in one go; this only guards
/// against reading in the middle of one).
const QUIET: Duration = Duration::from_millis(150);

pub struct Rotel {
    proc: Proc,
    /// Incremental parse of the output: the parser and how many lines it has read.
    parsed: Mutex<(DebugLogParser, usize)>,
    /// The same for the metrics Rotel printed.
    metrics: Mutex<(MetricsLogParser, usize)>,
    grpc_port: u16,
    http_port: u16,
    _dir: TempDir,
}

/// The `rotel-agent` binary inside the `rotel` Python package.
pub fn rotel_agent_path() -> Result<PathBuf> {
    static P: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    P.get_or_init(|| {
        let py = crate::tool_python();
        let out = Command::new(&py)
            .args(["-c", "import rotel,os;print(os.path.dirname(rotel.__file__))"])
            .output()
            .map_err(|e| format!("could not run {py}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`{py} -c 'import rotel'` failed: Rotel is not installed. Run `cargo xtask setup --test-deps` (pip install rotel).\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("rotel-agent");
        if !bin.is_file() {
            return Err(format!("{} is missing from the rotel package", bin.display()));
        }
        Ok(bin)
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

impl Rotel {
    /// Start on free ports.
    pub fn start() -> Result<Rotel> {
        Self::start_on(free_port())
    }

    /// Start with its OTLP/gRPC receiver on `grpc_port` (OTLP/HTTP on a free port).
    pub fn start_on(grpc_port: u16) -> Result<Rotel> {
        let bin = rotel_agent_path()?;
        let http_port = free_port();
        let dir = TempDir::new("rotel")?;
        let mut cmd = Command::new(&bin);
        cmd.arg("start")
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
            .args(["--exporter", "blackhole"])
            .args(["--debug-log", "traces", "--debug-log", "metrics", "--debug-log-verbosity", "detailed"])
            // JSON log lines are easy to tell apart from the span dump.
            .args(["--log-format", "json"])
            .arg("--pid-file")
            .arg(dir.join("rotel.pid"))
            .arg("--log-file")
            .arg(dir.join("rotel.log"))
            .env("NO_COLOR", "1");
        let mut proc = Proc::spawn_with(
            "rotel",
            &mut cmd,
            StopWith {
                signal: libc::SIGINT,
                grace: Duration::from_secs(5),
            },
        )?;
        let t0 = Instant::now();
        while !wait_for_port(grpc_port, Duration::from_millis(100)) {
            if !proc.is_running() || t0.elapsed() > Duration::from_secs(20) {
                bail!(
                    "Rotel did not start listening on 127.0.0.1:{grpc_port} (running: {}); its output:\n{}",
                    proc.is_running(),
                    proc.log()
                );
            }
        }
        Ok(Rotel {
            proc,
            parsed: Mutex::new((DebugLogParser::new(), 0)),
            metrics: Mutex::new((MetricsLogParser::default(), 0)),
            grpc_port,
            http_port,
            _dir: dir,
        })
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// `http://127.0.0.1:PORT`, for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Rotel's whole output (its log and the span dump).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        let mut g = self.parsed.lock().unwrap();
        let (parser, consumed) = &mut *g;
        let (lines, now_consumed, quiet_for) = self.proc.output().since(Stream::Stdout, *consumed);
        *consumed = now_consumed;
        for l in &lines {
            parser.feed(l);
        }
        parser.spans(quiet_for.is_none_or(|q| q >= QUIET))
    }

    /// Every histogram data point received so far (metrics are printed in
    /// one go per request; a point still being read is left for later).
    pub fn histogram_points(&self) -> Vec<HistogramPoint> {
        let mut g = self.metrics.lock().unwrap();
        let (parser, consumed) = &mut *g;
        let (lines, now_consumed, _) = self.proc.output().since(Stream::Stdout, *consumed);
        *consumed = now_consumed;
        for l in &lines {
            parser.feed(l);
        }
        parser.points()
    }

    /// Wait until at least `min_count` received spans satisfy `pred`, and
    /// return those. On timeout, fail with every span received so far.
    pub fn try_wait_for_spans(
        &self,
        pred: impl Fn(&Span) -> bool,
        min_count: usize,
        timeout: Duration,
    ) -> Result<Vec<Span>> {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.spans();
            let hits: Vec<Span> = all.iter().filter(|s| pred(s)).cloned().collect();
            if hits.len() >= min_count {
                return Ok(hits);
            }
            if Instant::now() >= deadline {
                bail!(
                    "waited {timeout:?} for {min_count} matching spans, got {}; matching:\n{}all {} spans received:\n{}",
                    hits.len(),
                    dump(&hits, 50),
                    all.len(),
                    dump(&all, 100)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Like [`Rotel::try_wait_for_spans`], but panics (with every span
    /// received) on timeout.
    pub fn wait_for_spans(
        &self,
        pred: impl Fn(&Span) -> bool,
        min_count: usize,
        timeout: Duration,
    ) -> Vec<Span> {
        match self.try_wait_for_spans(pred, min_count, timeout) {
            Ok(v) => v,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Wait for `settle` more and return every span received: for checks that
    /// something did *not* arrive.
    pub fn spans_after(&self, settle: Duration) -> Vec<Span> {
        std::thread::sleep(settle);
        self.spans()
    }

    /// Fail if Rotel exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(st) = self.proc.try_status() {
            bail!("Rotel exited ({st}); its output:\n{}", self.log());
        }
        Ok(())
    }
}

/// Send spans with the OpenTelemetry Python SDK (a real OTLP exporter).
/// `script_body` runs with `tracer`, `SpanKind`, `Status` and `StatusCode` in
/// scope; the provider is flushed and shut down afterwards.
pub fn send_with_python_sdk(
    endpoint: &str,
    resource: &[(&str, &str)],
    script_body: &str,
) -> Result<()> {
    let res: Vec<String> = resource
        .iter()
        .map(|(k, v)| format!("{k:?}: {v:?}"))
        .collect();
    let script = format!(
        r#"
import sys
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
provider = TracerProvider(resource=Resource.create({{{res}}}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[1], insecure=True)))
tracer = provider.get_tracer("periscope-harness")
{script_body}
provider.force_flush()
provider.shutdown()
"#,
        res = res.join(", ")
    );
    let mut cmd = Command::new(crate::tool_python());
    cmd.args(["-c", &script, endpoint]);
    crate::proc::run_capture("otel-python-sdk", &mut cmd, Duration::from_secs(60))?
        .ok()
        .context("sending spans with the OpenTelemetry Python SDK (pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc; `cargo xtask setup --test-deps` does it)")?;
    Ok(())
}
