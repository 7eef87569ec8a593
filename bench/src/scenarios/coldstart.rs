//! Figure 5: cold start, from spawning the command to every worker answering.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use crate::report::{fmt_us_stats, Results};
use crate::systems::{App, Ctx, Sys, System};

pub fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let mut systems = vec![
        System::new(Sys::HerdShared, App::Builtin),
        System::new(Sys::HerdShared, App::Node),
        System::new(Sys::RawShared, App::Node),
        System::new(Sys::NodeRr, App::Node),
    ];
    if ctx.pm2.is_some() {
        systems.push(System::new(Sys::Pm2, App::Node));
    }
    let counts = [ctx.workers, ctx.many_workers];
    let mut md = String::new();
    let _ = writeln!(
        md,
        "From spawning the command until all N workers listen (each says so: the Node app writes a file \
         from its `listen` callback, herd's built-in worker prints a line; polled every 0.5 ms), confirmed by \
         an answered request: median (min–max) of {} starts. PM2 starts with no daemon running (a fresh \
         PM2_HOME), as on a fresh boot.\n",
        ctx.reps
    );
    let _ = writeln!(
        md,
        "| system | N = {} | N = {} |\n|---|---|---|",
        counts[0], counts[1]
    );
    for system in &systems {
        let mut cells = Vec::new();
        for n in counts {
            eprintln!("[coldstart] {} N={n}", system.label());
            let mut times = Vec::new();
            for _ in 0..ctx.reps {
                let running = system.start(ctx, n)?;
                let t = running.wait_ready(n, Duration::from_secs(120))?;
                times.push(t.as_secs_f64() * 1e6);
                running.stop();
            }
            cells.push(fmt_us_stats(&times));
        }
        let _ = writeln!(md, "| {} | {} | {} |", system.label(), cells[0], cells[1]);
    }
    md.push_str("\n(`built-in` is herd's own tiny worker; the Node rows boot one Node process per worker.)\n");
    res.sections.push(("Cold start".into(), md));
    Ok(())
}
