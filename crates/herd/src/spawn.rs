//! Starting one socket-activated process without a supervisor.
//!
//! [`socket_activated`] prepares a `std::process::Command` exactly the way the
//! supervisor prepares a worker: the given sockets as descriptors 3, 4, …,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID` set to the child's own pid,
//! nothing else inherited, own process group, and `PR_SET_PDEATHSIG(SIGKILL)`
//! (the child dies when the thread that spawned it exits). Benchmarks use it
//! to measure workers with no supervisor at all; tools can use it to hand a
//! socket to a single server.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;

use crate::config::WorkerCommand;
use crate::sys::ExecPlan;

/// Builds a command that runs `command` with `sockets` (name, descriptor) as
/// descriptors 3.. and the socket-activation variables, plus `env`. The
/// descriptors must stay open until the command is spawned.
pub fn socket_activated(
    command: &WorkerCommand,
    env: &[(OsString, OsString)],
    sockets: &[(&str, BorrowedFd<'_>)],
) -> io::Result<std::process::Command> {
    let entry = env_entry;
    let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).collect();
    let mut vars: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !k.as_bytes().starts_with(b"LISTEN_"))
        .chain(env.iter().cloned())
        .filter_map(|(k, v)| entry(&k, &v))
        .collect();
    if !sockets.is_empty() {
        vars.extend(entry(
            "LISTEN_FDS".as_ref(),
            sockets.len().to_string().as_ref(),
        ));
        vars.extend(entry("LISTEN_FDNAMES".as_ref(), names.join(":").as_ref()));
    }
    let argv = argv_cstrings(command);
    let fds = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let plan = ExecPlan::new(&command.program, argv, vars, fds, None, None, None)?;
    let mut cmd = std::process::Command::new(&command.program);
    cmd.process_group(0);
    plan.install(&mut cmd);
    Ok(cmd)
}

/// `KEY=VALUE` as exec wants it; `None` if either holds a NUL byte.
pub(crate) fn env_entry(key: &OsStr, value: &OsStr) -> Option<CString> {
    let mut bytes = Vec::with_capacity(key.len() + value.len() + 1);
    bytes.extend_from_slice(key.as_bytes());
    bytes.push(b'=');
    bytes.extend_from_slice(value.as_bytes());
    CString::new(bytes).ok()
}

/// The command's argv as exec wants it (arguments holding a NUL byte, which
/// no exec can pass, are dropped).
pub(crate) fn argv_cstrings(command: &WorkerCommand) -> Vec<CString> {
    command
        .argv
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect()
}
