//! `--log-file`: herd's and the workers' lines go to a file instead of
//! stdout and stderr, rotated by size, and reopened on SIGUSR1 for an
//! external logrotate.
//!
//! The writer threads write to it (never the supervisor), so a slow disk
//! backs up their queues and then drops lines, as a stalled stdout does;
//! a write that fails (a full disk) drops and counts the line. Only a
//! regular file is rotated: `/dev/null` or a FIFO is written as it is.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Where lines go, and how the file is kept in bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// The file; created (mode 0640) if missing, appended to.
    pub path: PathBuf,
    /// Past this size (bytes) the file is rotated: `PATH` becomes
    /// `PATH.1`, `PATH.1` becomes `PATH.2`, … `None`: never (for an
    /// external logrotate that sends SIGUSR1).
    pub max_size: Option<u64>,
    /// How many rotated files are kept (`PATH.1` … `PATH.KEEP`); older
    /// ones are deleted. 0: the file is emptied when it is full.
    pub keep: usize,
}

pub(crate) struct Rotating {
    config: LogFile,
    file: File,
    size: u64,
    regular: bool,
}

static FILE: OnceLock<Mutex<Rotating>> = OnceLock::new();
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Sends every line herd writes to `config.path` from now on. Call it
/// before anything is logged; only once per process.
pub fn log_to_file(config: LogFile) -> io::Result<()> {
    let (file, size, regular) = open(&config.path)?;
    let rotating = Rotating {
        config,
        file,
        size,
        regular,
    };
    FILE.set(Mutex::new(rotating))
        .map_err(|_| io::Error::other("a log file is already in use"))
}

/// Reopens the log file before the next line (SIGUSR1: an external
/// logrotate moved it). Returns whether herd writes to a log file.
pub fn reopen() -> bool {
    REOPEN.store(true, Ordering::Relaxed);
    FILE.get().is_some()
}

/// The log file, locked for a write, if lines go to one.
pub(crate) fn file() -> Option<Locked> {
    FILE.get()
        .map(|m| Locked(m.lock().unwrap_or_else(|e| e.into_inner())))
}

/// The log file, held by one writer thread for one line.
pub(crate) struct Locked(MutexGuard<'static, Rotating>);

impl Write for Locked {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether lines go to a log file.
pub(crate) fn in_use() -> bool {
    FILE.get().is_some()
}

fn open(path: &Path) -> io::Result<(File, u64, bool)> {
    // Non-blocking to open: a FIFO with no reader fails (ENXIO) instead of
    // hanging herd's start. Writes block as usual (on the writer threads).
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => io::Error::other("a FIFO that nobody reads"),
            _ => e,
        })?;
    let flags = rustix::fs::fcntl_getfl(&file)?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)?;
    let meta = file.metadata()?;
    Ok((file, meta.len(), meta.is_file()))
}

impl Rotating {
    fn rotate(&mut self) -> io::Result<()> {
        let path = &self.config.path;
        let numbered = |n: usize| {
            let mut p = path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.config.keep == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(numbered(self.config.keep));
        for n in (1..self.config.keep).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        std::fs::rename(path, numbered(1))?;
        (self.file, self.size, self.regular) = open(path)?;
        Ok(())
    }

    /// Writes one line (or notice), rotating or reopening first as due.
    fn write_line(&mut self, bytes: &[u8]) -> io::Result<()> {
        if REOPEN.swap(false, Ordering::Relaxed) {
            (self.file, self.size, self.regular) = open(&self.config.path)?;
        }
        if let Some(max) = self.config.max_size {
            if self.regular && self.size > 0 && self.size + bytes.len() as u64 > max {
                // A file that cannot be rotated is still written to.
                let _ = self.rotate();
            }
        }
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }
}

impl Write for Rotating {
    /// One call is one line: `write_all` hands the whole line at once.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_line(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_the_size_and_keeps_so_many() {
        let dir = std::env::temp_dir().join(format!("herd-logfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("herd.log");
        let (file, size, regular) = open(&path).unwrap();
        let mut r = Rotating {
            config: LogFile {
                path: path.clone(),
                max_size: Some(100),
                keep: 2,
            },
            file,
            size,
            regular,
        };
        for i in 0..20 {
            r.write_all(format!("line {i:02} of the test....\n").as_bytes())
                .unwrap();
        }
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap_or_default();
        assert!(read("herd.log").len() <= 100);
        assert!(read("herd.log").ends_with("line 19 of the test....\n"));
        assert!(
            read("herd.log.1").starts_with("line 12"),
            "{}",
            read("herd.log.1")
        );
        assert!(!read("herd.log.2").is_empty());
        assert!(!dir.join("herd.log.3").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
