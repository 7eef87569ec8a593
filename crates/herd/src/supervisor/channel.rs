//! A worker's IPC channel as the supervisor sees it: a reader task that
//! decodes either wire format into typed events, and a writer task that
//! coalesces queued frames and passes descriptors.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::cluster::Message;
use crate::ipc::frame::{Codec, FrameDecoder};
use crate::ipc::node::{ClusterMessage, NodeDecoder};
use crate::ipc::Control;

/// What a worker's IPC reader task reports.
#[derive(Debug)]
pub(super) enum ChannelEvent {
    /// The worker's program opened its channel.
    Online,
    /// The worker said it is ready.
    Ready,
    /// An application message.
    Message(Message),
    /// The worker asks for a listening socket.
    Listen { seq: u64, spec: String },
    /// The worker took a round-robin connection.
    Taken { id: u64 },
    /// The worker closed this many round-robin connections.
    ConnsClosed(usize),
    /// A Node worker refused a round-robin connection (its server closed).
    Refused { id: u64 },
    /// A Node worker's `server.listen()`.
    NodeQuery(NodeQuery),
    /// A Node worker closed its server for this key.
    NodeClose { key: String },
    /// A Node worker's server is listening on this address.
    NodeListening {
        address: Option<String>,
        port: u16,
        path: Option<String>,
    },
    /// The worker sent something that is not a message (over the size
    /// limit, not JSON, a bad frame): it was skipped; the channel stays open.
    Skipped(String),
    /// The worker closed its end (or exited).
    Closed,
}

/// What a worker's writer task is given.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A frame, with a descriptor to pass along it, if any.
    /// The descriptor is shared: the writer passes it and drops its
    /// reference; the primary may keep one (a round-robin connection it
    /// holds until the worker takes it) without a dup.
    Frame {
        bytes: Vec<u8>,
        fd: Option<Arc<OwnedFd>>,
    },
    /// Close the channel once everything queued before is written. Sent by
    /// the supervisor only: handles hold senders too, so dropping the
    /// supervisor's would not end the writer.
    Close,
}

/// A Node worker's `queryServer`.
#[derive(Debug)]
pub(super) struct NodeQuery {
    pub(super) seq: u64,
    pub(super) address: Option<String>,
    pub(super) port: Option<u16>,
    pub(super) udp: bool,
    pub(super) fd: Option<i32>,
    pub(super) path: Option<String>,
    pub(super) index: u64,
}

/// A wire format as the supervisor reads it: bytes in, channel events out.
pub(super) trait WireDecoder {
    /// A decoder that skips messages longer than `max` bytes.
    fn with_max(max: usize) -> Self;
    fn push(&mut self, bytes: &[u8]);
    /// The next event, `None` when more bytes are needed.
    fn next_event(&mut self) -> Option<ChannelEvent>;
    /// At EOF: an error if a message was cut off.
    fn finish(&self) -> Result<(), String>;
}

impl WireDecoder for NodeDecoder {
    fn with_max(max: usize) -> Self {
        NodeDecoder::new(max)
    }
    fn push(&mut self, bytes: &[u8]) {
        NodeDecoder::push(self, bytes)
    }
    fn next_event(&mut self) -> Option<ChannelEvent> {
        loop {
            let message = match self.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(e) => return Some(ChannelEvent::Skipped(e.to_string())),
            };
            if message.as_str() == Some("ready") {
                return Some(ChannelEvent::Ready);
            }
            let Some(internal) = ClusterMessage::parse(&message) else {
                return Some(ChannelEvent::Message(Message::new(
                    Codec::Json,
                    serde_json::to_vec(&message).unwrap_or_default(),
                )));
            };
            return Some(match internal {
                ClusterMessage::Online => ChannelEvent::Online,
                ClusterMessage::QueryServer {
                    seq,
                    address,
                    port,
                    udp,
                    fd,
                    path,
                    index,
                } => ChannelEvent::NodeQuery(NodeQuery {
                    seq,
                    address,
                    port,
                    udp,
                    fd,
                    path,
                    index,
                }),
                ClusterMessage::Close { key } => ChannelEvent::NodeClose { key },
                ClusterMessage::Listening {
                    address,
                    port,
                    path,
                } => ChannelEvent::NodeListening {
                    address,
                    port,
                    path,
                },
                ClusterMessage::Accepted { id, accepted: true } => ChannelEvent::Taken { id },
                ClusterMessage::Accepted {
                    id,
                    accepted: false,
                } => ChannelEvent::Refused { id },
                ClusterMessage::Other => continue,
            });
        }
    }
    fn finish(&self) -> Result<(), String> {
        NodeDecoder::finish(self).map_err(|e| e.to_string())
    }
}

impl WireDecoder for FrameDecoder {
    fn with_max(max: usize) -> Self {
        FrameDecoder::new(max)
    }
    fn push(&mut self, bytes: &[u8]) {
        FrameDecoder::push(self, bytes)
    }
    fn next_event(&mut self) -> Option<ChannelEvent> {
        Some(match self.next_frame() {
            Ok(Some(frame)) if frame.is_control() => match frame.decode::<Control>() {
                Ok(Control::Ready) => ChannelEvent::Ready,
                Ok(Control::Online) => ChannelEvent::Online,
                Ok(Control::Listen { seq, spec }) => ChannelEvent::Listen { seq, spec },
                Ok(Control::Taken { id }) => ChannelEvent::Taken { id },
                Ok(Control::Closed { ids }) => ChannelEvent::ConnsClosed(ids.len()),
                Ok(other) => ChannelEvent::Skipped(format!("unexpected {other:?}")),
                Err(e) => ChannelEvent::Skipped(e.to_string()),
            },
            Ok(Some(frame)) => ChannelEvent::Message(Message::new(frame.codec, frame.payload)),
            Ok(None) => return None,
            Err(e) => ChannelEvent::Skipped(e.to_string()),
        })
    }
    fn finish(&self) -> Result<(), String> {
        FrameDecoder::finish(self).map_err(|e| e.to_string())
    }
}

/// What the readers send the supervisor: one read's events from one worker,
/// with the share of the readers' byte budget its messages hold (released
/// when the supervisor is done with the batch).
pub(super) struct Batch {
    pub(super) slot: usize,
    pub(super) pid: u32,
    pub(super) events: Vec<ChannelEvent>,
    pub(super) budget: Option<OwnedSemaphorePermit>,
}

/// The most message bytes all readers together may have queued for the
/// supervisor; a bigger single message takes all of it. A worker sending
/// big messages faster than the supervisor handles them waits on its own
/// socket instead of growing the primary.
pub(super) const READ_BUDGET: usize = 4 * 1024 * 1024;

/// Reads a worker's IPC channel in wire format `D` until EOF, sending what
/// it decodes to the supervisor. The queue to the supervisor is bounded: a
/// worker that writes faster than the supervisor handles its messages waits
/// (its socket buffer fills, its writes block) instead of growing the
/// primary's memory.
pub(super) async fn read_channel<D: WireDecoder>(
    mut read: OwnedReadHalf,
    slot: usize,
    pid: u32,
    max_message: usize,
    tx: mpsc::Sender<Batch>,
    budget: Arc<Semaphore>,
    // Dropped on return: tells the exit watcher everything was passed on.
    _done: oneshot::Sender<()>,
) {
    let mut decoder = D::with_max(max_message);
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match read.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let mut last = Vec::new();
                if let Err(e) = decoder.finish() {
                    last.push(ChannelEvent::Skipped(e));
                }
                last.push(ChannelEvent::Closed);
                let _ = tx
                    .send(Batch {
                        slot,
                        pid,
                        events: last,
                        budget: None,
                    })
                    .await;
                return;
            }
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        // One send per read, not per message: a burst of small messages
        // costs the supervisor one queue operation.
        let mut events = Vec::new();
        while let Some(event) = decoder.next_event() {
            events.push(event);
        }
        if events.is_empty() {
            continue;
        }
        let bytes: usize = events
            .iter()
            .map(|e| match e {
                ChannelEvent::Message(m) => m.bytes().len(),
                _ => 0,
            })
            .sum();
        let budget = match bytes.min(READ_BUDGET) {
            0 => None,
            n => match budget.clone().acquire_many_owned(n as u32).await {
                Ok(permit) => Some(permit),
                Err(_) => return,
            },
        };
        let batch = Batch {
            slot,
            pid,
            events,
            budget,
        };
        if tx.send(batch).await.is_err() {
            return;
        }
    }
}

/// Writes queued frames to a worker's channel; ends (closing the channel) when
/// the supervisor drops the queue's sender or the worker stops reading.
pub(super) async fn write_channel(
    mut write: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
) {
    use tokio::io::AsyncWriteExt;
    // Coalesce whatever is queued into one write (one syscall for a burst);
    // a frame with a descriptor goes alone, the descriptor on its first byte.
    const BATCH: usize = 256 * 1024;
    let mut held: Option<Outgoing> = None;
    loop {
        let first = match held.take() {
            Some(o) => o,
            None => match queue.recv().await {
                Some(o) => o,
                None => return,
            },
        };
        let result = match first {
            Outgoing::Close => return,
            Outgoing::Frame {
                bytes,
                fd: Some(fd),
            } => send_with_fd(&mut write, &bytes, fd).await,
            Outgoing::Frame { bytes, fd: None } => {
                let mut batch = bytes;
                while batch.len() < BATCH {
                    match queue.try_recv() {
                        Ok(Outgoing::Frame { bytes, fd: None }) => batch.extend_from_slice(&bytes),
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                write.write_all(&batch).await
            }
        };
        if result.is_err() {
            return;
        }
    }
}

/// Writes `bytes` with `fd` attached (SCM_RIGHTS) to the first chunk.
async fn send_with_fd(
    write: &mut OwnedWriteHalf,
    bytes: &[u8],
    fd: Arc<OwnedFd>,
) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::mem::MaybeUninit;
    use tokio::io::{AsyncWriteExt, Interest};
    let sent = {
        let stream: &tokio::net::UnixStream = write.as_ref();
        loop {
            stream.writable().await?;
            let fds = [fd.as_fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            match stream.try_io(Interest::WRITABLE, || {
                sendmsg(
                    stream,
                    &[std::io::IoSlice::new(bytes)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(std::io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    };
    write.write_all(&bytes[sent..]).await
}

pub(super) fn encode_control(control: &Control, has_fd: bool) -> Vec<u8> {
    crate::ipc::frame::encode_control(control, has_fd).expect("control messages always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::frame;
    use tokio::io::AsyncWriteExt;

    async fn events_for(bytes: &[u8]) -> Vec<ChannelEvent> {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let (read, _write) = ours.into_split();
        let (tx, mut rx) = mpsc::channel(1000);
        let (done, _) = oneshot::channel();
        let reader = tokio::spawn(read_channel::<FrameDecoder>(
            read,
            0,
            42,
            crate::ipc::MAX_MESSAGE,
            tx,
            Arc::new(Semaphore::new(READ_BUDGET)),
            done,
        ));
        theirs.write_all(bytes).await.unwrap();
        drop(theirs);
        reader.await.unwrap();
        let mut out = Vec::new();
        while let Ok(batch) = rx.try_recv() {
            assert_eq!((batch.slot, batch.pid), (0, 42));
            out.extend(batch.events);
        }
        out
    }

    #[tokio::test]
    async fn herd_channel_reports_ready_messages_and_skips_garbage() {
        let mut wire = frame::encode_control(&Control::Ready, false).unwrap();
        wire.extend(frame::encode(&"hi", Codec::Postcard, false).unwrap());
        wire.extend([0, 0, 0, 2, 0x80, b'x', b'y']); // unknown flag
        wire.extend(frame::encode(&"read after it", Codec::Json, false).unwrap());
        let events = events_for(&wire).await;
        assert!(matches!(events[0], ChannelEvent::Ready));
        match &events[1] {
            ChannelEvent::Message(m) => assert_eq!(m.decode::<String>().unwrap(), "hi"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(&events[2], ChannelEvent::Skipped(why) if why.contains("flags")));
        match &events[3] {
            ChannelEvent::Message(m) => assert_eq!(m.decode::<String>().unwrap(), "read after it"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(events[4], ChannelEvent::Closed));
        assert_eq!(events.len(), 5);
    }

    #[tokio::test]
    async fn herd_channel_reports_a_truncated_frame_and_bad_control() {
        let events = events_for(&[0, 0, 0, 9, 0, b'{']).await;
        assert!(
            matches!(&events[..], [ChannelEvent::Skipped(why), ChannelEvent::Closed] if why.contains("middle of a frame"))
        );
        let bad_control = frame::encode_control(&"launch", false).unwrap();
        let events = events_for(&bad_control).await;
        assert!(matches!(
            &events[..],
            [ChannelEvent::Skipped(_), ChannelEvent::Closed]
        ));
    }
}
