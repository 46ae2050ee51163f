//! Export: the last stage. Spans go into a bounded queue through a
//! [`SpanSink`] (never blocking the event path; [`SpanSink::submit_all`]
//! hands over a whole drain of the ring buffer at once) and one worker task
//! sends them on in batches, either as OTLP (gRPC or HTTP/protobuf, encoded
//! straight from the spans by `encode`) or as lines on stdout. While the
//! endpoint takes batches, up to four OTLP requests are in flight at once
//! (their round trips overlap); stdout lines go out in order.
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
mod tls;
pub mod config;
mod encode;
pub mod otlp;
pub mod stdout;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use config::{Destination, ExportConfig, OutputFormat};

use crate::spans::model::{Attribute, Resource, Span};
use crate::stats::Stats;
use encode::OtlpEncoder;
use otlp::{Accepted, ExportError, Transport};

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
    /// Unix seconds of the last "partial success" warning.
    last_partial_warn: AtomicU64,
    /// Set once shutting down: nothing is sent after it.
    deadline: Mutex<Option<Instant>>,
}

/// The spans waiting for the worker, bounded in spans. A mutex rather than
/// a channel so that a whole drain of the ring buffer is queued under one
/// lock and with at most one wake-up of the worker.
struct SpanQueue {
    state: Mutex<QueueState>,
    capacity: usize,
    /// Signalled when spans are queued.
    arrived: Notify,
}

struct QueueState {
    spans: VecDeque<Span>,
    /// Set once the exporter shuts down: nothing more is queued.
    closed: bool,
}

/// The queue no longer takes spans.
struct QueueClosed;

impl SpanQueue {
    fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                spans: VecDeque::new(),
                closed: false,
            }),
            capacity,
            arrived: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the first of `spans` that fit into the queue and returns how
    /// many did; the rest stay in `spans`.
    fn push(&self, spans: &mut impl ExactSizeIterator<Item = Span>) -> Result<usize, QueueClosed> {
        let moved = {
            let mut state = self.lock();
            if state.closed {
                return Err(QueueClosed);
            }
            let room = self.capacity.saturating_sub(state.spans.len());
            let moved = room.min(spans.len());
            state.spans.extend(spans.take(moved));
            moved
        };
        if moved > 0 {
            // Stores a permit when the worker is not waiting: nothing is missed.
            self.arrived.notify_one();
        }
        Ok(moved)
    }

    /// Moves up to `max` spans, the oldest first, to the end of `batch`.
    fn take(&self, batch: &mut Vec<Span>, max: usize) {
        let mut state = self.lock();
        let n = max.min(state.spans.len());
        batch.extend(state.spans.drain(..n));
    }

    fn close(&self) {
        self.lock().closed = true;
    }

    fn len(&self) -> usize {
        self.lock().spans.len()
    }
}

/// Cheap, cloneable handle that feeds the export worker.
#[derive(Clone)]
pub struct SpanSink {
    inner: Arc<SinkInner>,
}

struct SinkInner {
    queue: Arc<SpanQueue>,
    close: watch::Sender<bool>,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    flush_timeout: Duration,
}

impl SpanSink {
    /// Queues `span` for export. Never blocks or waits: when the queue is
    /// full (or the exporter has shut down) the span is dropped and counted
    /// in `spans_dropped`.
    #[cfg(test)]
    pub fn submit(&self, span: Span) {
        self.offer(std::iter::once(span));
    }

    /// Queues all of `spans` (leaving the vector empty, its capacity kept)
    /// at the cost of one lock and at most one wake-up of the worker. As
    /// with [`Self::submit`], those that do not fit are dropped and counted.
    pub fn submit_all(&self, spans: &mut Vec<Span>) {
        self.offer(spans.drain(..));
    }

    fn offer(&self, mut spans: impl ExactSizeIterator<Item = Span>) {
        let offered = spans.len();
        match self.inner.queue.push(&mut spans) {
            Ok(moved) if moved < offered => self.overflowed(offered - moved),
            Ok(_) => {}
            Err(QueueClosed) => Stats::add(&self.inner.stats.spans_dropped, offered as u64),
        }
        // What did not fit is dropped here, outside the queue's lock.
    }

    fn overflowed(&self, dropped: usize) {
        Stats::add(&self.inner.stats.spans_dropped, dropped as u64);
        let now = unix_secs();
        let last_warn = &self.inner.shared.last_overflow_warn;
        let last = last_warn.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_INTERVAL_SECS
            && last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "export queue full ({} spans): dropping spans ({} dropped so far)",
                self.inner.queue.capacity,
                Stats::get(&self.inner.stats.spans_dropped)
            );
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
            queued: self.inner.queue.len(),
            queue_capacity: self.inner.queue.capacity,
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
    let queue = Arc::new(SpanQueue::new(capacity));
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
        last_partial_warn: AtomicU64::new(0),
        deadline: Mutex::new(None),
    });
    let sink = SpanSink {
        inner: Arc::new(SinkInner {
            queue: queue.clone(),
            close,
            stats: stats.clone(),
            shared: shared.clone(),
            flush_timeout: config.flush_timeout,
        }),
    };
    let handle = tokio::spawn(async move {
        let backend = match Backend::new(&config.destination, out, &config.resource_attributes) {
            Ok(b) => b,
            Err(e) => {
                // Configuration was validated up front, so this is unexpected;
                // spans will be dropped (and counted) by the closed queue.
                log::error!("cannot start the span exporter: {e:#}");
                queue.close();
                Stats::add(&stats.spans_dropped, queue.len() as u64);
                return;
            }
        };
        let schedule_delay = match backend {
            Backend::Writer { .. } => Duration::ZERO,
            _ => config.schedule_delay,
        };
        let batch_size = config.max_export_batch_size.clamp(1, capacity);
        Worker {
            queue,
            close_rx,
            deadline: None,
            backend,
            batch: Vec::with_capacity(batch_size),
            batch_size,
            schedule_delay,
            flush_timeout: config.flush_timeout,
            extra_resource: config.resource_attributes,
            stats,
            shared,
            in_flight: tokio::task::JoinSet::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_EXPORTS_IN_FLIGHT)),
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
    Otlp {
        transport: Transport,
        encoder: Box<OtlpEncoder>,
        timeout: Duration,
    },
}

enum Payload {
    Lines(Vec<u8>),
    /// An encoded `ExportTraceServiceRequest`.
    Request(Bytes),
}

impl Backend {
    fn new(
        dest: &Destination,
        out: Option<Box<dyn AsyncWrite + Send + Unpin>>,
        extra_resource: &[Attribute],
    ) -> anyhow::Result<Self> {
        Ok(match dest {
            Destination::Stdout(format) => Backend::Writer {
                out: out.unwrap_or_else(|| Box::new(tokio::io::stdout())),
                format: *format,
            },
            Destination::Otlp(o) => Backend::Otlp {
                transport: Transport::new(o)?,
                encoder: Box::new(OtlpEncoder::new(extra_resource.to_vec())),
                timeout: o.timeout,
            },
        })
    }

    fn prepare(&mut self, batch: &[Span], extra_resource: &[Attribute]) -> Payload {
        match self {
            Backend::Writer { format, .. } => {
                let mut buf = Vec::with_capacity(batch.len() * 256);
                for span in batch {
                    let line = match format {
                        OutputFormat::Text => stdout::format_text(span),
                        OutputFormat::Json => stdout::format_json(span, extra_resource),
                    };
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                }
                Payload::Lines(buf)
            }
            Backend::Otlp { encoder, .. } => Payload::Request(encoder.encode(batch)),
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
            (Backend::Otlp { transport, timeout, .. }, Payload::Request(request)) => {
                let t = bound(*timeout);
                tokio::time::timeout(t, transport.export(request.clone()))
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
    queue: Arc<SpanQueue>,
    close_rx: watch::Receiver<bool>,
    /// Set once shutting down: nothing is sent after it.
    deadline: Option<Instant>,
    backend: Backend,
    /// The batch being filled, kept for its capacity.
    batch: Vec<Span>,
    batch_size: usize,
    schedule_delay: Duration,
    flush_timeout: Duration,
    extra_resource: Vec<Attribute>,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    /// OTLP requests being delivered (with their retries).
    in_flight: tokio::task::JoinSet<()>,
    /// Bounds `in_flight`: a batch waits for a slot, and the queue behind it
    /// fills (and overflows, counted) while every slot is taken.
    slots: Arc<tokio::sync::Semaphore>,
}

/// OTLP requests sent at once. One at a time, the round trip to a receiver
/// on a busy node (waiting for a CPU) bounded the spans per second, and the
/// queue overflowed while the CPU sat idle; gRPC multiplexes them on one
/// connection.
const MAX_EXPORTS_IN_FLIGHT: usize = 4;

impl Worker {
    async fn run(mut self) {
        loop {
            // Concurrent only once the endpoint has taken a batch and while
            // it keeps taking them: during an outage one batch retries and
            // the rest wait in the queue.
            if !self.endpoint_healthy() {
                self.wait_in_flight().await;
            }
            if !self.start_batch().await {
                break;
            }
            self.fill_batch().await;
            let mut batch = std::mem::take(&mut self.batch);
            self.export(&batch).await;
            batch.clear();
            self.batch = batch;
            while self.in_flight.try_join_next().is_some() {}
        }
        self.wait_in_flight().await;
        log::debug!("export worker finished");
    }

    /// Waits for spans and takes the first of a batch; false once closing
    /// with none left.
    async fn start_batch(&mut self) -> bool {
        loop {
            self.queue.take(&mut self.batch, self.batch_size);
            if !self.batch.is_empty() {
                return true;
            }
            if self.deadline.is_some() {
                return false;
            }
            tokio::select! {
                biased;
                _ = self.close_rx.changed() => self.begin_close(),
                _ = self.queue.arrived.notified() => {}
            }
        }
    }

    /// Tops the batch up until it is full or the schedule delay has passed.
    /// Once closing it only takes what is queued.
    async fn fill_batch(&mut self) {
        let fill_until = Instant::now() + self.schedule_delay;
        while self.batch.len() < self.batch_size && self.deadline.is_none() {
            tokio::select! {
                biased;
                _ = self.close_rx.changed() => self.begin_close(),
                _ = self.queue.arrived.notified() => {}
                _ = tokio::time::sleep_until(fill_until) => break,
            }
            let room = self.batch_size - self.batch.len();
            self.queue.take(&mut self.batch, room);
        }
    }

    fn begin_close(&mut self) {
        if self.deadline.is_none() {
            let deadline = Instant::now() + self.flush_timeout;
            self.deadline = Some(deadline);
            *self.shared.deadline.lock().unwrap_or_else(|e| e.into_inner()) = Some(deadline);
            self.queue.close();
        }
    }

    /// Encodes the batch here (the encoder's buffers and resource cache
    /// are the worker's); OTLP requests are then delivered concurrently, at
    /// most [`MAX_EXPORTS_IN_FLIGHT`], lines on stdout in order.
    async fn export(&mut self, batch: &[Span]) {
        let n = batch.len() as u64;
        let payload = self.backend.prepare(batch, &self.extra_resource);
        let (transport, timeout) = match &self.backend {
            Backend::Otlp { transport, timeout, .. } => (transport.clone(), *timeout),
            Backend::Writer { .. } => {
                let mut delivery = Delivery::new(&self.stats, &self.shared, &self.close_rx);
                delivery.deliver(&mut self.backend, &payload, n).await;
                return;
            }
        };
        let slot = tokio::select! {
            biased;
            _ = self.close_rx.changed(), if self.deadline.is_none() => {
                self.begin_close();
                self.slots.clone().acquire_owned().await
            }
            slot = self.slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { return };
        // The task's backend only sends: its encoder stays empty.
        let mut backend = Backend::Otlp { transport, encoder: Box::new(OtlpEncoder::new(Vec::new())), timeout };
        let mut delivery = Delivery::new(&self.stats, &self.shared, &self.close_rx);
        self.in_flight.spawn(async move {
            delivery.deliver(&mut backend, &payload, n).await;
            drop(slot);
        });
    }
}

impl Worker {
    fn endpoint_healthy(&self) -> bool {
        let guard = self.shared.health.lock().unwrap_or_else(|e| e.into_inner());
        matches!(*guard, (ExporterHealth::Healthy, Some(_)))
    }

    /// Waits until no request is in flight, still noticing a shutdown.
    async fn wait_in_flight(&mut self) {
        loop {
            tokio::select! {
                biased;
                _ = self.close_rx.changed(), if self.deadline.is_none() => self.begin_close(),
                done = self.in_flight.join_next() => if done.is_none() { return },
            }
        }
    }
}

/// One batch on its way, with its retries: what it reports to.
struct Delivery {
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    close_rx: watch::Receiver<bool>,
}

impl Delivery {
    fn new(stats: &Arc<Stats>, shared: &Arc<Shared>, close_rx: &watch::Receiver<bool>) -> Self {
        Self { stats: stats.clone(), shared: shared.clone(), close_rx: close_rx.clone() }
    }

    fn deadline(&self) -> Option<Instant> {
        *self.shared.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn deliver(&mut self, backend: &mut Backend, payload: &Payload, n: u64) {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let budget = self
                .deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if budget.is_some_and(|b| b.is_zero()) {
                Stats::add(&self.stats.spans_dropped, n);
                return;
            }
            match backend.send(payload, budget).await {
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
                    let deadline = self.deadline();
                    if let Some(d) = deadline {
                        wait = wait.min(d.saturating_duration_since(Instant::now()));
                    }
                    // Closing sets the deadline: the next attempt is bounded by it.
                    tokio::select! {
                        biased;
                        _ = self.close_rx.changed(), if deadline.is_none() => {}
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
        let now = unix_secs();
        let last = self.shared.last_partial_warn.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= WARN_INTERVAL_SECS)
            && self
                .shared
                .last_partial_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
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
