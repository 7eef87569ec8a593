//! herd's frame decoder on arbitrary bytes, fed in two chunks: it must never
//! panic, never buffer past its limit, decode payloads without panicking, and
//! go on after a rejected frame (errors skip, they do not end the stream).
#![no_main]

use herd::ipc::frame::FrameDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut d = FrameDecoder::new(1 << 16);
    for chunk in [&data[..cut], &data[cut..]] {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(frame)) => {
                    let _ = frame.decode::<serde_json::Value>();
                }
                Ok(None) => break,
                Err(_) => continue, // skipped; every error consumes input
            }
        }
    }
    let _ = d.finish();
});
