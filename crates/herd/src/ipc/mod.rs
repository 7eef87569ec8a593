//! Talking to workers: wire formats and channels.
//!
//! Two wire formats, each a pure, incremental decoder (bytes in, messages out)
//! so the I/O around them stays trivial and the decoders can be fuzzed:
//!
//! * [`frame`] — herd's own: length-delimited frames carrying a serde message
//!   in JSON (default: inspectable, any language can speak it) or postcard
//!   (compact, opt-in).
//! * [`node`] — Node.js's IPC channel (`NODE_CHANNEL_FD`,
//!   `NODE_CHANNEL_SERIALIZATION_MODE=json`): one JSON value per line. This is
//!   what `process.send()` writes, so `process.send('ready')` from a Node worker
//!   reaches herd unchanged.
//!
//! Workers are less trusted than the primary: every decoder caps what it
//! buffers ([`MAX_MESSAGE`]) and reports malformed input as an error value,
//! never a panic. The supervisor disconnects a worker whose channel errs; other
//! workers never notice.

pub mod frame;
pub mod node;

/// The largest message accepted from a worker, in bytes (16 MiB).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// herd's own control messages (frames with the control flag), always JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Control {
    /// Worker → primary: the worker's program opened its channel.
    Online,
    /// Worker → primary: ready to serve.
    Ready,
    /// Worker → primary: give me a listening socket for `spec` (a listen
    /// spec as for `herd run -l`); Node's `queryServer`.
    Listen { seq: u64, spec: String },
    /// Primary → worker: here it is (the socket travels with this frame).
    Listening { seq: u64, address: String },
    /// Primary → worker: it could not be opened.
    ListenFailed { seq: u64, error: String },
    /// Primary → worker (round-robin): an accepted connection (attached).
    Conn { id: u64 },
    /// Worker → primary: connection `id` received; the primary lets go of it.
    Taken { id: u64 },
    /// Worker → primary: these connections are closed (least-connections).
    Closed { ids: Vec<u64> },
}
