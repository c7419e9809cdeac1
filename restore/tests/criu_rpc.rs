//! The RPC client against the real CRIU: version and feature checks, a restore of a process
//! dumped here, and a restore that fails. Needs root and CRIU (CI installs it with
//! `tools/install-deps`); skipped with the reason printed when either is missing.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{Pid, geteuid};
use restore::rpc::messages::{CriuFeatures, CriuOpts};
use restore::rpc::{
    AcknowledgeAll, Criu, Notification, NotifyHandler, RestoreRequest, RpcError, Version,
};

fn criu() -> Option<Criu> {
    if !geteuid().is_root() {
        println!("skipped: CRIU needs root");
        return None;
    }
    let found = Command::new("criu")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!("skipped: criu is not installed (run tools/install-deps)");
        return None;
    }
    Some(Criu::new("criu"))
}

#[test]
fn version_and_features() {
    let Some(criu) = criu() else { return };
    let version = criu.version().expect("VERSION answers");
    assert!(
        version >= Version::new(4, 0, 0),
        "CRIU {version} is too old for these tests"
    );
    assert!(
        criu.require(Version::new(3, 16, 0), "--lsm-profile")
            .is_ok()
    );

    let error = criu
        .require(Version::new(99, 0, 0), "a future option")
        .expect_err("too old");
    let text = error.to_string();
    assert!(
        text.contains("a future option needs CRIU 99.0 or newer"),
        "{text}"
    );
    assert!(text.contains(&version.to_string()), "{text}");

    let wanted = CriuFeatures {
        lazy_pages: Some(true),
        ..Default::default()
    };
    let features = criu.check_features(wanted).expect("FEATURE_CHECK answers");
    // This kernel has userfaultfd (environment notes); CRIU says so through the RPC.
    assert_eq!(features.lazy_pages, Some(true));
}

#[test]
fn missing_criu_is_a_clear_error() {
    let criu = Criu::new("/nonexistent/criu");
    let error = criu.version().expect_err("no such binary");
    assert!(matches!(error, RpcError::Spawn { .. }));
    assert!(error.to_string().contains("is CRIU installed?"), "{error}");
}

/// A restore of `images` with the log in the images directory.
fn request(images: &Path, opts: CriuOpts) -> RestoreRequest {
    RestoreRequest {
        images_dir: images.to_path_buf(),
        work_dir: None,
        log_file: "restore.log".into(),
        log_level: 4,
        opts,
        inherit_stdio: false,
    }
}

/// Records the notifications CRIU sends.
#[derive(Default)]
struct Recorder {
    scripts: Vec<String>,
    root_pid: Option<i32>,
}

impl NotifyHandler for Recorder {
    fn notify(
        &mut self,
        notification: &Notification<'_>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.scripts.push(notification.script.to_owned());
        if notification.script == "post-restore" {
            self.root_pid = notification.pid;
        }
        Ok(())
    }
}

/// Starts `sleep` in a session of its own with stdio on /dev/null, so plain `criu dump`
/// can take it, and returns its pid.
fn start_sleeper() -> i32 {
    let out = Command::new("sh")
        .args([
            "-c",
            "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!",
        ])
        .output()
        .expect("sh runs");
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a pid");
    // Wait until setsid has become sleep.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() != "sleep")
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "sleep did not start");
        sleep(Duration::from_millis(10));
    }
    pid
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "pid {pid} still exists");
        sleep(Duration::from_millis(20));
    }
}

#[test]
fn restores_a_dumped_process_through_rpc() {
    let Some(criu) = criu() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let images = dir.path().join("images");
    fs::create_dir(&images).expect("images dir");

    let pid = start_sleeper();
    let dumped = Command::new("criu")
        .args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(&images)
        .args(["-o", "dump.log"])
        .status()
        .expect("criu dump runs");
    if !dumped.success() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        // The images directory goes with the test, so its log's errors go in the message.
        let log = fs::read_to_string(images.join("dump.log")).unwrap_or_default();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("Error")).collect();
        panic!("criu dump failed: {}", errors.join("\n"));
    }
    // CRIU cannot restore a pid until the old process is gone.
    wait_gone(pid);

    // The restored process becomes our child, so this test can reap it.
    let opts = CriuOpts {
        rst_sibling: Some(true),
        ..Default::default()
    };
    let request = request(&images, opts);
    let mut recorder = Recorder::default();
    let restored = criu
        .restore(&request, &mut recorder)
        .expect("restore succeeds");

    assert_eq!(restored.pid, pid, "CRIU restores the original pid");
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).expect("restored process runs");
    assert_eq!(comm.trim(), "sleep");
    assert!(
        recorder.scripts.iter().any(|s| s == "post-restore"),
        "{:?}",
        recorder.scripts
    );
    assert_eq!(recorder.root_pid, Some(pid));
    assert!(images.join("restore.log").is_file());

    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill the restored process");
    waitpid(Pid::from_raw(pid), None).expect("reap it");
}

#[test]
fn a_failed_restore_reports_criu_message_and_log() {
    let Some(criu) = criu() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let request = request(dir.path(), CriuOpts::default());
    let error = criu
        .restore(&request, &mut AcknowledgeAll)
        .expect_err("nothing to restore");
    let RpcError::Failed { message, log, .. } = &error else {
        panic!("expected a CRIU failure, got {error:?}");
    };
    assert!(message.is_some(), "CRIU's first error is passed on");
    let log = log.as_ref().expect("the log's error lines are included");
    assert_eq!(log.path, dir.path().join("restore.log"));
    assert!(!log.lines.is_empty());
    let text = error.to_string();
    println!("{text}");
    assert!(text.starts_with("CRIU restore failed: "), "{text}");
    assert!(
        !text.contains("RLIMIT_NOFILE"),
        "the harmless rlimit error is left out: {text}"
    );
    assert!(
        text.contains("Unexpected EOF"),
        "the real cause is named: {text}"
    );
    assert!(!text.contains("type NOTIFY errno 0"), "{text}");
}

#[test]
fn an_unopenable_images_dir_fails_before_criu_runs() {
    let criu = Criu::new("/nonexistent/criu");
    let request = request(Path::new("/nonexistent/images"), CriuOpts::default());
    let error = criu
        .restore(&request, &mut AcknowledgeAll)
        .expect_err("no such dir");
    assert!(matches!(error, RpcError::OpenDir { .. }), "{error:?}");
}
