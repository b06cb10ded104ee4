//! Zero-downtime binary upgrade: a running proxy hands its listening sockets to its successor
//! over a unix socket, then stops accepting and drains.
//!
//! This is pingora's listener hand-over (the sockets travel as `SCM_RIGHTS` messages, so the
//! kernel's accept queues are never closed and no client sees a refused connection), turned
//! around so that the old process never stops before the new one serves:
//!
//! 1. The running proxy listens on `upgrade_socket_path`.
//! 2. `lain proxy --upgrade` connects to it and says hello.
//! 3. The old process answers with the names of its listeners (`http`, `https`, `admin`,
//!    `stream:PORT`) and their file descriptors in one message.
//! 4. The new process serves on those sockets, takes over the upgrade socket path and says
//!    `ready`.
//! 5. Only then does the old process stop accepting and drain, as on SIGTERM. When the new
//!    process fails before `ready`, the old one goes on serving as if nothing had happened.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lain_common::Shutdown;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

/// The first line a successor sends.
const HELLO: &str = "lain-proxy-upgrade 1";
/// The line a successor sends once it serves on the handed-over sockets.
const READY: &str = "ready";
/// The most listeners one hand-over carries: the three fixed ones and the stream ports.
const MAX_FDS: usize = 512;
/// The most bytes of listener names one hand-over carries.
const MAX_NAMES_BYTES: usize = 64 * 1024;
/// How long a successor may take between its hello and `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// No running proxy answered at the upgrade socket.
    #[error("no running proxy at {path}: {source}")]
    Connect {
        /// The upgrade socket.
        path: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// The exchange broke off or did not follow the protocol.
    #[error("listener hand-over over {path} failed: {reason}")]
    Protocol {
        /// The upgrade socket.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// The listeners this process serves on, by name, as duplicates kept for a successor.
///
/// Registered when a listener is bound, removed when it closes; read only by a hand-over,
/// never on the request path.
#[derive(Debug, Clone, Default)]
pub struct Listeners {
    fds: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
}

impl Listeners {
    /// Keeps a duplicate of `listener`'s socket under `name`.
    pub fn register(&self, name: &str, listener: &impl AsFd) {
        match listener.as_fd().try_clone_to_owned() {
            Ok(fd) => {
                if let Ok(mut fds) = self.fds.lock() {
                    fds.insert(name.to_string(), fd);
                }
            }
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "cannot keep a listener for upgrades")
            }
        }
    }

    /// Forgets the listener `name` (it was closed).
    pub fn unregister(&self, name: &str) {
        if let Ok(mut fds) = self.fds.lock() {
            fds.remove(name);
        }
    }

    fn snapshot(&self) -> Vec<(String, OwnedFd)> {
        let Ok(fds) = self.fds.lock() else {
            return Vec::new();
        };
        fds.iter()
            .filter_map(|(name, fd)| Some((name.clone(), fd.try_clone().ok()?)))
            .collect()
    }
}

/// Sockets received from the predecessor, taken by name as the proxy binds its listeners.
#[derive(Debug, Default)]
pub struct Inherited {
    fds: Mutex<BTreeMap<String, OwnedFd>>,
}

impl Inherited {
    /// The inherited TCP listener `name`, when there is one whose address is `want` (port 0
    /// accepts any port on the same IP). A listener whose address no longer matches the
    /// configuration is closed, and the caller binds afresh.
    pub fn take_tcp(
        &self,
        name: &str,
        want: std::net::SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let fd = self.fds.lock().ok()?.remove(name)?;
        let listener = std::net::TcpListener::from(fd);
        let local = listener.local_addr().ok()?;
        let matches = local == want || (want.port() == 0 && local.ip() == want.ip());
        if !matches {
            tracing::info!(listener = name, inherited = %local, configured = %want, "inherited listener not reused: its address changed");
            return None;
        }
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    /// Closes the sockets not taken yet whose names satisfy `pred`.
    pub fn close_where(&self, pred: impl Fn(&str) -> bool) {
        if let Ok(mut fds) = self.fds.lock() {
            fds.retain(|name, _| !pred(name));
        }
    }

    /// Names of the sockets not taken yet.
    pub fn remaining(&self) -> Vec<String> {
        self.fds
            .lock()
            .map(|f| f.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Closes every socket not taken.
    pub fn close_rest(&self) {
        if let Ok(mut fds) = self.fds.lock() {
            fds.clear();
        }
    }
}

/// Where a listener comes from: inherited from a predecessor when it handed one over under
/// the same name and address, bound afresh otherwise; either way kept for a successor.
#[derive(Debug, Clone, Default)]
pub struct Sockets {
    /// The listeners this process serves on.
    pub listeners: Listeners,
    /// What a predecessor handed over, when this process is an upgrade.
    pub inherited: Option<Arc<Inherited>>,
}

impl Sockets {
    /// The listener `name` at `addr`.
    pub async fn bind(
        &self,
        name: &str,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<tokio::net::TcpListener> {
        let inherited = self.inherited.as_ref().and_then(|i| i.take_tcp(name, addr));
        let listener = match inherited {
            Some(l) => tokio::net::TcpListener::from_std(l)?,
            None => tokio::net::TcpListener::bind(addr).await?,
        };
        self.listeners.register(name, &listener);
        Ok(listener)
    }
}

/// The successor's side of a hand-over: what it received, and the line back to the
/// predecessor that says it serves.
#[derive(Debug)]
pub struct Handover {
    /// The predecessor's sockets.
    pub inherited: Arc<Inherited>,
    stream: UnixStream,
    path: PathBuf,
}

impl Handover {
    /// Tells the predecessor to stop accepting and drain.
    pub fn ready(mut self) -> Result<(), UpgradeError> {
        self.stream
            .write_all(format!("{READY}\n").as_bytes())
            .map_err(|e| protocol(&self.path, format!("sending ready: {e}")))
    }
}

fn protocol(path: &Path, reason: String) -> UpgradeError {
    UpgradeError::Protocol {
        path: path.to_path_buf(),
        reason,
    }
}

/// Asks the proxy running at `path` for its listeners (blocking; call before serving).
pub fn receive(path: &Path) -> Result<Handover, UpgradeError> {
    let mut stream = UnixStream::connect(path).map_err(|source| UpgradeError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    stream
        .write_all(format!("{HELLO}\n").as_bytes())
        .map_err(|e| protocol(path, format!("sending hello: {e}")))?;

    let mut names = vec![0u8; MAX_NAMES_BYTES];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut names)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| protocol(path, format!("receiving listeners: {e}")))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if received.bytes == 0 {
        return Err(protocol(
            path,
            "the running proxy closed the connection".into(),
        ));
    }
    let text = std::str::from_utf8(&names[..received.bytes])
        .map_err(|_| protocol(path, "listener names are not UTF-8".into()))?;
    let names: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    if names.len() != fds.len() {
        return Err(protocol(
            path,
            format!("{} listener names but {} sockets", names.len(), fds.len()),
        ));
    }
    let map = names
        .into_iter()
        .map(str::to_string)
        .zip(fds)
        .collect::<BTreeMap<_, _>>();
    tracing::info!(listeners = ?map.keys().collect::<Vec<_>>(), "received listeners from the running proxy");
    let _ = stream.set_read_timeout(None);
    Ok(Handover {
        inherited: Arc::new(Inherited {
            fds: Mutex::new(map),
        }),
        stream,
        path: path.to_path_buf(),
    })
}

/// Binds the upgrade socket at `path`, replacing a predecessor's or a stale one. The old
/// path is unlinked first: a predecessor keeps its own (now nameless) socket until it exits.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Serves hand-overs on `listener` until `shutdown`; a successor's `ready` triggers
/// `shutdown`, which stops this process's accept loops and starts its drain.
pub async fn serve(listener: UnixListener, listeners: Listeners, shutdown: Shutdown) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::warn!(error = %e, "upgrade socket unusable; binary upgrades are off");
        return;
    }
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "upgrade socket unusable; binary upgrades are off");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted.and_then(|(s, _)| s.into_std()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade socket accept failed");
                continue;
            }
        };
        let listeners = listeners.clone();
        let outcome = tokio::task::spawn_blocking(move || hand_over(stream, &listeners)).await;
        match outcome {
            Ok(Ok(())) => {
                tracing::info!("successor serves; draining");
                shutdown.trigger();
                return;
            }
            Ok(Err(reason)) => {
                tracing::warn!(%reason, "binary upgrade abandoned; this process keeps serving");
            }
            Err(e) => tracing::warn!(error = %e, "binary upgrade task failed"),
        }
    }
}

/// One hand-over, blocking: hello in, listeners out, `ready` in.
fn hand_over(stream: UnixStream, listeners: &Listeners) -> Result<(), String> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("reading hello: {e}"))?;
    if line.trim_end() != HELLO {
        return Err(format!("unexpected hello {:?}", line.trim_end()));
    }
    let listeners = listeners.snapshot();
    let names: String = listeners.iter().map(|(n, _)| format!("{n}\n")).collect();
    let fds: Vec<_> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
    if fds.len() > MAX_FDS || names.len() > MAX_NAMES_BYTES {
        return Err(format!(
            "{} listeners are more than one hand-over carries",
            fds.len()
        ));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err("control buffer too small".into());
    }
    let sent = sendmsg(
        &stream,
        &[IoSlice::new(names.as_bytes())],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(|e| format!("sending listeners: {e}"))?;
    if sent != names.len() {
        return Err(format!("sent {sent} of {} bytes of names", names.len()));
    }
    tracing::info!(
        listeners = fds.len(),
        "listeners handed to a successor; waiting for it to serve"
    );
    stream
        .set_read_timeout(Some(READY_TIMEOUT))
        .map_err(|e| e.to_string())?;
    line.clear();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("waiting for ready: {e}"))?;
    if line.trim_end() == READY {
        Ok(())
    } else if line.is_empty() {
        Err("the successor exited before serving".into())
    } else {
        Err(format!("unexpected message {:?}", line.trim_end()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole exchange between two threads of one process: the sockets arrive under
    /// their names, accept connections made to the original, and `ready` completes it.
    #[test]
    fn listeners_travel_by_name_and_ready_completes_the_hand_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upgrade.sock");
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listeners = Listeners::default();
        listeners.register("http", &http);
        listeners.register("admin", &admin);
        listeners.register("stream:9500", &admin);
        listeners.unregister("stream:9500");
        let server = bind(&path).unwrap();
        let old = std::thread::spawn({
            let listeners = listeners.clone();
            move || {
                let (stream, _) = server.accept().unwrap();
                hand_over(stream, &listeners)
            }
        });
        let handover = receive(&path).unwrap();
        assert_eq!(handover.inherited.remaining(), vec!["admin", "http"]);
        let got = handover
            .inherited
            .take_tcp("http", "127.0.0.1:0".parse().unwrap())
            .expect("http inherited");
        assert_eq!(got.local_addr().unwrap(), http.local_addr().unwrap());
        // A connection to the original address is accepted through the inherited socket.
        let _client = std::net::TcpStream::connect(http.local_addr().unwrap()).unwrap();
        got.set_nonblocking(false).unwrap();
        got.accept().unwrap();
        // A configured address that no longer matches is not reused.
        assert!(
            handover
                .inherited
                .take_tcp("admin", "127.0.0.2:1".parse().unwrap())
                .is_none()
        );
        handover.ready().unwrap();
        assert_eq!(old.join().unwrap(), Ok(()));
    }

    /// A successor that goes away before `ready` leaves the old process serving.
    #[test]
    fn a_successor_that_dies_before_ready_abandons_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upgrade.sock");
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listeners = Listeners::default();
        listeners.register("http", &http);
        let server = bind(&path).unwrap();
        let old = std::thread::spawn(move || {
            let (stream, _) = server.accept().unwrap();
            hand_over(stream, &listeners)
        });
        drop(receive(&path).unwrap());
        let err = old.join().unwrap().unwrap_err();
        assert!(err.contains("exited before serving"), "{err}");
    }

    /// A peer that speaks something else gets nothing.
    #[test]
    fn a_wrong_hello_gets_no_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upgrade.sock");
        let server = bind(&path).unwrap();
        let old = std::thread::spawn(move || {
            let (stream, _) = server.accept().unwrap();
            hand_over(stream, &Listeners::default())
        });
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let err = old.join().unwrap().unwrap_err();
        assert!(err.contains("unexpected hello"), "{err}");
    }

    /// Nobody listening: a located error naming the path.
    #[test]
    fn no_running_proxy_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let err = receive(&path).unwrap_err().to_string();
        assert!(err.contains("absent.sock"), "{err}");
    }
}
