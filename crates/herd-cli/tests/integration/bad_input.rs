//! Bad input: one clear line on stderr, exit status 2, never a panic.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::*;

fn check(args: &[&str], expect: &str) {
    let (status, stderr) = run_to_end(args, Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: one line, got:\n{stderr}"
    );
    assert!(stderr.starts_with("herd: "), "{stderr}");
    assert!(
        stderr.contains(expect),
        "{args:?}: {stderr:?} lacks {expect:?}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn bad_flags_and_specs_are_one_line_and_status_2() {
    let long = format!("unix:/tmp/{}", "x".repeat(120));
    check(&["run", "--frobnicate"], "--frobnicate");
    check(&["bogus-subcommand"], "bogus-subcommand");
    check(&["run", "-w", "0"], "at least 1 worker");
    check(&["run", "-w", "100000"], "at most 1024 workers");
    check(&["run", "-w", "many"], "expected a number or auto");
    check(
        &["run", "-l", "8000"],
        "has a port but no host: use :8000 (every interface) or 127.0.0.1:8000",
    );
    // Two specs that overlap (a wildcard includes every host on its port).
    check(
        &["run", "-l", "127.0.0.1:9", "-l", ":9"],
        "-l :9 overlaps -l 127.0.0.1:9",
    );
    check(&["run", "-l", "127.0.0.1:99999"], "not a port number");
    check(&["run", "-l", "[::1:80"], "has no port");
    check(
        &["run", "-l", &long],
        "unix socket path is 125 bytes, the limit is 107",
    );
    check(&["run", "--balance", "random"], "unknown balance mode");
    check(
        &["run", "-l", "[fe80::1]:8000"],
        "fe80::1 is link-local and needs a scope, the interface it is on, e.g. [fe80::1%eth0]:8000",
    );
    check(
        &["run", "--balance", "round-robin", "-l", "127.0.0.1:0"],
        "round-robin balancing hands connections to workers over an IPC channel",
    );
    check(&["run", "--restart", "sometimes"], "unknown restart policy");
    check(&["run", "--stop-signal", "SIGNOPE"], "unknown signal");
    check(&["run", "--stop-timeout", "soon"], "invalid duration");
    // The worker command without `--`: say where it goes.
    check(
        &["run", "node", "server.js"],
        "the worker command goes after --, e.g. herd run -w 2 -- node",
    );
    // The same spec twice: herd would clash with itself.
    // (Refused before anything is bound: no port is used.)
    check(
        &["run", "-l", "127.0.0.1:9", "-l", "127.0.0.1:9"],
        "-l 127.0.0.1:9 is given twice",
    );
    // A value with a newline still makes one line.
    check(&["run", "--stop-timeout", "1\n2"], "invalid duration");
}

#[test]
fn help_and_version_exit_0() {
    for args in [["--help"], ["--version"]] {
        let out = Command::new(herd_bin()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert!(!out.stdout.is_empty());
    }
    let out = Command::new(herd_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("127  the worker command was not found"));
}

#[test]
fn privileged_port_without_privilege_is_permission_denied() {
    if !is_root() {
        eprintln!("skipped: needs root to drop to an unprivileged uid");
        return;
    }
    let unprivileged_start: u32 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024);
    if unprivileged_start <= 80 {
        eprintln!("skipped: port 80 is not privileged on this host");
        return;
    }
    // Bind as nobody, as an unprivileged user would.
    let mut cmd = Command::new(herd_bin());
    cmd.args(["run", "-l", "127.0.0.1:80"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "skipped: uid 65534 cannot run {}: {e}",
                herd_bin().display()
            );
            return;
        }
    };
    let status = wait_child(&mut child, Duration::from_secs(10));
    let _ = child.kill();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("permission denied binding 127.0.0.1:80"),
        "{stderr}"
    );
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// `herd --help` points at what a newcomer needs (`herd run`, its options),
/// and every option of `run` shows its values instead of a placeholder.
#[test]
fn help_points_to_run_and_names_every_value() {
    let out = Command::new(herd_bin()).arg("--help").output().unwrap();
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(top.contains("herd run --help"), "{top}");
    assert!(top.contains("herd run -w 4"), "{top}");
    let out = Command::new(herd_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let run = String::from_utf8_lossy(&out.stdout);
    for shown in ["--node-ipc <auto|on|off>", "--log-format <text|json>"] {
        assert!(run.contains(shown), "{shown} in:\n{run}");
    }
    let placeholders: Vec<&str> = run
        .lines()
        .filter(|l| l.trim_start().starts_with("--") && l.contains("<") && l.contains("_"))
        .filter(|l| {
            let inside = &l[l.find('<').unwrap()..];
            inside
                .chars()
                .take_while(|c| *c != '>')
                .all(|c| !c.is_lowercase())
        })
        .collect();
    assert!(
        placeholders.is_empty(),
        "options with a bare placeholder: {placeholders:?}"
    );
}
