//! Restart policies, backoff, crash-loop intensity, unexecutable commands.

use std::time::Duration;

use crate::util::*;

const END: Duration = Duration::from_secs(20);

fn sh(script: &str) -> Vec<String> {
    ["--", "sh", "-c", script]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn run_args(flags: &[&str], script: &str) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--no-listen"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(flags.iter().map(|s| s.to_string()));
    args.extend(sh(script));
    args
}

#[test]
fn restart_never_lets_workers_finish() {
    let (status, stderr) = run_to_end(run_args(&["-w", "2", "--restart", "never"], "exit 0"), END);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stderr.matches(" spawned in slot ").count(), 2, "{stderr}");

    let (status, stderr) = run_to_end(run_args(&["-w", "2", "--restart", "never"], "exit 4"), END);
    assert_eq!(
        status.code(),
        Some(1),
        "a failed last worker makes herd fail: {stderr}"
    );
    assert!(stderr.contains("died (exit code 4)"), "{stderr}");
}

#[test]
fn restart_on_failure_replaces_only_failures() {
    let (status, stderr) = run_to_end(
        run_args(&["-w", "1", "--restart", "on-failure"], "exit 0"),
        END,
    );
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stderr.matches(" spawned in slot ").count(), 1, "{stderr}");

    // Fails twice, then succeeds: two restarts, then herd is done.
    let dir = TempDir::new("onfailure");
    let script = format!(
        "n=$(ls {d} | wc -l); touch {d}/run.$$; [ $n -ge 2 ] && exit 0; exit 1",
        d = dir.path().display()
    );
    let (status, stderr) = run_to_end(
        run_args(
            &[
                "-w",
                "1",
                "--restart",
                "on-failure",
                "--backoff-initial",
                "10ms",
            ],
            &script,
        ),
        END,
    );
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stderr.matches(" spawned in slot ").count(), 3, "{stderr}");
}

#[test]
fn restart_always_replaces_clean_exits_and_backs_off() {
    let mut herd = Herd::start(run_args(
        &[
            "-w",
            "1",
            "--backoff-initial",
            "40ms",
            "--max-restarts",
            "100",
        ],
        "exit 0",
    ));
    // First restart is immediate, later ones wait 40, 80, 160 ms (±25% jitter).
    herd.stderr.wait_for_nth("five spawns", STARTUP, 5, |l| {
        l.contains(" spawned in slot ")
    });
    let delays: Vec<u64> = herd
        .stderr
        .all()
        .iter()
        .filter_map(|l| l.split("delay_ms=").nth(1))
        .map(|d| d.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(delays.len() >= 3, "{delays:?}");
    for (i, nominal) in [40u64, 80, 160].iter().enumerate() {
        assert!(
            delays[i] >= nominal * 3 / 4 && delays[i] <= *nominal,
            "delay {i} = {} ms, nominal {nominal}: {delays:?}",
            delays[i]
        );
    }
    herd.signal("TERM");
    assert_eq!(herd.wait(END).code(), Some(0));
}

#[test]
fn crash_loop_can_exit_non_zero() {
    let (status, stderr) = run_to_end(
        run_args(
            &[
                "-w",
                "2",
                "--max-restarts",
                "3",
                "--within",
                "30s",
                "--backoff-initial",
                "5ms",
                "--on-crash-loop",
                "exit",
            ],
            "exit 1",
        ),
        END,
    );
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("CRASH LOOP: slot"), "{stderr}");
    assert!(stderr.contains("is in a crash loop; exiting"), "{stderr}");
}

#[test]
fn crash_loop_marks_slot_failed_and_keeps_retrying_at_the_cap() {
    // The first worker runs past --min-uptime and exits 0 (the cluster
    // served); every later one fails at start.
    let dir = TempDir::new("served-then-loop");
    let marker = dir.path().join("served");
    let script = format!(
        "if [ -e {m} ]; then exit 1; fi; touch {m}; sleep 0.4; exit 0",
        m = marker.display()
    );
    let mut herd = Herd::start(run_args(
        &[
            "-w",
            "1",
            "--min-uptime",
            "200ms",
            "--max-restarts",
            "2",
            "--within",
            "30s",
            "--backoff-initial",
            "5ms",
            "--backoff-max",
            "200ms",
        ],
        &script,
    ));
    herd.stderr
        .wait_for("crash loop", STARTUP, |l| l.contains("CRASH LOOP: slot 0"));
    herd.stderr.wait_for("failed mark", STARTUP, |l| {
        l.contains("slot 0 marked failed; retrying every 200ms")
    });
    let before = herd.stderr.count(|l| l.contains(" spawned in slot "));
    // Still retried, at the cap.
    herd.stderr
        .wait_for_nth("retries after the loop", STARTUP, before + 2, |l| {
            l.contains(" spawned in slot ")
        });
    assert!(herd.stderr.count(|l| l.contains("delay_ms=200")) >= 2);
    herd.signal("INT");
    assert_eq!(herd.wait(END).code(), Some(0));
}

#[test]
fn unexecutable_commands_fail_once_with_distinct_statuses() {
    let dir = TempDir::new("noexec");
    let script = dir.path().join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap(); // mode 0644
    let cases = [
        (
            vec!["run", "--", "herd-no-such-command"],
            127,
            "command not found: herd-no-such-command",
        ),
        (
            vec!["run", "--", "/no/such/file"],
            127,
            "command not found: /no/such/file",
        ),
        (
            vec!["run", "--", script.to_str().unwrap()],
            126,
            "cannot execute",
        ),
        (vec!["run", "--", "/tmp"], 126, "cannot execute /tmp"),
    ];
    for (args, code, message) in cases {
        let (status, stderr) = run_to_end(&args, END);
        assert_eq!(status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with("herd: ") && stderr.contains(message),
            "{stderr}"
        );
    }
}

#[test]
fn workers_auto_means_one_per_cpu() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let (status, stderr) = run_to_end(
        run_args(&["-w", "auto", "--restart", "never"], "exit 0"),
        END,
    );
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.matches(" spawned in slot ").count(),
        cpus,
        "{stderr}"
    );
}

/// A worker that ran past --min-uptime and was killed (an OOM kill, an
/// operator's kill -9) is replaced at once and is no crash-loop strike.
/// (Before: six kills within 30 s parked the slot as failed for 30 s.)
#[test]
fn healthy_workers_killed_again_and_again_are_not_a_crash_loop() {
    let mut herd = Herd::start(run_args(
        &["-w", "1", "--min-uptime", "200ms", "--max-restarts", "2"],
        "exec sleep 1000",
    ));
    for n in 1..=8 {
        let pid = herd.nth_spawned(n);
        std::thread::sleep(Duration::from_millis(250));
        send_signal(pid, "KILL");
        let next = herd.nth_spawned(n + 1);
        assert!(alive(next));
    }
    let log = herd.stderr.all().join("\n");
    assert!(!log.contains("CRASH LOOP"), "{log}");
    assert!(
        !log.contains("restarting slot 0 in"),
        "replaced at once: {log}"
    );
    herd.signal("TERM");
    assert_eq!(herd.wait(END).code(), Some(0));
}

/// A cluster in which no worker ever started gives up with exit 3 and the
/// worker's last stderr lines, like gunicorn's "worker failed to boot".
/// (Before: CRASH LOOP, then the port held open and retries every 30 s.)
#[test]
fn a_cluster_that_never_started_exits_3_with_the_workers_last_words() {
    let (status, stderr) = run_to_end(
        [
            "run",
            "-w",
            "2",
            "-l",
            "127.0.0.1:0",
            "--backoff-initial",
            "5ms",
            "--",
            "sh",
            "-c",
            "echo 'Error: Cannot find module /srv/app.js' >&2; exit 1",
        ],
        END,
    );
    assert_eq!(status.code(), Some(3), "{stderr}");
    let last = stderr.lines().rev().take(3).collect::<Vec<_>>().join("\n");
    assert!(last.contains("no worker ever started"), "{last}");
    assert!(last.contains("exit code 1"), "{last}");
    assert!(
        last.contains("| Error: Cannot find module /srv/app.js"),
        "{last}"
    );
}

/// After the cluster has served, the retry policy holds: a slot that
/// starts failing is retried, the cluster does not exit.
#[test]
fn a_cluster_that_served_keeps_retrying_a_failing_slot() {
    let dir = TempDir::new("served");
    let marker = dir.path().join("m");
    let script = format!(
        "if [ -e {m} ]; then exit 1; fi; touch {m}; sleep 0.3; exit 0",
        m = marker.display()
    );
    let mut herd = Herd::start(run_args(
        &[
            "-w",
            "1",
            "--min-uptime",
            "100ms",
            "--max-restarts",
            "2",
            "--backoff-initial",
            "5ms",
            "--backoff-max",
            "50ms",
        ],
        &script,
    ));
    herd.stderr
        .wait_for("crash loop", STARTUP, |l| l.contains("CRASH LOOP: slot 0"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(herd.pid()), "herd must keep retrying");
    herd.signal("TERM");
    assert_eq!(herd.wait(END).code(), Some(0));
}

/// execve failing in the child (after the PATH check passed) is an error
/// naming the file and the reason, exit 126/127, never a respawn loop.
#[test]
fn exec_failures_in_the_child_are_errors_not_loops() {
    let dir = TempDir::new("exec");
    let write = |name: &str, bytes: &[u8]| {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    };
    let cases = [
        (
            write("bad-interp", b"#!/usr/bin/nodee\nconsole.log(1)\n"),
            127,
            "interpreter /usr/bin/nodee not found",
        ),
        (
            write("no-shebang", b"echo hi\n"),
            126,
            "not an executable format",
        ),
        (
            write("broken-elf", b"\x7fELF\x02\x01\x01garbage"),
            126,
            "not an executable format",
        ),
        (
            write("crlf", b"#!/bin/sh\r\necho hi\r\n"),
            127,
            "carriage return",
        ),
    ];
    for (path, code, reason) in cases {
        let (status, stderr) = run_to_end(
            [
                "run",
                "-w",
                "4",
                "--no-listen",
                "--",
                path.to_str().unwrap(),
            ],
            END,
        );
        assert_eq!(status.code(), Some(code), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("herd: cannot execute ") && last.contains(reason),
            "{last}"
        );
        assert!(last.contains(path.to_str().unwrap()), "{last}");
        assert_eq!(
            stderr.matches("cannot execute").count(),
            2,
            "one log line and the final one, not one per slot: {stderr}"
        );
    }
}

/// A worker that fails by itself (exit status not 0) is a crash-loop strike
/// whatever its uptime: an app that loads for a while and then dies of a
/// config error backs off and, if nothing ever started, makes herd exit 3.
/// (Before: restarted at once, forever, once it outlived --min-uptime.)
#[test]
fn failures_after_min_uptime_still_count_and_a_never_started_cluster_exits() {
    let (status, stderr) = run_to_end(
        run_args(
            &[
                "-w",
                "1",
                "--min-uptime",
                "100ms",
                "--backoff-initial",
                "5ms",
            ],
            "sleep 0.3; echo 'KeyError: DATABASE_URL' >&2; exit 1",
        ),
        END,
    );
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("| KeyError: DATABASE_URL"), "{stderr}");
}

/// Zero delays are legal and safe: `--min-uptime 0s` with a worker that
/// fails at once is still a crash loop, not a spawn spin.
#[test]
fn zero_min_uptime_does_not_spin() {
    let (status, stderr) = run_to_end(
        run_args(
            &["-w", "2", "--min-uptime", "0s", "--backoff-initial", "0ms"],
            "exit 1",
        ),
        END,
    );
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.matches(" spawned in slot ").count() < 20, "{stderr}");
}

/// A worker's uptime ends when it exits, not when herd hears of it: a
/// worker whose child still holds its IPC channel (herd waits up to 500 ms
/// for the channel's last messages) dies fast and counts as fast. (Before:
/// its exit was seen ~500 ms late and counted as a healthy run.)
#[test]
fn uptime_is_measured_to_the_exit_not_to_the_report() {
    let (status, stderr) = run_to_end(
        run_args(
            &[
                "-w",
                "1",
                "--min-uptime",
                "400ms",
                "--max-restarts",
                "2",
                "--backoff-initial",
                "5ms",
                "--node-ipc",
                "on",
            ],
            "sleep 5 & exec sleep 0.1",
        ),
        END,
    );
    assert_eq!(status.code(), Some(3), "{stderr}");
}

/// Under `--log-format json` herd's last word is a JSON object too, for the
/// log shipper that reads its lines.
#[test]
fn the_final_error_is_json_under_json_logs() {
    let (status, stderr) = run_to_end(
        run_args(&["-w", "1", "--log-format", "json"], "exit 1"),
        END,
    );
    assert_eq!(status.code(), Some(3), "{stderr}");
    let last = stderr.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).expect(last);
    assert_eq!(v["level"], "ERROR", "{last}");
    assert_eq!(v["exit_status"], 3, "{last}");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("no worker ever started"));
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "{line}"
        );
    }
}

/// Even when every delay is zero and the worker exits 0 at once (so it is
/// never a strike), a slot starts at most 10 workers a second: no spin.
#[test]
fn a_slot_starts_at_most_ten_workers_a_second() {
    let mut herd = Herd::start(run_args(
        &["-w", "1", "--min-uptime", "0s", "--backoff-initial", "0ms"],
        "exit 0",
    ));
    herd.nth_spawned(1);
    std::thread::sleep(Duration::from_millis(2000));
    let spawned = herd.spawned().len();
    assert!(spawned <= 35, "{spawned} workers started in about 2 s");
    assert!(spawned >= 10, "restarts go on: {spawned}");
    herd.signal("TERM");
    assert_eq!(herd.wait(END).code(), Some(0));
}
