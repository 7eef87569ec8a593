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

/// Signals an operator may send a process manager by habit never end herd
/// (before: SIGUSR1, which logrotate sends, killed it at once, workers too);
/// SIGQUIT is a graceful stop (unicorn's and nginx's convention).
#[test]
fn operator_signals_do_not_kill_herd_and_quit_stops_it_gracefully() {
    let mut herd = Herd::start(["run", "-w", "2", "--no-listen", "--", "sleep", "1000"]);
    let workers = [herd.nth_spawned(1), herd.nth_spawned(2)];
    for sig in [
        "USR1", "USR2", "HUP", "TTIN", "TTOU", "WINCH", "PIPE", "ALRM", "USR1",
    ] {
        herd.signal(sig);
        std::thread::sleep(Duration::from_millis(30));
    }
    for sig in [
        "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGTTIN", "SIGTTOU", "SIGWINCH", "SIGPIPE", "SIGALRM",
    ] {
        let prefix = format!("{sig} received and ignored");
        herd.stderr
            .wait_for(&prefix, STARTUP, |l| l.contains(&prefix));
    }
    assert_eq!(
        herd.stderr.count(|l| l.contains("SIGUSR1 received")),
        1,
        "logged once"
    );
    assert!(alive(herd.pid()));
    assert!(workers.iter().all(|w| alive(*w)));
    assert_eq!(herd.spawned().len(), 2, "no worker was replaced");
    herd.signal("QUIT");
    assert_eq!(herd.wait(Duration::from_secs(15)).code(), Some(0));
    assert!(herd
        .stderr
        .all()
        .iter()
        .any(|l| l.contains("SIGQUIT received; stopping workers")));
}
