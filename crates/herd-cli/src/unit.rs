//! `herd systemd-unit`: a working service unit (and `.socket` unit) for a
//! `herd run` command line.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Parser;
use herd::ListenAddress;

use crate::cli::{Cli, Command, UnitArgs};

/// Prints (or writes into `--out`) the units; exit 2 on bad run flags.
pub fn main(args: UnitArgs) -> ExitCode {
    let mut argv = vec!["herd".into(), "run".into()];
    argv.extend(args.run.iter().cloned());
    let run = match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Run(run),
        }) => run,
        Ok(_) => unreachable!("parsed as run"),
        Err(e) => return crate::cli::report_parse_error(e),
    };
    let refuse = |why: &str| {
        eprintln!("herd: {why}");
        ExitCode::from(2)
    };
    if args
        .run
        .iter()
        .any(|a| a.to_string_lossy().chars().any(|c| c.is_control()))
    {
        return refuse(
            "an argument with a newline or other control character cannot go into ExecStart=",
        );
    }
    if args.socket && run.no_listen {
        return refuse("--socket with --no-listen: there is nothing for systemd to listen on");
    }
    if args.socket && run.balance == herd::Balance::Reuseport {
        return refuse(
            "--socket with --balance reuseport: reuseport needs a socket per worker, systemd \
             passes one per address (use shared or round-robin)",
        );
    }
    if !args
        .unit
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
    {
        return refuse(&format!("--unit {:?}: use A-Z a-z 0-9 - _ . @", args.unit));
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/usr/local/bin/herd".into());
    let cwd = std::env::current_dir()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/".into());
    let mut quoted: Vec<String> = args
        .run
        .iter()
        .map(|a| quote(&a.to_string_lossy()))
        .collect();
    // Named after the unit, so `herd status NAME` finds it.
    if run.name.is_none() && !run.no_control {
        quoted.splice(0..0, ["--name".to_string(), quote(&args.unit)]);
    }
    let name = &args.unit;
    let stop = run.stop_timeout.as_secs() + 10;
    let what = if run.command.is_empty() {
        "the built-in hello server".to_string()
    } else {
        run.command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
            .replace('%', "%%")
    };
    let mut service = String::new();
    let _ = write!(
        service,
        "# {name}.service, made by `herd systemd-unit`\n\
         [Unit]\n\
         Description=herd cluster: {what}\n\
         After=network.target\n"
    );
    if args.socket {
        let _ = writeln!(service, "Requires={name}.socket\nAfter={name}.socket");
    }
    let _ = write!(
        service,
        "\n[Service]\n\
         # herd says READY=1 once its workers are ready, RELOADING=1 around a reload.\n\
         Type=notify\n\
         NotifyAccess=main\n\
         ExecStart={exe} run {}\n\
         # A rolling reload with no connection lost (herd reload, or SIGHUP).\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         # SIGTERM to herd alone: it drains its workers within --stop-timeout ({:?});\n\
         # whatever is left gets SIGKILL after TimeoutStopSec.\n\
         KillMode=mixed\n\
         TimeoutStopSec={stop}\n\
         Restart=on-failure\n\
         # Exit 2 is bad input (flags, a name in use): restarting will not help.\n\
         RestartPreventExitStatus=2\n\
         # herd gives each worker a cgroup of its own when delegated one.\n\
         Delegate=yes\n\
         WorkingDirectory={cwd}\n\
         \n[Install]\n\
         WantedBy=multi-user.target\n",
        quoted.join(" "),
        run.stop_timeout
    );
    let mut socket = String::new();
    if args.socket {
        let _ = write!(
            socket,
            "# {name}.socket, made by `herd systemd-unit --socket`: systemd binds, herd takes\n\
             # the sockets (matched to -l by address, or by FileDescriptorName=).\n\
             [Unit]\n\
             Description=sockets of the herd cluster {name}\n\
             \n[Socket]\n"
        );
        // FileDescriptorName= names every socket of the unit: written only
        // when the one -l has a name (herd matches the others by address).
        let one_name = match run.listen.as_slice() {
            [one] if one.name != one.address.kind() => Some(one.name.clone()),
            _ => None,
        };
        for spec in &run.listen {
            match &spec.address {
                // `%` starts a unit specifier: written as `%%`.
                ListenAddress::Tcp(a) => {
                    let a = specifiers(&a.socket_addr().to_string());
                    let _ = writeln!(socket, "ListenStream={a}");
                }
                ListenAddress::Udp(a) => {
                    let a = specifiers(&a.socket_addr().to_string());
                    let _ = writeln!(socket, "ListenDatagram={a}");
                }
                ListenAddress::Unix(p) => {
                    let p = specifiers(&p.display().to_string());
                    let _ = writeln!(socket, "ListenStream={p}");
                }
            }
        }
        if let Some(n) = one_name {
            let _ = writeln!(socket, "FileDescriptorName={n}");
        }
        if run.listen.is_empty() {
            let _ = writeln!(socket, "ListenStream=127.0.0.1:8000");
        }
        let _ = write!(socket, "\n[Install]\nWantedBy=sockets.target\n");
    }
    match &args.out {
        Some(dir) => {
            let write = |file: String, text: &str| {
                std::fs::write(dir.join(&file), text)
                    .map_err(|e| format!("cannot write {}: {e}", dir.join(&file).display()))
            };
            let mut done = write(format!("{name}.service"), &service);
            if args.socket && done.is_ok() {
                done = write(format!("{name}.socket"), &socket);
            }
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(why) => {
                    eprintln!("herd: {why}");
                    ExitCode::from(1)
                }
            }
        }
        None => {
            print!("{service}");
            if args.socket {
                print!("\n{socket}");
            }
            ExitCode::SUCCESS
        }
    }
}

/// A value with systemd's `%` specifiers escaped.
fn specifiers(value: &str) -> String {
    value.replace('%', "%%")
}

/// An argument as systemd's ExecStart= reads it: quoted when it has
/// spaces, quotes, backslashes or `$`/`%` (which systemd would expand).
fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| !c.is_whitespace() && !matches!(c, '"' | '\'' | '\\' | '$' | '%' | ';'));
    if plain {
        return arg.to_string();
    }
    let mut out = String::from("\"");
    for c in arg.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '$' => out.push_str("$$"),
            '%' => out.push_str("%%"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn arguments_are_quoted_for_exec_start() {
        assert_eq!(super::quote("node"), "node");
        assert_eq!(super::quote("a b"), "\"a b\"");
        assert_eq!(super::quote("echo $HOME 50%"), "\"echo $$HOME 50%%\"");
        assert_eq!(super::quote(""), "\"\"");
    }
}
