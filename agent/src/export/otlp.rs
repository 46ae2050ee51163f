//! OTLP: spans to protobuf, and the gRPC and HTTP/protobuf transports.
//! No retry or batching here; the worker in `mod.rs` does that.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic as pb;
use pb::collector::trace::v1::trace_service_client::TraceServiceClient;
use pb::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use pb::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use pb::trace::v1::{ResourceSpans, ScopeSpans, span, status};
use prost::Message;
use tonic::Code;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};

use super::config::OtlpConfig;
use super::merged_resource;
use crate::spans::model::{AttrValue, Attribute, Resource, Span, SpanKind, SpanStatus};

pub const SCOPE_NAME: &str = "periscope";
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");
const USER_AGENT: &str = concat!("periscope/", env!("CARGO_PKG_VERSION"));
/// W3C trace flags: every span we export is, by definition, sampled.
const FLAG_SAMPLED: u32 = 0x01;

/// One export request for `spans`: one `ResourceSpans` per distinct
/// resource (the same `Arc<Resource>`, or an equal resource of the same
/// pid), in order of first appearance, each with one `ScopeSpans` for scope
/// `periscope`. `extra_resource` (`OTEL_RESOURCE_ATTRIBUTES`) is merged into
/// every resource, the process's own attributes winning.
pub fn to_export_request(
    spans: Vec<Span>,
    extra_resource: &[Attribute],
) -> ExportTraceServiceRequest {
    let mut groups: Vec<(Arc<Resource>, Vec<pb::trace::v1::Span>)> = Vec::new();
    let mut by_ptr: HashMap<*const Resource, usize> = HashMap::new();
    for s in spans {
        let ptr = Arc::as_ptr(&s.resource);
        let idx = *by_ptr.entry(ptr).or_insert_with(|| {
            groups
                .iter()
                .position(|(r, _)| r.pid == s.resource.pid && **r == *s.resource)
                .unwrap_or_else(|| {
                    groups.push((s.resource.clone(), Vec::new()));
                    groups.len() - 1
                })
        });
        groups[idx].1.push(span_to_proto(s));
    }
    ExportTraceServiceRequest {
        resource_spans: groups
            .into_iter()
            .map(|(resource, spans)| ResourceSpans {
                resource: Some(pb::resource::v1::Resource {
                    attributes: merged_resource(&resource, extra_resource)
                        .map(key_value)
                        .collect(),
                    dropped_attributes_count: 0,
                    entity_refs: Vec::new(),
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE_NAME.into(),
                        version: SCOPE_VERSION.into(),
                        attributes: Vec::new(),
                        dropped_attributes_count: 0,
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

pub fn span_to_proto(s: Span) -> pb::trace::v1::Span {
    let kind = match s.kind {
        SpanKind::Server => span::SpanKind::Server,
        SpanKind::Client => span::SpanKind::Client,
        SpanKind::Internal => span::SpanKind::Internal,
    };
    let status = match s.status {
        SpanStatus::Unset => None,
        SpanStatus::Error { message } => Some(pb::trace::v1::Status {
            message,
            code: status::StatusCode::Error as i32,
        }),
    };
    pb::trace::v1::Span {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        trace_state: String::new(),
        parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: FLAG_SAMPLED,
        name: s.name,
        kind: kind as i32,
        start_time_unix_nano: s.start_unix_nano,
        end_time_unix_nano: s.end_unix_nano,
        attributes: s
            .attributes
            .into_iter()
            .map(|a| KeyValue {
                key: a.key.into_owned(),
                value: Some(any_value(a.value)),
            })
            .collect(),
        dropped_attributes_count: 0,
        events: Vec::new(),
        dropped_events_count: 0,
        links: Vec::new(),
        dropped_links_count: 0,
        status,
    }
}

fn key_value(a: &Attribute) -> KeyValue {
    KeyValue {
        key: a.key.to_string(),
        value: Some(any_value(a.value.clone())),
    }
}

fn any_value(v: AttrValue) -> AnyValue {
    AnyValue {
        value: Some(match v {
            AttrValue::Str(s) => any_value::Value::StringValue(s),
            AttrValue::Int(i) => any_value::Value::IntValue(i),
            AttrValue::Bool(b) => any_value::Value::BoolValue(b),
            AttrValue::Double(d) => any_value::Value::DoubleValue(d),
            AttrValue::StrArray(v) => any_value::Value::ArrayValue(opentelemetry_proto::tonic::common::v1::ArrayValue {
                values: v
                    .into_iter()
                    .map(|s| AnyValue { value: Some(any_value::Value::StringValue(s)) })
                    .collect(),
            }),
        }),
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
pub(crate) struct GrpcExporter {
    client: TraceServiceClient<Channel>,
    metadata: MetadataMap,
    timeout: Duration,
}

impl GrpcExporter {
    /// Needs a tokio runtime (the channel spawns a task).
    pub fn new(cfg: &OtlpConfig) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(cfg.url.clone())
            .with_context(|| format!("invalid OTLP endpoint {:?}", cfg.url))?
            .user_agent(USER_AGENT)?
            .connect_timeout(cfg.timeout)
            .timeout(cfg.timeout)
            .connect_lazy();
        let mut metadata = MetadataMap::new();
        for (k, v) in &cfg.headers {
            let key = AsciiMetadataKey::from_bytes(k.as_bytes())
                .with_context(|| format!("metadata key {k:?}"))?;
            let value: AsciiMetadataValue = v
                .parse()
                .with_context(|| format!("metadata value of {k:?}"))?;
            metadata.append(key, value);
        }
        Ok(Self {
            client: TraceServiceClient::new(channel),
            metadata,
            timeout: cfg.timeout,
        })
    }

    pub async fn export(
        &mut self,
        req: ExportTraceServiceRequest,
    ) -> Result<Accepted, ExportError> {
        let mut request = tonic::Request::new(req);
        *request.metadata_mut() = self.metadata.clone();
        request.set_timeout(self.timeout);
        match self.client.export(request).await {
            Ok(resp) => Ok(accepted(resp.into_inner())),
            Err(status) => Err(classify_grpc(&status)),
        }
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
pub(crate) struct HttpExporter {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: hyper::Uri,
    headers: HeaderMap,
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
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            client,
            uri,
            headers,
        })
    }

    /// Sends an encoded `ExportTraceServiceRequest`. The caller bounds the
    /// time this takes.
    pub async fn export(&self, body: Bytes) -> Result<Accepted, ExportError> {
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

    fn resource(pid: u32, name: &str) -> Arc<Resource> {
        Arc::new(Resource {
            pid,
            attributes: vec![
                Attribute::str("service.name", name),
                Attribute::int("process.pid", pid as i64),
            ],
        })
    }

    fn span(n: u8, resource: &Arc<Resource>) -> Span {
        Span {
            trace_id: [n; 16],
            span_id: [n; 8],
            parent_span_id: None,
            name: format!("span{n}"),
            kind: SpanKind::Server,
            start_unix_nano: 1_000 + n as u64,
            end_unix_nano: 2_000 + n as u64,
            attributes: vec![],
            status: SpanStatus::Unset,
            resource: resource.clone(),
        }
    }

    fn str_value(kv: &KeyValue) -> Option<&str> {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn span_fields() {
        let r = resource(1, "a");
        let mut s = span(7, &r);
        s.kind = SpanKind::Client;
        s.parent_span_id = Some([9; 8]);
        s.status = SpanStatus::Error {
            message: "reset".into(),
        };
        s.attributes = vec![
            Attribute::str("url.path", "/x"),
            Attribute::int("http.response.status_code", 503),
            Attribute::bool("periscope.incomplete", true),
            Attribute {
                key: "ratio".into(),
                value: AttrValue::Double(0.25),
            },
        ];
        let p = span_to_proto(s);
        assert_eq!(p.trace_id, vec![7; 16]);
        assert_eq!(p.span_id, vec![7; 8]);
        assert_eq!(p.parent_span_id, vec![9; 8]);
        assert_eq!(p.name, "span7");
        assert_eq!(p.kind, span::SpanKind::Client as i32);
        assert_eq!(p.start_time_unix_nano, 1_007);
        assert_eq!(p.end_time_unix_nano, 2_007);
        assert_eq!(p.flags, 1);
        assert_eq!(
            p.status,
            Some(pb::trace::v1::Status {
                message: "reset".into(),
                code: 2
            })
        );
        let values: Vec<_> = p
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone().unwrap().value.unwrap()))
            .collect();
        assert_eq!(
            values,
            vec![
                ("url.path", any_value::Value::StringValue("/x".into())),
                ("http.response.status_code", any_value::Value::IntValue(503)),
                ("periscope.incomplete", any_value::Value::BoolValue(true)),
                ("ratio", any_value::Value::DoubleValue(0.25)),
            ]
        );

        let mut s = span(1, &r);
        s.kind = SpanKind::Internal;
        let p = span_to_proto(s);
        assert!(p.parent_span_id.is_empty());
        assert_eq!(p.status, None);
        assert_eq!(p.kind, 1);
        assert_eq!(span_to_proto(span(1, &r)).kind, 2);
    }

    #[test]
    fn groups_by_resource() {
        let a = resource(10, "a");
        let b = resource(20, "b");
        // An equal resource in a different Arc joins the same group...
        let a2 = Arc::new((*a).clone());
        // ...but the same pid with other attributes (exec'd) does not.
        let a_exec = resource(10, "a-new");
        let spans = vec![
            span(1, &a),
            span(2, &b),
            span(3, &a2),
            span(4, &a_exec),
            span(5, &b),
            span(6, &a),
        ];
        let extra = vec![
            Attribute::str("service.name", "env"),
            Attribute::str("k8s.cluster.name", "c1"),
        ];
        let req = to_export_request(spans, &extra);
        assert_eq!(req.resource_spans.len(), 3);
        let summary: Vec<(String, Vec<String>)> = req
            .resource_spans
            .iter()
            .map(|rs| {
                let attrs = &rs.resource.as_ref().unwrap().attributes;
                let name = attrs
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .and_then(str_value)
                    .unwrap()
                    .to_string();
                assert_eq!(rs.scope_spans.len(), 1);
                let scope = rs.scope_spans[0].scope.as_ref().unwrap();
                assert_eq!(
                    (scope.name.as_str(), scope.version.as_str()),
                    ("periscope", env!("CARGO_PKG_VERSION"))
                );
                (
                    name,
                    rs.scope_spans[0]
                        .spans
                        .iter()
                        .map(|s| s.name.clone())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "a".to_string(),
                    vec!["span1".to_string(), "span3".into(), "span6".into()]
                ),
                ("b".to_string(), vec!["span2".to_string(), "span5".into()]),
                ("a-new".to_string(), vec!["span4".to_string()]),
            ]
        );
        // Env attributes are merged in, the process's own win.
        let attrs = &req.resource_spans[0].resource.as_ref().unwrap().attributes;
        let keys: Vec<&str> = attrs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(
            keys,
            vec!["service.name", "process.pid", "k8s.cluster.name"]
        );
        assert_eq!(to_export_request(vec![], &[]).resource_spans.len(), 0);
    }

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
