//! Figures 1 and 2: req/s and latency under keep-alive and `Connection:
//! close`, and how evenly the workers share the load.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use crate::load::{Load, LoadResult};
use crate::report::{fmt_rps, fmt_us, stats, Results};
use crate::systems::{App, Ctx, Running, Sys, System};

#[derive(Default)]
struct Sample {
    ka: Vec<LoadResult>,
    close: Vec<LoadResult>,
    /// Busiest worker's share of (requests, connections), per run.
    ka_share: Vec<(f64, f64)>,
    close_share: Vec<(f64, f64)>,
}

/// The systems compared, Node app first, then herd's built-in worker.
pub fn systems(ctx: &Ctx) -> Vec<System> {
    let mut v = vec![
        System::new(Sys::HerdShared, App::Node),
        System::new(Sys::HerdReuseport, App::Node),
        System::new(Sys::RawShared, App::Node),
        System::new(Sys::RawReuseport, App::Node),
        System::new(Sys::NodeRr, App::Node),
        System::new(Sys::NodeNone, App::Node),
        System::new(Sys::Pm2, App::Node),
        System::new(Sys::Single, App::Node),
        System::new(Sys::HerdShared, App::Builtin),
        System::new(Sys::HerdReuseport, App::Builtin),
        System::new(Sys::RawShared, App::Builtin),
        System::new(Sys::RawReuseport, App::Builtin),
    ];
    if ctx.pm2.is_none() {
        v.retain(|s| s.sys != Sys::Pm2);
    }
    v
}

fn busiest(before: &BTreeMap<u32, (u64, u64)>, after: &BTreeMap<u32, (u64, u64)>) -> (f64, f64) {
    let deltas: Vec<(u64, u64)> = after
        .iter()
        .map(|(pid, (r, c))| {
            let (r0, c0) = before.get(pid).copied().unwrap_or((0, 0));
            (r.saturating_sub(r0), c.saturating_sub(c0))
        })
        .collect();
    let share = |f: fn(&(u64, u64)) -> u64| {
        let total: u64 = deltas.iter().map(f).sum();
        let max = deltas.iter().map(f).max().unwrap_or(0);
        if total == 0 {
            f64::NAN
        } else {
            max as f64 / total as f64
        }
    };
    (share(|d| d.0), share(|d| d.1))
}

fn measure(
    ctx: &Ctx,
    running: &Running,
    close: bool,
    res: &mut Results,
) -> Result<(LoadResult, (f64, f64))> {
    let load = Load {
        threads: ctx.threads,
        connections: ctx.connections,
        duration: ctx.duration,
        close,
        cpus: ctx.load_cpus.clone(),
    };
    let kind = if close {
        "load, Connection: close"
    } else {
        "load, keep-alive"
    };
    res.command(kind, load.command_line("http://127.0.0.1:PORT/"));
    let before = running.worker_stats();
    let result = load.run(&ctx.wrk, &running.url())?;
    let share = if running.system.app == App::Node {
        // The app writes its counters every 500 ms.
        std::thread::sleep(Duration::from_millis(700));
        busiest(&before, &running.worker_stats())
    } else {
        (f64::NAN, f64::NAN)
    };
    Ok((result, share))
}

/// Runs every system `reps` times, interleaved, so drift hits all alike.
pub fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let systems = systems(ctx);
    let mut samples: BTreeMap<String, Sample> = BTreeMap::new();
    for rep in 0..ctx.reps {
        for system in &systems {
            let workers = system.worker_count(ctx.workers);
            let (argv, _) = system.command(ctx, workers, 0);
            res.command(
                &system.label(),
                argv.join(" ").replace("127.0.0.1:0", "127.0.0.1:PORT"),
            );
            eprintln!(
                "[throughput] rep {}/{} {}",
                rep + 1,
                ctx.reps,
                system.label()
            );
            let running = system.start(ctx, workers)?;
            running.wait_ready(workers, Duration::from_secs(60))?;
            let s = samples.entry(system.label()).or_default();
            let (ka, ka_share) = measure(ctx, &running, false, res)?;
            let (close, close_share) = measure(ctx, &running, true, res)?;
            s.ka.push(ka);
            s.close.push(close);
            s.ka_share.push(ka_share);
            s.close_share.push(close_share);
            running.stop();
        }
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "{} workers (single node: 1), wrk {} threads, {} connections, {:?} per run, {} runs per cell: median (min–max). \
         Latency from wrk's distribution, median over runs. \"busiest\" is the busiest worker's share of requests / of \
         connections (Node app only: it counts both).\n",
        ctx.workers, ctx.threads, ctx.connections, ctx.duration, ctx.reps
    );
    md.push_str("| system | keep-alive req/s | p50 | p99 | busiest (req / conn) | close req/s | p50 | p99 | busiest (req) |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let median =
        |v: &[LoadResult], f: fn(&LoadResult) -> f64| stats(&v.iter().map(f).collect::<Vec<_>>()).0;
    let pct = |v: f64| {
        if v.is_nan() {
            "–".to_string()
        } else {
            format!("{:.1}%", v * 100.0)
        }
    };
    for system in &systems {
        let s = &samples[&system.label()];
        let rps = |v: &[LoadResult]| fmt_rps(&v.iter().map(|r| r.rps).collect::<Vec<_>>());
        let ka_req = stats(&s.ka_share.iter().map(|x| x.0).collect::<Vec<_>>()).0;
        let ka_conn = stats(&s.ka_share.iter().map(|x| x.1).collect::<Vec<_>>()).0;
        let close_req = stats(&s.close_share.iter().map(|x| x.0).collect::<Vec<_>>()).0;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} / {} | {} | {} | {} | {} |",
            system.label(),
            rps(&s.ka),
            fmt_us(median(&s.ka, |r| r.p50_us)),
            fmt_us(median(&s.ka, |r| r.p99_us)),
            pct(ka_req),
            pct(ka_conn),
            rps(&s.close),
            fmt_us(median(&s.close, |r| r.p50_us)),
            fmt_us(median(&s.close, |r| r.p99_us)),
            pct(close_req),
        );
        res.throughput.push((
            system.label(),
            median(&s.ka, |r| r.rps),
            median(&s.close, |r| r.rps),
        ));
    }
    res.sections.push(("Throughput and spread".into(), md));

    // Targets, as ratios of medians from this same run.
    let get = |sys: Sys, app: App, close: bool| -> f64 {
        samples
            .get(&System::new(sys, app).label())
            .map(|s| median(if close { &s.close } else { &s.ka }, |r| r.rps))
            .unwrap_or(f64::NAN)
    };
    for app in [App::Node, App::Builtin] {
        let tag = if app == App::Node {
            "Node app"
        } else {
            "built-in"
        };
        for (load, close) in [("keep-alive", false), ("close", true)] {
            for (herd, ceiling, mode) in [
                (Sys::HerdShared, Sys::RawShared, "shared"),
                (Sys::HerdReuseport, Sys::RawReuseport, "reuseport"),
            ] {
                let r = get(herd, app, close) / get(ceiling, app, close);
                res.target(
                    format!("herd {mode} / ceiling {mode}, {load}, {tag}"),
                    format!("{r:.2}×"),
                    "≥ 0.97×",
                    r >= 0.97,
                );
            }
            let best = get(Sys::RawShared, app, close).max(get(Sys::RawReuseport, app, close));
            let r = get(Sys::HerdShared, app, close) / best;
            res.target(
                format!("herd default (shared) / best ceiling, {load}, {tag}"),
                format!("{r:.2}×"),
                "≥ 0.97×",
                r >= 0.97,
            );
        }
    }
    let herd_close = get(Sys::HerdShared, App::Node, true);
    let rr = herd_close / get(Sys::NodeRr, App::Node, true);
    res.target(
        "herd close / Node cluster rr",
        format!("{rr:.2}×"),
        "≥ 1.8×",
        rr >= 1.8,
    );
    if ctx.workers >= 8 {
        // The 16-core target: Node's round-robin primary is the ceiling there.
        res.target(
            format!("herd close / Node cluster rr, {} workers", ctx.workers),
            format!("{rr:.2}×"),
            "≥ 2.5× (8 workers, 16 cores)",
            rr >= 2.5,
        );
    }
    if ctx.pm2.is_some() {
        let pm2 = herd_close / get(Sys::Pm2, App::Node, true);
        res.target(
            "herd close / PM2",
            format!("{pm2:.2}×"),
            "≥ 2.2×",
            pm2 >= 2.2,
        );
    }
    // The spread target is defined for 2 workers only.
    let spread = samples
        .get(&System::new(Sys::HerdShared, App::Node).label())
        .filter(|_| ctx.workers == 2);
    if let Some(s) = spread {
        let share = stats(&s.ka_share.iter().map(|x| x.0).collect::<Vec<_>>()).0;
        res.target(
            format!("busiest worker's share of requests, keep-alive, herd default, {} workers, {} connections", ctx.workers, ctx.connections),
            pct(share),
            "≤ 52%",
            share <= 0.52,
        );
    }
    Ok(())
}
