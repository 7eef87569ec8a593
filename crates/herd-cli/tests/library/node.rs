//! The library as a primary of unchanged Node workers, in-process.

use crate::serial;
use crate::util::*;

async fn next(events: &mut herd::Events) -> herd::Event {
    let e = tokio::time::timeout(STARTUP, events.recv()).await;
    e.expect("an event in time").expect("cluster running")
}

/// The library as a primary of Node workers: messages both ways over Node's
/// own channel, `process.on('message')` on the worker side.
#[tokio::test]
async fn a_rust_primary_talks_to_node_workers_over_their_own_channel() {
    use herd::{Cluster, ClusterConfig, Event, Ipc, WorkerCommand};
    let _serial = serial().await;
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

/// The library's disconnect, for a Node worker, is Node's: it closes its
/// servers, lets open connections finish and exits on its own.
#[tokio::test]
async fn disconnect_lets_a_node_worker_close_its_servers_and_exit() {
    use herd::{Cluster, ClusterConfig, Event, Ipc, WorkerCommand};
    let _serial = serial().await;
    if node_missing() {
        return;
    }
    // A file: Node's cluster workers do not run `node -e` scripts.
    let dir = TempDir::new("node-disconnect");
    let app = dir.path().join("app.js");
    std::fs::write(
        &app,
        "require('http').createServer((q, s) => s.end('ok')).listen(0, '127.0.0.1');\n\
         process.on('SIGTERM', () => process.exit(9));\n",
    )
    .unwrap();
    let command = WorkerCommand::resolve(vec!["node".into(), app.into()]).unwrap();
    let mut config = ClusterConfig::new(command);
    config.workers = 1;
    config.ipc = Ipc::Node;
    let (cluster, mut events) = Cluster::bind(config).unwrap().start().unwrap();
    let pid = loop {
        if let Event::Listening { pid, .. } = next(&mut events).await {
            break pid;
        }
    };
    cluster.disconnect(0).unwrap();
    let mut seen = Vec::new();
    let exited = loop {
        match next(&mut events).await {
            e @ Event::Exited { .. } => break e,
            e => seen.push(e),
        }
    };
    assert!(
        matches!(exited, Event::Exited { pid: p, code: Some(0), signal: None, exited_after_disconnect: true, .. } if p == pid),
        "exited by itself, not by the stop signal (9) or SIGKILL: {exited:?}"
    );
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Disconnected { pid: p, .. } if *p == pid)),
        "{seen:?}"
    );
    cluster.stop().unwrap();
    let outcome = tokio::time::timeout(STARTUP, cluster.wait()).await;
    assert_eq!(outcome.unwrap().unwrap(), herd::Outcome::Stopped);
}
