//! How many CPUs this process may really use, for `-w auto`: the online
//! CPUs, narrowed by the scheduler affinity mask (`taskset`, a cpuset) and
//! by the cgroup CPU quota (a container's `--cpus`, Kubernetes'
//! `limits.cpu`: cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), as Go 1.25's
//! GOMAXPROCS and the JVM count. Inside a container limited to 2 CPUs on a
//! 64-core host that is 2, not 64.

use std::path::{Path, PathBuf};

/// What `-w auto` is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuBudget {
    /// CPUs online on the machine.
    pub online: usize,
    /// CPUs in this process's affinity mask, if it could be read.
    pub affinity: Option<usize>,
    /// The tightest cgroup CPU quota over this process's cgroup and its
    /// ancestors, in CPUs (`1.5`: 150 ms per 100 ms), if one is set.
    pub quota: Option<f64>,
}

impl CpuBudget {
    /// Reads the machine, the affinity mask and the cgroup quota.
    pub fn read() -> CpuBudget {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|t| count_cpu_list(&t))
            .unwrap_or(1);
        let affinity = rustix::thread::sched_getaffinity(None)
            .ok()
            .map(|set| set.count() as usize);
        CpuBudget {
            online: online.max(1),
            affinity,
            quota: cgroup_quota(),
        }
    }

    /// The number of workers: the affinity mask's CPUs, at most the quota
    /// rounded up (1.5 CPUs: 2 workers), at least 1.
    pub fn workers(&self) -> usize {
        let mut n = self.affinity.unwrap_or(self.online);
        if let Some(q) = self.quota {
            n = n.min(q.ceil().max(1.0) as usize);
        }
        n.max(1)
    }

    /// How the number was chosen, for the log.
    pub fn describe(&self) -> String {
        let n = self.workers();
        let mut why = vec![format!("{} CPUs online", self.online)];
        if let Some(a) = self.affinity.filter(|a| *a != self.online) {
            why.push(format!("{a} in this process's affinity mask"));
        }
        if let Some(q) = self.quota {
            why.push(format!("a cgroup CPU quota of {q:.2} CPUs"));
        }
        format!(
            "-w auto: {n} worker{} ({})",
            if n == 1 { "" } else { "s" },
            why.join(", ")
        )
    }
}

/// The CPUs in a kernel CPU list (`0-3,8-11`, `0`).
pub(crate) fn count_cpu_list(text: &str) -> Option<usize> {
    let mut n = 0;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse().ok()?)? + 1,
            None => part.parse::<usize>().map(|_| 1).ok()?,
        };
    }
    (n > 0).then_some(n)
}

/// cgroup v2 `cpu.max` (`"max 100000"`, `"150000 100000"`) in CPUs.
pub(crate) fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let quota: f64 = parts.next()?.parse().ok()?;
    let period: f64 = parts.next().unwrap_or("100000").parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// cgroup v1 `cpu.cfs_quota_us` (`-1`: none) over `cpu.cfs_period_us`.
pub(crate) fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.trim().parse().ok()?;
    let period: f64 = period.trim().parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// The tightest quota over this process's cgroups (v2, and v1's `cpu`
/// controller) and their ancestors up to each hierarchy's mount.
fn cgroup_quota() -> Option<f64> {
    let me = procfs::process::Process::myself().ok()?;
    let mounts = me.mountinfo().ok()?;
    let mut best: Option<f64> = None;
    let mut take = |q: Option<f64>| {
        if let Some(q) = q {
            best = Some(best.map_or(q, |b: f64| b.min(q)));
        }
    };
    for cg in me.cgroups().ok()? {
        let v2 = cg.hierarchy == 0;
        if !v2 && !cg.controllers.iter().any(|c| c == "cpu") {
            continue;
        }
        // Where that hierarchy is mounted, and which of its paths the
        // mount shows (a container sees its own cgroup as the root).
        let Some(mount) = mounts.iter().find(|m| {
            if v2 {
                m.fs_type == "cgroup2"
            } else {
                m.fs_type == "cgroup" && m.super_options.contains_key("cpu")
            }
        }) else {
            continue;
        };
        let root = mount.root.clone();
        let rel = Path::new(&cg.pathname)
            .strip_prefix(&root)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        let mut dir: PathBuf = mount.mount_point.join(rel);
        loop {
            take(if v2 {
                std::fs::read_to_string(dir.join("cpu.max"))
                    .ok()
                    .and_then(|t| parse_cpu_max(&t))
            } else {
                let q = std::fs::read_to_string(dir.join("cpu.cfs_quota_us"));
                let p = std::fs::read_to_string(dir.join("cpu.cfs_period_us"));
                q.ok().zip(p.ok()).and_then(|(q, p)| parse_cfs(&q, &p))
            });
            if dir == mount.mount_point || !dir.pop() {
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(count_cpu_list("5"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
    }

    #[test]
    fn quotas_read_as_cgroups_write_them() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("50000 100000"), Some(0.5));
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("200000\n", "100000\n"), Some(2.0));
    }

    #[test]
    fn workers_follow_the_tightest_limit() {
        let b = |online, affinity, quota| CpuBudget {
            online,
            affinity,
            quota,
        };
        assert_eq!(b(64, Some(64), None).workers(), 64);
        assert_eq!(b(64, Some(64), Some(2.0)).workers(), 2);
        assert_eq!(b(64, Some(64), Some(1.5)).workers(), 2);
        assert_eq!(b(64, Some(64), Some(0.25)).workers(), 1);
        assert_eq!(b(64, Some(3), Some(8.0)).workers(), 3);
        assert_eq!(b(4, None, None).workers(), 4);
        let text = b(64, Some(64), Some(2.0)).describe();
        assert_eq!(
            text,
            "-w auto: 2 workers (64 CPUs online, a cgroup CPU quota of 2.00 CPUs)"
        );
    }

    #[test]
    fn this_process_has_a_budget() {
        let b = CpuBudget::read();
        assert!(b.workers() >= 1 && b.workers() <= b.online, "{b:?}");
    }
}
