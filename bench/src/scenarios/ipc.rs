//! IPC between primary and one worker: one-way throughput both directions and
//! round-trip latency for ~100-byte messages — herd's channel in both codecs
//! against Node's `process.send`, in the same run.

use std::fmt::Write as _;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::report::{fmt_us, k, stats, Results};
use crate::systems::Ctx;

#[derive(Default)]
struct Sample {
    p2w: Vec<f64>,
    w2p: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

fn run_once(mut cmd: Command, s: &mut Sample) -> Result<()> {
    let out = cmd.output().context("running the IPC probe")?;
    if !out.status.success() {
        bail!("IPC probe failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no result line")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    s.p2w.push(f("p2w_per_s"));
    s.w2p.push(f("w2p_per_s"));
    s.p50.push(f("rtt_p50_us"));
    s.p99.push(f("rtt_p99_us"));
    Ok(())
}

pub fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let count: u64 = if ctx.duration.as_secs() <= 1 {
        20_000
    } else {
        200_000
    };
    let rtt: u64 = if ctx.duration.as_secs() <= 1 {
        2_000
    } else {
        20_000
    };
    let mut rows: Vec<(String, Sample)> = Vec::new();
    for (label, codec) in [("herd, JSON", "json"), ("herd, postcard", "postcard")] {
        let mut s = Sample::default();
        for _ in 0..ctx.reps {
            eprintln!("[ipc] {label}");
            let mut cmd = Command::new(&ctx.bench);
            cmd.args([
                "ipc-probe",
                "--codec",
                codec,
                "--count",
                &count.to_string(),
                "--rtt",
                &rtt.to_string(),
            ])
            .env("HERD_LOG", "warn");
            run_once(cmd, &mut s)?;
        }
        res.command(
            &format!("ipc {label}"),
            format!("herd-bench ipc-probe --codec {codec} --count {count} --rtt {rtt}"),
        );
        rows.push((label.to_string(), s));
    }
    let mut s = Sample::default();
    for _ in 0..ctx.reps {
        eprintln!("[ipc] node process.send");
        let mut cmd = Command::new(&ctx.node);
        cmd.arg(ctx.apps.join("ipc.js"))
            .arg(count.to_string())
            .arg(rtt.to_string());
        run_once(cmd, &mut s)?;
    }
    res.command("ipc node", format!("node bench/apps/ipc.js {count} {rtt}"));
    rows.push(("Node process.send (json)".to_string(), s));
    let mut floor = Sample::default();
    for _ in 0..ctx.reps {
        let (p50, p99) = floor_rtt(rtt as usize)?;
        floor.p50.push(p50);
        floor.p99.push(p99);
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "One worker, ~100-byte messages: {count} one-way messages each direction, {rtt} round trips; \
         median (min–max) of {} runs. Primary → worker goes through the library's `WorkerHandle::send` \
         (queued straight to the worker's writer task; the sender yields every 1024 messages, as the \
         worker side flushes every 1024); worker → primary through `Channel::feed`/`flush` and arrives \
         as `Event::Message` via the supervisor task. The floor row is a bare blocking socketpair \
         ping-pong between two threads: what one round trip costs on this machine before any \
         runtime or serialization.\n",
        ctx.reps
    );
    md.push_str("| channel | primary → worker msgs/s | worker → primary msgs/s | round trip p50 | p99 |\n|---|---|---|---|---|\n");
    let cell = |v: &[f64]| {
        if v.is_empty() {
            return "–".to_string();
        }
        let (m, lo, hi) = stats(v);
        if v.len() > 1 {
            format!("{} ({}–{})", k(m), k(lo), k(hi))
        } else {
            k(m)
        }
    };
    for (label, s) in &rows {
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} |",
            cell(&s.p2w),
            cell(&s.w2p),
            fmt_us(stats(&s.p50).0),
            fmt_us(stats(&s.p99).0)
        );
    }
    let _ = writeln!(
        md,
        "| floor: bare socketpair ping-pong, two threads | – | – | {} | {} |",
        fmt_us(stats(&floor.p50).0),
        fmt_us(stats(&floor.p99).0)
    );
    res.sections.push(("IPC".into(), md));
    for (label, s) in rows.iter().filter(|(l, _)| l.starts_with("herd")) {
        let one_way = stats(&s.p2w).0.min(stats(&s.w2p).0);
        res.target(
            format!("IPC one-way msgs/s (slower direction), {label}"),
            k(one_way),
            "≥ 1500k",
            one_way >= 1.5e6,
        );
        let p50 = stats(&s.p50).0;
        res.target(
            format!(
                "IPC round trip p50, {label} (machine floor {})",
                fmt_us(stats(&floor.p50).0)
            ),
            fmt_us(p50),
            "≤ 12 µs",
            p50 <= 12.0,
        );
    }
    Ok(())
}

/// The machine's round-trip floor: 100 bytes there and back over a blocking
/// Unix socketpair between two threads, no runtime, no serialization.
/// Returns (p50, p99) in µs.
fn floor_rtt(n: usize) -> Result<(f64, f64)> {
    use std::io::{Read, Write};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair()?;
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 128];
        while let Ok(k) = b.read(&mut buf) {
            if k == 0 || b.write_all(&buf[..k]).is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 128];
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let t = std::time::Instant::now();
        a.write_all(&[7u8; 100])?;
        let mut got = 0;
        while got < 100 {
            got += a.read(&mut buf)?;
        }
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(a);
    let _ = echo.join();
    rtts.sort_by(|x, y| x.total_cmp(y));
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize];
    Ok((at(0.5), at(0.99)))
}
