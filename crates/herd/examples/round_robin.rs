//! Round-robin balancing: the primary accepts each connection and hands it to
//! the next ready worker over the IPC channel (Node's default cluster mode,
//! without its flaws: several connections may be in flight per worker, and a
//! connection handed to a worker that dies before taking it goes to another
//! worker instead of hanging).
//!
//! `cargo run -p herd --example round_robin`, then `curl 127.0.0.1:8000/`
//! (`$RR_ADDR` overrides the address). For the tests: with `$RR_STALL_ONCE`
//! set to a path, the first worker of slot 1 to create that file never accepts.

use std::error::Error;

use herd::worker::Channel;
use herd::{Balance, Cluster, ClusterConfig, Event, Ipc, Role, WorkerCommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    if let Ok(path) = std::env::var("RR_STALL_ONCE") {
        let first = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .is_ok()
        };
        if id == 1 && first() {
            println!("stalling");
            std::future::pending::<()>().await;
        }
    }
    let body = format!("hello from {}\n", std::process::id());
    while let Some(mut conn) = channel.accept().await? {
        let body = body.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 4096];
            let mut got = 0;
            while got < request.len() && !request[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut request[got..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(format!("{head}{body}").as_bytes()).await;
        });
    }
    Ok(())
}

async fn primary() -> Result<(), Box<dyn Error>> {
    let addr = std::env::var("RR_ADDR").unwrap_or_else(|_| "127.0.0.1:8000".into());
    let mut config = ClusterConfig::new(WorkerCommand::current_exe()?);
    config.workers = 2;
    config.ipc = Ipc::Herd;
    config.balance = Balance::RoundRobin;
    config.listen = vec![addr.parse()?];
    let cluster = Cluster::bind(config)?;
    for spec in cluster.listeners().specs() {
        println!("listening on {spec}");
    }
    let (handle, mut events) = cluster.start()?;
    while let Some(event) = events.recv().await {
        match event {
            Event::Ready { slot, pid } => println!("worker {pid} ready in slot {slot}"),
            Event::Exited { pid, .. } => println!("worker {pid} died"),
            _ => {}
        }
    }
    handle.wait().await?;
    Ok(())
}
