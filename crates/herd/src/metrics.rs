//! `--metrics ADDR`: Prometheus metrics on `/metrics`, and `/healthz` and
//! `/ready` for load balancers and Kubernetes probes, over HTTP/1.
//!
//! Collected at scrape time: each request asks the supervisor for its
//! status (as `herd status` does; CPU and memory are read from /proc then,
//! off the supervisor's thread) and encodes a fresh registry, so nothing is
//! kept or sampled between scrapes and an idle cluster makes no wakeups.
//! The endpoint may face a network: at most [`MAX_CONNECTIONS`] connections
//! are held at once, and a request's headers must arrive within
//! [`HEADER_TIMEOUT`]. A new connection beyond the limit closes the oldest
//! one: clients that open connections and say nothing (slowloris) cannot
//! keep a load balancer's probe out, since a probe asks and is answered in
//! a millisecond. No connection takes the descriptors workers need
//! ([`fds_to_spare`](crate::control::server::fds_to_spare)).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing::debug;

use crate::cluster::Command;
use crate::control::protocol::Status;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/healthz` waits for the supervisor to answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves until the task is aborted (when the cluster ends).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    commands: mpsc::UnboundedSender<Command>,
    min_ready: usize,
) {
    // The connections held, oldest first.
    let mut held: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        held.retain(|h| !h.is_finished());
        if !crate::control::server::fds_to_spare() {
            continue; // dropped: closed at once
        }
        if held.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = held.pop_front() {
                oldest.abort();
            }
        }
        let commands = commands.clone();
        let task = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let commands = commands.clone();
                async move { Ok::<_, Infallible>(respond(req, &commands, min_ready).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        held.push_back(task.abort_handle());
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn status(commands: &mpsc::UnboundedSender<Command>) -> Option<Status> {
    let asked = crate::control::server::sampled_status(commands);
    tokio::time::timeout(HEALTH_TIMEOUT, asked).await.ok()?
}

async fn respond(
    req: Request<Incoming>,
    commands: &mpsc::UnboundedSender<Command>,
    min_ready: usize,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => match status(commands).await {
            Some(_) => text(StatusCode::OK, "ok\n".into()),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "herd's supervisor did not answer\n".into(),
            ),
        },
        "/ready" => match status(commands).await {
            Some(s) if s.stopping => text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into()),
            Some(s) if s.summary.ready >= min_ready => text(
                StatusCode::OK,
                format!(
                    "{} of {} workers ready\n",
                    s.summary.ready, s.summary.workers
                ),
            ),
            Some(s) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} of {} workers ready; --min-ready is {min_ready}\n",
                    s.summary.ready, s.summary.workers
                ),
            ),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "herd's supervisor did not answer\n".into(),
            ),
        },
        "/metrics" => match status(commands).await {
            Some(s) => {
                let mut r = text(StatusCode::OK, exposition(&s));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "herd's supervisor did not answer\n".into(),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz and /ready are served\n".into(),
        ),
    }
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// The metrics, in the OpenMetrics text format (which Prometheus reads).
pub(crate) fn exposition(s: &Status) -> String {
    let mut registry = Registry::with_prefix("herd");
    let gauge = |registry: &mut Registry, name: &str, help: &str, v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        registry.register(name, help, g);
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        registry.register(name, help, c);
    };

    let states = Family::<Labels, Gauge>::default();
    for state in [
        "running",
        "starting",
        "backoff",
        "failed",
        "replacing",
        "leaving",
        "stopped",
    ] {
        let n = s.slots.iter().filter(|x| x.state == state).count();
        states
            .get_or_create(&labels(&[("state", state.into())]))
            .set(n as i64);
    }
    registry.register("slots", "Slots by state", states);
    gauge(
        &mut registry,
        "workers_desired",
        "Slots (workers wanted)",
        s.summary.workers as i64,
    );
    gauge(
        &mut registry,
        "workers_ready",
        "Slots whose worker is ready",
        s.summary.ready as i64,
    );
    let live = s.slots.iter().map(|x| x.workers.len()).sum::<usize>();
    gauge(
        &mut registry,
        "workers_live",
        "Live worker processes (replacements and draining ones too)",
        live as i64,
    );
    gauge(
        &mut registry,
        "generation",
        "The newest command generation (one more per reload)",
        s.generation as i64,
    );
    gauge(
        &mut registry,
        "start_time_seconds",
        "When herd started, in seconds since the Unix epoch",
        s.started_unix as i64,
    );
    gauge(
        &mut registry,
        "reloading",
        "1 while a rolling reload runs",
        i64::from(s.reloading),
    );

    let c = &s.counters;
    let restarts = Family::<Labels, Counter>::default();
    for (reason, n) in [
        ("crash", c.restarts_crash),
        ("killed", c.restarts_killed),
        ("watchdog", c.restarts_watchdog),
        ("recycled", c.restarts_recycled),
        ("reload", c.restarts_reload),
    ] {
        restarts
            .get_or_create(&labels(&[("reason", reason.into())]))
            .inc_by(n);
    }
    registry.register("restarts", "Workers replaced, by why", restarts);
    let reloads = Family::<Labels, Counter>::default();
    reloads
        .get_or_create(&labels(&[("outcome", "ok".into())]))
        .inc_by(c.reloads_ok);
    reloads
        .get_or_create(&labels(&[("outcome", "rolled_back".into())]))
        .inc_by(c.reloads_rolled_back);
    reloads
        .get_or_create(&labels(&[("outcome", "unresolved".into())]))
        .inc_by(c.reloads_unresolved);
    registry.register(
        "reloads",
        "Rolling reloads, by outcome (rolled_back: a new worker failed; unresolved: the \
         command could not be resolved again, nothing changed)",
        reloads,
    );
    counter(
        &mut registry,
        "crash_loops",
        "Times a slot went over the crash-loop limit",
        c.crash_loops,
    );
    counter(
        &mut registry,
        "ipc_messages",
        "IPC messages received from workers",
        c.ipc_messages,
    );
    counter(
        &mut registry,
        "log_lines_dropped",
        "Log lines dropped (a blocked or closed output, a full disk)",
        c.log_lines_dropped,
    );

    let rss = Family::<Labels, Gauge>::default();
    let cpu = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    let up = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for slot in &s.slots {
        for w in &slot.workers {
            let l = labels(&[
                ("slot", slot.slot.to_string()),
                ("pid", w.pid.to_string()),
                ("role", w.role.clone()),
            ]);
            if let Some(b) = w.rss_bytes {
                rss.get_or_create(&l).set(b as i64);
            }
            if let Some(c) = w.cpu_s {
                cpu.get_or_create(&l).inc_by(c);
            }
            up.get_or_create(&l).set(w.uptime_s);
        }
    }
    registry.register(
        "worker_resident_memory_bytes",
        "Resident memory of each worker's process tree",
        rss,
    );
    registry.register(
        "worker_cpu_seconds",
        "CPU time (user + system) of each worker's process tree",
        cpu,
    );
    registry.register(
        "worker_uptime_seconds",
        "Seconds since each worker started",
        up,
    );

    let queued = Family::<Labels, Gauge>::default();
    for l in &s.listeners {
        if let Some(q) = l.queued {
            queued
                .get_or_create(&labels(&[("listener", l.spec.clone())]))
                .set(q as i64);
        }
    }
    registry.register(
        "listener_queued_connections",
        "Connections waiting in each listening socket's accept queue",
        queued,
    );

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}
