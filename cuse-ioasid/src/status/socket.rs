//! The status socket: the daemon answers each connection with one JSON
//! [`Status`](super::Status); `cuse-ioasid status` is the client.
//!
//! The socket is root's, mode 0600, or with `--node-group` the group's,
//! mode 0660: the kernel checks the file's permissions at `connect`. One
//! thread answers one connection at a time; a client that does not read
//! its answer holds it for at most [`IO_TIMEOUT`].

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::unistd::Gid;

use super::Sources;

/// Where the daemon listens unless told otherwise (`--status-socket`).
pub const DEFAULT_SOCKET: &str = "/run/cuse-ioasid/status.sock";

/// How long a connection may take to send its request or read its answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The one request there is.
pub const REQUEST: &str = "status\n";

/// The daemon's listening socket; its file is removed when dropped.
pub struct StatusSocket {
    /// Until [`StatusSocket::serve`] hands it to its thread.
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl StatusSocket {
    /// Listen on `path`, owned by `group` with mode 0660, or root-only
    /// (0600). A stale socket file (no daemon answers) is replaced; a live
    /// one is an error.
    pub fn bind(path: &Path, group: Option<Gid>) -> Result<StatusSocket> {
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("chmod 755 {}", dir.display()))?;
            }
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "another cuse-ioasid answers status requests on {}: stop it, or give \
                     this daemon another --status-socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        let socket = StatusSocket {
            listener: Some(listener),
            path: path.to_path_buf(),
        };
        let mode = if let Some(gid) = group {
            nix::unistd::chown(path, None, Some(gid)).with_context(|| {
                format!(
                    "chown :{gid} {} (changing its group needs CAP_CHOWN)",
                    path.display()
                )
            })?;
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
        Ok(socket)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answer status requests on a thread of its own, for the daemon's
    /// life (the socket file stays until `self` is dropped).
    pub fn serve(&mut self, sources: Arc<Sources>) -> Result<()> {
        let Some(listener) = self.listener.take() else {
            bail!("{} is served already", self.path.display());
        };
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("status".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            if let Err(e) = answer(stream, &sources) {
                                tracing::debug!("a status request failed: {e}");
                            }
                        }
                        Err(e) => tracing::warn!(
                            "accepting a status request on {} failed: {e}",
                            path.display()
                        ),
                    }
                }
            })
            .context("starting the status thread")?;
        Ok(())
    }
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(mut stream: UnixStream, sources: &Sources) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = [0u8; 64];
    let mut got = 0;
    while got < request.len() && !request[..got].contains(&b'\n') {
        match stream.read(&mut request[got..])? {
            0 => break,
            n => got += n,
        }
    }
    let body = if &request[..got] == REQUEST.as_bytes() {
        serde_json::to_string(&sources.status()).map_err(std::io::Error::other)?
    } else {
        serde_json::json!({ "error": format!("unknown request {:?}; send {REQUEST:?}", String::from_utf8_lossy(&request[..got])) })
            .to_string()
    };
    stream.write_all(body.as_bytes())?;
    stream.write_all(b"\n")
}

/// Ask the daemon listening on `path`; returns its JSON answer.
pub fn request(path: &Path) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::PermissionDenied => anyhow::anyhow!(
            "{}: permission denied: the status socket is root's, or with --node-group \
             that group's (run as root or as a member)",
            path.display()
        ),
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no cuse-ioasid daemon answers on {} ({e}): is it running, with this \
             --status-socket?",
            path.display()
        ),
        _ => anyhow::anyhow!("connecting to {}: {e}", path.display()),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(REQUEST.as_bytes())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the answer on {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&answer)
        .with_context(|| format!("the daemon's answer is not JSON: {answer:?}"))?;
    if let Some(e) = value.get("error") {
        bail!("the daemon refused the request: {e}");
    }
    Ok(value)
}
