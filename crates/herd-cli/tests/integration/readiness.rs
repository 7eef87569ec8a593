//! Readiness: a worker is ready when it says so (sd_notify's READY=1 on its
//! own NOTIFY_SOCKET, from any process of its tree), after --ready-delay,
//! or not at all within --ready-timeout (a failed start).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

fn systemd_notify_missing() -> bool {
    if Command::new("systemd-notify")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-notify is not installed");
        return true;
    }
    false
}

#[test]
fn ready_is_when_the_worker_says_so_on_its_notify_socket() {
    if systemd_notify_missing() {
        return;
    }
    // Slot 0 notifies from the worker itself; slot 1 from a grandchild. The
    // NOTIFY_SOCKET herd was given (systemd's) never reaches a worker.
    let script = r#"echo "socket $NOTIFY_SOCKET"; sleep 0.4;
        if [ "$HERD_WORKER_ID" = 0 ]; then systemd-notify --ready --status="warm";
        else (sh -c 'systemd-notify --ready') & fi; echo notified; exec sleep 30"#;
    let mut cmd = Command::new(herd_bin());
    cmd.args([
        "run",
        "-w",
        "2",
        "--no-listen",
        "--ready",
        "notify",
        "--",
        "sh",
        "-c",
    ])
    .arg(script)
    .env("NOTIFY_SOCKET", "/run/systemd/notify-of-herd");
    let started = Instant::now();
    let herd = Herd::spawn(cmd);
    let pids = [herd.nth_spawned(1), herd.nth_spawned(2)];
    for pid in pids {
        herd.stderr.wait_for("a ready worker", STARTUP, |l| {
            l.contains(&format!("worker {pid} ready"))
        });
    }
    // Not before it said so: each sleeps 0.4 s first.
    assert!(started.elapsed() >= Duration::from_millis(400));
    herd.stdout
        .wait_for_nth("both notified", STARTUP, 2, |l| l.ends_with("] notified"));
    let sockets: Vec<String> = herd
        .stdout
        .all()
        .into_iter()
        .filter_map(|l| l.split_once("] socket ").map(|(_, s)| s.to_string()))
        .collect();
    assert_eq!(sockets.len(), 2, "{sockets:?}");
    assert_ne!(sockets[0], sockets[1], "a socket per worker");
    assert!(
        sockets
            .iter()
            .all(|s| !s.contains("notify-of-herd") && !s.is_empty()),
        "{sockets:?}"
    );
}

#[test]
fn a_worker_not_ready_in_time_is_killed_and_backs_off() {
    let herd = Herd::start([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--ready",
        "notify",
        "--ready-timeout",
        "300ms",
        "--backoff-initial",
        "50ms",
        "--",
        "sh",
        "-c",
        "exec sleep 30",
    ]);
    let started = Instant::now();
    let first = herd.nth_spawned(1);
    herd.stderr.wait_for("the timeout", STARTUP, |l| {
        l.contains(&format!("worker {first} not ready within 300ms"))
    });
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Failed starts are strikes: the second one waits (backoff), not at once.
    herd.stderr.wait_for_nth("second timeout", STARTUP, 2, |l| {
        l.contains("not ready within")
    });
    herd.stderr
        .wait_for("a backoff", STARTUP, |l| l.contains("restarting slot 0 in"));
    assert!(herd.stderr.count(|l| l.contains(" ready slot")) == 0);
}

#[test]
fn a_worker_that_says_nothing_is_ready_after_the_delay() {
    let herd = Herd::start([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--ready",
        "delay",
        "--ready-delay",
        "200ms",
        "--",
        "sh",
        "-c",
        "exec sleep 30",
    ]);
    let pid = herd.nth_spawned(1);
    herd.stderr.wait_for("ready by delay", STARTUP, |l| {
        l.contains(&format!("worker {pid} ready (--ready-delay passed)"))
    });
}

/// --watchdog: a worker that sent WATCHDOG=1 and then went silent is hung:
/// SIGABRT, and a replacement; WATCHDOG=trigger is hung at once. A worker
/// that never sent one is left alone.
#[test]
fn a_worker_silent_past_its_watchdog_is_aborted_and_replaced() {
    if systemd_notify_missing() {
        return;
    }
    let script = r#"echo "usec=$WATCHDOG_USEC";
        if [ "$HERD_WORKER_ID" = 0 ]; then systemd-notify WATCHDOG=1; exec sleep 30; fi;
        if [ "$HERD_WORKER_ID" = 1 ]; then sleep 0.2; systemd-notify WATCHDOG=trigger; exec sleep 30; fi;
        exec sleep 30"#;
    let herd = Herd::sh(&["-w", "3", "--no-listen", "--watchdog", "500ms"], script);
    herd.stdout
        .wait_for("WATCHDOG_USEC", STARTUP, |l| l.ends_with("] usec=500000"));
    let hung = herd.stderr.wait_for("the hung worker", STARTUP, |l| {
        l.contains("is hung: no WATCHDOG=1 for 500ms")
    });
    let pid = pid_after(&hung, "worker ");
    herd.stderr.wait_for("its SIGABRT death", STARTUP, |l| {
        l.contains(&format!("worker {pid} died (killed by SIGABRT"))
    });
    herd.stderr.wait_for("the trigger", STARTUP, |l| {
        l.contains("asked for its watchdog (WATCHDOG=trigger)")
    });
    // Slot 2 never sent WATCHDOG=1: no watchdog for it.
    let slot2 = herd
        .stderr
        .all()
        .iter()
        .find(|l| l.contains("spawned in slot 2"))
        .cloned();
    let slot2 = pid_after(&slot2.expect("slot 2 spawned"), "worker ");
    assert!(
        herd.stderr
            .count(|l| l.contains(&format!("worker {slot2} is hung")))
            == 0,
        "{:?}",
        herd.stderr.all()
    );
}

/// A worker that drains after SIGTTOU stops its heartbeats: it is going
/// anyway, and the watchdog must not abort its drain.
#[test]
fn the_watchdog_leaves_a_draining_worker_alone() {
    if systemd_notify_missing() {
        return;
    }
    let script = "trap 'sleep 1.5; exit 0' TERM; \
                  while :; do systemd-notify WATCHDOG=1; sleep 0.1; done";
    let herd = Herd::sh(&["-w", "2", "--no-listen", "--watchdog", "500ms"], script);
    let second = herd.nth_spawned(2);
    std::thread::sleep(Duration::from_millis(300));
    herd.signal("TTOU");
    herd.stderr.wait_for("its drain", STARTUP, |l| {
        l.contains(&format!(
            "worker {second} exited after it was asked to go (exit code 0)"
        ))
    });
    assert!(
        herd.stderr.count(|l| l.contains("is hung")) == 0,
        "{:?}",
        herd.stderr.all()
    );
}
