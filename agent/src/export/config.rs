//! Export settings: command-line flags, then the standard `OTEL_*`
//! environment variables, then defaults. Every parser here is a pure
//! function; [`ExportConfig::from_lookup`] takes the environment as a
//! closure so tests never touch the process environment.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::spans::model::Attribute;

/// Default `OTEL_EXPORTER_OTLP_TIMEOUT`: 10 s (spec).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
/// Default `OTEL_BSP_MAX_QUEUE_SIZE`. The spec's 2048 suits an SDK inside
/// one process; one agent exports for every process on a node, and at tens
/// of thousands of spans per second 2048 overflows within one export round
/// trip. 8192 spans stay within a few MiB.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 8192;
/// Default `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (spec: 512): larger batches
/// amortise the per-request cost at node-wide volumes.
pub const DEFAULT_MAX_EXPORT_BATCH_SIZE: usize = 1024;
/// Default `OTEL_BSP_SCHEDULE_DELAY`: 1 s. The spec says 5 s; an agent whose
/// users watch a collector for their request wants it sooner, and batches
/// still fill under load.
pub const DEFAULT_SCHEDULE_DELAY: Duration = Duration::from_millis(1000);
/// How long a shutdown may spend flushing what is queued.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How spans are printed when no OTLP endpoint is configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One readable line per span (see [`super::stdout::format_text`]).
    #[default]
    Text,
    /// One JSON object per line (see [`super::stdout::format_json`]).
    Json,
}

impl FromStr for OutputFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => bail!("unknown output format {other:?} (expected `text` or `json`)"),
        }
    }
}

/// OTLP transport (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

impl FromStr for Protocol {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "http/json" => {
                bail!("OTLP protocol `http/json` is not supported; use `grpc` or `http/protobuf`")
            }
            other => bail!("unknown OTLP protocol {other:?} (expected `grpc` or `http/protobuf`)"),
        }
    }
}

/// Where spans go.
#[derive(Clone, Debug, PartialEq)]
pub enum Destination {
    Stdout(OutputFormat),
    Otlp(OtlpConfig),
}

/// A configured OTLP exporter.
#[derive(Clone, PartialEq)]
pub struct OtlpConfig {
    pub protocol: Protocol,
    /// The URL requests go to: for gRPC the server (`http://host:4317`), for
    /// HTTP the full traces URL (`http://host:4318/v1/traces`).
    pub url: String,
    /// Extra request headers / gRPC metadata (`OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: Vec<(String, String)>,
    /// Per-request timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`).
    pub timeout: Duration,
    /// Certificates for an `https://` endpoint.
    pub tls: TlsFiles,
    /// gzip request bodies (`OTEL_EXPORTER_OTLP_COMPRESSION=gzip`).
    pub gzip: bool,
}

/// PEM files for TLS to the collector (`OTEL_EXPORTER_OTLP_CERTIFICATE`,
/// `..._CLIENT_CERTIFICATE`, `..._CLIENT_KEY`, or their `TRACES_` forms).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates trusted besides the built-in and system roots.
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate and key, for collectors that ask for one (mTLS).
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
}

/// Header values are often credentials: never print them.
impl fmt::Debug for OtlpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("OtlpConfig")
            .field("protocol", &self.protocol)
            .field("url", &self.url)
            .field("headers", &names)
            .field("timeout", &self.timeout)
            .field("tls", &self.tls)
            .field("gzip", &self.gzip)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ExportConfig {
    pub destination: Destination,
    /// `OTEL_RESOURCE_ATTRIBUTES`, merged into every resource; a traced
    /// process's own attributes win over these.
    pub resource_attributes: Vec<Attribute>,
    /// Spans waiting for export at most; more are dropped and counted.
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    /// Longest a span waits for its batch to fill.
    pub schedule_delay: Duration,
    /// Longest a shutdown spends flushing.
    pub flush_timeout: Duration,
}

impl ExportConfig {
    /// Flags win over the environment, signal-specific variables
    /// (`OTEL_EXPORTER_OTLP_TRACES_*`) over generic ones.
    pub fn from_env_and_flags(
        otlp_endpoint: Option<String>,
        otlp_protocol: Option<String>,
        output: OutputFormat,
    ) -> anyhow::Result<Self> {
        Self::from_lookup(otlp_endpoint, otlp_protocol, output, |k| {
            std::env::var(k).ok()
        })
    }

    /// [`Self::from_env_and_flags`] with the environment given as a lookup.
    /// Empty variables count as unset (spec). Malformed numbers are warned
    /// about and replaced by the default (spec); a malformed endpoint,
    /// protocol, header list or resource attribute list is an error.
    pub fn from_lookup(
        otlp_endpoint: Option<String>,
        otlp_protocol: Option<String>,
        output: OutputFormat,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let flag = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
        let first = |keys: &[&'static str]| keys.iter().find_map(|&k| env(k).map(|v| (k, v)));

        let protocol = match flag(otlp_protocol) {
            Some(p) => p.parse().context("--otlp-protocol")?,
            None => match first(&[
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ]) {
                Some((k, p)) => p.parse().with_context(|| k.to_string())?,
                None => Protocol::Grpc,
            },
        };

        // The generic endpoint (and the flag) is a base URL to which HTTP
        // appends `/v1/traces`; the signal-specific one is used as is.
        let endpoint = match flag(otlp_endpoint) {
            Some(e) => Some(("--otlp-endpoint", e, false)),
            None => env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .map(|e| ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e, true))
                .or_else(|| {
                    env("OTEL_EXPORTER_OTLP_ENDPOINT")
                        .map(|e| ("OTEL_EXPORTER_OTLP_ENDPOINT", e, false))
                }),
        };

        let destination = match endpoint {
            None => Destination::Stdout(output),
            Some((source, endpoint, signal_specific)) => {
                let url = otlp_url(&endpoint, protocol, signal_specific)
                    .with_context(|| source.to_string())?;
                let headers = match first(&[
                    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                    "OTEL_EXPORTER_OTLP_HEADERS",
                ]) {
                    Some((k, h)) => parse_headers(&h).with_context(|| k.to_string())?,
                    None => Vec::new(),
                };
                validate_headers(&headers, protocol)?;
                let timeout = first(&[
                    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                    "OTEL_EXPORTER_OTLP_TIMEOUT",
                ])
                .and_then(|(k, v)| positive_or_warn(k, &v))
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_TIMEOUT);
                let path = |keys: &[&'static str]| first(keys).map(|(_, v)| std::path::PathBuf::from(v.trim()));
                let tls = TlsFiles {
                    ca: path(&["OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"]),
                    client_cert: path(&[
                        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                    ]),
                    client_key: path(&["OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"]),
                };
                if tls.client_cert.is_some() != tls.client_key.is_some() {
                    bail!(
                        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together: only one is set"
                    );
                }
                if tls != TlsFiles::default() && !url.starts_with("https://") {
                    log::warn!("OTLP certificates are set but the endpoint {url} is not https://: they are not used");
                }
                let gzip = match first(&["OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"]) {
                    None => false,
                    Some((_, v)) if v.trim().eq_ignore_ascii_case("gzip") => true,
                    Some((_, v)) if v.trim().eq_ignore_ascii_case("none") => false,
                    Some((k, v)) => bail!("{k}={v:?}: only gzip and none are supported"),
                };
                Destination::Otlp(OtlpConfig {
                    protocol,
                    url,
                    headers,
                    timeout,
                    tls,
                    gzip,
                })
            }
        };

        let resource_attributes = match env("OTEL_RESOURCE_ATTRIBUTES") {
            Some(v) => parse_key_values(&v)
                .context("OTEL_RESOURCE_ATTRIBUTES")?
                .into_iter()
                .map(|(k, v)| Attribute::str(k, v))
                .collect(),
            None => Vec::new(),
        };

        let number = |key: &str| env(key).and_then(|v| positive_or_warn(key, &v));
        let max_queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE")
            .map(|n| n as usize)
            .unwrap_or(DEFAULT_MAX_QUEUE_SIZE);
        let max_export_batch_size = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
            .map(|n| n as usize)
            .unwrap_or(DEFAULT_MAX_EXPORT_BATCH_SIZE)
            .min(max_queue_size);
        let schedule_delay = env("OTEL_BSP_SCHEDULE_DELAY")
            .and_then(|v| match parse_u64(&v) {
                Ok(ms) => Some(Duration::from_millis(ms)),
                Err(e) => {
                    log::warn!("ignoring OTEL_BSP_SCHEDULE_DELAY={v:?}: {e}");
                    None
                }
            })
            .unwrap_or(DEFAULT_SCHEDULE_DELAY);

        Ok(Self {
            destination,
            resource_attributes,
            max_queue_size,
            max_export_batch_size,
            schedule_delay,
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
        })
    }
}

fn parse_u64(v: &str) -> anyhow::Result<u64> {
    v.trim()
        .parse::<u64>()
        .map_err(|_| anyhow::anyhow!("not a non-negative integer"))
}

fn positive_or_warn(key: &str, v: &str) -> Option<u64> {
    match parse_u64(v) {
        Ok(0) => {
            log::warn!("ignoring {key}=0: must be positive; using the default");
            None
        }
        Ok(n) => Some(n),
        Err(e) => {
            log::warn!("ignoring {key}={v:?}: {e}; using the default");
            None
        }
    }
}

/// The URL to send to. `endpoint` may lack a scheme (`collector:4317`,
/// taken as `http://`). For HTTP, a base endpoint gets `/v1/traces`
/// appended; a signal-specific one is used as given. `https` is TLS
/// (rustls), verified against the built-in Mozilla roots, the system's
/// and `OTEL_EXPORTER_OTLP_CERTIFICATE`.
pub fn otlp_url(
    endpoint: &str,
    protocol: Protocol,
    signal_specific: bool,
) -> anyhow::Result<String> {
    let endpoint = endpoint.trim();
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("invalid endpoint URL {endpoint:?}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        other => bail!(
            "endpoint {endpoint:?}: unsupported scheme {:?}",
            other.unwrap_or("")
        ),
    }
    if uri.host().is_none_or(str::is_empty) {
        bail!("endpoint {endpoint:?} has no host");
    }
    Ok(match protocol {
        Protocol::Grpc => url,
        Protocol::HttpProtobuf if signal_specific => url,
        Protocol::HttpProtobuf => {
            // Keep any base path: `http://h:4318/otlp` -> `.../otlp/v1/traces`.
            let base = url.split(['?', '#']).next().unwrap_or(&url);
            format!("{}/v1/traces", base.trim_end_matches('/'))
        }
    })
}

/// Parses `OTEL_EXPORTER_OTLP_HEADERS`: `k=v,k2=v2`, whitespace around keys
/// and values ignored, values percent-decoded. Keys are lower-cased
/// (HTTP/2 and gRPC want them so).
pub fn parse_headers(s: &str) -> anyhow::Result<Vec<(String, String)>> {
    Ok(parse_key_values(s)?
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect())
}

/// Parses the W3C-baggage-like `k=v,k2=v2` lists used by
/// `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_RESOURCE_ATTRIBUTES`. Empty entries
/// (`a=1,,b=2`, trailing comma) are skipped; an entry without `=` or with an
/// empty key, or a bad percent escape, is an error. Keys are percent-decoded
/// too (harmless for valid keys). Later duplicates replace earlier ones.
pub fn parse_key_values(s: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for entry in s.split(',') {
        if entry.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = entry.split_once('=') else {
            bail!("entry {:?} is not `key=value`", entry.trim());
        };
        let key = percent_decode(k.trim()).with_context(|| format!("key {:?}", k.trim()))?;
        if key.is_empty() {
            bail!("entry {:?} has an empty key", entry.trim());
        }
        let value = percent_decode(v.trim()).with_context(|| format!("value of {key:?}"))?;
        if let Some(slot) = out.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            out.push((key, value));
        }
    }
    Ok(out)
}

/// Decodes `%XX` escapes (the result must be UTF-8). `+` stays `+`.
pub fn percent_decode(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                bail!("bad percent escape in {s:?}");
            };
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| anyhow::anyhow!("{s:?} does not decode to UTF-8"))
}

/// Rejects headers that could not be sent, at start-up rather than on
/// every export.
fn validate_headers(headers: &[(String, String)], protocol: Protocol) -> anyhow::Result<()> {
    for (k, v) in headers {
        hyper::header::HeaderName::from_bytes(k.as_bytes())
            .with_context(|| format!("OTLP header name {k:?} is not a valid HTTP header name"))?;
        hyper::header::HeaderValue::from_str(v).with_context(|| {
            format!("value of OTLP header {k:?} is not a valid HTTP header value")
        })?;
        if protocol == Protocol::Grpc {
            tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes())
                .with_context(|| format!("OTLP header {k:?} is not a valid gRPC metadata key"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn tls_files_from_the_environment() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", " /etc/traces-ca.pem "),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/etc/client.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/client.key"),
        ];
        let c = cfg(None, None, &env).unwrap();
        let tls = &otlp(&c).tls;
        assert_eq!(tls.ca.as_deref(), Some(std::path::Path::new("/etc/traces-ca.pem")));
        assert_eq!(tls.client_cert.as_deref(), Some(std::path::Path::new("/etc/client.pem")));
        assert_eq!(tls.client_key.as_deref(), Some(std::path::Path::new("/etc/client.key")));
        assert_eq!(otlp(&c).url, "https://collector:4317");
        let half = cfg(None, None, &env[..4]).unwrap_err();
        assert!(format!("{half:#}").contains("go together"), "{half:#}");
        assert_eq!(otlp(&cfg(Some("http://c:4317"), None, &[]).unwrap()).tls, TlsFiles::default());
        let gz = |v: &str| cfg(Some("http://c:4317"), None, &[("OTEL_EXPORTER_OTLP_COMPRESSION", v)]).map(|c| otlp(&c).gzip);
        assert!(gz("gzip").unwrap());
        assert!(!gz("none").unwrap());
        assert!(gz("zstd").is_err());
    }

    fn cfg(
        endpoint: Option<&str>,
        protocol: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<ExportConfig> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ExportConfig::from_lookup(
            endpoint.map(String::from),
            protocol.map(String::from),
            OutputFormat::Text,
            |k| env.get(k).cloned(),
        )
    }

    fn otlp(c: &ExportConfig) -> &OtlpConfig {
        match &c.destination {
            Destination::Otlp(o) => o,
            d => panic!("expected OTLP, got {d:?}"),
        }
    }

    #[test]
    fn defaults_to_stdout() {
        let c = cfg(None, None, &[]).unwrap();
        assert_eq!(c.destination, Destination::Stdout(OutputFormat::Text));
        assert_eq!(c.max_queue_size, DEFAULT_MAX_QUEUE_SIZE);
        assert_eq!(c.max_export_batch_size, DEFAULT_MAX_EXPORT_BATCH_SIZE);
        assert_eq!(c.schedule_delay, Duration::from_millis(1000));
        assert!(c.resource_attributes.is_empty());
        // A protocol alone does not turn OTLP on.
        let c = cfg(
            None,
            Some("grpc"),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")],
        )
        .unwrap();
        assert!(matches!(c.destination, Destination::Stdout(_)));
    }

    #[test]
    fn env_endpoint_grpc() {
        let c = cfg(
            None,
            None,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")],
        )
        .unwrap();
        let o = otlp(&c);
        assert_eq!(o.protocol, Protocol::Grpc);
        assert_eq!(o.url, "http://collector:4317");
        assert_eq!(o.timeout, Duration::from_secs(10));
        assert!(o.headers.is_empty());
    }

    #[test]
    fn flags_win_over_env_and_traces_over_generic() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:4318/custom",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ];
        let c = cfg(None, None, &env).unwrap();
        assert_eq!(otlp(&c).protocol, Protocol::HttpProtobuf);
        // Signal-specific endpoint is used as is.
        assert_eq!(otlp(&c).url, "http://traces:4318/custom");

        let c = cfg(Some("http://flag:4318"), Some("http/protobuf"), &env).unwrap();
        assert_eq!(otlp(&c).url, "http://flag:4318/v1/traces");
        let c = cfg(Some("flag:4317"), Some("grpc"), &env).unwrap();
        assert_eq!(otlp(&c).protocol, Protocol::Grpc);
        assert_eq!(otlp(&c).url, "http://flag:4317");
        // Empty values are unset.
        let c = cfg(Some(""), None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]).unwrap();
        assert!(matches!(c.destination, Destination::Stdout(_)));
    }

    #[test]
    fn http_urls() {
        let u = |e| otlp_url(e, Protocol::HttpProtobuf, false).unwrap();
        assert_eq!(u("http://h:4318"), "http://h:4318/v1/traces");
        assert_eq!(u("http://h:4318/"), "http://h:4318/v1/traces");
        assert_eq!(u("http://h:4318/otlp/"), "http://h:4318/otlp/v1/traces");
        assert_eq!(u("h:4318"), "http://h:4318/v1/traces");
        assert_eq!(
            otlp_url("http://h/x", Protocol::HttpProtobuf, true).unwrap(),
            "http://h/x"
        );
        assert_eq!(otlp_url("https://h:4317", Protocol::Grpc, false).unwrap(), "https://h:4317");
        assert_eq!(
            otlp_url("https://h:4318", Protocol::HttpProtobuf, false).unwrap(),
            "https://h:4318/v1/traces"
        );
        assert!(otlp_url("ftp://h", Protocol::Grpc, false).is_err());
        assert!(otlp_url("http://", Protocol::Grpc, false).is_err());
        assert!(otlp_url("not a url", Protocol::Grpc, false).is_err());
    }

    #[test]
    fn protocols() {
        assert_eq!("grpc".parse::<Protocol>().unwrap(), Protocol::Grpc);
        assert_eq!(
            " HTTP/Protobuf ".parse::<Protocol>().unwrap(),
            Protocol::HttpProtobuf
        );
        let e = "http/json".parse::<Protocol>().unwrap_err().to_string();
        assert!(e.contains("not supported"), "{e}");
        assert!("udp".parse::<Protocol>().is_err());
        let e = cfg(Some("http://h:1"), Some("thrift"), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("--otlp-protocol"), "{e:#}");
        assert_eq!("JSON".parse::<OutputFormat>().unwrap(), OutputFormat::Json);
        assert!("yaml".parse::<OutputFormat>().is_err());
    }

    #[test]
    fn headers() {
        assert_eq!(
            parse_headers(" api-key = secret%20value , X-Tenant=a%2Cb,,").unwrap(),
            vec![
                ("api-key".into(), "secret value".into()),
                ("x-tenant".into(), "a,b".into())
            ]
        );
        assert_eq!(
            parse_headers("a=b=c").unwrap(),
            vec![("a".into(), "b=c".into())]
        );
        assert_eq!(
            parse_headers("a=1,a=2").unwrap(),
            vec![("a".into(), "2".into())]
        );
        assert_eq!(parse_headers("").unwrap(), vec![]);
        assert_eq!(parse_headers("k=").unwrap(), vec![("k".into(), "".into())]);
        assert!(parse_headers("novalue").is_err());
        assert!(parse_headers("=v").is_err());
        assert!(parse_headers("k=%zz").is_err());
        assert!(parse_headers("k=%4").is_err());
        assert!(parse_headers("k=%ff").is_err()); // not UTF-8
    }

    #[test]
    fn headers_from_env() {
        let c = cfg(
            Some("http://h:4317"),
            None,
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20abc"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ],
        )
        .unwrap();
        let o = otlp(&c);
        assert_eq!(
            o.headers,
            vec![("authorization".into(), "Bearer abc".into())]
        );
        assert_eq!(o.timeout, Duration::from_millis(2500));
        assert!(
            !format!("{o:?}").contains("abc"),
            "Debug must not print header values"
        );

        let c = cfg(
            Some("http://h:4317"),
            None,
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
            ],
        )
        .unwrap();
        assert_eq!(otlp(&c).headers, vec![("b".into(), "2".into())]);

        let e = cfg(
            Some("http://h:4317"),
            None,
            &[("OTEL_EXPORTER_OTLP_HEADERS", "bad")],
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("OTEL_EXPORTER_OTLP_HEADERS"),
            "{e:#}"
        );
        assert!(
            cfg(
                Some("http://h:4317"),
                None,
                &[("OTEL_EXPORTER_OTLP_HEADERS", "bad key=1")]
            )
            .is_err()
        );
        assert!(
            cfg(
                Some("http://h:4317"),
                None,
                &[("OTEL_EXPORTER_OTLP_HEADERS", "k=a%0Ab")]
            )
            .is_err()
        );
        // `-bin` keys carry binary gRPC metadata, which these string values are not.
        assert!(
            cfg(
                Some("http://h:4317"),
                None,
                &[("OTEL_EXPORTER_OTLP_HEADERS", "x-bin=1")]
            )
            .is_err()
        );
    }

    #[test]
    fn numbers() {
        let c = cfg(
            None,
            None,
            &[
                ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "300"),
                ("OTEL_BSP_SCHEDULE_DELAY", "0"),
            ],
        )
        .unwrap();
        assert_eq!(c.max_queue_size, 100);
        assert_eq!(
            c.max_export_batch_size, 100,
            "batch size is clamped to the queue size"
        );
        assert_eq!(c.schedule_delay, Duration::ZERO);

        // Malformed or zero numbers fall back to the defaults (spec: warn and ignore).
        let c = cfg(
            Some("http://h:1"),
            None,
            &[
                ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0"),
                ("OTEL_BSP_SCHEDULE_DELAY", "-1"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
            ],
        )
        .unwrap();
        assert_eq!(c.max_queue_size, DEFAULT_MAX_QUEUE_SIZE);
        assert_eq!(c.max_export_batch_size, DEFAULT_MAX_EXPORT_BATCH_SIZE);
        assert_eq!(c.schedule_delay, DEFAULT_SCHEDULE_DELAY);
        assert_eq!(otlp(&c).timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn resource_attributes() {
        let c = cfg(
            None,
            None,
            &[(
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=prod, k8s.cluster.name=a%20b",
            )],
        )
        .unwrap();
        assert_eq!(
            c.resource_attributes,
            vec![
                Attribute::str("deployment.environment.name", "prod"),
                Attribute::str("k8s.cluster.name", "a b")
            ]
        );
        let e = cfg(None, None, &[("OTEL_RESOURCE_ATTRIBUTES", "a=1,oops")]).unwrap_err();
        assert!(
            format!("{e:#}").contains("OTEL_RESOURCE_ATTRIBUTES"),
            "{e:#}"
        );
    }
}
