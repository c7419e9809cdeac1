//! OCI hooks around a restore, at the points `runc restore` runs them.
//!
//! runc runs the `prestart` and `createRuntime` hooks when CRIU reports `setup-namespaces`:
//! the restored tasks exist and have their namespaces, but their mounts are not restored
//! yet and they have not run. This is where network hooks configure the container's network
//! namespace. `poststop` hooks run once the container is gone: when a foreground container
//! exits, and when a restore fails after its `prestart` hooks ran, so what they set up is
//! taken down again. runc runs no `poststart` hooks on restore, and neither does this.
//!
//! Each hook gets the container's OCI state as JSON on stdin, runs with its own arguments
//! and environment (this process's when the hook has none, as in runc), and fails the
//! restore when it exits non-zero or outlives its timeout.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;
use serde::Serialize;
use thiserror::Error;

/// How much of a failed hook's output is kept for the error message.
const OUTPUT_KEPT: usize = 4096;

/// How long the output of a hook that has exited is waited for.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Why a hook failed.
#[derive(Debug, Error)]
pub enum HookError {
    /// The hook could not be started.
    #[error("cannot run the {phase} hook {path}")]
    Start {
        /// The hook's kind (`prestart`, `createRuntime`, ...).
        phase: &'static str,
        /// The hook's binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The hook exited unsuccessfully.
    #[error("the {phase} hook {path} failed ({status}){}", output_note(.output))]
    Failed {
        /// The hook's kind.
        phase: &'static str,
        /// The hook's binary.
        path: PathBuf,
        /// How it exited.
        status: String,
        /// The end of what it wrote to stdout and stderr.
        output: String,
    },
    /// The hook ran past its timeout and was killed.
    #[error("the {phase} hook {path} ran past its timeout of {seconds} s and was killed")]
    Timeout {
        /// The hook's kind.
        phase: &'static str,
        /// The hook's binary.
        path: PathBuf,
        /// The timeout.
        seconds: i64,
    },
}

fn output_note(output: &str) -> String {
    if output.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", output.trim())
    }
}

/// The OCI state a hook reads on stdin.
#[derive(Debug, Clone, Serialize)]
pub struct HookState {
    /// The config's OCI version.
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    /// The container id.
    pub id: String,
    /// `creating` while restoring, `stopped` afterwards.
    pub status: &'static str,
    /// The restored init's host pid (0 once it is gone).
    pub pid: i32,
    /// The bundle.
    pub bundle: PathBuf,
    /// The config's annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Runs `hooks` one after the other with `state` on their stdin, stopping at the first that
/// fails.
///
/// # Errors
///
/// The first hook that cannot start, exits non-zero or runs past its timeout.
pub fn run(phase: &'static str, hooks: &[Hook], state: &HookState) -> Result<(), HookError> {
    if hooks.is_empty() {
        return Ok(());
    }
    // Serialising plain strings and numbers cannot fail.
    let input = serde_json::to_vec(state).unwrap_or_default();
    for hook in hooks {
        tracing::debug!(phase, path = %hook.path().display(), "running hook");
        run_one(phase, hook, &input)?;
    }
    Ok(())
}

fn run_one(phase: &'static str, hook: &Hook, input: &[u8]) -> Result<(), HookError> {
    let path = hook.path().clone();
    let mut command = Command::new(&path);
    // `args` holds argv[0] too; without any, argv[0] is the path, as in runc.
    if let Some((first, rest)) = hook.args().as_deref().and_then(<[String]>::split_first) {
        command.arg0(first).args(rest);
    }
    if let Some(env) = hook.env() {
        command.env_clear();
        for pair in env {
            match pair.split_once('=') {
                Some((key, value)) if !key.is_empty() => command.env(key, value),
                _ => command.env(pair, ""),
            };
        }
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HookError::Start {
            phase,
            path: path.clone(),
            source,
        })?;

    // Output is drained on threads so a chatty hook never blocks on a full pipe.
    let (sender, received) = std::sync::mpsc::channel();
    let streams = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn io::Read + Send>),
    ];
    let mut readers = 0;
    for mut stream in streams.into_iter().flatten() {
        let sender = sender.clone();
        readers += 1;
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes);
            let _ = sender.send(bytes);
        });
    }
    drop(sender);
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state closes the pipe early; that is its right.
        let _ = stdin.write_all(input);
    }

    let timeout = hook
        .timeout()
        .filter(|&s| s > 0)
        .map(|s| (s, Duration::from_secs(s.unsigned_abs())));
    let status = wait(&mut child, timeout.map(|(_, d)| d));
    // Something the hook left running may hold its output open: wait a little, not for it.
    let deadline = Instant::now() + OUTPUT_GRACE;
    let mut output = Vec::new();
    for _ in 0..readers {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(bytes) => output.extend(bytes),
            Err(_) => break,
        }
    }
    let Some(status) = status else {
        return Err(HookError::Timeout {
            phase,
            path,
            seconds: timeout.map_or(0, |(s, _)| s),
        });
    };
    if status.success() {
        return Ok(());
    }
    let start = output.len().saturating_sub(OUTPUT_KEPT);
    Err(HookError::Failed {
        phase,
        path,
        status: status.to_string(),
        output: String::from_utf8_lossy(&output[start..]).into_owned(),
    })
}

/// Waits for the hook; `None` when it ran past `timeout` (it is then killed and reaped).
fn wait(child: &mut Child, timeout: Option<Duration>) -> Option<std::process::ExitStatus> {
    let Some(timeout) = timeout else {
        return child.wait().ok();
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: serde_json::Value) -> Hook {
        serde_json::from_value(json).expect("a hook")
    }

    fn state() -> HookState {
        HookState {
            oci_version: "1.0.2".into(),
            id: "c1".into(),
            status: "creating",
            pid: 42,
            bundle: "/b".into(),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn a_hook_reads_the_state_with_its_own_args_and_env() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("out");
        let script = format!(
            "cat > {0}; argv0=$(tr '\\0' '\\n' < /proc/$$/cmdline | head -n 1); \
             echo \" $argv0 $1 $HOOK_VAR\" >> {0}",
            out.display()
        );
        let hooks = [hook(serde_json::json!({
            "path": "/bin/sh",
            "args": ["my-hook", "-c", script, "zero", "first"],
            "env": ["HOOK_VAR=set"]
        }))];
        run("prestart", &hooks, &state()).expect("runs");
        let text = std::fs::read_to_string(&out).expect("output");
        let (json, rest) = text.split_once(' ').expect("two parts");
        let seen: serde_json::Value = serde_json::from_str(json).expect("state JSON");
        assert_eq!(seen["ociVersion"], "1.0.2");
        assert_eq!(seen["id"], "c1");
        assert_eq!(seen["status"], "creating");
        assert_eq!(seen["pid"], 42);
        assert_eq!(seen["bundle"], "/b");
        assert_eq!(rest.trim(), "my-hook first set");
    }

    #[test]
    fn failures_and_timeouts_are_errors_that_name_the_hook() {
        let failing = [hook(serde_json::json!({
            "path": "/bin/sh", "args": ["sh", "-c", "echo no network >&2; exit 3"]
        }))];
        let error = run("createRuntime", &failing, &state()).expect_err("fails");
        assert!(matches!(error, HookError::Failed { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains("createRuntime hook /bin/sh"), "{message}");
        assert!(message.contains("no network"), "{message}");

        let slow = [hook(serde_json::json!({
            "path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1
        }))];
        let started = Instant::now();
        let error = run("prestart", &slow, &state()).expect_err("times out");
        assert!(
            matches!(error, HookError::Timeout { seconds: 1, .. }),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));

        // A hook that leaves a process holding its output does not hold up the restore.
        let daemon = [hook(serde_json::json!({
            "path": "/bin/sh", "args": ["sh", "-c", "sleep 30 & exit 0"]
        }))];
        let started = Instant::now();
        run("prestart", &daemon, &state()).expect("runs");
        assert!(started.elapsed() < Duration::from_secs(10));

        let missing = [hook(serde_json::json!({"path": "/nonexistent/hook"}))];
        let error = run("poststop", &missing, &state()).expect_err("missing");
        assert!(matches!(error, HookError::Start { .. }), "{error}");
    }
}
