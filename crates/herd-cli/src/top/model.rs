//! `herd top`'s state and decisions, apart from the terminal: what the
//! last status said, CPU shares from successive readings, each worker's
//! recent history for its sparklines, recent log lines, and what a key
//! press asks for. Pure, so the view and the keys are tested without a
//! terminal or a cluster.

use std::collections::{HashMap, VecDeque};

use herd::control::protocol::{LogLine, Status};

/// Readings kept per worker for its sparklines.
pub const HISTORY: usize = 60;
/// Log lines kept.
pub const LOG_LINES: usize = 200;

/// One worker's recent CPU shares (percent of one core) and RSS (bytes).
#[derive(Debug, Default, Clone)]
pub struct History {
    pub cpu: VecDeque<u64>,
    pub rss: VecDeque<u64>,
    /// The last CPU reading: seconds of CPU, at seconds of uptime.
    last: Option<(f64, f64)>,
}

/// What a key asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Quit,
    Reload,
    Scale(i64),
    Restart(usize),
}

/// A key, as the model sees it (crossterm's are mapped in `top::run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Up,
    Down,
    Esc,
}

/// Everything on screen.
#[derive(Debug, Default)]
pub struct Top {
    pub name: String,
    pub status: Option<Status>,
    pub history: HashMap<u32, History>,
    pub logs: VecDeque<LogLine>,
    /// The selected row (a worker), by index in [`Top::rows`].
    pub selected: usize,
    /// Only this slot's log lines.
    pub log_slot: Option<usize>,
    /// A line for the operator: what a key did, or an error.
    pub message: Option<String>,
    /// `R` was pressed once: a second `R` reloads.
    pub confirm_reload: bool,
}

/// A row of the worker table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub slot: usize,
    pub pid: Option<u32>,
    pub state: String,
    pub ready: bool,
    pub uptime_s: f64,
    pub restarts: u64,
    pub cpu_pct: Option<f64>,
    pub rss: Option<u64>,
    pub note: String,
}

impl Top {
    pub fn new(name: &str) -> Top {
        Top {
            name: name.to_string(),
            ..Top::default()
        }
    }

    /// Takes a new status: CPU shares are the CPU time used since the last
    /// reading over the time between them (by the workers' own uptime, so
    /// a late answer does not skew it).
    pub fn update(&mut self, status: Status) {
        let mut seen = Vec::new();
        for w in status.slots.iter().flat_map(|s| &s.workers) {
            seen.push(w.pid);
            let h = self.history.entry(w.pid).or_default();
            if let Some(cpu) = w.cpu_s {
                if let Some((last_cpu, last_up)) = h.last {
                    let dt = w.uptime_s - last_up;
                    if dt > 0.0 {
                        let pct = (100.0 * (cpu - last_cpu) / dt).max(0.0);
                        push(&mut h.cpu, pct.round() as u64);
                    }
                }
                h.last = Some((cpu, w.uptime_s));
            }
            if let Some(rss) = w.rss_bytes {
                push(&mut h.rss, rss);
            }
        }
        self.history.retain(|pid, _| seen.contains(pid));
        self.status = Some(status);
        let rows = self.rows().len();
        self.selected = self.selected.min(rows.saturating_sub(1));
    }

    /// Takes a log line.
    pub fn log(&mut self, line: LogLine) {
        if self.logs.len() == LOG_LINES {
            self.logs.pop_front();
        }
        self.logs.push_back(line);
    }

    /// The log lines shown (of the filtered slot, if any), oldest first.
    pub fn shown_logs(&self) -> impl Iterator<Item = &LogLine> {
        self.logs
            .iter()
            .filter(|l| self.log_slot.is_none() || l.slot == self.log_slot)
    }

    /// The worker table: a row per live worker, and one per slot without one.
    pub fn rows(&self) -> Vec<Row> {
        let Some(status) = &self.status else {
            return Vec::new();
        };
        let mut rows = Vec::new();
        for slot in &status.slots {
            if slot.workers.is_empty() {
                rows.push(Row {
                    slot: slot.slot,
                    pid: None,
                    state: slot.state.clone(),
                    ready: false,
                    uptime_s: 0.0,
                    restarts: slot.restarts,
                    cpu_pct: None,
                    rss: None,
                    note: slot
                        .last_exit
                        .clone()
                        .map(|e| format!("last: {e}"))
                        .unwrap_or_default(),
                });
            }
            for w in &slot.workers {
                let h = self.history.get(&w.pid);
                rows.push(Row {
                    slot: slot.slot,
                    pid: Some(w.pid),
                    state: if w.role == "current" {
                        slot.state.clone()
                    } else {
                        w.role.clone()
                    },
                    ready: w.ready,
                    uptime_s: w.uptime_s,
                    restarts: slot.restarts,
                    cpu_pct: h.and_then(|h| h.cpu.back()).map(|c| *c as f64),
                    rss: w.rss_bytes,
                    note: [
                        w.connections.map(|c| format!("{c} conns")),
                        w.status_text.clone(),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; "),
                });
            }
        }
        rows
    }

    /// Reacts to a key; returns what to do, if anything.
    pub fn key(&mut self, key: Key) -> Option<Action> {
        let reload_asked = std::mem::take(&mut self.confirm_reload);
        let rows = self.rows();
        match key {
            Key::Char('q') | Key::Esc => Some(Action::Quit),
            Key::Up | Key::Char('k') => {
                self.selected = self.selected.saturating_sub(1);
                None
            }
            Key::Down | Key::Char('j') => {
                self.selected = (self.selected + 1).min(rows.len().saturating_sub(1));
                None
            }
            Key::Char('R') if reload_asked => Some(Action::Reload),
            Key::Char('R') => {
                self.confirm_reload = true;
                self.message = Some("press R again to reload every worker".into());
                None
            }
            Key::Char('+') => Some(Action::Scale(1)),
            Key::Char('-') => Some(Action::Scale(-1)),
            Key::Char('r') => rows.get(self.selected).map(|r| Action::Restart(r.slot)),
            Key::Char('l') => {
                let slot = rows.get(self.selected).map(|r| r.slot);
                self.log_slot = if self.log_slot.is_some() { None } else { slot };
                self.message = Some(match self.log_slot {
                    Some(s) => format!("logs: slot {s} only (l: all)"),
                    None => "logs: every slot".into(),
                });
                None
            }
            _ => None,
        }
    }
}

fn push(v: &mut VecDeque<u64>, x: u64) {
    if v.len() == HISTORY {
        v.pop_front();
    }
    v.push_back(x);
}

/// `▁▂▃▅▇` for the last `width` values, `lo` as the lowest bar and `hi`
/// (or the largest value, if larger) as the highest.
pub fn sparkline(values: &VecDeque<u64>, width: usize, lo: u64, hi: u64) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let start = values.len().saturating_sub(width);
    let shown: Vec<u64> = values.iter().skip(start).copied().collect();
    let hi = shown.iter().copied().max().unwrap_or(0).max(hi);
    let span = hi.saturating_sub(lo).max(1) as f64;
    shown
        .iter()
        .map(|v| {
            BARS[((v.saturating_sub(lo) as f64 / span) * 7.0)
                .round()
                .min(7.0) as usize]
        })
        .collect()
}
