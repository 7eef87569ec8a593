//! A Node.js app that serves on the inherited fd 3, unchanged, under herd.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

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

fn node_missing() -> bool {
    if Command::new("node").arg("--version").output().is_err() {
        eprintln!("skipped: node is not installed");
        return true;
    }
    false
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
fn a_worker_breaking_the_ipc_protocol_loses_only_its_channel() {
    // Slot 0 writes garbage, slot 1 an endless line (over the 16 MiB cap);
    // slot 2 behaves. herd must stay up and slot 2 must still be heard.
    let script = format!(
        "case $HERD_WORKER_ID in \
           0) printf '{{bad json\\n' >&$NODE_CHANNEL_FD ;; \
           1) head -c 17000000 /dev/zero | tr '\\0' a >&$NODE_CHANNEL_FD ;; \
           2) sleep 0.3; printf '\"ready\"\\n' >&$NODE_CHANNEL_FD ;; \
         esac; exec {}",
        fixture_bin().display()
    );
    let herd = Herd::start([
        "run",
        "-w",
        "3",
        "--no-listen",
        "--node-ipc",
        "on",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let pids: Vec<u32> = (1..=3).map(|n| herd.nth_spawned(n)).collect();
    herd.stderr.wait_for("malformed JSON", STARTUP, |l| {
        l.contains("broke the IPC protocol (malformed JSON")
    });
    herd.stderr.wait_for("oversized message", STARTUP, |l| {
        l.contains("broke the IPC protocol (message longer than 16777216 bytes)")
    });
    herd.stderr
        .wait_for("the good worker's ready", STARTUP, |l| l.contains(" ready"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    for pid in &pids {
        assert!(alive(*pid), "worker {pid} should still run");
    }
    assert!(herd.stderr.count(|l| l.contains(" died")) == 0);
}

/// The library as a primary of Node workers: messages both ways over Node's
/// own channel, `process.on('message')` on the worker side.
#[tokio::test]
async fn a_rust_primary_talks_to_node_workers_over_their_own_channel() {
    use herd::{Cluster, ClusterConfig, Event, Ipc, WorkerCommand};
    if node_missing() {
        return;
    }
    let script = "process.on('message', (m) => process.send({ echo: m, pid: process.pid })); \
                  process.send('ready');";
    let command = WorkerCommand::resolve(vec!["node".into(), "-e".into(), script.into()]).unwrap();
    let mut config = ClusterConfig::new(command);
    config.workers = 1;
    config.ipc = Ipc::Node;
    let (cluster, mut events) = Cluster::bind(config).unwrap().start().unwrap();
    let mut seen = Vec::new();
    let pid = loop {
        match next(&mut events).await {
            Event::Ready { pid, .. } => break pid,
            e => seen.push(e),
        }
    };
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Online { pid: p, .. } if *p == pid)),
        "a Node worker's first message marks it online: {seen:?}"
    );
    let worker = cluster.worker(0).await.unwrap().unwrap();
    worker
        .send(&serde_json::json!({ "job": [1, 2, 3], "text": "héllo\nnode" }))
        .unwrap();
    cluster.send(0, &"second, via the supervisor").unwrap();
    let mut echoes = Vec::new();
    while echoes.len() < 2 {
        if let Event::Message { message, .. } = next(&mut events).await {
            let v: serde_json::Value = message.decode().unwrap();
            assert_eq!(v["pid"], pid);
            echoes.push(v["echo"].clone());
        }
    }
    assert_eq!(
        echoes,
        [
            serde_json::json!({ "job": [1, 2, 3], "text": "héllo\nnode" }),
            serde_json::json!("second, via the supervisor")
        ]
    );
    assert!(matches!(
        worker.send_with_fd(&"x", rustix::pipe::pipe().unwrap().0),
        Err(herd::HandleError::NoFdPassing)
    ));
    cluster.stop().unwrap();
    let outcome = tokio::time::timeout(STARTUP, cluster.wait()).await;
    assert_eq!(outcome.unwrap().unwrap(), herd::Outcome::Stopped);
}

async fn next(events: &mut tokio::sync::mpsc::UnboundedReceiver<herd::Event>) -> herd::Event {
    let e = tokio::time::timeout(STARTUP, events.recv()).await;
    e.expect("an event in time").expect("cluster running")
}
