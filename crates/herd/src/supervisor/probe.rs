//! Noticing a server that ignores herd's socket.
//!
//! `python3 -m http.server 8001` or `uvicorn app:app --port 8001` under
//! `herd run -l 127.0.0.1:8000` bind an address of their own: requests to
//! herd's address hang in a socket nobody accepts on, while the workers
//! serve elsewhere or crash-loop on EADDRINUSE. The kernel says which
//! listening sockets a worker holds (`/proc/PID/fd` and `/proc/PID/net/tcp*`)
//! and herd knows the inodes of its own, so a worker (or one of its
//! children) listening on a socket herd did not give it is noticed a few
//! seconds after it starts; a worker that dies of "address already in use"
//! is noticed at its exit. The supervisor says so once, with the fix.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

use procfs::net::TcpState;
use procfs::process::{FDTarget, Process};

/// When, after its start, a worker's listening sockets are looked at
/// (a server may take seconds to load before it binds).
pub(super) const PROBE_AFTER: [std::time::Duration; 2] = [
    std::time::Duration::from_secs(2),
    std::time::Duration::from_secs(10),
];

/// The inode of a socket herd holds.
pub(super) fn inode(fd: BorrowedFd<'_>) -> Option<u64> {
    rustix::fs::fstat(fd).ok().map(|s| s.st_ino)
}

/// The TCP addresses that `pid` or its children listen on through sockets
/// not in `herds` (herd's own sockets' inodes). Best effort: a process that
/// is gone or unreadable shows nothing.
pub(super) fn own_listeners(pid: u32, herds: &HashSet<u64>) -> Vec<SocketAddr> {
    let Ok(process) = Process::new(pid as i32) else {
        return Vec::new();
    };
    let mut pids = vec![pid];
    if let Ok(children) = process.task_main_thread().and_then(|t| t.children()) {
        pids.extend(children);
    }
    let mut inodes = HashSet::new();
    for p in &pids {
        let Ok(fds) = Process::new(*p as i32).and_then(|p| p.fd()) else {
            continue;
        };
        inodes.extend(fds.flatten().filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) if !herds.contains(&inode) => Some(inode),
            _ => None,
        }));
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    // The worker's network namespace's tables (its own, should it have one).
    let mut tables = process.tcp().unwrap_or_default();
    tables.extend(process.tcp6().unwrap_or_default());
    let mut found: Vec<SocketAddr> = tables
        .into_iter()
        .filter(|e| e.state == TcpState::Listen && inodes.contains(&e.inode))
        .map(|e| e.local_address)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Whether a worker's last stderr lines say it could not bind an address
/// (Python, Go, Ruby: "Address already in use"; Node: EADDRINUSE).
pub(super) fn said_address_in_use(stderr: &[String]) -> bool {
    stderr.iter().any(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("address already in use") || l.contains("eaddrinuse")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_listener_of_its_own_and_not_herds() {
        let mine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let herds = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsFd;
        let herd_inodes: HashSet<u64> = inode(herds.as_fd()).into_iter().collect();
        let found = own_listeners(std::process::id(), &herd_inodes);
        assert!(found.contains(&mine.local_addr().unwrap()), "{found:?}");
        assert!(!found.contains(&herds.local_addr().unwrap()), "{found:?}");
    }

    #[test]
    fn address_in_use_as_servers_say_it() {
        for line in [
            "OSError: [Errno 98] Address already in use",
            "listen tcp :8000: bind: address already in use",
            "Error: listen EADDRINUSE: address already in use :::8000",
            "Errno::EADDRINUSE: Address already in use - bind(2) for \"0.0.0.0\" port 8000",
        ] {
            assert!(said_address_in_use(&[line.to_string()]), "{line}");
        }
        assert!(!said_address_in_use(&["Error: boom".to_string()]));
    }
}
