//! Small helpers for running commands and reading facts about the machine.

use anyhow::{Context, Result, bail};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use periscope_tests::{target_dir, workspace_root};

/// `$CARGO_HOME` or `~/.cargo`.
pub fn cargo_home() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => home().join(".cargo"),
    }
}

pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The effective uid, read without libc: `/proc/self` is owned by it.
pub fn euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

pub fn is_root() -> bool {
    euid() == 0
}

/// Render a command for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Run a command with inherited stdio; fail if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", show(cmd));
    }
    Ok(())
}

/// Run a command quietly and return its stdout if it succeeded, `None` if it
/// could not be started or exited non-zero.
pub fn output_of<I, S>(program: &str, args: I) -> Option<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True if `path` is a mount point, according to `/proc/self/mountinfo`.
pub fn is_mountpoint(path: &str) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // Field 5 is the mount point (octal escapes for spaces etc. do not matter here).
    info.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

/// Put `dir` at the front of this process's PATH (children inherit it).
pub fn prepend_path(dir: &Path) {
    let current = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&current).any(|p| p == dir) {
        return;
    }
    let mut parts = vec![dir.to_path_buf()];
    parts.extend(std::env::split_paths(&current));
    let joined = std::env::join_paths(parts).expect("PATH entries contain no ':'");
    // SAFETY: called from main before any other thread exists.
    unsafe { std::env::set_var("PATH", joined) };
}

/// A `cargo` command run from the workspace root, without the variables that
/// `cargo run` sets for xtask itself (they would confuse nested builds).
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || k == "CARGO_MANIFEST_DIR"
            || k == "CARGO_MANIFEST_PATH"
            || k == "CARGO_CRATE_NAME"
            || k == "CARGO_PRIMARY_PACKAGE"
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd
}
