//! Node apps as people start them: `npm start`, `npm run NAME`, a script
//! with `#!/usr/bin/env node`. Each worker must be the app itself, a Node
//! cluster worker that takes herd's socket, not a package manager that
//! swallows the channel and leaves the app to bind the port itself.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

/// Answers with its pid, whether it is a cluster worker, and what the
/// launcher gave it; listens on `$APP_PORT` (herd's configured port), as
/// an app written for no cluster at all does.
const SERVER: &str = r#"
const http = require('http');
const cluster = require('cluster');
const said = process.argv.slice(2).join(' ');
http.createServer((req, res) => res.end(
    `${process.pid} ${cluster.isWorker} ${process.env.npm_lifecycle_event} ` +
    `${process.env.NODE_ENV} [${said}] ${process.cwd()}\n`))
    .listen(parseInt(process.env.APP_PORT, 10));
"#;

fn npm_missing() -> bool {
    if node_missing() {
        return true;
    }
    if Command::new("npm").arg("--version").output().is_err() {
        eprintln!("skipped: npm is not installed");
        return true;
    }
    false
}

/// A package in `dir` with `scripts`, `server.js`, and `extra` files.
fn package(dir: &Path, scripts: &str) {
    std::fs::write(
        dir.join("package.json"),
        format!(r#"{{"name": "launch-test", "version": "1.2.3", "scripts": {scripts}}}"#),
    )
    .unwrap();
    std::fs::write(dir.join("server.js"), SERVER).unwrap();
}

fn executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `herd run -w 2 -l 127.0.0.1:P -- ARGS` in `cwd`, the app told P.
fn herd_in(cwd: &Path, args: &[&str]) -> (Herd, u16) {
    let port = free_port();
    let mut cmd = Command::new(herd_bin());
    cmd.current_dir(cwd)
        .args(["run", "-w", "2", "-l", &format!("127.0.0.1:{port}"), "--"])
        .args(args)
        .env("APP_PORT", port.to_string());
    (Herd::spawn(cmd), port)
}

/// Both workers answer as cluster workers; returns the answers' bodies
/// without the pid.
fn both_serve(herd: &Herd, port: u16) -> HashSet<String> {
    herd.stderr
        .wait_for_nth("both workers listening", STARTUP, 2, |l| {
            l.contains(&format!("listening on 127.0.0.1:{port}")) && l.contains("worker ")
        });
    let mut pids = HashSet::new();
    let mut rest = HashSet::new();
    for _ in 0..40 {
        let resp = http_get(port).expect("the app answers");
        let text = body(&resp).trim().to_string();
        let (pid, tail) = text.split_once(' ').expect("pid first");
        pids.insert(pid.to_string());
        rest.insert(tail.to_string());
        if pids.len() == 2 {
            break;
        }
    }
    assert_eq!(pids.len(), 2, "both workers serve: {rest:?}");
    assert!(
        herd.stderr.count(|l| l.contains("EADDRINUSE")) == 0,
        "no worker binds the port itself:\n{}",
        herd.stderr.all().join("\n")
    );
    rest
}

/// What both workers of `herd run -w 2 -- ARGS`, started in `cwd`, answer.
fn serves(cwd: &Path, args: &[&str]) -> HashSet<String> {
    let (herd, port) = herd_in(cwd, args);
    both_serve(&herd, port)
}

/// The one answer of cluster workers running in package `pkg`: `what` is
/// the lifecycle event, NODE_ENV and the arguments, as SERVER prints them.
fn answer(pkg: &Path, what: &str) -> HashSet<String> {
    let cwd = pkg.canonicalize().unwrap();
    HashSet::from([format!("true {what} {}", cwd.display())])
}

/// `herd run -l 127.0.0.1:0 -- ARGS` in `cwd`, to its end: its exit code
/// and stderr.
fn run_in(cwd: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(herd_bin());
    cmd.current_dir(cwd)
        .args(["run", "-l", "127.0.0.1:0", "--"])
        .args(args);
    let mut herd = Herd::spawn(cmd);
    let status = herd.wait(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(50));
    (status.code(), herd.stderr.all().join("\n"))
}

#[test]
fn npm_start_runs_the_app_as_a_cluster_worker() {
    if npm_missing() {
        return;
    }
    let dir = TempDir::new("npm-start");
    package(dir.path(), r#"{"start": "node server.js"}"#);
    // Started from a directory below the package, as npm allows.
    let sub = dir.path().join("src");
    std::fs::create_dir(&sub).unwrap();
    assert_eq!(
        serves(&sub, &["npm", "start"]),
        answer(dir.path(), "start undefined []"),
        "a cluster worker, with npm's variables, in the package's directory"
    );
}

#[test]
fn npm_run_gives_the_script_its_bin_path_variables_and_arguments() {
    if npm_missing() {
        return;
    }
    let dir = TempDir::new("npm-run");
    package(
        dir.path(),
        r#"{"serve": "NODE_ENV=production launch-test-server --greeting", "prestart": "exit 1"}"#,
    );
    // A package's own bin, as `npm install` links it: a #! node script.
    let bin = dir.path().join("node_modules/.bin");
    std::fs::create_dir_all(&bin).unwrap();
    executable(
        &bin.join("launch-test-server"),
        "#!/usr/bin/env node\nrequire('../../server.js');\n",
    );
    assert_eq!(
        serves(dir.path(), &["npm", "run", "serve", "--", "hello world"]),
        answer(dir.path(), "serve production [--greeting hello world]")
    );
}

#[test]
fn a_script_that_needs_a_shell_runs_under_sh_and_still_gets_the_sockets() {
    if npm_missing() {
        return;
    }
    let dir = TempDir::new("npm-sh");
    package(
        dir.path(),
        r#"{"start": "test -f server.js && NODE_ENV=shell node server.js"}"#,
    );
    assert_eq!(
        serves(dir.path(), &["npm", "start"]),
        answer(dir.path(), "start shell []")
    );
}

#[test]
fn a_script_with_a_node_shebang_is_a_cluster_worker() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("shebang");
    std::fs::write(dir.path().join("server.js"), SERVER).unwrap();
    for (name, line) in [
        ("env-node", "#!/usr/bin/env node"),
        ("env-s-node", "#!/usr/bin/env -S node --no-warnings"),
    ] {
        let script = dir.path().join(name);
        executable(&script, &format!("{line}\nrequire('./server.js');\n"));
        assert_eq!(
            serves(dir.path(), &[script.to_str().unwrap(), "x"]),
            answer(dir.path(), "undefined undefined [x]"),
            "{line}"
        );
    }
}

#[test]
fn node_cluster_off_runs_the_command_as_given() {
    if node_missing() {
        return;
    }
    let dir = TempDir::new("cluster-off");
    std::fs::write(dir.path().join("server.js"), SERVER).unwrap();
    let script = dir.path().join("server");
    executable(&script, "#!/usr/bin/env node\nrequire('./server.js');\n");
    // Not a cluster worker: it binds its own port, as it would alone.
    let own = free_port();
    let mut cmd = Command::new(herd_bin());
    cmd.current_dir(dir.path())
        .args([
            "run",
            "-w",
            "1",
            "--no-listen",
            "--node-cluster",
            "off",
            "--",
        ])
        .arg(&script)
        .env("APP_PORT", own.to_string());
    let _herd = Herd::spawn(cmd);
    let mut answer = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            answer = http_get(own)
                .map(|r| body(&r).to_string())
                .unwrap_or_default();
            !answer.is_empty()
        }),
        "the app serves on its own port"
    );
    assert!(answer.contains(" false "), "not a cluster worker: {answer}");
}

#[test]
fn package_scripts_herd_cannot_run_are_one_line_and_status_2() {
    let dir = TempDir::new("npm-errors");
    let check = |cwd: &Path, args: &[&str], expect: &str| {
        let (code, stderr) = run_in(cwd, args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line:\n{stderr}");
        assert!(
            stderr.contains(expect),
            "{args:?}: {stderr:?} lacks {expect:?}"
        );
    };
    check(dir.path(), &["npm", "start"], "no package.json in");
    std::fs::write(
        dir.path().join("package.json"),
        r#"{"scripts": {"dev": "node dev.js", "build": "tsc"}}"#,
    )
    .unwrap();
    check(
        dir.path(),
        &["npm", "start"],
        r#"has no "start" script (it has: build, dev)"#,
    );
    check(
        dir.path(),
        &["yarn", "run", "serve"],
        r#"has no "serve" script"#,
    );
    check(
        dir.path(),
        &["npm", "install"],
        "herd runs package scripts (npm start, npm run NAME) itself",
    );
    std::fs::write(dir.path().join("package.json"), "{not json").unwrap();
    check(dir.path(), &["pnpm", "start"], "is not valid JSON");
}

/// Scripts that run other scripts, or the app through `cross-env`, still
/// make the app the worker: a Node wrapper in between would take the
/// cluster channel and leave the app to bind the port itself.
#[test]
fn nested_scripts_and_cross_env_resolve_to_the_app() {
    if npm_missing() {
        return;
    }
    let dir = TempDir::new("npm-nested");
    package(
        dir.path(),
        r#"{"start": "npm run serve", "serve": "cross-env NODE_ENV=production node server.js"}"#,
    );
    assert_eq!(
        serves(dir.path(), &["npm", "start"]),
        answer(dir.path(), "serve production []")
    );
}

/// An executable without a `#!` line runs under sh, as npm runs it.
#[test]
fn a_script_file_without_a_shebang_runs_under_sh() {
    if npm_missing() {
        return;
    }
    let dir = TempDir::new("npm-noshebang");
    package(dir.path(), r#"{"start": "./run-it"}"#);
    executable(&dir.path().join("run-it"), "exec node server.js \"$@\"\n");
    let seen = serves(dir.path(), &["npm", "start"]);
    assert!(seen.iter().all(|s| s.starts_with("true start")), "{seen:?}");
}

#[test]
fn package_scripts_that_cannot_work_are_refused_by_name() {
    let dir = TempDir::new("npm-refused");
    // A script that runs itself again.
    std::fs::write(
        dir.path().join("package.json"),
        r#"{"scripts": {"start": "npm run again", "again": "npm start"}}"#,
    )
    .unwrap();
    let (code, err) = run_in(dir.path(), &["npm", "start"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("runs itself again (through start → again)"),
        "{err}"
    );
    // Not a string; a byte-order mark is fine.
    std::fs::write(
        dir.path().join("package.json"),
        "\u{feff}{\"scripts\": {\"start\": 123}}",
    )
    .unwrap();
    let (code, err) = run_in(dir.path(), &["npm", "start"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("script in") && err.contains("is not a string: 123"),
        "{err}"
    );
    // A file that is not executable: 126, as for any command.
    std::fs::write(
        dir.path().join("package.json"),
        r#"{"scripts": {"start": "./app.sh"}}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("app.sh"), "echo hi\n").unwrap();
    let (code, err) = run_in(dir.path(), &["npm", "start"]);
    assert_eq!(code, Some(126), "{err}");
    // --prefix names the package itself: no search upwards.
    std::fs::create_dir_all(dir.path().join("sub")).unwrap();
    let (code, err) = run_in(dir.path(), &["npm", "--prefix", "sub", "start"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("no package.json in") && !err.contains("or any directory above"),
        "{err}"
    );
}
