//! Node's newline-delimited JSON decoder on arbitrary bytes, fed in two
//! chunks, and the cluster-protocol parse of every message it yields; it goes
//! on after a skipped line (errors skip, they do not end the stream).
#![no_main]

use herd::ipc::node::{ClusterMessage, NodeDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut d = NodeDecoder::new(1 << 16);
    for chunk in [&data[..cut], &data[cut..]] {
        d.push(chunk);
        loop {
            match d.next_message() {
                // What the supervisor does with every line from a Node worker.
                Ok(Some(message)) => {
                    let _ = ClusterMessage::parse(&message);
                }
                Ok(None) => break,
                Err(_) => continue, // skipped; every error consumes input
            }
        }
    }
    let _ = d.finish();
});
