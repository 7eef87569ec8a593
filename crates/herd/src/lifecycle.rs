//! The cluster's lifecycle, pure: which worker to start and when, when a
//! worker counts as started, restart pacing, crash loops, retiring a worker,
//! stopping, and when the cluster is finished.
//!
//! No I/O and no clock: time comes in as arguments, and every decision comes
//! out as an [`Action`] the supervisor performs (spawn, signal) or reports
//! (notes for the log, the outcome). The supervisor is the shell: it owns
//! the processes, pipes and channels, feeds events in (a worker was spawned,
//! is ready, exited; a timer fired; a command came) and carries the actions
//! out. This is how `round_robin.rs` keeps balancing apart from sockets,
//! and how quinn-proto keeps QUIC's logic apart from quinn's I/O; it lets
//! proptest drive thousands of event orders against the invariants at the
//! bottom of this file.
//!
//! ```text
//!              spawned               exited (healthy, or after retire)
//!   Waiting ──────────────▶ Running ─────────────────────────────────▶ Waiting (at once)
//!     ▲  │ spawn failed        │  │ exited (quick, or failed by itself)
//!     │  ▼                     │  ▼
//!     └─ Waiting (backoff) ◀───┘  Waiting (backoff; a strike)  ──▶ crash loop: failed
//!                                                                   (retry at the cap, or stop)
//!   stop: Waiting ─▶ Done;  Running ─stop signal─▶ … ─stop timeout─▶ SIGKILL ─▶ Done
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::backoff::{Backoff, BackoffPolicy, Intensity, Jitter};
use crate::config::{ClusterConfig, CrashLoopAction, ReadyMode, RestartPolicy};

/// A slot starts at most this many workers…
pub(crate) const START_BURST: usize = 10;
/// …within this window, whatever the policy says (even with every delay set
/// to zero), so a worker that exits at once cannot make herd spin.
pub(crate) const START_WINDOW: Duration = Duration::from_secs(1);
/// A start that failed before the worker ran (fork or execve) is retried no
/// sooner than this: resources rarely come back in microseconds.
pub(crate) const SPAWN_RETRY_MIN: Duration = Duration::from_millis(100);

/// What the lifecycle needs of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) restart: RestartPolicy,
    pub(crate) backoff: BackoffPolicy,
    pub(crate) max_restarts: u32,
    pub(crate) within: Duration,
    pub(crate) on_crash_loop: CrashLoopAction,
    pub(crate) min_uptime: Duration,
    pub(crate) stop_timeout: Duration,
    /// A worker that has said nothing is ready this long after it started
    /// (`--ready delay`, and `auto`'s fallback for programs that can signal
    /// nothing).
    pub(crate) ready_delay: Option<Duration>,
    /// A worker not ready this long after it started failed to start: it
    /// is killed and counts as a crash (`--ready-timeout`, for the modes
    /// that wait for the worker to say so).
    pub(crate) ready_timeout: Option<Duration>,
    /// A worker that sent `WATCHDOG=1` once and then nothing for this long
    /// is hung (`--watchdog`).
    pub(crate) watchdog: Option<Duration>,
    /// How many replacement workers a reload starts at a time, beside the
    /// workers they replace (`--reload-surge`, at least 1).
    pub(crate) reload_surge: usize,
    /// `--max-lifetime`: workers are replaced after this (plus up to 10 %
    /// jitter, so they do not all go at once).
    pub(crate) max_lifetime: Option<Duration>,
}

/// How long a hung worker has after SIGABRT (to dump core) before SIGKILL.
pub(crate) const WATCHDOG_ABORT_GRACE: Duration = Duration::from_secs(2);

impl Policy {
    pub(crate) fn from_config(c: &ClusterConfig) -> Policy {
        Policy {
            restart: c.restart,
            backoff: c.backoff,
            max_restarts: c.max_restarts,
            within: c.within,
            on_crash_loop: c.on_crash_loop,
            min_uptime: c.min_uptime,
            stop_timeout: c.stop_timeout,
            ready_delay: matches!(c.ready, ReadyMode::Auto | ReadyMode::Delay)
                .then_some(c.ready_delay),
            // 0 means none, as systemd's TimeoutStartSec=0 does.
            ready_timeout: matches!(
                c.ready,
                ReadyMode::Notify | ReadyMode::Node | ReadyMode::Listen
            )
            .then_some(c.ready_timeout)
            .filter(|t| !t.is_zero()),
            watchdog: c.watchdog.filter(|d| !d.is_zero()),
            reload_surge: c.reload_surge.max(1),
            max_lifetime: c.max_lifetime.filter(|d| !d.is_zero()),
        }
    }
}

/// How a worker ended, as the lifecycle weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExitFacts {
    /// When it exited (not when the exit was reported).
    pub(crate) at: Instant,
    /// Exit status 0.
    pub(crate) succeeded: bool,
    /// It failed by itself: a non-zero status or a crash signal (not a
    /// SIGKILL/SIGTERM from outside).
    pub(crate) failed_by_itself: bool,
}

/// Why the cluster ends; the shell adds the words (exit, stderr lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Stopped on request.
    Stopped,
    /// Every worker finished under the restart policy.
    Finished { all_succeeded: bool },
    /// A slot crash-looped under `--on-crash-loop exit`.
    CrashLoop { slot: usize },
    /// No worker ever started and every slot crash-looped.
    BootFailed { slot: usize },
    /// The command cannot run at all (its execve failed before any worker
    /// ever started).
    CannotRun,
}

/// Why a worker is asked to drain and go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetireWhy {
    /// Its slot is being scaled away.
    ScaledAway,
    /// Its replacement is ready (a reload, or recycling).
    Replaced,
    /// It was a replacement that is no longer wanted: the reload failed,
    /// or its slot is being scaled away.
    Abandoned,
}

/// Why a worker is replaced outside a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecycleWhy {
    /// It ran for `--max-lifetime` (with its jitter).
    Lifetime,
    /// Its process tree used more than `--max-memory`.
    Memory,
    /// An operator asked (`herd restart`).
    Requested,
}

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReloadReport {
    /// The generation it was to run.
    pub(crate) generation: u64,
    /// Every slot runs it now.
    pub(crate) ok: bool,
    /// The replacement that failed: its slot, and its pid (`None`: it
    /// could not be spawned).
    pub(crate) failed: Option<(usize, Option<u32>)>,
    /// How many slots were already on the new generation and were put
    /// back on the previous one.
    pub(crate) rolled_back: usize,
    /// The cluster began to stop before the reload ended.
    pub(crate) stopped: bool,
}

/// Whether a reload began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReloadStart {
    /// It runs now.
    Started,
    /// Another runs: this one starts when it ends ([`Action::ReloadNext`]);
    /// requests while one waits are the same request (coalesced).
    Queued,
    /// The cluster is stopping: no reload.
    Stopping,
}

/// Something for the log, decided here and worded by the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Note {
    /// The slot's next worker starts in `delay` (not logged when 0).
    Restarting { slot: usize, delay: Duration },
    /// The slot exceeded the crash-loop limit.
    CrashLoop { slot: usize },
    /// The slot is marked failed and retried at the backoff cap.
    Failed { slot: usize, retry_every: Duration },
    /// A failed slot's worker ran healthily again.
    Recovered { slot: usize },
    /// No worker ever started and every slot is crash-looping.
    GaveUpBooting,
    /// The restart policy leaves the slot empty.
    NotRestarted { slot: usize },
    /// A retired worker outlived the stop timeout.
    RetireTimedOut { pid: u32 },
    /// A slot without a live worker (in backoff, failed) was scaled away.
    ScaledAway { slot: usize },
    /// A worker became ready by the delay (`--ready-delay`): it said nothing.
    ReadyByDelay { slot: usize, pid: u32 },
    /// A worker's watchdog expired (or it asked: `WATCHDOG=trigger`): it
    /// gets SIGABRT, then SIGKILL after a grace.
    Hung {
        slot: usize,
        pid: u32,
        triggered: bool,
    },
    /// A worker was not ready within the ready timeout: it is killed and
    /// counts as a failed start.
    NotReady {
        slot: usize,
        pid: u32,
        timeout: Duration,
    },
    /// The stop timeout passed with workers left.
    StopTimedOut,
    /// A reload began: `slots` slots to replace, `surge` at a time.
    ReloadStarted {
        generation: u64,
        slots: usize,
        surge: usize,
    },
    /// Slot `slot`'s replacement `new` is ready and serves; `old` (if the
    /// slot still had a worker) drains.
    Replaced {
        slot: usize,
        old: Option<u32>,
        new: u32,
        generation: u64,
    },
    /// A replacement failed (exited, not ready in time, or could not be
    /// spawned: `pid` `None`); the reload stops.
    ReplacementFailed { slot: usize, pid: Option<u32> },
    /// A failed reload puts `slots` slots back on the previous generation.
    RollingBack { slots: usize, generation: u64 },
    /// A worker is replaced outside a reload (recycled).
    Recycling {
        slot: usize,
        pid: u32,
        why: RecycleWhy,
    },
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Start a worker in `slot`; answer
    /// with [`Lifecycle::spawned`] or [`Lifecycle::spawn_failed`]. A slot
    /// with a live worker gets a second one only as that worker's
    /// replacement (a reload, recycling).
    /// `replacement`: it is to replace the slot's worker. An earlier
    /// action's answer may have made it moot, or changed the command
    /// generation: the shell asks [`Lifecycle::spawn_wanted`] first.
    Spawn { slot: usize, replacement: bool },
    /// Send the stop signal to every live worker (the cluster is stopping).
    StopAll,
    /// SIGKILL every live worker and what is left of dead ones.
    KillAll,
    /// SIGKILL one worker (retired past its stop timeout, not ready in
    /// time, hung past its abort grace).
    Kill { pid: u32 },
    /// SIGABRT one hung worker (core dumps stay possible).
    Abort { pid: u32 },
    /// Ask one worker to drain and go (stop signal, or Node's disconnect).
    /// SIGKILL follows at the stop timeout.
    Retire {
        slot: usize,
        pid: u32,
        why: RetireWhy,
    },
    /// The last slot is gone (scaled away, its worker exited).
    RemoveSlot { slot: usize },
    /// The running reload ended; answer whoever asked for it.
    ReloadEnded(ReloadReport),
    /// A reload was asked for while another ran: resolve the command again
    /// and [`Lifecycle::reload`] now.
    ReloadNext,
    /// Log this.
    Note(Note),
}

/// A live worker as the lifecycle sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Worker {
    pub(crate) pid: u32,
    /// The command generation it runs (0 at start; each reload one more).
    pub(crate) generation: u64,
    pub(crate) started: Instant,
    /// It is ready: it said so, or the ready delay passed.
    pub(crate) ready: bool,
    /// It said so itself: proof it started, as `min_uptime` of uptime is
    /// (a delay is not: a worker dying after the delay but before
    /// `min_uptime` still failed to start).
    pub(crate) said_ready: bool,
    /// Ready by the delay at this time, if it says nothing before.
    pub(crate) ready_at: Option<Instant>,
    /// Not ready by this time: a failed start.
    pub(crate) ready_by: Option<Instant>,
    /// It was killed for not being ready in time.
    pub(crate) failed_start: bool,
    /// Its watchdog: hung if no `WATCHDOG=1` by then (armed by its first).
    pub(crate) watchdog_at: Option<Instant>,
    /// It was found hung: SIGABRT sent, SIGKILL at this time.
    pub(crate) hung_kill_at: Option<Instant>,
    /// That SIGKILL was sent.
    pub(crate) hung_killed: bool,
    /// Retired (disconnected, drained): SIGKILL at this time if still alive.
    pub(crate) retire_kill_at: Option<Instant>,
    /// It got that SIGKILL.
    pub(crate) retire_killed: bool,
    /// Replaced once it has run this long (`--max-lifetime`, jittered).
    pub(crate) recycle_at: Option<Instant>,
}

/// Which of its slot's workers a live worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The slot's own worker.
    Current,
    /// Its replacement, starting (a reload, recycling); it becomes the
    /// slot's worker once ready.
    Incoming,
    /// Replaced (or an abandoned replacement), draining; not restarted.
    Draining,
}

/// One slot's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// A worker is alive.
    Running(Worker),
    /// Waiting to start the next worker.
    Waiting { until: Instant },
    /// Its worker died while its replacement was starting: the replacement
    /// takes the slot when ready (or, if it fails, a restart does).
    Replacing,
    /// Not running and not coming back (restart policy, or stopping).
    Done { succeeded: bool },
}

/// A slot's replacement worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Incoming {
    /// Asked for ([`Action::Spawn`]) with this generation, not yet answered.
    Asked(u64),
    Running(Worker),
}

#[derive(Debug, Clone)]
struct Slot {
    state: SlotState,
    /// The command generation its workers are started with.
    generation: u64,
    /// Its replacement worker, while one starts.
    incoming: Option<Incoming>,
    /// Workers it no longer counts on, until they exit.
    draining: Vec<Worker>,
    /// The replacement is recycling (not a reload's).
    recycling: bool,
    backoff: Backoff,
    intensity: Intensity,
    failed: bool,
    /// When its last few workers were started (at most `START_BURST`).
    starts: VecDeque<Instant>,
    /// It is being scaled away: its worker is not replaced, and the slot is
    /// removed once it is done (and is the last; a scale-up takes it back first).
    leaving: bool,
}

impl Slot {
    fn new(policy: &Policy, generation: u64, now: Instant) -> Slot {
        Slot {
            state: SlotState::Waiting { until: now },
            generation,
            incoming: None,
            draining: Vec::new(),
            recycling: false,
            backoff: Backoff::new(policy.backoff),
            intensity: Intensity::new(policy.max_restarts, policy.within),
            failed: false,
            starts: VecDeque::new(),
            leaving: false,
        }
    }

    /// The earliest a new worker may start.
    fn may_start_at(&self, now: Instant) -> Instant {
        match self.starts.front() {
            Some(first) if self.starts.len() >= START_BURST => (*first + START_WINDOW).max(now),
            _ => now,
        }
    }

    /// Live workers beyond its own: the replacement and the draining.
    fn extra(&self) -> usize {
        self.incoming.is_some() as usize + self.draining.len()
    }

    /// Nothing of it is alive or coming.
    fn gone(&self) -> bool {
        matches!(self.state, SlotState::Done { .. })
            && self.incoming.is_none()
            && self.draining.is_empty()
    }
}

/// The cluster's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Stopping {
        /// When what is left gets SIGKILL.
        kill_at: Instant,
        /// Why it stops.
        end: End,
        /// SIGKILL was sent (the stop timeout passed, or a second request).
        killed: bool,
    },
}

/// A rolling reload in progress.
#[derive(Debug, Clone)]
struct Reload {
    /// What it moves slots to.
    generation: u64,
    /// What they ran before.
    previous: u64,
    /// Slots still to replace, in order.
    queue: VecDeque<usize>,
    /// Slots now on `generation`.
    switched: Vec<usize>,
    /// This reload is the rollback of that failed one.
    rollback_of: Option<ReloadReport>,
}

/// Every slot's lifecycle: the pure core the supervisor drives.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    policy: Policy,
    slots: Vec<Slot>,
    phase: Phase,
    /// A worker has started successfully at some point (up for
    /// `min_uptime`, or ready).
    served: bool,
    jitter: Jitter,
    /// The generation new slots start with: the last reload's (0 at start).
    generation: u64,
    reload: Option<Reload>,
    /// A reload was asked for while one ran.
    reload_queued: bool,
    actions: Vec<Action>,
}

impl Lifecycle {
    /// `workers` slots, each to be started at once ([`Action::Spawn`]).
    pub(crate) fn new(policy: Policy, workers: usize, jitter: Jitter, now: Instant) -> Lifecycle {
        let mut lc = Lifecycle {
            slots: (0..workers).map(|_| Slot::new(&policy, 0, now)).collect(),
            policy,
            phase: Phase::Running,
            served: false,
            jitter,
            generation: 0,
            reload: None,
            reload_queued: false,
            actions: Vec::new(),
        };
        for slot in 0..workers {
            lc.actions.push(Action::Spawn {
                slot,
                replacement: false,
            });
        }
        lc
    }

    /// The actions decided since the last call, in order.
    pub(crate) fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// How many slots there are (leaving ones too).
    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Slot `slot`'s state.
    pub(crate) fn state(&self, slot: usize) -> SlotState {
        self.slots[slot].state
    }

    /// Slot `slot`'s own live worker (not its replacement, not the draining).
    pub(crate) fn worker(&self, slot: usize) -> Option<&Worker> {
        match &self.slots.get(slot)?.state {
            SlotState::Running(w) => Some(w),
            _ => None,
        }
    }

    /// Live worker `pid`, wherever it is.
    pub(crate) fn find(&self, pid: u32) -> Option<(usize, Role, &Worker)> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            if let SlotState::Running(w) = &s.state {
                if w.pid == pid {
                    return Some((i, Role::Current, w));
                }
            }
            if let Some(Incoming::Running(w)) = &s.incoming {
                if w.pid == pid {
                    return Some((i, Role::Incoming, w));
                }
            }
            s.draining
                .iter()
                .find(|w| w.pid == pid)
                .map(|w| (i, Role::Draining, w))
        })
    }

    fn find_mut(&mut self, pid: u32) -> Option<(usize, Role, &mut Worker)> {
        let (slot, role, _) = self.find(pid)?;
        let w = worker_in(&mut self.slots[slot], role, pid)?;
        Some((slot, role, w))
    }

    /// Whether slot `slot` is marked failed (over the crash-loop limit,
    /// retried at the backoff cap).
    pub(crate) fn failed(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|s| s.failed)
    }

    /// Whether slot `slot` is being scaled away.
    pub(crate) fn leaving(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|s| s.leaving)
    }

    /// The phase.
    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the cluster is stopping.
    pub(crate) fn stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }

    /// Every command generation a slot or a live worker uses, or a reload
    /// moves to: the ones the shell must keep.
    pub(crate) fn generations_in_use(&self) -> std::collections::BTreeSet<u64> {
        let mut used = std::collections::BTreeSet::from([self.generation]);
        if let Some(r) = &self.reload {
            used.extend([r.generation, r.previous]);
        }
        for s in &self.slots {
            used.insert(s.generation);
            if let SlotState::Running(w) = &s.state {
                used.insert(w.generation);
            }
            match &s.incoming {
                Some(Incoming::Running(w)) => {
                    used.insert(w.generation);
                }
                Some(Incoming::Asked(g)) => {
                    used.insert(*g);
                }
                None => {}
            }
            used.extend(s.draining.iter().map(|w| w.generation));
        }
        used
    }

    /// Whether a reload is running (or one is queued).
    pub(crate) fn reloading(&self) -> bool {
        self.reload.is_some() || self.reload_queued
    }

    /// The generation a new slot starts with: a running reload's (its
    /// slot counts as switched), else the cluster's.
    fn new_slot_generation(&self) -> u64 {
        self.reload
            .as_ref()
            .map_or(self.generation, |r| r.generation)
    }

    /// Adds a slot (Node's `cluster.fork()`); the shell starts its first
    /// worker at once and reports it with [`spawned`](Self::spawned) (or
    /// takes the slot back with [`remove_last_slot`](Self::remove_last_slot)).
    /// Returns the slot and the generation to start. `None` while stopping.
    pub(crate) fn add_slot(&mut self, now: Instant) -> Option<(usize, u64)> {
        if self.stopping() {
            return None;
        }
        let generation = self.new_slot_generation();
        // Its start is the shell's to make now, not the timer's.
        let mut slot = Slot::new(&self.policy, generation, now);
        slot.state = SlotState::Waiting {
            until: far_future(now),
        };
        self.slots.push(slot);
        let i = self.slots.len() - 1;
        if let Some(r) = &mut self.reload {
            r.switched.push(i);
        }
        Some((i, generation))
    }

    /// How many slots are not being scaled away: the cluster's size.
    pub(crate) fn active(&self) -> usize {
        self.slots.iter().filter(|s| !s.leaving).count()
    }

    /// Scales to `n` workers (at least 1): new slots start at once; the
    /// highest slots leave, their workers asked to drain (as a disconnect
    /// retires them) and not replaced, each slot removed when its worker
    /// is gone. Scaling up first takes back slots still leaving. Returns
    /// the new size. Nothing changes while stopping.
    pub(crate) fn scale(&mut self, n: usize, now: Instant) -> usize {
        if self.stopping() {
            return self.active();
        }
        let n = n.max(1);
        while self.active() < n {
            // The lowest slot that is leaving, else a new one: slot numbers
            // (HERD_WORKER_ID) stay within 0..n, which apps shard by. A
            // leaving slot's worker, still draining, drains on beside the
            // new one (as a reload's old worker does); the new worker
            // starts now rather than when that one exits.
            let generation = self.new_slot_generation();
            let reuse = self.slots.iter().position(|s| s.leaving);
            let slot = match reuse {
                Some(i) => {
                    let old = std::mem::replace(
                        &mut self.slots[i],
                        Slot::new(&self.policy, generation, now),
                    );
                    let mut draining = old.draining;
                    if let SlotState::Running(w) = old.state {
                        draining.push(w);
                    }
                    if let Some(Incoming::Running(w)) = old.incoming {
                        draining.push(w);
                    }
                    self.slots[i].draining = draining;
                    i
                }
                None => {
                    self.slots.push(Slot::new(&self.policy, generation, now));
                    self.slots.len() - 1
                }
            };
            self.slots[slot].state = SlotState::Waiting {
                until: far_future(now),
            };
            if let Some(r) = &mut self.reload {
                r.switched.push(slot);
            }
            self.actions.push(Action::Spawn {
                slot,
                replacement: false,
            });
        }
        while self.active() > n {
            // The highest slot without a serving worker (in backoff, failed,
            // not yet ready) goes first, then the highest one: scaling down
            // must not retire the one healthy worker and keep a failed slot.
            let serving = |s: &Slot| match s.state {
                SlotState::Running(w) => w.ready && !s.failed,
                _ => false,
            };
            let i = self
                .slots
                .iter()
                .rposition(|s| !s.leaving && !serving(s))
                .or_else(|| self.slots.iter().rposition(|s| !s.leaving))
                .expect("active > n >= 1");
            let kill_at = now + self.policy.stop_timeout;
            let s = &mut self.slots[i];
            s.leaving = true;
            // Its replacement, if one starts, is not wanted either.
            match s.incoming.take() {
                Some(Incoming::Running(mut w)) => {
                    w.retire_kill_at = Some(kill_at);
                    w.watchdog_at = None;
                    self.actions.push(Action::Retire {
                        slot: i,
                        pid: w.pid,
                        why: RetireWhy::Abandoned,
                    });
                    s.draining.push(w);
                }
                Some(Incoming::Asked(_)) | None => {}
            }
            s.recycling = false;
            match &mut s.state {
                SlotState::Running(w) => {
                    if w.retire_kill_at.is_none() {
                        w.retire_kill_at = Some(kill_at);
                        // A draining worker may go quiet: no watchdog.
                        w.watchdog_at = None;
                        self.actions.push(Action::Retire {
                            slot: i,
                            pid: w.pid,
                            why: RetireWhy::ScaledAway,
                        });
                    }
                }
                state => {
                    *state = SlotState::Done { succeeded: true };
                    self.actions
                        .push(Action::Note(Note::ScaledAway { slot: i }));
                }
            }
        }
        self.remove_gone();
        self.advance(now);
        self.active()
    }

    /// Removes the trailing slots that left and are gone.
    fn remove_gone(&mut self) {
        while self.slots.last().is_some_and(|s| s.leaving && s.gone()) {
            self.slots.pop();
            self.actions.push(Action::RemoveSlot {
                slot: self.slots.len(),
            });
        }
    }

    /// Removes the last slot again (its first worker could not be spawned).
    pub(crate) fn remove_last_slot(&mut self) {
        if matches!(
            self.slots.last().map(|s| s.state),
            Some(SlotState::Waiting { .. })
        ) {
            let slot = self.slots.len() - 1;
            self.slots.pop();
            if let Some(r) = &mut self.reload {
                r.switched.retain(|s| *s != slot);
            }
        }
    }

    fn new_worker(&mut self, pid: u32, generation: u64, now: Instant) -> Worker {
        let recycle_at = self.policy.max_lifetime.map(|d| {
            // Up to 10 % more, so workers started together do not all go
            // together.
            let extra = d.mul_f64(0.1 * self.jitter.sample());
            now + d + extra
        });
        Worker {
            pid,
            generation,
            started: now,
            ready: false,
            said_ready: false,
            ready_at: self.policy.ready_delay.map(|d| now + d),
            ready_by: self.policy.ready_timeout.map(|d| now + d),
            failed_start: false,
            watchdog_at: None,
            hung_kill_at: None,
            hung_killed: false,
            retire_kill_at: None,
            retire_killed: false,
            recycle_at,
        }
    }

    /// Whether an [`Action::Spawn`] is still wanted (the slot waits for a
    /// worker, or for that replacement), and with which command generation.
    pub(crate) fn spawn_wanted(&self, slot: usize, replacement: bool) -> Option<u64> {
        if self.stopping() {
            return None;
        }
        let s = self.slots.get(slot)?;
        match (replacement, s.incoming, s.state) {
            (true, Some(Incoming::Asked(generation)), _) => Some(generation),
            (false, _, SlotState::Waiting { .. }) => Some(s.generation),
            _ => None,
        }
    }

    /// The shell started a worker in `slot` (the one asked for last).
    pub(crate) fn spawned(&mut self, slot: usize, pid: u32, now: Instant) {
        let s = &mut self.slots[slot];
        if s.starts.len() >= START_BURST {
            s.starts.pop_front();
        }
        s.starts.push_back(now);
        // A replacement runs what it was asked for (the slot's own
        // generation switches when it is ready).
        let (incoming, generation) = match s.incoming {
            Some(Incoming::Asked(g)) => (true, g),
            _ => (false, s.generation),
        };
        let w = self.new_worker(pid, generation, now);
        let s = &mut self.slots[slot];
        if incoming {
            s.incoming = Some(Incoming::Running(w));
        } else {
            s.state = SlotState::Running(w);
        }
    }

    /// The shell could not start a worker in `slot` (fork failed, or its
    /// execve failed after the cluster had served): backed off like a crash
    /// at start, and no sooner than [`SPAWN_RETRY_MIN`]. A replacement that
    /// cannot start fails its reload.
    pub(crate) fn spawn_failed(&mut self, slot: usize, now: Instant) {
        if matches!(self.slots[slot].incoming, Some(Incoming::Asked(_))) {
            self.slots[slot].incoming = None;
            self.replacement_failed(slot, None, now);
            return;
        }
        if self.stopping() || self.slots[slot].leaving {
            self.slots[slot].state = SlotState::Done { succeeded: false };
            self.remove_gone();
            return;
        }
        self.schedule_restart(slot, Duration::ZERO, false, now);
        if let SlotState::Waiting { until } = &mut self.slots[slot].state {
            *until = (*until).max(now + SPAWN_RETRY_MIN);
        }
    }

    /// A worker said it is ready: it started successfully; a replacement
    /// takes its slot. Returns whether that is news (it was not ready
    /// before).
    pub(crate) fn ready(&mut self, pid: u32, now: Instant) -> bool {
        let Some((slot, role, w)) = self.find_mut(pid) else {
            return false;
        };
        if role == Role::Draining || w.said_ready || w.failed_start || w.retire_kill_at.is_some() {
            return false;
        }
        w.said_ready = true;
        // News unless the delay had made it ready already.
        let news = !std::mem::replace(&mut w.ready, true);
        self.served = true;
        if role == Role::Incoming && news && self.settled(slot, now) {
            self.promote(slot, now);
        }
        news
    }

    /// Whether slot `slot`'s replacement may take over: ready, and up for
    /// `--min-uptime` (a server whose readiness comes early, as gunicorn's
    /// master says READY=1 before its workers load the app, must also have
    /// lived that long; until then the old worker serves on, and a death is
    /// a failed replacement).
    fn settled(&self, slot: usize, now: Instant) -> bool {
        match self.slots[slot].incoming {
            Some(Incoming::Running(w)) => {
                w.ready && now.saturating_duration_since(w.started) >= self.policy.min_uptime
            }
            _ => false,
        }
    }

    /// A worker sent `WATCHDOG=1`: its watchdog is (re)armed. Ignored
    /// without `--watchdog`, and from a worker already found hung or
    /// draining.
    pub(crate) fn heartbeat(&mut self, pid: u32, now: Instant) {
        let Some(timeout) = self.policy.watchdog else {
            return;
        };
        if let Some((_, Role::Current | Role::Incoming, w)) = self.find_mut(pid) {
            if w.hung_kill_at.is_none() && w.retire_kill_at.is_none() {
                w.watchdog_at = Some(now + timeout);
            }
        }
    }

    /// A worker sent `WATCHDOG=trigger`: as systemd does, it is treated as
    /// hung at once (with or without `--watchdog`).
    pub(crate) fn watchdog_trigger(&mut self, pid: u32, now: Instant) {
        let Some((slot, role @ (Role::Current | Role::Incoming), _)) = self.find(pid) else {
            return;
        };
        if let Some(w) = worker_in(&mut self.slots[slot], role, pid) {
            if w.hung_kill_at.is_none() {
                Self::hang(&mut self.actions, slot, w, now, true);
            }
        }
    }

    fn hang(actions: &mut Vec<Action>, slot: usize, w: &mut Worker, now: Instant, triggered: bool) {
        w.hung_kill_at = Some(now + WATCHDOG_ABORT_GRACE);
        w.watchdog_at = None;
        actions.push(Action::Note(Note::Hung {
            slot,
            pid: w.pid,
            triggered,
        }));
        actions.push(Action::Abort { pid: w.pid });
    }

    /// Whether a worker has ever started successfully, counting live
    /// workers up for `min_uptime` or ready; `except`'s worker does not count.
    pub(crate) fn has_served(&self, now: Instant, except: Option<usize>) -> bool {
        self.served
            || self.slots.iter().enumerate().any(|(i, s)| match s.state {
                SlotState::Running(w) if Some(i) != except => {
                    w.said_ready
                        || now.saturating_duration_since(w.started) >= self.policy.min_uptime
                }
                _ => false,
            })
    }

    /// Starts a rolling reload to command generation `generation` (the
    /// shell resolved the command again): slot by slot, `reload_surge` at a
    /// time, a replacement starts beside the slot's worker, and only once
    /// it is ready is the old one asked to drain; the next starts once that
    /// one exited. If a replacement fails, the reload stops, the other
    /// replacements are stopped, and slots already switched are reloaded
    /// back to the previous generation the same way (rollback).
    pub(crate) fn reload(&mut self, generation: u64, now: Instant) -> ReloadStart {
        if self.stopping() {
            return ReloadStart::Stopping;
        }
        if self.reload.is_some() {
            self.reload_queued = true;
            return ReloadStart::Queued;
        }
        self.reload_queued = false;
        let queue: VecDeque<usize> = (0..self.slots.len())
            .filter(|i| !self.slots[*i].leaving)
            .collect();
        self.actions.push(Action::Note(Note::ReloadStarted {
            generation,
            slots: queue.len(),
            surge: self.policy.reload_surge,
        }));
        self.reload = Some(Reload {
            generation,
            previous: self.generation,
            queue,
            switched: Vec::new(),
            rollback_of: None,
        });
        self.advance(now);
        ReloadStart::Started
    }

    /// Replaces slot `slot`'s worker `pid` (if it still is) outside a
    /// reload, the same way: the replacement ready first, then `pid` drains.
    /// Returns whether it began; not while a reload runs, the slot already
    /// has a replacement, or `reload_surge` replacements are under way (the
    /// shell asks again later).
    pub(crate) fn recycle(&mut self, slot: usize, pid: u32, why: RecycleWhy) -> bool {
        if self.stopping() || self.reload.is_some() {
            return false;
        }
        let busy: usize = self.slots.iter().map(Slot::extra).sum();
        let surge = self.policy.reload_surge;
        let generation = match self.slots.get(slot) {
            Some(s)
                if !s.leaving
                    && s.incoming.is_none()
                    && busy < surge
                    && matches!(s.state, SlotState::Running(w)
                        if w.pid == pid && w.ready && w.retire_kill_at.is_none()) =>
            {
                s.generation
            }
            _ => return false,
        };
        let s = &mut self.slots[slot];
        s.incoming = Some(Incoming::Asked(generation));
        s.recycling = true;
        self.actions
            .push(Action::Note(Note::Recycling { slot, pid, why }));
        self.actions.push(Action::Spawn {
            slot,
            replacement: true,
        });
        true
    }

    /// Moves the running reload on: replacements for the next slots while
    /// fewer than `reload_surge` are under way; ends it when none is left.
    fn advance(&mut self, now: Instant) {
        if self.stopping() {
            return;
        }
        let surge = self.policy.reload_surge;
        // Slots whose replacement (a recycle's) is still starting: looked
        // at again when it is done (this runs again then).
        let mut later = Vec::new();
        loop {
            let busy: usize = self.slots.iter().map(Slot::extra).sum();
            let Some(r) = &mut self.reload else {
                return;
            };
            if busy >= surge {
                break;
            }
            let Some(slot) = r.queue.pop_front() else {
                if busy == 0 && later.is_empty() {
                    self.end_reload();
                    return;
                }
                break;
            };
            let Some(s) = self.slots.get_mut(slot) else {
                continue;
            };
            if s.leaving {
                continue;
            }
            if s.incoming.is_some() {
                later.push(slot);
                continue;
            }
            match s.state {
                SlotState::Done { .. } => {}
                SlotState::Running(w) if w.generation == r.generation => {
                    s.generation = r.generation;
                    r.switched.push(slot);
                }
                SlotState::Running(_) => {
                    let generation = r.generation;
                    s.incoming = Some(Incoming::Asked(generation));
                    s.recycling = false;
                    self.actions.push(Action::Spawn {
                        slot,
                        replacement: true,
                    });
                }
                SlotState::Waiting { until } => {
                    // No worker to replace (in backoff, failed): it starts
                    // the new generation, and now rather than at its backoff.
                    s.generation = r.generation;
                    r.switched.push(slot);
                    let at = s.may_start_at(now);
                    if at <= now {
                        s.state = SlotState::Waiting {
                            until: far_future(now),
                        };
                        self.actions.push(Action::Spawn {
                            slot,
                            replacement: false,
                        });
                    } else if until > at {
                        s.state = SlotState::Waiting { until: at };
                    }
                }
                SlotState::Replacing => {}
            }
        }
        if let Some(r) = &mut self.reload {
            for slot in later.into_iter().rev() {
                r.queue.push_front(slot);
            }
        }
    }

    /// The running reload is over: every queued slot was replaced.
    fn end_reload(&mut self) {
        let Some(r) = self.reload.take() else {
            return;
        };
        self.generation = r.generation;
        let report = match r.rollback_of {
            Some(failed) => ReloadReport {
                rolled_back: r.switched.len(),
                ..failed
            },
            None => ReloadReport {
                generation: r.generation,
                ok: true,
                failed: None,
                rolled_back: 0,
                stopped: false,
            },
        };
        self.end_with(report);
    }

    /// Reports how the reload ended, and starts the one asked for meanwhile.
    fn end_with(&mut self, report: ReloadReport) {
        self.actions.push(Action::ReloadEnded(report));
        if std::mem::take(&mut self.reload_queued) {
            self.actions.push(Action::ReloadNext);
        }
    }

    /// Slot `slot`'s replacement is ready: it becomes the slot's worker,
    /// and the one it replaces drains.
    fn promote(&mut self, slot: usize, now: Instant) {
        let kill_at = now + self.policy.stop_timeout;
        let s = &mut self.slots[slot];
        let Some(Incoming::Running(new)) = s.incoming.take() else {
            return;
        };
        s.recycling = false;
        let old = match std::mem::replace(&mut s.state, SlotState::Running(new)) {
            SlotState::Running(mut old) => {
                if old.retire_kill_at.is_none() {
                    old.retire_kill_at = Some(kill_at);
                    self.actions.push(Action::Retire {
                        slot,
                        pid: old.pid,
                        why: RetireWhy::Replaced,
                    });
                }
                old.watchdog_at = None;
                s.draining.push(old);
                Some(old.pid)
            }
            _ => None,
        };
        s.generation = new.generation;
        self.actions.push(Action::Note(Note::Replaced {
            slot,
            old,
            new: new.pid,
            generation: new.generation,
        }));
        if let Some(r) = &mut self.reload {
            if new.generation == r.generation && !r.switched.contains(&slot) {
                r.switched.push(slot);
            }
        }
        self.advance(now);
    }

    /// Slot `slot`'s replacement `pid` failed (exited or not ready in
    /// time; `None`: could not be spawned). A recycle keeps the old
    /// worker; a reload stops: its other replacements are abandoned and
    /// switched slots go back to the previous generation.
    fn replacement_failed(&mut self, slot: usize, pid: Option<u32>, now: Instant) {
        self.actions
            .push(Action::Note(Note::ReplacementFailed { slot, pid }));
        let recycling = std::mem::take(&mut self.slots[slot].recycling);
        // A slot whose own worker died meanwhile restarts as it would have.
        self.restart_replacing(now);
        if recycling || self.stopping() {
            // A reload waiting for this slot moves on.
            self.advance(now);
            return;
        }
        let Some(r) = self.reload.take() else {
            return;
        };
        let kill_at = now + self.policy.stop_timeout;
        for (i, s) in self.slots.iter_mut().enumerate() {
            match s.incoming.take() {
                Some(Incoming::Running(mut w)) => {
                    if w.retire_kill_at.is_none() {
                        w.retire_kill_at = Some(kill_at);
                        self.actions.push(Action::Retire {
                            slot: i,
                            pid: w.pid,
                            why: RetireWhy::Abandoned,
                        });
                    }
                    w.watchdog_at = None;
                    s.draining.push(w);
                }
                Some(Incoming::Asked(_)) | None => {}
            }
            s.recycling = false;
        }
        self.restart_replacing(now);
        if let Some(original) = r.rollback_of {
            // The rollback itself failed: what serves, serves.
            self.generation = r.generation;
            self.end_with(ReloadReport {
                rolled_back: r.switched.len(),
                ..original
            });
            return;
        }
        let report = ReloadReport {
            generation: r.generation,
            ok: false,
            failed: Some((slot, pid)),
            rolled_back: 0,
            stopped: false,
        };
        if r.switched.is_empty() {
            self.end_with(report);
            return;
        }
        self.actions.push(Action::Note(Note::RollingBack {
            slots: r.switched.len(),
            generation: r.previous,
        }));
        self.reload = Some(Reload {
            generation: r.previous,
            previous: r.generation,
            queue: r.switched.into(),
            switched: Vec::new(),
            rollback_of: Some(report),
        });
        self.advance(now);
    }

    /// Slots whose worker died while a replacement started, and that have
    /// no replacement any more, restart now.
    fn restart_replacing(&mut self, now: Instant) {
        let stopping = self.stopping();
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            if s.state == SlotState::Replacing && s.incoming.is_none() {
                if stopping || s.leaving {
                    s.state = SlotState::Done { succeeded: false };
                    continue;
                }
                let until = s.may_start_at(now);
                s.state = SlotState::Waiting { until };
                if until <= now {
                    s.state = SlotState::Waiting {
                        until: far_future(now),
                    };
                    self.actions.push(Action::Spawn {
                        slot,
                        replacement: false,
                    });
                }
            }
        }
    }

    /// Worker `pid` exited. `exec_failed`: it never ran (its execve
    /// failed). Returns its slot, its uptime, whether it had been asked to
    /// go, and its role, or `None` for a pid that is no slot's worker.
    pub(crate) fn exited(
        &mut self,
        pid: u32,
        facts: ExitFacts,
        exec_failed: bool,
        now: Instant,
    ) -> Option<Exited> {
        let (slot, role, w) = self.find(pid).map(|(s, r, w)| (s, r, *w))?;
        let uptime = facts.at.saturating_duration_since(w.started);
        let retired = w.retire_kill_at.is_some();
        let exited = Exited {
            slot,
            uptime,
            retired,
            role,
        };
        match role {
            Role::Current => {}
            Role::Draining => {
                self.slots[slot].draining.retain(|d| d.pid != pid);
                self.remove_gone();
                self.advance(now);
                return Some(exited);
            }
            Role::Incoming => {
                self.slots[slot].incoming = None;
                if self.stopping() {
                    self.restart_replacing(now);
                } else {
                    self.replacement_failed(slot, Some(pid), now);
                }
                return Some(exited);
            }
        }
        // Up long enough (or ready) and ended from outside (an OOM kill, an
        // operator's kill -9) or cleanly: it started successfully, and its
        // death is no crash-loop strike. A worker that fails by itself is a
        // strike whatever its uptime, so an app that fails a while after
        // starting still backs off.
        let healthy = (w.said_ready || uptime >= self.policy.min_uptime)
            && !facts.failed_by_itself
            && !w.failed_start;
        if healthy {
            self.served = true;
        }
        if self.stopping() {
            self.slots[slot].state = SlotState::Done {
                succeeded: facts.succeeded,
            };
            return Some(exited);
        }
        if self.slots[slot].leaving {
            // Scaled away: not replaced, and the slot goes once it is done.
            self.slots[slot].state = SlotState::Done {
                succeeded: facts.succeeded,
            };
            self.remove_gone();
            self.advance(now);
            return Some(exited);
        }
        if exec_failed {
            if !self.has_served(now, Some(slot)) {
                // The command cannot run at all: an error, not a crash loop.
                self.slots[slot].state = SlotState::Done { succeeded: false };
                self.begin_stop(End::CannotRun, now);
            } else {
                // After the cluster served (a deploy replaced the file under it).
                self.spawn_failed(slot, now);
                self.hold_for_replacement(slot);
            }
            return Some(exited);
        }
        if retired {
            // Asked to go: a replacement at once, and no mark against the slot.
            self.slots[slot].state = SlotState::Waiting { until: now };
            if !self.hold_for_replacement(slot) {
                self.slots[slot].state = SlotState::Waiting {
                    until: far_future(now),
                };
                self.actions.push(Action::Spawn {
                    slot,
                    replacement: false,
                });
            }
            return Some(exited);
        }
        let restart = match self.policy.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !facts.succeeded,
            RestartPolicy::Never => false,
        };
        if !restart {
            self.actions.push(Action::Note(Note::NotRestarted { slot }));
            self.slots[slot].state = SlotState::Done {
                succeeded: facts.succeeded,
            };
            return Some(exited);
        }
        self.schedule_restart(slot, uptime, healthy, now);
        if self.hold_for_replacement(slot) {
            return Some(exited);
        }
        if let SlotState::Waiting { until } = self.slots[slot].state {
            if until <= now {
                self.slots[slot].state = SlotState::Waiting {
                    until: far_future(now),
                };
                self.actions.push(Action::Spawn {
                    slot,
                    replacement: false,
                });
            }
        }
        Some(exited)
    }

    /// A slot waiting to restart whose replacement is starting waits for
    /// the replacement instead. Returns whether it does.
    fn hold_for_replacement(&mut self, slot: usize) -> bool {
        let s = &mut self.slots[slot];
        if s.incoming.is_some() && matches!(s.state, SlotState::Waiting { .. }) {
            s.state = SlotState::Replacing;
            true
        } else {
            false
        }
    }

    fn schedule_restart(&mut self, slot: usize, uptime: Duration, healthy: bool, now: Instant) {
        let jitter = self.jitter.sample();
        let policy = &self.policy;
        let s = &mut self.slots[slot];
        let delay = if healthy {
            s.intensity.reset();
            if uptime >= policy.backoff.stable {
                s.backoff = Backoff::new(policy.backoff);
            }
            if s.failed {
                self.actions.push(Action::Note(Note::Recovered { slot }));
            }
            s.failed = false;
            Duration::ZERO
        } else {
            let looping = s.intensity.record(now);
            let delay = s.backoff.next_delay(uptime, jitter);
            if looping && !s.failed {
                self.actions.push(Action::Note(Note::CrashLoop { slot }));
                if policy.on_crash_loop == CrashLoopAction::Exit {
                    s.state = SlotState::Done { succeeded: false };
                    self.begin_stop(End::CrashLoop { slot }, now);
                    return;
                }
                s.failed = true;
                if self.gave_up_booting(slot, now) {
                    return;
                }
                let cap = self.slots[slot].backoff.cap();
                self.actions.push(Action::Note(Note::Failed {
                    slot,
                    retry_every: cap,
                }));
            }
            let s = &self.slots[slot];
            if s.failed {
                s.backoff.cap()
            } else {
                delay
            }
        };
        let until = (now + delay).max(self.slots[slot].may_start_at(now));
        if until > now && self.slots[slot].incoming.is_none() {
            self.actions.push(Action::Note(Note::Restarting {
                slot,
                delay: until - now,
            }));
        }
        self.slots[slot].state = SlotState::Waiting { until };
    }

    /// A cluster in which no worker ever started and every slot is in a
    /// crash loop stops (gunicorn's "worker failed to boot") instead of
    /// holding a dead port open. Returns whether it did.
    fn gave_up_booting(&mut self, slot: usize, now: Instant) -> bool {
        if self.has_served(now, Some(slot)) {
            return false;
        }
        let all_failed = self.slots.iter().enumerate().all(|(i, s)| {
            i == slot || s.failed || matches!(s.state, SlotState::Done { succeeded: false })
        });
        if !all_failed {
            return false;
        }
        self.actions.push(Action::Note(Note::GaveUpBooting));
        self.slots[slot].state = SlotState::Done { succeeded: false };
        self.begin_stop(End::BootFailed { slot }, now);
        true
    }

    /// Retires slot `slot`'s worker (if it is `only`, when given): the
    /// shell asks it to drain (stop signal, or Node's disconnect); SIGKILL
    /// after the stop timeout; a fresh worker takes the slot when it exits.
    /// Returns the retired pid.
    pub(crate) fn retire(&mut self, slot: usize, only: Option<u32>, now: Instant) -> Option<u32> {
        let kill_at = now + self.policy.stop_timeout;
        match self.slots.get_mut(slot).map(|s| &mut s.state) {
            Some(SlotState::Running(w))
                if w.retire_kill_at.is_none() && only.is_none_or(|p| p == w.pid) =>
            {
                w.retire_kill_at = Some(kill_at);
                w.watchdog_at = None;
                Some(w.pid)
            }
            _ => None,
        }
    }

    /// A stop was asked for (SIGINT/SIGTERM, `ClusterHandle::stop`): the
    /// first begins the stop, a second kills at once. Returns whether this
    /// one began it.
    pub(crate) fn request_stop(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Running => {
                self.begin_stop(End::Stopped, now);
                true
            }
            Phase::Stopping { .. } => {
                self.kill_all();
                false
            }
        }
    }

    fn begin_stop(&mut self, end: End, now: Instant) {
        if self.stopping() {
            return;
        }
        self.phase = Phase::Stopping {
            kill_at: now + self.policy.stop_timeout,
            end,
            killed: false,
        };
        for s in &mut self.slots {
            if let SlotState::Waiting { .. } | SlotState::Replacing = s.state {
                s.state = SlotState::Done { succeeded: true };
            }
            if matches!(s.incoming, Some(Incoming::Asked(_))) {
                s.incoming = None;
            }
        }
        if let Some(r) = self.reload.take() {
            let report = r.rollback_of.unwrap_or(ReloadReport {
                generation: r.generation,
                ok: false,
                failed: None,
                rolled_back: 0,
                stopped: true,
            });
            self.actions.push(Action::ReloadEnded(ReloadReport {
                stopped: true,
                ..report
            }));
        }
        if std::mem::take(&mut self.reload_queued) {
            self.actions.push(Action::ReloadEnded(ReloadReport {
                generation: self.generation,
                ok: false,
                failed: None,
                rolled_back: 0,
                stopped: true,
            }));
        }
        self.actions.push(Action::StopAll);
    }

    fn kill_all(&mut self) {
        if let Phase::Stopping { killed, .. } = &mut self.phase {
            *killed = true;
        }
        self.actions.push(Action::KillAll);
    }

    /// The timer fired: due restarts, retire timeouts, readiness and
    /// watchdog deadlines, recycling, the stop timeout.
    pub(crate) fn timer(&mut self, now: Instant) {
        match self.phase {
            Phase::Stopping {
                kill_at,
                killed: false,
                ..
            } if now >= kill_at => {
                self.actions.push(Action::Note(Note::StopTimedOut));
                self.kill_all();
            }
            Phase::Stopping { .. } => {}
            Phase::Running => {
                // What the workers' deadlines decided, done once the loop
                // no longer borrows the slots.
                let mut promote = Vec::new();
                let mut failed = Vec::new();
                let mut recycle = Vec::new();
                let policy = &self.policy;
                for (slot, s) in self.slots.iter_mut().enumerate() {
                    if let SlotState::Waiting { until } = &mut s.state {
                        if *until <= now {
                            // Once: the shell answers with spawned/spawn_failed.
                            *until = far_future(now);
                            self.actions.push(Action::Spawn {
                                slot,
                                replacement: false,
                            });
                        }
                    }
                    if let SlotState::Running(w) = &mut s.state {
                        if worker_due(&mut self.actions, policy, slot, w, now).recycle {
                            recycle.push((slot, w.pid));
                        }
                    }
                    if let Some(Incoming::Running(w)) = &mut s.incoming {
                        let due = worker_due(&mut self.actions, policy, slot, w, now);
                        if due.not_ready {
                            failed.push((slot, w.pid));
                        } else if w.ready
                            && now.saturating_duration_since(w.started) >= policy.min_uptime
                        {
                            // Ready (said, or by the delay) and settled.
                            promote.push(slot);
                        }
                    }
                    for w in &mut s.draining {
                        worker_due(&mut self.actions, policy, slot, w, now);
                    }
                }
                for slot in promote {
                    self.promote(slot, now);
                }
                for (slot, pid) in failed {
                    // Killed; it is the reload's failure now, not at its exit.
                    let s = &mut self.slots[slot];
                    if let Some(Incoming::Running(mut w)) = s.incoming.take() {
                        w.retire_kill_at = Some(now);
                        w.retire_killed = true;
                        s.draining.push(w);
                    }
                    self.replacement_failed(slot, Some(pid), now);
                }
                for (slot, pid) in recycle {
                    if !self.recycle(slot, pid, RecycleWhy::Lifetime) {
                        // Busy: again a little later (not every tick).
                        if let SlotState::Running(w) = &mut self.slots[slot].state {
                            w.recycle_at = Some(now + RECYCLE_RETRY);
                        }
                    }
                }
            }
        }
    }

    /// When [`timer`](Self::timer) next has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Stopping {
                kill_at,
                killed: false,
                ..
            } => Some(kill_at),
            Phase::Stopping { .. } => None,
            Phase::Running => self
                .slots
                .iter()
                .flat_map(|s| {
                    let own = match s.state {
                        SlotState::Waiting { until } => Some(until),
                        SlotState::Running(w) => w.next_deadline(),
                        _ => None,
                    };
                    let incoming = match s.incoming {
                        // Ready and waiting to settle: promoted then.
                        Some(Incoming::Running(w)) if w.ready => {
                            [w.next_deadline(), Some(w.started + self.policy.min_uptime)]
                                .into_iter()
                                .flatten()
                                .min()
                        }
                        Some(Incoming::Running(w)) => w.next_deadline(),
                        _ => None,
                    };
                    let draining = s.draining.iter().filter_map(Worker::next_deadline).min();
                    [own, incoming, draining].into_iter().flatten()
                })
                .min(),
        }
    }

    /// Why the cluster ends, once every slot is done (the shell also waits
    /// for what is left of dead workers).
    pub(crate) fn finished(&self) -> Option<End> {
        if !self.slots.iter().all(Slot::gone) {
            return None;
        }
        Some(match self.phase {
            Phase::Stopping { end, .. } => end,
            Phase::Running => End::Finished {
                all_succeeded: self
                    .slots
                    .iter()
                    .all(|s| matches!(s.state, SlotState::Done { succeeded: true })),
            },
        })
    }
}

/// A lifetime recycle that could not begin (a reload or another recycle
/// runs) is tried again after this.
pub(crate) const RECYCLE_RETRY: Duration = Duration::from_secs(1);

/// What a worker's due deadlines decided beyond the actions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Due {
    /// It became ready by the delay.
    ready_by_delay: bool,
    /// It was not ready in time: killed, a failed start.
    not_ready: bool,
    /// It ran its `--max-lifetime`.
    recycle: bool,
}

/// Every deadline of `w` that is due, not just the first: one left due
/// would spin the supervisor.
fn worker_due(
    actions: &mut Vec<Action>,
    policy: &Policy,
    slot: usize,
    w: &mut Worker,
    now: Instant,
) -> Due {
    let mut due = Due::default();
    if !w.retire_killed && w.retire_kill_at.is_some_and(|t| t <= now) {
        w.retire_killed = true;
        actions.push(Action::Note(Note::RetireTimedOut { pid: w.pid }));
        actions.push(Action::Kill { pid: w.pid });
    }
    if w.watchdog_at.is_some_and(|t| t <= now) {
        Lifecycle::hang(actions, slot, w, now, false);
    }
    if !w.hung_killed && w.hung_kill_at.is_some_and(|t| t <= now) {
        w.hung_killed = true;
        actions.push(Action::Kill { pid: w.pid });
    }
    let pending = w.pending();
    if pending && w.ready_at.is_some_and(|t| t <= now) {
        w.ready = true;
        actions.push(Action::Note(Note::ReadyByDelay { slot, pid: w.pid }));
        due.ready_by_delay = true;
    } else if pending && w.ready_by.is_some_and(|t| t <= now) {
        w.failed_start = true;
        actions.push(Action::Note(Note::NotReady {
            slot,
            pid: w.pid,
            timeout: policy.ready_timeout.unwrap_or_default(),
        }));
        actions.push(Action::Kill { pid: w.pid });
        due.not_ready = true;
    }
    if w.recyclable() && w.recycle_at.is_some_and(|t| t <= now) {
        w.recycle_at = None;
        due.recycle = true;
    }
    due
}

impl Worker {
    /// Not ready yet, and still expected to be.
    fn pending(&self) -> bool {
        !self.ready && !self.failed_start && self.retire_kill_at.is_none()
    }

    /// Ready, and neither going nor hung.
    fn recyclable(&self) -> bool {
        self.ready && self.retire_kill_at.is_none() && self.hung_kill_at.is_none()
    }

    fn next_deadline(&self) -> Option<Instant> {
        let retire = self.retire_kill_at.filter(|_| !self.retire_killed);
        let pending = self.pending();
        let ready = self.ready_at.filter(|_| pending);
        let timeout = self.ready_by.filter(|_| pending);
        let hung = self.hung_kill_at.filter(|_| !self.hung_killed);
        let recycle = self.recycle_at.filter(|_| self.recyclable());
        [retire, ready, timeout, self.watchdog_at, hung, recycle]
            .into_iter()
            .flatten()
            .min()
    }
}

/// What [`Lifecycle::exited`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exited {
    pub(crate) slot: usize,
    pub(crate) uptime: Duration,
    /// It had been asked to go (retired, replaced, abandoned).
    pub(crate) retired: bool,
    pub(crate) role: Role,
}

/// Slot `s`'s worker `pid` in role `role`.
fn worker_in(s: &mut Slot, role: Role, pid: u32) -> Option<&mut Worker> {
    match role {
        Role::Current => match &mut s.state {
            SlotState::Running(w) if w.pid == pid => Some(w),
            _ => None,
        },
        Role::Incoming => match &mut s.incoming {
            Some(Incoming::Running(w)) if w.pid == pid => Some(w),
            _ => None,
        },
        Role::Draining => s.draining.iter_mut().find(|w| w.pid == pid),
    }
}

/// A deadline that never comes (a spawn asked for and not yet answered).
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(86400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> Policy {
        Policy {
            restart: RestartPolicy::Always,
            backoff: BackoffPolicy::default(),
            max_restarts: 5,
            within: Duration::from_secs(30),
            on_crash_loop: CrashLoopAction::Retry,
            min_uptime: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(10),
            ready_delay: None,
            ready_timeout: None,
            watchdog: None,
            reload_surge: 1,
            max_lifetime: None,
        }
    }

    /// A shell that performs the core's actions on fake processes and
    /// checks, after every step, what must always hold.
    struct Sim {
        lc: Lifecycle,
        now: Instant,
        next_pid: u32,
        /// Live processes: pid → slot.
        alive: Vec<(u32, usize)>,
        /// Each process's generation.
        gens: std::collections::HashMap<u32, u64>,
        spawns: usize,
        spawn_fails: bool,
        surge: usize,
        /// Generations whose workers never say they are ready.
        bad: std::collections::HashSet<u64>,
        next_gen: u64,
        /// The next queued reload's generation is bad.
        queued_bad: bool,
        /// The running reload: its generation, each slot's generation when
        /// it began (`None` once the cluster was resized meanwhile), and
        /// how many replacements failed.
        reload: Option<(u64, Option<Vec<u64>>, usize)>,
        /// Workers asked to go because their slot was scaled away: they
        /// drain beside the slot's next worker if a scale-up takes the slot
        /// back, outside the surge bound (a scale-down, not a replacement).
        scaled_away: std::collections::HashSet<u32>,
    }

    impl Sim {
        fn new(policy: Policy, workers: usize) -> Sim {
            let now = Instant::now();
            let surge = policy.reload_surge;
            let mut sim = Sim {
                lc: Lifecycle::new(policy, workers, Jitter::seeded(7), now),
                now,
                next_pid: 100,
                alive: Vec::new(),
                gens: Default::default(),
                spawns: 0,
                spawn_fails: false,
                surge,
                bad: Default::default(),
                next_gen: 1,
                queued_bad: false,
                reload: None,
                scaled_away: std::collections::HashSet::new(),
            };
            sim.perform();
            sim
        }

        fn perform(&mut self) {
            loop {
                let actions = self.lc.take_actions();
                if actions.is_empty() {
                    break;
                }
                for a in actions {
                    match a {
                        Action::Spawn { slot, replacement } => {
                            let Some(generation) = self.lc.spawn_wanted(slot, replacement) else {
                                continue;
                            };
                            // A second live worker in a slot only as its
                            // own worker's replacement.
                            let own = self.lc.worker(slot).map(|w| w.pid);
                            let others: Vec<u32> = self
                                .alive
                                .iter()
                                .filter(|(p, s)| {
                                    *s == slot
                                        && Some(*p) != own
                                        && !matches!(self.lc.find(*p), Some((_, Role::Draining, _)))
                                })
                                .map(|(p, _)| *p)
                                .collect();
                            assert!(
                                others.is_empty(),
                                "spawn into slot {slot} which has live {others:?} beside {own:?}"
                            );
                            assert!(!self.lc.stopping(), "no spawn while stopping");
                            if self.spawn_fails {
                                self.lc.spawn_failed(slot, self.now);
                            } else {
                                self.next_pid += 1;
                                self.spawns += 1;
                                self.alive.push((self.next_pid, slot));
                                self.gens.insert(self.next_pid, generation);
                                self.lc.spawned(slot, self.next_pid, self.now);
                                assert_eq!(
                                    self.lc.find(self.next_pid).map(|(_, _, w)| w.generation),
                                    Some(generation)
                                );
                            }
                        }
                        Action::Retire {
                            pid,
                            why: RetireWhy::ScaledAway,
                            ..
                        } => {
                            self.scaled_away.insert(pid);
                        }
                        Action::Retire {
                            slot,
                            why: RetireWhy::Replaced,
                            ..
                        } => {
                            // Asked to drain only once its replacement, now
                            // the slot's worker, is ready.
                            let w = self.lc.worker(slot).expect("a replacement");
                            assert!(
                                w.ready,
                                "slot {slot} drained before its replacement was ready"
                            );
                            assert!(
                                self.now - w.started >= self.lc.policy.min_uptime,
                                "slot {slot} drained before its replacement settled"
                            );
                        }
                        Action::Note(Note::ReplacementFailed { .. }) => {
                            if let Some((_, _, failures)) = &mut self.reload {
                                *failures += 1;
                            }
                        }
                        Action::ReloadEnded(report) => {
                            let Some((generation, before, failures)) = self.reload.take() else {
                                // The queued one, answered at a stop.
                                assert!(report.stopped, "{report:?} without a reload");
                                continue;
                            };
                            assert_eq!(report.generation, generation);
                            for slot in 0..self.lc.slots() {
                                let Some(w) = self.lc.worker(slot) else {
                                    continue;
                                };
                                if self.lc.slots[slot].leaving {
                                    continue; // going, not reloaded
                                }
                                if report.ok {
                                    assert_eq!(
                                        w.generation, generation,
                                        "slot {slot} after {report:?}"
                                    );
                                } else if let Some(before) =
                                    before.as_ref().filter(|_| !report.stopped && failures == 1)
                                {
                                    // A clean rollback: every slot runs what
                                    // it ran before.
                                    assert_eq!(
                                        w.generation, before[slot],
                                        "slot {slot} after {report:?}"
                                    );
                                }
                            }
                        }
                        Action::ReloadNext => {
                            let bad = self.queued_bad;
                            self.start_reload(bad);
                        }
                        Action::StopAll
                        | Action::Kill { .. }
                        | Action::Abort { .. }
                        | Action::Retire { .. }
                        | Action::Note(_) => {}
                        Action::RemoveSlot { slot } => {
                            assert!(slot >= self.lc.slots(), "only the last slots go");
                            assert!(
                                self.alive.iter().all(|(_, s)| *s != slot),
                                "slot {slot} removed with a live worker"
                            );
                        }
                        Action::KillAll => {
                            // Everything dies (reported later by exits).
                        }
                    }
                }
            }
            self.check();
        }

        fn start_reload(&mut self, bad: bool) {
            let generation = self.next_gen;
            self.next_gen += 1;
            if bad {
                self.bad.insert(generation);
            }
            let before = (0..self.lc.slots())
                .map(|i| self.lc.slots[i].generation)
                .collect();
            match self.lc.reload(generation, self.now) {
                ReloadStart::Started => {
                    assert!(self.reload.is_none());
                    self.reload = Some((generation, Some(before), 0));
                }
                ReloadStart::Queued => {
                    self.next_gen -= 1;
                    self.queued_bad = bad;
                }
                ReloadStart::Stopping => {}
            }
        }

        fn check(&self) {
            // Every live process is accounted to exactly its slot, once.
            for (pid, slot) in &self.alive {
                assert_eq!(
                    self.lc.find(*pid).map(|(s, _, _)| s),
                    Some(*slot),
                    "pid {pid}"
                );
            }
            for slot in 0..self.lc.slots() {
                if let SlotState::Running(w) = self.lc.state(slot) {
                    assert!(self.alive.contains(&(w.pid, slot)));
                }
            }
            // Never more than the slots and the surge (and what was
            // scaled away, draining).
            let counted = self
                .alive
                .iter()
                .filter(|(pid, _)| !self.scaled_away.contains(pid))
                .count();
            assert!(
                counted <= self.lc.slots() + self.surge,
                "{counted} alive in {} slots (surge {})",
                self.lc.slots(),
                self.surge
            );
            // A finished cluster has no live worker.
            if self.lc.finished().is_some() {
                assert!(self.alive.is_empty(), "finished with {:?}", self.alive);
            }
        }

        /// Worker `pid` exits (cleanly, or failing by itself); its report.
        fn exit_pid(&mut self, pid: u32, failed: bool) -> Option<Exited> {
            self.alive.retain(|(p, _)| *p != pid);
            let facts = ExitFacts {
                at: self.now,
                succeeded: !failed,
                failed_by_itself: failed,
            };
            self.lc.exited(pid, facts, false, self.now)
        }

        fn exit(&mut self, i: usize, kind: u8) {
            if self.alive.is_empty() {
                return;
            }
            let (pid, _) = self.alive.remove(i % self.alive.len());
            let facts = ExitFacts {
                at: self.now,
                succeeded: kind == 0,
                failed_by_itself: kind == 1,
            };
            let got = self.lc.exited(pid, facts, false, self.now);
            assert!(got.is_some(), "every exit is accounted to a slot");
            self.perform();
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Wait(u64),
        Exit(usize, u8),
        Ready(usize),
        Retire(usize),
        Stop,
        Fork,
        SpawnFails(bool),
        Heartbeat(usize),
        Trigger(usize),
        Scale(usize),
        Reload(bool),
        Recycle(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..40_000).prop_map(Step::Wait),
            (0usize..8, 0u8..3).prop_map(|(i, k)| Step::Exit(i, k)),
            (0usize..8).prop_map(Step::Ready),
            (0usize..8).prop_map(Step::Retire),
            Just(Step::Stop),
            Just(Step::Fork),
            any::<bool>().prop_map(Step::SpawnFails),
            (0usize..8).prop_map(Step::Heartbeat),
            (0usize..8).prop_map(Step::Trigger),
            (0usize..7).prop_map(Step::Scale),
            any::<bool>().prop_map(Step::Reload),
            (0usize..8).prop_map(Step::Recycle),
        ]
    }

    proptest! {
        /// Whatever happens: never two workers in a slot, never a spawn
        /// while stopping, every exit accounted to one slot, a stop always
        /// ends with no live worker, and a slot never starts more than
        /// START_BURST workers in START_WINDOW.
        #[test]
        fn invariants_hold(
            workers in 1usize..5,
            surge in 1usize..3,
            ready_delay in any::<bool>(),
            lifetime in any::<bool>(),
            steps in proptest::collection::vec(step(), 0..120),
            exit_on_crash_loop in any::<bool>(),
            watchdog in any::<bool>(),
            ready_timeout in any::<bool>(),
        ) {
            let mut p = policy();
            if watchdog {
                p.watchdog = Some(Duration::from_secs(3));
            }
            if ready_timeout {
                p.ready_timeout = Some(Duration::from_secs(5));
            }
            if exit_on_crash_loop {
                p.on_crash_loop = CrashLoopAction::Exit;
            }
            if ready_delay {
                p.ready_delay = Some(Duration::from_secs(1));
            }
            p.reload_surge = surge;
            if lifetime {
                p.max_lifetime = Some(Duration::from_secs(4));
            }
            p.backoff.initial = Duration::from_millis(10);
            let mut sim = Sim::new(p, workers);
            let mut starts: Vec<Instant> = Vec::new();
            for s in steps {
                match s {
                    Step::Wait(ms) => {
                        sim.now += Duration::from_millis(ms);
                        if let Some(d) = sim.lc.next_deadline() {
                            if d <= sim.now {
                                sim.lc.timer(sim.now);
                                sim.perform();
                                // What was due was done: a deadline left in
                                // the past would spin the supervisor.
                                if let Some(next) = sim.lc.next_deadline() {
                                    prop_assert!(next > sim.now, "timer still due after firing");
                                }
                            }
                        }
                    }
                    Step::Exit(i, k) => sim.exit(i, k),
                    Step::Ready(i) => {
                        if let Some((pid, _)) = sim.alive.get(i % sim.alive.len().max(1)) {
                            if !sim.bad.contains(&sim.gens[pid]) {
                                sim.lc.ready(*pid, sim.now);
                                sim.perform();
                            }
                        }
                    }
                    Step::Reload(bad) => {
                        sim.start_reload(bad);
                        sim.perform();
                    }
                    Step::Recycle(i) => {
                        let slot = i % sim.lc.slots();
                        if let Some(pid) = sim.lc.worker(slot).map(|w| w.pid) {
                            sim.lc.recycle(slot, pid, RecycleWhy::Memory);
                            sim.perform();
                        }
                    }
                    Step::Retire(i) => {
                        let slot = i % sim.lc.slots();
                        sim.lc.retire(slot, None, sim.now);
                    }
                    Step::Stop => {
                        sim.lc.request_stop(sim.now);
                        sim.perform();
                    }
                    Step::Fork => {
                        if let Some((_, before, _)) = &mut sim.reload {
                            *before = None;
                        }
                        if let Some((slot, generation)) = sim.lc.add_slot(sim.now) {
                            if sim.spawn_fails {
                                sim.lc.remove_last_slot();
                            } else {
                                sim.next_pid += 1;
                                sim.spawns += 1;
                                sim.alive.push((sim.next_pid, slot));
                                sim.gens.insert(sim.next_pid, generation);
                                sim.lc.spawned(slot, sim.next_pid, sim.now);
                            }
                        }
                        sim.perform();
                    }
                    Step::SpawnFails(f) => sim.spawn_fails = f,
                    Step::Scale(n) => {
                        if let Some((_, before, _)) = &mut sim.reload {
                            *before = None;
                        }
                        // Every process of a slot that leaves was scaled
                        // away: it drains outside the bound, also once a
                        // scale-up takes its slot back for a new worker.
                        let leaving = |sim: &Sim| -> Vec<u32> {
                            sim.alive
                                .iter()
                                .filter(|(_, slot)| sim.lc.leaving(*slot))
                                .map(|(p, _)| *p)
                                .collect()
                        };
                        let before = leaving(&sim);
                        let slots_before = sim.lc.slots();
                        let size = sim.lc.scale(n, sim.now);
                        if !sim.lc.stopping() {
                            prop_assert_eq!(size, n.max(1));
                        }
                        // Slot numbers stay dense: a new slot is added only
                        // once no slot is leaving (those are taken back first).
                        prop_assert!(
                            sim.lc.slots() <= slots_before
                                || (0..sim.lc.slots()).all(|s| !sim.lc.leaving(s)),
                            "a slot added while another is leaving"
                        );
                        sim.perform();
                        sim.scaled_away.extend(before);
                        let after = leaving(&sim);
                        sim.scaled_away.extend(after);
                    }
                    Step::Heartbeat(i) => {
                        if let Some((pid, _)) = sim.alive.get(i % sim.alive.len().max(1)) {
                            sim.lc.heartbeat(*pid, sim.now);
                        }
                    }
                    Step::Trigger(i) => {
                        if let Some((pid, _)) = sim.alive.get(i % sim.alive.len().max(1)) {
                            sim.lc.watchdog_trigger(*pid, sim.now);
                            sim.perform();
                        }
                    }
                }
                starts.push(sim.now);
            }
            // Stop, let every worker exit, and the cluster is finished.
            sim.lc.request_stop(sim.now);
            sim.perform();
            while !sim.alive.is_empty() {
                sim.exit(0, 2);
            }
            prop_assert!(sim.lc.finished().is_some());
        }

        /// However fast workers die, a slot starts at most START_BURST
        /// workers per START_WINDOW.
        #[test]
        fn restarts_are_rate_limited(exits in 1usize..200) {
            let mut p = policy();
            p.backoff.initial = Duration::ZERO;
            p.backoff.max = Duration::ZERO;
            p.max_restarts = 1_000_000;
            let mut sim = Sim::new(p, 1);
            let start = sim.now;
            for _ in 0..exits {
                sim.exit(0, 1);
                sim.now += Duration::from_millis(1);
                if let Some(d) = sim.lc.next_deadline() {
                    if d <= sim.now {
                        sim.lc.timer(sim.now);
                        sim.perform();
                    }
                }
            }
            let elapsed = sim.now - start;
            let windows = elapsed.as_millis() as usize / START_WINDOW.as_millis() as usize + 1;
            prop_assert!(sim.spawns <= START_BURST * windows + 1, "{} spawns in {:?}", sim.spawns, elapsed);
        }
    }

    #[test]
    fn a_healthy_worker_is_replaced_at_once_and_a_quick_failure_backs_off() {
        let mut sim = Sim::new(policy(), 1);
        sim.now += Duration::from_secs(5);
        sim.exit(0, 2); // killed from outside after 5 s: healthy
        assert_eq!(sim.alive.len(), 1, "replaced at once");
        sim.exit(0, 1); // failed by itself at once: a strike, immediate first restart
        assert_eq!(sim.alive.len(), 1);
        sim.exit(0, 1); // the second quick failure waits
        assert!(sim.alive.is_empty());
        assert!(matches!(sim.lc.state(0), SlotState::Waiting { until } if until > sim.now));
    }

    #[test]
    fn no_worker_ever_started_gives_up_booting() {
        let mut p = policy();
        p.max_restarts = 2;
        p.backoff.initial = Duration::from_millis(1);
        let mut sim = Sim::new(p, 2);
        for _ in 0..50 {
            if sim.lc.finished().is_some() {
                break;
            }
            sim.exit(0, 1);
            sim.now += Duration::from_secs(1);
            sim.lc.timer(sim.now);
            sim.perform();
        }
        while !sim.alive.is_empty() {
            sim.exit(0, 2);
        }
        assert!(matches!(sim.lc.finished(), Some(End::BootFailed { .. })));
    }

    #[test]
    fn a_worker_not_ready_in_time_is_killed_and_counts_as_a_failed_start() {
        let mut p = policy();
        p.ready_timeout = Some(Duration::from_secs(30));
        let mut sim = Sim::new(p, 1);
        let pid = sim.alive[0].0;
        assert_eq!(
            sim.lc.next_deadline(),
            Some(sim.now + Duration::from_secs(30))
        );
        sim.now += Duration::from_secs(30);
        sim.lc.timer(sim.now);
        let actions = sim.lc.take_actions();
        assert!(actions.contains(&Action::Kill { pid }), "{actions:?}");
        // Its death (SIGKILL, after 30 s up) is a strike, not a healthy exit:
        // the next one is the immediate first restart, the one after waits.
        sim.exit(0, 2);
        assert_eq!(sim.alive.len(), 1);
        // A ready worker is not killed by the timeout.
        let pid = sim.alive[0].0;
        assert!(sim.lc.ready(pid, sim.now));
        assert!(!sim.lc.ready(pid, sim.now), "ready is news once");
        sim.now += Duration::from_secs(60);
        sim.lc.timer(sim.now);
        assert!(!sim.lc.take_actions().contains(&Action::Kill { pid }));
    }

    #[test]
    fn a_worker_silent_past_its_watchdog_gets_sigabrt_then_sigkill() {
        let mut p = policy();
        p.watchdog = Some(Duration::from_secs(2));
        let mut sim = Sim::new(p, 1);
        let pid = sim.alive[0].0;
        // No timer until its first heartbeat.
        assert_eq!(sim.lc.next_deadline(), None);
        sim.lc.heartbeat(pid, sim.now);
        sim.now += Duration::from_secs(1);
        sim.lc.heartbeat(pid, sim.now);
        assert_eq!(
            sim.lc.next_deadline(),
            Some(sim.now + Duration::from_secs(2))
        );
        sim.now += Duration::from_secs(2);
        sim.lc.timer(sim.now);
        let actions = sim.lc.take_actions();
        assert!(actions.contains(&Action::Abort { pid }), "{actions:?}");
        sim.now += WATCHDOG_ABORT_GRACE;
        sim.lc.timer(sim.now);
        assert!(sim.lc.take_actions().contains(&Action::Kill { pid }));
        // WATCHDOG=trigger: hung at once.
        sim.exit(0, 1);
        let pid = sim.alive[0].0;
        sim.lc.watchdog_trigger(pid, sim.now);
        assert!(sim.lc.take_actions().contains(&Action::Abort { pid }));
    }

    #[test]
    fn a_zero_watchdog_is_off_from_the_library_too() {
        let mut config = ClusterConfig::new(crate::WorkerCommand::current_exe().unwrap());
        config.watchdog = Some(Duration::ZERO);
        config.ready_timeout = Duration::ZERO;
        config.ready = ReadyMode::Notify;
        let p = Policy::from_config(&config);
        assert_eq!((p.watchdog, p.ready_timeout), (None, None));
    }

    #[test]
    fn a_silent_worker_is_ready_after_the_delay() {
        let mut p = policy();
        p.ready_delay = Some(Duration::from_millis(500));
        let mut sim = Sim::new(p, 1);
        let pid = sim.alive[0].0;
        sim.now += Duration::from_millis(500);
        sim.lc.timer(sim.now);
        let actions = sim.lc.take_actions();
        assert!(
            actions.contains(&Action::Note(Note::ReadyByDelay { slot: 0, pid })),
            "{actions:?}"
        );
        assert!(sim.lc.worker(0).unwrap().ready);
    }

    #[test]
    fn a_stop_kills_what_is_left_at_the_stop_timeout() {
        let mut sim = Sim::new(policy(), 2);
        assert!(sim.lc.request_stop(sim.now));
        assert_eq!(
            sim.lc.next_deadline(),
            Some(sim.now + Duration::from_secs(10))
        );
        sim.now += Duration::from_secs(10);
        sim.lc.timer(sim.now);
        let actions = sim.lc.take_actions();
        assert!(actions.contains(&Action::KillAll), "{actions:?}");
        // A second request kills at once too.
        assert!(!sim.lc.request_stop(sim.now));
    }

    fn replacements(actions: &[Action]) -> Vec<usize> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn {
                    slot,
                    replacement: true,
                } => Some(*slot),
                _ => None,
            })
            .collect()
    }

    /// Performs the actions of `step` one by one, returning them.
    fn act(sim: &mut Sim, step: impl FnOnce(&mut Sim)) -> Vec<Action> {
        step(sim);
        let actions = sim.lc.take_actions();
        sim.lc.actions = actions.clone();
        sim.perform();
        actions
    }

    #[test]
    fn a_reload_replaces_slot_by_slot_each_new_worker_ready_first() {
        let mut sim = Sim::new(policy(), 2);
        let old: Vec<u32> = sim.alive.iter().map(|(p, _)| *p).collect();
        let actions = act(&mut sim, |sim| sim.start_reload(false));
        assert!(sim.lc.reload.is_some());
        assert_eq!(replacements(&actions), vec![0], "one at a time (surge 1)");
        let new0 = sim.alive.last().unwrap().0;
        assert_eq!(
            sim.lc.find(new0).map(|(s, r, _)| (s, r)),
            Some((0, Role::Incoming))
        );
        // Not ready: nothing drains, nothing more starts.
        sim.now += Duration::from_secs(5);
        sim.lc.timer(sim.now);
        assert!(sim.lc.take_actions().is_empty());
        // A second request while it runs is queued.
        sim.start_reload(false);
        assert!(sim.lc.reload_queued);
        sim.now += Duration::from_secs(1); // up --min-uptime: settled
        let actions = act(&mut sim, |sim| {
            sim.lc.ready(new0, sim.now);
        });
        assert!(actions.contains(&Action::Retire {
            slot: 0,
            pid: old[0],
            why: RetireWhy::Replaced
        }));
        assert!(
            replacements(&actions).is_empty(),
            "the next waits for the old to exit"
        );
        let actions = act(&mut sim, |sim| {
            let e = sim.exit_pid(old[0], false).unwrap();
            assert_eq!((e.slot, e.role, e.retired), (0, Role::Draining, true));
        });
        assert_eq!(replacements(&actions), vec![1]);
        let new1 = sim.alive.last().unwrap().0;
        sim.now += Duration::from_secs(1); // up --min-uptime: settled
        act(&mut sim, |sim| {
            sim.lc.ready(new1, sim.now);
        });
        let actions = act(&mut sim, |sim| {
            sim.exit_pid(old[1], false);
        });
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::ReloadEnded(r) if r.ok && r.generation == 1)),
            "{actions:?}"
        );
        assert!(
            actions.contains(&Action::ReloadNext),
            "the queued reload follows"
        );
        assert_eq!(sim.lc.worker(0).unwrap().generation, 1);
        assert_eq!(sim.lc.worker(1).unwrap().generation, 1);
    }

    #[test]
    fn a_failed_replacement_rolls_the_reload_back() {
        let mut p = policy();
        p.reload_surge = 1;
        let mut sim = Sim::new(p, 3);
        let old: Vec<u32> = sim.alive.iter().map(|(p, _)| *p).collect();
        act(&mut sim, |sim| sim.start_reload(false));
        // Slot 0 switches.
        let new0 = sim.alive.last().unwrap().0;
        sim.now += Duration::from_secs(1); // up --min-uptime: settled
        act(&mut sim, |sim| {
            sim.lc.ready(new0, sim.now);
        });
        act(&mut sim, |sim| {
            sim.exit_pid(old[0], false);
        });
        // Slot 1's new worker dies before it is ready: the old one is
        // never asked to go, and slot 0 is reloaded back.
        let bad = sim.alive.last().unwrap().0;
        let actions = act(&mut sim, |sim| {
            sim.exit_pid(bad, true);
        });
        assert!(!actions
            .iter()
            .any(|a| matches!(a, Action::Retire { pid, .. } if *pid == old[1])));
        assert_eq!(replacements(&actions), vec![0], "{actions:?}");
        let back = sim.alive.last().unwrap().0;
        assert_eq!(sim.lc.find(back).unwrap().2.generation, 0);
        sim.now += Duration::from_secs(1); // up --min-uptime: settled
        act(&mut sim, |sim| {
            sim.lc.ready(back, sim.now);
        });
        let actions = act(&mut sim, |sim| {
            sim.exit_pid(new0, false);
        });
        let report = actions
            .iter()
            .find_map(|a| match a {
                Action::ReloadEnded(r) => Some(*r),
                _ => None,
            })
            .expect("ended");
        assert_eq!(
            report,
            ReloadReport {
                generation: 1,
                ok: false,
                failed: Some((1, Some(bad))),
                rolled_back: 1,
                stopped: false
            }
        );
        for slot in 0..3 {
            assert_eq!(sim.lc.worker(slot).unwrap().generation, 0);
        }
        assert_eq!(sim.lc.worker(1).unwrap().pid, old[1]);
        assert_eq!(sim.lc.worker(2).unwrap().pid, old[2]);
    }

    /// A replacement that says it is ready at once and dies before
    /// `--min-uptime` (gunicorn's master says READY=1 before its workers
    /// load the app) never replaced anything: the old worker was not asked
    /// to drain, and the reload failed.
    #[test]
    fn a_replacement_must_live_min_uptime_before_the_old_worker_drains() {
        let mut sim = Sim::new(policy(), 1);
        let old = sim.alive[0].0;
        act(&mut sim, |sim| sim.start_reload(false));
        let new = sim.alive.last().unwrap().0;
        let actions = act(&mut sim, |sim| {
            assert!(sim.lc.ready(new, sim.now));
        });
        assert!(actions.is_empty(), "not settled yet: {actions:?}");
        assert_eq!(
            sim.lc.next_deadline(),
            Some(sim.now + Duration::from_secs(1))
        );
        sim.now += Duration::from_millis(600);
        let actions = act(&mut sim, |sim| {
            sim.exit_pid(new, true);
        });
        assert!(!actions.iter().any(|a| matches!(a, Action::Retire { .. })));
        assert!(actions
            .iter()
            .any(|a| matches!(a, Action::ReloadEnded(r) if !r.ok)));
        assert_eq!(sim.lc.worker(0).unwrap().pid, old);
        // One that lives on is promoted by the timer once settled.
        act(&mut sim, |sim| sim.start_reload(false));
        let new = sim.alive.last().unwrap().0;
        act(&mut sim, |sim| {
            sim.lc.ready(new, sim.now);
        });
        sim.now += Duration::from_secs(1);
        let actions = act(&mut sim, |sim| sim.lc.timer(sim.now));
        assert!(actions.contains(&Action::Retire {
            slot: 0,
            pid: old,
            why: RetireWhy::Replaced
        }));
    }
}
