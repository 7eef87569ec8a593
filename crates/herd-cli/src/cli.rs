//! Command-line flags.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use herd::backoff::BackoffPolicy;
use herd::config::{parse_duration, parse_signal, Signal, MAX_WORKERS};
use herd::output::LogFormat;
use herd::{
    Balance, ClusterConfig, Containment, CrashLoopAction, ListenSpec, Picker, ReadyMode,
    RestartPolicy, WorkerCommand,
};

const EXIT_STATUSES: &str = "\
Durations (DURATION): 500ms, 10s, 1.5s, 2m, 1h; a bare number is seconds, as in systemd units.

Exit status:
  0    stopped by SIGINT/SIGTERM, or every worker finished with status 0
  1    every worker finished and one failed (--restart never/on-failure), or an internal error
  2    bad input: flags, listen specs, address in use or not permitted, a --name in use
  3    crash loop under --on-crash-loop exit, or no worker ever started (every slot crash-looped)
  126  the worker command is not executable
  127  the worker command was not found";

/// Run any server as a cluster of worker processes sharing its sockets.
#[derive(Debug, Parser)]
#[command(
    name = "herd",
    version,
    about,
    propagate_version = true,
    after_help = "Start with: herd run -w 4 -l 127.0.0.1:8000 -- node server.js\n\
                  Every option of run: herd run --help"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// herd's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command as N workers sharing the listening sockets.
    #[command(after_help = EXIT_STATUSES)]
    Run(Box<RunArgs>),
    /// The built-in HTTP hello-world server (what `herd run` runs with no command).
    Hello(HelloArgs),
    /// List the running clusters: name, pid, workers ready/total, uptime.
    #[command(after_help = CONTROL_STATUSES)]
    Ls(JsonArg),
    /// One cluster's slots and workers: state, readiness, uptime, restarts, CPU, memory.
    #[command(after_help = CONTROL_STATUSES)]
    Status(NameArgs),
    /// Reload a cluster with no connection lost (as SIGHUP); waits for the outcome.
    #[command(after_help = CONTROL_STATUSES)]
    Reload(NameArgs),
    /// Scale a cluster to N workers, or by +K / -K.
    #[command(after_help = CONTROL_STATUSES)]
    Scale(ScaleArgs),
    /// Replace one slot's worker with no connection lost (a new one ready first).
    #[command(after_help = CONTROL_STATUSES)]
    Restart(RestartArgs),
    /// Send a signal to one slot's worker (its process group) or to every worker.
    #[command(after_help = CONTROL_STATUSES)]
    Signal(SignalArgs),
    /// Stop a cluster gracefully (as SIGTERM) and wait until herd has exited.
    #[command(after_help = CONTROL_STATUSES)]
    Stop(StopArgs),
    /// Print a cluster's recent log lines (herd's and its workers'), and follow them.
    #[command(after_help = CONTROL_STATUSES)]
    Logs(LogsArgs),
    /// A live terminal monitor of a cluster: workers' state, CPU and memory with their
    /// history, recent log lines; keys to restart, scale and reload.
    #[command(after_help = CONTROL_STATUSES)]
    Top(TopArgs),
    /// Print a systemd service unit (and with --socket its .socket unit) that runs
    /// `herd run ARGS`: Type=notify, ExecReload, KillMode=mixed, TimeoutStopSec.
    SystemdUnit(UnitArgs),
}

/// `herd systemd-unit`.
#[derive(Debug, Args)]
pub struct UnitArgs {
    /// The unit's name (NAME.service, NAME.socket).
    #[arg(long, default_value = "herd")]
    pub unit: String,
    /// Also a .socket unit: systemd binds the -l addresses and herd takes them.
    #[arg(long)]
    pub socket: bool,
    /// Write NAME.service (and NAME.socket) into this directory instead of printing.
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
    /// `herd run`'s flags and command, after `--`.
    #[arg(last = true, value_name = "RUN ARGS")]
    pub run: Vec<OsString>,
}

/// `herd top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The cluster.
    pub name: Option<String>,
    /// How often to refresh.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub interval: Duration,
}

const CONTROL_STATUSES: &str = "\
The cluster is found by name in $HERD_RUNTIME_DIR, else /run/herd for root, else
$XDG_RUNTIME_DIR/herd, else /tmp/herd-UID (each running herd has NAME.sock there).
NAME may be left out when exactly one cluster runs.

Exit status:
  0  done
  1  the cluster refused or the operation failed (a reload rolled back, a slot has no worker)
  2  bad input: arguments, or a NAME that matches several clusters
  4  no such cluster is running, or its control socket cannot be used (permission denied)";

/// `--json` alone.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print the answer as JSON (docs/PROTOCOL.md).
    #[arg(long)]
    pub json: bool,
}

/// A cluster name (optional when one runs) and `--json`.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// The cluster (as `herd ls` lists it).
    pub name: Option<String>,
    /// Print the answer as JSON (docs/PROTOCOL.md).
    #[arg(long)]
    pub json: bool,
}

/// `herd scale`.
#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct ScaleArgs {
    /// The cluster.
    pub name: String,
    /// N workers (1-1024), or +K / -K.
    pub workers: String,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `herd restart`.
#[derive(Debug, Args)]
pub struct RestartArgs {
    /// The cluster.
    pub name: String,
    /// The slot whose worker to replace.
    pub slot: usize,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `herd signal`.
#[derive(Debug, Args)]
pub struct SignalArgs {
    /// The cluster.
    pub name: String,
    /// TERM, SIGTERM or 15.
    pub signal: String,
    /// Only this slot's worker (every live worker when omitted).
    pub slot: Option<usize>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `herd stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// The cluster.
    pub name: String,
    /// How long to wait for herd to exit before giving up (exit 1); herd
    /// itself SIGKILLs what is left at its --stop-timeout.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

/// `herd logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The cluster.
    pub name: Option<String>,
    /// Keep printing new lines as they come (until Ctrl-C or the cluster ends).
    #[arg(short, long)]
    pub follow: bool,
    /// Only this slot's workers' lines.
    #[arg(long)]
    pub slot: Option<usize>,
    /// How many recent lines (herd keeps the last 1,000, at most 1 MiB).
    #[arg(short = 'n', long, default_value = "10")]
    pub lines: usize,
    /// One JSON object per line (docs/PROTOCOL.md), as herd keeps them.
    #[arg(long)]
    pub json: bool,
}

/// `herd run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Number of workers, or `auto` for one per CPU this process may use (its affinity mask and
    /// cgroup CPU quota: a container limited to 2 CPUs gets 2). Each worker costs herd
    /// about 4 open files (its stdout and stderr pipes, its IPC channel, a
    /// reuseport socket per address); herd raises its own soft open-file limit
    /// to the hard limit at start, and workers get the limit herd was started
    /// with.
    #[arg(short, long, default_value = "2", value_parser = parse_workers, value_name = "N|auto")]
    pub workers: Workers,

    /// Where to listen: HOST:PORT, [V6]:PORT, :PORT, unix:PATH, udp:HOST:PORT,
    /// each optionally NAME=…; repeatable. Default: 127.0.0.1:8000.
    #[arg(short, long = "listen", value_name = "SPEC")]
    pub listen: Vec<ListenSpec>,

    /// Do not listen at all (a cluster of workers without sockets).
    #[arg(long, conflicts_with = "listen")]
    pub no_listen: bool,

    /// How connections are spread: one shared socket, one SO_REUSEPORT socket per worker, or
    /// round-robin (herd accepts and hands each connection to a worker: Node workers, through
    /// their cluster module).
    #[arg(
        long,
        default_value_t = Balance::default(),
        value_name = "shared|reuseport|round-robin"
    )]
    pub balance: Balance,

    /// Under --balance round-robin, which worker gets each connection.
    #[arg(
        long,
        default_value_t = Picker::default(),
        value_name = "round-robin|least-connections|sticky"
    )]
    pub picker: Picker,

    /// When to replace an exited worker.
    #[arg(long, default_value = "always", value_name = "always|on-failure|never")]
    pub restart: RestartPolicy,

    /// A worker up this long was healthy: its backoff resets.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub stable: Duration,

    /// A worker up this long (or that said it is ready) started successfully: when it is
    /// killed (an OOM kill, kill -9) or exits 0 it is restarted at once and is no crash-loop
    /// strike. Faster deaths, and failures of its own (exit status not 0, a crash signal) at
    /// any age, back off and count; a cluster that never started gives up (exit 3).
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub min_uptime: Duration,

    /// First backoff delay after repeated quick failures (doubles each time).
    #[arg(long, default_value = "100ms", value_parser = parse_duration, value_name = "DURATION")]
    pub backoff_initial: Duration,

    /// Backoff cap; failed slots are retried at this pace.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub backoff_max: Duration,

    /// Crash loop: more than this many quick failures of one slot…
    #[arg(long, default_value = "5", value_name = "R")]
    pub max_restarts: u32,

    /// …within this window.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub within: Duration,

    /// What a crash loop does: mark the slot failed and keep retrying, or exit 3.
    #[arg(long, default_value = "retry", value_name = "retry|exit")]
    pub on_crash_loop: CrashLoopAction,

    /// Signal that asks workers to stop.
    #[arg(long, default_value = "SIGTERM", value_parser = parse_signal, value_name = "SIGNAL")]
    pub stop_signal: Signal,

    /// How each worker's process tree is kept together, so that what it started dies with it
    /// (systemd's KillMode=control-group): a cgroup (v2) per worker, which catches processes
    /// that leave the process group and scrub their environment; or its process group only.
    /// auto = a cgroup where herd can create one (root, or systemd's Delegate=yes).
    #[arg(long, default_value_t = Containment::Auto, value_name = "auto|cgroup|process-group")]
    pub contain: Containment,

    /// Time stopping workers get before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub stop_timeout: Duration,

    /// What makes a worker ready (it takes round-robin connections, counts as started):
    /// auto = whatever it says first (READY=1 on its NOTIFY_SOCKET, Node's
    /// process.send('ready') or listening, a library worker's ready() or listen()), or
    /// --ready-delay after it started if it says nothing; notify = READY=1 (sd_notify:
    /// systemd-notify --ready, any process of the worker); node = Node's 'ready' message or
    /// its server listening; listen = its server listening; delay = --ready-delay after it
    /// started. notify, node and listen wait at most --ready-timeout: a worker not ready by
    /// then is killed and counts as a failed start.
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|notify|node|listen|delay"
    )]
    pub ready: ReadyMode,

    /// Under --ready delay (and auto, for a worker that says nothing): ready this long after
    /// it started. Default 1s; 30s for Node cluster workers under auto, which say when their
    /// server listens (so a slow boot is not taken as ready, nor a failing one as a good
    /// reload).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub ready_delay: Option<Duration>,

    /// Under --ready notify, node or listen: the longest a worker may take to be ready
    /// (0 = no limit).
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub ready_timeout: Duration,

    /// A watchdog, as systemd's WatchdogSec=: workers get WATCHDOG_USEC, and one that sent
    /// WATCHDOG=1 on its NOTIFY_SOCKET once and then nothing for this long is hung: SIGABRT,
    /// SIGKILL 2 s later, replaced. WATCHDOG=trigger counts as hung at once. Off by default.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub watchdog: Option<Duration>,

    /// How many new workers a rolling reload (SIGHUP) starts at a time, beside the workers they
    /// replace (Kubernetes' maxSurge): each new worker must be ready before its old one drains,
    /// and the next starts once that one exited, so at most WORKERS + N workers run. 1 to 1024.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024), value_name = "N")]
    pub reload_surge: u16,

    /// Replace a worker after it ran this long (plus up to 10% jitter, so workers do not all go
    /// together), the way a reload does: its replacement ready first, then it drains. Off by
    /// default.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub max_lifetime: Option<Duration>,

    /// Replace a worker whose process tree's resident memory exceeds SIZE (bytes, or with K, M,
    /// G: 512M, 1.5G; powers of 1024), the way a reload does, never mid-request. Read once a
    /// second, only when set.
    #[arg(long, value_parser = parse_memory, value_name = "SIZE")]
    pub max_memory: Option<u64>,

    /// Run workers as Node cluster workers (NODE_UNIQUE_ID and Node's channel), so that
    /// server.listen() takes herd's socket as under Node's cluster primary. auto = when the
    /// command runs node: node itself, a script whose #! line runs node, or a package script
    /// (npm start, npm run NAME, yarn NAME, pnpm start: herd runs the package.json script
    /// itself, in the package's directory with node_modules/.bin on PATH, so the app gets the
    /// sockets). off = run the command exactly as given.
    #[arg(long, value_enum, default_value_t = NodeCluster::Auto, value_name = "auto|on|off")]
    pub node_cluster: NodeCluster,

    /// Open Node's IPC channel to each worker (NODE_CHANNEL_FD), so process.send('ready')
    /// marks it ready: auto = when the command runs node (see --node-cluster).
    #[arg(long, value_enum, default_value_t = NodeIpc::Auto, value_name = "auto|on|off")]
    pub node_ipc: NodeIpc,

    /// The longest IPC message accepted from a worker (bytes, or with KiB/MiB); a longer one
    /// is skipped and counted, and the worker keeps its channel.
    #[arg(long, default_value = "64MiB", value_parser = parse_size, value_name = "SIZE")]
    pub ipc_max_message: usize,

    /// One pipe for each worker's stdout and stderr (as 2>&1 would): its lines keep their
    /// order, and all go to herd's stdout. Without it, the two streams are read apart and
    /// their lines may interleave out of order.
    #[arg(long)]
    pub merge_output: bool,

    /// Write herd's lines and the workers' to this file (appended; mode 0640) instead of
    /// stdout and stderr, in --log-format. A full or failing disk drops lines (counted in
    /// herd status), never stalls supervision. SIGUSR1 reopens it (for logrotate).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<std::path::PathBuf>,

    /// Rotate --log-file past this size: PATH becomes PATH.1, PATH.1 becomes PATH.2…;
    /// 0: never (an external logrotate sends SIGUSR1).
    #[arg(long, default_value = "64MiB", value_parser = parse_size_or_zero, value_name = "SIZE")]
    pub log_max_size: usize,

    /// Rotated files kept (PATH.1…PATH.N); older ones are deleted. 0: the file is emptied
    /// when full.
    #[arg(long, default_value = "4", value_name = "N")]
    pub log_keep: usize,

    /// Run the workers as this user (a name or uid), with its supplementary groups and its
    /// HOME, USER, LOGNAME and SHELL: herd starts as root, binds (ports below 1024 too),
    /// and each worker drops to the user before it execs. Needs herd to run as root.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// With --user: this group (a name or gid) instead of the user's primary group.
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<String>,

    /// The cluster's name, for `herd status NAME` and the other control commands (its
    /// control socket is NAME.sock). Default: from the command (`app` for `node app.js`),
    /// made unique among running clusters (`app-2`); a NAME given must be free.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Serve Prometheus metrics on http://ADDR/metrics, with /healthz (herd is alive) and
    /// /ready (at least --min-ready workers ready; 503 while stopping) for load balancers
    /// and Kubernetes probes. Off by default: no socket, no timer.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,

    /// How many ready workers make /ready answer 200.
    #[arg(long, default_value = "1", value_name = "N")]
    pub min_ready: usize,

    /// No control socket (herd status, reload, logs… cannot reach this cluster; signals
    /// still work).
    #[arg(long, conflicts_with = "name")]
    pub no_control: bool,

    /// Log format for herd's events and worker output.
    #[arg(long, value_enum, default_value_t = LogFormatArg::Text, value_name = "text|json")]
    pub log_format: LogFormatArg,

    /// The worker command; herd's built-in hello-world server when omitted.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// `--node-ipc` values.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum NodeIpc {
    /// When the command is node.
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// `--node-cluster` values.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum NodeCluster {
    /// When the command runs node.
    Auto,
    /// Always.
    On,
    /// Never; package-manager commands run as given.
    Off,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines, worker output prefixed `[slot pid]`.
    Text,
    /// One JSON object per line.
    Json,
}

/// `herd hello` flags.
#[derive(Debug, Args)]
pub struct HelloArgs {
    /// Address to bind when not given sockets by herd or systemd.
    #[arg(short, long, default_value = "127.0.0.1:8000")]
    pub listen: std::net::SocketAddr,
}

impl RunArgs {
    /// The library configuration these flags describe.
    pub fn into_config(self, command: WorkerCommand) -> ClusterConfig {
        let mut config = ClusterConfig::new(command);
        config.workers = match self.workers {
            Workers::Auto(budget) => budget.workers(),
            Workers::Exactly(n) => n,
        };
        config.listen =
            if self.no_listen || (self.listen.is_empty() && herd::activation::passed_to_us()) {
                // Socket-activated with no -l: every socket systemd passed.
                Vec::new()
            } else if self.listen.is_empty() {
                vec!["127.0.0.1:8000"
                    .parse()
                    .expect("the default listen spec is valid")]
            } else {
                self.listen
            };
        config.balance = self.balance;
        config.picker = self.picker;
        config.restart = self.restart;
        config.backoff = BackoffPolicy {
            initial: self.backoff_initial,
            max: self.backoff_max.max(self.backoff_initial),
            stable: self.stable,
        };
        config.max_restarts = self.max_restarts;
        config.min_uptime = self.min_uptime;
        config.ipc_max_message = self.ipc_max_message;
        config.within = self.within;
        config.on_crash_loop = self.on_crash_loop;
        config.stop_signal = self.stop_signal;
        config.stop_timeout = self.stop_timeout;
        config.containment = self.contain;
        config.merge_output = self.merge_output;
        config.ready = self.ready;
        config.ready_delay = self.ready_delay.unwrap_or(DEFAULT_READY_DELAY);
        config.ready_timeout = self.ready_timeout;
        config.watchdog = self.watchdog;
        config.reload_surge = usize::from(self.reload_surge);
        config.max_lifetime = self.max_lifetime.filter(|d| !d.is_zero());
        config.max_memory = self.max_memory.filter(|m| *m > 0);
        config.node_cluster = match self.node_cluster {
            NodeCluster::Auto => None,
            NodeCluster::On => Some(true),
            NodeCluster::Off => Some(false),
        };
        let node_ipc = match self.node_ipc {
            NodeIpc::On => true,
            NodeIpc::Off => false,
            NodeIpc::Auto => config.command.is_node() || self.node_cluster == NodeCluster::On,
        };
        if node_ipc {
            config.ipc = herd::Ipc::Node;
        }
        // Node cluster workers announce `listening`: under auto, a second
        // of silence is no proof they serve (PM2 waits 3 s, and takes a
        // slow boot as ready too). Wait for them, as long as is sane.
        let node_cluster = config
            .node_cluster
            .unwrap_or_else(|| config.command.runs_node_script());
        if self.ready_delay.is_none()
            && config.ready == ReadyMode::Auto
            && config.ipc == herd::Ipc::Node
            && node_cluster
        {
            config.ready_delay = NODE_READY_DELAY;
        }
        config.log_format = match self.log_format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        };
        config.socket_activation = !self.no_listen;
        config.metrics = self.metrics;
        config.min_ready = self.min_ready;
        config.control = (!self.no_control).then(|| herd::control::ControlConfig {
            name: self.name,
            ..Default::default()
        });
        config
    }
}

/// A size as [`parse_size`] reads it, or `0`.
fn parse_size_or_zero(text: &str) -> Result<usize, String> {
    match text.trim() {
        "0" => Ok(0),
        _ => parse_size(text),
    }
}

/// `--ready-delay`'s default.
const DEFAULT_READY_DELAY: Duration = Duration::from_secs(1);
/// `--ready-delay`'s default for Node cluster workers under `--ready auto`.
const NODE_READY_DELAY: Duration = Duration::from_secs(30);

/// `1048576`, `64KiB`, `64MiB`, `1GiB` (also `K`/`M`/`G`, powers of 1024).
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("expected a size like 64MiB, got {text:?}"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown size unit in {text:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    match n.checked_mul(mult) {
        Some(0) => Err("the size must be at least 1 byte".into()),
        Some(n) if n <= u32::MAX as usize => Ok(n),
        _ => Err(format!("{text:?} is too large (at most 4GiB)")),
    }
}

/// `-w`: a number, or `auto` with what it was made of (for the log).
#[derive(Debug, Clone, PartialEq)]
pub enum Workers {
    /// `auto`: one per CPU this process may use.
    Auto(herd::cpus::CpuBudget),
    /// A number.
    Exactly(usize),
}

fn parse_workers(text: &str) -> Result<Workers, String> {
    if text == "auto" {
        return Ok(Workers::Auto(herd::cpus::CpuBudget::read()));
    }
    let n: usize = text
        .parse()
        .map_err(|_| format!("expected a number or auto, got {text:?}"))?;
    match n {
        0 => Err("at least 1 worker is needed".into()),
        n if n > MAX_WORKERS => Err(format!("at most {MAX_WORKERS} workers are allowed")),
        n => Ok(Workers::Exactly(n)),
    }
}

/// Prints a flag error as one line (help and version print in full) and
/// returns the exit status: 0 for help/version, 2 for errors.
pub fn report_parse_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(2)
        }
        kind => {
            use clap::error::ContextKind;
            use std::io::Write;
            let text = e.render().to_string();
            // The message is what comes before clap's first blank line; a
            // value with a newline in it must not cut it short.
            let line = text
                .trim_start()
                .split("\n\n")
                .next()
                .filter(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .trim_end()
                .to_string();
            // `herd run node server.js`: the worker command goes after `--`.
            let stray = (kind == ErrorKind::UnknownArgument)
                .then(|| e.get(ContextKind::InvalidArg))
                .flatten()
                .map(|v| v.to_string())
                .filter(|a| !a.starts_with('-'));
            let message = match stray {
                Some(arg) => format!(
                    "{line}: the worker command goes after --, e.g. herd run -w 2 -- {arg} …"
                ),
                None => format!("{line} (see herd --help)"),
            };
            // One line, even if a value held a newline.
            let message = message.replace(['\n', '\r'], " ");
            let _ = writeln!(std::io::stderr(), "herd: {message}");
            ExitCode::from(2)
        }
    }
}

/// A size in bytes: a number, or with K, M, G, T (powers of 1024; a
/// trailing `B` or `iB` allowed), as systemd's `MemoryMax=`.
fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let upper = t.to_ascii_uppercase();
    let upper = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (number, shift) = match upper.chars().last() {
        Some('K') => (&upper[..upper.len() - 1], 10),
        Some('M') => (&upper[..upper.len() - 1], 20),
        Some('G') => (&upper[..upper.len() - 1], 30),
        Some('T') => (&upper[..upper.len() - 1], 40),
        _ => (upper, 0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 512M, 1.5G, 1048576)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("'{text}' is not a size (e.g. 512M, 1.5G, 1048576)"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod memory_tests {
    use super::parse_memory;

    #[test]
    fn sizes_are_bytes_or_binary_units() {
        assert_eq!(parse_memory("1048576"), Ok(1 << 20));
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("1.5G"), Ok(3 << 29));
        assert_eq!(parse_memory("64KiB"), Ok(64 << 10));
        assert_eq!(parse_memory("2gb"), Ok(2 << 30));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("-1M").is_err());
        assert!(parse_memory("").is_err());
    }
}
