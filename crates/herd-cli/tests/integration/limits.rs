//! Bounded, whatever workers do: herd's memory when nobody reads what
//! workers send, its descriptors (sockets bound on request are closed when
//! no worker holds them; the open-file limit), and spawns that fail for
//! lack of resources.

use std::time::{Duration, Instant};

use crate::util::*;

/// herd's memory stays bounded when a worker sends far more than anyone
/// reads: `herd run` asks for no events, so messages are handled and
/// dropped. (Before: every message stayed queued, 320 MB for 1.6 M small
/// messages.)
#[test]
fn messages_nobody_reads_do_not_grow_the_primary() {
    // 20 messages of 10 MB, then 500,000 small ones, on Node's channel;
    // then the worker becomes `sleep`, which tells the test it is done.
    let script = "i=0; while [ $i -lt 20 ]; do \
                    { printf '\"'; head -c 10000000 /dev/zero | tr '\\0' a; printf '\"\\n'; } >&$NODE_CHANNEL_FD; \
                    i=$((i+1)); done; \
                  yes '{\"n\":1}' | head -n 500000 >&$NODE_CHANNEL_FD; \
                  exec sleep 1000";
    let herd = Herd::sh(&["-w", "1", "--no-listen", "--node-ipc", "on"], script);
    let pid = herd.nth_spawned(1);
    assert!(
        eventually(Duration::from_secs(120), || comm(pid) == "sleep"),
        "the worker did not finish sending"
    );
    // The last batch is handled by now or in a moment.
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_kib(herd.pid());
    assert!(
        rss < 32 * 1024,
        "herd's RSS is {rss} KiB after ~200 MB of unread messages"
    );
    assert!(alive(herd.pid()));
}

/// A socket herd bound because a worker asked (not in `-l`) is closed once
/// no live worker holds it: Node's server.close() sends `{act: 'close'}`.
/// (Before: 200 opened and closed ports left 200 listening sockets.)
#[test]
fn sockets_bound_on_request_are_closed_when_no_worker_holds_them() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("on-request");
    let app = dir.path().join("app.js");
    // Opens a server on each of 30 ports in turn, closes it, then opens one
    // last one and keeps it; prints the ports.
    std::fs::write(
        &app,
        r#"
const http = require('http');
const net = require('net');
async function main() {
  const ports = [];
  for (let i = 0; i < 30; i++) {
    const s = http.createServer((q, r) => r.end('x'));
    await new Promise((ok) => s.listen(0, '127.0.0.1', ok));
    ports.push(s.address().port);
    await new Promise((ok) => s.close(ok));
  }
  const kept = http.createServer((q, r) => r.end('kept'));
  await new Promise((ok) => kept.listen(0, '127.0.0.1', ok));
  console.log('closed ' + ports.join(','));
  console.log('kept ' + kept.address().port);
}
main();
"#,
    )
    .unwrap();
    let herd = one_node_worker(&app);
    let closed = herd
        .stdout
        .wait_for("closed ports", STARTUP, |l| l.contains("] closed "));
    let kept = herd
        .stdout
        .wait_for("kept port", STARTUP, |l| l.contains("] kept "));
    let kept: u16 = kept.rsplit(' ').next().unwrap().parse().unwrap();
    let closed: Vec<u16> = closed
        .rsplit(' ')
        .next()
        .unwrap()
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(closed.len(), 30);
    assert!(
        eventually(STARTUP, || closed.iter().all(|p| !accepts(*p))),
        "a closed server's port still accepts connections: {:?}",
        closed.iter().filter(|p| accepts(**p)).collect::<Vec<_>>()
    );
    assert!(accepts(kept), "the server still open must still be served");
    // Only the kept socket is left of the 31: herd holds a handful of fds
    // of its own and per worker, not one per port ever opened.
    let fds = fd_count(herd.pid());
    assert!(fds < 25, "herd holds {fds} descriptors");
}

/// A dead worker holds nothing: the socket it asked for is closed when it
/// exits and no other worker holds it.
#[test]
fn a_dead_workers_sockets_on_request_are_closed() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("dead-holder");
    let app = dir.path().join("app.js");
    let port = free_port();
    // The first worker listens on PORT and exits after 300 ms; its
    // replacement (marker file present) listens on nothing.
    std::fs::write(
        &app,
        format!(
            r#"
const fs = require('fs');
const marker = {marker:?};
if (fs.existsSync(marker)) {{ console.log('second'); setInterval(() => {{}}, 1000); }}
else {{
  fs.writeFileSync(marker, '');
  require('http').createServer((q, r) => r.end('x')).listen({port}, '127.0.0.1', () => {{
    console.log('listening');
    setTimeout(() => process.exit(0), 300);
  }});
}}
"#,
            marker = dir.path().join("marker").to_str().unwrap(),
        ),
    )
    .unwrap();
    let herd = one_node_worker(&app);
    herd.stdout
        .wait_for("first worker listening", STARTUP, |l| {
            l.ends_with("] listening")
        });
    herd.stdout
        .wait_for("second worker", STARTUP, |l| l.ends_with("] second"));
    assert!(
        eventually(STARTUP, || !accepts(port)),
        "port {port} is still held although its worker died"
    );
    // The address is free again for anyone.
    assert!(eventually(STARTUP, || std::net::TcpListener::bind((
        "127.0.0.1",
        port
    ))
    .is_ok()));
}

/// herd raises its soft open-file limit to the hard limit (each worker
/// costs it a few descriptors) and gives workers the limit it was started
/// with. (Before: `-w 400` under `ulimit -n 1024` ran 335 workers.)
#[test]
fn the_open_file_limit_is_raised_for_herd_and_restored_for_workers() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "ulimit -Sn 128 && exec {} run -w 60 --no-listen -- sleep 1000",
            herd_bin().display()
        ),
    ]);
    let herd = Herd::spawn(cmd);
    let spawned = herd.stderr.wait_for_nth("60 workers", STARTUP, 60, |l| {
        l.contains(" spawned in slot ")
    });
    assert!(!spawned.is_empty());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        herd.stderr.count(|l| l.contains("cannot spawn")),
        0,
        "{}",
        herd.stderr.all().join("\n")
    );
    assert_eq!(workers_of(herd.pid()).len(), 60);
    let soft = |pid: u32| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .split_whitespace()
            .nth(3)
            .unwrap()
            .to_string()
    };
    let hard = std::fs::read_to_string(format!("/proc/{}/limits", herd.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .nth(4)
        .unwrap()
        .to_string();
    assert_eq!(soft(herd.pid()), hard, "herd runs at the hard limit");
    for w in workers_of(herd.pid()) {
        assert_eq!(soft(w), "128", "worker {w} gets herd's original limit");
    }
}

/// A spawn that fails for lack of descriptors (EMFILE) is backed off, even
/// with zero backoff: no busy loop, no recursion (before: a stack overflow
/// after ~14,500 attempts, taking every worker down), and a stop still works.
#[test]
fn spawns_failing_for_lack_of_descriptors_back_off_even_with_zero_delays() {
    let mut cmd = std::process::Command::new("sh");
    // 30 descriptors: room for herd and a few workers, not for 20.
    cmd.args([
        "-c",
        &format!(
            "ulimit -n 30 && exec {} run -w 20 --no-listen --backoff-initial 0ms --stable 0s \
             --min-uptime 0s --max-restarts 1000000 --stop-timeout 2s -- sleep 1000",
            herd_bin().display()
        ),
    ]);
    let mut herd = Herd::spawn(cmd);
    herd.stderr
        .wait_for("a failed spawn", STARTUP, |l| l.contains("cannot spawn"));
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let failures = herd.stderr.count(|l| l.contains("cannot spawn"));
    let running = workers_of(herd.pid()).len();
    assert!(running > 0, "some workers fit: {running}");
    // Each failing slot retries at most every 100 ms.
    let failing = 20 - running;
    let bound = failing * (started.elapsed().as_millis() as usize / 100 + 2);
    assert!(
        failures <= bound,
        "{failures} failed spawns in {:?} for {failing} slots",
        started.elapsed()
    );
    assert!(alive(herd.pid()), "herd survived");
    herd.signal("TERM");
    assert_eq!(herd.wait(Duration::from_secs(15)).code(), Some(0));
}
