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

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
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

use crate::backoff::{Backoff, Intensity, Jitter};
use crate::cluster::{Cluster, Command, Event, Outcome, WorkerInfo, WorkerLink, WorkerStatus};
use crate::config::Ipc;
use crate::config::{signal_name, ClusterConfig, CrashLoopAction, RestartPolicy};
use crate::ipc::frame::FrameDecoder;
use crate::ipc::node::{self, NodeDecoder};
use crate::output::{OutputSink, Stream};
use crate::round_robin::RoundRobin;
use crate::socket::Listeners;
use crate::spawn::{argv_cstrings, env_entry};
use crate::sys::{self, ExecPlan};
use crate::Error;

mod channel;
mod sockets;

pub(crate) use channel::Outgoing;
use channel::{read_channel, write_channel, ChannelEvent};

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
                    debug!(slot, pid = from, "worker {from} refused connection {id}");
                    // Its server for that listener closed: no more from it.
                    if let SlotState::Running { rr_servers, .. } = &mut self.slots[slot].state {
                        rr_servers.retain(|l| *l != listener);
                    }
                    self.dispatch();
                }
            }
            ChannelEvent::NodeQuery(query) => self.on_node_query(slot, from, query),
            ChannelEvent::NodeListening { address, port } => {
                let address = self.resolve_listening(address, port);
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
        let seq = self.next_node_seq();
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
