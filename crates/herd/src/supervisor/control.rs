//! The supervisor's side of the control socket: answering [`Call`]s from
//! [`crate::control::server`] with what the supervisor knows, at once.
//! Nothing here waits or reads much: CPU and memory are sampled by the
//! server, off this task.

use std::time::{Instant, SystemTime};

use rustix::process::Signal;
use tracing::info;

use super::{children_of_self, signal_worker, Supervisor};
use crate::control::protocol::{
    Counters, ListenerStatus, Orphan, SlotStatus, Status, Summary, WorkerRef, WorkerStatus,
};
use crate::control::{Call, ScaleTo, Target};
use crate::lifecycle::{RecycleWhy, Role, SlotState};

/// What the control plane counts (the supervisor is the only writer).
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) counters: Counters,
    /// When herd started.
    pub(super) started: Option<(Instant, SystemTime)>,
}

impl Supervisor {
    pub(super) fn on_call(&mut self, call: Call) {
        match call {
            Call::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Call::Scale { to, reply } => {
                let answer = if self.life.stopping() {
                    Err("the cluster is stopping".to_string())
                } else {
                    let now = self.life.active();
                    let n = match to {
                        ScaleTo::Exactly(n) => n,
                        ScaleTo::By(d) => (now as i64)
                            .saturating_add(d)
                            .clamp(1, crate::config::MAX_WORKERS as i64)
                            as usize,
                    };
                    if n != now {
                        info!("control: scaling from {now} to {n} workers");
                    }
                    Ok(self.scale(n))
                };
                let _ = reply.send(answer);
            }
            Call::Restart { slot, reply } => {
                let _ = reply.send(self.restart(slot));
            }
            Call::Signal {
                signal,
                slot,
                reply,
            } => {
                let _ = reply.send(self.signal_workers(signal, slot));
            }
        }
    }

    /// `herd restart`: the slot's worker replaced the way a reload
    /// replaces it (the new one ready first, then the old drains).
    fn restart(&mut self, slot: usize) -> Result<WorkerRef, String> {
        if slot >= self.life.slots() {
            return Err(format!(
                "no slot {slot}: the cluster has slots 0 to {}",
                self.life.slots().saturating_sub(1)
            ));
        }
        if self.life.stopping() {
            return Err("the cluster is stopping".into());
        }
        if self.life.reloading() {
            return Err("a reload is running; it replaces every worker anyway".into());
        }
        let Some(w) = self.life.worker(slot).copied() else {
            return Err(format!(
                "slot {slot} has no running worker ({}); it starts one by itself",
                slot_state_name(&self.life.state(slot), self.life.leaving(slot))
            ));
        };
        if !w.ready {
            return Err(format!(
                "slot {slot}'s worker {} is not ready yet; try again once it is",
                w.pid
            ));
        }
        if !self.life.recycle(slot, w.pid, RecycleWhy::Requested) {
            return Err(format!(
                "slot {slot}'s worker {} is already being replaced, or --reload-surge \
                 replacements are under way; try again shortly",
                w.pid
            ));
        }
        info!(slot, pid = w.pid, "control: restarting slot {slot}");
        self.perform();
        Ok(WorkerRef { slot, pid: w.pid })
    }

    /// `herd signal`: `signal` to slot `slot`'s worker, or every live worker.
    fn signal_workers(
        &mut self,
        signal: Signal,
        slot: Option<usize>,
    ) -> Result<Vec<WorkerRef>, String> {
        let targets: Vec<WorkerRef> = match slot {
            Some(slot) => {
                if slot >= self.life.slots() {
                    return Err(format!(
                        "no slot {slot}: the cluster has slots 0 to {}",
                        self.life.slots().saturating_sub(1)
                    ));
                }
                match self.life.worker(slot) {
                    Some(w) => vec![WorkerRef { slot, pid: w.pid }],
                    None => return Err(format!("slot {slot} has no live worker")),
                }
            }
            None => self
                .slots
                .iter()
                .enumerate()
                .flat_map(|(slot, s)| {
                    s.workers
                        .iter()
                        .map(move |w| WorkerRef { slot, pid: w.pid })
                })
                .collect(),
        };
        info!(
            "control: sending {} to {} worker(s)",
            crate::config::signal_name(signal.as_raw()),
            targets.len()
        );
        for t in &targets {
            let cgroup = self.slots[t.slot].io(t.pid).and_then(|w| w.cgroup.clone());
            signal_worker(t.pid, cgroup.as_deref(), signal);
        }
        Ok(targets)
    }

    /// Everything `herd status` shows but CPU and memory, and the worker
    /// trees to sample for those.
    pub(super) fn status(&self) -> (Status, Vec<Target>) {
        let (started, started_wall) = self
            .stats
            .started
            .unwrap_or((Instant::now(), SystemTime::now()));
        let now = Instant::now();
        let mut targets = Vec::new();
        let mut slots = Vec::new();
        for (i, s) in self.slots.iter().enumerate().take(self.life.slots()) {
            let mut workers = Vec::new();
            for io in &s.workers {
                let Some((_, role, w)) = self.life.find(io.pid) else {
                    continue;
                };
                targets.push((io.pid, io.cgroup.clone()));
                workers.push(WorkerStatus {
                    pid: io.pid,
                    role: match role {
                        Role::Current => "current",
                        Role::Incoming => "incoming",
                        Role::Draining => "draining",
                    }
                    .into(),
                    ready: w.ready,
                    uptime_s: now.saturating_duration_since(w.started).as_secs_f64(),
                    generation: w.generation,
                    status_text: io.status_text.clone(),
                    cpu_s: None,
                    rss_bytes: None,
                    connections: (self.config.balance == crate::Balance::RoundRobin)
                        .then(|| self.rr.load(io.pid) as u64),
                });
            }
            let state = self.life.state(i);
            let next_start_in_s = match state {
                SlotState::Waiting { until } if until > now => Some((until - now).as_secs_f64()),
                _ => None,
            };
            slots.push(SlotStatus {
                slot: i,
                state: if self.life.failed(i) && !matches!(state, SlotState::Running(_)) {
                    "failed".into()
                } else {
                    slot_state_name(&state, self.life.leaving(i)).into()
                },
                restarts: s.restarts,
                last_exit: s.last_exit.as_ref().map(|(how, _)| how.clone()),
                next_start_in_s,
                workers,
            });
        }
        let listeners = self
            .listeners
            .specs()
            .iter()
            .enumerate()
            .map(|(i, spec)| ListenerStatus {
                spec: spec.to_string(),
                queued: self.listeners.queued(i),
            })
            .collect();
        let mut orphans: Vec<Orphan> = self
            .remnants
            .iter()
            .map(|r| Orphan {
                pid: r.pgid,
                what: format!(
                    "what is left of worker {} ({}; {})",
                    r.pgid,
                    if r.cgroup.is_some() {
                        "its cgroup"
                    } else {
                        "its process group"
                    },
                    if r.killed {
                        "SIGKILL sent"
                    } else {
                        "stop signal sent"
                    }
                ),
                comm: None,
            })
            .collect();
        let ours: std::collections::HashSet<u32> = self
            .slots
            .iter()
            .flat_map(|s| &s.workers)
            .map(|w| w.pid)
            .chain(self.guardian.as_ref().and_then(|g| g.child.id()))
            .collect();
        for pid in children_of_self() {
            if !ours.contains(&pid) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .ok()
                    .map(|c| c.trim_end().to_string());
                orphans.push(Orphan {
                    pid,
                    what: "a reparented descendant of a worker (herd reaps it when it exits)"
                        .into(),
                    comm,
                });
            }
        }
        let mut counters = self.stats.counters.clone();
        counters.log_lines_dropped = crate::output::dropped_total();
        let status = Status {
            summary: Summary {
                name: self.control_name.clone().unwrap_or_default(),
                pid: std::process::id(),
                workers: self.life.active(),
                ready: self.ready_slots(),
                uptime_s: now.saturating_duration_since(started).as_secs(),
                restarts: slots.iter().map(|s: &SlotStatus| s.restarts).sum(),
                command: self.config.command.display(),
            },
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_unix: started_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            generation: self.next_gen.saturating_sub(1),
            reloading: self.life.reloading(),
            stopping: self.life.stopping(),
            balance: self.config.balance.to_string(),
            containment: if self.cgroups.is_some() {
                "cgroup"
            } else {
                "process-group"
            }
            .into(),
            listeners,
            slots,
            orphans,
            counters,
        };
        (status, targets)
    }
}

fn slot_state_name(state: &SlotState, leaving: bool) -> &'static str {
    match state {
        SlotState::Running(_) if leaving => "leaving",
        SlotState::Running(w) if w.ready => "running",
        SlotState::Running(_) => "starting",
        SlotState::Waiting { .. } => "backoff",
        SlotState::Replacing => "replacing",
        SlotState::Done { .. } => "stopped",
    }
}
