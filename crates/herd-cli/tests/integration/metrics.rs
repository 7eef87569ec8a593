//! `--metrics`: Prometheus exposition on /metrics (read with a real
//! Prometheus text parser), /healthz and /ready.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::*;

/// The metrics address herd logged.
fn metrics_port(herd: &Herd) -> u16 {
    let line = herd.stderr.wait_for("metrics line", STARTUP, |l| {
        l.contains("metrics on http://")
    });
    let rest = line.split("http://").nth(1).unwrap();
    let addr = rest.split('/').next().unwrap();
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// `GET path` (HTTP/1.0): the status code and the body.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn scrape(port: u16) -> prometheus_parse::Scrape {
    let (code, body) = get(port, "/metrics");
    assert_eq!(code, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus can parse it")
}

fn value(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    label: Option<(&str, &str)>,
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn metrics_parse_and_count_what_happens() {
    let herd = Herd::start([
        "run",
        "-w",
        "2",
        "--name",
        "m",
        "-l",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ]);
    for n in 1..=2 {
        herd.stderr
            .wait_for_nth("ready", STARTUP, n, |l| l.contains(" ready slot="));
    }
    let port = metrics_port(&herd);
    let m = scrape(port);
    assert_eq!(value(&m, "herd_workers_ready", None), Some(2.0));
    assert_eq!(value(&m, "herd_workers_desired", None), Some(2.0));
    assert_eq!(
        value(&m, "herd_slots", Some(("state", "running"))),
        Some(2.0)
    );
    let rss: Vec<f64> = m
        .samples
        .iter()
        .filter(|s| s.metric == "herd_worker_resident_memory_bytes")
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) => Some(v),
            _ => None,
        })
        .collect();
    assert_eq!(rss.len(), 2, "one per worker");
    assert!(rss.iter().all(|b| *b > 1e6), "{rss:?}");
    assert_eq!(
        value(&m, "herd_listener_queued_connections", None),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "herd_restarts_total", Some(("reason", "killed"))),
        Some(0.0)
    );

    // A worker killed from outside is counted.
    let victim = herd.spawned()[0];
    send_signal(victim, "KILL");
    herd.stderr.wait_for_nth("replacement", STARTUP, 3, |l| {
        l.contains(" spawned in slot ")
    });
    let m = scrape(port);
    assert_eq!(
        value(&m, "herd_restarts_total", Some(("reason", "killed"))),
        Some(1.0)
    );

    assert_eq!(get(port, "/healthz"), (200, "ok\n".into()));
    let (code, body) = get(port, "/ready");
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(port, "/nope").0, 404);
    // Garbage gets an HTTP error, and the endpoint lives on.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\x16\x03\x01 this is not http\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer:?}"
    );
    assert_eq!(get(port, "/healthz").0, 200);
}

#[test]
fn ready_needs_min_ready_workers() {
    // Slot 1 never starts: one of two workers is ready.
    let herd = Herd::start([
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--min-ready",
        "2",
        "--",
        "sh",
        "-c",
        &format!(
            "[ \"$HERD_WORKER_ID\" = 1 ] && exec sleep 30; exec {} hello",
            herd_bin().display()
        ),
    ]);
    herd.stderr
        .wait_for("ready", STARTUP, |l| l.contains(" ready slot=0"));
    let port = metrics_port(&herd);
    let (code, body) = get(port, "/ready");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("1 of 2 workers ready; --min-ready is 2"),
        "{body}"
    );
    assert_eq!(get(port, "/healthz").0, 200);
}

#[test]
fn no_metrics_flag_no_socket() {
    let herd = Herd::start(["run", "-w", "1", "--no-listen", "--", "sleep", "30"]);
    herd.stderr
        .wait_for("spawned", STARTUP, |l| l.contains("spawned in slot 0"));
    // Its sockets: none is a TCP listener (no metrics, no -l).
    let out = std::process::Command::new("ss").args(["-Hltnp"]).output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        let me = format!("pid={},", herd.pid());
        assert!(!text.contains(&me), "{text}");
    }
    assert!(!herd.stderr.all().iter().any(|l| l.contains("metrics on")));
}

/// Clients that connect and say nothing (slowloris) cannot keep a probe
/// out: a new connection past the limit closes the oldest.
#[test]
fn idle_connections_cannot_keep_probes_out() {
    let herd = Herd::start([
        "run",
        "-w",
        "1",
        "--no-listen",
        "--metrics",
        "127.0.0.1:0",
        "--",
        "sleep",
        "60",
    ]);
    let port = metrics_port(&herd);
    let holders: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(holders.len() > 150, "{} connected", holders.len());
    for _ in 0..5 {
        assert_eq!(get(port, "/healthz"), (200, "ok\n".into()));
    }
}

/// Under a low open-file limit, clients never take the descriptors
/// workers need: with 60 control clients and 60 metrics connections held,
/// killed workers are still replaced.
#[test]
fn clients_leave_workers_their_descriptors() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "ulimit -n 64 && exec \"$0\" run -w 6 --name tight --no-listen --metrics 127.0.0.1:0 -- sleep 60",
    ])
    .arg(herd_bin());
    let herd = Herd::spawn(cmd);
    for n in 1..=6 {
        herd.stderr
            .wait_for_nth("spawned", STARTUP, n, |l| l.contains(" spawned in slot "));
    }
    let port = metrics_port(&herd);
    let sock = herd.runtime.join("tight.sock");
    let _control: Vec<_> = (0..60)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&sock).ok())
        .collect();
    let _metrics: Vec<_> = (0..60)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let victims: Vec<u32> = herd.spawned().into_iter().take(3).collect();
    for v in &victims {
        send_signal(*v, "KILL");
    }
    herd.stderr.wait_for_nth("replacements", STARTUP, 9, |l| {
        l.contains(" spawned in slot ")
    });
    let log = herd.stderr.all().join("\n");
    assert!(!log.contains("Too many open files"), "{log}");
}
