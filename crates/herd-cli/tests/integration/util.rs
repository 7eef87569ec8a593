//! Helpers: find the binaries, run herd, talk HTTP over loopback, wait with
//! bounds. Every herd started here is SIGKILLed on drop (its guardian then
//! removes its workers), so a failing test leaves nothing behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The `herd` binary under test.
pub fn herd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_herd"))
}

/// The test worker program (built by cargo as an example target).
pub fn fixture_bin() -> PathBuf {
    example_bin("herd-fixture")
}

/// An example program of the workspace (cargo builds examples for tests).
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/integration-<hash> -> target/<profile>/examples/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --examples`",
        path.display()
    );
    path
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("herd-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Captured lines of one stream, with a condition variable to wait on.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<Captured>, Condvar)>);

/// What a stream delivered so far, and whether it ended.
#[derive(Default)]
pub struct Captured {
    lines: Vec<String>,
    /// The stream reached EOF: herd exited, no more lines will come.
    ended: bool,
}

impl Lines {
    pub fn capture(self, stream: impl Read + Send + 'static) {
        std::thread::spawn(move || {
            let (lock, cv) = &*self.0;
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                lock.lock().unwrap().lines.push(line);
                cv.notify_all();
            }
            lock.lock().unwrap().ended = true;
            cv.notify_all();
        });
    }

    pub fn all(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().lines.clone()
    }

    /// Whether the stream reached EOF.
    pub fn closed(&self) -> bool {
        self.0 .0.lock().unwrap().ended
    }

    /// Waits until a line satisfies `pred`; returns it, or panics with all lines.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_nth(what, timeout, 1, pred)
    }

    /// Waits until `n` lines satisfy `pred`; returns the n-th. Fails at
    /// once, with every line, when the stream ends first (herd exited).
    pub fn wait_for_nth(
        &self,
        what: &str,
        timeout: Duration,
        n: usize,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.0;
        let mut captured = lock.lock().unwrap();
        loop {
            if let Some(l) = captured.lines.iter().filter(|l| pred(l)).nth(n - 1) {
                return l.clone();
            }
            if captured.ended {
                panic!(
                    "the stream ended (herd exited) before {what}; its lines:\n{}",
                    captured.lines.join("\n")
                );
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out waiting for {what}; lines so far:\n{}",
                    captured.lines.join("\n")
                );
            }
            captured = cv.wait_timeout(captured, deadline - now).unwrap().0;
        }
    }

    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.0
             .0
            .lock()
            .unwrap()
            .lines
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    /// The indexes of the lines so far that match, in order.
    pub fn positions(&self, pred: impl Fn(&str) -> bool) -> Vec<usize> {
        let captured = self.0 .0.lock().unwrap();
        (0..captured.lines.len())
            .filter(|i| pred(&captured.lines[*i]))
            .collect()
    }
}

/// A running `herd`, killed on drop.
pub struct Herd {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
    /// Its control sockets' directory (`HERD_RUNTIME_DIR`), its own.
    pub runtime: PathBuf,
    _runtime: Option<TempDir>,
    /// herd's stdout, held open and never read (`spawn_with_stdout(_, 0)`).
    _unread: Option<std::process::ChildStdout>,
}

pub const STARTUP: Duration = Duration::from_secs(10);

impl Herd {
    /// Starts `herd <args>` with stdout and stderr captured.
    pub fn start<I, S>(args: I) -> Herd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(herd_bin());
        cmd.args(args);
        Herd::spawn(cmd)
    }

    /// `herd run ARGS -- sh -c SCRIPT`.
    pub fn sh(args: &[&str], script: &str) -> Herd {
        let mut argv = vec!["run"];
        argv.extend(args);
        argv.extend(["--", "sh", "-c", script]);
        Herd::start(argv)
    }

    /// Starts a prepared command (for extra env, uid, a wrapping shell).
    pub fn spawn(mut cmd: Command) -> Herd {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("HERD_LOG", "debug");
        let (runtime, owned) = runtime_dir(&mut cmd);
        let mut child = cmd.spawn().expect("spawn herd");
        let stdout = Lines::default();
        let stderr = Lines::default();
        stdout.clone().capture(child.stdout.take().unwrap());
        stderr.clone().capture(child.stderr.take().unwrap());
        Herd {
            child,
            stdout,
            stderr,
            runtime,
            _runtime: owned,
            _unread: None,
        }
    }

    /// Starts a prepared command whose stdout is read for `read` bytes and
    /// then closed (as `herd | head -c N` would); stderr is captured.
    pub fn spawn_with_stdout(mut cmd: Command, read: usize) -> Herd {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("HERD_LOG", "debug");
        let (runtime, owned) = runtime_dir(&mut cmd);
        let mut child = cmd.spawn().expect("spawn herd");
        let mut out = child.stdout.take().unwrap();
        let unread = if read > 0 {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; read];
                let _ = out.read_exact(&mut buf);
                drop(out);
            });
            None
        } else {
            Some(out)
        };
        let stderr = Lines::default();
        stderr.clone().capture(child.stderr.take().unwrap());
        Herd {
            child,
            stdout: Lines::default(),
            stderr,
            runtime,
            _runtime: owned,
            _unread: unread,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `herd ARGS` as a control client of this herd (bounded: 30 s);
    /// returns its exit code, stdout and stderr.
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        ctl_in(&self.runtime, args)
    }

    /// `herd status NAME --json`'s `status` object, or `None` if herd does
    /// not answer (yet: its socket is bound as it starts).
    pub fn try_status(&self, name: &str) -> Option<serde_json::Value> {
        let (code, out, _) = self.ctl(&["status", name, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (code == 0).then(|| v["status"].clone())
    }

    /// `herd status NAME --json`'s `status` object.
    pub fn status_json(&self, name: &str) -> serde_json::Value {
        let (code, out, err) = self.ctl(&["status", name, "--json"]);
        assert_eq!(code, 0, "herd status: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("status is JSON");
        v["status"].clone()
    }

    /// The port herd reports for its first listen spec.
    pub fn port(&self) -> u16 {
        let line = self
            .stderr
            .wait_for("listening line", STARTUP, |l| l.contains("listening on"));
        let addr = line.rsplit("listening on ").next().unwrap().trim();
        let port = addr.rsplit(':').next().unwrap();
        port.parse()
            .unwrap_or_else(|_| panic!("no port in {line:?}"))
    }

    /// Waits for the n-th `worker <pid> spawned` line; returns the pid.
    pub fn nth_spawned(&self, n: usize) -> u32 {
        let line = self
            .stderr
            .wait_for_nth("a spawned worker", STARTUP, n, |l| {
                l.contains(" spawned in slot ")
            });
        pid_after(&line, "worker ")
    }

    /// Every pid spawned so far.
    pub fn spawned(&self) -> Vec<u32> {
        self.stderr
            .all()
            .iter()
            .filter(|l| l.contains(" spawned in slot "))
            .map(|l| pid_after(l, "worker "))
            .collect()
    }

    pub fn signal(&self, sig: &str) {
        send_signal(self.pid(), sig);
    }

    /// Waits for herd to exit, at most `timeout`, and then (at most 2 s)
    /// for its stderr to be read to the end: its last lines are in
    /// `stderr` when this returns.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let status = wait_child(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "herd still running after {timeout:?}; stderr:\n{}",
                self.stderr.all().join("\n")
            )
        });
        eventually(Duration::from_secs(2), || self.stderr.closed());
        status
    }
}

impl Drop for Herd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The herd's control directory: the one the command names, else a fresh
/// one of its own (so tests never share /run/herd).
fn runtime_dir(cmd: &mut Command) -> (PathBuf, Option<TempDir>) {
    let given = cmd
        .get_envs()
        .find(|(k, _)| *k == "HERD_RUNTIME_DIR")
        .and_then(|(_, v)| v.map(PathBuf::from));
    match given {
        Some(dir) => (dir, None),
        None => {
            let dir = TempDir::new("ctl");
            cmd.env("HERD_RUNTIME_DIR", dir.path());
            (dir.path().to_path_buf(), Some(dir))
        }
    }
}

/// Runs `herd ARGS` with `HERD_RUNTIME_DIR=dir` (bounded: 30 s); returns
/// its exit code, stdout and stderr.
pub fn ctl_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(herd_bin())
        .args(args)
        .env("HERD_RUNTIME_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herd client");
    let out = Lines::default();
    let err = Lines::default();
    out.clone().capture(child.stdout.take().unwrap());
    err.clone().capture(child.stderr.take().unwrap());
    let status = wait_child(&mut child, Duration::from_secs(30));
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("herd {args:?} still running after 30 s");
    };
    // The reader threads see EOF once the process is gone.
    let eof = |l: &Lines| eventually(Duration::from_secs(5), || l.closed());
    assert!(eof(&out) && eof(&err));
    (
        status.code().unwrap_or(-1),
        out.all().join("\n"),
        err.all().join("\n"),
    )
}

pub fn pid_after(line: &str, marker: &str) -> u32 {
    let rest = &line[line
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} in {line:?}"))
        + marker.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs herd to completion (bounded); returns status and stderr.
pub fn run_to_end<I, S>(args: I, timeout: Duration) -> (ExitStatus, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut herd = Herd::start(args);
    let status = herd.wait(timeout);
    // Give the reader threads a moment to drain the pipes.
    std::thread::sleep(Duration::from_millis(50));
    (status, herd.stderr.all().join("\n"))
}

pub fn send_signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
            state != Some('Z')
        }
        Err(_) => false,
    }
}

/// Polls `f` every 10 ms until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `sh -c` script: slot `slot`'s workers run `instead` (a command line,
/// or e.g. `exit 1`), every other slot's herd's built-in worker.
pub fn hello_but_slot(slot: usize, instead: &str) -> String {
    format!(
        "if [ \"$HERD_WORKER_ID\" = {slot} ]; then {instead}; fi; exec {} hello",
        herd_bin().display()
    )
}

/// One `GET /` with `Connection: close`; returns (status line, headers+body).
pub fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The body of an HTTP response.
pub fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

/// A header's value.
pub fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.split("\r\n")
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
}

/// The live children of `pid` (from /proc, every thread's list).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.retain(|p| alive(*p));
    out
}

/// A process's `comm` (its short name).
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// herd's worker processes: its children but the guardian.
pub fn workers_of(herd: u32) -> Vec<u32> {
    children(herd)
        .into_iter()
        .filter(|p| comm(*p) != "herd-guardian")
        .collect()
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
/// Bounded: a socket nobody accepts on answers until its backlog is full,
/// then a connect would wait for the kernel's SYN retries.
pub fn accepts(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// A port that was free a moment ago (bound to :0 and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `node` can be run; says so when it cannot (the test then skips).
pub fn node_missing() -> bool {
    if Command::new("node").arg("--version").output().is_err() {
        eprintln!("skipped: node is not installed");
        return true;
    }
    false
}

/// Whether `python3` can be run; says so when it cannot (the test then skips).
pub fn python_missing() -> bool {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipped: python3 is not installed");
        return true;
    }
    false
}

/// `herd run -w 1 --no-listen -- node APP`.
pub fn one_node_worker(app: &Path) -> Herd {
    Herd::start([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--",
        "node",
        app.to_str().unwrap(),
    ])
}

/// Continuous HTTP load on 127.0.0.1:`port` from in-process threads, until
/// [`Load::finish`] (and at most 60 s): each thread sends `GET /` one after
/// another, half of them over kept-alive connections (a new one when the
/// server says `Connection: close`), half with `Connection: close`. Every
/// request that gets no `200` is a failure, by kind.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Load {
    pub fn start(port: u16, threads: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..threads)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || load_thread(port, i % 2 == 0, &stop))
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the load: (requests answered 200, failures).
    pub fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ok = 0;
        let mut failed = Vec::new();
        for t in std::mem::take(&mut self.threads) {
            let (n, f) = t.join().expect("load thread");
            ok += n;
            failed.extend(f);
        }
        (ok, failed)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn load_thread(
    port: u16,
    keep_alive: bool,
    stop: &std::sync::atomic::AtomicBool,
) -> (usize, Vec<String>) {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let (mut ok, mut failed) = (0, Vec::new());
    let mut conn: Option<std::io::BufReader<TcpStream>> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < until {
        if !keep_alive {
            match http_get(port) {
                Ok(r) if r.starts_with("HTTP/1.1 200") => ok += 1,
                Ok(r) => failed.push(format!("close: {}", r.lines().next().unwrap_or("empty"))),
                Err(e) => failed.push(format!("close: {e}")),
            }
            continue;
        }
        let reused = conn.is_some();
        let c = match conn.take() {
            Some(c) => c,
            None => match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    std::io::BufReader::new(s)
                }
                Err(e) => {
                    failed.push(format!("keep-alive connect: {e}"));
                    continue;
                }
            },
        };
        match keep_alive_request(c) {
            Ok((status, again)) if status.starts_with("HTTP/1.1 200") => {
                ok += 1;
                conn = again;
            }
            Ok((status, _)) => failed.push(format!("keep-alive: {status}")),
            Err(e) => failed.push(format!("keep-alive (reused: {reused}): {e}")),
        }
    }
    (ok, failed)
}

/// One request on a kept-alive connection: its status line, and the
/// connection if the server keeps it open.
fn keep_alive_request(
    mut c: std::io::BufReader<TcpStream>,
) -> std::io::Result<(String, Option<std::io::BufReader<TcpStream>>)> {
    use std::io::BufRead;
    c.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")?;
    let mut status = String::new();
    if c.read_line(&mut status)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed with no response",
        ));
    }
    let (mut length, mut close) = (0usize, false);
    loop {
        let mut line = String::new();
        c.read_line(&mut line)?;
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if l == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0; length];
    c.read_exact(&mut body)?;
    Ok((status.trim_end().to_string(), (!close).then_some(c)))
}
