//! The built-in worker: an HTTP/1.1 hello-world server (and a UDP echo of the
//! same text), what `herd run` runs when no command is given.
//!
//! It is a real server, because reloads and benchmarks rely on it:
//! keep-alive, pipelined requests answered in order, request bodies skipped
//! by `Content-Length`, and a graceful drain on SIGTERM — stop accepting,
//! finish what is in flight, answer the next request on each keep-alive
//! connection with `Connection: close`, close connections that stay idle
//! through [`DRAIN_IDLE_GRACE`], then exit 0.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use anyhow::{Context, Result};
use herd::activation::{take_listen_fds, SocketKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cli::HelloArgs;

/// How long a keep-alive connection may stay idle once draining has begun.
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);
/// The largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
const BODY: &[u8] = b"hello world\n";

/// Serves until SIGTERM/SIGINT, then drains and returns.
pub fn main(args: HelloArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
    Udp(UdpSocket),
}

impl Listener {
    /// The bound address, for the startup line.
    fn describe(&self) -> String {
        let addr = match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()),
            Listener::Udp(s) => s.local_addr().map(|a| format!("udp:{a}")),
            Listener::Unix(l) => l.local_addr().map(|a| match a.as_pathname() {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix:(unnamed)".into(),
            }),
        };
        addr.unwrap_or_else(|e| format!("(unknown address: {e})"))
    }
}

fn adopt(fd: OwnedFd, kind: SocketKind) -> Result<Option<Listener>> {
    Ok(match kind {
        SocketKind::TcpListener => {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Some(Listener::Tcp(TcpListener::from_std(l)?))
        }
        SocketKind::UnixListener => {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true)?;
            Some(Listener::Unix(UnixListener::from_std(l)?))
        }
        SocketKind::Udp => {
            let s = std::net::UdpSocket::from(fd);
            s.set_nonblocking(true)?;
            Some(Listener::Udp(UdpSocket::from_std(s)?))
        }
        SocketKind::Other => None,
    })
}

async fn serve(args: HelloArgs) -> Result<()> {
    let mut listeners = Vec::new();
    for inherited in take_listen_fds()? {
        let kind = inherited.kind();
        match adopt(inherited.fd, kind)? {
            Some(l) => listeners.push(l),
            None => eprintln!(
                "ignoring inherited socket {:?}: unsupported kind",
                inherited.name
            ),
        }
    }
    if listeners.is_empty() {
        let l = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        listeners.push(Listener::Tcp(l));
    }
    for l in &listeners {
        println!("hello: listening on {}", l.describe());
    }
    let header = response_head();
    let (drain_tx, drain) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for l in listeners {
        tasks.spawn(accept_loop(l, drain.clone(), header.clone()));
    }
    // Ready: it accepts now (sd_notify, as any server under herd or systemd
    // can say it), so a reload moves on without waiting for --ready-delay.
    let _ = herd::worker::notify("READY=1");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let _ = drain_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The response head shared by every response of this process.
fn response_head() -> std::sync::Arc<[u8]> {
    format!(
        "HTTP/1.1 200 OK\r\nServer: herd\r\nContent-Type: text/plain\r\nX-Worker: {}\r\nContent-Length: {}\r\n",
        std::process::id(),
        BODY.len()
    )
    .into_bytes()
    .into()
}

async fn accept_loop(l: Listener, mut drain: watch::Receiver<bool>, head: std::sync::Arc<[u8]>) {
    let mut conns = JoinSet::new();
    loop {
        // Reap finished connection tasks so the set does not grow.
        while conns.try_join_next().is_some() {}
        tokio::select! {
            _ = drain.changed() => break,
            accepted = accept(&l) => match accepted {
                Ok(Some(Conn::Tcp(s))) => {
                    let _ = s.set_nodelay(true);
                    conns.spawn(serve_conn(s, drain.clone(), head.clone()));
                }
                Ok(Some(Conn::Unix(s))) => {
                    conns.spawn(serve_conn(s, drain.clone(), head.clone()));
                }
                Ok(None) => {}
                // EMFILE and friends: back off a little instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
    drop(l);
    while conns.join_next().await.is_some() {}
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Accepts one connection, or answers one datagram (returning `None`).
async fn accept(l: &Listener) -> io::Result<Option<Conn>> {
    match l {
        Listener::Tcp(l) => Ok(Some(Conn::Tcp(l.accept().await?.0))),
        Listener::Unix(l) => Ok(Some(Conn::Unix(l.accept().await?.0))),
        Listener::Udp(s) => {
            let mut buf = [0u8; 2048];
            let (_, peer) = s.recv_from(&mut buf).await?;
            s.send_to(BODY, peer).await?;
            Ok(None)
        }
    }
}

/// What the parser made of the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A whole request of `len` bytes (head and body).
    Request {
        len: usize,
        keep_alive: bool,
        head_only: bool,
    },
    /// More bytes are needed.
    Partial,
    /// Unacceptable; answer with this status and close.
    Reject(&'static str),
}

fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = find_head_end(buf) else {
        return if buf.len() > MAX_HEAD {
            Parsed::Reject("431 Request Header Fields Too Large")
        } else {
            Parsed::Partial
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Reject("400 Bad Request");
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(_target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Reject("400 Bad Request");
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Parsed::Reject("505 HTTP Version Not Supported"),
    };
    let mut body = 0usize;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Reject("400 Bad Request");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse() {
                Ok(n) => body = n,
                Err(_) => return Parsed::Reject("400 Bad Request"),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Reject("501 Not Implemented");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    let len = end + 4 + body;
    if buf.len() < len {
        return Parsed::Partial;
    }
    Parsed::Request {
        len,
        keep_alive,
        head_only: method == "HEAD",
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

async fn serve_conn<S>(mut stream: S, mut drain: watch::Receiver<bool>, head: std::sync::Arc<[u8]>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut drain_deadline = None;
    loop {
        // Answer every complete request in the buffer, in order.
        let mut consumed = 0;
        let mut close = false;
        loop {
            match parse(&buf[consumed..]) {
                Parsed::Partial => break,
                Parsed::Reject(status) => {
                    out.extend_from_slice(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                    close = true;
                    break;
                }
                Parsed::Request {
                    len,
                    keep_alive,
                    head_only,
                } => {
                    consumed += len;
                    let draining = *drain.borrow();
                    close = !keep_alive || draining;
                    out.extend_from_slice(&head);
                    if close {
                        out.extend_from_slice(b"Connection: close\r\n");
                    }
                    out.extend_from_slice(b"\r\n");
                    if !head_only {
                        out.extend_from_slice(BODY);
                    }
                    if close {
                        break;
                    }
                }
            }
        }
        buf.drain(..consumed);
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
        if *drain.borrow() && drain_deadline.is_none() {
            drain_deadline = Some(tokio::time::Instant::now() + DRAIN_IDLE_GRACE);
        }
        let idle_limit = async {
            match drain_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = stream.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = drain.changed(), if drain_deadline.is_none() => {}
            _ = idle_limit, if buf.is_empty() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keep_alive_close_bodies_and_pipelines() {
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            parse(get),
            Parsed::Request {
                len: get.len(),
                keep_alive: true,
                head_only: false
            }
        );
        let close = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert!(matches!(
            parse(close),
            Parsed::Request {
                keep_alive: false,
                ..
            }
        ));
        let old = b"GET / HTTP/1.0\r\n\r\n";
        assert!(matches!(
            parse(old),
            Parsed::Request {
                keep_alive: false,
                ..
            }
        ));
        let old_ka = b"HEAD / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
        assert!(matches!(
            parse(old_ka),
            Parsed::Request {
                keep_alive: true,
                head_only: true,
                ..
            }
        ));
        let post = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET";
        assert!(matches!(parse(post), Parsed::Request { len: 43, .. }));
        assert_eq!(parse(&post[..40]), Parsed::Partial);
        let mut two = get.to_vec();
        two.extend_from_slice(get);
        assert!(matches!(parse(&two), Parsed::Request { len, .. } if len == get.len()));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse(b"hello\r\n\r\n"), Parsed::Reject("400 Bad Request"));
        assert_eq!(
            parse(b"GET / HTTP/2\r\n\r\n"),
            Parsed::Reject("505 HTTP Version Not Supported")
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Parsed::Reject("501 Not Implemented")
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Parsed::Reject("400 Bad Request")
        );
        assert_eq!(
            parse(&vec![b'a'; MAX_HEAD + 1]),
            Parsed::Reject("431 Request Header Fields Too Large")
        );
    }
}
