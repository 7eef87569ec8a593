//! Noticing a server that ignores herd's socket.
//!
//! `python3 -m http.server 8001` or `uvicorn app:app --port 8001` under
//! `herd run -l 127.0.0.1:8000` bind an address of their own: requests to
//! herd's address hang in a socket nobody accepts on, while the workers
//! serve elsewhere or crash-loop on EADDRINUSE. The kernel says which
//! listening sockets a worker holds (`/proc/PID/fd` and `/proc/PID/net/tcp*`,
//! for every process of its tree: its cgroup's members, or its descendants)
//! and herd knows the inodes of its own, so a worker listening on a socket
//! herd did not give it is noticed a few seconds after it starts (the
//! reading happens on a blocking-pool thread, never the supervisor's); a worker that dies of "address already in use"
//! is noticed at its exit. The supervisor says so once, with the fix.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::path::Path;

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

/// The most processes of one worker's tree looked at.
const MAX_PROCESSES: usize = 256;

/// The processes of a worker's tree: its cgroup's members when it has a
/// cgroup (grandchildren, double-forked daemons), else the worker and its
/// descendants as `/proc/*/task/*/children` lists them.
fn tree(pid: u32, cgroup: Option<&Path>) -> Vec<u32> {
    if let Some(dir) = cgroup {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            let mut pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if !pids.contains(&pid) {
                pids.insert(0, pid);
            }
            pids.truncate(MAX_PROCESSES);
            return pids;
        }
    }
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() && pids.len() < MAX_PROCESSES {
        if let Ok(tasks) = Process::new(pids[i] as i32).and_then(|p| p.tasks()) {
            for task in tasks.flatten() {
                if let Ok(children) = task.children() {
                    for c in children {
                        if !pids.contains(&c) && pids.len() < MAX_PROCESSES {
                            pids.push(c);
                        }
                    }
                }
            }
        }
        i += 1;
    }
    pids
}

/// The TCP addresses that a worker's process tree listens on through
/// sockets not in `herds` (herd's own sockets' inodes), each process's
/// sockets looked up in its own network namespace's tables. Best effort: a
/// process that is gone or unreadable shows nothing. Reads /proc at length
/// (a worker may hold many descriptors): run it off the supervisor's thread.
pub(super) fn own_listeners(
    pid: u32,
    cgroup: Option<&Path>,
    herds: &HashSet<u64>,
) -> Vec<SocketAddr> {
    let mut found = Vec::new();
    // Tables already read, by network namespace.
    let mut tables: HashMap<u64, Vec<procfs::net::TcpNetEntry>> = HashMap::new();
    for p in tree(pid, cgroup) {
        let Ok(process) = Process::new(p as i32) else {
            continue;
        };
        let Ok(fds) = process.fd() else {
            continue;
        };
        let inodes: HashSet<u64> = fds
            .flatten()
            .filter_map(|fd| match fd.target {
                FDTarget::Socket(inode) if !herds.contains(&inode) => Some(inode),
                _ => None,
            })
            .collect();
        if inodes.is_empty() {
            continue;
        }
        let netns = std::fs::metadata(format!("/proc/{p}/ns/net"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap_or(0);
        let table = tables.entry(netns).or_insert_with(|| {
            let mut t = process.tcp().unwrap_or_default();
            t.extend(process.tcp6().unwrap_or_default());
            t
        });
        found.extend(
            table
                .iter()
                .filter(|e| e.state == TcpState::Listen && inodes.contains(&e.inode))
                .map(|e| e.local_address),
        );
    }
    found.sort();
    found.dedup();
    found
}

/// The resident memory (RSS, bytes) of worker `pid`'s whole process
/// tree: its cgroup's members, or its descendants. Run on a blocking-pool
/// thread: it reads procfs.
pub(super) fn tree_rss(pid: u32, cgroup: Option<&Path>) -> u64 {
    let page = procfs::page_size();
    tree(pid, cgroup)
        .into_iter()
        .filter_map(|p| Process::new(p as i32).ok()?.statm().ok())
        .map(|m| m.resident * page)
        .sum()
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
        let found = own_listeners(std::process::id(), None, &herd_inodes);
        assert!(found.contains(&mine.local_addr().unwrap()), "{found:?}");
        assert!(!found.contains(&herds.local_addr().unwrap()), "{found:?}");
    }

    #[test]
    fn measures_a_trees_resident_memory() {
        let rss = tree_rss(std::process::id(), None);
        // This test process holds at least its own binary's pages.
        assert!(rss > 1 << 20, "{rss}");
        assert_eq!(tree_rss(u32::MAX - 1, None), 0, "no such process");
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
