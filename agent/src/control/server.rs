//! The daemon side of the control socket: accepts root-only connections,
//! reads newline-delimited JSON requests and hands each one to the event
//! loop as a [`ControlCall`], writing back whatever the loop replies.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use log::{debug, warn};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::protocol::{ErrorKind, MAX_REQUEST_BYTES, Request, Response};

/// One request for the event loop. Answer through `reply` (dropping it
/// makes the client see an `unavailable` error).
#[derive(Debug)]
pub struct ControlCall {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// How long a client may take to send one request line, and how long the
/// event loop may take to take and answer a call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    pub read: Duration,
    pub handler: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            read: Duration::from_secs(5),
            handler: Duration::from_secs(5),
        }
    }
}

/// Connections served at once; more are told the daemon is busy.
const MAX_CONNECTIONS: usize = 32;

/// Only root may steer the daemon.
pub(crate) fn allowed(uid: u32) -> bool {
    uid == 0
}

/// The running control socket. Dropping it (or [`ControlServer::shutdown`])
/// stops accepting and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// Device and inode of the socket we bound, so that we never remove a
    /// file someone else put there since.
    identity: (u64, u64),
    task: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Stops accepting, waits for the accept loop to end, removes the socket file.
    /// Connections being served finish on their own.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.identity
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            warn!("could not remove control socket {}: {e}", self.path.display());
        }
    }
}

/// Binds the control socket at `path` and serves it on the current tokio
/// runtime, sending every valid request to `handler`.
///
/// Creates the parent directory (0755) if missing; replaces a stale socket
/// file only if nothing answers on it; fails if another daemon does.
pub fn serve(path: PathBuf, handler: mpsc::Sender<ControlCall>) -> Result<ControlServer> {
    serve_with(path, handler, Timeouts::default())
}

pub(crate) fn serve_with(
    path: PathBuf,
    handler: mpsc::Sender<ControlCall>,
    timeouts: Timeouts,
) -> Result<ControlServer> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    remove_stale_socket(&path)?;
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root-only", path.display()))?;
    let meta = std::fs::symlink_metadata(&path).with_context(|| format!("inspecting {}", path.display()))?;
    let task = tokio::spawn(accept_loop(listener, handler, timeouts));
    Ok(ControlServer {
        path,
        identity: (meta.dev(), meta.ino()),
        task: Some(task),
    })
}

fn remove_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; not replacing it (choose another --socket)",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "another periscope daemon is already running (it answers on {})",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            debug!("removing stale control socket {}", path.display());
            std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("checking whether a daemon answers on {}", path.display())),
    }
}

async fn accept_loop(listener: UnixListener, handler: mpsc::Sender<ControlCall>, timeouts: Timeouts) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: wait instead of spinning.
                warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    handle_connection(stream, handler, timeouts).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let mut stream = stream;
                    let busy = Response::error(
                        ErrorKind::Unavailable,
                        "the daemon is busy (too many control connections)",
                    );
                    let _ = tokio::time::timeout(timeouts.read, stream.write_all(busy.to_line().as_bytes())).await;
                });
            }
        }
    }
}

enum LineRead {
    Line,
    Eof,
    TooLong,
}

/// Reads one line (newline included) of at most [`MAX_REQUEST_BYTES`] bytes.
async fn read_line_limited<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<LineRead> {
    buf.clear();
    let n = reader.take(MAX_REQUEST_BYTES as u64 + 1).read_until(b'\n', buf).await?;
    if n == 0 {
        Ok(LineRead::Eof)
    } else if buf.last() == Some(&b'\n') || buf.len() <= MAX_REQUEST_BYTES {
        // A last line without a newline (client half-closed) is still a request.
        Ok(LineRead::Line)
    } else {
        Ok(LineRead::TooLong)
    }
}

async fn handle_connection(stream: UnixStream, handler: mpsc::Sender<ControlCall>, timeouts: Timeouts) {
    let uid = stream.peer_cred().map(|c| c.uid());
    let (reader, mut writer) = stream.into_split();
    let mut write = async |response: Response| -> bool {
        let line = response.to_line();
        matches!(
            tokio::time::timeout(timeouts.read, writer.write_all(line.as_bytes())).await,
            Ok(Ok(()))
        )
    };
    match uid {
        Ok(uid) if allowed(uid) => {}
        Ok(uid) => {
            debug!("control socket: refused a connection from uid {uid}");
            // Answer its first request line (not parsed), so that the
            // client's write does not fail with EPIPE before it can read why.
            let mut discard = Vec::new();
            let _ = tokio::time::timeout(
                timeouts.read,
                read_line_limited(&mut BufReader::new(reader), &mut discard),
            )
            .await;
            write(Response::error(
                ErrorKind::PermissionDenied,
                format!("permission denied: the periscope control socket is root-only (your uid is {uid}); run the command as root"),
            ))
            .await;
            return;
        }
        Err(e) => {
            write(Response::error(
                ErrorKind::PermissionDenied,
                format!("permission denied: cannot check your credentials ({e})"),
            ))
            .await;
            return;
        }
    }
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        let read = tokio::time::timeout(timeouts.read, read_line_limited(&mut reader, &mut line)).await;
        match read {
            Err(_) => {
                write(Response::malformed(format!(
                    "timed out: no complete request line within {:?}",
                    timeouts.read
                )))
                .await;
                return;
            }
            Ok(Err(e)) => {
                debug!("control socket: read failed: {e}");
                return;
            }
            Ok(Ok(LineRead::Eof)) => return,
            Ok(Ok(LineRead::TooLong)) => {
                write(Response::malformed(format!(
                    "malformed request: longer than {MAX_REQUEST_BYTES} bytes; closing the connection"
                )))
                .await;
                return;
            }
            Ok(Ok(LineRead::Line)) => {}
        }
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let response = match Request::parse(text) {
            Ok(request) => call(&handler, request, timeouts.handler).await,
            Err(message) => Response::malformed(message),
        };
        if !write(response).await {
            return;
        }
    }
}

/// Hands `request` to the event loop and waits for its answer; any failure
/// becomes an `unavailable` error response.
pub(crate) async fn call(handler: &mpsc::Sender<ControlCall>, request: Request, limit: Duration) -> Response {
    let (reply, answer) = oneshot::channel();
    match tokio::time::timeout(limit, handler.send(ControlCall { request, reply })).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Response::error(ErrorKind::Unavailable, "the daemon is shutting down"),
        Err(_) => return Response::error(ErrorKind::Unavailable, "the daemon is busy; try again"),
    }
    match tokio::time::timeout(limit, answer).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => Response::error(
            ErrorKind::Unavailable,
            "the daemon dropped the request (shutting down?)",
        ),
        Err(_) => Response::error(
            ErrorKind::Unavailable,
            format!("the daemon did not answer within {limit:?}"),
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::control::protocol::{Feature, FeatureChange, StatusReport};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory under the system temp dir, mode 0755, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);
    impl TempDir {
        pub(crate) fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "periscope-control-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::DirBuilder::new().mode(0o755).create(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A stand-in event loop: answers status and enable/disable.
    pub(crate) fn fake_handler() -> mpsc::Sender<ControlCall> {
        let (tx, mut rx) = mpsc::channel::<ControlCall>(8);
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                let response = match call.request {
                    Request::Status => Response::ok(&StatusReport {
                        version: "test".into(),
                        uptime_s: 3,
                        sample_ratio: 1.0,
                        counters: [("events_received".to_string(), 5)].into(),
                        ..Default::default()
                    }),
                    Request::Enable { feature } => Response::ok(&FeatureChange::new(feature, true, false)),
                    Request::Disable { feature } => Response::ok(&FeatureChange::new(feature, false, true)),
                    _ => Response::refused("not in this test"),
                };
                let _ = call.reply.send(response);
            }
        });
        tx
    }

    /// Writes `lines` raw, then reads every response line until EOF.
    async fn exchange(path: &Path, raw: &[u8]) -> Vec<Response> {
        let stream = UnixStream::connect(path).await.unwrap();
        let (r, mut w) = stream.into_split();
        w.write_all(raw).await.unwrap();
        w.shutdown().await.unwrap();
        let mut lines = BufReader::new(r).lines();
        let mut out = Vec::new();
        while let Some(l) = lines.next_line().await.unwrap() {
            out.push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad response {l:?}: {e}")));
        }
        out
    }

    #[test]
    fn only_root_is_allowed() {
        assert!(allowed(0));
        assert!(!allowed(1000));
        assert!(!allowed(65534));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_clients_are_answered_and_socket_is_cleaned_up() {
        let dir = TempDir::new();
        let path = dir.0.join("run/periscope/control.sock");
        let server = serve(path.clone(), fake_handler()).unwrap();
        let parent_mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
        assert_eq!(parent_mode & 0o777, 0o755);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let clients: Vec<_> = (0..16)
            .map(|_| {
                let path = path.clone();
                tokio::spawn(async move {
                    exchange(
                        &path,
                        b"{\"cmd\":\"status\"}\n{\"cmd\":\"enable\",\"feature\":\"tls\"}\n",
                    )
                    .await
                })
            })
            .collect();
        for c in clients {
            let responses = c.await.unwrap();
            assert_eq!(responses.len(), 2);
            let status: StatusReport = responses[0].clone().into_result().unwrap();
            assert_eq!(status.version, "test");
            let change: FeatureChange = responses[1].clone().into_result().unwrap();
            assert_eq!((change.feature, change.enabled), (Feature::Tls, true));
        }
        server.shutdown().await;
        assert!(!path.exists(), "socket file should be removed on shutdown");
    }

    #[tokio::test]
    async fn garbage_then_valid_request_on_one_connection() {
        let dir = TempDir::new();
        let path = dir.0.join("c.sock");
        let _server = serve(path.clone(), fake_handler()).unwrap();
        let r = exchange(
            &path,
            b"garbage\n\n{\"cmd\":\"enable\",\"feature\":\"ftp\"}\r\n{\"cmd\":\"status\"}",
        )
        .await;
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(r[0].kind, Some(ErrorKind::Malformed));
        assert!(r[0].error.as_deref().unwrap().starts_with("malformed request:"));
        assert!(r[1].error.as_deref().unwrap().contains("unknown feature \"ftp\""));
        assert!(r[2].ok);
    }

    #[tokio::test]
    async fn oversized_line_is_refused_and_connection_closed() {
        let dir = TempDir::new();
        let path = dir.0.join("c.sock");
        let _server = serve(path.clone(), fake_handler()).unwrap();
        let mut raw = vec![b'x'; MAX_REQUEST_BYTES + 10];
        raw.extend_from_slice(b"\n{\"cmd\":\"status\"}\n");
        let r = exchange(&path, &raw).await;
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].error.as_deref().unwrap().contains("longer than 65536 bytes"));
        // A line of exactly the limit is still served.
        let mut raw = vec![b' '; MAX_REQUEST_BYTES - 16];
        raw.extend_from_slice(b"{\"cmd\":\"status\"}\n");
        let r = exchange(&path, &raw).await;
        assert!(r[0].ok, "{r:?}");
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let dir = TempDir::new();
        let path = dir.0.join("c.sock");
        let timeouts = Timeouts {
            read: Duration::from_millis(100),
            handler: Duration::from_secs(1),
        };
        let _server = serve_with(path.clone(), fake_handler(), timeouts).unwrap();
        let stream = UnixStream::connect(&path).await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        let line = lines.next_line().await.unwrap().unwrap();
        assert!(line.contains("timed out"), "{line}");
        assert!(lines.next_line().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn broken_handlers_give_error_responses() {
        let dir = TempDir::new();
        let timeouts = Timeouts {
            read: Duration::from_secs(1),
            handler: Duration::from_millis(100),
        };
        // Event loop gone.
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let path = dir.0.join("gone.sock");
        let _a = serve_with(path.clone(), tx, timeouts).unwrap();
        let r = exchange(&path, b"{\"cmd\":\"status\"}\n").await;
        assert_eq!(r[0].kind, Some(ErrorKind::Unavailable));
        assert!(r[0].error.as_deref().unwrap().contains("shutting down"));
        // Event loop drops the reply.
        let (tx, mut rx) = mpsc::channel::<ControlCall>(1);
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                drop(call)
            }
        });
        let path = dir.0.join("drop.sock");
        let _b = serve_with(path.clone(), tx, timeouts).unwrap();
        let r = exchange(&path, b"{\"cmd\":\"status\"}\n").await;
        assert!(r[0].error.as_deref().unwrap().contains("dropped"), "{r:?}");
        // Event loop never answers.
        let (tx, mut rx) = mpsc::channel::<ControlCall>(1);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(call) = rx.recv().await {
                held.push(call);
            }
        });
        let path = dir.0.join("slow.sock");
        let _c = serve_with(path.clone(), tx, timeouts).unwrap();
        let r = exchange(&path, b"{\"cmd\":\"status\"}\n").await;
        assert!(r[0].error.as_deref().unwrap().contains("did not answer"), "{r:?}");
    }

    #[tokio::test]
    async fn stale_socket_replaced_live_one_and_other_files_kept() {
        let dir = TempDir::new();
        let path = dir.0.join("c.sock");
        // Stale: a socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = serve(path.clone(), fake_handler()).unwrap();
        // Live: a second daemon must not steal it.
        let err = serve(path.clone(), fake_handler()).unwrap_err();
        assert!(format!("{err:#}").contains("already running"), "{err:#}");
        assert!(exchange(&path, b"{\"cmd\":\"status\"}\n").await[0].ok);
        drop(server);
        assert!(!path.exists());
        // Not a socket: left alone.
        std::fs::write(&path, "precious").unwrap();
        let err = serve(path.clone(), fake_handler()).unwrap_err();
        assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    const PY_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
    sys.exit(0)
s.sendall(b'{"cmd":"status"}\n')
print(s.makefile().readline().strip())
"#;

    /// Runs [`PY_CLIENT`] as uid/gid 65534. The tests run as root (CI and
    /// `cargo xtask test` do); without root or the tools this fails loudly.
    async fn connect_as_nobody(path: &Path) -> String {
        let python = Path::new("/usr/bin/python3");
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (run it through cargo xtask test)");
        assert!(python.exists(), "/usr/bin/python3 missing");
        assert!(Path::new("/usr/bin/setpriv").exists(), "/usr/bin/setpriv (util-linux) missing");
        let out = tokio::process::Command::new("/usr/bin/setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(python)
            .args(["-c", PY_CLIENT])
            .arg(path)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn non_root_peers_are_refused() {
        let dir = TempDir::new();
        let path = dir.0.join("c.sock");
        let _server = serve(path.clone(), fake_handler()).unwrap();
        // Mode 0600 stops them at connect().
        let out = connect_as_nobody(&path).await;
        assert_eq!(out, "EACCES");
        // With the mode opened up, SO_PEERCRED still refuses them.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = connect_as_nobody(&path).await;
        let r: Response = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?}: {e}"));
        assert!(!r.ok);
        assert_eq!(r.kind, Some(ErrorKind::PermissionDenied));
        assert!(r.error.unwrap().contains("uid is 65534"));
        // Root still gets in.
        assert!(exchange(&path, b"{\"cmd\":\"status\"}\n").await[0].ok);
    }
}
