//! The event loop: drains the ring buffer into the pipeline, and between
//! drains serves control calls, ticks, and TLS libraries discovery found.

use std::time::Duration;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use tokio::io::unix::AsyncFd;

use super::Pipeline;
use crate::control::daemon::ControlState;
use crate::control::server::ControlCall;
use crate::discovery::tls_watch::{Discovered, TlsWatch};
use crate::export::SpanSink;
use crate::probes::Probes;
use crate::stats::Stats;

/// How often the ring is drained while events flow. The kernel side only
/// signals readiness when a quarter of the ring is unread (a busy node), so
/// this bounds how late spans are built at low rates (export batches wait
/// up to a second anyway). Each wake-up costs far more than an event, so
/// a quiet node's events are handled in batches.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);
/// While the ring stays empty the interval doubles up to this: an idle node
/// pays two or three wake-ups a second.
const IDLE_DRAIN_INTERVAL: Duration = Duration::from_millis(400);

/// The next drain's delay: back to the short interval as soon as a drain
/// found events, doubling while they found none.
fn next_drain_interval(current: Duration, found_events: bool) -> Duration {
    if found_events { DRAIN_INTERVAL } else { (current * 2).min(IDLE_DRAIN_INTERVAL) }
}

/// The daemon's control plane as the event loop sees it.
pub struct Control {
    pub state: ControlState,
    pub calls: tokio::sync::mpsc::Receiver<ControlCall>,
    pub sink: SpanSink,
    pub stats: std::sync::Arc<Stats>,
}

/// Work after each drain of the ring: TLS scans of new programs, and the
/// executable filter applied to them.
fn after_batch(probes: &mut Probes, pipeline: &mut Pipeline, tls_watch: &TlsWatch, control: &ControlState) {
    let now = pipeline.now_ns;
    pipeline.release_held(now);
    pipeline.flush_outbox();
    tls_watch.scan(pipeline.take_tls_scan_requests());
    if !pipeline.ignore_requests.is_empty() {
        probes.ignore_sockets(pipeline.take_ignore_batch());
    }
    if pipeline.has_widen_requests() {
        probes.widen_sockets(&pipeline.take_widen_batch());
    }
    for pid in pipeline.take_exited() {
        probes.forget_go_process(pid);
    }
    let execs = pipeline.take_execs();
    if control.filter_has_exes() {
        for (pid, exe) in execs {
            control.on_exec(pid, &exe, probes);
        }
    }
}

/// Hooks a TLS library found by discovery, or reports why it cannot be.
fn attach_tls(probes: &mut Probes, pipeline: &mut Pipeline, found: Discovered) {
    match found {
        Discovered::Attach(target) => {
            let symbols: Vec<(&str, u64)> = target.symbols.iter().map(|&(s, o)| (s, o)).collect();
            let (attached, errors) =
                probes.attach_tls(&target.attach_path, &target.display_path, target.kind.as_str(), &symbols);
            if !probes.tls_enabled() {
                info!("TLS library found: {} ({}); not attached while tls is disabled", target.display_path, target.kind.as_str());
            } else if attached.is_empty() {
                let reason = format!("attaching failed: {}", errors.join("; "));
                warn!("TLS not visible: {} ({reason})", target.display_path);
                pipeline.note_tls_not_visible(target.display_path.clone(), reason);
            } else {
                info!(
                    "TLS library attached: {} ({}, {} symbols: {})",
                    target.display_path,
                    target.kind.as_str(),
                    attached.len(),
                    attached.join(", ")
                );
                for e in errors {
                    warn!("TLS library {}: could not attach {e}", target.display_path);
                }
            }
        }
        Discovered::NotVisible { display_path, reason } => {
            warn!("TLS not visible: {display_path} ({reason})");
            pipeline.note_tls_not_visible(display_path, reason);
        }
        Discovered::GoProgram(target) => {
            let tls_enabled = probes.tls_enabled();
            let go = probes.attach_go(target);
            let t = &go.target;
            if !tls_enabled {
                info!("Go program found: {} ({}); not attached while tls is disabled", t.display_path, t.go_version);
            } else if go.attached() {
                info!(
                    "Go program attached: {} ({}, offsets from {}; {})",
                    t.display_path,
                    t.go_version,
                    t.offsets_source.as_str(),
                    go.functions.join(", ")
                );
                for e in &go.errors {
                    warn!("Go program {}: could not attach {e}", t.display_path);
                }
                if let crate::discovery::go_programs::GrpcSupport::NotVisible { version, reason } = &t.grpc {
                    warn!(
                        "Go program {}: grpc-go {version} not hooked ({reason}); its calls are read from the bytes, where HPACK allows",
                        t.display_path
                    );
                }
            } else {
                warn!("TLS not visible: Go program {} (attaching failed: {})", t.display_path, go.errors.join("; "));
            }
        }
        Discovered::GoProcess { pid, file } => {
            pipeline.note_go_process(pid);
            if let Some(file) = file {
                probes.note_go_process(pid, file);
                if probes.go_program_has_grpc(file) {
                    pipeline.note_grpc_go_process(pid);
                }
            }
        }
        Discovered::GoNotVisible { display_path, go_version, reason } => {
            warn!("TLS not visible: Go program {display_path} ({go_version}: {reason})");
            pipeline.note_go_not_visible(display_path, go_version, reason);
        }
        Discovered::InitialScanDone => {}
    }
}

/// Attaches everything TLS discovery finds at start, so that "ready" means
/// the TLS libraries already on the machine are hooked.
pub async fn attach_initial_tls(probes: &mut Probes, pipeline: &mut Pipeline, tls_watch: &mut TlsWatch) {
    while let Some(found) = tls_watch.found.recv().await {
        if let Discovered::InitialScanDone = found {
            return;
        }
        attach_tls(probes, pipeline, found);
    }
}

/// Records handled per pass over the ring: under a flood the loop still
/// gets back to control calls, ticks and TLS attachments (what is left is
/// read on the next pass, at most a drain interval later).
const MAX_RECORDS_PER_PASS: usize = 32_768;

/// Records handled between two hand-offs of spans to the exporter within a
/// pass: a busy pass would otherwise hold thousands of finished spans (and
/// their memory) until it ends.
const RECORDS_PER_HAND_OFF: usize = 2048;

/// Handles what the ring holds (at most a pass's worth); returns how many
/// records that was.
fn drain_ring(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline) -> usize {
    for n in 0..MAX_RECORDS_PER_PASS {
        let Some(record) = ring.next() else { return n };
        pipeline.handle_record(&record);
        if n % RECORDS_PER_HAND_OFF == RECORDS_PER_HAND_OFF - 1 {
            pipeline.flush_outbox();
        }
    }
    MAX_RECORDS_PER_PASS
}

/// Reads the ring buffer until `stop` resolves: every `DRAIN_INTERVAL`, and
/// at once when the kernel signals a filling ring. Never busy-polls.
pub async fn run(
    probes: &mut Probes,
    ring: RingBuf<MapData>,
    mut pipeline: Pipeline,
    mut tls_watch: TlsWatch,
    mut control: Control,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Pipeline> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged
    // for as long as the AsyncFd owns the ring.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with epoll: {e}"))?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut drain_every = DRAIN_INTERVAL;
    let drain = tokio::time::sleep(drain_every);
    tokio::pin!(drain);
    let mut last_lost: u64 = 0;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain_ring(guard.get_inner_mut(), &mut pipeline);
                drain_every = DRAIN_INTERVAL;
                guard.clear_ready();
                after_batch(probes, &mut pipeline, &tls_watch, &control.state);
            }
            _ = &mut drain => {
                let found = drain_ring(ring.get_mut(), &mut pipeline) > 0;
                after_batch(probes, &mut pipeline, &tls_watch, &control.state);
                drain_every = next_drain_interval(drain_every, found);
                drain.as_mut().reset(tokio::time::Instant::now() + drain_every);
            }
            Some(found) = tls_watch.found.recv() => attach_tls(probes, &mut pipeline, found),
            Some(call) = control.calls.recv() => {
                // Events already in the ring are handled before the change.
                drain_ring(ring.get_mut(), &mut pipeline);
                let response = control.state.handle(call.request, probes, &mut pipeline, &control.sink, &control.stats);
                pipeline.set_tls_enabled(control.state.tls_enabled());
                pipeline.set_features(&control.state);
                pipeline.flush_outbox();
                let _ = call.reply.send(response);
            }
            _ = tick.tick() => {
                pipeline.tick();
                pipeline.flush_outbox();
                let lost: u64 = probes.lost_events().iter().map(|(_, n)| n).sum();
                if lost > last_lost {
                    warn!("{} events lost in the kernel (ring buffer full) so far: {:?}", lost, probes.lost_events());
                    last_lost = lost;
                }
            }
            _ = &mut stop => {
                info!("stopping");
                // Drain what the kernel already wrote.
                let ring = ring.get_mut();
                while let Some(record) = ring.next() {
                    pipeline.handle_record(&record);
                }
                pipeline.shutdown();
                return Ok(pipeline);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DRAIN_INTERVAL, IDLE_DRAIN_INTERVAL, next_drain_interval};

    #[test]
    fn drain_interval_backs_off_when_idle_and_resets_on_events() {
        let mut d = DRAIN_INTERVAL;
        let mut steps = 0;
        while d < IDLE_DRAIN_INTERVAL {
            d = next_drain_interval(d, false);
            steps += 1;
        }
        assert_eq!(d, IDLE_DRAIN_INTERVAL);
        assert!(steps <= 5, "{steps}");
        assert_eq!(next_drain_interval(d, false), IDLE_DRAIN_INTERVAL);
        assert_eq!(next_drain_interval(d, true), DRAIN_INTERVAL);
    }
}
