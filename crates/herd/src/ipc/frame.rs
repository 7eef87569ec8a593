//! herd's frame format: `len: u32 BE | flags: u8 | payload[len]`.
//!
//! `flags` bit 0: a file descriptor travels with this frame (SCM_RIGHTS on
//! the frame's first byte); bits 1-2: the payload codec (0 = JSON,
//! 1 = postcard); bit 3: a herd control message rather than an application
//! message. Other bits must be zero.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::MAX_MESSAGE;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 5;
/// Flag: a descriptor accompanies the frame.
pub const FLAG_FD: u8 = 1;
const CODEC_SHIFT: u8 = 1;
const CODEC_MASK: u8 = 0b110;
/// Flag: a herd control message (ready, …), not an application message.
pub const FLAG_CONTROL: u8 = 1 << 3;
const KNOWN_FLAGS: u8 = FLAG_FD | CODEC_MASK | FLAG_CONTROL;

/// How a payload is serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// serde_json: inspectable, cross-language. The default.
    #[default]
    Json,
    /// postcard: compact and fast, Rust on both ends.
    Postcard,
}

impl Codec {
    fn bits(self) -> u8 {
        match self {
            Codec::Json => 0,
            Codec::Postcard => 1 << CODEC_SHIFT,
        }
    }
}

/// Why a frame stream or payload was rejected.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announced more than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLong {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Unknown flag bits or codec.
    #[error("unknown frame flags {0:#04x}")]
    BadFlags(u8),
    /// The payload did not decode as the expected type.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("channel closed in the middle of a frame ({0} bytes)")]
    Truncated(usize),
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Whether a descriptor accompanies it.
    pub has_fd: bool,
    /// Whether it is a herd control message.
    pub control: bool,
    /// The payload codec.
    pub codec: Codec,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Whether it is a herd control message.
    pub fn is_control(&self) -> bool {
        self.control
    }

    /// Deserializes the payload.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        decode_payload(self.codec, &self.payload)
    }
}

/// Deserializes a payload written with `codec`.
pub fn decode_payload<T: DeserializeOwned>(codec: Codec, payload: &[u8]) -> Result<T, FrameError> {
    match codec {
        Codec::Json => {
            serde_json::from_slice(payload).map_err(|e| FrameError::Malformed(e.to_string()))
        }
        Codec::Postcard => {
            postcard::from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))
        }
    }
}

/// Serializes `message` as one application frame.
pub fn encode<T: Serialize>(
    message: &T,
    codec: Codec,
    has_fd: bool,
) -> Result<Vec<u8>, FrameError> {
    encode_with(message, codec, if has_fd { FLAG_FD } else { 0 })
}

/// Serializes a herd control message (JSON, control flag set), announcing a
/// descriptor when `has_fd`.
pub(crate) fn encode_control<T: Serialize>(
    message: &T,
    has_fd: bool,
) -> Result<Vec<u8>, FrameError> {
    encode_with(
        message,
        Codec::Json,
        FLAG_CONTROL | if has_fd { FLAG_FD } else { 0 },
    )
}

fn encode_with<T: Serialize>(message: &T, codec: Codec, flags: u8) -> Result<Vec<u8>, FrameError> {
    // Room for a typical small message up front: growing from empty costs
    // several reallocations per frame.
    let mut out = Vec::with_capacity(256);
    encode_into(&mut out, message, codec, flags)?;
    Ok(out)
}

/// Appends one frame of `message` to `out` (left as it was on error).
pub(crate) fn encode_into<T: Serialize>(
    out: &mut Vec<u8>,
    message: &T,
    codec: Codec,
    flags: u8,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let written = match codec {
        Codec::Json => serde_json::to_writer(&mut *out, message)
            .map_err(|e| FrameError::Malformed(e.to_string())),
        Codec::Postcard => {
            let taken = std::mem::take(out);
            match postcard::to_extend(message, taken) {
                Ok(v) => {
                    *out = v;
                    Ok(())
                }
                Err(e) => Err(FrameError::Malformed(e.to_string())),
            }
        }
    };
    let len = out.len().saturating_sub(start + HEADER_LEN);
    let result = match written {
        Ok(()) if len > MAX_MESSAGE => Err(FrameError::TooLong {
            len,
            max: MAX_MESSAGE,
        }),
        other => other,
    };
    if let Err(e) = result {
        out.truncate(start);
        return Err(e);
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    out[start + 4] = codec.bits() | flags;
    Ok(())
}

/// A decoder's buffer bigger than this is released once it empties.
const SHRINK_ABOVE: usize = 1024 * 1024;

/// An incremental frame decoder.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already decoded. They are dropped in one
    /// move when more bytes arrive, not one frame at a time: a read of many
    /// small frames would otherwise shift the buffer once per frame.
    start: usize,
    max: usize,
    /// Bytes of a rejected frame still to be discarded as they arrive.
    skip: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(MAX_MESSAGE)
    }
}

impl FrameDecoder {
    /// A decoder that rejects frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max,
            skip: 0,
        }
    }

    /// Appends bytes read from the channel.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if self.skip > 0 {
            let n = self.skip.min(bytes.len());
            self.skip -= n;
            bytes = &bytes[n..];
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
            // A big frame's buffer is not kept for the life of the channel.
            if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
                self.buf = Vec::new();
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `None` if more bytes are needed.
    ///
    /// A frame longer than the limit or with unknown flags is an error, but
    /// not a fatal one: the length prefix still frames the stream, so the
    /// frame is skipped (without being buffered) and the next call goes on
    /// with the frame after it.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let buf = &self.buf[self.start..];
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let flags = buf[4];
        let codec = match (flags & CODEC_MASK) >> CODEC_SHIFT {
            _ if len > self.max => Err(FrameError::TooLong { len, max: self.max }),
            _ if flags & !KNOWN_FLAGS != 0 => Err(FrameError::BadFlags(flags)),
            0 => Ok(Codec::Json),
            1 => Ok(Codec::Postcard),
            _ => Err(FrameError::BadFlags(flags)),
        };
        let codec = match codec {
            Ok(codec) => codec,
            Err(e) => {
                // Drop what is buffered of the frame; the rest is skipped as it comes.
                let whole = HEADER_LEN + len;
                let have = buf.len().min(whole);
                self.start += have;
                self.skip = whole - have;
                return Err(e);
            }
        };
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.start += HEADER_LEN + len;
        if self.start == self.buf.len() && self.buf.capacity() > SHRINK_ABOVE {
            // A big frame's buffer is not kept while the worker idles.
            self.buf = Vec::new();
            self.start = 0;
        }
        Ok(Some(Frame {
            has_fd: flags & FLAG_FD != 0,
            control: flags & FLAG_CONTROL != 0,
            codec,
            payload,
        }))
    }

    /// Call at end of stream: an unfinished frame is an error.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buf.len() - self.start + self.skip {
            0 => Ok(()),
            left => Err(FrameError::Truncated(left)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Msg {
        id: u64,
        text: String,
        tags: Vec<String>,
    }

    fn msg() -> impl Strategy<Value = Msg> {
        (any::<u64>(), ".*", proptest::collection::vec(".*", 0..4))
            .prop_map(|(id, text, tags)| Msg { id, text, tags })
    }

    proptest! {
        #[test]
        fn round_trips_in_any_chunking(
            msgs in proptest::collection::vec((msg(), any::<bool>(), any::<bool>()), 0..16),
            cut in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for (m, postcard, fd) in &msgs {
                let codec = if *postcard { Codec::Postcard } else { Codec::Json };
                wire.extend(encode(m, codec, *fd).unwrap());
            }
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push((f.decode::<Msg>().unwrap(), f.codec == Codec::Postcard, f.has_fd));
                }
            }
            prop_assert!(d.finish().is_ok());
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn rejected_frames_are_skipped_and_the_rest_decoded(
            msgs in proptest::collection::vec((msg(), any::<bool>()), 1..12),
            chunk in 1usize..300,
        ) {
            // Every other frame is over the limit or has unknown flags; the
            // good ones must all come out, in order, whatever the read sizes.
            let mut wire = Vec::new();
            let mut good = Vec::new();
            let mut bad = 0;
            for (i, (m, oversized)) in msgs.iter().enumerate() {
                if i % 2 == 1 {
                    bad += 1;
                    if *oversized {
                        wire.extend((5000u32).to_be_bytes());
                        wire.push(0);
                        wire.extend([b'z'; 5000]);
                    } else {
                        wire.extend((3u32).to_be_bytes());
                        wire.extend([0x80, 1, 2, 3]);
                    }
                } else {
                    wire.extend(encode(m, Codec::Json, false).unwrap());
                    good.push(m.clone());
                }
            }
            let mut d = FrameDecoder::new(4096);
            let mut got = Vec::new();
            let mut errors = 0;
            for piece in wire.chunks(chunk) {
                d.push(piece);
                loop {
                    match d.next_frame() {
                        Ok(Some(f)) => got.push(f.decode::<Msg>().unwrap()),
                        Ok(None) => break,
                        Err(_) => errors += 1,
                    }
                }
            }
            prop_assert!(d.finish().is_ok());
            prop_assert_eq!(errors, bad);
            prop_assert_eq!(got, good);
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = FrameDecoder::new(256);
            d.push(&bytes);
            while let Ok(Some(f)) = d.next_frame() {
                let _ = f.decode::<Msg>();
            }
        }
    }

    #[test]
    fn rejects_oversized_and_unknown_flags_before_buffering() {
        let mut d = FrameDecoder::new(16);
        d.push(&[0, 0, 1, 0, 0]);
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::TooLong { len: 256, max: 16 })
        ));
        let mut d = FrameDecoder::default();
        d.push(&[0, 0, 0, 1, 0x80, b'x']);
        assert!(matches!(d.next_frame(), Err(FrameError::BadFlags(0x80))));
        let mut d = FrameDecoder::default();
        d.push(&[0, 0, 0, 1, 0b110, b'x']);
        assert!(matches!(d.next_frame(), Err(FrameError::BadFlags(_))));
    }

    #[test]
    fn a_failed_encode_leaves_the_buffer_as_it_was() {
        let mut out = encode(&"first", Codec::Json, false).unwrap();
        let before = out.clone();
        let bad: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
        assert!(encode_into(&mut out, &bad, Codec::Json, 0).is_err());
        assert_eq!(out, before);
        encode_into(&mut out, &"second", Codec::Postcard, 0).unwrap();
        let mut d = FrameDecoder::default();
        d.push(&out);
        assert_eq!(
            d.next_frame().unwrap().unwrap().decode::<String>().unwrap(),
            "first"
        );
        assert_eq!(
            d.next_frame().unwrap().unwrap().decode::<String>().unwrap(),
            "second"
        );
    }

    #[test]
    fn postcard_is_smaller_than_json() {
        let m = Msg {
            id: 7,
            text: "hello".into(),
            tags: vec!["a".into()],
        };
        assert!(
            encode(&m, Codec::Postcard, false).unwrap().len()
                < encode(&m, Codec::Json, false).unwrap().len()
        );
    }
}
