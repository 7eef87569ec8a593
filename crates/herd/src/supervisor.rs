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

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tokio::io::AsyncReadExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::sleep_until;
use tracing::{debug, error, info, warn};

use crate::backoff::{Backoff, Intensity, Jitter};
use crate::cluster::{
    Cluster, Command, Event, Message, Outcome, WorkerInfo, WorkerLink, WorkerStatus,
};
use crate::config::Ipc;
use crate::config::{signal_name, ClusterConfig, CrashLoopAction, RestartPolicy};
use crate::ipc::frame::{Codec, FrameDecoder};
use crate::ipc::node::{self, ClusterMessage, NodeDecoder};
use crate::ipc::Control;
use crate::listen::{ListenAddress, ListenSpec, ListenSpecError};
use crate::output::{OutputSink, Stream};
use crate::round_robin::{client_hash, RoundRobin};
use crate::socket::Listeners;
use crate::spawn::{argv_cstrings, env_entry};
use crate::sys::{self, ExecPlan};
use crate::Error;

#[derive(Debug)]
enum SlotState {
    /// A worker is alive. `ready` once it said so (Node: `process.send('ready')`,
    /// herd's channel: a Ready control frame); `channel` feeds the writer task
    /// of its IPC channel, if it has one (dropping it closes the channel).
    Running {
        pid: u32,
        started: Instant,
        ready: bool,
        channel: Option<mpsc::UnboundedSender<Outgoing>>,
        /// What this worker's handles see; the supervisor is its only writer.
        status: watch::Sender<WorkerStatus>,
        /// Whether it reported `Online`.
        online: bool,
        /// The round-robin listeners a Node worker serves (its servers
        /// asked for them by `queryServer`): it takes their `newconn`s.
        rr_servers: Vec<usize>,
        /// Set by a disconnect: when the worker gets SIGKILL if still alive.
        disconnecting: Option<Instant>,
    },
    /// Waiting to restart (backoff); `failed` slots wait at the cap.
    Waiting { until: Instant },
    /// Not running and not coming back (restart policy, or stopping).
    Done { succeeded: bool },
}

struct Slot {
    state: SlotState,
    /// Environment added for this slot's workers (`ClusterHandle::fork`).
    env: Vec<CString>,
    backoff: Backoff,
    intensity: Intensity,
    failed: bool,
}

enum Phase {
    Running,
    Stopping { kill_at: Instant, outcome: Outcome },
}

struct Exit {
    slot: usize,
    pid: u32,
    status: std::io::Result<ExitStatus>,
}

/// A worker just spawned, before it is installed in its slot.
struct NewWorker {
    pid: u32,
    child: tokio::process::Child,
    /// Its channel's outgoing queue, if it has a channel.
    channel: Option<mpsc::UnboundedSender<Outgoing>>,
    /// Completes when its channel reader has passed on everything.
    reader: Option<oneshot::Receiver<()>>,
}

/// How long an exit waits for the channel reader to reach EOF.
const READER_GRACE: Duration = Duration::from_millis(500);

/// What a worker's IPC reader task reports.
#[derive(Debug)]
enum ChannelEvent {
    /// The worker's program opened its channel.
    Online,
    /// The worker said it is ready.
    Ready,
    /// An application message.
    Message(Message),
    /// The worker asks for a listening socket.
    Listen { seq: u64, spec: String },
    /// The worker took a round-robin connection.
    Taken { id: u64 },
    /// The worker closed this many round-robin connections.
    ConnsClosed(usize),
    /// A Node worker refused a round-robin connection (its server closed).
    Refused { id: u64 },
    /// A Node worker's `server.listen()`.
    NodeQuery(NodeQuery),
    /// A Node worker's server is listening on this address.
    NodeListening(String),
    /// The worker broke the protocol; its channel is closed.
    Malformed(String),
    /// The worker closed its end (or exited).
    Closed,
}

/// What a worker's writer task is given.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A frame, with a descriptor to pass along it, if any.
    /// The descriptor is shared: the writer passes it and drops its
    /// reference; the primary may keep one (a round-robin connection it
    /// holds until the worker takes it) without a dup.
    Frame {
        bytes: Vec<u8>,
        fd: Option<Arc<OwnedFd>>,
    },
    /// Close the channel once everything queued before is written. Sent by
    /// the supervisor only: handles hold senders too, so dropping the
    /// supervisor's would not end the writer.
    Close,
}

struct Guardian {
    child: tokio::process::Child,
    pipe: OwnedFd,
}

pub(crate) struct Supervisor {
    config: ClusterConfig,
    listeners: Listeners,
    slots: Vec<Slot>,
    phase: Phase,
    exits: JoinSet<Exit>,
    output: OutputSink,
    guardian: Option<Guardian>,
    marker: String,
    jitter: Jitter,
    base_env: Vec<CString>,
    argv: Vec<CString>,
    /// From the workers' reader tasks: what one read decoded, in order.
    channel_tx: mpsc::UnboundedSender<(usize, u32, Vec<ChannelEvent>)>,
    channel_rx: mpsc::UnboundedReceiver<(usize, u32, Vec<ChannelEvent>)>,
    /// Requests from the ClusterHandle.
    commands: mpsc::UnboundedReceiver<Command>,
    /// What the library user sees; sends never block, a dropped receiver is fine.
    events: mpsc::UnboundedSender<Event>,
    /// Sockets bound on a worker's request, with the spec text it sent.
    on_demand: Vec<(String, Listeners)>,
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
}

/// How a worker's request for a socket is answered.
enum SocketReply {
    /// With the socket itself.
    Socket { fd: OwnedFd, address: String },
    /// The primary accepts on it and hands connections over (`key` names
    /// the server to a Node worker).
    RoundRobin {
        key: String,
        address: String,
        sockname: Option<std::net::SocketAddr>,
        /// The listener's id (what `Accepted::listener` holds).
        listener: usize,
    },
}

/// A Node worker's `queryServer`.
#[derive(Debug)]
struct NodeQuery {
    seq: u64,
    address: Option<String>,
    port: Option<u16>,
    udp: bool,
    fd: Option<i32>,
}

/// The most queued channel events or commands handled per select round.
const BATCH: usize = 256;

impl Supervisor {
    pub(crate) fn new(
        cluster: Cluster,
        commands: mpsc::UnboundedReceiver<Command>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Self, Error> {
        let (config, listeners) = cluster.into_parts();
        // Orphaned grandchildren are reparented to us, so we can reap them.
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            warn!("cannot become child subreaper: {e}");
        }
        let output = OutputSink::start(config.log_format).map_err(Error::Spawn)?;
        let marker = format!("HERD_PRIMARY_PID={}", std::process::id());
        let base_env = std::env::vars_os()
            .filter(|(k, _)| {
                let k = k.as_bytes();
                !matches!(k, b"LISTEN_PID" | b"LISTEN_FDS" | b"LISTEN_FDNAMES")
                    && !k.starts_with(b"HERD_")
            })
            .filter_map(|(k, v)| env_entry(&k, &v))
            .collect();
        let argv = argv_cstrings(&config.command);
        let slots = (0..config.workers)
            .map(|_| Slot {
                state: SlotState::Done { succeeded: true },
                env: Vec::new(),
                backoff: Backoff::new(config.backoff),
                intensity: Intensity::new(config.max_restarts, config.within),
                failed: false,
            })
            .collect();
        let (channel_tx, channel_rx) = mpsc::unbounded_channel();
        let (accepted_tx, accepted_rx) = mpsc::unbounded_channel();
        let config_picker = config.picker;
        Ok(Supervisor {
            config,
            listeners,
            slots,
            phase: Phase::Running,
            exits: JoinSet::new(),
            output,
            guardian: None,
            marker,
            jitter: Jitter::from_entropy(),
            base_env,
            argv,
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
        })
    }

    pub(crate) async fn run(mut self) -> Result<Outcome, Error> {
        let sig = |kind| signal(kind).map_err(Error::Signals);
        let mut sigint = sig(SignalKind::interrupt())?;
        let mut sigterm = sig(SignalKind::terminate())?;
        let mut sigchld = sig(SignalKind::child())?;
        let mut sighup = sig(SignalKind::hangup())?;

        self.start_guardian();
        self.start_acceptors()?;
        info!(
            command = %self.config.command.display(),
            workers = self.config.workers,
            balance = %self.config.balance,
            "starting"
        );
        for spec in self.listeners.specs() {
            info!("listening on {spec}");
        }
        for slot in 0..self.slots.len() {
            self.spawn(slot);
        }

        loop {
            if let Some(outcome) = self.finished() {
                self.stop_guardian().await;
                return Ok(outcome);
            }
            let deadline = self.next_deadline();
            tokio::select! {
                _ = sigint.recv() => self.on_stop_request("SIGINT"),
                _ = sigterm.recv() => self.on_stop_request("SIGTERM"),
                _ = sighup.recv() => info!("SIGHUP received; reload is not supported yet, ignoring"),
                _ = sigchld.recv() => self.reap_strays(),
                Some((slot, pid, batch)) = self.channel_rx.recv() => {
                    self.on_channel_events(slot, pid, batch);
                    // Take what else is queued before going round the select
                    // again: a burst of messages costs one wakeup, not one each.
                    for _ in 0..BATCH {
                        let Ok((slot, pid, batch)) = self.channel_rx.try_recv() else { break };
                        self.on_channel_events(slot, pid, batch);
                    }
                }
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
                        // The reader queued the worker's last messages before
                        // the exit was reported: handle them first.
                        while let Ok((slot, pid, batch)) = self.channel_rx.try_recv() {
                            self.on_channel_events(slot, pid, batch);
                        }
                        self.on_exit(exit)
                    }
                    Err(e) => error!("worker watcher failed: {e}"),
                },
                status = wait_guardian(&mut self.guardian) => {
                    warn!("orphan guardian exited ({status:?}); starting a new one");
                    self.guardian = None;
                    self.start_guardian();
                }
                _ = sleep_until(deadline.unwrap_or_else(far_future).into()), if deadline.is_some() => {
                    self.on_timer(Instant::now());
                }
            }
        }
    }

    /// The cluster's result once nothing runs and nothing will.
    fn finished(&self) -> Option<Outcome> {
        let all_done = self
            .slots
            .iter()
            .all(|s| matches!(s.state, SlotState::Done { .. }));
        if !all_done {
            return None;
        }
        Some(match &self.phase {
            Phase::Stopping { outcome, .. } => outcome.clone(),
            Phase::Running => Outcome::Finished {
                all_succeeded: self
                    .slots
                    .iter()
                    .all(|s| matches!(s.state, SlotState::Done { succeeded: true })),
            },
        })
    }

    fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Stopping { kill_at, .. } => Some(*kill_at),
            Phase::Running => self
                .slots
                .iter()
                .filter_map(|s| match s.state {
                    SlotState::Waiting { until } => Some(until),
                    SlotState::Running {
                        disconnecting: Some(kill_at),
                        ..
                    } => Some(kill_at),
                    _ => None,
                })
                .min(),
        }
    }

    fn on_timer(&mut self, now: Instant) {
        match &self.phase {
            Phase::Stopping { kill_at, .. } if now >= *kill_at => {
                warn!(
                    "stop timeout ({:?}) expired; killing remaining workers",
                    self.config.stop_timeout
                );
                self.signal_all(Signal::KILL);
                // Nothing more to wait for but their exits.
                self.phase_kill_at(far_future());
            }
            Phase::Stopping { .. } => {}
            Phase::Running => {
                let due: Vec<usize> = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter(
                        |(_, s)| matches!(s.state, SlotState::Waiting { until } if until <= now),
                    )
                    .map(|(i, _)| i)
                    .collect();
                for slot in due {
                    self.spawn(slot);
                }
                for s in &mut self.slots {
                    if let SlotState::Running {
                        pid,
                        disconnecting: disconnecting @ Some(_),
                        ..
                    } = &mut s.state
                    {
                        if disconnecting.is_some_and(|at| at <= now) {
                            warn!(
                                pid = *pid,
                                "worker {pid} did not exit after disconnect; killing it"
                            );
                            signal_group(*pid, Signal::KILL);
                            *disconnecting = Some(far_future());
                        }
                    }
                }
            }
        }
    }

    fn phase_kill_at(&mut self, at: Instant) {
        if let Phase::Stopping { kill_at, .. } = &mut self.phase {
            *kill_at = at;
        }
    }

    fn on_stop_request(&mut self, name: &str) {
        match self.phase {
            Phase::Running => {
                info!(
                    "{name} received; stopping workers with {} (timeout {:?})",
                    signal_name(self.config.stop_signal.as_raw()),
                    self.config.stop_timeout
                );
                self.begin_stop(Outcome::Stopped);
            }
            Phase::Stopping { .. } => {
                warn!("{name} received again; killing workers now");
                self.signal_all(Signal::KILL);
                self.phase_kill_at(far_future());
            }
        }
    }

    fn begin_stop(&mut self, outcome: Outcome) {
        self.phase = Phase::Stopping {
            kill_at: Instant::now() + self.config.stop_timeout,
            outcome,
        };
        for slot in &mut self.slots {
            if let SlotState::Waiting { .. } = slot.state {
                slot.state = SlotState::Done { succeeded: true };
            }
        }
        self.signal_all(self.config.stop_signal);
    }

    /// Signals every live worker's process group.
    fn signal_all(&self, sig: Signal) {
        for slot in &self.slots {
            if let SlotState::Running { pid, .. } = slot.state {
                signal_group(pid, sig);
            }
        }
    }

    fn spawn(&mut self, slot: usize) {
        match self.try_spawn(slot) {
            Ok(new) => self.install(slot, new),
            Err(e) => {
                error!(slot, "cannot spawn a worker for slot {slot}: {e}");
                let now = Instant::now();
                self.schedule_restart(slot, Duration::ZERO, now);
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
        } = new;
        info!(slot, pid, "worker {pid} spawned in slot {slot}");
        let _ = self.events.send(Event::Spawned { slot, pid });
        let (status, _) = watch::channel(if channel.is_some() {
            WorkerStatus::Connected
        } else {
            WorkerStatus::Disconnected
        });
        self.slots[slot].state = SlotState::Running {
            pid,
            started: Instant::now(),
            ready: false,
            channel,
            status,
            online: false,
            rr_servers: Vec::new(),
            disconnecting: None,
        };
        self.tell_guardian(pid as i32);
        self.exits.spawn(async move {
            let mut child = child;
            let status = child.wait().await;
            // Report the exit only once the channel reader has passed on
            // everything the worker sent before it died (a result written
            // just before exit must not be lost). The bound covers a
            // descendant that kept the channel open.
            if let Some(reader) = reader {
                let _ = tokio::time::timeout(READER_GRACE, reader).await;
            }
            Exit { slot, pid, status }
        });
    }

    /// A handle's view of the worker in `slot`, if one is alive.
    fn link(&self, slot: usize) -> Option<WorkerLink> {
        match &self.slots.get(slot)?.state {
            SlotState::Running {
                pid,
                channel,
                status,
                ..
            } => Some(WorkerLink {
                slot,
                pid: *pid,
                outbox: channel.clone(),
                status: status.subscribe(),
            }),
            _ => None,
        }
    }

    /// Closes the channel of the worker in `slot` if it is `pid` and has one
    /// open: everything queued is still written, then the worker reads EOF.
    fn close_channel(&mut self, slot: usize, pid: u32) {
        let SlotState::Running {
            pid: p,
            channel,
            status,
            ..
        } = &mut self.slots[slot].state
        else {
            return;
        };
        if *p != pid {
            return;
        }
        if let Some(tx) = channel.take() {
            let _ = tx.send(Outgoing::Close);
            status.send_replace(WorkerStatus::Disconnected);
            let _ = self.events.send(Event::Disconnected { slot, pid });
        }
        // Connections it was handed and has not taken stay its own until it
        // exits: it reads every frame queued before the close and may still
        // take them (its acks are still heard).
    }

    fn try_spawn(&mut self, slot: usize) -> std::io::Result<NewWorker> {
        let mut fds = self.listeners.fds_for_slot(slot);
        let mut env = self.base_env.clone();
        env.extend(self.slots[slot].env.iter().cloned());
        self.node_ids += 1;
        let node_id = self.node_ids;
        let mut add = |k: &str, v: &str| env.extend(env_entry(k.as_ref(), v.as_ref()));
        add("HERD_WORKER_ID", &slot.to_string());
        add("HERD_WORKERS", &self.config.workers.to_string());
        add("HERD_PRIMARY_PID", &std::process::id().to_string());
        add(
            "HERD_STOP_SIGNAL",
            &self.config.stop_signal.as_raw().to_string(),
        );
        if !fds.is_empty() {
            add("LISTEN_FDS", &fds.len().to_string());
            add("LISTEN_FDNAMES", &self.listeners.fd_names());
        }
        // The IPC channel goes right after the sockets.
        let channel_fd = (sys::LISTEN_FDS_START as usize + fds.len()).to_string();
        let ipc = match self.config.ipc {
            Ipc::None => None,
            Ipc::Node => {
                add("NODE_CHANNEL_FD", &channel_fd);
                add("NODE_CHANNEL_SERIALIZATION_MODE", "json");
                // Node's cluster worker mode: `server.listen()` asks herd for
                // its socket, as it would ask Node's primary.
                if self.config.command.runs_node_script() {
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
        let plan = ExecPlan::new(&self.config.command.program, self.argv.clone(), env, fds)?;
        let mut cmd = tokio::process::Command::new(&self.config.command.program);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        plan.install(cmd.as_std_mut());
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        if let Some(out) = child.stdout.take() {
            let sink = self.output.clone();
            tokio::spawn(sink.forward(out, Stream::Stdout, slot, pid));
        }
        if let Some(err) = child.stderr.take() {
            let sink = self.output.clone();
            tokio::spawn(sink.forward(err, Stream::Stderr, slot, pid));
        }
        let mut reader = None;
        let channel = match ipc {
            Some((ours, theirs)) => {
                drop(theirs); // the worker has its copy now
                ours.set_nonblocking(true)?;
                let (read, write) = tokio::net::UnixStream::from_std(ours)?.into_split();
                let tx = self.channel_tx.clone();
                let (done, reader_done) = oneshot::channel();
                reader = Some(reader_done);
                if self.config.ipc == Ipc::Node {
                    tokio::spawn(read_channel::<NodeDecoder>(read, slot, pid, tx, done));
                } else {
                    tokio::spawn(read_channel::<FrameDecoder>(read, slot, pid, tx, done));
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
        })
    }

    fn on_channel_events(&mut self, slot: usize, from: u32, batch: Vec<ChannelEvent>) {
        for event in batch {
            self.on_channel_event(slot, from, event);
        }
    }

    fn on_channel_event(&mut self, slot: usize, from: u32, event: ChannelEvent) {
        let SlotState::Running {
            pid,
            ready,
            channel,
            online,
            ..
        } = &mut self.slots[slot].state
        else {
            return;
        };
        if *pid != from {
            return; // from a worker since replaced
        }
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
            let _ = self.events.send(Event::Online { slot, pid: from });
        }
        match event {
            ChannelEvent::Online => {}
            ChannelEvent::Listen { seq, spec } => self.on_listen(slot, from, seq, &spec),
            ChannelEvent::Taken { id } => self.on_taken(from, id),
            ChannelEvent::ConnsClosed(n) => self.rr.closed(from, n),
            ChannelEvent::Refused { id } => {
                if let Some(listener) = self.rr.refuse(id, from) {
                    // Its server for that listener closed: no more from it.
                    if let SlotState::Running { rr_servers, .. } = &mut self.slots[slot].state {
                        rr_servers.retain(|l| *l != listener);
                    }
                    self.dispatch();
                }
            }
            ChannelEvent::NodeQuery(query) => self.on_node_query(slot, from, query),
            ChannelEvent::NodeListening(address) => {
                let address = self.resolve_listening(address);
                self.report_listening(slot, from, &address)
            }
            ChannelEvent::Closed => {
                debug!(slot, pid = from, "worker {from} closed its channel");
                self.close_channel(slot, from);
            }
            ChannelEvent::Ready => {
                if !*ready {
                    *ready = true;
                    info!(slot, pid = from, "worker {from} ready");
                    let _ = self.events.send(Event::Ready { slot, pid: from });
                }
                self.dispatch();
            }
            ChannelEvent::Message(message) => {
                let bytes = message.bytes().len();
                debug!(slot, pid = from, bytes, "message from worker {from}");
                let _ = self.events.send(Event::Message {
                    slot,
                    pid: from,
                    message,
                });
            }
            ChannelEvent::Malformed(why) => {
                warn!(
                    slot,
                    pid = from,
                    "worker {from} broke the IPC protocol ({why}); channel closed"
                );
                self.close_channel(slot, from);
            }
        }
    }

    /// A herd worker asks for a listening socket (`Channel::listen`).
    fn on_listen(&mut self, slot: usize, from: u32, seq: u64, spec: &str) {
        let Some(tx) = self.channel_of(slot, from) else {
            return;
        };
        let reply = match self.socket_for(slot, spec, false) {
            Ok(SocketReply::Socket { fd, address }) => {
                self.report_listening(slot, from, &address);
                Outgoing::Frame {
                    bytes: encode_control(&Control::Listening { seq, address }, true),
                    fd: Some(Arc::new(fd)),
                }
            }
            Ok(SocketReply::RoundRobin { address, .. }) => {
                let error = format!(
                    "{address} is balanced round-robin by the primary: take its connections \
                     with Channel::accept"
                );
                Outgoing::Frame {
                    bytes: encode_control(&Control::ListenFailed { seq, error }, false),
                    fd: None,
                }
            }
            Err((error, _)) => {
                warn!(
                    slot,
                    pid = from,
                    "worker {from} cannot listen on {spec}: {error}"
                );
                Outgoing::Frame {
                    bytes: encode_control(&Control::ListenFailed { seq, error }, false),
                    fd: None,
                }
            }
        };
        let _ = tx.send(reply);
    }

    /// A Node worker's `server.listen()` (Node's `queryServer`), answered as
    /// Node's primary would: with the socket (shared and reuseport modes), or
    /// as a round-robin server to which connections are handed (`newconn`).
    fn on_node_query(&mut self, slot: usize, from: u32, query: NodeQuery) {
        let Some(tx) = self.channel_of(slot, from) else {
            return;
        };
        let seq = query.seq;
        let answer = match self.node_spec(slot, &query) {
            Ok(spec) => self.socket_for(slot, &spec, true),
            Err(e) => Err(e),
        };
        let mut fields = serde_json::Map::new();
        fields.insert("ack".into(), seq.into());
        fields.insert("data".into(), serde_json::Value::Null);
        let reply = match answer {
            Ok(SocketReply::Socket { fd, address }) => {
                debug!(
                    slot,
                    pid = from,
                    "node worker {from} gets the socket of {address}"
                );
                fields.insert("key".into(), address.into());
                fields.insert("errno".into(), serde_json::Value::Null);
                Outgoing::Frame {
                    bytes: node::encode_cluster(fields, self.next_node_seq(), true),
                    fd: Some(Arc::new(fd)),
                }
            }
            Ok(SocketReply::RoundRobin {
                key,
                address,
                sockname,
                listener,
            }) => {
                debug!(
                    slot,
                    pid = from,
                    "node worker {from} serves {address} round-robin"
                );
                if let SlotState::Running { rr_servers, .. } = &mut self.slots[slot].state {
                    if !rr_servers.contains(&listener) {
                        rr_servers.push(listener);
                    }
                }
                fields.insert("key".into(), key.into());
                fields.insert("errno".into(), serde_json::Value::Null);
                if let Some(addr) = sockname {
                    fields.insert(
                        "sockname".into(),
                        serde_json::json!({
                            "address": addr.ip().to_string(),
                            "family": if addr.is_ipv4() { "IPv4" } else { "IPv6" },
                            "port": addr.port(),
                        }),
                    );
                }
                Outgoing::Frame {
                    bytes: node::encode_cluster(fields, self.next_node_seq(), false),
                    fd: None,
                }
            }
            Err((error, errno)) => {
                warn!(
                    slot,
                    pid = from,
                    "node worker {from} cannot listen: {error}"
                );
                fields.insert("key".into(), "".into());
                fields.insert("errno".into(), (-errno).into());
                Outgoing::Frame {
                    bytes: node::encode_cluster(fields, self.next_node_seq(), false),
                    fd: None,
                }
            }
        };
        let _ = tx.send(reply);
        if self.config.balance == crate::Balance::RoundRobin {
            self.dispatch();
        }
    }

    /// The listen spec a Node `queryServer` stands for. `listen({fd: N})`
    /// names the N-3rd socket herd handed the worker; `listen(port)` with no
    /// host is the configured spec with that port, whatever its host, since
    /// herd's `-l` decides where to listen.
    fn node_spec(&self, slot: usize, q: &NodeQuery) -> Result<String, (String, i32)> {
        if let Some(fd) = q.fd {
            let handed = self.listeners.sockets_for_slot(slot).len();
            let index = (fd as usize).checked_sub(sys::LISTEN_FDS_START as usize);
            let configured: Vec<usize> = (0..self.listeners.specs().len())
                .filter(|i| !self.listeners.primary_accepts(*i))
                .collect();
            return match index.filter(|i| *i < handed) {
                Some(i) => Ok(self.listeners.specs()[configured[i]].to_string()),
                None => Err((format!("fd {fd} is not a socket herd passed"), libc::EBADF)),
            };
        }
        let port = q.port.unwrap_or(0);
        if q.address.is_none() && port != 0 {
            if let Some(spec) = self.listeners.specs().iter().find(|s| match &s.address {
                ListenAddress::Tcp(a) => !q.udp && a.port == port,
                ListenAddress::Udp(a) => q.udp && a.port == port,
                ListenAddress::Unix(_) => false,
            }) {
                return Ok(spec.to_string());
            }
        }
        let host = match q.address.as_deref() {
            None => String::new(),
            Some(h) if h.contains(':') => format!("[{h}]"),
            Some(h) => h.to_string(),
        };
        Ok(format!("{}{host}:{port}", if q.udp { "udp:" } else { "" }))
    }

    fn next_node_seq(&mut self) -> u64 {
        self.node_seq += 1;
        self.node_seq
    }

    /// The channel of worker `pid` in `slot`, if it is still that slot's and open.
    fn channel_of(&self, slot: usize, pid: u32) -> Option<mpsc::UnboundedSender<Outgoing>> {
        match &self.slots[slot].state {
            SlotState::Running {
                pid: p,
                channel: Some(tx),
                ..
            } if *p == pid => Some(tx.clone()),
            _ => None,
        }
    }

    /// A Node worker reports `:PORT` for a server that asked for no host:
    /// name the socket herd gave it instead.
    fn resolve_listening(&self, address: String) -> String {
        let Some(port) = address
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
        else {
            return address;
        };
        let ours = self
            .listeners
            .specs()
            .iter()
            .chain(self.on_demand.iter().map(|(_, l)| &l.specs()[0]))
            .find(|s| matches!(&s.address, ListenAddress::Tcp(a) if a.port == port));
        ours.map_or(address, |s| s.to_string())
    }

    fn report_listening(&self, slot: usize, pid: u32, address: &str) {
        info!(slot, pid, "worker {pid} listening on {address}");
        let _ = self.events.send(Event::Listening {
            slot,
            pid,
            address: address.to_string(),
        });
    }

    /// The socket for listen spec `text` as slot `slot` gets it: one the
    /// cluster was configured with, or one bound on an earlier request for
    /// the same address, or a new one (bound once and kept). `round_robin`:
    /// the asker can serve connections handed over one by one (a Node
    /// worker); otherwise a new socket under round-robin balance is shared.
    fn socket_for(
        &mut self,
        slot: usize,
        text: &str,
        round_robin: bool,
    ) -> Result<SocketReply, (String, i32)> {
        let spec: ListenSpec = text
            .parse()
            .map_err(|e: ListenSpecError| (e.to_string(), libc::EINVAL))?;
        // Asked as configured (`:0` too), or by the address it was bound to
        // (the port the kernel chose for an earlier `:0`).
        let configured = self
            .config
            .listen
            .iter()
            .position(|s| *s == spec)
            .or_else(|| {
                self.listeners
                    .specs()
                    .iter()
                    .position(|s| s.address == spec.address)
            });
        let earlier = self
            .on_demand
            .iter()
            .position(|(t, l)| t == text || l.specs()[0].address == spec.address);
        let (id, listeners, index) = match (configured, earlier) {
            (Some(i), _) => (i, &self.listeners, i),
            (None, Some(k)) => (self.listeners.specs().len() + k, &self.on_demand[k].1, 0),
            (None, None) => {
                let balance = match self.config.balance {
                    crate::Balance::RoundRobin if !round_robin => crate::Balance::Shared,
                    other => other,
                };
                let bound = Listeners::bind(&[spec], balance, self.slots.len())
                    .map_err(|e| (e.to_string(), e.errno()))?;
                let id = self.listeners.specs().len() + self.on_demand.len();
                if bound.primary_accepts(0) {
                    self.start_acceptor(id, bound.specs()[0].to_string(), bound.socket(0, 0))
                        .map_err(|e| (e.to_string(), libc::EMFILE))?;
                }
                self.on_demand.push((text.to_string(), bound));
                let k = self.on_demand.len() - 1;
                (id, &self.on_demand[k].1, 0)
            }
        };
        let address = listeners.specs()[index].to_string();
        if listeners.primary_accepts(index) {
            if !round_robin {
                return Ok(SocketReply::RoundRobin {
                    key: address.clone(),
                    address,
                    sockname: None,
                    listener: id,
                });
            }
            let sockname = match &listeners.specs()[index].address {
                ListenAddress::Tcp(a) => Some(a.socket_addr()),
                _ => None,
            };
            debug!(listener = id, "round-robin listener {address}");
            return Ok(SocketReply::RoundRobin {
                key: self.rr_keys[id].clone(),
                address,
                sockname,
                listener: id,
            });
        }
        let fd = rustix::io::fcntl_dupfd_cloexec(listeners.socket(index, slot), 0)
            .map_err(|e| (e.to_string(), e.raw_os_error()))?;
        Ok(SocketReply::Socket { fd, address })
    }

    /// Starts one acceptor task per round-robin socket of the configuration.
    fn start_acceptors(&mut self) -> Result<(), Error> {
        let sockets: Vec<(usize, String, OwnedFd)> = self
            .listeners
            .primary_sockets()
            .into_iter()
            .map(|(i, spec, fd)| {
                rustix::io::fcntl_dupfd_cloexec(fd, 0).map(|fd| (i, spec.to_string(), fd))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Spawn(e.into()))?;
        self.rr_keys = self
            .listeners
            .specs()
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (id, spec, fd) in sockets {
            self.start_acceptor(id, spec, fd.as_fd())
                .map_err(Error::Spawn)?;
        }
        Ok(())
    }

    /// An acceptor task for round-robin listener `id`: it only accepts and
    /// forwards; which worker gets a connection is the supervisor's decision.
    fn start_acceptor(
        &mut self,
        id: usize,
        spec: String,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> std::io::Result<()> {
        use rustix::net::{acceptfrom_with, SocketAddrAny, SocketFlags};
        let fd = rustix::io::fcntl_dupfd_cloexec(fd, 0)?;
        rustix::io::ioctl_fionbio(&fd, true)?;
        // Raw accept4 on the socket: a connection that is only passed on is
        // never registered with this runtime's epoll (tokio's accept would
        // add and remove it: two syscalls per connection for nothing).
        let listener = sys::register_async(fd, tokio::io::Interest::READABLE)?;
        if self.rr_keys.len() <= id {
            self.rr_keys.resize(id + 1, String::new());
        }
        self.rr_keys[id] = spec.clone();
        let tx = self.accepted_tx.clone();
        info!("round-robin: the primary accepts on {spec}");
        tokio::spawn(async move {
            loop {
                let Ok(mut ready) = listener.readable().await else {
                    return;
                };
                let got = ready.try_io(|fd| {
                    acceptfrom_with(fd.get_ref(), SocketFlags::CLOEXEC)
                        .map_err(std::io::Error::from)
                });
                match got {
                    Ok(Ok((conn, peer))) => {
                        let ip = peer
                            .and_then(|a: SocketAddrAny| std::net::SocketAddr::try_from(a).ok())
                            .map(|a| a.ip());
                        if tx.send((conn, client_hash(ip), id)).is_err() {
                            return;
                        }
                    }
                    Err(_would_block) => continue,
                    // EMFILE and friends: back off instead of spinning.
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        Ok(())
    }

    fn on_accepted(&mut self, conn: OwnedFd, client: u64, listener: usize) {
        self.rr.accept(conn, client, listener);
        self.dispatch();
    }

    /// Hands waiting connections to ready workers, as the picker chooses, at
    /// most `round_robin::MAX_IN_FLIGHT` untaken per worker. A connection
    /// no worker can take now (a Node worker takes only those of listeners
    /// its servers asked for) keeps its place; the others go past it.
    fn dispatch(&mut self) {
        if !matches!(self.phase, Phase::Running) || self.rr.waiting.is_empty() {
            return;
        }
        // herd workers take every listener's connections once ready; Node
        // workers those of the round-robin servers they asked for.
        let node = self.config.ipc == Ipc::Node;
        let workers: Vec<(usize, u32, Option<&[usize]>)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| match &s.state {
                SlotState::Running {
                    pid,
                    ready,
                    rr_servers,
                    channel: Some(_),
                    disconnecting: None,
                    ..
                } if node || *ready => Some((slot, *pid, node.then_some(rr_servers.as_slice()))),
                _ => None,
            })
            .collect();
        let mut skipped = std::collections::VecDeque::new();
        let mut candidates = Vec::with_capacity(workers.len());
        while let Some(accepted) = self.rr.waiting.pop_front() {
            if !workers.iter().any(|(_, pid, _)| self.rr.has_room(*pid)) {
                self.rr.waiting.push_front(accepted);
                break; // everyone is full: the rest waits too
            }
            candidates.clear();
            candidates.extend(
                workers
                    .iter()
                    .filter(|(_, _, serves)| serves.is_none_or(|l| l.contains(&accepted.listener)))
                    .map(|(slot, pid, _)| (*slot, *pid)),
            );
            let Some((slot, pid)) = self.rr.pick(&candidates, self.slots.len(), accepted.client)
            else {
                skipped.push_back(accepted);
                continue;
            };
            let SlotState::Running {
                channel: Some(tx), ..
            } = &self.slots[slot].state
            else {
                unreachable!("picked among workers with a channel");
            };
            let bytes = if node {
                // Node's `newconn`; its answer (`ack` = our seq) is the `Taken`.
                let key = self
                    .rr_keys
                    .get(accepted.listener)
                    .map_or("", String::as_str);
                node::encode_newconn(key, accepted.id)
            } else {
                encode_control(&Control::Conn { id: accepted.id }, true)
            };
            let _ = tx.send(Outgoing::Frame {
                bytes,
                fd: Some(accepted.conn.clone()),
            });
            self.rr.hand(accepted, slot, pid);
        }
        // What no worker could take keeps its place at the front, in order.
        while let Some(a) = skipped.pop_back() {
            self.rr.waiting.push_front(a);
        }
    }

    fn on_taken(&mut self, from: u32, id: u64) {
        if self.rr.take(id, from) {
            self.dispatch();
        }
    }

    /// Connections handed to `pid` and not taken go back to the front of the queue.
    fn requeue(&mut self, pid: u32) {
        let n = self.rr.reclaim(pid);
        if n > 0 {
            info!(
                pid,
                "{n} connection(s) worker {pid} never took go to other workers"
            );
            self.dispatch();
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Stop => self.on_stop_request("stop request"),
            Command::Send { slot, frame } => {
                if let Some(SlotState::Running {
                    channel: Some(tx), ..
                }) = self.slots.get(slot).map(|s| &s.state)
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
                    .filter_map(|(slot, s)| match &s.state {
                        SlotState::Running {
                            pid,
                            ready,
                            channel,
                            disconnecting,
                            ..
                        } => Some(WorkerInfo {
                            slot,
                            pid: *pid,
                            ready: *ready,
                            connected: channel.is_some(),
                            disconnecting: disconnecting.is_some(),
                            connections: self.rr.load(*pid),
                        }),
                        _ => None,
                    })
                    .collect();
                let _ = reply.send(workers);
            }
            Command::Disconnect { slot, pid } => self.disconnect(slot, pid),
            Command::Signal { slot, pid, signal } => {
                if let Some(SlotState::Running { pid: p, .. }) =
                    self.slots.get(slot).map(|s| &s.state)
                {
                    if pid.is_none_or(|pid| pid == *p) {
                        signal_group(*p, signal);
                    }
                }
            }
            Command::Worker { slot, reply } => {
                let _ = reply.send(self.link(slot));
            }
            Command::Fork { env, reply } => {
                let _ = reply.send(self.fork(env));
            }
        }
    }

    /// Retires the worker in `slot` (if it is `pid`, when given): closes its
    /// channel, sends the stop signal, and SIGKILL at the stop timeout.
    fn disconnect(&mut self, slot: usize, only: Option<u32>) {
        let stop_signal = self.config.stop_signal;
        let kill_at = Instant::now() + self.config.stop_timeout;
        let node = self.config.ipc == Ipc::Node;
        let seq = self.node_seq + 1;
        let Some(Slot {
            state:
                SlotState::Running {
                    pid,
                    channel,
                    disconnecting: disconnecting @ None,
                    ..
                },
            ..
        }) = self.slots.get_mut(slot)
        else {
            return;
        };
        if only.is_some_and(|p| p != *pid) {
            return;
        }
        let pid = *pid;
        info!(slot, pid, "disconnecting worker {pid}");
        *disconnecting = Some(kill_at);
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
                self.node_seq = seq;
            }
            _ => {
                self.close_channel(slot, pid);
                signal_group(pid, stop_signal);
            }
        }
    }

    /// A new slot with `env` added to its workers' environment.
    fn fork(&mut self, env: Vec<(String, String)>) -> Result<WorkerLink, String> {
        if !matches!(self.phase, Phase::Running) {
            return Err("the cluster is stopping".into());
        }
        let slot = self.slots.len();
        self.slots.push(Slot {
            state: SlotState::Done { succeeded: true },
            env: env
                .iter()
                .filter_map(|(k, v)| env_entry(k.as_ref(), v.as_ref()))
                .collect(),
            backoff: Backoff::new(self.config.backoff),
            intensity: Intensity::new(self.config.max_restarts, self.config.within),
            failed: false,
        });
        match self.try_spawn(slot) {
            Ok(new) => {
                self.install(slot, new);
                Ok(self.link(slot).expect("just installed"))
            }
            Err(e) => {
                self.slots.pop();
                Err(e.to_string())
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let Exit { slot, pid, status } = exit;
        self.tell_guardian(-(pid as i32));
        // Nothing more is handed to it; what it never took goes elsewhere.
        self.close_channel(slot, pid);
        self.requeue(pid);
        if let SlotState::Running {
            pid: p, status: s, ..
        } = &self.slots[slot].state
        {
            if *p == pid {
                s.send_replace(WorkerStatus::Dead {
                    code: status.as_ref().ok().and_then(|s| s.code()),
                    signal: status.as_ref().ok().and_then(|s| s.signal()),
                });
            }
        }
        let now = Instant::now();
        let (uptime, exited_after_disconnect) = match self.slots[slot].state {
            SlotState::Running {
                pid: p,
                started,
                disconnecting,
                ..
            } if p == pid => (now - started, disconnecting.is_some()),
            _ => {
                debug!(slot, pid, "exit of a worker no longer tracked");
                return;
            }
        };
        let how = describe(&status);
        let succeeded = matches!(&status, Ok(s) if s.success());
        let _ = self.events.send(Event::Exited {
            slot,
            pid,
            code: status.as_ref().ok().and_then(|s| s.code()),
            signal: status.as_ref().ok().and_then(|s| s.signal()),
            exited_after_disconnect,
        });
        if let Phase::Stopping { .. } = self.phase {
            info!(slot, pid, "worker {pid} stopped ({how})");
            self.slots[slot].state = SlotState::Done { succeeded };
            return;
        }
        if exited_after_disconnect {
            // Asked to go: a replacement at once, and no mark against the slot.
            info!(slot, pid, "worker {pid} exited after disconnect ({how})");
            self.spawn(slot);
            return;
        }
        warn!(
            slot,
            pid,
            uptime_ms = uptime.as_millis() as u64,
            "worker {pid} died ({how})"
        );
        let restart = match self.config.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !succeeded,
            RestartPolicy::Never => false,
        };
        if !restart {
            info!(slot, "slot {slot} not restarted (restart policy)");
            self.slots[slot].state = SlotState::Done { succeeded };
            return;
        }
        self.schedule_restart(slot, uptime, now);
    }

    /// Decides when slot `slot` gets its next worker after one ran for `uptime`.
    fn schedule_restart(&mut self, slot: usize, uptime: Duration, now: Instant) {
        let stable = uptime >= self.config.backoff.stable;
        let jitter = self.jitter.sample();
        let s = &mut self.slots[slot];
        if stable {
            s.intensity.reset();
            if s.failed {
                info!(slot, "slot {slot} recovered");
            }
            s.failed = false;
        }
        let looping = s.intensity.record(now);
        let mut delay = s.backoff.next_delay(uptime, jitter);
        if looping && !s.failed {
            error!(
                slot,
                "CRASH LOOP: slot {slot} restarted more than {} times within {:?}",
                self.config.max_restarts,
                self.config.within
            );
            if self.config.on_crash_loop == CrashLoopAction::Exit {
                s.state = SlotState::Done { succeeded: false };
                self.begin_stop(Outcome::CrashLoop { slot });
                return;
            }
            s.failed = true;
            error!(
                slot,
                "slot {slot} marked failed; retrying every {:?}",
                s.backoff.cap()
            );
        }
        if s.failed {
            delay = s.backoff.cap();
        }
        if delay.is_zero() {
            self.spawn(slot);
        } else {
            info!(
                slot,
                delay_ms = delay.as_millis() as u64,
                "restarting slot {slot} in {delay:?}"
            );
            self.slots[slot].state = SlotState::Waiting { until: now + delay };
        }
    }

    /// Reaps zombies that are not our workers: orphaned grandchildren
    /// reparented to us (we are a subreaper), or anything when we are PID 1.
    fn reap_strays(&mut self) {
        let mut ours: HashSet<u32> = self
            .slots
            .iter()
            .filter_map(|s| match s.state {
                SlotState::Running { pid, .. } => Some(pid),
                _ => None,
            })
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
    }

    fn start_guardian(&mut self) {
        match sys::spawn_guardian(&self.marker) {
            Ok((child, pipe)) => {
                let g = Guardian { child, pipe };
                for s in &self.slots {
                    if let SlotState::Running { pid, .. } = s.state {
                        send_to_guardian(&g, pid as i32);
                    }
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

/// A wire format as the supervisor reads it: bytes in, channel events out.
trait WireDecoder: Default {
    fn push(&mut self, bytes: &[u8]);
    /// The next event, `None` when more bytes are needed; `Malformed` ends the channel.
    fn next_event(&mut self) -> Option<ChannelEvent>;
    /// At EOF: an error if a message was cut off.
    fn finish(&self) -> Result<(), String>;
}

impl WireDecoder for NodeDecoder {
    fn push(&mut self, bytes: &[u8]) {
        NodeDecoder::push(self, bytes)
    }
    fn next_event(&mut self) -> Option<ChannelEvent> {
        loop {
            let message = match self.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(e) => return Some(ChannelEvent::Malformed(e.to_string())),
            };
            if message.as_str() == Some("ready") {
                return Some(ChannelEvent::Ready);
            }
            let Some(internal) = ClusterMessage::parse(&message) else {
                return Some(ChannelEvent::Message(Message::new(
                    Codec::Json,
                    serde_json::to_vec(&message).unwrap_or_default(),
                )));
            };
            return Some(match internal {
                ClusterMessage::Online => ChannelEvent::Online,
                ClusterMessage::QueryServer {
                    seq,
                    address,
                    port,
                    udp,
                    fd,
                } => ChannelEvent::NodeQuery(NodeQuery {
                    seq,
                    address,
                    port,
                    udp,
                    fd,
                }),
                ClusterMessage::Listening { address, port } => {
                    let host = match address.as_deref() {
                        None => String::new(),
                        Some(h) if h.contains(':') => format!("[{h}]"),
                        Some(h) => h.to_string(),
                    };
                    ChannelEvent::NodeListening(format!("{host}:{port}"))
                }
                ClusterMessage::Accepted { id, accepted: true } => ChannelEvent::Taken { id },
                ClusterMessage::Accepted {
                    id,
                    accepted: false,
                } => ChannelEvent::Refused { id },
                ClusterMessage::Other => continue,
            });
        }
    }
    fn finish(&self) -> Result<(), String> {
        NodeDecoder::finish(self).map_err(|e| e.to_string())
    }
}

impl WireDecoder for FrameDecoder {
    fn push(&mut self, bytes: &[u8]) {
        FrameDecoder::push(self, bytes)
    }
    fn next_event(&mut self) -> Option<ChannelEvent> {
        Some(match self.next_frame() {
            Ok(Some(frame)) if frame.is_control() => match frame.decode::<Control>() {
                Ok(Control::Ready) => ChannelEvent::Ready,
                Ok(Control::Online) => ChannelEvent::Online,
                Ok(Control::Listen { seq, spec }) => ChannelEvent::Listen { seq, spec },
                Ok(Control::Taken { id }) => ChannelEvent::Taken { id },
                Ok(Control::Closed { ids }) => ChannelEvent::ConnsClosed(ids.len()),
                Ok(other) => ChannelEvent::Malformed(format!("unexpected {other:?}")),
                Err(e) => ChannelEvent::Malformed(e.to_string()),
            },
            Ok(Some(frame)) => ChannelEvent::Message(Message::new(frame.codec, frame.payload)),
            Ok(None) => return None,
            Err(e) => ChannelEvent::Malformed(e.to_string()),
        })
    }
    fn finish(&self) -> Result<(), String> {
        FrameDecoder::finish(self).map_err(|e| e.to_string())
    }
}

/// Reads a worker's IPC channel in wire format `D` until EOF or a protocol
/// error, sending what it decodes to the supervisor.
async fn read_channel<D: WireDecoder>(
    mut read: OwnedReadHalf,
    slot: usize,
    pid: u32,
    tx: mpsc::UnboundedSender<(usize, u32, Vec<ChannelEvent>)>,
    // Dropped on return: tells the exit watcher everything was passed on.
    _done: oneshot::Sender<()>,
) {
    let mut decoder = D::default();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match read.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let last = match decoder.finish() {
                    Err(e) => ChannelEvent::Malformed(e),
                    Ok(()) => ChannelEvent::Closed,
                };
                let _ = tx.send((slot, pid, vec![last]));
                return;
            }
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        // One send per read, not per message: a burst of small messages
        // costs the supervisor one queue operation.
        let mut batch = Vec::new();
        let mut fatal = false;
        while let Some(event) = decoder.next_event() {
            fatal = matches!(event, ChannelEvent::Malformed(_));
            batch.push(event);
            if fatal {
                break;
            }
        }
        if !batch.is_empty() && tx.send((slot, pid, batch)).is_err() || fatal {
            return;
        }
    }
}

/// Writes queued frames to a worker's channel; ends (closing the channel) when
/// the supervisor drops the queue's sender or the worker stops reading.
async fn write_channel(mut write: OwnedWriteHalf, mut queue: mpsc::UnboundedReceiver<Outgoing>) {
    use tokio::io::AsyncWriteExt;
    // Coalesce whatever is queued into one write (one syscall for a burst);
    // a frame with a descriptor goes alone, the descriptor on its first byte.
    const BATCH: usize = 256 * 1024;
    let mut held: Option<Outgoing> = None;
    loop {
        let first = match held.take() {
            Some(o) => o,
            None => match queue.recv().await {
                Some(o) => o,
                None => return,
            },
        };
        let result = match first {
            Outgoing::Close => return,
            Outgoing::Frame {
                bytes,
                fd: Some(fd),
            } => send_with_fd(&mut write, &bytes, fd).await,
            Outgoing::Frame { bytes, fd: None } => {
                let mut batch = bytes;
                while batch.len() < BATCH {
                    match queue.try_recv() {
                        Ok(Outgoing::Frame { bytes, fd: None }) => batch.extend_from_slice(&bytes),
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                write.write_all(&batch).await
            }
        };
        if result.is_err() {
            return;
        }
    }
}

/// Writes `bytes` with `fd` attached (SCM_RIGHTS) to the first chunk.
async fn send_with_fd(
    write: &mut OwnedWriteHalf,
    bytes: &[u8],
    fd: Arc<OwnedFd>,
) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::mem::MaybeUninit;
    use tokio::io::{AsyncWriteExt, Interest};
    let sent = {
        let stream: &tokio::net::UnixStream = write.as_ref();
        loop {
            stream.writable().await?;
            let fds = [fd.as_fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            match stream.try_io(Interest::WRITABLE, || {
                sendmsg(
                    stream,
                    &[std::io::IoSlice::new(bytes)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(std::io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    };
    write.write_all(&bytes[sent..]).await
}

fn encode_control(control: &Control, has_fd: bool) -> Vec<u8> {
    crate::ipc::frame::encode_control(control, has_fd).expect("control messages always serialize")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::frame;
    use tokio::io::AsyncWriteExt;

    async fn events_for(bytes: &[u8]) -> Vec<ChannelEvent> {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let (read, _write) = ours.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (done, _) = oneshot::channel();
        let reader = tokio::spawn(read_channel::<FrameDecoder>(read, 0, 42, tx, done));
        theirs.write_all(bytes).await.unwrap();
        drop(theirs);
        reader.await.unwrap();
        let mut out = Vec::new();
        while let Ok((0, 42, batch)) = rx.try_recv() {
            out.extend(batch);
        }
        out
    }

    #[tokio::test]
    async fn herd_channel_reports_ready_messages_and_stops_at_garbage() {
        let mut wire = frame::encode_control(&Control::Ready, false).unwrap();
        wire.extend(frame::encode(&"hi", Codec::Postcard, false).unwrap());
        wire.extend([0, 0, 0, 2, 0x80, b'x', b'y']); // unknown flag
        wire.extend(frame::encode(&"never read", Codec::Json, false).unwrap());
        let events = events_for(&wire).await;
        assert!(matches!(events[0], ChannelEvent::Ready));
        match &events[1] {
            ChannelEvent::Message(m) => assert_eq!(m.decode::<String>().unwrap(), "hi"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(&events[2], ChannelEvent::Malformed(why) if why.contains("flags")));
        assert_eq!(events.len(), 3, "nothing is read after a protocol error");
    }

    #[tokio::test]
    async fn herd_channel_reports_a_truncated_frame_and_bad_control() {
        let events = events_for(&[0, 0, 0, 9, 0, b'{']).await;
        assert!(
            matches!(&events[..], [ChannelEvent::Malformed(why)] if why.contains("middle of a frame"))
        );
        let bad_control = frame::encode_control(&"launch", false).unwrap();
        let events = events_for(&bad_control).await;
        assert!(matches!(&events[..], [ChannelEvent::Malformed(_)]));
    }
}
