//! herd's output: worker stdout/stderr, read line by line and written with a
//! `[slot pid]` prefix (coloured on a terminal) or as one JSON object per
//! line, and herd's own log lines.
//!
//! # Theory of operation
//!
//! Each of herd's two streams has its own writer thread fed by its own
//! bounded queue, so a stalled stdout never holds up stderr (or the other
//! way round), and nothing on the supervisor's thread ever calls `write(2)`
//! on them:
//!
//! * A worker's line is queued by the task reading that worker's pipe. While
//!   the queue is full the reader waits: a worker is back-pressured when
//!   herd's output is *slow*. If the queue stays full for [`STALL`] (the
//!   reader of herd's output has stopped), the stream is marked blocked and
//!   lines are dropped and counted instead, without waiting, until the
//!   writer thread gets a write through again.
//! * herd's own log lines ([`LogWriter`], given to `tracing`) never wait at
//!   all: a line that does not fit is dropped and counted.
//! * A line the writer cannot write (a closed pipe: `herd | head`) is dropped
//!   and counted too. The count is reported on the stream before the next
//!   line that gets through (`herd: 4,211 lines dropped while stdout was
//!   blocked`) and, for what is left, on stderr when the cluster finishes
//!   ([`flush`]).
//!
//! The two streams are process-wide, as stdout and stderr are.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};

mod file;
pub mod ring;

pub use file::{log_to_file, reopen, LogFile};

/// The longest line forwarded whole; longer ones are split at this size.
pub const MAX_LINE: usize = 64 * 1024;

/// Lines queued per stream before writers wait (or drop).
const QUEUE: usize = 4096;

/// How long a worker's reader waits for room before the stream counts as
/// blocked and its lines are dropped instead.
pub const STALL: Duration = Duration::from_secs(1);

/// How many of a worker's last stderr lines are kept for error reports.
pub const TAIL_LINES: usize = 20;

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

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

enum Item {
    Line(Vec<u8>),
    /// Answer once everything queued before is written.
    Flush(oneshot::Sender<()>),
}

/// One of herd's output streams: its queue, and what was dropped.
struct Writer {
    tx: mpsc::Sender<Item>,
    /// Lines dropped and not yet reported.
    dropped: AtomicU64,
    /// Set when a reader waited [`STALL`] for room; cleared by the writer
    /// thread after each write that gets through.
    blocked: AtomicBool,
    /// Set when a write failed (the reader of herd's stream is gone), for
    /// the wording of the drop report; cleared by a write that gets through.
    closed: AtomicBool,
    terminal: bool,
}

/// Lines dropped since herd started, on every stream.
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// How many lines herd's output dropped since it started (a blocked or
/// closed stream, a full disk).
pub fn dropped_total() -> u64 {
    DROPPED_TOTAL.load(Ordering::Relaxed)
}

fn writers() -> &'static [Writer; 2] {
    static WRITERS: OnceLock<[Writer; 2]> = OnceLock::new();
    WRITERS.get_or_init(|| [Writer::start(Stream::Stdout), Writer::start(Stream::Stderr)])
}

fn writer(stream: Stream) -> &'static Writer {
    &writers()[stream as usize]
}

impl Writer {
    fn start(stream: Stream) -> Writer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let terminal = !file::in_use()
            && match stream {
                Stream::Stdout => std::io::stdout().is_terminal(),
                Stream::Stderr => std::io::stderr().is_terminal(),
            };
        let spawned = std::thread::Builder::new()
            .name(format!("herd-{}", stream.name()))
            .spawn(move || write_loop(stream, rx));
        // Without the thread every line is dropped (and counted): the queue
        // fills and nothing drains it. herd keeps supervising.
        drop(spawned);
        Writer {
            tx,
            dropped: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            terminal,
        }
    }

    fn count_drop(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        DROPPED_TOTAL.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues a line without waiting; drops and counts it if there is no room.
    fn try_line(&self, bytes: Vec<u8>) {
        if self.tx.try_send(Item::Line(bytes)).is_err() {
            self.count_drop();
        }
    }

    /// Queues a worker's line: waits while herd's output is slow, drops once
    /// it is blocked.
    async fn line(&self, bytes: Vec<u8>) {
        if self.blocked.load(Ordering::Relaxed) {
            return self.try_line(bytes);
        }
        match self.tx.send_timeout(Item::Line(bytes), STALL).await {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                self.blocked.store(true, Ordering::Relaxed);
                self.count_drop();
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => self.count_drop(),
        }
    }
}

fn write_loop(stream: Stream, mut rx: mpsc::Receiver<Item>) {
    let me = writer(stream);
    while let Some(item) = rx.blocking_recv() {
        let line = match item {
            Item::Line(line) => line,
            Item::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let mut out: Box<dyn Write> = match (file::file(), stream) {
            (Some(file), _) => Box::new(file),
            (None, Stream::Stdout) => Box::new(std::io::stdout().lock()),
            (None, Stream::Stderr) => Box::new(std::io::stderr().lock()),
        };
        let dropped = me.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let notice = dropped_notice(dropped, stream, me.closed.load(Ordering::Relaxed));
            if out.write_all(notice.as_bytes()).is_err() {
                me.dropped.fetch_add(dropped, Ordering::Relaxed);
            }
        }
        // A closed or broken stream must not take the cluster down: count
        // the line and go on.
        match out.write_all(&line).and_then(|()| out.flush()) {
            Ok(()) => {
                me.blocked.store(false, Ordering::Relaxed);
                me.closed.store(false, Ordering::Relaxed);
            }
            Err(_) => {
                me.closed.store(true, Ordering::Relaxed);
                me.count_drop();
            }
        }
    }
}

fn dropped_notice(n: u64, stream: Stream, closed: bool) -> String {
    format!(
        "herd: {} line{} dropped while {} was {}\n",
        thousands(n),
        if n == 1 { "" } else { "s" },
        stream.name(),
        if closed { "closed" } else { "blocked" }
    )
}

/// `4211` as `4,211`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Waits (at most `timeout`) for both streams to write what is queued, then
/// reports on stderr any lines dropped and not yet reported. Called when a
/// cluster finishes; never blocks longer than `timeout`.
pub async fn flush(timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    for stream in [Stream::Stdout, Stream::Stderr] {
        let w = writer(stream);
        let (done, wait) = oneshot::channel();
        if w.tx.try_send(Item::Flush(done)).is_ok() {
            let _ = tokio::time::timeout_at(deadline, wait).await;
        }
    }
    // Lines still queued now will not be written before herd exits. Both
    // counts are taken before either report is queued (a report queued on
    // stderr is not a lost line).
    let counts = [Stream::Stdout, Stream::Stderr].map(|stream| {
        let w = writer(stream);
        let unwritten = (w.tx.max_capacity() - w.tx.capacity()) as u64;
        let n = w.dropped.swap(0, Ordering::Relaxed) + unwritten;
        (stream, n, w.closed.load(Ordering::Relaxed))
    });
    let err = writer(Stream::Stderr);
    for (stream, n, closed) in counts {
        if n > 0 {
            err.try_line(dropped_notice(n, stream, closed).into_bytes());
        }
    }
    let (done, wait) = oneshot::channel();
    if err.tx.try_send(Item::Flush(done)).is_ok() {
        let _ = tokio::time::timeout_at(deadline, wait).await;
    }
}

/// herd's own log lines, for `tracing_subscriber::fmt().with_writer(LogWriter::default)`:
/// each write is queued on stderr's writer thread and never waits; what
/// does not fit is dropped and counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let raw = String::from_utf8_lossy(buf);
        let text = strip_ansi(&raw);
        ring::push(None, "herd", text.trim_end_matches(['\n', '\r']));
        writer(Stream::Stderr).try_line(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A worker's last [`TAIL_LINES`] lines of one stream, shared between its
/// forwarder (which writes them) and its exit watcher (which reads them for
/// an error report, without waiting for the stream's EOF).
#[derive(Clone, Default, Debug)]
pub(crate) struct Tail(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl Tail {
    fn push(&self, line: &str) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line.chars().take(512).collect());
    }

    /// The lines so far, oldest first.
    pub(crate) fn lines(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect()
    }
}

/// The handle tasks use to emit worker lines; cheap to clone.
#[derive(Clone)]
pub(crate) struct OutputSink {
    format: LogFormat,
}

impl OutputSink {
    /// Starts the writer threads (once per process).
    pub(crate) fn start(format: LogFormat) -> std::io::Result<Self> {
        let _ = writers();
        Ok(OutputSink { format })
    }

    /// Forwards `reader` line by line until EOF, keeping the last
    /// [`TAIL_LINES`] in `tail` if given (for error reports).
    pub(crate) async fn forward(
        self,
        reader: impl AsyncRead + Unpin,
        stream: Stream,
        slot: usize,
        pid: u32,
        tail: Option<Tail>,
    ) {
        // One per worker stream; a pipe delivers at most its buffer per read.
        let mut reader = BufReader::with_capacity(16 * 1024, reader);
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
                self.emit(stream, slot, pid, &pending, tail.as_ref()).await;
                pending.clear();
            }
        }
        if !pending.is_empty() {
            self.emit(stream, slot, pid, &pending, tail.as_ref()).await;
        }
    }

    async fn emit(&self, stream: Stream, slot: usize, pid: u32, line: &[u8], tail: Option<&Tail>) {
        let line = String::from_utf8_lossy(line);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        if let Some(tail) = tail {
            tail.push(line);
        }
        ring::push(Some((slot, pid)), stream.name(), line);
        let w = writer(stream);
        let bytes = match self.format {
            LogFormat::Text => {
                if w.terminal {
                    let c = 31 + (slot % 6);
                    format!("\x1b[{c}m[{slot} {pid}]\x1b[0m {line}\n")
                } else {
                    format!("[{slot} {pid}] {line}\n")
                }
            }
            LogFormat::Json => {
                let mut s = String::with_capacity(line.len() + 96);
                s.push_str("{\"timestamp\":\"");
                s.push_str(&rfc3339_now());
                s.push_str(&format!(
                    "\",\"slot\":{slot},\"pid\":{pid},\"stream\":\"{}\",\"line\":",
                    stream.name()
                ));
                json_string(&mut s, line);
                s.push_str("}\n");
                s
            }
        };
        w.line(bytes.into_bytes()).await;
    }
}

/// `text` without terminal colour codes (`ESC [ … m`), for the ring.
fn strip_ansi(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('\x1b') {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // Skip to the end of the sequence (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out.into()
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
    fn colour_codes_are_stripped_for_the_ring() {
        assert_eq!(
            strip_ansi("\x1b[32m INFO\x1b[0m worker ready"),
            " INFO worker ready"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn json_escapes_controls_and_quotes() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, r#""a\"b\\c\n\u0001é""#);
    }

    #[test]
    fn counts_read_with_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4211), "4,211");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(
            dropped_notice(1, Stream::Stdout, false),
            "herd: 1 line dropped while stdout was blocked\n"
        );
        assert_eq!(
            dropped_notice(2, Stream::Stderr, true),
            "herd: 2 lines dropped while stderr was closed\n"
        );
    }

    #[test]
    fn timestamp_shape() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 27, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
