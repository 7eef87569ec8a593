//! Platform code: every `unsafe` block in herd lives in this module.
//!
//! # Contract
//!
//! Code here runs in two very different worlds:
//!
//! * **Between fork and exec** (`pre_exec` hooks). The child of a threaded
//!   process may only make async-signal-safe calls: raw syscalls, no heap
//!   allocation, no locks, no `Drop` that frees. Every buffer such code touches
//!   is allocated by the parent *before* the fork and only written in place in
//!   the child. Functions that run there are marked `// fork-safe`.
//! * **In the primary**, where the usual rules hold.
//!
//! Everything exported from here is a safe function; callers never see a raw
//! pointer. Linux only (pidfds, `close_range`, `PR_SET_PDEATHSIG`, subreapers).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;

/// The first descriptor number a worker receives sockets on (systemd's `SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Room for any pid's decimal digits.
const PID_DIGITS: usize = 20;

/// Everything the child needs to exec a worker, prepared in the parent so the
/// child only copies integers and makes syscalls.
pub(crate) struct ExecPlan {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<usize>,
    env: Vec<Vec<u8>>,
    env_ptrs: Vec<usize>,
    listen_pid_entry: Option<usize>,
    fds: Vec<RawFd>,
    scratch: Vec<RawFd>,
    parent: i32,
    /// Where a failed execve's errno is written (close-on-exec pipe).
    exec_err: Option<RawFd>,
    /// The open-file limit to give the worker back.
    nofile: Option<NoFile>,
    /// `<its cgroup>/cgroup.procs`: the child writes "0" there to enter it.
    cgroup_procs: Option<CString>,
    /// Who the worker runs as (uid, gid, supplementary groups), set after
    /// everything that needs root (entering its cgroup).
    ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
}

/// Ignores the signals whose default action would end herd but which no
/// operator means for it (SIGXFSZ when a log file hits `ulimit -f`, SIGPROF,
/// SIGVTALRM, SIGIO, SIGPWR, SIGXCPU, SIGSYS, SIGSTKFLT, the real-time
/// signals): a stray one must not take the cluster down. The signals herd
/// acts on are handled by the supervisor; workers get every disposition
/// back to the default ([`ExecPlan`]).
pub(crate) fn ignore_stray_signals() {
    let mut signals = vec![
        libc::SIGXFSZ,
        libc::SIGPROF,
        libc::SIGVTALRM,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGXCPU,
        libc::SIGSYS,
        libc::SIGSTKFLT,
    ];
    signals.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    for sig in signals {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no
        // handler code; it affects only how the kernel delivers `sig`.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}

/// An RLIMIT_NOFILE value (soft, hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoFile {
    soft: libc::rlim_t,
    hard: libc::rlim_t,
}

/// Raises this process's soft open-file limit to its hard limit (what Go's
/// runtime does at start); returns the limit as it was, for workers.
pub(crate) fn raise_nofile_limit() -> io::Result<NoFile> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        let original = NoFile {
            soft: lim.rlim_cur,
            hard: lim.rlim_max,
        };
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(original)
    }
}

/// A pipe for a worker's stdout or stderr: (read end, write end), both
/// close-on-exec, its buffer as large as `/proc/sys/fs/pipe-max-size`
/// allows (best effort: the per-user pipe budget may refuse it).
pub(crate) fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pipe::{fcntl_setpipe_size, pipe_with, PipeFlags};
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let max = *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(1 << 20)
    });
    let (read, write) = pipe_with(PipeFlags::CLOEXEC)?;
    let _ = fcntl_setpipe_size(&read, max);
    Ok((read, write))
}

/// After the child of an [`ExecPlan`] exited: the errno its failed execve
/// wrote, or `None` (it exec'd, so the pipe closed empty). Non-blocking.
pub(crate) fn read_exec_errno(pipe: OwnedFd) -> Option<i32> {
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match rustix::io::read(&pipe, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    (got == 4).then(|| i32::from_ne_bytes(buf))
}

impl ExecPlan {
    /// Prepares an exec of `path` with `argv` (argv\[0\] included) and `env`
    /// (`KEY=VALUE` pairs, LISTEN_PID excluded: it is filled in by the child).
    /// `fds` become descriptors 3, 4, … in order; when `fds` is not empty
    /// `LISTEN_PID` is set to the worker's own pid.
    ///
    /// `exec_err` is the write end of a close-on-exec pipe: a failed execve
    /// writes its errno there ([`read_exec_errno`]). `nofile`, if given, is
    /// the open-file limit the worker gets.
    pub(crate) fn new(
        path: &Path,
        argv: Vec<CString>,
        env: Vec<CString>,
        fds: Vec<RawFd>,
        exec_err: Option<RawFd>,
        nofile: Option<NoFile>,
        cgroup: Option<&Path>,
    ) -> io::Result<Self> {
        let cgroup_procs = match cgroup {
            Some(dir) => Some(
                CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in cgroup path")
                })?,
            ),
            None => None,
        };
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))?;
        let mut env: Vec<Vec<u8>> = env.into_iter().map(|c| c.into_bytes_with_nul()).collect();
        let listen_pid_entry = if fds.is_empty() {
            None
        } else {
            let mut entry = LISTEN_PID_PREFIX.to_vec();
            entry.resize(LISTEN_PID_PREFIX.len() + PID_DIGITS + 1, 0);
            env.push(entry);
            Some(env.len() - 1)
        };
        let mut argv_ptrs: Vec<usize> = argv.iter().map(|a| a.as_ptr() as usize).collect();
        argv_ptrs.push(0);
        let mut env_ptrs: Vec<usize> = env.iter().map(|e| e.as_ptr() as usize).collect();
        env_ptrs.push(0);
        let scratch = vec![-1; fds.len()];
        Ok(ExecPlan {
            path,
            _argv: argv,
            argv_ptrs,
            env,
            env_ptrs,
            listen_pid_entry,
            fds,
            scratch,
            parent: std::process::id() as i32,
            exec_err,
            nofile,
            cgroup_procs,
            ids: None,
        })
    }

    /// The worker drops to `uid`, `gid` and supplementary `groups` last,
    /// before it execs.
    pub(crate) fn run_as(mut self, ids: Option<(u32, u32, Vec<u32>)>) -> Self {
        self.ids = ids;
        self
    }

    /// Installs the plan as the command's `pre_exec` hook: the hook execs the
    /// worker itself (so it can set `LISTEN_PID` to its own pid) and never
    /// returns to std's exec. Also: own process group (set by the caller with
    /// `process_group(0)`), `PR_SET_PDEATHSIG(SIGKILL)`, empty signal mask,
    /// default SIGPIPE, every descriptor but 0-2 and the sockets closed on exec.
    pub(crate) fn install(mut self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure only makes async-signal-safe calls (see
        // `exec_in_child`) on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || self.exec_in_child());
        }
    }

    // fork-safe
    fn exec_in_child(&mut self) -> io::Result<()> {
        // SAFETY: plain syscalls on valid, pre-allocated arguments; this is the
        // child of a fork, and nothing here allocates or takes a lock.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            // Every disposition back to the default: herd ignores some
            // signals, and an ignored signal stays ignored across exec.
            for sig in 1..=libc::SIGRTMAX() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }

            // Die with the primary. This fires when the *thread* that forked
            // exits; herd spawns from the runtime's main thread, which lives as
            // long as the process (see supervisor.rs).
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != self.parent {
                // The primary died between fork and prctl.
                libc::_exit(1);
            }

            // Move the sockets to 3, 4, …: first out of the way (above the
            // target range, so no source is overwritten), then into place.
            // dup2 leaves the targets without CLOEXEC, as they must be.
            let first_free = LISTEN_FDS_START + self.fds.len() as RawFd;
            // The exec-error pipe, out of the range about to be overwritten
            // (it stays close-on-exec).
            let exec_err = match self.exec_err {
                Some(fd) => libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free),
                None => -1,
            };
            if self.exec_err.is_some() && exec_err < 0 {
                return Err(io::Error::last_os_error());
            }
            for (i, &src) in self.fds.iter().enumerate() {
                let tmp = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, first_free);
                if tmp < 0 {
                    return Err(io::Error::last_os_error());
                }
                self.scratch[i] = tmp;
            }
            for (i, &tmp) in self.scratch.iter().enumerate() {
                if libc::dup2(tmp, LISTEN_FDS_START + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Whatever else is open (descriptors herd inherited from its own
            // parent without CLOEXEC, say) must not reach the worker. With an
            // exec-error pipe of our own, close it all now rather than at
            // exec: std's error pipe is among it, so the parent's `spawn()`
            // returns at once instead of waiting for the rest of this set-up
            // (entering a cgroup can take ~15 ms). Nothing below reports to
            // std any more: a failed execve reports on our pipe.
            if exec_err >= 0 {
                if exec_err > first_free {
                    libc::syscall(
                        libc::SYS_close_range,
                        first_free as libc::c_uint,
                        (exec_err - 1) as libc::c_uint,
                        0 as libc::c_uint,
                    );
                }
                libc::syscall(
                    libc::SYS_close_range,
                    (exec_err + 1) as libc::c_uint,
                    libc::c_uint::MAX,
                    0 as libc::c_uint,
                );
            } else {
                const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
                libc::syscall(
                    libc::SYS_close_range,
                    first_free as libc::c_uint,
                    libc::c_uint::MAX,
                    CLOSE_RANGE_CLOEXEC,
                );
            }

            // Enter the worker's own cgroup before it execs, so every
            // descendant is born in it. Best effort: the process group still
            // contains the worker if this fails.
            if let Some(procs) = &self.cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }

            if let Some(n) = self.nofile {
                let lim = libc::rlimit {
                    rlim_cur: n.soft,
                    rlim_max: n.hard,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }

            // Drop to the worker's user last: groups, then gid, then uid
            // (after setuid the others are no longer allowed). A failure
            // must not exec the worker as root: report it as exec errors
            // are, and exit.
            if let Some((uid, gid, groups)) = &self.ids {
                let failed = libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0;
                if failed {
                    let errno = *libc::__errno_location();
                    if exec_err >= 0 {
                        let bytes = errno.to_ne_bytes();
                        libc::write(exec_err, bytes.as_ptr().cast(), bytes.len());
                    }
                    libc::_exit(126);
                }
            }

            if let Some(idx) = self.listen_pid_entry {
                let entry = &mut self.env[idx];
                let digits = &mut entry[LISTEN_PID_PREFIX.len()..];
                write_decimal(digits, libc::getpid() as u64);
            }

            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.as_ptr() as *const *const libc::c_char,
                self.env_ptrs.as_ptr() as *const *const libc::c_char,
            );
            // exec failed. std's error pipe may have been replaced by the fd
            // shuffle above, so report the errno on our own pipe (the
            // primary turns it into an error naming the file) and exit like
            // a shell does.
            let errno = *libc::__errno_location();
            if exec_err >= 0 {
                let bytes = errno.to_ne_bytes();
                libc::write(exec_err, bytes.as_ptr().cast(), bytes.len());
            }
            let code = if errno == libc::ENOENT { 127 } else { 126 };
            libc::_exit(code);
        }
    }
}

/// Writes `value` in decimal followed by a NUL into `buf`; returns the digit count.
// fork-safe
fn write_decimal(buf: &mut [u8], mut value: u64) -> usize {
    let mut tmp = [0u8; PID_DIGITS];
    let mut n = 0;
    loop {
        tmp[n] = b'0' + (value % 10) as u8;
        value /= 10;
        n += 1;
        if value == 0 {
            break;
        }
    }
    for i in 0..n {
        buf[i] = tmp[n - 1 - i];
    }
    buf[n] = 0;
    n
}

/// Starts the orphan guardian: a forked (never exec'd) child that blocks on a
/// pipe from the primary. Through the pipe the primary announces each
/// worker's process group (`+pgid` as a native-endian i32) and withdraws it
/// when the worker is reaped (`-pgid`). When the pipe reaches EOF — the
/// primary exited or was SIGKILLed — the guardian SIGKILLs every announced
/// group and every process whose environment carries `marker`
/// (`HERD_PRIMARY_PID=<pid>`, inherited by all worker descendants, even
/// daemons that left the group with setsid), then exits.
///
/// Returns the guardian process and the pipe's (non-blocking) write end.
///
/// With `cgroup` (herd's cgroup, parent of every worker's), it first
/// writes `cgroup.kill` there, which ends every process of every worker
/// whatever it did to escape, and removes the emptied cgroups.
///
/// It names itself `herd: guardian of <pid>` (its process title, what `ps`
/// shows) and `herd-guardian` (its comm), so nobody takes it for a worker.
pub(crate) fn spawn_guardian(
    marker: &str,
    cgroup: Option<&Path>,
) -> io::Result<(tokio::process::Child, OwnedFd)> {
    let cgroup = cgroup.and_then(|c| CString::new(c.as_os_str().as_bytes()).ok());
    use rustix::pipe::{pipe_with, PipeFlags};
    let (read, write) = pipe_with(PipeFlags::CLOEXEC)?;
    rustix::io::ioctl_fionbio(&write, true)?;
    let mut marker = marker.as_bytes().to_vec();
    marker.push(0);
    let title = Title::prepare(&format!("herd: guardian of {}", std::process::id()));
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    // SAFETY: `guardian_main` only makes async-signal-safe syscalls on stack
    // buffers and on `marker`, allocated before the fork; it never returns.
    unsafe {
        cmd.pre_exec(move || {
            title.apply();
            guardian_main(&marker, cgroup.as_deref())
        });
    }
    let child = cmd.spawn()?;
    Ok((child, write))
}

/// A process title prepared in the parent and written in a forked child
/// that never execs: its `comm` (PR_SET_NAME) and the memory its
/// `/proc/PID/cmdline` shows (the argv area inherited from herd).
struct Title {
    text: Vec<u8>,
    /// herd's argv area, from /proc/self/stat (fields arg_start, arg_end).
    area: Option<(usize, usize)>,
}

impl Title {
    fn prepare(text: &str) -> Title {
        let area = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| {
                // Fields after the command name, which may hold spaces.
                let rest = stat.rsplit_once(") ")?.1;
                let fields: Vec<&str> = rest.split_whitespace().collect();
                // arg_start and arg_end are fields 48 and 49 (1-based, comm is 2).
                let start = fields.get(48 - 3)?.parse().ok()?;
                let end = fields.get(49 - 3)?.parse().ok()?;
                (end > start).then_some((start, end))
            });
        let mut text = text.as_bytes().to_vec();
        text.push(0);
        Title { text, area }
    }

    // fork-safe
    fn apply(&self) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15
        // bytes by the kernel). The argv area [start, end) is memory of this
        // process (this forked child's private copy of herd's), mapped and
        // writable for the life of the process, and nothing in this child
        // reads it again: the child never returns to Rust code.
        unsafe {
            libc::prctl(
                libc::PR_SET_NAME,
                c"herd-guardian".as_ptr() as libc::c_ulong,
                0,
                0,
                0,
            );
            if let Some((start, end)) = self.area {
                let len = end - start;
                let dst = start as *mut u8;
                let n = self.text.len().min(len);
                std::ptr::copy_nonoverlapping(self.text.as_ptr(), dst, n);
                std::ptr::write_bytes(dst.add(n), 0, len - n);
                if n == len {
                    *dst.add(len - 1) = 0;
                }
            }
        }
    }
}

const GUARDIAN_MAX_GROUPS: usize = 4096;

// fork-safe
fn guardian_main(marker: &[u8], cgroup: Option<&std::ffi::CStr>) -> ! {
    // SAFETY: raw syscalls on stack buffers in a forked child; see module docs.
    unsafe {
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGPIPE,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGALRM,
            libc::SIGWINCH,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Closing everything above stdio closes std's exec-error pipe (so the
        // primary's spawn() returns) and the pipe's write end (so EOF comes).
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );

        let mut groups = [0i32; GUARDIAN_MAX_GROUPS];
        let mut buf = [0u8; 4096];
        let mut have = 0usize;
        loop {
            let n = libc::read(0, buf[have..].as_mut_ptr().cast(), buf.len() - have);
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                break;
            }
            if n == 0 {
                break;
            }
            have += n as usize;
            let whole = have - have % 4;
            for chunk in buf[..whole].chunks_exact(4) {
                let v = i32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                if v > 0 {
                    if let Some(slot) = groups.iter_mut().find(|g| **g == 0) {
                        *slot = v;
                    }
                } else if v < 0 {
                    if let Some(slot) = groups.iter_mut().find(|g| **g == -v) {
                        *slot = 0;
                    }
                }
            }
            buf.copy_within(whole..have, 0);
            have -= whole;
        }

        if let Some(dir) = cgroup {
            cgroup_kill_all(dir);
        }
        for &g in groups.iter().filter(|g| **g > 0) {
            libc::kill(-g, libc::SIGKILL);
        }
        // Sweep until a pass finds nothing: a descendant may fork while we kill.
        for _ in 0..50 {
            if kill_marked(marker) == 0 {
                break;
            }
            let pause = libc::timespec {
                tv_sec: 0,
                tv_nsec: 5_000_000,
            };
            libc::nanosleep(&pause, std::ptr::null_mut());
        }
        if let Some(dir) = cgroup {
            // The killed are gone in a moment; their cgroups can go then.
            for _ in 0..20 {
                if cgroup_remove_all(dir) {
                    break;
                }
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 10_000_000,
                };
                libc::nanosleep(&pause, std::ptr::null_mut());
            }
        }
        libc::_exit(0);
    }
}

/// Writes "1" to `<dir>/cgroup.kill`: SIGKILL to every process in the
/// cgroup and its descendants.
// fork-safe
unsafe fn cgroup_kill_all(dir: &std::ffi::CStr) {
    let mut path = [0u8; 4096];
    if let Some(p) = join_path(&mut path, dir.to_bytes(), b"cgroup.kill") {
        let fd = libc::open(p.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, b"1".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

/// Removes every (empty) child cgroup of `dir`, then `dir`; true when done.
// fork-safe
unsafe fn cgroup_remove_all(dir: &std::ffi::CStr) -> bool {
    let d = libc::open(
        dir.as_ptr(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    if d < 0 {
        return true; // already gone
    }
    let mut dents = [0u8; 8192];
    let mut path = [0u8; 4096];
    loop {
        let n = libc::syscall(libc::SYS_getdents64, d, dents.as_mut_ptr(), dents.len());
        if n <= 0 {
            break;
        }
        let mut off = 0usize;
        while off < n as usize {
            let reclen = u16::from_ne_bytes([dents[off + 16], dents[off + 17]]) as usize;
            let kind = dents[off + 18];
            let name = &dents[off + 19..off + reclen];
            off += reclen;
            let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            let name = &name[..len];
            if kind != libc::DT_DIR || name == b"." || name == b".." {
                continue;
            }
            if let Some(p) = join_path(&mut path, dir.to_bytes(), name) {
                libc::rmdir(p.as_ptr().cast());
            }
        }
    }
    libc::close(d);
    libc::rmdir(dir.as_ptr()) == 0
}

/// `dir/name` NUL-terminated in `buf`, if it fits.
// fork-safe
fn join_path<'a>(buf: &'a mut [u8], dir: &[u8], name: &[u8]) -> Option<&'a [u8]> {
    let len = dir.len() + 1 + name.len();
    if len + 1 > buf.len() {
        return None;
    }
    buf[..dir.len()].copy_from_slice(dir);
    buf[dir.len()] = b'/';
    buf[dir.len() + 1..len].copy_from_slice(name);
    buf[len] = 0;
    Some(&buf[..=len])
}

/// SIGKILLs every process whose environment holds `marker` (NUL-terminated,
/// matched as a whole entry). Returns how many it signalled.
// fork-safe
unsafe fn kill_marked(marker: &[u8]) -> usize {
    let me = libc::getpid();
    let dir = libc::open(
        c"/proc".as_ptr(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    if dir < 0 {
        return 0;
    }
    let mut killed = 0;
    let mut dents = [0u8; 8192];
    let mut environ = [0u8; 65536];
    loop {
        let n = libc::syscall(libc::SYS_getdents64, dir, dents.as_mut_ptr(), dents.len());
        if n <= 0 {
            break;
        }
        let mut off = 0usize;
        while off < n as usize {
            // struct linux_dirent64 { u64 ino; i64 off; u16 reclen; u8 type; char name[]; }
            let reclen = u16::from_ne_bytes([dents[off + 16], dents[off + 17]]) as usize;
            let name = &dents[off + 19..off + reclen];
            off += reclen;
            let mut pid: i32 = 0;
            let mut digits = 0;
            for &b in name.iter().take_while(|b| **b != 0) {
                if !b.is_ascii_digit() {
                    digits = 0;
                    break;
                }
                pid = pid.saturating_mul(10).saturating_add((b - b'0') as i32);
                digits += 1;
            }
            if digits == 0 || pid == me {
                continue;
            }
            let mut path = [0u8; 40];
            let head = b"/proc/";
            path[..head.len()].copy_from_slice(head);
            let len = write_decimal(&mut path[head.len()..], pid as u64);
            let tail = b"/environ\0";
            path[head.len() + len..head.len() + len + tail.len()].copy_from_slice(tail);
            let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                continue;
            }
            let mut got = 0usize;
            while got < environ.len() {
                let r = libc::read(fd, environ[got..].as_mut_ptr().cast(), environ.len() - got);
                if r <= 0 {
                    break;
                }
                got += r as usize;
            }
            libc::close(fd);
            if env_has_entry(&environ[..got], marker) {
                libc::kill(pid, libc::SIGKILL);
                killed += 1;
            }
        }
    }
    libc::close(dir);
    killed
}

/// Whether a NUL-separated environment block holds `entry` (NUL-terminated) whole.
// fork-safe
fn env_has_entry(block: &[u8], entry: &[u8]) -> bool {
    let mut start = 0;
    while start < block.len() {
        let rest = &block[start..];
        if rest.len() >= entry.len() && &rest[..entry.len()] == entry {
            return true;
        }
        match rest.iter().position(|b| *b == 0) {
            Some(p) => start += p + 1,
            None => break,
        }
    }
    false
}

/// Takes ownership of an inherited descriptor after checking it is open.
/// Used by workers to adopt the sockets named by `LISTEN_FDS`.
pub(crate) fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD on any integer is harmless; it fails with EBADF if closed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open, was handed to this process by its
    // parent for it to own (socket activation), and nothing else in this
    // process refers to it: callers adopt each number once (see activation.rs).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Our own children must not inherit it.
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    debug_assert_eq!(owned.as_raw_fd(), fd);
    Ok(owned)
}

/// Registers `fd` with the current tokio runtime for readiness (a socket the
/// caller drives with raw syscalls, such as a listener it `accept4`s on).
pub(crate) fn register_async(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor
    // stays open and refers to the same file description until the AsyncFd
    // is dropped, and `OwnedFd::as_raw_fd` always returns that descriptor.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| e.into_parts().1)
}

/// How many connections wait in listening TCP socket `fd`'s accept queue:
/// `TCP_INFO`'s `tcpi_unacked`, which for a listener is the queue's length
/// (`sk_ack_backlog`, Linux `tcp_get_info`). `None` for a socket that is
/// not TCP or not listening.
pub(crate) fn accept_queue_len(fd: BorrowedFd<'_>) -> Option<u32> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable `tcp_info` of `len` bytes, alive for the
    // call; the kernel writes at most `len` bytes and sets `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < std::mem::size_of::<libc::tcp_info>().min(32) {
        return None;
    }
    // SAFETY: zero-initialised, and the kernel filled what it has.
    let info = unsafe { info.assume_init() };
    // TCP_LISTEN in the kernel's include/net/tcp_states.h.
    const TCP_LISTEN: u8 = 10;
    (info.tcpi_state == TCP_LISTEN).then_some(info.tcpi_unacked)
}

/// Steers new connections of a `SO_REUSEPORT` group (the group `fd`
/// belongs to) to the sockets at `targets` (their places in the group:
/// bind order), picked at random; with `targets` empty, back to the
/// kernel's own hash over every socket. A classic BPF program
/// (`SO_ATTACH_REUSEPORT_CBPF`, Linux 4.5): `A = random % n`, then a jump
/// table from `A` to `targets[A]`; an index out of range makes the kernel
/// use its hash, which is also how "every socket" is said.
pub(crate) fn steer_reuseport(fd: BorrowedFd<'_>, targets: &[u32]) -> io::Result<()> {
    const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let mut prog = Vec::with_capacity(3 + 2 * targets.len());
    if targets.is_empty() {
        prog.push(op(libc::BPF_RET | libc::BPF_K, u32::MAX));
    } else {
        let n = targets.len() as u32;
        prog.push(op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
        ));
        prog.push(op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, n));
        for (i, t) in targets.iter().enumerate() {
            // A == i: return targets[i]; else skip that return.
            prog.push(libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: i as u32,
            });
            prog.push(op(libc::BPF_RET | libc::BPF_K, *t));
        }
        prog.push(op(libc::BPF_RET | libc::BPF_K, targets[0]));
    }
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, alive for the call; the kernel
    // copies the program and validates it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_listeners_accept_queue_length() {
        use std::os::fd::AsFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(super::accept_queue_len(l.as_fd()), Some(0));
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // The handshakes complete in the kernel: three wait to be accepted.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while super::accept_queue_len(l.as_fd()) != Some(3) {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                super::accept_queue_len(l.as_fd())
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = l.accept().unwrap();
        assert_eq!(super::accept_queue_len(l.as_fd()), Some(2));
        // Not a listener.
        assert_eq!(super::accept_queue_len(clients[0].as_fd()), None);
    }

    use super::*;

    #[test]
    fn decimal() {
        let mut b = [0xffu8; 24];
        assert_eq!(write_decimal(&mut b, 0), 1);
        assert_eq!(&b[..2], b"0\0");
        assert_eq!(write_decimal(&mut b, 4194304), 7);
        assert_eq!(&b[..8], b"4194304\0");
    }

    #[test]
    fn env_entry_match_is_whole() {
        let block = b"A=1\0HERD_PRIMARY_PID=12\0B=2\0";
        assert!(env_has_entry(block, b"HERD_PRIMARY_PID=12\0"));
        assert!(!env_has_entry(block, b"HERD_PRIMARY_PID=1\0"));
        assert!(!env_has_entry(
            b"XHERD_PRIMARY_PID=12\0",
            b"HERD_PRIMARY_PID=12\0"
        ));
        assert!(env_has_entry(
            b"HERD_PRIMARY_PID=12\0",
            b"HERD_PRIMARY_PID=12\0"
        ));
    }
}
