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

/// `herd run -w N` of daemonizing workers, listening; the daemons write
/// their pids into the returned directory.
fn daemonizing_cluster(tag: &str, workers: usize) -> (TempDir, Herd) {
    let dir = TempDir::new(tag);
    let script = daemonizing_worker(dir.path());
    let w = workers.to_string();
    let herd = Herd::start([
        "run",
        "-w",
        &w,
        "-l",
        "127.0.0.1:0",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    herd.port();
    (dir, herd)
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
    let (dir, mut herd) = daemonizing_cluster("orphans", 2);
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
    let (dir, mut herd) = daemonizing_cluster("sweep", 1);
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
    let herd = Herd::sh(&["-w", "1", "--no-listen"], &script);
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

/// As PID 1 (a container's init), herd reaps every orphan that lands on it
/// and still stops gracefully on SIGTERM.
#[test]
fn as_pid_1_herd_reaps_every_zombie() {
    let probe = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--mount-proc", "true"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("skipped: cannot create a PID namespace here (unshare --pid needs root)");
        return;
    }
    let script = format!(
        "for i in 1 2 3 4 5; do (sleep 0.05 &); done; exec {}",
        fixture_bin().display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(herd_bin())
        .args(["run", "-w", "1", "--no-listen", "--", "sh", "-c", &script]);
    let mut herd = Herd::spawn(cmd);
    herd.nth_spawned(1);
    // herd's pid outside the namespace: unshare's only child.
    let unshare = herd.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap();
    let outer: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let zombies_of_herd = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|stat| {
                let rest: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
                rest[0] == "Z" && rest[1] == outer.to_string()
            })
            .count()
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        eventually(Duration::from_secs(2), || zombies_of_herd() == 0),
        "herd as PID 1 left zombies"
    );
    send_signal(outer, "TERM");
    assert_eq!(herd.wait(Duration::from_secs(10)).code(), Some(0));
}

/// A worker is its whole process tree (systemd's KillMode=control-group):
/// when it dies, what it started goes too — a child in its group, one that
/// scrubbed its environment (`env -i`), and one that ignores SIGTERM (after
/// the stop timeout) — while the replacement serves. (Before: a killed
/// worker's child kept serving beside the replacement, and a child with a
/// scrubbed environment outlived herd.)
#[test]
fn a_dead_workers_processes_go_with_it() {
    for contain in ["process-group", "auto"] {
        dead_workers_processes_go_with_it(contain);
    }
}

fn dead_workers_processes_go_with_it(contain: &str) {
    let dir = TempDir::new("tree");
    let d = dir.path().display();
    let script = format!(
        "if [ ! -e {d}/first ]; then touch {d}/first; \
           sleep 1000 & echo $! > {d}/child; \
           env -i sleep 1001 & echo $! > {d}/scrubbed; \
           sh -c 'trap \"\" TERM; exec sleep 1002' & echo $! > {d}/stubborn; \
         fi; exec {fixture}",
        fixture = fixture_bin().display()
    );
    let mut herd = Herd::start([
        "run",
        "-w",
        "1",
        "-l",
        "127.0.0.1:0",
        "--stop-timeout",
        "1s",
        "--contain",
        contain,
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let port = herd.port();
    let worker = herd.nth_spawned(1);
    let pids: Vec<u32> = ["child", "scrubbed", "stubborn"]
        .iter()
        .map(|f| read_pid(&dir.path().join(f)))
        .collect();
    assert!(pids.iter().all(|p| alive(*p)));
    send_signal(worker, "KILL");
    let replacement = herd.nth_spawned(2);
    // SIGTERM at once for the first two; SIGKILL after the stop timeout (1 s).
    assert!(
        eventually(Duration::from_secs(3), || pids.iter().all(|p| !alive(*p))),
        "{contain}: still alive: {:?}",
        pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
    );
    let resp = http_get(port).expect("the replacement serves");
    assert!(
        body(&resp).contains(&format!("pid={replacement}")),
        "{resp}"
    );
    herd.signal("TERM");
    assert_eq!(herd.wait(Duration::from_secs(15)).code(), Some(0));
    assert!(!alive(replacement));
}

/// Where herd can create cgroups, a worker's descendant that leaves its
/// process group and scrubs its environment (`setsid env -i`) — invisible
/// to process groups and to the guardian's environment sweep — still dies
/// with the worker, and with a SIGKILLed herd; herd's cgroups are removed.
#[test]
fn with_cgroups_even_an_escaped_descendant_dies_with_its_worker() {
    let dir = TempDir::new("cgroup");
    let d = dir.path().display();
    let script = format!(
        "if [ ! -e {d}/first ]; then touch {d}/first; \
           setsid env -i sleep 1004 & echo $! > {d}/escaped1; fi; \
         if [ ! -e {d}/second ] && [ -e {d}/go ]; then touch {d}/second; \
           setsid env -i sleep 1005 & echo $! > {d}/escaped2; fi; \
         exec sleep 1000",
    );
    let mut herd = Herd::sh(&["-w", "1", "--no-listen", "--stop-timeout", "1s"], &script);
    let line = herd.stderr.wait_for("the containment line", STARTUP, |l| {
        l.contains("each worker ")
    });
    if !line.contains("cgroup of its own") {
        eprintln!("skipped: herd cannot create cgroups here ({line})");
        return;
    }
    let root = line
        .split("cgroup of its own under ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .unwrap()
        .to_string();
    let worker = herd.nth_spawned(1);
    let escaped = read_pid(&dir.path().join("escaped1"));
    assert!(alive(escaped));
    std::fs::write(dir.path().join("go"), "").unwrap();
    send_signal(worker, "KILL");
    herd.nth_spawned(2);
    assert!(
        eventually(Duration::from_secs(4), || !alive(escaped)),
        "the escaped descendant outlived its worker"
    );
    // And when herd itself is SIGKILLed, its guardian empties its cgroups.
    let escaped2 = read_pid(&dir.path().join("escaped2"));
    assert!(alive(escaped2));
    herd.child.kill().unwrap();
    herd.child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(4), || !alive(escaped2)),
        "the escaped descendant outlived herd"
    );
    assert!(
        eventually(Duration::from_secs(4), || !std::path::Path::new(&root)
            .exists()),
        "{root} was not removed"
    );
}

/// The guardian does not look like a worker in `ps`: its own title and comm.
#[test]
fn the_guardian_has_its_own_name() {
    let herd = Herd::start(["run", "-w", "1", "--no-listen", "--", "sleep", "1000"]);
    herd.nth_spawned(1);
    let mut guardian = None;
    assert!(eventually(STARTUP, || {
        guardian = children(herd.pid())
            .into_iter()
            .find(|p| comm(*p) == "herd-guardian");
        guardian.is_some()
    }));
    let g = guardian.unwrap();
    let cmdline = std::fs::read(format!("/proc/{g}/cmdline")).unwrap();
    let title = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap());
    assert_eq!(title, format!("herd: guardian of {}", herd.pid()));
    assert!(!String::from_utf8_lossy(&cmdline).contains("sleep"));
}
