//! # herd: one primary, N workers, shared sockets
//!
//! herd runs a server program as a cluster: the primary process binds the
//! listening sockets once and keeps them, starts N worker processes that
//! inherit them, replaces workers that die (with backoff and crash-loop
//! limits), and stops them all cleanly. Any program can be a worker: sockets
//! travel by systemd's socket-activation protocol (`LISTEN_FDS`).
//!
//! ## Theory of operation
//!
//! * [`listen`] parses what to listen on; [`socket`] binds it — one socket
//!   per address ([`Balance::Shared`]) or one `SO_REUSEPORT` socket per slot
//!   per address ([`Balance::Reuseport`]). The primary holds every socket for
//!   as long as the slot exists, so connections that arrive while a worker is
//!   being replaced wait in the kernel's queue instead of being refused.
//! * A **slot** is a numbered place for a worker (0..N); it outlives the
//!   workers that fill it and owns their [`backoff`] state.
//! * The **supervisor** ([`Cluster::run`]) is a single task that owns every
//!   slot. It `select!`s over signals, worker exits (pidfds, through tokio)
//!   and one timer; everything it reacts to arrives as an event, so an idle
//!   cluster makes no wakeups.
//! * Spawning goes through `tokio::process::Command` with a `pre_exec` hook
//!   from [`sys`](crate) (the only module with `unsafe`): new process group,
//!   `PR_SET_PDEATHSIG`, sockets moved to fds 3.., everything else
//!   close-on-exec, and `LISTEN_PID` written into a pre-built environment
//!   block with the child's own pid before it execs.
//! * A worker is its whole process tree: a cgroup (v2) of its own where herd
//!   can create one, its process group otherwise; when it exits, what it
//!   started gets the stop signal, then SIGKILL after the stop timeout.
//! * Restarts: a worker that stayed up for `min_uptime` (or said it was
//!   ready) is replaced at once when it dies; faster failures back off
//!   ([`backoff`]) and count towards the crash-loop limit.
//! * No orphans: workers die with the primary (`PR_SET_PDEATHSIG`); the
//!   primary is a child subreaper and reaps reparented grandchildren; and a
//!   tiny forked **guardian** process, which outlives a SIGKILLed primary,
//!   kills every worker process group and every process carrying the
//!   cluster's `HERD_PRIMARY_PID` in its environment.
//! * [`output`] forwards worker stdout/stderr line by line with a prefix,
//!   each of herd's streams on its own writer thread: supervision never
//!   waits on output, and what cannot be written is dropped and counted.
//! * Everything a worker or a reader controls is bounded: the [`Events`]
//!   queue, IPC messages (skipped past `ipc_max_message`), sockets bound on
//!   request (closed when no live worker holds them).
//! * [`ipc`] holds the wire formats for talking to workers; with
//!   `node_ipc` the supervisor opens Node's IPC channel (`NODE_CHANNEL_FD`) to
//!   each worker, so `process.send('ready')` marks it ready.
//! * [`activation`] is the worker side: adopt the sockets in `LISTEN_FDS`.
//!
//! ## Example
//!
//! ```no_run
//! use herd::{Cluster, ClusterConfig, WorkerCommand};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let command = WorkerCommand::resolve(vec!["node".into(), "app.js".into()])?;
//! let mut config = ClusterConfig::new(command);
//! config.workers = 4;
//! config.listen = vec!["127.0.0.1:8000".parse()?];
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! let outcome = runtime.block_on(Cluster::bind(config)?.run())?;
//! println!("{outcome:?}");
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod activation;
pub mod backoff;
mod cluster;
pub mod config;
pub mod control;
pub mod cpus;
mod events;
mod inspect;
pub mod ipc;
mod launch;
mod lifecycle;
pub mod listen;
mod metrics;
pub mod output;
mod round_robin;
pub mod socket;
pub mod spawn;
mod supervisor;
mod sys;
pub mod worker;

pub use cluster::{
    Cluster, ClusterHandle, Event, HandleError, Message, Outcome, ReloadOutcome, WorkerHandle,
    WorkerInfo, WorkerStatus,
};
pub use config::{
    ClusterConfig, CommandError, Containment, CrashLoopAction, RestartPolicy, WorkerCommand,
};
pub use config::{Ipc, Origin, ReadyMode, Runtime, Signal};
pub use events::Events;
pub use ipc::frame::Codec;
pub use listen::{ListenAddress, ListenSpec, ListenSpecError};
pub use socket::{Balance, BindError, Listeners, Picker};
pub use worker::{role, Role};

/// Everything that can stop a cluster from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listening socket could not be opened.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The worker command cannot run.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// A process or thread could not be started.
    #[error("cannot start: {0}")]
    Spawn(std::io::Error),
    /// The configuration asks for something impossible.
    #[error("{0}")]
    Config(String),
    /// The control socket cannot be made (its name is taken, its
    /// directory is unsafe).
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// A worker's program could not be executed (`execve` failed in the
    /// child: a missing `#!` interpreter, no `#!` line, a broken binary).
    #[error("{0}")]
    Exec(#[from] ExecError),
}

/// Why `execve` of the worker command failed, as the child reported it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot execute {path}: {reason}")]
pub struct ExecError {
    /// The program herd tried to execute.
    pub path: String,
    /// What went wrong, in words (e.g. "interpreter /usr/bin/nodee not found").
    pub reason: String,
    /// The errno `execve` returned.
    pub errno: i32,
}

impl ExecError {
    /// Whether a file was missing (a shell's exit 127) rather than present
    /// but not executable (126).
    pub fn not_found(&self) -> bool {
        self.errno == libc::ENOENT
    }
}
