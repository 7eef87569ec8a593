//! Stopping: stop signal to each worker's process group, stop timeout, then
//! SIGKILL; a second signal forces the kill at once; exit status 0.

use std::time::{Duration, Instant};

use crate::util::*;

/// A worker that ignores SIGTERM (its `sleep` children do not).
const STUBBORN: &str = "trap '' TERM; while :; do sleep 0.05; done";

#[test]
fn stop_timeout_then_sigkill() {
    let mut herd = Herd::start([
        "run",
        "-w",
        "2",
        "--no-listen",
        "--stop-timeout",
        "600ms",
        "--",
        "sh",
        "-c",
        STUBBORN,
    ]);
    let pids = [herd.nth_spawned(1), herd.nth_spawned(2)];
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    herd.signal("TERM");
    let status = herd.wait(Duration::from_secs(10));
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(550),
        "waited the stop timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(herd.stderr.count(|l| l.contains("stop timeout")) == 1);
    assert_eq!(
        herd.stderr
            .count(|l| l.contains("stopped (killed by SIGKILL)")),
        2
    );
    for pid in pids {
        assert!(!alive(pid), "worker {pid} survived");
    }
}

#[test]
fn second_signal_forces_the_kill() {
    let mut herd = Herd::start([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--stop-timeout",
        "60s",
        "--",
        "sh",
        "-c",
        STUBBORN,
    ]);
    let pid = herd.nth_spawned(1);
    std::thread::sleep(Duration::from_millis(100));
    herd.signal("INT");
    herd.stderr.wait_for("first signal", STARTUP, |l| {
        l.contains("SIGINT received; stopping")
    });
    let t0 = Instant::now();
    herd.signal("INT");
    let status = herd.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        herd.stderr
            .count(|l| l.contains("received again; killing workers now"))
            == 1
    );
    assert!(!alive(pid));
}

#[test]
fn stop_signal_is_configurable_and_sent_to_the_process_group() {
    // The worker's child (same group) reports the signal it got.
    let dir = TempDir::new("stopsig");
    let script = format!(
        "sh -c 'trap \"touch {d}/child-usr1; exit 0\" USR1; while :; do sleep 0.05; done' & c=$!; trap 'wait $c; exit 7' USR1; wait",
        d = dir.path().display()
    );
    let mut herd = Herd::start([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--stop-signal",
        "USR1",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    herd.nth_spawned(1);
    std::thread::sleep(Duration::from_millis(200));
    herd.signal("TERM");
    assert_eq!(herd.wait(Duration::from_secs(10)).code(), Some(0));
    herd.stderr.wait_for("worker stop", STARTUP, |l| {
        l.contains("stopped (exit code 7)")
    });
    assert!(
        dir.path().join("child-usr1").exists(),
        "the group got the signal"
    );
}
