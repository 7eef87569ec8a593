//! How a command line becomes a worker: Node behind a `#!` line, and
//! package-manager scripts (`npm start`, `yarn run dev`, `pnpm start`).
//!
//! Node's cluster protocol reaches the first Node process of a worker: it
//! reads `NODE_CHANNEL_FD` and `NODE_UNIQUE_ID` and deletes them from its own
//! environment. Run `npm start` as it is and that process is npm, which also
//! starts the app with stdio only, so fd 3 never reaches it either: every
//! worker binds the port itself and fails with EADDRINUSE. PM2 cannot
//! cluster `npm start` either. herd runs the script the way the package
//! manager would, without the package manager in between:
//!
//! * the script comes from the nearest `package.json` (npm's default
//!   `start`, `node server.js`, when there is none and `server.js` exists);
//! * the workers run in that package's directory, with every
//!   `node_modules/.bin` from there up on `PATH` (nearest first), and
//!   npm's lifecycle variables (`npm_lifecycle_event`,
//!   `npm_lifecycle_script`, `npm_package_name`, `npm_package_version`,
//!   `npm_package_json`, `npm_command`, `INIT_CWD`);
//! * a script that is one command (words, quotes, leading `VAR=value`
//!   assignments) is executed directly, so the worker's pid is the app's
//!   and its stop signal goes to the app; any other script runs under
//!   `/bin/sh -c`, as npm runs it, and the shell passes the sockets, the
//!   channel and the environment on to what it starts;
//! * arguments after the script name (after `--` for npm) are appended.
//!
//! `pre<name>`/`post<name>` scripts are not run per worker; herd says so.
//! Pure parsing plus reading files; nothing here starts a process.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::config::{CommandError, Runtime, WorkerCommand};

/// The package managers whose scripts herd runs itself.
const MANAGERS: &[&str] = &["npm", "yarn", "pnpm"];

/// What a package-manager command line asks for.
#[derive(Debug)]
struct ScriptRequest {
    /// `npm`, `yarn` or `pnpm`.
    manager: String,
    /// The script's name in `package.json`.
    name: String,
    /// Where to look for the package (`--prefix`, `--cwd`, `-C`).
    dir: Option<PathBuf>,
    /// Arguments appended to the script.
    extra: Vec<OsString>,
}

/// What `argv` asks a package manager to run: `None` when `argv` does not
/// start with a package manager, an error when it does but asks for
/// something herd cannot run as a worker.
fn script_request(argv: &[OsString]) -> Result<Option<ScriptRequest>, CommandError> {
    let Some(first) = argv.first() else {
        return Ok(None);
    };
    let manager = Path::new(first)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !MANAGERS.contains(&manager.as_str()) {
        return Ok(None);
    }
    let shown = argv
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let refuse = |why: &str| {
        CommandError::Script(format!(
            "{shown}: {why}; herd runs package scripts ({manager} start, {manager} run NAME) \
             itself, so give it one of those, or the server command (herd run -- node \
             server.js), or --node-cluster off to run {manager} as it is"
        ))
    };
    let mut dir = None;
    let mut rest = argv[1..].iter().map(|a| a.to_string_lossy().into_owned());
    let mut words = Vec::new();
    // Options before the subcommand: only those that pick the package.
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--prefix" | "--cwd" | "--dir" | "-C" => {
                dir = Some(PathBuf::from(
                    rest.next()
                        .ok_or_else(|| refuse(&format!("{arg} needs a value")))?,
                ));
            }
            "-s" | "--silent" | "--if-present" => {}
            a if a.starts_with("--prefix=")
                || a.starts_with("--cwd=")
                || a.starts_with("--dir=") =>
            {
                dir = Some(PathBuf::from(a.split_once('=').map_or("", |(_, d)| d)));
            }
            a if a.starts_with('-') => return Err(refuse(&format!("option {a} is not supported"))),
            _ => {
                words.push(arg);
                break;
            }
        }
    }
    let Some(sub) = words.pop() else {
        return Err(refuse("no script named"));
    };
    let remaining: Vec<String> = rest.collect();
    let (name, mut extra) = match sub.as_str() {
        "start" => ("start".to_string(), remaining),
        // npm's other lifecycle shorthands that run a script of that name.
        "test" | "t" | "tst" => ("test".to_string(), remaining),
        "run" | "run-script" => {
            let mut it = remaining.into_iter();
            // Options between `run` and the name.
            let mut name = None;
            for a in it.by_ref() {
                match a.as_str() {
                    "-s" | "--silent" | "--if-present" => {}
                    _ => {
                        name = Some(a);
                        break;
                    }
                }
            }
            let name = name.ok_or_else(|| refuse("no script named after run"))?;
            if name.starts_with('-') {
                return Err(refuse(&format!("option {name} is not supported")));
            }
            (name, it.collect())
        }
        // `yarn dev` and `pnpm dev` run the script `dev`.
        other if manager != "npm" && !other.starts_with('-') && !BUILTINS.contains(&other) => {
            (other.to_string(), remaining)
        }
        other => return Err(refuse(&format!("`{other}` is not a package script"))),
    };
    // npm passes only what follows `--` to the script; yarn and pnpm pass
    // everything after the name (a leading `--` is dropped).
    if manager == "npm" {
        extra = match extra.iter().position(|a| a == "--") {
            Some(i) => extra.split_off(i + 1),
            None if extra.is_empty() => extra,
            None => {
                return Err(refuse(&format!(
                    "npm would read {} as its own options; put the script's arguments after --",
                    extra.join(" ")
                )))
            }
        };
    } else if extra.first().map(String::as_str) == Some("--") {
        extra.remove(0);
    }
    Ok(Some(ScriptRequest {
        manager,
        name,
        dir,
        extra: extra.into_iter().map(OsString::from).collect(),
    }))
}

/// yarn's and pnpm's own commands, which `yarn NAME` does not treat as a
/// script name.
const BUILTINS: &[&str] = &[
    "add",
    "install",
    "i",
    "remove",
    "rm",
    "up",
    "upgrade",
    "update",
    "exec",
    "dlx",
    "create",
    "init",
    "link",
    "unlink",
    "publish",
    "pack",
    "test",
    "t",
    "why",
    "info",
    "list",
    "ls",
    "outdated",
    "audit",
    "config",
    "cache",
    "global",
    "import",
    "node",
    "bin",
    "workspace",
    "workspaces",
    "version",
    "help",
    "set",
    "plugin",
];

/// Resolves a package-manager command line (`npm start`, `yarn run dev`,
/// …) to the command its script runs: `Ok(None)` when `argv` is no such
/// command line. `cwd` is where the search for `package.json` starts.
pub(crate) fn package_script(
    argv: &[OsString],
    cwd: &Path,
) -> Result<Option<WorkerCommand>, CommandError> {
    resolve_script(argv, cwd, &mut Vec::new())
}

/// The longest `package.json` herd reads.
const MAX_PACKAGE_JSON: u64 = 16 << 20;
/// The longest script: it also travels in `npm_lifecycle_script`, and exec
/// refuses a variable over 128 KiB.
const MAX_SCRIPT: usize = 64 << 10;
/// How deep scripts may run other package scripts (`"start": "npm run serve"`).
const MAX_NESTING: usize = 8;

/// [`package_script`], for a script that may itself run package scripts:
/// `seen` holds the (package.json, script) pairs already being resolved.
fn resolve_script(
    argv: &[OsString],
    cwd: &Path,
    seen: &mut Vec<(PathBuf, String)>,
) -> Result<Option<WorkerCommand>, CommandError> {
    let Some(ScriptRequest {
        manager,
        name,
        dir,
        extra,
    }) = script_request(argv)?
    else {
        return Ok(None);
    };
    let dir_given = dir.is_some();
    let start = match dir {
        Some(d) if d.is_absolute() => d,
        Some(d) => cwd.join(d),
        None => cwd.to_path_buf(),
    };
    let what = format!(
        "{manager} {}",
        if name == "start" {
            "start".into()
        } else {
            format!("run {name}")
        }
    );
    // npm takes --prefix as the package itself; without it, the nearest
    // package.json from here up.
    let exact = dir_given;
    let pkg_dir = start
        .ancestors()
        .take(if exact { 1 } else { usize::MAX })
        .find(|d| d.join("package.json").is_file())
        .ok_or_else(|| {
            CommandError::Script(format!(
                "{what}: no package.json in {}{}; run the server itself, e.g. herd run -- \
                 node server.js",
                start.display(),
                if exact { "" } else { " or any directory above" }
            ))
        })?
        .to_path_buf();
    let json_path = pkg_dir.join("package.json");
    let cannot_read = |e: std::io::Error| {
        CommandError::Script(format!("{what}: cannot read {}: {e}", json_path.display()))
    };
    let size = std::fs::metadata(&json_path).map_err(cannot_read)?.len();
    if size > MAX_PACKAGE_JSON {
        return Err(CommandError::Script(format!(
            "{what}: {} is {size} bytes, more than herd reads ({MAX_PACKAGE_JSON})",
            json_path.display()
        )));
    }
    let text = std::fs::read_to_string(&json_path).map_err(cannot_read)?;
    // npm accepts a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let package: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        CommandError::Script(format!(
            "{what}: {} is not valid JSON: {e}",
            json_path.display()
        ))
    })?;
    let scripts = package.get("scripts").and_then(|s| s.as_object());
    let script = match scripts.and_then(|s| s.get(&name)) {
        Some(serde_json::Value::String(s)) => s.to_string(),
        Some(other) => {
            return Err(CommandError::Script(format!(
                "{what}: the {name:?} script in {} is not a string: {}",
                json_path.display(),
                serde_json::to_string(other)
                    .unwrap_or_default()
                    .chars()
                    .take(80)
                    .collect::<String>()
            )))
        }
        // npm's own default for `start`.
        None if name == "start" && pkg_dir.join("server.js").is_file() => "node server.js".into(),
        None => {
            let have: Vec<&str> = scripts
                .map(|s| s.keys().map(String::as_str).collect())
                .unwrap_or_default();
            return Err(CommandError::Script(format!(
                "{what}: {} has no {name:?} script{}",
                json_path.display(),
                if have.is_empty() {
                    String::new()
                } else {
                    format!(" (it has: {})", have.join(", "))
                }
            )));
        }
    };
    if script.contains('\0') {
        return Err(CommandError::Script(format!(
            "{what}: the {name:?} script holds a NUL byte, which no command line can carry"
        )));
    }
    if script.len() > MAX_SCRIPT {
        return Err(CommandError::Script(format!(
            "{what}: the {name:?} script is {} bytes, more than herd runs ({MAX_SCRIPT})",
            script.len()
        )));
    }
    // A script that runs itself again (`"start": "npm start"`) would
    // start package managers without end.
    let key = (json_path.clone(), name.clone());
    if seen.contains(&key) {
        return Err(CommandError::Script(format!(
            "{what}: the {name:?} script runs itself again (through {}), without end",
            seen.iter()
                .map(|(_, n)| n.as_str())
                .collect::<Vec<_>>()
                .join(" → ")
        )));
    }
    if seen.len() >= MAX_NESTING {
        return Err(CommandError::Script(format!(
            "{what}: package scripts run package scripts more than {MAX_NESTING} deep"
        )));
    }
    seen.push(key);
    for hook in [format!("pre{name}"), format!("post{name}")] {
        if scripts.is_some_and(|s| s.contains_key(&hook)) {
            tracing::warn!(
                "package.json's {hook} script is not run for each worker; run it once before herd"
            );
        }
    }

    // Every node_modules/.bin from the package up, nearest first, then PATH.
    let mut path: Vec<PathBuf> = pkg_dir
        .ancestors()
        .map(|d| d.join("node_modules/.bin"))
        .filter(|d| d.is_dir())
        .collect();
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
    ));
    let path =
        std::env::join_paths(path).map_err(|e| CommandError::Script(format!("{what}: {e}")))?;
    let mut env: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), path.clone()),
        ("npm_lifecycle_event".into(), name.clone().into()),
        ("npm_lifecycle_script".into(), script.clone().into()),
        ("npm_package_json".into(), json_path.clone().into()),
        (
            "npm_command".into(),
            // As npm 11 sets it.
            match name.as_str() {
                "start" | "test" => name.as_str(),
                _ => "run",
            }
            .into(),
        ),
        ("INIT_CWD".into(), cwd.into()),
    ];
    for key in ["name", "version"] {
        if let Some(v) = package.get(key).and_then(|v| v.as_str()) {
            env.push((format!("npm_package_{key}").into(), v.into()));
        }
    }

    let command = match simple_command(&script) {
        Some(words) => {
            let mut words = words.into_iter();
            let mut argv: Vec<OsString> = Vec::new();
            for word in words.by_ref() {
                match assignment(&word) {
                    Some((k, v)) => env.push((k.into(), v.into())),
                    None => {
                        argv.push(word.into());
                        break;
                    }
                }
            }
            argv.extend(words.map(OsString::from));
            // `cross-env A=1 node x.js` and `env A=1 node x.js`: what they
            // do, done here, so the app (not a Node wrapper) is the worker.
            while argv.len() > 1
                && matches!(
                    Path::new(&argv[0]).file_name().and_then(|n| n.to_str()),
                    Some("cross-env" | "env")
                )
                && argv[1].to_str().and_then(assignment).is_some()
            {
                argv.remove(0);
                while let Some((k, v)) = argv.first().and_then(|a| a.to_str()).and_then(assignment)
                {
                    env.push((k.into(), v.into()));
                    argv.remove(0);
                }
            }
            let appended = extra.clone();
            argv.extend(extra);
            if argv.is_empty() {
                return Err(CommandError::Script(format!(
                    "{what}: the {name:?} script runs no command: {script:?}"
                )));
            }
            // `"start": "npm run serve"`: that script, resolved the same way.
            let nested = Path::new(&argv[0])
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| MANAGERS.contains(&n));
            if nested {
                if let Some(mut inner) = resolve_script(&argv, &pkg_dir, seen)? {
                    // The outer script's variables, then the inner's.
                    env.retain(|(k, _)| !inner.env.iter().any(|(i, _)| i == k));
                    env.append(&mut inner.env);
                    inner.env = env;
                    return Ok(Some(inner));
                }
            }
            let program = find_program(&argv[0], &pkg_dir, &path).ok_or_else(|| {
                CommandError::Script(format!(
                    "{what}: the {name:?} script runs {}, which is not found (is \
                     `{manager} install` done?)",
                    argv[0].to_string_lossy()
                ))
            })?;
            match std::fs::metadata(&program) {
                Ok(m)
                    if m.is_file()
                        && rustix::fs::access(&program, rustix::fs::Access::EXEC_OK).is_ok() => {}
                _ => return Err(CommandError::NotExecutable(program.display().to_string())),
            }
            if !runs_directly(&program) {
                // No `#!` and no ELF header: sh runs it as a shell script,
                // as it does under npm (execve's ENOEXEC fallback).
                return Ok(Some(through_sh(&script, &appended, env, pkg_dir)));
            }
            let runtime = runtime_of(&program);
            WorkerCommand {
                program,
                argv,
                env,
                dir: Some(pkg_dir),
                runtime,
                origin: Default::default(),
            }
        }
        None => {
            // As npm does: the script and its quoted arguments, to sh.
            through_sh(&script, &extra, env, pkg_dir)
        }
    };
    Ok(Some(command))
}

/// `sh -c 'SCRIPT ARGS…'` (the arguments quoted) in the package's directory.
/// The shell passes the channel and `NODE_UNIQUE_ID` on to the Node program
/// it runs, so it counts as a Node script.
fn through_sh(
    script: &str,
    args: &[OsString],
    env: Vec<(OsString, OsString)>,
    dir: PathBuf,
) -> WorkerCommand {
    let mut line = script.to_string();
    for a in args {
        line.push(' ');
        line.push_str(&quote(&a.to_string_lossy()));
    }
    WorkerCommand {
        program: PathBuf::from("/bin/sh"),
        argv: vec!["sh".into(), "-c".into(), line.into()],
        env,
        dir: Some(dir),
        runtime: Runtime::NodeScript,
        origin: Default::default(),
    }
}

/// Whether exec can run `program` itself: an ELF binary or a `#!` script.
fn runs_directly(program: &Path) -> bool {
    let mut head = [0u8; 4];
    std::fs::File::open(program)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok_and(|()| head.starts_with(b"#!") || head == *b"\x7fELF")
}

/// `'…'`-quotes a word for sh unless it needs none.
fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `NAME=value` as a shell assignment.
fn assignment(word: &str) -> Option<(&str, &str)> {
    let (k, v) = word.split_once('=')?;
    let mut chars = k.chars();
    let first = chars.next()?;
    ((first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_'))
    .then_some((k, v))
}

/// The words of a script that is one plain command (words, `'…'`, `"…"`,
/// backslash escapes), or `None` when it needs a shell: operators,
/// redirections, expansions, globs, comments, subshells.
pub(crate) fn simple_command(script: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = script.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => word.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '$' | '`' => return None,
                        '\\' => match chars.next()? {
                            c @ ('"' | '\\' | '$' | '`') => word.push(c),
                            '\n' => {}
                            c => {
                                word.push('\\');
                                word.push(c);
                            }
                        },
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next()? {
                    '\n' => {}
                    c => word.push(c),
                }
            }
            '|' | '&' | ';' | '<' | '>' | '(' | ')' | '$' | '`' | '*' | '?' | '[' | '\n' | '{'
            | '}' => return None,
            '#' | '~' | '!' if !in_word => return None,
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Some(words)
}

/// The file a script's first word names: a path (relative to the package)
/// or a name looked up in `path` (the first executable one, else the first
/// that exists, so that a file without the execute bit is reported as such).
fn find_program(word: &OsString, pkg_dir: &Path, path: &OsString) -> Option<PathBuf> {
    let is_exec =
        |p: &Path| p.is_file() && rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok();
    if word.to_string_lossy().contains('/') {
        let p = pkg_dir.join(word);
        return p.exists().then_some(p);
    }
    let absolute = |p: PathBuf| if p.is_absolute() { p } else { pkg_dir.join(p) };
    let candidates: Vec<PathBuf> = std::env::split_paths(path).map(|d| d.join(word)).collect();
    candidates
        .iter()
        .find(|p| is_exec(p))
        .or_else(|| candidates.iter().find(|p| p.exists()))
        .cloned()
        .map(absolute)
}

/// Whether `program` is Node: by its name (`node`, `nodejs`, `node20`), or
/// a script whose `#!` line runs it (`#!/usr/bin/env node`,
/// `#!/usr/bin/env -S node --flag`, `#!/opt/node/bin/node`).
pub(crate) fn runtime_of(program: &Path) -> Runtime {
    if is_node_name(program) {
        return Runtime::Node;
    }
    let Ok(mut file) = std::fs::File::open(program) else {
        return Runtime::Other;
    };
    let mut head = [0u8; 256];
    let n = std::io::Read::read(&mut file, &mut head).unwrap_or(0);
    match shebang_runs_node(&head[..n]) {
        true => Runtime::NodeScript,
        false => Runtime::Other,
    }
}

fn is_node_name(p: &Path) -> bool {
    p.file_name()
        .map(|n| n.to_string_lossy().starts_with("node"))
        .unwrap_or(false)
}

/// Whether a file starting with `head` has a `#!` line that runs Node.
pub(crate) fn shebang_runs_node(head: &[u8]) -> bool {
    let Some(rest) = head.strip_prefix(b"#!") else {
        return false;
    };
    let line = rest.split(|&b| b == b'\n').next().unwrap_or(rest);
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_ascii_whitespace();
    let Some(interpreter) = words.next() else {
        return false;
    };
    if is_node_name(Path::new(interpreter)) {
        return true;
    }
    if Path::new(interpreter)
        .file_name()
        .is_none_or(|n| n != "env")
    {
        return false;
    }
    // env's options and assignments, then the program.
    let mut words = words.peekable();
    while let Some(w) = words.next() {
        match w {
            "-u" | "--unset" | "-C" | "--chdir" => {
                words.next();
            }
            w if w.starts_with('-') || assignment(w).is_some() => {}
            program => return is_node_name(Path::new(program)),
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn shebangs_that_run_node() {
        for line in [
            "#!/usr/bin/env node\n",
            "#!/usr/bin/env node",
            "#! /usr/bin/env node\n",
            "#!/usr/bin/env -S node --max-old-space-size=4096\n",
            "#!/usr/bin/env -S NODE_ENV=production node\n",
            "#!/usr/local/bin/node\n",
            "#!/usr/bin/nodejs --harmony\n",
            "#!/usr/bin/env node\r\n",
        ] {
            assert!(shebang_runs_node(line.as_bytes()), "{line:?}");
        }
        for line in [
            "#!/bin/sh\nexec node x.js\n",
            "#!/usr/bin/env python3\n",
            "#!/usr/bin/env\n",
            "console.log(1)\n",
            "#!/usr/bin/env -S deno run\n",
        ] {
            assert!(!shebang_runs_node(line.as_bytes()), "{line:?}");
        }
    }

    #[test]
    fn simple_scripts_are_split_and_the_rest_need_a_shell() {
        assert_eq!(
            simple_command("node server.js").unwrap(),
            ["node", "server.js"]
        );
        assert_eq!(
            simple_command(r#"NODE_ENV=production  node -r 'dotenv/config' "my app.js" a\ b"#)
                .unwrap(),
            [
                "NODE_ENV=production",
                "node",
                "-r",
                "dotenv/config",
                "my app.js",
                "a b"
            ]
        );
        for script in [
            "npm run build && node dist/server.js",
            "node a.js | tee log",
            "node $APP",
            "node \"$APP\"",
            "node `cat f`",
            "node *.js",
            "node a.js > out",
            "node a.js # comment",
            "cd api; node .",
            "node a.js &",
            "~/bin/server",
            "node 'unterminated",
        ] {
            assert_eq!(simple_command(script), None, "{script:?}");
        }
    }

    #[test]
    fn package_manager_command_lines() {
        let req = |v: &[&str]| script_request(&os(v));
        let got = req(&["npm", "test"]).unwrap().unwrap();
        assert_eq!(got.name, "test");
        let got = req(&["yarn", "test"]).unwrap().unwrap();
        assert_eq!(got.name, "test");
        let got = req(&["npm", "start"]).unwrap().unwrap();
        assert_eq!((got.manager.as_str(), got.name.as_str()), ("npm", "start"));
        let got = req(&["npm", "run", "dev", "--", "--port", "3000"])
            .unwrap()
            .unwrap();
        assert_eq!(got.name, "dev");
        assert_eq!(got.extra, os(&["--port", "3000"]));
        let got = req(&["/usr/bin/yarn", "dev", "--port", "3000"])
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.name.as_str(), got.extra.clone()),
            ("dev", os(&["--port", "3000"]))
        );
        let got = req(&["pnpm", "-C", "app", "start"]).unwrap().unwrap();
        assert_eq!(got.dir, Some(PathBuf::from("app")));
        let got = req(&["npm", "--prefix=app", "run-script", "serve"])
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.name.as_str(), got.dir),
            ("serve", Some(PathBuf::from("app")))
        );
        assert!(req(&["node", "server.js"]).unwrap().is_none());
        assert!(req(&["npmx", "start"]).unwrap().is_none());
        for bad in [
            &["npm"][..],
            &["npm", "install"],
            &["npm", "exec", "serve"],
            &["yarn", "add", "x"],
            &["npm", "run"],
            &["npm", "start", "--port", "3000"],
            &["npm", "--registry", "x", "start"],
        ] {
            let e = req(bad).unwrap_err().to_string();
            assert!(e.contains("herd runs package scripts"), "{bad:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn quoting_for_sh() {
        assert_eq!(quote("--port"), "--port");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }
}
