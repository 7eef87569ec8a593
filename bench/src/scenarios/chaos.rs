//! Chaos: herd under steady keep-alive load while a loop SIGKILLs workers,
//! SIGSTOPs them for a while, and makes the next start crash, for
//! `--chaos-duration` per system. What a supervisor owes its users here: no
//! request fails except those in flight in a worker that was hit, no slot
//! stays empty, nothing leaks in the supervisor, and every worker serves at
//! the end.
//!
//! The load is this crate's own client, not wrk: each request's outcome is
//! classified, and each connection remembers which worker answered it
//! (`x-worker`), so a failure can be blamed on a worker the chaos loop hit or
//! not. A sampler reads herd's children from /proc every 50 ms to see which
//! slots have a live worker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use rustix::process::Signal;

use crate::procfs;
use crate::report::{mib, Results};
use crate::systems::{get_worker, signal, App, Ctx, Running, Sys, System};

/// A request that has no full answer by then failed (a timeout).
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A failure on a connection whose worker was hit this recently is that
/// hit's doing: the request was in flight in it (a stopped worker's window
/// runs from its SIGCONT, and a request waits at most [`REQUEST_TIMEOUT`]).
const BLAME_WINDOW: Duration = Duration::from_secs(2);
/// Each connection sends a request at most this often: steady load, not
/// saturation, so a timeout means a missing worker, not a busy machine.
const PACE: Duration = Duration::from_millis(5);
/// At most this many client connections (one thread each).
const MAX_CONNECTIONS: usize = 16;
/// How often the sampler looks at herd's children.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Load before the first chaos action, so connections know their worker.
const WARMUP: Duration = Duration::from_secs(1);
/// How long the end check waits for every worker to answer.
const SERVING_WITHIN: Duration = Duration::from_secs(5);

/// One request's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A 2xx answer.
    Ok,
    /// Any other status.
    BadStatus,
    /// Connection refused.
    Refused,
    /// ECONNRESET, EPIPE, ECONNABORTED.
    Reset,
    /// The connection closed before a full response.
    Eof,
    /// No full response within [`REQUEST_TIMEOUT`] (connect included).
    Timeout,
    /// Any other socket error.
    Other,
}

pub(super) const KINDS: [Outcome; 7] = [
    Outcome::Ok,
    Outcome::BadStatus,
    Outcome::Refused,
    Outcome::Reset,
    Outcome::Eof,
    Outcome::Timeout,
    Outcome::Other,
];

pub(super) fn classify(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            Outcome::Reset
        }
        ErrorKind::UnexpectedEof => Outcome::Eof,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Outcome::Timeout,
        _ => Outcome::Other,
    }
}

/// Whom a failure is blamed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blame {
    /// The connection's worker was killed or stopped within [`BLAME_WINDOW`].
    HitWorker,
    /// A fresh connection with no answer yet: its worker is unknown.
    Fresh,
    /// The connection's worker was not hit: the supervisor's failure.
    Elsewhere,
}

/// One client connection's (then all of them, merged) counts.
#[derive(Debug, Default, Clone)]
struct Tally {
    /// Indexed like [`KINDS`].
    by_kind: [u64; 7],
    hit_worker: u64,
    fresh: u64,
    elsewhere: u64,
    /// A few failures not blamed on a hit worker, for the log.
    examples: Vec<String>,
}

impl Tally {
    fn requests(&self) -> u64 {
        self.by_kind.iter().sum()
    }

    fn failures(&self) -> u64 {
        self.requests() - self.by_kind[0]
    }

    fn count(&mut self, o: Outcome) {
        let i = KINDS.iter().position(|k| *k == o).unwrap_or(6);
        self.by_kind[i] += 1;
    }

    fn fail(&mut self, o: Outcome, blame: Blame, at: f64, worker: Option<u32>) {
        self.count(o);
        match blame {
            Blame::HitWorker => self.hit_worker += 1,
            Blame::Fresh => self.fresh += 1,
            Blame::Elsewhere => self.elsewhere += 1,
        }
        if blame != Blame::HitWorker && self.examples.len() < 3 {
            self.examples
                .push(format!("{o:?} at {at:.2} s, {blame:?}, worker {worker:?}"));
        }
    }

    fn merge(&mut self, other: Tally) {
        for (a, b) in self.by_kind.iter_mut().zip(other.by_kind) {
            *a += b;
        }
        self.hit_worker += other.hit_worker;
        self.fresh += other.fresh;
        self.elsewhere += other.elsewhere;
        self.examples.extend(other.examples);
    }
}

/// Workers the chaos loop hit: pid → when (a kill, or a stop's SIGCONT).
type Hits = Mutex<HashMap<u32, Instant>>;

/// A keep-alive connection and the worker that last answered on it.
pub(super) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pub(super) worker: Option<u32>,
}

/// A response's status, worker, and whether the server closes after it.
pub(super) struct Response {
    pub(super) status: u16,
    pub(super) worker: Option<u32>,
    pub(super) close: bool,
}

pub(super) fn connect(addr: &SocketAddr) -> Result<Conn, Outcome> {
    let stream = TcpStream::connect_timeout(addr, REQUEST_TIMEOUT).map_err(|e| classify(&e))?;
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        stream,
        buf: Vec::with_capacity(1024),
        worker: None,
    })
}

fn left(deadline: Instant) -> Result<Duration, Outcome> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(Outcome::Timeout)
    } else {
        Ok(left)
    }
}

/// Reads more into `c.buf`; `Ok(false)` on EOF.
fn read_more(c: &mut Conn, deadline: Instant) -> Result<bool, Outcome> {
    let mut chunk = [0u8; 4096];
    loop {
        c.stream
            .set_read_timeout(Some(left(deadline)?))
            .map_err(|e| classify(&e))?;
        match c.stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                c.buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(classify(&e)),
        }
    }
}

/// One `GET /` on the connection, HTTP/1.1 keep-alive, by `deadline`.
pub(super) fn request(c: &mut Conn, deadline: Instant) -> Result<Response, Outcome> {
    c.stream
        .set_write_timeout(Some(left(deadline)?))
        .map_err(|e| classify(&e))?;
    c.stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .map_err(|e| classify(&e))?;
    c.buf.clear();
    let head_end = loop {
        if let Some(i) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if !read_more(c, deadline)? {
            return Err(Outcome::Eof);
        }
    };
    let head = String::from_utf8_lossy(&c.buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(Outcome::Other)?;
    let (mut length, mut chunked, mut close, mut worker) = (None, false, false, None);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.eq_ignore_ascii_case("chunked");
        } else if k.eq_ignore_ascii_case("connection") {
            close = v.eq_ignore_ascii_case("close");
        } else if k.eq_ignore_ascii_case("x-worker") {
            worker = v.parse::<u32>().ok();
        }
    }
    // The apps' bodies are tiny: a length, a chunked body read up to its
    // last chunk, or (neither) everything up to EOF.
    loop {
        let body = &c.buf[head_end..];
        let complete = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        if !read_more(c, deadline)? {
            if length.is_none() && !chunked {
                close = true;
                break;
            }
            return Err(Outcome::Eof);
        }
    }
    Ok(Response {
        status,
        worker,
        close,
    })
}

/// One client connection's loop until `on` clears: a request every
/// [`PACE`], reconnecting after any failure or `Connection: close`.
fn client(addr: SocketAddr, on: &AtomicBool, hits: &Hits, t0: Instant) -> Tally {
    let mut t = Tally::default();
    let mut conn: Option<Conn> = None;
    let mut next = Instant::now();
    while on.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next = next.max(now) + PACE;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        if conn.is_none() {
            match connect(&addr) {
                Ok(c) => conn = Some(c),
                Err(o) => {
                    t.fail(o, Blame::Fresh, t0.elapsed().as_secs_f64(), None);
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else {
            continue;
        };
        let was = c.worker;
        let blame = |hits: &Hits| match was {
            None => Blame::Fresh,
            Some(pid) => {
                let recent = hits
                    .lock()
                    .map(|h| h.get(&pid).is_some_and(|at| at.elapsed() <= BLAME_WINDOW))
                    .unwrap_or(false);
                if recent {
                    Blame::HitWorker
                } else {
                    Blame::Elsewhere
                }
            }
        };
        match request(c, deadline) {
            Ok(r) => {
                c.worker = r.worker.or(was);
                if (200..300).contains(&r.status) {
                    t.count(Outcome::Ok);
                } else {
                    let at = t0.elapsed().as_secs_f64();
                    t.fail(Outcome::BadStatus, blame(hits), at, was);
                }
                if r.close {
                    conn = None;
                }
            }
            Err(o) => {
                conn = None;
                t.fail(o, blame(hits), t0.elapsed().as_secs_f64(), was);
            }
        }
    }
    t
}

/// herd's process, to tell its workers from its guardian among its children.
struct Herd {
    pid: u32,
    exe: Option<PathBuf>,
    cmdline: Vec<u8>,
}

impl Herd {
    fn new(pid: u32) -> Herd {
        Herd {
            pid,
            exe: std::fs::read_link(format!("/proc/{pid}/exe")).ok(),
            cmdline: std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
        }
    }

    /// The slot of a child, if it is a worker. The guardian is a fork of
    /// herd (its exe and cmdline are herd's, its environment has no
    /// `HERD_WORKER_ID`); a worker is a node process, or `herd hello`, with
    /// `HERD_WORKER_ID` in its environment. A child between fork and exec
    /// still looks like herd and is no worker yet.
    fn slot_of(&self, pid: u32) -> Option<usize> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        if cmdline == self.cmdline {
            return None;
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let hello = cmdline.split(|b| *b == 0).any(|a| a == b"hello");
        if exe == self.exe && !hello {
            return None;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        env.split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(b"HERD_WORKER_ID="))
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
    }

    /// Live (not zombie) workers as pid → slot. `known` caches slots by pid.
    fn workers(&self, known: &mut HashMap<u32, usize>) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        for pid in procfs::children(self.pid) {
            if !procfs::alive(pid) {
                continue;
            }
            let slot = match known.get(&pid) {
                Some(s) => Some(*s),
                None => self.slot_of(pid),
            };
            if let Some(s) = slot {
                known.insert(pid, s);
                out.insert(pid, s);
            }
        }
        known.retain(|p, _| out.contains_key(p));
        out
    }

    fn fds(&self) -> Option<usize> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .ok()
            .map(|d| d.count())
    }
}

/// A stretch without a live worker, seconds since the start.
#[derive(Debug, Clone, Copy)]
struct Gap {
    slot: Option<usize>,
    from: f64,
    to: f64,
}

/// What the sampler saw: gaps per slot, and with no worker at all.
#[derive(Debug, Default)]
struct Watch {
    slot_gaps: Vec<Gap>,
    zero_gaps: Vec<Gap>,
}

/// Every [`SAMPLE_EVERY`] until `on` clears: which slots have a live worker
/// (a stopped one counts: it exists, and herd is not meant to replace it).
fn sampler(herd: &Herd, workers: usize, on: &AtomicBool, t0: Instant) -> Watch {
    let mut w = Watch::default();
    let mut known = HashMap::new();
    let mut missing: Vec<Option<f64>> = vec![None; workers];
    let mut none_since: Option<f64> = None;
    loop {
        let running = on.load(Ordering::Relaxed);
        let now = t0.elapsed().as_secs_f64();
        let live: BTreeSet<usize> = herd.workers(&mut known).into_values().collect();
        for (slot, since) in missing.iter_mut().enumerate() {
            let here = live.contains(&slot);
            match *since {
                None if !here && running => *since = Some(now),
                Some(from) if here || !running => {
                    w.slot_gaps.push(Gap {
                        slot: Some(slot),
                        from,
                        to: now,
                    });
                    *since = None;
                }
                _ => {}
            }
        }
        match none_since {
            None if live.is_empty() && running => none_since = Some(now),
            Some(from) if !live.is_empty() || !running => {
                w.zero_gaps.push(Gap {
                    slot: None,
                    from,
                    to: now,
                });
                none_since = None;
            }
            _ => {}
        }
        if !running {
            return w;
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
}

/// Crashes at start the app recorded (`crashed.SLOT.PID` holding the time
/// in ms since the epoch) as (slot, seconds since `wall0`).
fn crashes(stats: &Path, wall0: f64) -> Vec<(usize, f64)> {
    let Ok(dir) = std::fs::read_dir(stats) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let slot = name
                .strip_prefix("crashed.")?
                .split('.')
                .next()?
                .parse()
                .ok()?;
            let ms: f64 = std::fs::read_to_string(e.path())
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((slot, ms / 1000.0 - wall0))
        })
        .collect()
}

/// A small xorshift generator: the chaos needs no more, and its seed is
/// logged, so a run can be told apart from another.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        Rng(nanos | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A duration between `lo` and `hi` ms.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

/// What the chaos loop did.
#[derive(Debug, Default)]
struct Actions {
    kills: u64,
    stops: u64,
    crash_flags: u64,
}

/// Until `until`: every 0.5–2 s, SIGKILL a random worker, SIGSTOP one for
/// 0.5–1.5 s, or leave the flag that makes the next start crash (Node app
/// only; herd's built-in worker has no such hook).
fn chaos_loop(
    herd: &Herd,
    running: &Running,
    hits: &Hits,
    until: Instant,
    rng: &mut Rng,
) -> Actions {
    let mut a = Actions::default();
    let mut known = HashMap::new();
    let flag = running.stats_dir().join("crash-next");
    let actions = if running.system.app == App::Node {
        3
    } else {
        2
    };
    loop {
        let wait = rng.millis(500, 2000);
        if Instant::now() + wait >= until {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            return a;
        }
        std::thread::sleep(wait);
        let live: Vec<u32> = herd.workers(&mut known).into_keys().collect();
        let action = rng.below(actions);
        if action == 2 {
            // A flag still waiting for a start is not set twice.
            let new = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&flag);
            if new.is_ok() {
                a.crash_flags += 1;
            }
            continue;
        }
        let Some(&victim) = live.get(rng.below(live.len())) else {
            continue;
        };
        if let Ok(mut h) = hits.lock() {
            h.insert(victim, Instant::now());
        }
        if action == 0 {
            signal(victim, Signal::KILL);
            a.kills += 1;
        } else {
            signal(victim, Signal::STOP);
            std::thread::sleep(rng.millis(500, 1500));
            // The window for its connections runs from when it resumes.
            if let Ok(mut h) = hits.lock() {
                h.insert(victim, Instant::now());
            }
            signal(victim, Signal::CONT);
            a.stops += 1;
        }
    }
}

/// How many distinct live workers answer fresh connections within
/// [`SERVING_WITHIN`] (stops early once all `workers` have).
fn serving(herd: &Herd, port: u16, workers: usize) -> usize {
    let deadline = Instant::now() + SERVING_WITHIN;
    let mut known = HashMap::new();
    let mut seen = BTreeSet::new();
    while Instant::now() < deadline {
        if let Ok(pid) = get_worker(port) {
            seen.insert(pid);
        }
        let live = herd.workers(&mut known);
        if seen.iter().filter(|p| live.contains_key(p)).count() >= workers {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let live = herd.workers(&mut known);
    seen.iter().filter(|p| live.contains_key(p)).count()
}

/// One system's figures.
struct Row {
    label: String,
    tally: Tally,
    actions: Actions,
    crashes: usize,
    /// Longest slot gap not begun or prolonged by a crash at start, ms.
    slot_gap: f64,
    /// Longest slot gap with a crash at start in it, ms.
    crash_gap: f64,
    zero_gap: f64,
    rss: (Option<u64>, Option<u64>),
    fds: (Option<usize>, Option<usize>),
    serving: usize,
}

fn one(ctx: &Ctx, system: &System, rng: &mut Rng) -> Result<Row> {
    let n = ctx.workers;
    let running = system.start(ctx, n)?;
    running.wait_ready(n, Duration::from_secs(60))?;
    let herd = Herd::new(running.supervisor().context("herd's pid")?);
    let before = (procfs::rss_kib(herd.pid), herd.fds());
    let addr: SocketAddr = ([127, 0, 0, 1], running.port).into();
    let hits: Hits = Mutex::new(HashMap::new());
    let (load_on, sampler_on) = (AtomicBool::new(true), AtomicBool::new(true));
    let t0 = Instant::now();
    let wall0 = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let connections = ctx.connections.clamp(1, MAX_CONNECTIONS);

    /// Stops the load and the sampler however the scope is left, so its
    /// threads end and the scope can join them.
    struct Off<'a>(&'a AtomicBool, &'a AtomicBool);
    impl Drop for Off<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
            self.1.store(false, Ordering::Relaxed);
        }
    }

    let (tally, watch, actions, serving) = std::thread::scope(|s| {
        let _off = Off(&load_on, &sampler_on);
        let clients: Vec<_> = (0..connections)
            .map(|_| s.spawn(|| client(addr, &load_on, &hits, t0)))
            .collect();
        let watcher = s.spawn(|| sampler(&herd, n, &sampler_on, t0));
        std::thread::sleep(WARMUP);
        let actions = chaos_loop(&herd, &running, &hits, Instant::now() + ctx.chaos, rng);
        // A flag nobody took would crash a start after the chaos.
        let _ = std::fs::remove_file(running.stats_dir().join("crash-next"));
        load_on.store(false, Ordering::Relaxed);
        let mut tally = Tally::default();
        for c in clients {
            tally.merge(c.join().expect("client thread"));
        }
        let serving = serving(&herd, running.port, n);
        sampler_on.store(false, Ordering::Relaxed);
        let watch = watcher.join().expect("sampler thread");
        (tally, watch, actions, serving)
    });
    let after = (procfs::rss_kib(herd.pid), herd.fds());
    let crashed = crashes(running.stats_dir(), wall0);
    running.stop();

    // Crash times are relative to wall0, gaps to t0: the two were taken together.
    let with_crash = |g: &Gap| {
        crashed
            .iter()
            .any(|(slot, at)| Some(*slot) == g.slot && *at >= g.from - 0.1 && *at <= g.to + 0.1)
    };
    let longest = |gaps: &mut dyn Iterator<Item = &Gap>| {
        gaps.map(|g| (g.to - g.from) * 1000.0).fold(0.0, f64::max)
    };
    for e in &tally.examples {
        eprintln!(
            "[chaos]   {}: failure not blamed on a hit worker: {e}",
            system.label()
        );
    }
    for g in &watch.slot_gaps {
        if g.to - g.from > 1.0 {
            eprintln!(
                "[chaos]   {}: slot {:?} had no live worker {:.2}–{:.2} s{}",
                system.label(),
                g.slot.unwrap_or(0),
                g.from,
                g.to,
                if with_crash(g) {
                    " (a crash at start in it)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(Row {
        label: system.label(),
        slot_gap: longest(&mut watch.slot_gaps.iter().filter(|g| !with_crash(g))),
        crash_gap: longest(&mut watch.slot_gaps.iter().filter(|g| with_crash(g))),
        zero_gap: longest(&mut watch.zero_gaps.iter()),
        crashes: crashed.len(),
        tally,
        actions,
        rss: (before.0, after.0),
        fds: (before.1, after.1),
        serving,
    })
}

fn systems() -> Vec<System> {
    vec![
        System::new(Sys::HerdShared, App::Node),
        System::new(Sys::HerdReuseport, App::Node),
        System::new(Sys::HerdRoundRobin, App::Node),
        System::new(Sys::HerdShared, App::Builtin),
    ]
}

pub fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let mut rng = Rng::seeded();
    eprintln!("[chaos] seed {}", rng.0);
    let mut rows = Vec::new();
    for system in systems() {
        let (argv, _) = system.command(ctx, ctx.workers, 0);
        res.command(
            &format!("chaos {}", system.label()),
            argv.join(" ").replace("127.0.0.1:0", "127.0.0.1:PORT"),
        );
        eprintln!("[chaos] {} for {:?}", system.label(), ctx.chaos);
        rows.push(one(ctx, &system, &mut rng)?);
    }

    let n = ctx.workers;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{n} workers, {:?} of chaos per system (one run each): every 0.5–2 s a random action — SIGKILL a random \
         worker, SIGSTOP one for 0.5–1.5 s, or make the next start crash (`crash-next` in the app's stats \
         directory: the next app.js to start exits 1 before listening; not for the built-in worker). Load: the \
         bench's own HTTP/1.1 client, {} keep-alive connections, a request every {:?} on each, {:?} per request, \
         reconnecting after any failure. A failure is blamed on a hit worker when the connection's last answer \
         came from a worker killed or stopped (counted from its SIGCONT) in the last {:?}; a failure on a fresh \
         connection with no answer yet has no known worker. herd's children are read from /proc every {:?}: a \
         slot gap is a time its slot had no live worker (a stopped worker counts as live); gaps with a crash at \
         start in that slot are shown apart. RSS and fds are herd's own, idle, before the load and after the \
         chaos and the end check. \"serving\" is how many distinct live workers answered fresh connections within \
         {:?} after the chaos.\n",
        ctx.chaos,
        ctx.connections.clamp(1, MAX_CONNECTIONS),
        PACE,
        REQUEST_TIMEOUT,
        BLAME_WINDOW,
        SAMPLE_EVERY,
        SERVING_WITHIN,
    );
    md.push_str(
        "| system | requests | failed | bad status | refused | reset | EOF | timeout | other | failed in hit workers | failed, fresh connection | failed elsewhere |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let t = &r.tally;
        let share = if t.failures() == 0 {
            "–".to_string()
        } else {
            format!("{:.0}%", 100.0 * t.hit_worker as f64 / t.failures() as f64)
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({share}) | {} | {} |",
            r.label,
            t.requests(),
            t.failures(),
            t.by_kind[1],
            t.by_kind[2],
            t.by_kind[3],
            t.by_kind[4],
            t.by_kind[5],
            t.by_kind[6],
            t.hit_worker,
            t.fresh,
            t.elsewhere,
        );
    }
    md.push_str(
        "\n| system | kills | stops | crash flags (crashed) | longest slot gap | longest slot gap with a crash at start | longest time with no worker | herd RSS before → after | herd fds before → after | serving at the end |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    let kib = |v: Option<u64>| v.map_or(f64::NAN, |v| v as f64);
    let count = |v: Option<usize>| v.map_or("–".to_string(), |v| v.to_string());
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} ({}) | {:.0} ms | {:.0} ms | {:.0} ms | {} → {} | {} → {} | {}/{n} |",
            r.label,
            r.actions.kills,
            r.actions.stops,
            r.actions.crash_flags,
            r.crashes,
            r.slot_gap,
            r.crash_gap,
            r.zero_gap,
            mib(kib(r.rss.0)),
            mib(kib(r.rss.1)),
            count(r.fds.0),
            count(r.fds.1),
            r.serving,
        );
    }
    res.sections.push(("Chaos".into(), md));
    for r in &rows {
        let t = &r.tally;
        let outside = t.fresh + t.elsewhere;
        res.target(
            format!(
                "chaos, {}: failed requests not in flight in a hit worker",
                r.label
            ),
            outside.to_string(),
            "0",
            outside == 0,
        );
        res.target(
            format!(
                "chaos, {}: longest time a slot had no live worker (crash-at-start gaps apart)",
                r.label
            ),
            format!("{:.0} ms", r.slot_gap),
            "≤ 1 s",
            r.slot_gap <= 1000.0,
        );
        res.target(
            format!("chaos, {}: workers serving at the end", r.label),
            format!("{}/{n}", r.serving),
            format!("{n}/{n}"),
            r.serving >= n,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves `answers` in turn, one per request, on one connection.
    fn server(answers: Vec<&'static [u8]>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            for a in answers {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                s.write_all(a).unwrap();
            }
        });
        addr
    }

    #[test]
    fn reads_keep_alive_answers_and_classifies_the_end() {
        let addr = server(vec![
            b"HTTP/1.1 200 OK\r\nx-worker: 42\r\nContent-Length: 3\r\n\r\nhi\n",
            b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhi\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        ]);
        let mut c = connect(&addr).unwrap();
        let deadline = || Instant::now() + Duration::from_secs(2);
        let r = request(&mut c, deadline()).unwrap();
        assert_eq!((r.status, r.worker, r.close), (200, Some(42), false));
        let r = request(&mut c, deadline()).unwrap();
        assert_eq!((r.status, r.worker), (503, None));
        // The server goes away mid-body.
        assert_eq!(request(&mut c, deadline()).err(), Some(Outcome::Eof));
    }

    #[test]
    fn a_silent_server_is_a_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = connect(&l.local_addr().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_millis(100);
        assert_eq!(request(&mut c, deadline).err(), Some(Outcome::Timeout));
    }

    #[test]
    fn a_closed_port_is_refused() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(connect(&addr), Err(Outcome::Refused)));
    }
}
