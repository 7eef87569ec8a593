//! A blocking client of the control socket (what the `herd` command uses).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{Command, Request, Response, VERSION};
use super::{place, ControlError};

/// The longest answer line read (a status of 1,024 workers is ~300 KiB).
const MAX_ANSWER: u64 = 16 << 20;

/// A connection to one cluster's control socket.
#[derive(Debug)]
pub struct Client {
    name: String,
    path: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the cluster named `name` in `dir`. `timeout` bounds
    /// each read and write (`None`: wait as long as it takes, for a reload
    /// or a log follower).
    pub fn connect(
        dir: &Path,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<Client, ControlError> {
        place::check_name(name)?;
        let path = dir.join(format!("{name}.sock"));
        let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ControlError::NotRunning(name.to_string(), running_hint(dir))
            }
            _ => ControlError::Io(path.clone(), e),
        })?;
        let io = |e| ControlError::Io(path.clone(), e);
        stream.set_read_timeout(timeout).map_err(io)?;
        stream.set_write_timeout(timeout).map_err(io)?;
        Ok(Client {
            name: name.to_string(),
            path,
            reader: BufReader::new(stream),
        })
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends a request and reads the first answer line.
    pub fn request(&mut self, command: Command) -> Result<Response, ControlError> {
        if let Err(e) = self.send(command) {
            // A refused client (busy, another user) is answered and closed
            // at once: the send may fail, the answer is still there.
            return self.read().map_err(|_| e);
        }
        self.read()
    }

    /// Sends a request without reading (then [`Client::read`] each line).
    pub fn send(&mut self, command: Command) -> Result<(), ControlError> {
        let mut line = serde_json::to_string(&Request::new(command))
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        line.push('\n');
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| ControlError::Io(self.path.clone(), e))
    }

    /// Reads the next answer line.
    pub fn read(&mut self) -> Result<Response, ControlError> {
        let mut line = Vec::new();
        let n = Read::by_ref(&mut self.reader)
            .take(MAX_ANSWER)
            .read_until(b'\n', &mut line)
            .map_err(|e| ControlError::Io(self.path.clone(), e))?;
        if n == 0 {
            return Err(ControlError::Protocol(
                "the cluster closed the connection (it is stopping?)".into(),
            ));
        }
        let response: Response =
            serde_json::from_slice(&line).map_err(|e| ControlError::Protocol(format!("{e}")))?;
        if response.v != VERSION {
            return Err(ControlError::Protocol(format!(
                "it speaks protocol version {}, this herd {VERSION}",
                response.v
            )));
        }
        Ok(response)
    }
}

/// The names of running clusters in `dir`, for an error message (a socket
/// file that refuses is a dead herd's).
fn running_hint(dir: &Path) -> String {
    let names = place::running(dir);
    if names.is_empty() {
        format!(" (none is running under {})", dir.display())
    } else {
        format!(" (running: {})", names.join(", "))
    }
}
