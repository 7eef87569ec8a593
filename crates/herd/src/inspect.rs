//! Node's inspector, one port per slot.
//!
//! `node --inspect=127.0.0.1:9229 app.js` run as three workers would give
//! the debugger to one and "address already in use" to the others. Node's
//! own primary gives each worker its own port; herd does the same, stable
//! per slot so a restarted worker keeps its slot's port: slot `i` gets the
//! port asked for plus `i`. Covered: `--inspect`, `--inspect-brk`,
//! `--inspect-wait` and `--inspect-port` (`=VALUE` or a separate value),
//! among node's own options on the command line (before the script) and in
//! `NODE_OPTIONS`. Pure functions: the supervisor applies them per spawn.

/// Node's default inspector port.
const DEFAULT_PORT: u16 = 9229;

/// The inspector flags that take an optional `[host:]port`.
const FLAGS: &[&str] = &[
    "--inspect",
    "--inspect-brk",
    "--inspect-wait",
    "--inspect-port",
    "--debug-port",
];

/// Rewrites one option: `Some((new, host, port))` if it is an inspector
/// flag (with its value inline or none), `None` otherwise.
fn rewrite(arg: &str, slot: usize) -> Option<(String, String, u16)> {
    let (flag, value) = match arg.split_once('=') {
        Some((f, v)) => (f, Some(v)),
        None => (arg, None),
    };
    if !FLAGS.contains(&flag) {
        return None;
    }
    let (host, port) = host_port(value.unwrap_or(""));
    let port = port.saturating_add(u16::try_from(slot).unwrap_or(u16::MAX));
    let shown = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Some((format!("{flag}={shown}"), host, port))
}

/// `[host:]port` as Node reads it; defaults 127.0.0.1 and 9229.
fn host_port(value: &str) -> (String, u16) {
    let default_host = "127.0.0.1".to_string();
    if value.is_empty() {
        return (default_host, DEFAULT_PORT);
    }
    if let Ok(port) = value.parse() {
        return (default_host, port);
    }
    if let Some(rest) = value.strip_prefix('[') {
        if let Some((host, port)) = rest.split_once("]:") {
            return (host.to_string(), port.parse().unwrap_or(DEFAULT_PORT));
        }
    }
    match value.rsplit_once(':') {
        Some((host, port)) => (host.to_string(), port.parse().unwrap_or(DEFAULT_PORT)),
        None => (value.to_string(), DEFAULT_PORT),
    }
}

/// Node's argv with each inspector option given slot `slot`'s port, and
/// the `host:port`s it now names. Only node's own options are looked at
/// (up to the script or `--`); the app's arguments are left alone.
pub(crate) fn argv_for_slot(argv: &[String], slot: usize) -> (Vec<String>, Vec<String>) {
    let mut out = Vec::with_capacity(argv.len());
    let mut ports = Vec::new();
    let mut i = 0;
    let mut options_over = false;
    while i < argv.len() {
        let arg = &argv[i];
        if i == 0 || options_over {
            out.push(arg.clone());
            i += 1;
            continue;
        }
        if arg == "--" || !arg.starts_with('-') {
            options_over = true;
            out.push(arg.clone());
            i += 1;
            continue;
        }
        // `--inspect-port 9230`: the value as the next argument.
        let separate = matches!(arg.as_str(), "--inspect-port" | "--debug-port")
            && argv.get(i + 1).is_some_and(|v| !v.starts_with('-'));
        let candidate = if separate {
            format!("{arg}={}", argv[i + 1])
        } else {
            arg.clone()
        };
        match rewrite(&candidate, slot) {
            Some((new, host, port)) => {
                out.push(new);
                ports.push(format!("{host}:{port}"));
                i += if separate { 2 } else { 1 };
            }
            None => {
                out.push(arg.clone());
                i += 1;
            }
        }
    }
    (out, ports)
}

/// `NODE_OPTIONS` with each inspector option given slot `slot`'s port, and
/// the `host:port`s it now names.
pub(crate) fn node_options_for_slot(options: &str, slot: usize) -> (String, Vec<String>) {
    let mut ports = Vec::new();
    let words: Vec<String> = options
        .split_whitespace()
        .map(|w| match rewrite(w, slot) {
            Some((new, host, port)) => {
                ports.push(format!("{host}:{port}"));
                new
            }
            None => w.to_string(),
        })
        .collect();
    (words.join(" "), ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn each_slot_gets_the_asked_port_plus_its_number() {
        let a = argv(&["node", "--inspect=127.0.0.1:9300", "app.js", "--inspect"]);
        let (out, ports) = argv_for_slot(&a, 2);
        assert_eq!(
            out,
            argv(&["node", "--inspect=127.0.0.1:9302", "app.js", "--inspect"])
        );
        assert_eq!(ports, ["127.0.0.1:9302"]);
        let (out, _) = argv_for_slot(&argv(&["node", "--inspect-brk", "app.js"]), 1);
        assert_eq!(
            out,
            argv(&["node", "--inspect-brk=127.0.0.1:9230", "app.js"])
        );
        let (out, _) = argv_for_slot(&argv(&["node", "--inspect=9400", "app.js"]), 3);
        assert_eq!(out[1], "--inspect=127.0.0.1:9403");
        let (out, _) = argv_for_slot(&argv(&["node", "--inspect=[::1]:9400", "a.js"]), 1);
        assert_eq!(out[1], "--inspect=[::1]:9401");
        let (out, _) = argv_for_slot(
            &argv(&["node", "--inspect-port", "9500", "--inspect", "a.js"]),
            1,
        );
        assert_eq!(
            out,
            argv(&[
                "node",
                "--inspect-port=127.0.0.1:9501",
                "--inspect=127.0.0.1:9230",
                "a.js"
            ])
        );
    }

    #[test]
    fn other_arguments_are_untouched() {
        let a = argv(&["node", "--max-old-space-size=100", "app.js"]);
        assert_eq!(argv_for_slot(&a, 5), (a.clone(), vec![]));
        let a = argv(&["node", "--", "app.js", "--inspect=1"]);
        assert_eq!(argv_for_slot(&a, 1).0, a);
    }

    #[test]
    fn node_options_too() {
        let (o, ports) =
            node_options_for_slot("--max-old-space-size=100 --inspect=0.0.0.0:9229", 2);
        assert_eq!(o, "--max-old-space-size=100 --inspect=0.0.0.0:9231");
        assert_eq!(ports, ["0.0.0.0:9231"]);
        assert_eq!(
            node_options_for_slot("--require x", 1),
            ("--require x".into(), vec![])
        );
    }
}
