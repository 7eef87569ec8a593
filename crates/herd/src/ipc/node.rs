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
        }
    }

    /// Appends bytes read from the channel.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `None` if more bytes are needed. After an
    /// error the stream is unusable: disconnect the peer.
    pub fn next_message(&mut self) -> Result<Option<serde_json::Value>, NodeIpcError> {
        loop {
            let Some(nl) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() - self.start > self.max {
                    return Err(NodeIpcError::TooLong { max: self.max });
                }
                return Ok(None);
            };
            let end = self.scanned + nl;
            if end - self.start > self.max {
                return Err(NodeIpcError::TooLong { max: self.max });
            }
            let line = &self.buf[self.start..end];
            self.start = end + 1;
            self.scanned = self.start;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Ok(Some(serde_json::from_slice(line)?));
        }
    }

    /// Call at end of stream: an unfinished message is an error.
    pub fn finish(&self) -> Result<(), NodeIpcError> {
        let left = &self.buf[self.start..];
        if left.iter().all(u8::is_ascii_whitespace) {
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
