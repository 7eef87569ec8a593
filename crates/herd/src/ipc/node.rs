//! Node.js's IPC wire format in `json` mode: `JSON.stringify(msg) + "\n"`.

use super::MAX_MESSAGE;

/// Why a Node IPC stream was rejected.
#[derive(Debug, thiserror::Error)]
pub enum NodeIpcError {
    /// A line grew past the limit without a newline.
    #[error("message longer than {max} bytes")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// A line was not valid JSON.
    #[error("malformed JSON message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The stream ended inside a message.
    #[error("channel closed in the middle of a message ({0} bytes)")]
    Truncated(usize),
}

/// A decoder's buffer bigger than this is released once it empties.
const SHRINK_ABOVE: usize = 1024 * 1024;

/// An incremental decoder of newline-delimited JSON.
#[derive(Debug)]
pub struct NodeDecoder {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already decoded, dropped in one move when
    /// more bytes arrive (not once per line).
    start: usize,
    /// Bytes of `buf` already searched for a newline (from `start`).
    scanned: usize,
    max: usize,
    /// Inside a line that was too long: discard up to its newline.
    skipping: bool,
}

impl Default for NodeDecoder {
    fn default() -> Self {
        NodeDecoder::new(MAX_MESSAGE)
    }
}

impl NodeDecoder {
    /// A decoder that rejects messages longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        NodeDecoder {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max,
            skipping: false,
        }
    }

    /// Appends bytes read from the channel.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
            // A big message's buffer is not kept for the life of the channel.
            if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
                self.buf = Vec::new();
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `None` if more bytes are needed.
    ///
    /// Errors are not fatal: a line over the limit is skipped up to its
    /// newline (without being buffered), a line that is not JSON is skipped,
    /// and the next call goes on with the line after it.
    pub fn next_message(&mut self) -> Result<Option<serde_json::Value>, NodeIpcError> {
        loop {
            let Some(nl) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len();
                if self.skipping || self.buf.len() - self.start > self.max {
                    // Drop what we have of the long line and skip the rest.
                    self.release();
                    if !std::mem::replace(&mut self.skipping, true) {
                        return Err(NodeIpcError::TooLong { max: self.max });
                    }
                }
                return Ok(None);
            };
            let end = self.scanned + nl;
            if self.skipping {
                self.skipping = false;
                self.start = end + 1;
                self.scanned = self.start;
                continue;
            }
            if end - self.start > self.max {
                self.start = end + 1;
                self.scanned = self.start;
                return Err(NodeIpcError::TooLong { max: self.max });
            }
            let line = &self.buf[self.start..end];
            self.start = end + 1;
            self.scanned = self.start;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let parsed = serde_json::from_slice(line);
            if self.start == self.buf.len() {
                self.release();
            }
            return Ok(Some(parsed?));
        }
    }

    /// Empties the buffer; a big one is freed, not kept for the life of the
    /// channel (a worker that sent one 60 MB message and went idle).
    fn release(&mut self) {
        if self.buf.capacity() > SHRINK_ABOVE {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        self.start = 0;
        self.scanned = 0;
    }

    /// Call at end of stream: an unfinished message is an error.
    pub fn finish(&self) -> Result<(), NodeIpcError> {
        let left = &self.buf[self.start..];
        if !self.skipping && left.iter().all(u8::is_ascii_whitespace) {
            Ok(())
        } else {
            Err(NodeIpcError::Truncated(left.len()))
        }
    }
}

/// Encodes one message as Node's `process.on('message')` expects it.
pub fn encode(message: &serde_json::Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(message).expect("a JSON value always serializes");
    out.push(b'\n');
    out
}

/// A message of Node's cluster protocol (`lib/internal/cluster/child.js`)
/// from a worker started with `NODE_UNIQUE_ID`, as the primary needs it.
/// Internal messages are those whose `cmd` starts with `NODE_`; they never
/// reach the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterMessage {
    /// `{act: 'online'}`: the worker's cluster module started.
    Online,
    /// `{act: 'queryServer'}`: `server.listen()` in the worker asks for a
    /// socket (answered with `ack: seq`).
    QueryServer {
        /// The worker's sequence number, echoed as `ack`.
        seq: u64,
        /// The host asked for; `None` for every interface.
        address: Option<String>,
        /// The port asked for (`None` with `fd`).
        port: Option<u16>,
        /// `udp4`/`udp6` for dgram sockets.
        udp: bool,
        /// `listen({fd})`: a descriptor the worker names.
        fd: Option<i32>,
        /// `listen(path)`: a Unix socket path (Node sends it as the address,
        /// made absolute, with port -1).
        path: Option<String>,
        /// How many servers this worker asked for the same address before
        /// (Node's `index`): a second `listen(0)` in one worker wants a new
        /// port, a second `listen(8000)` an `EADDRINUSE`.
        index: u64,
    },
    /// `{act: 'listening'}`: the worker's server is listening.
    Listening {
        /// The host it asked for, if any.
        address: Option<String>,
        /// The port it listens on.
        port: u16,
        /// The Unix socket path it listens on (`listen(path)`).
        path: Option<String>,
    },
    /// `{ack, accepted}`: the answer to a round-robin `newconn`.
    Accepted {
        /// The `seq` of the `newconn`: herd's connection id.
        id: u64,
        /// Whether the worker took it (false: its server has closed).
        accepted: bool,
    },
    /// `{act: 'close', key}`: the worker closed its server for `key` (the
    /// key herd's `queryServer` answer gave it).
    Close {
        /// The server's key.
        key: String,
    },
    /// Any other internal message (handle acks, …): nothing to do.
    Other,
}

impl ClusterMessage {
    /// Classifies `message`: `None` for an application message.
    pub fn parse(message: &serde_json::Value) -> Option<ClusterMessage> {
        let cmd = message.get("cmd")?.as_str()?;
        if !cmd.starts_with("NODE_") {
            return None;
        }
        if cmd != "NODE_CLUSTER" {
            return Some(ClusterMessage::Other);
        }
        let str_of = |k: &str| message.get(k).and_then(|v| v.as_str()).map(String::from);
        let u64_of = |k: &str| message.get(k).and_then(|v| v.as_u64());
        let port = u64_of("port").and_then(|p| u16::try_from(p).ok());
        // Node's own test for a pipe: a string address with a negative port.
        let path = message
            .get("port")
            .and_then(|p| p.as_i64())
            .filter(|p| *p < 0)
            .and_then(|_| str_of("address"))
            .filter(|a| !a.is_empty());
        Some(match str_of("act").as_deref() {
            Some("online") => ClusterMessage::Online,
            Some("queryServer") => match u64_of("seq") {
                Some(seq) => ClusterMessage::QueryServer {
                    seq,
                    address: str_of("address"),
                    port,
                    udp: str_of("addressType").is_some_and(|t| t.starts_with("udp")),
                    fd: message
                        .get("fd")
                        .and_then(|v| v.as_i64())
                        .and_then(|fd| i32::try_from(fd).ok())
                        .filter(|fd| *fd >= 0),
                    path,
                    index: u64_of("index").unwrap_or(0),
                },
                None => ClusterMessage::Other,
            },
            Some("close") => match str_of("key") {
                Some(key) => ClusterMessage::Close { key },
                None => ClusterMessage::Other,
            },
            Some("listening") => ClusterMessage::Listening {
                address: str_of("address"),
                port: port.unwrap_or(0),
                path,
            },
            None => match (u64_of("ack"), message.get("accepted")) {
                (Some(id), Some(accepted)) => ClusterMessage::Accepted {
                    id,
                    accepted: accepted.as_bool() == Some(true),
                },
                _ => ClusterMessage::Other,
            },
            Some(_) => ClusterMessage::Other,
        })
    }
}

/// Node's `(address, port)` as herd writes an address: `HOST:PORT`,
/// `[V6]:PORT`, or `:PORT` for every interface.
pub(crate) fn host_port(address: Option<&str>, port: u16) -> String {
    match address {
        None => format!(":{port}"),
        Some(h) if h.contains(':') => format!("[{h}]:{port}"),
        Some(h) => format!("{h}:{port}"),
    }
}

/// An internal cluster message for a Node worker: `fields` plus
/// `cmd: 'NODE_CLUSTER'` and `seq`. With `handle`, wrapped as Node sends a
/// message whose descriptor travels alongside (`NODE_HANDLE`, `net.Native`);
/// the descriptor must then go with the line's first byte, in a send of its
/// own (Node takes one handle per read).
pub(crate) fn encode_cluster(
    mut fields: serde_json::Map<String, serde_json::Value>,
    seq: u64,
    handle: bool,
) -> Vec<u8> {
    fields.insert("cmd".into(), "NODE_CLUSTER".into());
    fields.insert("seq".into(), seq.into());
    let msg = serde_json::Value::Object(fields);
    if handle {
        encode(&serde_json::json!({ "cmd": "NODE_HANDLE", "type": "net.Native", "msg": msg }))
    } else {
        encode(&msg)
    }
}

/// Node's round-robin `newconn` for server `key`, connection `id` (its
/// `seq`, which the worker's answer acks), wrapped for the descriptor that
/// travels with it. Written by hand: it is sent once per connection.
pub(crate) fn encode_newconn(key: &str, id: u64) -> Vec<u8> {
    let key = serde_json::Value::from(key);
    format!(
        "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":\
         {{\"act\":\"newconn\",\"key\":{key},\"cmd\":\"NODE_CLUSTER\",\"seq\":{id}}}}}\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn decodes_what_process_send_writes() {
        let mut d = NodeDecoder::default();
        d.push(b"\"ready\"\n{\"cmd\":\"NODE_CLUSTER\",\"seq\":1}\n{\"par");
        assert_eq!(d.next_message().unwrap(), Some(json!("ready")));
        assert_eq!(
            d.next_message().unwrap(),
            Some(json!({"cmd":"NODE_CLUSTER","seq":1}))
        );
        assert_eq!(d.next_message().unwrap(), None);
        assert!(d.finish().is_err());
        d.push(b"tial\":true}\n");
        assert_eq!(d.next_message().unwrap(), Some(json!({"partial": true})));
        assert!(d.finish().is_ok());
    }

    #[test]
    fn rejects_garbage_and_overlong_lines() {
        let mut d = NodeDecoder::default();
        d.push(b"{bad json\n");
        assert!(matches!(d.next_message(), Err(NodeIpcError::Malformed(_))));
        let mut d = NodeDecoder::new(8);
        d.push(b"\"123456789\"");
        assert!(matches!(
            d.next_message(),
            Err(NodeIpcError::TooLong { .. })
        ));
        let mut d = NodeDecoder::new(8);
        d.push(b"\"1234567890\"\n");
        assert!(matches!(
            d.next_message(),
            Err(NodeIpcError::TooLong { .. })
        ));
    }

    #[test]
    fn skips_bad_lines_and_goes_on() {
        // An over-long line arriving in pieces is skipped without being
        // buffered; garbage is skipped; what follows each is decoded.
        let mut d = NodeDecoder::new(16);
        d.push(b"\"ok1\"\n\"0123456789");
        assert_eq!(d.next_message().unwrap(), Some(json!("ok1")));
        assert_eq!(d.next_message().unwrap(), None);
        d.push(b"0123456789");
        assert!(matches!(
            d.next_message(),
            Err(NodeIpcError::TooLong { .. })
        ));
        for _ in 0..100 {
            d.push(&[b'x'; 1000]);
            assert_eq!(d.next_message().unwrap(), None);
            assert!(d.buf.len() < 1000, "a skipped line is not buffered");
        }
        d.push(b"tail\"\n{bad\n\"ok2\"\n");
        assert!(matches!(d.next_message(), Err(NodeIpcError::Malformed(_))));
        assert_eq!(d.next_message().unwrap(), Some(json!("ok2")));
        assert!(d.finish().is_ok());
        // A whole over-long line in one read.
        d.push(b"\"01234567890123456789\"\n\"ok3\"\n");
        assert!(matches!(
            d.next_message(),
            Err(NodeIpcError::TooLong { .. })
        ));
        assert_eq!(d.next_message().unwrap(), Some(json!("ok3")));
    }

    #[test]
    fn a_big_message_s_buffer_is_released_once_decoded() {
        let mut d = NodeDecoder::default();
        let mut line = vec![b'"'];
        line.extend(std::iter::repeat_n(b'a', 4 << 20));
        line.extend(b"\"\n");
        d.push(&line);
        assert!(d.next_message().unwrap().is_some());
        assert!(
            d.buf.capacity() <= SHRINK_ABOVE,
            "an idle worker's decoder keeps {} bytes",
            d.buf.capacity()
        );
    }

    #[test]
    fn parses_what_nodes_cluster_worker_sends() {
        let parse = |v: serde_json::Value| ClusterMessage::parse(&v);
        assert_eq!(parse(json!("ready")), None);
        assert_eq!(parse(json!({"cmd": "mine"})), None);
        assert_eq!(
            parse(json!({"cmd":"NODE_CLUSTER","act":"online","seq":0})),
            Some(ClusterMessage::Online)
        );
        assert_eq!(
            parse(
                json!({"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,
                         "address":"127.0.0.1","port":8000,"addressType":4,"flags":0,"seq":1})
            ),
            Some(ClusterMessage::QueryServer {
                seq: 1,
                address: Some("127.0.0.1".into()),
                port: Some(8000),
                udp: false,
                fd: None,
                path: None,
                index: 0
            })
        );
        assert_eq!(
            parse(
                json!({"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,
                         "address":"/run/app.sock","port":-1,"addressType":-1,"seq":4})
            ),
            Some(ClusterMessage::QueryServer {
                seq: 4,
                address: Some("/run/app.sock".into()),
                port: None,
                udp: false,
                fd: None,
                path: Some("/run/app.sock".into()),
                index: 0
            })
        );
        assert_eq!(
            parse(
                json!({"cmd":"NODE_CLUSTER","act":"queryServer","address":null,"port":null,
                         "addressType":null,"fd":3,"seq":2})
            ),
            Some(ClusterMessage::QueryServer {
                seq: 2,
                address: None,
                port: None,
                udp: false,
                fd: Some(3),
                path: None,
                index: 0
            })
        );
        assert_eq!(
            parse(json!({"cmd":"NODE_CLUSTER","ack":7,"accepted":true,"seq":3})),
            Some(ClusterMessage::Accepted {
                id: 7,
                accepted: true
            })
        );
        assert_eq!(
            parse(json!({"cmd":"NODE_CLUSTER","act":"queryServer","port":99999})),
            Some(ClusterMessage::Other),
            "no seq: nothing to answer"
        );
        assert_eq!(
            parse(json!({"cmd":"NODE_HANDLE_ACK"})),
            Some(ClusterMessage::Other)
        );
        assert_eq!(
            parse(json!({"cmd":"NODE_CLUSTER","act":"close","key":"127.0.0.1:9000","seq":4})),
            Some(ClusterMessage::Close {
                key: "127.0.0.1:9000".into()
            })
        );
    }

    #[test]
    fn wraps_handles_as_node_does() {
        let mut fields = serde_json::Map::new();
        fields.insert("act".into(), "newconn".into());
        let line = encode_cluster(fields, 5, true);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"cmd":"NODE_HANDLE","type":"net.Native",
                   "msg":{"cmd":"NODE_CLUSTER","act":"newconn","seq":5}})
        );
        assert_eq!(line.last(), Some(&b'\n'));
    }

    #[test]
    fn newconn_is_what_node_sends() {
        let line = encode_newconn("127.0.0.1:80\"x", 9);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"cmd":"NODE_HANDLE","type":"net.Native",
                   "msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"127.0.0.1:80\"x","seq":9}})
        );
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
    }

    proptest! {
        #[test]
        fn round_trips_in_any_chunking(
            values in proptest::collection::vec(any::<(String, i64, bool)>(), 0..20),
            cut in 1usize..64,
        ) {
            let messages: Vec<serde_json::Value> =
                values.iter().map(|(s, n, b)| json!({"s": s, "n": n, "b": b})).collect();
            let wire: Vec<u8> = messages.iter().flat_map(encode).collect();
            let mut d = NodeDecoder::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                d.push(chunk);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            prop_assert!(d.finish().is_ok());
            prop_assert_eq!(got, messages);
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = NodeDecoder::new(64);
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_message() {}
        }
    }
}
