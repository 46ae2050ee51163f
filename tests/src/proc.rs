//! Child processes for tests and benchmarks: spawn with captured output, wait
//! for lines and ports, and always stop what was started, also when a test
//! panics or times out.
//!
//! Every child runs in a process group of its own, gets SIGKILL if the thread
//! that spawned it dies (`PR_SET_PDEATHSIG`), and is stopped by [`Proc`]'s
//! `Drop`: first its stop signal, then SIGKILL to its whole group after a grace
//! period, then reaped.

use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// Which stream a captured line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Lines captured from a child, in arrival order.
#[derive(Default)]
pub struct Output {
    inner: Mutex<OutputInner>,
    cv: Condvar,
}

#[derive(Default)]
struct OutputInner {
    lines: Vec<(Stream, String)>,
    last_line_at: Option<Instant>,
    open_streams: usize,
}

impl Output {
    fn push(&self, stream: Stream, line: String) {
        let mut g = self.inner.lock().unwrap();
        g.lines.push((stream, line));
        g.last_line_at = Some(Instant::now());
        self.cv.notify_all();
    }

    fn close_stream(&self) {
        let mut g = self.inner.lock().unwrap();
        g.open_streams = g.open_streams.saturating_sub(1);
        self.cv.notify_all();
    }

    /// All lines so far, both streams, in arrival order.
    pub fn lines(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap()
            .lines
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Lines of one stream.
    pub fn lines_of(&self, stream: Stream) -> Vec<String> {
        let g = self.inner.lock().unwrap();
        g.lines
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Lines of one stream that arrived after the first `from` lines (of both
    /// streams), the new value for `from`, and how long ago the last line (of
    /// any stream) arrived. For incremental readers.
    pub fn since(&self, stream: Stream, from: usize) -> (Vec<String>, usize, Option<Duration>) {
        let g = self.inner.lock().unwrap();
        let from = from.min(g.lines.len());
        let lines = g.lines[from..]
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, l)| l.clone())
            .collect();
        (lines, g.lines.len(), g.last_line_at.map(|t| t.elapsed()))
    }

    /// Everything captured, as one text.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for l in self.lines() {
            s.push_str(&l);
            s.push('\n');
        }
        s
    }

    /// True once both streams hit end of file.
    pub fn closed(&self) -> bool {
        self.inner.lock().unwrap().open_streams == 0
    }

    /// Wait until a line satisfies `pred` (looking at lines already captured
    /// too). Returns the line, or `None` on timeout or when output ended.
    pub fn wait_for_line(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        let mut g = self.inner.lock().unwrap();
        loop {
            while seen < g.lines.len() {
                if pred(&g.lines[seen].1) {
                    return Some(g.lines[seen].1.clone());
                }
                seen += 1;
            }
            if g.open_streams == 0 {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

/// How a [`Proc`] is asked to stop before it is killed.
#[derive(Clone, Copy, Debug)]
pub struct StopWith {
    pub signal: i32,
    pub grace: Duration,
}

impl Default for StopWith {
    fn default() -> Self {
        StopWith {
            signal: libc::SIGTERM,
            grace: Duration::from_secs(5),
        }
    }
}

/// A running child with captured output, stopped on drop.
pub struct Proc {
    name: String,
    pid: u32,
    child: Option<Child>,
    output: Arc<Output>,
    status: Option<ExitStatus>,
    stop_with: StopWith,
}

/// Live children (pid -> name, spawning thread): what a timed-out test leaves
/// behind is killed.
fn registry() -> &'static Mutex<BTreeMap<u32, (String, ThreadId)>> {
    static R: OnceLock<Mutex<BTreeMap<u32, (String, ThreadId)>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// SIGKILL the process group of every still running [`Proc`] that `thread`
/// spawned. Returns what was killed.
pub fn kill_children_of_thread(thread: ThreadId) -> Vec<String> {
    let live: Vec<(u32, String)> = registry()
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, (_, t))| *t == thread)
        .map(|(pid, (name, _))| (*pid, name.clone()))
        .collect();
    for (pid, _) in &live {
        // Negative pid: the whole process group the child leads.
        unsafe { libc::kill(-(*pid as i32), libc::SIGKILL) };
    }
    live.into_iter()
        .map(|(pid, name)| format!("{name} (pid {pid})"))
        .collect()
}

impl Proc {
    /// Spawn `cmd` with stdin from /dev/null and stdout/stderr captured.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        Self::spawn_with(name, cmd, StopWith::default())
    }

    pub fn spawn_with(name: &str, cmd: &mut Command, stop_with: StopWith) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let shown = show(cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("{name}: could not start `{shown}`"))?;
        let pid = child.id();
        registry()
            .lock()
            .unwrap()
            .insert(pid, (name.to_string(), std::thread::current().id()));
        let output = Arc::new(Output::default());
        output.inner.lock().unwrap().open_streams = 2;
        spawn_reader(
            name,
            Stream::Stdout,
            child.stdout.take().expect("piped"),
            output.clone(),
        );
        spawn_reader(
            name,
            Stream::Stderr,
            child.stderr.take().expect("piped"),
            output.clone(),
        );
        Ok(Proc {
            name: name.to_string(),
            pid,
            child: Some(child),
            output,
            status: None,
            stop_with,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn output(&self) -> &Arc<Output> {
        &self.output
    }

    /// Both streams, in arrival order.
    pub fn log(&self) -> String {
        self.output.text()
    }

    pub fn stdout(&self) -> String {
        self.output.lines_of(Stream::Stdout).join("\n")
    }

    pub fn stderr(&self) -> String {
        self.output.lines_of(Stream::Stderr).join("\n")
    }

    /// The exit status if the process has exited (the process is reaped).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(child) = self.child.as_mut()
            && exited_unreaped(self.pid)
        {
            // Clean up what it left in its group while its pid is still ours.
            unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
            self.status = child.wait().ok();
            registry().lock().unwrap().remove(&self.pid);
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                // Let the readers drain what is left in the pipes.
                let until = Instant::now() + Duration::from_secs(2);
                while !self.output.closed() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) still running after {:?}; output:\n{}",
                    self.name,
                    self.pid,
                    timeout,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait until a captured line satisfies `pred`; fail with the log if the
    /// process exits or the time runs out first.
    pub fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        match self.output.wait_for_line(timeout, pred) {
            Some(l) => Ok(l),
            None => {
                let state = match self.try_status() {
                    Some(st) => format!("it exited ({st})"),
                    None => format!("not within {timeout:?}"),
                };
                bail!(
                    "{} (pid {}) never printed {what}: {state}; its output:\n{}",
                    self.name,
                    self.pid,
                    self.log()
                )
            }
        }
    }

    /// Send a signal to the process (not its group).
    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            unsafe { libc::kill(self.pid as i32, sig) };
        }
    }

    /// Stop: the stop signal, then after the grace period SIGKILL to the whole
    /// process group; reap. Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.try_status().is_none() && self.child.is_some() {
            self.signal(self.stop_with.signal);
            let deadline = Instant::now() + self.stop_with.grace;
            while Instant::now() < deadline && !exited_unreaped(self.pid) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !exited_unreaped(self.pid) {
                eprintln!(
                    "harness: {} (pid {}) ignored signal {} for {:?}: SIGKILL",
                    self.name, self.pid, self.stop_with.signal, self.stop_with.grace
                );
            }
            unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
            if let Some(child) = self.child.as_mut() {
                self.status = child.wait().ok();
            }
            registry().lock().unwrap().remove(&self.pid);
        }
        // Give the reader threads a moment to take the last lines.
        let until = Instant::now() + Duration::from_millis(500);
        while !self.output.closed() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True if `pid` (our child) has exited; does not reap it, so its pid and
/// process group id cannot be reused yet.
fn exited_unreaped(pid: u32) -> bool {
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // r == 0 with si_pid == 0: still running. Error (ECHILD): already reaped.
    r != 0 || unsafe { info.si_pid() } != 0
}

fn spawn_reader(name: &str, stream: Stream, pipe: impl Read + Send + 'static, output: Arc<Output>) {
    let echo = std::env::var_os("PERISCOPE_TEST_ECHO").is_some();
    let name = name.to_string();
    std::thread::Builder::new()
        .name(format!("{name}-{stream:?}"))
        .spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                            buf.pop();
                        }
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        if echo {
                            eprintln!("[{name}] {line}");
                        }
                        output.push(stream, line);
                    }
                }
            }
            output.close_stream();
        })
        .expect("spawn reader thread");
}

/// Render a command for messages (long arguments shortened).
pub fn show(cmd: &Command) -> String {
    const MAX: usize = 300;
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let mut a = a.to_string_lossy().into_owned();
        if a.len() > MAX {
            let cut = (0..=MAX)
                .rev()
                .find(|i| a.is_char_boundary(*i))
                .unwrap_or(0);
            a = format!("{}...({} bytes)", &a[..cut], a.len());
        }
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\;&|<>*?".contains(c)) {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Result of a short-lived command run to completion.
#[derive(Debug, Clone)]
pub struct Finished {
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Fail with the command's output unless it exited 0.
    pub fn ok(self) -> Result<Finished> {
        if !self.status.success() {
            bail!(
                "pid {} exited with {}\nstdout:\n{}\nstderr:\n{}",
                self.pid,
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

/// Run a command to completion (killed after `timeout`), capturing its output
/// and pid (the pid matters: spans carry it).
pub fn run_capture(name: &str, cmd: &mut Command, timeout: Duration) -> Result<Finished> {
    let mut p = Proc::spawn(name, cmd)?;
    let status = match p.wait_exit(timeout) {
        Ok(st) => st,
        Err(e) => {
            p.stop();
            return Err(e.context(format!("`{}` timed out", show(cmd))));
        }
    };
    Ok(Finished {
        pid: p.pid(),
        status,
        stdout: p.stdout(),
        stderr: p.stderr(),
    })
}

/// A TCP port on 127.0.0.1 that nothing listens on now, never handed out twice
/// by this process.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    for _ in 0..1000 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no free port found");
}

/// Wait until something accepts TCP connections on 127.0.0.1:port.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// Poll `f` until it returns `Some`, or give up after `timeout`.
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// A directory under the system temp dir, removed on drop unless
/// `PERISCOPE_KEEP_TMP` is set.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        let path = base.join(format!(
            "periscope-{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        if path.exists() {
            std::fs::remove_dir_all(&path).ok();
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        // Servers may drop privileges (nginx workers run as nobody): keep it readable.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("PERISCOPE_KEEP_TMP").is_some() {
            eprintln!("harness: keeping {}", self.path.display());
        } else {
            std::fs::remove_dir_all(&self.path).ok();
        }
    }
}

/// Pids of the direct children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    // /proc/PID/task/TID/children lists children per thread.
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// True if a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // State is the field after the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}
