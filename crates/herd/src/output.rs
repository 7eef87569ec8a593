//! Worker stdout/stderr, read line by line and written with a `[slot pid]`
//! prefix (coloured on a terminal) or as one JSON object per line.
//!
//! Reading happens on the runtime (one small task per stream); writing happens
//! on one dedicated thread fed by a bounded channel. A slow consumer of herd's
//! own stdout therefore back-pressures the chatty worker's pipe, never the
//! supervisor task.

use std::io::{IsTerminal, Write};
use std::time::SystemTime;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

/// The longest line forwarded whole; longer ones are split at this size.
pub const MAX_LINE: usize = 64 * 1024;

/// How worker output and herd's own events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `[slot pid] line`, the prefix coloured when the stream is a terminal.
    #[default]
    Text,
    /// `{"timestamp":…,"slot":…,"pid":…,"stream":…,"line":…}` per line.
    Json,
}

/// Which of the worker's streams a line came from (and goes to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output, written to herd's stdout.
    Stdout,
    /// Standard error, written to herd's stderr.
    Stderr,
}

struct Line {
    stream: Stream,
    bytes: Vec<u8>,
}

/// The handle tasks use to emit worker lines; cheap to clone.
#[derive(Clone)]
pub(crate) struct OutputSink {
    tx: mpsc::Sender<Line>,
    format: LogFormat,
    color: [bool; 2],
}

impl OutputSink {
    /// Starts the writer thread.
    pub(crate) fn start(format: LogFormat) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Line>(1024);
        std::thread::Builder::new()
            .name("herd-output".into())
            .spawn(move || {
                while let Some(line) = rx.blocking_recv() {
                    // A closed stdout (herd piped into `head`) must not kill the
                    // cluster: drop the line.
                    let _ = match line.stream {
                        Stream::Stdout => std::io::stdout().lock().write_all(&line.bytes),
                        Stream::Stderr => std::io::stderr().lock().write_all(&line.bytes),
                    };
                }
            })?;
        let color = [
            std::io::stdout().is_terminal(),
            std::io::stderr().is_terminal(),
        ];
        Ok(OutputSink { tx, format, color })
    }

    /// Forwards `reader` line by line until EOF.
    pub(crate) async fn forward(
        self,
        reader: impl AsyncRead + Unpin,
        stream: Stream,
        slot: usize,
        pid: u32,
    ) {
        // Small: one per worker stream, and a pipe delivers at most a page or so per read.
        let mut reader = BufReader::with_capacity(4 * 1024, reader);
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let chunk = match reader.fill_buf().await {
                Ok([]) | Err(_) => break,
                Ok(chunk) => chunk,
            };
            let (take, complete) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            let room = MAX_LINE - pending.len();
            let used = take.min(room);
            let complete = complete && used == take;
            pending.extend_from_slice(&chunk[..used]);
            reader.consume(used);
            if complete || pending.len() >= MAX_LINE {
                if pending.last() == Some(&b'\n') {
                    pending.pop();
                }
                if !self.emit(stream, slot, pid, &pending).await {
                    return;
                }
                pending.clear();
            }
        }
        if !pending.is_empty() {
            self.emit(stream, slot, pid, &pending).await;
        }
    }

    async fn emit(&self, stream: Stream, slot: usize, pid: u32, line: &[u8]) -> bool {
        let line = String::from_utf8_lossy(line);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        let bytes = match self.format {
            LogFormat::Text => {
                let colored = self.color[stream as usize];
                if colored {
                    let c = 31 + (slot % 6);
                    format!("\x1b[{c}m[{slot} {pid}]\x1b[0m {line}\n")
                } else {
                    format!("[{slot} {pid}] {line}\n")
                }
            }
            LogFormat::Json => {
                let name = match stream {
                    Stream::Stdout => "stdout",
                    Stream::Stderr => "stderr",
                };
                let mut s = String::with_capacity(line.len() + 96);
                s.push_str("{\"timestamp\":\"");
                s.push_str(&rfc3339_now());
                s.push_str(&format!(
                    "\",\"slot\":{slot},\"pid\":{pid},\"stream\":\"{name}\",\"line\":"
                ));
                json_string(&mut s, line);
                s.push_str("}\n");
                s
            }
        };
        self.tx
            .send(Line {
                stream,
                bytes: bytes.into_bytes(),
            })
            .await
            .is_ok()
    }
}

/// Appends `text` as a JSON string literal.
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_controls_and_quotes() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, r#""a\"b\\c\n\u0001é""#);
    }

    #[test]
    fn timestamp_shape() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 27, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
