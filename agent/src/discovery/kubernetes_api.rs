//! What /proc cannot tell about a pod, from the Kubernetes API server when
//! the agent runs in a cluster: the container's name in the pod spec, the
//! workload that owns the pod (through its ReplicaSet or Job), and the
//! pod's `app.kubernetes.io/*` labels.
//!
//! Never on the event path: the pipeline asks with `try_send` on a bounded
//! channel ([`PodRequests::request`], a full channel is counted and the
//! request dropped), one task ([`spawn`]) asks the API server, one pod at a
//! time, caches the answer per pod uid (bounded) and sends what it found
//! back on another channel, which the pipeline drains once a second.
//!
//! Requests (read-only, `get` only):
//! - `GET /api/v1/namespaces/NS/pods/NAME`: labels, owner, container ids;
//!   the pod's uid must be the one the cgroup showed (a pod of the same
//!   name made later, or a name a workload put in its `HOSTNAME`, is not
//!   that pod);
//! - the controller owner's own controller: `GET
//!   /apis/apps/v1/namespaces/NS/replicasets/RS` (its Deployment), `GET
//!   /apis/batch/v1/namespaces/NS/jobs/JOB` (its CronJob).
//!
//! In a cluster the base URL is `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`,
//! the server is checked against the service account's CA only, and the
//! service account's token is sent as a bearer token, read again every
//! minute (the kubelet rotates it). Tests use `http://127.0.0.1:PORT`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{self, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use log::{debug, info, warn};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::stats::Stats;

const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Largest response read: a pod is a few KiB, a pod with a large
/// `last-applied-configuration` annotation tens of KiB.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Each request, from connecting to the last byte of the body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The token file is read again after this long (client-go: one minute).
const TOKEN_REFRESH: Duration = Duration::from_secs(60);
/// Pods remembered by the lookup task (answers, failures, pods gone).
const MAX_CACHED_PODS: usize = 4096;
/// Requests waiting for the task; beyond it they are counted and dropped
/// (the pipeline asks again a second later).
pub const REQUEST_QUEUE: usize = 1024;
const RESULT_QUEUE: usize = 1024;
/// First retry of a failed lookup, doubled each time up to the maximum.
const RETRY_FIRST: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Where and how to reach the API server.
pub struct ApiConfig {
    /// `https://host:port` (no trailing `/`).
    pub base: String,
    /// TLS for an `https://` base; `None` only for plain HTTP (tests).
    pub tls: Option<rustls::ClientConfig>,
    /// The bearer token's file, read again every [`TOKEN_REFRESH`]; none: no
    /// `Authorization` header.
    pub token_file: Option<PathBuf>,
}

impl ApiConfig {
    /// The in-cluster configuration: `None` outside a pod (no
    /// `KUBERNETES_SERVICE_HOST`/`PORT`), an error when in a pod but the
    /// service account's files are missing or unusable.
    pub fn in_cluster() -> Option<anyhow::Result<Self>> {
        let env = |k: &str| {
            std::env::var(k)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let (host, port) = (
            env("KUBERNETES_SERVICE_HOST")?,
            env("KUBERNETES_SERVICE_PORT")?,
        );
        Some(Self::in_cluster_from(
            &host,
            &port,
            SERVICE_ACCOUNT_DIR.as_ref(),
        ))
    }

    fn in_cluster_from(host: &str, port: &str, sa_dir: &std::path::Path) -> anyhow::Result<Self> {
        if port.parse::<u16>().is_err() {
            bail!("KUBERNETES_SERVICE_PORT is not a port: {port:?}");
        }
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let base = format!("https://{host}:{port}");
        base.parse::<hyper::Uri>()
            .with_context(|| format!("API server address {base:?}"))?;
        let token_file = sa_dir.join("token");
        std::fs::metadata(&token_file)
            .with_context(|| format!("no service-account token at {}", token_file.display()))?;
        let ca_file = sa_dir.join("ca.crt");
        let ca =
            std::fs::read(&ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
        Ok(Self {
            base,
            tls: Some(tls_config(&ca)?),
            token_file: Some(token_file),
        })
    }
}

/// rustls trusting the cluster's CA and nothing else.
fn tls_config(ca_pem: &[u8]) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.context("service-account ca.crt: not PEM")?)
            .context("service-account ca.crt: unusable certificate")?;
    }
    if roots.is_empty() {
        bail!("service-account ca.crt: no certificate");
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// ring, as for the OTLP exporter (export::tls).
#[allow(deprecated)]
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A pod as the agent saw it: what it asks the API server about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

/// What the API server said about a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    /// The `resource.opentelemetry.io/service.name` annotation.
    pub service_name_annotation: Option<String>,
    /// The `app.kubernetes.io/name` label.
    pub app_name: Option<String>,
    /// The `app.kubernetes.io/version` label.
    pub app_version: Option<String>,
    /// Owner attributes, innermost first (`k8s.replicaset.name`, then
    /// `k8s.deployment.name`; `k8s.job.name`, then `k8s.cronjob.name`).
    pub owners: Vec<(&'static str, String)>,
    /// Container id (64 hex digits) to the container's name in the spec.
    pub containers: Vec<(String, String)>,
}

impl PodInfo {
    /// The outermost workload's name (the Deployment rather than its
    /// ReplicaSet, the CronJob rather than its Job).
    pub fn owner_name(&self) -> Option<&str> {
        self.owners.last().map(|(_, n)| n.as_str())
    }

    pub fn container_name(&self, container_id: &str) -> Option<&str> {
        self.containers
            .iter()
            .find(|(id, _)| id == container_id)
            .map(|(_, n)| n.as_str())
    }
}

/// Why a request gave no answer.
#[derive(Debug, PartialEq, Eq)]
pub enum ApiError {
    /// 401 or 403: no token, an expired one, or no RBAC permission.
    Unauthorized(u16),
    /// 404.
    NotFound,
    /// Any other status.
    Status(u16),
    Transport(String),
    Timeout,
    /// Unreadable or larger than [`MAX_RESPONSE_BYTES`].
    Body(String),
    /// Not the JSON expected.
    Json(String),
}

impl ApiError {
    /// For "logged once per kind".
    fn kind(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound => "not found",
            Self::Status(_) => "HTTP status",
            Self::Transport(_) => "connection",
            Self::Timeout => "timeout",
            Self::Body(_) => "response body",
            Self::Json(_) => "JSON",
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unauthorized(s) => write!(f, "HTTP {s}"),
            Self::NotFound => write!(f, "HTTP 404"),
            Self::Status(s) => write!(f, "HTTP {s}"),
            Self::Transport(e) => write!(f, "request failed: {e}"),
            Self::Timeout => write!(f, "no answer within {}s", REQUEST_TIMEOUT.as_secs()),
            Self::Body(e) => write!(f, "response body: {e}"),
            Self::Json(e) => write!(f, "unexpected JSON: {e}"),
        }
    }
}

/// The outcome of a pod's lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(PodInfo),
    /// No such pod (deleted), or another pod by that name now.
    Gone,
}

// The few fields read; serde skips the others without keeping them.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Object {
    metadata: Metadata,
    status: PodStatus,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Metadata {
    uid: Option<String>,
    labels: Option<Labels>,
    annotations: Option<Annotations>,
    #[serde(rename = "ownerReferences")]
    owner_references: Option<Vec<OwnerReference>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Labels {
    #[serde(rename = "app.kubernetes.io/name")]
    name: Option<String>,
    #[serde(rename = "app.kubernetes.io/version")]
    version: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Annotations {
    #[serde(rename = "resource.opentelemetry.io/service.name")]
    service_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OwnerReference {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    name: String,
    controller: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PodStatus {
    #[serde(rename = "containerStatuses")]
    container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(rename = "initContainerStatuses")]
    init_container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(rename = "ephemeralContainerStatuses")]
    ephemeral_container_statuses: Option<Vec<ContainerStatus>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ContainerStatus {
    name: String,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

impl Metadata {
    /// The controller owner reference (`controller: true`).
    fn controller(&self) -> Option<&OwnerReference> {
        self.owner_references
            .as_deref()?
            .iter()
            .find(|o| o.controller == Some(true))
    }
}

impl OwnerReference {
    fn group(&self) -> &str {
        self.api_version.split_once('/').map_or("", |(g, _)| g)
    }
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>`: the id, when it is
/// 64 lowercase hex digits (as the cgroup path shows it).
fn container_id_from_status(s: &str) -> Option<&str> {
    let (_, id) = s.split_once("://")?;
    (id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(id)
}

/// A name safe as one segment of a request path (Kubernetes object names
/// are DNS subdomains: `a-z`, `0-9`, `-`, `.`).
fn path_segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The bearer token, read again when older than [`TOKEN_REFRESH`].
struct Token {
    file: Option<PathBuf>,
    value: Option<HeaderValue>,
    read_at: Option<Instant>,
    error_logged: bool,
}

impl Token {
    fn header(&mut self) -> Option<HeaderValue> {
        let file = self.file.as_ref()?;
        if self.read_at.is_none_or(|t| t.elapsed() >= TOKEN_REFRESH) {
            self.read_at = Some(Instant::now());
            // A small file (a JWT of a few KiB); read on the task's thread.
            let read = std::fs::read_to_string(file)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                        .map_err(|_| "not a valid header value".to_string())
                });
            match read {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    self.value = Some(v);
                }
                // The previous token, if any, is kept until a read succeeds.
                Err(e) if !self.error_logged => {
                    warn!(
                        "Kubernetes API: service-account token {} not read: {e}",
                        file.display()
                    );
                    self.error_logged = true;
                }
                Err(e) => debug!("Kubernetes API: token not read: {e}"),
            }
        }
        self.value.clone()
    }
}

/// An API client (hyper over rustls), for the one lookup task.
pub struct ApiClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    base: String,
    token: Token,
}

impl ApiClient {
    pub fn new(config: ApiConfig) -> anyhow::Result<Self> {
        let base = config.base.trim_end_matches('/').to_string();
        let uri: hyper::Uri = base
            .parse()
            .with_context(|| format!("API server URL {base:?}"))?;
        let tls = match (uri.scheme_str(), config.tls) {
            (Some("https"), Some(tls)) => tls,
            (Some("https"), None) => bail!("https API server without TLS settings"),
            (Some("http"), _) => {
                // Never used for http://, but the connector wants one.
                rustls::ClientConfig::builder_with_provider(crypto_provider())
                    .with_safe_default_protocol_versions()
                    .context("TLS protocol versions")?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            }
            _ => bail!("API server URL {base:?}: neither http nor https"),
        };
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            client,
            base,
            token: Token {
                file: config.token_file,
                value: None,
                read_at: None,
                error_logged: false,
            },
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// GET `path`, its JSON body decoded as `T`, within [`REQUEST_TIMEOUT`].
    async fn get<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ApiError> {
        let uri: hyper::Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e| ApiError::Transport(format!("URL: {e}")))?;
        let mut req = hyper::Request::get(uri)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("periscope/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| ApiError::Transport(format!("building request: {e}")))?;
        if let Some(token) = self.token.header() {
            req.headers_mut().insert(header::AUTHORIZATION, token);
        }
        let client = &self.client;
        let body = async move {
            let resp = client
                .request(req)
                .await
                .map_err(|e| ApiError::Transport(error_chain(&e)))?;
            let status = resp.status().as_u16();
            match status {
                200..=299 => {}
                401 | 403 => return Err(ApiError::Unauthorized(status)),
                404 => return Err(ApiError::NotFound),
                _ => return Err(ApiError::Status(status)),
            }
            Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| ApiError::Body(e.to_string()))
        };
        let body = tokio::time::timeout(REQUEST_TIMEOUT, body)
            .await
            .map_err(|_| ApiError::Timeout)??;
        serde_json::from_slice(&body).map_err(|e| ApiError::Json(e.to_string()))
    }

    /// The pod, its labels, containers and owners.
    pub async fn lookup(&mut self, pod: &PodRef) -> Result<Lookup, ApiError> {
        if !path_segment_ok(&pod.namespace) || !path_segment_ok(&pod.name) {
            return Ok(Lookup::Gone);
        }
        let ns = &pod.namespace;
        let object: Object = match self
            .get(&format!("/api/v1/namespaces/{ns}/pods/{}", pod.name))
            .await
        {
            Err(ApiError::NotFound) => return Ok(Lookup::Gone),
            r => r?,
        };
        if object.metadata.uid.as_deref() != Some(pod.uid.as_str()) {
            // Another pod by that name (the one seen was deleted and made
            // again), or a name that was not the pod's own.
            return Ok(Lookup::Gone);
        }
        let labels = object.metadata.labels.as_ref();
        let mut info = PodInfo {
            uid: pod.uid.clone(),
            service_name_annotation: object
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.service_name.clone())
                .filter(|s| !s.is_empty()),
            app_name: labels
                .and_then(|l| l.name.clone())
                .filter(|s| !s.is_empty()),
            app_version: labels
                .and_then(|l| l.version.clone())
                .filter(|s| !s.is_empty()),
            owners: Vec::new(),
            containers: Vec::new(),
        };
        let s = &object.status;
        for c in [
            &s.container_statuses,
            &s.init_container_statuses,
            &s.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        .flatten()
        {
            if let Some(id) = c.container_id.as_deref().and_then(container_id_from_status)
                && !c.name.is_empty()
            {
                info.containers.push((id.to_string(), c.name.clone()));
            }
        }
        if let Some(owner) = object.metadata.controller() {
            self.owners(ns, owner, &mut info.owners).await?;
        }
        Ok(Lookup::Found(info))
    }

    /// The pod's controller and, for a ReplicaSet or a Job, that one's
    /// controller. Kinds other than the built-in workloads give nothing.
    async fn owners(
        &mut self,
        ns: &str,
        owner: &OwnerReference,
        out: &mut Vec<(&'static str, String)>,
    ) -> Result<(), ApiError> {
        if !path_segment_ok(&owner.name) {
            return Ok(());
        }
        let (key, parent_path, parent_kind, parent_key) = match (owner.group(), owner.kind.as_str())
        {
            ("apps", "ReplicaSet") => (
                "k8s.replicaset.name",
                format!("/apis/apps/v1/namespaces/{ns}/replicasets/{}", owner.name),
                "Deployment",
                "k8s.deployment.name",
            ),
            ("batch", "Job") => (
                "k8s.job.name",
                format!("/apis/batch/v1/namespaces/{ns}/jobs/{}", owner.name),
                "CronJob",
                "k8s.cronjob.name",
            ),
            ("apps", "StatefulSet") => {
                out.push(("k8s.statefulset.name", owner.name.clone()));
                return Ok(());
            }
            ("apps", "DaemonSet") => {
                out.push(("k8s.daemonset.name", owner.name.clone()));
                return Ok(());
            }
            _ => return Ok(()),
        };
        out.push((key, owner.name.clone()));
        match self.get::<Object>(&parent_path).await {
            Ok(parent) => {
                if let Some(p) = parent.metadata.controller()
                    && p.kind == parent_kind
                    && path_segment_ok(&p.name)
                {
                    out.push((parent_key, p.name.clone()));
                }
                Ok(())
            }
            // The owner is gone (the pod outlives it for a while): the pod's
            // own controller is all there is.
            Err(ApiError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The pipeline's end of the lookup task: requests out, answers in.
pub struct ApiLink {
    pub requests: PodRequests,
    pub results: mpsc::Receiver<Arc<PodInfo>>,
}

/// Sends lookup requests without ever waiting.
#[derive(Clone)]
pub struct PodRequests {
    tx: mpsc::Sender<PodRef>,
    stats: Arc<Stats>,
}

impl PodRequests {
    pub fn new(tx: mpsc::Sender<PodRef>, stats: Arc<Stats>) -> Self {
        Self { tx, stats }
    }

    /// Queues a lookup; `false` (and counted in `k8s_api_dropped`) when the
    /// queue is full or the task is gone.
    pub fn request(&self, pod: PodRef) -> bool {
        match self.tx.try_send(pod) {
            Ok(()) => true,
            Err(_) => {
                Stats::inc(&self.stats.k8s_api_dropped);
                false
            }
        }
    }
}

enum Cached {
    Found(Arc<PodInfo>),
    Gone,
    Failed {
        pod: PodRef,
        retry_at: tokio::time::Instant,
        backoff: Duration,
    },
}

/// The lookup task's state.
struct Lookups {
    client: ApiClient,
    stats: Arc<Stats>,
    cache: HashMap<String, Cached>,
    /// Pod uids in the order they were first asked about (eviction order).
    order: VecDeque<String>,
    results: mpsc::Sender<Arc<PodInfo>>,
    logged: HashSet<&'static str>,
}

impl Lookups {
    async fn handle(&mut self, pod: PodRef) {
        match self.cache.get(&pod.uid) {
            Some(Cached::Found(info)) => {
                let info = info.clone();
                let _ = self.results.send(info).await;
            }
            Some(Cached::Gone | Cached::Failed { .. }) => {}
            None => {
                while self.cache.len() >= MAX_CACHED_PODS {
                    let Some(old) = self.order.pop_front() else {
                        break;
                    };
                    self.cache.remove(&old);
                }
                self.order.push_back(pod.uid.clone());
                self.look_up(pod, RETRY_FIRST).await;
            }
        }
    }

    async fn look_up(&mut self, pod: PodRef, backoff: Duration) {
        Stats::inc(&self.stats.k8s_api_lookups);
        let uid = pod.uid.clone();
        let cached = match self.client.lookup(&pod).await {
            Ok(Lookup::Found(info)) => {
                let info = Arc::new(info);
                let _ = self.results.send(info.clone()).await;
                Cached::Found(info)
            }
            Ok(Lookup::Gone) => {
                debug!(
                    "Kubernetes API: pod {}/{} ({}) not found: left as /proc shows it",
                    pod.namespace, pod.name, pod.uid
                );
                Cached::Gone
            }
            Err(e) => {
                Stats::inc(&self.stats.k8s_api_errors);
                self.log_error(&pod, &e, backoff);
                let retry_at = tokio::time::Instant::now() + backoff;
                Cached::Failed {
                    pod,
                    retry_at,
                    backoff: (backoff * 2).min(RETRY_MAX),
                }
            }
        };
        // Evicted meanwhile? Then the answer is not kept (nor retried).
        if self.order.contains(&uid) {
            self.cache.insert(uid, cached);
        }
    }

    fn log_error(&mut self, pod: &PodRef, e: &ApiError, backoff: Duration) {
        if !self.logged.insert(e.kind()) {
            debug!(
                "Kubernetes API: pod {}/{}: {e}; retry in {}s",
                pod.namespace,
                pod.name,
                backoff.as_secs()
            );
            return;
        }
        match e {
            ApiError::Unauthorized(_) => warn!(
                "Kubernetes API refused the lookup of pod {}/{} ({e}): the agent's service account needs get on pods, \
                 replicasets (apps) and jobs (batch), which the Helm chart grants with rbac.create=true; \
                 metadata from /proc only until then (further errors are counted in k8s_api_errors)",
                pod.namespace, pod.name
            ),
            _ => warn!(
                "Kubernetes API: lookup of pod {}/{} failed ({e}); retried with backoff up to every {}s \
                 (further errors of this kind are counted in k8s_api_errors)",
                pod.namespace,
                pod.name,
                RETRY_MAX.as_secs()
            ),
        }
    }

    fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.cache
            .values()
            .filter_map(|c| match c {
                Cached::Failed { retry_at, .. } => Some(*retry_at),
                _ => None,
            })
            .min()
    }

    async fn retry_due(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<(PodRef, Duration)> = self
            .cache
            .values()
            .filter_map(|c| match c {
                Cached::Failed {
                    pod,
                    retry_at,
                    backoff,
                } if *retry_at <= now => Some((pod.clone(), *backoff)),
                _ => None,
            })
            .collect();
        for (pod, backoff) in due {
            self.look_up(pod, backoff).await;
        }
    }
}

/// Starts the lookup task; the pipeline keeps the returned link.
pub fn spawn(client: ApiClient, stats: Arc<Stats>) -> (ApiLink, tokio::task::JoinHandle<()>) {
    let (req_tx, mut req_rx) = mpsc::channel::<PodRef>(REQUEST_QUEUE);
    let (res_tx, res_rx) = mpsc::channel(RESULT_QUEUE);
    let link = ApiLink {
        requests: PodRequests::new(req_tx, stats.clone()),
        results: res_rx,
    };
    let mut lookups = Lookups {
        client,
        stats,
        cache: HashMap::new(),
        order: VecDeque::new(),
        results: res_tx,
        logged: HashSet::new(),
    };
    info!(
        "Kubernetes API: {} used for container names, workload owners and app labels (metadata from /proc until it answers)",
        lookups.client.base()
    );
    let task = tokio::spawn(async move {
        loop {
            let next = lookups.next_retry();
            tokio::select! {
                req = req_rx.recv() => match req {
                    Some(pod) => lookups.handle(pod).await,
                    None => return,
                },
                _ = tokio::time::sleep_until(next.unwrap_or_else(tokio::time::Instant::now)), if next.is_some() => {
                    lookups.retry_due().await;
                }
            }
        }
    });
    (link, task)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http_body_util::Full;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use tokio::net::TcpListener;

    pub const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    pub const UID: &str = "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d";

    /// Path -> (status, body); every request's path and Authorization.
    pub type Routes = HashMap<String, (u16, String)>;
    pub type Seen = Arc<Mutex<Vec<(String, String)>>>;

    /// A fake API server on 127.0.0.1 over plain HTTP.
    pub async fn serve(routes: Routes) -> (SocketAddr, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Default::default();
        let routes = Arc::new(routes);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (routes, seen) = (routes.clone(), seen2.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (routes, seen) = (routes.clone(), seen.clone());
                            async move {
                                let path = req.uri().path().to_string();
                                let auth = req
                                    .headers()
                                    .get("authorization")
                                    .map(|v| v.to_str().unwrap_or("").to_string())
                                    .unwrap_or_default();
                                seen.lock().unwrap().push((path.clone(), auth));
                                let (status, body) = routes
                                    .get(&path)
                                    .cloned()
                                    .unwrap_or((404, r#"{"kind":"Status","code":404}"#.into()));
                                Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::from(body)))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    pub fn pod_json(uid: &str, labels: &str, owner: &str, containers: &str) -> String {
        format!(
            r#"{{"kind":"Pod","apiVersion":"v1","metadata":{{"name":"web-7d9f8b6c5d-x2x4z","namespace":"shop","uid":"{uid}",
            "labels":{{{labels}}},"annotations":{{"kubectl.kubernetes.io/last-applied-configuration":"{{}}"}},
            "ownerReferences":[{owner}]}},"spec":{{"containers":[{{"name":"server","image":"x"}}]}},
            "status":{{"phase":"Running","containerStatuses":[{containers}]}}}}"#
        )
    }

    pub fn owner(api_version: &str, kind: &str, name: &str) -> String {
        format!(
            r#"{{"apiVersion":"{api_version}","kind":"{kind}","name":"{name}","uid":"x","controller":true,"blockOwnerDeletion":true}}"#
        )
    }

    /// The pod of the process tests: a Deployment's, labelled, two containers.
    pub fn deployment_routes() -> Routes {
        let pod = pod_json(
            UID,
            r#""app.kubernetes.io/name":"storefront","app.kubernetes.io/version":"1.4.2","pod-template-hash":"7d9f8b6c5d""#,
            &owner("apps/v1", "ReplicaSet", "web-7d9f8b6c5d"),
            &format!(
                r#"{{"name":"server","containerID":"containerd://{CID}","ready":true}},
                   {{"name":"sidecar","containerID":"containerd://{}"}},{{"name":"waiting"}}"#,
                "e".repeat(64)
            ),
        );
        let rs = format!(
            r#"{{"kind":"ReplicaSet","metadata":{{"name":"web-7d9f8b6c5d","ownerReferences":[{}]}}}}"#,
            owner("apps/v1", "Deployment", "web")
        );
        HashMap::from([
            (
                "/api/v1/namespaces/shop/pods/web-7d9f8b6c5d-x2x4z".to_string(),
                (200, pod),
            ),
            (
                "/apis/apps/v1/namespaces/shop/replicasets/web-7d9f8b6c5d".to_string(),
                (200, rs),
            ),
        ])
    }

    pub fn pod_ref(name: &str) -> PodRef {
        PodRef {
            uid: UID.into(),
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    pub fn client(addr: SocketAddr, token_file: Option<PathBuf>) -> ApiClient {
        ApiClient::new(ApiConfig {
            base: format!("http://{addr}/"),
            tls: None,
            token_file,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn deployment_pod_through_its_replicaset() {
        let (addr, seen) = serve(deployment_routes()).await;
        let token =
            std::env::temp_dir().join(format!("periscope-k8s-token-{}", std::process::id()));
        std::fs::write(&token, "tok-1\n").unwrap();
        let mut c = client(addr, Some(token.clone()));
        let found = c.lookup(&pod_ref("web-7d9f8b6c5d-x2x4z")).await.unwrap();
        let _ = std::fs::remove_file(&token);
        let Lookup::Found(info) = found else {
            panic!("{found:?}")
        };
        assert_eq!(info.app_name.as_deref(), Some("storefront"));
        assert_eq!(info.app_version.as_deref(), Some("1.4.2"));
        assert_eq!(info.service_name_annotation, None);
        assert_eq!(
            info.owners,
            vec![
                ("k8s.replicaset.name", "web-7d9f8b6c5d".to_string()),
                ("k8s.deployment.name", "web".to_string())
            ]
        );
        assert_eq!(info.owner_name(), Some("web"));
        assert_eq!(info.container_name(CID), Some("server"));
        assert_eq!(info.container_name(&"e".repeat(64)), Some("sidecar"));
        assert_eq!(info.containers.len(), 2);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert!(
            seen.iter().all(|(_, auth)| auth == "Bearer tok-1"),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn other_owners_and_container_runtimes() {
        let cron_pod = pod_json(
            UID,
            "",
            &owner("batch/v1", "Job", "backup-28472910"),
            &format!(r#"{{"name":"job","containerID":"cri-o://{CID}"}}"#),
        );
        let job = format!(
            r#"{{"metadata":{{"ownerReferences":[{}]}}}}"#,
            owner("batch/v1", "CronJob", "backup")
        );
        let sts_pod = pod_json(
            UID,
            "",
            &owner("apps/v1", "StatefulSet", "db"),
            &format!(r#"{{"name":"db","containerID":"docker://{CID}"}}"#),
        );
        let ds_pod = pod_json(UID, "", &owner("apps/v1", "DaemonSet", "fluentd"), "");
        // Not a controller reference, and a custom resource's: no owner.
        let custom_pod = pod_json(
            UID,
            "",
            &format!(
                r#"{},{}"#,
                owner("argoproj.io/v1alpha1", "Rollout", "r").replace("true", "false"),
                owner("example.com/v1", "ReplicaSet", "x")
            ),
            r#"{"name":"c","containerID":"containerd://short"}"#,
        );
        // A bare Job whose owner is gone.
        let bare_job_pod = pod_json(UID, "", &owner("batch/v1", "Job", "once"), "");
        let routes = HashMap::from([
            (
                "/api/v1/namespaces/shop/pods/cron".to_string(),
                (200, cron_pod),
            ),
            (
                "/apis/batch/v1/namespaces/shop/jobs/backup-28472910".to_string(),
                (200, job),
            ),
            (
                "/api/v1/namespaces/shop/pods/sts".to_string(),
                (200, sts_pod),
            ),
            ("/api/v1/namespaces/shop/pods/ds".to_string(), (200, ds_pod)),
            (
                "/api/v1/namespaces/shop/pods/custom".to_string(),
                (200, custom_pod),
            ),
            (
                "/api/v1/namespaces/shop/pods/once".to_string(),
                (200, bare_job_pod),
            ),
        ]);
        let (addr, _) = serve(routes).await;
        let mut c = client(addr, None);
        let info = |l: Lookup| match l {
            Lookup::Found(i) => i,
            Lookup::Gone => panic!("gone"),
        };
        let i = info(c.lookup(&pod_ref("cron")).await.unwrap());
        assert_eq!(
            i.owners,
            vec![
                ("k8s.job.name", "backup-28472910".into()),
                ("k8s.cronjob.name", "backup".into())
            ]
        );
        assert_eq!(i.container_name(CID), Some("job"));
        let i = info(c.lookup(&pod_ref("sts")).await.unwrap());
        assert_eq!(i.owners, vec![("k8s.statefulset.name", "db".into())]);
        assert_eq!(i.container_name(CID), Some("db"));
        let i = info(c.lookup(&pod_ref("ds")).await.unwrap());
        assert_eq!(i.owners, vec![("k8s.daemonset.name", "fluentd".into())]);
        let i = info(c.lookup(&pod_ref("custom")).await.unwrap());
        assert!(i.owners.is_empty() && i.containers.is_empty(), "{i:?}");
        let i = info(c.lookup(&pod_ref("once")).await.unwrap());
        assert_eq!(i.owners, vec![("k8s.job.name", "once".into())]);
    }

    #[tokio::test]
    async fn refusals_garbage_and_gone_pods() {
        let mut routes = deployment_routes();
        routes.insert(
            "/api/v1/namespaces/shop/pods/forbidden".into(),
            (403, r#"{"kind":"Status","code":403}"#.into()),
        );
        routes.insert(
            "/api/v1/namespaces/shop/pods/garbage".into(),
            (200, "{\"metadata\": [1, 2".into()),
        );
        routes.insert(
            "/api/v1/namespaces/shop/pods/wrong-types".into(),
            (200, r#"{"metadata":{"uid":7}}"#.into()),
        );
        routes.insert(
            "/api/v1/namespaces/shop/pods/array".into(),
            (200, "[]".into()),
        );
        routes.insert(
            "/api/v1/namespaces/shop/pods/huge".into(),
            (200, " ".repeat(MAX_RESPONSE_BYTES + 1)),
        );
        routes.insert(
            "/api/v1/namespaces/shop/pods/broken".into(),
            (500, "oops".into()),
        );
        // A pod by that name, but not the one seen.
        routes.insert(
            "/api/v1/namespaces/shop/pods/replaced".into(),
            (
                200,
                pod_json("ffffffff-5e6f-7a8b-9c0d-1e2f3a4b5c6d", "", "", ""),
            ),
        );
        // The ReplicaSet's lookup refused: the whole lookup fails (retried).
        routes.insert(
            "/api/v1/namespaces/shop/pods/rs-forbidden".into(),
            (
                200,
                pod_json(UID, "", &owner("apps/v1", "ReplicaSet", "nope"), ""),
            ),
        );
        routes.insert(
            "/apis/apps/v1/namespaces/shop/replicasets/nope".into(),
            (403, String::new()),
        );
        let (addr, seen) = serve(routes).await;
        let mut c = client(addr, None);
        assert_eq!(
            c.lookup(&pod_ref("forbidden")).await,
            Err(ApiError::Unauthorized(403))
        );
        assert!(matches!(
            c.lookup(&pod_ref("garbage")).await,
            Err(ApiError::Json(_))
        ));
        assert!(matches!(
            c.lookup(&pod_ref("wrong-types")).await,
            Err(ApiError::Json(_))
        ));
        // JSON of another shape, without the pod's uid: not that pod.
        assert_eq!(c.lookup(&pod_ref("array")).await, Ok(Lookup::Gone));
        assert!(matches!(
            c.lookup(&pod_ref("huge")).await,
            Err(ApiError::Body(_))
        ));
        assert_eq!(
            c.lookup(&pod_ref("broken")).await,
            Err(ApiError::Status(500))
        );
        assert_eq!(c.lookup(&pod_ref("deleted")).await, Ok(Lookup::Gone));
        assert_eq!(c.lookup(&pod_ref("replaced")).await, Ok(Lookup::Gone));
        assert_eq!(
            c.lookup(&pod_ref("rs-forbidden")).await,
            Err(ApiError::Unauthorized(403))
        );
        // Names that are not object names never reach a URL.
        let n = seen.lock().unwrap().len();
        assert_eq!(c.lookup(&pod_ref("../../secrets")).await, Ok(Lookup::Gone));
        assert_eq!(
            c.lookup(&PodRef {
                namespace: "a/b".into(),
                ..pod_ref("x")
            })
            .await,
            Ok(Lookup::Gone)
        );
        assert_eq!(seen.lock().unwrap().len(), n);
        // No token file: no Authorization header.
        assert!(seen.lock().unwrap().iter().all(|(_, a)| a.is_empty()));
        // Nobody listening.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = listener.local_addr().unwrap();
        drop(listener);
        let mut c = client(dead, None);
        assert!(matches!(
            c.lookup(&pod_ref("x")).await,
            Err(ApiError::Transport(_))
        ));
    }

    #[tokio::test]
    async fn task_caches_answers_counts_errors_and_retries() {
        let mut routes = deployment_routes();
        routes.insert(
            "/api/v1/namespaces/shop/pods/forbidden".into(),
            (403, String::new()),
        );
        let (addr, seen) = serve(routes).await;
        let stats = Arc::new(Stats::default());
        let (mut link, task) = spawn(client(addr, None), stats.clone());
        assert!(link.requests.request(pod_ref("web-7d9f8b6c5d-x2x4z")));
        let info = tokio::time::timeout(Duration::from_secs(10), link.results.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(info.owner_name(), Some("web"));
        assert_eq!(seen.lock().unwrap().len(), 2);
        // Asked again (a process of the same pod met later): from the cache.
        assert!(link.requests.request(pod_ref("web-7d9f8b6c5d-x2x4z")));
        let again = tokio::time::timeout(Duration::from_secs(10), link.results.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&info, &again));
        assert_eq!(seen.lock().unwrap().len(), 2);
        // Refused: counted, no answer, not asked again at once.
        let forbidden = PodRef {
            uid: "00000000-0000-0000-0000-000000000000".into(),
            ..pod_ref("forbidden")
        };
        assert!(link.requests.request(forbidden.clone()));
        assert!(link.requests.request(forbidden));
        let until = Instant::now() + Duration::from_secs(10);
        while Stats::get(&stats.k8s_api_errors) == 0 {
            assert!(Instant::now() < until);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(Stats::get(&stats.k8s_api_errors), 1);
        assert_eq!(Stats::get(&stats.k8s_api_lookups), 2);
        assert!(link.results.try_recv().is_err());
        assert_eq!(seen.lock().unwrap().len(), 3);
        task.abort();
    }

    #[test]
    fn in_cluster_configuration() {
        let dir = std::env::temp_dir().join(format!("periscope-k8s-sa-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            ApiConfig::in_cluster_from("10.96.0.1", "443", &dir).is_err(),
            "no token"
        );
        std::fs::write(dir.join("token"), "t").unwrap();
        assert!(
            ApiConfig::in_cluster_from("10.96.0.1", "443", &dir).is_err(),
            "no CA"
        );
        std::fs::write(dir.join("ca.crt"), "not a certificate").unwrap();
        assert!(
            ApiConfig::in_cluster_from("10.96.0.1", "443", &dir).is_err(),
            "bad CA"
        );
        assert!(
            ApiConfig::in_cluster_from("10.96.0.1", "https", &dir).is_err(),
            "bad port"
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            container_id_from_status(&format!("containerd://{CID}")),
            Some(CID)
        );
        assert_eq!(container_id_from_status(CID), None);
        assert_eq!(container_id_from_status("docker://abc"), None);
    }
}
