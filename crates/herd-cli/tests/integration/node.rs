//! A Node.js app that serves on the inherited fd 3, unchanged, under herd.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

const APP: &str = r#"
const http = require('http');
http.createServer((req, res) => res.end('node ' + process.pid + '\n'))
    .listen({ fd: 3 }, () => console.log('listening'));
"#;

#[test]
fn node_app_serves_on_fd_3_from_both_workers() {
    if Command::new("node").arg("--version").output().is_err() {
        eprintln!("skipped: node is not installed");
        return;
    }
    let dir = TempDir::new("node");
    let app = dir.path().join("app.js");
    std::fs::write(&app, APP).unwrap();
    let herd = Herd::start([
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--",
        "node",
        app.to_str().unwrap(),
    ]);
    let port = herd.port();
    let pids: HashSet<String> = [herd.nth_spawned(1), herd.nth_spawned(2)]
        .iter()
        .map(|p| p.to_string())
        .collect();
    herd.stdout
        .wait_for_nth("both node workers listening", STARTUP, 2, |l| {
            l.ends_with("] listening")
        });
    let mut seen = HashSet::new();
    let ok = eventually(Duration::from_secs(10), || {
        if let Ok(resp) = http_get(port) {
            let b = body(&resp).trim().to_string();
            if let Some(pid) = b.strip_prefix("node ") {
                seen.insert(pid.to_string());
            }
        }
        seen.len() == 2
    });
    assert!(ok, "answers from both workers, saw {seen:?}");
    assert_eq!(seen, pids);
}
