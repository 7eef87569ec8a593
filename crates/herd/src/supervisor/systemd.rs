//! herd toward systemd: when herd runs as a `Type=notify` service (its
//! own `NOTIFY_SOCKET` set), it tells systemd `READY=1` once the cluster
//! serves (`min_ready` workers ready), `RELOADING=1` with `MONOTONIC_USEC`
//! while a reload runs and `READY=1` after, `STOPPING=1`, a `STATUS=` line
//! as the ready count changes, and `WATCHDOG=1` at half of `WATCHDOG_USEC`
//! when systemd watches herd (`WATCHDOG_PID` unset or herd's). Workers
//! never see systemd's socket: each gets herd's own (see `notify`).
//!
//! Every message is one non-blocking datagram: a systemd that does not
//! read loses messages, never holds up the supervisor.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use tracing::debug;

pub(super) struct Systemd {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// `READY=1` was sent for the cluster's start.
    ready_sent: bool,
    /// The last `STATUS=` sent.
    status: String,
    /// Every how long `WATCHDOG=1` goes out, and when next.
    watchdog: Option<(Duration, Instant)>,
}

impl Systemd {
    /// From herd's environment, if systemd gave it a socket.
    pub(super) fn from_env() -> Option<Systemd> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
        let addr = match bytes.strip_prefix(b"@") {
            // An abstract socket (what systemd uses for services).
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name).ok()?
            }
            None => SocketAddr::from_pathname(std::path::Path::new(&path)).ok()?,
        };
        if !bytes.starts_with(b"@") && !std::path::Path::new(&path).exists() {
            tracing::warn!(
                "NOTIFY_SOCKET={} does not exist: systemd will not hear that herd is ready",
                path.to_string_lossy()
            );
        }
        let sock = UnixDatagram::unbound().ok()?;
        sock.set_nonblocking(true).ok()?;
        let me = std::process::id().to_string();
        let watched = std::env::var("WATCHDOG_PID").map_or(true, |p| p.trim() == me);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && watched)
            .map(|u| {
                let every = Duration::from_micros(u) / 2;
                (every, Instant::now() + every)
            });
        Some(Systemd {
            sock,
            addr,
            ready_sent: false,
            status: String::new(),
            watchdog,
        })
    }

    fn send(&self, message: &str) {
        if let Err(e) = self.sock.send_to_addr(message.as_bytes(), &self.addr) {
            debug!("sd_notify {message:?} not sent: {e}");
        }
    }

    /// The ready count changed (or may have): `STATUS=`, and `READY=1`
    /// the first time the cluster serves.
    pub(super) fn update(&mut self, ready: usize, workers: usize, restarting: usize, serves: bool) {
        let status = format!("{ready}/{workers} ready, {restarting} restarting");
        let mut message = String::new();
        if serves && !self.ready_sent {
            self.ready_sent = true;
            message.push_str("READY=1\n");
        }
        if status != self.status {
            message.push_str(&format!("STATUS={status}\n"));
            self.status = status;
        }
        if !message.is_empty() {
            self.send(&message);
        }
    }

    /// A reload began.
    pub(super) fn reloading(&self) {
        let usec = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = usec.tv_sec as u64 * 1_000_000 + usec.tv_nsec as u64 / 1_000;
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading\n"
        ));
    }

    /// A reload ended (done or rolled back): serving again.
    pub(super) fn reloaded(&mut self, how: &str) {
        self.status = format!("reload {how}");
        self.send(&format!("READY=1\nSTATUS={}\n", self.status));
    }

    /// The cluster began to stop.
    pub(super) fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping\n");
    }

    /// When `WATCHDOG=1` is next due.
    pub(super) fn watchdog_at(&self) -> Option<Instant> {
        self.watchdog.map(|(_, at)| at)
    }

    /// Sends `WATCHDOG=1` if due, and schedules the next.
    pub(super) fn watchdog(&mut self, now: Instant) {
        if let Some((every, at)) = &mut self.watchdog {
            if *at <= now {
                *at = now + *every;
                self.send("WATCHDOG=1\n");
            }
        }
    }
}
