//! Workers ask the primary for their listening socket (Node's
//! `server.listen()` in a cluster): the primary binds the address once and
//! passes the socket to each worker over the IPC channel. Run alone (not under
//! herd) the same worker code binds the address itself.
//!
//! `cargo run -p herd --example listen`, then `curl 127.0.0.1:8000/`
//! (`$LISTEN_ADDR` overrides the address).

use std::error::Error;

use herd::worker::{listen_tcp, Channel};
use herd::{Cluster, ClusterConfig, Event, Ipc, Role, WorkerCommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:8000".into());
    match herd::role() {
        Role::Worker { .. } => runtime.block_on(worker(&addr)),
        Role::Primary => runtime.block_on(primary()),
    }
}

async fn worker(addr: &str) -> Result<(), Box<dyn Error>> {
    // Under `herd run` (no herd channel) the example binds the socket itself.
    let mut channel = match Channel::from_env() {
        Ok(channel) => Some(channel),
        Err(herd::worker::ChannelError::NotEnabled) => None,
        Err(e) => return Err(e.into()),
    };
    let listener = listen_tcp(channel.as_mut(), addr).await?;
    if let Some(channel) = channel.as_mut() {
        channel.ready().await?;
    }
    let body = format!("hello from {}\n", std::process::id());
    loop {
        let (mut conn, _) = listener.accept().await?;
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
}

async fn primary() -> Result<(), Box<dyn Error>> {
    let mut config = ClusterConfig::new(WorkerCommand::current_exe()?);
    config.workers = 2;
    config.ipc = Ipc::Herd;
    let (cluster, mut events) = Cluster::bind(config)?.start()?;
    while let Some(event) = events.recv().await {
        match event {
            Event::Listening { pid, address, .. } => {
                println!("worker {pid} listening on {address}")
            }
            Event::Ready { pid, .. } => println!("worker {pid} ready"),
            Event::Exited { pid, .. } => println!("worker {pid} died"),
            _ => {}
        }
    }
    cluster.wait().await?;
    Ok(())
}
