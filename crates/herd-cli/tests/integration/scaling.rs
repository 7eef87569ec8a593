//! Scaling: SIGTTIN adds a worker, SIGTTOU retires the highest slot's
//! worker (drained, not replaced), with no request lost under load.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::util::*;

#[test]
fn sigttin_and_sigttou_scale_without_losing_a_request() {
    let herd = Herd::start(["run", "-w", "2", "-l", "127.0.0.1:0"]);
    let port = herd.port();
    herd.nth_spawned(2);
    // Load: one request after another, Connection: close, until told to stop
    // (at most 20 s).
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                match http_get(port) {
                    Ok(r) if r.starts_with("HTTP/1.1 200") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(r.lines().next().unwrap_or("").to_string()),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        })
    };
    herd.signal("TTIN");
    let third = herd.nth_spawned(3);
    herd.stderr.wait_for("scaled up", STARTUP, |l| {
        l.contains("scaling from 2 to 3 workers")
    });
    herd.signal("TTOU");
    herd.stderr
        .wait_for("slot 2 removed", STARTUP, |l| l.contains("slot 2 removed"));
    herd.signal("TTOU");
    herd.stderr
        .wait_for("slot 1 removed", STARTUP, |l| l.contains("slot 1 removed"));
    // At 1 worker, SIGTTOU is refused.
    herd.signal("TTOU");
    herd.stderr.wait_for("the floor", STARTUP, |l| {
        l.contains("already at 1 worker(s)")
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "load ran: {}",
        ok.load(Ordering::Relaxed)
    );
    // The scaled-away workers drained and exited; nothing replaced them.
    assert!(herd.stderr.all().iter().any(|l| l
        .contains(&format!("worker {third} exited after it was asked to go"))
        || l.contains(&format!("worker {third} exited ("))));
    assert_eq!(herd.spawned().len(), 3, "{:?}", herd.stderr.all());
}

/// Scaling down takes a slot that serves nothing (crash-looping) before
/// the one healthy worker.
#[test]
fn sigttou_takes_a_failed_slot_before_a_serving_one() {
    let script = hello_but_slot(0, "exit 1");
    let herd = Herd::sh(
        &["-w", "2", "-l", "127.0.0.1:0", "--max-restarts", "2"],
        &script,
    );
    let port = herd.port();
    herd.stderr.wait_for("slot 0 failed", STARTUP, |l| {
        l.contains("slot 0 marked failed")
    });
    herd.stderr.wait_for("slot 1 ready", STARTUP, |l| {
        l.contains(" ready") && l.contains("slot=1")
    });
    herd.signal("TTOU");
    herd.stderr.wait_for("slot 0 scaled away", STARTUP, |l| {
        l.contains("slot 0 scaled away")
    });
    for _ in 0..5 {
        let r = http_get(port).expect("the healthy worker still serves");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert!(
        herd.stderr.count(|l| l.contains("retires")) == 0,
        "{:?}",
        herd.stderr.all()
    );
}

/// reuseport: a scaled-away worker keeps accepting what is queued on its
/// slot's socket (new connections go elsewhere at once) and is asked to go
/// only once the queue is empty: none of those connections is stranded. The
/// slot-1 worker here accepts slowly (one per 40 ms), so a burst queues.
#[test]
fn reuseport_scale_down_serves_what_is_queued_on_the_leaving_socket() {
    if python_missing() {
        return;
    }
    let dir = TempDir::new("slow-acceptor");
    let slow = dir.path().join("slow.py");
    std::fs::write(
        &slow,
        r#"
import os, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nslow\n")
    c.close()
    time.sleep(0.04)
"#,
    )
    .unwrap();
    let script = hello_but_slot(1, &format!("exec python3 {}", slow.display()));
    let herd = Herd::sh(
        &[
            "-w",
            "2",
            "--balance",
            "reuseport",
            "-l",
            "127.0.0.1:0",
            "--ready-delay",
            "300ms",
        ],
        &script,
    );
    let port = herd.port();
    // Both ready: steering sends new connections to both sockets again.
    herd.stderr.wait_for("both ready", STARTUP, |l| {
        l.contains("new connections go to every slot again")
    });
    // A burst: about half hash to slot 1's socket and queue behind its slow
    // accept loop; then slot 1 is scaled away.
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            use std::io::Write;
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    herd.signal("TTOU");
    let mut slow_answers = 0;
    for (i, mut s) in clients.into_iter().enumerate() {
        use std::io::Read;
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap_or_else(|e| {
            panic!(
                "connection {i} stranded: {e}\n{}",
                herd.stderr.all().join("\n")
            )
        });
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "connection {i}: {answer:?}"
        );
        slow_answers += answer.ends_with("slow\n") as usize;
    }
    assert!(
        slow_answers > 0,
        "none went to slot 1: the test tested nothing"
    );
    herd.stderr
        .wait_for("slot 1 removed", STARTUP, |l| l.contains("slot 1 removed"));
}

/// Scaling up while scaled-away workers still drain takes their slots
/// back: the new worker is slot 1 (`HERD_WORKER_ID=1`) of a 2-worker
/// cluster, beside the draining one, not slot 4.
#[test]
fn scaling_up_takes_back_slots_still_draining() {
    let script =
        "trap 'sleep 3; exit 0' TERM; echo \"id=$HERD_WORKER_ID\"; while :; do sleep 0.1; done";
    let herd = Herd::sh(
        &[
            "-w",
            "4",
            "--name",
            "dense",
            "--no-listen",
            "--ready-delay",
            "100ms",
        ],
        script,
    );
    for n in 1..=4 {
        herd.stderr
            .wait_for_nth("ready", STARTUP, n, |l| l.contains(" ready"));
    }
    assert_eq!(herd.ctl(&["scale", "dense", "1"]).0, 0);
    herd.stderr
        .wait_for("retiring", STARTUP, |l| l.contains("slot 3 is scaled away"));
    assert_eq!(herd.ctl(&["scale", "dense", "2"]).0, 0);
    let line = herd.stderr.wait_for_nth("a new worker", STARTUP, 5, |l| {
        l.contains(" spawned in slot ")
    });
    assert!(line.contains("spawned in slot 1"), "{line}");
    herd.stdout
        .wait_for_nth("its id", STARTUP, 2, |l| l.ends_with("id=1"));
    let status = herd.status_json("dense");
    let slots = status["slots"].as_array().unwrap();
    assert!(
        slots.iter().all(|s| s["slot"].as_u64().unwrap() < 4),
        "{status}"
    );
}
