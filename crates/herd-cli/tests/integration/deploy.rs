//! Deployment: `-w auto` as a container or a cpuset limits it.

use std::path::PathBuf;
use std::process::Command;

use crate::util::*;

/// The worker count and how it was chosen, from herd's log.
fn auto_line(herd: &Herd) -> (String, usize) {
    let why = herd
        .stderr
        .wait_for("-w auto line", STARTUP, |l| l.contains("-w auto: "));
    let start = herd
        .stderr
        .wait_for("starting line", STARTUP, |l| l.contains("starting"));
    let n = start
        .split("workers=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no worker count in {start:?}"));
    (why, n)
}

/// `taskset -c 0 herd run -w auto`: one CPU in the affinity mask, one worker.
#[test]
fn auto_follows_the_affinity_mask() {
    if Command::new("taskset").arg("--version").output().is_err() {
        eprintln!("skipped: taskset (util-linux) is missing");
        return;
    }
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]).arg(herd_bin()).args([
        "run",
        "-w",
        "auto",
        "--no-listen",
        "--",
        "sleep",
        "30",
    ]);
    let herd = Herd::spawn(cmd);
    let (why, n) = auto_line(&herd);
    assert_eq!(n, 1, "{why}");
    assert!(
        why.contains("1 in this process's affinity mask") || why.contains("1 CPUs online"),
        "{why}"
    );
}

/// A cgroup of the cpu controller, removed on drop (once empty).
struct CpuCgroup(PathBuf);

impl CpuCgroup {
    /// A child cgroup limited to half a CPU, if this machine lets us make
    /// one (root, and a cpu controller: v1's, or v2's delegated).
    fn half_a_cpu() -> Option<CpuCgroup> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let name = format!("herd-test-{}-{}", std::process::id(), free_port());
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(dash) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (mount, fstype, opts) = (fields[4], fields[dash + 1], fields[dash + 3]);
            let dir = PathBuf::from(mount).join(&name);
            let made = if fstype == "cgroup" && opts.split(',').any(|o| o == "cpu") {
                std::fs::create_dir(&dir).is_ok()
                    && std::fs::write(dir.join("cpu.cfs_period_us"), "100000").is_ok()
                    && std::fs::write(dir.join("cpu.cfs_quota_us"), "50000").is_ok()
            } else if fstype == "cgroup2"
                && std::fs::read_to_string(PathBuf::from(mount).join("cgroup.subtree_control"))
                    .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
            {
                std::fs::create_dir(&dir).is_ok()
                    && std::fs::write(dir.join("cpu.max"), "50000 100000").is_ok()
            } else {
                continue;
            };
            if made {
                return Some(CpuCgroup(dir));
            }
            let _ = std::fs::remove_dir(&dir);
        }
        None
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        // Its processes are gone once herd is (killed on drop before this).
        eventually(STARTUP, || std::fs::remove_dir(&self.0).is_ok());
    }
}

/// herd in a cgroup with a quota of half a CPU (what `docker run
/// --cpus 0.5` or a Kubernetes `limits.cpu: 500m` makes) starts one
/// worker whatever the host's CPU count, and says why.
#[test]
fn auto_follows_the_cgroup_cpu_quota() {
    let Some(cgroup) = CpuCgroup::half_a_cpu() else {
        eprintln!(
            "skipped: cannot make a cgroup with a CPU quota here (needs root and a cpu controller)"
        );
        return;
    };
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo $$ > \"$1/cgroup.procs\" && exec \"$0\" run -w auto --no-listen -- sleep 30",
    ])
    .arg(herd_bin())
    .arg(&cgroup.0);
    let herd = Herd::spawn(cmd);
    let (why, n) = auto_line(&herd);
    assert_eq!(n, 1, "{why}");
    assert!(why.contains("a cgroup CPU quota of 0.50 CPUs"), "{why}");
    drop(herd);
    drop(cgroup);
}
