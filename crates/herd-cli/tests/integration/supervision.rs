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
    // The first worker runs past --min-uptime (the cluster served); every
    // later one fails at start.
    let dir = TempDir::new("served-then-loop");
    let marker = dir.path().join("served");
    let script = format!(
        "if [ -e {m} ]; then exit 1; fi; touch {m}; sleep 0.4; exit 1",
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
