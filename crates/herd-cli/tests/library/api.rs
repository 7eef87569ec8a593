//! The library API, driven in-process as a Rust primary would: a real
//! cluster of real worker processes (`herd-ipc-fixture`) over herd's channel.
//! Every event and every `WorkerHandle` method is exercised here.

use std::io::{Read, Write};
use std::time::Duration;

use herd::Events;
use herd::{
    Cluster, ClusterConfig, ClusterHandle, Event, HandleError, Ipc, Outcome, WorkerCommand,
    WorkerStatus,
};
use serde_json::{json, Value};

use crate::serial;
use crate::util::*;

const WAIT: Duration = Duration::from_secs(10);

fn config(workers: usize) -> ClusterConfig {
    let command = WorkerCommand::resolve(vec![example_bin("herd-ipc-fixture").into()]).unwrap();
    let mut config = ClusterConfig::new(command);
    config.workers = workers;
    config.ipc = Ipc::Herd;
    config.stop_timeout = Duration::from_secs(2);
    config
}

/// Starts a cluster; stops it (and so its workers) when the test ends, even
/// when it fails: the guardian removes the workers once the test process dies.
fn start(config: ClusterConfig) -> (ClusterHandle, Events) {
    Cluster::bind(config).unwrap().start().unwrap()
}

async fn stop(cluster: ClusterHandle) {
    cluster.stop().unwrap();
    let outcome = tokio::time::timeout(WAIT, cluster.wait()).await;
    assert_eq!(outcome.expect("stops in time").unwrap(), Outcome::Stopped);
}

/// The next event matching `pred`, within [`WAIT`]; the events skipped are
/// returned too, in order, for assertions on what came before.
async fn until(
    events: &mut Events,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> (Event, Vec<Event>) {
    let mut skipped = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let e = events.recv().await.expect("cluster ended early");
            if pred(&e) {
                return e;
            }
            skipped.push(e);
        }
    })
    .await;
    match found {
        Ok(e) => (e, skipped),
        Err(_) => panic!("no {what} within {WAIT:?}; saw {skipped:?}"),
    }
}

async fn ready(events: &mut Events, slot: usize) -> (u32, Vec<Event>) {
    let (e, before) = until(
        events,
        "ready",
        |e| matches!(e, Event::Ready { slot: s, .. } if *s == slot),
    )
    .await;
    let Event::Ready { pid, .. } = e else {
        unreachable!()
    };
    (pid, before)
}

/// The pids of the first ready worker of each of slots `0..n`, by slot,
/// whatever order they become ready in.
async fn all_ready(events: &mut Events, n: usize) -> Vec<u32> {
    let mut pids = vec![None; n];
    while pids.iter().any(Option::is_none) {
        let (e, _) = until(events, "ready", |e| matches!(e, Event::Ready { .. })).await;
        if let Event::Ready { slot, pid } = e {
            pids[slot].get_or_insert(pid);
        }
    }
    pids.into_iter().flatten().collect()
}

async fn reply(events: &mut Events, from: u32) -> Value {
    let (e, _) = until(
        events,
        "a message",
        |e| matches!(e, Event::Message { pid, .. } if *pid == from),
    )
    .await;
    let Event::Message { message, .. } = e else {
        unreachable!()
    };
    message.decode().unwrap()
}

/// Worker `pid`'s `Exited` event, with the events before it; checks that
/// its `Disconnected` came first, as it must for a worker with a channel.
async fn exit_of(events: &mut Events, pid: u32) -> (Event, Vec<Event>) {
    let (exited, before) = until(
        events,
        "exit",
        |e| matches!(e, Event::Exited { pid: p, .. } if *p == pid),
    )
    .await;
    assert!(
        before
            .iter()
            .any(|e| matches!(e, Event::Disconnected { pid: p, .. } if *p == pid)),
        "Disconnected comes before Exited: {before:?}"
    );
    (exited, before)
}

#[tokio::test]
async fn worker_handle_sends_passes_fds_kills_and_reports_death() {
    let _serial = serial().await;
    let (cluster, mut events) = start(config(1));
    let (pid, before) = ready(&mut events, 0).await;
    let kinds: Vec<&str> = before
        .iter()
        .map(|e| match e {
            Event::Spawned { .. } => "spawned",
            Event::Online { .. } => "online",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["spawned", "online"], "{before:?}");

    let worker = cluster.worker(0).await.unwrap().expect("a live worker");
    assert_eq!((worker.id(), worker.pid()), (0, pid));
    assert!(worker.is_connected() && !worker.is_dead());
    assert!(cluster.worker(5).await.unwrap().is_none());

    worker.send(&json!({"op": "echo", "n": 42})).unwrap();
    assert_eq!(reply(&mut events, pid).await["n"], 42);

    let (read, write) = rustix::pipe::pipe().unwrap();
    std::fs::File::from(write)
        .write_all(b"through a pipe")
        .unwrap();
    worker.send_with_fd(&json!({"op": "fd"}), read).unwrap();
    assert_eq!(reply(&mut events, pid).await["fd_text"], "through a pipe");

    worker.kill(herd::config::Signal::KILL).unwrap();
    let status = tokio::time::timeout(WAIT, worker.exited()).await.unwrap();
    assert_eq!(
        status,
        WorkerStatus::Dead {
            code: None,
            signal: Some(libc::SIGKILL)
        }
    );
    assert!(worker.is_dead() && !worker.is_connected());
    assert!(matches!(
        worker.send(&json!({"op": "echo"})),
        Err(HandleError::NotConnected(p)) if p == pid
    ));
    let (exited, _) = exit_of(&mut events, pid).await;
    assert!(matches!(
        exited,
        Event::Exited {
            signal: Some(libc::SIGKILL),
            exited_after_disconnect: false,
            ..
        }
    ));

    // The slot's replacement has a handle of its own; the old one stays dead.
    let (second, _) = ready(&mut events, 0).await;
    assert_ne!(second, pid);
    let replacement = cluster.worker(0).await.unwrap().unwrap();
    assert_eq!(replacement.pid(), second);
    assert!(worker.is_dead() && replacement.is_connected());
    stop(cluster).await;
}

#[tokio::test]
async fn fork_adds_a_supervised_slot_with_its_own_environment() {
    let _serial = serial().await;
    let (cluster, mut events) = start(config(1));
    ready(&mut events, 0).await;
    let forked = cluster
        .fork(vec![("FIXTURE_FLAVOUR".into(), "mint".into())])
        .await
        .unwrap();
    assert_eq!(forked.id(), 1);
    let (pid, _) = ready(&mut events, 1).await;
    assert_eq!(forked.pid(), pid);
    for (key, expect) in [("FIXTURE_FLAVOUR", "mint"), ("HERD_WORKER_ID", "1")] {
        forked.send(&json!({"op": "env", "key": key})).unwrap();
        assert_eq!(reply(&mut events, pid).await["env"], expect);
    }
    let slots: Vec<usize> = cluster
        .workers()
        .await
        .unwrap()
        .iter()
        .map(|w| w.slot)
        .collect();
    assert_eq!(slots, [0, 1]);

    // Restarted by the policy, with the same environment.
    forked.kill(herd::config::Signal::KILL).unwrap();
    let (again, _) = ready(&mut events, 1).await;
    assert_ne!(again, pid);
    let replacement = cluster.worker(1).await.unwrap().unwrap();
    replacement
        .send(&json!({"op": "env", "key": "FIXTURE_FLAVOUR"}))
        .unwrap();
    assert_eq!(reply(&mut events, again).await["env"], "mint");
    stop(cluster).await;
}

#[tokio::test]
async fn disconnect_asks_the_worker_to_drain_then_refills_the_slot() {
    let _serial = serial().await;
    let (cluster, mut events) = start(config(1));
    let (pid, _) = ready(&mut events, 0).await;
    let worker = cluster.worker(0).await.unwrap().unwrap();
    worker.disconnect().unwrap();
    let (exited, _) = exit_of(&mut events, pid).await;
    assert!(
        matches!(
            exited,
            Event::Exited {
                code: Some(7),
                exited_after_disconnect: true,
                ..
            }
        ),
        "the worker's drain future fired and it exited on its own: {exited:?}"
    );
    let (second, _) = ready(&mut events, 0).await;
    assert_ne!(second, pid);

    // The stop signal sent by hand reaches the same drain future.
    cluster.signal(0, herd::config::Signal::TERM).unwrap();
    let (exited, _) = exit_of(&mut events, second).await;
    assert!(
        matches!(
            exited,
            Event::Exited {
                code: Some(7),
                exited_after_disconnect: false,
                ..
            }
        ),
        "{exited:?}"
    );
    stop(cluster).await;
}

#[tokio::test]
async fn a_worker_can_close_its_own_channel_and_live_on() {
    let _serial = serial().await;
    let (cluster, mut events) = start(config(1));
    let (pid, _) = ready(&mut events, 0).await;
    let worker = cluster.worker(0).await.unwrap().unwrap();
    worker.send(&json!({"op": "disconnect"})).unwrap();
    until(
        &mut events,
        "disconnect",
        |e| matches!(e, Event::Disconnected { pid: p, .. } if *p == pid),
    )
    .await;
    assert_eq!(worker.status(), WorkerStatus::Disconnected);
    assert!(alive(pid), "closing the channel does not end the worker");
    let info = cluster.workers().await.unwrap();
    assert!(!info[0].connected && info[0].pid == pid, "{info:?}");
    stop(cluster).await;
    assert!(worker.is_dead());
}

#[tokio::test]
async fn messages_sent_just_before_exit_all_arrive_before_the_exit() {
    let _serial = serial().await;
    // Fits in the socket buffer, so the worker can write it all and exit
    // while the primary is not reading.
    const BURST: u64 = 2000;
    let (cluster, mut events) = start(config(1));
    for round in 0..3 {
        let (pid, _) = ready(&mut events, 0).await;
        let worker = cluster.worker(0).await.unwrap().unwrap();
        worker.send(&json!({"op": "burst", "n": BURST})).unwrap();
        // Let the writer pass the request on, then hold this thread (and the
        // primary on it) while the worker writes and exits: the exit and the
        // unread messages are then ready at once, the race this guards.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        std::thread::sleep(Duration::from_millis(300));
        let (exited, before) = exit_of(&mut events, pid).await;
        assert!(matches!(exited, Event::Exited { code: Some(0), .. }));
        let seqs: Vec<u64> = before
            .iter()
            .filter_map(|e| match e {
                Event::Message { message, .. } => {
                    Some(message.decode::<Value>().unwrap()["seq"].as_u64().unwrap())
                }
                _ => None,
            })
            .collect();
        assert_eq!(seqs, (0..BURST).collect::<Vec<_>>(), "round {round}");
    }
    stop(cluster).await;
}

#[tokio::test]
async fn workers_get_tcp_unix_and_udp_sockets_from_the_primary() {
    let _serial = serial().await;
    let dir = TempDir::new("api-listen");
    let (cluster, mut events) = start(config(2));
    let [a, b] = all_ready(&mut events, 2).await[..] else {
        unreachable!()
    };
    let (w0, w1) = (
        cluster.worker(0).await.unwrap().unwrap(),
        cluster.worker(1).await.unwrap().unwrap(),
    );

    // TCP: the first worker's request binds a kernel-chosen port; the second
    // asks for that same address and gets the same socket (shared mode).
    w0.send(&json!({"op": "listen", "kind": "tcp", "addr": "127.0.0.1:0"}))
        .unwrap();
    let (listening, _) = until(
        &mut events,
        "listening",
        |e| matches!(e, Event::Listening { pid, .. } if *pid == a),
    )
    .await;
    let first = reply(&mut events, a).await["listening"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        matches!(&listening, Event::Listening { slot: 0, address, .. } if *address == first),
        "{listening:?} vs {first}"
    );
    w1.send(&json!({"op": "listen", "kind": "tcp", "addr": first}))
        .unwrap();
    assert_eq!(reply(&mut events, b).await["listening"], first.as_str());
    // Which worker accepts is the kernel's choice; a few hundred tries give
    // both a turn (40 were once all taken by one).
    let mut answered = std::collections::HashSet::new();
    for _ in 0..400 {
        let mut text = String::new();
        std::net::TcpStream::connect(&first)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.starts_with("tcp "), "{text:?}");
        answered.insert(text);
        if answered.len() == 2 {
            break;
        }
    }
    assert_eq!(answered.len(), 2, "both workers serve the one socket");

    let path = dir.path().join("api.sock");
    let path = path.to_str().unwrap();
    w0.send(&json!({"op": "listen", "kind": "unix", "addr": path}))
        .unwrap();
    reply(&mut events, a).await;
    let mut text = String::new();
    std::os::unix::net::UnixStream::connect(path)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, format!("unix {a}\n"));

    w1.send(&json!({"op": "listen", "kind": "udp", "addr": "127.0.0.1:0"}))
        .unwrap();
    let udp_addr = reply(&mut events, b).await["listening"]
        .as_str()
        .unwrap()
        .to_string();
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.send_to(b"hi", &udp_addr).unwrap();
    let mut buf = [0u8; 64];
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], format!("udp {b}\n").as_bytes());
    stop(cluster).await;
}

/// A round-robin cluster of `--rr` fixture workers on a kernel-chosen port.
fn start_rr(picker: herd::Picker) -> (ClusterHandle, Events, std::net::SocketAddr) {
    let command =
        WorkerCommand::resolve(vec![example_bin("herd-ipc-fixture").into(), "--rr".into()])
            .unwrap();
    let mut config = ClusterConfig::new(command);
    config.workers = 2;
    config.ipc = Ipc::Herd;
    config.balance = herd::Balance::RoundRobin;
    config.picker = picker;
    config.stop_timeout = Duration::from_secs(2);
    config.listen = vec!["127.0.0.1:0".parse().unwrap()];
    let cluster = Cluster::bind(config).unwrap();
    let addr = match &cluster.listeners().specs()[0].address {
        herd::ListenAddress::Tcp(a) => a.socket_addr(),
        other => panic!("{other:?}"),
    };
    let (handle, events) = cluster.start().unwrap();
    (handle, events, addr)
}

/// Connects and reads which worker took the connection; keeps it open.
/// (Async: the primary runs on this test's thread.)
async fn open(addr: std::net::SocketAddr) -> (tokio::net::TcpStream, u32) {
    use tokio::io::AsyncBufReadExt;
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut reader = tokio::io::BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(WAIT, reader.read_line(&mut line))
        .await
        .expect("the worker answers in time")
        .unwrap();
    let pid = line.trim().strip_prefix("rr ").unwrap().parse().unwrap();
    (reader.into_inner(), pid)
}

/// Waits until the primary's per-worker connection counts are `expect`.
async fn settle(cluster: &ClusterHandle, expect: &[(u32, usize)]) {
    let mut last = Vec::new();
    for _ in 0..1000 {
        last = cluster.workers().await.unwrap();
        if expect
            .iter()
            .all(|(pid, n)| last.iter().any(|w| w.pid == *pid && w.connections == *n))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("connection counts never became {expect:?}: {last:?}");
}

#[tokio::test]
async fn least_connections_sends_new_connections_to_the_idlest_worker() {
    let _serial = serial().await;
    let (cluster, mut events, addr) = start_rr(herd::Picker::LeastConnections);
    let [a, b] = all_ready(&mut events, 2).await[..] else {
        unreachable!()
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        let (s, pid) = open(addr).await;
        held.push((s, pid));
        let mut counts = std::collections::HashMap::from([(a, 0), (b, 0)]);
        held.iter()
            .for_each(|(_, p)| *counts.get_mut(p).unwrap() += 1);
        let spread: Vec<usize> = counts.values().copied().collect();
        assert!(
            spread.iter().max().unwrap() - spread.iter().min().unwrap() <= 1,
            "least-connections keeps held connections even: {counts:?}"
        );
        settle(&cluster, &counts.into_iter().collect::<Vec<_>>()).await;
    }
    // Close every connection of worker a: the next two both go to it (0 and
    // 1 open against b's 2), where turn order would alternate.
    held.retain(|(_, pid)| *pid != a);
    settle(&cluster, &[(a, 0), (b, 2)]).await;
    let (_c5, p5) = open(addr).await;
    settle(&cluster, &[(a, 1), (b, 2)]).await;
    let (_c6, p6) = open(addr).await;
    assert_eq!((p5, p6), (a, a));
    stop(cluster).await;
}

#[tokio::test]
async fn sticky_keeps_one_client_on_one_worker() {
    let _serial = serial().await;
    let (cluster, mut events, addr) = start_rr(herd::Picker::Sticky);
    all_ready(&mut events, 2).await;
    let mut pids = std::collections::HashSet::new();
    for _ in 0..8 {
        pids.insert(open(addr).await.1);
    }
    assert_eq!(pids.len(), 1, "one client address, one worker: {pids:?}");
    stop(cluster).await;

    // The same traffic under the default picker reaches both workers.
    let (cluster, mut events, addr) = start_rr(herd::Picker::RoundRobin);
    all_ready(&mut events, 2).await;
    let mut pids = std::collections::HashSet::new();
    for _ in 0..8 {
        pids.insert(open(addr).await.1);
    }
    assert_eq!(pids.len(), 2, "{pids:?}");
    stop(cluster).await;
}

/// Events nobody reads are bounded: a full queue drops and counts, and the
/// next event that fits is `Lagged` with the count. (Before: an unbounded
/// queue; 1.6 M unread messages cost the primary 320 MB.)
#[tokio::test]
async fn unread_events_are_dropped_counted_and_reported() {
    let _serial = serial().await;
    const QUEUE: usize = 64;
    const BURST: u64 = 5000;
    let mut config = config(1);
    config.event_queue = QUEUE;
    let (cluster, mut events) = start(config);
    let (pid, _) = ready(&mut events, 0).await;
    let worker = cluster.worker(0).await.unwrap().unwrap();
    worker.send(&json!({"op": "burst", "n": BURST})).unwrap();
    // Do not read while the worker sends its burst and exits.
    tokio::time::timeout(WAIT, worker.exited())
        .await
        .expect("the worker exits");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut queued = Vec::new();
    while let Ok(e) = events.try_recv() {
        queued.push(e);
    }
    assert!(queued.len() <= QUEUE, "{} events were queued", queued.len());
    let messages = queued
        .iter()
        .filter(|e| matches!(e, Event::Message { pid: p, .. } if *p == pid))
        .count() as u64;
    // Something happens next (the stop); its events come after the count.
    cluster.stop().unwrap();
    let (lagged, _) = until(&mut events, "the drop count", |e| {
        matches!(e, Event::Lagged { .. })
    })
    .await;
    let Event::Lagged { dropped } = lagged else {
        unreachable!()
    };
    assert!(
        dropped + messages >= BURST,
        "dropped {dropped}, received {messages} of {BURST}"
    );
    let outcome = tokio::time::timeout(WAIT, cluster.wait()).await;
    assert_eq!(outcome.expect("stops in time").unwrap(), Outcome::Stopped);
}

/// `ClusterHandle::reload()`: every worker replaced by a ready one, and it
/// says how it ended; `worker(slot)` then names the new worker.
#[tokio::test]
async fn reload_replaces_every_worker_and_reports_how_it_ended() {
    let _serial = serial().await;
    let (cluster, mut events) = start(config(2));
    let old = all_ready(&mut events, 2).await;
    let outcome = tokio::time::timeout(WAIT, cluster.reload())
        .await
        .expect("reload ends")
        .unwrap();
    assert_eq!(outcome, herd::ReloadOutcome::Reloaded { generation: 1 });
    assert!(outcome.succeeded());
    for (slot, pid) in old.iter().enumerate() {
        let now = cluster.worker(slot).await.unwrap().expect("a worker");
        assert_ne!(now.pid(), *pid, "slot {slot} was replaced");
    }
    let (e, _) = until(&mut events, "reloaded", |e| matches!(e, Event::Reloaded(_))).await;
    assert!(matches!(&e, Event::Reloaded(o) if *o == outcome), "{e:?}");
    stop(cluster).await;
}
