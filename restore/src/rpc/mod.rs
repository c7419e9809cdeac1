//! A client for CRIU's RPC protocol: `criu swrk` driven over a `SOCK_SEQPACKET` socket pair.
//!
//! Each action runs in its own `criu swrk` process, as runc runs them. The socket carries one
//! protobuf message per datagram with no length prefix, so receive buffers are sized by
//! peeking; any message may carry a file descriptor (the pty master of `orphan-pts-master`),
//! so every receive asks for one. While CRIU restores, it stops at each notification until it
//! is acknowledged; [`NotifyHandler`] is where the caller acts on them.
//!
//! Descriptors in the options (`images_dir_fd`, `work_dir_fd`) are numbers in *this*
//! process: CRIU opens them through `/proc/<our pid>/fd/`, so [`Criu::restore`] opens the
//! directories itself and keeps them open for the whole session.

pub mod messages;

use std::ffi::CString;
use std::fmt;
use std::fs::{self, File};
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, posix_spawnp};
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recv, recvmsg, send,
    socketpair,
};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use prost::Message as _;
use thiserror::Error;

use messages::{CriuFeatures, CriuOpts, CriuReq, CriuResp, ReqType};

/// Why talking to CRIU failed.
#[derive(Debug, Error)]
pub enum RpcError {
    /// The CRIU binary could not be started.
    #[error("cannot run {path} (is CRIU installed? tools/install-deps installs it)")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A directory of the request could not be opened.
    #[error("cannot open {path}")]
    OpenDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket to CRIU failed.
    #[error("RPC socket to CRIU failed while {doing}")]
    Socket {
        /// What was being done.
        doing: &'static str,
        /// The system error.
        #[source]
        source: Errno,
    },
    /// CRIU closed the connection without answering.
    #[error("CRIU exited before answering ({status}){}", log_note(.log))]
    Exited {
        /// How CRIU exited.
        status: String,
        /// The end of CRIU's log, when there is one.
        log: Option<LogExcerpt>,
    },
    /// CRIU sent something that is not a response.
    #[error("CRIU sent a malformed message")]
    Malformed(#[source] prost::DecodeError),
    /// CRIU answered another request than the one asked.
    #[error("CRIU answered with a {found} message while a {expected} answer was expected")]
    Unexpected {
        /// The type received.
        found: String,
        /// The type expected.
        expected: &'static str,
    },
    /// CRIU reported that the action failed.
    #[error("CRIU {action} failed: {}{}{}",
        .message.as_deref().unwrap_or("no message"),
        .errno.map(|e| format!(" ({})", Errno::from_raw(e).desc())).unwrap_or_default(),
        log_note(.log))]
    Failed {
        /// The action.
        action: &'static str,
        /// CRIU's first error message (`cr_errmsg`).
        message: Option<String>,
        /// CRIU's errno (`cr_errno`).
        errno: Option<i32>,
        /// The error lines of CRIU's log.
        log: Option<LogExcerpt>,
    },
    /// The caller's handler of a notification failed, so the action was aborted.
    #[error("handling CRIU's {script} notification failed")]
    Handler {
        /// The notification.
        script: String,
        /// The handler's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The CRIU found is older than an option needs.
    #[error("{what} needs CRIU {needed} or newer, but {path} is {found}")]
    TooOld {
        /// The option or feature.
        what: String,
        /// The version needed.
        needed: Version,
        /// The version found.
        found: Version,
        /// The binary.
        path: PathBuf,
    },
}

fn log_note(log: &Option<LogExcerpt>) -> String {
    log.as_ref().map(|l| format!("\n{l}")).unwrap_or_default()
}

/// The lines of a CRIU log that explain a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogExcerpt {
    /// The log file.
    pub path: PathBuf,
    /// Error lines with a little context before each, in log order.
    pub lines: Vec<String>,
}

impl fmt::Display for LogExcerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "from {}:", self.path.display())?;
        for line in &self.lines {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// Lines of context kept before each error line.
const CONTEXT_LINES: usize = 2;
/// Most lines an excerpt keeps (the last ones).
const EXCERPT_LINES: usize = 30;

/// Errors CRIU logs on every run on some hosts that say nothing about a failure: without
/// CAP_SYS_RESOURCE it cannot raise its own descriptor limit, and goes on.
const HARMLESS_ERRORS: &[&str] = &["Can't setup RLIMIT_NOFILE for self"];

fn is_error(line: &str) -> bool {
    line.contains("Error (") || line.contains("Error:")
}

fn is_harmless(line: &str) -> bool {
    HARMLESS_ERRORS.iter().any(|h| line.contains(h))
}

impl LogExcerpt {
    /// The first error line, the one that usually names the cause.
    pub fn first_error(&self) -> Option<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .find(|line| is_error(line))
    }

    /// The error lines of the log at `path`, or `None` when it cannot be read or has none.
    pub fn read(path: &Path) -> Option<LogExcerpt> {
        let text = fs::read_to_string(path).ok()?;
        let lines: Vec<&str> = text.lines().filter(|line| !is_harmless(line)).collect();
        let mut keep = vec![false; lines.len()];
        for (i, line) in lines.iter().enumerate() {
            if is_error(line) {
                for flag in &mut keep[i.saturating_sub(CONTEXT_LINES)..=i] {
                    *flag = true;
                }
            }
        }
        let mut kept: Vec<String> = lines
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(l, _)| (*l).to_owned())
            .collect();
        if kept.is_empty() {
            return None;
        }
        if kept.len() > EXCERPT_LINES {
            kept.drain(..kept.len() - EXCERPT_LINES);
        }
        Some(LogExcerpt {
            path: path.to_path_buf(),
            lines: kept,
        })
    }
}

/// A CRIU version, compared as CRIU numbers them (`major * 10000 + minor * 100 + sublevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Sublevel.
    pub sublevel: u32,
}

impl Version {
    /// The version `major.minor.sublevel`.
    pub const fn new(major: u32, minor: u32, sublevel: u32) -> Self {
        Version {
            major,
            minor,
            sublevel,
        }
    }

    /// CRIU's single-number form, as runc compares it (3.16 is 31600).
    pub fn code(&self) -> u32 {
        self.major * 10000 + self.minor * 100 + self.sublevel
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.sublevel != 0 {
            write!(f, ".{}", self.sublevel)?;
        }
        Ok(())
    }
}

/// A file descriptor received from CRIU, closed when dropped.
#[derive(Debug)]
pub struct ReceivedFd(RawFd);

impl ReceivedFd {
    /// The descriptor number, valid while this value lives.
    pub fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Drop for ReceivedFd {
    fn drop(&mut self) {
        let _ = nix::unistd::close(self.0);
    }
}

/// A point in CRIU's work at which it waits for the client.
#[derive(Debug)]
pub struct Notification<'a> {
    /// Which point: `setup-namespaces`, `post-restore`, `orphan-pts-master`,
    /// `network-lock`, `network-unlock`, ...
    pub script: &'a str,
    /// Host pid of the restored root task, for `setup-namespaces` and `post-restore`.
    pub pid: Option<i32>,
    /// The descriptor sent with the notification (the pty master of `orphan-pts-master`).
    pub fd: Option<&'a ReceivedFd>,
}

/// Acts on CRIU's notifications. CRIU waits until each returns; an error aborts the action.
pub trait NotifyHandler {
    /// Called once CRIU runs and before it is sent the request, with CRIU's pid: the moment
    /// to put CRIU into the cgroups the restored tasks must start in.
    ///
    /// # Errors
    ///
    /// Whatever stops the action before it starts.
    fn started(&mut self, criu_pid: u32) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let _ = criu_pid;
        Ok(())
    }

    /// Handles one notification.
    ///
    /// # Errors
    ///
    /// Whatever stops the action; CRIU is told and rolls back.
    fn notify(
        &mut self,
        notification: &Notification<'_>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// A handler that acknowledges every notification.
#[derive(Debug, Default)]
pub struct AcknowledgeAll;

impl NotifyHandler for AcknowledgeAll {
    fn notify(
        &mut self,
        _: &Notification<'_>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

/// What a restore needs beyond the options.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// The images directory.
    pub images_dir: PathBuf,
    /// CRIU's work directory (logs, stats); the images directory when `None`.
    pub work_dir: Option<PathBuf>,
    /// Name of CRIU's log file in the work directory.
    pub log_file: String,
    /// CRIU's log level, 0 to 4.
    pub log_level: i32,
    /// Every other option; the directory descriptors and the log settings are filled in.
    pub opts: CriuOpts,
    /// Give CRIU this process's stdin, stdout and stderr (the restored tasks' inherited
    /// descriptors are CRIU's); otherwise CRIU gets `/dev/null` for stdin and stdout.
    pub inherit_stdio: bool,
}

/// A successful restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Host pid of the restored root task.
    pub pid: i32,
}

/// The CRIU binary to drive.
#[derive(Debug, Clone)]
pub struct Criu {
    path: PathBuf,
}

/// One `criu swrk` process and our end of its socket.
struct Session {
    socket: OwnedFd,
    pid: Pid,
    log: Option<PathBuf>,
}

impl Criu {
    /// CRIU at `path` (a name is looked up in `PATH`).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Criu { path: path.into() }
    }

    /// The binary.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts `criu swrk` with its end of a new socket pair, and the descriptors `keep`, at
    /// the numbers they have here.
    ///
    /// No descriptor is ever made inheritable in this process: `posix_spawn` clears the
    /// close-on-exec flag in the child alone. Clearing it here, even for a moment, would let
    /// a process another thread starts meanwhile inherit CRIU's socket (and a process
    /// holding CRIU's socket cannot be dumped: "External socket is used").
    fn start(
        &self,
        log: Option<PathBuf>,
        inherit_stdio: bool,
        keep: &[RawFd],
    ) -> Result<Session, RpcError> {
        let socket_error = |doing| move |source| RpcError::Socket { doing, source };
        let spawn_error = |errno: Errno| RpcError::Spawn {
            path: self.path.clone(),
            source: std::io::Error::from(errno),
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(socket_error("creating the socket pair"))?;

        let mut actions = PosixSpawnFileActions::init().map_err(spawn_error)?;
        // A descriptor duplicated onto itself loses close-on-exec in the child only.
        for fd in std::iter::once(theirs.as_raw_fd()).chain(keep.iter().copied()) {
            actions.add_dup2(fd, fd).map_err(spawn_error)?;
        }
        // Opened close-on-exec here; CRIU gets it as its stdin and stdout.
        let null = if inherit_stdio {
            None
        } else {
            let null = File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|source| RpcError::Spawn {
                    path: self.path.clone(),
                    source,
                })?;
            for fd in [0, 1] {
                actions
                    .add_dup2(null.as_raw_fd(), fd)
                    .map_err(spawn_error)?;
            }
            Some(null)
        };
        let attr = PosixSpawnAttr::init().map_err(spawn_error)?;
        let c_string = |bytes: &[u8]| {
            CString::new(bytes).map_err(|_| RpcError::Spawn {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a NUL byte in the command or its environment",
                ),
            })
        };
        let program = c_string(self.path.as_os_str().as_bytes())?;
        let args = [
            program.clone(),
            c_string(b"swrk")?,
            c_string(theirs.as_raw_fd().to_string().as_bytes())?,
        ];
        let env = std::env::vars_os()
            .map(|(key, value)| {
                let mut pair = key.into_vec();
                pair.push(b'=');
                pair.extend(value.into_vec());
                c_string(&pair)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pid = posix_spawnp(&program, &actions, &attr, &args, &env).map_err(spawn_error)?;
        // Our copy of CRIU's end is closed, so CRIU dying shows up as end of file here.
        drop(theirs);
        drop(null);
        Ok(Session {
            socket: ours,
            pid,
            log,
        })
    }

    /// Asks CRIU for its version.
    ///
    /// # Errors
    ///
    /// CRIU missing or failing.
    pub fn version(&self) -> Result<Version, RpcError> {
        let mut session = self.start(None, false, &[])?;
        let req = CriuReq {
            r#type: ReqType::Version as i32,
            ..Default::default()
        };
        let resp = session.call(&req, "VERSION")?;
        let version = resp.version.ok_or(RpcError::Failed {
            action: "VERSION",
            message: resp.cr_errmsg,
            errno: resp.cr_errno,
            log: None,
        })?;
        let number = |n: i32| u32::try_from(n).unwrap_or(0);
        Ok(Version::new(
            number(version.major_number),
            number(version.minor_number),
            number(version.sublevel.unwrap_or(0)),
        ))
    }

    /// Fails unless this CRIU is at least `needed`, naming `what` needs it.
    ///
    /// # Errors
    ///
    /// [`RpcError::TooOld`], or an error asking the version.
    pub fn require(&self, needed: Version, what: &str) -> Result<Version, RpcError> {
        let found = self.version()?;
        if found < needed {
            return Err(RpcError::TooOld {
                what: what.to_owned(),
                needed,
                found,
                path: self.path.clone(),
            });
        }
        Ok(found)
    }

    /// Asks which of `features` the kernel supports.
    ///
    /// # Errors
    ///
    /// CRIU missing or failing.
    pub fn check_features(&self, features: CriuFeatures) -> Result<CriuFeatures, RpcError> {
        let mut session = self.start(None, false, &[])?;
        let req = CriuReq {
            r#type: ReqType::FeatureCheck as i32,
            features: Some(features),
            ..Default::default()
        };
        let resp = session.call(&req, "FEATURE_CHECK")?;
        Ok(resp.features.unwrap_or_default())
    }

    /// Restores the images of `request`, calling `handler` at each notification.
    ///
    /// # Errors
    ///
    /// Unopenable directories, CRIU missing, failing or crashing (with its message and the
    /// error lines of its log), and the handler's own errors.
    pub fn restore(
        &self,
        request: &RestoreRequest,
        handler: &mut dyn NotifyHandler,
    ) -> Result<Restored, RpcError> {
        let open = |path: &Path| {
            File::open(path).map_err(|source| RpcError::OpenDir {
                path: path.to_path_buf(),
                source,
            })
        };
        // Both stay open until CRIU is done: it reads them through our /proc/<pid>/fd.
        let images = open(&request.images_dir)?;
        let work_path = request
            .work_dir
            .clone()
            .unwrap_or_else(|| request.images_dir.clone());
        let work = open(&work_path)?;

        let mut opts = request.opts.clone();
        opts.images_dir_fd = images.as_raw_fd();
        opts.work_dir_fd = Some(work.as_raw_fd());
        opts.log_file = Some(request.log_file.clone());
        opts.log_level = Some(request.log_level);
        opts.notify_scripts = Some(true);

        // Descriptors CRIU is to inherit (namespaces) keep their numbers in CRIU; stdio is
        // inherited anyway.
        let keep: Vec<RawFd> = opts
            .inherit_fd
            .iter()
            .map(|i| i.fd)
            .filter(|&fd| fd > 2)
            .collect();
        let mut session = self.start(
            Some(work_path.join(&request.log_file)),
            request.inherit_stdio,
            &keep,
        )?;
        if let Err(source) = handler.started(session.pid.as_raw().unsigned_abs()) {
            return Err(RpcError::Handler {
                script: "start".into(),
                source,
            });
        }
        let req = CriuReq {
            r#type: ReqType::Restore as i32,
            opts: Some(opts),
            ..Default::default()
        };
        session.send(&req)?;

        let mut handler_error = None;
        loop {
            let (resp, fd) = session.receive()?;
            match ReqType::try_from(resp.r#type) {
                Ok(ReqType::Notify) => {
                    let notify = resp.notify.unwrap_or_default();
                    let script = notify.script.unwrap_or_default();
                    let result = handler.notify(&Notification {
                        script: &script,
                        pid: notify.pid,
                        fd: fd.as_ref(),
                    });
                    let ack = CriuReq {
                        r#type: ReqType::Notify as i32,
                        notify_success: Some(result.is_ok()),
                        ..Default::default()
                    };
                    if let Err(source) = result {
                        handler_error = Some(RpcError::Handler { script, source });
                    }
                    session.send(&ack)?;
                }
                Ok(ReqType::Restore) if resp.success => {
                    let pid = resp.restore.map_or(-1, |r| r.pid);
                    return Ok(Restored { pid });
                }
                Ok(ReqType::Restore) => {
                    return Err(handler_error.unwrap_or_else(|| session.failure("restore", resp)));
                }
                _ => {
                    return Err(RpcError::Unexpected {
                        found: type_name(resp.r#type),
                        expected: "RESTORE or NOTIFY",
                    });
                }
            }
        }
    }
}

fn type_name(value: i32) -> String {
    ReqType::try_from(value).map_or_else(|_| format!("type {value}"), |t| format!("{t:?}"))
}

impl Session {
    fn send(&self, req: &CriuReq) -> Result<(), RpcError> {
        send(
            self.socket.as_raw_fd(),
            &req.encode_to_vec(),
            MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(|source| RpcError::Socket {
            doing: "sending a request",
            source,
        })?;
        Ok(())
    }

    /// Receives one message and the descriptor that came with it, if any.
    fn receive(&mut self) -> Result<(CriuResp, Option<ReceivedFd>), RpcError> {
        let fd = self.socket.as_raw_fd();
        let error = |doing| move |source| RpcError::Socket { doing, source };
        let size = loop {
            match recv(fd, &mut [], MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
                Err(Errno::EINTR) => continue,
                other => break other.map_err(error("waiting for CRIU"))?,
            }
        };
        if size == 0 {
            return Err(self.exited());
        }

        let mut buffer = vec![0u8; size];
        let mut control = nix::cmsg_space!([RawFd; 1]);
        let (received, fds) = {
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let msg = recvmsg::<()>(fd, &mut iov, Some(&mut control), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(error("receiving from CRIU"))?;
            let mut fds = Vec::new();
            for cmsg in msg
                .cmsgs()
                .map_err(error("reading descriptors from CRIU"))?
            {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    fds.extend(received.into_iter().map(ReceivedFd));
                }
            }
            (msg.bytes, fds)
        };
        let resp = CriuResp::decode(&buffer[..received]).map_err(RpcError::Malformed)?;
        Ok((resp, fds.into_iter().next()))
    }

    /// Sends `req` and returns the answer, which must be of the same type.
    fn call(&mut self, req: &CriuReq, expected: &'static str) -> Result<CriuResp, RpcError> {
        self.send(req)?;
        let (resp, _) = self.receive()?;
        if resp.r#type != req.r#type {
            return Err(RpcError::Unexpected {
                found: type_name(resp.r#type),
                expected,
            });
        }
        if !resp.success {
            return Err(self.failure(expected, resp));
        }
        Ok(resp)
    }

    fn failure(&self, action: &'static str, resp: CriuResp) -> RpcError {
        let log = self.log.as_deref().and_then(LogExcerpt::read);
        // CRIU passes on the first error it logged, which on some hosts is a harmless one;
        // the log's first real error then says more.
        let message = resp
            .cr_errmsg
            .filter(|m| !m.trim().is_empty() && !is_harmless(m))
            .or_else(|| {
                log.as_ref()
                    .and_then(|l| l.first_error())
                    .map(str::to_owned)
            });
        RpcError::Failed {
            action,
            message,
            errno: resp.cr_errno.filter(|&e| e != 0),
            log,
        }
    }

    /// Waits for CRIU to exit (once: a second call finds no child and says so).
    fn wait(&mut self) -> Result<WaitStatus, Errno> {
        loop {
            match waitpid(self.pid, None) {
                Err(Errno::EINTR) => {}
                other => return other,
            }
        }
    }

    fn exited(&mut self) -> RpcError {
        let status = self.wait().map_or_else(|e| e.to_string(), describe);
        RpcError::Exited {
            status,
            log: self.log.as_deref().and_then(LogExcerpt::read),
        }
    }
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("killed by signal {}", signal as i32),
        other => format!("{other:?}"),
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // CRIU exits after its answer. One still waiting for a request (the session ended
        // early) sees end of file once the socket is shut down, and exits too.
        let _ =
            nix::sys::socket::shutdown(self.socket.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = self.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_criu_numbers_them() {
        assert_eq!(Version::new(3, 16, 0).code(), 31600);
        assert!(Version::new(4, 1, 1) > Version::new(3, 16, 0));
        assert_eq!(Version::new(4, 1, 1).to_string(), "4.1.1");
        assert_eq!(Version::new(4, 2, 0).to_string(), "4.2");
    }

    #[test]
    fn log_excerpts_keep_errors_with_context_and_skip_harmless_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("restore.log");
        fs::write(
            &path,
            "(00.001) one\n(00.002) Error (criu/crtools.c:1): rlimit: Can't setup RLIMIT_NOFILE for self: x\n\
             (00.003) two\n(00.004) three\n(00.005) Error (criu/mount.c:9): mnt: oops\n(00.006) four\n",
        )
        .expect("write log");
        let excerpt = LogExcerpt::read(&path).expect("has an error");
        assert_eq!(
            excerpt.lines,
            [
                "(00.003) two",
                "(00.004) three",
                "(00.005) Error (criu/mount.c:9): mnt: oops"
            ]
        );
        assert_eq!(
            excerpt.first_error(),
            Some("(00.005) Error (criu/mount.c:9): mnt: oops")
        );
        fs::write(&path, "(00.001) fine\n").expect("write log");
        assert_eq!(LogExcerpt::read(&path), None);
    }
}
