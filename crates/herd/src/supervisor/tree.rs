//! A worker is its whole process tree (systemd's KillMode=control-group):
//! when its main process exits, what it started is stopped too, never left
//! serving beside its replacement.
//!
//! Two mechanisms, the better one where it is available:
//!
//! * **cgroup v2**, where herd can create cgroups (root in a container, a
//!   systemd unit with `Delegate=yes`): each worker runs in a cgroup of its
//!   own, `<herd's cgroup>/herd-<pid>/worker-<n>`, which it enters before it
//!   execs. Every descendant stays in it, even one that leaves the process
//!   group (`setsid`) and scrubs its environment (`env -i`): after the stop
//!   timeout `cgroup.kill` ends them all.
//! * **process groups** elsewhere: each worker leads its own group, and
//!   what is left of the group when it exits is signalled. A descendant that
//!   leaves the group escapes this until herd exits (the guardian's sweep
//!   by `HERD_PRIMARY_PID` then finds it, unless it also scrubbed its
//!   environment).
//!
//! Which one is active is logged at start.

use std::io;
use std::path::{Path, PathBuf};

/// Where the supervisor keeps its workers' cgroups.
pub(crate) struct Cgroups {
    /// `<herd's cgroup>/herd-<pid>`: every worker cgroup is a child of it.
    root: PathBuf,
    next: u64,
}

impl Cgroups {
    /// Creates herd's cgroup under its own, if the system lets it.
    pub(crate) fn create() -> Result<Cgroups, String> {
        let mount = cgroup2_mount().ok_or("no cgroup v2 hierarchy is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("herd is in no cgroup v2 cgroup")?;
        let dir = mount.join(path.trim_start_matches('/'));
        let root = dir.join(format!("herd-{}", std::process::id()));
        match std::fs::create_dir(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", root.display())),
        }
        // Moving a process in must be allowed too (delegation, or root).
        let probe = root.join("cgroup.procs");
        if let Err(e) = std::fs::OpenOptions::new().write(true).open(&probe) {
            let _ = std::fs::remove_dir(&root);
            return Err(format!("cannot write {}: {e}", probe.display()));
        }
        Ok(Cgroups { root, next: 0 })
    }

    /// herd's cgroup, parent of every worker's.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// A new, empty cgroup for one worker.
    pub(crate) fn create_worker(&mut self) -> io::Result<PathBuf> {
        self.next += 1;
        let dir = self.root.join(format!("worker-{}", self.next));
        std::fs::create_dir(&dir)?;
        Ok(dir)
    }

    /// Removes herd's (empty) cgroup when the cluster is done.
    pub(crate) fn remove(self) {
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// Whether any process is left in cgroup `dir`.
pub(crate) fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// The processes in cgroup `dir`.
pub(crate) fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.parse().ok()).collect())
        .unwrap_or_default()
}

/// SIGKILLs everything in cgroup `dir` (`cgroup.kill`, Linux 5.14+; one by
/// one from `cgroup.procs` before that).
pub(crate) fn kill(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in procs(dir) {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Removes an empty worker cgroup.
pub(crate) fn remove(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid system).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        // Only a mount of the hierarchy's root maps paths from /proc/self/cgroup.
        if fields.get(3) != Some(&"/") {
            return None;
        }
        fields.get(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cgroup2_mount_or_none() {
        // Whatever this machine has, the answer is a directory or nothing.
        if let Some(m) = cgroup2_mount() {
            assert!(m.join("cgroup.procs").exists(), "{}", m.display());
        }
    }
}
