//! The load generator: wrk, run as a child process, its report parsed.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// One load run's parameters.
#[derive(Debug, Clone)]
pub struct Load {
    /// wrk threads.
    pub threads: usize,
    /// Open connections.
    pub connections: usize,
    /// How long.
    pub duration: Duration,
    /// `Connection: close` on every request (a new TCP connection each).
    pub close: bool,
    /// CPUs to pin wrk to (`taskset -c`), if any.
    pub cpus: Option<String>,
}

/// What wrk reported.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Requests completed.
    pub requests: u64,
    /// Socket errors (connect + read + write + timeout).
    pub socket_errors: u64,
    /// Non-2xx/3xx responses.
    pub bad_status: u64,
}

impl Load {
    /// The command line, for the report.
    pub fn command_line(&self, url: &str) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.cpus {
            parts.push(format!("taskset -c {c}"));
        }
        parts.push(format!(
            "wrk -t{} -c{} -d{}s --latency",
            self.threads,
            self.connections,
            self.duration.as_secs_f64()
        ));
        if self.close {
            parts.push("-H 'Connection: close'".into());
        }
        parts.push(url.into());
        parts.join(" ")
    }

    /// Runs wrk against `url` and parses its report.
    pub fn run(&self, wrk: &str, url: &str) -> Result<LoadResult> {
        let mut cmd = match &self.cpus {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", c]).arg(wrk);
                cmd
            }
            None => Command::new(wrk),
        };
        cmd.arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", self.duration.as_secs().max(1)))
            .arg("--latency");
        if self.close {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(url);
        let out = cmd.output().with_context(|| format!("running {wrk}"))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            bail!(
                "wrk failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse(&text).with_context(|| format!("cannot parse wrk output:\n{text}"))
    }
}

/// Parses wrk's text report.
pub fn parse(text: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    let mut in_dist = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            if let Some(v) = line.strip_prefix("50%") {
                r.p50_us = parse_latency(v.trim())?;
            } else if let Some(v) = line.strip_prefix("99%") {
                r.p99_us = parse_latency(v.trim())?;
                in_dist = false;
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse()?;
        } else if line.contains(" requests in ") {
            r.requests = line.split_whitespace().next().unwrap_or("0").parse()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            r.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.bad_status = v.trim().parse()?;
        }
    }
    if r.rps == 0.0 && r.requests == 0 {
        bail!("no Requests/sec line");
    }
    Ok(r)
}

fn parse_latency(v: &str) -> Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("latency {v:?} has no unit");
    };
    Ok(num.trim().parse::<f64>()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_wrk_report() {
        let text = "Running 5s test @ http://127.0.0.1:1/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  300.00us   9.00ms   90.00%
    Req/Sec    31.00k     2.00k   35.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.31ms
  310000 requests in 5.00s, 30.00MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:  61999.50
Transfer/sec:      6.00MB
";
        let r = parse(text).unwrap();
        assert_eq!(r.rps, 61999.5);
        assert_eq!(r.p50_us, 812.0);
        assert_eq!(r.p99_us, 2310.0);
        assert_eq!(r.requests, 310000);
        assert_eq!(r.socket_errors, 6);
        assert_eq!(r.bad_status, 4);
    }
}
