//! The cluster's event stream: bounded, so a program that stops reading
//! never grows the primary's memory nor stalls its supervision.
//!
//! The queue holds at most [`ClusterConfig::event_queue`](crate::ClusterConfig::event_queue)
//! events and [`ClusterConfig::event_queue_bytes`](crate::ClusterConfig::event_queue_bytes)
//! bytes of message payload. The supervisor never waits to deliver one:
//!
//! * **Messages are back-pressured.** While the queue has no room, the
//!   supervisor stops taking what workers send ([`EventSender::has_room`]):
//!   their messages wait in their channels, and a worker that keeps sending
//!   blocks on its own socket, as on a full pipe. Nothing is lost while the
//!   program reads, however bursty the workers.
//! * **Everything else is dropped and counted** when it does not fit (and
//!   the messages of a worker that exits while the queue is full): the next
//!   event that fits is preceded by [`Event::Lagged`] with the count (the
//!   convention of tokio's broadcast channel).
//!
//! Nobody listening (the receiver dropped, or [`Cluster::run`](crate::Cluster::run),
//! which never asks for events) costs nothing at all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};
use tracing::warn;

use crate::cluster::Event;

/// The receiving end of a cluster's events ([`Cluster::start`](crate::Cluster::start)).
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
    queued_bytes: Arc<AtomicUsize>,
    /// Wakes the supervisor when a read makes room.
    room: Arc<Notify>,
}

impl Events {
    /// The next event; `None` once the cluster has finished and every
    /// event was read.
    pub async fn recv(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        self.taken(&event);
        Some(event)
    }

    /// The next event if one is queued now.
    pub fn try_recv(&mut self) -> Result<Event, mpsc::error::TryRecvError> {
        let event = self.rx.try_recv()?;
        self.taken(&event);
        Ok(event)
    }

    fn taken(&self, event: &Event) {
        self.queued_bytes
            .fetch_sub(payload_len(event), Ordering::Relaxed);
        self.room.notify_one();
    }
}

/// The supervisor's end: never blocks, never grows past its bounds.
pub(crate) struct EventSender {
    tx: Option<mpsc::Sender<Event>>,
    queued_bytes: Arc<AtomicUsize>,
    room: Arc<Notify>,
    max_bytes: usize,
    /// Dropped since the last `Lagged` got through.
    dropped: u64,
}

impl EventSender {
    /// A bounded queue of `capacity` events and `max_bytes` of payload.
    pub(crate) fn bounded(capacity: usize, max_bytes: usize) -> (EventSender, Events) {
        let (tx, rx) = mpsc::channel(capacity.max(2));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let room = Arc::new(Notify::new());
        (
            EventSender {
                tx: Some(tx),
                queued_bytes: queued_bytes.clone(),
                room: room.clone(),
                max_bytes,
                dropped: 0,
            },
            Events {
                rx,
                queued_bytes,
                room,
            },
        )
    }

    /// Nobody asked for events: every send is a no-op.
    pub(crate) fn none() -> EventSender {
        EventSender {
            tx: None,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            room: Arc::new(Notify::new()),
            max_bytes: 0,
            dropped: 0,
        }
    }

    /// Whether a message event of `len` payload bytes would be queued now
    /// (always, when nobody listens). A message bigger than the byte budget
    /// fits an empty queue, so every message can get through eventually.
    pub(crate) fn has_room(&self, len: usize) -> bool {
        let Some(tx) = &self.tx else { return true };
        if tx.is_closed() {
            return true;
        }
        // A pending `Lagged` notice needs a slot of its own.
        let slots = tx.capacity() > usize::from(self.dropped > 0);
        let queued = self.queued_bytes.load(Ordering::Relaxed);
        slots && (queued == 0 || queued + len <= self.max_bytes)
    }

    /// Resolves when a read may have made room (check [`has_room`](Self::has_room)).
    pub(crate) async fn room(&self) {
        self.room.notified().await
    }

    /// Queues `event`, or drops and counts it if the queue is full.
    pub(crate) fn send(&mut self, event: Event) {
        let Some(tx) = &self.tx else { return };
        if tx.is_closed() {
            self.tx = None; // the receiver is gone: stop trying
            return;
        }
        if self.dropped > 0 {
            match tx.try_reserve() {
                Ok(permit) => {
                    permit.send(Event::Lagged {
                        dropped: self.dropped,
                    });
                    self.dropped = 0;
                }
                Err(_) => {
                    self.dropped += 1;
                    return;
                }
            }
        }
        let len = payload_len(&event);
        let queued = self.queued_bytes.load(Ordering::Relaxed);
        if len > 0 && queued > 0 && queued + len > self.max_bytes {
            self.drop_one();
            return;
        }
        match tx.try_send(event) {
            Ok(()) => {
                self.queued_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => self.drop_one(),
            Err(mpsc::error::TrySendError::Closed(_)) => self.tx = None,
        }
    }

    fn drop_one(&mut self) {
        if self.dropped == 0 {
            warn!(
                "the event queue is full (nobody is reading it); dropping events until it drains"
            );
        }
        self.dropped += 1;
    }
}

/// The bytes an event holds beyond its fixed size (a message's payload).
fn payload_len(event: &Event) -> usize {
    match event {
        Event::Message { message, .. } => message.bytes().len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Message;
    use crate::ipc::frame::Codec;

    fn message(len: usize) -> Event {
        Event::Message {
            slot: 0,
            pid: 1,
            message: Message::new(Codec::Json, vec![b'x'; len]),
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_counts_and_says_so() {
        let (mut tx, mut rx) = EventSender::bounded(4, 1 << 20);
        for pid in 0..10 {
            tx.send(Event::Spawned { slot: 0, pid });
        }
        for pid in 0..4 {
            assert!(matches!(rx.recv().await, Some(Event::Spawned { pid: p, .. }) if p == pid));
        }
        tx.send(Event::Spawned { slot: 0, pid: 99 });
        assert!(matches!(
            rx.recv().await,
            Some(Event::Lagged { dropped: 6 })
        ));
        assert!(matches!(
            rx.recv().await,
            Some(Event::Spawned { pid: 99, .. })
        ));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn payload_bytes_are_bounded_and_released_on_read() {
        let (mut tx, mut rx) = EventSender::bounded(1000, 100);
        assert!(tx.has_room(60));
        tx.send(message(60));
        assert!(!tx.has_room(60), "over the byte budget");
        tx.send(message(60)); // over the byte budget: dropped
        assert!(matches!(rx.recv().await, Some(Event::Message { .. })));
        assert!(tx.has_room(60));
        tx.send(message(60)); // room again
        assert!(matches!(
            rx.recv().await,
            Some(Event::Lagged { dropped: 1 })
        ));
        assert!(matches!(rx.recv().await, Some(Event::Message { .. })));
        assert_eq!(rx.queued_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_message_bigger_than_the_budget_fits_an_empty_queue() {
        let (mut tx, mut rx) = EventSender::bounded(10, 100);
        assert!(tx.has_room(500));
        tx.send(message(500));
        assert!(!tx.has_room(1));
        assert!(matches!(rx.recv().await, Some(Event::Message { .. })));
        assert!(tx.has_room(500));
    }

    #[tokio::test]
    async fn a_read_wakes_the_sender_waiting_for_room() {
        let (mut tx, mut rx) = EventSender::bounded(2, 1 << 20);
        tx.send(Event::Spawned { slot: 0, pid: 1 });
        assert!(tx.has_room(0));
        tx.send(Event::Spawned { slot: 0, pid: 2 });
        assert!(!tx.has_room(0));
        let waiting = tokio::spawn(async move {
            tx.room().await;
            tx.has_room(0)
        });
        tokio::task::yield_now().await;
        assert!(rx.recv().await.is_some());
        assert!(waiting.await.unwrap());
    }

    #[test]
    fn a_dropped_receiver_costs_nothing() {
        let (mut tx, rx) = EventSender::bounded(4, 100);
        drop(rx);
        for pid in 0..100 {
            tx.send(Event::Spawned { slot: 0, pid });
        }
        assert!(tx.tx.is_none());
        let mut none = EventSender::none();
        none.send(message(10));
    }
}
