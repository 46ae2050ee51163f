//! Export: the last stage. Spans go into a bounded queue through a
//! [`SpanSink`] (never blocking the event path) and one worker task sends
//! them on, either as OTLP (gRPC or HTTP/protobuf) or as lines on stdout.
//!
//! Counting (see [`crate::stats::Stats`]):
//! - `spans_exported`: spans a backend accepted (or that were written to stdout).
//! - `spans_dropped`: spans refused by a full queue, by a closed sink, by a
//!   non-retryable export error, by a partial-success response, or still
//!   unsent when the shutdown deadline passed.
//! - `export_errors`: failed export attempts, retries included (so it keeps
//!   rising while an endpoint is down).
//!
//! Retrying: retryable failures (gRPC UNAVAILABLE, DEADLINE_EXCEEDED,
//! RESOURCE_EXHAUSTED, ..., HTTP 429/502/503/504, connection errors and
//! timeouts) retry the same batch with exponential backoff (200 ms doubling
//! up to 5 s, or a server's `Retry-After` up to 30 s) for as long as it takes;
//! meanwhile new spans wait in the queue, and those that do not fit are
//! dropped and counted. The exporter logs one warning when it starts failing
//! and one info line when it recovers.

pub mod metrics;
pub mod config;
pub mod otlp;
pub mod stdout;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use config::{Destination, ExportConfig, OutputFormat, Protocol};

use crate::spans::model::{Attribute, Resource, Span};
use crate::stats::Stats;
use otlp::{Accepted, ExportError, GrpcExporter, HttpExporter};

const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// At most one "queue full" / "partial success" warning per this many seconds.
const WARN_INTERVAL_SECS: u64 = 60;

/// The resource's attributes followed by those of `extra` whose keys it
/// does not have: the process's own attributes win.
pub(crate) fn merged_resource<'a>(
    resource: &'a Resource,
    extra: &'a [Attribute],
) -> impl Iterator<Item = &'a Attribute> + 'a {
    resource.attributes.iter().chain(
        extra
            .iter()
            .filter(|e| !resource.attributes.iter().any(|a| a.key == e.key)),
    )
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExporterHealth {
    /// No export has failed since the last success (or since the start).
    Healthy,
    /// Exports have been failing since `since`.
    Failing {
        since: SystemTime,
        last_error: String,
    },
}

/// A snapshot for `periscope status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExporterState {
    /// `stdout (text)`, `otlp grpc http://host:4317`, ...
    pub destination: String,
    pub health: ExporterHealth,
    /// When a batch was last delivered.
    pub last_success: Option<SystemTime>,
    /// Spans waiting in the queue (not counting a batch being sent).
    pub queued: usize,
    pub queue_capacity: usize,
}

struct Shared {
    destination: String,
    health: Mutex<(ExporterHealth, Option<SystemTime>)>,
    /// Unix seconds of the last "queue full" warning.
    last_overflow_warn: AtomicU64,
}

/// Cheap, cloneable handle that feeds the export worker.
#[derive(Clone)]
pub struct SpanSink {
    inner: Arc<SinkInner>,
}

struct SinkInner {
    tx: mpsc::Sender<Span>,
    close: watch::Sender<bool>,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    flush_timeout: Duration,
}

impl SpanSink {
    /// Queues `span` for export. Never blocks or waits: when the queue is
    /// full (or the exporter has shut down) the span is dropped and counted
    /// in `spans_dropped`.
    pub fn submit(&self, span: Span) {
        match self.inner.tx.try_send(span) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                Stats::inc(&self.inner.stats.spans_dropped);
                let now = unix_secs();
                let last = self.inner.shared.last_overflow_warn.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= WARN_INTERVAL_SECS
                    && self
                        .inner
                        .shared
                        .last_overflow_warn
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    log::warn!(
                        "export queue full ({} spans): dropping spans ({} dropped so far)",
                        self.inner.tx.max_capacity(),
                        Stats::get(&self.inner.stats.spans_dropped)
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Stats::inc(&self.inner.stats.spans_dropped)
            }
        }
    }

    pub fn state(&self) -> ExporterState {
        let (health, last_success) = self
            .inner
            .shared
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        ExporterState {
            destination: self.inner.shared.destination.clone(),
            health,
            last_success,
            queued: self.inner.tx.max_capacity() - self.inner.tx.capacity(),
            queue_capacity: self.inner.tx.max_capacity(),
        }
    }

    /// Stops accepting spans (later ones are dropped and counted) and makes
    /// the worker flush what is queued, for at most the flush timeout.
    /// Returns at once; await the worker's `JoinHandle` to wait for it.
    pub fn close(&self) {
        self.inner.close.send_replace(true);
    }

    /// [`Self::close`], then waits for `worker` (the handle [`spawn`]
    /// returned). Spans not delivered in time are counted as dropped. As a
    /// last resort (e.g. stdout blocked), the worker is aborted one second
    /// after the flush timeout.
    pub async fn shutdown(self, worker: JoinHandle<()>) {
        self.close();
        let limit = self.inner.flush_timeout + Duration::from_secs(1);
        let abort = worker.abort_handle();
        if tokio::time::timeout(limit, worker).await.is_err() {
            abort.abort();
            log::warn!("export worker did not finish within {limit:?}; abandoned it");
        }
    }
}

/// Starts the export worker on the current tokio runtime. Dropping every
/// [`SpanSink`] clone has the same effect as [`SpanSink::close`].
pub fn spawn(config: ExportConfig, stats: Arc<Stats>) -> (SpanSink, JoinHandle<()>) {
    spawn_inner(config, stats, None)
}

/// [`spawn`] with the stdout output written to `out` instead (tests).
pub(crate) fn spawn_inner(
    config: ExportConfig,
    stats: Arc<Stats>,
    out: Option<Box<dyn AsyncWrite + Send + Unpin>>,
) -> (SpanSink, JoinHandle<()>) {
    let capacity = config.max_queue_size.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let (close, close_rx) = watch::channel(false);
    let destination = match &config.destination {
        Destination::Stdout(OutputFormat::Text) => "stdout (text)".to_string(),
        Destination::Stdout(OutputFormat::Json) => "stdout (json)".to_string(),
        Destination::Otlp(o) => format!("otlp {} {}", o.protocol.as_str(), o.url),
    };
    let shared = Arc::new(Shared {
        destination,
        health: Mutex::new((ExporterHealth::Healthy, None)),
        last_overflow_warn: AtomicU64::new(0),
    });
    let sink = SpanSink {
        inner: Arc::new(SinkInner {
            tx,
            close,
            stats: stats.clone(),
            shared: shared.clone(),
            flush_timeout: config.flush_timeout,
        }),
    };
    let handle = tokio::spawn(async move {
        let backend = match Backend::new(&config.destination, out) {
            Ok(b) => b,
            Err(e) => {
                // Configuration was validated up front, so this is unexpected;
                // spans will be dropped (and counted) by the closed queue.
                log::error!("cannot start the span exporter: {e:#}");
                return;
            }
        };
        let schedule_delay = match backend {
            Backend::Writer { .. } => Duration::ZERO,
            _ => config.schedule_delay,
        };
        Worker {
            rx,
            close_rx,
            deadline: None,
            backend,
            batch_size: config.max_export_batch_size.clamp(1, capacity),
            schedule_delay,
            flush_timeout: config.flush_timeout,
            extra_resource: config.resource_attributes,
            stats,
            shared,
            last_partial_warn: None,
        }
        .run()
        .await;
    });
    (sink, handle)
}

enum Backend {
    Writer {
        out: Box<dyn AsyncWrite + Send + Unpin>,
        format: OutputFormat,
    },
    Grpc {
        exporter: Box<GrpcExporter>,
        timeout: Duration,
    },
    Http {
        exporter: Box<HttpExporter>,
        timeout: Duration,
    },
}

enum Payload {
    Lines(Vec<u8>),
    Request(opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest),
    Encoded(Bytes),
}

impl Backend {
    fn new(
        dest: &Destination,
        out: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    ) -> anyhow::Result<Self> {
        Ok(match dest {
            Destination::Stdout(format) => Backend::Writer {
                out: out.unwrap_or_else(|| Box::new(tokio::io::stdout())),
                format: *format,
            },
            Destination::Otlp(o) => match o.protocol {
                Protocol::Grpc => Backend::Grpc {
                    exporter: Box::new(GrpcExporter::new(o)?),
                    timeout: o.timeout,
                },
                Protocol::HttpProtobuf => Backend::Http {
                    exporter: Box::new(HttpExporter::new(o)?),
                    timeout: o.timeout,
                },
            },
        })
    }

    fn prepare(&self, batch: Vec<Span>, extra_resource: &[Attribute]) -> Payload {
        match self {
            Backend::Writer { format, .. } => {
                let mut buf = Vec::with_capacity(batch.len() * 256);
                for span in &batch {
                    let line = match format {
                        OutputFormat::Text => stdout::format_text(span),
                        OutputFormat::Json => stdout::format_json(span, extra_resource),
                    };
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                }
                Payload::Lines(buf)
            }
            Backend::Grpc { .. } => {
                Payload::Request(otlp::to_export_request(batch, extra_resource))
            }
            Backend::Http { .. } => {
                use prost::Message;
                Payload::Encoded(
                    otlp::to_export_request(batch, extra_resource)
                        .encode_to_vec()
                        .into(),
                )
            }
        }
    }

    /// One attempt, bounded by the request timeout and by `budget`.
    async fn send(
        &mut self,
        payload: &Payload,
        budget: Option<Duration>,
    ) -> Result<Accepted, ExportError> {
        let bound = |timeout: Duration| budget.map_or(timeout, |b| b.min(timeout));
        let timed_out =
            |t: Duration| ExportError::retryable(format!("export timed out after {t:?}"));
        match (self, payload) {
            (Backend::Writer { out, .. }, Payload::Lines(buf)) => {
                let write = async {
                    out.write_all(buf).await?;
                    out.flush().await
                };
                let result = match budget {
                    None => write.await,
                    Some(b) => tokio::time::timeout(b, write).await.unwrap_or_else(|_| {
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "output blocked",
                        ))
                    }),
                };
                result
                    .map(|()| Accepted::default())
                    .map_err(|e| ExportError::fatal(format!("writing spans: {e}")))
            }
            (Backend::Grpc { exporter, timeout }, Payload::Request(req)) => {
                let t = bound(*timeout);
                tokio::time::timeout(t, exporter.export(req.clone()))
                    .await
                    .unwrap_or_else(|_| Err(timed_out(t)))
            }
            (Backend::Http { exporter, timeout }, Payload::Encoded(body)) => {
                let t = bound(*timeout);
                tokio::time::timeout(t, exporter.export(body.clone()))
                    .await
                    .unwrap_or_else(|_| Err(timed_out(t)))
            }
            _ => Err(ExportError::fatal(
                "internal: payload does not match backend".into(),
            )),
        }
    }
}

struct Worker {
    rx: mpsc::Receiver<Span>,
    close_rx: watch::Receiver<bool>,
    /// Set once shutting down: nothing is sent after it.
    deadline: Option<Instant>,
    backend: Backend,
    batch_size: usize,
    schedule_delay: Duration,
    flush_timeout: Duration,
    extra_resource: Vec<Attribute>,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    last_partial_warn: Option<Instant>,
}

impl Worker {
    async fn run(mut self) {
        loop {
            let first = tokio::select! {
                biased;
                _ = self.close_rx.changed(), if self.deadline.is_none() => {
                    self.begin_close();
                    continue;
                }
                s = self.rx.recv() => s,
            };
            // `None`: the queue is closed and empty.
            let Some(first) = first else { break };
            let mut batch = Vec::with_capacity(self.batch_size);
            batch.push(first);
            let fill_until = Instant::now() + self.schedule_delay;
            // Once closing, `recv` never waits: it yields what is queued, then `None`.
            while batch.len() < self.batch_size {
                tokio::select! {
                    biased;
                    _ = self.close_rx.changed(), if self.deadline.is_none() => self.begin_close(),
                    s = self.rx.recv() => match s {
                        Some(s) => batch.push(s),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(fill_until), if self.deadline.is_none() => break,
                }
            }
            self.export(batch).await;
        }
        log::debug!("export worker finished");
    }

    fn begin_close(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + self.flush_timeout);
            self.rx.close();
        }
    }

    async fn export(&mut self, batch: Vec<Span>) {
        let n = batch.len() as u64;
        let payload = self.backend.prepare(batch, &self.extra_resource);
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let budget = self
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            if budget.is_some_and(|b| b.is_zero()) {
                Stats::add(&self.stats.spans_dropped, n);
                return;
            }
            match self.backend.send(&payload, budget).await {
                Ok(accepted) => {
                    let rejected = accepted.rejected.min(n);
                    Stats::add(&self.stats.spans_exported, n - rejected);
                    if rejected > 0 {
                        Stats::add(&self.stats.spans_dropped, rejected);
                        self.warn_partial(rejected, &accepted.message);
                    } else if !accepted.message.is_empty() {
                        log::debug!(
                            "OTLP endpoint accepted the batch with a warning: {}",
                            accepted.message
                        );
                    }
                    self.mark_healthy();
                    return;
                }
                Err(e) => {
                    Stats::inc(&self.stats.export_errors);
                    self.mark_failing(&e);
                    if !e.retryable {
                        Stats::add(&self.stats.spans_dropped, n);
                        return;
                    }
                    let mut wait =
                        backoff.max(e.retry_after.unwrap_or_default().min(MAX_RETRY_AFTER));
                    if let Some(d) = self.deadline {
                        wait = wait.min(d.saturating_duration_since(Instant::now()));
                    }
                    tokio::select! {
                        biased;
                        _ = self.close_rx.changed(), if self.deadline.is_none() => self.begin_close(),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn mark_failing(&self, e: &ExportError) {
        let mut guard = self.shared.health.lock().unwrap_or_else(|e| e.into_inner());
        match &mut guard.0 {
            ExporterHealth::Healthy => {
                let what = if e.retryable {
                    "will retry with backoff; new spans queue up meanwhile and overflow is counted as dropped"
                } else {
                    "batch dropped"
                };
                log::warn!(
                    "span export to {} failing: {} ({what})",
                    self.shared.destination,
                    e.message
                );
                guard.0 = ExporterHealth::Failing {
                    since: SystemTime::now(),
                    last_error: e.message.clone(),
                };
            }
            ExporterHealth::Failing { last_error, .. } => {
                log::debug!("span export still failing: {}", e.message);
                if *last_error != e.message {
                    last_error.clone_from(&e.message);
                }
            }
        }
    }

    fn mark_healthy(&self) {
        let mut guard = self.shared.health.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        if let ExporterHealth::Failing { since, .. } = &guard.0 {
            let secs = now.duration_since(*since).unwrap_or_default().as_secs_f64();
            log::info!(
                "span export to {} recovered after {secs:.1}s ({} spans dropped so far)",
                self.shared.destination,
                Stats::get(&self.stats.spans_dropped)
            );
        }
        *guard = (ExporterHealth::Healthy, Some(now));
    }

    fn warn_partial(&mut self, rejected: u64, message: &str) {
        let now = Instant::now();
        if self
            .last_partial_warn
            .is_none_or(|t| now.duration_since(t).as_secs() >= WARN_INTERVAL_SECS)
        {
            self.last_partial_warn = Some(now);
            log::warn!("OTLP endpoint rejected {rejected} spans: {message}");
        } else {
            log::debug!("OTLP endpoint rejected {rejected} spans: {message}");
        }
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
