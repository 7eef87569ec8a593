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
    // Listening sockets already read, by network namespace: herd's own
    // from sock_diag (listeners only), others from /proc/PID/net/tcp*.
    let own_netns = netns_of("self");
    let mut tables: HashMap<u64, HashMap<u64, SocketAddr>> = HashMap::new();
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
        let netns = netns_of(&p.to_string());
        let table = tables.entry(netns).or_insert_with(|| {
            let here = (netns == own_netns && netns != 0)
                .then(listening_here)
                .flatten();
            here.unwrap_or_else(|| {
                let mut t = process.tcp().unwrap_or_default();
                t.extend(process.tcp6().unwrap_or_default());
                t.into_iter()
                    .filter(|e| e.state == TcpState::Listen)
                    .map(|e| (e.inode, e.local_address))
                    .collect()
            })
        });
        found.extend(inodes.iter().filter_map(|inode| table.get(inode).copied()));
    }
    found.sort();
    found.dedup();
    found
}

/// The inode of a process's network namespace (`self` or a pid); 0 if unknown.
fn netns_of(process: &str) -> u64 {
    std::fs::metadata(format!("/proc/{process}/ns/net"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0)
}

/// The listening TCP sockets of herd's network namespace, by inode, from
/// the kernel's sock_diag netlink interface asked for listeners only: the
/// kernel walks its listening table alone, where `/proc/net/tcp` prints
/// every socket (measured: 28 ms for 14,000 entries, most of them
/// TIME_WAIT, on a host that had just served a load test). `None` if the
/// kernel does not answer as expected.
fn listening_here() -> Option<HashMap<u64, SocketAddr>> {
    use rustix::net::{
        netlink, recv, send, socket, AddressFamily, RecvFlags, SendFlags, SocketType,
    };
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const TCP_LISTEN: u32 = 10;
    let fd = socket(
        AddressFamily::NETLINK,
        SocketType::RAW,
        Some(netlink::SOCK_DIAG),
    )
    .ok()?;
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        // struct nlmsghdr, then struct inet_diag_req_v2 (linux/inet_diag.h).
        let mut req = Vec::with_capacity(72);
        req.extend(72u32.to_ne_bytes());
        req.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend(u32::from(family).to_ne_bytes()); // sequence
        req.extend(0u32.to_ne_bytes()); // port id: the kernel
        req.extend([family, libc::IPPROTO_TCP as u8, 0, 0]);
        req.extend((1u32 << TCP_LISTEN).to_ne_bytes()); // states
        req.extend([0u8; 48]); // struct inet_diag_sockid: any
        send(&fd, &req, SendFlags::empty()).ok()?;
        'dump: loop {
            let (_, n) = recv(&fd, &mut buf[..], RecvFlags::empty()).ok()?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().ok()?) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().ok()?);
                if len < 16 || at + len > n {
                    return None;
                }
                match kind {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => return None,
                    _ => {
                        if let Some((inode, addr)) = parse_diag_msg(&buf[at + 16..at + len]) {
                            out.insert(inode, addr);
                        }
                    }
                }
                at += (len + 3) & !3;
            }
            if n == 0 {
                return None;
            }
        }
    }
    Some(out)
}

/// A `struct inet_diag_msg`: the socket's inode and local address.
fn parse_diag_msg(m: &[u8]) -> Option<(u64, SocketAddr)> {
    if m.len() < 72 {
        return None;
    }
    let port = u16::from_be_bytes([m[4], m[5]]);
    let ip: std::net::IpAddr = match i32::from(m[0]) {
        libc::AF_INET => std::net::Ipv4Addr::new(m[8], m[9], m[10], m[11]).into(),
        libc::AF_INET6 => {
            let octets: [u8; 16] = m[8..24].try_into().ok()?;
            std::net::Ipv6Addr::from(octets).into()
        }
        _ => return None,
    };
    let inode = u32::from_ne_bytes(m[68..72].try_into().ok()?);
    Some((u64::from(inode), SocketAddr::new(ip, port)))
}

/// The resident memory (RSS, bytes) of worker `pid`'s whole process
/// tree: its cgroup's members, or its descendants. Run on a blocking-pool
/// thread: it reads procfs.
pub(super) fn tree_rss(pid: u32, cgroup: Option<&Path>) -> u64 {
    tree_usage(pid, cgroup).1
}

/// The CPU time (user + system, seconds; `None` if unreadable) and
/// resident memory (bytes) of worker `pid`'s process tree. Run on a
/// blocking-pool thread: it reads procfs.
pub(crate) fn tree_usage(pid: u32, cgroup: Option<&Path>) -> (Option<f64>, u64) {
    let page = procfs::page_size();
    let ticks = procfs::ticks_per_second() as f64;
    let (mut cpu, mut rss, mut seen) = (0u64, 0u64, false);
    for p in tree(pid, cgroup) {
        let Ok(proc) = Process::new(p as i32) else {
            continue;
        };
        if let Ok(stat) = proc.stat() {
            cpu += stat.utime + stat.stime;
            seen = true;
        }
        if let Ok(m) = proc.statm() {
            rss += m.resident * page;
        }
    }
    (seen.then(|| cpu as f64 / ticks), rss)
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
    fn sock_diag_lists_this_namespaces_listeners_with_their_inodes() {
        use std::os::fd::AsFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l6 = std::net::TcpListener::bind("[::1]:0").ok();
        let all = super::listening_here().expect("the kernel answers sock_diag");
        let inode = super::inode(l.as_fd()).unwrap();
        assert_eq!(all.get(&inode), Some(&l.local_addr().unwrap()));
        if let Some(l6) = l6 {
            let inode = super::inode(l6.as_fd()).unwrap();
            assert_eq!(all.get(&inode), Some(&l6.local_addr().unwrap()));
        }
        // A connected socket is no listener.
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(!all.contains_key(&super::inode(c.as_fd()).unwrap()));
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

#[cfg(test)]
mod timing {
    /// `cargo test -p herd --lib probe_cost -- --ignored --nocapture`: what
    /// one look at the listeners costs, sock_diag against /proc/net/tcp*.
    #[test]
    #[ignore]
    fn probe_cost() {
        let t = std::time::Instant::now();
        for _ in 0..20 {
            super::listening_here().unwrap();
        }
        let diag = t.elapsed() / 20;
        let me = procfs::process::Process::myself().unwrap();
        let t = std::time::Instant::now();
        for _ in 0..20 {
            let mut v = me.tcp().unwrap();
            v.extend(me.tcp6().unwrap());
        }
        let proc = t.elapsed() / 20;
        let entries = me.tcp().unwrap().len() + me.tcp6().unwrap().len();
        println!("sock_diag {diag:?}, /proc/net/tcp* {proc:?} ({entries} entries)");
    }
}
