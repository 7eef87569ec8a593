//! The control plane: a Unix socket per running cluster that `herd ls`,
//! `herd status`, `herd reload`, `herd top` and other tools talk to.
//!
//! # Theory of operation
//!
//! * [`place`] decides where the socket lives (`$XDG_RUNTIME_DIR/herd/`,
//!   `/run/herd/` for root) and claims the cluster's name with a lock file
//!   held for the cluster's lifetime: a live cluster's socket is never
//!   replaced, a dead one's always is, with no window between the check
//!   and the act.
//! * The socket is bound (mode 0600, in a 0700 directory) when the cluster
//!   starts, before any worker, so a name that is taken fails the start.
//! * [`server`] accepts clients and checks each one's credentials
//!   (`SO_PEERCRED`: herd's own user or root). A task per client reads
//!   newline-delimited JSON [`protocol::Request`]s, bounded in size and
//!   time, and turns each into a typed [`Call`] for the supervisor, which
//!   answers through a oneshot. The supervisor never waits on a client.
//! * [`client`] is the blocking client the `herd` command uses; any tool
//!   can speak the protocol instead (docs/PROTOCOL.md).

use std::path::PathBuf;

use tokio::sync::oneshot;

pub mod client;
pub mod place;
pub mod protocol;
pub(crate) mod server;

pub use place::runtime_dir;

/// Where and under which name a cluster's control socket is made
/// ([`ClusterConfig::control`](crate::ClusterConfig::control)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// The directory ([`runtime_dir`] by default).
    pub dir: PathBuf,
    /// The cluster's name. `None`: derived from the command (`app` for
    /// `node app.js`), and made unique among running clusters (`app-2`).
    /// A name given is used as is, or the start fails if it is taken.
    pub name: Option<String>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            dir: runtime_dir(),
            name: None,
        }
    }
}

/// Why the control socket could not be made or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The directory cannot be made, or is unsafe to use.
    #[error(
        "control directory {0}: {1} (set HERD_RUNTIME_DIR to another, or run with --no-control)"
    )]
    Dir(PathBuf, String),
    /// A name with characters other than `A-Z a-z 0-9 . _ -`, or too long.
    #[error("bad cluster name {0:?}: use 1-64 of A-Z a-z 0-9 . _ - (not starting with . or -)")]
    BadName(String),
    /// A running cluster has the name.
    #[error("a cluster named {0:?} is already running (pick another with --name)")]
    Taken(String),
    /// No running cluster has the name.
    #[error("no cluster named {0:?} is running{1}")]
    NotRunning(String, String),
    /// The socket could not be used.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The other side broke the protocol.
    #[error("bad answer from the cluster: {0}")]
    Protocol(String),
}

/// The control socket, bound and claimed; closed and removed on drop.
#[derive(Debug)]
pub(crate) struct Bound {
    pub(crate) claim: place::Claim,
    pub(crate) listener: std::os::unix::net::UnixListener,
}

/// Claims a name and binds its socket.
pub(crate) fn bind(
    config: &ControlConfig,
    command: &crate::WorkerCommand,
) -> Result<Bound, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let (name, exact) = match &config.name {
        Some(name) => (name.clone(), true),
        None => (default_name(command), false),
    };
    let claim = place::Claim::take(&config.dir, &name, exact)?;
    if claim.socket.as_os_str().len() > crate::listen::UNIX_PATH_MAX {
        return Err(ControlError::Dir(
            config.dir.clone(),
            "too long for a socket path (set HERD_RUNTIME_DIR to a shorter one)".into(),
        ));
    }
    let io = |e| ControlError::Io(claim.socket.clone(), e);
    let listener = std::os::unix::net::UnixListener::bind(&claim.socket).map_err(io)?;
    std::fs::set_permissions(&claim.socket, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    Ok(Bound { claim, listener })
}

/// The name a cluster gets by default: the script's stem for an
/// interpreter running a script (`node app.js` → `app`, `python -m
/// uvicorn main:app` → `uvicorn`), else the program's file name.
pub fn default_name(command: &crate::WorkerCommand) -> String {
    let argv: Vec<String> = command
        .argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let stem = |s: &str| {
        let base = s.rsplit('/').next().unwrap_or(s);
        base.split('.').next().unwrap_or(base).to_string()
    };
    let program = stem(&command.program.to_string_lossy());
    const INTERPRETERS: &[&str] = &[
        "node", "nodejs", "bun", "deno", "python", "python3", "ruby", "perl", "php", "sh", "bash",
        "dash", "zsh", "java",
    ];
    let is_interpreter = INTERPRETERS.contains(&program.as_str())
        || program.starts_with("python3")
        || program == "herd";
    let named = if is_interpreter {
        argv.iter()
            .skip(1)
            .find(|a| !a.starts_with('-') && !a.is_empty() && !a.contains(' '))
            .map(|a| stem(a))
            .filter(|s| !s.is_empty())
            .unwrap_or(program)
    } else {
        program
    };
    place::sanitize(&named)
}

/// How to scale: to a number, or by a difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScaleTo {
    Exactly(usize),
    By(i64),
}

/// What a worker's tree to sample: its pid and cgroup.
pub(crate) type Target = (u32, Option<PathBuf>);

/// Requests from control clients to the supervisor.
#[derive(Debug)]
pub(crate) enum Call {
    /// The cluster's status (CPU and memory not yet sampled) and the
    /// workers to sample.
    Status(oneshot::Sender<(protocol::Status, Vec<Target>)>),
    Scale {
        to: ScaleTo,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    Restart {
        slot: usize,
        reply: oneshot::Sender<Result<protocol::WorkerRef, String>>,
    },
    Signal {
        signal: rustix::process::Signal,
        slot: Option<usize>,
        reply: oneshot::Sender<Result<Vec<protocol::WorkerRef>, String>>,
    },
}

/// CPU time and memory of a worker's process tree.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    pub(crate) cpu_s: Option<f64>,
    pub(crate) rss_bytes: Option<u64>,
}

impl Sample {
    /// Reads procfs: run on the blocking pool.
    pub(crate) fn of(pid: u32, cgroup: Option<&std::path::Path>) -> Sample {
        let (cpu_s, rss) = crate::supervisor::tree_usage(pid, cgroup);
        Sample {
            cpu_s,
            rss_bytes: Some(rss),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(argv: &[&str]) -> String {
        let cmd = crate::WorkerCommand {
            program: argv[0].into(),
            argv: argv.iter().map(|a| a.into()).collect(),
            env: Vec::new(),
            dir: None,
            runtime: Default::default(),
            origin: Default::default(),
        };
        default_name(&cmd)
    }

    #[test]
    fn default_names_follow_the_script() {
        assert_eq!(name_of(&["/usr/bin/node", "app.js"]), "app");
        assert_eq!(name_of(&["node", "--inspect", "dist/server.mjs"]), "server");
        assert_eq!(
            name_of(&["python3", "-m", "uvicorn", "main:app"]),
            "uvicorn"
        );
        assert_eq!(
            name_of(&["/srv/bin/api-server", "--port", "1"]),
            "api-server"
        );
        assert_eq!(name_of(&["sh", "-c", "exec sleep 9"]), "sh");
    }
}
