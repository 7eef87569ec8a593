//! No orphans: a SIGKILLed herd takes every worker and every descendant
//! (double-forked, setsid daemons too) with it; orphaned grandchildren are
//! reaped while herd runs.

use std::time::Duration;

use crate::util::*;

fn read_pid(path: &std::path::Path) -> u32 {
    assert!(eventually(STARTUP, || std::fs::read_to_string(path)
        .map(|s| s.ends_with('\n'))
        .unwrap_or(false)));
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A worker that double-forks a daemon (new session, so out of the worker's
/// process group) and writes its pid, then serves.
fn daemonizing_worker(dir: &std::path::Path) -> String {
    format!(
        "(setsid sleep 300 & echo $! > {d}/daemon.$$); exec {fixture}",
        d = dir.display(),
        fixture = fixture_bin().display()
    )
}

fn daemon_pids(dir: &std::path::Path, n: usize) -> Vec<u32> {
    assert!(eventually(STARTUP, || std::fs::read_dir(dir)
        .unwrap()
        .count()
        >= n));
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| read_pid(&e.path()))
        .collect()
}

#[test]
fn sigkill_of_herd_leaves_no_worker_and_no_descendant() {
    let dir = TempDir::new("orphans");
    let script = daemonizing_worker(dir.path());
    let mut herd = Herd::start([
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    herd.port();
    let workers = [herd.nth_spawned(1), herd.nth_spawned(2)];
    let daemons = daemon_pids(dir.path(), 2);
    for pid in workers.iter().chain(&daemons) {
        assert!(alive(*pid), "{pid} should be running");
    }
    herd.child.kill().unwrap(); // SIGKILL
    herd.child.wait().unwrap();
    for pid in workers.iter().chain(&daemons) {
        assert!(
            eventually(Duration::from_secs(1), || !alive(*pid)),
            "{pid} outlived herd by more than 1 s"
        );
    }
}

#[test]
fn graceful_stop_also_sweeps_descendants() {
    let dir = TempDir::new("sweep");
    let script = daemonizing_worker(dir.path());
    let mut herd = Herd::start([
        "run",
        "-w",
        "1",
        "-l",
        "127.0.0.1:0",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    herd.port();
    let daemons = daemon_pids(dir.path(), 1);
    herd.signal("TERM");
    assert_eq!(herd.wait(Duration::from_secs(10)).code(), Some(0));
    assert!(eventually(Duration::from_secs(1), || !alive(daemons[0])));
}

#[test]
fn orphaned_grandchildren_are_reaped_by_herd() {
    let dir = TempDir::new("reap");
    let script = format!(
        "(sleep 0.2 & echo $! > {d}/gc); exec {f}",
        d = dir.path().display(),
        f = fixture_bin().display()
    );
    let herd = Herd::start(["run", "-w", "1", "--no-listen", "--", "sh", "-c", &script]);
    herd.nth_spawned(1);
    let gc = read_pid(&dir.path().join("gc"));
    // Reparented to herd (the subreaper) while it lives…
    let ppid = std::fs::read_to_string(format!("/proc/{gc}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(") ")
                .next()
                .map(|r| r.split(' ').nth(1).unwrap().to_string())
        });
    if let Some(ppid) = ppid {
        assert_eq!(
            ppid,
            herd.pid().to_string(),
            "grandchild reparented to herd"
        );
    }
    // …and reaped when it exits: no zombie left.
    assert!(
        eventually(Duration::from_secs(3), || !std::path::Path::new(&format!(
            "/proc/{gc}"
        ))
        .exists()),
        "grandchild {gc} left as a zombie"
    );
}
