//! The `--config` file (TOML). Every key is optional and mirrors a
//! `periscope run` flag; flags win over environment variables, which win
//! over the file. Unknown keys are errors.
//!
//! ```toml
//! otlp_endpoint = "http://collector:4317"
//! otlp_protocol = "grpc"            # or "http/protobuf"
//! output = "text"                   # or "json" (stdout, when no endpoint)
//! payload_cap = 4096
//! ring_buffer_mib = 4
//! max_connections = 65536
//! socket = "/run/periscope/control.sock"
//! metrics_address = "127.0.0.1:9464"
//! disabled_features = ["tls"]
//! sample_ratio = 0.25
//! phase_spans_min_duration = "100ms"
//! traces_kept = 200                 # for `periscope traces`
//! max_routes = 100                  # per service, in the RED metrics
//!
//! [filter]
//! exclude_exes = ["sshd"]
//! exclude_ports = [22]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::protocol::{Feature, Filter};

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: Option<String>,
    pub output: Option<String>,
    pub payload_cap: Option<u32>,
    pub ring_buffer_mib: Option<u32>,
    pub max_connections: Option<usize>,
    pub socket: Option<PathBuf>,
    pub metrics_address: Option<SocketAddr>,
    #[serde(default)]
    pub disabled_features: Vec<Feature>,
    #[serde(default)]
    pub filter: Filter,
    pub sample_ratio: Option<f64>,
    /// `--phase-spans-min-duration`, as humantime text ("100ms", "0s").
    pub phase_spans_min_duration: Option<String>,
    /// `--traces-kept`.
    pub traces_kept: Option<usize>,
    /// `--max-routes`.
    pub max_routes: Option<usize>,
}

/// Reads and checks a config file; errors name the file and, for syntax
/// errors, the line and column.
pub fn load(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    parse(&text).with_context(|| format!("config file {}", path.display()))
}

pub fn parse(text: &str) -> Result<ConfigFile> {
    let config: ConfigFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
    config.validate()?;
    Ok(config)
}

impl ConfigFile {
    fn validate(&self) -> Result<()> {
        if let Some(p) = &self.otlp_protocol
            && !["grpc", "http/protobuf"].contains(&p.as_str())
        {
            bail!("otlp_protocol {p:?}: expected \"grpc\" or \"http/protobuf\"");
        }
        if let Some(o) = &self.output
            && !["text", "json"].contains(&o.as_str())
        {
            bail!("output {o:?}: expected \"text\" or \"json\"");
        }
        if let Some(n) = self.payload_cap
            && !(1..=4096).contains(&n)
        {
            bail!("payload_cap {n}: expected 1..=4096");
        }
        if let Some(n) = self.ring_buffer_mib
            && !n.is_power_of_two()
        {
            bail!("ring_buffer_mib {n}: must be a power of two");
        }
        if let Some(d) = &self.phase_spans_min_duration {
            humantime::parse_duration(d).map_err(|e| anyhow::anyhow!("phase_spans_min_duration {d:?}: {e}"))?;
        }
        if self.max_connections == Some(0) {
            bail!("max_connections must be at least 1");
        }
        if self.max_routes == Some(0) {
            bail!("max_routes must be at least 1");
        }
        if let Some(r) = self.sample_ratio
            && !(0.0..=1.0).contains(&r)
        {
            bail!("sample_ratio {r}: expected 0.0..=1.0");
        }
        self.filter.validate().map_err(|e| anyhow::anyhow!("filter: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
otlp_endpoint = "http://collector:4317"
otlp_protocol = "http/protobuf"
output = "json"
payload_cap = 2048
ring_buffer_mib = 16
max_connections = 1000
socket = "/tmp/p.sock"
metrics_address = "127.0.0.1:9464"
disabled_features = ["tls", "dns"]
sample_ratio = 0.25

[filter]
exclude_exes = ["sshd"]
exclude_ports = [22]
include_cgroups = ["/system.slice"]
"#;

    #[test]
    fn sample_file_parses() {
        let c = parse(SAMPLE).unwrap();
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(c.otlp_protocol.as_deref(), Some("http/protobuf"));
        assert_eq!(c.output.as_deref(), Some("json"));
        assert_eq!(
            (c.payload_cap, c.ring_buffer_mib, c.max_connections),
            (Some(2048), Some(16), Some(1000))
        );
        assert_eq!(c.socket, Some(PathBuf::from("/tmp/p.sock")));
        assert_eq!(c.metrics_address, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.disabled_features, [Feature::Tls, Feature::Dns]);
        assert_eq!(c.sample_ratio, Some(0.25));
        assert_eq!(c.filter.exclude_exes, ["sshd"]);
        assert_eq!(c.filter.exclude_ports, [22]);
        assert!(c.filter.include_pids.is_empty());
        assert_eq!(parse("").unwrap(), ConfigFile::default());
    }

    #[test]
    fn bad_files_give_clear_errors() {
        for (text, needle) in [
            ("otlp_endpoit = \"x\"", "unknown field `otlp_endpoit`"),
            ("[filter]\npids = [1]", "unknown field `pids`"),
            ("disabled_features = [\"ftp\"]", "unknown feature \"ftp\""),
            ("payload_cap = \"big\"", "payload_cap"),
            ("payload_cap = 9000", "payload_cap 9000"),
            ("ring_buffer_mib = 3", "power of two"),
            ("sample_ratio = 2.0", "sample_ratio"),
            ("output = \"xml\"", "\"text\" or \"json\""),
            ("otlp_protocol = \"http/json\"", "otlp_protocol"),
            ("metrics_address = \"nowhere\"", "metrics_address"),
            ("[filter]\ninclude_cgroups = [\"relative\"]", "filter: cgroup"),
            ("otlp_endpoint = ", "line 1"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err:?} should contain {needle:?}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = crate::control::server::tests::TempDir::new();
        let path = dir.0.join("periscope.toml");
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(
            err.contains("reading config file") && err.contains("periscope.toml"),
            "{err}"
        );
        std::fs::write(&path, "bogus = 1\n").unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("periscope.toml") && err.contains("bogus"), "{err}");
        std::fs::write(&path, SAMPLE).unwrap();
        assert_eq!(load(&path).unwrap().sample_ratio, Some(0.25));
    }
}
