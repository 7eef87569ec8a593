//! Listening sockets, bound once by the primary and held for the life of the
//! cluster (shared mode) or of each slot (reuseport mode).
//!
//! Holding the sockets in the primary is what makes restarts lossless: while a
//! worker is dead the kernel keeps queueing connections on the socket, and the
//! replacement accepts them.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::listen::{ListenAddress, ListenSpec, TcpAddress};

/// The listen backlog asked for (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// How connections are spread over workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// One socket per address, inherited by every worker; whichever worker is
    /// free accepts (work-conserving).
    #[default]
    Shared,
    /// One `SO_REUSEPORT` socket per slot per address; the kernel spreads
    /// connections by flow hash. Unix sockets have no reuseport and stay shared.
    Reuseport,
    /// The primary accepts TCP connections and hands each to a ready worker
    /// over herd's IPC channel (library workers: `Channel::accept`), with a
    /// bounded number in flight per worker; a connection a worker never took
    /// goes to another one. Unix and UDP sockets stay shared.
    RoundRobin,
}

impl FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(Balance::Shared),
            "reuseport" => Ok(Balance::Reuseport),
            "round-robin" => Ok(Balance::RoundRobin),
            other => Err(format!(
                "unknown balance mode {other:?} (expected shared, reuseport or round-robin)"
            )),
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::Shared => "shared",
            Balance::Reuseport => "reuseport",
            Balance::RoundRobin => "round-robin",
        })
    }
}

/// Which worker gets the next connection under [`Balance::RoundRobin`].
/// Only ready workers with fewer than the in-flight cap of untaken
/// connections are candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Picker {
    /// Each candidate in turn.
    #[default]
    RoundRobin,
    /// The candidate with the fewest open connections (handed and not yet
    /// closed by the worker), ties in turn. For uneven request costs.
    LeastConnections,
    /// By a hash of the client's IP address, so one client keeps reaching
    /// the same worker (per-process caches, sessions, WebSocket fallbacks);
    /// while that worker is unavailable, the next candidate in slot order.
    Sticky,
}

impl FromStr for Picker {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" => Ok(Picker::RoundRobin),
            "least-connections" => Ok(Picker::LeastConnections),
            "sticky" => Ok(Picker::Sticky),
            other => Err(format!(
                "unknown picker {other:?} (expected round-robin, least-connections or sticky)"
            )),
        }
    }
}

impl fmt::Display for Picker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Picker::RoundRobin => "round-robin",
            Picker::LeastConnections => "least-connections",
            Picker::Sticky => "sticky",
        })
    }
}

/// Why a socket could not be opened. Each message names the address.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another socket holds the address.
    #[error("address {0} is already in use")]
    InUse(String),
    /// Binding needs privileges this process lacks.
    #[error("permission denied binding {0} (ports below 1024 need root or CAP_NET_BIND_SERVICE)")]
    PermissionDenied(String),
    /// A file that is not a socket sits at a unix socket path.
    #[error("cannot listen on unix:{0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    /// Sockets passed by systemd (socket activation) do not fit the specs.
    #[error("socket activation: {0}")]
    Activation(String),
    /// Any other failure.
    #[error("cannot listen on {address}: {source}")]
    Io {
        /// The address.
        address: String,
        /// The error from the kernel.
        source: io::Error,
    },
}

impl BindError {
    /// The errno behind it (what Node's cluster protocol reports, negated).
    pub fn errno(&self) -> i32 {
        match self {
            BindError::InUse(_) => libc::EADDRINUSE,
            BindError::PermissionDenied(_) => libc::EACCES,
            BindError::NotASocket(_) => libc::ENOTSOCK,
            BindError::Activation(_) => libc::EINVAL,
            BindError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EINVAL),
        }
    }
}

fn bind_error(address: &dyn fmt::Display, source: io::Error) -> BindError {
    let address = address.to_string();
    match source.kind() {
        io::ErrorKind::AddrInUse => BindError::InUse(address),
        io::ErrorKind::PermissionDenied => BindError::PermissionDenied(address),
        _ => BindError::Io { address, source },
    }
}

/// The sockets of one listen spec.
#[derive(Debug)]
enum SpecSockets {
    /// One socket for every slot.
    Shared(OwnedFd),
    /// Socket `i` belongs to slot `i`.
    PerSlot(Vec<OwnedFd>),
}

/// All listening sockets of a cluster, by spec and slot.
#[derive(Debug)]
pub struct Listeners {
    specs: Vec<ListenSpec>,
    sockets: Vec<SpecSockets>,
    unix_paths: Vec<PathBuf>,
    /// Per spec: whether the primary accepts on it (round-robin TCP) rather
    /// than handing it to the workers.
    primary_accepts: Vec<bool>,
    /// Per spec: its socket was passed by systemd (socket activation).
    passed: Vec<bool>,
}

impl Listeners {
    /// Binds every spec for `slots` slots. Port 0 is resolved once, so every
    /// slot of a reuseport spec shares the kernel-chosen port.
    pub fn bind(specs: &[ListenSpec], balance: Balance, slots: usize) -> Result<Self, BindError> {
        Listeners::bind_activated(specs, balance, slots, Vec::new())
    }

    /// Binds every spec, but takes the sockets systemd passed
    /// (`inherited`, socket activation) for the specs they match, by
    /// `LISTEN_FDNAMES` name (a spec's `NAME=`) or by address. With no
    /// spec at all, every inherited socket becomes one. A socket that
    /// matches no spec is an error, not ignored (it would sit unserved);
    /// so is one under `reuseport`, which needs a socket per slot.
    pub fn bind_activated(
        specs: &[ListenSpec],
        balance: Balance,
        slots: usize,
        mut inherited: Vec<crate::activation::InheritedSocket>,
    ) -> Result<Self, BindError> {
        let derived: Vec<ListenSpec>;
        let specs = if specs.is_empty() && !inherited.is_empty() {
            derived = inherited
                .iter()
                .map(inherited_spec)
                .collect::<Result<_, _>>()?;
            &derived[..]
        } else {
            specs
        };
        if !inherited.is_empty() && balance == Balance::Reuseport {
            return Err(BindError::Activation(
                "--balance reuseport needs a socket per worker; systemd passes one per address: \
                 use --balance shared (or round-robin)"
                    .into(),
            ));
        }
        let mut out = Listeners {
            specs: Vec::new(),
            sockets: Vec::new(),
            unix_paths: Vec::new(),
            primary_accepts: Vec::new(),
            passed: Vec::new(),
        };
        for spec in specs {
            if let Some(i) = inherited.iter().position(|s| activation_matches(s, spec)) {
                let s = inherited.remove(i);
                let resolved = inherited_spec(&s).map(|mut r| {
                    r.name = spec.name.clone();
                    r
                })?;
                out.primary_accepts.push(
                    balance == Balance::RoundRobin && matches!(spec.address, ListenAddress::Tcp(_)),
                );
                out.specs.push(resolved);
                out.sockets.push(SpecSockets::Shared(s.fd));
                out.passed.push(true);
                continue;
            }
            let (resolved, sockets) = match &spec.address {
                ListenAddress::Unix(path) => {
                    let fd = bind_unix(path)?;
                    out.unix_paths.push(path.clone());
                    (spec.clone(), SpecSockets::Shared(fd))
                }
                ListenAddress::Tcp(addr) | ListenAddress::Udp(addr) => {
                    let stream = matches!(spec.address, ListenAddress::Tcp(_));
                    match balance {
                        Balance::Shared | Balance::RoundRobin => {
                            let sock = bind_ip(addr, stream, false, spec)?;
                            let resolved = with_port(spec, local_port(&sock));
                            (resolved, SpecSockets::Shared(sock.into()))
                        }
                        Balance::Reuseport => {
                            // A plain bind first: if anything else holds the
                            // address, even with SO_REUSEPORT, fail loudly
                            // rather than silently share its traffic.
                            let probe = bind_ip(addr, stream, false, spec)?;
                            let port = local_port(&probe);
                            drop(probe);
                            let resolved = with_port(spec, port);
                            let addr = TcpAddress { port, ..*addr };
                            let per_slot = (0..slots)
                                .map(|_| bind_ip(&addr, stream, true, &resolved).map(OwnedFd::from))
                                .collect::<Result<Vec<_>, _>>()?;
                            (resolved, SpecSockets::PerSlot(per_slot))
                        }
                    }
                }
            };
            out.primary_accepts.push(
                balance == Balance::RoundRobin && matches!(spec.address, ListenAddress::Tcp(_)),
            );
            out.specs.push(resolved);
            out.sockets.push(sockets);
            out.passed.push(false);
        }
        if let Some(s) = inherited.first() {
            // Not a socket herd can use at all: say that, as it is.
            let what = inherited_spec(s)?.to_string();
            let named = if s.name == "unknown" {
                String::new()
            } else {
                format!(" named {:?} (-l {}=ADDRESS matches it too)", s.name, s.name)
            };
            return Err(BindError::Activation(format!(
                "systemd passed a socket no -l names: {what}{named}; add -l {what}, or remove it \
                 from the .socket unit"
            )));
        }
        Ok(out)
    }

    /// The specs as bound (port 0 replaced by the port the kernel chose).
    pub fn specs(&self) -> &[ListenSpec] {
        &self.specs
    }

    /// The descriptors slot `slot` hands its worker, in spec order.
    pub fn fds_for_slot(&self, slot: usize) -> Vec<RawFd> {
        self.sockets_for_slot(slot)
            .into_iter()
            .map(|(_, fd)| fd.as_raw_fd())
            .collect()
    }

    /// The sockets slot `slot` hands its worker, with their names, in spec
    /// order (sockets the primary accepts on itself are not handed out).
    pub fn sockets_for_slot(&self, slot: usize) -> Vec<(&str, BorrowedFd<'_>)> {
        self.specs
            .iter()
            .zip(&self.sockets)
            .zip(&self.primary_accepts)
            .filter(|(_, primary)| !**primary)
            .map(|((spec, s), _)| {
                let fd = match s {
                    SpecSockets::Shared(fd) => fd.as_fd(),
                    SpecSockets::PerSlot(fds) => fds[slot % fds.len()].as_fd(),
                };
                (spec.name.as_str(), fd)
            })
            .collect()
    }

    /// The sockets the primary accepts on itself (round-robin), with their
    /// index among the specs.
    pub fn primary_sockets(&self) -> Vec<(usize, &ListenSpec, BorrowedFd<'_>)> {
        self.specs
            .iter()
            .zip(&self.sockets)
            .zip(&self.primary_accepts)
            .enumerate()
            .filter(|(_, (_, primary))| **primary)
            .filter_map(|(i, ((spec, s), _))| match s {
                SpecSockets::Shared(fd) => Some((i, spec, fd.as_fd())),
                SpecSockets::PerSlot(_) => None,
            })
            .collect()
    }

    /// Spec `index`'s `SO_REUSEPORT` group, by its first socket (reuseport
    /// balance; `None` for a shared socket), and how many sockets it has.
    pub(crate) fn reuseport_group(&self, index: usize) -> Option<(BorrowedFd<'_>, usize)> {
        match &self.sockets[index] {
            SpecSockets::PerSlot(fds) => fds.first().map(|fd| (fd.as_fd(), fds.len())),
            SpecSockets::Shared(_) => None,
        }
    }

    /// Connections waiting to be accepted on spec `index`, summed over its
    /// sockets; `None` where the kernel does not say (Unix, UDP sockets).
    pub fn queued(&self, index: usize) -> Option<u64> {
        if !matches!(self.specs.get(index)?.address, ListenAddress::Tcp(_)) {
            return None;
        }
        match &self.sockets[index] {
            SpecSockets::Shared(fd) => crate::sys::accept_queue_len(fd.as_fd()).map(u64::from),
            SpecSockets::PerSlot(fds) => fds
                .iter()
                .map(|fd| crate::sys::accept_queue_len(fd.as_fd()).map(u64::from))
                .sum(),
        }
    }

    /// Whether spec `index`'s socket was passed by systemd rather than bound.
    pub fn passed(&self, index: usize) -> bool {
        self.passed.get(index).copied().unwrap_or(false)
    }

    /// Whether the primary accepts on spec `index` itself (round-robin).
    pub fn primary_accepts(&self, index: usize) -> bool {
        self.primary_accepts.get(index).copied().unwrap_or(false)
    }

    /// Spec `index`'s socket for slot `slot` (every slot's, when shared).
    pub fn socket(&self, index: usize, slot: usize) -> BorrowedFd<'_> {
        match &self.sockets[index] {
            SpecSockets::Shared(fd) => fd.as_fd(),
            SpecSockets::PerSlot(fds) => fds[slot % fds.len()].as_fd(),
        }
    }

    /// `LISTEN_FDNAMES`: the names of the sockets handed to workers, joined by `:`.
    pub fn fd_names(&self) -> String {
        self.sockets_for_slot(0)
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(":")
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        // The socket files are ours: leave no stale file behind.
        for path in &self.unix_paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether systemd's socket `s` is the one `spec` asks for: its
/// `FileDescriptorName=` is the spec's `NAME=`, or it has the spec's address.
fn activation_matches(s: &crate::activation::InheritedSocket, spec: &ListenSpec) -> bool {
    if s.name != "unknown" && s.name == spec.name && spec.name != spec.address.kind() {
        return true;
    }
    match inherited_spec(s) {
        Ok(found) => match (&found.address, &spec.address) {
            (ListenAddress::Tcp(a), ListenAddress::Tcp(b))
            | (ListenAddress::Udp(a), ListenAddress::Udp(b)) => {
                a.port == b.port && (a.socket_addr().ip() == b.socket_addr().ip())
            }
            (ListenAddress::Unix(a), ListenAddress::Unix(b)) => a == b,
            _ => false,
        },
        Err(_) => false,
    }
}

/// What an inherited socket is, as a listen spec named by its fd name.
fn inherited_spec(s: &crate::activation::InheritedSocket) -> Result<ListenSpec, BindError> {
    use crate::activation::SocketKind;
    let sock = socket2::SockRef::from(&s.fd);
    let bad = |why: String| BindError::Activation(format!("fd {:?}: {why}", s.name));
    let addr = sock.local_addr().map_err(|e| bad(e.to_string()))?;
    let address = match s.kind() {
        SocketKind::TcpListener | SocketKind::Udp => {
            let sa = addr.as_socket().ok_or_else(|| bad("no address".into()))?;
            let host = (!sa.ip().is_unspecified()).then_some(sa.ip());
            let a = TcpAddress {
                host,
                port: sa.port(),
                scope_id: 0,
            };
            if s.kind() == SocketKind::Udp {
                ListenAddress::Udp(a)
            } else {
                ListenAddress::Tcp(a)
            }
        }
        SocketKind::UnixListener => ListenAddress::Unix(
            addr.as_pathname()
                .ok_or_else(|| bad("a Unix socket without a path".into()))?
                .to_path_buf(),
        ),
        SocketKind::Other => return Err(bad("not a listening socket herd can hand out".into())),
    };
    let name = if s.name == "unknown" {
        address.kind().to_string()
    } else {
        s.name.clone()
    };
    Ok(ListenSpec { name, address })
}

fn with_port(spec: &ListenSpec, port: u16) -> ListenSpec {
    let mut spec = spec.clone();
    match &mut spec.address {
        ListenAddress::Tcp(a) | ListenAddress::Udp(a) => a.port = port,
        ListenAddress::Unix(_) => {}
    }
    spec
}

fn local_port(sock: &Socket) -> u16 {
    sock.local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn bind_ip(
    addr: &TcpAddress,
    stream: bool,
    reuseport: bool,
    spec: &ListenSpec,
) -> Result<Socket, BindError> {
    match bind_ip_at(addr.socket_addr(), addr.host.is_none(), stream, reuseport) {
        // "All interfaces" on a host without IPv6: fall back to IPv4.
        Err(e) if addr.host.is_none() && is_no_ipv6(&e) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port));
            bind_ip_at(v4, false, stream, reuseport)
        }
        other => other,
    }
    .map_err(|e| bind_error(&spec.address, e))
}

fn is_no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::EPROTONOSUPPORT)
    )
}

fn bind_ip_at(
    addr: SocketAddr,
    dual_stack: bool,
    stream: bool,
    reuseport: bool,
) -> io::Result<Socket> {
    let (ty, proto) = if stream {
        (Type::STREAM, Protocol::TCP)
    } else {
        (Type::DGRAM, Protocol::UDP)
    };
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        sock.set_only_v6(!dual_stack)?;
    }
    if stream {
        // Restarting herd must not wait out TIME_WAIT of the previous run.
        sock.set_reuse_address(true)?;
    }
    if reuseport {
        sock.set_reuse_port(true)?;
    }
    sock.bind(&addr.into())?;
    if stream {
        sock.listen(BACKLOG)?;
    }
    Ok(sock)
}

fn bind_unix(path: &Path) -> Result<OwnedFd, BindError> {
    let shown = format!("unix:{}", path.display());
    remove_stale_unix_socket(path)?;
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(|e| bind_error(&shown, e))?;
    let addr = SockAddr::unix(path).map_err(|e| bind_error(&shown, e))?;
    sock.bind(&addr).map_err(|e| bind_error(&shown, e))?;
    sock.listen(BACKLOG).map_err(|e| bind_error(&shown, e))?;
    Ok(sock.into())
}

/// Removes a socket file left by a dead server; refuses if a server answers.
fn remove_stale_unix_socket(path: &Path) -> Result<(), BindError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = format!("unix:{}", path.display());
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(bind_error(&shown, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket(path.to_path_buf()));
    }
    // A non-blocking connect: a live server whose backlog is full (it
    // listens but never accepts) answers EAGAIN at once, where a blocking
    // connect would wait for it forever, with the supervisor.
    let probe = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)
        .map_err(|e| bind_error(&shown, e))?;
    let addr = SockAddr::unix(path).map_err(|e| bind_error(&shown, e))?;
    match probe.connect(&addr) {
        Ok(()) => Err(BindError::InUse(shown)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(BindError::InUse(shown)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| bind_error(&shown, e))
        }
        Err(e) => Err(bind_error(&shown, e)),
    }
}
