//! `herd-bench ipc-probe`: measures herd's IPC channel between a primary and
//! one worker (this same binary, re-executed by herd). Prints one JSON line.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use herd::ipc::frame::Codec;
use herd::worker::Channel;
use herd::{Cluster, ClusterConfig, Event, Ipc, Role, WorkerCommand};
use serde::{Deserialize, Serialize};

/// ~100 bytes as JSON, like the Node figure it is compared with.
const BODY: &str = "herd ipc benchmark payload, about one hundred bytes in all with its seq";

#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    Ping(u64),
    Pong(u64),
    Data {
        seq: u64,
        body: String,
    },
    /// Primary → worker: "send me n Data messages".
    SendMe(u64),
    /// Primary → worker: "how many Data did you get?"; and the answer.
    Count(u64),
}

/// Runs the probe as primary or worker, whichever this process is.
pub fn main(codec: Codec, count: u64, rtt: u64) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match herd::role() {
        Role::Worker { .. } => runtime.block_on(worker(codec)),
        Role::Primary => runtime.block_on(primary(codec, count, rtt)),
    }
}

async fn worker(codec: Codec) -> Result<()> {
    let mut ch = Channel::from_env()?.with_codec(codec);
    ch.ready().await?;
    let mut got = 0u64;
    while let Some(m) = ch.recv::<Msg>().await? {
        match m {
            Msg::Ping(n) => ch.send(&Msg::Pong(n)).await?,
            Msg::Data { .. } => got += 1,
            Msg::Count(_) => {
                ch.send(&Msg::Count(got)).await?;
                got = 0;
            }
            Msg::SendMe(n) => {
                for seq in 0..n {
                    ch.feed(&Msg::Data {
                        seq,
                        body: BODY.into(),
                    })?;
                    if seq % 1024 == 1023 {
                        ch.flush().await?;
                    }
                }
                ch.flush().await?;
            }
            Msg::Pong(_) => {}
        }
    }
    Ok(())
}

async fn primary(codec: Codec, count: u64, rtt: u64) -> Result<()> {
    let mut config = ClusterConfig::new(WorkerCommand::current_exe()?);
    config.workers = 1;
    config.ipc = Ipc::Herd;
    config.codec = codec;
    let (cluster, mut events) = Cluster::bind(config)?.start()?;
    loop {
        match events.recv().await {
            Some(Event::Ready { .. }) => break,
            Some(Event::Exited { code, signal, .. }) => {
                bail!("worker exited ({code:?}, {signal:?})")
            }
            Some(_) => {}
            None => bail!("cluster ended"),
        }
    }
    // The worker's own handle queues straight to its channel (no supervisor hop).
    let worker = cluster.worker(0).await?.context("no worker in slot 0")?;
    // Round trips.
    let mut rtts = Vec::with_capacity(rtt as usize);
    for i in 0..rtt {
        let t = Instant::now();
        worker.send(&Msg::Ping(i))?;
        let m = next_message(&mut events).await?;
        rtts.push(t.elapsed());
        if !matches!(m, Msg::Pong(n) if n == i) {
            bail!("unexpected reply {m:?}");
        }
    }
    rtts.sort();
    // Primary → worker.
    let t = Instant::now();
    for seq in 0..count {
        worker.send(&Msg::Data {
            seq,
            body: BODY.into(),
        })?;
        // Let the writer task run now and then, as a program producing in
        // bursts would, so the worker reads while we encode (the worker side
        // flushes every 1024 too).
        if seq % 1024 == 1023 {
            tokio::task::yield_now().await;
        }
    }
    worker.send(&Msg::Count(0))?;
    let m = next_message(&mut events).await?;
    let p2w = t.elapsed();
    if !matches!(m, Msg::Count(n) if n == count) {
        bail!("worker counted {m:?}, sent {count}");
    }
    // Worker → primary.
    let t = Instant::now();
    worker.send(&Msg::SendMe(count))?;
    let mut seen = 0;
    while seen < count {
        next_message(&mut events).await?;
        seen += 1;
    }
    let w2p = t.elapsed();
    cluster.stop()?;
    drop(events);
    cluster.wait().await?;
    let pct = |q: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(Duration::ZERO)
    };
    let out = serde_json::json!({
        "p2w_per_s": count as f64 / p2w.as_secs_f64(),
        "w2p_per_s": count as f64 / w2p.as_secs_f64(),
        "rtt_p50_us": pct(0.5).as_secs_f64() * 1e6,
        "rtt_p99_us": pct(0.99).as_secs_f64() * 1e6,
    });
    println!("{out}");
    Ok(())
}

async fn next_message(events: &mut herd::Events) -> Result<Msg> {
    loop {
        match events.recv().await {
            Some(Event::Message { message, .. }) => return Ok(message.decode::<Msg>()?),
            Some(Event::Exited { .. }) | None => bail!("worker gone"),
            Some(_) => {}
        }
    }
}
