//! `periscope`: the daemon (`periscope run`) and, later, its control client.

mod connections;
mod control;
mod discovery;
mod events;
mod export;
mod pipeline;
mod local_view;
mod probes;
mod protocols;
mod red;
mod spans;
mod stats;

use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` (mimalloc v3's `mi_option_e`; the crate names
/// no constant for it): how long freed memory stays committed, in ms.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc's default: purging on every free would cost a system call per
/// emptied page under load.
const PURGE_DELAY_RUNNING_MS: std::ffi::c_long = 1000;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use log::{error, info, warn};

use crate::export::{ExportConfig, OutputFormat};
use crate::pipeline::{Pipeline, PipelineSettings};
use crate::probes::{ProbeSettings, Probes};
use crate::stats::Stats;

#[derive(Parser)]
#[command(name = "periscope", version, about = "Zero-instrumentation tracing of TCP/HTTP traffic into OpenTelemetry spans")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the tracing daemon (needs root: loads eBPF programs).
    Run(RunArgs),
    #[command(flatten)]
    Control(control::client::ControlCommand),
}

#[derive(clap::Args)]
struct RunArgs {
    /// OTLP endpoint, e.g. http://127.0.0.1:4317. Default: $OTEL_EXPORTER_OTLP_ENDPOINT;
    /// with neither, spans are printed to stdout.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// `grpc` (default) or `http/protobuf`. Default: $OTEL_EXPORTER_OTLP_PROTOCOL.
    #[arg(long)]
    otlp_protocol: Option<String>,
    /// Stdout format when no OTLP endpoint is set [default: text].
    #[arg(long, value_enum)]
    output: Option<OutputFormat>,
    /// Payload bytes captured per socket call, max 4096 [default: 4096].
    #[arg(long)]
    payload_cap: Option<u32>,
    /// Kernel ring buffer size in MiB, a power of two [default: 4]. Its pages
    /// are resident twice over (the kernel maps the data area twice).
    #[arg(long)]
    ring_buffer_mib: Option<u32>,
    /// Most connections tracked at once; beyond it new ones are counted, not traced [default: 65536].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Control socket for `periscope status/enable/disable/filter/sample` [default: /run/periscope/control.sock].
    #[arg(long)]
    socket: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464); off by default.
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
    /// TOML file with the same settings, plus disabled_features, filter and sample_ratio.
    /// Flags win over environment variables, which win over the file.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Requests at least this slow (or failed) get their phases as child
    /// spans too; every request has them as duration attributes
    /// (`periscope.phase.<phase>.duration_ns`). `0s`: a waterfall for every
    /// request [default: 100ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    phase_spans_min_duration: Option<Duration>,
    /// Traces kept for `periscope traces` (0: none) [default: 200].
    #[arg(long)]
    traces_kept: Option<usize>,
    /// Distinct routes (and RPC methods, DNS names, servers) each service
    /// keeps in the RED metrics; the rest are folded into `_OTHER` [default: 100].
    #[arg(long)]
    max_routes: Option<usize>,
    /// Benchmark floor: load and attach every kernel program, but make each
    /// return at once (no events, no spans).
    #[arg(long, hide = true)]
    noop_probes: bool,
}

fn main() {
    // Transparent huge pages would back the allocator's regions with 2 MiB
    // pages and multiply the daemon's resident memory for no gain: its heap
    // is small and short-lived.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        // Start-up parses the kernel's BTF twice (offsets, loader), tens of
        // MiB each: return each one's memory as soon as it is freed, so the
        // peak is one parse, not both.
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Control(cmd) => std::process::exit(control::client::run(&cmd)),
    };
    if let Err(e) = result {
        error!("{e:#}");
        std::process::exit(1);
    }
}

fn run(args: RunArgs) -> Result<()> {
    let file = args.config.as_deref().map(control::config_file::load).transpose()?.unwrap_or_default();
    // 4 MiB held ~80k HTTP requests/s (both ends traced) without a loss
    // here, the daemon woken at 1 MiB unread; each MiB costs 2 MiB of RSS.
    let ring_buffer_mib = args.ring_buffer_mib.or(file.ring_buffer_mib).unwrap_or(4);
    if !ring_buffer_mib.is_power_of_two() {
        anyhow::bail!("ring buffer size must be a power of two (MiB), got {ring_buffer_mib}");
    }
    let output = match (args.output, &file.output) {
        (Some(o), _) => o,
        (None, Some(o)) => o.parse().map_err(|e| anyhow::anyhow!("config file: output: {e}"))?,
        (None, None) => OutputFormat::Text,
    };
    // Flags, then the standard variables (read by ExportConfig), then the file.
    let env_set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let otlp_endpoint = args.otlp_endpoint.or_else(|| {
        (!env_set("OTEL_EXPORTER_OTLP_ENDPOINT") && !env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .then(|| file.otlp_endpoint.clone())
            .flatten()
    });
    let otlp_protocol = args.otlp_protocol.or_else(|| {
        (!env_set("OTEL_EXPORTER_OTLP_PROTOCOL") && !env_set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
            .then(|| file.otlp_protocol.clone())
            .flatten()
    });
    let export_config = ExportConfig::from_env_and_flags(otlp_endpoint, otlp_protocol, output)?;
    let socket = args.socket.or(file.socket.clone()).unwrap_or_else(|| control::DEFAULT_SOCKET.into());
    let metrics_address = args.metrics_address.or(file.metrics_address);
    let payload_cap = args.payload_cap.or(file.payload_cap).unwrap_or(periscope_ebpf::DEFAULT_PAYLOAD_CAP);
    let max_connections = args.max_connections.or(file.max_connections).unwrap_or(65_536);
    let traces_kept = args.traces_kept.or(file.traces_kept).unwrap_or(200);
    let max_routes = args.max_routes.or(file.max_routes).unwrap_or(100);
    let temporality = match std::env::var("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE") {
        Ok(v) if !v.trim().is_empty() => red::otlp::Temporality::from_env_value(&v)
            .map_err(|e| anyhow::anyhow!("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE: {e}"))?,
        _ => red::otlp::Temporality::Cumulative,
    };
    // The OpenTelemetry SDKs' variable (milliseconds), 15 s by default here.
    let metrics_interval = match std::env::var("OTEL_METRIC_EXPORT_INTERVAL") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => anyhow::bail!("OTEL_METRIC_EXPORT_INTERVAL {v:?}: expected milliseconds, more than 0"),
        },
        _ => Duration::from_secs(15),
    };
    // The event loop runs on the main thread (`block_on`); the workers
    // carry export, control and metrics. Their name lets the benchmark
    // split the agent's CPU between the two.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("periscope-io")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async move {
        let stats = Arc::new(Stats::default());
        let probe_settings = ProbeSettings { payload_cap, ring_buffer_bytes: ring_buffer_mib << 20, do_nothing: args.noop_probes };
        if let Some(effective) = probes::capabilities::effective() {
            for (name, what) in probes::capabilities::missing(effective) {
                warn!("running without {name} (needed for {what}): what needs it will say so");
            }
        }
        let (mut probes, ring) = Probes::load(&probe_settings)?;
        let (ctl_tx, ctl_rx) = tokio::sync::mpsc::channel(16);
        let control_server = control::server::serve(socket.clone(), ctl_tx.clone())?;
        let metrics_task = match metrics_address {
            Some(addr) => {
                let (bound, task) = control::metrics::serve_prometheus(addr, ctl_tx.clone()).await?;
                info!("Prometheus metrics on http://{bound}/metrics");
                Some(task)
            }
            None => None,
        };
        let mut metrics_export = match &export_config.destination {
            export::config::Destination::Otlp(otlp) => export::metrics::spawn(
                otlp,
                export_config.resource_attributes.clone(),
                ctl_tx.clone(),
                metrics_interval,
                temporality,
            )?,
            _ => None,
        };
        let (sink, exporter) = export::spawn(export_config, stats.clone());
        let mut pipeline = Pipeline::new(PipelineSettings { max_connections, traces_kept, max_routes, ..Default::default() }, sink.clone(), stats.clone());
        let mut control = pipeline::Control {
            state: control::daemon::ControlState::new(),
            calls: ctl_rx,
            sink: sink.clone(),
            stats: stats.clone(),
        };
        drop(sink);
        // What /proc cannot tell about pods (container names, owners, app
        // labels), from the API server when the agent runs in a pod.
        let k8s_api_task = match discovery::kubernetes_api::ApiConfig::in_cluster() {
            None => {
                info!("Kubernetes API: not used (no KUBERNETES_SERVICE_HOST/PORT); pod metadata from /proc only");
                None
            }
            Some(config) => match config.and_then(discovery::kubernetes_api::ApiClient::new) {
                Ok(client) => {
                    let (link, task) = discovery::kubernetes_api::spawn(client, stats.clone());
                    pipeline.set_kubernetes_api(link);
                    Some(task)
                }
                Err(e) => {
                    warn!("Kubernetes API: not used ({e:#}); pod metadata from /proc only");
                    None
                }
            },
        };
        // Settings from the config file, applied like the CLI would.
        for feature in &file.disabled_features {
            let response = control.state.set_feature(*feature, false, &mut probes);
            info!("config file: {}", serde_json::to_string(&response).unwrap_or_default());
        }
        if !file.filter.is_empty() {
            let request = control::protocol::Request::Filter { set: Some(file.filter.clone()), clear: false };
            let response = control.state.handle(request, &mut probes, &mut pipeline, &control.sink, &stats);
            info!("config file: {}", serde_json::to_string(&response).unwrap_or_default());
        }
        pipeline.set_tls_enabled(control.state.tls_enabled());
        pipeline.set_features(&control.state);
        let (libcs, problems) = discovery::resolver::find_libc();
        for target in libcs {
            match probes.attach_resolver(&target.path, target.getaddrinfo) {
                Ok(()) => info!("resolver attached: {} (getaddrinfo)", target.path.display()),
                Err(e) => warn!("resolver not hooked: {e:#}"),
            }
        }
        for p in problems {
            warn!("resolver not hooked: {p}");
        }
        let phase_min = match (args.phase_spans_min_duration, &file.phase_spans_min_duration) {
            (Some(d), _) => Some(d),
            (None, Some(text)) => humantime::parse_duration(text).ok(),
            (None, None) => None,
        };
        if let Some(d) = phase_min {
            pipeline.set_phase_spans(spans::phases::PhaseSpans { min_duration_ns: d.as_nanos() as u64 });
        }
        if let Some(ratio) = file.sample_ratio {
            pipeline.set_sampler(pipeline::Sampler::new(ratio));
        }
        let mut tls_watch = discovery::tls_watch::TlsWatch::spawn("/proc").context("starting TLS discovery")?;
        pipeline::attach_initial_tls(&mut probes, &mut pipeline, &mut tls_watch).await;
        info!(
            "periscope ready: {} kernel programs attached ({}); control socket {}",
            probes.attached.len(),
            probes.attached.join(", "),
            socket.display()
        );
        // Start-up parsed the kernel's BTF and scanned ELF files; hand the
        // freed memory back to the system now rather than when this thread
        // next allocates enough to trigger a purge.
        unsafe {
            libmimalloc_sys::mi_collect(true);
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_RUNNING_MS);
        }
        let mut pipeline = pipeline::run(&mut probes, ring, pipeline, tls_watch, control, shutdown_signal()).await?;
        control_server.shutdown().await;
        // Spans and metrics go out first: detaching takes the kernel a
        // grace period per uprobe, seconds with many libraries hooked.
        let metrics_last = pipeline.red.snapshot();
        if let Some(export) = metrics_export.take() {
            export.finish(metrics_last, Duration::from_secs(2)).await;
        }
        for task in metrics_task.into_iter().chain(k8s_api_task) {
            task.abort();
        }
        pipeline.into_sink().shutdown(exporter).await;
        let lost: u64 = probes.lost_events().iter().map(|(_, n)| n).sum();
        info!("counters: {:?}; kernel losses per program: {:?}", stats, probes.lost_events());
        info!(
            "stopped: {} events, {} spans built, {} exported, {} dropped, {} events lost in kernel, {} request spans",
            Stats::get(&stats.events_received),
            Stats::get(&stats.spans_built),
            Stats::get(&stats.spans_exported),
            Stats::get(&stats.spans_dropped),
            lost,
            Stats::get(&stats.request_spans_built)
        );
        let detach_started = std::time::Instant::now();
        let detached = tokio::task::block_in_place(|| probes.detach_uprobes());
        info!("{detached} uprobes detached in {:.1?}", detach_started.elapsed());
        Ok(())
    });
    // Dropping the runtime would wait for every blocking task, and the
    // discovery threads block on /proc and inotify for as long as they
    // like: everything that matters (spans, metrics) was flushed above.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
