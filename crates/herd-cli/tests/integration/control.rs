//! The control socket and its commands: `herd ls`, `status`, `reload`,
//! `scale`, `restart`, `signal`, `stop`, `logs`, driven as an operator
//! would, against real clusters; and clients that misbehave.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// A cluster of `n` built-in hello workers named `name`, all ready.
fn hello_cluster(name: &str, n: usize) -> Herd {
    let workers = n.to_string();
    let herd = Herd::start(["run", "-w", &workers, "--name", name, "-l", "127.0.0.1:0"]);
    for i in 1..=n {
        herd.stderr
            .wait_for_nth("ready", STARTUP, i, |l| l.contains(" ready slot="));
    }
    herd
}

fn slot_pids(status: &serde_json::Value, role: &str) -> Vec<(u64, u64)> {
    status["slots"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            let slot = s["slot"].as_u64().unwrap();
            s["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["role"] == role)
                .map(move |w| (slot, w["pid"].as_u64().unwrap()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn ls_and_status_show_every_worker() {
    let herd = hello_cluster("web", 2);
    let (code, out, err) = herd.ctl(&["ls", "--json"]);
    assert_eq!(code, 0, "{err}");
    let ls: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ls[0]["name"], "web", "{out}");
    assert_eq!(ls[0]["pid"], herd.pid());
    assert_eq!(
        (ls[0]["ready"].as_u64(), ls[0]["workers"].as_u64()),
        (Some(2), Some(2))
    );

    let status = herd.status_json("web");
    let mut spawned: Vec<u64> = herd.spawned().iter().map(|p| u64::from(*p)).collect();
    let mut listed: Vec<u64> = slot_pids(&status, "current")
        .iter()
        .map(|(_, p)| *p)
        .collect();
    spawned.sort();
    listed.sort();
    assert_eq!(listed, spawned, "{status}");
    for slot in status["slots"].as_array().unwrap() {
        assert_eq!(slot["state"], "running", "{status}");
        let w = &slot["workers"][0];
        assert_eq!(w["ready"], true);
        assert!(w["rss_bytes"].as_u64().unwrap() > 1 << 20, "{status}");
        assert!(w["cpu_s"].as_f64().is_some(), "{status}");
    }
    assert_eq!(status["listeners"][0]["queued"], 0, "{status}");
    assert_eq!(
        status["listeners"][0]["spec"],
        format!("127.0.0.1:{}", herd.port())
    );

    // The table an operator reads, and the name left out (one cluster).
    let (code, out, _) = herd.ctl(&["status"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("web: pid "), "{out}");
    assert!(out.contains("2/2 ready"), "{out}");
    assert!(out.contains("running"), "{out}");
}

#[test]
fn reload_scale_restart_signal_and_stop_through_the_socket() {
    let mut herd = hello_cluster("ops", 2);
    let port = herd.port();

    let (code, out, err) = herd.ctl(&["scale", "ops", "+1"]);
    assert_eq!((code, out.as_str()), (0, "ops: 3 workers"), "{err}");
    herd.stderr
        .wait_for_nth("ready", STARTUP, 3, |l| l.contains(" ready slot="));
    let (code, out, _) = herd.ctl(&["scale", "ops", "2"]);
    assert_eq!((code, out.as_str()), (0, "ops: 2 workers"));
    herd.stderr
        .wait_for("slot 2 removed", STARTUP, |l| l.contains("slot 2 removed"));

    // restart: a new worker first, then the old one drains.
    let old0 = slot_pids(&herd.status_json("ops"), "current")[0].1 as u32;
    let (code, out, err) = herd.ctl(&["restart", "ops", "0"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("replacing worker {old0} in slot 0")),
        "{out}"
    );
    herd.stderr.wait_for("old worker drains", STARTUP, |l| {
        l.contains(&format!("worker {old0} drains"))
    });
    assert!(eventually(STARTUP, || !alive(old0)));
    let status = herd.status_json("ops");
    assert_eq!(status["counters"]["restarts_recycled"], 1, "{status}");
    assert_ne!(slot_pids(&status, "current")[0].1 as u32, old0);
    let (code, _, err) = herd.ctl(&["restart", "ops", "7"]);
    assert_eq!(code, 1);
    assert!(err.contains("no slot 7"), "{err}");
    let (code, out, _) = herd.ctl(&["restart", "ops", "7", "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).expect("a JSON error answer");
    assert_eq!(v["ok"], false, "{out}");
    assert!(v["error"].as_str().unwrap().contains("no slot 7"), "{out}");

    // reload waits for the outcome.
    let (code, out, err) = herd.ctl(&["reload", "ops"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "ops: reloaded (generation 1)"),
        "{err}"
    );
    let status = herd.status_json("ops");
    for s in status["slots"].as_array().unwrap() {
        assert_eq!(s["workers"][0]["generation"], 1, "{status}");
    }

    // signal: TERM to slot 1's worker, which is restarted.
    let victim = slot_pids(&status, "current")[1].1 as u32;
    let (code, out, err) = herd.ctl(&["signal", "ops", "TERM", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&victim.to_string()), "{out}");
    assert!(eventually(STARTUP, || !alive(victim)));
    herd.stderr.wait_for("slot 1 respawned", STARTUP, |l| {
        l.contains(" spawned in slot 1") && !l.contains(&victim.to_string())
    });
    assert!(http_get(port).is_ok());

    // stop: returns once herd has exited; the socket is gone.
    let (code, out, err) = herd.ctl(&["stop", "ops"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("ops: stopped"), "{out}");
    assert!(herd.wait(Duration::from_secs(5)).success());
    assert!(!herd.runtime.join("ops.sock").exists());
    let (code, _, err) = herd.ctl(&["status", "ops"]);
    assert_eq!(code, 4);
    assert!(err.contains("no cluster named \"ops\" is running"), "{err}");
}

#[test]
fn a_reload_that_rolls_back_exits_1_and_says_why() {
    let dir = TempDir::new("ctl-reload");
    let flag = dir.path().join("broken");
    let script = format!(
        "if [ -e {} ]; then echo 'config error: no such table' >&2; exit 3; fi; exec {} hello",
        flag.display(),
        herd_bin().display()
    );
    let herd = Herd::sh(&["-w", "2", "--name", "rb", "-l", "127.0.0.1:0"], &script);
    for n in 1..=2 {
        herd.stderr
            .wait_for_nth("ready", STARTUP, n, |l| l.contains(" ready slot="));
    }
    std::fs::write(&flag, "").unwrap();
    let (code, out, err) = herd.ctl(&["reload", "rb"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("reload failed"), "{err}");
    assert!(err.contains("config error: no such table"), "{err}");
    let (code, out, _) = herd.ctl(&["reload", "rb", "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reload"]["outcome"], "rolled_back", "{out}");
    let status = herd.status_json("rb");
    assert_eq!(status["counters"]["reloads_rolled_back"], 2, "{status}");
    assert_eq!(slot_pids(&status, "current").len(), 2);
}

#[test]
fn a_name_in_use_fails_the_start_and_a_dead_herds_socket_is_replaced() {
    let first = hello_cluster("dup", 1);
    let mut cmd = Command::new(herd_bin());
    cmd.args(["run", "-w", "1", "--name", "dup", "-l", "127.0.0.1:0"])
        .env("HERD_RUNTIME_DIR", &first.runtime);
    let mut second = Herd::spawn(cmd);
    assert_eq!(second.wait(STARTUP).code(), Some(2));
    let err = second.stderr.all().join("\n");
    assert!(
        err.contains("a cluster named \"dup\" is already running"),
        "{err}"
    );
    // The first is untouched.
    assert_eq!(first.status_json("dup")["pid"], first.pid());

    // Without --name, the next free name.
    let mut cmd = Command::new(herd_bin());
    cmd.args(["run", "-w", "1", "-l", "127.0.0.1:0", "--", "sleep", "30"])
        .env("HERD_RUNTIME_DIR", &first.runtime);
    let auto = Herd::spawn(cmd);
    auto.stderr
        .wait_for("spawned", STARTUP, |l| l.contains("spawned in slot"));
    let (_, out, _) = ctl_in(&first.runtime, &["ls"]);
    assert!(out.contains("sleep"), "{out}");

    // SIGKILLed, the first leaves its socket file; a new herd of that
    // name replaces it.
    let socket = first.runtime.join("dup.sock");
    let runtime = first.runtime.clone();
    let first_pid = first.pid();
    send_signal(first_pid, "KILL");
    assert!(eventually(STARTUP, || !alive(first_pid)));
    assert!(socket.exists());
    let (code, _, err) = ctl_in(&runtime, &["status", "dup"]);
    assert_eq!(code, 4, "{err}");
    let mut cmd = Command::new(herd_bin());
    cmd.args(["run", "-w", "1", "--name", "dup", "-l", "127.0.0.1:0"])
        .env("HERD_RUNTIME_DIR", &runtime);
    let third = Herd::spawn(cmd);
    third
        .stderr
        .wait_for("ready", STARTUP, |l| l.contains(" ready slot="));
    let (code, out, err) = ctl_in(&runtime, &["status", "dup", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("\"pid\":{}", third.pid())), "{out}");
    drop(first); // its runtime dir goes last
}

/// Answers of a raw client, line by line.
fn raw(sock: &std::path::Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn answer(r: &mut BufReader<UnixStream>) -> serde_json::Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn garbage_stalls_and_floods_of_clients_cannot_stall_or_grow_the_primary() {
    let herd = hello_cluster("tough", 2);
    let sock = herd.runtime.join("tough.sock");

    // Garbage gets a one-line error, and the connection stays usable.
    let (mut s, mut r) = raw(&sock);
    s.write_all(b"\x00\xffnot json at all\n").unwrap();
    let a = answer(&mut r);
    assert_eq!(a["ok"], false);
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .starts_with("not a JSON request"),
        "{a}"
    );
    s.write_all(b"{\"v\":1,\"cmd\":\"launch-missiles\"}\n")
        .unwrap();
    assert!(answer(&mut r)["error"]
        .as_str()
        .unwrap()
        .contains("unknown variant"));
    s.write_all(b"{\"v\":2,\"cmd\":\"status\"}\n").unwrap();
    assert!(answer(&mut r)["error"]
        .as_str()
        .unwrap()
        .contains("version 2"));
    s.write_all(b"{\"v\":1,\"cmd\":\"summary\"}\n").unwrap();
    assert_eq!(answer(&mut r)["summary"]["name"], "tough");

    // An endless line is cut off at 64 KiB.
    let (mut big, mut big_r) = raw(&sock);
    let chunk = vec![b'x'; 70 * 1024];
    let _ = big.write_all(&chunk);
    let a = answer(&mut big_r);
    assert!(a["error"].as_str().unwrap().contains("longer than"), "{a}");

    // Half a request, then silence; and a flood of idle clients.
    let (mut half, mut half_r) = raw(&sock);
    half.write_all(b"{\"v\":1,\"cmd\":").unwrap();
    let fds_before = fd_count(herd.pid());
    let flood: Vec<UnixStream> = (0..1000)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    assert!(flood.len() > 900, "{} connected", flood.len());
    // Supervision goes on: a killed worker is replaced meanwhile.
    let victim = herd.spawned()[0];
    send_signal(victim, "KILL");
    herd.stderr.wait_for_nth("replacement", STARTUP, 3, |l| {
        l.contains(" spawned in slot ")
    });
    assert!(http_get(herd.port()).is_ok());
    // herd holds at most its client limit of them; the rest were refused.
    let fds_during = fd_count(herd.pid());
    assert!(
        fds_during <= fds_before + 64 + 8,
        "{fds_before} fds before, {fds_during} with 1000 clients"
    );
    drop(flood);
    // The stalled half request is dropped with a reason (5 s limit).
    let t = Instant::now();
    let a = answer(&mut half_r);
    assert!(a["error"].as_str().unwrap().contains("did not end"), "{a}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // And the socket still answers.
    assert!(eventually(Duration::from_secs(5), || {
        herd.ctl(&["status", "tough"]).0 == 0
    }));
}

#[test]
fn another_user_is_refused() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let herd = hello_cluster("mine", 1);
    let sock = herd.runtime.join("mine.sock");
    // Connecting as nobody (uid 65534), from a child that drops to it.
    let as_nobody = |path: &std::path::Path| -> String {
        let script = format!(
            // herd may answer and close before the request is sent: the
            // send may fail (EPIPE), the answer is still there to read.
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect({:?})\n\
             except OSError as e:\n print('oserror', e.errno); sys.exit()\n\
             try:\n s.sendall(b'{{\"v\":1,\"cmd\":\"status\"}}\\n')\n\
             except OSError:\n pass\n\
             print(s.makefile().readline().strip())\n",
            path.to_str().unwrap()
        );
        let out = {
            use std::os::unix::process::CommandExt;
            Command::new("python3")
                .args(["-c", &script])
                .uid(65534)
                .gid(65534)
                .stderr(Stdio::inherit())
                .output()
                .expect("python3")
        };
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    if python_missing() {
        return;
    }
    // The directory (0700) and socket (0600) keep it out.
    assert_eq!(as_nobody(&sock), "oserror 13");
    // Even with the permissions opened by mistake, SO_PEERCRED refuses it.
    use std::os::unix::fs::PermissionsExt;
    let open = std::fs::Permissions::from_mode(0o777);
    std::fs::set_permissions(&herd.runtime, open.clone()).unwrap();
    std::fs::set_permissions(&sock, open).unwrap();
    let got = as_nobody(&sock);
    let v: serde_json::Value = serde_json::from_str(&got).unwrap_or_else(|e| panic!("{e}: {got}"));
    assert_eq!(v["ok"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("permission denied: uid 65534"),
        "{v}"
    );
    herd.stderr.wait_for("refusal logged", STARTUP, |l| {
        l.contains("control socket: refused uid 65534")
    });
}

#[test]
fn logs_prints_recent_lines_and_follows_one_slot() {
    let script = "i=0; while [ $i -lt 300 ]; do echo \"tick $i of $HERD_WORKER_ID\"; i=$((i+1)); \
                  sleep 0.05; done";
    let herd = Herd::sh(&["-w", "2", "--name", "chatty", "--no-listen"], script);
    herd.stdout
        .wait_for("ticks", STARTUP, |l| l.contains("tick 3 of 1"));
    let (code, out, err) = herd.ctl(&["logs", "chatty", "-n", "4", "--slot", "1"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("[1 ") && l.contains(" of 1")),
        "{out}"
    );

    // herd's own lines are there too.
    let (_, out, _) = herd.ctl(&["logs", "chatty", "-n", "1000"]);
    assert!(out.contains("spawned in slot 0"), "{out}");

    // Follow slot 0: new lines come, none of slot 1.
    let mut follower = Command::new(herd_bin())
        .args(["logs", "chatty", "-f", "--slot", "0", "-n", "0", "--json"])
        .env("HERD_RUNTIME_DIR", &herd.runtime)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let got = Lines::default();
    got.clone().capture(follower.stdout.take().unwrap());
    got.wait_for_nth("followed lines", STARTUP, 5, |l| l.contains("tick"));
    let _ = follower.kill();
    let _ = follower.wait();
    for l in got.all() {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["slot"], 0, "{l}");
        assert_eq!(v["stream"], "stdout");
    }
}

#[test]
fn status_shows_a_stray_process_herd_still_waits_for() {
    // A worker leaves a grandchild in a session of its own that ignores
    // SIGTERM, then exits: herd reaps it when it goes, and lists it meanwhile.
    let script = "if [ ! -e \"$STRAY_FLAG\" ]; then : > \"$STRAY_FLAG\"; \
                  setsid sh -c 'trap \"\" TERM; exec sleep 30' & sleep 0.2; exit 1; fi; exec sleep 30";
    let dir = TempDir::new("stray");
    let flag = dir.path().join("flag");
    let mut cmd = Command::new(herd_bin());
    cmd.args([
        "run",
        "-w",
        "1",
        "--name",
        "strays",
        "--no-listen",
        "--contain",
        "process-group",
        "--",
        "sh",
        "-c",
        script,
    ])
    .env("STRAY_FLAG", &flag);
    let herd = Herd::spawn(cmd);
    herd.stderr.wait_for_nth("second worker", STARTUP, 2, |l| {
        l.contains(" spawned in slot 0")
    });
    let mut found = serde_json::Value::Null;
    assert!(
        eventually(STARTUP, || {
            found = herd.status_json("strays")["orphans"].clone();
            found.as_array().is_some_and(|a| !a.is_empty())
        }),
        "no orphan listed"
    );
    let stray = &found[0];
    assert_eq!(stray["comm"], "sleep", "{found}");
    let (_, out, _) = herd.ctl(&["status", "strays"]);
    assert!(out.contains("still waiting for:"), "{out}");
    // It is herd's to end: killing herd's cluster ends it too.
    let pid = stray["pid"].as_u64().unwrap() as u32;
    drop(herd);
    assert!(
        eventually(STARTUP, || !alive(pid)),
        "stray {pid} outlived herd"
    );
}

/// A scale to hundreds of workers is answered at once and spawned a batch
/// at a time: the supervisor goes on answering (and supervising) while it
/// forks them, instead of freezing until the last one runs.
#[test]
fn a_big_scale_up_does_not_freeze_the_supervisor() {
    let herd = Herd::start([
        "run",
        "-w",
        "1",
        "--name",
        "big",
        "--no-listen",
        "--",
        "sleep",
        "60",
    ]);
    herd.stderr
        .wait_for("spawned", STARTUP, |l| l.contains("spawned in slot 0"));
    let (code, out, err) = herd.ctl(&["scale", "big", "600"]);
    assert_eq!((code, out.as_str()), (0, "big: 600 workers"), "{err}");
    // Asked at once, while the forks go on: not all of them run yet.
    let status = herd.status_json("big");
    let live: usize = status["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["workers"].as_array().unwrap().len())
        .sum();
    assert!(
        live < 600,
        "{live} workers already live: the answer waited for every spawn"
    );
    assert!(eventually(Duration::from_secs(60), || {
        herd.stderr.count(|l| l.contains(" spawned in slot ")) >= 600
    }));
}
