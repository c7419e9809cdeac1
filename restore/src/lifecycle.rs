//! The restored container's life in the foreground: signals forwarded to it, its exit status
//! returned as the command's.

use std::io;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook::iterator::Signals;

/// Makes this process the reaper of orphaned descendants, so the restored tasks' orphans are
/// reaped here rather than by init.
///
/// # Errors
///
/// The error from `prctl`.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Forwards this process's signals to `pid` until it exits, reaping every child meanwhile,
/// and returns its exit code, or 128 plus the signal that killed it.
pub fn wait_foreground(pid: i32) -> i32 {
    // Signals go to this pid only: 0 or -1 would reach a process group or everyone.
    if pid <= 1 {
        return 255;
    }
    let target = Pid::from_raw(pid);
    let forwarder = Signals::new([SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH])
        .ok()
        .map(|mut signals| {
            let handle = signals.handle();
            let thread = std::thread::spawn(move || {
                for signal in signals.forever() {
                    if let Ok(signal) = Signal::try_from(signal) {
                        let _ = kill(target, signal);
                    }
                }
            });
            (handle, thread)
        });

    let status = loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) if p == target => break code,
            Ok(WaitStatus::Signaled(p, signal, _)) if p == target => break 128 + signal as i32,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            // No children left: the container is gone without our seeing its status.
            Err(_) => break 255,
        }
    };

    if let Some((handle, thread)) = forwarder {
        handle.close();
        let _ = thread.join();
    }
    status
}
