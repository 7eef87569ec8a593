//! Rolling reload (SIGHUP): every worker replaced under load with no
//! request lost, the new one ready before the old one drains; a version
//! that cannot boot rolls back with its stderr reported; the command is
//! resolved again (a moved `current` symlink is followed); requests during a
//! reload are coalesced.

use std::time::Duration;

use crate::util::*;

/// SIGHUP under continuous keep-alive and `Connection: close` load, with
/// herd's built-in worker (which drains properly): 0 failed requests, and
/// every worker replaced. (Round-robin needs workers with a channel: Node's
/// or the library's; see the library tests.)
fn reload_under_load(balance: &str) {
    let herd = Herd::start(["run", "-w", "4", "--balance", balance, "-l", "127.0.0.1:0"]);
    let port = herd.port();
    for n in 1..=4 {
        herd.stderr.wait_for_nth("ready", STARTUP, n, |l| {
            l.contains(" ready") && !l.contains("new connections")
        });
    }
    let old = herd.spawned();
    let load = Load::start(port, 4);
    std::thread::sleep(Duration::from_millis(300));
    herd.signal("HUP");
    herd.stderr
        .wait_for("reload done", Duration::from_secs(30), |l| {
            l.contains("reload done")
        });
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{balance}: {} of {} failed: {:?}\n{}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)],
        herd.stderr.all().join("\n")
    );
    assert!(ok > 100, "{balance}: the load ran: {ok}");
    let spawned = herd.spawned();
    assert_eq!(spawned.len(), 8, "{balance}: {spawned:?}");
    for pid in &old {
        assert!(
            eventually(Duration::from_secs(10), || !alive(*pid)),
            "{balance}: old worker {pid} still alive"
        );
    }
    // Each old worker drained only after its replacement was ready.
    let lines = herd.stderr.all();
    for (i, pid) in old.iter().enumerate() {
        let drains = lines
            .iter()
            .position(|l| l.contains(&format!("worker {pid} drains")))
            .unwrap_or_else(|| panic!("{balance}: worker {pid} never drained"));
        let new = spawned[4 + i];
        let ready = lines
            .iter()
            .position(|l| l.contains(&format!("worker {new} ready")))
            .unwrap_or_else(|| panic!("{balance}: worker {new} never ready"));
        assert!(
            ready < drains,
            "{balance}: {pid} drained before {new} was ready"
        );
    }
}

#[test]
fn sighup_replaces_every_worker_with_no_request_lost_shared() {
    reload_under_load("shared");
}

#[test]
fn sighup_replaces_every_worker_with_no_request_lost_reuseport() {
    reload_under_load("reuseport");
}

/// A new version that cannot boot: the reload stops at the first new
/// worker, the old workers never stop serving, and herd says why with the
/// new worker's stderr. Once fixed, a reload succeeds.
#[test]
fn a_reload_whose_new_version_cannot_boot_rolls_back() {
    let dir = TempDir::new("reload-broken");
    let broken = dir.path().join("broken");
    let script = format!(
        "if [ -e {} ]; then echo 'boom: DATABASE_URL is not set' >&2; exit 3; fi; exec {} hello",
        broken.display(),
        herd_bin().display()
    );
    let herd = Herd::sh(&["-w", "3", "-l", "127.0.0.1:0"], &script);
    let port = herd.port();
    for n in 1..=3 {
        herd.stderr
            .wait_for_nth("ready", STARTUP, n, |l| l.contains(" ready slot"));
    }
    let old = herd.spawned();
    let load = Load::start(port, 2);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&broken, "").unwrap();
    herd.signal("HUP");
    let failed_line = herd
        .stderr
        .wait_for("RELOAD FAILED", Duration::from_secs(30), |l| {
            l.contains("RELOAD FAILED")
        });
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = load.finish();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 20, "the load ran: {ok}");
    assert!(failed_line.contains("exit code 3"), "{failed_line}");
    let all = herd.stderr.all().join("\n");
    assert!(all.contains("boom: DATABASE_URL is not set"), "{all}");
    // Every old worker serves on; none was asked to drain.
    for pid in &old {
        assert!(alive(*pid), "old worker {pid} was stopped");
    }
    assert_eq!(
        herd.stderr.count(|l| l.contains("drains: it was replaced")),
        0,
        "{all}"
    );
    // Fixed: the next reload goes through.
    std::fs::remove_file(&broken).unwrap();
    herd.signal("HUP");
    herd.stderr
        .wait_for("reload done", Duration::from_secs(30), |l| {
            l.contains("reload done")
        });
    for pid in &old {
        assert!(eventually(Duration::from_secs(10), || !alive(*pid)));
    }
    let r = http_get(port).unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// The command is resolved again on reload, in the working directory as
/// the user named it: a `current -> releases/N` symlink moved by a deploy
/// is followed. A second SIGHUP during a reload is queued, never
/// interleaved.
#[test]
fn a_reload_follows_a_moved_current_symlink_and_coalesces_requests() {
    let dir = TempDir::new("reload-symlink");
    let started = dir.path().join("started");
    for release in ["1", "2"] {
        let rel = dir.path().join("releases").join(release);
        std::fs::create_dir_all(&rel).unwrap();
        let run = rel.join("run.sh");
        std::fs::write(
            &run,
            format!(
                "#!/bin/sh\necho {release} >> {}\nexec {} hello\n",
                started.display(),
                herd_bin().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let current = dir.path().join("current");
    std::os::unix::fs::symlink("releases/1", &current).unwrap();
    let mut cmd = std::process::Command::new(herd_bin());
    // `--ready delay`: each new worker takes 1 s to count as ready, so the
    // reload surely still runs when the next SIGHUPs come.
    cmd.args([
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--ready",
        "delay",
        "--ready-delay",
        "1s",
        "--",
        "./run.sh",
    ])
    .current_dir(&current)
    .env("PWD", &current);
    let herd = Herd::spawn(cmd);
    for n in 1..=2 {
        herd.stderr
            .wait_for_nth("ready", STARTUP, n, |l| l.contains(" ready ("));
    }
    // Deploy release 2: the symlink moves (atomically, as deploy tools do).
    let tmp = dir.path().join("current.new");
    std::os::unix::fs::symlink("releases/2", &tmp).unwrap();
    std::fs::rename(&tmp, &current).unwrap();
    herd.signal("HUP");
    herd.signal("HUP");
    herd.signal("HUP");
    herd.stderr.wait_for("queued", STARTUP, |l| {
        l.contains("a reload is running; another follows it")
    });
    herd.stderr
        .wait_for_nth("reload done", Duration::from_secs(30), 2, |l| {
            l.contains("reload done")
        });
    let log = std::fs::read_to_string(&started).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    // 2 workers at start from release 1, then two reloads of 2 from release 2.
    assert_eq!(lines, ["1", "1", "2", "2", "2", "2"], "{log}");
    // Coalesced: three SIGHUPs, two reloads, the second after the first.
    let done = herd.stderr.positions(|l| l.contains("reload done"));
    let began = herd.stderr.positions(|l| l.contains("rolling reload of"));
    let all = herd.stderr.all();
    assert_eq!((done.len(), began.len()), (2, 2), "{all:?}");
    assert!(done[0] < began[1], "interleaved: {all:?}");
}

/// `--max-lifetime`: workers are recycled through the reload path (the
/// replacement ready first, then the old one drains), under load, with no
/// request lost.
#[test]
fn max_lifetime_recycles_workers_replacement_first_with_no_request_lost() {
    let herd = Herd::start([
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--max-lifetime",
        "1s",
    ]);
    let port = herd.port();
    let load = Load::start(port, 2);
    herd.stderr
        .wait_for_nth("recycled", Duration::from_secs(20), 3, |l| {
            l.contains("is ready and serves; worker")
        });
    let (ok, failed) = load.finish();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 50, "the load ran: {ok}");
    let all = herd.stderr.all();
    let recycling = all
        .iter()
        .filter(|l| l.contains("recycling worker") && l.contains("--max-lifetime"))
        .count();
    assert!(recycling >= 3, "{all:?}");
    // Never more than 2 + 1 (the surge) workers.
    assert!(workers_of(herd.pid()).len() <= 3 + 1, "with the guardian");
}

/// `--max-memory`: a worker whose process tree grows past the limit (a
/// child holding 80 MB) is replaced, replacement first; the hog goes with
/// its tree, and workers under the limit stay.
#[test]
fn max_memory_recycles_a_worker_whose_tree_grows_past_the_limit() {
    if python_missing() {
        return;
    }
    let dir = TempDir::new("max-memory");
    let flag = dir.path().join("hogged");
    let script = format!(
        "if [ \"$HERD_WORKER_ID\" = 0 ] && [ ! -e {flag} ]; then touch {flag}; \
         python3 -c 'import time; b = bytearray(80000000); time.sleep(600)' & fi; \
         exec {herd} hello",
        flag = flag.display(),
        herd = herd_bin().display()
    );
    let herd = Herd::sh(
        &["-w", "2", "-l", "127.0.0.1:0", "--max-memory", "48M"],
        &script,
    );
    let port = herd.port();
    let first = herd.nth_spawned(1);
    let second = herd.nth_spawned(2);
    let load = Load::start(port, 2);
    let line = herd
        .stderr
        .wait_for("recycled", Duration::from_secs(20), |l| {
            l.contains("recycling worker") && l.contains("--max-memory")
        });
    herd.stderr
        .wait_for("replaced", Duration::from_secs(20), |l| {
            l.contains(&format!("worker {first} drains"))
        });
    assert!(eventually(Duration::from_secs(10), || !alive(first)));
    std::thread::sleep(Duration::from_millis(2500));
    let (ok, failed) = load.finish();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 20, "the load ran: {ok}");
    assert!(
        line.contains(&format!("worker {first} in slot 0")),
        "{line}"
    );
    // Once: the replacement and slot 1 stay under the limit.
    assert_eq!(
        herd.stderr.count(|l| l.contains("recycling worker")),
        1,
        "{:?}",
        herd.stderr.all()
    );
    assert!(alive(second));
}
