//! Round-robin balancing under `Connection: close`: the same Node app, the
//! same worker count, with the primary accepting every connection and handing
//! it over — herd (`--balance round-robin`, herd speaking Node's cluster
//! protocol to the app's own `listen(PORT)`) against Node cluster's SCHED_RR.
//! The shared-socket modes of both run beside them as the reference where no
//! primary touches connections. The primary's CPU is read from /proc around
//! each load run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::load::Load;
use crate::procfs;
use crate::report::{fmt_rps, stats, Results};
use crate::systems::{App, Ctx, Sys, System};

#[derive(Default)]
struct Sample {
    rps: Vec<f64>,
    /// The primary's CPU time over wall time, in % of one core.
    primary_pct: Vec<f64>,
    /// The primary's CPU time per request (one connection each), µs.
    primary_us: Vec<f64>,
}

fn systems() -> Vec<System> {
    vec![
        System::new(Sys::HerdRoundRobin, App::Node),
        System::new(Sys::NodeRr, App::Node),
        System::new(Sys::HerdShared, App::Node),
        System::new(Sys::NodeNone, App::Node),
    ]
}

pub fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let mut samples: BTreeMap<String, Sample> = BTreeMap::new();
    let load = Load {
        threads: ctx.threads,
        connections: ctx.connections,
        duration: ctx.duration,
        close: true,
        cpus: ctx.load_cpus.clone(),
    };
    for rep in 0..ctx.reps {
        for system in systems() {
            let (argv, _) = system.command(ctx, ctx.workers, 0);
            res.command(
                &format!("roundrobin {}", system.label()),
                argv.join(" ").replace("127.0.0.1:0", "127.0.0.1:PORT"),
            );
            eprintln!(
                "[roundrobin] rep {}/{} {}",
                rep + 1,
                ctx.reps,
                system.label()
            );
            let running = system.start(ctx, ctx.workers)?;
            running.wait_ready(ctx.workers, Duration::from_secs(60))?;
            let primary = running.supervisor();
            let cpu = || primary.and_then(procfs::cpu_ticks);
            let (t0, c0) = (Instant::now(), cpu());
            let result = load.run(&ctx.wrk, &running.url())?;
            let (wall, c1) = (t0.elapsed(), cpu());
            let s = samples.entry(system.label()).or_default();
            s.rps.push(result.rps);
            if let (Some(c0), Some(c1)) = (c0, c1) {
                let secs = (c1 - c0) as f64 / procfs::ticks_per_sec() as f64;
                s.primary_pct.push(100.0 * secs / wall.as_secs_f64());
                s.primary_us
                    .push(1e6 * secs / result.requests.max(1) as f64);
            }
            running.stop();
        }
    }
    res.command(
        "roundrobin load",
        load.command_line("http://127.0.0.1:PORT/"),
    );

    let median = |v: &[f64]| stats(v).0;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "The Node app, {} workers, `Connection: close` (every request a new connection), wrk {} threads, {} \
         connections, {:?} per run, {} runs per cell: median (min–max). \"primary CPU\" is the primary \
         process's CPU time during the load run (/proc, clock ticks) over wall time, in % of one core, and \
         per request. Under herd round-robin the app is unchanged: its `listen(PORT)` goes through Node's \
         cluster module to herd, which accepts and hands each connection over.\n",
        ctx.workers, ctx.threads, ctx.connections, ctx.duration, ctx.reps
    );
    md.push_str("| system | close req/s | primary CPU (% of a core) | primary CPU per request |\n|---|---|---|---|\n");
    for system in systems() {
        let Some(s) = samples.get(&system.label()) else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0}% | {:.1} µs |",
            system.label(),
            fmt_rps(&s.rps),
            median(&s.primary_pct),
            median(&s.primary_us),
        );
    }
    let get = |sys: Sys| {
        samples
            .get(&System::new(sys, App::Node).label())
            .map(|s| median(&s.rps))
            .unwrap_or(f64::NAN)
    };
    let (herd_rr, node_rr, herd_shared) = (
        get(Sys::HerdRoundRobin),
        get(Sys::NodeRr),
        get(Sys::HerdShared),
    );
    let _ = writeln!(
        md,
        "\nherd round-robin / Node SCHED_RR: **{:.2}×**; herd round-robin / herd shared: {:.2}×.",
        herd_rr / node_rr,
        herd_rr / herd_shared
    );
    res.sections.push(("Round-robin".into(), md));
    res.target(
        "round-robin close req/s, herd / Node SCHED_RR (same app, same workers)",
        format!("{:.2}×", herd_rr / node_rr),
        "≥ 1.5×",
        herd_rr / node_rr >= 1.5,
    );
    Ok(())
}
