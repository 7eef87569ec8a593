//! The README's example: a primary that starts 2 workers from its own
//! binary, hands them numbers over herd's IPC channel, prints their answers
//! and stops. `cargo run -p herd --example readme`.

use herd::worker::Channel;
use herd::{Cluster, ClusterConfig, Event, Ipc, Role, WorkerCommand};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    match herd::role() {
        Role::Primary => primary().await,
        Role::Worker { .. } => worker().await,
    }
}

async fn primary() -> Result<(), Box<dyn std::error::Error>> {
    // The workers are this same program, run again (Node's cluster.fork()).
    let mut config = ClusterConfig::new(WorkerCommand::current_exe()?);
    config.workers = 2;
    config.ipc = Ipc::Herd; // a channel to each worker: Channel::from_env() there
    let (cluster, mut events) = Cluster::bind(config)?.start()?;
    let mut answers = 0;
    while let Some(event) = events.recv().await {
        match event {
            Event::Spawned { slot, pid } => println!("worker {pid} started in slot {slot}"),
            Event::Ready { slot, pid } => {
                println!("worker {pid} is ready; sending it 3 numbers");
                for n in 1..=3 {
                    cluster.send(slot, &(10 * slot as u64 + n))?;
                }
            }
            Event::Message { pid, message, .. } => {
                let (n, square): (u64, u64) = message.decode()?;
                println!("worker {pid}: {n} squared is {square}");
                answers += 1;
                if answers == 6 {
                    cluster.stop()?; // as SIGTERM would: every worker is stopped
                }
            }
            Event::Exited { pid, .. } => println!("worker {pid} exited"),
            _ => {}
        }
    }
    println!("cluster {:?}", cluster.wait().await?);
    Ok(())
}

async fn worker() -> Result<(), Box<dyn std::error::Error>> {
    let mut channel = Channel::from_env()?;
    channel.ready().await?;
    while let Some(n) = channel.recv::<u64>().await? {
        channel.send(&(n, n * n)).await?;
    }
    Ok(())
}
