//! The public face of a cluster: bind it, start it, talk to it, watch it.

use std::os::fd::OwnedFd;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{ClusterConfig, Ipc, Signal};
use crate::events::{EventSender, Events};
use crate::ipc::frame::{self, Codec, FrameError};
use crate::socket::Listeners;
use crate::supervisor::{Outgoing, Supervisor};
use crate::Error;

/// How a cluster ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped on request (SIGINT/SIGTERM or [`ClusterHandle::stop`]); every worker is gone.
    Stopped,
    /// Every worker exited and the restart policy replaced none.
    Finished {
        /// Whether every slot's last worker exited 0.
        all_succeeded: bool,
    },
    /// A slot hit the crash-loop limit under [`crate::CrashLoopAction::Exit`].
    CrashLoop {
        /// The slot that looped.
        slot: usize,
        /// How its last worker ended (`exit code 1`, `killed by SIGSEGV`).
        exit: String,
        /// The last lines that worker wrote to stderr (at most 10).
        stderr: Vec<String>,
    },
    /// No worker ever started successfully (none stayed up for
    /// [`ClusterConfig::min_uptime`] or said it was ready) and every slot hit
    /// the crash-loop limit: the cluster gave up (gunicorn's "worker failed
    /// to boot").
    BootFailed {
        /// The slot whose worker failed last.
        slot: usize,
        /// How its last worker ended (`exit code 1`, `killed by SIGSEGV`).
        exit: String,
        /// The last lines that worker wrote to stderr (at most 10).
        stderr: Vec<String>,
    },
}

/// Whether two listen specs would claim the same port: same transport,
/// same non-zero port, and the same host or a wildcard on either side.
fn overlap(a: &crate::ListenSpec, b: &crate::ListenSpec) -> bool {
    use crate::ListenAddress::{Tcp, Udp};
    let (x, y) = match (&a.address, &b.address) {
        (Tcp(x), Tcp(y)) | (Udp(x), Udp(y)) => (x, y),
        _ => return false,
    };
    let wildcard = |h: Option<std::net::IpAddr>| h.is_none_or(|ip| ip.is_unspecified());
    x.port != 0 && x.port == y.port && (wildcard(x.host) || wildcard(y.host) || x.host == y.host)
}

/// A cluster with its sockets bound. [`Cluster::run`] or [`Cluster::start`] drives it.
pub struct Cluster {
    config: ClusterConfig,
    listeners: Listeners,
}

impl Cluster {
    /// Binds the sockets. Nothing is spawned yet.
    pub fn bind(config: ClusterConfig) -> Result<Self, Error> {
        if config.balance == crate::Balance::RoundRobin && config.ipc == Ipc::None {
            return Err(Error::Config(
                "round-robin balancing hands connections to workers over an IPC channel: it needs \
                 Node workers (herd run: a node command, or --node-ipc on) or library workers \
                 (Ipc::Herd, Channel::accept)"
                    .into(),
            ));
        }
        for (i, spec) in config.listen.iter().enumerate() {
            // `:0` twice is two kernel-chosen ports; anything else twice
            // would make herd clash with itself ("address in use").
            let any_port = matches!(
                &spec.address,
                crate::ListenAddress::Tcp(a) | crate::ListenAddress::Udp(a) if a.port == 0
            );
            if !any_port && config.listen[..i].contains(spec) {
                return Err(Error::Config(format!(
                    "-l {spec} is given twice (each listen spec is bound once and shared by \
                     every worker)"
                )));
            }
            // `127.0.0.1:P` and `:P`: the kernel refuses the second, and
            // herd would report its own first socket as "in use".
            if let Some(other) = config.listen[..i].iter().find(|o| overlap(o, spec)) {
                return Err(Error::Config(format!(
                    "-l {spec} overlaps -l {other}: a wildcard address (:P, 0.0.0.0:P, [::]:P) \
                     includes every host on its port; give one of them"
                )));
            }
        }
        let inherited = if crate::activation::passed_to_us() {
            let passed = take_activated()?;
            if !config.socket_activation && !passed.is_empty() {
                return Err(Error::Bind(crate::BindError::Activation(format!(
                    "{} socket(s) were passed (LISTEN_FDS) but socket activation is off \
                     (--no-listen): they would sit unserved",
                    passed.len()
                ))));
            }
            passed
        } else {
            Vec::new()
        };
        let listeners =
            Listeners::bind_activated(&config.listen, config.balance, config.workers, inherited)?;
        Ok(Cluster { config, listeners })
    }

    /// The sockets as bound (with kernel-chosen ports filled in).
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// Starts the supervisor task on the current tokio runtime; returns a
    /// handle to it and the stream of [`Event`]s. The runtime's threads must
    /// live as long as the cluster: workers get `PR_SET_PDEATHSIG`, which
    /// fires when the *thread* that forked them exits, so a worker forked
    /// from a pool thread that tokio retires would be killed. A
    /// current-thread runtime on the main thread is the simplest.
    ///
    /// ```
    /// use herd::{Cluster, ClusterConfig, Event, Outcome, WorkerCommand};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let command = WorkerCommand::resolve(vec!["sh".into(), "-c".into(), "sleep 30".into()])?;
    /// let mut config = ClusterConfig::new(command);
    /// config.workers = 2;
    /// let (cluster, mut events) = Cluster::bind(config)?.start()?;
    /// let mut started = 0;
    /// while let Some(event) = events.recv().await {
    ///     if let Event::Spawned { slot, pid } = event {
    ///         println!("worker {pid} in slot {slot}");
    ///         started += 1;
    ///         if started == 2 {
    ///             break;
    ///         }
    ///     }
    /// }
    /// cluster.stop()?; // as SIGTERM would: stop signal, then SIGKILL after stop_timeout
    /// assert_eq!(cluster.wait().await?, Outcome::Stopped);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Events
    ///
    /// The event queue is bounded and the supervisor never waits on it: it
    /// holds at most [`ClusterConfig::event_queue`] events and
    /// [`ClusterConfig::event_queue_bytes`] bytes of message payload. A
    /// program that stops reading loses events, not memory: each event that
    /// does not fit is dropped and counted, and the next one that fits comes
    /// after an [`Event::Lagged`] carrying the count (a warning is logged
    /// too). Dropping the [`Events`] receiver stops event delivery entirely.
    pub fn start(self) -> Result<(ClusterHandle, Events), Error> {
        let (events_tx, events_rx) =
            EventSender::bounded(self.config.event_queue, self.config.event_queue_bytes);
        let handle = self.start_with(events_tx)?;
        Ok((handle, events_rx))
    }

    fn start_with(self, events: EventSender) -> Result<ClusterHandle, Error> {
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let ipc = self.config.ipc;
        let codec = self.config.codec;
        // Bound before any worker starts: a name in use fails the start.
        let control = match &self.config.control {
            Some(c) => Some(crate::control::bind(c, &self.config.command)?),
            None => None,
        };
        let metrics = match self.config.metrics {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|e| Error::Config(format!("--metrics {addr}: {e}")))?,
            ),
            None => None,
        };
        let servers = crate::supervisor::Servers {
            control,
            metrics,
            commands: commands_tx.clone(),
        };
        let supervisor = Supervisor::new(self, commands_rx, events, servers)?;
        let task = tokio::spawn(supervisor.run());
        Ok(ClusterHandle {
            commands: commands_tx,
            task,
            ipc,
            codec,
        })
    }

    /// Runs the cluster until it stops (SIGINT/SIGTERM, or every worker
    /// finished under the restart policy). No events are produced: nothing
    /// queues for a reader that does not exist.
    ///
    /// ```
    /// use herd::{Cluster, ClusterConfig, Outcome, RestartPolicy, WorkerCommand};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Three workers that each do a job and exit 0; none is restarted.
    /// let job = WorkerCommand::resolve(vec!["sh".into(), "-c".into(), "echo job $HERD_WORKER_ID".into()])?;
    /// let mut config = ClusterConfig::new(job);
    /// config.workers = 3;
    /// config.restart = RestartPolicy::OnFailure;
    /// let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// let outcome = runtime.block_on(Cluster::bind(config)?.run())?;
    /// assert_eq!(outcome, Outcome::Finished { all_succeeded: true });
    /// # Ok(())
    /// # }
    /// ```
    pub async fn run(self) -> Result<Outcome, Error> {
        self.start_with(EventSender::none())?.wait().await
    }

    pub(crate) fn into_parts(self) -> (ClusterConfig, Listeners) {
        (self.config, self.listeners)
    }
}

/// The sockets systemd passed this process, taken once per process (a
/// second cluster in the same process gets none: they are the first's).
fn take_activated() -> Result<Vec<crate::activation::InheritedSocket>, Error> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    crate::activation::take_listen_fds()
        .map_err(|e| Error::Config(format!("socket activation: {e}")))
}

/// Something that happened to a worker.
///
/// ```
/// use herd::{Cluster, ClusterConfig, Event, RestartPolicy, WorkerCommand};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let command = WorkerCommand::resolve(vec!["sh".into(), "-c".into(), "exit 3".into()])?;
/// let mut config = ClusterConfig::new(command);
/// config.workers = 1;
/// config.restart = RestartPolicy::Never;
/// let (cluster, mut events) = Cluster::bind(config)?.start()?;
/// while let Some(event) = events.recv().await {
///     match event {
///         Event::Spawned { slot, pid } => println!("worker {pid} started in slot {slot}"),
///         Event::Ready { pid, .. } => println!("worker {pid} is ready"),
///         Event::Message { pid, message, .. } => println!("worker {pid} says {message:?}"),
///         Event::Exited { pid, code, signal, .. } => {
///             println!("worker {pid} exited: code {code:?}, signal {signal:?}");
///             assert_eq!(code, Some(3));
///         }
///         Event::Lagged { dropped } => println!("{dropped} events dropped: read faster"),
///         _ => {}
///     }
/// }
/// // The queue ends when the cluster does (here: its only worker is done).
/// cluster.wait().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub enum Event {
    /// The event queue was full: this many events were dropped before the
    /// next one (see [`Cluster::start`]).
    Lagged {
        /// How many events were dropped.
        dropped: u64,
    },
    /// A worker process started in a slot (Node's `fork`).
    Spawned {
        /// The slot.
        slot: usize,
        /// The worker's pid.
        pid: u32,
    },
    /// The worker's program is up and talking (Node's `online`): it opened
    /// herd's channel ([`crate::worker::Channel::from_env`]), or a Node worker
    /// sent its first message. Workers without an IPC channel never report it.
    Online {
        /// The slot.
        slot: usize,
        /// The worker's pid.
        pid: u32,
    },
    /// The worker said it is ready (`Channel::ready()`, or Node's `process.send('ready')`).
    Ready {
        /// The slot.
        slot: usize,
        /// The worker's pid.
        pid: u32,
    },
    /// A reload ended (SIGHUP, [`ClusterHandle::reload`]).
    Reloaded(ReloadOutcome),
    /// The worker got a listening socket it asked for (`Channel::listen`).
    Listening {
        /// The slot.
        slot: usize,
        /// The worker's pid.
        pid: u32,
        /// The address as bound (a kernel-chosen port filled in).
        address: String,
    },
    /// The worker sent a message.
    Message {
        /// The slot.
        slot: usize,
        /// The worker's pid.
        pid: u32,
        /// The message; decode it with [`Message::decode`].
        message: Message,
    },
    /// The worker's IPC channel closed (Node's `disconnect`): the primary
    /// disconnected it, it broke the protocol, it closed its end, or it exited.
    /// Comes once per worker that had a channel, before its `Exited`.
    Disconnected {
        /// The slot.
        slot: usize,
        /// The worker's pid.
        pid: u32,
    },
    /// The worker exited (the slot may get a replacement).
    Exited {
        /// The slot.
        slot: usize,
        /// The worker's pid.
        pid: u32,
        /// Its exit code, if it exited.
        code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
        /// Whether it exited after [`ClusterHandle::disconnect`] (Node's
        /// `exitedAfterDisconnect`): such a worker is replaced at once and not
        /// counted as a failure.
        exited_after_disconnect: bool,
    },
}

/// A message from a worker, still serialized. Its `Debug` shows JSON as
/// text (`Message(json {"n":1})`) and postcard as its length, cut at 256
/// bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    codec: Codec,
    bytes: Vec<u8>,
}

impl Message {
    pub(crate) fn new(codec: Codec, bytes: Vec<u8>) -> Self {
        Message { codec, bytes }
    }

    /// Deserializes it as `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        frame::decode_payload(self.codec, &self.bytes)
    }

    /// The serialized bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How the bytes are encoded.
    pub fn codec(&self) -> Codec {
        self.codec
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 256;
        match self.codec {
            Codec::Json => {
                let text = String::from_utf8_lossy(&self.bytes[..self.bytes.len().min(SHOWN)]);
                let more = if self.bytes.len() > SHOWN { "…" } else { "" };
                write!(f, "Message(json {text}{more})")
            }
            Codec::Postcard => write!(f, "Message(postcard, {} bytes)", self.bytes.len()),
        }
    }
}

/// Requests to the supervisor. `pid: Some(p)` targets that worker only,
/// not whichever runs in the slot by the time the request is handled.
#[derive(Debug)]
pub(crate) enum Command {
    Stop,
    Send {
        slot: usize,
        frame: Vec<u8>,
    },
    Signal {
        slot: usize,
        pid: Option<u32>,
        signal: Signal,
    },
    Disconnect {
        slot: usize,
        pid: Option<u32>,
    },
    Workers(oneshot::Sender<Vec<WorkerInfo>>),
    Worker {
        slot: usize,
        reply: oneshot::Sender<Option<WorkerLink>>,
    },
    Fork {
        env: Vec<(String, String)>,
        reply: oneshot::Sender<Result<WorkerLink, String>>,
    },
    Scale {
        workers: usize,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    Reload {
        reply: oneshot::Sender<ReloadOutcome>,
    },
    /// From a control-socket client.
    Control(crate::control::Call),
}

/// How a rolling reload ended ([`ClusterHandle::reload`], SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Every slot runs a worker of the command as resolved for this reload,
    /// each ready before the one it replaced was asked to drain.
    Reloaded {
        /// The command generation now running (0 at start, one more per
        /// reload).
        generation: u64,
    },
    /// A new worker failed to start or to become ready in time: the reload
    /// stopped, the new workers were stopped, and every slot runs the
    /// previous command again (slots already replaced were reloaded back
    /// the same way).
    RolledBack {
        /// The slot whose new worker failed.
        slot: usize,
        /// That worker (`None`: it could not be spawned).
        pid: Option<u32>,
        /// What happened to it, in words.
        why: String,
        /// Its last lines of stderr.
        stderr: Vec<String>,
        /// How many slots had switched and went back.
        rolled_back: usize,
    },
    /// The command could not be resolved again (not found any more, a
    /// package script gone): nothing was changed.
    CannotResolve(String),
    /// The cluster began to stop first.
    Stopped,
}

impl ReloadOutcome {
    /// Whether every slot now runs the new command.
    pub fn succeeded(&self) -> bool {
        matches!(self, ReloadOutcome::Reloaded { .. })
    }
}

/// What the supervisor hands out for one worker: its channel's queue and its
/// status, both owned by the supervisor (the handle only sends and watches).
#[derive(Debug)]
pub(crate) struct WorkerLink {
    pub(crate) slot: usize,
    pub(crate) pid: u32,
    pub(crate) outbox: Option<mpsc::UnboundedSender<Outgoing>>,
    pub(crate) status: watch::Receiver<WorkerStatus>,
}

/// Where a worker stands, as its [`WorkerHandle`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStatus {
    /// Alive, with its IPC channel open.
    Connected,
    /// Alive, without a channel (none configured, or it was closed).
    Disconnected,
    /// Exited.
    Dead {
        /// Its exit code, if it exited.
        code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
    },
}

/// A live worker, as [`ClusterHandle::workers`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its slot.
    pub slot: usize,
    /// Its pid.
    pub pid: u32,
    /// Whether it said it is ready.
    pub ready: bool,
    /// Whether its IPC channel is open (false without one, or after a
    /// disconnect or a protocol error).
    pub connected: bool,
    /// Whether it is being disconnected.
    pub disconnecting: bool,
    /// Round-robin connections it holds: handed to it and not yet closed.
    pub connections: usize,
}

/// Why a request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The cluster has no IPC channel to its workers.
    #[error("the cluster has no IPC channel (set ClusterConfig::ipc)")]
    NoChannel,
    /// The worker's channel is closed (disconnected, or it exited).
    #[error("worker {0} is not connected")]
    NotConnected(u32),
    /// Descriptors travel only on herd's own channel.
    #[error("descriptors can only be sent over herd's channel (Ipc::Herd)")]
    NoFdPassing,
    /// A worker could not be started.
    #[error("cannot fork a worker: {0}")]
    Fork(String),
    /// The message could not be serialized.
    #[error(transparent)]
    Encode(#[from] FrameError),
    /// The supervisor has finished.
    #[error("the cluster has stopped")]
    Stopped,
}

/// Talks to a started cluster. Requests are queued; the supervisor acts on
/// them in order.
///
/// What it does: [`stop`](Self::stop), [`wait`](Self::wait),
/// [`send`](Self::send) to a slot, [`signal`](Self::signal) a slot,
/// [`disconnect`](Self::disconnect) (retire a worker gracefully; a fresh one
/// takes its slot), [`fork`](Self::fork) (a new slot), and
/// [`worker`](Self::worker) / [`workers`](Self::workers) to look at them.
///
/// ```
/// use herd::{Cluster, ClusterConfig, Event, Signal, WorkerCommand};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let command = WorkerCommand::resolve(vec!["sh".into(), "-c".into(), "sleep 30".into()])?;
/// let (cluster, mut events) = Cluster::bind(ClusterConfig::new(command))?.start()?;
/// while !matches!(events.recv().await, Some(Event::Spawned { slot: 1, .. })) {}
///
/// let before = cluster.workers().await?;
/// assert_eq!(before.len(), 2);
/// // Kill slot 0's worker from outside, as an OOM killer would: herd replaces it.
/// cluster.signal(0, Signal::KILL)?;
/// let replacement = loop {
///     if let Some(Event::Spawned { slot: 0, pid }) = events.recv().await {
///         break pid;
///     }
/// };
/// assert_ne!(replacement, before[0].pid);
/// // Retire slot 1's worker gracefully (stop signal); it is replaced too.
/// cluster.disconnect(1)?;
/// while !matches!(events.recv().await, Some(Event::Spawned { slot: 1, .. })) {}
/// cluster.stop()?;
/// cluster.wait().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ClusterHandle {
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<Result<Outcome, Error>>,
    ipc: Ipc,
    codec: Codec,
}

impl ClusterHandle {
    /// Stops the cluster gracefully, as SIGTERM would.
    pub fn stop(&self) -> Result<(), HandleError> {
        self.commands
            .send(Command::Stop)
            .map_err(|_| HandleError::Stopped)
    }

    /// Sends `message` to the worker in `slot`. It is dropped if the slot has
    /// no live worker with an open channel at that moment.
    ///
    /// This goes through the supervisor task. A program that sends a lot to
    /// one worker should hold its [`WorkerHandle`], which queues straight to
    /// the worker's channel.
    pub fn send<T: Serialize>(&self, slot: usize, message: &T) -> Result<(), HandleError> {
        let frame = encode_for(self.ipc, self.codec, message, false)?;
        self.commands
            .send(Command::Send { slot, frame })
            .map_err(|_| HandleError::Stopped)
    }

    /// The worker now in `slot`, if one is alive.
    pub async fn worker(&self, slot: usize) -> Result<Option<WorkerHandle>, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Worker { slot, reply })
            .map_err(|_| HandleError::Stopped)?;
        let link = rx.await.map_err(|_| HandleError::Stopped)?;
        Ok(link.map(|l| self.handle_for(l)))
    }

    /// Scales the cluster to `workers` workers (at least 1, at most
    /// 1024), as SIGTTIN and SIGTTOU do one at a time: new slots start at
    /// once; the highest slots' workers are asked to drain (stop signal, or
    /// Node's disconnect), SIGKILLed at the stop timeout, and not replaced.
    /// Returns the new size.
    ///
    /// ```
    /// use herd::{Cluster, ClusterConfig, Event, WorkerCommand};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let command = WorkerCommand::resolve(vec!["sh".into(), "-c".into(), "exec sleep 30".into()])?;
    /// let (cluster, mut events) = Cluster::bind(ClusterConfig::new(command))?.start()?;
    /// assert_eq!(cluster.scale(3).await?, 3);
    /// while !matches!(events.recv().await, Some(Event::Spawned { slot: 2, .. })) {}
    /// assert_eq!(cluster.scale(1).await?, 1);
    /// // Slots 1 and 2 drain away.
    /// let mut gone = 0;
    /// while gone < 2 {
    ///     if let Some(Event::Exited { .. }) = events.recv().await {
    ///         gone += 1;
    ///     }
    /// }
    /// assert_eq!(cluster.workers().await?.len(), 1);
    /// cluster.stop()?;
    /// cluster.wait().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn scale(&self, workers: usize) -> Result<usize, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Scale { workers, reply })
            .map_err(|_| HandleError::Stopped)?;
        // Refused only while stopping.
        rx.await
            .map_err(|_| HandleError::Stopped)?
            .map_err(|_| HandleError::Stopped)
    }

    /// Reloads the cluster with no connection lost, as SIGHUP does: the
    /// command is resolved again (a new binary, a moved `current ->
    /// releases/N` symlink, an edited package script are picked up), then
    /// slot by slot, `reload_surge` at a time, a new worker starts beside
    /// the old one, and only once it is ready (see `ClusterConfig::ready`)
    /// is the old one asked to drain. If a new worker fails to start or to
    /// become ready, the reload rolls back and the old command keeps
    /// serving. A reload asked for while one runs waits for it (requests
    /// meanwhile are one: coalesced) and resolves the command when it
    /// begins. Returns how it ended.
    pub async fn reload(&self) -> Result<ReloadOutcome, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Reload { reply })
            .map_err(|_| HandleError::Stopped)?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Adds a worker in a new slot, with `env` added to its environment
    /// (Node's `cluster.fork(env)`). The slot is supervised like the others:
    /// restarted by the policy, with the same environment. In reuseport mode
    /// slot `n` shares the socket of slot `n % workers`.
    pub async fn fork(&self, env: Vec<(String, String)>) -> Result<WorkerHandle, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Fork { env, reply })
            .map_err(|_| HandleError::Stopped)?;
        match rx.await.map_err(|_| HandleError::Stopped)? {
            Ok(link) => Ok(self.handle_for(link)),
            Err(why) => Err(HandleError::Fork(why)),
        }
    }

    fn handle_for(&self, link: WorkerLink) -> WorkerHandle {
        WorkerHandle {
            slot: link.slot,
            pid: link.pid,
            outbox: link.outbox,
            status: link.status,
            commands: self.commands.clone(),
            ipc: self.ipc,
            codec: self.codec,
        }
    }

    /// Retires the worker in `slot` gracefully (Node's `worker.disconnect()`):
    /// its IPC channel is closed and it gets the stop signal to drain (a Node
    /// worker is sent Node's own `disconnect` instead: it closes its servers
    /// and exits when its connections are done); SIGKILL after the stop
    /// timeout, and a fresh worker takes the slot when it exits.
    pub fn disconnect(&self, slot: usize) -> Result<(), HandleError> {
        self.commands
            .send(Command::Disconnect { slot, pid: None })
            .map_err(|_| HandleError::Stopped)
    }

    /// The live workers, by slot (a slot in backoff or done has none).
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, HandleError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::Workers(tx))
            .map_err(|_| HandleError::Stopped)?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Sends `signal` to the process group of the worker in `slot`.
    pub fn signal(&self, slot: usize, signal: Signal) -> Result<(), HandleError> {
        self.commands
            .send(Command::Signal {
                slot,
                pid: None,
                signal,
            })
            .map_err(|_| HandleError::Stopped)
    }

    /// Waits for the cluster to finish.
    pub async fn wait(self) -> Result<Outcome, Error> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(Error::Spawn(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Serializes `message` for the cluster's wire format.
fn encode_for<T: Serialize>(
    ipc: Ipc,
    codec: Codec,
    message: &T,
    has_fd: bool,
) -> Result<Vec<u8>, HandleError> {
    Ok(match ipc {
        Ipc::None => return Err(HandleError::NoChannel),
        Ipc::Herd => frame::encode(message, codec, has_fd)?,
        Ipc::Node if has_fd => return Err(HandleError::NoFdPassing),
        Ipc::Node => {
            let value =
                serde_json::to_value(message).map_err(|e| FrameError::Malformed(e.to_string()))?;
            crate::ipc::node::encode(&value)
        }
    })
}

/// One worker process (Node's `Worker`): talk to it, signal it, retire it,
/// watch it. It stays tied to that process: once it exits, sends fail and
/// [`WorkerHandle::is_dead`] is true, while a replacement in the same slot
/// has a handle of its own ([`ClusterHandle::worker`]).
///
/// Messages go straight to the worker's channel queue, not through the
/// supervisor task: this is the fast path.
///
/// ```
/// use herd::{Cluster, ClusterConfig, Signal, WorkerCommand, WorkerStatus};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let command = WorkerCommand::resolve(vec!["sh".into(), "-c".into(), "sleep 30".into()])?;
/// let mut config = ClusterConfig::new(command);
/// config.workers = 1;
/// let (cluster, _events) = Cluster::bind(config)?.start()?;
/// let worker = loop {
///     if let Some(w) = cluster.worker(0).await? {
///         break w;
///     }
///     tokio::task::yield_now().await;
/// };
/// println!("slot {} runs pid {}", worker.id(), worker.pid());
/// worker.kill(Signal::TERM)?;
/// let status = worker.exited().await;
/// let sigterm = Some(Signal::TERM.as_raw());
/// assert_eq!(status, WorkerStatus::Dead { code: None, signal: sigterm });
/// assert!(worker.is_dead());
/// cluster.stop()?;
/// cluster.wait().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    slot: usize,
    pid: u32,
    outbox: Option<mpsc::UnboundedSender<Outgoing>>,
    status: watch::Receiver<WorkerStatus>,
    commands: mpsc::UnboundedSender<Command>,
    ipc: Ipc,
    codec: Codec,
}

impl WorkerHandle {
    /// The worker's id as it sees it in [`crate::role`]: its slot.
    pub fn id(&self) -> usize {
        self.slot
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its status now.
    pub fn status(&self) -> WorkerStatus {
        *self.status.borrow()
    }

    /// Whether its IPC channel is open.
    pub fn is_connected(&self) -> bool {
        self.status() == WorkerStatus::Connected
    }

    /// Whether it has exited.
    pub fn is_dead(&self) -> bool {
        matches!(self.status(), WorkerStatus::Dead { .. })
    }

    /// Waits until it has exited; returns how.
    pub async fn exited(&self) -> WorkerStatus {
        let mut status = self.status.clone();
        let dead = status
            .wait_for(|s| matches!(s, WorkerStatus::Dead { .. }))
            .await
            .map(|s| *s);
        // Err: the supervisor is gone, and every worker with it.
        dead.unwrap_or(WorkerStatus::Dead {
            code: None,
            signal: None,
        })
    }

    /// Sends `message` to this worker.
    pub fn send<T: Serialize>(&self, message: &T) -> Result<(), HandleError> {
        let bytes = encode_for(self.ipc, self.codec, message, false)?;
        self.push(Outgoing::Frame { bytes, fd: None })
    }

    /// Sends `message` with a descriptor attached (a socket, a file, a pipe);
    /// the worker gets both from [`crate::worker::Channel::recv_with_fd`].
    /// Only over herd's channel.
    pub fn send_with_fd<T: Serialize>(&self, message: &T, fd: OwnedFd) -> Result<(), HandleError> {
        if self.ipc != Ipc::Herd {
            return Err(HandleError::NoFdPassing);
        }
        let bytes = encode_for(self.ipc, self.codec, message, true)?;
        self.push(Outgoing::Frame {
            bytes,
            fd: Some(std::sync::Arc::new(fd)),
        })
    }

    fn push(&self, outgoing: Outgoing) -> Result<(), HandleError> {
        let outbox = self.outbox.as_ref().ok_or(HandleError::NoChannel)?;
        if !self.is_connected() {
            return Err(HandleError::NotConnected(self.pid));
        }
        outbox
            .send(outgoing)
            .map_err(|_| HandleError::NotConnected(self.pid))
    }

    /// Sends `signal` to this worker's process group (if it is still alive).
    pub fn kill(&self, signal: Signal) -> Result<(), HandleError> {
        self.commands
            .send(Command::Signal {
                slot: self.slot,
                pid: Some(self.pid),
                signal,
            })
            .map_err(|_| HandleError::Stopped)
    }

    /// Retires this worker gracefully, as [`ClusterHandle::disconnect`] does.
    pub fn disconnect(&self) -> Result<(), HandleError> {
        self.commands
            .send(Command::Disconnect {
                slot: self.slot,
                pid: Some(self.pid),
            })
            .map_err(|_| HandleError::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WorkerCommand;
    use std::time::Duration;

    fn sh(script: &str) -> ClusterConfig {
        let cmd = WorkerCommand::resolve(vec!["sh".into(), "-c".into(), script.into()]).unwrap();
        let mut config = ClusterConfig::new(cmd);
        config.workers = 1;
        config.ipc = Ipc::Herd;
        config.stop_timeout = Duration::from_millis(300);
        config
    }

    async fn next(events: &mut crate::events::Events, pred: impl Fn(&Event) -> bool) -> Event {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let e = events.recv().await.expect("cluster ended early");
                if pred(&e) {
                    return e;
                }
            }
        })
        .await
        .expect("event within 10 s")
    }

    async fn disconnect_once(script: &str) -> (Option<i32>, Option<i32>) {
        // One cluster at a time in this process: a cluster reaps children of
        // its process that it does not know, another cluster's workers too.
        static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _serial = SERIAL.lock().await;
        let (handle, mut events) = Cluster::bind(sh(script)).unwrap().start().unwrap();
        let Event::Spawned { pid: first, .. } =
            next(&mut events, |e| matches!(e, Event::Spawned { .. })).await
        else {
            unreachable!()
        };
        tokio::time::sleep(Duration::from_millis(150)).await; // let sh install its trap
        let before = handle.workers().await.unwrap();
        assert_eq!(before.len(), 1);
        assert_eq!((before[0].slot, before[0].pid), (0, first));
        assert!(before[0].connected && !before[0].disconnecting && !before[0].ready);
        handle.disconnect(0).unwrap();
        let during = handle.workers().await.unwrap();
        if let Some(w) = during.iter().find(|w| w.pid == first) {
            assert!(!w.connected && w.disconnecting, "{w:?}");
        }
        let exited = next(&mut events, |e| matches!(e, Event::Exited { .. })).await;
        let Event::Exited {
            pid,
            code,
            signal,
            exited_after_disconnect,
            ..
        } = exited
        else {
            unreachable!()
        };
        assert_eq!(pid, first);
        assert!(exited_after_disconnect);
        let Event::Spawned { slot, pid: second } =
            next(&mut events, |e| matches!(e, Event::Spawned { .. })).await
        else {
            unreachable!()
        };
        assert_eq!(slot, 0);
        assert_ne!(second, first, "the slot gets a fresh worker");
        handle.stop().unwrap();
        assert_eq!(handle.wait().await.unwrap(), Outcome::Stopped);
        (code, signal)
    }

    #[test]
    fn message_debug_is_readable() {
        let m = Message::new(Codec::Json, br#"{"n":1}"#.to_vec());
        assert_eq!(format!("{m:?}"), r#"Message(json {"n":1})"#);
        let long = Message::new(Codec::Json, vec![b'1'; 1000]);
        assert!(format!("{long:?}").ends_with("1…)"));
        let p = Message::new(Codec::Postcard, vec![1, 2, 3]);
        assert_eq!(format!("{p:?}"), "Message(postcard, 3 bytes)");
    }

    #[tokio::test]
    async fn disconnect_drains_a_worker_and_refills_its_slot() {
        let (code, _) = disconnect_once("trap 'exit 0' TERM; while :; do sleep 0.05; done").await;
        assert_eq!(code, Some(0), "it exited on the stop signal, gracefully");
    }

    #[tokio::test]
    async fn disconnect_kills_a_worker_that_ignores_the_stop_signal() {
        let (_, signal) = disconnect_once("trap '' TERM; while :; do sleep 0.05; done").await;
        assert_eq!(signal, Some(libc::SIGKILL), "killed after the stop timeout");
    }
}
