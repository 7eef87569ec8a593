//! The last lines of herd's log, kept in memory for `herd logs` and
//! `herd top`, and passed on to followers.
//!
//! Bounded: at most [`RING_LINES`] lines and [`RING_BYTES`] bytes of text
//! (the oldest go first). Followers get new lines through a broadcast
//! channel of [`FOLLOW_QUEUE`] lines; one that falls behind skips lines
//! (it is told how many), and nobody waits for it. With no follower a
//! line costs one copy and a lock held for a push.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::control::protocol::LogLine;

/// The most lines kept.
pub const RING_LINES: usize = 1000;
/// The most bytes of line text kept (lines are at most 64 KiB each).
pub const RING_BYTES: usize = 1 << 20;
/// Lines queued for each follower before it skips.
pub const FOLLOW_QUEUE: usize = 1024;

struct Ring {
    lines: VecDeque<Arc<LogLine>>,
    bytes: usize,
    seq: u64,
}

fn ring() -> &'static (Mutex<Ring>, broadcast::Sender<Arc<LogLine>>) {
    static RING: OnceLock<(Mutex<Ring>, broadcast::Sender<Arc<LogLine>>)> = OnceLock::new();
    RING.get_or_init(|| {
        let (tx, _) = broadcast::channel(FOLLOW_QUEUE);
        let ring = Ring {
            lines: VecDeque::new(),
            bytes: 0,
            seq: 0,
        };
        (Mutex::new(ring), tx)
    })
}

/// Keeps a line: a worker's (`slot`, `pid`) or herd's own (`None`).
pub(crate) fn push(worker: Option<(usize, u32)>, stream: &str, line: &str) {
    let time_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (ring, tx) = ring();
    let mut r = ring.lock().unwrap_or_else(|e| e.into_inner());
    r.seq += 1;
    let entry = Arc::new(LogLine {
        seq: r.seq,
        time_ms,
        slot: worker.map(|w| w.0),
        pid: worker.map(|w| w.1),
        stream: stream.to_string(),
        line: line.to_string(),
    });
    r.bytes += entry.line.len();
    r.lines.push_back(entry.clone());
    while r.lines.len() > RING_LINES || r.bytes > RING_BYTES {
        match r.lines.pop_front() {
            Some(old) => r.bytes -= old.line.len(),
            None => break,
        }
    }
    // Sent under the lock, so followers see lines in `seq` order.
    let _ = tx.send(entry);
}

/// The last `n` lines kept (of `slot`'s workers only, if given), oldest first.
pub(crate) fn recent(n: usize, slot: Option<usize>) -> Vec<LogLine> {
    let (ring, _) = ring();
    let r = ring.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<LogLine> = r
        .lines
        .iter()
        .rev()
        .filter(|l| slot.is_none() || l.slot == slot)
        .take(n)
        .map(|l| (**l).clone())
        .collect();
    out.reverse();
    out
}

/// New lines from now on.
pub(crate) fn follow() -> broadcast::Receiver<Arc<LogLine>> {
    ring().1.subscribe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_within_its_bounds() {
        // Process-wide: other tests may push too, so only this test's
        // slot number is looked at.
        let slot = 9_999;
        let mut live = follow();
        for i in 0..RING_LINES + 10 {
            push(Some((slot, 1)), "stdout", &format!("line {i}"));
        }
        let got = recent(5, Some(slot));
        let texts: Vec<&str> = got.iter().map(|l| l.line.as_str()).collect();
        let last = RING_LINES + 9;
        assert_eq!(texts.last().copied(), Some(format!("line {last}").as_str()));
        assert_eq!(got.len(), 5);
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(recent(usize::MAX, None).len() <= RING_LINES);
        // Big lines are bounded by bytes.
        let big = "x".repeat(64 * 1024);
        for _ in 0..40 {
            push(Some((slot, 1)), "stdout", &big);
        }
        let kept: usize = recent(usize::MAX, None).iter().map(|l| l.line.len()).sum();
        assert!(kept <= RING_BYTES, "{kept}");
        // A follower that did not read skipped lines; it is told how many.
        match live.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert!(n > 0),
            other => panic!("{other:?}"),
        }
    }
}
