//! Workers talk to each other through the primary: each worker says hello,
//! the primary relays every message to every worker, and each worker prints
//! what it hears. When every worker has heard everyone, the primary stops.
//!
//! `cargo run -p herd --example chat`

use std::error::Error;

use herd::worker::Channel;
use herd::{Cluster, ClusterConfig, Event, Ipc, Role, WorkerCommand};
use serde::{Deserialize, Serialize};

const WORKERS: usize = 3;

#[derive(Debug, Serialize, Deserialize)]
enum Chat {
    /// A line from worker `from`.
    Say { from: usize, text: String },
    /// Worker `from` has heard every worker.
    HeardAll { from: usize },
}

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match herd::role() {
        Role::Worker { id } => runtime.block_on(worker(id)),
        Role::Primary => runtime.block_on(primary()),
    }
}

async fn worker(id: usize) -> Result<(), Box<dyn Error>> {
    let mut channel = Channel::from_env()?;
    channel.ready().await?;
    let text = format!("hello from worker {id}");
    channel.send(&Chat::Say { from: id, text }).await?;
    let mut heard = std::collections::BTreeSet::new();
    while let Some(message) = channel.recv::<Chat>().await? {
        if let Chat::Say { from, text } = message {
            println!("worker {id} heard: {text}");
            heard.insert(from);
            if heard.len() == WORKERS {
                channel.send(&Chat::HeardAll { from: id }).await?;
            }
        }
    }
    Ok(())
}

async fn primary() -> Result<(), Box<dyn Error>> {
    let mut config = ClusterConfig::new(WorkerCommand::current_exe()?);
    config.workers = WORKERS;
    config.ipc = Ipc::Herd;
    let (cluster, mut events) = Cluster::bind(config)?.start()?;
    let mut done = 0;
    while let Some(event) = events.recv().await {
        let Event::Message { message, .. } = event else {
            continue;
        };
        match message.decode::<Chat>()? {
            // Relay to everyone, the speaker included.
            say @ Chat::Say { .. } => {
                for slot in 0..WORKERS {
                    cluster.send(slot, &say)?;
                }
            }
            Chat::HeardAll { .. } => {
                done += 1;
                if done == WORKERS {
                    cluster.stop()?;
                }
            }
        }
    }
    cluster.wait().await?;
    println!("all {WORKERS} workers heard each other");
    Ok(())
}
