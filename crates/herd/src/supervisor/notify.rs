//! sd_notify for workers: each worker gets a `NOTIFY_SOCKET` of its own.
//!
//! A worker says it is ready the way it would say so to systemd: `READY=1`
//! on the Unix datagram socket named by `NOTIFY_SOCKET` (`systemd-notify
//! --ready` from a shell script, Python's `sdnotify`, Go's
//! `daemon.SdNotify`, or any process of the worker's tree). One socket per
//! worker, so herd knows which worker spoke without trusting the sender's
//! credentials; the sockets live in a directory of herd's own, mode 0700,
//! removed when herd exits. herd's own `NOTIFY_SOCKET` (systemd's) is never
//! passed to workers. A reader task per worker turns datagrams into
//! [`Notice`]s for the supervisor; it reads at most 4 KiB a datagram and
//! the channel is bounded, so a chatty worker loses datagrams in the
//! kernel, not memory in herd.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use tokio::net::UnixDatagram;
use tokio::sync::mpsc;

/// The longest datagram read (sd_notify messages are a few lines).
const MAX_DATAGRAM: usize = 4096;
/// The longest `STATUS=` text kept.
const MAX_STATUS: usize = 256;

/// What a worker said on its notify socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Notice {
    /// `READY=1`.
    Ready,
    /// `STATUS=…`, cut at 256 bytes.
    Status(String),
    /// `WATCHDOG=1`: a heartbeat.
    Watchdog,
    /// `WATCHDOG=trigger`: the worker asks to be treated as hung.
    WatchdogTrigger,
}

/// The directory of the workers' notify sockets.
#[derive(Debug)]
pub(super) struct NotifyDir {
    path: PathBuf,
}

impl NotifyDir {
    /// A fresh directory, mode 0700, under `$XDG_RUNTIME_DIR` or the
    /// temporary directory.
    pub(super) fn create() -> io::Result<NotifyDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("herd-{}-{nanos:08x}", std::process::id());
        // Room for "/w<seq>" within sun_path's 107 bytes; a long TMPDIR
        // falls back to /tmp.
        let base = if base.join(&name).as_os_str().len() + 12 > crate::listen::UNIX_PATH_MAX {
            PathBuf::from("/tmp")
        } else {
            base
        };
        let path = base.join(name);
        sweep_stale(&base);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(NotifyDir { path })
    }

    /// Lets a worker running as `uid` send to its socket at `path`: the
    /// socket becomes its user's, and the directory searchable (not
    /// listable) by others. Best effort: without it, notifications are lost.
    pub(super) fn open_to(&self, uid: u32, gid: u32, path: &std::path::Path) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o711));
        let _ = std::os::unix::fs::chown(path, Some(uid), Some(gid));
    }

    /// A socket for one worker (`seq` is unique per worker): its path, for
    /// `NOTIFY_SOCKET`, and the bound socket (close-on-exec).
    pub(super) fn socket(
        &self,
        seq: u64,
    ) -> io::Result<(PathBuf, std::os::unix::net::UnixDatagram)> {
        let path = self.path.join(format!("w{seq}"));
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
        sock.set_nonblocking(true)?;
        Ok((path, sock))
    }

    /// Where the sockets are.
    #[cfg(test)]
    pub(super) fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for NotifyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes the notify directories of herds that died without removing
/// their own (SIGKILL): `herd-<pid>-<hex>` of ours, whose pid is gone.
fn sweep_stale(base: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let uid = rustix::process::geteuid().as_raw();
    for entry in entries.flatten().take(10_000) {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("herd-")) else {
            continue;
        };
        let Some((pid, hex)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), true) = (
            pid.parse::<i32>(),
            hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        ) else {
            continue;
        };
        let ours = entry
            .metadata()
            .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o777 == 0o700);
        let gone = rustix::process::Pid::from_raw(pid)
            .is_some_and(|p| rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH));
        if ours && gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Reads `sock` until the task is aborted (the worker exited), passing on
/// what the worker says, tagged with its slot and pid.
pub(super) async fn read(
    sock: std::os::unix::net::UnixDatagram,
    slot: usize,
    pid: u32,
    tx: mpsc::Sender<(usize, u32, Notice)>,
) {
    let Ok(sock) = UnixDatagram::from_std(sock) else {
        return;
    };
    // One byte more than a datagram may hold: a longer one is cut, and a
    // cut datagram is dropped whole (as systemd does), never half-read.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let Ok(n) = sock.recv(&mut buf).await else {
            return;
        };
        if n > MAX_DATAGRAM {
            continue;
        }
        for notice in parse(&buf[..n]) {
            if tx.send((slot, pid, notice)).await.is_err() {
                return;
            }
        }
    }
}

/// The notices in one datagram (`KEY=VALUE` lines; unknown keys ignored).
pub(super) fn parse(datagram: &[u8]) -> Vec<Notice> {
    let text = String::from_utf8_lossy(datagram);
    text.lines()
        .filter_map(|line| match line.split_once('=') {
            Some(("READY", "1")) => Some(Notice::Ready),
            Some(("WATCHDOG", "1")) => Some(Notice::Watchdog),
            Some(("WATCHDOG", "trigger")) => Some(Notice::WatchdogTrigger),
            Some(("STATUS", status)) => {
                let mut status = status.to_string();
                if status.len() > MAX_STATUS {
                    let mut cut = MAX_STATUS;
                    while !status.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    status.truncate(cut);
                }
                Some(Notice::Status(status))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_sd_notify_sends() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=serving 4 connections\nMAINPID=7\n"),
            [
                Notice::Ready,
                Notice::Status("serving 4 connections".into())
            ]
        );
        assert_eq!(parse(b"READY=0\nWATCHDOG=1"), [Notice::Watchdog]);
        assert_eq!(parse(b"WATCHDOG=trigger"), [Notice::WatchdogTrigger]);
        assert_eq!(parse(b"\xff\xfe"), []);
        let long = format!("STATUS={}", "é".repeat(300));
        let [Notice::Status(s)] = &parse(long.as_bytes())[..] else {
            panic!()
        };
        assert!(s.len() <= MAX_STATUS);
    }

    #[test]
    fn directories_of_dead_herds_are_swept() {
        let base = std::env::temp_dir().join(format!("herd-sweep-test-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        // pid 2^22 + 1 is above Linux's pid_max limit: never alive.
        let dead = base.join("herd-4194305-0badcafe");
        let alive = base.join(format!("herd-{}-0badcafe", std::process::id()));
        let other = base.join("herd-4194305-notmine");
        for d in [&dead, &alive, &other] {
            std::fs::DirBuilder::new().mode(0o700).create(d).unwrap();
        }
        std::fs::write(dead.join("w1"), b"").unwrap();
        sweep_stale(&base);
        assert!(!dead.exists());
        assert!(alive.exists() && other.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[tokio::test]
    async fn a_worker_socket_carries_readiness_to_the_reader() {
        let dir = NotifyDir::create().unwrap();
        let (path, sock) = dir.socket(1).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let reader = tokio::spawn(read(sock, 3, 42, tx));
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        assert_eq!(rx.recv().await, Some((3, 42, Notice::Ready)));
        reader.abort();
        let root = dir.path().to_path_buf();
        drop(dir);
        assert!(!root.exists(), "removed with herd");
    }
}
