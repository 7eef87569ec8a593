//! A cluster with no sockets: the primary hands jobs to workers over herd's
//! IPC channel and gathers the results — parallel CPU work across processes.
//!
//! `cargo run --example jobs` (the same binary is primary and workers: herd
//! re-executes it, and `herd::role()` tells the two apart).

use std::error::Error;

use herd::worker::Channel;
use herd::{Cluster, ClusterConfig, Event, Ipc, Role, WorkerCommand};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    id: u32,
    below: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Done {
    id: u32,
    below: u64,
    primes: u64,
    worker: u32,
}

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match herd::role() {
        Role::Worker { .. } => runtime.block_on(worker()),
        Role::Primary => runtime.block_on(primary()),
    }
}

/// Counts primes below `n` (deliberately CPU-bound).
fn count_primes(n: u64) -> u64 {
    (2..n)
        .filter(|&k| (2..).take_while(|d| d * d <= k).all(|d| k % d != 0))
        .count() as u64
}

async fn worker() -> Result<(), Box<dyn Error>> {
    let mut channel = Channel::from_env()?;
    channel.ready().await?;
    // One job at a time until the primary closes the channel.
    while let Some(job) = channel.recv::<Job>().await? {
        let primes = count_primes(job.below);
        let done = Done {
            id: job.id,
            below: job.below,
            primes,
            worker: std::process::id(),
        };
        channel.send(&done).await?;
    }
    Ok(())
}

async fn primary() -> Result<(), Box<dyn Error>> {
    let mut jobs = (0..8u32).map(|id| Job {
        id,
        below: 20_000 + 10_000 * u64::from(id),
    });
    let mut config = ClusterConfig::new(WorkerCommand::current_exe()?);
    config.workers = 2;
    config.ipc = Ipc::Herd;
    let (cluster, mut events) = Cluster::bind(config)?.start()?;
    let mut in_flight = 0;
    let mut results = Vec::new();
    while let Some(event) = events.recv().await {
        let free_slot = match event {
            Event::Ready { slot, .. } => Some(slot),
            Event::Message { slot, message, .. } => {
                results.push(message.decode::<Done>()?);
                in_flight -= 1;
                Some(slot)
            }
            _ => None,
        };
        if let Some(slot) = free_slot {
            match jobs.next() {
                Some(job) => {
                    cluster.send(slot, &job)?;
                    in_flight += 1;
                }
                None if in_flight == 0 => cluster.stop()?,
                None => {}
            }
        }
    }
    cluster.wait().await?;
    results.sort_by_key(|d| d.id);
    for d in &results {
        println!(
            "job {}: {} primes below {} (worker {})",
            d.id, d.primes, d.below, d.worker
        );
    }
    println!("{} jobs done", results.len());
    Ok(())
}
