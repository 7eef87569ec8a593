//! `herd-bench`: herd against the systems users would pick instead, side by
//! side in one run on one machine, reported as ratios.
//!
//! Run it through `bench/run`, which installs the tools (wrk, PM2) and builds
//! herd in release mode first. `herd-bench raw` is the supervisor-less
//! launcher used for the ceiling measurements.

mod ipc_probe;
mod load;
mod procfs;
mod report;
mod scenarios;
mod systems;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use report::Results;
use systems::Ctx;

#[derive(Parser)]
#[command(name = "herd-bench", about = "herd's benchmark suite")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    suite: SuiteArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start N socket-activated copies of a command and wait: no supervisor.
    Raw(RawArgs),
    /// Measure herd's IPC channel (primary and one worker; prints JSON).
    IpcProbe {
        /// json | postcard.
        #[arg(long, default_value = "json")]
        codec: String,
        /// One-way messages per direction.
        #[arg(long, default_value_t = 200_000)]
        count: u64,
        /// Round trips.
        #[arg(long, default_value_t = 20_000)]
        rtt: u64,
    },
    /// Decompress an .xz file to stdout (for machines without xz: bench/device-run).
    Unxz {
        /// The .xz file.
        file: PathBuf,
    },
}

#[derive(Args)]
struct SuiteArgs {
    /// Workers per cluster.
    #[arg(short, long, default_value_t = 2)]
    workers: usize,
    /// The larger worker count (memory with many workers, cold start).
    #[arg(long, default_value_t = 16)]
    many_workers: usize,
    /// Seconds per load run.
    #[arg(short, long, default_value_t = 10)]
    duration: u64,
    /// Repetitions of each measurement.
    #[arg(short, long, default_value_t = 3)]
    reps: usize,
    /// Seconds of chaos (kills, stops, crashing starts) per system, run once.
    #[arg(long, default_value_t = 180)]
    chaos_duration: u64,
    /// wrk connections.
    #[arg(short, long, default_value_t = 64)]
    connections: usize,
    /// wrk threads.
    #[arg(short, long, default_value_t = 2)]
    threads: usize,
    /// Seconds an idle cluster is watched for CPU use.
    #[arg(long, default_value_t = 10)]
    idle: u64,
    /// Scenarios to run (comma-separated): throughput, roundrobin, memory, recovery, coldstart, ipc, chaos.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// CPUs for wrk, as for `taskset -c`.
    #[arg(long)]
    load_cpus: Option<String>,
    /// CPUs for the servers, as for `taskset -c`.
    #[arg(long)]
    server_cpus: Option<String>,
    /// Markdown report to write.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    out: PathBuf,
    /// PNG chart to write.
    #[arg(long, default_value = "docs/bench.png")]
    chart: PathBuf,
    /// What to call this machine in the report.
    #[arg(long, default_value = "development machine")]
    label: String,
    /// The herd binary (default: next to this one).
    #[arg(long)]
    herd: Option<PathBuf>,
    /// node (default: from PATH).
    #[arg(long, default_value = "node")]
    node: PathBuf,
    /// PM2's CLI script (default: bench/tools/node_modules/pm2/bin/pm2).
    #[arg(long)]
    pm2: Option<PathBuf>,
    /// wrk.
    #[arg(long, default_value = "wrk")]
    wrk: String,
    /// The benchmark apps (default: bench/apps).
    #[arg(long)]
    apps: Option<PathBuf>,
}

#[derive(Args)]
struct RawArgs {
    /// Copies to start.
    #[arg(short, long)]
    workers: usize,
    /// shared | reuseport.
    #[arg(long)]
    balance: herd::Balance,
    /// Listen spec, as for herd.
    #[arg(short, long)]
    listen: herd::ListenSpec,
    /// The command.
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Raw(args)) => raw(args),
        Some(Cmd::IpcProbe { codec, count, rtt }) => {
            let codec = match codec.as_str() {
                "json" => herd::ipc::frame::Codec::Json,
                "postcard" => herd::ipc::frame::Codec::Postcard,
                other => bail!("unknown codec {other}"),
            };
            ipc_probe::main(codec, count, rtt)
        }
        Some(Cmd::Unxz { file }) => {
            let mut input = std::io::BufReader::new(std::fs::File::open(&file)?);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            lzma_rs::xz_decompress(&mut input, &mut out)
                .map_err(|e| anyhow::anyhow!("{}: {e:?}", file.display()))?;
            Ok(())
        }
        None => suite(cli.suite),
    }
}

/// The ceiling: N copies with the same sockets herd would give them, started
/// once and never supervised (no respawn, no signals, no output handling).
/// This process only waits; the copies die with it (PR_SET_PDEATHSIG).
fn raw(args: RawArgs) -> Result<()> {
    let listeners = herd::Listeners::bind(
        std::slice::from_ref(&args.listen),
        args.balance,
        args.workers,
    )?;
    let command = herd::WorkerCommand::resolve(args.command)?;
    let mut children = Vec::new();
    for slot in 0..args.workers {
        let env = [
            (
                OsString::from("HERD_WORKER_ID"),
                OsString::from(slot.to_string()),
            ),
            (
                OsString::from("HERD_WORKERS"),
                OsString::from(args.workers.to_string()),
            ),
        ];
        let mut cmd =
            herd::spawn::socket_activated(&command, &env, &listeners.sockets_for_slot(slot))?;
        children.push(cmd.spawn()?);
    }
    for mut c in children {
        c.wait()?;
    }
    Ok(())
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|_| "not found".into())
}

fn suite(a: SuiteArgs) -> Result<()> {
    let bench = std::env::current_exe()?;
    let herd = a
        .herd
        .clone()
        .unwrap_or_else(|| bench.with_file_name("herd"));
    if !systems::executable(&herd) {
        bail!(
            "herd binary not found at {} (build with cargo build --release)",
            herd.display()
        );
    }
    let cwd_apps = PathBuf::from("bench/apps");
    let apps = a.apps.clone().unwrap_or_else(|| {
        if cwd_apps.join("app.js").exists() {
            cwd_apps.canonicalize().unwrap_or(cwd_apps)
        } else {
            repo_root().join("bench/apps")
        }
    });
    let default_pm2 = apps.join("../tools/node_modules/pm2/bin/pm2");
    let pm2 = a
        .pm2
        .clone()
        .or_else(|| default_pm2.exists().then_some(default_pm2));
    let node = resolve_in_path(&a.node).context("node not found")?;
    let workdir = std::env::temp_dir().join(format!("herd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir)?;
    let ctx = Ctx {
        herd,
        bench,
        node,
        pm2,
        wrk: a.wrk.clone(),
        apps,
        workdir: workdir.clone(),
        workers: a.workers,
        many_workers: a.many_workers,
        duration: Duration::from_secs(a.duration),
        chaos: Duration::from_secs(a.chaos_duration),
        reps: a.reps.max(1),
        connections: a.connections,
        threads: a.threads,
        idle: Duration::from_secs(a.idle),
        load_cpus: a.load_cpus.clone(),
        server_cpus: a.server_cpus.clone(),
    };
    if ctx.pm2.is_none() {
        eprintln!("note: PM2 not found (bench/run installs it); PM2 rows are left out");
    }
    let mut results = Results::default();
    let started = std::time::Instant::now();
    for (name, run) in scenarios::ALL {
        if !a.only.is_empty() && !a.only.iter().any(|o| o == name) {
            continue;
        }
        run(&ctx, &mut results).with_context(|| format!("scenario {name}"))?;
        // Write what we have after each scenario: a run cut short keeps its figures.
        report::write_markdown(&a.out, &header(&ctx, &a, started.elapsed()), &results)?;
    }
    let _ = std::fs::remove_dir_all(&workdir);

    let header = header(&ctx, &a, started.elapsed());
    println!("{header}");
    println!("Targets:");
    for t in &results.targets {
        println!(
            "  {:<8} {:<90} {:>12}  (goal {})",
            if t.met { "met" } else { "MISSED" },
            t.what,
            t.measured,
            t.goal
        );
    }
    for (title, body) in &results.sections {
        println!("\n## {title}\n\n{body}");
    }
    report::write_markdown(&a.out, &header, &results)?;
    eprintln!("wrote {}", a.out.display());
    let title = format!(
        "herd vs Node cluster and PM2 — {}, {} workers",
        a.label, a.workers
    );
    report::write_chart(&a.chart, &title, &results)?;
    eprintln!("wrote {}", a.chart.display());
    Ok(())
}

fn resolve_in_path(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.canonicalize().ok();
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(p))
        .find(|c| systems::executable(c))
}

fn header(ctx: &Ctx, a: &SuiteArgs, took: Duration) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .map(|k| k.parse::<u64>().unwrap_or(0))
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let pm2_version = ctx
        .pm2
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p.parent()?.parent()?.join("package.json")).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string))
        .unwrap_or_else(|| "not installed".into());
    // bench/pack-carry records the commit for machines where the tree is no git checkout.
    let commit = std::env::var("BENCH_COMMIT")
        .unwrap_or_else(|_| first_line(Command::new("git").args(["rev-parse", "--short", "HEAD"])));
    let date = first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!(
        "# herd benchmarks — {label}\n\n\
         Generated by `herd-bench {args}` on {date} in {took:.0?} (herd commit {commit}). Every figure below \
         comes from this one run on this one machine; compare ratios, not absolute numbers, across machines.\n\n\
         | machine | |\n|---|---|\n\
         | CPU | {model}, {cores} cores |\n| memory | {mem:.1} GiB |\n| kernel | {kernel} |\n\
         | node | {node} |\n| PM2 | {pm2_version} |\n| wrk | {wrk} |\n| herd | {herd} |\n\
         | load pinned to | {load} |\n| servers pinned to | {server} |\n",
        label = a.label,
        args = args.join(" "),
        model = model,
        mem = mem as f64 / 1024.0 / 1024.0,
        kernel = kernel.trim(),
        node = first_line(Command::new(&ctx.node).arg("--version")),
        wrk = first_line(Command::new(&ctx.wrk).arg("-v")),
        herd = first_line(Command::new(&ctx.herd).arg("--version")),
        load = ctx.load_cpus.as_deref().unwrap_or("any CPU"),
        server = ctx.server_cpus.as_deref().unwrap_or("any CPU"),
    )
}
