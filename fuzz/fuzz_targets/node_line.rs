//! Node's newline-delimited JSON decoder on arbitrary bytes, fed in two chunks.
#![no_main]

use herd::ipc::node::NodeDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut d = NodeDecoder::new(1 << 16);
    for chunk in [&data[..cut], &data[cut..]] {
        d.push(chunk);
        while let Ok(Some(_)) = d.next_message() {}
    }
    let _ = d.finish();
});
