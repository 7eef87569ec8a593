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

/// Under a `Type=notify` unit: a fake systemd (a datagram socket as
/// `NOTIFY_SOCKET`) sees `READY=1` once the workers are ready (once: the
/// workers' own `READY=1` go to herd, never to systemd), `RELOADING=1` with
/// `MONOTONIC_USEC` then `READY=1` around a reload, `STOPPING=1`, `STATUS=`
/// lines, and `WATCHDOG=1` at half of `WATCHDOG_USEC`.
#[test]
fn herd_tells_systemd_what_it_does() {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new("fake-systemd");
    let path = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let mut cmd = Command::new(herd_bin());
    cmd.args(["run", "-w", "2", "-l", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000");
    let mut herd = Herd::spawn(cmd);
    let mut got: Vec<String> = Vec::new();
    let read_until = |got: &mut Vec<String>, what: &str| {
        let deadline = std::time::Instant::now() + STARTUP;
        let mut buf = [0u8; 4096];
        while !got.iter().any(|m| m.contains(what)) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {what:?} in {got:?}"
            );
            if let Ok(n) = systemd.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    read_until(&mut got, "READY=1");
    herd.stderr
        .wait_for("a worker ready", STARTUP, |l| l.contains(" ready slot="));
    std::thread::sleep(std::time::Duration::from_millis(600));
    herd.signal("HUP");
    read_until(&mut got, "RELOADING=1");
    let reloading = got
        .iter()
        .find(|m| m.contains("RELOADING=1"))
        .unwrap()
        .clone();
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let now_usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
    assert!(
        usec <= now_usec && now_usec - usec < 30_000_000,
        "{usec} vs {now_usec}"
    );
    let after = got.len();
    read_until(&mut got, "STATUS=reload done");
    assert!(
        got[after - 1..].iter().any(|m| m.contains("READY=1")),
        "{got:?}"
    );
    herd.signal("TERM");
    read_until(&mut got, "STOPPING=1");
    herd.wait(STARTUP);
    // The order systemd saw, and nothing from the workers.
    let first = |what: &str| got.iter().position(|m| m.contains(what)).unwrap();
    assert!(first("READY=1") < first("RELOADING=1"), "{got:?}");
    assert!(first("RELOADING=1") < first("STOPPING=1"), "{got:?}");
    let readies = got.iter().filter(|m| m.contains("READY=1")).count();
    assert_eq!(readies, 2, "one at start, one after the reload: {got:?}");
    assert!(
        got.iter()
            .any(|m| m.starts_with("STATUS=2/2 ready") || m.contains("\nSTATUS=2/2 ready")),
        "{got:?}"
    );
    let watchdogs = got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(watchdogs >= 2, "{watchdogs} WATCHDOG=1 in {got:?}");
}

/// `systemd-socket-activate -l ADDR [--fdname NAME] herd run ARGS`: it
/// binds ADDR, and on the first connection execs herd with the socket as
/// fd 3 (`LISTEN_FDS`, `LISTEN_PID` = herd). Returns herd, once started.
fn socket_activated(port: u16, fdname: Option<&str>, args: &[&str]) -> Option<Herd> {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-socket-activate (Debian's systemd package) is missing");
        return None;
    }
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l").arg(format!("127.0.0.1:{port}"));
    if let Some(name) = fdname {
        cmd.arg(format!("--fdname={name}"));
    }
    cmd.arg(herd_bin()).args(args);
    let herd = Herd::spawn(cmd);
    herd.stderr
        .wait_for("listening", STARTUP, |l| l.starts_with("Listening on"));
    Some(herd)
}

/// Under socket activation with no `-l`, herd serves on the socket it was
/// passed (the connection that woke it included), never binding its own.
#[test]
fn socket_activated_herd_serves_the_socket_it_was_given() {
    let port = free_port();
    let Some(herd) = socket_activated(port, None, &["run", "-w", "2"]) else {
        return;
    };
    // This first connection makes systemd-socket-activate exec herd.
    let body = http_get(port).expect("served through the passed socket");
    assert!(body.contains("hello world"), "{body}");
    herd.stderr.wait_for("herd's listening line", STARTUP, |l| {
        l.contains(&format!(
            "INFO listening on 127.0.0.1:{port} (the socket systemd passed)"
        ))
    });
    assert!(http_get(port).is_ok());
    assert!(!herd.stderr.all().iter().any(|l| l.contains("in use")));
}

/// A `-l NAME=…` takes the passed socket of that `FileDescriptorName=`.
#[test]
fn socket_activation_matches_by_name() {
    let port = free_port();
    let Some(herd) = socket_activated(
        port,
        Some("web"),
        &["run", "-w", "1", "-l", "web=127.0.0.1:0"],
    ) else {
        return;
    };
    assert!(http_get(port).is_ok());
    herd.stderr.wait_for("listening by name", STARTUP, |l| {
        l.contains(&format!("listening on web=127.0.0.1:{port}"))
    });
}

/// A passed socket that no `-l` names is an error (exit 2, naming it),
/// not a socket left unserved.
#[test]
fn a_passed_socket_no_listen_spec_names_is_an_error() {
    let port = free_port();
    let other = free_port();
    let other_spec = format!("127.0.0.1:{other}");
    let Some(mut herd) = socket_activated(port, None, &["run", "-w", "1", "-l", &other_spec])
    else {
        return;
    };
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    assert_eq!(herd.wait(STARTUP).code(), Some(2));
    let err = herd.stderr.all().join("\n");
    assert!(
        err.contains(&format!(
            "systemd passed a socket no -l names: 127.0.0.1:{port}"
        )),
        "{err}"
    );
}

/// `herd systemd-unit --socket`: a service and a socket unit that
/// `systemd-analyze verify` accepts, with what a herd service needs.
#[test]
fn systemd_units_are_made_and_verify() {
    let dir = TempDir::new("units");
    let out = Command::new(herd_bin())
        .args(["systemd-unit", "--socket", "--unit", "shop", "--out"])
        .arg(dir.path())
        .args([
            "--",
            "-w",
            "4",
            "--stop-timeout",
            "30s",
            "-l",
            "web=127.0.0.1:8123",
            "--",
        ])
        .args(["node", "my app.js"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let service = std::fs::read_to_string(dir.path().join("shop.service")).unwrap();
    let socket = std::fs::read_to_string(dir.path().join("shop.socket")).unwrap();
    for want in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=mixed",
        "TimeoutStopSec=40",
        "Requires=shop.socket",
        " run --name shop -w 4 --stop-timeout 30s -l web=127.0.0.1:8123 -- node \"my app.js\"",
        "RestartPreventExitStatus=2",
    ] {
        assert!(service.contains(want), "{want:?} not in\n{service}");
    }
    assert!(
        socket.contains("ListenStream=127.0.0.1:8123\nFileDescriptorName=web"),
        "{socket}"
    );
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped verify: systemd-analyze is missing");
        return;
    }
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("shop.service"))
        .arg(dir.path().join("shop.socket"))
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // Bad run flags, and units that could not work: exit 2.
    for bad in [
        &["--", "-w", "0"][..],
        &["--socket", "--", "--balance", "reuseport", "-l", ":8080"],
        &["--socket", "--", "--no-listen"],
        &[
            "--",
            "--",
            "sh",
            "-c",
            "echo a\nExecStartPre=/bin/touch /tmp/x",
        ],
    ] {
        let out = Command::new(herd_bin())
            .arg("systemd-unit")
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
    // `%` is a unit specifier: escaped; two names: no FileDescriptorName=
    // (it would name both sockets), herd matches them by address.
    let two = Command::new(herd_bin())
        .args([
            "systemd-unit",
            "--socket",
            "--",
            "-l",
            "a=unix:/run/a%ib.sock",
            "-l",
        ])
        .args(["b=127.0.0.1:8124"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&two.stdout);
    assert!(text.contains("ListenStream=/run/a%%ib.sock"), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("FileDescriptorName=")),
        "{text}"
    );
}

/// `--no-listen` under socket activation: the passed socket would sit
/// unserved, so herd refuses to start (exit 2).
#[test]
fn passed_sockets_with_no_listen_are_refused() {
    let port = free_port();
    let Some(mut herd) = socket_activated(port, None, &["run", "--no-listen", "--", "sleep", "30"])
    else {
        return;
    };
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    assert_eq!(herd.wait(STARTUP).code(), Some(2));
    let err = herd.stderr.all().join("\n");
    assert!(err.contains("socket activation is off"), "{err}");
}

/// deploy/herd.yaml is a valid Kubernetes manifest (kubernetes-validate,
/// installed by scripts/install-test-deps), and the Dockerfile, the
/// manifest and the Nomad job all run herd with a stop timeout below the
/// orchestrator's grace period.
#[test]
fn deploy_manifests_are_valid_and_agree() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let manifest = root.join("deploy/herd.yaml");
    let yaml = std::fs::read_to_string(&manifest).unwrap();
    assert!(yaml.contains("terminationGracePeriodSeconds: 35"));
    assert!(yaml.contains("\"--stop-timeout\", \"20s\""));
    assert!(yaml.contains("path: /ready") && yaml.contains("path: /healthz"));
    let nomad = std::fs::read_to_string(root.join("deploy/herd.nomad.hcl")).unwrap();
    assert!(
        nomad.contains("kill_timeout = \"30s\"") && nomad.contains("\"--stop-timeout\", \"20s\"")
    );
    // The image's command line is one herd accepts.
    let docker = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let cmd = docker.lines().find(|l| l.starts_with("CMD ")).unwrap();
    let args: Vec<String> = serde_json::from_str(cmd.trim_start_matches("CMD ")).unwrap();
    let mut unit = vec!["systemd-unit".to_string(), "--".into()];
    unit.extend(args.into_iter().skip(1));
    let parsed = Command::new(herd_bin()).args(&unit).output().unwrap();
    assert!(
        parsed.status.success(),
        "{}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let validate = root.join("target/kv/bin/kubernetes-validate");
    if !validate.exists() {
        eprintln!("skipped: kubernetes-validate is not installed (scripts/install-test-deps)");
        return;
    }
    let out = Command::new(validate).arg(&manifest).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("passed for resource").count(), 2, "{text}");
}

/// `--user nobody`: herd (root) binds, each worker runs as nobody with its
/// groups and HOME/USER, serves herd's socket, and can still say READY=1
/// on its notify socket. Without root, `--user` is refused with exit 2.
#[test]
fn workers_run_as_the_user_given() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: --user needs root");
        return;
    }
    let script = format!(
        "echo \"ids=$(id -u):$(id -g) user=$USER home=$HOME\"; systemd-notify --ready --pid=$$ \
         2>/dev/null || true; exec {} hello",
        herd_bin().display()
    );
    let herd = Herd::sh(
        &[
            "-w",
            "2",
            "--user",
            "nobody",
            "--ready",
            "notify",
            "-l",
            "127.0.0.1:0",
        ],
        &script,
    );
    let line = herd
        .stdout
        .wait_for("the worker's ids", STARTUP, |l| l.contains("ids="));
    assert!(line.contains("ids=65534:65534 user=nobody"), "{line}");
    for n in 1..=2 {
        herd.stderr
            .wait_for_nth("ready by sd_notify", STARTUP, n, |l| {
                l.contains(" ready slot=")
            });
    }
    assert!(http_get(herd.port()).is_ok());
    for pid in herd.spawned() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        assert!(
            uid.split_whitespace().skip(1).all(|u| u == "65534"),
            "{pid}: {uid}"
        );
    }

    // Not root: refused, before anything starts.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(herd_bin())
        .args(["run", "--user", "root", "--no-listen", "--", "true"])
        .output();
    if let Ok(out) = out {
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs herd to run as root"));
    }
}
