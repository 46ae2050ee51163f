//! End-to-end tests of OTLP export over TLS: the real agent sends its spans
//! to a collector behind TLS (nginx terminating TLS with a certificate of a
//! private CA and asking for a client certificate, in front of a real
//! Rotel), over OTLP/gRPC and OTLP/HTTP, with the CA and the client
//! certificate given the standard way (`OTEL_EXPORTER_OTLP_CERTIFICATE`,
//! `..._CLIENT_CERTIFICATE`, `..._CLIENT_KEY`). Without the CA the
//! collector's certificate is refused and `status` says why. Bodies are
//! gzip-compressed (`OTEL_EXPORTER_OTLP_COMPRESSION=gzip`).

use periscope_tests::agent::AgentOptions;
use periscope_tests::certs::TestCa;
use periscope_tests::clients::curl1;
use periscope_tests::control::ControlSocket;
use periscope_tests::nginx::{Nginx, NginxOptions, NginxTls};
use periscope_tests::tls::TlsVersion;
use periscope_tests::*;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(150);
const SPAN_WAIT: Duration = Duration::from_secs(30);

/// nginx on TLS (h2 and http/1.1 through ALPN) with `ca`'s server
/// certificate, asking for a client certificate `ca` signed, forwarding
/// OTLP/gRPC and OTLP/HTTP to `rotel`.
fn tls_collector(ca: &TestCa, rotel: &Rotel) -> anyhow::Result<Nginx> {
    Nginx::start_with(NginxOptions {
        tls: Some(NginxTls {
            cert: ca.server_cert(),
            key: ca.server_key(),
            protocols: vec![TlsVersion::Tls12, TlsVersion::Tls13],
            http2: true,
        }),
        extra_locations: format!(
            "ssl_client_certificate {};\n        ssl_verify_client on;\n        \
             location /opentelemetry.proto.collector.trace.v1.TraceService/ {{ grpc_pass grpc://127.0.0.1:{}; }}\n        \
             location /opentelemetry.proto.collector.metrics.v1.MetricsService/ {{ grpc_pass grpc://127.0.0.1:{}; }}\n        \
             location /v1/traces {{ proxy_pass http://127.0.0.1:{}; }}",
            ca.ca().display(),
            rotel.grpc_port(),
            rotel.grpc_port(),
            rotel.http_port()
        ),
        ..Default::default()
    })
}

fn tls_env(ca: &TestCa, with_ca: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE".into(), ca.client_cert().display().to_string()),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY".into(), ca.client_key().display().to_string()),
    ];
    if with_ca {
        env.push(("OTEL_EXPORTER_OTLP_CERTIFICATE".into(), ca.ca().display().to_string()));
    }
    env
}

/// Spans of a curl to a plain nginx reach Rotel through the TLS collector,
/// for both OTLP protocols; nginx's TLS log shows the agent's connections.
#[test]
fn spans_reach_a_collector_over_tls_with_a_client_certificate() {
    run_test(LIMIT, || {
        let ca = TestCa::generate()?;
        let rotel = Rotel::start()?;
        let collector = tls_collector(&ca, &rotel)?;
        let web = Nginx::start()?;
        for protocol in ["grpc", "http/protobuf"] {
            let socket = ControlSocket::new()?;
            let mut opts = socket.agent_options();
            opts.args.extend(["--otlp-protocol".to_string(), protocol.to_string()]);
            opts.env.extend(tls_env(&ca, true));
            // Compressed, as hosted backends prefer.
            opts.env.push(("OTEL_EXPORTER_OTLP_COMPRESSION".into(), "gzip".into()));
            let endpoint = format!("https://localhost:{}", collector.port());
            let mut agent = Agent::start_with(&endpoint, opts)?;
            let path = format!("/?over-tls-{}", protocol.replace('/', "-"));
            let (curl_pid, t) = curl1(&web.url(&path), &[])?;
            anyhow::ensure!(t.http_code == 200, "curl got {}", t.http_code);
            rotel
                .try_wait_for_spans(|s| s.pid() == Some(curl_pid) && s.kind == SpanKind::Client, 1, SPAN_WAIT)
                .map_err(|e| anyhow::anyhow!("{protocol}: {e:#}\nagent log:\n{}", agent.log()))?;
            let status = socket.status()?;
            anyhow::ensure!(
                status.bool("exporter.healthy")?,
                "{protocol}: exporter not healthy:\n{}",
                status.text
            );
            let destination = status.req("exporter.destination")?.as_str().unwrap_or_default().to_string();
            anyhow::ensure!(destination.contains("https://localhost"), "{protocol}: destination {destination}");
            agent.stop();
        }
        // Both protocols came through TLS: nginx logged them (h2 for gRPC).
        let log = collector.tls_log()?;
        let tls_requests = |path: &str| log.iter().filter(|e| e.request_uri.starts_with(path) && e.status == 200).count();
        anyhow::ensure!(
            tls_requests("/opentelemetry.proto.collector.trace.v1.TraceService/Export") > 0
                && tls_requests("/v1/traces") > 0,
            "the collector's TLS log shows no OTLP/gRPC or no OTLP/HTTP export: {log:?}"
        );
        Ok(())
    });
}

/// Without the private CA, the collector's certificate is not trusted:
/// nothing is delivered, and `status` says the exporter is failing and why.
#[test]
fn an_untrusted_collector_certificate_is_refused_and_reported() {
    run_test(LIMIT, || {
        let ca = TestCa::generate()?;
        let rotel = Rotel::start()?;
        let collector = tls_collector(&ca, &rotel)?;
        let web = Nginx::start()?;
        let socket = ControlSocket::new()?;
        let mut opts: AgentOptions = socket.agent_options();
        opts.env.extend(tls_env(&ca, false));
        let _agent = Agent::start_with(&format!("https://localhost:{}", collector.port()), opts)?;
        let (curl_pid, _) = curl1(&web.url("/?untrusted"), &[])?;
        let deadline = Instant::now() + SPAN_WAIT;
        let status = loop {
            let s = socket.status()?;
            if s.get("exporter.last_error").is_some() || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        let error = status.req("exporter.last_error")?.as_str().unwrap_or_default().to_lowercase();
        anyhow::ensure!(!status.bool("exporter.healthy")?, "exporter healthy without the CA:\n{}", status.text);
        anyhow::ensure!(
            error.contains("certificate") || error.contains("issuer"),
            "the exporter's error does not say it is the certificate: {error}"
        );
        anyhow::ensure!(
            !rotel.spans().iter().any(|s| s.pid() == Some(curl_pid)),
            "a span reached Rotel through a collector whose certificate is not trusted"
        );
        Ok(())
    });
}
