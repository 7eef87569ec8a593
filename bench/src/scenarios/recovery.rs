//! Figure 4: crash recovery. `kill -9` of a worker, then: when the supervisor
//! noticed, when the replacement process existed, when it answered; and how
//! many requests failed around the kill under load.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Result};
use rustix::process::Signal;

use crate::load::Load;
use crate::procfs;
use crate::report::{fmt_us_stats, Results};
use crate::systems::{get_worker, signal, App, Ctx, Running, Sys, System};

#[derive(Default)]
struct Sample {
    /// From the supervisor's own log, where it has one (µs after the kill).
    noticed: Vec<f64>,
    logged_spawn: Vec<f64>,
    /// Seen from outside: a new child of the supervisor, polled every 200 µs.
    spawned: Vec<f64>,
    /// The replacement's first answer.
    answered: Vec<f64>,
    /// (socket errors + bad statuses) per kill under close / keep-alive load.
    failed_close: u64,
    failed_keepalive: u64,
}

fn wall_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Seconds since the epoch from `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + (h * 3600 + min * 60) as f64 + sec)
}

/// herd's log timestamp of the first line containing `needle`.
fn herd_log_time(log: &str, needle: &str) -> Option<f64> {
    log.lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split_whitespace().next())
        .and_then(parse_rfc3339)
}

fn one_kill(running: &Running, s: &mut Sample) -> Result<()> {
    let sup = running.supervisor().expect("supervised");
    let victim = get_worker(running.port)?;
    let before: BTreeSet<u32> = procfs::children(sup);
    let wall0 = wall_secs(SystemTime::now());
    let t0 = Instant::now();
    signal(victim, Signal::KILL);
    let deadline = t0 + Duration::from_secs(10);
    let fresh = loop {
        if let Some(p) = procfs::children(sup).difference(&before).next() {
            break *p;
        }
        if Instant::now() > deadline {
            bail!("{}: no replacement within 10 s", running.system.label());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    s.spawned.push(t0.elapsed().as_secs_f64() * 1e6);
    // The first answer from a worker that did not exist before the kill (the
    // first new child need not be the worker: PM2's daemon also runs helpers).
    loop {
        if let Ok(pid) = get_worker(running.port) {
            if !before.contains(&pid) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{}: no replacement answered within 10 s",
                running.system.label()
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    s.answered.push(t0.elapsed().as_secs_f64() * 1e6);
    std::thread::sleep(Duration::from_millis(100));
    match running.system.sys {
        Sys::HerdShared | Sys::HerdReuseport => {
            let log = running.stderr();
            if let Some(t) = herd_log_time(&log, &format!("worker {victim} died")) {
                s.noticed.push((t - wall0) * 1e6);
            }
            if let Some(t) = herd_log_time(&log, &format!("worker {fresh} spawned")) {
                s.logged_spawn.push((t - wall0) * 1e6);
            }
        }
        Sys::NodeRr | Sys::NodeNone => {
            let out = running.stdout();
            let find = |tag: &str, pid: u32| {
                out.lines()
                    .find(|l| l.starts_with(&format!("{tag} {pid} ")))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|ms| ms.parse::<f64>().ok())
            };
            if let Some(ms) = find("exit", victim) {
                s.noticed.push((ms / 1000.0 - wall0) * 1e6);
            }
            if let Some(ms) = find("fork", fresh) {
                s.logged_spawn.push((ms / 1000.0 - wall0) * 1e6);
            }
        }
        _ => {}
    }
    Ok(())
}

fn kill_under_load(ctx: &Ctx, system: &System, close: bool) -> Result<u64> {
    let running = system.start(ctx, ctx.workers)?;
    running.wait_ready(ctx.workers, Duration::from_secs(60))?;
    let load = Load {
        threads: ctx.threads,
        connections: ctx.connections,
        duration: Duration::from_secs(3),
        close,
        cpus: ctx.load_cpus.clone(),
    };
    let url = running.url();
    let wrk = ctx.wrk.clone();
    let handle = std::thread::spawn(move || load.run(&wrk, &url));
    std::thread::sleep(Duration::from_millis(1000));
    let victim = get_worker(running.port)?;
    signal(victim, Signal::KILL);
    let result = handle.join().expect("load thread")?;
    running.stop();
    Ok(result.socket_errors + result.bad_status)
}

pub fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let mut systems = vec![
        System::new(Sys::HerdShared, App::Node),
        System::new(Sys::HerdReuseport, App::Node),
        System::new(Sys::HerdShared, App::Builtin),
        System::new(Sys::NodeRr, App::Node),
        System::new(Sys::NodeNone, App::Node),
    ];
    if ctx.pm2.is_some() {
        systems.push(System::new(Sys::Pm2, App::Node));
    }
    let mut rows = Vec::new();
    for system in &systems {
        eprintln!("[recovery] {}", system.label());
        let mut s = Sample::default();
        // A fresh cluster per kill: each victim is a healthy worker in a slot
        // with no recent failure, the case a supervisor should handle fastest
        // (herd backs off only on repeated quick failures).
        for _ in 0..ctx.reps.max(3) {
            let running = system.start(ctx, ctx.workers)?;
            running.wait_ready(ctx.workers, Duration::from_secs(60))?;
            one_kill(&running, &mut s)?;
            running.stop();
        }
        s.failed_close = kill_under_load(ctx, system, true)?;
        s.failed_keepalive = kill_under_load(ctx, system, false)?;
        rows.push((system.label(), s));
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{} workers, idle cluster, {} kills each (a freshly started cluster per kill): median (min–max), from the kill. \"noticed\" and \"spawned (log)\" \
         come from the supervisor's own log (herd's tracing timestamps; the Node primary's `exit`/`fork` events, \
         which bench/apps/cluster.js prints); PM2 logs neither. \"spawned (seen)\" is a new child of the \
         supervisor, polled from /proc every 200 µs by the bench, for every system alike. \"answering\" is the \
         replacement's first answer. Then one kill 1 s into a 3 s wrk run ({} connections): failed requests \
         (socket errors + bad statuses). A kill necessarily breaks the victim's in-flight keep-alive connections.\n",
        ctx.workers,
        ctx.reps.max(3),
        ctx.connections
    );
    md.push_str("| system | noticed | spawned (log) | reaction (log: spawned − noticed) | spawned (seen) | answering | failed, close load | failed, keep-alive load |\n|---|---|---|---|---|---|---|---|\n");
    for (label, s) in &rows {
        let reaction: Vec<f64> = s
            .logged_spawn
            .iter()
            .zip(&s.noticed)
            .map(|(spawn, notice)| spawn - notice)
            .collect();
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_us_stats(&s.noticed),
            fmt_us_stats(&s.logged_spawn),
            fmt_us_stats(&reaction),
            fmt_us_stats(&s.spawned),
            fmt_us_stats(&s.answered),
            s.failed_close,
            s.failed_keepalive
        );
    }
    res.sections.push(("Crash recovery".into(), md));
    for app in [App::Node, App::Builtin] {
        let label = System::new(Sys::HerdShared, app).label();
        if let Some((_, s)) = rows.iter().find(|(l, _)| *l == label) {
            let m = crate::report::stats(&s.logged_spawn).0;
            res.target(
                format!("kill -9 → replacement spawned, {label} (herd's log)"),
                crate::report::fmt_us(m),
                "≤ 2 ms",
                m <= 2000.0,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        assert_eq!(
            super::parse_rfc3339("1970-01-02T00:00:01.5Z"),
            Some(86_401.5)
        );
        assert_eq!(
            super::parse_rfc3339("2000-03-01T00:00:00Z"),
            Some(951_868_800.0)
        );
    }
}
