//! The seed demo in Rust: the primary starts 2 workers serving hello world on
//! 127.0.0.1:8000 (or `$HELLO_ADDR`) and logs `worker <pid> died` when one
//! exits; herd replaces it. Ctrl-C stops everything.
//!
//! `cargo run --example hello`, then `curl 127.0.0.1:8000/`.

use std::error::Error;
use std::io::{Read, Write};
use std::net::TcpListener;

use herd::activation::take_listen_fds;
use herd::{Cluster, ClusterConfig, Event, Role, WorkerCommand};

fn main() -> Result<(), Box<dyn Error>> {
    match herd::role() {
        Role::Worker { .. } => worker(),
        Role::Primary => primary(),
    }
}

/// Serves `hello world` on the socket the primary passed (fd 3).
fn worker() -> Result<(), Box<dyn Error>> {
    let socket = take_listen_fds()?
        .pop()
        .ok_or("no socket from the primary")?;
    let listener = TcpListener::from(socket.fd);
    for mut conn in listener.incoming().flatten() {
        let mut request = [0u8; 4096];
        let mut got = 0;
        while got < request.len() && !request[..got].windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut request[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        let _ = conn.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nhello world\n",
        );
    }
    Ok(())
}

fn primary() -> Result<(), Box<dyn Error>> {
    let addr = std::env::var("HELLO_ADDR").unwrap_or_else(|_| "127.0.0.1:8000".into());
    let mut config = ClusterConfig::new(WorkerCommand::current_exe()?);
    config.workers = 2;
    config.listen = vec![addr.parse()?];
    let cluster = Cluster::bind(config)?;
    for spec in cluster.listeners().specs() {
        println!("listening on {spec}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (handle, mut events) = cluster.start()?;
        while let Some(event) = events.recv().await {
            match event {
                Event::Spawned { slot, pid } => println!("worker {pid} started in slot {slot}"),
                Event::Exited {
                    pid, code, signal, ..
                } => match (code, signal) {
                    (Some(code), _) => println!("worker {pid} died (exit code {code})"),
                    (_, Some(signal)) => println!("worker {pid} died (signal {signal})"),
                    _ => println!("worker {pid} died"),
                },
                _ => {}
            }
        }
        handle.wait().await?;
        Ok(())
    })
}
