//! The control commands: `herd ls`, `status`, `reload`, `scale`,
//! `restart`, `signal`, `stop` and `logs`, as clients of a running
//! cluster's control socket (docs/PROTOCOL.md).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use herd::control::client::Client;
use herd::control::protocol::{Command, LogLine, Response, Status};
use herd::control::{place, runtime_dir, ControlError};

use crate::cli::{LogsArgs, NameArgs, RestartArgs, ScaleArgs, SignalArgs, StopArgs};

/// Exit status: the cluster refused, or the operation failed.
const EXIT_FAILED: u8 = 1;
/// Exit status: bad input.
const EXIT_USAGE: u8 = 2;
/// Exit status: no such cluster, or its socket cannot be used.
const EXIT_UNREACHABLE: u8 = 4;

/// How long a one-shot request may take (not a reload or a follower).
pub const QUICK: Option<Duration> = Some(Duration::from_secs(10));

/// A control command's failure: its exit status and one line.
pub struct Failure {
    status: u8,
    message: String,
    /// Under `--json`, the cluster's own answer was printed already.
    answered: bool,
}

impl Failure {
    /// A failure with exit status `status`.
    pub fn new(status: u8, message: String) -> Failure {
        Failure {
            status,
            message,
            answered: false,
        }
    }
    /// Its exit status.
    pub fn status(&self) -> u8 {
        self.status
    }
    /// Its line.
    pub fn message(&self) -> &str {
        &self.message
    }
}

type Outcome = Result<(), Failure>;

/// Runs a control command, printing its failure as `herd: …` on stderr
/// and, under `--json`, as the protocol's error answer on stdout (unless
/// the cluster's own answer was printed already).
pub fn main(json: bool, run: impl FnOnce() -> Outcome) -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json && !f.answered {
                print_json(&Response::error(f.message.clone()));
            }
            let _ = writeln!(std::io::stderr(), "herd: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}

pub fn unreachable(e: ControlError) -> Failure {
    let status = match e {
        ControlError::BadName(_) => EXIT_USAGE,
        _ => EXIT_UNREACHABLE,
    };
    Failure::new(status, e.to_string())
}

/// The cluster `name`, or the only one running.
fn pick(dir: &Path, name: Option<&str>) -> Result<String, Failure> {
    if let Some(name) = name {
        return Ok(name.to_string());
    }
    match place::running(dir).as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Failure::new(
            EXIT_UNREACHABLE,
            format!("no cluster is running (under {})", dir.display()),
        )),
        many => Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{} clusters are running ({}): name one",
                many.len(),
                many.join(", ")
            ),
        )),
    }
}

fn connect(name: Option<&str>, timeout: Option<Duration>) -> Result<Client, Failure> {
    let (dir, name) = find(name)?;
    Client::connect(&dir, &name, timeout).map_err(unreachable)
}

/// The control directory, and the cluster `name` or the only one running.
pub fn find(name: Option<&str>) -> Result<(std::path::PathBuf, String), Failure> {
    let dir = runtime_dir();
    let name = pick(&dir, name)?;
    Ok((dir, name))
}

/// Sends `command`; an `ok: false` answer is a failure (exit 1).
fn ask(client: &mut Client, command: Command) -> Result<Response, Failure> {
    let response = client.request(command).map_err(unreachable)?;
    if response.ok {
        Ok(response)
    } else {
        let why = response.error.unwrap_or_else(|| "refused".into());
        Err(Failure::new(refusal_status(&why), why))
    }
}

/// Refusals of the socket itself (permission, busy) are 4, the rest 1.
fn refusal_status(why: &str) -> u8 {
    if why.starts_with("permission denied") || why.starts_with("busy") {
        EXIT_UNREACHABLE
    } else {
        EXIT_FAILED
    }
}

fn print_json(response: &Response) {
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        serde_json::to_string(response).unwrap_or_default()
    );
}

/// `herd ls`.
pub fn ls(json: bool) -> Outcome {
    let dir = runtime_dir();
    let mut rows = Vec::new();
    for name in place::candidates(&dir) {
        // A dead herd's socket file refuses: it is not running.
        let Ok(mut client) = Client::connect(&dir, &name, QUICK) else {
            continue;
        };
        if let Ok(Response {
            summary: Some(s), ..
        }) = client.request(Command::Summary)
        {
            rows.push(s);
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(&rows).unwrap_or_default());
        return Ok(());
    }
    if rows.is_empty() {
        let _ = writeln!(out, "no cluster is running (under {})", dir.display());
        return Ok(());
    }
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(
        out,
        "{:width$}  {:>7}  {:>7}  {:>8}  {:>8}  COMMAND",
        "NAME", "PID", "READY", "UPTIME", "RESTARTS"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:width$}  {:>7}  {:>7}  {:>8}  {:>8}  {}",
            r.name,
            r.pid,
            format!("{}/{}", r.ready, r.workers),
            duration(r.uptime_s as f64),
            r.restarts,
            r.command
        );
    }
    Ok(())
}

/// `herd status`.
pub fn status(args: NameArgs) -> Outcome {
    let mut client = connect(args.name.as_deref(), QUICK)?;
    let response = ask(&mut client, Command::Status)?;
    if args.json {
        print_json(&response);
        return Ok(());
    }
    let Some(status) = response.status else {
        return Err(Failure::new(EXIT_FAILED, "the answer had no status".into()));
    };
    let _ = std::io::stdout().write_all(render_status(&status).as_bytes());
    Ok(())
}

/// The cluster in one line: `web: pid 100, up 1h02m, 2/3 ready, generation
/// 0` (with `after_name` and `sep` between the parts).
pub fn headline(s: &Status, after_name: &str, sep: &str) -> String {
    format!(
        "{}{after_name}pid {}{sep}up {}{sep}{}/{} ready{sep}generation {}{}{}",
        s.summary.name,
        s.summary.pid,
        duration(s.summary.uptime_s as f64),
        s.summary.ready,
        s.summary.workers,
        s.generation,
        if s.reloading {
            format!("{sep}RELOADING")
        } else {
            String::new()
        },
        if s.stopping {
            format!("{sep}STOPPING")
        } else {
            String::new()
        },
    )
}

/// `herd status` as a table.
pub fn render_status(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{}", headline(s, ": ", ", "));
    let _ = writeln!(out, "command: {}", s.summary.command);
    let _ = writeln!(
        out,
        "balance: {}; workers contained by {}",
        s.balance, s.containment
    );
    for l in &s.listeners {
        match l.queued {
            Some(q) => {
                let _ = writeln!(out, "listening on {} ({q} waiting to be accepted)", l.spec);
            }
            None => {
                let _ = writeln!(out, "listening on {}", l.spec);
            }
        }
    }
    let _ = writeln!(
        out,
        "\n{:>4}  {:>7}  {:9}  {:5}  {:>8}  {:>8}  {:>6}  {:>8}  NOTE",
        "SLOT", "PID", "STATE", "READY", "UPTIME", "RESTARTS", "CPU", "RSS"
    );
    for slot in &s.slots {
        if slot.workers.is_empty() {
            let note = match (slot.next_start_in_s, &slot.last_exit) {
                (Some(t), Some(e)) => format!("next start in {}; last: {e}", duration(t)),
                (None, Some(e)) => format!("last: {e}"),
                (Some(t), None) => format!("next start in {}", duration(t)),
                (None, None) => String::new(),
            };
            let _ = writeln!(
                out,
                "{:>4}  {:>7}  {:9}  {:5}  {:>8}  {:>8}  {:>6}  {:>8}  {note}",
                slot.slot, "-", slot.state, "-", "-", slot.restarts, "-", "-"
            );
        }
        for w in &slot.workers {
            let state = if w.role == "current" {
                slot.state.clone()
            } else {
                w.role.clone()
            };
            let cpu = match w.cpu_s {
                // The average over its life, as ps shows it.
                Some(c) if w.uptime_s > 0.0 => format!("{:.1}%", 100.0 * c / w.uptime_s),
                _ => "-".into(),
            };
            let rss = w.rss_bytes.map(bytes).unwrap_or_else(|| "-".into());
            let mut note = Vec::new();
            if let Some(t) = &w.status_text {
                note.push(t.clone());
            }
            if let Some(c) = w.connections {
                note.push(format!("{c} connections"));
            }
            if w.role == "current" {
                if let Some(e) = &slot.last_exit {
                    note.push(format!("last: {e}"));
                }
            }
            let _ = writeln!(
                out,
                "{:>4}  {:>7}  {:9}  {:5}  {:>8}  {:>8}  {:>6}  {:>8}  {}",
                slot.slot,
                w.pid,
                state,
                if w.ready { "yes" } else { "no" },
                duration(w.uptime_s),
                slot.restarts,
                cpu,
                rss,
                note.join("; ")
            );
        }
    }
    if !s.orphans.is_empty() {
        let _ = writeln!(out, "\nstill waiting for:");
        for o in &s.orphans {
            let _ = writeln!(
                out,
                "  {} {}: {}",
                o.pid,
                o.comm.as_deref().unwrap_or("?"),
                o.what
            );
        }
    }
    let c = &s.counters;
    let _ = writeln!(
        out,
        "\nrestarts: {} crashed, {} killed, {} hung, {} recycled, {} reloaded; crash loops: {}; \
         reloads: {} ok, {} rolled back, {} not resolved",
        c.restarts_crash,
        c.restarts_killed,
        c.restarts_watchdog,
        c.restarts_recycled,
        c.restarts_reload,
        c.crash_loops,
        c.reloads_ok,
        c.reloads_rolled_back,
        c.reloads_unresolved
    );
    out
}

/// `herd reload`.
pub fn reload(args: NameArgs) -> Outcome {
    // A reload takes as long as the workers take to be ready: no timeout.
    let mut client = connect(args.name.as_deref(), None)?;
    let name = client.name().to_string();
    let response = client.request(Command::Reload).map_err(unreachable)?;
    if args.json {
        print_json(&response);
    } else if response.ok {
        let g = response
            .reload
            .and_then(|r| r.generation)
            .unwrap_or_default();
        let _ = writeln!(std::io::stdout(), "{name}: reloaded (generation {g})");
    } else if let Some(r) = &response.reload {
        let mut err = std::io::stderr().lock();
        for line in &r.stderr {
            let _ = writeln!(err, "  | {line}");
        }
    }
    match response.ok {
        true => Ok(()),
        false => {
            let why = response.error.unwrap_or_else(|| "reload failed".into());
            Err(Failure {
                answered: args.json,
                ..Failure::new(refusal_status(&why), why)
            })
        }
    }
}

/// `herd scale`.
pub fn scale(args: ScaleArgs) -> Outcome {
    let t = args.workers.trim();
    let command = if let Some(k) = t.strip_prefix('+') {
        Command::Scale {
            workers: None,
            delta: Some(parse_count(k, &args.workers)?),
        }
    } else if let Some(k) = t.strip_prefix('-') {
        Command::Scale {
            workers: None,
            delta: Some(-parse_count(k, &args.workers)?),
        }
    } else {
        match parse_count(t, &args.workers)? {
            0 => {
                return Err(Failure::new(
                    EXIT_USAGE,
                    "cannot scale to 0 workers (herd stop stops the cluster)".into(),
                ))
            }
            n => Command::Scale {
                workers: Some(n as usize),
                delta: None,
            },
        }
    };
    let mut client = connect(Some(&args.name), QUICK)?;
    let response = ask(&mut client, command)?;
    if args.json {
        print_json(&response);
    } else {
        let n = response.scale.unwrap_or_default();
        let s = if n == 1 { "" } else { "s" };
        let _ = writeln!(std::io::stdout(), "{}: {n} worker{s}", args.name);
    }
    Ok(())
}

fn parse_count(digits: &str, given: &str) -> Result<i64, Failure> {
    digits
        .parse::<u16>()
        .ok()
        .filter(|n| *n <= 1024)
        .map(i64::from)
        .ok_or_else(|| {
            Failure::new(
                EXIT_USAGE,
                format!("expected N (1-1024), +K or -K workers, got {given:?}"),
            )
        })
}

/// `herd restart`.
pub fn restart(args: RestartArgs) -> Outcome {
    let mut client = connect(Some(&args.name), QUICK)?;
    let response = ask(&mut client, Command::Restart { slot: args.slot })?;
    if args.json {
        print_json(&response);
    } else if let Some(w) = response.restart {
        let _ = writeln!(
            std::io::stdout(),
            "{}: replacing worker {} in slot {} (its replacement starts first, then it drains)",
            args.name,
            w.pid,
            w.slot
        );
    }
    Ok(())
}

/// `herd signal`.
pub fn signal(args: SignalArgs) -> Outcome {
    if let Err(why) = herd::config::parse_signal(&args.signal) {
        return Err(Failure::new(EXIT_USAGE, why));
    }
    let mut client = connect(Some(&args.name), QUICK)?;
    let response = ask(
        &mut client,
        Command::Signal {
            signal: args.signal.clone(),
            slot: args.slot,
        },
    )?;
    if args.json {
        print_json(&response);
    } else {
        let pids: Vec<String> = response
            .signal
            .unwrap_or_default()
            .iter()
            .map(|w| format!("{} (slot {})", w.pid, w.slot))
            .collect();
        let _ = writeln!(
            std::io::stdout(),
            "{}: sent {} to {}",
            args.name,
            args.signal,
            if pids.is_empty() {
                "no worker".into()
            } else {
                pids.join(", ")
            }
        );
    }
    Ok(())
}

/// `herd stop`: asks, then waits for herd's process to be gone.
pub fn stop(args: StopArgs) -> Outcome {
    let mut client = connect(Some(&args.name), QUICK)?;
    let pid = ask(&mut client, Command::Summary)?
        .summary
        .map(|s| s.pid)
        .unwrap_or_default();
    // Opened before the stop request: the pid cannot be reused meanwhile.
    let pidfd = rustix::process::Pid::from_raw(pid as i32)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    ask(&mut client, Command::Stop)?;
    let _ = writeln!(std::io::stdout(), "{}: stopping (pid {pid})", args.name);
    let Some(pidfd) = pidfd else {
        return Ok(());
    };
    let mut fds = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec::try_from(args.timeout).ok();
    match rustix::event::poll(&mut fds, timeout.as_ref()) {
        Ok(n) if n > 0 => {
            let _ = writeln!(std::io::stdout(), "{}: stopped", args.name);
            Ok(())
        }
        _ => Err(Failure::new(
            EXIT_FAILED,
            format!(
                "{} (pid {pid}) has not exited after {:?}",
                args.name, args.timeout
            ),
        )),
    }
}

/// `herd logs`.
pub fn logs(args: LogsArgs) -> Outcome {
    let timeout = if args.follow { None } else { QUICK };
    let mut client = connect(args.name.as_deref(), timeout)?;
    client
        .send(Command::Logs {
            lines: Some(args.lines),
            slot: args.slot,
            follow: args.follow,
        })
        .map_err(unreachable)?;
    let mut out = std::io::stdout().lock();
    loop {
        let response = match client.read() {
            Ok(r) => r,
            // The cluster ended while followed.
            Err(_) if args.follow => return Ok(()),
            Err(e) => return Err(unreachable(e)),
        };
        if !response.ok {
            let why = response.error.unwrap_or_default();
            return Err(Failure::new(refusal_status(&why), why));
        }
        let written = if let Some(line) = &response.log {
            if args.json {
                writeln!(out, "{}", serde_json::to_string(line).unwrap_or_default())
            } else {
                writeln!(out, "{}", render_log(line))
            }
        } else if let Some(n) = response.skipped {
            writeln!(out, "herd: {n} lines skipped (this reader fell behind)")
        } else if response.end == Some(true) {
            return Ok(());
        } else {
            Ok(())
        };
        // `herd logs -f | head`: a closed stdout ends it quietly.
        if written.is_err() || (args.follow && out.flush().is_err()) {
            return Ok(());
        }
    }
}

/// A log line as herd printed it: `[slot pid] line` for a worker's.
pub fn render_log(l: &LogLine) -> String {
    match (l.slot, l.pid) {
        (Some(slot), Some(pid)) => format!("[{slot} {pid}] {}", l.line),
        _ => l.line.clone(),
    }
}

/// `95`, `2m05s`, `3h12m`, `4d03h`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 if secs < 10.0 => format!("{secs:.1}s"),
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `21.3M`, `512K`, `1.2G` (powers of 1024).
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    if n >= (1u64 << 30) as f64 {
        format!("{:.1}G", n / (1u64 << 30) as f64)
    } else if n >= (1u64 << 20) as f64 {
        format!("{:.1}M", n / (1u64 << 20) as f64)
    } else {
        format!("{:.0}K", n / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_well() {
        assert_eq!(duration(3.25), "3.2s");
        assert_eq!(duration(42.0), "42s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(3.0 * 3600.0 + 720.0), "3h12m");
        assert_eq!(duration(100_000.0), "1d03h");
        assert_eq!(bytes(22_334_000), "21.3M");
        assert_eq!(bytes(524_288), "512K");
    }
}
