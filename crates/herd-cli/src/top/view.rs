//! Drawing `herd top` from its [`Top`] model (ratatui).

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};
use ratatui::Frame;

use super::model::{sparkline, Top};
use crate::ctl::{bytes, duration};

/// Width of each sparkline column.
const SPARK: usize = 12;

pub fn draw(frame: &mut Frame, top: &Top) {
    let rows = top.rows();
    let table_height = (rows.len() as u16 + 3).min(frame.area().height / 2).max(4);
    let [head, table, logs, keys] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(table_height),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    // The cluster in two lines.
    let head_lines = match &top.status {
        Some(s) => {
            let listen: Vec<String> = s
                .listeners
                .iter()
                .map(|l| match l.queued {
                    Some(q) => format!("{} ({q} queued)", l.spec),
                    None => l.spec.clone(),
                })
                .collect();
            let c = &s.counters;
            vec![
                Line::from(format!(
                    "{}  {}",
                    crate::ctl::headline(s, "  ", "  "),
                    listen.join(", "),
                )),
                Line::from(format!(
                    "restarts: {} crashed {} killed {} hung {} recycled {} reloaded · reloads {} ok {} rolled back{}",
                    c.restarts_crash,
                    c.restarts_killed,
                    c.restarts_watchdog,
                    c.restarts_recycled,
                    c.restarts_reload,
                    c.reloads_ok,
                    c.reloads_rolled_back + c.reloads_unresolved,
                    if s.orphans.is_empty() {
                        String::new()
                    } else {
                        format!(" · {} stray process(es): herd status", s.orphans.len())
                    }
                )),
            ]
        }
        None => vec![Line::from(format!("{}: connecting…", top.name))],
    };
    frame.render_widget(Paragraph::new(head_lines), head);

    let header = Row::new([
        "SLOT",
        "PID",
        "STATE",
        "READY",
        "UPTIME",
        "RESTARTS",
        "CPU",
        "CPU HISTORY",
        "RSS",
        "RSS HISTORY",
        "NOTE",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let body: Vec<Row> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let h = r.pid.and_then(|p| top.history.get(&p));
            let cpu_spark = h
                .map(|h| sparkline(&h.cpu, SPARK, 0, 100))
                .unwrap_or_default();
            let rss_spark = h
                .map(|h| {
                    // Within a band 10 % either side of the lowest reading: a
                    // few pages more do not look like a leak.
                    let lo = h.rss.iter().copied().min().unwrap_or(0);
                    sparkline(&h.rss, SPARK, lo - lo / 10, lo + lo / 10)
                })
                .unwrap_or_default();
            let row = Row::new([
                Cell::from(r.slot.to_string()),
                Cell::from(r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())),
                Cell::from(r.state.clone()),
                Cell::from(if r.pid.is_none() {
                    "-"
                } else if r.ready {
                    "yes"
                } else {
                    "no"
                }),
                Cell::from(if r.pid.is_some() {
                    duration(r.uptime_s)
                } else {
                    "-".into()
                }),
                Cell::from(r.restarts.to_string()),
                Cell::from(
                    r.cpu_pct
                        .map(|c| format!("{c:.0}%"))
                        .unwrap_or_else(|| "-".into()),
                ),
                Cell::from(cpu_spark),
                Cell::from(r.rss.map(bytes).unwrap_or_else(|| "-".into())),
                Cell::from(rss_spark),
                Cell::from(r.note.clone()),
            ]);
            if i == top.selected {
                row.style(Style::new().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        })
        .collect();
    let widths = [
        Constraint::Length(4),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(5),
        Constraint::Length(SPARK as u16),
        Constraint::Length(7),
        Constraint::Length(SPARK as u16),
        Constraint::Min(4),
    ];
    let table_widget = Table::new(body, widths)
        .header(header)
        .block(Block::bordered().title(" workers "));
    frame.render_widget(table_widget, table);

    // As many recent log lines as fit.
    let room = logs.height.saturating_sub(2) as usize;
    let shown: Vec<Line> = {
        let all: Vec<_> = top.shown_logs().collect();
        let start = all.len().saturating_sub(room);
        all[start..]
            .iter()
            .map(|l| Line::from(crate::ctl::render_log(l)))
            .collect()
    };
    let title = match top.log_slot {
        Some(s) => format!(" log: slot {s} "),
        None => " log ".to_string(),
    };
    frame.render_widget(
        Paragraph::new(shown).block(Block::bordered().title(title)),
        logs,
    );

    let keys_line = match &top.message {
        Some(m) => m.clone(),
        None => "q quit · ↑↓ select · r restart worker · +/- scale · R reload · l logs of slot"
            .to_string(),
    };
    frame.render_widget(
        Paragraph::new(keys_line).style(Style::new().add_modifier(Modifier::DIM)),
        keys,
    );
}

#[cfg(test)]
mod tests {
    use herd::control::protocol::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::super::model::{Action, Key, Top};

    fn status(uptime: f64, cpu: [f64; 2], rss: [u64; 2]) -> Status {
        let worker = |pid: u32, cpu_s: f64, rss: u64| WorkerStatus {
            pid,
            role: "current".into(),
            ready: true,
            uptime_s: uptime,
            generation: 0,
            status_text: None,
            cpu_s: Some(cpu_s),
            rss_bytes: Some(rss),
            connections: None,
        };
        Status {
            summary: Summary {
                name: "web".into(),
                pid: 100,
                workers: 3,
                ready: 2,
                uptime_s: 3725,
                restarts: 7,
                command: "node app.js".into(),
            },
            version: "0.1.0".into(),
            started_unix: 0,
            generation: 0,
            reloading: false,
            stopping: false,
            balance: "shared".into(),
            containment: "cgroup".into(),
            listeners: vec![ListenerStatus {
                spec: "127.0.0.1:8000".into(),
                queued: Some(0),
            }],
            slots: vec![
                SlotStatus {
                    slot: 0,
                    state: "running".into(),
                    restarts: 0,
                    last_exit: None,
                    next_start_in_s: None,
                    workers: vec![worker(201, cpu[0], rss[0])],
                },
                SlotStatus {
                    slot: 1,
                    state: "running".into(),
                    restarts: 2,
                    last_exit: Some("killed by SIGKILL".into()),
                    next_start_in_s: None,
                    workers: vec![worker(202, cpu[1], rss[1])],
                },
                SlotStatus {
                    slot: 2,
                    state: "backoff".into(),
                    restarts: 5,
                    last_exit: Some("exit code 3".into()),
                    next_start_in_s: Some(1.5),
                    workers: vec![],
                },
            ],
            orphans: vec![],
            counters: Counters {
                restarts_crash: 5,
                restarts_killed: 2,
                ..Counters::default()
            },
        }
    }

    fn screen(top: &Top, w: u16, h: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
        terminal.draw(|f| super::draw(f, top)).unwrap();
        let buf = terminal.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect()
    }

    fn model() -> Top {
        let mut top = Top::new("web");
        // Three readings one second apart: slot 0 busy, slot 1 idle.
        for i in 0..3 {
            let t = 10.0 + i as f64;
            let mb = 1 << 20;
            top.update(status(
                t,
                [0.5 * i as f64, 0.01],
                [(20 + 5 * i) * mb, 30 * mb],
            ));
        }
        top.log(LogLine {
            seq: 1,
            time_ms: 0,
            slot: Some(0),
            pid: Some(201),
            stream: "stdout".into(),
            line: "GET / 200".into(),
        });
        top.log(LogLine {
            seq: 2,
            time_ms: 0,
            slot: Some(1),
            pid: Some(202),
            stream: "stderr".into(),
            line: "warning: slow query".into(),
        });
        top
    }

    #[test]
    fn snapshot_of_a_cluster() {
        let top = model();
        let got = screen(&top, 110, 16);
        let want = [
            "web  pid 100  up 1h02m  2/3 ready  generation 0  127.0.0.1:8000 (0 queued)",
            "restarts: 5 crashed 2 killed 0 hung 0 recycled 0 reloaded · reloads 0 ok 0 rolled back",
            "┌ workers ───────────────────────────────────────────────────────────────────────────────────────────────────┐",
            "│SLOT PID     STATE     READY UPTIME  RESTARTS CPU   CPU HISTORY  RSS     RSS HISTORY  NOTE                  │",
            "│0    201     running   yes   12s     0        50%   ▅▅           30.0M   ▂▅█                                │",
            "│1    202     running   yes   12s     2        0%    ▁▁           30.0M   ▅▅▅                                │",
            "│2    -       backoff   -     -       5        -                  -                    last: exit code 3     │",
            "└────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            "┌ log ───────────────────────────────────────────────────────────────────────────────────────────────────────┐",
            "│[0 201] GET / 200                                                                                           │",
            "│[1 202] warning: slow query                                                                                 │",
            "│                                                                                                            │",
            "│                                                                                                            │",
            "│                                                                                                            │",
            "└────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            "q quit · ↑↓ select · r restart worker · +/- scale · R reload · l logs of slot",
        ];
        assert_eq!(got, want, "\n{}", got.join("\n"));
    }

    #[test]
    fn a_narrow_terminal_still_draws() {
        let top = model();
        let got = screen(&top, 40, 8);
        assert!(got[0].starts_with("web  pid 100"), "{got:?}");
        let got = screen(&top, 1, 1);
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn keys_select_filter_and_act() {
        let mut top = model();
        assert_eq!(top.key(Key::Down), None);
        assert_eq!(top.key(Key::Char('r')), Some(Action::Restart(1)));
        assert_eq!(top.key(Key::Char('l')), None);
        assert_eq!(top.log_slot, Some(1));
        let got = screen(&top, 110, 16);
        assert!(got.iter().any(|l| l.contains("log: slot 1")), "{got:?}");
        assert!(!got.iter().any(|l| l.contains("GET / 200")), "{got:?}");
        // A reload asks first.
        assert_eq!(top.key(Key::Char('R')), None);
        assert_eq!(top.key(Key::Char('R')), Some(Action::Reload));
        assert_eq!(top.key(Key::Char('R')), None);
        assert_eq!(top.key(Key::Char('x')), None);
        assert_eq!(top.key(Key::Char('R')), None, "another key cancels");
        assert_eq!(top.key(Key::Char('+')), Some(Action::Scale(1)));
        assert_eq!(top.key(Key::Down), None);
        assert_eq!(top.key(Key::Down), None);
        assert_eq!(top.selected, 2, "not past the last row");
        assert_eq!(top.key(Key::Char('q')), Some(Action::Quit));
    }
}
