//! The shell of rolling reloads: resolving the command again into a new
//! generation, answering whoever asked, and the words for the log. Every
//! decision (which slot next, when the old worker drains, rollback) is the
//! lifecycle's (`lifecycle.rs`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::Supervisor;
use crate::cluster::{Event, ReloadOutcome};
use crate::config::WorkerCommand;
use crate::lifecycle::{Note, RecycleWhy, ReloadReport, ReloadStart};
use crate::spawn::{argv_cstrings, env_entry};

/// One generation of the worker command, ready to spawn.
#[derive(Debug, Clone)]
pub(super) struct Gen {
    pub(super) command: WorkerCommand,
    /// herd's environment as workers get it, with the command's own
    /// variables (a package script's `PATH`, `npm_*`) in place of herd's.
    pub(super) base_env: Vec<CString>,
    pub(super) argv: Vec<CString>,
}

impl Gen {
    pub(super) fn new(command: WorkerCommand) -> Gen {
        let command_env = &command.env;
        let base_env = std::env::vars_os()
            .filter(|(k, _)| {
                let k = k.as_bytes();
                !matches!(
                    k,
                    b"LISTEN_PID"
                        | b"LISTEN_FDS"
                        | b"LISTEN_FDNAMES"
                        | b"NOTIFY_SOCKET"
                        | b"WATCHDOG_USEC"
                        | b"WATCHDOG_PID"
                ) && !k.starts_with(b"HERD_")
                    && !command_env.iter().any(|(c, _)| c.as_bytes() == k)
            })
            .chain(command_env.iter().cloned())
            .filter_map(|(k, v)| env_entry(&k, &v))
            .collect();
        let argv = argv_cstrings(&command);
        Gen {
            command,
            base_env,
            argv,
        }
    }
}

impl Supervisor {
    /// SIGHUP or [`crate::ClusterHandle::reload`]: a reload now, or after
    /// the running one (coalesced with other requests meanwhile).
    pub(super) fn request_reload(
        &mut self,
        reply: Option<oneshot::Sender<ReloadOutcome>>,
        why: &str,
    ) {
        if self.life.stopping() {
            info!("{why} ignored: the cluster is stopping");
            if let Some(reply) = reply {
                let _ = reply.send(ReloadOutcome::Stopped);
            }
            return;
        }
        if self.life.reloading() {
            // The core queues it; the command is resolved when it begins.
            let _ = self.life.reload(0, Instant::now());
            info!("{why}: a reload is running; another follows it (requests meanwhile are one)");
            self.queued_waiters.extend(reply);
            return;
        }
        self.reload_waiters.extend(reply);
        self.begin_reload(why);
    }

    /// Resolves the command again and starts the reload.
    pub(super) fn begin_reload(&mut self, why: &str) {
        let command = match self.config.command.resolve_again() {
            Ok(c) => c,
            Err(e) => {
                error!("RELOAD FAILED ({why}): cannot resolve the command again: {e}; nothing was changed, the workers serve on");
                self.answer_reload(ReloadOutcome::CannotResolve(e.to_string()));
                return;
            }
        };
        let generation = self.next_gen;
        self.next_gen += 1;
        info!(
            generation,
            "{why}: reloading with {}{}",
            command.display(),
            command
                .dir
                .as_ref()
                .map(|d| format!(" in {}", d.display()))
                .unwrap_or_default()
        );
        self.gens.insert(generation, Gen::new(command));
        match self.life.reload(generation, Instant::now()) {
            ReloadStart::Started => {
                self.reload_began = Some(Instant::now());
                if let Some(s) = &self.systemd {
                    s.reloading();
                }
                self.perform();
            }
            ReloadStart::Queued => {}
            ReloadStart::Stopping => {
                self.gens.remove(&generation);
                self.answer_reload(ReloadOutcome::Stopped);
            }
        }
    }

    /// The lifecycle ended the reload: report, answer, forget what no
    /// worker runs any more.
    pub(super) fn reload_ended(&mut self, report: ReloadReport) {
        let took = self
            .reload_began
            .take()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        let outcome = if report.stopped {
            info!("the reload ended: the cluster is stopping");
            ReloadOutcome::Stopped
        } else if report.ok {
            if let Some(g) = self.gens.get(&report.generation) {
                self.config.command = g.command.clone();
            }
            info!(
                generation = report.generation,
                took_ms = took.as_millis() as u64,
                "reload done in {took:.1?}: every slot runs generation {}",
                report.generation
            );
            ReloadOutcome::Reloaded {
                generation: report.generation,
            }
        } else {
            let (slot, pid) = report.failed.unwrap_or((0, None));
            let (why, stderr) = self.replacement_failure(slot, pid);
            error!(
                slot,
                took_ms = took.as_millis() as u64,
                "RELOAD FAILED: the new worker{} in slot {slot} {why}; rolled back ({} slot(s) \
                 put back), the previous command serves{}",
                pid.map(|p| format!(" {p}")).unwrap_or_default(),
                report.rolled_back,
                if stderr.is_empty() {
                    String::new()
                } else {
                    format!(". Its last stderr lines: {}", stderr.join(" | "))
                }
            );
            ReloadOutcome::RolledBack {
                slot,
                pid,
                why,
                stderr,
                rolled_back: report.rolled_back,
            }
        };
        let in_use = self.life.generations_in_use();
        self.gens.retain(|g, _| in_use.contains(g));
        if let Some(s) = &mut self.systemd {
            match &outcome {
                ReloadOutcome::Reloaded { .. } => s.reloaded("done"),
                ReloadOutcome::RolledBack { .. } => s.reloaded("failed, rolled back"),
                _ => {}
            }
        }
        self.answer_reload(outcome);
    }

    /// What happened to a failed replacement, and its last stderr lines.
    fn replacement_failure(&mut self, slot: usize, pid: Option<u32>) -> (String, Vec<String>) {
        let Some(pid) = pid else {
            let why = self.slots[slot]
                .last_exit
                .as_ref()
                .map_or("could not be started".to_string(), |(how, _)| {
                    format!("could not be started ({how})")
                });
            return (why, Vec::new());
        };
        if let Some((_, how, stderr)) = self.failed_replacements.iter().find(|(p, _, _)| *p == pid)
        {
            return (format!("died before it took over ({how})"), stderr.clone());
        }
        // Still alive: killed for not being ready in time.
        let stderr = self
            .slots
            .get(slot)
            .and_then(|s| s.io(pid))
            .and_then(|w| w.tail.as_ref())
            .map(|t| t.lines())
            .unwrap_or_default();
        let why = format!(
            "was not ready within {:?} (--ready-timeout)",
            self.config.ready_timeout
        );
        (why, stderr)
    }

    fn answer_reload(&mut self, outcome: ReloadOutcome) {
        let c = &mut self.stats.counters;
        match outcome {
            ReloadOutcome::Reloaded { .. } => c.reloads_ok += 1,
            ReloadOutcome::RolledBack { .. } => c.reloads_rolled_back += 1,
            ReloadOutcome::CannotResolve(_) => c.reloads_unresolved += 1,
            ReloadOutcome::Stopped => {}
        }
        self.events.send(Event::Reloaded(outcome.clone()));
        for reply in self.reload_waiters.drain(..) {
            let _ = reply.send(outcome.clone());
        }
    }

    /// Words for the lifecycle's reload and recycling notes.
    pub(super) fn log_reload_note(&mut self, note: Note) {
        match note {
            Note::ReloadStarted {
                generation,
                slots,
                surge,
            } => info!(
                generation,
                "rolling reload of {slots} slot(s), {surge} at a time: each new worker must \
                 be ready before the one it replaces drains"
            ),
            Note::Replaced {
                slot,
                old,
                new,
                generation,
            } => match old {
                Some(old) => info!(
                    slot,
                    pid = new,
                    generation,
                    "slot {slot}: new worker {new} is ready and serves; worker {old} drains"
                ),
                None => info!(
                    slot,
                    pid = new,
                    generation,
                    "slot {slot}: new worker {new} is ready and serves"
                ),
            },
            Note::ReplacementFailed { slot, pid } => warn!(
                slot,
                "slot {slot}: new worker{} failed; the reload stops",
                pid.map(|p| format!(" {p}")).unwrap_or_default()
            ),
            Note::RollingBack { slots, generation } => warn!(
                generation,
                "rolling back: {slots} slot(s) go back to the previous command"
            ),
            Note::Recycling { slot, pid, why } => {
                let why = match why {
                    RecycleWhy::Lifetime => format!(
                        "it ran for --max-lifetime ({:?})",
                        self.config.max_lifetime.unwrap_or_default()
                    ),
                    RecycleWhy::Memory => format!(
                        "its processes use more than --max-memory ({} bytes)",
                        self.config.max_memory.unwrap_or_default()
                    ),
                    RecycleWhy::Requested => "a restart was asked for (herd restart)".into(),
                };
                info!(
                    slot,
                    pid,
                    "recycling worker {pid} in slot {slot}: {why}; its replacement starts \
                     first, then it drains"
                );
            }
            // The others are worded by `log_note`, which lists these.
            _ => {}
        }
    }
}
