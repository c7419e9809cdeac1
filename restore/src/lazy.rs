//! The lazy-pages daemon a `--lazy-pages` restore needs, started when nobody else did.
//!
//! With `--lazy-pages` CRIU restores the processes without their anonymous memory and has it
//! served on demand by `criu lazy-pages`, which listens on `lazy-pages.socket` in CRIU's work
//! directory. runc leaves starting that daemon to its caller and fails obscurely when it is
//! missing (criu#2808). Here, a daemon already listening is used as it is; otherwise
//! [`LazyDaemon::start`] starts one for the images (reading the pages from them, or fetching
//! them from a remote page server with `--page-server`), waits for its socket, and hands it
//! back. The daemon exits by itself once every page has been delivered; a restore that fails
//! stops it at once ([`LazyDaemon::stop`]).
//!
//! A daemon that dies while CRIU restores leaves CRIU waiting for tasks that wait for pages
//! nobody serves any more: CRIU 4.1.1 then never answers. So while the restore runs, the
//! daemon is watched ([`LazyDaemon::guard`]), and its failure kills CRIU, which ends the
//! restore with CRIU's log instead of a hang.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use thiserror::Error;

/// How long the daemon may take to open its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// The daemon's log file, in the work directory.
pub const LOG_FILE: &str = "lazy-pages.log";

/// The socket CRIU connects to, in the work directory.
const SOCKET: &str = "lazy-pages.socket";

/// Why the lazy-pages daemon could not be started.
#[derive(Debug, Error)]
pub enum LazyError {
    /// `--page-server` is not `HOST:PORT`.
    #[error("invalid --page-server {0:?}: expected HOST:PORT, for example 192.0.2.1:27000")]
    BadPageServer(String),
    /// The daemon could not be run.
    #[error("cannot run {criu} lazy-pages")]
    Spawn {
        /// The CRIU binary.
        criu: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The daemon failed while CRIU restored, so the restore was stopped.
    #[error(
        "criu lazy-pages failed during the restore ({status}), so CRIU was stopped; its log \
         {log}: {excerpt}"
    )]
    Died {
        /// How the daemon exited.
        status: String,
        /// The daemon's log.
        log: PathBuf,
        /// The log's last error lines.
        excerpt: String,
    },
    /// The daemon exited, or never opened its socket.
    #[error("criu lazy-pages {what}; its log {log}: {excerpt}")]
    NotListening {
        /// What happened.
        what: String,
        /// The daemon's log.
        log: PathBuf,
        /// The log's last lines.
        excerpt: String,
    },
}

/// A remote page server the daemon fetches pages from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageServer {
    /// Its address.
    pub host: String,
    /// Its port.
    pub port: u16,
}

impl std::str::FromStr for PageServer {
    type Err = LazyError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let bad = || LazyError::BadPageServer(value.to_owned());
        let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse::<u16>().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(PageServer {
            host: host.to_owned(),
            port,
        })
    }
}

/// What the thread waiting for the daemon shares with the restore.
#[derive(Debug, Default)]
struct Shared {
    /// The daemon's exit status, once it has exited.
    status: Mutex<Option<ExitStatus>>,
    exited: Condvar,
    /// CRIU's pid while the restore runs (0 before and after): the process to kill if the
    /// daemon fails meanwhile.
    criu_pid: AtomicI32,
    /// Whether the daemon's end is expected (it was stopped on purpose).
    stopping: AtomicBool,
}

/// A `criu lazy-pages` this restore started.
#[derive(Debug)]
pub struct LazyDaemon {
    pid: u32,
    log: PathBuf,
    socket: PathBuf,
    shared: Arc<Shared>,
}

/// Watches the daemon for the time of a restore; see [`LazyDaemon::guard`].
#[derive(Debug, Clone)]
pub struct Guard {
    shared: Arc<Shared>,
}

impl Guard {
    /// Names the CRIU process the restore runs in, to be killed if the daemon fails.
    pub fn watch(&self, criu_pid: u32) {
        let pid = i32::try_from(criu_pid).unwrap_or(0);
        self.shared.criu_pid.store(pid, Ordering::SeqCst);
    }

    /// Ends the watch: CRIU is done.
    pub fn done(&self) {
        self.shared.criu_pid.store(0, Ordering::SeqCst);
    }
}

impl LazyDaemon {
    /// Whether a lazy-pages daemon already listens in `work_dir`: its socket is there. (It is
    /// not probed: a daemon takes one connection, the restore's, and a probe would use it up.)
    pub fn listening(work_dir: &Path) -> bool {
        work_dir.join(SOCKET).exists()
    }

    /// Starts `criu lazy-pages` for `images`, with its socket and log in `work_dir`, and
    /// waits until it listens. With a page server the pages are fetched from there, else
    /// read from `images`. The daemon runs in a process group of its own, so it outlives a
    /// detached restore and is not hit by signals meant for the container.
    ///
    /// # Errors
    ///
    /// A daemon that cannot be started, exits, or does not open its socket in time.
    pub fn start(
        criu: &Path,
        images: &Path,
        work_dir: &Path,
        page_server: Option<&PageServer>,
    ) -> Result<LazyDaemon, LazyError> {
        let mut command = Command::new(criu);
        command
            .arg("lazy-pages")
            .arg("--images-dir")
            .arg(images)
            .arg("--work-dir")
            .arg(work_dir)
            .args(["--log-file", LOG_FILE, "-v4"]);
        if let Some(server) = page_server {
            command
                .arg("--page-server")
                .args(["--address", &server.host])
                .args(["--port", &server.port.to_string()]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = command.spawn().map_err(|source| LazyError::Spawn {
            criu: criu.to_path_buf(),
            source,
        })?;
        let daemon = LazyDaemon {
            pid: child.id(),
            log: work_dir.join(LOG_FILE),
            socket: work_dir.join(SOCKET),
            shared: Arc::new(Shared::default()),
        };

        // One thread owns the child and reaps it whenever it ends; a failure while a
        // restore is watched kills that restore's CRIU.
        let shared = Arc::clone(&daemon.shared);
        std::thread::spawn(move || {
            let status = child.wait().ok();
            let criu = shared.criu_pid.load(Ordering::SeqCst);
            let failed = !status.is_some_and(|s| s.success());
            if failed && criu > 1 && !shared.stopping.load(Ordering::SeqCst) {
                tracing::error!(criu, "the lazy-pages daemon failed during the restore");
                let _ = kill(Pid::from_raw(criu), Signal::SIGKILL);
            }
            if let Ok(mut slot) = shared.status.lock() {
                *slot = status;
            }
            shared.exited.notify_all();
        });

        let deadline = Instant::now() + SOCKET_WAIT;
        while !work_dir.join(SOCKET).exists() {
            if let Some(status) = daemon.exit_status() {
                let _ = fs::remove_file(&daemon.socket);
                return Err(daemon.not_listening(format!("exited ({status})")));
            }
            if Instant::now() > deadline {
                daemon.stop_now();
                return Err(daemon.not_listening(format!(
                    "did not open its socket within {} s",
                    SOCKET_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::debug!(pid = daemon.pid, "lazy-pages daemon listening");
        Ok(daemon)
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        self.shared.status.lock().ok().and_then(|s| *s)
    }

    /// Waits up to `timeout` for the daemon to exit; whether it did.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let Ok(slot) = self.shared.status.lock() else {
            return false;
        };
        self.shared
            .exited
            .wait_timeout_while(slot, timeout, |status| status.is_none())
            .is_ok_and(|(status, _)| status.is_some())
    }

    /// The last error lines of the daemon's log (or its last lines without errors).
    fn excerpt(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("Error")).collect();
        let lines = if errors.is_empty() {
            log.lines().rev().take(3).collect::<Vec<_>>()
        } else {
            errors.into_iter().rev().take(3).collect()
        };
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    }

    fn not_listening(&self, what: String) -> LazyError {
        LazyError::NotListening {
            what,
            log: self.log.clone(),
            excerpt: self.excerpt(),
        }
    }

    /// Why the restore failed, when the daemon failed under it; `None` while it runs or when
    /// it ended well or was stopped on purpose.
    pub fn failure(&self) -> Option<LazyError> {
        let status = self.exit_status()?;
        if status.success() || self.shared.stopping.load(Ordering::SeqCst) {
            return None;
        }
        Some(LazyError::Died {
            status: status.to_string(),
            log: self.log.clone(),
            excerpt: self.excerpt(),
        })
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A watch over the daemon for the time of a restore: once given CRIU's pid, a daemon
    /// that fails kills CRIU.
    pub fn guard(&self) -> Guard {
        Guard {
            shared: Arc::clone(&self.shared),
        }
    }

    fn stop_now(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // The waiting thread reaps it; until then the pid cannot be reused.
        if self.exit_status().is_none()
            && let Ok(pid) = i32::try_from(self.pid)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.wait_exit(Duration::from_secs(5));
        // A killed daemon leaves its socket behind.
        let _ = fs::remove_file(&self.socket);
    }

    /// Stops the daemon now.
    pub fn stop(&mut self) {
        self.stop_now();
    }

    /// Leaves the daemon to finish serving pages on its own; it exits once every page has
    /// been delivered.
    pub fn release(self) {
        self.shared.criu_pid.store(0, Ordering::SeqCst);
        tracing::debug!(pid = self.pid, "lazy-pages daemon left to finish serving");
    }

    /// Waits up to `timeout` for the daemon to finish serving, then stops it; returns
    /// whether it finished by itself.
    pub fn finish(self, timeout: Duration) -> bool {
        if self.wait_exit(timeout) {
            return true;
        }
        self.stop_now();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_servers_are_host_and_port() {
        let server: PageServer = "192.0.2.1:27000".parse().expect("parses");
        assert_eq!(server.host, "192.0.2.1");
        assert_eq!(server.port, 27000);
        let v6: PageServer = "[::1]:27000".parse().expect("parses");
        assert_eq!(v6.host, "::1");
        for bad in ["192.0.2.1", ":27000", "host:0", "host:http", "host:70000"] {
            assert!(
                matches!(bad.parse::<PageServer>(), Err(LazyError::BadPageServer(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_daemon_that_cannot_run_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = LazyDaemon::start(Path::new("/nonexistent/criu"), dir.path(), dir.path(), None)
            .expect_err("no CRIU");
        assert!(matches!(error, LazyError::Spawn { .. }), "{error}");
    }
}
