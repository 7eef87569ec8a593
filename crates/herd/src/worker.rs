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
//!         let mut channel = herd::worker::Channel::from_env()?.expect("started by herd with Ipc::Herd");
//!         channel.ready().await?;
//!         while let Some(job) = channel.recv::<u64>().await? {
//!             channel.send(&(id, job * 2)).await?;
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::os::fd::RawFd;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::ipc::frame::{self, Codec, FrameDecoder, FrameError};
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
    /// `HERD_IPC_FD` is not a usable descriptor.
    #[error("HERD_IPC_FD={0:?} is not an open descriptor")]
    BadFd(String),
    /// The primary broke the protocol.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Reading or writing failed.
    #[error("IPC channel: {0}")]
    Io(#[from] std::io::Error),
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
}

impl Channel {
    /// The channel herd opened for this worker, or `None` when it has none
    /// (not a worker, or the cluster runs without [`crate::Ipc::Herd`]). Must
    /// be called inside a tokio runtime, once.
    pub fn from_env() -> Result<Option<Channel>, ChannelError> {
        let Ok(text) = std::env::var("HERD_IPC_FD") else {
            return Ok(None);
        };
        let fd: RawFd = text
            .parse()
            .map_err(|_| ChannelError::BadFd(text.clone()))?;
        let owned = sys::adopt_inherited_fd(fd).map_err(|_| ChannelError::BadFd(text.clone()))?;
        let std = std::os::unix::net::UnixStream::from(owned);
        std.set_nonblocking(true)?;
        Ok(Some(Channel {
            stream: UnixStream::from_std(std)?,
            decoder: FrameDecoder::default(),
            codec: Codec::Json,
            buf: vec![0; 8192],
            out: Vec::new(),
        }))
    }

    /// Sends with `codec` from now on (JSON by default; postcard is compact,
    /// for Rust on both ends). Received frames carry their own codec.
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Tells the primary this worker is ready (an [`crate::Event::Ready`]).
    pub async fn ready(&mut self) -> Result<(), ChannelError> {
        self.out.extend(frame::encode_control(&Control::Ready)?);
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
        self.out.extend(frame::encode(message, self.codec, false)?);
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
        self.flush().await?;
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame.decode()?));
            }
            let n = self.stream.read(&mut self.buf).await?;
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.decoder.push(&self.buf[..n]);
        }
    }
}
