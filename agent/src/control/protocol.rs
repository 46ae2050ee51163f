//! The control protocol spoken on the daemon's Unix socket.
//!
//! # Transport
//!
//! A stream Unix socket (default `/run/periscope/control.sock`, mode 0600,
//! owned by root). The daemon checks every connection's peer credentials
//! (`SO_PEERCRED`): a peer whose uid is not 0 receives one
//! `permission_denied` error response (in answer to its first request line,
//! which is not parsed) and the connection is closed.
//!
//! # Framing
//!
//! Newline-delimited JSON (UTF-8): the client writes one request object on
//! one line, the daemon answers with one response object on one line. A
//! connection may carry any number of request/response pairs, in order. A
//! request line is at most 64 KiB; a longer one is answered with a
//! `malformed` error and the connection is closed. A client that sends
//! nothing for 5 s is disconnected.
//!
//! # Requests
//!
//! ```text
//! {"cmd":"status"}                               full StatusReport
//! {"cmd":"enable","feature":"tls"}               feature: http | tls | dns | grpc | phases | metrics
//! {"cmd":"disable","feature":"tls"}
//! {"cmd":"filter"}                               show the current filter
//! {"cmd":"filter","set":{"include_pids":[42],"exclude_ports":[22]}}
//!                                                replace the whole filter (missing lists = empty)
//! {"cmd":"filter","clear":true}                  remove every filter: trace everything
//! {"cmd":"sample","ratio":0.1}                   head sampling ratio, 0.0..=1.0
//! {"cmd":"traces","last":20,"service":"nginx","min_duration_ms":5,"errors":true,"after_seq":0,"quiet_ms":1000}
//!                                                recent traces (every field optional)
//! {"cmd":"map"}                                  the service map seen on this node
//! {"cmd":"metrics"}                              the RED metrics' series
//! ```
//!
//! Filter lists: `include_pids`, `exclude_pids` (u32), `include_exes`,
//! `exclude_exes` (executable base name or full path), `include_ports`,
//! `exclude_ports` (u16, local or remote port), `include_cgroups` (cgroup v2
//! path such as `/system.slice/nginx.service`, descendants included).
//! Exclusions always win; every non-empty include list must match
//! (lists combine with AND, values inside one list with OR).
//! Unknown fields are rejected.
//!
//! # Responses
//!
//! ```text
//! {"ok":true,"result":{...}}
//! {"ok":false,"error":"human readable text","kind":"malformed"}
//! ```
//!
//! `kind` is one of `malformed` (not a valid request), `permission_denied`
//! (peer is not root), `unavailable` (the daemon is busy or shutting down),
//! `refused` (valid request the daemon could not carry out).
//!
//! Results: `status` → [`StatusReport`]; `enable`/`disable` →
//! [`FeatureChange`]; `filter` → [`FilterChange`]; `sample` →
//! [`SampleChange`]; `traces` → [`TracesResult`]; `map` →
//! [`crate::local_view::model::ServiceMap`]; `metrics` →
//! [`crate::red::snapshot::RedSnapshot`]. Every change result carries a human readable `message`.
//! `grpc` is accepted and recorded but reported with
//! `"available":false` ("not yet available").

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Longest request line accepted, newline excluded.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------- features

/// What can be switched on and off at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Feature {
    Http,
    Tls,
    Dns,
    Grpc,
    /// Latency-breakdown child spans (dns, connect, tls.handshake, ...).
    Phases,
    /// RED metrics (duration histograms) computed from the spans.
    Metrics,
}

impl Feature {
    pub const ALL: [Feature; 6] =
        [Feature::Http, Feature::Tls, Feature::Dns, Feature::Grpc, Feature::Phases, Feature::Metrics];

    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Http => "http",
            Feature::Tls => "tls",
            Feature::Dns => "dns",
            Feature::Grpc => "grpc",
            Feature::Phases => "phases",
            Feature::Metrics => "metrics",
        }
    }

    /// Whether this build can actually trace the feature.
    pub fn available(self) -> bool {
        true
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Feature {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        Feature::ALL
            .into_iter()
            .find(|f| f.as_str() == lower)
            .ok_or_else(|| format!("unknown feature {s:?} (known: http, tls, dns, grpc, phases, metrics)"))
    }
}

impl TryFrom<String> for Feature {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Feature> for String {
    fn from(f: Feature) -> String {
        f.as_str().to_string()
    }
}

// ---------------------------------------------------------------- filter

/// Which processes and connections are traced. Empty = everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    pub include_pids: Vec<u32>,
    pub exclude_pids: Vec<u32>,
    pub include_exes: Vec<String>,
    pub exclude_exes: Vec<String>,
    pub include_ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
    pub include_cgroups: Vec<String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Rejects values that could never match (empty names, port 0, relative cgroup paths).
    pub fn validate(&self) -> Result<(), String> {
        if self.include_pids.iter().chain(&self.exclude_pids).any(|&p| p == 0) {
            return Err("pid 0 is not a process".into());
        }
        if self.include_ports.iter().chain(&self.exclude_ports).any(|&p| p == 0) {
            return Err("port 0 is not a port".into());
        }
        if self
            .include_exes
            .iter()
            .chain(&self.exclude_exes)
            .any(|e| e.trim().is_empty())
        {
            return Err("empty executable name".into());
        }
        if let Some(c) = self.include_cgroups.iter().find(|c| !c.starts_with('/')) {
            return Err(format!(
                "cgroup {c:?} must be an absolute cgroup v2 path such as /system.slice/foo.service"
            ));
        }
        Ok(())
    }

}

impl fmt::Display for Filter {
    /// `none (everything is traced)` or e.g.
    /// `trace only: pid 42, 43; port 443 | never trace: exe sshd`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(out: &mut Vec<String>, what: &str, items: &[T]) {
            if !items.is_empty() {
                let items: Vec<String> = items.iter().map(|i| i.to_string()).collect();
                out.push(format!("{what} {}", items.join(", ")));
            }
        }
        if self.is_empty() {
            return f.write_str("none (everything is traced)");
        }
        let (mut inc, mut exc) = (Vec::new(), Vec::new());
        list(&mut inc, "pid", &self.include_pids);
        list(&mut inc, "exe", &self.include_exes);
        list(&mut inc, "port", &self.include_ports);
        list(&mut inc, "cgroup", &self.include_cgroups);
        list(&mut exc, "pid", &self.exclude_pids);
        list(&mut exc, "exe", &self.exclude_exes);
        list(&mut exc, "port", &self.exclude_ports);
        let mut parts = Vec::new();
        if !inc.is_empty() {
            parts.push(format!("trace only: {}", inc.join("; ")));
        }
        if !exc.is_empty() {
            parts.push(format!("never trace: {}", exc.join("; ")));
        }
        f.write_str(&parts.join(" | "))
    }
}

// ---------------------------------------------------------------- requests

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Enable {
        feature: Feature,
    },
    Disable {
        feature: Feature,
    },
    /// No `set` and no `clear`: show the current filter.
    Filter {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set: Option<Filter>,
        #[serde(default, skip_serializing_if = "is_false")]
        clear: bool,
    },
    Sample {
        ratio: f64,
    },
    Traces(TracesQuery),
    Map,
    Metrics,
}

/// `traces`: which recent traces to return (all optional).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracesQuery {
    /// The newest this many (default 20).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_duration_ms: Option<f64>,
    #[serde(skip_serializing_if = "is_false")]
    pub errors: bool,
    /// Only traces updated after this sequence number (see `updated_seq`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<u64>,
    /// Only traces that got no new span for this long.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiet_ms: Option<u64>,
}

/// Result of `traces`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TracesResult {
    /// How many traces the daemon keeps (0: the local view is off).
    pub kept: usize,
    /// Oldest first.
    pub traces: Vec<crate::local_view::model::TraceView>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Request {
    /// Parses one request line; the error text is ready for a `malformed` response.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let req: Request = serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
        req.validate().map_err(|e| format!("malformed request: {e}"))?;
        Ok(req)
    }

    /// Checks values serde cannot: ratio range, filter contents, `set` with `clear`.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Request::Sample { ratio } if !(0.0..=1.0).contains(ratio) => {
                Err(format!("sampling ratio {ratio} is outside 0.0..=1.0"))
            }
            Request::Traces(q) if q.min_duration_ms.is_some_and(|d| !(d >= 0.0)) => {
                Err("min_duration_ms must be a number >= 0".into())
            }
            Request::Filter {
                set: Some(_),
                clear: true,
            } => Err("filter: `set` and `clear` are exclusive".into()),
            Request::Filter { set: Some(f), .. } => f.validate(),
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------- responses

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was not valid JSON / not a known command / bad values.
    Malformed,
    /// The peer is not root.
    PermissionDenied,
    /// The daemon is busy or shutting down.
    Unavailable,
    /// A valid request the daemon could not carry out.
    Refused,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
}

impl Response {
    /// `{"ok":true,"result":value}`.
    pub fn ok<T: Serialize>(value: &T) -> Response {
        match serde_json::to_value(value) {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
                kind: None,
            },
            Err(e) => Response::error(ErrorKind::Refused, format!("could not encode the result: {e}")),
        }
    }

    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(message.into()),
            kind: Some(kind),
        }
    }

    /// The daemon could not carry out a valid request (e.g. attaching failed).
    pub fn refused(message: impl Into<String>) -> Response {
        Response::error(ErrorKind::Refused, message)
    }

    pub fn malformed(message: impl Into<String>) -> Response {
        Response::error(ErrorKind::Malformed, message)
    }

    /// One JSON line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"ok":false,"error":"could not encode the response","kind":"refused"}"#.to_string());
        s.push('\n');
        s
    }

    /// The typed result, or the error kind and text.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, (ErrorKind, String)> {
        if !self.ok {
            return Err((
                self.kind.unwrap_or(ErrorKind::Refused),
                self.error
                    .unwrap_or_else(|| "the daemon reported an error without a message".into()),
            ));
        }
        serde_json::from_value(self.result.unwrap_or(serde_json::Value::Null))
            .map_err(|e| (ErrorKind::Malformed, format!("unexpected answer from the daemon: {e}")))
    }
}

// ---------------------------------------------------------------- change results

/// Result of `enable` / `disable`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureChange {
    pub feature: Feature,
    /// The setting now in force.
    pub enabled: bool,
    /// Whether the setting differs from before.
    pub changed: bool,
    /// False for features this build cannot trace yet (the setting is still recorded).
    pub available: bool,
    pub message: String,
}

impl FeatureChange {
    pub fn new(feature: Feature, enabled: bool, was_enabled: bool) -> FeatureChange {
        let word = if enabled { "enabled" } else { "disabled" };
        let message = if !feature.available() {
            format!("{feature}: not yet available (setting recorded as {word}; nothing is traced for it)")
        } else if enabled == was_enabled {
            format!("{feature} was already {word}")
        } else {
            format!("{feature} {word}")
        };
        FeatureChange {
            feature,
            enabled,
            changed: enabled != was_enabled,
            available: feature.available(),
            message,
        }
    }
}

/// Result of `filter` (show, set or clear).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FilterChange {
    /// The filter now in force.
    pub filter: Filter,
    pub changed: bool,
    pub message: String,
}

impl FilterChange {
    pub fn shown(filter: &Filter) -> FilterChange {
        FilterChange {
            filter: filter.clone(),
            changed: false,
            message: format!("filter: {filter}"),
        }
    }
    pub fn set(new: &Filter, old: &Filter) -> FilterChange {
        let message = if new.is_empty() {
            "filter cleared: everything is traced".to_string()
        } else {
            format!("filter set: {new}")
        };
        FilterChange {
            filter: new.clone(),
            changed: new != old,
            message,
        }
    }
}

/// Result of `sample`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleChange {
    pub ratio: f64,
    pub previous: f64,
    pub message: String,
}

impl SampleChange {
    pub fn new(ratio: f64, previous: f64) -> SampleChange {
        SampleChange {
            ratio,
            previous,
            message: format!("sampling ratio {ratio} (was {previous})"),
        }
    }
}

// ---------------------------------------------------------------- status

/// Everything `periscope status` shows. A plain data struct the daemon fills.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReport {
    pub version: String,
    /// The daemon's pid.
    pub pid: u32,
    pub uptime_s: u64,
    /// `uname -r`.
    pub kernel_release: String,
    /// Kernel capabilities detected at start (btf, tp_btf, ring_buffer, ...).
    pub kernel: Vec<KernelFeature>,
    pub features: BTreeMap<Feature, FeatureStatus>,
    pub tls_libraries: Vec<TlsLibraryStatus>,
    /// Go executables found (Go carries its own TLS).
    #[serde(default)]
    pub go_programs: Vec<GoProgramStatus>,
    /// Processes seen with traffic.
    pub processes: Vec<ProcessStatus>,
    /// Connections tracked right now.
    pub connections_open: u64,
    /// Monotonic counters (`events_received`, `spans_exported`, ...).
    pub counters: BTreeMap<String, u64>,
    /// Ring-buffer write failures per kernel program.
    pub lost_per_probe: BTreeMap<String, u64>,
    pub exporter: ExporterStatus,
    pub filter: Filter,
    pub sample_ratio: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoProgramStatus {
    pub path: String,
    /// `go1.21.13`, or `unknown`.
    pub go_version: String,
    pub state: TlsState,
    /// Functions the uprobes are attached to.
    #[serde(default)]
    pub functions: Vec<String>,
    /// Where the struct offsets came from: `dwarf` or `table`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offsets: Option<String>,
    /// Processes running it.
    #[serde(default)]
    pub pids: Vec<u32>,
    /// grpc-go in it: `v1.33.3 hooked (table)`, or why its probes are off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_go: Option<String>,
    /// Why it is not visible, or what failed to attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFeature {
    pub name: String,
    pub available: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureStatus {
    pub enabled: bool,
    pub available: bool,
    /// Attach points of the kernel programs serving the feature.
    pub programs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Why the feature (or part of it) cannot work here, e.g. a missing
    /// capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsState {
    #[default]
    #[serde(rename = "attached")]
    Attached,
    #[serde(rename = "not visible")]
    NotVisible,
    /// Found, uprobes detached because the tls feature is disabled.
    #[serde(rename = "detached")]
    Detached,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsLibraryStatus {
    pub path: String,
    /// `openssl`, `boringssl`, `gnutls`, ...
    pub library: String,
    /// Symbols the uprobes are attached to.
    #[serde(default)]
    pub symbols: Vec<String>,
    pub state: TlsState,
    /// Why it is not visible (stripped, statically linked without symbols, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub pid: u32,
    pub service_name: String,
    pub executable: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExporterStatus {
    /// `stdout (text)`, `otlp grpc http://host:4317`, ...
    pub destination: String,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix seconds since when exports have been failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since_unix_s: Option<u64>,
    /// Unix seconds of the last delivered batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_unix_s: Option<u64>,
    pub queued: u64,
    pub queue_capacity: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(req: &Request, json: &str) {
        assert_eq!(serde_json::to_string(req).unwrap(), json);
        assert_eq!(&Request::parse(json.as_bytes()).unwrap(), req);
    }

    #[test]
    fn requests_round_trip() {
        roundtrip(&Request::Status, r#"{"cmd":"status"}"#);
        roundtrip(
            &Request::Enable { feature: Feature::Tls },
            r#"{"cmd":"enable","feature":"tls"}"#,
        );
        roundtrip(
            &Request::Disable { feature: Feature::Grpc },
            r#"{"cmd":"disable","feature":"grpc"}"#,
        );
        roundtrip(
            &Request::Filter {
                set: None,
                clear: false,
            },
            r#"{"cmd":"filter"}"#,
        );
        roundtrip(
            &Request::Filter { set: None, clear: true },
            r#"{"cmd":"filter","clear":true}"#,
        );
        roundtrip(&Request::Sample { ratio: 0.1 }, r#"{"cmd":"sample","ratio":0.1}"#);
        let f = Filter {
            include_pids: vec![42],
            exclude_ports: vec![22],
            ..Default::default()
        };
        let req = Request::Filter {
            set: Some(f.clone()),
            clear: false,
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(Request::parse(json.as_bytes()).unwrap(), req);
        // Missing lists default to empty.
        assert_eq!(
            Request::parse(br#"{"cmd":"filter","set":{"include_pids":[42],"exclude_ports":[22]}}"#).unwrap(),
            req
        );
    }

    #[test]
    fn garbage_is_malformed_with_a_clear_message() {
        for (line, needle) in [
            (&b"hello"[..], "malformed request"),
            (b"{}", "cmd"),
            (br#"{"cmd":"reboot"}"#, "reboot"),
            (br#"{"cmd":"enable","feature":"ftp"}"#, "unknown feature \"ftp\""),
            (br#"{"cmd":"enable"}"#, "feature"),
            (br#"{"cmd":"sample","ratio":1.5}"#, "outside 0.0..=1.0"),
            (br#"{"cmd":"sample","ratio":-0.1}"#, "outside"),
            (br#"{"cmd":"filter","set":{"pids":[1]}}"#, "pids"),
            (br#"{"cmd":"filter","set":{},"clear":true}"#, "exclusive"),
            (br#"{"cmd":"filter","set":{"include_ports":[0]}}"#, "port 0"),
            (br#"{"cmd":"filter","set":{"include_ports":[70000]}}"#, "70000"),
            (br#"{"cmd":"enable","feature":"tls","x":1}"#, "x"),
            (b"\xff\xfe", "malformed"),
        ] {
            let err = Request::parse(line).unwrap_err();
            assert!(err.starts_with("malformed request"), "{err}");
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn features_parse_and_print() {
        for f in Feature::ALL {
            assert_eq!(f.to_string().parse::<Feature>().unwrap(), f);
        }
        assert_eq!("TLS".parse::<Feature>().unwrap(), Feature::Tls);
        assert!(
            "ftp"
                .parse::<Feature>()
                .unwrap_err()
                .contains("known: http, tls, dns, grpc, phases")
        );
        assert!(Feature::Http.available() && Feature::Tls.available());
        assert!(Feature::Dns.available() && Feature::Grpc.available());
        assert_eq!(FeatureChange::new(Feature::Grpc, false, true).message, "grpc disabled");
        assert_eq!(FeatureChange::new(Feature::Tls, false, true).message, "tls disabled");
        assert!(!FeatureChange::new(Feature::Tls, true, true).changed);
    }

    #[test]
    fn responses_round_trip() {
        let ok = Response::ok(&SampleChange::new(0.5, 1.0));
        let line = ok.to_line();
        assert!(line.starts_with(r#"{"ok":true,"result":{"#) && line.ends_with('\n'));
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(back.clone().into_result::<SampleChange>().unwrap().ratio, 0.5);
        let err = Response::malformed("malformed request: x");
        assert_eq!(
            err.to_line(),
            "{\"ok\":false,\"error\":\"malformed request: x\",\"kind\":\"malformed\"}\n"
        );
        let back: Response = serde_json::from_str(r#"{"ok":false,"error":"nope"}"#).unwrap();
        assert_eq!(
            back.into_result::<StatusReport>().unwrap_err(),
            (ErrorKind::Refused, "nope".into())
        );
    }

    #[test]
    fn status_report_round_trips() {
        let mut r = StatusReport {
            version: "0.1.0".into(),
            sample_ratio: 1.0,
            ..Default::default()
        };
        r.features.insert(
            Feature::Tls,
            FeatureStatus {
                enabled: true,
                available: true,
                programs: vec!["uprobe:SSL_write".into()],
                note: None,
                unavailable: None,
            },
        );
        r.tls_libraries.push(TlsLibraryStatus {
            path: "/usr/bin/node".into(),
            library: "openssl".into(),
            state: TlsState::NotVisible,
            reason: Some("stripped".into()),
            ..Default::default()
        });
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""features":{"tls":{"#), "{json}");
        assert!(json.contains(r#""state":"not visible""#), "{json}");
        assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), r);
    }

    #[test]
    fn filter_display() {
        let all = Filter::default();
        assert_eq!(all.to_string(), "none (everything is traced)");
        let f = Filter {
            include_pids: vec![1, 2],
            exclude_exes: vec!["sshd".into()],
            ..Default::default()
        };
        assert_eq!(f.to_string(), "trace only: pid 1, 2 | never trace: exe sshd");
    }
}
