//! Zero-downtime operations under load: a rolling reload (herd's SIGHUP,
//! Node cluster's hand-written rolling restart, `pm2 reload`), scaling
//! down by one (herd's SIGTTOU), and a reload whose new version cannot
//! boot (herd's rollback). For each: failed requests by kind, p99 during
//! the operation against p99 at rest, and how long it took.
//!
//! The load is this crate's own HTTP/1.1 client (as in `chaos.rs`): half the
//! threads on kept-alive connections (a new one after `Connection: close`
//! or a failure), half with `Connection: close`, each request timed and
//! classified.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rustix::process::Signal;

use super::chaos::{classify, connect, request, Outcome, KINDS, REQUEST_TIMEOUT};
use crate::report::{fmt_us, stats, Results};
use crate::systems::{signal, App, Ctx, Running, Sys, System};

/// Client threads of each kind (keep-alive, close).
const THREADS: usize = 4;
/// Load before the operation: the first second warms up, the rest is "at rest"
/// (halved for a smoke run: `--duration` under 3 s).
const BEFORE: Duration = Duration::from_secs(3);
const WARMUP: Duration = Duration::from_secs(1);
/// Load after the operation ended.
const AFTER: Duration = Duration::from_secs(1);

/// (before, warm-up, after) for this run.
fn phases(ctx: &Ctx) -> (Duration, Duration, Duration) {
    if ctx.duration < Duration::from_secs(3) {
        (BEFORE / 2, WARMUP / 2, AFTER / 2)
    } else {
        (BEFORE, WARMUP, AFTER)
    }
}
/// The longest an operation may take.
const OP_TIMEOUT: Duration = Duration::from_secs(90);

/// One request: when it started (s since the load began), its latency, how
/// it ended.
struct Rec {
    at: f64,
    us: f64,
    outcome: Outcome,
}

fn close_request(addr: &SocketAddr) -> Outcome {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut s = match TcpStream::connect_timeout(addr, REQUEST_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT));
    if let Err(e) = s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n") {
        return classify(&e);
    }
    let mut out = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        if Instant::now() > deadline {
            return Outcome::Timeout;
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return classify(&e),
        }
    }
    if out.is_empty() {
        return Outcome::Eof;
    }
    match std::str::from_utf8(&out[..out.len().min(16)]) {
        Ok(head) if head.starts_with("HTTP/1.1 2") => Outcome::Ok,
        Ok(head) if head.starts_with("HTTP/1.") => Outcome::BadStatus,
        _ => Outcome::Other,
    }
}

fn client(addr: SocketAddr, keep_alive: bool, on: &AtomicBool, t0: Instant) -> Vec<Rec> {
    let mut recs = Vec::new();
    let mut conn = None;
    while on.load(Ordering::Relaxed) {
        let start = Instant::now();
        let at = (start - t0).as_secs_f64();
        let outcome = if keep_alive {
            let c = match conn.take() {
                Some(c) => Ok(c),
                None => connect(&addr),
            };
            match c {
                Err(o) => o,
                Ok(mut c) => match request(&mut c, start + REQUEST_TIMEOUT) {
                    Ok(r) => {
                        if !r.close {
                            conn = Some(c);
                        }
                        if (200..300).contains(&r.status) {
                            Outcome::Ok
                        } else {
                            Outcome::BadStatus
                        }
                    }
                    Err(o) => o,
                },
            }
        } else {
            close_request(&addr)
        };
        recs.push(Rec {
            at,
            us: start.elapsed().as_secs_f64() * 1e6,
            outcome,
        });
    }
    recs
}

/// One operation's figures from one run.
#[derive(Default)]
struct Run {
    /// Failed requests by kind (indexed like `KINDS`; 0 is Ok).
    by_kind: [u64; 7],
    requests: u64,
    p99_rest_us: f64,
    p99_during_us: f64,
    took_s: f64,
}

fn p99(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * 0.99) as usize).min(v.len() - 1)]
}

/// Runs load on `running`, performs `op` at rest, waits for `done`, and
/// measures.
fn under_load(
    (before, warmup, after): (Duration, Duration, Duration),
    running: &Running,
    op: impl FnOnce(&Running) -> Result<()> + Send,
    done: impl Fn(&Running) -> bool,
) -> Result<Run> {
    let addr: SocketAddr = ([127, 0, 0, 1], running.port).into();
    let on = Arc::new(AtomicBool::new(true));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..THREADS * 2)
        .map(|i| {
            let on = on.clone();
            std::thread::spawn(move || client(addr, i % 2 == 0, &on, t0))
        })
        .collect();
    std::thread::sleep(before);
    let t_op = t0.elapsed().as_secs_f64();
    let started = Instant::now();
    let result = std::thread::scope(|s| {
        let h = s.spawn(|| op(running));
        while !done(running) {
            if started.elapsed() > OP_TIMEOUT {
                bail!(
                    "{}: the operation did not end within {OP_TIMEOUT:?}",
                    running.system.label()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        h.join().expect("op thread")
    });
    let t_done = t0.elapsed().as_secs_f64();
    if result.is_ok() {
        std::thread::sleep(after);
    }
    on.store(false, Ordering::Relaxed);
    let recs: Vec<Rec> = clients
        .into_iter()
        .flat_map(|h| h.join().expect("client"))
        .collect();
    result?;
    let mut run = Run {
        took_s: t_done - t_op,
        ..Run::default()
    };
    let warm = warmup.as_secs_f64();
    let (mut rest, mut during) = (Vec::new(), Vec::new());
    for r in recs.iter().filter(|r| r.at >= warm) {
        run.requests += 1;
        let i = KINDS.iter().position(|k| *k == r.outcome).unwrap_or(6);
        run.by_kind[i] += 1;
        if r.outcome == Outcome::Ok {
            if r.at < t_op {
                rest.push(r.us);
            } else if r.at <= t_done {
                during.push(r.us);
            }
        }
    }
    run.p99_rest_us = p99(rest);
    run.p99_during_us = p99(during);
    Ok(run)
}

/// Lines of `log` containing `needle`.
fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// The operations measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    /// A rolling reload of every worker.
    Reload,
    /// One worker fewer.
    ScaleDown,
    /// A reload whose new version exits at start (herd only).
    FailedReload,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Reload => "reload",
            Op::ScaleDown => "scale down by 1",
            Op::FailedReload => "reload, new version cannot boot",
        }
    }
}

fn herd_sys(s: Sys) -> bool {
    matches!(
        s,
        Sys::HerdShared | Sys::HerdReuseport | Sys::HerdRoundRobin
    )
}

/// One run of `op` on a fresh `system`.
fn one(ctx: &Ctx, system: &System, op: Op) -> Result<Run> {
    let n = ctx.workers;
    let flag = ctx
        .workdir
        .join(format!("cannot-boot-{}", std::process::id()));
    let running = if op == Op::FailedReload {
        let _ = std::fs::remove_file(&flag);
        let script = format!(
            "if [ -e {} ]; then echo 'cannot boot: DATABASE_URL is not set' >&2; exit 1; fi; exec {} hello",
            flag.display(),
            ctx.herd.display()
        );
        system.start_with(ctx, |port| {
            let (mut argv, env) = system.command(ctx, n, port);
            let at = argv.iter().position(|a| a == "--").expect("herd's argv");
            argv.truncate(at + 1);
            argv.extend(["sh".into(), "-c".into(), script]);
            (argv, env)
        })?
    } else {
        system.start(ctx, n)?
    };
    running.wait_ready(n, Duration::from_secs(60))?;
    let sup = running.supervisor().expect("supervised");
    let run = match (op, system.sys) {
        (Op::Reload, Sys::Pm2) => {
            let finished = AtomicBool::new(false);
            under_load(
                phases(ctx),
                &running,
                |r| {
                    let status = r.pm2(&["reload", "bench"]);
                    finished.store(true, Ordering::Relaxed);
                    status.map(|_| ())
                },
                |_| finished.load(Ordering::Relaxed),
            )?
        }
        (Op::Reload, Sys::NodeRr | Sys::NodeNone) => under_load(
            phases(ctx),
            &running,
            |_| {
                signal(sup, Signal::HUP);
                Ok(())
            },
            |r| count(&r.stdout(), "reloaded ") > 0,
        )?,
        (Op::Reload | Op::FailedReload, s) if herd_sys(s) => {
            if op == Op::FailedReload {
                std::fs::write(&flag, "")?;
            }
            let run = under_load(
                phases(ctx),
                &running,
                |_| {
                    signal(sup, Signal::HUP);
                    Ok(())
                },
                |r| {
                    let log = r.stderr();
                    count(&log, "reload done") + count(&log, "RELOAD FAILED") > 0
                },
            )?;
            let log = running.stderr();
            let want = if op == Op::Reload {
                "reload done"
            } else {
                "RELOAD FAILED"
            };
            if count(&log, want) == 0 {
                bail!("{}: expected \"{want}\":\n{log}", system.label());
            }
            run
        }
        (Op::ScaleDown, s) if herd_sys(s) => under_load(
            phases(ctx),
            &running,
            |_| {
                signal(sup, Signal::TTOU);
                Ok(())
            },
            |r| count(&r.stderr(), &format!("slot {} removed", n - 1)) > 0,
        )?,
        _ => bail!("{} cannot {}", system.label(), op.label()),
    };
    running.stop();
    let _ = std::fs::remove_file(&flag);
    Ok(run)
}

pub fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let mut plan: Vec<(System, Op)> = Vec::new();
    for app in [App::Builtin, App::Node] {
        for sys in [Sys::HerdShared, Sys::HerdReuseport] {
            plan.push((System::new(sys, app), Op::Reload));
            plan.push((System::new(sys, app), Op::ScaleDown));
        }
    }
    plan.push((System::new(Sys::HerdRoundRobin, App::Node), Op::Reload));
    plan.push((System::new(Sys::HerdRoundRobin, App::Node), Op::ScaleDown));
    plan.push((System::new(Sys::NodeRr, App::Node), Op::Reload));
    plan.push((System::new(Sys::NodeNone, App::Node), Op::Reload));
    if ctx.pm2.is_some() {
        plan.push((System::new(Sys::Pm2, App::Node), Op::Reload));
    }
    plan.push((System::new(Sys::HerdShared, App::Builtin), Op::FailedReload));
    let mut rows = Vec::new();
    for (system, op) in &plan {
        eprintln!("[reload] {}: {}", system.label(), op.label());
        let mut runs = Vec::new();
        for _ in 0..ctx.reps {
            runs.push(one(ctx, system, *op)?);
        }
        rows.push((system.label(), *op, runs));
    }
    let n = ctx.workers;
    let (before, warmup, after) = phases(ctx);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{n} workers; {} runs each on a fresh cluster. Load: the bench's own HTTP/1.1 client, {THREADS} threads \
         on kept-alive connections (a new one after `Connection: close` or a failure) and {THREADS} with \
         `Connection: close`, back to back, {REQUEST_TIMEOUT:?} per request. The operation starts after {before:?} \
         of load ({warmup:?} warm-up, the rest \"at rest\") and the load goes on {after:?} after it ended. herd: \
         `kill -HUP` (reload; ended at its \"reload done\" / \"RELOAD FAILED\" log line), `kill -TTOU` (scale down; \
         ended at \"slot N removed\"). Node cluster: `kill -HUP` to bench/apps/cluster.js's primary, which replaces \
         its workers one at a time the way its users write it (fork, wait for `listening`, `disconnect` the old \
         one, wait for its exit). PM2: `pm2 reload bench` (ended when the command returns). \"cannot boot\": herd's \
         built-in worker behind a script that exits 1 once a flag file exists; the flag is set, then SIGHUP: the \
         time is until herd logs the rollback. Failed requests are summed over the runs, by kind; p99s and times \
         are median (min–max) over the runs.\n",
        ctx.reps
    );
    md.push_str("| system | operation | requests | failed | by kind | p99 at rest | p99 during | took |\n|---|---|---|---|---|---|---|---|\n");
    for (label, op, runs) in &rows {
        let mut by_kind = [0u64; 7];
        for r in runs {
            for (a, b) in by_kind.iter_mut().zip(r.by_kind) {
                *a += b;
            }
        }
        let requests: u64 = runs.iter().map(|r| r.requests).sum();
        let failed = requests - by_kind[0];
        let kinds: Vec<String> = KINDS
            .iter()
            .zip(by_kind)
            .skip(1)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k:?} {n}"))
            .collect();
        let fmt = |v: Vec<f64>, unit: fn(f64) -> String| {
            let (m, lo, hi) = stats(&v);
            if v.len() > 1 {
                format!("{} ({}–{})", unit(m), unit(lo), unit(hi))
            } else {
                unit(m)
            }
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {requests} | {failed} | {} | {} | {} | {} |",
            op.label(),
            if kinds.is_empty() {
                "–".to_string()
            } else {
                kinds.join(", ")
            },
            fmt(runs.iter().map(|r| r.p99_rest_us).collect(), fmt_us),
            fmt(runs.iter().map(|r| r.p99_during_us).collect(), fmt_us),
            fmt(runs.iter().map(|r| r.took_s).collect(), |s| format!(
                "{s:.2} s"
            )),
        );
        if label.contains("built-in") && *op != Op::FailedReload {
            res.target(
                format!("{label}: {}, failed requests under load", op.label()),
                failed.to_string(),
                "0",
                failed == 0,
            );
        }
        if *op == Op::FailedReload {
            res.target(
                format!("{label}: reload of a version that cannot boot, failed requests"),
                failed.to_string(),
                "0",
                failed == 0,
            );
        }
    }
    res.sections
        .push(("Reload and scale-down under load".into(), md));
    Ok(())
}
