//! The worker side: which role this process plays, and its channel to the
//! primary.
//!
//! A program that is both primary and worker (the library's default: the
//! primary re-executes its own binary) branches on [`role`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! match herd::role() {
//!     herd::Role::Primary => { /* build and start a Cluster */ }
//!     herd::Role::Worker { id } => {
//!         let mut channel = herd::worker::Channel::from_env()?;
//!         channel.ready().await?;
//!         while let Some(job) = channel.recv::<u64>().await? {
//!             channel.send(&(id, job * 2)).await?;
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::os::fd::{OwnedFd, RawFd};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::ipc::frame::{self, Codec, Frame, FrameDecoder, FrameError};
use crate::ipc::Control;
use crate::sys;

/// Which side of a cluster this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not started by herd: the process that starts the cluster.
    Primary,
    /// Started by herd into slot `id` (`HERD_WORKER_ID`).
    Worker {
        /// The slot, 0..N.
        id: usize,
    },
}

/// This process's role, from the environment herd gives its workers.
pub fn role() -> Role {
    match std::env::var("HERD_WORKER_ID")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(id) => Role::Worker { id },
        None => Role::Primary,
    }
}

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// This process has no channel: it was not started by a herd primary, or
    /// the primary runs without herd's IPC.
    #[error(
        "no IPC channel: HERD_IPC_FD is not set (this process was not started as a worker by a \
         herd primary whose ClusterConfig has `ipc = Ipc::Herd`; set it in the primary)"
    )]
    NotEnabled,
    /// `HERD_IPC_FD` is not a usable descriptor.
    #[error("HERD_IPC_FD={0:?} is not an open descriptor")]
    BadFd(String),
    /// The primary broke the protocol.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Reading or writing failed.
    #[error("IPC channel: {0}")]
    Io(#[from] std::io::Error),
    /// The primary could not open the socket asked for.
    #[error("the primary cannot listen: {0}")]
    Listen(String),
    /// The primary closed the channel while a reply was awaited.
    #[error("the primary closed the IPC channel")]
    Closed,
}

/// A worker's channel to its primary: length-delimited frames over the Unix
/// socket herd passed as `HERD_IPC_FD`.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
    decoder: FrameDecoder,
    codec: Codec,
    buf: Vec<u8>,
    /// Frames fed but not yet written.
    out: Vec<u8>,
    /// Application frames read while waiting for a control reply, each with
    /// its descriptor if it carried one.
    pending: VecDeque<(Frame, Option<OwnedFd>)>,
    /// Descriptors received (SCM_RIGHTS), in order, for frames flagged with one.
    fds: VecDeque<OwnedFd>,
    /// Connections handed over (round-robin) and not yet accepted.
    conns: VecDeque<(u64, OwnedFd)>,
    /// Ids of accepted connections since dropped ([`Conn`]'s drop sends
    /// here); reported to the primary in batches.
    closed_tx: tokio::sync::mpsc::UnboundedSender<u64>,
    closed_rx: Option<tokio::sync::mpsc::UnboundedReceiver<u64>>,
    seq: u64,
}

impl Channel {
    /// The channel herd opened for this worker. Must be called inside a
    /// tokio runtime, once.
    ///
    /// # Errors
    ///
    /// [`ChannelError::NotEnabled`] when this process has none: it is not a
    /// worker, or its primary's [`ClusterConfig::ipc`](crate::ClusterConfig::ipc)
    /// is not [`Ipc::Herd`](crate::Ipc::Herd) (match on it for a worker
    /// that can run without one); [`ChannelError::BadFd`] when
    /// `HERD_IPC_FD` names no open descriptor.
    ///
    /// ```
    /// use herd::worker::{Channel, ChannelError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // Outside a cluster (as this doctest runs) there is no channel, and
    /// // the error says how to get one.
    /// match Channel::from_env() {
    ///     Ok(mut channel) => channel.ready().await.unwrap(),
    ///     Err(ChannelError::NotEnabled) => println!("running alone, no primary"),
    ///     Err(e) => panic!("{e}"),
    /// }
    /// # }
    /// ```
    pub fn from_env() -> Result<Channel, ChannelError> {
        let Ok(text) = std::env::var("HERD_IPC_FD") else {
            return Err(ChannelError::NotEnabled);
        };
        let fd: RawFd = text
            .parse()
            .map_err(|_| ChannelError::BadFd(text.clone()))?;
        let owned = sys::adopt_inherited_fd(fd).map_err(|_| ChannelError::BadFd(text.clone()))?;
        let mut std = std::os::unix::net::UnixStream::from(owned);
        // Online, written before the socket turns non-blocking: a few bytes
        // into an empty socket buffer never wait.
        std::io::Write::write_all(&mut std, &frame::encode_control(&Control::Online, false)?)?;
        std.set_nonblocking(true)?;
        let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Channel {
            stream: UnixStream::from_std(std)?,
            decoder: FrameDecoder::default(),
            codec: Codec::Json,
            buf: vec![0; 8192],
            out: Vec::new(),
            pending: VecDeque::new(),
            fds: VecDeque::new(),
            conns: VecDeque::new(),
            closed_tx,
            closed_rx: Some(closed_rx),
            seq: 0,
        })
    }

    /// Sends with `codec` from now on (JSON by default; postcard is compact,
    /// for Rust on both ends). Received frames carry their own codec.
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Tells the primary this worker is ready (an [`crate::Event::Ready`]).
    pub async fn ready(&mut self) -> Result<(), ChannelError> {
        self.out
            .extend(frame::encode_control(&Control::Ready, false)?);
        self.flush().await
    }

    /// Sends a message now (an [`crate::Event::Message`] in the primary).
    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), ChannelError> {
        self.feed(message)?;
        self.flush().await
    }

    /// Queues a message without writing it: many `feed`s then one [`flush`]
    /// cost one syscall. [`recv`] flushes first, so a request is never stuck.
    ///
    /// [`flush`]: Channel::flush
    /// [`recv`]: Channel::recv
    pub fn feed<T: Serialize>(&mut self, message: &T) -> Result<(), ChannelError> {
        frame::encode_into(&mut self.out, message, self.codec, 0)?;
        Ok(())
    }

    /// Writes every fed message.
    pub async fn flush(&mut self) -> Result<(), ChannelError> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// The next message from the primary, or `None` once the primary has
    /// closed the channel (it stopped, or it is gone).
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ChannelError> {
        // A descriptor sent along with a message is closed here.
        Ok(self.recv_with_fd().await?.map(|(message, _)| message))
    }

    /// The next message from the primary with the descriptor sent along
    /// with it, if any ([`crate::WorkerHandle::send_with_fd`]).
    pub async fn recv_with_fd<T: DeserializeOwned>(
        &mut self,
    ) -> Result<Option<(T, Option<OwnedFd>)>, ChannelError> {
        self.flush().await?;
        if let Some((frame, fd)) = self.pending.pop_front() {
            return Ok(Some((frame.decode()?, fd)));
        }
        loop {
            match self.next_frame().await? {
                Some((frame, fd)) if frame.is_control() => self.stash_control(frame, fd)?,
                Some((frame, fd)) => return Ok(Some((frame.decode()?, fd))),
                None => return Ok(None),
            }
        }
    }

    /// Closes the channel (Node's `process.disconnect()` in a worker): the
    /// primary reports [`crate::Event::Disconnected`] and sends nothing more.
    /// The process goes on; herd replaces it when it exits.
    pub async fn disconnect(mut self) -> Result<(), ChannelError> {
        self.flush().await?;
        self.stream.shutdown().await?;
        Ok(())
    }

    /// The next connection the primary hands this worker (round-robin
    /// balancing), or `None` once the channel is closed. Messages that arrive
    /// meanwhile wait for [`Channel::recv`]. Keep awaiting `accept` (serve
    /// each connection in a task of its own): while it waits it also tells
    /// the primary which connections have closed, for its least-connections
    /// picker.
    pub async fn accept(&mut self) -> Result<Option<Conn>, ChannelError> {
        loop {
            self.queue_closed(Vec::new())?;
            if let Some((id, fd)) = self.conns.pop_front() {
                // Tell the primary at once, before serving: until then it keeps
                // its own copy and would give the connection to another worker.
                self.out
                    .extend(frame::encode_control(&Control::Taken { id }, false)?);
                self.flush().await?;
                let std = std::net::TcpStream::from(fd);
                std.set_nonblocking(true)?;
                return Ok(Some(Conn {
                    stream: tokio::net::TcpStream::from_std(std)?,
                    id,
                    closed: self.closed_tx.clone(),
                }));
            }
            self.flush().await?;
            // Wait for a frame, or for a connection to close (report it).
            let mut closed_rx = self.closed_rx.take().expect("put back after each wait");
            let next = tokio::select! {
                next = self.next_frame() => Ok(next),
                Some(id) = closed_rx.recv() => Err(id),
            };
            self.closed_rx = Some(closed_rx);
            let next = match next {
                Ok(next) => next?,
                Err(id) => {
                    self.queue_closed(vec![id])?;
                    continue;
                }
            };
            match next {
                Some((frame, fd)) if frame.is_control() => self.stash_control(frame, fd)?,
                Some(pair) => self.pending.push_back(pair),
                None => return Ok(None),
            }
        }
    }

    /// Queues one report of `ids` and every connection closed since the
    /// last report.
    fn queue_closed(&mut self, mut ids: Vec<u64>) -> Result<(), ChannelError> {
        if let Some(rx) = self.closed_rx.as_mut() {
            while let Ok(id) = rx.try_recv() {
                ids.push(id);
            }
        }
        if !ids.is_empty() {
            self.out
                .extend(frame::encode_control(&Control::Closed { ids }, false)?);
        }
        Ok(())
    }

    /// Keeps a control frame nobody is waiting for: a connection is queued for
    /// [`Channel::accept`]; anything else is dropped (with its descriptor).
    fn stash_control(&mut self, frame: Frame, fd: Option<OwnedFd>) -> Result<(), ChannelError> {
        if let (Control::Conn { id }, Some(fd)) = (frame.decode::<Control>()?, fd) {
            self.conns.push_back((id, fd));
        }
        Ok(())
    }

    /// Asks the primary for a listening socket for `spec` (a listen spec as
    /// for `herd run -l`: `127.0.0.1:8000`, `unix:/run/app.sock`, …). The
    /// primary binds it once and hands every worker that asks the same socket
    /// (or, in reuseport mode, its slot's own). Node's `queryServer`.
    pub async fn listen(&mut self, spec: &str) -> Result<(OwnedFd, String), ChannelError> {
        self.seq += 1;
        let seq = self.seq;
        self.out.extend(frame::encode_control(
            &Control::Listen {
                seq,
                spec: spec.to_string(),
            },
            false,
        )?);
        self.flush().await?;
        loop {
            let Some((frame, fd)) = self.next_frame().await? else {
                return Err(ChannelError::Closed);
            };
            if !frame.is_control() {
                self.pending.push_back((frame, fd));
                continue;
            }
            if matches!(frame.decode::<Control>(), Ok(Control::Conn { .. })) {
                self.stash_control(frame, fd)?;
                continue;
            }
            match frame.decode::<Control>()? {
                Control::Listening { seq: s, address } if s == seq => {
                    let fd = fd.ok_or(ChannelError::Frame(FrameError::Malformed(
                        "listening reply without a socket".into(),
                    )))?;
                    return Ok((fd, address));
                }
                Control::ListenFailed { seq: s, error } if s == seq => {
                    return Err(ChannelError::Listen(error))
                }
                _ => {}
            }
        }
    }

    /// The next frame off the socket, with its descriptor if it announced one.
    async fn next_frame(&mut self) -> Result<Option<(Frame, Option<OwnedFd>)>, ChannelError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                let fd =
                    if frame.has_fd {
                        Some(self.fds.pop_front().ok_or(ChannelError::Frame(
                            FrameError::Malformed(
                                "a frame announced a descriptor that did not arrive".into(),
                            ),
                        ))?)
                    } else {
                        None
                    };
                return Ok(Some((frame, fd)));
            }
            let n = self.read_some().await?;
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
        }
    }

    /// One recvmsg: bytes into the decoder, descriptors into `fds`.
    async fn read_some(&mut self) -> Result<usize, ChannelError> {
        use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        use std::mem::MaybeUninit;
        use tokio::io::Interest;
        loop {
            self.stream.readable().await?;
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let stream = &self.stream;
            let buf = &mut self.buf;
            let got = stream.try_io(Interest::READABLE, || {
                recvmsg(
                    stream,
                    &mut [std::io::IoSliceMut::new(buf)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)
            });
            match got {
                Ok(msg) => {
                    for message in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(fds) = message {
                            self.fds.extend(fds);
                        }
                    }
                    let n = msg.bytes;
                    self.decoder.push(&self.buf[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A connection handed over by the primary ([`Channel::accept`]): a
/// [`tokio::net::TcpStream`] (through `Deref`, `AsyncRead` and `AsyncWrite`)
/// that tells the primary when it is dropped.
#[derive(Debug)]
pub struct Conn {
    stream: tokio::net::TcpStream,
    id: u64,
    closed: tokio::sync::mpsc::UnboundedSender<u64>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.closed.send(self.id);
    }
}

impl std::ops::Deref for Conn {
    type Target = tokio::net::TcpStream;
    fn deref(&self) -> &Self::Target {
        &self.stream
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.stream
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A TCP listener for `addr`: from the primary when this process is a herd
/// worker with a channel, bound by this process otherwise, so the same
/// server code runs standalone or in a cluster.
pub async fn listen_tcp(
    channel: Option<&mut Channel>,
    addr: &str,
) -> Result<tokio::net::TcpListener, ChannelError> {
    let Some(channel) = channel else {
        return Ok(tokio::net::TcpListener::bind(addr).await?);
    };
    let (fd, _) = channel.listen(addr).await?;
    let std = std::net::TcpListener::from(fd);
    std.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(std)?)
}

/// A Unix stream listener at `path`: from the primary in a cluster (spec
/// `unix:PATH`), bound here otherwise. See [`listen_tcp`].
pub async fn listen_unix(
    channel: Option<&mut Channel>,
    path: &str,
) -> Result<tokio::net::UnixListener, ChannelError> {
    let Some(channel) = channel else {
        return Ok(tokio::net::UnixListener::bind(path)?);
    };
    let (fd, _) = channel.listen(&format!("unix:{path}")).await?;
    let std = std::os::unix::net::UnixListener::from(fd);
    std.set_nonblocking(true)?;
    Ok(tokio::net::UnixListener::from_std(std)?)
}

/// A UDP socket bound to `addr`: from the primary in a cluster (spec
/// `udp:ADDR`), bound here otherwise. See [`listen_tcp`].
pub async fn listen_udp(
    channel: Option<&mut Channel>,
    addr: &str,
) -> Result<tokio::net::UdpSocket, ChannelError> {
    let Some(channel) = channel else {
        return Ok(tokio::net::UdpSocket::bind(addr).await?);
    };
    let (fd, _) = channel.listen(&format!("udp:{addr}")).await?;
    let std = std::net::UdpSocket::from(fd);
    std.set_nonblocking(true)?;
    Ok(tokio::net::UdpSocket::from_std(std)?)
}

/// Resolves when herd asks this worker to drain: the stop signal arrives
/// (on [`crate::ClusterHandle::disconnect`], a rolling replacement or the
/// cluster's stop). Call it early: the signal is caught from then on, so the
/// worker no longer dies of it and must exit once drained (herd sends
/// SIGKILL at the stop timeout). The stop signal is `HERD_STOP_SIGNAL`
/// (a number herd sets; SIGTERM when absent).
pub fn drain_requested() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let number = std::env::var("HERD_STOP_SIGNAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(libc::SIGTERM);
    let mut signal =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(number))?;
    Ok(async move {
        signal.recv().await;
    })
}

/// Sends `state` (sd_notify's `KEY=VALUE` lines, e.g. `"READY=1"`,
/// `"STATUS=warming caches"`) to the `NOTIFY_SOCKET` herd gave this worker,
/// as `sd_notify(3)` would. Returns `Ok(false)` when there is none (not
/// started by herd, or by a herd without notify sockets).
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    sock.send_to(state.as_bytes(), std::path::Path::new(&path))?;
    Ok(true)
}

/// The watchdog heartbeat (`WATCHDOG=1`): under `--watchdog`
/// (`ClusterConfig::watchdog`), a worker that sent one and then none for
/// that long is hung and replaced. Send it at least every half period
/// (`WATCHDOG_USEC` / 2), as systemd advises.
///
/// ```
/// // Outside a cluster there is no notify socket: nothing is sent.
/// assert!(!herd::worker::heartbeat().unwrap() || std::env::var_os("NOTIFY_SOCKET").is_some());
/// ```
pub fn heartbeat() -> std::io::Result<bool> {
    notify("WATCHDOG=1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_without_a_channel_is_told_how_to_get_one() {
        // The unit-test process was not started by a herd primary.
        if std::env::var_os("HERD_IPC_FD").is_some() {
            return;
        }
        let e = Channel::from_env().unwrap_err();
        assert!(matches!(e, ChannelError::NotEnabled));
        assert!(e.to_string().contains("`ipc = Ipc::Herd`"), "{e}");
    }
}
