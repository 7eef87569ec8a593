//! What a cluster runs and how it is kept alive.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// A signal number, as herd's configuration carries it.
pub use rustix::process::Signal;

use crate::backoff::BackoffPolicy;
use crate::listen::ListenSpec;
use crate::output::LogFormat;
use crate::socket::Balance;

/// The most workers one cluster may run.
pub const MAX_WORKERS: usize = 1024;

/// When an exited worker is replaced (OTP's permanent / transient / temporary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Always replace it.
    #[default]
    Always,
    /// Replace it unless it exited with status 0.
    OnFailure,
    /// Never replace it; herd exits when the last worker has.
    Never,
}

impl FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "never" => Ok(RestartPolicy::Never),
            other => Err(format!(
                "unknown restart policy {other:?} (expected always, on-failure or never)"
            )),
        }
    }
}

/// What a crash loop (too many restarts too fast) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrashLoopAction {
    /// Mark the slot failed, say so, and keep retrying at the backoff cap.
    #[default]
    Retry,
    /// Stop the cluster and exit non-zero, for an outer supervisor to act.
    Exit,
}

impl FromStr for CrashLoopAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "retry" => Ok(CrashLoopAction::Retry),
            "exit" => Ok(CrashLoopAction::Exit),
            other => Err(format!(
                "unknown crash-loop action {other:?} (expected retry or exit)"
            )),
        }
    }
}

/// The program every worker runs, resolved to a path once, at start.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The executable, resolved through `PATH`.
    pub program: PathBuf,
    /// `argv[0]` and the arguments, as given.
    pub argv: Vec<OsString>,
    /// Variables set for the workers on top of herd's own environment
    /// (a package script's `PATH` and `npm_*` variables).
    pub env: Vec<(OsString, OsString)>,
    /// The workers' working directory; `None`: herd's.
    pub dir: Option<PathBuf>,
    /// What runs: Node (and how), or anything else.
    pub runtime: Runtime,
    /// How it was resolved: what a reload resolves again.
    pub origin: Origin,
}

/// How a [`WorkerCommand`] was resolved, so that a reload can resolve it
/// again and pick up what a deploy changed: a new binary on `PATH`, an
/// edited `package.json`, a `current -> releases/N` symlink moved under
/// the working directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Origin {
    /// Used as it is (built by hand, or [`WorkerCommand::current_exe`]): a
    /// reload runs the same path again, whatever file is there now.
    #[default]
    Fixed,
    /// By [`WorkerCommand::resolve`] from `argv` in `cwd`.
    Resolved {
        /// The command line as given.
        argv: Vec<OsString>,
        /// The working directory as the user sees it (`$PWD` when it names
        /// the same directory as `getcwd`, so a symlinked path stays one).
        cwd: PathBuf,
    },
    /// By [`WorkerCommand::resolve_as_given`] from `argv` in `cwd`.
    AsGiven {
        /// The command line as given.
        argv: Vec<OsString>,
        /// As for `Resolved`.
        cwd: PathBuf,
    },
}

/// Whether a worker command is Node, which decides whether herd speaks
/// Node's cluster protocol to it (`NODE_UNIQUE_ID`, `NODE_CHANNEL_FD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Runtime {
    /// Not Node (or not known to be).
    #[default]
    Other,
    /// `node [node's options] [script] [args]`: node itself, so its options
    /// (e.g. `--inspect`) are in `argv`.
    Node,
    /// A script that runs Node: a `#!` line naming node, or a package
    /// script run through `sh -c`; `argv` holds the script's own arguments.
    NodeScript,
}

/// Why a worker command cannot run at all.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No command was given.
    #[error("no command given")]
    Empty,
    /// Not found on `PATH` or at the given path.
    #[error("command not found: {0}")]
    NotFound(String),
    /// Found but not an executable file.
    #[error("cannot execute {0}: permission denied or not an executable file")]
    NotExecutable(String),
    /// A package-manager command line (`npm start`, `yarn run dev`) whose
    /// script cannot be run as a worker: no `package.json`, no such
    /// script, a subcommand that runs no script.
    #[error("{0}")]
    Script(String),
}

impl WorkerCommand {
    /// Resolves a command line for workers: a package-manager command line
    /// (`npm start`, `npm run NAME`, `yarn NAME`, `pnpm start`, …) becomes
    /// the command its `package.json` script runs, in the package's
    /// directory with its environment (see `launch.rs`), so the app, not
    /// the package manager, is the worker; anything else is
    /// [`resolve_as_given`](Self::resolve_as_given).
    pub fn resolve(argv: Vec<OsString>) -> Result<Self, CommandError> {
        Self::resolve_in(argv, &logical_cwd())
    }

    fn resolve_in(argv: Vec<OsString>, cwd: &Path) -> Result<Self, CommandError> {
        let origin = Origin::Resolved {
            argv: argv.clone(),
            cwd: cwd.to_path_buf(),
        };
        let mut command = match crate::launch::package_script(&argv, cwd)? {
            Some(command) => command,
            None => Self::resolve_as_given_in(argv, cwd)?,
        };
        command.origin = origin;
        Ok(command)
    }

    /// The command resolved again the way it was first ([`Origin`]), for a
    /// reload: in the working directory as the user named it, so a moved
    /// symlink leads to the new release; its workers start there.
    pub fn resolve_again(&self) -> Result<Self, CommandError> {
        let mut again = match &self.origin {
            Origin::Fixed => return Ok(self.clone()),
            Origin::Resolved { argv, cwd } => Self::resolve_in(argv.clone(), cwd)?,
            Origin::AsGiven { argv, cwd } => Self::resolve_as_given_in(argv.clone(), cwd)?,
        };
        if let Origin::Resolved { cwd, .. } | Origin::AsGiven { cwd, .. } = &self.origin {
            if again.dir.is_none() {
                again.dir = Some(cwd.clone());
            }
            if again.program.is_relative() {
                again.program = cwd.join(&again.program);
            }
        }
        Ok(again)
    }

    /// Resolves `argv[0]` the way a shell would: a name with a `/` is a path,
    /// anything else is looked up in `PATH`. Node is recognised by the
    /// program's name or its `#!` line.
    pub fn resolve_as_given(argv: Vec<OsString>) -> Result<Self, CommandError> {
        Self::resolve_as_given_in(argv, &logical_cwd())
    }

    fn resolve_as_given_in(argv: Vec<OsString>, cwd: &Path) -> Result<Self, CommandError> {
        let origin = Origin::AsGiven {
            argv: argv.clone(),
            cwd: cwd.to_path_buf(),
        };
        let first = argv.first().ok_or(CommandError::Empty)?;
        let shown = first.to_string_lossy().into_owned();
        if first.is_empty() {
            return Err(CommandError::Empty);
        }
        let program = if first.to_string_lossy().contains('/') {
            // Relative to the working directory as the user named it (the
            // same directory as herd's at start; after a deploy, the new
            // release's).
            let path = cwd.join(first);
            check_executable(&path, &shown)?;
            if Path::new(first).is_absolute() {
                path
            } else {
                PathBuf::from(first)
            }
        } else {
            let path_var = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
            let mut not_executable = None;
            let mut found = None;
            for dir in std::env::split_paths(&path_var) {
                let candidate = dir.join(first);
                match check_executable(&candidate, &shown) {
                    Ok(()) => {
                        found = Some(candidate);
                        break;
                    }
                    Err(e @ CommandError::NotExecutable(_)) => not_executable = Some(e),
                    Err(_) => {}
                }
            }
            match (found, not_executable) {
                (Some(p), _) => p,
                (None, Some(e)) => return Err(e),
                (None, None) => return Err(CommandError::NotFound(shown)),
            }
        };
        let runtime = crate::launch::runtime_of(&cwd.join(&program));
        Ok(WorkerCommand {
            program,
            argv,
            env: Vec::new(),
            dir: None,
            runtime,
            origin,
        })
    }

    /// Whether the program is Node.js (`node`, `nodejs`, `node20`, …, or a
    /// script whose `#!` line runs it).
    pub fn is_node(&self) -> bool {
        self.runtime != Runtime::Other
    }

    /// Whether the program is Node.js running a script file: what Node needs
    /// to start its cluster worker side (it checks `process.argv[1]`), so
    /// herd sets `NODE_UNIQUE_ID` only then. `node -e`, `-p` and the REPL
    /// run no script.
    pub fn runs_node_script(&self) -> bool {
        match self.runtime {
            Runtime::Other => return false,
            Runtime::NodeScript => return true,
            Runtime::Node => {}
        }
        // Node's options that take the next argument as their value.
        const WITH_VALUE: &[&str] = &[
            "-r",
            "--require",
            "--import",
            "--loader",
            "--experimental-loader",
            "-C",
            "--conditions",
            "--title",
            "--env-file",
            "--input-type",
            "--stack-size",
            "--max-old-space-size",
        ];
        let mut args = self.argv.iter().skip(1).map(|a| a.to_string_lossy());
        while let Some(arg) = args.next() {
            match arg.as_ref() {
                "-e" | "--eval" | "-p" | "--print" | "-i" | "--interactive" => return false,
                "--" => return args.next().is_some(),
                a if WITH_VALUE.contains(&a) => {
                    args.next();
                }
                a if a.starts_with('-') => {}
                _ => return true,
            }
        }
        false
    }

    /// This very program, re-executed with the same arguments: the library's
    /// default worker command (the worker learns its role from [`crate::role`]).
    pub fn current_exe() -> Result<Self, CommandError> {
        let program = std::env::current_exe()
            .map_err(|e| CommandError::NotFound(format!("the current executable ({e})")))?;
        let mut argv: Vec<OsString> = std::env::args_os().collect();
        if argv.is_empty() {
            argv.push(program.clone().into_os_string());
        }
        Ok(WorkerCommand {
            program,
            argv,
            env: Vec::new(),
            dir: None,
            runtime: Runtime::Other,
            origin: Origin::Fixed,
        })
    }

    /// The command line as the user would type it, for logs.
    pub fn display(&self) -> String {
        let parts: Vec<_> = self.argv.iter().map(|a| a.to_string_lossy()).collect();
        parts.join(" ")
    }
}

/// The working directory as the user sees it: `$PWD` when it is absolute
/// and names the same directory as `getcwd` (a shell keeps the symlinked
/// path there), else `getcwd`'s.
fn logical_cwd() -> PathBuf {
    let physical = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => {
            use std::os::unix::fs::MetadataExt;
            a.dev() == b.dev() && a.ino() == b.ino()
        }
        _ => false,
    };
    match std::env::var_os("PWD").map(PathBuf::from) {
        Some(pwd) if pwd.is_absolute() && same(&pwd, &physical) => pwd,
        _ => physical,
    }
}

fn check_executable(path: &Path, shown: &str) -> Result<(), CommandError> {
    let meta = std::fs::metadata(path).map_err(|_| CommandError::NotFound(shown.into()))?;
    if !meta.is_file() {
        return Err(CommandError::NotExecutable(shown.into()));
    }
    rustix::fs::access(path, rustix::fs::Access::EXEC_OK)
        .map_err(|_| CommandError::NotExecutable(shown.into()))
}

/// Everything a cluster needs to run.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// What each worker runs.
    pub command: WorkerCommand,
    /// How many worker slots.
    pub workers: usize,
    /// What to listen on (may be empty: a cluster without sockets).
    pub listen: Vec<ListenSpec>,
    /// How connections are spread.
    pub balance: Balance,
    /// Under [`Balance::RoundRobin`]: which worker gets each connection.
    pub picker: crate::Picker,
    /// When exited workers are replaced.
    pub restart: RestartPolicy,
    /// How restarts are spaced.
    pub backoff: BackoffPolicy,
    /// Crash-loop limit: more than this many restarts of a slot…
    pub max_restarts: u32,
    /// …within this window.
    pub within: Duration,
    /// What a crash loop does.
    pub on_crash_loop: CrashLoopAction,
    /// The signal that asks a worker to stop.
    pub stop_signal: Signal,
    /// How long a stopping worker gets before SIGKILL.
    pub stop_timeout: Duration,
    /// How worker output is written.
    pub log_format: LogFormat,
    /// The channel between the primary and each worker.
    pub ipc: Ipc,
    /// How the primary encodes messages on herd's channel.
    pub codec: crate::ipc::frame::Codec,
    /// A worker that stayed up this long (or said it was ready) started
    /// successfully: when it is killed (SIGKILL, SIGTERM: an OOM killer, an
    /// operator) or exits 0, it is replaced at once and the death is no
    /// crash-loop strike. Faster deaths, and failures of its own (a non-zero
    /// exit, a crash signal) at any age, back off and count.
    pub min_uptime: Duration,
    /// The longest IPC message accepted from a worker; a longer one is
    /// skipped (counted, logged once per worker) and the channel stays open.
    pub ipc_max_message: usize,
    /// The most events [`Cluster::start`](crate::Cluster::start)'s queue holds.
    pub event_queue: usize,
    /// The most message payload bytes that queue holds.
    pub event_queue_bytes: usize,
    /// How each worker's process tree is contained.
    pub containment: Containment,
    /// Give each worker one pipe for stdout and stderr (as `2>&1`), so its
    /// lines keep their order; both then go to herd's stdout.
    pub merge_output: bool,
    /// Whether Node workers (under [`Ipc::Node`]) are Node cluster workers
    /// (`NODE_UNIQUE_ID` set, so `server.listen()` asks herd for its
    /// socket): `None` decides by the command
    /// ([`WorkerCommand::runs_node_script`]), `Some` forces it.
    pub node_cluster: Option<bool>,
    /// What makes a worker ready.
    pub ready: ReadyMode,
    /// Under [`ReadyMode::Delay`] (and [`ReadyMode::Auto`], for a worker
    /// that says nothing): ready this long after it started.
    pub ready_delay: Duration,
    /// Under [`ReadyMode::Notify`], [`ReadyMode::Node`] and
    /// [`ReadyMode::Listen`]: a worker not ready this long after it started
    /// failed to start (killed, and a crash-loop strike).
    pub ready_timeout: Duration,
    /// The watchdog (systemd's `WatchdogSec=`): workers get
    /// `WATCHDOG_USEC`; one that sent `WATCHDOG=1` once and then nothing
    /// for this long is hung: SIGABRT, SIGKILL 2 s later, replaced. `None`
    /// or zero (as systemd's `WatchdogSec=0`): off, and no timer.
    pub watchdog: Option<Duration>,
    /// How many replacement workers a rolling reload starts at a time,
    /// beside the workers they replace (`--reload-surge`; Kubernetes'
    /// `maxSurge`). A replaced worker is drained only once its replacement
    /// is ready, and the next slot's replacement starts once it exited, so
    /// at most `workers + reload_surge` workers are alive. At least 1.
    pub reload_surge: usize,
    /// `--max-lifetime`: a worker that ran this long (plus up to 10 %
    /// jitter, so workers started together do not go together) is
    /// replaced the way a reload replaces it: its replacement ready first,
    /// then it drains (gunicorn's `max_requests`, by time). `None`: never.
    pub max_lifetime: Option<Duration>,
    /// `--max-memory`: a worker whose process tree's resident memory
    /// (RSS, bytes) exceeds this is replaced the same way. Read at most
    /// once a second, and only when set. `None`: never.
    pub max_memory: Option<u64>,
    /// A control socket for `herd status`, `herd reload` and the other
    /// control commands ([`crate::control`]). `None` (the library's
    /// default): no socket, no task.
    pub control: Option<crate::control::ControlConfig>,
    /// `--metrics`: where to serve Prometheus `/metrics`, `/healthz` and
    /// `/ready` over HTTP. `None` (the default): no socket, no task.
    pub metrics: Option<std::net::SocketAddr>,
    /// `/ready` answers 200 while at least this many workers are ready
    /// (and the cluster is not stopping), 503 otherwise. Default 1.
    pub min_ready: usize,
    /// Socket activation: when systemd (or `systemd-socket-activate`)
    /// passed this process sockets (`LISTEN_FDS`, `LISTEN_PID` naming it),
    /// use them for the listen specs they match instead of binding (every
    /// one of them when `listen` is empty). Default true.
    pub socket_activation: bool,
    /// Who workers run as (`--user`): `None`, herd's own user. Needs herd
    /// to run as root.
    pub user: Option<Credentials>,
}

/// What makes a worker ready: the moment it takes traffic in a round-robin
/// cluster, counts as started, and (later) lets a reload move on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadyMode {
    /// Whatever the worker says first (`READY=1` on its `NOTIFY_SOCKET`,
    /// Node's `process.send('ready')` or its server's `listening`, a
    /// library worker's `ready()` or `listen()`), or, for a program that
    /// says nothing, `ready_delay` after it started. No timeout.
    #[default]
    Auto,
    /// `READY=1` on the worker's `NOTIFY_SOCKET` (sd_notify; a library
    /// worker's `ready()` too), within `ready_timeout`.
    Notify,
    /// Node's `process.send('ready')` or its server's `listening`, within
    /// `ready_timeout`.
    Node,
    /// The worker's server listening (Node's `listening`, a library
    /// worker's `listen()`), within `ready_timeout`.
    Listen,
    /// `ready_delay` after it started, whatever it says.
    Delay,
}

impl std::str::FromStr for ReadyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ReadyMode::Auto),
            "notify" => Ok(ReadyMode::Notify),
            "node" => Ok(ReadyMode::Node),
            "listen" => Ok(ReadyMode::Listen),
            "delay" => Ok(ReadyMode::Delay),
            other => Err(format!(
                "unknown readiness {other:?} (expected auto, notify, node, listen or delay)"
            )),
        }
    }
}

/// How a worker said it is ready, as [`ReadyMode`] weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadySignal {
    /// `READY=1` on its notify socket.
    Notify,
    /// Node's `process.send('ready')`.
    NodeReady,
    /// A library worker's `ready()`.
    LibraryReady,
    /// Its server listens (Node's `listening`, a library `listen()`).
    Listening,
}

impl ReadyMode {
    /// Whether `signal` makes a worker ready under this mode.
    pub(crate) fn accepts(self, signal: ReadySignal) -> bool {
        use ReadySignal::*;
        match self {
            ReadyMode::Auto => true,
            ReadyMode::Notify => matches!(signal, Notify | LibraryReady),
            ReadyMode::Node => matches!(signal, NodeReady | Listening),
            ReadyMode::Listen => matches!(signal, Listening),
            ReadyMode::Delay => false,
        }
    }
}

/// How a worker's whole process tree is kept together, so that it can be
/// stopped with the worker (systemd's KillMode=control-group).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Containment {
    /// A cgroup per worker where herd can create one, process groups otherwise.
    #[default]
    Auto,
    /// A cgroup per worker; starting fails if herd cannot create cgroups.
    Cgroup,
    /// Process groups only.
    ProcessGroup,
}

impl std::str::FromStr for Containment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Containment::Auto),
            "cgroup" => Ok(Containment::Cgroup),
            "process-group" => Ok(Containment::ProcessGroup),
            other => Err(format!(
                "expected auto, cgroup or process-group, got {other:?}"
            )),
        }
    }
}

impl std::fmt::Display for Containment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Containment::Auto => "auto",
            Containment::Cgroup => "cgroup",
            Containment::ProcessGroup => "process-group",
        })
    }
}

/// The IPC channel between the primary and each worker, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ipc {
    /// No channel.
    #[default]
    None,
    /// Node's channel (`NODE_CHANNEL_FD`, newline-delimited JSON): Node's
    /// `process.send` and `process.on('message')` work unchanged.
    Node,
    /// herd's channel (`HERD_IPC_FD`, length-delimited frames): what
    /// [`crate::worker::Channel`] speaks.
    Herd,
}

impl ClusterConfig {
    /// A configuration with herd's defaults for everything but the command.
    pub fn new(command: WorkerCommand) -> Self {
        ClusterConfig {
            command,
            workers: 2,
            listen: Vec::new(),
            balance: Balance::default(),
            picker: crate::Picker::default(),
            restart: RestartPolicy::default(),
            backoff: BackoffPolicy::default(),
            max_restarts: 5,
            within: Duration::from_secs(30),
            on_crash_loop: CrashLoopAction::default(),
            stop_signal: Signal::TERM,
            stop_timeout: Duration::from_secs(10),
            log_format: LogFormat::default(),
            ipc: Ipc::None,
            codec: crate::ipc::frame::Codec::Json,
            min_uptime: Duration::from_secs(1),
            ipc_max_message: crate::ipc::MAX_MESSAGE,
            event_queue: 4096,
            event_queue_bytes: 16 * 1024 * 1024,
            containment: Containment::Auto,
            merge_output: false,
            node_cluster: None,
            ready: ReadyMode::Auto,
            ready_delay: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(30),
            watchdog: None,
            reload_surge: 1,
            max_lifetime: None,
            max_memory: None,
            control: None,
            metrics: None,
            min_ready: 1,
            socket_activation: true,
            user: None,
        }
    }
}

/// Parses a signal by name (`TERM`, `SIGTERM`, case-insensitive) or number.
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let sig = match name {
        "HUP" => Signal::HUP,
        "INT" => Signal::INT,
        "QUIT" => Signal::QUIT,
        "KILL" => Signal::KILL,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "TERM" => Signal::TERM,
        "CONT" => Signal::CONT,
        "STOP" => Signal::STOP,
        "WINCH" => Signal::WINCH,
        "ALRM" => Signal::ALARM,
        _ => match name.parse::<i32>().ok().and_then(Signal::from_named_raw) {
            Some(sig) => sig,
            None => return Err(format!("unknown signal {text:?}")),
        },
    };
    Ok(sig)
}

/// The conventional name of a signal number (`SIGTERM`), or its number.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

/// Parses `10s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (expected e.g. 500ms, 10s, 2m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("invalid duration {text:?} (units: ms, s, m, h)")),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("duration {text:?} is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod node_script_tests {
    use super::WorkerCommand;
    use std::path::PathBuf;

    fn node(args: &[&str]) -> bool {
        let mut argv = vec!["node".into()];
        argv.extend(args.iter().map(|a| a.into()));
        WorkerCommand {
            program: PathBuf::from("/usr/bin/node"),
            argv,
            env: Vec::new(),
            dir: None,
            runtime: super::Runtime::Node,
            origin: super::Origin::Fixed,
        }
        .runs_node_script()
    }

    #[test]
    fn tells_scripts_from_eval_and_repl() {
        assert!(node(&["app.js"]));
        assert!(node(&["--inspect", "-r", "dotenv/config", "app.js", "-e"]));
        assert!(node(&["--", "app.js"]));
        assert!(!node(&["-e", "1"]));
        assert!(!node(&["--print", "1"]));
        assert!(!node(&[]));
        assert!(!node(&["-r", "x.js"]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment_parses_and_prints() {
        for c in [
            Containment::Auto,
            Containment::Cgroup,
            Containment::ProcessGroup,
        ] {
            assert_eq!(c.to_string().parse::<Containment>(), Ok(c));
        }
        assert!("cgroups".parse::<Containment>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        for bad in ["", "s", "10x", "-1s", "1e400"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::TERM);
        assert_eq!(parse_signal("int").unwrap(), Signal::INT);
        assert_eq!(parse_signal("9").unwrap(), Signal::KILL);
        assert!(parse_signal("SIGNOPE").is_err());
        assert_eq!(signal_name(9), "SIGKILL");
    }

    #[test]
    fn resolves_commands_like_a_shell() {
        let ok = WorkerCommand::resolve(vec!["sh".into(), "-c".into()]).unwrap();
        assert!(ok.program.is_absolute());
        assert!(matches!(
            WorkerCommand::resolve(vec!["no-such-command-herd".into()]),
            Err(CommandError::NotFound(_))
        ));
        let plain = std::env::temp_dir().join(format!("herd-noexec-{}", std::process::id()));
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let result = WorkerCommand::resolve(vec![plain.clone().into()]);
        std::fs::remove_file(&plain).unwrap();
        assert!(matches!(result, Err(CommandError::NotExecutable(_))));
        assert!(matches!(
            WorkerCommand::resolve(vec!["/".into()]),
            Err(CommandError::NotExecutable(_))
        ));
    }
}

/// Who workers run as (`--user`, `--group`): herd starts as root, binds its
/// sockets, and each worker drops to these ids (supplementary groups
/// included) before it execs, with `HOME`, `USER`, `LOGNAME` and `SHELL`
/// set to the user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user's name.
    pub name: String,
    /// The user id.
    pub uid: u32,
    /// The group id (the user's primary group unless `--group` names one).
    pub gid: u32,
    /// Supplementary groups (the user's, from the group database).
    pub groups: Vec<u32>,
    /// The user's home directory.
    pub home: PathBuf,
    /// The user's login shell.
    pub shell: PathBuf,
}

impl Credentials {
    /// Looks up `user` (a name or a numeric uid) and `group` (a name or a
    /// numeric gid; the user's primary group when `None`).
    pub fn lookup(user: &str, group: Option<&str>) -> Result<Credentials, String> {
        let found = match user.parse::<u32>() {
            Ok(uid) => uzers::get_user_by_uid(uid),
            Err(_) => uzers::get_user_by_name(user),
        }
        .ok_or_else(|| format!("--user {user}: no such user"))?;
        let gid = match group {
            None => found.primary_group_id(),
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => uzers::get_group_by_name(g)
                    .ok_or_else(|| format!("--group {g}: no such group"))?
                    .gid(),
            },
        };
        let name = found.name().to_string_lossy().into_owned();
        let mut groups: Vec<u32> = uzers::get_user_groups(found.name(), gid)
            .unwrap_or_default()
            .iter()
            .map(|g| g.gid())
            .collect();
        if !groups.contains(&gid) {
            groups.push(gid);
        }
        groups.sort_unstable();
        groups.dedup();
        use uzers::os::unix::UserExt;
        Ok(Credentials {
            name,
            uid: found.uid(),
            gid,
            groups,
            home: found.home_dir().to_path_buf(),
            shell: found.shell().to_path_buf(),
        })
    }
}
