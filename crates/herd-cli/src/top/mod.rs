//! `herd top`: a live terminal monitor of one cluster.
//!
//! A client of the control socket like the other commands: a `status`
//! request each interval (CPU and memory are read only then, and only
//! while someone watches), a `logs` follower on a second connection, and
//! a short-lived connection per action (reload, scale, restart) on a
//! thread of its own, so a reload that takes a minute does not freeze the
//! screen. [`model`] holds the state and decides what keys do; [`view`]
//! draws it. ratatui's `init` puts the terminal in raw mode on the
//! alternate screen and restores it on exit and on panic.

pub mod model;
pub mod view;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use herd::control::client::Client;
use herd::control::protocol::{Command, LogLine, Response};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use crate::cli::TopArgs;
use crate::ctl::{self, Failure};
use model::{Action, Key, Top};

enum Msg {
    Log(LogLine),
    /// An action's answer, in words.
    Done(String),
}

/// `herd top [NAME]`.
pub fn main(args: TopArgs) -> Result<(), Failure> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            2,
            "herd top needs a terminal (for scripts: herd status --json)".into(),
        ));
    }
    let (dir, name) = ctl::find(args.name.as_deref())?;
    let mut client = Client::connect(&dir, &name, ctl::QUICK).map_err(ctl::unreachable)?;
    let mut top = Top::new(&name);
    // The first status before the screen changes: errors print plainly.
    top.update(fetch(&mut client)?);

    let (tx, rx) = mpsc::channel();
    {
        let (dir, name, tx) = (dir.clone(), name.clone(), tx.clone());
        std::thread::spawn(move || follow_logs(&dir, &name, tx));
    }

    let mut terminal = ratatui::try_init().map_err(|e| {
        ratatui::restore();
        Failure::new(1, format!("cannot set up the terminal: {e}"))
    })?;
    let outcome = (|| -> Result<(), Failure> {
        let interval = args.interval.max(Duration::from_millis(100));
        let mut next = Instant::now() + interval;
        loop {
            terminal
                .draw(|f| view::draw(f, &top))
                .map_err(|e| Failure::new(1, format!("cannot draw: {e}")))?;
            let wait = next
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(250));
            if event::poll(wait).map_err(|e| Failure::new(1, e.to_string()))? {
                match event::read().map_err(|e| Failure::new(1, e.to_string()))? {
                    Event::Key(k) if k.kind == KeyEventKind::Press => {
                        let key = match k.code {
                            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                                return Ok(())
                            }
                            KeyCode::Char(c) => Key::Char(c),
                            KeyCode::Up => Key::Up,
                            KeyCode::Down => Key::Down,
                            KeyCode::Esc => Key::Esc,
                            _ => continue,
                        };
                        match top.key(key) {
                            Some(Action::Quit) => return Ok(()),
                            Some(action) => act(&dir, &name, action, &mut top, tx.clone()),
                            None => {}
                        }
                    }
                    // A resize redraws at the new size on the next draw.
                    _ => {}
                }
            }
            for msg in rx.try_iter() {
                match msg {
                    Msg::Log(line) => top.log(line),
                    Msg::Done(text) => top.message = Some(text),
                }
            }
            if Instant::now() >= next {
                next = Instant::now() + interval;
                match fetch(&mut client) {
                    Ok(status) => top.update(status),
                    Err(_) => {
                        // Once more on a new connection, else the cluster is gone.
                        client = Client::connect(&dir, &name, ctl::QUICK)
                            .map_err(|_| Failure::new(0, format!("{name} is no longer running")))?;
                    }
                }
            }
        }
    })();
    ratatui::restore();
    match outcome {
        Err(f) if f.status() == 0 => {
            println!("herd: {}", f.message());
            Ok(())
        }
        other => other,
    }
}

fn fetch(client: &mut Client) -> Result<herd::control::protocol::Status, Failure> {
    let r = client.request(Command::Status).map_err(ctl::unreachable)?;
    match r.status {
        Some(s) if r.ok => Ok(*s),
        _ => Err(Failure::new(
            1,
            r.error.unwrap_or_else(|| "no status".into()),
        )),
    }
}

fn follow_logs(dir: &std::path::Path, name: &str, tx: mpsc::Sender<Msg>) {
    let Ok(mut client) = Client::connect(dir, name, None) else {
        return;
    };
    let follow = Command::Logs {
        lines: Some(model::LOG_LINES),
        slot: None,
        follow: true,
    };
    if client.send(follow).is_err() {
        return;
    }
    while let Ok(r) = client.read() {
        let sent = match (r.log, r.skipped) {
            (Some(line), _) => tx.send(Msg::Log(line)),
            (None, Some(n)) => tx.send(Msg::Done(format!("{n} log lines skipped"))),
            _ => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Runs an action on a thread of its own; its outcome comes back as a message.
fn act(dir: &std::path::Path, name: &str, action: Action, top: &mut Top, tx: mpsc::Sender<Msg>) {
    let (command, doing) = match action {
        Action::Reload => (Command::Reload, "reloading…".to_string()),
        Action::Scale(d) => (
            Command::Scale {
                workers: None,
                delta: Some(d),
            },
            format!("scaling by {d:+}…"),
        ),
        Action::Restart(slot) => (
            Command::Restart { slot },
            format!("restarting slot {slot}…"),
        ),
        Action::Quit => return,
    };
    top.message = Some(doing);
    let (dir, name) = (dir.to_path_buf(), name.to_string());
    std::thread::spawn(move || {
        let text = match Client::connect(&dir, &name, None).and_then(|mut c| c.request(command)) {
            Ok(r) => describe(&r),
            Err(e) => e.to_string(),
        };
        let _ = tx.send(Msg::Done(text));
    });
}

fn describe(r: &Response) -> String {
    if !r.ok {
        return r.error.clone().unwrap_or_else(|| "refused".into());
    }
    if let Some(reload) = &r.reload {
        return format!(
            "reloaded: generation {}",
            reload.generation.unwrap_or_default()
        );
    }
    if let Some(n) = r.scale {
        return format!("scaled to {n} workers");
    }
    if let Some(w) = &r.restart {
        return format!("replacing worker {} in slot {}", w.pid, w.slot);
    }
    "done".into()
}
