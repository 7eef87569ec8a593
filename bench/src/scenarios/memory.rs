//! Figure 3: the supervisor's memory (idle, after load, with many workers)
//! and its CPU time and wakeups while the cluster sits idle.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use crate::load::Load;
use crate::procfs;
use crate::report::{mib, Results};
use crate::systems::{App, Ctx, Sys, System};

struct Row {
    label: String,
    idle_kib: f64,
    loaded_kib: f64,
    many_kib: f64,
    idle_cpu_ms: f64,
    idle_switches: f64,
}

/// herd's guardian: the child of herd that runs herd's own binary.
fn guardian_of(herd: u32, herd_exe: &str) -> Option<u32> {
    procfs::children(herd)
        .into_iter()
        .find(|c| procfs::exe_name(*c).as_deref() == Some(herd_exe))
}

pub fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let mut systems = vec![
        System::new(Sys::HerdShared, App::Node),
        System::new(Sys::NodeRr, App::Node),
        System::new(Sys::NodeNone, App::Node),
    ];
    if ctx.pm2.is_some() {
        systems.push(System::new(Sys::Pm2, App::Node));
    }
    let herd_exe = ctx
        .herd
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut rows = Vec::new();
    let mut guardian = (f64::NAN, f64::NAN);
    for system in &systems {
        eprintln!("[memory] {}", system.label());
        let running = system.start(ctx, ctx.workers)?;
        running.wait_ready(ctx.workers, Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_secs(1));
        let sup = running
            .supervisor()
            .expect("a supervised system has a supervisor");
        let idle_kib = procfs::rss_kib(sup).unwrap_or(0) as f64;
        if system.sys == Sys::HerdShared {
            if let Some(g) = guardian_of(sup, &herd_exe) {
                guardian = (
                    procfs::rss_kib(g).unwrap_or(0) as f64,
                    procfs::pss_kib(g).unwrap_or(0) as f64,
                );
            }
        }
        let (cpu0, sw0) = (procfs::cpu_ticks(sup), procfs::context_switches(sup));
        std::thread::sleep(ctx.idle);
        let (cpu1, sw1) = (procfs::cpu_ticks(sup), procfs::context_switches(sup));
        let ticks = cpu1.zip(cpu0).map(|(a, b)| a - b).unwrap_or(0);
        let idle_cpu_ms = ticks as f64 * 1000.0 / procfs::ticks_per_sec() as f64;
        let idle_switches = sw1.zip(sw0).map(|(a, b)| a - b).unwrap_or(0) as f64;
        Load {
            threads: ctx.threads,
            connections: ctx.connections,
            duration: ctx.duration,
            close: true,
            cpus: ctx.load_cpus.clone(),
        }
        .run(&ctx.wrk, &running.url())?;
        std::thread::sleep(Duration::from_millis(500));
        let loaded_kib = procfs::rss_kib(sup).unwrap_or(0) as f64;
        running.stop();

        let running = system.start(ctx, ctx.many_workers)?;
        running.wait_ready(ctx.many_workers, Duration::from_secs(120))?;
        std::thread::sleep(Duration::from_secs(1));
        let many_kib = running.supervisor().and_then(procfs::rss_kib).unwrap_or(0) as f64;
        running.stop();
        rows.push(Row {
            label: system.label(),
            idle_kib,
            loaded_kib,
            many_kib,
            idle_cpu_ms,
            idle_switches,
        });
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "Supervisor process only (herd; Node's primary; PM2's daemon), Node app workers. RSS idle with {w} workers, \
         after a {d:?} `Connection: close` run, and idle with {m} workers. CPU time and context switches (all \
         threads) over {i:?} of idleness: every wakeup is a context switch.\n",
        w = ctx.workers,
        d = ctx.duration,
        m = ctx.many_workers,
        i = ctx.idle
    );
    let _ = writeln!(
        md,
        "| supervisor | RSS idle | RSS after load | RSS, {} workers | CPU while idle | wakeups while idle |\n|---|---|---|---|---|---|",
        ctx.many_workers
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} ms | {:.0} |",
            r.label,
            mib(r.idle_kib),
            mib(r.loaded_kib),
            mib(r.many_kib),
            r.idle_cpu_ms,
            r.idle_switches
        );
        res.memory.push((r.label.clone(), r.idle_kib));
    }
    let _ = writeln!(
        md,
        "\nherd's orphan guardian (a forked, never exec'd child that waits on a pipe): RSS {}, PSS {} \
         (most of its pages are shared with herd).",
        mib(guardian.0),
        mib(guardian.1)
    );
    res.sections
        .push(("Supervisor memory and idle cost".into(), md));

    if let Some(h) = rows
        .iter()
        .find(|r| r.label == System::new(Sys::HerdShared, App::Node).label())
    {
        res.target(
            format!("herd RSS with {} workers", ctx.many_workers),
            mib(h.many_kib),
            "≤ 4 MiB",
            h.many_kib <= 4096.0,
        );
        res.target(
            format!("herd CPU / wakeups while idle {:?}", ctx.idle),
            format!("{:.0} ms / {:.0}", h.idle_cpu_ms, h.idle_switches),
            "0 / 0",
            h.idle_cpu_ms == 0.0 && h.idle_switches == 0.0,
        );
    }
    Ok(())
}
