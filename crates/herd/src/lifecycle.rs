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
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Start a worker in `slot`; answer with [`Lifecycle::spawned`] or
    /// [`Lifecycle::spawn_failed`].
    Spawn { slot: usize },
    /// Send the stop signal to every live worker (the cluster is stopping).
    StopAll,
    /// SIGKILL every live worker and what is left of dead ones.
    KillAll,
    /// SIGKILL one worker (retired past its stop timeout, not ready in
    /// time, hung past its abort grace).
    Kill { pid: u32 },
    /// SIGABRT one hung worker (core dumps stay possible).
    Abort { pid: u32 },
    /// Ask one worker to drain and go (stop signal, or Node's disconnect):
    /// its slot is being scaled away. SIGKILL follows at the stop timeout.
    Retire { slot: usize, pid: u32 },
    /// The last slot is gone (scaled away, its worker exited).
    RemoveSlot { slot: usize },
    /// Log this.
    Note(Note),
}

/// A live worker as the lifecycle sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Worker {
    pub(crate) pid: u32,
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
    /// Retired (disconnected): SIGKILL at this time if still alive.
    pub(crate) retire_kill_at: Option<Instant>,
    /// It got that SIGKILL.
    pub(crate) retire_killed: bool,
}

/// One slot's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// A worker is alive.
    Running(Worker),
    /// Waiting to start the next worker.
    Waiting { until: Instant },
    /// Not running and not coming back (restart policy, or stopping).
    Done { succeeded: bool },
}

#[derive(Debug, Clone)]
struct Slot {
    state: SlotState,
    backoff: Backoff,
    intensity: Intensity,
    failed: bool,
    /// When its last few workers were started (at most `START_BURST`).
    starts: VecDeque<Instant>,
    /// It is being scaled away: its worker is not replaced, and the slot is
    /// removed once it is done (leaving slots are always the last ones).
    leaving: bool,
}

impl Slot {
    fn new(policy: &Policy, now: Instant) -> Slot {
        Slot {
            state: SlotState::Waiting { until: now },
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
    actions: Vec<Action>,
}

impl Lifecycle {
    /// `workers` slots, each to be started at once ([`Action::Spawn`]).
    pub(crate) fn new(policy: Policy, workers: usize, jitter: Jitter, now: Instant) -> Lifecycle {
        let mut lc = Lifecycle {
            slots: (0..workers).map(|_| Slot::new(&policy, now)).collect(),
            policy,
            phase: Phase::Running,
            served: false,
            jitter,
            actions: Vec::new(),
        };
        for slot in 0..workers {
            lc.actions.push(Action::Spawn { slot });
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
    #[cfg(test)]
    pub(crate) fn state(&self, slot: usize) -> SlotState {
        self.slots[slot].state
    }

    /// Slot `slot`'s live worker.
    pub(crate) fn worker(&self, slot: usize) -> Option<&Worker> {
        match &self.slots.get(slot)?.state {
            SlotState::Running(w) => Some(w),
            _ => None,
        }
    }

    /// The slot whose live worker is `pid`.
    pub(crate) fn slot_of(&self, pid: u32) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| matches!(s.state, SlotState::Running(w) if w.pid == pid))
    }

    /// The phase.
    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the cluster is stopping.
    pub(crate) fn stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }

    /// Adds a slot (Node's `cluster.fork()`); the shell starts its first
    /// worker at once and reports it with [`spawned`](Self::spawned) (or
    /// takes the slot back with [`remove_last_slot`](Self::remove_last_slot)).
    /// `None` while stopping.
    pub(crate) fn add_slot(&mut self, now: Instant) -> Option<usize> {
        if self.stopping() {
            return None;
        }
        // Its start is the shell's to make now, not the timer's.
        let mut slot = Slot::new(&self.policy, now);
        slot.state = SlotState::Waiting {
            until: far_future(now),
        };
        self.slots.push(slot);
        Some(self.slots.len() - 1)
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
            // A slot that left and is done (a gap), else a new one; a slot
            // whose worker is still draining stays gone, so the new worker
            // starts now rather than when that one exits.
            let reuse = self
                .slots
                .iter()
                .position(|s| s.leaving && matches!(s.state, SlotState::Done { .. }));
            let slot = match reuse {
                Some(i) => {
                    self.slots[i] = Slot::new(&self.policy, now);
                    i
                }
                None => {
                    self.slots.push(Slot::new(&self.policy, now));
                    self.slots.len() - 1
                }
            };
            self.slots[slot].state = SlotState::Waiting {
                until: far_future(now),
            };
            self.actions.push(Action::Spawn { slot });
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
            match &mut s.state {
                SlotState::Running(w) => {
                    if w.retire_kill_at.is_none() {
                        w.retire_kill_at = Some(kill_at);
                        // A draining worker may go quiet: no watchdog.
                        w.watchdog_at = None;
                        self.actions.push(Action::Retire {
                            slot: i,
                            pid: w.pid,
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
        self.active()
    }

    /// Removes the trailing slots that left and are done.
    fn remove_gone(&mut self) {
        while self
            .slots
            .last()
            .is_some_and(|s| s.leaving && matches!(s.state, SlotState::Done { .. }))
        {
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
            self.slots.pop();
        }
    }

    /// The shell started a worker in `slot`.
    pub(crate) fn spawned(&mut self, slot: usize, pid: u32, now: Instant) {
        let s = &mut self.slots[slot];
        if s.starts.len() >= START_BURST {
            s.starts.pop_front();
        }
        s.starts.push_back(now);
        s.state = SlotState::Running(Worker {
            pid,
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
        });
    }

    /// The shell could not start a worker in `slot` (fork failed, or its
    /// execve failed after the cluster had served): backed off like a crash
    /// at start, and no sooner than [`SPAWN_RETRY_MIN`].
    pub(crate) fn spawn_failed(&mut self, slot: usize, now: Instant) {
        if self.stopping() || self.slots[slot].leaving {
            self.slots[slot].state = SlotState::Done { succeeded: false };
            return;
        }
        self.schedule_restart(slot, Duration::ZERO, false, now);
        if let SlotState::Waiting { until } = &mut self.slots[slot].state {
            *until = (*until).max(now + SPAWN_RETRY_MIN);
        }
    }

    /// A worker said it is ready: it started successfully. Returns
    /// whether that is news (it was not ready before).
    pub(crate) fn ready(&mut self, pid: u32) -> bool {
        let Some(slot) = self.slot_of(pid) else {
            return false;
        };
        match &mut self.slots[slot].state {
            SlotState::Running(w)
                if !w.said_ready && !w.failed_start && w.retire_kill_at.is_none() =>
            {
                w.said_ready = true;
                self.served = true;
                // News unless the delay had made it ready already.
                !std::mem::replace(&mut w.ready, true)
            }
            _ => false,
        }
    }

    /// A worker sent `WATCHDOG=1`: its watchdog is (re)armed. Ignored
    /// without `--watchdog`, and from a worker already found hung.
    pub(crate) fn heartbeat(&mut self, pid: u32, now: Instant) {
        let Some(timeout) = self.policy.watchdog else {
            return;
        };
        if let Some(slot) = self.slot_of(pid) {
            if let SlotState::Running(w) = &mut self.slots[slot].state {
                if w.hung_kill_at.is_none() && w.retire_kill_at.is_none() {
                    w.watchdog_at = Some(now + timeout);
                }
            }
        }
    }

    /// A worker sent `WATCHDOG=trigger`: as systemd does, it is treated as
    /// hung at once (with or without `--watchdog`).
    pub(crate) fn watchdog_trigger(&mut self, pid: u32, now: Instant) {
        if let Some(slot) = self.slot_of(pid) {
            if let SlotState::Running(w) = &mut self.slots[slot].state {
                if w.hung_kill_at.is_none() {
                    Self::hang(&mut self.actions, slot, w, now, true);
                }
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

    /// Worker `pid` exited. `exec_failed`: it never ran (its execve
    /// failed). Returns its slot, its uptime, and whether it had been
    /// retired, or `None` for a pid that is no slot's worker.
    pub(crate) fn exited(
        &mut self,
        pid: u32,
        facts: ExitFacts,
        exec_failed: bool,
        now: Instant,
    ) -> Option<(usize, Duration, bool)> {
        let slot = self.slot_of(pid)?;
        let SlotState::Running(w) = self.slots[slot].state else {
            return None;
        };
        let uptime = facts.at.saturating_duration_since(w.started);
        let retired = w.retire_kill_at.is_some();
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
            return Some((slot, uptime, retired));
        }
        if self.slots[slot].leaving {
            // Scaled away: not replaced, and the slot goes once it is done.
            self.slots[slot].state = SlotState::Done {
                succeeded: facts.succeeded,
            };
            self.remove_gone();
            return Some((slot, uptime, retired));
        }
        if exec_failed {
            if !self.has_served(now, Some(slot)) {
                // The command cannot run at all: an error, not a crash loop.
                self.slots[slot].state = SlotState::Done { succeeded: false };
                self.begin_stop(End::CannotRun, now);
            } else {
                // After the cluster served (a deploy replaced the file under it).
                self.spawn_failed(slot, now);
            }
            return Some((slot, uptime, retired));
        }
        if retired {
            // Asked to go: a replacement at once, and no mark against the slot.
            self.slots[slot].state = SlotState::Waiting { until: now };
            self.actions.push(Action::Spawn { slot });
            return Some((slot, uptime, retired));
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
            return Some((slot, uptime, retired));
        }
        self.schedule_restart(slot, uptime, healthy, now);
        if let SlotState::Waiting { until } = self.slots[slot].state {
            if until <= now {
                self.actions.push(Action::Spawn { slot });
            }
        }
        Some((slot, uptime, retired))
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
        if until > now {
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
            if let SlotState::Waiting { .. } = s.state {
                s.state = SlotState::Done { succeeded: true };
            }
        }
        self.actions.push(Action::StopAll);
    }

    fn kill_all(&mut self) {
        if let Phase::Stopping { killed, .. } = &mut self.phase {
            *killed = true;
        }
        self.actions.push(Action::KillAll);
    }

    /// The timer fired: due restarts, retire timeouts, the stop timeout.
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
                for (slot, s) in self.slots.iter_mut().enumerate() {
                    let w = match &mut s.state {
                        SlotState::Waiting { until } if *until <= now => {
                            // Once: the shell answers with spawned/spawn_failed.
                            *until = far_future(now);
                            self.actions.push(Action::Spawn { slot });
                            continue;
                        }
                        SlotState::Running(w) => w,
                        _ => continue,
                    };
                    // Every deadline of the worker that is due, not just the
                    // first: one left due would spin the supervisor.
                    if !w.retire_killed && w.retire_kill_at.is_some_and(|t| t <= now) {
                        w.retire_killed = true;
                        self.actions
                            .push(Action::Note(Note::RetireTimedOut { pid: w.pid }));
                        self.actions.push(Action::Kill { pid: w.pid });
                    }
                    if w.watchdog_at.is_some_and(|t| t <= now) {
                        Self::hang(&mut self.actions, slot, w, now, false);
                    }
                    if !w.hung_killed && w.hung_kill_at.is_some_and(|t| t <= now) {
                        w.hung_killed = true;
                        self.actions.push(Action::Kill { pid: w.pid });
                    }
                    let pending = !w.ready && !w.failed_start && w.retire_kill_at.is_none();
                    if pending && w.ready_at.is_some_and(|t| t <= now) {
                        w.ready = true;
                        self.actions
                            .push(Action::Note(Note::ReadyByDelay { slot, pid: w.pid }));
                    } else if pending && w.ready_by.is_some_and(|t| t <= now) {
                        w.failed_start = true;
                        self.actions.push(Action::Note(Note::NotReady {
                            slot,
                            pid: w.pid,
                            timeout: self.policy.ready_timeout.unwrap_or_default(),
                        }));
                        self.actions.push(Action::Kill { pid: w.pid });
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
                .filter_map(|s| match s.state {
                    SlotState::Waiting { until } => Some(until),
                    SlotState::Running(w) => {
                        let retire = w.retire_kill_at.filter(|_| !w.retire_killed);
                        let pending = !w.ready && !w.failed_start && w.retire_kill_at.is_none();
                        let ready = w.ready_at.filter(|_| pending);
                        let timeout = w.ready_by.filter(|_| pending);
                        let hung = w.hung_kill_at.filter(|_| !w.hung_killed);
                        [retire, ready, timeout, w.watchdog_at, hung]
                            .into_iter()
                            .flatten()
                            .min()
                    }
                    _ => None,
                })
                .min(),
        }
    }

    /// Why the cluster ends, once every slot is done (the shell also waits
    /// for what is left of dead workers).
    pub(crate) fn finished(&self) -> Option<End> {
        if !self
            .slots
            .iter()
            .all(|s| matches!(s.state, SlotState::Done { .. }))
        {
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
        spawns: usize,
        spawn_fails: bool,
    }

    impl Sim {
        fn new(policy: Policy, workers: usize) -> Sim {
            let now = Instant::now();
            let mut sim = Sim {
                lc: Lifecycle::new(policy, workers, Jitter::seeded(7), now),
                now,
                next_pid: 100,
                alive: Vec::new(),
                spawns: 0,
                spawn_fails: false,
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
                        Action::Spawn { slot } => {
                            // Never a second live worker in a slot.
                            assert!(
                                self.alive.iter().all(|(_, s)| *s != slot),
                                "spawn into slot {slot} which has a live worker"
                            );
                            assert!(!self.lc.stopping(), "no spawn while stopping");
                            if self.spawn_fails {
                                self.lc.spawn_failed(slot, self.now);
                            } else {
                                self.next_pid += 1;
                                self.spawns += 1;
                                self.alive.push((self.next_pid, slot));
                                self.lc.spawned(slot, self.next_pid, self.now);
                            }
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

        fn check(&self) {
            // Every live process is exactly its slot's worker.
            for (pid, slot) in &self.alive {
                assert_eq!(self.lc.slot_of(*pid), Some(*slot), "pid {pid}");
            }
            for slot in 0..self.lc.slots() {
                if let SlotState::Running(w) = self.lc.state(slot) {
                    assert!(self.alive.contains(&(w.pid, slot)));
                }
            }
            // A finished cluster has no live worker.
            if self.lc.finished().is_some() {
                assert!(self.alive.is_empty(), "finished with {:?}", self.alive);
            }
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
                            sim.lc.ready(*pid);
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
                        if let Some(slot) = sim.lc.add_slot(sim.now) {
                            if sim.spawn_fails {
                                sim.lc.remove_last_slot();
                            } else {
                                sim.next_pid += 1;
                                sim.spawns += 1;
                                sim.alive.push((sim.next_pid, slot));
                                sim.lc.spawned(slot, sim.next_pid, sim.now);
                            }
                        }
                        sim.perform();
                    }
                    Step::SpawnFails(f) => sim.spawn_fails = f,
                    Step::Scale(n) => {
                        let size = sim.lc.scale(n, sim.now);
                        if !sim.lc.stopping() {
                            prop_assert_eq!(size, n.max(1));
                        }
                        sim.perform();
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
        assert!(sim.lc.ready(pid));
        assert!(!sim.lc.ready(pid), "ready is news once");
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
}
