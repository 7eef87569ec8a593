//! Figure 3: the supervisor's memory (idle, after load, with many workers)
//! and its CPU time and wakeups while the cluster sits idle; herd runs
//! with its control socket and `--metrics` on. Then the control plane's
//! latency: `herd status` against a cluster of 64 workers.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use crate::load::Load;
use crate::procfs;
use crate::report::{fmt_us_stats, mib, Results};
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

/// How long after its start a cluster counts as idle: past herd's last
/// probe of its workers' sockets (10 s) and the exit of the blocking-pool
/// thread that ran it (tokio keeps one idle for 10 s).
const STEADY: Duration = Duration::from_secs(22);

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
    // herd with everything an operator turns on: the control socket (on
    // by default) and the metrics endpoint.
    let start = |system: &System, workers: usize| {
        system.start_with(ctx, |port| {
            let (mut argv, env) = system.command(ctx, workers, port);
            if system.sys == Sys::HerdShared {
                let at = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
                argv.splice(at..at, ["--metrics".to_string(), "127.0.0.1:0".to_string()]);
            }
            (argv, env)
        })
    };
    for system in &systems {
        eprintln!("[memory] {}", system.label());
        let running = start(system, ctx.workers)?;
        running.wait_ready(ctx.workers, Duration::from_secs(60))?;
        // Steady state: herd looks at each new worker's sockets 2 s and 10 s
        // after it started (to warn about a worker that binds its own).
        // (A smoke run, which reports nothing, skips the wait.)
        let settled = if system.sys == Sys::HerdShared && ctx.idle >= Duration::from_secs(5) {
            running.started + STEADY
        } else {
            running.started
        };
        std::thread::sleep(
            settled
                .saturating_duration_since(std::time::Instant::now())
                .max(Duration::from_secs(1)),
        );
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
        let (cpu0, sw0) = (
            procfs::cpu_ticks(sup),
            procfs::context_switches_by_thread(sup),
        );
        std::thread::sleep(ctx.idle);
        let (cpu1, sw1) = (
            procfs::cpu_ticks(sup),
            procfs::context_switches_by_thread(sup),
        );
        let ticks = cpu1
            .zip(cpu0)
            .map(|(a, b)| a.saturating_sub(b))
            .unwrap_or(0);
        let idle_cpu_ms = ticks as f64 * 1000.0 / procfs::ticks_per_sec() as f64;
        let idle_switches = procfs::wakeups_between(&sw0, &sw1) as f64;
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

        let running = start(system, ctx.many_workers)?;
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
        "Supervisor process only (herd; Node's primary; PM2's daemon), Node app workers; herd with its control \
         socket and `--metrics` on. RSS idle with {w} workers, after a {d:?} `Connection: close` run, and idle \
         with {m} workers. CPU time and context switches (all threads; a thread that exits counts one) over \
         {i:?} of idleness, from 22 s after herd's start (it probes each new worker's sockets 2 s and 10 s \
         after it starts, on a blocking-pool thread that tokio keeps 10 s): every wakeup is a context \
         switch.\n",
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
    control_latency(ctx, res)
}

/// Workers in the cluster `herd status` is timed against.
const STATUS_WORKERS: usize = 64;

/// `herd status` against a cluster of [`STATUS_WORKERS`] built-in workers:
/// the command as an operator runs it (a process, a connection, a status
/// with every worker's CPU and memory read from /proc, the table printed),
/// and the protocol's round trip alone, for `summary` and `status`.
fn control_latency(ctx: &Ctx, res: &mut Results) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::time::Instant;
    // A smoke run (a handful of workers) checks only that it works.
    let workers = STATUS_WORKERS.min(ctx.many_workers * 4);
    eprintln!("[memory] herd status with {workers} workers");
    let system = System::new(Sys::HerdShared, App::Builtin);
    let running = system.start(ctx, workers)?;
    running.wait_ready(workers, Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(1));
    let dir = running.runtime_dir();
    let name = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| n.strip_suffix(".sock").map(String::from))
        .ok_or_else(|| anyhow::anyhow!("no control socket in {}", dir.display()))?;
    let us = |t: Instant| t.elapsed().as_secs_f64() * 1e6;

    let mut cli = Vec::new();
    for _ in 0..10 * ctx.reps {
        let t = Instant::now();
        let out = std::process::Command::new(&ctx.herd)
            .args(["status", &name])
            .env("HERD_RUNTIME_DIR", &dir)
            .output()?;
        cli.push(us(t));
        anyhow::ensure!(out.status.success(), "herd status failed: {out:?}");
    }
    let raw = |cmd: &str| -> Result<(Vec<f64>, usize)> {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..50 * ctx.reps {
            let t = Instant::now();
            let mut s = std::os::unix::net::UnixStream::connect(dir.join(format!("{name}.sock")))?;
            writeln!(s, "{{\"v\":1,\"cmd\":\"{cmd}\"}}")?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            times.push(us(t));
            anyhow::ensure!(line.contains("\"ok\":true"), "{cmd}: {line}");
            size = line.len();
        }
        Ok((times, size))
    };
    let (summary, _) = raw("summary")?;
    let (status, size) = raw("status")?;
    let herd_kib = running.supervisor().and_then(procfs::rss_kib).unwrap_or(0) as f64;
    running.stop();

    let mut md = String::new();
    let _ = writeln!(
        md,
        "A cluster of {workers} built-in workers. `herd status NAME` as an operator runs it \
         (a process, a connection, every worker's CPU and memory read from /proc, the table printed), \
         {} runs; and the protocol's round trip alone (connect, request, one answer line), {} runs each. \
         Median (min–max).\n",
        cli.len(),
        status.len()
    );
    let _ = writeln!(md, "| what | time |\n|---|---|");
    let _ = writeln!(
        md,
        "| `herd status NAME` (the command) | {} |",
        fmt_us_stats(&cli)
    );
    let _ = writeln!(
        md,
        "| `status` round trip ({} KiB answer) | {} |",
        size / 1024,
        fmt_us_stats(&status)
    );
    let _ = writeln!(md, "| `summary` round trip | {} |", fmt_us_stats(&summary));
    let _ = writeln!(
        md,
        "\nherd's RSS with {workers} workers after these requests: {}.",
        mib(herd_kib)
    );
    res.sections.push(("Control plane latency".into(), md));
    Ok(())
}
