//! Listen specs: what address a cluster serves on, as the user wrote it.
//!
//! Grammar (one spec per `-l`):
//!
//! ```text
//! [NAME=]HOST:PORT        TCP, IPv4 or a host name resolved once at start
//! [NAME=][V6]:PORT        TCP, IPv6
//! [NAME=]:PORT            TCP on all interfaces (dual-stack where IPv6 exists)
//! [NAME=]unix:PATH        Unix stream socket
//! [NAME=]udp:HOST:PORT    UDP (also udp:[V6]:PORT and udp::PORT)
//! ```
//!
//! `NAME` becomes the socket's entry in `LISTEN_FDNAMES`; without it the name is
//! the spec's own kind (`tcp`, `unix`, `udp`), as systemd names unnamed sockets.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

/// The longest path a Unix socket address can hold (`sun_path` minus its NUL).
pub const UNIX_PATH_MAX: usize = 107;

/// Where and how to listen: a parsed `-l` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// The name exported in `LISTEN_FDNAMES`.
    pub name: String,
    /// The address family and address.
    pub address: ListenAddress,
}

/// The address part of a [`ListenSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// A TCP stream socket.
    Tcp(TcpAddress),
    /// A UDP datagram socket.
    Udp(TcpAddress),
    /// A Unix stream socket at a filesystem path.
    Unix(PathBuf),
}

/// An IP address and port; `host: None` means every interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpAddress {
    /// The address to bind, or `None` for all interfaces.
    pub host: Option<IpAddr>,
    /// The port; 0 asks the kernel for a free one (then shared by every slot).
    pub port: u16,
    /// For a link-local IPv6 host: the interface index it is scoped to
    /// (`[fe80::1%eth0]:P`, `%2`); 0 for none.
    pub scope_id: u32,
}

impl TcpAddress {
    /// The concrete socket address to bind: `[::]` for "all interfaces".
    pub fn socket_addr(&self) -> SocketAddr {
        match self.host {
            Some(IpAddr::V6(ip)) if self.scope_id != 0 => {
                SocketAddr::V6(std::net::SocketAddrV6::new(ip, self.port, 0, self.scope_id))
            }
            host => SocketAddr::new(host.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), self.port),
        }
    }
}

/// Why a listen spec was rejected. The message names the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenSpecError {
    /// The spec was empty or had an empty part.
    #[error("empty listen spec {0:?}")]
    Empty(String),
    /// No `:PORT` where one was required.
    #[error(
        "listen spec {0:?} has no port (expected HOST:PORT, :PORT, unix:PATH or udp:HOST:PORT)"
    )]
    MissingPort(String),
    /// Only a port, with no host: `-l 8000`.
    #[error(
        "listen spec {0:?} has a port but no host: use :{0} (every interface) or \
         127.0.0.1:{0} (this machine only)"
    )]
    PortOnly(String),
    /// The port was not a number in 0..=65535.
    #[error("listen spec {spec:?}: {port:?} is not a port number (0-65535)")]
    BadPort {
        /// The whole spec.
        spec: String,
        /// The port text.
        port: String,
    },
    /// The host did not parse or resolve.
    #[error("listen spec {spec:?}: cannot resolve host {host:?}")]
    BadHost {
        /// The whole spec.
        spec: String,
        /// The host text.
        host: String,
    },
    /// A link-local IPv6 address with no interface to scope it to.
    #[error(
        "listen spec {spec:?}: {host} is link-local and needs a scope, the interface it is on, \
         e.g. [{host}%eth0]:{port}"
    )]
    NeedsScope {
        /// The whole spec.
        spec: String,
        /// The address text.
        host: String,
        /// The port text.
        port: u16,
    },
    /// A `%scope` that names no interface.
    #[error("listen spec {spec:?}: no network interface {scope:?}")]
    BadScope {
        /// The whole spec.
        spec: String,
        /// The scope text.
        scope: String,
    },
    /// A Unix socket path longer than `sun_path` allows.
    #[error("listen spec {spec:?}: unix socket path is {len} bytes, the limit is {UNIX_PATH_MAX}")]
    UnixPathTooLong {
        /// The whole spec.
        spec: String,
        /// The path length in bytes.
        len: usize,
    },
    /// A name that cannot travel in `LISTEN_FDNAMES`.
    #[error(
        "listen spec {0:?}: a name may hold only letters, digits, '.', '_' and '-' (at most 255)"
    )]
    BadName(String),
}

impl FromStr for ListenSpec {
    type Err = ListenSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        if spec.trim().is_empty() {
            return Err(ListenSpecError::Empty(spec.into()));
        }
        let (name, rest) = split_name(spec)?;
        let address = if let Some(path) = rest.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ListenSpecError::Empty(spec.into()));
            }
            if path.len() > UNIX_PATH_MAX {
                return Err(ListenSpecError::UnixPathTooLong {
                    spec: spec.into(),
                    len: path.len(),
                });
            }
            ListenAddress::Unix(PathBuf::from(path))
        } else if let Some(addr) = rest.strip_prefix("udp:") {
            ListenAddress::Udp(parse_host_port(spec, addr)?)
        } else {
            ListenAddress::Tcp(parse_host_port(spec, rest)?)
        };
        let name = name.unwrap_or_else(|| address.kind().to_string());
        Ok(ListenSpec { name, address })
    }
}

/// Splits an optional `NAME=` prefix. A `=` inside a unix path is not a name.
fn split_name(spec: &str) -> Result<(Option<String>, &str), ListenSpecError> {
    let Some((name, rest)) = spec.split_once('=') else {
        return Ok((None, spec));
    };
    if name.starts_with("unix:") || name.starts_with("udp:") || name.contains(':') {
        return Ok((None, spec));
    }
    let valid = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(ListenSpecError::BadName(spec.into()));
    }
    Ok((Some(name.to_string()), rest))
}

fn parse_host_port(spec: &str, text: &str) -> Result<TcpAddress, ListenSpecError> {
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| ListenSpecError::MissingPort(spec.into()))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| ListenSpecError::MissingPort(spec.into()))?;
        (host, port)
    } else {
        text.rsplit_once(':').ok_or_else(|| {
            if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                ListenSpecError::PortOnly(text.into())
            } else {
                ListenSpecError::MissingPort(spec.into())
            }
        })?
    };
    if port.is_empty() {
        return Err(ListenSpecError::MissingPort(spec.into()));
    }
    let port: u16 = port.parse().map_err(|_| ListenSpecError::BadPort {
        spec: spec.into(),
        port: port.into(),
    })?;
    if host.is_empty() {
        return Ok(TcpAddress {
            host: None,
            port,
            scope_id: 0,
        });
    }
    let bad_host = || ListenSpecError::BadHost {
        spec: spec.into(),
        host: host.into(),
    };
    // `fe80::1%eth0`, `fe80::1%2`: an IPv6 address scoped to an interface.
    let (ip_text, scope) = match host.split_once('%') {
        Some((ip, scope)) => (ip, Some(scope)),
        None => (host, None),
    };
    if let Ok(ip) = ip_text.parse::<IpAddr>() {
        let link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        let scope_id = match scope {
            None if link_local => {
                return Err(ListenSpecError::NeedsScope {
                    spec: spec.into(),
                    host: ip_text.into(),
                    port,
                })
            }
            None => 0,
            Some(_) if !ip.is_ipv6() => return Err(bad_host()),
            Some(scope) => interface_index(scope).ok_or_else(|| ListenSpecError::BadScope {
                spec: spec.into(),
                scope: scope.into(),
            })?,
        };
        return Ok(TcpAddress {
            host: Some(ip),
            port,
            scope_id,
        });
    }
    if host.contains(':') || host.contains('[') || host.contains(']') {
        return Err(bad_host());
    }
    // A host name: resolve once, now, preferring IPv4 as most servers do.
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|_| bad_host())?
        .collect();
    let pick = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .ok_or_else(bad_host)?;
    Ok(TcpAddress {
        host: Some(pick.ip()),
        port,
        scope_id: 0,
    })
}

/// An interface's index: `2`, or a name looked up in sysfs (`eth0`).
fn interface_index(scope: &str) -> Option<u32> {
    if let Ok(n) = scope.parse::<u32>() {
        return (n != 0).then_some(n);
    }
    if scope.is_empty() || scope.contains('/') || scope.starts_with('.') {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{scope}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl ListenAddress {
    /// `tcp`, `udp` or `unix`: the default name in `LISTEN_FDNAMES`.
    pub fn kind(&self) -> &'static str {
        match self {
            ListenAddress::Tcp(_) => "tcp",
            ListenAddress::Udp(_) => "udp",
            ListenAddress::Unix(_) => "unix",
        }
    }
}

impl fmt::Display for TcpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host {
            None => write!(f, ":{}", self.port),
            Some(IpAddr::V6(ip)) if self.scope_id != 0 => {
                write!(f, "[{ip}%{}]:{}", self.scope_id, self.port)
            }
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
        }
    }
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddress::Tcp(a) => write!(f, "{a}"),
            ListenAddress::Udp(a) => write!(f, "udp:{a}"),
            ListenAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name == self.address.kind() {
            write!(f, "{}", self.address)
        } else {
            write!(f, "{}={}", self.name, self.address)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn tcp(host: Option<IpAddr>, port: u16) -> ListenAddress {
        ListenAddress::Tcp(TcpAddress {
            host,
            port,
            scope_id: 0,
        })
    }

    #[test]
    fn link_local_needs_a_scope() {
        let e = "[fe80::1]:8000"
            .parse::<ListenSpec>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("fe80::1 is link-local and needs a scope"), "{e}");
        assert!(e.contains("[fe80::1%eth0]:8000"), "{e}");
        let lo: ListenSpec = "[fe80::1%1]:8000".parse().unwrap();
        let ListenAddress::Tcp(a) = &lo.address else {
            panic!("{lo:?}")
        };
        assert_eq!(a.scope_id, 1);
        assert_eq!(lo.to_string(), "[fe80::1%1]:8000");
        assert_eq!(lo.to_string().parse::<ListenSpec>().unwrap(), lo);
        if std::path::Path::new("/sys/class/net/lo/ifindex").exists() {
            let by_name: ListenSpec = "[fe80::1%lo]:8000".parse().unwrap();
            assert_eq!(by_name, lo);
        }
        let e = "[fe80::1%nosuchif0]:1".parse::<ListenSpec>().unwrap_err();
        assert!(e.to_string().contains("no network interface"), "{e}");
        assert!("127.0.0.1%1:80".parse::<ListenSpec>().is_err());
    }

    #[test]
    fn parses_every_form() {
        let v4 = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let cases = [
            ("127.0.0.1:8000", "tcp", tcp(v4, 8000)),
            (":80", "tcp", tcp(None, 80)),
            ("[::1]:9", "tcp", tcp(Some("::1".parse().unwrap()), 9)),
            (
                "web=0.0.0.0:1",
                "web",
                tcp(Some("0.0.0.0".parse().unwrap()), 1),
            ),
            (
                "unix:/tmp/a=b.sock",
                "unix",
                ListenAddress::Unix("/tmp/a=b.sock".into()),
            ),
            (
                "api=unix:/tmp/x",
                "api",
                ListenAddress::Unix("/tmp/x".into()),
            ),
            (
                "udp:127.0.0.1:53",
                "udp",
                ListenAddress::Udp(TcpAddress {
                    host: v4,
                    port: 53,
                    scope_id: 0,
                }),
            ),
            (
                "udp::53",
                "udp",
                ListenAddress::Udp(TcpAddress {
                    host: None,
                    port: 53,
                    scope_id: 0,
                }),
            ),
            ("localhost:8000", "tcp", tcp(v4, 8000)),
        ];
        for (text, name, address) in cases {
            let spec: ListenSpec = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(spec.name, name, "{text}");
            assert_eq!(spec.address, address, "{text}");
        }
    }

    #[test]
    fn rejects_bad_specs_with_the_text_in_the_message() {
        let long = format!("unix:/{}", "a".repeat(200));
        let cases = [
            "",
            "8000",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "127.0.0.1:http",
            "[::1:80",
            "[::1]80",
            "no such host!:80",
            "bad name=:80",
            "unix:",
            long.as_str(),
        ];
        for text in cases {
            let err = text.parse::<ListenSpec>().expect_err(text).to_string();
            if !text.is_empty() {
                assert!(
                    err.contains(&text[..text.len().min(20)]),
                    "{text:?} -> {err}"
                );
            }
        }
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "127.0.0.1:8000",
            ":80",
            "[::1]:9",
            "web=0.0.0.0:1",
            "unix:/tmp/x",
            "udp:127.0.0.1:53",
        ] {
            let spec: ListenSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
            assert_eq!(spec.to_string().parse::<ListenSpec>().unwrap(), spec);
        }
    }
}
