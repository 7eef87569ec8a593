//! The control socket's server: one task accepts, one task per client.
//!
//! Clients are less trusted than the supervisor, so nothing here can stall
//! or grow it: a client's task only sends the supervisor a typed request
//! and awaits a oneshot answer (the supervisor answers at once; only a
//! reload answers when it ends). Reads are bounded in size
//! ([`MAX_REQUEST`]) and time ([`REQUEST_TIMEOUT`], [`IDLE_TIMEOUT`]),
//! writes in time ([`WRITE_TIMEOUT`]), and at most [`MAX_CLIENTS`] clients
//! are served at once (the rest get a one-line refusal). Sampling CPU and
//! memory happens here, on the blocking pool, only when a client asks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, warn};

use super::protocol::{Command as Request, LogLine, ReloadReply, Response, MAX_REQUEST, VERSION};
use super::{Call, Sample};
use crate::cluster::{Command, ReloadOutcome};

/// Clients served at once; more are refused with a one-line error.
pub const MAX_CLIENTS: usize = 64;

/// A request must arrive whole within this of its first byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An answer not taken by the client within this closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Refusals logged in full before they are only counted (1 in 1000 logged).
const REFUSALS_LOGGED: u64 = 5;

/// Accepts clients until the task is aborted (when the cluster ends).
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    commands: mpsc::UnboundedSender<Command>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let refused = Arc::new(AtomicU64::new(0));
    let me = rustix::process::geteuid().as_raw();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (EMFILE) or memory: wait instead of
                // spinning on an accept that keeps failing.
                debug!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some(why) = refuse_peer(&stream, me) {
            let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= REFUSALS_LOGGED || n.is_multiple_of(1000) {
                warn!("control socket: refused {why} ({n} refused so far)");
            }
            let _ = stream
                .try_write(line(&Response::error(format!("permission denied: {why}"))).as_bytes());
            continue;
        }
        if !fds_to_spare() {
            let _ = stream.try_write(
                line(&Response::error(
                    "busy: herd keeps its last open-file descriptors for its workers; try again",
                ))
                .as_bytes(),
            );
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let _ = stream.try_write(
                line(&Response::error(format!(
                    "busy: {MAX_CLIENTS} control clients are connected; try again"
                )))
                .as_bytes(),
            );
            continue;
        };
        let commands = commands.clone();
        tokio::spawn(async move {
            client(stream, commands).await;
            drop(permit);
        });
    }
}

/// Whether herd may spend a descriptor on a client: clients never take the
/// last quarter of the open-file limit (at most 64), which workers need to
/// be spawned (pipes, sockets). Counts /proc/self/fd: on accept only.
pub(crate) fn fds_to_spare() -> bool {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let Ok(open) = std::fs::read_dir("/proc/self/fd") else {
        return true;
    };
    let open = open.count() as u64;
    let reserve = (limit / 4).min(64);
    limit.saturating_sub(open) > reserve
}

/// Why the peer may not control this cluster, if it may not: only herd's
/// own user and root may.
fn refuse_peer(stream: &UnixStream, me: u32) -> Option<String> {
    match rustix::net::sockopt::socket_peercred(stream) {
        Ok(cred) => {
            let uid = cred.uid.as_raw();
            (uid != me && uid != 0).then(|| {
                format!(
                    "uid {uid} (pid {}): only uid {me} (herd's user) and root may control \
                     this cluster",
                    cred.pid.as_raw_nonzero()
                )
            })
        }
        Err(e) => Some(format!("a client whose credentials cannot be read ({e})")),
    }
}

fn line(response: &Response) -> String {
    let mut s = serde_json::to_string(response).unwrap_or_else(|e| {
        format!(r#"{{"v":{VERSION},"ok":false,"error":"cannot encode the answer: {e}"}}"#)
    });
    s.push('\n');
    s
}

/// Why a request line could not be read.
enum ReadError {
    /// The client closed the connection (or it failed).
    Closed,
    /// Longer than [`MAX_REQUEST`].
    TooLong,
    /// Nothing for [`IDLE_TIMEOUT`], or a request not finished within
    /// [`REQUEST_TIMEOUT`].
    TimedOut(&'static str),
}

/// Reads one request line (without its newline).
async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> Result<Vec<u8>, ReadError> {
    // Idle until the first byte, then the whole line within the limit.
    match tokio::time::timeout(IDLE_TIMEOUT, reader.fill_buf()).await {
        Err(_) => return Err(ReadError::TimedOut("no request for 60 s")),
        Ok(Ok([])) | Ok(Err(_)) => return Err(ReadError::Closed),
        Ok(Ok(_)) => {}
    }
    let mut buf = Vec::new();
    let mut limited = (&mut *reader).take(MAX_REQUEST as u64);
    let read = limited.read_until(b'\n', &mut buf);
    match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Err(_) => Err(ReadError::TimedOut("the request did not end within 5 s")),
        Ok(Err(_)) => Err(ReadError::Closed),
        Ok(Ok(_)) if buf.last() == Some(&b'\n') => {
            buf.pop();
            Ok(buf)
        }
        Ok(Ok(n)) if n >= MAX_REQUEST => Err(ReadError::TooLong),
        // EOF in the middle of a line: take it as the request.
        Ok(Ok(_)) => Ok(buf),
    }
}

async fn client(stream: UnixStream, commands: mpsc::UnboundedSender<Command>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(4096, read);
    loop {
        let request = match read_request(&mut reader).await {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(ReadError::TooLong) => {
                let why = format!("request longer than {MAX_REQUEST} bytes");
                let _ = send(&mut write, &Response::error(why)).await;
                return;
            }
            Err(ReadError::TimedOut(why)) => {
                let _ = send(&mut write, &Response::error(why)).await;
                return;
            }
        };
        if request.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let request = match parse(&request) {
            Ok(r) => r,
            Err(why) => {
                if send(&mut write, &Response::error(why)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if let Request::Logs {
            lines,
            slot,
            follow,
        } = request
        {
            let _ = logs(&mut write, lines.unwrap_or(10), slot, follow).await;
            if follow {
                return;
            }
            continue;
        }
        let response = answer(request, &commands).await;
        if send(&mut write, &response).await.is_err() {
            return;
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> Result<(), ()> {
    match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(line(response).as_bytes())).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// A request line as a [`Request`], or a one-line reason.
pub(crate) fn parse(bytes: &[u8]) -> Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JSON request: {e}"))?;
    // `{"cmd":"summary","cmd":"stop"}` is refused, not read as its last
    // `cmd`: a proxy or log that reads the first must not be fooled.
    if value.is_object() {
        serde_json::from_slice::<UniqueKeys>(bytes).map_err(|e| format!("bad request: {e}"))?;
    }
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "protocol version {v} is not spoken here (this herd speaks {VERSION})"
            ))
        }
        None => {
            return Err(format!(
                "no protocol version: send {{\"v\":{VERSION},\"cmd\":…}}"
            ))
        }
    }
    let request: super::protocol::Request =
        serde_json::from_value(value).map_err(|e| format!("bad request: {e}"))?;
    Ok(request.command)
}

/// A JSON object whose keys are all different (its values not read).
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate field `{key}`")));
                    }
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(UniqueKeys)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Asks the supervisor (through `call`), or `None` if the cluster is gone.
async fn ask<T>(
    commands: &mpsc::UnboundedSender<Command>,
    call: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    commands.send(call(tx)).ok()?;
    rx.await.ok()
}

const GONE: &str = "the cluster is shutting down";

async fn answer(request: Request, commands: &mpsc::UnboundedSender<Command>) -> Response {
    match request {
        Request::Summary => match ask(commands, |r| Command::Control(Call::Status(r))).await {
            Some((status, _)) => Response {
                summary: Some(status.summary),
                ..Response::ok()
            },
            None => Response::error(GONE),
        },
        Request::Status => match sampled_status(commands).await {
            Some(status) => Response {
                status: Some(Box::new(status)),
                ..Response::ok()
            },
            None => Response::error(GONE),
        },
        Request::Reload => match ask(commands, |reply| Command::Reload { reply }).await {
            Some(outcome) => reload_response(outcome),
            None => Response::error(GONE),
        },
        Request::Scale { workers, delta } => {
            let to = match (workers, delta) {
                (Some(n), None) if (1..=crate::config::MAX_WORKERS).contains(&n) => {
                    super::ScaleTo::Exactly(n)
                }
                (Some(n), None) => {
                    return Response::error(format!(
                        "cannot scale to {n} workers: 1 to {} are possible",
                        crate::config::MAX_WORKERS
                    ))
                }
                (None, Some(d)) => super::ScaleTo::By(d),
                _ => return Response::error("scale takes exactly one of workers and delta"),
            };
            match ask(commands, |reply| {
                Command::Control(Call::Scale { to, reply })
            })
            .await
            {
                Some(Ok(n)) => Response {
                    scale: Some(n),
                    ..Response::ok()
                },
                Some(Err(why)) => Response::error(why),
                None => Response::error(GONE),
            }
        }
        Request::Restart { slot } => {
            match ask(commands, |reply| {
                Command::Control(Call::Restart { slot, reply })
            })
            .await
            {
                Some(Ok(w)) => Response {
                    restart: Some(w),
                    ..Response::ok()
                },
                Some(Err(why)) => Response::error(why),
                None => Response::error(GONE),
            }
        }
        Request::Signal { signal, slot } => {
            let signal = match crate::config::parse_signal(&signal) {
                Ok(s) => s,
                Err(why) => return Response::error(why),
            };
            match ask(commands, |reply| {
                Command::Control(Call::Signal {
                    signal,
                    slot,
                    reply,
                })
            })
            .await
            {
                Some(Ok(workers)) => Response {
                    signal: Some(workers),
                    ..Response::ok()
                },
                Some(Err(why)) => Response::error(why),
                None => Response::error(GONE),
            }
        }
        Request::Stop => match commands.send(Command::Stop) {
            Ok(()) => Response::ok(),
            Err(_) => Response::error(GONE),
        },
        Request::Logs { .. } => Response::error("logs is answered by the client task"),
    }
}

/// The cluster's status with each worker's CPU and memory read (on the
/// blocking pool), or `None` if the cluster is gone.
pub(crate) async fn sampled_status(
    commands: &mpsc::UnboundedSender<Command>,
) -> Option<super::protocol::Status> {
    let (mut status, targets) = ask(commands, |r| Command::Control(Call::Status(r))).await?;
    let samples = tokio::task::spawn_blocking(move || {
        targets
            .into_iter()
            .map(|(pid, cgroup)| (pid, Sample::of(pid, cgroup.as_deref())))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for w in status.slots.iter_mut().flat_map(|s| s.workers.iter_mut()) {
        if let Some((_, s)) = samples.iter().find(|(pid, _)| *pid == w.pid) {
            w.cpu_s = s.cpu_s;
            w.rss_bytes = s.rss_bytes;
        }
    }
    Some(status)
}

fn reload_response(outcome: ReloadOutcome) -> Response {
    let reply = |outcome: &str| ReloadReply {
        outcome: outcome.to_string(),
        generation: None,
        why: None,
        stderr: Vec::new(),
    };
    match outcome {
        ReloadOutcome::Reloaded { generation } => Response {
            reload: Some(ReloadReply {
                generation: Some(generation),
                ..reply("reloaded")
            }),
            ..Response::ok()
        },
        ReloadOutcome::RolledBack {
            slot,
            pid,
            why,
            stderr,
            rolled_back,
        } => {
            let worker = match pid {
                Some(pid) => format!("new worker {pid} in slot {slot}"),
                None => format!("the new worker for slot {slot}"),
            };
            let why = format!(
                "{worker} failed ({why}); {rolled_back} slot(s) rolled back, the previous \
                 command serves"
            );
            Response {
                reload: Some(ReloadReply {
                    why: Some(why.clone()),
                    stderr,
                    ..reply("rolled_back")
                }),
                ..Response::error(format!("reload failed: {why}"))
            }
        }
        ReloadOutcome::CannotResolve(why) => Response {
            reload: Some(ReloadReply {
                why: Some(why.clone()),
                ..reply("cannot_resolve")
            }),
            ..Response::error(format!("reload failed: {why}"))
        },
        ReloadOutcome::Stopped => Response {
            reload: Some(reply("stopped")),
            ..Response::error("reload ended: the cluster is stopping")
        },
    }
}

/// Answers `logs`: the last `lines` (of `slot`), then `end`, or with
/// `follow` new lines until the client goes or the cluster ends.
async fn logs(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    lines: usize,
    slot: Option<usize>,
    follow: bool,
) -> Result<(), ()> {
    let wanted = |l: &LogLine| slot.is_none() || l.slot == slot;
    // Subscribed before the recent lines are taken: nothing falls between.
    let mut live = follow.then(crate::output::ring::follow);
    let recent = crate::output::ring::recent(lines, slot);
    let mut last = 0;
    for l in recent {
        last = l.seq;
        send(write, &log_response(l)).await?;
    }
    let Some(live) = live.as_mut() else {
        return send(
            write,
            &Response {
                end: Some(true),
                ..Response::ok()
            },
        )
        .await;
    };
    loop {
        match live.recv().await {
            Ok(l) if l.seq > last && wanted(&l) => {
                last = l.seq;
                send(write, &log_response((*l).clone())).await?;
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                send(
                    write,
                    &Response {
                        skipped: Some(n),
                        ..Response::ok()
                    },
                )
                .await?;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

fn log_response(l: LogLine) -> Response {
    Response {
        log: Some(l),
        ..Response::ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse(br#"{"v":1,"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse(br#"{"v":1,"cmd":"scale","delta":-2}"#),
            Ok(Request::Scale {
                workers: None,
                delta: Some(-2)
            })
        );
        let why = |b: &[u8]| parse(b).unwrap_err();
        assert!(why(b"garbage").starts_with("not a JSON request"));
        assert!(why(br#"{"cmd":"status"}"#).starts_with("no protocol version"));
        assert!(why(br#"{"v":9,"cmd":"status"}"#).contains("version 9"));
        assert!(why(br#"{"v":1,"cmd":"explode"}"#).contains("unknown variant"));
        assert!(why(br#"{"v":1,"cmd":"restart"}"#).contains("slot"));
        assert!(why(br#"{"v":1,"cmd":"restart","slot":-1}"#).starts_with("bad request"));
        assert!(why(br#"{"v":1,"cmd":"summary","cmd":"stop"}"#).contains("duplicate field `cmd`"));
    }
}
