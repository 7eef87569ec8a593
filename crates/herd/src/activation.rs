//! The worker side of socket activation: adopt the sockets herd (or systemd)
//! passed in `LISTEN_FDS`, the way `sd_listen_fds_with_names(3)` does.

use std::os::fd::{OwnedFd, RawFd};

use crate::sys;

/// One inherited socket with its `LISTEN_FDNAMES` entry.
#[derive(Debug)]
pub struct InheritedSocket {
    /// The name from `LISTEN_FDNAMES` (`unknown` when none was given).
    pub name: String,
    /// The socket, now owned by this process and close-on-exec.
    pub fd: OwnedFd,
}

/// What kind of socket an inherited descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// A listening TCP socket (IPv4 or IPv6).
    TcpListener,
    /// A listening Unix stream socket.
    UnixListener,
    /// A UDP socket.
    Udp,
    /// Anything else (not a socket, or a kind herd does not hand out).
    Other,
}

impl InheritedSocket {
    /// Asks the kernel what the socket is.
    pub fn kind(&self) -> SocketKind {
        let sock = socket2::SockRef::from(&self.fd);
        let (Ok(ty), Ok(addr)) = (sock.r#type(), sock.local_addr()) else {
            return SocketKind::Other;
        };
        let family = addr.family() as i32;
        match ty {
            socket2::Type::STREAM if family == libc::AF_UNIX => SocketKind::UnixListener,
            socket2::Type::STREAM => SocketKind::TcpListener,
            socket2::Type::DGRAM if family != libc::AF_UNIX => SocketKind::Udp,
            _ => SocketKind::Other,
        }
    }
}

/// Why inherited sockets could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` is not a number.
    #[error("LISTEN_FDS={0:?} is not a number")]
    BadCount(String),
    /// A descriptor named by `LISTEN_FDS` is not open.
    #[error("inherited descriptor {fd} is not open: {source}")]
    NotOpen {
        /// The descriptor number.
        fd: RawFd,
        /// What fcntl said.
        source: std::io::Error,
    },
}

/// Whether sockets were passed to this very process (`LISTEN_FDS` set and
/// `LISTEN_PID` naming it), as systemd's socket activation does.
pub fn passed_to_us() -> bool {
    std::env::var_os("LISTEN_FDS").is_some()
        && std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            == Some(std::process::id())
}

/// Takes the sockets passed to this process, or an empty list when none were
/// (no `LISTEN_FDS`, or `LISTEN_PID` names another process: the variables were
/// meant for an ancestor). Call it once: a second call would adopt the same
/// descriptors twice.
pub fn take_listen_fds() -> Result<Vec<InheritedSocket>, ActivationError> {
    let Ok(count) = std::env::var("LISTEN_FDS") else {
        return Ok(Vec::new());
    };
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|p| p == std::process::id());
    if !for_us {
        return Ok(Vec::new());
    }
    let count: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| ActivationError::BadCount(count.clone()))?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    (0..count)
        .map(|i| {
            let fd = sys::LISTEN_FDS_START + i;
            let fd = sys::adopt_inherited_fd(fd)
                .map_err(|source| ActivationError::NotOpen { fd, source })?;
            let name = names
                .next()
                .filter(|n| !n.is_empty())
                .unwrap_or("unknown")
                .to_string();
            Ok(InheritedSocket { name, fd })
        })
        .collect()
}
