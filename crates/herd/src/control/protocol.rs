//! The control protocol's messages (docs/PROTOCOL.md describes the wire).
//!
//! Newline-delimited JSON over a Unix stream socket: a client writes one
//! [`Request`] per line, herd answers each with one [`Response`] line
//! (`logs` with `follow` answers with a stream of them). Every message
//! carries the protocol version `v` ([`VERSION`]); fields may be added to
//! answers within a version, so clients ignore fields they do not know.

use serde::{Deserialize, Serialize};

/// The protocol version this herd speaks.
pub const VERSION: u32 = 1;

/// The longest request line herd reads, in bytes (newline included).
pub const MAX_REQUEST: usize = 64 * 1024;

/// One request: `{"v":1,"cmd":"status"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The protocol version the client speaks (must be [`VERSION`]).
    pub v: u32,
    /// What to do, with its arguments (`"cmd": …`).
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    /// A request in this protocol version.
    pub fn new(command: Command) -> Request {
        Request {
            v: VERSION,
            command,
        }
    }
}

/// What a request asks for; `cmd` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// The cluster in one line: answers [`Response::summary`].
    Summary,
    /// Every slot and worker: answers [`Response::status`].
    Status,
    /// A rolling reload (as SIGHUP); answered when it ends:
    /// [`Response::reload`], `ok: false` when it rolled back.
    Reload,
    /// Scale to `workers`, or by `delta` (exactly one of them):
    /// answers [`Response::scale`].
    Scale {
        /// The number of workers wanted (1–1024).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workers: Option<usize>,
        /// Workers to add (positive) or remove (negative).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delta: Option<i64>,
    },
    /// Replace one slot's worker with no connection lost (a new worker
    /// first, then the old one drains): answers [`Response::restart`].
    Restart {
        /// The slot.
        slot: usize,
    },
    /// Send a signal to one slot's worker (its process group), or to every
    /// worker: answers [`Response::signal`].
    Signal {
        /// `TERM`, `SIGTERM` or `15`.
        signal: String,
        /// The slot; every live worker when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<usize>,
    },
    /// Stop the cluster gracefully (as SIGTERM); answered at once.
    Stop,
    /// Recent log lines, oldest first, each a [`Response::log`], then
    /// `end: true`; with `follow`, new lines as they come, without end.
    Logs {
        /// How many recent lines (default 10; at most the buffer holds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lines: Option<usize>,
        /// Only this slot's workers' lines.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<usize>,
        /// Keep the connection and send new lines.
        #[serde(default)]
        follow: bool,
    },
}

/// One answer line. `ok: false` carries `error`; otherwise the field named
/// after the command is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The protocol version herd speaks.
    pub v: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `summary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// For `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<Status>>,
    /// For `reload` (also with `ok: false`, when it rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadReply>,
    /// For `scale`: the number of workers now wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<usize>,
    /// For `restart`: the worker being replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<WorkerRef>,
    /// For `signal`: the workers signalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<Vec<WorkerRef>>,
    /// For `logs`: one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogLine>,
    /// For `logs`: lines were skipped here (a follower too slow to keep up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<u64>,
    /// For `logs` without `follow`: the last line was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<bool>,
}

impl Response {
    /// A success with nothing set yet.
    pub fn ok() -> Response {
        Response {
            v: VERSION,
            ok: true,
            ..Response::default()
        }
    }

    /// A failure.
    pub fn error(why: impl Into<String>) -> Response {
        Response {
            v: VERSION,
            ok: false,
            error: Some(why.into()),
            ..Response::default()
        }
    }
}

/// A worker named by slot and pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRef {
    /// Its slot.
    pub slot: usize,
    /// Its process id.
    pub pid: u32,
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    /// `reloaded`, `rolled_back`, `cannot_resolve` or `stopped`.
    pub outcome: String,
    /// The command generation every slot runs now (`reloaded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Why it did not reload, in words (with the failed worker's last
    /// stderr lines in `stderr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The failed new worker's last stderr lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stderr: Vec<String>,
}

/// `herd ls`'s line for a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The cluster's name (its control socket's).
    pub name: String,
    /// herd's process id.
    pub pid: u32,
    /// Slots (workers wanted).
    pub workers: usize,
    /// Workers ready.
    pub ready: usize,
    /// Seconds since herd started.
    pub uptime_s: u64,
    /// Workers restarted, over every slot (replacements by reload and
    /// restart not counted).
    #[serde(default)]
    pub restarts: u64,
    /// The worker command, as shown in logs.
    pub command: String,
}

/// `herd status`: the cluster, every slot and worker, the sockets, and any
/// process herd still waits for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The one-line view.
    #[serde(flatten)]
    pub summary: Summary,
    /// herd's version.
    pub version: String,
    /// When herd started, in seconds since the Unix epoch.
    pub started_unix: u64,
    /// The newest command generation (0 as started; each reload one more).
    pub generation: u64,
    /// A rolling reload is running.
    pub reloading: bool,
    /// The cluster is stopping.
    pub stopping: bool,
    /// `shared`, `reuseport` or `round-robin`.
    pub balance: String,
    /// How worker trees are contained: `cgroup` or `process-group`.
    pub containment: String,
    /// The listening sockets.
    pub listeners: Vec<ListenerStatus>,
    /// Every slot, in order.
    pub slots: Vec<SlotStatus>,
    /// Processes herd still waits for that are no longer a slot's worker:
    /// what is left of dead workers (their process group or cgroup), and
    /// reparented strays. Never hidden.
    pub orphans: Vec<Orphan>,
    /// Counters since herd started.
    pub counters: Counters,
}

/// A listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// The spec it was bound from (`127.0.0.1:8000`, `unix:/run/app.sock`).
    pub spec: String,
    /// Connections waiting to be accepted, summed over its sockets (one
    /// per slot under reuseport); absent where the kernel does not say
    /// (Unix and UDP sockets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u64>,
}

/// A slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// Its number (`HERD_WORKER_ID`).
    pub slot: usize,
    /// `running`, `starting`, `backoff`, `failed`, `replacing`, `stopped`
    /// or `leaving` (scaled away, draining).
    pub state: String,
    /// Workers started in it after its first.
    pub restarts: u64,
    /// How its last worker ended (`exit code 3`, `killed by SIGKILL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Seconds until its next worker starts (in backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start_in_s: Option<f64>,
    /// Its live workers: its own, a replacement starting, and draining ones.
    pub workers: Vec<WorkerStatus>,
}

/// A live worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its process id.
    pub pid: u32,
    /// `current` (the slot's own), `incoming` (a replacement starting) or
    /// `draining`.
    pub role: String,
    /// It is ready (said so, or by the delay).
    pub ready: bool,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// The command generation it runs.
    pub generation: u64,
    /// Its last `STATUS=` text (sd_notify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_text: Option<String>,
    /// CPU time of its process tree, in seconds (user + system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<f64>,
    /// Resident memory of its process tree, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// Connections handed to it and not yet closed (round-robin only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
}

/// A process herd still waits for outside the slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    /// Its process id (for a dead worker's remnant: the group's id, the
    /// dead worker's pid).
    pub pid: u32,
    /// What it is: `remnant of worker PID` or `reparented stray`.
    pub what: String,
    /// Its command name, where /proc says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

/// Counters since herd started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Workers that died by themselves (non-zero exit, crash signal) and
    /// were restarted.
    pub restarts_crash: u64,
    /// Workers killed from outside (SIGKILL or SIGTERM not sent by herd:
    /// the OOM killer, an operator) and restarted.
    pub restarts_killed: u64,
    /// Workers found hung by the watchdog.
    pub restarts_watchdog: u64,
    /// Workers replaced for `--max-lifetime`, `--max-memory` or `restart`.
    pub restarts_recycled: u64,
    /// Workers replaced by reloads.
    pub restarts_reload: u64,
    /// Times a slot went over the crash-loop limit.
    pub crash_loops: u64,
    /// Reloads that ended with every slot on the new command.
    pub reloads_ok: u64,
    /// Reloads whose new workers failed: rolled back.
    pub reloads_rolled_back: u64,
    /// Reloads that changed nothing: the command could not be resolved
    /// again (a missing binary or script).
    pub reloads_unresolved: u64,
    /// IPC messages received from workers.
    pub ipc_messages: u64,
    /// Log lines dropped (a blocked or closed output, a full disk).
    pub log_lines_dropped: u64,
}

/// A log line: a worker's (`slot` and `pid` set) or herd's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Its place in herd's log, counting from 1; gaps are lines a
    /// follower missed.
    pub seq: u64,
    /// When herd read it, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The worker's slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<usize>,
    /// The worker's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `stdout`, `stderr`, or `herd` for herd's own lines.
    pub stream: String,
    /// The line, without its newline.
    pub line: String,
}
