//! The `herd` command: a thin layer over the `herd` library.
//!
//! Exit statuses (also in docs/ARCHITECTURE.md and `herd run --help`):
//!
//! | status | meaning |
//! |---|---|
//! | 0   | stopped on request (SIGINT/SIGTERM), or every worker finished with status 0 |
//! | 1   | every worker finished and at least one failed (`--restart never/on-failure`), or an internal error |
//! | 2   | bad input: flags, listen specs, an address in use or not permitted, a `--name` in use |
//! | 3   | crash loop under `--on-crash-loop exit`, or no worker ever started and every slot crash-looped |
//! | 126 | the worker command is not executable |
//! | 127 | the worker command was not found |

mod cli;
mod ctl;
mod hello;
mod top;
mod unit;

use std::process::ExitCode;

use clap::Parser;
use herd::{Cluster, ClusterConfig, CommandError, Outcome, WorkerCommand};

use cli::{Cli, Command, LogFormatArg, RunArgs};

/// Exit status: bad input.
const EXIT_USAGE: u8 = 2;
/// Exit status: crash loop under `--on-crash-loop exit`.
const EXIT_CRASH_LOOP: u8 = 3;
/// Exit status: worker command not executable.
const EXIT_NOT_EXECUTABLE: u8 = 126;
/// Exit status: worker command not found.
const EXIT_NOT_FOUND: u8 = 127;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::report_parse_error(e),
    };
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Hello(args) => match hello::main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_USAGE, &format!("{e:#}")),
        },
        Command::Ls(args) => ctl::main(args.json, || ctl::ls(args.json)),
        Command::Status(args) => ctl::main(args.json, || ctl::status(args)),
        Command::Reload(args) => ctl::main(args.json, || ctl::reload(args)),
        Command::Scale(args) => ctl::main(args.json, || ctl::scale(args)),
        Command::Restart(args) => ctl::main(args.json, || ctl::restart(args)),
        Command::Signal(args) => ctl::main(args.json, || ctl::signal(args)),
        Command::Stop(args) => ctl::main(false, || ctl::stop(args)),
        Command::Logs(args) => ctl::main(args.json, || ctl::logs(args)),
        Command::Top(args) => ctl::main(false, || top::main(args)),
        Command::SystemdUnit(args) => unit::main(args),
    }
}

/// Whether herd's lines are JSON objects (`--log-format json`): then so is
/// its last word, for the log shipper reading them.
static JSON_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Prints one line on stderr (`herd: …`, or a JSON object under
/// `--log-format json`) and returns `status`. A closed or broken stderr
/// loses the line, never panics.
fn fail(status: u8, message: &str) -> ExitCode {
    use std::io::Write;
    let line = if JSON_LOG.load(std::sync::atomic::Ordering::Relaxed) {
        serde_json::json!({"level": "ERROR", "message": message, "exit_status": status}).to_string()
    } else {
        format!("herd: {message}")
    };
    let _ = writeln!(std::io::stderr(), "{line}");
    ExitCode::from(status)
}

fn run(args: RunArgs) -> ExitCode {
    if let Some(path) = &args.log_file {
        let file = herd::output::LogFile {
            path: path.clone(),
            max_size: (args.log_max_size > 0).then_some(args.log_max_size as u64),
            keep: args.log_keep,
        };
        if let Err(e) = herd::output::log_to_file(file) {
            return fail(
                EXIT_USAGE,
                &format!("cannot open the log file {}: {e}", path.display()),
            );
        }
    }
    init_tracing(args.log_format, args.log_file.is_none());
    if let cli::Workers::Auto(budget) = &args.workers {
        tracing::info!("{}", budget.describe());
    }
    if matches!(args.log_format, LogFormatArg::Json) {
        JSON_LOG.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let argv = if args.command.is_empty() {
        // The built-in hello-world server: this very binary in worker role.
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return fail(1, &format!("cannot find the herd binary: {e}")),
        };
        vec![exe.into_os_string(), "hello".into()]
    } else {
        args.command.clone()
    };
    let resolved = if args.node_cluster == cli::NodeCluster::Off {
        WorkerCommand::resolve_as_given(argv)
    } else {
        WorkerCommand::resolve(argv)
    };
    let command = match resolved {
        Ok(c) => c,
        Err(e @ CommandError::Script(_)) => return fail(EXIT_USAGE, &e.to_string()),
        Err(e @ CommandError::NotExecutable(_)) => {
            return fail(EXIT_NOT_EXECUTABLE, &e.to_string())
        }
        Err(e) => return fail(EXIT_NOT_FOUND, &e.to_string()),
    };
    if let Some(dir) = &command.dir {
        tracing::info!(
            "{}: running its script, {}, in {}",
            args.command
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            command.display(),
            dir.display()
        );
    }
    let user = match &args.user {
        None => None,
        Some(name) => match herd::config::Credentials::lookup(name, args.group.as_deref()) {
            Ok(c) => {
                let me = rustix::process::geteuid().as_raw();
                if me != 0 && c.uid != me {
                    return fail(
                        EXIT_USAGE,
                        &format!(
                            "--user {name} needs herd to run as root (it runs as uid {me}); \
                             or start herd as that user"
                        ),
                    );
                }
                // Already that user (and not root): nothing to drop.
                (me == 0).then_some(c)
            }
            Err(why) => return fail(EXIT_USAGE, &why),
        },
    };
    let mut config = args.into_config(command);
    config.user = user;
    match run_cluster(config) {
        Ok(Outcome::Stopped)
        | Ok(Outcome::Finished {
            all_succeeded: true,
        }) => ExitCode::SUCCESS,
        Ok(Outcome::Finished {
            all_succeeded: false,
        }) => ExitCode::from(1),
        Ok(Outcome::CrashLoop { slot, exit, stderr }) => fail(
            EXIT_CRASH_LOOP,
            &with_stderr(
                format!(
                    "slot {slot} is in a crash loop; exiting (--on-crash-loop exit; its last \
                     worker: {exit})"
                ),
                &stderr,
            ),
        ),
        Ok(Outcome::BootFailed { slot, exit, stderr }) => fail(
            EXIT_CRASH_LOOP,
            &with_stderr(
                format!(
                    "no worker ever started: every slot crash-looped (slot {slot}'s last \
                     worker: {exit})"
                ),
                &stderr,
            ),
        ),
        Err(herd::Error::Exec(e)) if e.not_found() => fail(EXIT_NOT_FOUND, &e.to_string()),
        Err(herd::Error::Exec(e)) => fail(EXIT_NOT_EXECUTABLE, &e.to_string()),
        Err(herd::Error::Bind(e)) => fail(EXIT_USAGE, &e.to_string()),
        Err(e @ herd::Error::Config(_)) => fail(EXIT_USAGE, &e.to_string()),
        // A --name in use or not allowed, an unsafe control directory.
        Err(e @ herd::Error::Control(_)) => fail(EXIT_USAGE, &e.to_string()),
        Err(e) => fail(1, &e.to_string()),
    }
}

/// `text` and a worker's last stderr lines, as an error report.
fn with_stderr(mut text: String, stderr: &[String]) -> String {
    if stderr.is_empty() {
        text.push_str("; it wrote nothing to stderr");
    } else {
        text.push_str("; its last stderr lines:");
        for line in stderr {
            text.push_str("\n  | ");
            text.push_str(line);
        }
    }
    text
}

fn run_cluster(config: ClusterConfig) -> Result<Outcome, herd::Error> {
    let cluster = Cluster::bind(config)?;
    // Current-thread runtime on the main thread: workers are forked from the
    // thread that lives as long as herd, so PR_SET_PDEATHSIG fires only when
    // herd itself dies.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(herd::Error::Spawn)?;
    runtime.block_on(cluster.run())
}

fn init_tracing(format: LogFormatArg, to_stderr: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HERD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // herd's own lines never block the supervisor: they are queued for
    // stderr's writer thread, and dropped (and counted) when it is stalled.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(herd::output::LogWriter::default)
        .with_target(false);
    match format {
        LogFormatArg::Text => builder
            .with_ansi(to_stderr && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .fmt_fields(TextFields)
            .init(),
        LogFormatArg::Json => builder.json().flatten_event(true).init(),
    }
}

/// herd's text log lines: the message, then only the fields it does not
/// already say (`worker 4745 spawned in slot 0`, not `… slot=0 pid=4745`).
/// JSON lines keep every field.
struct TextFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for TextFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut seen = Collected::default();
        fields.record(&mut seen);
        write!(writer, "{}", escape_controls(&seen.message))?;
        for (key, value) in &seen.fields {
            if !said(&seen.message, key, value) {
                write!(writer, " {key}={}", field_value(value))?;
            }
        }
        Ok(())
    }
}

/// An event's message and other fields, as text.
#[derive(Default)]
struct Collected {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl tracing::field::Visit for Collected {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.push((field.name(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields.push((field.name(), format!("{value:?}")));
        }
    }
}

/// Control characters (newlines, escape sequences, bidi overrides) shown
/// escaped, so that text from a worker or a package.json cannot forge log
/// lines or repaint the terminal.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        c.is_control()
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    };
    if !text.contains(bad) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if bad(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// A field's value: quoted (as Rust's Debug quotes) when it holds a space,
/// a quote, an `=` or a control character, so fields cannot be spoofed.
fn field_value(value: &str) -> std::borrow::Cow<'_, str> {
    if value.is_empty()
        || value.contains(|c: char| c.is_whitespace() || c == '"' || c == '=' || c.is_control())
    {
        format!("{value:?}").into()
    } else {
        escape_controls(value)
    }
}

/// Whether `message` already says `key=value`: as "slot 1", or, for a pid,
/// as a word of its own ("worker 4745 died"). Other fields always show
/// (`delay_ms=136` beside "in 136.5ms": a number in the text may be another).
fn said(message: &str, key: &str, value: &str) -> bool {
    message.contains(&format!("{key} {value}"))
        || (key == "pid"
            && message
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|word| word == value))
}

#[cfg(test)]
mod tests {
    use super::said;

    #[test]
    fn log_text_cannot_forge_lines_or_fields() {
        use super::{escape_controls, field_value};
        assert_eq!(escape_controls("a\nb\u{1b}[2J"), "a\\nb\\u{1b}[2J");
        assert_eq!(escape_controls("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(escape_controls("plain"), "plain");
        assert_eq!(field_value("sh -c x workers=99"), "\"sh -c x workers=99\"");
        assert_eq!(field_value("a\nb"), "\"a\\nb\"");
        assert_eq!(field_value("shared"), "shared");
    }

    #[test]
    fn fields_the_message_says_are_not_repeated() {
        assert!(said("worker 4745 spawned in slot 0", "slot", "0"));
        assert!(said("worker 4745 spawned in slot 0", "pid", "4745"));
        assert!(said(
            "worker 4745's inspector: 127.0.0.1:9230",
            "pid",
            "4745"
        ));
        assert!(!said("worker 4745 died (exit code 1)", "slot", "1"));
        assert!(!said("worker 4745 died (exit code 1)", "uptime_ms", "208"));
        assert!(!said("worker 47451 died", "pid", "4745"));
        assert!(!said("restarting slot 0 in 136.5ms", "delay_ms", "136"));
    }
}
