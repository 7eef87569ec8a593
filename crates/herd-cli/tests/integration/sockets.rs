//! Listen specs, socket activation (LISTEN_FDS & co), fd hygiene, unix socket
//! files, and connections queued while a worker is replaced.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use crate::util::*;

fn read_report(path: &std::path::Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn workers_get_sockets_by_socket_activation_and_nothing_else() {
    let dir = TempDir::new("activation");
    let sock = dir.path().join("s.sock");
    // sh opens fd 7 without CLOEXEC: herd inherits it and must not pass it on.
    let script = format!(
        "exec 7</dev/null; exec {} run -w 2 -l web=127.0.0.1:0 -l unix:{} -l udp:127.0.0.1:0 -- {} --report {}",
        herd_bin().display(),
        sock.display(),
        fixture_bin().display(),
        dir.path().display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(&script);
    let herd = Herd::spawn(cmd);
    let herd_pid = herd.pid();
    let port = herd.port();
    let udp_line = herd.stderr.wait_for("udp listening line", STARTUP, |l| {
        l.contains("listening on udp:")
    });
    let udp_port: u16 = udp_line.rsplit(':').next().unwrap().parse().unwrap();
    let pids = [herd.nth_spawned(1), herd.nth_spawned(2)];

    let mut slots = BTreeSet::new();
    for pid in pids {
        let report = dir.path().join(format!("{pid}.env"));
        assert!(
            eventually(STARTUP, || report.exists()),
            "no report from {pid}"
        );
        let env = read_report(&report);
        assert_eq!(
            env["LISTEN_PID"],
            pid.to_string(),
            "LISTEN_PID is the worker's own pid"
        );
        assert_eq!(env["LISTEN_FDS"], "3");
        assert_eq!(env["LISTEN_FDNAMES"], "web:unix:udp");
        assert_eq!(env["HERD_WORKERS"], "2");
        assert_eq!(env["HERD_PRIMARY_PID"], herd_pid.to_string());
        slots.insert(env["HERD_WORKER_ID"].clone());

        let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .map(|e| {
                let n = e.file_name().to_string_lossy().parse().unwrap();
                let target = std::fs::read_link(e.path())
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                (n, target)
            })
            .collect();
        fds.sort();
        let numbers: Vec<u32> = fds.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, vec![0, 1, 2, 3, 4, 5], "worker fds: {fds:?}");
        for (n, target) in &fds[3..] {
            assert!(target.starts_with("socket:"), "fd {n} is {target}");
        }
    }
    assert_eq!(slots, BTreeSet::from(["0".to_string(), "1".to_string()]));

    // Each socket serves.
    let resp = http_get(port).unwrap();
    assert!(body(&resp).starts_with("pid="), "{resp}");
    let mut u = UnixStream::connect(&sock).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    u.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    u.read_to_string(&mut out).unwrap();
    assert!(body(&out).starts_with("pid="), "{out}");
    let d = UdpSocket::bind("127.0.0.1:0").unwrap();
    d.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    d.send_to(b"hi", ("127.0.0.1", udp_port)).unwrap();
    let mut buf = [0u8; 256];
    let n = d.recv(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"pid="));
}

#[test]
fn stale_unix_socket_file_is_replaced_and_a_live_one_refused() {
    let dir = TempDir::new("unix");
    let path = dir.path().join("app.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves a stale file
    assert!(path.exists());
    let spec = format!("unix:{}", path.display());
    let herd = Herd::start(["run", "-w", "1", "-l", &spec]);
    herd.nth_spawned(1);
    assert!(eventually(STARTUP, || {
        UnixStream::connect(&path)
            .and_then(|mut s| {
                s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out.ends_with("hello world\n"))
            })
            .unwrap_or(false)
    }));

    // A second herd on the same path finds a live server: refuse, exit 2.
    let (status, stderr) = run_to_end(["run", "-l", &spec], Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("address {spec} is already in use")),
        "{stderr}"
    );
    drop(herd);
}

/// A single worker that exits after each answer and takes 300 ms to start:
/// connections made while it is dead wait in the primary's socket and are
/// all answered, one by each successive replacement.
fn queued_connections_are_served(balance: &str) {
    let fixture = fixture_bin();
    let herd = Herd::start([
        "run",
        "-w",
        "1",
        "--balance",
        balance,
        "-l",
        "127.0.0.1:0",
        "--backoff-initial",
        "10ms",
        "--",
        fixture.to_str().unwrap(),
        "--exit-after",
        "1",
        "--slow-start",
        "300",
    ]);
    let port = herd.port();
    let first = herd.nth_spawned(1);
    assert!(
        eventually(STARTUP, || http_get(port).is_ok()),
        "first worker never answered"
    );
    // It exits 0 after one answer: logged as "exited", not "died".
    herd.stderr.wait_for("first worker's exit", STARTUP, |l| {
        l.contains(&format!("worker {first} exited (exit code 0)"))
    });
    // The replacement is starting (slow); connect now.
    let clients: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || http_get(port)))
        .collect();
    let answers: Vec<String> = clients
        .into_iter()
        .map(|c| {
            c.join()
                .unwrap()
                .expect("queued connection must be answered")
        })
        .collect();
    for a in &answers {
        assert!(a.starts_with("HTTP/1.1 200 OK"), "{a}");
        assert!(
            !a.contains(&format!("pid={first} ")),
            "answered by the dead worker?"
        );
    }
}

#[test]
fn connections_queued_during_restart_are_served_shared() {
    queued_connections_are_served("shared");
}

#[test]
fn connections_queued_during_restart_are_served_reuseport() {
    queued_connections_are_served("reuseport");
}

#[test]
fn reuseport_gives_each_slot_its_own_socket() {
    let dir = TempDir::new("reuseport");
    let fixture = fixture_bin();
    let herd = Herd::start([
        "run",
        "-w",
        "2",
        "--balance",
        "reuseport",
        "-l",
        "127.0.0.1:0",
        "--",
        fixture.to_str().unwrap(),
        "--report",
        dir.path().to_str().unwrap(),
    ]);
    herd.port();
    let inodes: BTreeSet<String> = [herd.nth_spawned(1), herd.nth_spawned(2)]
        .iter()
        .map(|pid| {
            assert!(eventually(STARTUP, || dir
                .path()
                .join(format!("{pid}.env"))
                .exists()));
            std::fs::read_link(format!("/proc/{pid}/fd/3"))
                .unwrap()
                .to_string_lossy()
                .to_string()
        })
        .collect();
    assert_eq!(inodes.len(), 2, "distinct sockets per slot: {inodes:?}");
}

#[test]
fn address_in_use_is_named() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for balance in ["shared", "reuseport"] {
        let (status, stderr) = run_to_end(
            ["run", "--balance", balance, "-l", &addr],
            Duration::from_secs(10),
        );
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("address {addr} is already in use")),
            "{stderr}"
        );
    }
}

/// A server that binds its own port instead of taking herd's socket
/// (`python3 -m http.server PORT`): herd says so, once for the worker
/// serving on its own socket and once for the ones that die of "address
/// already in use", instead of failing silently.
#[test]
fn a_server_that_ignores_herds_socket_is_named_once() {
    if python_missing() {
        return;
    }
    let herds = free_port();
    let own = free_port();
    let herd = Herd::start([
        "run",
        "-w",
        "2",
        "-l",
        &format!("127.0.0.1:{herds}"),
        "--",
        "python3",
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        &own.to_string(),
    ]);
    let own_line = herd
        .stderr
        .wait_for("the own-socket warning", STARTUP, |l| {
            l.contains("on a socket herd did not give it")
        });
    assert!(
        own_line.contains(&format!("listens on 127.0.0.1:{own} itself"))
            && own_line.contains(&format!("herd listens on 127.0.0.1:{herds}")),
        "{own_line}"
    );
    let in_use = herd
        .stderr
        .wait_for("the address-in-use warning", STARTUP, |l| {
            l.contains("failed with \"address already in use\"")
        });
    assert!(in_use.contains("uvicorn --fd 3"), "{in_use}");
    // Slot 1 keeps dying of it; the warnings are not repeated.
    herd.stderr
        .wait_for_nth("more deaths of slot 1", STARTUP, 3, |l| {
            l.contains(" died (")
        });
    for what in [
        "on a socket herd did not give it",
        "address already in use\":",
    ] {
        let n = herd
            .stderr
            .all()
            .iter()
            .filter(|l| l.contains(what))
            .count();
        assert_eq!(n, 1, "{what:?} said {n} times");
    }
}

/// A live server on the socket file that listens but never accepts, its
/// backlog full: herd says the address is in use at once instead of
/// blocking in connect() (it hung, supervision with it).
#[test]
fn a_unix_socket_held_by_a_server_that_never_accepts_is_in_use_at_once() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let dir = TempDir::new("unix-full");
    let path = dir.path().join("full.sock");
    let addr = SocketAddrUnix::new(&path).unwrap();
    let server = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
    rustix::net::bind(&server, &addr).unwrap();
    rustix::net::listen(&server, 0).unwrap();
    // Fill its backlog with connections nobody accepts.
    let mut clients = Vec::new();
    for _ in 0..8 {
        let c = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        if rustix::net::connect(&c, &addr).is_err() {
            break;
        }
        clients.push(c);
    }
    let spec = format!("unix:{}", path.display());
    let (status, stderr) = run_to_end(["run", "-l", &spec], Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("already in use"), "{stderr}");
    drop(clients);
    drop(server);
}

/// The probe looks at the worker's whole tree: a grandchild serving on a
/// port of its own is noticed too, with or without a cgroup per worker.
#[test]
fn a_grandchild_serving_on_its_own_port_is_noticed() {
    if python_missing() {
        return;
    }
    for contain in ["auto", "process-group"] {
        let herds = free_port();
        let own = free_port();
        let script = format!("(python3 -m http.server --bind 127.0.0.1 {own}; true); true");
        let herd = Herd::start([
            "run",
            "-w",
            "1",
            "--contain",
            contain,
            "-l",
            &format!("127.0.0.1:{herds}"),
            "--",
            "sh",
            "-c",
            &script,
        ]);
        let line = herd
            .stderr
            .wait_for("the own-socket warning", STARTUP, |l| {
                l.contains("on a socket herd did not give it")
            });
        assert!(
            line.contains(&format!("127.0.0.1:{own} itself")),
            "{contain}: {line}"
        );
    }
}

/// reuseport: a slot that crash-loops gets no new connections (steered to
/// the slots with a ready worker); before, its hash share waited for a
/// worker that never came.
#[test]
fn reuseport_steers_connections_away_from_a_crash_looping_slot() {
    let script = hello_but_slot(1, "exit 1");
    // `--ready notify`: the built-in worker says READY=1; slot 1's never does
    // (under `auto`, a crash-looping worker slowed past --ready-delay by a
    // loaded machine would count as ready, and take its share again).
    let herd = Herd::sh(
        &[
            "-w",
            "2",
            "--balance",
            "reuseport",
            "-l",
            "127.0.0.1:0",
            "--ready",
            "notify",
        ],
        &script,
    );
    let port = herd.port();
    herd.stderr.wait_for("slot 0 ready", STARTUP, |l| {
        l.contains(" ready") && l.contains("slot=0")
    });
    // Every connection is answered within seconds, not at slot 1's next
    // start, 30 s away (random would send about half there without
    // steering). 5 s, not 1: a debug build on two loaded cores is slow.
    for i in 0..30 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap_or_else(|e| {
            panic!(
                "connection {i} not answered within 5 s: {e}\n{}",
                herd.stderr.all().join("\n")
            )
        });
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert!(herd
        .stderr
        .all()
        .iter()
        .any(|l| l.contains("reuseport: new connections go to slot(s) [0] only")));
}
