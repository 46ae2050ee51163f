//! The Kubernetes manifests (`deploy/`), checked by the real tools without a
//! cluster: `helm lint --strict` and `helm template` on the chart (default
//! values, and `ci/all-values.yaml`, which turns every option on),
//! `kubernetes-validate --strict` against the 1.33 API on what it renders
//! and on `deploy/daemonset.yaml`, and what the agent needs of its pod:
//! - exactly the capabilities BPF, PERFMON, SYS_ADMIN, SYS_PTRACE and
//!   DAC_READ_SEARCH after dropping all; not privileged; no privilege
//!   escalation; a read-only root file system; root; seccomp Unconfined;
//!   the host's PID namespace;
//! - NODE_NAME (from spec.nodeName) defined before any variable that says
//!   `$(NODE_NAME)`, and every `$(VAR)` defined before its use (Kubernetes
//!   expands only those); values given in the chart's values taken
//!   literally after that expansion and the agent's percent-decoding;
//! - a grace period longer than the OTLP timeout (10 s by default);
//! - the OTLP TLS variables pointing into read-only mounts of the
//!   Secrets/ConfigMaps named in the values;
//! - the TOML config file (`--config`) rendered and mounted when features,
//!   filters or sampling are set, with only keys the agent knows;
//! - the plain manifest equal to the chart's default rendering.
//!
//! These need no root and no agent. helm and kubernetes-validate come from
//! `cargo xtask setup --test-deps`; without them the tests fail.

use anyhow::{Context, Result, bail, ensure};
use periscope_tests::deploy::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// What the agent's pod must have: see the DaemonSet's comments.
const CAPABILITIES: [&str; 5] = [
    "BPF",
    "DAC_READ_SEARCH",
    "PERFMON",
    "SYS_ADMIN",
    "SYS_PTRACE",
];

/// Keys of the agent's config file (agent/src/control/config_file.rs,
/// `ConfigFile`, and `Filter` in agent/src/control/protocol.rs).
const CONFIG_KEYS: &[&str] = &[
    "otlp_endpoint",
    "otlp_protocol",
    "output",
    "payload_cap",
    "ring_buffer_mib",
    "max_connections",
    "socket",
    "metrics_address",
    "disabled_features",
    "filter",
    "sample_ratio",
    "phase_spans_min_duration",
];
const FILTER_KEYS: &[&str] = &[
    "include_pids",
    "exclude_pids",
    "include_exes",
    "exclude_exes",
    "include_ports",
    "exclude_ports",
    "include_cgroups",
];
const FEATURES: &[&str] = &["http", "tls", "dns", "grpc", "phases"];

/// Labels Helm's objects carry and the plain manifest does not.
const HELM_LABELS: &[&str] = &[
    "helm.sh/chart",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
];

fn all_values() -> String {
    all_values_file().to_str().expect("UTF-8 path").to_string()
}

/// `helm template` with `args`, as JSON documents.
fn rendered(args: &[&str]) -> Result<Vec<Value>> {
    yaml_docs(&render(args)?)
}

fn daemonset(docs: &[Value]) -> Result<&Value> {
    only(docs, "DaemonSet")
}

fn pod_spec(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]
}

fn agent_container(ds: &Value) -> Result<&Value> {
    let containers = pod_spec(ds)["containers"]
        .as_array()
        .context("no containers")?;
    ensure!(
        containers.len() == 1,
        "one container expected, found {}",
        containers.len()
    );
    let c = &containers[0];
    ensure!(
        c["name"] == "agent",
        "the container is {}, not agent",
        c["name"]
    );
    Ok(c)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| s.to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn env_list(c: &Value) -> Vec<&Value> {
    c["env"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    env_list(c).into_iter().find(|e| e["name"] == name)
}

fn env_str<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    env_value(c, name).and_then(|e| e["value"].as_str())
}

/// The `$(VAR)` references Kubernetes expands in `value` (`$$` escapes).
fn references(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = value.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            match b[i + 1] {
                b'$' => i += 2,
                b'(' => match value[i + 2..].find(')') {
                    Some(end) => {
                        out.push(value[i + 2..i + 2 + end].to_string());
                        i += 2 + end + 1;
                    }
                    None => break,
                },
                _ => i += 1,
            }
        } else {
            i += 1;
        }
    }
    out
}

/// `value` as Kubernetes expands it, given the variables defined before.
fn expand(value: &str, defined: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("$(")
            && let Some(end) = t.find(')')
            && let Some(v) = defined.get(&t[..end])
        {
            out.push_str(v);
            rest = &t[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The agent's reading of a `k=v,k2=v2` list (agent/src/export/config.rs,
/// `parse_key_values`): trimmed, percent-decoded, empty entries skipped.
fn parse_kv(s: &str) -> Result<BTreeMap<String, String>> {
    fn decode(s: &str) -> Result<String> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = s.get(i + 1..i + 3).context("short percent escape")?;
                out.push(
                    u8::from_str_radix(hex, 16).with_context(|| format!("bad escape %{hex}"))?,
                );
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        Ok(String::from_utf8(out)?)
    }
    let mut out = BTreeMap::new();
    for entry in s.split(',').filter(|e| !e.trim().is_empty()) {
        let (k, v) = entry
            .split_once('=')
            .with_context(|| format!("{entry:?} is not k=v"))?;
        out.insert(decode(k.trim())?, decode(v.trim())?);
    }
    Ok(out)
}

/// Everything the agent's DaemonSet must be, whatever the values; all
/// problems at once.
fn check_daemonset(what: &str, docs: &[Value]) -> Result<()> {
    let ds = daemonset(docs)?;
    let spec = pod_spec(ds);
    let c = agent_container(ds)?;
    let sc = &c["securityContext"];
    let mut problems = Vec::new();
    let mut check = |ok: bool, msg: String| {
        if !ok {
            problems.push(msg);
        }
    };

    let mut added = strings(&sc["capabilities"]["add"]);
    added.sort();
    check(
        added == CAPABILITIES,
        format!("capabilities.add is {added:?}, want exactly {CAPABILITIES:?}"),
    );
    check(
        strings(&sc["capabilities"]["drop"]) == ["ALL"],
        format!(
            "capabilities.drop is {}, want [ALL]",
            sc["capabilities"]["drop"]
        ),
    );
    check(
        sc["privileged"] == false,
        format!("privileged is {}, want false", sc["privileged"]),
    );
    check(
        sc["allowPrivilegeEscalation"] == false,
        format!(
            "allowPrivilegeEscalation is {}, want false",
            sc["allowPrivilegeEscalation"]
        ),
    );
    check(
        sc["readOnlyRootFilesystem"] == true,
        format!(
            "readOnlyRootFilesystem is {}, want true",
            sc["readOnlyRootFilesystem"]
        ),
    );
    check(
        sc["runAsUser"] == 0,
        format!("runAsUser is {}, want 0", sc["runAsUser"]),
    );
    check(
        sc["seccompProfile"]["type"] == "Unconfined",
        format!(
            "seccompProfile is {}, want Unconfined",
            sc["seccompProfile"]
        ),
    );
    check(
        spec["hostPID"] == true,
        format!("hostPID is {}, want true", spec["hostPID"]),
    );
    let host_network = spec["hostNetwork"] == true;
    let dns = if host_network {
        "ClusterFirstWithHostNet"
    } else {
        "ClusterFirst"
    };
    check(
        spec["dnsPolicy"] == dns,
        format!(
            "dnsPolicy is {} with hostNetwork {host_network}, want {dns}",
            spec["dnsPolicy"]
        ),
    );

    // Longer than the OTLP timeout, so the shutdown flush can finish.
    let otlp_timeout_s = env_str(c, "OTEL_EXPORTER_OTLP_TIMEOUT")
        .map(|ms| {
            ms.parse::<u64>()
                .map(|ms| ms.div_ceil(1000))
                .unwrap_or(u64::MAX)
        })
        .unwrap_or(10);
    let grace = spec["terminationGracePeriodSeconds"].as_u64();
    check(
        grace.is_some_and(|g| g > otlp_timeout_s.max(10)),
        format!(
            "terminationGracePeriodSeconds is {grace:?}, want more than {} s",
            otlp_timeout_s.max(10)
        ),
    );

    // Environment: NODE_NAME first from the downward API; every $(VAR)
    // defined before its use; no variable twice.
    let env = env_list(c);
    let node = env.iter().position(|e| e["name"] == "NODE_NAME");
    check(
        node.is_some_and(|i| env[i]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "NODE_NAME is not taken from fieldRef spec.nodeName".to_string(),
    );
    let mut seen = BTreeSet::new();
    for (i, e) in env.iter().enumerate() {
        let name = e["name"].as_str().unwrap_or("?");
        check(
            seen.insert(name.to_string()),
            format!("env {name} is defined twice"),
        );
        for r in references(e["value"].as_str().unwrap_or("")) {
            let before = env[..i].iter().any(|d| d["name"] == r.as_str());
            check(
                before,
                format!(
                    "env {name} uses $({r}), which is not defined before it (Kubernetes leaves it unexpanded)"
                ),
            );
        }
    }
    let attrs = env_str(c, "OTEL_RESOURCE_ATTRIBUTES").unwrap_or("");
    check(
        attrs.split(',').any(|a| a == "k8s.node.name=$(NODE_NAME)"),
        format!("OTEL_RESOURCE_ATTRIBUTES is {attrs:?}, without k8s.node.name=$(NODE_NAME)"),
    );

    // Volumes: the host's BTF and tracefs read-only, the socket directory
    // writable, nothing else from the host; Secrets and ConfigMaps read-only.
    let volumes: BTreeMap<String, &Value> = spec["volumes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| (v["name"].as_str().unwrap_or("?").to_string(), v))
                .collect()
        })
        .unwrap_or_default();
    let mounts: Vec<&Value> = c["volumeMounts"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut host_paths = BTreeMap::new();
    for m in &mounts {
        let name = m["name"].as_str().unwrap_or("?");
        let Some(v) = volumes.get(name) else {
            check(false, format!("volumeMount {name} has no volume"));
            continue;
        };
        let read_only = m["readOnly"] == true;
        if let Some(path) = v["hostPath"]["path"].as_str() {
            host_paths.insert(
                path.to_string(),
                (
                    m["mountPath"].as_str().unwrap_or("").to_string(),
                    read_only,
                    v["hostPath"]["type"].clone(),
                ),
            );
        }
        if v.get("secret").is_some() || v.get("configMap").is_some() {
            check(
                read_only,
                format!("volumeMount {name} (a Secret or ConfigMap) is not readOnly"),
            );
        }
    }
    let want = [
        ("/sys/kernel/btf", true, "Directory"),
        ("/sys/kernel/tracing", true, "Directory"),
        ("/run/periscope", false, "DirectoryOrCreate"),
    ];
    for (path, read_only, kind) in want {
        match host_paths.get(path) {
            Some((at, ro, t)) => {
                check(at == path, format!("host {path} is mounted at {at}"));
                check(
                    *ro == read_only,
                    format!("host {path}: readOnly is {ro}, want {read_only}"),
                );
                check(t == kind, format!("host {path}: type is {t}, want {kind}"));
            }
            None => check(false, format!("host {path} is not mounted")),
        }
    }
    let all_host_paths = volumes
        .values()
        .filter_map(|v| v["hostPath"]["path"].as_str());
    let extra: Vec<&str> = all_host_paths
        .filter(|p| !want.iter().any(|w| w.0 == *p))
        .collect();
    check(
        extra.is_empty(),
        format!("host paths mounted that the agent does not need: {extra:?}"),
    );

    // The config file, when named, is a key of a rendered ConfigMap mounted
    // where --config says.
    let args = strings(&c["args"]);
    check(
        args.first().map(String::as_str) == Some("run"),
        format!("args are {args:?}, not `run ...`"),
    );
    if let Some(i) = args.iter().position(|a| a == "--config") {
        match config_file_of(docs, ds, args.get(i + 1).map(String::as_str).unwrap_or("")) {
            Ok(_) => {}
            Err(e) => check(false, format!("{e:#}")),
        }
    }

    if !problems.is_empty() {
        bail!(
            "{what}: the DaemonSet is wrong:\n- {}\n{}",
            problems.join("\n- "),
            serde_json::to_string_pretty(ds)?
        );
    }
    Ok(())
}

/// The TOML text of the `--config` file at `path`: the ConfigMap key that a
/// read-only mount puts there.
fn config_file_of(docs: &[Value], ds: &Value, path: &str) -> Result<String> {
    let c = agent_container(ds)?;
    let (dir, file) = path
        .rsplit_once('/')
        .with_context(|| format!("--config {path:?} is not a path"))?;
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == dir)
        .with_context(|| format!("nothing is mounted at {dir} for --config {path}"))?;
    ensure!(
        mount["readOnly"] == true,
        "the config mount at {dir} is not readOnly"
    );
    let volume = pod_spec(ds)["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .context("the config mount has no volume")?;
    let cm_name = volume["configMap"]["name"]
        .as_str()
        .context("the config volume is not a ConfigMap")?;
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm_name)
        .with_context(|| format!("ConfigMap {cm_name} is not rendered"))?;
    ensure!(
        cm["metadata"]["namespace"] == ds["metadata"]["namespace"],
        "ConfigMap {cm_name} is in namespace {}, the DaemonSet in {}",
        cm["metadata"]["namespace"],
        ds["metadata"]["namespace"]
    );
    let text = cm["data"][file]
        .as_str()
        .with_context(|| format!("ConfigMap {cm_name} has no key {file}"))?;
    Ok(text.to_string())
}

/// The config file as TOML, with only keys and values the agent accepts.
fn parse_config(text: &str) -> Result<toml::Table> {
    let table: toml::Table =
        toml::from_str(text).with_context(|| format!("the config file is not TOML:\n{text}"))?;
    for (k, v) in &table {
        ensure!(
            CONFIG_KEYS.contains(&k.as_str()),
            "config key {k} is unknown to the agent:\n{text}"
        );
        if k == "filter" {
            let f = v.as_table().context("filter is not a table")?;
            for fk in f.keys() {
                ensure!(
                    FILTER_KEYS.contains(&fk.as_str()),
                    "filter key {fk} is unknown to the agent:\n{text}"
                );
            }
        }
    }
    if let Some(features) = table.get("disabled_features") {
        for f in features
            .as_array()
            .context("disabled_features is not an array")?
        {
            ensure!(
                f.as_str().is_some_and(|f| FEATURES.contains(&f)),
                "disabled feature {f:?} is unknown to the agent"
            );
        }
    }
    if let Some(r) = table.get("sample_ratio") {
        let r = r
            .as_float()
            .with_context(|| format!("sample_ratio {r:?} is not a TOML float"))?;
        ensure!(
            (0.0..=1.0).contains(&r),
            "sample_ratio {r} is outside 0..=1"
        );
    }
    Ok(table)
}

/// The config file the rendered DaemonSet names with --config, if any.
fn config_of(docs: &[Value]) -> Result<Option<toml::Table>> {
    let ds = daemonset(docs)?;
    let args = strings(&agent_container(ds)?["args"]);
    match args.iter().position(|a| a == "--config") {
        None => Ok(None),
        Some(i) => {
            let text = config_file_of(docs, ds, args.get(i + 1).map(String::as_str).unwrap_or(""))?;
            Ok(Some(parse_config(&text)?))
        }
    }
}

/// A TOML array of strings or integers, as text ("22", "nginx").
fn toml_list(v: Option<&toml::Value>) -> Vec<String> {
    v.and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .map(|x| match x {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Helm's own labels removed, as the plain manifest has none.
fn without_helm_labels(mut v: Value) -> Value {
    fn strip(labels: &mut Value) {
        if let Some(m) = labels.as_object_mut() {
            for l in HELM_LABELS {
                m.remove(*l);
            }
        }
    }
    strip(&mut v["metadata"]["labels"]);
    if v["spec"]["template"]["metadata"]["labels"].is_object() {
        strip(&mut v["spec"]["template"]["metadata"]["labels"]);
    }
    v
}

#[test]
fn chart_lints_strictly_with_default_and_all_values() -> Result<()> {
    let chart = chart_dir();
    let chart = chart.to_str().context("UTF-8")?;
    for args in [
        vec!["lint", "--strict", chart],
        vec!["lint", "--strict", chart, "-f", &all_values()],
    ] {
        let out = helm(&args)?;
        ensure!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm {args:?}:\n{out}"
        );
        ensure!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "helm {args:?}:\n{out}"
        );
    }
    Ok(())
}

#[test]
fn rendered_chart_and_plain_manifest_pass_strict_schema_validation() -> Result<()> {
    let dir = periscope_tests::proc::TempDir::new("deploy")?;
    let all = all_values();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("default", vec![]),
        ("all-values", vec!["-f", &all]),
        (
            "ca-from-configmap",
            vec![
                "--set",
                "otlp.tls.ca.configMap=collector-ca",
                "--set",
                "otlp.headers.x-tenant=a",
            ],
        ),
        (
            "no-rbac-no-sa",
            vec![
                "--set",
                "rbac.create=false",
                "--set",
                "serviceAccount.create=false",
            ],
        ),
        (
            "no-endpoint-no-apparmor",
            vec!["--set", "otlp.endpoint=", "--set", "appArmorProfile="],
        ),
    ];
    let mut files = Vec::new();
    for (name, args) in &cases {
        let yaml = render(args)?;
        ensure!(
            yaml.contains("kind: DaemonSet"),
            "{name}: no DaemonSet rendered:\n{yaml}"
        );
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, yaml)?;
        files.push(file);
    }
    let plain = plain_manifest();
    files.push(plain.clone());
    let paths: Vec<&std::path::Path> = files.iter().map(|f| f.as_path()).collect();
    let report = kubernetes_validate(&paths)?;
    // One line per resource: the plain manifest's five objects among them.
    for kind in [
        "namespace",
        "serviceaccount",
        "clusterrole",
        "clusterrolebinding",
        "daemonset",
    ] {
        ensure!(
            report.contains(&format!(
                "{} passed for resource {kind}/periscope",
                plain.display()
            )),
            "{kind}/periscope of the plain manifest not validated:\n{report}"
        );
    }
    ensure!(
        report.contains("configmap/periscope-agent"),
        "the ConfigMap of all-values.yaml was not validated:\n{report}"
    );
    Ok(())
}

#[test]
fn schema_validation_catches_a_broken_daemonset() -> Result<()> {
    // The validator itself must fail on what the API would refuse: a
    // capability list that is not a list, and an unknown field.
    let good = std::fs::read_to_string(plain_manifest())?;
    let broken = good.replacen(
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesystem: true\n            readOnlyRootFileSystem: true",
        1,
    );
    ensure!(
        broken != good,
        "the plain manifest has no readOnlyRootFilesystem line"
    );
    let e = kubernetes_validate_text("broken", &broken)
        .err()
        .context("kubernetes-validate accepted an unknown field")?;
    ensure!(format!("{e:#}").contains("readOnlyRootFileSystem"), "{e:#}");
    Ok(())
}

#[test]
fn daemonset_is_what_the_agent_needs_with_default_and_all_values() -> Result<()> {
    let default = rendered(&[])?;
    check_daemonset("default values", &default)?;
    let ds = daemonset(&default)?;
    let c = agent_container(ds)?;
    let spec = pod_spec(ds);
    ensure!(spec["hostNetwork"] == false, "hostNetwork is on by default");
    ensure!(
        spec.get("priorityClassName").is_none(),
        "a priority class by default: {}",
        spec["priorityClassName"]
    );
    let chart_yaml = yaml_docs(&std::fs::read_to_string(chart_dir().join("Chart.yaml"))?)?;
    let app_version = chart_yaml[0]["appVersion"]
        .as_str()
        .context("no appVersion in Chart.yaml")?;
    ensure!(
        c["image"] == format!("localhost/periscope:{app_version}").as_str(),
        "default image {} is not localhost/periscope at the chart's appVersion {app_version}",
        c["image"]
    );
    ensure!(
        env_str(c, "OTEL_EXPORTER_OTLP_ENDPOINT")
            == Some("http://otel-collector.observability:4317"),
        "default endpoint {:?}",
        env_str(c, "OTEL_EXPORTER_OTLP_ENDPOINT")
    );
    ensure!(env_str(c, "OTEL_EXPORTER_OTLP_PROTOCOL") == Some("grpc"));
    ensure!(env_str(c, "RUST_LOG") == Some("info"));
    ensure!(strings(&c["args"]) == ["run"], "default args {}", c["args"]);
    for tls in [
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        "OTEL_EXPORTER_OTLP_INSECURE",
        "OTEL_EXPORTER_OTLP_HEADERS",
    ] {
        ensure!(env_value(c, tls).is_none(), "{tls} is set by default");
    }

    let all = rendered(&["-f", &all_values()])?;
    check_daemonset("ci/all-values.yaml", &all)?;
    let ds = daemonset(&all)?;
    let spec = pod_spec(ds);
    ensure!(spec["priorityClassName"] == "system-node-critical");
    ensure!(spec["hostNetwork"] == true);
    ensure!(spec["imagePullSecrets"][0]["name"] == "regcred");
    ensure!(ds["spec"]["template"]["metadata"]["labels"]["example.com/team"] == "observability");
    ensure!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "10%");
    let c = agent_container(ds)?;
    ensure!(
        c["image"] == "registry.example.com/observability/periscope:0.1.0-test",
        "{}",
        c["image"]
    );
    ensure!(
        strings(&c["args"]).ends_with(&["--ring-buffer-mib".to_string(), "16".to_string()]),
        "{}",
        c["args"]
    );
    ensure!(c["envFrom"][0]["secretRef"]["name"] == "periscope-extra-env");
    ensure!(env_str(c, "OTEL_BSP_MAX_QUEUE_SIZE") == Some("16384"));
    ensure!(env_str(c, "OTEL_EXPORTER_OTLP_TIMEOUT") == Some("5000"));
    ensure!(
        config_of(&all)?.is_some(),
        "all-values.yaml sets filters, but no --config"
    );
    Ok(())
}

#[test]
fn headers_and_resource_attributes_reach_the_agent_literally() -> Result<()> {
    // What the agent sees after Kubernetes' $(VAR) expansion and its own
    // percent-decoding must be the values as written.
    let docs = rendered(&["-f", &all_values()])?;
    let c = agent_container(daemonset(&docs)?)?;
    let secret_headers = "api-key=abc123";
    let mut defined = BTreeMap::new();
    let mut seen = BTreeMap::new();
    for e in env_list(c) {
        let name = e["name"].as_str().unwrap_or("?").to_string();
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &defined)
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            "node-1".to_string()
        } else if e["valueFrom"]["secretKeyRef"]["name"] == "periscope-otlp" {
            ensure!(
                e["valueFrom"]["secretKeyRef"]["key"] == "otlp-headers",
                "{e}"
            );
            secret_headers.to_string()
        } else {
            bail!("env {name}: unexpected source {e}");
        };
        defined.insert(name.clone(), value.clone());
        seen.insert(name, value);
    }
    let headers = parse_kv(
        seen.get("OTEL_EXPORTER_OTLP_HEADERS")
            .context("no OTEL_EXPORTER_OTLP_HEADERS")?,
    )?;
    let want: BTreeMap<String, String> = [
        ("x-tenant", "team-a"),
        ("x-note", "a,b 100% $(NODE_NAME)"),
        ("api-key", "abc123"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    ensure!(
        headers == want,
        "headers as the agent reads them: {headers:?}, want {want:?}"
    );
    let attrs = parse_kv(
        seen.get("OTEL_RESOURCE_ATTRIBUTES")
            .context("no OTEL_RESOURCE_ATTRIBUTES")?,
    )?;
    let want: BTreeMap<String, String> = [
        ("k8s.node.name", "node-1"),
        ("k8s.cluster.name", "prod-eu-1"),
        ("deployment.environment.name", "production"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    ensure!(
        attrs == want,
        "resource attributes as the agent reads them: {attrs:?}, want {want:?}"
    );

    // Headers only from the Secret: the variable comes straight from it.
    let docs = rendered(&["--set", "otlp.headersSecret.name=otlp-key"])?;
    check_daemonset("headersSecret only", &docs)?;
    let c = agent_container(daemonset(&docs)?)?;
    let h = env_value(c, "OTEL_EXPORTER_OTLP_HEADERS").context("no OTEL_EXPORTER_OTLP_HEADERS")?;
    ensure!(h["valueFrom"]["secretKeyRef"]["name"] == "otlp-key", "{h}");
    ensure!(
        h["valueFrom"]["secretKeyRef"]["key"] == "otlp-headers",
        "{h}"
    );
    ensure!(env_value(c, "PERISCOPE_OTLP_SECRET_HEADERS").is_none());
    Ok(())
}

#[test]
fn tls_values_set_the_otlp_tls_variables_and_read_only_mounts() -> Result<()> {
    for (what, ca_source) in [
        ("Secret", "otlp.tls.ca.secret=collector-ca"),
        ("ConfigMap", "otlp.tls.ca.configMap=collector-ca"),
    ] {
        let docs = rendered(&[
            "--set",
            "otlp.endpoint=https://collector.example.com:4317",
            "--set",
            ca_source,
            "--set",
            "otlp.tls.client.secret=agent-client",
        ])?;
        check_daemonset(&format!("TLS with the CA in a {what}"), &docs)?;
        let ds = daemonset(&docs)?;
        let c = agent_container(ds)?;
        ensure!(
            env_str(c, "OTEL_EXPORTER_OTLP_ENDPOINT") == Some("https://collector.example.com:4317")
        );
        for (var, source, key) in [
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "collector-ca", "ca.crt"),
            (
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                "agent-client",
                "tls.crt",
            ),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "agent-client", "tls.key"),
        ] {
            let path = env_str(c, var).with_context(|| format!("{var} is not set ({what})"))?;
            let (dir, file) = path.rsplit_once('/').context("not a path")?;
            ensure!(file == key, "{var}={path}: file {file}, want {key}");
            let mount = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["mountPath"] == dir)
                .with_context(|| format!("{var}={path}: nothing mounted at {dir}"))?;
            ensure!(
                mount["readOnly"] == true,
                "{var}: the mount at {dir} is not readOnly"
            );
            let volume = pod_spec(ds)["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == mount["name"])
                .context("mount without volume")?;
            let named = volume["secret"]["secretName"]
                .as_str()
                .or(volume["configMap"]["name"].as_str());
            ensure!(
                named == Some(source),
                "{var}: volume {volume} is not {source}"
            );
            if var == "OTEL_EXPORTER_OTLP_CERTIFICATE" && what == "ConfigMap" {
                ensure!(
                    volume.get("configMap").is_some(),
                    "the CA volume is not the ConfigMap: {volume}"
                );
            }
        }
    }
    let e = render_fails(&[
        "--set",
        "otlp.tls.ca.secret=a",
        "--set",
        "otlp.tls.ca.configMap=b",
    ])?;
    ensure!(e.contains("not both"), "{e}");
    Ok(())
}

#[test]
fn config_file_is_rendered_and_mounted_only_when_needed() -> Result<()> {
    let default = rendered(&[])?;
    ensure!(config_of(&default)?.is_none(), "--config by default");
    ensure!(
        !default.iter().any(|d| d["kind"] == "ConfigMap"),
        "a ConfigMap by default: {:?}",
        kinds(&default)
    );

    let docs = rendered(&["--set", "sampleRatio=0.1"])?;
    check_daemonset("sampleRatio", &docs)?;
    let cfg = config_of(&docs)?.context("sampleRatio set, but no --config")?;
    ensure!(
        cfg.get("sample_ratio").and_then(|r| r.as_float()) == Some(0.1),
        "{cfg:?}"
    );

    let docs = rendered(&["--set", "sampleRatio=0"])?;
    let cfg = config_of(&docs)?.context("sampleRatio=0 set, but no --config")?;
    ensure!(
        cfg.get("sample_ratio").and_then(|r| r.as_float()) == Some(0.0),
        "{cfg:?}"
    );

    let docs = rendered(&[
        "--set",
        "filter.excludePorts={22}",
        "--set",
        "filter.includeExes={nginx,envoy}",
    ])?;
    check_daemonset("filter", &docs)?;
    let cfg = config_of(&docs)?.context("filter set, but no --config")?;
    let f = cfg
        .get("filter")
        .and_then(|f| f.as_table())
        .context("no [filter]")?;
    ensure!(toml_list(f.get("exclude_ports")) == ["22"], "{f:?}");
    ensure!(
        toml_list(f.get("include_exes")) == ["nginx", "envoy"],
        "{f:?}"
    );

    let docs = rendered(&["--set", "disabledFeatures={tls,dns}"])?;
    let cfg = config_of(&docs)?.context("disabledFeatures set, but no --config")?;
    ensure!(
        toml_list(cfg.get("disabled_features")) == ["tls", "dns"],
        "{cfg:?}"
    );

    let all = rendered(&["-f", &all_values()])?;
    let cfg = config_of(&all)?.context("no config with all values")?;
    let keys: Vec<&String> = cfg.keys().collect();
    ensure!(
        keys == [
            "disabled_features",
            "filter",
            "phase_spans_min_duration",
            "sample_ratio"
        ],
        "config keys {keys:?}"
    );
    // A change of the file rolls the pods.
    let ds = daemonset(&all)?;
    ensure!(
        ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"].is_string(),
        "no checksum/config annotation"
    );
    Ok(())
}

#[test]
fn metrics_are_off_by_default_and_scrapeable_when_on() -> Result<()> {
    let default = rendered(&[])?;
    let ds = daemonset(&default)?;
    let c = agent_container(ds)?;
    ensure!(c.get("ports").is_none(), "ports by default: {}", c["ports"]);
    ensure!(!strings(&c["args"]).contains(&"--metrics-address".to_string()));
    ensure!(
        ds["spec"]["template"]["metadata"]
            .get("annotations")
            .is_none(),
        "pod annotations by default"
    );

    let docs = rendered(&["--set", "metrics.enabled=true"])?;
    check_daemonset("metrics", &docs)?;
    let ds = daemonset(&docs)?;
    let c = agent_container(ds)?;
    let args = strings(&c["args"]);
    let i = args
        .iter()
        .position(|a| a == "--metrics-address")
        .context("no --metrics-address")?;
    ensure!(
        args.get(i + 1).map(String::as_str) == Some("0.0.0.0:9464"),
        "{args:?}"
    );
    ensure!(
        c["ports"][0]["containerPort"] == 9464 && c["ports"][0]["name"] == "metrics",
        "{}",
        c["ports"]
    );
    let a = &ds["spec"]["template"]["metadata"]["annotations"];
    ensure!(
        a["prometheus.io/scrape"] == "true" && a["prometheus.io/port"] == "9464",
        "{a}"
    );
    ensure!(a["prometheus.io/path"] == "/metrics", "{a}");
    Ok(())
}

#[test]
fn rbac_and_service_account_follow_their_switches() -> Result<()> {
    let docs = rendered(&[])?;
    let sa = only(&docs, "ServiceAccount")?;
    let role = only(&docs, "ClusterRole")?;
    let binding = only(&docs, "ClusterRoleBinding")?;
    let ds = daemonset(&docs)?;
    ensure!(pod_spec(ds)["serviceAccountName"] == sa["metadata"]["name"]);
    ensure!(sa["metadata"]["namespace"] == "periscope");
    let rules = role["rules"].as_array().context("no rules")?;
    let rule = |group: &str, resource: &str| {
        rules
            .iter()
            .find(|r| strings(&r["apiGroups"]) == [group] && strings(&r["resources"]) == [resource])
            .map(|r| {
                let mut v = strings(&r["verbs"]);
                v.sort();
                v
            })
    };
    ensure!(
        rule("", "pods") == Some(vec!["get".into(), "list".into(), "watch".into()]),
        "{rules:?}"
    );
    ensure!(
        rule("apps", "replicasets") == Some(vec!["get".into()]),
        "{rules:?}"
    );
    // The Kubernetes API lookup (agent/src/discovery/kubernetes_api.rs)
    // follows a Job to its CronJob.
    ensure!(
        rule("batch", "jobs") == Some(vec!["get".into()]),
        "{rules:?}"
    );
    ensure!(
        rules.len() == 3,
        "more rules than the metadata lookup needs: {rules:?}"
    );
    ensure!(binding["roleRef"]["name"] == role["metadata"]["name"]);
    ensure!(binding["subjects"][0]["name"] == sa["metadata"]["name"]);
    ensure!(binding["subjects"][0]["namespace"] == "periscope");

    let docs = rendered(&["--set", "rbac.create=false"])?;
    ensure!(
        !docs
            .iter()
            .any(|d| d["kind"] == "ClusterRole" || d["kind"] == "ClusterRoleBinding"),
        "RBAC with rbac.create=false: {:?}",
        kinds(&docs)
    );
    only(&docs, "ServiceAccount")?;

    let docs = rendered(&[
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=existing",
    ])?;
    ensure!(
        !docs.iter().any(|d| d["kind"] == "ServiceAccount"),
        "{:?}",
        kinds(&docs)
    );
    ensure!(pod_spec(daemonset(&docs)?)["serviceAccountName"] == "existing");
    ensure!(only(&docs, "ClusterRoleBinding")?["subjects"][0]["name"] == "existing");
    Ok(())
}

#[test]
fn values_the_agent_would_refuse_are_refused_at_install() -> Result<()> {
    for (set, needle) in [
        ("otlp.protocol=http/json", "/otlp/protocol"),
        ("sampleRatio=1.5", "/sampleRatio"),
        ("disabledFeatures={ftp}", "/disabledFeatures/0"),
        (
            "filter.includeCgroups={relative}",
            "/filter/includeCgroups/0",
        ),
        ("filter.excludePorts={0}", "/filter/excludePorts/0"),
        ("otlp.endpoint=ftp://collector", "/otlp/endpoint"),
        (
            "terminationGracePeriodSeconds=5",
            "/terminationGracePeriodSeconds",
        ),
        ("phaseSpansMinDuration=soon", "/phaseSpansMinDuration"),
        ("otlpEndpoint=http://typo:4317", "otlpEndpoint"),
    ] {
        let e = render_fails(&["--set", set])?;
        ensure!(
            e.contains(needle),
            "--set {set}: helm's error does not name {needle}:\n{e}"
        );
    }
    Ok(())
}

#[test]
fn plain_manifest_is_the_charts_default_rendering() -> Result<()> {
    let plain = yaml_docs(&std::fs::read_to_string(plain_manifest())?)?;
    let ns = only(&plain, "Namespace")?;
    ensure!(ns["metadata"]["name"] == "periscope");
    ensure!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged",
        "the namespace does not admit privileged pods: {ns}"
    );
    check_daemonset("deploy/daemonset.yaml", &plain)?;

    let chart: Vec<Value> = rendered(&["--set", "image.tag=dev"])?
        .into_iter()
        .map(without_helm_labels)
        .collect();
    let plain: Vec<&Value> = plain.iter().filter(|d| d["kind"] != "Namespace").collect();
    let key = |d: &Value| {
        format!(
            "{}/{}",
            d["kind"].as_str().unwrap_or("?"),
            d["metadata"]["name"].as_str().unwrap_or("?")
        )
    };
    let chart_keys: BTreeSet<String> = chart.iter().map(key).collect();
    let plain_keys: BTreeSet<String> = plain.iter().map(|d| key(d)).collect();
    ensure!(
        chart_keys == plain_keys,
        "deploy/daemonset.yaml has {plain_keys:?}, the chart's defaults {chart_keys:?}"
    );
    for c in &chart {
        let p = plain.iter().find(|p| key(p) == key(c)).expect("same keys");
        ensure!(
            *p == c,
            "{} differs between deploy/daemonset.yaml and the chart's defaults (helm template periscope deploy/helm/periscope -n periscope --set image.tag=dev):\nplain:\n{}\nchart:\n{}",
            key(c),
            serde_json::to_string_pretty(p)?,
            serde_json::to_string_pretty(c)?
        );
    }
    Ok(())
}

#[test]
fn kubernetes_variable_references_are_read_as_kubernetes_does() {
    // The two helpers the checks above rely on.
    assert_eq!(
        references("k8s.node.name=$(NODE_NAME),a=$$(X),b=$(Y)"),
        ["NODE_NAME", "Y"]
    );
    assert_eq!(references("no refs $ here $("), Vec::<String>::new());
    let defined: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
    assert_eq!(expand("$(A)-$$(A)-$(B)-$x", &defined), "1-$(A)-$(B)-$x");
    assert_eq!(
        parse_kv(" a = x%2Cy ,,b=100%25").unwrap(),
        BTreeMap::from([
            ("a".to_string(), "x,y".to_string()),
            ("b".to_string(), "100%".to_string())
        ])
    );
}
