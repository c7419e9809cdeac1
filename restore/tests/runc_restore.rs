//! `restore` on the runc busybox checkpoint of `fixtures/`: detached and in the foreground,
//! the same id twice, and failures that must leave nothing behind. Needs root and CRIU (CI
//! installs them); skipped with the reason printed otherwise. The bundle the checkpoint was
//! made from is recreated under /tmp/criu-fixtures by `fixtures/make-fixtures --prepare-only`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, Once};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, geteuid};

const BUNDLE: &str = "/tmp/criu-fixtures/runc-busybox";
const CGROUP: &str = "criu-fixture-runc-busybox";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One restore at a time: every test restores the same container into the same cgroup.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn ready() -> bool {
    if !geteuid().is_root() {
        println!("skipped: restoring a container needs root");
        return false;
    }
    if !Command::new("criu")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("skipped: criu is not installed (run tools/install-deps)");
        return false;
    }
    static PREPARE: Once = Once::new();
    PREPARE.call_once(|| {
        let status = Command::new("bash")
            .arg(workspace().join("fixtures/make-fixtures"))
            .arg("--prepare-only")
            .stdout(Stdio::null())
            .status()
            .expect("make-fixtures runs");
        assert!(status.success(), "make-fixtures --prepare-only failed");
    });
    true
}

/// A scratch copy of the checkpoint, so the committed fixture is never touched.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch::of("runc-busybox")
    }

    /// A copy of the checkpoint `fixtures/<fixture>`.
    fn of(fixture: &str) -> Scratch {
        let dir = tempfile::tempdir().expect("temp dir");
        let images = dir.path().join("images");
        fs::create_dir(&images).expect("images dir");
        for entry in fs::read_dir(workspace().join("fixtures").join(fixture)).expect("fixture") {
            let entry = entry.expect("entry");
            fs::copy(entry.path(), images.join(entry.file_name())).expect("copy image");
        }
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn restore(&self, id: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_restore"));
        command
            .current_dir(self.dir.path())
            .arg("--root")
            .arg(self.path("state"))
            .args(["--criu", "criu", "--bundle", BUNDLE, "--image-path"])
            .arg(self.path("images"))
            .arg("--work-path")
            .arg(self.path("work"))
            .args(extra)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }
}

fn counter() -> u64 {
    fs::read_to_string(Path::new(BUNDLE).join("rootfs/counter"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

fn cgroup_dirs() -> Vec<PathBuf> {
    cgroup_dirs_named(CGROUP)
}

/// Kills a container left running and removes what it holds.
fn destroy(pid: i32, state: &Path) {
    // Only a real pid: kill(-1) would signal every process there is.
    if pid > 1 {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
    }
    for dir in cgroup_dirs() {
        let _ = fs::remove_dir(dir);
    }
    let _ = fs::remove_dir_all(state);
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn mounted_below(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts.contains(&path.display().to_string())
}

#[test]
fn detached_restore_continues_where_it_stopped() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();

    let logging = [
        "--log",
        "restore.log.json",
        "--log-format",
        "json",
        "--debug",
    ];
    let extra = [&["-d", "--pid-file", "restored.pid"][..], &logging[..]].concat();
    let output = scratch.restore("busybox", &extra).output().expect("runs");
    assert!(
        output.status.success(),
        "restore failed: {}",
        stderr(&output)
    );

    // The relative pid file is written in the working directory, with the host pid.
    let pid: i32 = fs::read_to_string(scratch.path("restored.pid"))
        .expect("pid file")
        .parse()
        .expect("a pid, without a newline");
    let result = std::panic::catch_unwind(|| {
        assert_eq!(
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .expect("runs")
                .trim(),
            "sh"
        );
        let first = counter();
        sleep(Duration::from_millis(1200));
        assert!(counter() > first, "the counter goes on after the restore");

        let state: serde_json::Value = serde_json::from_slice(
            &fs::read(scratch.path("state/busybox/state.json")).expect("state.json"),
        )
        .expect("state.json is JSON");
        assert_eq!(state["id"], "busybox");
        assert_eq!(state["status"], "running");
        assert_eq!(state["pid"], pid);
        assert_eq!(state["bundle"], BUNDLE);
        assert!(!cgroup_dirs().is_empty(), "the container has its cgroups");

        // A second restore with the same id fails and leaves the first container alone.
        let again = scratch.restore("busybox", &["-d"]).output().expect("runs");
        assert_eq!(again.status.code(), Some(1));
        assert!(
            stderr(&again).contains("container busybox already exists"),
            "{}",
            stderr(&again)
        );
        assert!(Path::new(&format!("/proc/{pid}")).exists());

        // The images were only read: every file equals the committed fixture.
        for entry in fs::read_dir(workspace().join("fixtures/runc-busybox")).expect("fixture") {
            let entry = entry.expect("entry");
            let copy = fs::read(scratch.path("images").join(entry.file_name())).expect("copy");
            assert!(
                copy == fs::read(entry.path()).expect("fixture"),
                "{:?} changed",
                entry.file_name()
            );
        }
        assert!(scratch.path("work/restore.log").is_file());

        // --log with --log-format json and --debug: one JSON object a line, steps included.
        let log = fs::read_to_string(scratch.path("restore.log.json")).expect("log file");
        let events: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        let messages: Vec<&str> = events
            .iter()
            .filter_map(|e| e["fields"]["message"].as_str())
            .collect();
        assert!(messages.contains(&"starting CRIU"), "{log}");
        assert!(messages.contains(&"CRIU notification"), "{log}");
        assert!(messages.contains(&"restored"), "{log}");
    });
    destroy(pid, &scratch.path("state"));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn foreground_restore_exits_with_the_container_status() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let pid_file = scratch.path("fg.pid");
    let mut child = scratch
        .restore("fg", &["--pid-file", pid_file.to_str().expect("utf-8")])
        .spawn()
        .expect("starts");

    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.parse::<i32>().ok())
        {
            break pid;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("restore exited early with {status}");
        }
        assert!(Instant::now() < deadline, "no pid file after 30 s");
        sleep(Duration::from_millis(20));
    };
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill the container");
    let output = child.wait_with_output().expect("restore exits");

    assert_eq!(output.status.code(), Some(128 + 9), "{}", stderr(&output));
    assert!(
        !scratch.path("state/fg").exists(),
        "a foreground restore removes its state"
    );
    assert_eq!(cgroup_dirs(), Vec::<PathBuf>::new(), "and its cgroups");
}

#[test]
fn failures_are_clear_and_leave_nothing_behind() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let state = scratch.path("state");

    let cases: [(&[&str], &str); 2] = [
        (
            &["--bundle", "/nonexistent/bundle"],
            "cannot load the bundle's config /nonexistent/bundle/config.json",
        ),
        (
            &["--criu", "/nonexistent/criu"],
            "cannot run /nonexistent/criu (is CRIU installed?",
        ),
    ];
    for (extra, message) in cases {
        let output = scratch.restore("broken", extra).output().expect("runs");
        assert_eq!(
            output.status.code(),
            Some(1),
            "{extra:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(message),
            "{extra:?}: {}",
            stderr(&output)
        );
        assert!(
            !state.join("broken").exists(),
            "{extra:?} left its state directory"
        );
        assert!(
            !mounted_below(&state),
            "{extra:?} left the CRIU root mounted"
        );
        assert_eq!(
            cgroup_dirs(),
            Vec::<PathBuf>::new(),
            "{extra:?} left cgroups"
        );
    }

    let empty = scratch.path("empty");
    fs::create_dir(&empty).expect("empty dir");
    let output = scratch
        .restore("broken", &["--image-path", empty.to_str().expect("utf-8")])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("holds no checkpoint"),
        "{}",
        stderr(&output)
    );

    let output = scratch.restore("a/b", &[]).output().expect("runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("invalid container id"),
        "{}",
        stderr(&output)
    );

    let output = scratch
        .restore("broken", &["--manage-cgroups-mode", "bogus"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let output = Command::new(env!("CARGO_BIN_EXE_restore"))
        .arg("--lsm-mount-context")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("requires an argument"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn terminal_container_sends_its_console_master_and_answers() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::of("runc-terminal");

    // The console peer receives the master, types a command into it and records the output.
    let socket = scratch.path("console.sock");
    let log = scratch.path("console.log");
    let mut listener = Command::new("/usr/bin/python3")
        .arg(workspace().join("fixtures/src/console-listener.py"))
        .arg(&socket)
        .arg(&log)
        .arg("echo restored-$((6*7))")
        .spawn()
        .expect("console listener starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "console listener did not start");
        sleep(Duration::from_millis(20));
    }

    let state = scratch.path("state");
    let socket_arg = socket.to_str().expect("utf-8 path");
    let extra = [
        "--bundle",
        "/tmp/criu-fixtures/runc-terminal",
        "--console-socket",
        socket_arg,
    ];
    let extra = [&extra[..], &["-d", "--pid-file", "pid"]].concat();
    let output = scratch
        .restore("terminal", &extra)
        .output()
        .expect("restore runs");
    let pid: i32 = fs::read_to_string(scratch.path("pid"))
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(-1);

    let result = std::panic::catch_unwind(|| {
        assert!(
            output.status.success(),
            "restore failed: {}",
            stderr(&output)
        );
        let transcript = log.with_extension("log.transcript");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = fs::read_to_string(&transcript).unwrap_or_default();
            if text.contains("restored-42") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the shell did not answer: {text:?}"
            );
            sleep(Duration::from_millis(50));
        }
        let received = fs::read_to_string(&log).expect("listener log");
        assert!(received.contains("payload=orphan-pts-master"), "{received}");
    });
    destroy(pid, &state);
    let _ = listener.kill();
    let _ = listener.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn every_cgroups_mode_restores() {
    if !ready() {
        return;
    }
    let _serial = serial();
    for mode in ["soft", "full", "strict", "ignore"] {
        let scratch = Scratch::new();
        let output = scratch
            .restore(
                "modes",
                &["-d", "--manage-cgroups-mode", mode, "--pid-file", "pid"],
            )
            .output()
            .expect("runs");
        let pid: i32 = fs::read_to_string(scratch.path("pid"))
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(-1);
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        destroy(pid, &scratch.path("state"));
        assert!(
            output.status.success(),
            "--manage-cgroups-mode {mode}: {}",
            stderr(&output)
        );
        assert!(
            alive,
            "--manage-cgroups-mode {mode}: the container is not running"
        );
    }
}

#[test]
fn empty_network_namespace_has_only_loopback() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let output = scratch
        .restore(
            "netns",
            &["-d", "--empty-ns", "network", "--pid-file", "pid"],
        )
        .output()
        .expect("runs");
    let pid: i32 = fs::read_to_string(scratch.path("pid"))
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(-1);
    let devices = fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    let host = fs::read_link("/proc/self/ns/net").ok();
    let theirs = fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    destroy(pid, &scratch.path("state"));

    assert!(output.status.success(), "{}", stderr(&output));
    let interfaces: Vec<&str> = devices
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(interfaces, ["lo"], "{devices}");
    assert_ne!(
        theirs, host,
        "the container has a network namespace of its own"
    );
}

/// The cgroups named `name` in every hierarchy.
fn cgroup_dirs_named(name: &str) -> Vec<PathBuf> {
    fs::read_dir("/sys/fs/cgroup")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join(name))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn bind_mounts_are_restored_from_their_host_source() {
    if !ready() {
        return;
    }
    if !Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("skipped: runc is not installed (run tools/install-deps)");
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = dir.path().join("bundle");
    let data = dir.path().join("data");
    fs::create_dir_all(&data).expect("bind source");
    fs::create_dir_all(&bundle).expect("bundle");
    let copied = Command::new("cp")
        .args(["-a", "/tmp/criu-fixtures/runc-busybox/rootfs"])
        .arg(bundle.join("rootfs"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(copied, "copy the rootfs");
    fs::create_dir_all(bundle.join("rootfs/data")).expect("mount point");

    // The fixture's config with a bind mount, its own cgroup and a loop writing through it.
    let mut config: serde_json::Value = serde_json::from_slice(
        &fs::read(workspace().join("fixtures/runc-busybox.config.json")).expect("config"),
    )
    .expect("config is JSON");
    config["process"]["args"] = serde_json::json!([
        "/bin/sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i > /data/counter; sleep 0.1; done"
    ]);
    config["linux"]["cgroupsPath"] = serde_json::json!("/criu-restore-bind-test");
    config["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({
            "destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]
        }));
    fs::write(bundle.join("config.json"), config.to_string()).expect("write config");

    let runc_root = dir.path().join("runc");
    // runc's errors go to a file: a detached container keeps runc's stdio open, so reading
    // them from a pipe would wait for the container to end.
    let runc_errors = dir.path().join("runc.err");
    let runc = |args: &[&str]| {
        let errors = fs::File::create(&runc_errors).expect("runc error file");
        let status = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(args)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errors)
            .status()
            .expect("runc runs");
        (
            status.success(),
            fs::read_to_string(&runc_errors).unwrap_or_default(),
        )
    };
    let bundle_arg = bundle.to_str().expect("utf-8");
    let images = dir.path().join("images");
    let images_arg = images.to_str().expect("utf-8");
    let work_arg = dir.path().join("dump-work");
    // The container's stdio must be /dev/null: runc cannot checkpoint stdio on a file outside
    // the container.
    let ran = Command::new("runc")
        .arg("--root")
        .arg(&runc_root)
        .args(["run", "-d", "--bundle", bundle_arg, "bind-source"])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ran, "runc run failed");
    sleep(Duration::from_millis(500));
    let (dumped, errors) = runc(&[
        "checkpoint",
        "--image-path",
        images_arg,
        "--work-path",
        work_arg.to_str().expect("utf-8"),
        "bind-source",
    ]);
    let _ = runc(&["delete", "-f", "bind-source"]);
    for cgroup in cgroup_dirs_named("criu-restore-bind-test") {
        let _ = fs::remove_dir(cgroup);
    }
    assert!(dumped, "runc checkpoint: {errors}");

    let state = dir.path().join("state");
    let output = Command::new(env!("CARGO_BIN_EXE_restore"))
        .arg("--root")
        .arg(&state)
        .args([
            "--bundle",
            bundle_arg,
            "--image-path",
            images_arg,
            "-d",
            "--pid-file",
        ])
        .arg(dir.path().join("pid"))
        .arg("bind-restored")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.path().join("restore.err")).expect("error file"))
        .status()
        .expect("restore runs");
    let restore_errors = fs::read_to_string(dir.path().join("restore.err")).unwrap_or_default();
    let pid: i32 = fs::read_to_string(dir.path().join("pid"))
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(-1);
    let read = || {
        fs::read_to_string(data.join("counter"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let before = read();
    sleep(Duration::from_millis(600));
    let after = read();
    if pid > 1 {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        while Path::new(&format!("/proc/{pid}")).exists() {
            sleep(Duration::from_millis(20));
        }
    }
    for cgroup in cgroup_dirs_named("criu-restore-bind-test") {
        let _ = fs::remove_dir(cgroup);
    }

    assert!(output.success(), "restore: {restore_errors}");
    assert!(
        after > before,
        "the restored loop writes through the bind mount ({before:?} then {after:?})"
    );
}
