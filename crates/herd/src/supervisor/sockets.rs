//! Sockets on request and round-robin: a worker's `Channel::listen` or a
//! Node worker's `queryServer`, the acceptor tasks, and handing accepted
//! connections to workers.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::channel::{encode_control, NodeQuery, Outgoing};
use super::Supervisor;
use crate::cluster::Event;
use crate::config::Ipc;
use crate::ipc::node;
use crate::ipc::Control;
use crate::lifecycle::Role;
use crate::listen::{ListenAddress, ListenSpec, ListenSpecError};
use crate::round_robin::client_hash;
use crate::socket::Listeners;
use crate::{sys, Error};

/// A socket bound on a worker's request (not in the configuration). It is
/// kept while a live worker holds it and closed when the last one lets go:
/// a Node worker's server closes (`{act: 'close'}`), or the worker exits.
pub(super) struct OnDemand {
    /// The spec text as the first worker sent it.
    text: String,
    /// Node's `index` of the request (0 for herd workers): workers share a
    /// socket they ask for with the same text and index.
    nth: u64,
    pub(super) listeners: Listeners,
    /// The workers (pids) that were given it and have not let go.
    holders: std::collections::HashSet<u32>,
    /// The acceptor task, under round-robin (it holds a copy of the socket).
    acceptor: Option<tokio::task::JoinHandle<()>>,
}

/// The most sockets herd binds on the requests of one worker (a worker
/// asking for thousands must not use up the primary's descriptors).
const MAX_SOCKETS_PER_WORKER: usize = 256;

/// How a worker's request for a socket is answered.
pub(super) enum SocketReply {
    /// With the socket itself.
    Socket { fd: OwnedFd, address: String },
    /// The primary accepts on it and hands connections over (`address` is
    /// also the key that names the server to a Node worker).
    RoundRobin {
        address: String,
        sockname: Option<std::net::SocketAddr>,
        /// The listener's id (what `Accepted::listener` holds).
        listener: usize,
    },
}

impl Supervisor {
    /// A herd worker asks for a listening socket (`Channel::listen`).
    pub(super) fn on_listen(&mut self, slot: usize, from: u32, seq: u64, spec: &str) {
        let Some(tx) = self.channel_of(slot, from) else {
            return;
        };
        let reply = match self.socket_for(slot, from, spec, 0, false) {
            Ok(SocketReply::Socket { fd, address }) => {
                self.report_listening(slot, from, &address);
                Outgoing::Frame {
                    bytes: encode_control(&Control::Listening { seq, address }, true),
                    fd: Some(Arc::new(fd)),
                }
            }
            Ok(SocketReply::RoundRobin { address, .. }) => {
                let error = format!(
                    "{address} is balanced round-robin by the primary: take its connections \
                     with Channel::accept"
                );
                Outgoing::Frame {
                    bytes: encode_control(&Control::ListenFailed { seq, error }, false),
                    fd: None,
                }
            }
            Err((error, _)) => {
                if self.first_refusal(slot, from) {
                    warn!(
                        slot,
                        pid = from,
                        "worker {from} cannot listen on {spec}: {error} (further refusals are logged at debug level)"
                    );
                } else {
                    debug!(
                        slot,
                        pid = from,
                        "worker {from} cannot listen on {spec}: {error}"
                    );
                }
                Outgoing::Frame {
                    bytes: encode_control(&Control::ListenFailed { seq, error }, false),
                    fd: None,
                }
            }
        };
        let _ = tx.send(reply);
    }

    /// A Node worker's `server.listen()` (Node's `queryServer`), answered as
    /// Node's primary would: with the socket (shared and reuseport modes), or
    /// as a round-robin server to which connections are handed (`newconn`).
    pub(super) fn on_node_query(&mut self, slot: usize, from: u32, query: NodeQuery) {
        let Some(tx) = self.channel_of(slot, from) else {
            return;
        };
        let seq = query.seq;
        let answer = match self.node_spec(&query) {
            Ok(spec) => self.socket_for(slot, from, &spec, query.index, true),
            Err(e) => Err(e),
        };
        let mut fields = serde_json::Map::new();
        fields.insert("ack".into(), seq.into());
        fields.insert("data".into(), serde_json::Value::Null);
        let reply = match answer {
            Ok(SocketReply::Socket { fd, address }) => {
                debug!(
                    slot,
                    pid = from,
                    "node worker {from} gets the socket of {address}"
                );
                // Non-blocking, as Node's primary hands it: workers race for
                // each connection, and the loser must get EAGAIN, not sleep
                // inside accept() with its event loop stalled.
                if let Err(e) = rustix::io::ioctl_fionbio(&fd, true) {
                    warn!("cannot make the socket of {address} non-blocking: {e}");
                }
                fields.insert("key".into(), address.into());
                fields.insert("errno".into(), serde_json::Value::Null);
                Outgoing::Frame {
                    bytes: node::encode_cluster(fields, self.next_node_seq(), true),
                    fd: Some(Arc::new(fd)),
                }
            }
            Ok(SocketReply::RoundRobin {
                address,
                sockname,
                listener,
            }) => {
                debug!(
                    slot,
                    pid = from,
                    "node worker {from} serves {address} round-robin"
                );
                if let Some(w) = self.slots[slot].io_mut(from) {
                    if !w.rr_servers.contains(&listener) {
                        w.rr_servers.push(listener);
                    }
                }
                fields.insert("key".into(), address.into());
                fields.insert("errno".into(), serde_json::Value::Null);
                if let Some(addr) = sockname {
                    fields.insert(
                        "sockname".into(),
                        serde_json::json!({
                            "address": addr.ip().to_string(),
                            "family": if addr.is_ipv4() { "IPv4" } else { "IPv6" },
                            "port": addr.port(),
                        }),
                    );
                }
                Outgoing::Frame {
                    bytes: node::encode_cluster(fields, self.next_node_seq(), false),
                    fd: None,
                }
            }
            Err((error, errno)) => {
                if self.first_refusal(slot, from) {
                    warn!(
                        slot,
                        pid = from,
                        "node worker {from} cannot listen: {error} (further refusals are logged at debug level)"
                    );
                } else {
                    debug!(
                        slot,
                        pid = from,
                        "node worker {from} cannot listen: {error}"
                    );
                }
                fields.insert("key".into(), "".into());
                fields.insert("errno".into(), (-errno).into());
                Outgoing::Frame {
                    bytes: node::encode_cluster(fields, self.next_node_seq(), false),
                    fd: None,
                }
            }
        };
        let _ = tx.send(reply);
        if self.config.balance == crate::Balance::RoundRobin {
            self.dispatch();
        }
    }

    /// The listen spec a Node `queryServer` stands for. `listen({fd: N})`
    /// names the N-3rd socket herd handed the worker; `listen(port)` with no
    /// host is the configured spec with that port, whatever its host, since
    /// herd's `-l` decides where to listen.
    ///
    /// A host in `listen()` does not move the cluster either: a worker asking
    /// for a configured port gets the configured socket whatever host it
    /// names — silently for a wildcard (Fastify's `host: '0.0.0.0'`, `'::'`),
    /// with one warning naming both addresses for a specific other host —
    /// instead of colliding with herd's own socket and crash-looping.
    pub(super) fn node_spec(&mut self, q: &NodeQuery) -> Result<String, (String, i32)> {
        // `listen(path)`: a Unix socket, the configured one if `-l unix:`
        // names the same path, else bound on request.
        if let Some(path) = &q.path {
            return Ok(format!("unix:{path}"));
        }
        if let Some(fd) = q.fd {
            // The sockets handed to workers, in LISTEN_FDS order.
            let handed: Vec<&ListenSpec> = (0..self.listeners.specs().len())
                .filter(|i| !self.listeners.primary_accepts(*i))
                .map(|i| &self.listeners.specs()[i])
                .collect();
            let index = (fd as usize).checked_sub(sys::LISTEN_FDS_START as usize);
            return match index.and_then(|i| handed.get(i)) {
                Some(spec) => Ok(spec.to_string()),
                None => Err((format!("fd {fd} is not a socket herd passed"), libc::EBADF)),
            };
        }
        let port = q.port.unwrap_or(0);
        if port != 0 {
            if let Some(spec) = self.configured_on_port(port, q.udp) {
                let spec = spec.to_string();
                let asked = node::host_port(q.address.as_deref(), port);
                let wildcard = q
                    .address
                    .as_deref()
                    .is_none_or(|h| matches!(h, "" | "0.0.0.0" | "::" | "[::]"));
                if !wildcard && asked != spec && self.host_warned.insert(asked.clone()) {
                    warn!(
                        "a worker asked to listen on {asked}; it gets herd's socket on {spec} \
                         instead (herd's -l decides where the cluster listens; change -l to \
                         listen on {asked})"
                    );
                }
                return Ok(spec);
            }
        }
        let address = node::host_port(q.address.as_deref(), port);
        Ok(if q.udp {
            format!("udp:{address}")
        } else {
            address
        })
    }

    /// The configured spec listening on `port` (UDP or TCP), whatever its host.
    fn configured_on_port(&self, port: u16, udp: bool) -> Option<&ListenSpec> {
        self.listeners.specs().iter().find(|s| match &s.address {
            ListenAddress::Tcp(a) => !udp && a.port == port,
            ListenAddress::Udp(a) => udp && a.port == port,
            ListenAddress::Unix(_) => false,
        })
    }

    /// Counts a refused socket request of worker `pid` in `slot`; true for its first.
    fn first_refusal(&mut self, slot: usize, pid: u32) -> bool {
        match self.slots[slot].io_mut(pid) {
            Some(w) => {
                w.refusals += 1;
                w.refusals == 1
            }
            None => true,
        }
    }

    pub(super) fn next_node_seq(&mut self) -> u64 {
        self.node_seq += 1;
        self.node_seq
    }

    /// The channel of worker `pid` in `slot`, if it is still that slot's and open.
    pub(super) fn channel_of(
        &self,
        slot: usize,
        pid: u32,
    ) -> Option<mpsc::UnboundedSender<Outgoing>> {
        self.slots.get(slot)?.io(pid)?.channel.clone()
    }

    /// How to name a Node worker's listening server: as it reports it, or,
    /// for one that asked for no host, as the socket herd gave it.
    pub(super) fn resolve_listening(&self, address: Option<String>, port: u16) -> String {
        // A configured port is herd's socket, whatever host the worker named.
        if let Some(spec) = self.configured_on_port(port, false) {
            return spec.to_string();
        }
        if address.is_some() {
            return node::host_port(address.as_deref(), port);
        }
        let on_demand = || {
            self.on_demand
                .iter()
                .flatten()
                .map(|d| &d.listeners.specs()[0])
                .find(|s| matches!(&s.address, ListenAddress::Tcp(a) if a.port == port))
        };
        match self.configured_on_port(port, false).or_else(on_demand) {
            Some(spec) => spec.to_string(),
            None => node::host_port(None, port),
        }
    }

    pub(super) fn report_listening(&mut self, slot: usize, pid: u32, address: &str) {
        info!(slot, pid, "worker {pid} listening on {address}");
        self.events.send(Event::Listening {
            slot,
            pid,
            address: address.to_string(),
        });
        self.mark_ready(slot, pid, crate::config::ReadySignal::Listening);
    }

    /// The socket for listen spec `text` as slot `slot` gets it: one the
    /// cluster was configured with, or one bound on an earlier request for
    /// the same address, or a new one (bound once and kept). `round_robin`:
    /// the asker can serve connections handed over one by one (a Node
    /// worker); otherwise a new socket under round-robin balance is shared.
    ///
    /// `nth` is Node's `index`: its count of earlier requests for the same address by
    /// the same worker: a worker's second server on an address it already
    /// serves gets its own socket (a new port for `:0`) or `EADDRINUSE`, as
    /// under Node's primary, never the same socket twice (Node's cluster
    /// module asserts on that, uncatchably).
    pub(super) fn socket_for(
        &mut self,
        slot: usize,
        pid: u32,
        text: &str,
        nth: u64,
        round_robin: bool,
    ) -> Result<SocketReply, (String, i32)> {
        let spec: ListenSpec = text
            .parse()
            .map_err(|e: ListenSpecError| (e.to_string(), libc::EINVAL))?;
        // Asked as configured (`:0` too), or by the address it was bound to
        // (the port the kernel chose for an earlier `:0`).
        let configured = self
            .config
            .listen
            .iter()
            .position(|s| *s == spec)
            .or_else(|| {
                self.listeners
                    .specs()
                    .iter()
                    .position(|s| s.address == spec.address)
            });
        if configured.is_some() {
            self.configured_taken = true;
        }
        if configured.is_some() && nth > 0 {
            return Err((
                format!("{text} is already served by this worker"),
                libc::EADDRINUSE,
            ));
        }
        let earlier = self.on_demand.iter().position(|d| {
            d.as_ref().is_some_and(|d| {
                d.nth == nth && (d.text == text || d.listeners.specs()[0].address == spec.address)
            })
        });
        if configured.is_none() && earlier.is_none() {
            let held = self
                .on_demand
                .iter()
                .flatten()
                .filter(|d| d.holders.contains(&pid))
                .count();
            if held >= MAX_SOCKETS_PER_WORKER {
                return Err((
                    format!(
                        "worker {pid} already holds {held} sockets bound on its request, \
                         the most herd binds for one worker"
                    ),
                    libc::EMFILE,
                ));
            }
        }
        let configured_count = self.listeners.specs().len();
        let (id, listeners, index) = match (configured, earlier) {
            (Some(i), _) => (i, &self.listeners, i),
            (None, Some(k)) => {
                let d = self.on_demand[k].as_mut().expect("found above");
                d.holders.insert(pid);
                (configured_count + k, &d.listeners, 0)
            }
            (None, None) => {
                let balance = match self.config.balance {
                    crate::Balance::RoundRobin if !round_robin => crate::Balance::Shared,
                    other => other,
                };
                let bound = Listeners::bind(&[spec], balance, self.slots.len())
                    .map_err(|e| (e.to_string(), e.errno()))?;
                // A closed socket's place is reused, so the list stays as
                // long as the most sockets ever open at once.
                let k = match self.on_demand.iter().position(Option::is_none) {
                    Some(k) => k,
                    None => {
                        self.on_demand.push(None);
                        self.on_demand.len() - 1
                    }
                };
                let id = configured_count + k;
                let acceptor = if bound.primary_accepts(0) {
                    Some(
                        self.start_acceptor(id, bound.specs()[0].to_string(), bound.socket(0, 0))
                            .map_err(|e| (e.to_string(), libc::EMFILE))?,
                    )
                } else {
                    None
                };
                debug!("bound {} on request of worker {pid}", bound.specs()[0]);
                self.warn_unconfigured_port(pid, &bound.specs()[0]);
                self.on_demand[k] = Some(OnDemand {
                    text: text.to_string(),
                    nth,
                    listeners: bound,
                    holders: [pid].into(),
                    acceptor,
                });
                let d = self.on_demand[k].as_ref().expect("just stored");
                (id, &d.listeners, 0)
            }
        };
        let address = listeners.specs()[index].to_string();
        if listeners.primary_accepts(index) {
            let sockname = match &listeners.specs()[index].address {
                ListenAddress::Tcp(a) => Some(a.socket_addr()),
                _ => None,
            };
            return Ok(SocketReply::RoundRobin {
                address,
                sockname,
                listener: id,
            });
        }
        let fd = rustix::io::fcntl_dupfd_cloexec(listeners.socket(index, slot), 0)
            .map_err(|e| (e.to_string(), e.raw_os_error()))?;
        Ok(SocketReply::Socket { fd, address })
    }

    /// A worker's first server on a port that is not herd's, while no
    /// worker has taken a configured socket: the app most likely listens on
    /// its own port (`app.listen(3000)` under the default `-l`), and herd's
    /// address would serve nothing. Said once.
    fn warn_unconfigured_port(&mut self, pid: u32, spec: &ListenSpec) {
        let port = match &spec.address {
            ListenAddress::Tcp(a) => a.port,
            _ => return,
        };
        if port == 0 || self.configured_taken || self.port_warned || self.config.listen.is_empty() {
            return;
        }
        self.port_warned = true;
        let configured: Vec<String> = self
            .listeners
            .specs()
            .iter()
            .map(|s| s.to_string())
            .collect();
        warn!(
            pid,
            "worker {pid} asked to listen on {spec}, which is not one of herd's -l addresses \
             ({}); herd bound it for the workers, as Node's cluster primary would, and nothing \
             serves {} so far: if {spec} is the app's server, start herd with -l {spec} (or \
             with the host it should listen on) (said once)",
            configured.join(", "),
            configured.join(", ")
        );
    }

    /// Starts one acceptor task per round-robin socket of the configuration.
    pub(super) fn start_acceptors(&mut self) -> Result<(), Error> {
        let sockets: Vec<(usize, String, OwnedFd)> = self
            .listeners
            .primary_sockets()
            .into_iter()
            .map(|(i, spec, fd)| {
                rustix::io::fcntl_dupfd_cloexec(fd, 0).map(|fd| (i, spec.to_string(), fd))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Spawn(e.into()))?;
        self.rr_keys = self
            .listeners
            .specs()
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (id, spec, fd) in sockets {
            self.start_acceptor(id, spec, fd.as_fd())
                .map_err(Error::Spawn)?;
        }
        Ok(())
    }

    /// A Node worker closed its server for `key`: it no longer holds that
    /// socket (if it was bound on request).
    pub(super) fn on_node_close(&mut self, slot: usize, from: u32, key: &str) {
        debug!(
            slot,
            pid = from,
            "node worker {from} closed its server {key}"
        );
        self.release_sockets(from, Some(key));
    }

    /// Worker `pid` lets go of the on-request socket named `key` (all of
    /// them: `None`, when it exits). A socket no live worker holds is closed:
    /// clients are refused instead of hanging, and the address is free again.
    pub(super) fn release_sockets(&mut self, pid: u32, key: Option<&str>) {
        let configured = self.listeners.specs().len();
        for k in 0..self.on_demand.len() {
            let Some(d) = &mut self.on_demand[k] else {
                continue;
            };
            if key.is_some_and(|key| d.listeners.specs()[0].to_string() != key && d.text != key) {
                continue;
            }
            if !d.holders.remove(&pid) || !d.holders.is_empty() {
                continue;
            }
            let d = self.on_demand[k].take().expect("checked above");
            if let Some(acceptor) = &d.acceptor {
                acceptor.abort();
            }
            // Connections accepted for it and not handed out are closed.
            let id = configured + k;
            self.rr.waiting.retain(|a| a.listener != id);
            info!(
                "closing {}: no live worker holds it any more",
                d.listeners.specs()[0]
            );
        }
    }

    /// An acceptor task for round-robin listener `id`: it only accepts and
    /// forwards; which worker gets a connection is the supervisor's decision.
    pub(super) fn start_acceptor(
        &mut self,
        id: usize,
        spec: String,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use rustix::net::{acceptfrom_with, SocketAddrAny, SocketFlags};
        let fd = rustix::io::fcntl_dupfd_cloexec(fd, 0)?;
        rustix::io::ioctl_fionbio(&fd, true)?;
        // Raw accept4 on the socket: a connection that is only passed on is
        // never registered with this runtime's epoll (tokio's accept would
        // add and remove it: two syscalls per connection for nothing).
        let listener = sys::register_async(fd, tokio::io::Interest::READABLE)?;
        if self.rr_keys.len() <= id {
            self.rr_keys.resize(id + 1, String::new());
        }
        self.rr_keys[id] = spec.clone();
        let tx = self.accepted_tx.clone();
        info!("round-robin: the primary accepts on {spec}");
        let task = tokio::spawn(async move {
            loop {
                let Ok(mut ready) = listener.readable().await else {
                    return;
                };
                // Non-blocking, as Node's primary hands connections: a
                // worker must never sleep in a read its event loop did not
                // expect to block (herd workers set it themselves anyway).
                let got = ready.try_io(|fd| {
                    acceptfrom_with(fd.get_ref(), SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)
                        .map_err(std::io::Error::from)
                });
                match got {
                    Ok(Ok((conn, peer))) => {
                        let ip = peer
                            .and_then(|a: SocketAddrAny| std::net::SocketAddr::try_from(a).ok())
                            .map(|a| a.ip());
                        if tx.send((conn, client_hash(ip), id)).is_err() {
                            return;
                        }
                    }
                    Err(_would_block) => continue,
                    // EMFILE and friends: back off instead of spinning.
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        Ok(task)
    }

    pub(super) fn on_accepted(&mut self, conn: OwnedFd, client: u64, listener: usize) {
        self.rr.accept(conn, client, listener);
        self.dispatch();
    }

    /// Hands waiting connections to ready workers, as the picker chooses, at
    /// most `round_robin::MAX_IN_FLIGHT` untaken per worker. A connection
    /// no worker can take now (a Node worker takes only those of listeners
    /// its servers asked for) keeps its place; the others go past it.
    pub(super) fn dispatch(&mut self) {
        if self.life.stopping() || self.rr.waiting.is_empty() {
            return;
        }
        // herd workers take every listener's connections once ready; Node
        // workers those of the round-robin servers they asked for.
        let node = self.config.ipc == Ipc::Node;
        let life = &self.life;
        let workers: Vec<(usize, u32, Option<&[usize]>)> = self
            .slots
            .iter()
            .enumerate()
            .flat_map(|(slot, s)| s.workers.iter().map(move |io| (slot, io)))
            .filter_map(|(slot, io)| {
                io.channel.as_ref()?;
                // Its own worker or its replacement; not one draining.
                let (_, role, w) = life.find(io.pid)?;
                (role != Role::Draining && w.retire_kill_at.is_none() && (node || w.ready))
                    .then(|| (slot, io.pid, node.then_some(io.rr_servers.as_slice())))
            })
            .collect();
        let mut skipped = std::collections::VecDeque::new();
        let mut candidates = Vec::with_capacity(workers.len());
        while let Some(accepted) = self.rr.waiting.pop_front() {
            if !workers.iter().any(|(_, pid, _)| self.rr.has_room(*pid)) {
                self.rr.waiting.push_front(accepted);
                break; // everyone is full: the rest waits too
            }
            candidates.clear();
            candidates.extend(
                workers
                    .iter()
                    .filter(|(_, _, serves)| serves.is_none_or(|l| l.contains(&accepted.listener)))
                    .map(|(slot, pid, _)| (*slot, *pid)),
            );
            let Some((slot, pid)) = self.rr.pick(&candidates, self.slots.len(), accepted.client)
            else {
                skipped.push_back(accepted);
                continue;
            };
            let Some(tx) = self.slots[slot].io(pid).and_then(|w| w.channel.as_ref()) else {
                unreachable!("picked among workers with a channel");
            };
            let bytes = if node {
                // Node's `newconn`; its answer (`ack` = our seq) is the `Taken`.
                let key = self
                    .rr_keys
                    .get(accepted.listener)
                    .map_or("", String::as_str);
                node::encode_newconn(key, accepted.id)
            } else {
                encode_control(&Control::Conn { id: accepted.id }, true)
            };
            let _ = tx.send(Outgoing::Frame {
                bytes,
                fd: Some(accepted.conn.clone()),
            });
            self.rr.hand(accepted, slot, pid);
        }
        // What no worker could take keeps its place at the front, in order.
        while let Some(a) = skipped.pop_back() {
            self.rr.waiting.push_front(a);
        }
    }

    pub(super) fn on_taken(&mut self, from: u32, id: u64) {
        if self.rr.take(id, from) {
            self.dispatch();
        }
    }

    /// Connections handed to `pid` and not taken go back to the front of the queue.
    pub(super) fn requeue(&mut self, pid: u32) {
        let n = self.rr.reclaim(pid);
        if n > 0 {
            info!(
                pid,
                "{n} connection(s) worker {pid} never took go to other workers"
            );
            self.dispatch();
        }
    }
}
