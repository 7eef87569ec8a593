//! The library's examples, run as a user would: the same binary is primary and
//! workers, talking over herd's IPC channel.

use std::process::Command;
use std::time::Duration;

use crate::util::*;

/// Primes below `n`, by a sieve (independent of the example's trial division).
fn primes_below(n: usize) -> usize {
    let mut composite = vec![false; n];
    let mut count = 0;
    for i in 2..n {
        if !composite[i] {
            count += 1;
            (i * i..n).step_by(i).for_each(|j| composite[j] = true);
        }
    }
    count
}

#[test]
fn jobs_example_spreads_work_over_ipc_and_gathers_every_result() {
    let mut child = Command::new(example_bin("jobs"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(60));
    let Some(status) = status else {
        let _ = child.kill();
        panic!("jobs example did not finish in 60 s");
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{out}");
    assert!(out.contains("8 jobs done"), "{out}");
    let mut workers = std::collections::HashSet::new();
    for id in 0..8 {
        let below = 20_000 + 10_000 * id;
        let expect = format!(
            "job {id}: {} primes below {below} (worker ",
            primes_below(below)
        );
        let line = out
            .lines()
            .find(|l| l.starts_with(&expect))
            .unwrap_or_else(|| panic!("no {expect:?} in\n{out}"));
        workers.insert(pid_after(line, "(worker "));
    }
    assert_eq!(workers.len(), 2, "both workers took jobs: {out}");
}

#[test]
fn hello_example_serves_and_reports_dead_workers() {
    let mut cmd = Command::new(example_bin("hello"));
    cmd.env("HELLO_ADDR", "127.0.0.1:0");
    let mut hello = Herd::spawn(cmd);
    let line = hello.stdout.wait_for("listening line", STARTUP, |l| {
        l.starts_with("listening on ")
    });
    let port: u16 = line.rsplit(':').next().unwrap().parse().unwrap();
    let first = hello
        .stdout
        .wait_for("a worker", STARTUP, |l| l.contains("started in slot"));
    let victim = pid_after(&first, "worker ");
    assert!(eventually(STARTUP, || http_get(port)
        .map(|r| body(&r) == "hello world\n")
        .unwrap_or(false)));
    send_signal(victim, "KILL");
    hello.stdout.wait_for("the death line", STARTUP, |l| {
        l == format!("worker {victim} died (signal 9)")
    });
    hello.stdout.wait_for_nth("a replacement", STARTUP, 3, |l| {
        l.contains("started in slot")
    });
    hello.signal("TERM");
    assert_eq!(hello.wait(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn chat_example_relays_every_message_to_every_worker() {
    let mut chat = Herd::spawn(Command::new(example_bin("chat")));
    let status = chat.wait(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(50));
    let out = chat.stdout.all();
    assert!(status.success(), "{out:?}");
    assert!(
        out.iter().any(|l| l == "all 3 workers heard each other"),
        "{out:?}"
    );
    for listener in 0..3 {
        for speaker in 0..3 {
            let expect = format!("] worker {listener} heard: hello from worker {speaker}");
            assert!(
                out.iter().any(|l| l.ends_with(&expect)),
                "missing {expect:?} in {out:?}"
            );
        }
    }
}

#[test]
fn listen_example_workers_get_their_socket_from_the_primary() {
    let mut cmd = Command::new(example_bin("listen"));
    cmd.env("LISTEN_ADDR", "127.0.0.1:0");
    let herd = Herd::spawn(cmd);
    let lines: Vec<String> = (1..=2)
        .map(|n| {
            herd.stdout
                .wait_for_nth("listening workers", STARTUP, n, |l| {
                    l.contains(" listening on ")
                })
        })
        .collect();
    let addrs: std::collections::HashSet<&str> = lines
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(addrs.len(), 1, "one socket, bound once, shared: {lines:?}");
    let port: u16 = addrs
        .iter()
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(port, 0);
    let pids: std::collections::HashSet<String> = lines
        .iter()
        .map(|l| pid_after(l, "worker ").to_string())
        .collect();
    herd.stdout
        .wait_for_nth("ready workers", STARTUP, 2, |l| l.ends_with(" ready"));
    let mut seen = std::collections::HashSet::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            if let Ok(resp) = http_get(port) {
                if let Some(pid) = body(&resp).trim().strip_prefix("hello from ") {
                    seen.insert(pid.to_string());
                }
            }
            seen.len() == 2
        }),
        "answers from both workers: {seen:?}"
    );
    assert_eq!(seen, pids);
}

#[test]
fn round_robin_hands_connections_a_dead_worker_never_took_to_another() {
    let dir = TempDir::new("rr");
    let mut cmd = Command::new(example_bin("round_robin"));
    cmd.env("RR_ADDR", "127.0.0.1:0")
        .env("RR_STALL_ONCE", dir.path().join("stalled"));
    let herd = Herd::spawn(cmd);
    let line = herd.stdout.wait_for("listening line", STARTUP, |l| {
        l.starts_with("listening on ")
    });
    let port: u16 = line.rsplit(':').next().unwrap().parse().unwrap();
    // Both workers ready; slot 1's first worker stalls and never accepts.
    let ready: Vec<String> = (1..=2)
        .map(|n| {
            herd.stdout.wait_for_nth("ready workers", STARTUP, n, |l| {
                l.contains(" ready in slot ")
            })
        })
        .collect();
    let stalled = ready
        .iter()
        .find(|l| l.ends_with("slot 1"))
        .map(|l| pid_after(l, "worker "))
        .expect("slot 1 ready");
    herd.stdout
        .wait_for("the stall", STARTUP, |l| l.ends_with("] stalling"));
    // Connections alternate between the slots: half go to the stalled worker.
    let clients: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || http_get(port)))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let done_before_kill = clients.iter().filter(|c| c.is_finished()).count();
    assert!(
        done_before_kill < 6,
        "some connections must be waiting at the stalled worker"
    );
    send_signal(stalled, "KILL");
    let mut answered_by = std::collections::HashSet::new();
    for c in clients {
        let resp = c
            .join()
            .unwrap()
            .expect("every connection is answered, none leaked");
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        answered_by.insert(body(&resp).trim().to_string());
    }
    assert!(!answered_by.contains(&format!("hello from {stalled}")));
}

/// The README's library example is `examples/readme.rs`, verbatim, and it
/// runs: 2 workers, 6 answers, a clean stop.
#[test]
fn the_readme_example_is_the_example_file_and_it_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("crates/herd/examples/readme.rs")).unwrap();
    let code: String = example
        .lines()
        .skip_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let block = format!("```rust\n{}\n```", code.trim_matches('\n'));
    assert!(
        readme.contains(&block),
        "README.md's library example differs from crates/herd/examples/readme.rs"
    );
    let mut child = Command::new(example_bin("readme"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(30));
    let Some(status) = status else {
        let _ = child.kill();
        panic!("the readme example did not finish in 30 s");
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{out}");
    for n in [1u64, 2, 3, 11, 12, 13] {
        let line = format!(": {n} squared is {}", n * n);
        assert!(out.contains(&line), "{line:?} missing:\n{out}");
    }
    assert!(out.trim_end().ends_with("cluster Stopped"), "{out}");
}
