//! The supervisor: one task that owns every slot and worker.
//!
//! It `select!`s over signals, worker exits and the one timer it needs (the
//! earliest backoff restart or stop deadline), so an idle cluster makes no
//! wakeups. Nothing else touches cluster state.
//!
//! Workers are spawned from this task. `PR_SET_PDEATHSIG` fires when the
//! *thread* that forked a child exits, not the process, so the task must run
//! on a thread that lives as long as the cluster: a current-thread runtime on
//! the main thread (what the `herd` binary uses), or a multi-thread runtime's
//! worker threads; never a `spawn_blocking` thread, which retires when idle.
//!
//! This file holds the actor: its state, its `select!` loop, spawning,
//! restarts and stopping. [`channel`] is each worker's IPC reader and writer
//! tasks; [`sockets`] answers workers' requests for sockets and runs
//! round-robin (acceptors and handing connections over).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::sleep_until;
use tracing::{debug, error, info, warn};

use crate::backoff::Jitter;
use crate::cluster::{Cluster, Command, Event, Outcome, WorkerInfo, WorkerLink, WorkerStatus};
use crate::config::Ipc;
use crate::config::{signal_name, ClusterConfig, Containment, ReadySignal};
use crate::events::EventSender;
use crate::ipc::frame::FrameDecoder;
use crate::ipc::node::{self, NodeDecoder};
use crate::lifecycle::{Action, End, ExitFacts, Lifecycle, Note, Phase, Policy, RetireWhy, Role};
use crate::output::{OutputSink, Stream, Tail};
use crate::round_robin::RoundRobin;
use crate::socket::Listeners;
use crate::spawn::env_entry;
use crate::sys::{self, ExecPlan};
use crate::{Error, ExecError};

mod channel;
mod control;
mod notify;
mod probe;
mod reload;
mod sockets;
mod systemd;
mod tree;

pub(crate) use channel::Outgoing;
use channel::{read_channel, write_channel, Batch, ChannelEvent};
pub(crate) use probe::tree_usage;

/// A live worker's I/O (its start time, readiness, role and retirement
/// are the lifecycle's); `channel` feeds the writer task of its IPC
/// channel, if it has one (dropping it closes the channel).
#[derive(Debug)]
struct WorkerIo {
    pid: u32,
    channel: Option<mpsc::UnboundedSender<Outgoing>>,
    /// What this worker's handles see; the supervisor is its only writer.
    status: watch::Sender<WorkerStatus>,
    /// Whether it reported `Online`.
    online: bool,
    /// The round-robin listeners a Node worker serves (its servers
    /// asked for them by `queryServer`): it takes their `newconn`s.
    rr_servers: Vec<usize>,
    /// Messages skipped (over the size limit, malformed); the first is logged.
    skipped: u64,
    /// Its own cgroup, when workers are contained by cgroups.
    cgroup: Option<std::path::PathBuf>,
    /// Its requests for sockets that were refused; the first is logged
    /// as a warning, the rest at debug level (a worker must not flood
    /// herd's log).
    refusals: u64,
    /// How many of its listening-socket probes ([`probe::PROBE_AFTER`])
    /// were done.
    probes: usize,
    /// The ports herd gave its Node inspector: listeners of its own
    /// that are no sign of ignoring herd's socket.
    inspector_ports: Vec<u16>,
    /// Its notify socket's reader (aborted when it exits) and path.
    notify: Option<(tokio::task::AbortHandle, std::path::PathBuf)>,
    /// Its last `STATUS=` text (sd_notify), kept for display.
    status_text: Option<String>,
    /// Its last lines of stderr, for a reload's failure report.
    tail: Option<Tail>,
}

struct Slot {
    /// Its live workers' I/O: its own, and during a reload or recycling
    /// its replacement and the draining (the lifecycle knows which is which).
    workers: Vec<WorkerIo>,
    /// Environment added for this slot's workers (`ClusterHandle::fork`).
    env: Vec<CString>,
    /// How its last worker ended, and the last lines it wrote to stderr.
    last_exit: Option<(String, Vec<String>)>,
    /// Workers started in it after its first (replacements not counted).
    restarts: u64,
    /// A worker was ever started in it.
    started_any: bool,
}

impl Slot {
    fn io(&self, pid: u32) -> Option<&WorkerIo> {
        self.workers.iter().find(|w| w.pid == pid)
    }

    fn io_mut(&mut self, pid: u32) -> Option<&mut WorkerIo> {
        self.workers.iter_mut().find(|w| w.pid == pid)
    }

    fn new(env: Vec<CString>) -> Slot {
        Slot {
            workers: Vec::new(),
            env,
            last_exit: None,
            restarts: 0,
            started_any: false,
        }
    }
}

/// What is left of a dead worker's process group (KillMode=control-group):
/// it got the stop signal when the worker exited and gets SIGKILL at `kill_at`.
struct Remnant {
    pgid: u32,
    /// The worker's cgroup, if it had one: the authority on what is left.
    cgroup: Option<std::path::PathBuf>,
    kill_at: Instant,
    /// SIGKILL was sent; `kill_at` is then when herd stops waiting.
    killed: bool,
}

/// How long herd waits for a remnant after its SIGKILL.
const REMNANT_KILL_GRACE: Duration = Duration::from_secs(2);

impl Remnant {
    fn alive(&self) -> bool {
        match &self.cgroup {
            Some(dir) => tree::populated(dir) || group_alive(self.pgid),
            None => group_alive(self.pgid),
        }
    }

    /// Each process gets `sig` once: through the cgroup, which holds the
    /// group's members too, or else through the group.
    fn signal(&self, sig: Signal) {
        match &self.cgroup {
            Some(dir) if sig == Signal::KILL => {
                tree::kill(dir);
                signal_group(self.pgid, sig);
            }
            Some(dir) => {
                for pid in tree::procs(dir) {
                    if let Some(p) = Pid::from_raw(pid as i32) {
                        let _ = rustix::process::kill_process(p, sig);
                    }
                }
            }
            None => signal_group(self.pgid, sig),
        }
    }

    /// Its cgroup is empty: remove it.
    fn forget(self) {
        if let Some(dir) = &self.cgroup {
            tree::remove(dir);
        }
    }
}

/// Per probed worker: its slot, pid, and the addresses it listens on
/// through sockets of its own.
type ProbeResult = Vec<(usize, u32, Vec<std::net::SocketAddr>)>;

/// How long Node workers get to run their SIGTERM handler before Node's
/// `disconnect` may end their event loop (it would skip a handler still
/// queued: Node's signal handles do not keep the loop alive).
const NODE_RELEASE_DELAY: Duration = Duration::from_secs(1);

struct Exit {
    slot: usize,
    pid: u32,
    status: std::io::Result<ExitStatus>,
    /// The last lines it wrote to stderr.
    stderr: Vec<String>,
    /// When it exited (the report may come a little later).
    at: Instant,
    /// The errno of its failed `execve`: it never ran the command.
    exec_errno: Option<i32>,
}

/// A worker just spawned, before it is installed in its slot.
struct NewWorker {
    pid: u32,
    child: tokio::process::Child,
    /// Its channel's outgoing queue, if it has a channel.
    channel: Option<mpsc::UnboundedSender<Outgoing>>,
    /// Completes when its channel reader has passed on everything.
    reader: Option<oneshot::Receiver<()>>,
    /// Its last stderr lines, and the forwarder's end.
    stderr: Option<(Tail, oneshot::Receiver<()>)>,
    /// Its cgroup, if it has one.
    cgroup: Option<std::path::PathBuf>,
    /// Where its execve reports failure (read once it exited).
    exec_err: OwnedFd,
    /// The ports herd gave its Node inspector (not servers of its own).
    inspector_ports: Vec<u16>,
    /// Its notify socket's reader and path.
    notify: Option<(tokio::task::AbortHandle, std::path::PathBuf)>,
}

/// What the supervisor serves besides its workers, bound before it starts,
/// and where their requests come in (the handle's queue).
pub(crate) struct Servers {
    pub(crate) control: Option<crate::control::Bound>,
    pub(crate) metrics: Option<std::net::TcpListener>,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
}

/// How long an exit waits for the channel reader to reach EOF.
const READER_GRACE: Duration = Duration::from_millis(500);

/// How long a finished cluster waits for the workers' output to drain, and
/// then for it to be written.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// How long an exit waits for the worker's stderr to reach EOF, for its
/// last lines (a descendant holding the pipe must not delay the restart).
const TAIL_GRACE: Duration = Duration::from_millis(100);

struct Guardian {
    child: tokio::process::Child,
    pipe: OwnedFd,
}

pub(crate) struct Supervisor {
    config: ClusterConfig,
    listeners: Listeners,
    slots: Vec<Slot>,
    /// Every decision about slots and workers: the pure core.
    life: Lifecycle,
    /// When Node cluster workers get Node's `disconnect` on stop (see
    /// `release_node_workers`); `None` once sent, or for other workers.
    node_release_at: Option<Instant>,
    exits: JoinSet<Exit>,
    /// The tasks forwarding workers' stdout and stderr: the cluster ends
    /// only once they drained what the workers wrote (bounded).
    forwarders: JoinSet<()>,
    output: OutputSink,
    guardian: Option<Guardian>,
    marker: String,
    /// The worker commands in use, by generation (0: as started; each
    /// reload resolves the command again into the next).
    gens: BTreeMap<u64, reload::Gen>,
    next_gen: u64,
    /// Who waits for the running reload, and for the one queued after it.
    reload_waiters: Vec<oneshot::Sender<crate::cluster::ReloadOutcome>>,
    queued_waiters: Vec<oneshot::Sender<crate::cluster::ReloadOutcome>>,
    /// When the running reload began.
    reload_began: Option<Instant>,
    /// How the last few failed replacements ended: pid, how, stderr.
    failed_replacements: VecDeque<(u32, String, Vec<String>)>,
    /// From the workers' reader tasks: what one read decoded, in order.
    /// Bounded: a flooding worker waits, the primary does not grow.
    channel_tx: mpsc::Sender<Batch>,
    channel_rx: mpsc::Receiver<Batch>,
    /// Batches waiting for room in the event queue, oldest first: the first
    /// stopped at a message the queue had no room for. Nothing more is taken
    /// from `channel_rx` until it is empty (messages are back-pressured).
    backlog: VecDeque<Parked>,
    /// The readers' shared budget of queued message bytes.
    read_budget: std::sync::Arc<tokio::sync::Semaphore>,
    /// Requests from the ClusterHandle.
    commands: mpsc::UnboundedReceiver<Command>,
    /// What the library user sees; bounded, sends never block.
    events: EventSender,
    /// An error that ends the cluster (the worker command cannot be executed).
    fatal: Option<Error>,
    /// Dead workers' process groups that still have members.
    remnants: Vec<Remnant>,
    /// Signals already logged as ignored (bit per signal number).
    ignored_logged: u64,
    /// Addresses Node workers asked for that herd answered with a
    /// configured socket on another host (warned about once each).
    host_warned: HashSet<String>,
    /// Whether a worker was seen serving on a socket of its own, or dying
    /// of "address already in use", and herd said so (once each).
    own_listener_warned: bool,
    address_in_use_warned: bool,
    /// Whether any worker was given a configured (`-l`) socket, and whether
    /// herd warned that workers listen on a port of their own instead.
    configured_taken: bool,
    port_warned: bool,
    /// A probe of workers' listening sockets is running (one at a time),
    /// and where it answers.
    probing: bool,
    probe_tx: mpsc::UnboundedSender<ProbeResult>,
    probe_rx: mpsc::UnboundedReceiver<ProbeResult>,
    /// `--max-memory`: when workers' memory is next read (once a second,
    /// only when set), whether a reading runs, and where it answers.
    memory_check_at: Option<Instant>,
    measuring: bool,
    /// reuseport scale-down: (slot, worker, until) whose socket's queue is
    /// being emptied before the worker is asked to go.
    emptying: Vec<(usize, u32, Instant)>,
    memory_warned: bool,
    memory_tx: mpsc::UnboundedSender<Vec<(usize, u32, u64)>>,
    memory_rx: mpsc::UnboundedReceiver<Vec<(usize, u32, u64)>>,
    /// Where the workers' notify sockets are (none if it cannot be made),
    /// and what their readers pass on (bounded).
    notify_dir: Option<notify::NotifyDir>,
    /// reuseport: the sockets (places in each group) new connections are
    /// steered to, as last attached (`Some(vec![])`: all, the kernel's
    /// hash); and whether the kernel refused steering (said once).
    steering: Option<Vec<u32>>,
    steering_refused: bool,
    notify_tx: mpsc::Sender<(usize, u32, notify::Notice)>,
    notify_rx: mpsc::Receiver<(usize, u32, notify::Notice)>,
    /// RLIMIT_NOFILE as herd was started, restored in each worker.
    worker_nofile: Option<sys::NoFile>,
    /// Where workers' cgroups go, when workers are contained by cgroups.
    cgroups: Option<tree::Cgroups>,
    /// Why cgroups are not used, for the log line at start.
    no_cgroups: Option<String>,
    /// Sockets bound on a worker's request, by id (their round-robin
    /// listener id less the configured count); closed ones are `None` and
    /// their places reused.
    on_demand: Vec<Option<sockets::OnDemand>>,
    /// Round-robin: connections accepted by the primary and where they went.
    rr: RoundRobin,
    /// From the acceptor tasks: each connection with its client's hash.
    accepted_tx: mpsc::UnboundedSender<(OwnedFd, u64, usize)>,
    accepted_rx: mpsc::UnboundedReceiver<(OwnedFd, u64, usize)>,
    /// Round-robin listeners by id (configured specs first, then sockets
    /// bound on request): the key Node workers know each server by.
    rr_keys: Vec<String>,
    /// The `seq` of the last cluster message sent to a Node worker.
    node_seq: u64,
    /// The next `NODE_UNIQUE_ID` (Node numbers its workers from 1).
    node_ids: u64,
    /// The control socket and metrics endpoint, until `run` starts them.
    servers: Option<Servers>,
    /// The cluster's name, if it has a control socket; the socket's
    /// claim, held while the cluster runs; the server task.
    control_name: Option<String>,
    control_claim: Option<crate::control::place::Claim>,
    control_server: Option<tokio::task::AbortHandle>,
    metrics_server: Option<tokio::task::AbortHandle>,
    /// What `herd status` and the metrics count.
    stats: control::Stats,
    /// Workers the lifecycle asked for and not yet spawned: a scale to
    /// 1,024 is 1,024 forks, done [`SPAWN_BATCH`] per loop round so that
    /// exits, signals and requests are handled meanwhile.
    spawn_queue: VecDeque<(usize, bool)>,
    /// systemd, when herd runs as a `Type=notify` service.
    systemd: Option<systemd::Systemd>,
}

/// How long a scaled-away worker in reuseport mode keeps accepting what is
/// queued on its socket before it is asked to go, at most; and how often the
/// queue is looked at meanwhile.
const EMPTY_WAIT: Duration = Duration::from_secs(1);
const EMPTY_POLL: Duration = Duration::from_millis(2);

/// Workers spawned per loop round (each is a fork and exec: a few ms).
const SPAWN_BATCH: usize = 8;

/// How often workers' memory is read under `--max-memory`.
const MEMORY_EVERY: Duration = Duration::from_secs(1);

/// The most queued channel events or commands handled per select round.
const BATCH: usize = 256;

/// A batch (or what is left of one) waiting for room in the event queue,
/// with its share of the readers' byte budget.
struct Parked {
    slot: usize,
    pid: u32,
    events: VecDeque<ChannelEvent>,
    /// Held, never read: dropping it gives the bytes back to the readers.
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl From<Batch> for Parked {
    fn from(b: Batch) -> Parked {
        Parked {
            slot: b.slot,
            pid: b.pid,
            events: b.events.into(),
            _budget: b.budget,
        }
    }
}

/// The most batches held back for room in the event queue; past it the
/// oldest are handled anyway (their messages dropped and counted).
const MAX_BACKLOG: usize = 1024;

impl Supervisor {
    pub(crate) fn new(
        cluster: Cluster,
        commands: mpsc::UnboundedReceiver<Command>,
        events: EventSender,
        servers: Servers,
    ) -> Result<Self, Error> {
        let (config, listeners) = cluster.into_parts();
        sys::ignore_stray_signals();
        // Each worker costs herd a few descriptors (pipes, its channel):
        // take the hard limit, as Go's runtime does; workers get back the
        // soft limit herd was started with.
        let worker_nofile = match sys::raise_nofile_limit() {
            Ok(original) => Some(original),
            Err(e) => {
                warn!("cannot raise the open-file limit: {e}");
                None
            }
        };
        // Orphaned grandchildren are reparented to us, so we can reap them.
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            warn!("cannot become child subreaper: {e}");
        }
        let output = OutputSink::start(config.log_format).map_err(Error::Spawn)?;
        let marker = format!("HERD_PRIMARY_PID={}", std::process::id());
        let gens = BTreeMap::from([(0, reload::Gen::new(config.command.clone()))]);
        let (cgroups, no_cgroups) = match config.containment {
            Containment::ProcessGroup => (None, Some("--contain process-group".to_string())),
            Containment::Auto => match tree::Cgroups::create() {
                Ok(c) => (Some(c), None),
                Err(why) => (None, Some(why)),
            },
            Containment::Cgroup => match tree::Cgroups::create() {
                Ok(c) => (Some(c), None),
                Err(why) => {
                    return Err(Error::Config(format!(
                        "workers cannot be contained by cgroups: {why}"
                    )))
                }
            },
        };
        let slots = (0..config.workers).map(|_| Slot::new(Vec::new())).collect();
        let life = Lifecycle::new(
            Policy::from_config(&config),
            config.workers,
            Jitter::from_entropy(),
            Instant::now(),
        );
        let (channel_tx, channel_rx) = mpsc::channel(256);
        let (accepted_tx, accepted_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let (memory_tx, memory_rx) = mpsc::unbounded_channel();
        let memory_check_at = config.max_memory.map(|_| Instant::now() + MEMORY_EVERY);
        let (notify_tx, notify_rx) = mpsc::channel(256);
        let notify_dir = match notify::NotifyDir::create() {
            Ok(d) => Some(d),
            Err(e) => {
                warn!("cannot make a directory for the workers' notify sockets: {e}");
                None
            }
        };
        let config_picker = config.picker;
        Ok(Supervisor {
            config,
            listeners,
            slots,
            life,
            node_release_at: None,
            exits: JoinSet::new(),
            forwarders: JoinSet::new(),
            output,
            guardian: None,
            marker,
            gens,
            next_gen: 1,
            reload_waiters: Vec::new(),
            queued_waiters: Vec::new(),
            reload_began: None,
            failed_replacements: VecDeque::new(),
            channel_tx,
            channel_rx,
            commands,
            events,
            on_demand: Vec::new(),
            rr: RoundRobin::new(config_picker),
            accepted_tx,
            accepted_rx,
            rr_keys: Vec::new(),
            node_seq: 0,
            node_ids: 0,
            backlog: VecDeque::new(),
            read_budget: std::sync::Arc::new(tokio::sync::Semaphore::new(channel::READ_BUDGET)),
            fatal: None,
            remnants: Vec::new(),
            ignored_logged: 0,
            host_warned: HashSet::new(),
            own_listener_warned: false,
            address_in_use_warned: false,
            configured_taken: false,
            port_warned: false,
            probing: false,
            probe_tx,
            probe_rx,
            memory_check_at,
            measuring: false,
            emptying: Vec::new(),
            memory_warned: false,
            memory_tx,
            memory_rx,
            notify_dir,
            steering: None,
            steering_refused: false,
            notify_tx,
            notify_rx,
            worker_nofile,
            cgroups,
            no_cgroups,
            control_name: servers.control.as_ref().map(|b| b.claim.name.clone()),
            servers: Some(servers),
            control_claim: None,
            control_server: None,
            metrics_server: None,
            stats: control::Stats::default(),
            spawn_queue: VecDeque::new(),
            systemd: systemd::Systemd::from_env(),
        })
    }

    pub(crate) async fn run(mut self) -> Result<Outcome, Error> {
        let sig = |kind| signal(kind).map_err(Error::Signals);
        let mut sigint = sig(SignalKind::interrupt())?;
        let mut sigterm = sig(SignalKind::terminate())?;
        let mut sigchld = sig(SignalKind::child())?;
        let mut sighup = sig(SignalKind::hangup())?;
        let mut sigquit = sig(SignalKind::quit())?;
        // What an operator may send a process manager by habit; none of
        // these may end herd (their default action would).
        let mut sigusr1 = sig(SignalKind::user_defined1())?;
        let mut sigusr2 = sig(SignalKind::user_defined2())?;
        let mut sigttin = sig(SignalKind::from_raw(libc::SIGTTIN))?;
        let mut sigttou = sig(SignalKind::from_raw(libc::SIGTTOU))?;
        let mut sigwinch = sig(SignalKind::window_change())?;
        let mut sigalrm = sig(SignalKind::alarm())?;
        let mut sigpipe = sig(SignalKind::pipe())?;

        self.stats.started = Some((Instant::now(), std::time::SystemTime::now()));
        self.start_guardian();
        self.start_acceptors()?;
        self.start_control()?;
        info!(
            command = %self.config.command.display(),
            workers = self.config.workers,
            balance = %self.config.balance,
            "starting"
        );
        for (i, spec) in self.listeners.specs().iter().enumerate() {
            if self.listeners.passed(i) {
                info!("listening on {spec} (the socket systemd passed)");
            } else {
                info!("listening on {spec}");
            }
        }
        if self.config.min_ready > self.config.workers && self.config.metrics.is_some() {
            warn!(
                "--min-ready {} is more than the {} worker(s): /ready answers 503 until the \
                 cluster is scaled up",
                self.config.min_ready, self.config.workers
            );
        }
        // A readiness no worker of this kind can give.
        let can_say = match self.config.ready {
            crate::ReadyMode::Node => self.config.ipc == Ipc::Node,
            crate::ReadyMode::Listen => self.config.ipc != Ipc::None,
            _ => true,
        };
        if !can_say {
            warn!(
                "--ready {:?} waits for a signal only Node{} workers give; these workers will be \
                 killed at --ready-timeout ({:?}) unless they give it (--ready notify or auto \
                 for others)",
                self.config.ready,
                if self.config.ready == crate::ReadyMode::Listen {
                    " or library"
                } else {
                    ""
                },
                self.config.ready_timeout
            );
        }
        match (&self.cgroups, &self.no_cgroups) {
            (Some(c), _) => info!(
                "each worker runs in a cgroup of its own under {}: its whole process tree \
                 is stopped with it",
                c.root().display()
            ),
            (None, why) => info!(
                "each worker leads a process group ({}): what stays in the group is stopped \
                 with it; a descendant that leaves the group is stopped only when herd exits",
                why.as_deref().unwrap_or("no cgroups")
            ),
        }
        self.perform();

        loop {
            if let Some(outcome) = self.finished() {
                for server in [self.control_server.take(), self.metrics_server.take()]
                    .into_iter()
                    .flatten()
                {
                    server.abort();
                }
                // The socket goes with the claim: nobody is left to answer.
                self.control_claim = None;
                self.stop_guardian().await;
                if let Some(c) = self.cgroups.take() {
                    c.remove();
                }
                // What the workers wrote before they exited is still in
                // their pipes or queued: drain it (bounded: a descendant may
                // hold a pipe open, herd's output may be stalled).
                let _ = tokio::time::timeout(OUTPUT_DRAIN, async {
                    while self.forwarders.join_next().await.is_some() {}
                })
                .await;
                crate::output::flush(OUTPUT_DRAIN).await;
                return match self.fatal.take() {
                    Some(e) => Err(e),
                    None => Ok(outcome),
                };
            }
            let deadline = self.next_deadline();
            tokio::select! {
                _ = sigint.recv() => self.on_stop_request("SIGINT"),
                _ = sigterm.recv() => self.on_stop_request("SIGTERM"),
                _ = sigquit.recv() => self.on_stop_request("SIGQUIT"),
                _ = sighup.recv() => self.request_reload(None, "SIGHUP"),
                _ = sigusr1.recv() => {
                    if crate::output::reopen() {
                        info!("SIGUSR1 received: reopening the log file");
                    } else {
                        self.ignore_signal(libc::SIGUSR1, "SIGUSR1", "herd writes no log file (--log-file)");
                    }
                }
                _ = sigusr2.recv() => self.ignore_signal(libc::SIGUSR2, "SIGUSR2", "it has no meaning to herd"),
                _ = sigttin.recv() => self.scale_by(1, "SIGTTIN"),
                _ = sigttou.recv() => self.scale_by(-1, "SIGTTOU"),
                _ = sigwinch.recv() => self.ignore_signal(libc::SIGWINCH, "SIGWINCH", "it has no meaning to herd"),
                _ = sigalrm.recv() => self.ignore_signal(libc::SIGALRM, "SIGALRM", "it has no meaning to herd"),
                _ = sigpipe.recv() => self.ignore_signal(libc::SIGPIPE, "SIGPIPE", "a closed pipe is handled where it is written"),
                _ = sigchld.recv() => self.reap_strays(),
                Some(batch) = self.channel_rx.recv(), if self.backlog.is_empty() => {
                    let _ = self.on_channel_events(batch.into());
                    // Take what else is queued before going round the select
                    // again: a burst of messages costs one wakeup, not one each.
                    for _ in 0..BATCH {
                        if !self.backlog.is_empty() {
                            break;
                        }
                        let Ok(batch) = self.channel_rx.try_recv() else { break };
                        let _ = self.on_channel_events(batch.into());
                    }
                }
                _ = self.events.room(), if !self.backlog.is_empty() => self.work_backlog(),
                Some(found) = self.probe_rx.recv() => self.on_probe_result(found),
                Some(usage) = self.memory_rx.recv() => self.on_memory(usage),
                Some((slot, pid, notice)) = self.notify_rx.recv() => self.on_notice(slot, pid, notice),
                Some(command) = self.commands.recv() => {
                    self.on_command(command);
                    for _ in 0..BATCH {
                        let Ok(command) = self.commands.try_recv() else { break };
                        self.on_command(command);
                    }
                }
                Some((conn, client, listener)) = self.accepted_rx.recv() => {
                    self.on_accepted(conn, client, listener)
                }
                Some(joined) = self.exits.join_next() => match joined {
                    Ok(exit) => {
                        self.flush_channel_of(exit.pid);
                        self.on_exit(exit);
                        self.work_backlog();
                    }
                    Err(e) => error!("worker watcher failed: {e}"),
                },
                Some(_) = self.forwarders.join_next(), if !self.forwarders.is_empty() => {}
                status = wait_guardian(&mut self.guardian) => {
                    warn!("orphan guardian exited ({status:?}); starting a new one");
                    self.guardian = None;
                    self.start_guardian();
                }
                // Other tasks (the control server, readers) run between batches.
                _ = tokio::task::yield_now(), if !self.spawn_queue.is_empty() => self.work_spawns(),
                _ = sleep_until(deadline.unwrap_or_else(far_future).into()), if deadline.is_some() => {
                    self.on_timer(Instant::now());
                }
            }
        }
    }

    /// Serves the control socket and the metrics endpoint, if the cluster
    /// has them.
    fn start_control(&mut self) -> Result<(), Error> {
        let Some(Servers {
            control,
            metrics,
            commands,
        }) = self.servers.take()
        else {
            return Ok(());
        };
        if let Some(listener) = metrics {
            let addr = listener.local_addr().map_err(Error::Spawn)?;
            let listener = tokio::net::TcpListener::from_std(listener).map_err(Error::Spawn)?;
            info!("metrics on http://{addr}/metrics (and /healthz, /ready)");
            let serve = crate::metrics::serve(listener, commands.clone(), self.config.min_ready);
            self.metrics_server = Some(tokio::spawn(serve).abort_handle());
        }
        let Some(bound) = control else {
            return Ok(());
        };
        let crate::control::Bound { claim, listener } = bound;
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| crate::control::ControlError::Io(claim.socket.clone(), e))?;
        info!(
            "control socket {} (herd status {})",
            claim.socket.display(),
            claim.name
        );
        self.control_server =
            Some(tokio::spawn(crate::control::server::serve(listener, commands)).abort_handle());
        self.control_claim = Some(claim);
        Ok(())
    }

    /// Logs, once per signal, that `sig` was received and ignored.
    fn ignore_signal(&mut self, sig: i32, name: &str, why: &str) {
        let bit = 1u64 << (sig as u32 % 64);
        if self.ignored_logged & bit == 0 {
            self.ignored_logged |= bit;
            info!("{name} received and ignored: {why} (logged once)");
        }
    }

    /// The cluster's result once nothing runs and nothing will.
    fn finished(&self) -> Option<Outcome> {
        let end = self.life.finished()?;
        if !self.remnants.is_empty() {
            return None;
        }
        let last = |slot: usize| self.slots[slot].last_exit.clone().unwrap_or_default();
        Some(match end {
            End::Stopped | End::CannotRun => Outcome::Stopped,
            End::Finished { all_succeeded } => Outcome::Finished { all_succeeded },
            End::CrashLoop { slot } => {
                let (exit, stderr) = last(slot);
                Outcome::CrashLoop { slot, exit, stderr }
            }
            End::BootFailed { slot } => {
                let (exit, stderr) = last(slot);
                Outcome::BootFailed { slot, exit, stderr }
            }
        })
    }

    fn next_deadline(&self) -> Option<Instant> {
        let remnants = self.remnants.iter().map(|r| r.kill_at).min();
        let probes = if self.life.stopping() {
            None
        } else {
            self.slots
                .iter()
                .flat_map(|s| &s.workers)
                .filter_map(|w| self.probe_due(self.life.find(w.pid)?.2.started, w.probes))
                .min()
        };
        let memory = self.memory_check_at.filter(|_| !self.life.stopping());
        let watchdog = self.systemd.as_ref().and_then(|s| s.watchdog_at());
        // While a queue empties, it is looked at every EMPTY_POLL (bounded by
        // EMPTY_WAIT): the kernel says nothing when it is empty.
        let emptying = (!self.emptying.is_empty()).then(|| Instant::now() + EMPTY_POLL);
        [
            emptying,
            self.life.next_deadline(),
            remnants,
            probes,
            self.node_release_at,
            memory,
            watchdog,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// SIGKILLs the remnants whose time is up; gives up on any that a
    /// SIGKILL did not end within [`REMNANT_KILL_GRACE`] (a stop must end).
    fn kill_remnants(&mut self, now: Instant) {
        let mut given_up = Vec::new();
        self.remnants.retain_mut(|r| {
            if r.kill_at > now {
                return true;
            }
            if r.killed {
                warn!(
                    "processes of exited worker {} survived SIGKILL; no longer waiting for them",
                    r.pgid
                );
                given_up.push(r.pgid);
                return false;
            }
            warn!(
                "processes left by exited worker {} did not stop in time; killing them",
                r.pgid
            );
            r.signal(Signal::KILL);
            // Kept until it is empty (its cgroup is removed then); looked at
            // once more in a moment, in case no SIGCHLD says so.
            r.killed = true;
            r.kill_at = now + REMNANT_KILL_GRACE;
            true
        });
        for pgid in given_up {
            self.tell_guardian(-(pgid as i32));
        }
    }

    /// Forgets remnants whose group has no member left.
    fn prune_remnants(&mut self) {
        let (alive, gone): (Vec<Remnant>, Vec<Remnant>) = std::mem::take(&mut self.remnants)
            .into_iter()
            .partition(Remnant::alive);
        self.remnants = alive;
        for r in gone {
            debug!("nothing is left of exited worker {}", r.pgid);
            self.tell_guardian(-(r.pgid as i32));
            r.forget();
        }
    }

    fn on_timer(&mut self, now: Instant) {
        if let Some(s) = &mut self.systemd {
            s.watchdog(now);
        }
        self.prune_remnants();
        self.check_emptying(now);
        self.kill_remnants(now);
        if self.node_release_at.is_some_and(|at| at <= now) {
            self.node_release_at = None;
            self.release_node_workers();
        }
        self.life.timer(now);
        self.perform();
        if !self.life.stopping() {
            self.probe_workers(now);
            if self.memory_check_at.is_some_and(|at| at <= now) {
                self.memory_check_at = Some(now + MEMORY_EVERY);
                self.measure_memory();
            }
        }
    }

    /// `--max-memory`: reads each worker's tree's RSS on the blocking pool
    /// (procfs), one reading at a time.
    fn measure_memory(&mut self) {
        if self.measuring {
            return;
        }
        let workers: Vec<(usize, u32, Option<std::path::PathBuf>)> = (0..self.slots.len())
            .filter_map(|slot| {
                let pid = self.life.worker(slot)?.pid;
                let io = self.slots[slot].io(pid)?;
                Some((slot, pid, io.cgroup.clone()))
            })
            .collect();
        if workers.is_empty() {
            return;
        }
        self.measuring = true;
        let tx = self.memory_tx.clone();
        tokio::task::spawn_blocking(move || {
            let usage = workers
                .into_iter()
                .map(|(slot, pid, cgroup)| (slot, pid, probe::tree_rss(pid, cgroup.as_deref())))
                .collect();
            let _ = tx.send(usage);
        });
    }

    /// Workers over `--max-memory` are replaced the way a reload replaces
    /// them (not while a reload runs, and `reload_surge` at a time: the rest
    /// at the next reading).
    fn on_memory(&mut self, usage: Vec<(usize, u32, u64)>) {
        self.measuring = false;
        let Some(max) = self.config.max_memory else {
            return;
        };
        for (slot, pid, rss) in usage {
            if rss > max {
                debug!(slot, pid, rss, "worker {pid} uses {rss} bytes");
                let young = self
                    .life
                    .find(pid)
                    .is_some_and(|(_, _, w)| w.started.elapsed() < MEMORY_EVERY * 3);
                if young && !self.memory_warned {
                    self.memory_warned = true;
                    warn!(
                        slot,
                        pid,
                        "worker {pid} uses {rss} bytes within seconds of starting, more than \
                         --max-memory ({max} bytes): workers will be replaced over and over; \
                         raise the limit (said once)"
                    );
                }
                self.life
                    .recycle(slot, pid, crate::lifecycle::RecycleWhy::Memory);
            }
        }
        self.perform();
    }

    /// Carries out what the lifecycle decided, until it decides nothing more.
    fn perform(&mut self) {
        loop {
            let actions = self.life.take_actions();
            if actions.is_empty() {
                break;
            }
            for action in actions {
                match action {
                    // Spawned from the loop, a batch at a time (`work_spawns`).
                    Action::Spawn { slot, replacement } => {
                        self.spawn_queue.push_back((slot, replacement))
                    }
                    Action::StopAll => self.stop_all(),
                    Action::KillAll => self.kill_everything(Instant::now()),
                    Action::Kill { pid } => {
                        let cgroup = self
                            .slots
                            .iter()
                            .find_map(|s| s.io(pid))
                            .and_then(|w| w.cgroup.clone());
                        signal_worker(pid, cgroup.as_deref(), Signal::KILL);
                    }
                    // The worker itself, not its group: its core dump is the
                    // one that tells why it hung.
                    Action::Abort { pid } => {
                        if let Some(p) = Pid::from_raw(pid as i32) {
                            let _ = rustix::process::kill_process(p, Signal::ABORT);
                        }
                    }
                    Action::Retire { slot, pid, why } => {
                        // reuseport: new connections stop going to a socket
                        // before its worker stops accepting from it.
                        self.steer();
                        match why {
                            RetireWhy::ScaledAway => info!(
                                slot,
                                pid, "worker {pid} retires: slot {slot} is scaled away"
                            ),
                            RetireWhy::Replaced => {
                                if self.life.reloading() {
                                    self.stats.counters.restarts_reload += 1;
                                } else {
                                    self.stats.counters.restarts_recycled += 1;
                                }
                                info!(slot, pid, "worker {pid} drains: it was replaced")
                            }
                            RetireWhy::Abandoned => info!(
                                slot,
                                pid, "stopping new worker {pid}: it is not needed any more"
                            ),
                        }
                        if why == RetireWhy::ScaledAway && self.queued_on(slot) > 0 {
                            // Its socket has connections queued that no other
                            // worker will take: it keeps accepting until they
                            // are taken (new ones go elsewhere now), then goes.
                            self.emptying.push((slot, pid, Instant::now() + EMPTY_WAIT));
                            continue;
                        }
                        let node = self.config.ipc == Ipc::Node;
                        self.ask_to_go(slot, pid, self.config.stop_signal, node);
                    }
                    Action::RemoveSlot { slot } => {
                        if slot + 1 == self.slots.len() {
                            self.slots.pop();
                            info!(slot, "slot {slot} removed");
                        }
                    }
                    Action::ReloadEnded(report) => self.reload_ended(report),
                    Action::ReloadNext => {
                        self.reload_waiters = std::mem::take(&mut self.queued_waiters);
                        self.begin_reload("the reload asked for during the last one");
                    }
                    Action::Note(note) => self.log_note(note),
                }
            }
        }
        self.steer();
        self.tell_systemd();
    }

    /// Slots whose own worker is ready and not asked to go: what `herd
    /// status`, `/ready` and systemd's `READY=1` count.
    fn ready_slots(&self) -> usize {
        (0..self.life.slots())
            .filter(|s| {
                self.life
                    .worker(*s)
                    .is_some_and(|w| w.ready && w.retire_kill_at.is_none())
            })
            .count()
    }

    /// The ready count to systemd (`STATUS=`, and `READY=1` once the
    /// cluster serves `min_ready` workers).
    fn tell_systemd(&mut self) {
        if self.systemd.is_none() || self.life.stopping() {
            return;
        }
        let slots = 0..self.life.slots();
        let ready = self.ready_slots();
        // In backoff after a worker died (not waiting for its first).
        let restarting = slots
            .filter(|s| {
                matches!(
                    self.life.state(*s),
                    crate::lifecycle::SlotState::Waiting { .. }
                )
            })
            .filter(|s| self.slots.get(*s).is_some_and(|slot| slot.started_any))
            .count();
        let workers = self.life.active();
        let serves = ready >= self.config.min_ready.clamp(1, workers.max(1));
        if let Some(s) = &mut self.systemd {
            s.update(ready, workers, restarting, serves);
        }
    }

    /// Spawns up to [`SPAWN_BATCH`] of the workers asked for, each if it is
    /// still wanted (an answer since may have made it moot, or changed its
    /// command generation).
    fn work_spawns(&mut self) {
        for _ in 0..SPAWN_BATCH {
            let Some((slot, replacement)) = self.spawn_queue.pop_front() else {
                break;
            };
            if let Some(generation) = self.life.spawn_wanted(slot, replacement) {
                self.spawn(slot, generation);
            }
        }
        self.perform();
    }

    /// reuseport: connections waiting in the accept queues of the sockets
    /// that slot `slot` alone uses (no other slot staying shares them);
    /// 0 in other modes, or where steering is refused (they could not be
    /// kept from filling again).
    fn queued_on(&self, slot: usize) -> u32 {
        if self.config.balance != crate::Balance::Reuseport || self.steering_refused {
            return 0;
        }
        (0..self.listeners.specs().len())
            .filter_map(|i| {
                let (_, group) = self.listeners.reuseport_group(i)?;
                let shared = (0..self.slots.len())
                    .any(|j| j != slot && j % group == slot % group && !self.life.leaving(j));
                (!shared).then(|| sys::accept_queue_len(self.listeners.socket(i, slot)))?
            })
            .sum()
    }

    /// Scaled-away workers waiting for their sockets' queues to empty: those
    /// emptied (or past [`EMPTY_WAIT`], or gone) are asked to go now.
    fn check_emptying(&mut self, now: Instant) {
        let waiting = std::mem::take(&mut self.emptying);
        for (slot, pid, until) in waiting {
            if self.life.stopping() || self.life.find(pid).is_none() {
                continue;
            }
            let left = self.queued_on(slot);
            if left > 0 && now < until {
                self.emptying.push((slot, pid, until));
                continue;
            }
            if left > 0 {
                warn!(
                    slot,
                    pid, "{left} connection(s) still queued on slot {slot}'s socket after {EMPTY_WAIT:?}; worker {pid} is asked to go anyway"
                );
            }
            let node = self.config.ipc == Ipc::Node;
            self.ask_to_go(slot, pid, self.config.stop_signal, node);
        }
    }

    /// reuseport: new connections go only to sockets a ready worker serves
    /// (a slot crash-looping, in backoff or scaled away gets none, instead
    /// of its hash share waiting for a worker), as a BPF program on each
    /// group; to every socket, by the kernel's hash, when all are served or
    /// none is. Cheap when nothing changed.
    fn steer(&mut self) {
        if self.config.balance != crate::Balance::Reuseport
            || self.steering_refused
            || self.life.stopping()
        {
            return;
        }
        let Some(group) = (0..self.listeners.specs().len())
            .find_map(|i| self.listeners.reuseport_group(i).map(|(_, n)| n))
        else {
            return;
        };
        let mut served = vec![false; group];
        for slot in 0..self.slots.len() {
            if self
                .life
                .worker(slot)
                .is_some_and(|w| w.ready && w.retire_kill_at.is_none())
            {
                served[slot % group] = true;
            }
        }
        let targets: Vec<u32> = if served.iter().all(|s| *s) || !served.iter().any(|s| *s) {
            Vec::new()
        } else {
            (0..group as u32).filter(|i| served[*i as usize]).collect()
        };
        if self.steering.as_ref() == Some(&targets) {
            return;
        }
        for i in 0..self.listeners.specs().len() {
            if let Some((fd, _)) = self.listeners.reuseport_group(i) {
                if let Err(e) = sys::steer_reuseport(fd, &targets) {
                    warn!(
                        "cannot steer reuseport connections away from slots without a ready \
                         worker ({e}); a slot without one keeps its share of new connections \
                         (said once)"
                    );
                    self.steering_refused = true;
                    return;
                }
            }
        }
        if targets.is_empty() {
            if self.steering.as_ref().is_some_and(|t| !t.is_empty()) {
                info!("reuseport: new connections go to every slot again");
            }
        } else {
            info!(
                "reuseport: new connections go to slot(s) {:?} only, which have a ready worker",
                targets
            );
        }
        self.steering = Some(targets);
    }

    /// Words for what the lifecycle decided.
    fn log_note(&mut self, note: Note) {
        match note {
            Note::Restarting { slot, delay } => info!(
                slot,
                delay_ms = delay.as_millis() as u64,
                "restarting slot {slot} in {delay:?}"
            ),
            Note::CrashLoop { slot } => {
                self.stats.counters.crash_loops += 1;
                error!(
                    slot,
                    "CRASH LOOP: slot {slot} failed more than {} times within {:?}",
                    self.config.max_restarts,
                    self.config.within
                )
            }
            Note::Failed { slot, retry_every } => {
                error!(
                    slot,
                    "slot {slot} marked failed; retrying every {retry_every:?}"
                )
            }
            Note::Recovered { slot } => info!(slot, "slot {slot} recovered"),
            Note::GaveUpBooting => {
                error!("no worker ever started, and every slot is in a crash loop: giving up")
            }
            Note::NotRestarted { slot } => {
                info!(slot, "slot {slot} not restarted (restart policy)")
            }
            Note::RetireTimedOut { pid } => {
                warn!(
                    pid,
                    "worker {pid} did not exit after disconnect; killing it"
                )
            }
            Note::Hung {
                slot,
                pid,
                triggered,
            } => {
                if triggered {
                    warn!(slot, pid, "worker {pid} asked for its watchdog (WATCHDOG=trigger); aborting it (SIGABRT, SIGKILL 2 s later)");
                } else {
                    warn!(
                        slot,
                        pid,
                        "worker {pid} is hung: no WATCHDOG=1 for {:?} (--watchdog); aborting it \
                         (SIGABRT, SIGKILL 2 s later)",
                        self.config.watchdog.unwrap_or_default()
                    );
                }
            }
            Note::ScaledAway { slot } => {
                info!(slot, "slot {slot} scaled away (it had no live worker)")
            }
            Note::ReadyByDelay { slot, pid } => {
                self.steer();
                info!(slot, pid, "worker {pid} ready (--ready-delay passed)");
                self.events.send(Event::Ready { slot, pid });
                self.dispatch();
            }
            Note::NotReady { slot, pid, timeout } => warn!(
                slot,
                pid,
                "worker {pid} not ready within {timeout:?} (--ready-timeout); killing it, \
                 a failed start"
            ),
            Note::StopTimedOut => warn!(
                "stop timeout ({:?}) expired; killing remaining workers",
                self.config.stop_timeout
            ),
            note @ (Note::ReloadStarted { .. }
            | Note::Replaced { .. }
            | Note::ReplacementFailed { .. }
            | Note::RollingBack { .. }
            | Note::Recycling { .. }) => self.log_reload_note(note),
        }
    }

    /// SIGKILL to every worker and everything left of dead ones: the stop
    /// timeout passed, or a second stop signal came.
    fn kill_everything(&mut self, now: Instant) {
        self.signal_all(Signal::KILL);
        for r in &mut self.remnants {
            if !r.killed {
                r.kill_at = now;
            }
        }
        self.kill_remnants(now);
    }

    fn on_stop_request(&mut self, name: &str) {
        if let Some(s) = &self.systemd {
            s.stopping();
        }
        if self.life.request_stop(Instant::now()) {
            info!(
                "{name} received; stopping workers with {} (timeout {:?})",
                signal_name(self.config.stop_signal.as_raw()),
                self.config.stop_timeout
            );
        } else {
            warn!("{name} received again; killing workers now");
        }
        self.perform();
    }

    /// The cluster began to stop: the stop signal to every worker, Node's
    /// release scheduled, remnants put on the same deadline.
    fn stop_all(&mut self) {
        let now = Instant::now();
        let kill_at = match self.life.phase() {
            Phase::Stopping { kill_at, .. } => kill_at,
            Phase::Running => now + self.config.stop_timeout,
        };
        self.node_release_at = (self.config.ipc == Ipc::Node)
            .then(|| now + NODE_RELEASE_DELAY.min(self.config.stop_timeout / 2));
        // Remnants of dead workers go by the same deadline.
        for r in &mut self.remnants {
            r.kill_at = r.kill_at.min(kill_at);
        }
        self.signal_all(self.config.stop_signal);
    }

    /// On stop (`NODE_RELEASE_DELAY` after the stop signal, so their
    /// handlers run first), lets Node workers' event loops end: herd's
    /// channel would keep them alive after their stop handler cleaned up.
    /// A cluster worker
    /// (NODE_UNIQUE_ID) gets Node's own `{act: 'disconnect'}`, as Node's
    /// primary sends it (closing its channel instead would make Node's
    /// cluster module exit at once, cutting requests short); any other Node
    /// worker has its channel closed.
    fn release_node_workers(&mut self) {
        let cluster_worker = self.node_cluster_worker();
        let running: Vec<(usize, u32)> = self
            .slots
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                s.workers
                    .iter()
                    .filter(|w| w.channel.is_some())
                    .map(move |w| (i, w.pid))
            })
            .collect();
        for (slot, pid) in running {
            if cluster_worker {
                let seq = self.next_node_seq();
                if let Some(WorkerIo {
                    channel: Some(tx), ..
                }) = self.slots[slot].io(pid)
                {
                    let mut fields = serde_json::Map::new();
                    fields.insert("act".into(), "disconnect".into());
                    let _ = tx.send(Outgoing::Frame {
                        bytes: node::encode_cluster(fields, seq, false),
                        fd: None,
                    });
                }
            } else {
                self.close_channel(slot, pid);
            }
        }
    }

    /// Signals every live worker: its process group, the worker itself (in
    /// case it left the group) and, for SIGKILL, its whole cgroup.
    fn signal_all(&self, sig: Signal) {
        for w in self.slots.iter().flat_map(|s| &s.workers) {
            signal_worker(w.pid, w.cgroup.as_deref(), sig);
        }
    }

    fn spawn(&mut self, slot: usize, generation: u64) {
        // A worker started while the slot has none of its own is a restart
        // (after its first); a replacement beside a live one is not.
        let restart = self.life.worker(slot).is_none();
        if let Some(s) = self.slots.get_mut(slot) {
            if restart && s.started_any {
                s.restarts += 1;
            }
            s.started_any = true;
        }
        match self.try_spawn(slot, generation) {
            Ok(new) => self.install(slot, new),
            Err(e) => {
                let why = format!("cannot spawn a worker: {e}");
                error!(slot, "slot {slot}: {why}");
                self.slots[slot].last_exit = Some((why, Vec::new()));
                self.life.spawn_failed(slot, Instant::now());
            }
        }
    }

    /// Makes a freshly spawned worker the slot's own and watches for its exit.
    fn install(&mut self, slot: usize, new: NewWorker) {
        let NewWorker {
            pid,
            child,
            channel,
            reader,
            stderr,
            cgroup,
            exec_err,
            inspector_ports,
            notify,
        } = new;
        self.life.spawned(slot, pid, Instant::now());
        info!(slot, pid, "worker {pid} spawned in slot {slot}");
        self.events.send(Event::Spawned { slot, pid });
        let (status, _) = watch::channel(if channel.is_some() {
            WorkerStatus::Connected
        } else {
            WorkerStatus::Disconnected
        });
        self.slots[slot].workers.push(WorkerIo {
            pid,
            channel,
            status,
            online: false,
            rr_servers: Vec::new(),
            skipped: 0,
            cgroup,
            refusals: 0,
            probes: 0,
            inspector_ports,
            notify,
            status_text: None,
            tail: stderr.as_ref().map(|(tail, _)| tail.clone()),
        });
        self.tell_guardian(pid as i32);
        self.exits.spawn(async move {
            let mut child = child;
            let status = child.wait().await;
            let at = Instant::now();
            let exec_errno = sys::read_exec_errno(exec_err);
            // Report the exit only once the channel reader has passed on
            // everything the worker sent before it died (a result written
            // just before exit must not be lost). The bound covers a
            // descendant that kept the channel open.
            if let Some(reader) = reader {
                let _ = tokio::time::timeout(READER_GRACE, reader).await;
            }
            // Its last stderr lines, for an error report: what is there once
            // the pipe is drained, or shortly (a descendant may hold it).
            let stderr = match stderr {
                Some((tail, eof)) => {
                    let _ = tokio::time::timeout(TAIL_GRACE, eof).await;
                    tail.lines()
                }
                None => Vec::new(),
            };
            Exit {
                slot,
                pid,
                status,
                stderr,
                at,
                exec_errno,
            }
        });
    }

    /// A handle's view of the worker in `slot` (its own), if one is alive.
    fn link(&self, slot: usize) -> Option<WorkerLink> {
        let pid = self.life.worker(slot)?.pid;
        let w = self.slots.get(slot)?.io(pid)?;
        Some(WorkerLink {
            slot,
            pid,
            outbox: w.channel.clone(),
            status: w.status.subscribe(),
        })
    }

    /// Closes the channel of the worker in `slot` if it is `pid` and has one
    /// open: everything queued is still written, then the worker reads EOF.
    fn close_channel(&mut self, slot: usize, pid: u32) {
        let Some(WorkerIo {
            channel, status, ..
        }) = self.slots.get_mut(slot).and_then(|s| s.io_mut(pid))
        else {
            return;
        };
        if let Some(tx) = channel.take() {
            let _ = tx.send(Outgoing::Close);
            status.send_replace(WorkerStatus::Disconnected);
            self.events.send(Event::Disconnected { slot, pid });
        }
        // Connections it was handed and has not taken stay its own until it
        // exits: it reads every frame queued before the close and may still
        // take them (its acks are still heard).
    }

    /// When a worker started at `started` that had `probes` probes is
    /// next looked at for listening sockets of its own; `None`: never
    /// (nothing to compare with, done, or already said).
    fn probe_due(&self, started: Instant, probes: usize) -> Option<Instant> {
        if self.config.listen.is_empty() || self.own_listener_warned {
            return None;
        }
        probe::PROBE_AFTER.get(probes).map(|after| started + *after)
    }

    /// Looks at the listening sockets of workers whose probe is due, on a
    /// blocking-pool thread (a worker may hold thousands of descriptors):
    /// the answer comes back as a [`ProbeResult`].
    fn probe_workers(&mut self, now: Instant) {
        let life = &self.life;
        let due: Vec<(usize, u32, Vec<u16>, Option<std::path::PathBuf>)> = self
            .slots
            .iter_mut()
            .enumerate()
            .flat_map(|(i, s)| s.workers.iter_mut().map(move |w| (i, w)))
            .filter_map(|(i, w)| {
                let started = life.find(w.pid)?.2.started;
                let after = probe::PROBE_AFTER.get(w.probes)?;
                if started + *after > now {
                    return None;
                }
                w.probes += 1;
                Some((i, w.pid, w.inspector_ports.clone(), w.cgroup.clone()))
            })
            .collect();
        if due.is_empty()
            || self.own_listener_warned
            || self.config.listen.is_empty()
            || self.probing
        {
            return;
        }
        self.probing = true;
        let herds = self.socket_inodes();
        let tx = self.probe_tx.clone();
        tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            for (slot, pid, inspector, cgroup) in due {
                let mut own = probe::own_listeners(pid, cgroup.as_deref(), &herds);
                own.retain(|a| !inspector.contains(&a.port()));
                found.push((slot, pid, own));
            }
            let _ = tx.send(found);
        });
    }

    /// What a probe found: a worker serving on a socket of its own ignores
    /// herd's, and herd says so once.
    fn on_probe_result(&mut self, found: ProbeResult) {
        self.probing = false;
        for (slot, pid, own) in found {
            if own.is_empty() {
                debug!(
                    slot,
                    pid, "worker {pid} holds no listening socket of its own"
                );
                continue;
            }
            if self.own_listener_warned {
                return;
            }
            self.own_listener_warned = true;
            let own: Vec<String> = own.iter().map(|a| a.to_string()).collect();
            warn!(
                slot,
                pid,
                "worker {pid} listens on {} itself, on a socket herd did not give it, while \
                 herd listens on {} (passed as fd 3.., LISTEN_FDS): if that is the app's \
                 server, it ignores herd's socket and requests to herd's address wait; {} \
                 (said once)",
                own.join(", "),
                self.listen_summary(),
                self.socket_advice(),
            );
        }
    }

    /// The inodes of every socket herd holds, configured or bound on request.
    fn socket_inodes(&self) -> HashSet<u64> {
        let mut inodes = HashSet::new();
        let sets = std::iter::once(&self.listeners)
            .chain(self.on_demand.iter().flatten().map(|d| &d.listeners));
        for listeners in sets {
            for i in 0..listeners.specs().len() {
                for slot in 0..self.slots.len() {
                    inodes.extend(probe::inode(listeners.socket(i, slot)));
                }
            }
        }
        inodes
    }

    /// How to make the workers take herd's socket, for warnings.
    fn socket_advice(&self) -> &'static str {
        if self.config.command.is_node() && !self.node_cluster_worker() {
            "let Node's cluster protocol give it the socket (drop --node-cluster off), or \
             listen({fd: 3}), or change -l"
        } else if self.config.command.is_node() {
            "give -l the address the app listens on, or listen({fd: 3})"
        } else {
            "pass it the socket (e.g. uvicorn --fd 3, gunicorn without --bind; README: running \
             servers under herd) or change -l"
        }
    }

    /// herd's configured addresses, for messages.
    fn listen_summary(&self) -> String {
        self.listeners
            .specs()
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A worker said it is ready in a way the `--ready` mode counts: it
    /// is ready (logged and reported once) and may take connections.
    fn mark_ready(&mut self, slot: usize, pid: u32, signal: ReadySignal) {
        if !self.config.ready.accepts(signal) {
            debug!(
                slot,
                pid, "worker {pid} said {signal:?}, which --ready does not count"
            );
            return;
        }
        if self.life.find(pid).is_some_and(|(s, _, _)| s == slot)
            && self.life.ready(pid, Instant::now())
        {
            // reuseport: connections go to it before anyone is told it is
            // ready (a client reading the log must not race the steering).
            self.steer();
            info!(slot, pid, "worker {pid} ready");
            self.events.send(Event::Ready { slot, pid });
            self.perform();
            self.dispatch();
        }
    }

    /// What a worker said on its notify socket.
    fn on_notice(&mut self, slot: usize, pid: u32, notice: notify::Notice) {
        match notice {
            notify::Notice::Ready => self.mark_ready(slot, pid, ReadySignal::Notify),
            notify::Notice::Watchdog => {
                if self.life.find(pid).is_some_and(|(s, _, _)| s == slot) {
                    self.life.heartbeat(pid, Instant::now());
                }
            }
            notify::Notice::WatchdogTrigger => {
                if self.life.find(pid).is_some_and(|(s, _, _)| s == slot) {
                    self.life.watchdog_trigger(pid, Instant::now());
                    self.perform();
                }
            }
            notify::Notice::Status(text) => {
                if let Some(w) = self.slots.get_mut(slot).and_then(|s| s.io_mut(pid)) {
                    debug!(slot, pid, "worker {pid} status: {text}");
                    w.status_text = Some(text);
                }
            }
        }
    }

    /// Whether workers are Node cluster workers (`NODE_UNIQUE_ID`).
    fn node_cluster_worker(&self) -> bool {
        self.config
            .node_cluster
            .unwrap_or_else(|| self.config.command.runs_node_script())
    }

    /// The argv for slot `slot`'s worker, with Node's inspector options
    /// given the slot's own port (also in `env`'s NODE_OPTIONS), and the
    /// `host:port`s they name. Other commands: the argv as it is.
    fn inspector_for_slot(
        &self,
        slot: usize,
        gen: &reload::Gen,
        env: &mut [CString],
    ) -> (Vec<CString>, Vec<String>) {
        if !gen.command.is_node() {
            return (gen.argv.clone(), Vec::new());
        }
        let strings: Vec<String> = gen
            .argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        // Node's own options are on the command line only when the program
        // is node itself; a `#!` script's arguments are the script's.
        let (argv, mut ports) = if gen.command.runtime == crate::config::Runtime::Node {
            crate::inspect::argv_for_slot(&strings, slot)
        } else {
            (strings, Vec::new())
        };
        for entry in env.iter_mut() {
            let Some(options) = entry.to_bytes().strip_prefix(b"NODE_OPTIONS=") else {
                continue;
            };
            let (options, more) =
                crate::inspect::node_options_for_slot(&String::from_utf8_lossy(options), slot);
            if !more.is_empty() {
                if let Some(e) = env_entry("NODE_OPTIONS".as_ref(), options.as_ref()) {
                    *entry = e;
                }
                ports.extend(more);
            }
        }
        if ports.is_empty() {
            return (gen.argv.clone(), ports);
        }
        let argv = argv
            .into_iter()
            .filter_map(|a| CString::new(a).ok())
            .collect();
        (argv, ports)
    }

    /// Starts a worker. Returns once it is forked: whether its `execve`
    /// succeeds is learnt when it exits (`Exit::exec_errno`), so the
    /// supervisor never waits on the child's set-up.
    fn try_spawn(&mut self, slot: usize, generation: u64) -> std::io::Result<NewWorker> {
        let gen = match self.gens.get(&generation) {
            Some(g) => g.clone(),
            None => self
                .gens
                .values()
                .next_back()
                .expect("a generation")
                .clone(),
        };
        let mut fds = self.listeners.fds_for_slot(slot);
        let mut env = gen.base_env.clone();
        if self.config.user.is_some() {
            // The user's own, not herd's (root's).
            env.retain(|e| {
                let e = e.as_bytes();
                !["HOME=", "USER=", "LOGNAME=", "SHELL="]
                    .iter()
                    .any(|k| e.starts_with(k.as_bytes()))
            });
        }
        env.extend(self.slots[slot].env.iter().cloned());
        self.node_ids += 1;
        let node_id = self.node_ids;
        let mut add = |k: &str, v: &str| env.extend(env_entry(k.as_ref(), v.as_ref()));
        add("HERD_WORKER_ID", &slot.to_string());
        add("HERD_WORKERS", &self.life.active().to_string());
        add("HERD_PRIMARY_PID", &std::process::id().to_string());
        add(
            "HERD_STOP_SIGNAL",
            &self.config.stop_signal.as_raw().to_string(),
        );
        if let Some(user) = &self.config.user {
            add("HOME", &user.home.to_string_lossy());
            add("USER", &user.name);
            add("LOGNAME", &user.name);
            add("SHELL", &user.shell.to_string_lossy());
        }
        if !fds.is_empty() {
            add("LISTEN_FDS", &fds.len().to_string());
            add("LISTEN_FDNAMES", &self.listeners.fd_names());
        }
        // Its own notify socket (sd_notify READY=1 and STATUS=).
        let notify = match &self.notify_dir {
            Some(dir) => match dir.socket(node_id) {
                Ok((path, sock)) => {
                    if let Some(user) = &self.config.user {
                        // Its user must be able to send to it.
                        dir.open_to(user.uid, user.gid, &path);
                    }
                    add("NOTIFY_SOCKET", &path.to_string_lossy());
                    if let Some(w) = self.config.watchdog.filter(|d| !d.is_zero()) {
                        add("WATCHDOG_USEC", &w.as_micros().to_string());
                    }
                    Some((path, sock))
                }
                Err(e) => {
                    warn!(slot, "cannot make a notify socket for the worker: {e}");
                    None
                }
            },
            None => None,
        };
        // The IPC channel goes right after the sockets.
        let channel_fd = (sys::LISTEN_FDS_START as usize + fds.len()).to_string();
        let ipc = match self.config.ipc {
            Ipc::None => None,
            Ipc::Node => {
                add("NODE_CHANNEL_FD", &channel_fd);
                add("NODE_CHANNEL_SERIALIZATION_MODE", "json");
                // Node's cluster worker mode: `server.listen()` asks herd for
                // its socket, as it would ask Node's primary.
                if self.node_cluster_worker() {
                    add("NODE_UNIQUE_ID", &node_id.to_string());
                }
                Some(UnixStream::pair()?)
            }
            Ipc::Herd => {
                add("HERD_IPC_FD", &channel_fd);
                Some(UnixStream::pair()?)
            }
        };
        if let Some((_, theirs)) = &ipc {
            fds.push(theirs.as_raw_fd());
        }
        // The child reports a failed execve on this pipe (std's own error
        // pipe may be overwritten by the descriptor shuffle).
        let (exec_err_read, exec_err_write) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(std::io::Error::from)?;
        // Its own cgroup, which it enters before exec (best effort: without
        // one it is still contained by its process group).
        let cgroup = match &mut self.cgroups {
            Some(c) => match c.create_worker() {
                Ok(dir) => Some(dir),
                Err(e) => {
                    warn!(slot, "cannot create a cgroup for the worker: {e}");
                    None
                }
            },
            None => None,
        };
        // Node's inspector: each slot its own port (Node's primary does the
        // same), on the command line and in NODE_OPTIONS.
        let (argv, inspect) = self.inspector_for_slot(slot, &gen, &mut env);
        let plan = ExecPlan::new(
            &gen.command.program,
            argv,
            env,
            fds,
            Some(exec_err_write.as_raw_fd()),
            self.worker_nofile,
            cgroup.as_deref(),
        )?
        .run_as(
            self.config
                .user
                .as_ref()
                .map(|u| (u.uid, u.gid, u.groups.clone())),
        );
        // Output pipes as large as the system allows: a worker that prints a
        // lot and exits at once (Node drops writes still queued at exit)
        // keeps its last words.
        let (out_read, out_write) = sys::output_pipe()?;
        // `merge_output`: one pipe for both streams, as `2>&1` would, so a
        // worker's lines keep their order (stack traces stay readable).
        let (err_read, err_write) = if self.config.merge_output {
            (None, out_write.try_clone()?)
        } else {
            let (read, write) = sys::output_pipe()?;
            (Some(read), write)
        };
        let mut cmd = tokio::process::Command::new(&gen.command.program);
        if let Some(dir) = &gen.command.dir {
            cmd.current_dir(dir);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out_write))
            .stderr(Stdio::from(err_write))
            .process_group(0);
        plan.install(cmd.as_std_mut());
        let spawned = cmd.spawn();
        drop(exec_err_write);
        let child = spawned?;
        rustix::io::ioctl_fionbio(&exec_err_read, true).map_err(std::io::Error::from)?;
        let pid = child.id().unwrap_or(0);
        let notify = notify.map(|(path, sock)| {
            let reader = tokio::spawn(notify::read(sock, slot, pid, self.notify_tx.clone()));
            (reader.abort_handle(), path)
        });
        if !inspect.is_empty() {
            info!(
                slot,
                pid,
                "worker {pid}'s inspector: {}",
                inspect.join(", ")
            );
        }
        let out = tokio::net::unix::pipe::Receiver::from_owned_fd(out_read)?;
        // The last lines for error reports come from stderr, or from the
        // merged stream.
        let tail = Tail::default();
        let (stderr_done, stderr_eof) = oneshot::channel::<()>();
        let sink = self.output.clone();
        match err_read {
            Some(err_read) => {
                let err = tokio::net::unix::pipe::Receiver::from_owned_fd(err_read)?;
                self.forwarders
                    .spawn(sink.clone().forward(out, Stream::Stdout, slot, pid, None));
                let forward = sink.forward(err, Stream::Stderr, slot, pid, Some(tail.clone()));
                self.forwarders.spawn(async move {
                    forward.await;
                    drop(stderr_done);
                });
            }
            None => {
                let forward = sink.forward(out, Stream::Stdout, slot, pid, Some(tail.clone()));
                self.forwarders.spawn(async move {
                    forward.await;
                    drop(stderr_done);
                });
            }
        }
        let stderr = Some((tail, stderr_eof));
        let mut reader = None;
        let channel = match ipc {
            Some((ours, theirs)) => {
                drop(theirs); // the worker has its copy now
                ours.set_nonblocking(true)?;
                let (read, write) = tokio::net::UnixStream::from_std(ours)?.into_split();
                let tx = self.channel_tx.clone();
                let (done, reader_done) = oneshot::channel();
                reader = Some(reader_done);
                let max = self.config.ipc_max_message;
                if self.config.ipc == Ipc::Node {
                    let budget = self.read_budget.clone();
                    tokio::spawn(read_channel::<NodeDecoder>(
                        read, slot, pid, max, tx, budget, done,
                    ));
                } else {
                    let budget = self.read_budget.clone();
                    tokio::spawn(read_channel::<FrameDecoder>(
                        read, slot, pid, max, tx, budget, done,
                    ));
                }
                let (frames, queue) = mpsc::unbounded_channel();
                tokio::spawn(write_channel(write, queue));
                Some(frames)
            }
            None => None,
        };
        Ok(NewWorker {
            pid,
            child,
            channel,
            reader,
            stderr,
            cgroup,
            exec_err: exec_err_read,
            inspector_ports: inspect
                .iter()
                .filter_map(|a| a.rsplit(':').next()?.parse().ok())
                .collect(),
            notify,
        })
    }

    /// Handles one read's events in order. A message the event queue has no
    /// room for puts the rest of the batch at the front of the backlog:
    /// messages are back-pressured, never dropped while the program reads.
    /// Returns whether it stopped so.
    fn on_channel_events(&mut self, mut batch: Parked) -> bool {
        while let Some(event) = batch.events.pop_front() {
            if let ChannelEvent::Message(m) = &event {
                if !self.events.has_room(m.bytes().len()) {
                    batch.events.push_front(event);
                    self.backlog.push_front(batch);
                    return true;
                }
            }
            self.on_channel_event(batch.slot, batch.pid, event);
        }
        false // its budget share is released here
    }

    /// Handles backlogged batches, oldest first, while the event queue has room.
    fn work_backlog(&mut self) {
        while let Some(batch) = self.backlog.pop_front() {
            if self.on_channel_events(batch) {
                break; // no room again
            }
        }
    }

    /// Before worker `pid`'s exit is handled: everything it sent (its reader
    /// queued it before the exit was reported) is handled first, even into
    /// a full event queue — dropped and counted there, since an exit never
    /// waits for the program to read. Other workers' batches keep their
    /// order in the backlog, which stays bounded.
    fn flush_channel_of(&mut self, pid: u32) {
        while let Ok(batch) = self.channel_rx.try_recv() {
            self.backlog.push_back(batch.into());
        }
        let (mine, others): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.backlog)
            .into_iter()
            .partition(|b| b.pid == pid);
        self.backlog = others;
        for batch in mine {
            self.force_events(batch);
        }
        while self.backlog.len() > MAX_BACKLOG {
            let batch = self.backlog.pop_front().expect("not empty");
            self.force_events(batch);
        }
    }

    /// Handles a batch whether or not the event queue has room.
    fn force_events(&mut self, batch: Parked) {
        for event in batch.events {
            self.on_channel_event(batch.slot, batch.pid, event);
        }
    }

    fn on_channel_event(&mut self, slot: usize, from: u32, event: ChannelEvent) {
        let Some(WorkerIo {
            channel, online, ..
        }) = self.slots.get_mut(slot).and_then(|s| s.io_mut(from))
        else {
            return; // from a worker since gone
        };
        if channel.is_none()
            && !matches!(
                event,
                ChannelEvent::Taken { .. }
                    | ChannelEvent::ConnsClosed(_)
                    | ChannelEvent::Refused { .. }
            )
        {
            return; // disconnected: only its answers about connections count
        }
        // A Node worker's first message of any kind shows it is up.
        if !*online && (matches!(event, ChannelEvent::Online) || self.config.ipc == Ipc::Node) {
            *online = true;
            debug!(slot, pid = from, "worker {from} online");
            self.events.send(Event::Online { slot, pid: from });
        }
        match event {
            ChannelEvent::Online => {}
            ChannelEvent::Listen { seq, spec } => self.on_listen(slot, from, seq, &spec),
            ChannelEvent::Taken { id } => self.on_taken(from, id),
            ChannelEvent::ConnsClosed(n) => self.rr.closed(from, n),
            ChannelEvent::Refused { id } => {
                if let Some(listener) = self.rr.refuse(id, from) {
                    debug!(slot, pid = from, "worker {from} refused connection {id}");
                    // Its server for that listener closed: no more from it.
                    if let Some(w) = self.slots[slot].io_mut(from) {
                        w.rr_servers.retain(|l| *l != listener);
                    }
                    self.dispatch();
                }
            }
            ChannelEvent::NodeQuery(query) => self.on_node_query(slot, from, query),
            ChannelEvent::NodeClose { key } => self.on_node_close(slot, from, &key),
            ChannelEvent::NodeListening {
                address,
                port,
                path,
            } => {
                let address = match path {
                    Some(path) => format!("unix:{path}"),
                    None => self.resolve_listening(address, port),
                };
                self.report_listening(slot, from, &address)
            }
            ChannelEvent::Closed => {
                debug!(slot, pid = from, "worker {from} closed its channel");
                self.close_channel(slot, from);
            }
            ChannelEvent::Ready => {
                let signal = match self.config.ipc {
                    Ipc::Node => ReadySignal::NodeReady,
                    _ => ReadySignal::LibraryReady,
                };
                self.mark_ready(slot, from, signal);
            }
            ChannelEvent::Message(message) => {
                self.stats.counters.ipc_messages += 1;
                let bytes = message.bytes().len();
                debug!(slot, pid = from, bytes, "message from worker {from}");
                self.events.send(Event::Message {
                    slot,
                    pid: from,
                    message,
                });
            }
            ChannelEvent::Skipped(why) => {
                if let Some(WorkerIo { skipped, .. }) = self.slots[slot].io_mut(from) {
                    *skipped += 1;
                    if *skipped == 1 {
                        warn!(
                            slot,
                            pid = from,
                            "worker {from} sent an IPC message herd skipped ({why}); \
                             its channel stays open (further ones are counted, not logged)"
                        );
                    }
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Stop => self.on_stop_request("stop request"),
            Command::Send { slot, frame } => {
                let own = self.life.worker(slot).map(|w| w.pid);
                if let Some(WorkerIo {
                    channel: Some(tx), ..
                }) = own.and_then(|pid| self.slots.get(slot)?.io(pid))
                {
                    let _ = tx.send(Outgoing::Frame {
                        bytes: frame,
                        fd: None,
                    });
                }
            }
            Command::Workers(reply) => {
                let workers = self
                    .slots
                    .iter()
                    .enumerate()
                    .flat_map(|(slot, s)| s.workers.iter().map(move |io| (slot, io)))
                    .filter_map(|(slot, io)| {
                        let (_, _, w) = self.life.find(io.pid)?;
                        Some(WorkerInfo {
                            slot,
                            pid: io.pid,
                            ready: w.ready,
                            connected: io.channel.is_some(),
                            disconnecting: w.retire_kill_at.is_some(),
                            connections: self.rr.load(io.pid),
                        })
                    })
                    .collect();
                let _ = reply.send(workers);
            }
            Command::Disconnect { slot, pid } => self.disconnect(slot, pid),
            Command::Signal { slot, pid, signal } => {
                // A pid given: any live worker of the slot; else its own.
                let target = match pid {
                    Some(pid) => self.slots.get(slot).and_then(|s| s.io(pid)).map(|w| w.pid),
                    None => self.life.worker(slot).map(|w| w.pid),
                };
                if let Some(p) = target {
                    signal_worker(p, None, signal);
                }
            }
            Command::Worker { slot, reply } => {
                let _ = reply.send(self.link(slot));
            }
            Command::Fork { env, reply } => {
                let _ = reply.send(self.fork(env));
            }
            Command::Reload { reply } => self.request_reload(Some(reply), "reload request"),
            Command::Control(call) => self.on_call(call),
            Command::Scale { workers, reply } => {
                let size = if self.life.stopping() {
                    Err("the cluster is stopping".to_string())
                } else {
                    Ok(self.scale(workers))
                };
                let _ = reply.send(size);
            }
        }
    }

    /// Retires the worker in `slot` (if it is `pid`, when given): closes its
    /// channel, sends the stop signal, and SIGKILL at the stop timeout.
    fn disconnect(&mut self, slot: usize, only: Option<u32>) {
        let stop_signal = self.config.stop_signal;
        let node = self.config.ipc == Ipc::Node;
        let Some(pid) = self.life.retire(slot, only, Instant::now()) else {
            return;
        };
        info!(slot, pid, "disconnecting worker {pid}");
        self.ask_to_go(slot, pid, stop_signal, node);
    }

    /// Asks a retired worker to drain and exit: Node's own `disconnect`
    /// for a Node worker with a channel, else its channel closed and the
    /// stop signal.
    fn ask_to_go(&mut self, slot: usize, pid: u32, stop_signal: Signal, node: bool) {
        let seq = self.next_node_seq();
        let Some(WorkerIo { channel, .. }) = self.slots.get_mut(slot).and_then(|s| s.io_mut(pid))
        else {
            return;
        };
        match channel {
            Some(tx) if node => {
                // As Node's primary does: the worker closes its servers, lets
                // open connections finish, closes the channel and exits.
                let mut fields = serde_json::Map::new();
                fields.insert("act".into(), "disconnect".into());
                let _ = tx.send(Outgoing::Frame {
                    bytes: node::encode_cluster(fields, seq, false),
                    fd: None,
                });
                // One not ready yet may open its server after the
                // disconnect and live on: it serves nothing, so it is
                // stopped.
                if !self.life.find(pid).is_some_and(|(_, _, w)| w.ready) {
                    signal_worker(pid, None, stop_signal);
                }
            }
            _ => {
                self.close_channel(slot, pid);
                signal_worker(pid, None, stop_signal);
            }
        }
    }

    /// SIGTTIN / SIGTTOU: one worker more or fewer (gunicorn's and
    /// Einhorn's convention).
    fn scale_by(&mut self, delta: isize, why: &str) {
        if self.life.stopping() {
            info!("{why} received and ignored: the cluster is stopping");
            return;
        }
        let now = self.life.active();
        let n = now
            .saturating_add_signed(delta)
            .clamp(1, crate::config::MAX_WORKERS);
        if n == now {
            warn!("{why} received: already at {now} worker(s), the limit");
            return;
        }
        info!("{why} received: scaling from {now} to {n} workers");
        self.scale(n);
    }

    /// Scales to `n` workers: the lifecycle decides, the shell makes room
    /// for new slots and performs the rest. Returns the new size.
    fn scale(&mut self, n: usize) -> usize {
        let n = n.clamp(1, crate::config::MAX_WORKERS);
        let size = self.life.scale(n, Instant::now());
        while self.slots.len() < self.life.slots() {
            self.slots.push(Slot::new(Vec::new()));
        }
        self.perform();
        size
    }

    /// A new slot with `env` added to its workers' environment.
    fn fork(&mut self, env: Vec<(String, String)>) -> Result<WorkerLink, String> {
        let Some((slot, generation)) = self.life.add_slot(Instant::now()) else {
            return Err("the cluster is stopping".into());
        };
        let env = env
            .iter()
            .filter_map(|(k, v)| env_entry(k.as_ref(), v.as_ref()))
            .collect();
        self.slots.push(Slot::new(env));
        match self.try_spawn(slot, generation) {
            Ok(new) => {
                self.install(slot, new);
                Ok(self.link(slot).expect("just installed"))
            }
            Err(e) => {
                self.life.remove_last_slot();
                self.slots.pop();
                Err(e.to_string())
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let Exit {
            slot,
            pid,
            status,
            stderr,
            at,
            exec_errno,
        } = exit;
        let cgroup = match self.slots.get_mut(slot).and_then(|s| s.io_mut(pid)) {
            Some(WorkerIo { cgroup, notify, .. }) => {
                if let Some((reader, path)) = notify.take() {
                    reader.abort();
                    let _ = std::fs::remove_file(path);
                }
                cgroup.take()
            }
            None => None,
        };
        self.contain_remnants(pid, cgroup);
        // A dead worker holds no socket.
        self.release_sockets(pid, None);
        // Nothing more is handed to it; what it never took goes elsewhere.
        self.close_channel(slot, pid);
        self.requeue(pid);
        let now = Instant::now();
        let Some(i) = self
            .slots
            .get(slot)
            .and_then(|s| s.workers.iter().position(|w| w.pid == pid))
        else {
            debug!(slot, pid, "exit of a worker no longer tracked");
            return;
        };
        let io = self.slots[slot].workers.remove(i);
        io.status.send_replace(WorkerStatus::Dead {
            code: status.as_ref().ok().and_then(|s| s.code()),
            signal: status.as_ref().ok().and_then(|s| s.signal()),
        });
        let skipped = io.skipped;
        if skipped > 1 {
            info!(slot, pid, "worker {pid} had {skipped} IPC messages skipped");
        }
        let how = describe(&status);
        if !self.address_in_use_warned
            && !self.config.listen.is_empty()
            && probe::said_address_in_use(&stderr)
            && matches!(&status, Ok(s) if !s.success())
        {
            self.address_in_use_warned = true;
            warn!(
                slot,
                pid,
                "worker {pid} failed with \"address already in use\": it binds an address \
                 itself instead of taking herd's socket on {} (passed as fd 3.., LISTEN_FDS); \
                 {} (said once)",
                self.listen_summary(),
                self.socket_advice()
            );
        }
        let (role, generation) = self
            .life
            .find(pid)
            .map_or((Role::Current, 0), |(_, r, w)| (r, w.generation));
        let program = self
            .gens
            .get(&generation)
            .map_or(self.config.command.program.clone(), |g| {
                g.command.program.clone()
            });
        if role == Role::Incoming {
            // A replacement that failed: the reload's report, not the slot's.
            let how = match exec_errno {
                Some(errno) => exec_error(&program, errno).to_string(),
                None => how.clone(),
            };
            self.failed_replacements.push_back((pid, how, stderr));
            while self.failed_replacements.len() > 8 {
                self.failed_replacements.pop_front();
            }
        } else if role == Role::Current {
            // A drained worker's exit says nothing about the slot.
            self.slots[slot].last_exit = Some((how.clone(), stderr));
        }
        let succeeded = matches!(&status, Ok(s) if s.success());
        let was_stopping = self.life.stopping();
        let hung = self
            .life
            .find(pid)
            .is_some_and(|(_, _, w)| w.hung_kill_at.is_some());
        let facts = ExitFacts {
            at,
            succeeded,
            failed_by_itself: failed_by_itself(&status),
        };
        let Some(crate::lifecycle::Exited {
            uptime, retired, ..
        }) = self.life.exited(pid, facts, exec_errno.is_some(), now)
        else {
            debug!(slot, pid, "exit of a worker the lifecycle does not know");
            return;
        };
        if role == Role::Current && !was_stopping && !retired {
            let c = &mut self.stats.counters;
            if hung {
                c.restarts_watchdog += 1;
            } else if failed_by_itself(&status) || succeeded {
                c.restarts_crash += 1;
            } else {
                c.restarts_killed += 1;
            }
        }
        self.events.send(Event::Exited {
            slot,
            pid,
            code: status.as_ref().ok().and_then(|s| s.code()),
            signal: status.as_ref().ok().and_then(|s| s.signal()),
            exited_after_disconnect: retired,
        });
        if was_stopping {
            info!(slot, pid, "worker {pid} stopped ({how})");
        } else if role == Role::Incoming && !retired {
            warn!(
                slot,
                pid, "new worker {pid} died before it took over ({how})"
            );
        } else if let Some(errno) = exec_errno {
            let e = exec_error(&program, errno);
            error!(slot, "slot {slot}: {e}");
            if matches!(
                self.life.phase(),
                Phase::Stopping {
                    end: End::CannotRun,
                    ..
                }
            ) {
                // The command cannot run at all: an error, not a crash loop.
                self.fatal = Some(Error::Exec(e));
            } else {
                self.slots[slot].last_exit = Some((e.to_string(), Vec::new()));
            }
        } else if retired {
            // Node workers were sent Node's `disconnect`; others the stop signal.
            let asked = if self.config.ipc == Ipc::Node {
                "disconnect"
            } else {
                "it was asked to go"
            };
            info!(slot, pid, "worker {pid} exited after {asked} ({how})");
        } else if succeeded {
            info!(
                slot,
                pid,
                uptime_ms = uptime.as_millis() as u64,
                "worker {pid} exited ({how})"
            );
        } else {
            warn!(
                slot,
                pid,
                uptime_ms = uptime.as_millis() as u64,
                "worker {pid} died ({how})"
            );
        }
        self.perform();
    }

    /// What is left of an exited worker's process group (its children, and
    /// their children that stayed in the group, even with a scrubbed
    /// environment) gets the stop signal now and SIGKILL after the stop
    /// timeout: a worker is its whole process tree (systemd's
    /// KillMode=control-group), so nothing of it serves beside its
    /// replacement.
    fn contain_remnants(&mut self, pid: u32, cgroup: Option<std::path::PathBuf>) {
        let kill_at = match self.life.phase() {
            // Past the stop timeout: SIGKILL at once.
            Phase::Stopping { killed: true, .. } => Instant::now(),
            Phase::Stopping { kill_at, .. } => kill_at,
            Phase::Running => Instant::now() + self.config.stop_timeout,
        };
        let remnant = Remnant {
            pgid: pid,
            cgroup,
            kill_at,
            killed: false,
        };
        if !remnant.alive() {
            self.tell_guardian(-(pid as i32));
            remnant.forget();
            return;
        }
        info!(
            "worker {pid} exited but processes it started remain; sending them {}",
            signal_name(self.config.stop_signal.as_raw())
        );
        remnant.signal(self.config.stop_signal);
        // A stopped process acts on the stop signal only once continued.
        remnant.signal(Signal::CONT);
        self.remnants.push(remnant);
    }

    /// Reaps zombies that are not our workers: orphaned grandchildren
    /// reparented to us (we are a subreaper), or anything when we are PID 1.
    fn reap_strays(&mut self) {
        let mut ours: HashSet<u32> = self
            .slots
            .iter()
            .flat_map(|s| &s.workers)
            .map(|w| w.pid)
            .collect();
        if let Some(g) = self.guardian.as_ref().and_then(|g| g.child.id()) {
            ours.insert(g);
        }
        for pid in children_of_self() {
            if ours.contains(&pid) {
                continue;
            }
            let Some(p) = Pid::from_raw(pid as i32) else {
                continue;
            };
            if let Ok(Some((_, status))) =
                rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG)
            {
                debug!(pid, "reaped orphaned descendant ({status:?})");
            }
        }
        self.prune_remnants();
    }

    fn start_guardian(&mut self) {
        let cgroup = self.cgroups.as_ref().map(|c| c.root().to_path_buf());
        match sys::spawn_guardian(&self.marker, cgroup.as_deref()) {
            Ok((child, pipe)) => {
                let g = Guardian { child, pipe };
                for w in self.slots.iter().flat_map(|s| &s.workers) {
                    send_to_guardian(&g, w.pid as i32);
                }
                self.guardian = Some(g);
            }
            Err(e) => warn!("cannot start the orphan guardian: {e}"),
        }
    }

    fn tell_guardian(&self, message: i32) {
        if let Some(g) = &self.guardian {
            send_to_guardian(g, message);
        }
    }

    /// On a clean exit the guardian sweeps leftover descendants; wait briefly
    /// so that the sweep is done when herd's exit status is seen.
    async fn stop_guardian(&mut self) {
        if let Some(mut g) = self.guardian.take() {
            drop(g.pipe);
            let _ = tokio::time::timeout(Duration::from_secs(2), g.child.wait()).await;
        }
    }
}

async fn wait_guardian(guardian: &mut Option<Guardian>) -> std::io::Result<ExitStatus> {
    match guardian {
        Some(g) => g.child.wait().await,
        None => std::future::pending().await,
    }
}

fn send_to_guardian(g: &Guardian, message: i32) {
    // Non-blocking; a full pipe loses the message, and the environment sweep
    // still finds the processes.
    let _ = rustix::io::write(g.pipe.as_fd(), &message.to_ne_bytes());
}

/// Whether process group `pgid` has any member left.
fn group_alive(pgid: u32) -> bool {
    match Pid::from_raw(pgid as i32) {
        Some(p) => rustix::process::test_kill_process_group(p).is_ok(),
        None => false,
    }
}

/// Signals a worker: its process group, and the worker itself if it left
/// that group (only then: a handler already running must not get the signal
/// twice); for SIGKILL also everything in its cgroup.
fn signal_worker(pid: u32, cgroup: Option<&std::path::Path>, sig: Signal) {
    signal_group(pid, sig);
    if let Some(p) = Pid::from_raw(pid as i32) {
        if rustix::process::getpgid(Some(p)).is_ok_and(|g| g != p) {
            let _ = rustix::process::kill_process(p, sig);
        }
    }
    if let (Some(dir), Signal::KILL) = (cgroup, sig) {
        tree::kill(dir);
    }
}

fn signal_group(pid: u32, sig: Signal) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        // The group may be gone already (the worker exited); that is fine.
        let _ = rustix::process::kill_process_group(p, sig);
    }
}

/// The pids of this process's children, from /proc (every thread's list).
fn children_of_self() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
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
    out
}

/// Whether a worker's end was its own failure: a non-zero exit status, or a
/// signal a process raises on itself when it crashes (as opposed to SIGKILL
/// or SIGTERM from an OOM killer or an operator).
fn failed_by_itself(status: &std::io::Result<ExitStatus>) -> bool {
    match status {
        Ok(s) => {
            s.code().is_some_and(|c| c != 0)
                || s.signal().is_some_and(|sig| {
                    matches!(
                        sig,
                        libc::SIGSEGV
                            | libc::SIGBUS
                            | libc::SIGABRT
                            | libc::SIGILL
                            | libc::SIGFPE
                            | libc::SIGSYS
                            | libc::SIGTRAP
                    )
                })
        }
        Err(_) => false,
    }
}

/// Names what a failed `execve` of `program` means, in words.
fn exec_error(program: &std::path::Path, errno: i32) -> ExecError {
    let path = program.display().to_string();
    // The first line, for a script's interpreter.
    let head = std::fs::File::open(program).ok().and_then(|f| {
        use std::io::Read;
        let mut buf = [0u8; 256];
        let n = f.take(256).read(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    });
    let shebang = head
        .as_deref()
        .and_then(|h| h.strip_prefix(b"#!"))
        .map(|line| {
            let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
            String::from_utf8_lossy(line).into_owned()
        });
    let interpreter = shebang
        .as_deref()
        .and_then(|l| l.split([' ', '\t']).find(|t| !t.is_empty()))
        .map(str::to_string);
    let reason = match (errno, interpreter) {
        (libc::ENOENT, Some(interp)) if interp.ends_with('\r') => format!(
            "interpreter {:?} not found: its #! line ends in a carriage return (a file saved \
             with CRLF line endings)",
            interp
        ),
        (libc::ENOENT, Some(interp)) => format!("interpreter {interp} not found (its #! line)"),
        (libc::ENOEXEC, None) if shebang.is_some() => {
            "its #! line names no interpreter".to_string()
        }
        (libc::ENOENT, None) => "file not found".to_string(),
        (libc::EACCES, Some(interp)) => {
            format!("permission denied (the file or its interpreter {interp})")
        }
        (libc::ENOEXEC, _) => {
            "not an executable format: no #! line, and not a program for this machine".to_string()
        }
        (errno, _) => std::io::Error::from_raw_os_error(errno).to_string(),
    };
    ExecError {
        path,
        reason,
        errno,
    }
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by {}", signal_name(sig)),
            _ => format!("{s}"),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}
