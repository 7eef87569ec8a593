//! Stopping: stop signal to each worker's process group, stop timeout, then
//! SIGKILL; a second signal forces the kill at once; exit status 0.

use std::time::{Duration, Instant};

use crate::util::*;

/// A worker that ignores SIGTERM (its `sleep` children do not).
const STUBBORN: &str = "trap '' TERM; while :; do sleep 0.05; done";

#[test]
fn stop_timeout_then_sigkill() {
    let mut herd = Herd::sh(
        &["-w", "2", "--no-listen", "--stop-timeout", "600ms"],
        STUBBORN,
    );
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
    assert_eq!(
        herd.stderr
            .count(|l| l.contains("stop timeout (600ms) expired")),
        1
    );
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
    let mut herd = Herd::sh(
        &["-w", "1", "--no-listen", "--stop-timeout", "60s"],
        STUBBORN,
    );
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
    let mut herd = Herd::sh(
        &["-w", "1", "--no-listen", "--stop-signal", "USR1"],
        &script,
    );
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
    // Those an operator sends by habit (logged once; SIGTTIN and SIGTTOU
    // scale, see scaling.rs; SIGHUP reloads, see reload.rs), and stray ones whose
    // default action would also end herd (ignored): SIGXFSZ comes when a log
    // file hits `ulimit -f`.
    for sig in [
        "USR1", "USR2", "WINCH", "PIPE", "ALRM", "USR1", "XFSZ", "PROF", "VTALRM", "IO", "PWR",
        "XCPU", "34", "64",
    ] {
        herd.signal(sig);
        std::thread::sleep(Duration::from_millis(30));
    }
    for sig in ["SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGPIPE", "SIGALRM"] {
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

/// A stop ends even when the worker ignores SIGTERM and what it started
/// left its process group and ignores SIGTERM too: after the stop timeout
/// everything gets SIGKILL, whichever way workers are contained. (Before,
/// in cgroup mode, herd waited for such a leftover forever.)
#[test]
fn stop_ends_when_a_stubborn_worker_left_stubborn_children() {
    for contain in ["auto", "process-group"] {
        let dir = TempDir::new("stubborn-tree");
        let script = format!(
            "trap '' TERM; setsid sh -c 'trap \"\" TERM; echo $$ > {d}/child; exec sleep 1000' & \
             while :; do sleep 0.05; done",
            d = dir.path().display()
        );
        let mut herd = Herd::start([
            "run",
            "-w",
            "1",
            "--no-listen",
            "--stop-timeout",
            "1s",
            "--contain",
            contain,
            "--",
            "sh",
            "-c",
            &script,
        ]);
        let worker = herd.nth_spawned(1);
        let child_file = dir.path().join("child");
        assert!(eventually(STARTUP, || std::fs::read_to_string(&child_file)
            .is_ok_and(|t| t.ends_with('\n'))));
        let child: u32 = std::fs::read_to_string(&child_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        herd.signal("TERM");
        let status = herd.wait(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{contain}");
        assert!(
            eventually(Duration::from_secs(3), || !alive(worker) && !alive(child)),
            "{contain}: worker {worker} or its child {child} survived"
        );
    }
}

/// A worker that leaves its process group (here: joins herd's) is still
/// signalled and killed by pid; the stop ends at the stop timeout.
#[test]
fn stop_ends_when_a_worker_left_its_process_group() {
    if std::process::Command::new("python3")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("skipped: python3 is not installed");
        return;
    }
    let script = "import os, signal, time\n\
                  signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
                  os.setpgid(0, os.getpgid(int(os.environ['HERD_PRIMARY_PID'])))\n\
                  print('moved', flush=True)\n\
                  time.sleep(1000)\n";
    for contain in ["auto", "process-group"] {
        // herd in a process group of its own, so the worker joins that one.
        let mut cmd = std::process::Command::new(herd_bin());
        cmd.args([
            "run",
            "-w",
            "1",
            "--no-listen",
            "--stop-timeout",
            "1s",
            "--contain",
            contain,
            "--",
            "python3",
            "-c",
            script,
        ]);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut herd = Herd::spawn(cmd);
        let worker = herd.nth_spawned(1);
        herd.stdout
            .wait_for("the worker moved", STARTUP, |l| l.ends_with("] moved"));
        herd.signal("TERM");
        let status = herd.wait(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{contain}");
        assert!(
            eventually(Duration::from_secs(3), || !alive(worker)),
            "{contain}"
        );
    }
}
