//! A Node.js app that serves on the inherited fd 3, unchanged, under herd.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

const APP: &str = r#"
const http = require('http');
http.createServer((req, res) => res.end('node ' + process.pid + '\n'))
    .listen({ fd: 3 }, () => {
        console.log('listening');
        // herd opens Node's IPC channel for node commands: PM2-style readiness.
        if (process.send) process.send('ready');
    });
"#;

/// `herd run -w 2` of the test app, on a kernel-chosen port.
fn two_node_workers() -> (TempDir, Herd) {
    let dir = TempDir::new("node");
    let app = dir.path().join("app.js");
    std::fs::write(&app, APP).unwrap();
    let herd = Herd::start([
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--",
        "node",
        app.to_str().unwrap(),
    ]);
    (dir, herd)
}

#[test]
fn node_app_serves_on_fd_3_from_both_workers() {
    if node_missing() {
        return;
    }
    let (_dir, herd) = two_node_workers();
    let port = herd.port();
    let pids: HashSet<String> = [herd.nth_spawned(1), herd.nth_spawned(2)]
        .iter()
        .map(|p| p.to_string())
        .collect();
    herd.stdout
        .wait_for_nth("both node workers listening", STARTUP, 2, |l| {
            l.ends_with("] listening")
        });
    let mut seen = HashSet::new();
    let ok = eventually(Duration::from_secs(10), || {
        if let Ok(resp) = http_get(port) {
            let b = body(&resp).trim().to_string();
            if let Some(pid) = b.strip_prefix("node ") {
                seen.insert(pid.to_string());
            }
        }
        seen.len() == 2
    });
    assert!(ok, "answers from both workers, saw {seen:?}");
    assert_eq!(seen, pids);
}

#[test]
fn process_send_ready_marks_a_node_worker_ready() {
    if node_missing() {
        return;
    }
    let (_dir, herd) = two_node_workers();
    let mut pids = [herd.nth_spawned(1), herd.nth_spawned(2)];
    pids.sort();
    let mut ready: Vec<u32> = (1..=2)
        .map(|n| {
            let line = herd
                .stderr
                .wait_for_nth("ready workers", STARTUP, n, |l| l.contains(" ready"));
            pid_after(&line, "worker ")
        })
        .collect();
    ready.sort();
    assert_eq!(ready, pids);
}

#[test]
fn without_the_channel_process_send_is_absent() {
    if node_missing() {
        return;
    }
    let herd = Herd::start([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--node-ipc",
        "off",
        "--",
        "node",
        "-e",
        "console.log(typeof process.send); setInterval(() => {}, 1000)",
    ]);
    let pid = herd.nth_spawned(1);
    let expect = format!("[0 {pid}] undefined");
    herd.stdout
        .wait_for("typeof process.send", STARTUP, |l| l == expect);
}

#[test]
fn messages_over_the_cap_or_malformed_are_skipped_and_the_channel_stays_open() {
    // Slot 0 writes garbage, slot 1 a line over the cap (--ipc-max-message
    // 1MiB); each then says ready on the same channel, which must still be
    // open. Slot 2 behaves. herd must stay up and hear all three.
    let script = format!(
        "case $HERD_WORKER_ID in \
           0) printf '{{bad json\\n\"ready\"\\n' >&$NODE_CHANNEL_FD ;; \
           1) {{ head -c 3000000 /dev/zero | tr '\\0' a; printf '\\n\"ready\"\\n'; }} >&$NODE_CHANNEL_FD ;; \
           2) sleep 0.3; printf '\"ready\"\\n' >&$NODE_CHANNEL_FD ;; \
         esac; exec {}",
        fixture_bin().display()
    );
    let herd = Herd::sh(
        &[
            "-w",
            "3",
            "--no-listen",
            "--node-ipc",
            "on",
            "--ipc-max-message",
            "1MiB",
        ],
        &script,
    );
    let pids: Vec<u32> = (1..=3).map(|n| herd.nth_spawned(n)).collect();
    herd.stderr.wait_for("malformed JSON", STARTUP, |l| {
        l.contains("IPC message herd skipped (malformed JSON")
    });
    herd.stderr.wait_for("oversized message", STARTUP, |l| {
        l.contains("IPC message herd skipped (message longer than 1048576 bytes)")
    });
    for pid in &pids {
        herd.stderr.wait_for("every worker ready", STARTUP, |l| {
            l.contains(&format!("worker {pid} ready"))
        });
    }
    for pid in &pids {
        assert!(alive(*pid), "worker {pid} should still run");
    }
    assert_eq!(herd.stderr.count(|l| l.contains(" died")), 0);
    assert_eq!(herd.stderr.count(|l| l.contains("closed its channel")), 0);
}

/// A Node app written for Node's cluster module or for no cluster at all:
/// a plain `server.listen(port, host)`, no `fd: 3`.
const PLAIN_APP: &str = r#"
const http = require('http');
const cluster = require('cluster');
http.createServer((req, res) => res.end(`node ${process.pid} ${cluster.isWorker}\n`))
    .listen(parseInt(process.env.APP_PORT, 10), process.env.APP_HOST || undefined);
"#;

/// `herd run -w 2 --balance MODE` of PLAIN_APP on `spec`; the app is told
/// `port` (and `host`, if any).
fn plain_app(dir: &TempDir, mode: &str, spec: &str, port: u16, host: Option<&str>) -> Herd {
    let app = dir.path().join("plain.js");
    std::fs::write(&app, PLAIN_APP).unwrap();
    let mut cmd = Command::new(herd_bin());
    cmd.args(["run", "-w", "2", "--balance", mode, "-l", spec, "--"])
        .arg("node")
        .arg(&app)
        .env("APP_PORT", port.to_string());
    if let Some(host) = host {
        cmd.env("APP_HOST", host);
    }
    Herd::spawn(cmd)
}

/// Both workers answer on `port`; returns each answer's body.
fn both_answer(port: u16) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..40 {
        let body = http_get(port).expect("the app answers");
        let body = body.rsplit("\r\n\r\n").next().unwrap().trim().to_string();
        assert!(body.ends_with(" true"), "a cluster worker: {body}");
        seen.insert(body);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both workers serve: {seen:?}");
    seen
}

#[test]
fn a_plain_node_app_is_served_in_every_balance_mode() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("node-plain");
    for mode in ["shared", "reuseport", "round-robin"] {
        // herd's -l decides where to listen; the app's listen(port) with no
        // host gets that socket from herd through Node's cluster module.
        let port = free_port();
        let herd = plain_app(&dir, mode, &format!("127.0.0.1:{port}"), port, None);
        herd.stderr
            .wait_for_nth("both workers listening", STARTUP, 2, |l| {
                l.contains(&format!("listening on 127.0.0.1:{port}")) && l.contains("worker ")
            });
        both_answer(port);
        if mode == "round-robin" {
            let order: Vec<String> = (0..6)
                .map(|_| body(&http_get(port).unwrap()).trim().to_string())
                .collect();
            for pair in order.windows(2) {
                assert_ne!(pair[0], pair[1], "turns alternate: {order:?}");
            }
        }
    }
}

#[test]
fn a_node_app_asking_for_an_address_herd_was_not_given_gets_it_bound_once() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("node-demand");
    // Port 0 on a host: herd binds it on the first worker's request and gives
    // the second worker the same socket.
    let herd = plain_app(&dir, "round-robin", "127.0.0.1:0", 0, Some("127.0.0.2"));
    let line = herd
        .stderr
        .wait_for("listening on 127.0.0.2", STARTUP, |l| {
            l.contains("round-robin: the primary accepts on 127.0.0.2:")
        });
    let port: u16 = line.rsplit(':').next().unwrap().trim().parse().unwrap();
    herd.stderr
        .wait_for_nth("both workers listening", STARTUP, 2, |l| {
            l.contains(&format!("listening on 127.0.0.2:{port}")) && l.contains("worker ")
        });
    let mut seen = HashSet::new();
    for _ in 0..4 {
        let mut s = std::net::TcpStream::connect(("127.0.0.2", port)).unwrap();
        std::io::Write::write_all(&mut s, b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).unwrap();
        seen.insert(body(&text).trim().to_string());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn round_robin_connections_to_an_address_no_worker_serves_block_nothing() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("node-rr-two");
    let app = dir.path().join("plain.js");
    std::fs::write(&app, PLAIN_APP).unwrap();
    let (served, idle) = (free_port(), free_port());
    let mut cmd = Command::new(herd_bin());
    cmd.args(["run", "-w", "2", "--balance", "round-robin"])
        .args(["-l", &format!("127.0.0.1:{idle}")])
        .args(["-l", &format!("127.0.0.1:{served}"), "--", "node"])
        .arg(&app)
        .env("APP_PORT", served.to_string());
    let herd = Herd::spawn(cmd);
    herd.stderr
        .wait_for_nth("both workers listening", STARTUP, 2, |l| {
            l.contains(&format!("listening on 127.0.0.1:{served}")) && l.contains("worker ")
        });
    // Queued first, for an address the app never listens on…
    let _waiting: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", idle)).unwrap())
        .collect();
    // …and the app's own address is still served, by both workers…
    both_answer(served);
    // …and the queued ones were never offered to a worker that would refuse
    // them (the primary would pass them back and forth).
    let refused = herd.stderr.count(|l| l.contains(" refused connection "));
    assert_eq!(refused, 0, "{:?}", herd.stderr.all());
}

/// An unchanged Node app: `listen(PORT)` through herd's cluster protocol.
/// Its SIGTERM handler only cleans up (notes that it ran, closes its
/// server); nothing else keeps its event loop alive.
const CLUSTER_APP: &str = r#"
const http = require('http');
const server = http.createServer((q, r) => r.end('node ' + process.pid + '\n'))
    .listen(+process.env.PORT, () => console.log('listening'));
process.on('SIGTERM', () => {
  require('fs').writeFileSync(__dirname + '/term.' + process.pid, '');
  server.close();
});
"#;

fn cluster_app(tag: &str, balance: &str) -> (TempDir, Herd, u16) {
    let dir = TempDir::new(tag);
    let app = dir.path().join("app.js");
    std::fs::write(&app, CLUSTER_APP).unwrap();
    let port = free_port();
    let mut cmd = Command::new(herd_bin());
    cmd.args([
        "run",
        "-w",
        "2",
        "-l",
        &format!("127.0.0.1:{port}"),
        "--balance",
        balance,
        "--stop-timeout",
        "20s",
        "--",
        "node",
        app.to_str().unwrap(),
    ])
    .env("PORT", port.to_string());
    let herd = Herd::spawn(cmd);
    herd.stdout
        .wait_for_nth("both listening", STARTUP, 2, |l| l.ends_with("] listening"));
    (dir, herd, port)
}

/// The inodes of the listening TCP sockets on `port` (/proc/net/tcp*).
fn listening_inodes(port: u16) -> HashSet<String> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f[1].rsplit(':').next().unwrap();
            if u16::from_str_radix(local_port, 16) == Ok(port) && f[3] == "0A" {
                inodes.insert(f[9].to_string());
            }
        }
    }
    inodes
}

/// Every socket herd hands a Node worker is non-blocking, as Node's own
/// primary hands it: two workers race for each connection, and the loser
/// must get EAGAIN, not sleep in accept() with its timers and SIGTERM
/// handler stalled (before: 1–4 of 10 trials left a request hanging).
#[test]
fn sockets_handed_to_node_workers_are_non_blocking() {
    if node_missing() {
        return;
    }
    let (_dir, herd, port) = cluster_app("nonblock", "shared");
    let inodes = listening_inodes(port);
    assert!(!inodes.is_empty());
    for worker in workers_of(herd.pid()) {
        let mut checked = 0;
        for fd in std::fs::read_dir(format!("/proc/{worker}/fd"))
            .unwrap()
            .flatten()
        {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy().to_string();
            let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|l| l.strip_suffix(']'))
            else {
                continue;
            };
            if !inodes.contains(inode) {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{worker}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            assert_ne!(flags & 0o4000, 0, "worker {worker}'s {link} is blocking");
            checked += 1;
        }
        assert!(checked > 0, "worker {worker} holds the listening socket");
    }
    let resp = http_get(port).unwrap();
    assert!(body(&resp).starts_with("node "), "{resp}");
}

/// On stop, herd lets Node workers' event loops end (Node's own
/// `disconnect`): a worker whose SIGTERM handler only cleans up exits by
/// itself, in every balance mode. (Before: herd's channel kept it alive
/// until SIGKILL at the stop timeout.)
#[test]
fn node_workers_that_clean_up_on_sigterm_exit_without_the_kill() {
    if node_missing() {
        return;
    }
    for balance in ["shared", "round-robin", "shared"] {
        let (dir, mut herd, _port) = cluster_app("cleanup", balance);
        let workers = workers_of(herd.pid());
        let started = Instant::now();
        herd.signal("TERM");
        let status = herd.wait(Duration::from_secs(30));
        assert_eq!(status.code(), Some(0));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{balance}: stop took {:?}",
            started.elapsed()
        );
        let log = herd.stderr.all().join("\n");
        assert!(!log.contains("stop timeout"), "{balance}: {log}");
        assert!(!log.contains("killed by SIGKILL"), "{balance}: {log}");
        // Each worker's handler ran: Node's disconnect did not end an idle
        // worker's event loop before its SIGTERM handler got its turn.
        for w in workers {
            assert!(
                dir.path().join(format!("term.{w}")).exists(),
                "{balance}: worker {w}'s SIGTERM handler did not run"
            );
        }
    }
}

/// Node's cluster semantics for a second server in one worker: a second
/// `listen(0)` gets a port of its own, a second `listen(P)` a catchable
/// EADDRINUSE. (Before: herd answered with the same socket and key, and
/// Node's cluster module died on an internal assertion.)
#[test]
fn a_node_worker_can_open_two_servers_on_the_same_address() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("listen-twice");
    let app = dir.path().join("app.js");
    let port = free_port();
    std::fs::write(
        &app,
        format!(
            r#"
const http = require('http');
const listen = (port) => new Promise((ok) => {{
  const s = http.createServer((q, r) => r.end('x'));
  s.on('error', (e) => ok('error ' + e.code));
  s.listen(port, '127.0.0.1', () => ok('port ' + s.address().port));
}});
(async () => {{
  const a = await listen(0), b = await listen(0);
  const c = await listen({port}), d = await listen({port});
  console.log([a, b, c, d].join(' | '));
}})();
"#
        ),
    )
    .unwrap();
    let herd = one_node_worker(&app);
    let line = herd
        .stdout
        .wait_for("the results", STARTUP, |l| l.contains(" | "));
    let parts: Vec<&str> = line.split("] ").nth(1).unwrap().split(" | ").collect();
    assert!(
        parts[0].starts_with("port ") && parts[1].starts_with("port "),
        "{line}"
    );
    assert_ne!(parts[0], parts[1], "two listen(0) get two ports: {line}");
    assert_eq!(parts[2], format!("port {port}"), "{line}");
    assert_eq!(parts[3], "error EADDRINUSE", "{line}");
    assert_eq!(herd.stderr.count(|l| l.contains(" died ")), 0);
}

/// One worker cannot use up herd's descriptors by asking for sockets: past
/// 256 sockets bound on its request it gets EMFILE (catchable), and the
/// refusals are logged once, not once each.
#[test]
fn sockets_on_request_are_capped_per_worker() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("socket-cap");
    let app = dir.path().join("app.js");
    std::fs::write(
        &app,
        r#"
const net = require('net');
const listen = () => new Promise((ok) => {
  const s = net.createServer();
  s.on('error', (e) => ok(e.code));
  s.listen(0, '127.0.0.1', () => ok('ok'));
});
(async () => {
  const counts = {};
  for (let i = 0; i < 300; i++) { const r = await listen(); counts[r] = (counts[r] || 0) + 1; }
  console.log('results ' + JSON.stringify(counts));
})();
"#,
    )
    .unwrap();
    let herd = one_node_worker(&app);
    let line = herd
        .stdout
        .wait_for("the results", Duration::from_secs(30), |l| {
            l.contains("results ")
        });
    assert!(
        line.ends_with(r#"results {"ok":256,"EMFILE":44}"#),
        "{line}"
    );
    let warnings = herd
        .stderr
        .count(|l| l.contains("WARN") && l.contains("cannot listen"));
    assert_eq!(warnings, 1, "{}", herd.stderr.all().join("\n"));
}

/// herd's `-l` decides where the cluster listens: a worker that names a
/// host in `listen()` for a configured port gets herd's socket — silently
/// for a wildcard (Fastify's `host: '0.0.0.0'`), with one warning naming
/// both addresses for another host — instead of colliding with herd's own
/// socket and crash-looping.
#[test]
fn a_host_in_listen_gets_the_configured_socket() {
    if node_missing() {
        return;
    }
    for (host, warns) in [("0.0.0.0", false), ("::", false), ("127.0.0.2", true)] {
        let dir = TempDir::new("listen-host");
        let app = dir.path().join("app.js");
        std::fs::write(
            &app,
            format!(
                "require('http').createServer((q, r) => r.end('node ' + process.pid + '\\n'))\
                 .listen({{ port: +process.env.PORT, host: '{host}' }}, () => console.log('listening'));"
            ),
        )
        .unwrap();
        let port = free_port();
        let mut cmd = Command::new(herd_bin());
        cmd.args([
            "run",
            "-w",
            "2",
            "-l",
            &format!("127.0.0.1:{port}"),
            "--",
            "node",
            app.to_str().unwrap(),
        ])
        .env("PORT", port.to_string());
        let herd = Herd::spawn(cmd);
        herd.stdout
            .wait_for_nth("both listening", STARTUP, 2, |l| l.ends_with("] listening"));
        let resp = http_get(port).expect("served on herd's socket");
        assert!(body(&resp).starts_with("node "), "{host}: {resp}");
        let log = herd.stderr.all().join("\n");
        assert!(!log.contains(" died "), "{host}: {log}");
        let warnings = herd
            .stderr
            .count(|l| l.contains("a worker asked to listen on"));
        assert_eq!(warnings, usize::from(warns), "{host}: {log}");
        if warns {
            let line = herd
                .stderr
                .wait_for("the warning", STARTUP, |l| l.contains("asked to listen"));
            assert!(line.contains(&format!("{host}:{port}")), "{line}");
            assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
        }
    }
}

/// Two consecutive free ports (for slot 0's and slot 1's inspector).
fn two_free_ports() -> u16 {
    for _ in 0..50 {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free ports");
}

/// Node's inspector under herd: each slot gets the asked port plus its
/// number, as Node's own primary gives each worker a port of its own; a
/// restarted worker keeps its slot's port. On the command line and in
/// NODE_OPTIONS. (Before: one worker got the debugger, the others
/// "address already in use".)
#[test]
fn each_node_worker_gets_its_own_inspector_port() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("inspect");
    let app = dir.path().join("app.js");
    std::fs::write(
        &app,
        "console.log('inspector ' + require('inspector').url()); setInterval(() => {}, 1000);",
    )
    .unwrap();
    for via_env in [false, true] {
        let port = two_free_ports();
        let flag = format!("--inspect=127.0.0.1:{port}");
        let mut cmd = Command::new(herd_bin());
        cmd.args(["run", "-w", "2", "--no-listen", "--", "node"]);
        if via_env {
            cmd.env("NODE_OPTIONS", &flag);
        } else {
            cmd.arg(&flag);
        }
        cmd.arg(app.to_str().unwrap());
        let herd = Herd::spawn(cmd);
        let urls = |n| {
            let mut found = Vec::new();
            for l in herd.stdout.all() {
                if let Some(url) = l.split("] inspector ").nth(1) {
                    found.push((
                        l.split_whitespace().next().unwrap().to_string(),
                        url.to_string(),
                    ));
                }
            }
            assert!(found.len() >= n, "{found:?}");
            found
        };
        herd.stdout.wait_for_nth("two inspectors", STARTUP, 2, |l| {
            l.contains("] inspector ws://")
        });
        let found = urls(2);
        for (slot, want) in [("[0", port), ("[1", port + 1)] {
            assert!(
                found
                    .iter()
                    .any(|(p, u)| p == slot && u.starts_with(&format!("ws://127.0.0.1:{want}/"))),
                "via_env {via_env}: slot {slot} not on {want}: {found:?}"
            );
        }
        // A replacement keeps its slot's port.
        let first = herd.nth_spawned(1);
        send_signal(first, "KILL");
        herd.nth_spawned(3);
        herd.stdout
            .wait_for_nth("the replacement's inspector", STARTUP, 3, |l| {
                l.contains("] inspector ws://")
            });
        let found = urls(3);
        let (_, url) = &found[2];
        assert!(
            url.starts_with(&format!("ws://127.0.0.1:{port}/")),
            "{found:?}"
        );
        assert_eq!(
            herd.stderr.count(|l| l.contains("address already in use")),
            0
        );
    }
}

/// One HTTP/1.0 GET over the Unix socket at `path`; the body.
fn unix_get(path: &Path) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(body(&out).trim().to_string())
}

#[test]
fn node_listen_on_a_path_is_served_in_every_balance_mode_configured_or_not() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("node-unix");
    let app = dir.path().join("unix.js");
    std::fs::write(
        &app,
        r#"
const http = require('http');
const cluster = require('cluster');
http.createServer((req, res) => res.end(`${process.pid} ${cluster.isWorker}\n`))
    .listen(process.env.SOCK);
"#,
    )
    .unwrap();
    for mode in ["shared", "reuseport", "round-robin"] {
        for configured in [true, false] {
            let sock = dir.path().join(format!("{mode}-{configured}.sock"));
            let mut cmd = Command::new(herd_bin());
            cmd.args(["run", "-w", "2", "--balance", mode]);
            if configured {
                cmd.arg("-l").arg(format!("unix:{}", sock.display()));
            } else {
                cmd.arg("--no-listen");
            }
            cmd.arg("--").arg("node").arg(&app).env("SOCK", &sock);
            let herd = Herd::spawn(cmd);
            herd.stderr.wait_for_nth("both listening", STARTUP, 2, |l| {
                l.contains(&format!("listening on unix:{}", sock.display()))
                    && l.contains("worker ")
            });
            let mut seen = HashSet::new();
            for _ in 0..60 {
                let answer = unix_get(&sock).expect("the app answers on its path");
                assert!(answer.ends_with(" true"), "a cluster worker: {answer}");
                seen.insert(answer);
                if seen.len() == 2 {
                    break;
                }
            }
            assert_eq!(
                seen.len(),
                2,
                "{mode}, configured {configured}: both workers serve: {seen:?}\n{}",
                herd.stderr.all().join("\n")
            );
        }
    }
}

/// herd's own inspector port for a worker is no server of the worker's:
/// no "ignores herd's socket" warning for it.
#[test]
fn the_inspector_port_herd_gives_is_not_taken_for_a_server_of_its_own() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("node-inspect-probe");
    let app = dir.path().join("app.js");
    std::fs::write(
        &app,
        "require('http').createServer((q, s) => s.end('ok')).listen(parseInt(process.env.APP_PORT, 10));\n",
    )
    .unwrap();
    let port = free_port();
    let inspector = free_port();
    let mut cmd = Command::new(herd_bin());
    cmd.args([
        "run",
        "-w",
        "1",
        "-l",
        &format!("127.0.0.1:{port}"),
        "--",
        "node",
    ])
    .arg(format!("--inspect=127.0.0.1:{inspector}"))
    .arg(&app)
    .env("APP_PORT", port.to_string());
    let herd = Herd::spawn(cmd);
    herd.stderr.wait_for("the probe's verdict", STARTUP, |l| {
        l.contains("holds no listening socket of its own")
            || l.contains("on a socket herd did not give it")
    });
    assert!(
        herd.stderr
            .count(|l| l.contains("on a socket herd did not give it"))
            == 0,
        "{}",
        herd.stderr.all().join("\n")
    );
}

/// `app.listen(3000)` under `-l 127.0.0.1:P`: herd binds :3000 for the
/// workers (as Node's primary would) and says that nothing serves P.
#[test]
fn a_node_app_on_a_port_of_its_own_is_named_once() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("node-own-port");
    let port = free_port();
    let own = free_port();
    let herd = plain_app(
        &dir,
        "shared",
        &format!("127.0.0.1:{port}"),
        own,
        Some("127.0.0.1"),
    );
    let line = herd.stderr.wait_for("the port warning", STARTUP, |l| {
        l.contains("which is not one of herd's -l addresses")
    });
    assert!(
        line.contains(&format!("listen on 127.0.0.1:{own}"))
            && line.contains(&format!("(127.0.0.1:{port})"))
            && line.contains(&format!("start herd with -l 127.0.0.1:{own}")),
        "{line}"
    );
    herd.stderr.wait_for_nth("both listening", STARTUP, 2, |l| {
        l.contains(&format!("listening on 127.0.0.1:{own}"))
    });
    let n = herd
        .stderr
        .count(|l| l.contains("which is not one of herd's -l addresses"));
    assert_eq!(n, 1);
}

/// A Node app that takes 2 s to boot: under the default `--ready auto`
/// herd waits for its `listening` (not the 1 s delay meant for programs
/// that say nothing), so a deploy that throws while booting fails the
/// reload (exit 1, rolled back) instead of replacing the serving worker.
#[test]
fn a_slow_booting_node_app_that_breaks_fails_the_reload() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("node-slowboot");
    let app = dir.path().join("app.js");
    let broken = dir.path().join("BREAK");
    std::fs::write(
        &app,
        format!(
            r#"
const fs = require('fs');
const http = require('http');
setTimeout(() => {{
    if (fs.existsSync({broken:?})) throw new Error('cannot connect to the database');
    http.createServer((req, res) => res.end('ok')).listen(process.env.PORT);
}}, 2000);
"#
        ),
    )
    .unwrap();
    let port = free_port();
    let mut cmd = Command::new(herd_bin());
    cmd.args(["run", "-w", "1", "--name", "slow", "-l"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--", "node", app.to_str().unwrap()])
        .env("PORT", port.to_string());
    let herd = Herd::spawn(cmd);
    let line = herd
        .stderr
        .wait_for("ready", STARTUP, |l| l.contains(" ready"));
    assert!(
        !line.contains("--ready-delay"),
        "ready by the delay: {line}"
    );
    std::fs::write(&broken, "").unwrap();
    let (code, out, err) = herd.ctl(&["reload", "slow"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("cannot connect to the database"), "{err}");
    assert!(http_get(port).is_ok(), "the old worker serves on");
}
