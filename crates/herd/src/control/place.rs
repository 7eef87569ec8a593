//! Where control sockets live, and claiming a name without stealing one.
//!
//! Each running cluster owns `DIR/NAME.sock` and `DIR/NAME.lock`. The lock
//! file carries an exclusive `flock` for the cluster's lifetime; the kernel
//! drops it when the process dies, however it dies. So a name is taken
//! exactly while its lock is held: a herd that gets the lock may replace
//! whatever socket file is there (its owner is dead), and one that does not
//! never touches it. No check-then-act on the socket itself (connecting to
//! see whether anyone answers races with a herd that is just starting).
//!
//! The lock file is never deleted: unlinking it while another herd has it
//! open but not yet locked would let two herds hold "the" lock on two
//! different inodes. (A lock taken is re-checked against the path's inode,
//! so a lock file deleted by hand does not break this either.)

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use super::ControlError;

/// The longest cluster name.
pub const MAX_NAME: usize = 64;

/// The directory of control sockets: `$HERD_RUNTIME_DIR` if set; for
/// root `/run/herd` (as systemd services and root shells agree on it);
/// else `$XDG_RUNTIME_DIR/herd`; else `/tmp/herd-UID`.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HERD_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/herd");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("herd");
    }
    PathBuf::from(format!("/tmp/herd-{}", uid.as_raw()))
}

/// Makes `dir` (mode 0700) if missing and checks that it is a directory
/// owned by this user that nobody else can write: another user's
/// directory could hold a socket that impersonates a cluster.
pub fn prepare_dir(dir: &Path) -> Result<(), ControlError> {
    let err = |why: String| ControlError::Dir(dir.to_path_buf(), why);
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(err(e.to_string())),
    }
    check_dir(dir)
}

/// Checks an existing `dir` as [`prepare_dir`] does.
pub fn check_dir(dir: &Path) -> Result<(), ControlError> {
    let err = |why: String| ControlError::Dir(dir.to_path_buf(), why);
    let meta = std::fs::symlink_metadata(dir).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(err("not a directory".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(err(format!(
            "owned by uid {}, not by this user (uid {me})",
            meta.uid()
        )));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(err(format!(
            "others may write to it (mode {:o}); chmod 700 it",
            meta.permissions().mode() & 0o7777
        )));
    }
    Ok(())
}

/// Whether `name` may name a cluster: 1–64 of `A-Z a-z 0-9 . _ -`, not
/// starting with `.` or `-`.
pub fn check_name(name: &str) -> Result<(), ControlError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ControlError::BadName(name.to_string()))
    }
}

/// A name made from `text`: what `check_name` refuses replaced by `-`,
/// cut to fit; `herd` if nothing is left.
pub fn sanitize(text: &str) -> String {
    let mut name: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_start_matches(['.', '-']).to_string();
    name.truncate(MAX_NAME - 4); // room for a "-NNN" suffix
    if name.is_empty() {
        "herd".to_string()
    } else {
        name
    }
}

/// A cluster name held: the lock kept open, the socket path to bind.
#[derive(Debug)]
pub struct Claim {
    /// The name.
    pub name: String,
    /// `DIR/NAME.sock`.
    pub socket: PathBuf,
    _lock: File,
}

impl Claim {
    /// Takes `name` in `dir`. With `exact`, only that name (an error if a
    /// running cluster has it); otherwise the first free of `name`,
    /// `name-2`, `name-3`, … (up to 999).
    pub fn take(dir: &Path, name: &str, exact: bool) -> Result<Claim, ControlError> {
        check_name(name)?;
        prepare_dir(dir)?;
        let tries = if exact { 1 } else { 999 };
        for n in 1..=tries {
            let candidate = if n == 1 {
                name.to_string()
            } else {
                format!("{name}-{n}")
            };
            if let Some(claim) = Claim::try_one(dir, &candidate)? {
                return Ok(claim);
            }
        }
        Err(ControlError::Taken(name.to_string()))
    }

    fn try_one(dir: &Path, name: &str) -> Result<Option<Claim>, ControlError> {
        let lock_path = dir.join(format!("{name}.lock"));
        let io_err = |e: io::Error| ControlError::Io(lock_path.clone(), e);
        loop {
            let lock = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&lock_path)
                .map_err(io_err)?;
            match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
                Err(e) => return Err(io_err(e.into())),
            }
            // The path may have been replaced between open and lock.
            let held = lock.metadata().map_err(io_err)?;
            match std::fs::symlink_metadata(&lock_path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {}
                _ => continue,
            }
            let socket = dir.join(format!("{name}.sock"));
            // Ours now: whatever socket is there belongs to a dead herd.
            match std::fs::remove_file(&socket) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ControlError::Io(socket, e)),
            }
            return Ok(Some(Claim {
                name: name.to_string(),
                socket,
                _lock: lock,
            }));
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // The lock file stays (see the module docs); the socket goes.
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The names with a socket file in `dir`, sorted: the clusters that may be
/// running (a SIGKILLed herd leaves its socket file; connecting to it is
/// refused, and the next herd of that name replaces it).
pub fn candidates(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let name = name.strip_suffix(".sock")?.to_string();
            check_name(&name).ok().map(|()| name)
        })
        .collect();
    names.sort();
    names
}

/// The clusters running in `dir`: the [`candidates`] whose socket accepts
/// a connection (a dead herd's refuses).
pub fn running(dir: &Path) -> Vec<String> {
    candidates(dir)
        .into_iter()
        .filter(|n| std::os::unix::net::UnixStream::connect(dir.join(format!("{n}.sock"))).is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "herd-place-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_held_name_is_never_taken_and_a_released_one_is() {
        let dir = tempdir();
        let first = Claim::take(&dir, "app", true).unwrap();
        assert!(matches!(
            Claim::take(&dir, "app", true),
            Err(ControlError::Taken(_))
        ));
        let second = Claim::take(&dir, "app", false).unwrap();
        assert_eq!(second.name, "app-2");
        // A live owner's socket file is left alone by the others.
        std::fs::write(&first.socket, b"live").unwrap();
        assert!(Claim::take(&dir, "app", true).is_err());
        assert!(first.socket.exists());
        assert_eq!(candidates(&dir), vec!["app".to_string()]);
        // Its owner gone (a SIGKILLed herd leaves its socket file), a
        // stale socket file is replaced.
        drop(first);
        std::fs::write(dir.join("app.sock"), b"stale").unwrap();
        let again = Claim::take(&dir, "app", true).unwrap();
        assert!(!again.socket.exists(), "the stale socket file was removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_are_checked_and_made_safe() {
        assert!(check_name("my-app_2.v1").is_ok());
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(sanitize("app.js"), "app.js");
        assert_eq!(sanitize("../x y"), "x-y");
        assert_eq!(sanitize("///"), "herd");
        assert!(check_name(&sanitize(&"é".repeat(100))).is_ok());
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = tempdir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(prepare_dir(&dir), Err(ControlError::Dir(..))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
