//! OTLP transports: gRPC (tonic) and HTTP/protobuf (hyper), both sending
//! requests that `encode` already turned into protobuf bytes.
//! No retry or batching here; the worker in `mod.rs` does that.

use std::time::Duration;

use anyhow::Context;
use bytes::{BufMut, Bytes};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};

use super::config::{OtlpConfig, Protocol};

const USER_AGENT: &str = concat!("periscope/", env!("CARGO_PKG_VERSION"));
const TRACE_SERVICE: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The transport `cfg.protocol` names, sending encoded
/// `ExportTraceServiceRequest`s.
#[derive(Clone)]
pub(crate) enum Transport {
    Grpc(Box<GrpcExporter>),
    Http(Box<HttpExporter>),
}

impl Transport {
    /// Needs a tokio runtime (the gRPC channel spawns a task).
    pub fn new(cfg: &OtlpConfig) -> anyhow::Result<Self> {
        Ok(match cfg.protocol {
            Protocol::Grpc => Self::Grpc(Box::new(GrpcExporter::new(cfg)?)),
            Protocol::HttpProtobuf => Self::Http(Box::new(HttpExporter::new(cfg)?)),
        })
    }

    /// One attempt; the caller bounds the time it takes.
    pub async fn export(&mut self, request: Bytes) -> Result<Accepted, ExportError> {
        match self {
            Self::Grpc(e) => e.export(request).await,
            Self::Http(e) => e.export(request).await,
        }
    }
}

/// What a backend accepted: `rejected` spans were refused (partial success).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Accepted {
    pub rejected: u64,
    pub message: String,
}

#[derive(Debug)]
pub(crate) struct ExportError {
    pub retryable: bool,
    pub message: String,
    /// A delay the server asked for (HTTP `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl ExportError {
    pub fn retryable(message: String) -> Self {
        Self {
            retryable: true,
            message,
            retry_after: None,
        }
    }
    pub fn fatal(message: String) -> Self {
        Self {
            retryable: false,
            message,
            retry_after: None,
        }
    }
}

fn accepted(resp: ExportTraceServiceResponse) -> Accepted {
    resp.partial_success
        .map(|p| Accepted {
            rejected: p.rejected_spans.max(0) as u64,
            message: p.error_message,
        })
        .unwrap_or_default()
}

/// OTLP/gRPC via tonic. The channel connects lazily and reconnects by
/// itself on the next request after a failure.
#[derive(Clone)]
pub(crate) struct GrpcExporter {
    client: tonic::client::Grpc<Channel>,
    metadata: MetadataMap,
    timeout: Duration,
}

impl GrpcExporter {
    /// Needs a tokio runtime (the channel spawns a task).
    pub fn new(cfg: &OtlpConfig) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(cfg.url.clone())
            .with_context(|| format!("invalid OTLP endpoint {:?}", cfg.url))?
            .user_agent(USER_AGENT)?
            .connect_timeout(cfg.timeout)
            .timeout(cfg.timeout);
        let channel = super::tls::grpc_endpoint(endpoint, cfg)?.connect_lazy();
        let mut metadata = MetadataMap::new();
        for (k, v) in &cfg.headers {
            let key = AsciiMetadataKey::from_bytes(k.as_bytes())
                .with_context(|| format!("metadata key {k:?}"))?;
            let value: AsciiMetadataValue = v
                .parse()
                .with_context(|| format!("metadata value of {k:?}"))?;
            metadata.append(key, value);
        }
        let mut client = tonic::client::Grpc::new(channel);
        if cfg.gzip {
            client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
        }
        Ok(Self {
            client,
            metadata,
            timeout: cfg.timeout,
        })
    }

    /// What tonic's generated `TraceServiceClient::export` does, with the
    /// request already encoded.
    pub async fn export(&mut self, request: Bytes) -> Result<Accepted, ExportError> {
        if let Err(e) = self.client.ready().await {
            let status = tonic::Status::unknown(format!("Service was not ready: {e}"));
            return Err(classify_grpc(&status));
        }
        let mut request = tonic::Request::new(request);
        *request.metadata_mut() = self.metadata.clone();
        request.set_timeout(self.timeout);
        request
            .extensions_mut()
            .insert(tonic::GrpcMethod::new(TRACE_SERVICE, "Export"));
        let path = PathAndQuery::from_static(EXPORT_PATH);
        match self.client.unary(request, path, PreEncodedCodec).await {
            Ok(resp) => Ok(accepted(resp.into_inner())),
            Err(status) => Err(classify_grpc(&status)),
        }
    }
}

/// A gRPC codec for requests that are protobuf bytes already: the encoder
/// copies them into tonic's frame, the decoder reads the response with prost.
struct PreEncodedCodec;

struct PreEncodedEncoder;

struct ResponseDecoder;

impl Codec for PreEncodedCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = PreEncodedEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder
    }
}

impl Encoder for PreEncodedEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.reserve(item.len());
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        // As tonic's prost codec reports an undecodable message.
        ExportTraceServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// Retryable per the OTLP spec (CANCELLED, DEADLINE_EXCEEDED,
/// RESOURCE_EXHAUSTED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS), plus
/// UNKNOWN when it was made locally from a transport error (it then has a
/// source; one sent by a server has none).
pub(crate) fn classify_grpc(status: &tonic::Status) -> ExportError {
    use std::error::Error as _;
    let retryable = match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => true,
        Code::Unknown => status.source().is_some(),
        _ => false,
    };
    let mut message = format!("gRPC {:?}: {}", status.code(), status.message());
    let mut source = status.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !message.contains(&s) {
            message.push_str(": ");
            message.push_str(&s);
        }
        source = e.source();
    }
    ExportError {
        retryable,
        message,
        retry_after: None,
    }
}

/// OTLP/HTTP with protobuf bodies over HTTP/1.1 (hyper).
#[derive(Clone)]
pub(crate) struct HttpExporter {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: hyper::Uri,
    headers: HeaderMap,
    gzip: bool,
}

/// Largest response body read (responses are tiny; this bounds a hostile one).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

impl HttpExporter {
    pub fn new(cfg: &OtlpConfig) -> anyhow::Result<Self> {
        let uri: hyper::Uri = cfg
            .url
            .parse()
            .with_context(|| format!("invalid OTLP URL {:?}", cfg.url))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            headers.append(
                HeaderName::from_bytes(k.as_bytes())?,
                HeaderValue::from_str(v)?,
            );
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        if cfg.gzip {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.timeout));
        connector.set_nodelay(true);
        // `https_or_http`: the scheme of the URL decides; TLS settings are
        // only read for an https:// endpoint.
        let tls = if uri.scheme_str() == Some("https") {
            super::tls::http_client_config(&super::tls::read_pem_files(&cfg.tls)?)?
        } else {
            super::tls::http_client_config(&super::tls::TlsPem { ca: None, client: None })?
        };
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            client,
            uri,
            headers,
            gzip: cfg.gzip,
        })
    }

    /// Sends an encoded `ExportTraceServiceRequest`. The caller bounds the
    /// time this takes.
    pub async fn export(&self, body: Bytes) -> Result<Accepted, ExportError> {
        let body = if self.gzip { gzip(&body) } else { body };
        let mut req = hyper::Request::post(self.uri.clone())
            .body(Full::new(body))
            .map_err(|e| ExportError::fatal(format!("building request: {e}")))?;
        *req.headers_mut() = self.headers.clone();
        let resp = self.client.request(req).await.map_err(|e| {
            ExportError::retryable(format!("HTTP request to {}: {}", self.uri, error_chain(&e)))
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let is_protobuf = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-protobuf"));
        let body = match Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if status.is_success() => {
                log::debug!("reading OTLP/HTTP response body: {e}");
                Bytes::new()
            }
            Err(e) => Bytes::from(format!("(body unreadable: {e})")),
        };
        if status.is_success() {
            // An undecodable body is not worth failing a delivered batch for.
            return Ok(ExportTraceServiceResponse::decode(body)
                .map(accepted)
                .unwrap_or_default());
        }
        let retryable = matches!(status.as_u16(), 429 | 502 | 503 | 504);
        let detail = error_detail(&body, is_protobuf);
        let message = if detail.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {detail}")
        };
        Err(ExportError {
            retryable,
            message,
            retry_after,
        })
    }
}

/// `google.rpc.Status`, which OTLP/HTTP servers send in error bodies.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

fn error_detail(body: &[u8], is_protobuf: bool) -> String {
    if is_protobuf && let Ok(s) = RpcStatus::decode(body) {
        return s.message;
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text
        .trim()
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    text
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_error_classes() {
        assert!(classify_grpc(&tonic::Status::unavailable("down")).retryable);
        assert!(classify_grpc(&tonic::Status::deadline_exceeded("slow")).retryable);
        assert!(classify_grpc(&tonic::Status::resource_exhausted("full")).retryable);
        assert!(!classify_grpc(&tonic::Status::invalid_argument("bad")).retryable);
        assert!(!classify_grpc(&tonic::Status::unauthenticated("who")).retryable);
        assert!(!classify_grpc(&tonic::Status::unknown("server said so")).retryable);
        let e = classify_grpc(&tonic::Status::permission_denied("no"));
        assert_eq!(e.message, "gRPC PermissionDenied: no");
    }

    #[test]
    fn http_error_details() {
        let body = RpcStatus {
            code: 3,
            message: "bad span".into(),
        }
        .encode_to_vec();
        assert_eq!(error_detail(&body, true), "bad span");
        assert_eq!(error_detail(b"  not\nfound ", false), "not found");
    }
}

/// `data` gzip-compressed (the OTLP/HTTP body with `Content-Encoding: gzip`).
fn gzip(data: &[u8]) -> Bytes {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4 + 64), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = e.write_all(data);
    Bytes::from(e.finish().unwrap_or_default())
}

#[cfg(test)]
mod gzip_tests {
    #[test]
    fn gzip_bodies_decode_back() {
        use std::io::Read;
        let body: Vec<u8> = (0..10_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let packed = super::gzip(&body);
        assert!(packed.len() < body.len() / 4, "{} bytes", packed.len());
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&packed[..]).read_to_end(&mut out).unwrap();
        assert_eq!(out, body);
    }
}
