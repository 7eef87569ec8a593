//! Readings from /proc: memory, CPU time, context switches, children.

use std::collections::BTreeSet;

/// Resident set size in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// Proportional set size in KiB (shared pages divided among sharers).
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// CPU time (user + system) in clock ticks, all threads.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm.
    Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second.
pub fn ticks_per_sec() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// Each thread's context switches (voluntary and not), by thread id: each
/// is a time the thread was scheduled off the CPU, so an idle process that
/// never wakes keeps these constant.
pub fn context_switches_by_thread(pid: u32) -> std::collections::HashMap<u64, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let text = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let n: u64 = text
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.insert(tid, n);
    }
    out
}

/// Wakeups between two [`context_switches_by_thread`] readings: each
/// thread's new switches, a new thread's all, and one for each thread that
/// exited meanwhile (it woke to exit; its count is gone).
pub fn wakeups_between(
    before: &std::collections::HashMap<u64, u64>,
    after: &std::collections::HashMap<u64, u64>,
) -> u64 {
    let grown: u64 = after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    let gone = before.keys().filter(|t| !after.contains_key(t)).count() as u64;
    grown + gone
}

/// The direct children of `pid`.
pub fn children(pid: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// `pid` and all its descendants.
pub fn descendants(pid: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children(p) {
            if out.insert(c) {
                todo.push(c);
            }
        }
    }
    out
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, r)| !r.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// The executable's file name.
pub fn exe_name(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
}
