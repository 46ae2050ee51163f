//! Container images and containers for the Kubernetes contract tests and
//! `cargo xtask image`, with whatever engine the machine has (podman here,
//! docker elsewhere). Nothing is pulled: images are built `FROM scratch`.
//!
//! Facts of this machine (shared/RIG.md): podman needs runc (crun refuses
//! the hybrid cgroup layout) and cannot raise resource limits, so every
//! `run` passes `--runtime /usr/sbin/runc` and fixed ulimits under podman.

use crate::proc::{TempDir, run_capture};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The tag `cargo xtask image` gives the agent image.
pub const AGENT_IMAGE: &str = "localhost/periscope:dev";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Podman,
    Docker,
}

impl Engine {
    /// podman if installed, else docker; an error saying how to get one.
    pub fn find() -> Result<Engine> {
        let works = |bin: &str| {
            Command::new(bin)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if works("podman") {
            Ok(Engine::Podman)
        } else if works("docker") {
            Ok(Engine::Docker)
        } else {
            bail!("no container engine: install podman and runc (`cargo xtask setup --test-deps`) or docker")
        }
    }

    pub fn program(self) -> &'static str {
        match self {
            Engine::Podman => "podman",
            Engine::Docker => "docker",
        }
    }

    pub fn command(self) -> Command {
        Command::new(self.program())
    }

    /// `ENGINE run` with what this machine needs before any other option.
    pub fn run_command(self) -> Command {
        let mut cmd = self.command();
        if self == Engine::Podman {
            cmd.args(["--runtime", "/usr/sbin/runc"]);
        }
        cmd.arg("run");
        if self == Engine::Podman {
            cmd.args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]);
        }
        cmd
    }

    /// Runs `ENGINE ARGS...`, which must succeed; returns stdout.
    pub fn ok(self, args: &[&str], timeout: Duration) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(args);
        let run = run_capture(self.program(), &mut cmd, timeout)?;
        let out = run.stdout.clone();
        run.ok()
            .with_context(|| format!("`{} {}` failed", self.program(), args.join(" ")))?;
        Ok(out)
    }
}

/// Shared libraries `binary` loads (absolute paths, the loader included),
/// from `ldd`; empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if text.contains("not found") {
        bail!("{}: a shared library is missing:\n{text}", binary.display());
    }
    Ok(libs)
}

/// Builds the agent image from an agent binary: `FROM scratch` with the
/// binary at /usr/local/bin/periscope and the C libraries it loads (glibc:
/// the agent has no other runtime dependency; TLS roots are built in).
/// Returns the image id. Nothing is pulled.
pub fn build_agent_image(engine: Engine, binary: &Path, tags: &[&str]) -> Result<String> {
    let dir = TempDir::new("image")?;
    let rootfs = dir.join("rootfs");
    let bin_dir = rootfs.join("usr/local/bin");
    std::fs::create_dir_all(&bin_dir)?;
    let agent = bin_dir.join("periscope");
    std::fs::copy(binary, &agent).with_context(|| format!("copying {}", binary.display()))?;
    // Debug info is most of a release build's size (the symbols stay, for
    // backtraces).
    let mut strip = Command::new("strip");
    strip.arg("--strip-debug").arg(&agent);
    run_capture("strip", &mut strip, Duration::from_secs(120))?
        .ok()
        .context("strip --strip-debug on the agent (binutils)")?;
    for lib in shared_libraries(binary)? {
        let to = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(to.parent().unwrap_or(&rootfs))?;
        std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
    }
    // The control socket's directory (a host mount in the DaemonSet) and a
    // passwd naming root, for tools that look the user up.
    std::fs::create_dir_all(rootfs.join("run/periscope"))?;
    std::fs::create_dir_all(rootfs.join("etc"))?;
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/usr/local/bin/periscope\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    std::fs::write(dir.join("Containerfile"), AGENT_CONTAINERFILE)?;
    build(engine, &dir.path().to_path_buf(), tags)
}

/// The runtime image (see `deploy/Containerfile`, which is the same file).
pub const AGENT_CONTAINERFILE: &str = include_str!("../../deploy/Containerfile");

/// A tiny HTTP server image: Debian's static busybox and one page, for a
/// workload container. Returns the image id.
pub fn build_busybox_image(engine: Engine, tag: &str) -> Result<String> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() || !shared_libraries(busybox)?.is_empty() {
        bail!("/bin/busybox is missing or not static: install busybox-static (`cargo xtask setup --test-deps`)");
    }
    let dir = TempDir::new("busybox-image")?;
    std::fs::create_dir_all(dir.join("rootfs/bin"))?;
    std::fs::create_dir_all(dir.join("rootfs/www"))?;
    std::fs::copy(busybox, dir.join("rootfs/bin/busybox"))?;
    std::fs::write(dir.join("rootfs/www/index.html"), "<h1>a workload in a container</h1>\n")?;
    std::fs::write(
        dir.join("Containerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/bin/busybox\"]\n",
    )?;
    build(engine, &dir.path().to_path_buf(), &[tag])
}

fn build(engine: Engine, context: &PathBuf, tags: &[&str]) -> Result<String> {
    let iidfile = context.join("image-id");
    let mut args: Vec<String> = vec!["build".into(), "--iidfile".into(), iidfile.display().to_string()];
    if engine == Engine::Podman {
        // Nothing from a registry: scratch needs no pull.
        args.push("--pull=never".into());
    }
    for t in tags {
        args.extend(["--tag".into(), t.to_string()]);
    }
    args.push(context.display().to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    engine.ok(&refs, Duration::from_secs(300))?;
    let id = std::fs::read_to_string(&iidfile).context("reading the image id")?;
    Ok(id.trim().trim_start_matches("sha256:").to_string())
}

/// A container started with `ENGINE run -d`, removed on drop.
pub struct Container {
    engine: Engine,
    pub name: String,
    pub id: String,
}

impl Container {
    /// `ENGINE run -d --name NAME ARGS...` (ARGS: options, the image, its arguments).
    pub fn start(engine: Engine, name: &str, args: &[&str]) -> Result<Container> {
        let _ = engine.ok(&["rm", "-f", name], Duration::from_secs(60));
        let mut cmd = engine.run_command();
        cmd.args(["-d", "--name", name]).args(args);
        let run = run_capture(engine.program(), &mut cmd, Duration::from_secs(120))?;
        let id = run.stdout.trim().to_string();
        run.ok()
            .with_context(|| format!("starting container {name}: `{}`", crate::proc::show(&cmd)))?;
        Ok(Container { engine, name: name.to_string(), id })
    }

    /// `ENGINE logs NAME` (stdout and stderr).
    pub fn logs(&self) -> String {
        let mut cmd = self.engine.command();
        cmd.args(["logs", &self.name]);
        match cmd.output() {
            Ok(o) => format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            Err(e) => format!("({} logs failed: {e})", self.engine.program()),
        }
    }

    /// Waits until the logs show a line containing `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if let Some(line) = logs.lines().find(|l| l.contains(text)) {
                return Ok(line.to_string());
            }
            if std::time::Instant::now() > deadline || !self.is_running() {
                bail!("container {} never logged {text:?} within {timeout:?}; logs:\n{logs}", self.name);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn is_running(&self) -> bool {
        self.engine
            .ok(&["inspect", "--format", "{{.State.Running}}", &self.name], Duration::from_secs(30))
            .is_ok_and(|s| s.trim() == "true")
    }

    /// The host pid of the container's first process.
    pub fn pid(&self) -> Result<u32> {
        let out = self.engine.ok(&["inspect", "--format", "{{.State.Pid}}", &self.name], Duration::from_secs(30))?;
        out.trim().parse().with_context(|| format!("pid of {}: {out:?}", self.name))
    }

    /// `ENGINE stop -t GRACE NAME` (SIGTERM, SIGKILL after `grace`): the
    /// container's exit code and how long the stop took.
    pub fn stop(&self, grace: Duration) -> Result<(i32, Duration)> {
        let t0 = std::time::Instant::now();
        self.engine.ok(&["stop", "-t", &grace.as_secs().to_string(), &self.name], grace + Duration::from_secs(60))?;
        let took = t0.elapsed();
        let code = self.engine.ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.name], Duration::from_secs(30))?;
        let code = code.trim().parse().with_context(|| format!("exit code of {}: {code:?}", self.name))?;
        Ok((code, took))
    }

    /// `ENGINE exec NAME ARGS...`: (exit code, stdout, stderr).
    pub fn exec(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let mut cmd = self.engine.command();
        cmd.args(["exec", &self.name]).args(args);
        let out = cmd.output().context("exec")?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.engine.ok(&["rm", "-f", "-t", "5", &self.name], Duration::from_secs(60));
    }
}
