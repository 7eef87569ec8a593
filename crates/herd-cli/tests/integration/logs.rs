//! Worker output prefixed `[slot pid]`; `--log-format json`.

use std::process::Command;
use std::time::Duration;

use crate::util::*;

#[test]
fn worker_lines_are_prefixed_with_slot_and_pid() {
    let f = fixture_bin();
    let herd = Herd::start([
        "run",
        "-w",
        "2",
        "--no-listen",
        "--",
        f.to_str().unwrap(),
        "--print",
        "out-line",
        "--eprint",
        "err-line",
    ]);
    let pids = [herd.nth_spawned(1), herd.nth_spawned(2)];
    // herd's own lines say each thing once: no `slot=0 pid=…` after
    // "worker … spawned in slot 0".
    let spawned: Vec<String> = herd
        .stderr
        .all()
        .into_iter()
        .filter(|l| l.contains(" spawned in slot "))
        .collect();
    assert_eq!(spawned.len(), 2);
    for line in &spawned {
        assert!(!line.contains("slot=") && !line.contains("pid="), "{line}");
    }
    for (slot, pid) in pids.iter().enumerate() {
        let out = format!("[{slot} {pid}] out-line");
        herd.stdout.wait_for(&out, STARTUP, |l| l == out);
        let err = format!("[{slot} {pid}] err-line");
        herd.stderr.wait_for(&err, STARTUP, |l| l == err);
    }
}

#[test]
fn json_format_writes_one_object_per_line() {
    let f = fixture_bin();
    let mut herd = Herd::start([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--log-format",
        "json",
        "--",
        f.to_str().unwrap(),
        "--print",
        "tab\there \"quoted\"",
    ]);
    let pid = herd.nth_spawned(1);
    herd.stdout
        .wait_for("worker json line", STARTUP, |l| l.contains("quoted"));
    herd.signal("TERM");
    herd.wait(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(50));
    let out = herd.stdout.all();
    let err = herd.stderr.all();
    assert!(!err.is_empty());
    for line in out.iter().chain(&err) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.is_object());
    }
    let worker: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
    assert_eq!(worker["line"], "tab\there \"quoted\"");
    assert_eq!(worker["slot"], 0);
    assert_eq!(worker["pid"], pid);
    assert_eq!(worker["stream"], "stdout");
    // JSON lines keep every field.
    assert!(err.iter().any(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("spawned in slot 0")
            && v["slot"] == 0
            && v["pid"] == pid
    }));
}

/// A `herd` whose output nobody reads, SIGKILLed when dropped.
struct Unread {
    child: std::process::Child,
    _out: Option<std::process::ChildStdout>,
    _err: Option<std::process::ChildStderr>,
}

impl Drop for Unread {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn herd_with_piped_output(args: &[&str]) -> Unread {
    let mut child = std::process::Command::new(herd_bin())
        .args(args)
        .env("HERD_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn herd");
    let out = child.stdout.take();
    let err = child.stderr.take();
    Unread {
        child,
        _out: out,
        _err: err,
    }
}

/// Supervision never waits on herd's own output: with stderr on a pipe
/// nobody reads (and full), a killed worker is still reaped and replaced,
/// and SIGTERM still stops herd. (Before: the supervisor blocked in
/// write(2); only SIGKILL worked.)
#[test]
fn a_stalled_stderr_never_blocks_supervision() {
    let mut herd = herd_with_piped_output(&[
        "run",
        "-w",
        "2",
        "--no-listen",
        "--stop-timeout",
        "2s",
        "--",
        "sh",
        "-c",
        "head -c 2000000 /dev/zero | tr '\\0' x | fold -w 100 >&2; exec sleep 1000",
    ]);
    let pid = herd.child.id();
    assert!(eventually(STARTUP, || workers_of(pid).len() == 2));
    // Both workers have written 2 MB to stderr by now or soon; nobody reads.
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..3 {
        kill_one_and_see_it_replaced(pid, 2);
    }
    stop_with_term(&mut herd.child);
}

/// SIGKILLs one of herd's `n` workers; waits until another takes its place.
fn kill_one_and_see_it_replaced(herd: u32, n: usize) {
    let victim = workers_of(herd)[0];
    send_signal(victim, "KILL");
    assert!(
        eventually(STARTUP, || {
            let now = workers_of(herd);
            !now.contains(&victim) && now.len() == n
        }),
        "worker {victim} not replaced: {:?}",
        workers_of(herd)
    );
}

/// SIGTERM to herd; it must exit 0 in bounded time.
fn stop_with_term(herd: &mut std::process::Child) {
    send_signal(herd.id(), "TERM");
    let status = wait_child(herd, Duration::from_secs(15)).expect("herd stops");
    assert_eq!(status.code(), Some(0));
}

/// When herd's stdout reader goes away (`herd run | head -c 10000`), the
/// lines it cannot write are counted and the count is reported on stderr.
/// (Before: dropped silently.)
#[test]
fn lines_lost_to_a_closed_stdout_are_counted_and_reported() {
    let mut cmd = std::process::Command::new(herd_bin());
    cmd.args([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done; exec sleep 1000",
    ]);
    let mut herd = Herd::spawn_with_stdout(cmd, 10_000);
    herd.stderr
        .wait_for("the worker", STARTUP, |l| l.contains(" spawned in slot "));
    // Give the worker time to write all its lines into the void.
    std::thread::sleep(Duration::from_secs(2));
    herd.signal("TERM");
    assert_eq!(herd.wait(Duration::from_secs(20)).code(), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    let report = herd.stderr.wait_for("the drop report", STARTUP, |l| {
        l.starts_with("herd: ") && l.contains("dropped while stdout was closed")
    });
    let n: u64 = report["herd: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .replace(',', "")
        .parse()
        .unwrap();
    assert!(n > 1000, "{report}");
    // Nothing was lost on stderr (the report itself is not a lost line).
    assert_eq!(
        herd.stderr.count(|l| l.contains("dropped while stderr")),
        0,
        "{}",
        herd.stderr.all().join("\n")
    );
}

/// herd's stderr reader going away does not take the cluster down (no
/// panic on EPIPE): herd still replaces a killed worker and stops cleanly.
#[test]
fn a_closed_stderr_does_not_kill_herd() {
    let mut herd = herd_with_piped_output(&[
        "run",
        "-w",
        "2",
        "--no-listen",
        "--stop-timeout",
        "2s",
        "--",
        "sleep",
        "1000",
    ]);
    let pid = herd.child.id();
    assert!(eventually(STARTUP, || workers_of(pid).len() == 2));
    drop(herd._err.take()); // the reader is gone: writes get EPIPE
    kill_one_and_see_it_replaced(pid, 2);
    assert!(alive(pid));
    stop_with_term(&mut herd.child);
}

/// Each of herd's streams drains on its own: one worker flooding a stalled
/// stdout does not hold up another worker's stderr lines. (Before: one
/// writer thread and one queue for both streams.)
#[test]
fn a_stalled_stdout_does_not_hold_up_stderr() {
    let mut cmd = std::process::Command::new(herd_bin());
    cmd.args([
        "run",
        "-w",
        "2",
        "--no-listen",
        "--",
        "sh",
        "-c",
        "if [ $HERD_WORKER_ID = 0 ]; then yes flooding-stdout | head -n 2000000; exec sleep 1000; \
         else i=0; while [ $i -lt 60 ]; do echo tick-$i >&2; i=$((i+1)); sleep 0.05; done; exec sleep 1000; fi",
    ]);
    // stdout is a pipe that is never read after the first byte.
    let herd = Herd::spawn_with_stdout(cmd, 0);
    herd.stderr
        .wait_for("the last tick", Duration::from_secs(20), |l| {
            l.ends_with("] tick-59")
        });
}

/// A worker's last words survive its exit: 4 Node workers each print 300
/// lines of 1000 bytes and exit at once; all 1200 lines arrive, in order
/// per worker. (Before: Node dropped 30–60% of the lines still queued for
/// a full pipe at exit.)
#[test]
fn last_words_of_exiting_node_workers_all_arrive() {
    if node_missing() {
        return;
    }
    let script = "const pad = 'x'.repeat(990); \
                  for (let i = 0; i < 300; i++) console.log(String(i).padStart(5, '0') + ' ' + pad); \
                  process.exit(0);";
    let (status, _) = {
        let mut herd = Herd::start([
            "run",
            "-w",
            "4",
            "--no-listen",
            "--restart",
            "never",
            "--",
            "node",
            "-e",
            script,
        ]);
        let status = herd.wait(Duration::from_secs(30));
        herd.stdout
            .wait_for_nth("1200 lines", Duration::from_secs(10), 1200, |l| {
                l.ends_with('x')
            });
        let lines = herd.stdout.all();
        let mut per_worker: std::collections::HashMap<String, Vec<u32>> = Default::default();
        for l in &lines {
            let (prefix, rest) = l.split_once("] ").unwrap();
            let n: u32 = rest[..5].parse().unwrap();
            per_worker.entry(prefix.to_string()).or_default().push(n);
        }
        assert_eq!(per_worker.len(), 4, "{per_worker:?}");
        for (w, ns) in &per_worker {
            assert_eq!(*ns, (0..300).collect::<Vec<_>>(), "worker {w}");
        }
        (status, ())
    };
    assert_eq!(status.code(), Some(0));
}

/// Everything workers wrote before a cluster finished reaches herd's output:
/// herd drains their pipes before it exits. (Before: up to a fifth of the
/// last lines vanished, uncounted, when herd exited right after them.)
#[test]
fn output_written_just_before_the_end_is_not_lost() {
    let mut herd = Herd::start([
        "run",
        "-w",
        "2",
        "--no-listen",
        "--restart",
        "never",
        "--",
        "sh",
        "-c",
        "seq 1 40000",
    ]);
    assert_eq!(herd.wait(Duration::from_secs(30)).code(), Some(0));
    let lines = herd
        .stdout
        .wait_for_nth("80,000 lines", Duration::from_secs(10), 80_000, |l| {
            l.starts_with('[')
        });
    assert!(lines.ends_with("40000") || !lines.is_empty());
    for pid in herd.spawned() {
        let last = format!(" {pid}] 40000");
        assert_eq!(herd.stdout.count(|l| l.ends_with(&last)), 1, "worker {pid}");
    }
}

/// `--merge-output` gives a worker one pipe for both streams, as `2>&1`
/// would: its lines keep their order (read apart, stdout and stderr lines
/// interleave out of order, which garbles stack traces).
#[test]
fn merged_output_keeps_a_workers_lines_in_order() {
    let mut herd = Herd::start([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--restart",
        "never",
        "--merge-output",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 500 ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); done",
    ]);
    assert_eq!(herd.wait(Duration::from_secs(30)).code(), Some(0));
    herd.stdout
        .wait_for_nth("1000 lines", Duration::from_secs(10), 1000, |l| {
            l.contains("] out-") || l.contains("] err-")
        });
    let got: Vec<String> = herd
        .stdout
        .all()
        .iter()
        .filter_map(|l| l.split_once("] ").map(|(_, t)| t.to_string()))
        .collect();
    let want: Vec<String> = (0..500)
        .flat_map(|i| [format!("out-{i}"), format!("err-{i}")])
        .collect();
    assert_eq!(got, want);
}

/// A command line (or a package.json script) with a newline or fields in it
/// cannot forge herd's log lines or fields: values are quoted and escaped.
#[test]
fn herds_own_lines_cannot_be_forged_by_the_command() {
    let herd = Herd::start([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--",
        "sh",
        "-c",
        "sleep 30",
        "workers=99 balance=evil\nFORGED ERROR line",
    ]);
    let line = herd.stderr.wait_for("the starting line", STARTUP, |l| {
        l.contains("starting command=")
    });
    herd.nth_spawned(1);
    assert!(
        line.contains(
            r#"command="sh -c sleep 30 workers=99 balance=evil\nFORGED ERROR line" workers=1"#
        ),
        "{line}"
    );
    assert!(
        !herd.stderr.all().iter().any(|l| l.starts_with("FORGED")),
        "{:?}",
        herd.stderr.all()
    );
}

/// `--log-file` with `--log-max-size` and `--log-keep`: herd's lines and
/// the workers' go to the file, never past its size, rotated into
/// `PATH.1`, `PATH.2`, and no more are kept.
#[test]
fn log_file_rotates_by_size_and_keeps_so_many() {
    let dir = TempDir::new("logfile");
    let log = dir.path().join("herd.log");
    let script =
        "i=0; while [ $i -lt 400 ]; do echo \"line $i of a worker, padded to be long enough\"; \
                  i=$((i+1)); done; exec sleep 30";
    let log_arg = log.to_str().unwrap();
    let herd = Herd::sh(
        &[
            "-w",
            "1",
            "--no-listen",
            "--log-file",
            log_arg,
            "--log-max-size",
            "4KiB",
            "--log-keep",
            "2",
        ],
        script,
    );
    let numbered = |n: usize| dir.path().join(format!("herd.log.{n}"));
    assert!(
        eventually(STARTUP, || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("line 399 of a worker"))
        }),
        "the last line never reached the file"
    );
    assert!(numbered(1).exists() && numbered(2).exists());
    assert!(!numbered(3).exists(), "only 2 rotated files are kept");
    for path in [log.clone(), numbered(1), numbered(2)] {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.len() <= 4096,
            "{}: {} bytes",
            path.display(),
            text.len()
        );
        assert!(
            text.lines()
                .all(|l| l.starts_with("[0 ") || l.contains("INFO")),
            "{text}"
        );
    }
    // Nothing went to herd's own streams.
    assert!(herd.stdout.all().is_empty(), "{:?}", herd.stdout.all());
    assert!(herd.stderr.all().is_empty(), "{:?}", herd.stderr.all());
}

/// SIGUSR1 reopens the log file: after logrotate moved it, new lines go to
/// a new file at the path.
#[test]
fn sigusr1_reopens_the_log_file() {
    let dir = TempDir::new("logreopen");
    let log = dir.path().join("app.log");
    let script = "i=0; while [ $i -lt 400 ]; do echo \"tick $i\"; i=$((i+1)); sleep 0.05; done";
    let herd = Herd::sh(
        &[
            "-w",
            "1",
            "--no-listen",
            "--log-file",
            log.to_str().unwrap(),
            "--log-max-size",
            "0",
        ],
        script,
    );
    assert!(eventually(STARTUP, || std::fs::read_to_string(&log)
        .is_ok_and(|t| t.contains("tick 2"))));
    let moved = dir.path().join("app.log.moved");
    std::fs::rename(&log, &moved).unwrap();
    herd.signal("USR1");
    assert!(
        eventually(STARTUP, || std::fs::read_to_string(&log).is_ok_and(|t| t
            .contains("reopening the log file")
            && t.contains("] tick"))),
        "no new file"
    );
    // The moved file is no longer written to.
    let before = std::fs::read_to_string(&moved).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(std::fs::read_to_string(&moved).unwrap(), before);
}

/// A log file on a full disk (`/dev/full`: every write fails with ENOSPC)
/// drops lines and counts them; supervision and the control socket go on.
#[test]
fn a_full_disk_drops_lines_and_supervision_goes_on() {
    let script = "while :; do echo \"noise from $HERD_WORKER_ID\"; sleep 0.01; done";
    let herd = Herd::sh(
        &[
            "-w",
            "2",
            "--no-listen",
            "--name",
            "full",
            "--log-file",
            "/dev/full",
        ],
        script,
    );
    let mut status = serde_json::Value::Null;
    assert!(eventually(STARTUP, || {
        let Some(s) = herd.try_status("full") else {
            return false;
        };
        status = s;
        status["counters"]["log_lines_dropped"].as_u64() > Some(10)
            && status["ready"].as_u64() == Some(2)
    }));
    let victim = status["slots"][0]["workers"][0]["pid"].as_u64().unwrap() as u32;
    send_signal(victim, "KILL");
    assert!(
        eventually(STARTUP, || {
            let Some(s) = herd.try_status("full") else {
                return false;
            };
            let pid = s["slots"][0]["workers"][0]["pid"].as_u64();
            pid.is_some() && pid != Some(u64::from(victim)) && s["counters"]["restarts_killed"] == 1
        }),
        "the killed worker was not replaced"
    );
}

/// A FIFO (`pipe`) in a fresh directory.
fn fifo(tag: &str) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new(tag);
    let fifo = dir.path().join("pipe");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    (dir, fifo)
}

/// Only a regular file is rotated: a FIFO (or /dev/null) given as the log
/// file is written to as it is, never renamed.
#[test]
fn a_log_file_that_is_no_regular_file_is_never_rotated() {
    let (dir, fifo) = fifo("logfifo");
    // Its reader, opened before herd starts (read-write: the open does
    // not wait for a writer), counting lines; the thread ends with the
    // test binary (it holds a write end itself, so it never sees EOF).
    let read_end = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let count = count.clone();
        std::thread::spawn(move || {
            for _ in std::io::BufRead::lines(std::io::BufReader::new(read_end)) {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let script = "i=0; while [ $i -lt 200 ]; do echo \"line $i\"; i=$((i+1)); done; exec sleep 30";
    let mut herd = Herd::sh(
        &[
            "-w",
            "1",
            "--no-listen",
            "--log-file",
            fifo.to_str().unwrap(),
            "--log-max-size",
            "100",
        ],
        script,
    );
    let lines = || count.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(STARTUP, || lines() >= 200),
        "{} lines through the FIFO",
        lines()
    );
    herd.signal("TERM");
    herd.wait(STARTUP);
    let meta = std::fs::symlink_metadata(&fifo).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
    assert!(!dir.path().join("pipe.1").exists(), "the FIFO was rotated");
}

/// A FIFO nobody reads as the log file is refused at start (exit 2), not
/// a herd hung in open(2) before it started anything.
#[test]
fn a_log_file_fifo_without_a_reader_is_refused() {
    let (_dir, fifo) = fifo("logfifo-noreader");
    let mut herd = Herd::sh(
        &[
            "-w",
            "1",
            "--no-listen",
            "--log-file",
            fifo.to_str().unwrap(),
        ],
        "exec sleep 30",
    );
    assert_eq!(herd.wait(STARTUP).code(), Some(2));
    let err = herd.stderr.all().join("\n");
    assert!(err.contains("a FIFO that nobody reads"), "{err}");
}
