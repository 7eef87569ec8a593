//! Worker output prefixed `[slot pid]`; `--log-format json`.

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
    assert!(err.iter().any(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("spawned in slot 0")
    }));
}
