//! Finding TLS libraries to hook, off the event loop: a thread owns the
//! scanner (ELF parsing of a large executable such as node takes a while)
//! and reports each library file once, to be attached by the daemon.
//!
//! At start it inspects the system's own TLS libraries (so a process
//! started later is covered from its first call, because a uprobe attaches
//! to the file for every process) and every running process's mappings;
//! afterwards, processes that exec or map a file executable (the loader,
//! dlopen) are rescanned.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;

use log::{debug, warn};

use std::sync::Arc;

use super::go_programs::{GoInspection, GoScanner, GoTarget};
use super::tls_libraries::{FileId, Inspection, TlsLibraryScanner, TlsTarget, inspect_file_as};

/// Where distributions keep shared libraries.
const SYSTEM_LIBRARY_DIRS: &[&str] =
    &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/usr/lib", "/usr/local/lib"];
const SYSTEM_TLS_PREFIXES: &[&str] = &["libssl.so", "libgnutls.so"];

pub enum Discovered {
    Attach(TlsTarget),
    NotVisible { display_path: String, reason: String },
    /// A Go executable to hook (reported once per file).
    GoProgram(Arc<GoTarget>),
    /// A Go executable whose TLS cannot be seen (once per file).
    GoNotVisible { display_path: String, go_version: String, reason: String },
    /// A process runs a Go executable (every scan of it): `file` when its
    /// TLS is hooked.
    GoProcess { pid: u32, file: Option<FileId> },
    /// Everything present at start has been reported.
    InitialScanDone,
}

/// Executables in these directories that are this large may embed a TLS
/// library and export its symbols (Node does): inspected at start so the
/// first process to run one is covered from its first call.
const BIN_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/usr/sbin", "/opt"];
const EMBEDDED_TLS_MIN_SIZE: u64 = 16 << 20;

enum Request {
    Scan(Vec<u32>),
}

pub struct TlsWatch {
    requests: mpsc::Sender<Request>,
    pub found: tokio::sync::mpsc::UnboundedReceiver<Discovered>,
}

impl TlsWatch {
    /// Starts the scanning thread; it first covers the system libraries and
    /// every running process.
    pub fn spawn(proc_root: &'static str) -> std::io::Result<Self> {
        let (requests, rx) = mpsc::channel::<Request>();
        let (found_tx, found) = tokio::sync::mpsc::unbounded_channel();
        std::thread::Builder::new().name("tls-discovery".into()).spawn(move || {
            let mut scanner = TlsLibraryScanner::new(proc_root);
            let mut go_scanner = GoScanner::new(proc_root);
            let mut reported: HashSet<FileId> = HashSet::new();
            let mut not_visible: HashSet<String> = HashSet::new();
            let mut send = |inspection: &Inspection| -> bool {
                let message = match inspection {
                    Inspection::Tls(target) if reported.insert(target.file) => Discovered::Attach(target.clone()),
                    Inspection::NotVisible { display_path, reason } if not_visible.insert(display_path.clone()) => {
                        Discovered::NotVisible { display_path: display_path.clone(), reason: reason.clone() }
                    }
                    _ => return true,
                };
                found_tx.send(message).is_ok()
            };
            for inspection in system_libraries().into_iter().chain(large_executables()) {
                send(&inspection);
            }
            let mut pending: Vec<u32> = scanner.all_pids();
            let mut initial = true;
            loop {
                let mut seen = HashSet::new();
                for pid in pending.drain(..) {
                    if !seen.insert(pid) {
                        continue;
                    }
                    match scanner.scan_process(pid) {
                        Ok(inspections) => {
                            for inspection in inspections {
                                if !send(&inspection) {
                                    return;
                                }
                            }
                        }
                        // Processes come and go while they are scanned.
                        Err(e) => debug!("TLS scan: {e}"),
                    }
                    let go = match go_scanner.scan_process(pid) {
                        Some((GoInspection::Go(target), first)) => {
                            let file = target.file;
                            let program = first.then_some(Discovered::GoProgram(target));
                            program.into_iter().chain([Discovered::GoProcess { pid, file: Some(file) }]).collect()
                        }
                        Some((GoInspection::NotVisible { display_path, go_version, reason }, first)) => {
                            let note = first.then_some(Discovered::GoNotVisible { display_path, go_version, reason });
                            note.into_iter().chain([Discovered::GoProcess { pid, file: None }]).collect()
                        }
                        Some((GoInspection::GoWithoutTls, _)) => vec![Discovered::GoProcess { pid, file: None }],
                        _ => Vec::new(),
                    };
                    for message in go {
                        if found_tx.send(message).is_err() {
                            return;
                        }
                    }
                }
                if initial {
                    initial = false;
                    if found_tx.send(Discovered::InitialScanDone).is_err() {
                        return;
                    }
                }
                match rx.recv() {
                    Ok(Request::Scan(pids)) => pending = pids,
                    Err(_) => return,
                }
                while let Ok(Request::Scan(more)) = rx.try_recv() {
                    pending.extend(more);
                }
            }
        })?;
        Ok(Self { requests, found })
    }

    /// Asks for these processes' mappings to be (re)scanned.
    pub fn scan(&self, pids: Vec<u32>) {
        if !pids.is_empty() && self.requests.send(Request::Scan(pids)).is_err() {
            warn!("TLS discovery thread is gone: new TLS libraries will not be hooked");
        }
    }
}

/// Large executables in the standard bin directories (one level deep).
fn large_executables() -> Vec<Inspection> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for dir in BIN_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            if !meta.is_file() || meta.len() < EMBEDDED_TLS_MIN_SIZE || meta.mode() & 0o111 == 0 {
                continue;
            }
            let file = FileId { dev: meta.dev(), inode: meta.ino() };
            if !seen.insert(file) {
                continue;
            }
            let real = std::fs::canonicalize(&path).unwrap_or(path);
            match inspect_file_as(&real, &real.to_string_lossy(), file) {
                // Only what is surely TLS: a large binary is not reported
                // as "not visible" just for its name.
                tls @ Inspection::Tls(_) => out.push(tls),
                _ => {}
            }
        }
    }
    out
}

/// The TLS libraries installed on the host itself.
fn system_libraries() -> Vec<Inspection> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for dir in SYSTEM_LIBRARY_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !SYSTEM_TLS_PREFIXES.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let path = entry.path();
            // Follow symlinks: the uprobe goes on the real file.
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            if !meta.is_file() {
                continue;
            }
            let file = FileId { dev: meta.dev(), inode: meta.ino() };
            if !seen.insert(file) {
                continue;
            }
            let real = std::fs::canonicalize(&path).unwrap_or(path);
            out.push(inspect_file_as(&real, &real.to_string_lossy(), file));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_openssl_is_found() {
        let libs = system_libraries();
        let found = libs.iter().any(|i| matches!(i, Inspection::Tls(t) if t.display_path.contains("libssl.so.3")));
        assert!(found, "libssl.so.3 (installed with openssl/curl) should be a TLS target");
    }

    #[test]
    fn node_is_found_among_large_executables() {
        let exes = large_executables();
        let node = exes.iter().any(|i| matches!(i, Inspection::Tls(t) if t.display_path.ends_with("/node")));
        assert!(node, "/usr/bin/node embeds OpenSSL and exports SSL_read (node is part of this machine's image)");
    }
}
