//! The systems under test: how each is started, probed and stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::process::{kill_process, Pid, Signal};

use crate::procfs;

/// Everything the scenarios share: tools, parameters, a scratch directory.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The herd binary.
    pub herd: PathBuf,
    /// This binary (it is also the supervisor-less launcher, `herd-bench raw`).
    pub bench: PathBuf,
    /// node.
    pub node: PathBuf,
    /// PM2's CLI script (`node_modules/pm2/bin/pm2`), if installed.
    pub pm2: Option<PathBuf>,
    /// wrk.
    pub wrk: String,
    /// `bench/apps`.
    pub apps: PathBuf,
    /// Scratch space, removed at the end.
    pub workdir: PathBuf,
    /// Worker count for throughput, memory and recovery.
    pub workers: usize,
    /// The larger worker count for memory and cold start.
    pub many_workers: usize,
    /// Length of each load run.
    pub duration: Duration,
    /// How long the chaos scenario disturbs each system.
    pub chaos: Duration,
    /// Repetitions of each measurement.
    pub reps: usize,
    /// wrk connections.
    pub connections: usize,
    /// wrk threads.
    pub threads: usize,
    /// How long an idle cluster is watched for CPU use.
    pub idle: Duration,
    /// CPUs for wrk (`taskset -c`).
    pub load_cpus: Option<String>,
    /// CPUs for the servers (`taskset -c`).
    pub server_cpus: Option<String>,
}

/// Which supervisor (or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sys {
    /// `herd run --balance shared`.
    HerdShared,
    /// `herd run --balance reuseport`.
    HerdReuseport,
    /// `herd run --balance round-robin` (Node workers through their cluster
    /// module: `listen(PORT)` asks herd, which hands each connection over).
    HerdRoundRobin,
    /// Node cluster, `NODE_CLUSTER_SCHED_POLICY=rr`.
    NodeRr,
    /// Node cluster, `NODE_CLUSTER_SCHED_POLICY=none`.
    NodeNone,
    /// `pm2 start -i N`.
    Pm2,
    /// One Node process, no cluster.
    Single,
    /// N copies of the app on one shared socket, no supervisor.
    RawShared,
    /// N copies of the app, one SO_REUSEPORT socket each, no supervisor.
    RawReuseport,
}

/// Which app the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    /// `bench/apps/app.js` on Node.
    Node,
    /// herd's built-in worker (`herd hello`).
    Builtin,
}

/// A system running an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct System {
    /// The supervisor.
    pub sys: Sys,
    /// The app.
    pub app: App,
}

impl System {
    /// Shorthand.
    pub const fn new(sys: Sys, app: App) -> Self {
        System { sys, app }
    }

    /// A short, unique label.
    pub fn label(&self) -> String {
        let base = match self.sys {
            Sys::HerdShared => "herd shared",
            Sys::HerdReuseport => "herd reuseport",
            Sys::HerdRoundRobin => "herd round-robin",
            Sys::NodeRr => "node cluster rr",
            Sys::NodeNone => "node cluster none",
            Sys::Pm2 => "pm2 cluster",
            Sys::Single => "single node",
            Sys::RawShared => "ceiling shared",
            Sys::RawReuseport => "ceiling reuseport",
        };
        match self.app {
            App::Node => base.to_string(),
            App::Builtin => format!("{base} (built-in)"),
        }
    }

    /// How many workers it runs when asked for `n`.
    pub fn worker_count(&self, n: usize) -> usize {
        if self.sys == Sys::Single {
            1
        } else {
            n
        }
    }

    /// The command line and environment that start it.
    pub fn command(
        &self,
        ctx: &Ctx,
        workers: usize,
        port: u16,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let app_js = ctx.apps.join("app.js").display().to_string();
        let node = ctx.node.display().to_string();
        let herd = ctx.herd.display().to_string();
        let listen = format!("127.0.0.1:{port}");
        let n = workers.to_string();
        let app_cmd: Vec<String> = match self.app {
            App::Node => vec![node.clone(), app_js.clone()],
            App::Builtin => vec![herd.clone(), "hello".into()],
        };
        let mut env = vec![("PORT".to_string(), port.to_string())];
        let mut argv: Vec<String> = match self.sys {
            // herd and the supervisor-less launcher take the same flags.
            Sys::HerdShared
            | Sys::HerdReuseport
            | Sys::HerdRoundRobin
            | Sys::RawShared
            | Sys::RawReuseport => {
                let (program, sub) = match self.sys {
                    Sys::HerdShared | Sys::HerdReuseport | Sys::HerdRoundRobin => {
                        (herd.clone(), "run")
                    }
                    _ => (ctx.bench.display().to_string(), "raw"),
                };
                let mode = match self.sys {
                    Sys::HerdShared | Sys::RawShared => "shared",
                    Sys::HerdRoundRobin => "round-robin",
                    _ => "reuseport",
                };
                let mut v = vec![program];
                v.extend([sub, "-w", &n, "--balance", mode, "-l", &listen, "--"].map(String::from));
                v.extend(app_cmd);
                v
            }
            Sys::NodeRr | Sys::NodeNone => {
                let policy = if self.sys == Sys::NodeRr {
                    "rr"
                } else {
                    "none"
                };
                env.push(("NODE_CLUSTER_SCHED_POLICY".into(), policy.into()));
                env.push(("WORKERS".into(), n.clone()));
                vec![
                    node.clone(),
                    ctx.apps.join("cluster.js").display().to_string(),
                ]
            }
            Sys::Pm2 => {
                let pm2 = ctx
                    .pm2
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                vec![
                    node.clone(),
                    pm2,
                    "start".into(),
                    app_js.clone(),
                    "-i".into(),
                    n.clone(),
                    "--name".into(),
                    "bench".into(),
                ]
            }
            Sys::Single => vec![node.clone(), app_js.clone()],
        };
        if let Some(cpus) = &ctx.server_cpus {
            argv.splice(
                0..0,
                ["taskset".to_string(), "-c".to_string(), cpus.clone()],
            );
        }
        (argv, env)
    }

    /// Starts it with `workers` workers on a fresh port. Does not wait.
    pub fn start(&self, ctx: &Ctx, workers: usize) -> Result<Running> {
        self.start_with(ctx, |port| self.command(ctx, workers, port))
    }

    /// Starts it with the command line and environment `command` makes for
    /// a fresh port (a variant of [`command`](Self::command)'s).
    pub fn start_with(
        &self,
        ctx: &Ctx,
        command: impl FnOnce(u16) -> (Vec<String>, Vec<(String, String)>),
    ) -> Result<Running> {
        if self.sys == Sys::Pm2 && ctx.pm2.is_none() {
            bail!("pm2 is not installed");
        }
        let port = free_port()?;
        let id = format!("{}-{port}", self.label().replace([' ', '(', ')'], "_"));
        let dir = ctx.workdir.join(&id);
        std::fs::create_dir_all(&dir)?;
        let stats_dir = dir.join("stats");
        std::fs::create_dir_all(&stats_dir)?;
        let (argv, mut env) = command(port);
        env.push(("BENCH_STATS_DIR".into(), stats_dir.display().to_string()));
        // herd's control socket in the run's own directory, not /run/herd.
        env.push((
            "HERD_RUNTIME_DIR".into(),
            dir.join("run").display().to_string(),
        ));
        let pm2_home = (self.sys == Sys::Pm2).then(|| dir.join("pm2-home"));
        if let Some(home) = &pm2_home {
            env.push(("PM2_HOME".into(), home.display().to_string()));
        }
        let log = dir.join("output.log");
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("HERD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(&log)?)
            .stderr(File::create(dir.join("stderr.log"))?);
        // A PATH with the node we use, for PM2's daemon and npm-style shebangs.
        if let Some(bin) = ctx.node.parent() {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", bin.display()));
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", argv.join(" ")))?;
        Ok(Running {
            system: *self,
            port,
            started,
            child: Some(child),
            stats_dir,
            pm2_home,
            pm2_cli: ctx.pm2.clone().map(|p| (ctx.node.clone(), p)),
            dir,
        })
    }
}

/// A started system. Dropping it stops it and everything it started.
pub struct Running {
    /// What runs.
    pub system: System,
    /// The port it serves on.
    pub port: u16,
    /// When its command was spawned.
    pub started: Instant,
    child: Option<Child>,
    stats_dir: PathBuf,
    pm2_home: Option<PathBuf>,
    /// (node, PM2's CLI script), for `pm2 kill`.
    pm2_cli: Option<(PathBuf, PathBuf)>,
    dir: PathBuf,
}

impl Running {
    /// `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// herd's control directory (`HERD_RUNTIME_DIR`), for `herd status`.
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// The supervisor's pid: herd, the Node primary, PM2's daemon; or the
    /// launcher / single process for the unsupervised systems.
    pub fn supervisor(&self) -> Option<u32> {
        match &self.pm2_home {
            Some(home) => std::fs::read_to_string(home.join("pm2.pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            None => self.child.as_ref().map(|c| c.id()),
        }
    }

    /// The directory the Node app writes its readiness and counts into
    /// (`BENCH_STATS_DIR`); the chaos scenario also leaves its flag there.
    pub fn stats_dir(&self) -> &Path {
        &self.stats_dir
    }

    /// What the system wrote to stdout (herd's worker lines, Node cluster's events).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("output.log")).unwrap_or_default()
    }

    /// PM2's CLI with this system's `PM2_HOME`: `pm2 ARGS`, run to its end.
    pub fn pm2(&self, args: &[&str]) -> Result<std::process::ExitStatus> {
        let (Some(home), Some((node, cli))) = (&self.pm2_home, &self.pm2_cli) else {
            bail!("not PM2");
        };
        Ok(Command::new(node)
            .arg(cli)
            .args(args)
            .env("PM2_HOME", home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?)
    }

    /// What the system wrote to stderr (herd's own events).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// How many workers have said they listen: the Node app writes
    /// `PID.ready` into the stats directory, herd's built-in worker prints
    /// `hello: listening on …`. The same signal under every supervisor.
    pub fn ready_count(&self) -> usize {
        match self.system.app {
            App::Node => std::fs::read_dir(&self.stats_dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.path().extension().is_some_and(|x| x == "ready"))
                        .count()
                })
                .unwrap_or(0),
            App::Builtin => self
                .stdout()
                .lines()
                .filter(|l| l.contains("hello: listening on"))
                .count(),
        }
    }

    /// Waits until `workers` workers are listening and one has answered a
    /// request; returns the time since the command was spawned.
    pub fn wait_ready(&self, workers: usize, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        let fail = |what: &str| {
            anyhow::anyhow!(
                "{}: {what} within {timeout:?}; stderr:\n{}",
                self.system.label(),
                self.stderr()
            )
        };
        while self.ready_count() < workers {
            if Instant::now() > deadline {
                return Err(fail(&format!(
                    "only {} of {workers} workers listening",
                    self.ready_count()
                )));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let ready = self.started.elapsed();
        while get_worker(self.port).is_err() {
            if Instant::now() > deadline {
                return Err(fail("no answer"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(ready)
    }

    /// Requests and connections served so far, per worker pid (Node app only).
    pub fn worker_stats(&self) -> BTreeMap<u32, (u64, u64)> {
        let mut out = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&self.stats_dir) else {
            return out;
        };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                let Ok(text) = std::fs::read_to_string(e.path()) else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                    continue;
                };
                if let (Some(pid), Some(r), Some(c)) = (
                    v["pid"].as_u64(),
                    v["requests"].as_u64(),
                    v["connections"].as_u64(),
                ) {
                    out.insert(pid as u32, (r, c));
                }
            }
        }
        out
    }

    fn stop_inner(&mut self) {
        let root = self.supervisor();
        let mut everything: BTreeSet<u32> = BTreeSet::new();
        if let Some(child) = &self.child {
            everything.insert(child.id());
            everything.extend(procfs::descendants(child.id()));
        }
        if let Some(r) = root {
            everything.insert(r);
            everything.extend(procfs::descendants(r));
        }
        if let Some(home) = &self.pm2_home {
            if let Some((node, cli)) = &self.pm2_cli {
                let _ = Command::new(node)
                    .arg(cli)
                    .arg("kill")
                    .env("PM2_HOME", home)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        } else if let Some(child) = &self.child {
            signal(child.id(), Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && everything.iter().any(|p| procfs::alive(*p)) {
            if let Some(child) = &mut self.child {
                let _ = child.try_wait();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in &everything {
            if procfs::alive(*p) {
                signal(*p, Signal::KILL);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it (SIGTERM or `pm2 kill`, then SIGKILL after 5 s).
    pub fn stop(mut self) {
        self.stop_inner();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_inner();
        }
    }
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: u32, sig: Signal) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = kill_process(p, sig);
    }
}

/// A port free at the moment of asking.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One `GET /` with `Connection: close`; returns the answering worker's pid.
pub fn get_worker(port: u16) -> Result<u32> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let pid = out
        .split("\r\n")
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-worker")
                .then(|| v.trim().parse::<u32>().ok())?
        });
    pid.with_context(|| format!("no x-worker header in {out:?}"))
}

/// Whether `path` exists and is executable, for tool discovery.
pub fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
