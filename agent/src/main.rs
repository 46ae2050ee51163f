//! `periscope`: the daemon (`periscope run`) and, later, its control client.

mod connections;
mod discovery;
mod events;
mod export;
mod pipeline;
mod probes;
mod protocols;
mod spans;
mod stats;

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use log::{error, info};

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
    /// Stdout format when no OTLP endpoint is set.
    #[arg(long, value_enum, default_value = "text")]
    output: OutputFormat,
    /// Payload bytes captured per socket call (max 4096).
    #[arg(long, default_value_t = periscope_ebpf::DEFAULT_PAYLOAD_CAP)]
    payload_cap: u32,
    /// Kernel ring buffer size in MiB (power of two).
    #[arg(long, default_value_t = 8)]
    ring_buffer_mib: u32,
    /// Most connections tracked at once; beyond it new ones are counted, not traced.
    #[arg(long, default_value_t = 65_536)]
    max_connections: usize,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    if let Err(e) = result {
        error!("{e:#}");
        std::process::exit(1);
    }
}

fn run(args: RunArgs) -> Result<()> {
    if !args.ring_buffer_mib.is_power_of_two() {
        anyhow::bail!("--ring-buffer-mib must be a power of two");
    }
    let export_config = ExportConfig::from_env_and_flags(args.otlp_endpoint, args.otlp_protocol, args.output)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let stats = Arc::new(Stats::default());
        let probe_settings = ProbeSettings {
            payload_cap: args.payload_cap,
            ring_buffer_bytes: args.ring_buffer_mib << 20,
        };
        let (mut probes, ring) = Probes::load(&probe_settings)?;
        let mut tls_watch = discovery::tls_watch::TlsWatch::spawn("/proc").context("starting TLS discovery")?;
        pipeline::attach_initial_tls(&mut probes, &mut tls_watch).await;
        let (sink, exporter) = export::spawn(export_config, stats.clone());
        let pipeline = Pipeline::new(
            PipelineSettings { max_connections: args.max_connections, ..Default::default() },
            sink,
            stats.clone(),
        );
        info!("periscope ready: {} kernel programs attached ({})", probes.attached.len(), probes.attached.join(", "));
        let pipeline = pipeline::run(&mut probes, ring, pipeline, tls_watch, shutdown_signal()).await?;
        pipeline.into_sink().shutdown(exporter).await;
        let lost: u64 = probes.lost_events().iter().map(|(_, n)| n).sum();
        info!("counters: {:?}; kernel losses per program: {:?}", stats, probes.lost_events());
        info!(
            "stopped: {} events, {} spans built, {} exported, {} dropped, {} events lost in kernel",
            Stats::get(&stats.events_received),
            Stats::get(&stats.spans_built),
            Stats::get(&stats.spans_exported),
            Stats::get(&stats.spans_dropped),
            lost
        );
        Ok(())
    })
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
