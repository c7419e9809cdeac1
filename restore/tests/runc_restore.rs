//! `restore` on the runc busybox checkpoint of `fixtures/`: detached and in the foreground,
//! the same id twice, and failures that must leave nothing behind. Needs root and CRIU (CI
//! installs them); skipped with the reason printed otherwise. The bundle the checkpoint was
//! made from is recreated under /tmp/criu-fixtures by `fixtures/make-fixtures --prepare-only`.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, Once};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, geteuid};

const BUNDLE: &str = "/tmp/criu-fixtures/runc-busybox";
const CGROUP: &str = "criu-fixture-runc-busybox";
const TERMINAL_CGROUP: &str = "criu-fixture-runc-terminal";

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

    /// The pid in the pid file `pid` of the scratch directory, or -1.
    fn pid(&self) -> i32 {
        fs::read_to_string(self.path("pid"))
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(-1)
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

/// Whether the fixture container's counter goes on over 700 ms.
fn counter_goes_on() -> bool {
    let first = counter();
    sleep(Duration::from_millis(700));
    counter() > first
}

/// [`ready`], and a kernel that can serve lazy pages.
fn lazy_ready() -> bool {
    if !ready() {
        return false;
    }
    if !Path::new("/dev/userfaultfd").exists() {
        println!("skipped: no /dev/userfaultfd on this kernel");
        return false;
    }
    true
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
    for dir in cgroup_dirs()
        .into_iter()
        .chain(cgroup_dirs_named(TERMINAL_CGROUP))
    {
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
    // This host runs no SELinux: refused by validation, with the reason, before CRIU runs.
    let selinux = fs::read_to_string("/sys/kernel/security/lsm")
        .unwrap_or_default()
        .contains("selinux");
    if !selinux {
        let profile = ["--lsm-profile", "selinux:system_u:system_r:container_t:s0"];
        let output = scratch.restore("broken", &profile).output().expect("runs");
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert!(
            stderr(&output).contains("lsm-unavailable"),
            "{}",
            stderr(&output)
        );
        assert!(
            !scratch.path("work/restore.log").exists(),
            "CRIU did not run"
        );
        assert!(!state.join("broken").exists());
    }

    for bad in [
        &["--empty-ns", "ipc"][..],
        &["--log-format", "xml"],
        &["--no-such-flag"],
        &["--preload", "sometimes"],
        &["--lazy-pages", "--page-server", "no-port-here"],
        &["--lazy-pages", "--page-server", "host:99999"],
        &["--page-server", "127.0.0.1:27000"],
        &["--lsm-profile", "smack:x"],
    ] {
        let output = scratch.restore("broken", bad).output().expect("runs");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{bad:?}: {}",
            stderr(&output)
        );
        assert!(
            !state.join("broken").exists(),
            "{bad:?} left its state directory"
        );
    }
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
    let pid = scratch.pid();

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
        let pid = scratch.pid();
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
    let pid = scratch.pid();
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

fn runc_installed() -> bool {
    let installed = Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        println!("skipped: runc is not installed (run tools/install-deps)");
    }
    installed
}

/// A container run by runc from a copy of the busybox bundle and checkpointed by runc, for
/// checkpoints the committed fixtures cannot hold (host paths, named namespaces). Its cgroups
/// are removed when it is dropped.
struct RuncCheckpoint {
    dir: tempfile::TempDir,
    cgroup: String,
    v2_only: bool,
}

/// A v2-only view of cgroups on a host that also has v1 hierarchies: the command runs in a
/// mount namespace of its own where `/sys/fs/cgroup` is the v2 hierarchy and nothing else,
/// which is what runc and CRIU look at to tell the cgroup version.
fn in_v2_only_view(program: &str) -> Command {
    let mut command = Command::new("unshare");
    command.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "umount -l /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && exec \"$@\"",
        "v2-only",
        program,
    ]);
    command
}

impl RuncCheckpoint {
    /// `program`, run in the v2-only view when the checkpoint was made in it.
    fn command(&self, program: &str) -> Command {
        if self.v2_only {
            in_v2_only_view(program)
        } else {
            Command::new(program)
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn rootfs(&self) -> PathBuf {
        self.path("bundle/rootfs")
    }

    /// Runs the fixture's container as `name`, with its config and rootfs first changed by
    /// `edit`, and checkpoints it. The container has the cgroup `/<name>` of its own.
    fn make(name: &str, edit: impl FnOnce(&Path, &mut serde_json::Value)) -> RuncCheckpoint {
        RuncCheckpoint::make_in(false, name, edit)
    }

    /// [`RuncCheckpoint::make`], in the v2-only view of cgroups when `v2_only` is set; runc
    /// and `restore` then run in it too.
    fn make_in(
        v2_only: bool,
        name: &str,
        edit: impl FnOnce(&Path, &mut serde_json::Value),
    ) -> RuncCheckpoint {
        let checkpoint = RuncCheckpoint {
            dir: tempfile::tempdir().expect("temp dir"),
            cgroup: name.to_owned(),
            v2_only,
        };
        let bundle = checkpoint.path("bundle");
        fs::create_dir_all(&bundle).expect("bundle");
        let copied = Command::new("cp")
            .args(["-a", "/tmp/criu-fixtures/runc-busybox/rootfs"])
            .arg(checkpoint.rootfs())
            .status()
            .is_ok_and(|s| s.success());
        assert!(copied, "copy the rootfs");

        let mut config: serde_json::Value = serde_json::from_slice(
            &fs::read(workspace().join("fixtures/runc-busybox.config.json")).expect("config"),
        )
        .expect("config is JSON");
        config["linux"]["cgroupsPath"] = serde_json::json!(format!("/{name}"));
        edit(&checkpoint.rootfs(), &mut config);
        fs::write(bundle.join("config.json"), config.to_string()).expect("write config");

        // The container's stdio must be /dev/null: runc cannot checkpoint stdio on a file
        // outside the container, so runc's errors are not kept here.
        let ran = checkpoint
            .command("runc")
            .arg("--root")
            .arg(checkpoint.path("runc"))
            .args([
                "run",
                "-d",
                "--bundle",
                bundle.to_str().expect("utf-8"),
                name,
            ])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ran, "runc run failed");
        sleep(Duration::from_millis(500));
        let images = checkpoint.path("images");
        let work = checkpoint.path("dump-work");
        let (dumped, errors) = checkpoint.runc(&[
            "checkpoint",
            "--image-path",
            images.to_str().expect("utf-8"),
            "--work-path",
            work.to_str().expect("utf-8"),
            name,
        ]);
        let _ = checkpoint.runc(&["delete", "-f", name]);
        checkpoint.remove_cgroups();
        assert!(dumped, "runc checkpoint: {errors}");
        checkpoint
    }

    /// Runs runc with its own state root; its errors go to a file, because a detached
    /// container keeps runc's stdio open and a pipe would wait for the container to end.
    fn runc(&self, args: &[&str]) -> (bool, String) {
        let errors_path = self.path("runc.err");
        let errors = fs::File::create(&errors_path).expect("runc error file");
        let status = self
            .command("runc")
            .arg("--root")
            .arg(self.path("runc"))
            .args(args)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errors)
            .status()
            .expect("runc runs");
        (
            status.success(),
            fs::read_to_string(&errors_path).unwrap_or_default(),
        )
    }

    /// Restores the checkpoint detached as `id`; returns whether `restore` succeeded, its
    /// stderr, and the pid it wrote (-1 for none).
    fn restore(&self, id: &str, extra: &[&str]) -> (bool, String, i32) {
        self.restore_from(&self.path("images"), id, extra)
    }

    /// [`RuncCheckpoint::restore`] from the images in `images`.
    fn restore_from(&self, images: &Path, id: &str, extra: &[&str]) -> (bool, String, i32) {
        let errors_path = self.path("restore.err");
        let _ = fs::remove_file(self.path("pid"));
        let status = self
            .command(env!("CARGO_BIN_EXE_restore"))
            .arg("--root")
            .arg(self.path("state"))
            .arg("--bundle")
            .arg(self.path("bundle"))
            .arg("--image-path")
            .arg(images)
            .args(["-d", "--pid-file"])
            .arg(self.path("pid"))
            .args(extra)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&errors_path).expect("error file"))
            .status()
            .expect("restore runs");
        let pid = fs::read_to_string(self.path("pid"))
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(-1);
        (
            status.success(),
            fs::read_to_string(&errors_path).unwrap_or_default(),
            pid,
        )
    }

    /// Kills a restored container and waits until it is gone.
    fn kill(&self, pid: i32) {
        if pid > 1 {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                sleep(Duration::from_millis(20));
            }
        }
        self.remove_cgroups();
    }

    fn remove_cgroups(&self) {
        for cgroup in cgroup_dirs_named(&self.cgroup) {
            let _ = fs::remove_dir(cgroup);
        }
    }
}

impl Drop for RuncCheckpoint {
    fn drop(&mut self) {
        self.remove_cgroups();
    }
}

/// A number the container's loop writes to `path`, read twice some time apart.
fn counts(path: &Path) -> (Option<u64>, Option<u64>) {
    let read = || {
        fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let before = read();
    sleep(Duration::from_millis(600));
    (before, read())
}

#[test]
fn bind_mounts_are_restored_from_their_host_source() {
    if !ready() || !runc_installed() {
        return;
    }
    let _serial = serial();
    let host = tempfile::tempdir().expect("temp dir");
    let data = host.path().join("data");
    let marker = host.path().join("marker");
    fs::create_dir_all(&data).expect("bind source");
    fs::write(&marker, "from the host\n").expect("file bind source");

    // The directory mount goes through an absolute symlink inside the rootfs, which must be
    // resolved inside the rootfs as runc resolved it at dump; the file mount is a file.
    let checkpoint = RuncCheckpoint::make("criu-restore-bind-test", |rootfs, config| {
        fs::create_dir_all(rootfs.join("srv")).expect("srv");
        std::os::unix::fs::symlink("/srv", rootfs.join("volumes")).expect("symlink");
        config["process"]["args"] = serde_json::json!([
            "/bin/sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i > /volumes/data/counter; sleep 0.1; done"
        ]);
        let mounts = config["mounts"].as_array_mut().expect("mounts");
        mounts.push(serde_json::json!({
            "destination": "/volumes/data", "type": "bind", "source": data,
            "options": ["rbind", "rw"]
        }));
        mounts.push(serde_json::json!({
            "destination": "/etc/marker", "type": "bind", "source": marker,
            "options": ["bind", "ro"]
        }));
    });

    // A rootfs without the mount points runc made at start: restore must make them again.
    let rootfs = checkpoint.rootfs();
    fs::remove_dir(rootfs.join("srv/data")).expect("remove the directory mount point");
    fs::remove_file(rootfs.join("etc/marker")).expect("remove the file mount point");

    let (restored, errors, pid) = checkpoint.restore("bind-restored", &[]);
    let (before, after) = counts(&data.join("counter"));
    let marker_seen = fs::read_to_string(format!("/proc/{pid}/root/etc/marker")).ok();
    checkpoint.kill(pid);

    assert!(restored, "restore: {errors}");
    assert!(
        after > before,
        "the restored loop writes through the bind mount ({before:?} then {after:?})"
    );
    assert_eq!(marker_seen.as_deref(), Some("from the host\n"));
    assert!(rootfs.join("srv/data").is_dir(), "a directory mount point");
    assert!(rootfs.join("etc/marker").is_file(), "a file mount point");
}

#[test]
fn a_missing_bind_source_fails_before_criu_and_leaves_nothing() {
    if !ready() || !runc_installed() {
        return;
    }
    let _serial = serial();
    let host = tempfile::tempdir().expect("temp dir");
    let data = host.path().join("data");
    fs::create_dir_all(&data).expect("bind source");
    let checkpoint = RuncCheckpoint::make("criu-restore-source-test", |_, config| {
        config["mounts"]
            .as_array_mut()
            .expect("mounts")
            .push(serde_json::json!({
                "destination": "/data", "type": "bind", "source": data, "options": ["rbind"]
            }));
    });
    fs::remove_dir(&data).expect("remove the source");

    let (restored, errors, pid) = checkpoint.restore("source-missing", &[]);
    checkpoint.kill(pid);

    assert!(!restored);
    assert!(
        errors.contains(&format!("bind-source-missing ({})", data.display())),
        "{errors}"
    );
    assert!(errors.contains("before starting CRIU"), "{errors}");
    assert!(!checkpoint.path("state/source-missing").exists());
    assert!(!mounted_below(&checkpoint.path("state")));
    assert_eq!(
        cgroup_dirs_named("criu-restore-source-test"),
        Vec::<PathBuf>::new()
    );
}

#[test]
fn a_network_namespace_path_is_restored_into() {
    if !ready() || !runc_installed() {
        return;
    }
    if !Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("skipped: ip (iproute2) is not installed");
        return;
    }
    let _serial = serial();
    let name = "criu-restore-test";
    let _ = Command::new("ip")
        .args(["netns", "delete", name])
        .stderr(Stdio::null())
        .status();
    let added = Command::new("ip")
        .args(["netns", "add", name])
        .status()
        .is_ok_and(|s| s.success());
    assert!(added, "ip netns add");
    let netns = PathBuf::from(format!("/run/netns/{name}"));

    // runc checkpoints a container in a named network namespace as external, and restore
    // must hand the same namespace back to CRIU under runc's key.
    let checkpoint = RuncCheckpoint::make("criu-restore-netns-test", |_, config| {
        let namespaces = config["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces");
        namespaces.retain(|ns| ns["type"] != "network");
        namespaces.push(serde_json::json!({"type": "network", "path": netns}));
    });
    let (restored, errors, pid) = checkpoint.restore("netns-restored", &[]);
    let theirs = fs::metadata(format!("/proc/{pid}/ns/net"))
        .map(|m| m.ino())
        .ok();
    let wanted = fs::metadata(&netns).map(|m| m.ino()).ok();
    let state = fs::read_to_string(checkpoint.path("state/netns-restored/state.json"));
    checkpoint.kill(pid);
    let _ = Command::new("ip").args(["netns", "delete", name]).status();

    assert!(restored, "restore: {errors}");
    assert!(wanted.is_some());
    assert_eq!(theirs, wanted, "the container is in the named namespace");
    let state: serde_json::Value =
        serde_json::from_str(&state.expect("state.json")).expect("state is JSON");
    assert_eq!(
        state["namespace_paths"]["network"],
        netns.display().to_string()
    );
}

#[test]
fn corrupt_images_are_refused_before_criu_runs_or_fail_in_criu_when_forced() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let core = scratch.path("images/core-1.img");
    let bytes = fs::read(&core).expect("core image");
    fs::write(&core, &bytes[..bytes.len() / 2]).expect("truncate the core image");

    // Validation names the image before anything is set up: CRIU never runs.
    let output = scratch
        .restore("corrupt", &["-d", "--pid-file", "pid"])
        .output()
        .expect("runs");
    let errors = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{errors}");
    assert!(errors.contains("image-corrupt (core-1.img)"), "{errors}");
    assert!(
        !scratch.path("work/restore.log").exists(),
        "CRIU did not run"
    );
    assert!(!scratch.path("state/corrupt").exists(), "no state");

    // Forced past validation, CRIU fails mid-restore: its message, and nothing left behind.
    let output = scratch
        .restore("corrupt", &["-d", "--pid-file", "pid", "--skip-validation"])
        .output()
        .expect("runs");
    let errors = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{errors}");
    assert!(errors.contains("validation skipped"), "a warning: {errors}");
    assert!(errors.contains("CRIU restore failed"), "{errors}");
    assert!(errors.contains("restore.log"), "the log is named: {errors}");
    assert!(!scratch.path("pid").exists(), "no pid file");
    assert!(!scratch.path("state/corrupt").exists(), "no state");
    assert!(!mounted_below(&scratch.path("state")), "no CRIU root");
    assert_eq!(cgroup_dirs(), Vec::<PathBuf>::new(), "no cgroups");
}

#[test]
fn auto_dedup_consumes_the_pages_it_restores() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let pages = scratch.path("images/pages-1.img");
    let size = fs::metadata(&pages).expect("pages").len();
    assert!(
        fs::read(&pages).expect("pages").iter().any(|&b| b != 0),
        "the fixture has data"
    );

    let output = scratch
        .restore("dedup", &["-d", "--auto-dedup", "--pid-file", "pid"])
        .output()
        .expect("runs");
    let pid = scratch.pid();
    let running = counter_goes_on();
    destroy(pid, &scratch.path("state"));

    assert!(output.status.success(), "{}", stderr(&output));
    assert!(running, "the container runs on");
    let after = fs::read(&pages).expect("pages");
    assert_eq!(after.len() as u64, size, "the file keeps its size");
    assert!(
        after.iter().all(|&b| b == 0),
        "its restored pages are punched out"
    );
}

#[test]
fn lazy_pages_are_served_by_a_lazy_pages_daemon() {
    if !lazy_ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let work = scratch.path("work");
    fs::create_dir_all(&work).expect("work dir");
    let mut daemon = Command::new("criu")
        .arg("lazy-pages")
        .arg("--images-dir")
        .arg(scratch.path("images"))
        .arg("--work-dir")
        .arg(&work)
        .args(["-o", "lazy-pages.log", "-v4"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("criu lazy-pages starts");
    let socket = work.join("lazy-pages.socket");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }

    let output = scratch
        .restore("lazy", &["-d", "--lazy-pages", "--pid-file", "pid"])
        .output()
        .expect("runs");
    let pid = scratch.pid();
    let running = counter_goes_on();
    // The daemon exits by itself once it has delivered every page.
    let deadline = Instant::now() + Duration::from_secs(10);
    let daemon_status = loop {
        if let Ok(Some(status)) = daemon.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            let _ = daemon.wait();
            break None;
        }
        sleep(Duration::from_millis(50));
    };
    let log = fs::read_to_string(work.join("lazy-pages.log")).unwrap_or_default();
    destroy(pid, &scratch.path("state"));

    assert!(
        socket.exists() || daemon_status.is_some(),
        "the daemon made its socket"
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(running, "the lazily restored container runs on");
    assert!(
        daemon_status.is_some_and(|s| s.success()),
        "the daemon finished serving pages ({daemon_status:?}): {}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn a_changed_cgroups_path_is_restored_into_in_every_hierarchy() {
    if !ready() || !runc_installed() {
        return;
    }
    let _serial = serial();
    let checkpoint = RuncCheckpoint::make("criu-restore-cgroup-old", |_, _| {});
    let config_path = checkpoint.path("bundle/config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(&config_path).expect("config")).expect("JSON");
    config["linux"]["cgroupsPath"] = serde_json::json!("/criu-restore-cgroup-new");
    fs::write(&config_path, config.to_string()).expect("write config");

    let (restored, errors, pid) = checkpoint.restore("cgroup-moved", &[]);
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    checkpoint.kill(pid);
    for cgroup in cgroup_dirs_named("criu-restore-cgroup-new") {
        let _ = fs::remove_dir(cgroup);
    }

    assert!(restored, "restore: {errors}");
    assert!(!cgroups.is_empty());
    for line in cgroups.lines() {
        assert!(
            line.ends_with(":/criu-restore-cgroup-new"),
            "every hierarchy, the v2 one too: {cgroups}"
        );
    }
}

/// The host's v2 hierarchy: where it is mounted and whether it is the only one.
fn cgroup_v2_mount() -> Option<(PathBuf, bool)> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    fn fs_type(line: &str) -> Option<&str> {
        line.split(" - ").nth(1)?.split_whitespace().next()
    }
    let v1 = mounts.lines().any(|l| fs_type(l) == Some("cgroup"));
    mounts
        .lines()
        .find(|l| fs_type(l) == Some("cgroup2"))
        .and_then(|l| l.split_whitespace().nth(4))
        .map(|mount_point| (PathBuf::from(mount_point), !v1))
}

#[test]
fn cgroup_v2_only_restores_create_and_remove_the_v2_cgroup() {
    if !ready() || !runc_installed() {
        return;
    }
    let Some((v2_mount, v2_only_host)) = cgroup_v2_mount() else {
        println!("skipped: this host has no cgroup v2 hierarchy");
        return;
    };
    let _serial = serial();
    // On a host with v1 hierarchies the test runs runc, CRIU and restore where only the v2
    // hierarchy is mounted. Its controllers stay bound to v1 there, so this covers the paths,
    // the cgroup root CRIU is given and the clean-up, not v2 resource limits.
    let checkpoint = RuncCheckpoint::make_in(!v2_only_host, "criu-restore-v2-old", |_, _| {});
    let config_path = checkpoint.path("bundle/config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(&config_path).expect("config")).expect("JSON");
    config["linux"]["cgroupsPath"] = serde_json::json!("/criu-restore-v2-new");
    // Limits the v2 hierarchy offers here: hugetlb is the one controller not bound to v1.
    let hugetlb = fs::read_to_string(v2_mount.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| c == "hugetlb")
        && Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists();
    config["linux"]["resources"]["unified"] = serde_json::json!({"cgroup.max.descendants": "7"});
    if hugetlb {
        config["linux"]["resources"]["hugepageLimits"] =
            serde_json::json!([{"pageSize": "2MB", "limit": 4194304}]);
    }
    fs::write(&config_path, config.to_string()).expect("write config");
    let new_cgroup = v2_mount.join("criu-restore-v2-new");

    // A restore that CRIU fails takes its v2 cgroup back.
    let corrupt = checkpoint.path("corrupt-images");
    fs::create_dir(&corrupt).expect("corrupt copy");
    for entry in fs::read_dir(checkpoint.path("images")).expect("images") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), corrupt.join(entry.file_name())).expect("copy image");
    }
    let core = corrupt.join("core-1.img");
    let bytes = fs::read(&core).expect("core image");
    fs::write(&core, &bytes[..bytes.len() / 2]).expect("truncate");
    let (failed_restore, failure, _) =
        checkpoint.restore_from(&corrupt, "v2-broken", &["--skip-validation"]);
    let left_after_failure = new_cgroup.exists();

    let (restored, errors, pid) = checkpoint.restore("v2-restored", &[]);
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let (before, after) = counts(&checkpoint.rootfs().join("counter"));
    let procs = fs::read_to_string(new_cgroup.join("cgroup.procs")).unwrap_or_default();
    let read = |file: &str| {
        fs::read_to_string(new_cgroup.join(file))
            .map(|t| t.trim().to_owned())
            .unwrap_or_default()
    };
    let (descendants, hugetlb_max) = (read("cgroup.max.descendants"), read("hugetlb.2MB.max"));
    checkpoint.kill(pid);
    let _ = fs::remove_dir(&new_cgroup);

    assert!(!failed_restore, "the corrupt images do not restore");
    assert!(failure.contains("CRIU restore failed"), "{failure}");
    assert!(
        !left_after_failure,
        "the failed restore left {}",
        new_cgroup.display()
    );
    assert!(restored, "restore: {errors}");
    assert!(
        after > before,
        "the container runs on ({before:?} then {after:?})"
    );
    assert!(
        cgroups.lines().any(|l| l == "0::/criu-restore-v2-new"),
        "in the new v2 cgroup: {cgroups}"
    );
    assert!(
        procs.lines().any(|l| l.trim() == pid.to_string()),
        "{} lists the container: {procs:?}",
        new_cgroup.display()
    );
    assert_eq!(descendants, "7", "the unified map is written");
    if hugetlb {
        assert_eq!(
            hugetlb_max, "4194304",
            "hugepage limits go to hugetlb.2MB.max"
        );
    }
}

/// A bundle beside the scratch checkpoint: the fixture's config with `hooks`, on the fixture's
/// rootfs. Each hook is `record.sh PHASE [FAIL]`, which appends "PHASE STATE-JSON" to
/// `hooks.log` and, given FAIL, fails loudly.
fn hooked_bundle(scratch: &Scratch, hooks: serde_json::Value) -> PathBuf {
    let script = scratch.path("record.sh");
    let log = scratch.path("hooks.log");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s %s\\n' \"$1\" \"$(cat)\" >> {}\n\
             if [ -n \"$2\" ]; then echo \"no network for you\" >&2; exit 3; fi\n",
            log.display()
        ),
    )
    .expect("hook script");
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let hook = |args: &[&str]| {
        let mut argv = vec![script.display().to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        serde_json::json!({"path": script, "args": argv})
    };
    let mut hooks_config = serde_json::Map::new();
    for (phase, args) in hooks.as_object().expect("phases") {
        let args: Vec<&str> = args
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        hooks_config.insert(phase.clone(), serde_json::json!([hook(&args)]));
    }
    bundle_with(scratch, |config| {
        config["hooks"] = serde_json::Value::Object(hooks_config);
    })
}

/// A bundle beside the scratch checkpoint: the fixture's config changed by `edit`, on the
/// fixture's rootfs.
fn bundle_with(scratch: &Scratch, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let bundle = scratch.path("edited-bundle");
    fs::create_dir_all(&bundle).expect("bundle");
    let mut config: serde_json::Value = serde_json::from_slice(
        &fs::read(Path::new(BUNDLE).join("config.json")).expect("fixture config"),
    )
    .expect("JSON");
    config["root"]["path"] = serde_json::json!(format!("{BUNDLE}/rootfs"));
    edit(&mut config);
    fs::write(bundle.join("config.json"), config.to_string()).expect("config");
    bundle
}

#[test]
fn the_configs_resources_are_written_to_the_v1_cgroups() {
    if !ready() {
        return;
    }
    let memory = Path::new("/sys/fs/cgroup/memory");
    if !memory.join("memory.limit_in_bytes").exists() {
        println!("skipped: this host has no v1 memory hierarchy");
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let bundle = bundle_with(&scratch, |config| {
        config["linux"]["resources"] = serde_json::json!({
            "devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw"}
            ],
            "memory": {"limit": 67108864, "reservation": 33554432, "swap": 134217728},
            "cpu": {"shares": 512, "quota": 50000, "period": 100000},
            "pids": {"limit": 40}
        });
    });
    let output = scratch
        .restore(
            "limited",
            &[
                "-d",
                "--bundle",
                bundle.to_str().expect("utf-8"),
                "--pid-file",
                "pid",
            ],
        )
        .output()
        .expect("runs");
    let pid = scratch.pid();
    let read = |controller: &str, file: &str| {
        fs::read_to_string(
            Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(CGROUP)
                .join(file),
        )
        .map(|t| t.trim().to_owned())
        .unwrap_or_default()
    };
    let values = [
        read("memory", "memory.limit_in_bytes"),
        read("memory", "memory.soft_limit_in_bytes"),
        read("pids", "pids.max"),
        read("cpu", "cpu.shares"),
        read("cpu", "cpu.cfs_quota_us"),
        read("cpu", "cpu.cfs_period_us"),
    ];
    let swap = read("memory", "memory.memsw.limit_in_bytes");
    let devices = read("devices", "devices.list");
    let running = counter_goes_on();
    destroy(pid, &scratch.path("state"));

    assert!(output.status.success(), "{}", stderr(&output));
    assert!(running, "the limited container runs on");
    assert_eq!(
        values,
        ["67108864", "33554432", "40", "512", "50000", "100000"].map(String::from)
    );
    if Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists() {
        assert_eq!(swap, "134217728");
    }
    let rules: Vec<&str> = devices.lines().collect();
    assert!(!rules.contains(&"a *:* rwm"), "not every device: {devices}");
    for rule in ["c 10:229 rw", "c 1:3 rwm", "c 136:* rwm", "b *:* m"] {
        assert!(rules.contains(&rule), "{rule} in {devices}");
    }
}

/// The hook log as (phase, state) pairs.
fn hook_calls(scratch: &Scratch) -> Vec<(String, serde_json::Value)> {
    fs::read_to_string(scratch.path("hooks.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(phase, json)| {
            (
                phase.to_owned(),
                serde_json::from_str(json).expect("the hook read JSON"),
            )
        })
        .collect()
}

#[test]
fn hooks_run_where_runc_runs_them() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let bundle = hooked_bundle(
        &scratch,
        serde_json::json!({
            "prestart": ["prestart"],
            "createRuntime": ["createRuntime"],
            "poststart": ["poststart"],
            "poststop": ["poststop"]
        }),
    );
    let pid_file = scratch.path("hooked.pid");
    let mut child = scratch
        .restore(
            "hooked",
            &[
                "--bundle",
                bundle.to_str().expect("utf-8"),
                "--pid-file",
                pid_file.to_str().expect("utf-8"),
            ],
        )
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
    let while_running = hook_calls(&scratch);
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill the container");
    let output = child.wait_with_output().expect("restore exits");
    let calls = hook_calls(&scratch);

    assert_eq!(output.status.code(), Some(128 + 9), "{}", stderr(&output));
    let phases: Vec<&str> = while_running.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        phases,
        ["prestart", "createRuntime"],
        "no poststart on restore"
    );
    for (phase, state) in &while_running {
        assert_eq!(state["id"], "hooked", "{phase}");
        assert_eq!(state["pid"], pid, "{phase} sees the restored init");
        assert_eq!(state["status"], "creating", "{phase}");
        assert_eq!(state["bundle"], bundle.display().to_string(), "{phase}");
    }
    let phases: Vec<&str> = calls.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(phases, ["prestart", "createRuntime", "poststop"]);
    assert_eq!(calls[2].1["status"], "stopped");
}

#[test]
fn a_failing_hook_aborts_the_restore_and_leaves_nothing() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let bundle = hooked_bundle(
        &scratch,
        serde_json::json!({
            "createRuntime": ["createRuntime", "fail"],
            "poststop": ["poststop"]
        }),
    );
    let output = scratch
        .restore(
            "hook-fails",
            &[
                "-d",
                "--bundle",
                bundle.to_str().expect("utf-8"),
                "--pid-file",
                "pid",
            ],
        )
        .output()
        .expect("runs");
    let errors = stderr(&output);
    let phases: Vec<String> = hook_calls(&scratch).into_iter().map(|(p, _)| p).collect();

    assert_eq!(output.status.code(), Some(1), "{errors}");
    assert!(errors.contains("the createRuntime hook"), "{errors}");
    assert!(errors.contains("no network for you"), "{errors}");
    assert_eq!(
        phases,
        ["createRuntime", "poststop"],
        "poststop takes it down"
    );
    assert!(!scratch.path("pid").exists(), "no pid file");
    assert!(!scratch.path("state/hook-fails").exists(), "no state");
    assert!(!mounted_below(&scratch.path("state")), "no CRIU root");
    assert_eq!(cgroup_dirs(), Vec::<PathBuf>::new(), "no cgroups");
}

/// The pids whose pid namespace is `inode`.
fn pids_in_namespace(inode: u64) -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    fs::metadata(format!("/proc/{pid}/ns/pid")).is_ok_and(|m| m.ino() == inode)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_pid_namespace_path_is_restored_into() {
    if !ready() || !runc_installed() {
        return;
    }
    let _serial = serial();
    // The namespace's init reaps whatever is left to it, so the checkpointed container's pid
    // becomes free again once runc has killed it.
    let mut holder = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "/usr/bin/python3", "-c"])
        .arg(
            "import os, time\nwhile True:\n    try:\n        os.waitpid(-1, 0)\n    \
             except ChildProcessError:\n        time.sleep(0.05)\n",
        )
        .stdin(Stdio::null())
        .spawn()
        .expect("a pid namespace holder starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (init, inode) = loop {
        let own = fs::metadata("/proc/self/ns/pid").map(|m| m.ino()).ok();
        let child = fs::read_to_string(format!("/proc/{}/task/{0}/children", holder.id()))
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<i32>().ok());
        let found = child.and_then(|pid| {
            let inode = fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?.ino();
            (Some(inode) != own).then_some((pid, inode))
        });
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "the pid namespace holder did not start"
        );
        sleep(Duration::from_millis(20));
    };
    let namespace = PathBuf::from(format!("/proc/{init}/ns/pid"));

    let checkpoint = RuncCheckpoint::make("criu-restore-pidns-test", |_, config| {
        for ns in config["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
        {
            if ns["type"] == "pid" {
                ns["path"] = serde_json::json!(namespace);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids_in_namespace(inode) != [init] && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }

    let (restored, errors, pid) = checkpoint.restore("pidns-restored", &[]);
    let theirs = fs::metadata(format!("/proc/{pid}/ns/pid"))
        .map(|m| m.ino())
        .ok();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    checkpoint.kill(pid);
    let _ = holder.kill();
    let _ = holder.wait();

    assert!(restored, "restore: {errors}");
    assert_eq!(
        theirs,
        Some(inode),
        "the container is in the named pid namespace"
    );
    let nspid = status.lines().find(|l| l.starts_with("NSpid:"));
    assert_eq!(
        nspid.map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>()),
        Some(vec![pid.to_string().as_str(), "2"]),
        "pid 2 inside, as at checkpoint"
    );
}

#[test]
fn ipc_and_uts_namespace_paths_are_joined() {
    if !ready() || !runc_installed() {
        return;
    }
    let _serial = serial();
    // `unshare` execs the sleep, so the child's pid holds the new namespaces.
    let mut holder = Command::new("unshare")
        .args(["--ipc", "--uts", "sleep", "120"])
        .stdin(Stdio::null())
        .spawn()
        .expect("a namespace holder starts");
    let own = fs::read_link("/proc/self/ns/ipc").ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{}/ns/ipc", holder.id())).ok() == own {
        assert!(
            Instant::now() < deadline,
            "the namespace holder did not start"
        );
        sleep(Duration::from_millis(20));
    }
    let namespace = |kind: &str| PathBuf::from(format!("/proc/{}/ns/{kind}", holder.id()));

    let checkpoint = RuncCheckpoint::make("criu-restore-joinns-test", |_, config| {
        for ns in config["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
        {
            if let Some(kind @ ("ipc" | "uts")) = ns["type"].as_str() {
                ns["path"] = serde_json::json!(namespace(kind));
            }
        }
    });
    let (restored, errors, pid) = checkpoint.restore("joinns-restored", &[]);
    let joined = |kind: &str| {
        let theirs = fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
        theirs.is_some() && theirs == fs::read_link(namespace(kind)).ok()
    };
    let (ipc, uts) = (joined("ipc"), joined("uts"));
    checkpoint.kill(pid);
    let _ = holder.kill();
    let _ = holder.wait();

    assert!(restored, "restore: {errors}");
    assert!(ipc, "the container joined the ipc namespace");
    assert!(uts, "the container joined the uts namespace");
}

/// Every file under `dir` with its bytes, for before-and-after comparisons.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(dir)
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| (e.path(), fs::read(e.path()).expect("read")))
        .collect();
    files.sort();
    files
}

#[test]
fn a_dry_run_reports_the_restore_and_changes_nothing() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let before = snapshot(&scratch.path("images"));
    let output = scratch
        .restore("dry", &["--dry-run", "--json", "--lsm-profile", "none:"])
        .stdout(Stdio::piped())
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(plan["valid"], true);
    assert_eq!(plan["findings"], serde_json::json!([]));
    let request = &plan["criu_request"];
    assert_eq!(request["manage_cgroups_mode"], "soft");
    assert_eq!(request["lsm_profile"], "none:");
    assert_eq!(request["rst_sibling"], true);
    assert!(
        request["cg_root"]
            .as_array()
            .is_some_and(|roots| roots.iter().any(|r| r["path"] == format!("/{CGROUP}")))
    );
    assert!(
        plan["cgroup_settings"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    );

    // Nothing was set up and nothing written.
    assert!(!scratch.path("state/dry").exists());
    assert!(!scratch.path("work/restore.log").exists());
    assert_eq!(cgroup_dirs(), Vec::<PathBuf>::new());
    assert_eq!(snapshot(&scratch.path("images")), before);

    // A checkpoint that would be refused: the dry run says why and exits 1.
    let core = scratch.path("images/core-1.img");
    let bytes = fs::read(&core).expect("core");
    fs::write(&core, &bytes[..bytes.len() / 2]).expect("truncate");
    let output = scratch
        .restore("dry", &["--dry-run"])
        .stdout(Stdio::piped())
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("would refuse to restore"), "{text}");
    assert!(text.contains("image-corrupt (core-1.img)"), "{text}");

    // The rewrite the LSM options need cannot read it either: one more finding, not an
    // error that hides the others.
    let output = scratch
        .restore("dry", &["--dry-run", "--lsm-profile", "none:"])
        .stdout(Stdio::piped())
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("image-corrupt (core-1.img)"), "{text}");
    assert!(text.contains("rewrite-impossible"), "{text}");
}

#[test]
fn lsm_labels_are_rewritten_into_a_shadow_and_the_originals_stay() {
    if !ready() {
        return;
    }
    let _serial = serial();
    // A checkpoint as if dumped under SELinux: the fixture with every thread labelled and
    // the inventory saying SELINUX. This host runs no SELinux, so it restores only with its
    // labels rewritten to none.
    let scratch = Scratch::new();
    let labelled = scratch.path("labelled");
    let selinux: restore::lsm::LsmProfile = "selinux:system_u:system_r:container_t:s0"
        .parse()
        .expect("profile");
    restore::lsm::write_shadow(&scratch.path("images"), &labelled, Some(&selinux), None)
        .expect("labelled copy");
    let labelled_arg = labelled.to_str().expect("utf-8");
    let before = snapshot(&labelled);

    let output = scratch
        .restore("labelled", &["-d", "--image-path", labelled_arg])
        .output()
        .expect("runs");
    let refused = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{refused}");
    assert!(refused.contains("lsm-unavailable"), "{refused}");

    let dry = scratch
        .restore(
            "labelled",
            &["--dry-run", "--json", "--image-path", labelled_arg],
        )
        .args(["--lsm-profile", "none:"])
        .stdout(Stdio::piped())
        .output()
        .expect("runs");
    let plan: serde_json::Value = serde_json::from_slice(&dry.stdout).expect("JSON");
    let fields: Vec<&str> = plan["rewrites"]
        .as_array()
        .expect("rewrites")
        .iter()
        .filter_map(|c| c["field"].as_str())
        .collect();
    assert!(fields.contains(&"lsmtype"), "{fields:?}");
    assert!(
        fields.contains(&"thread_core.creds.lsm_profile"),
        "{fields:?}"
    );
    assert!(
        plan["criu_request"]["images_dir"]
            .as_str()
            .is_some_and(|d| d.ends_with("labelled/shadow-images")),
        "{}",
        plan["criu_request"]
    );

    let output = scratch
        .restore(
            "labelled",
            &[
                "-d",
                "--image-path",
                labelled_arg,
                "--pid-file",
                "pid",
                "--lsm-profile",
                "none:",
            ],
        )
        .output()
        .expect("runs");
    let pid = scratch.pid();
    let running = counter_goes_on();
    let shadow_left = scratch.path("state/labelled/shadow-images").exists();
    destroy(pid, &scratch.path("state"));

    assert!(output.status.success(), "{}", stderr(&output));
    assert!(running, "the relabelled container runs on");
    assert!(!shadow_left, "the shadow images go once CRIU is done");
    assert_eq!(
        snapshot(&labelled),
        before,
        "the checkpoint's images are untouched"
    );
}

/// Pids of running `criu lazy-pages` processes.
fn lazy_daemons() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let text = String::from_utf8_lossy(&cmdline);
                    text.contains("lazy-pages\0--images-dir")
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn lazy_pages_start_their_own_daemon_which_serves_and_exits() {
    if !lazy_ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let output = scratch
        .restore("lazy-own", &["-d", "--lazy-pages", "--pid-file", "pid"])
        .output()
        .expect("runs");
    let pid = scratch.pid();
    let running = counter_goes_on();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lazy_daemons().is_empty() && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
    let left = lazy_daemons();
    let log = fs::read_to_string(scratch.path("work/lazy-pages.log")).unwrap_or_default();
    destroy(pid, &scratch.path("state"));
    for daemon in &left {
        let _ = kill(Pid::from_raw(*daemon), Signal::SIGKILL);
    }

    assert!(output.status.success(), "{}", stderr(&output));
    assert!(running, "the lazily restored container runs on");
    assert!(
        left.is_empty(),
        "the daemon exits once it has served every page"
    );
    assert!(
        log.contains("UFFD transferred pages"),
        "the daemon served pages: {log}"
    );
}

#[test]
fn a_lazy_pages_daemon_that_fails_stops_the_restore_cleanly() {
    if !lazy_ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();

    // No page server listens there: the daemon gives up before the restore starts.
    let output = scratch
        .restore(
            "lazy-broken",
            &["-d", "--lazy-pages", "--page-server", "127.0.0.1:9"],
        )
        .output()
        .expect("runs");
    let errors = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{errors}");
    assert!(errors.contains("criu lazy-pages"), "{errors}");
    assert!(!scratch.path("state/lazy-broken").exists());

    // A page server that accepts and then fails while CRIU restores (CRIU 4.1.1's page
    // server cannot serve lazy pages from an images directory): the daemon dies mid-restore,
    // which would leave CRIU waiting forever; the restore stops it and cleans up.
    let port = 27000 + (std::process::id() % 1000) as u16;
    let source = scratch.path("source");
    fs::create_dir(&source).expect("source dir");
    for entry in fs::read_dir(scratch.path("images")).expect("images") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), source.join(entry.file_name())).expect("copy");
    }
    let mut server = Command::new("criu")
        .args(["page-server", "--images-dir"])
        .arg(&source)
        .args([
            "--address",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--lazy-pages",
        ])
        .args(["-o", "page-server.log"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("criu page-server starts");
    sleep(Duration::from_millis(500));
    let started = Instant::now();
    let output = scratch
        .restore(
            "lazy-dies",
            &[
                "-d",
                "--lazy-pages",
                "--page-server",
                &format!("127.0.0.1:{port}"),
            ],
        )
        .output()
        .expect("runs");
    let took = started.elapsed();
    let _ = server.kill();
    let _ = server.wait();
    let errors = stderr(&output);
    for daemon in lazy_daemons() {
        let _ = kill(Pid::from_raw(daemon), Signal::SIGKILL);
    }

    assert_eq!(output.status.code(), Some(1), "{errors}");
    assert!(took < Duration::from_secs(60), "no hang: {took:?}");
    assert!(
        errors.contains("criu lazy-pages failed during the restore"),
        "{errors}"
    );
    assert!(!scratch.path("state/lazy-dies").exists(), "no state");
    assert!(!mounted_below(&scratch.path("state")), "no CRIU root");
    assert!(!mounted_below(&scratch.path("work")), "no cgroup yard");
    assert_eq!(cgroup_dirs(), Vec::<PathBuf>::new(), "no cgroups");
}

#[test]
fn preloading_changes_nothing_of_the_restored_container() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new();
    let output = scratch
        .restore(
            "preloaded",
            &["-d", "--preload", "on", "--pid-file", "pid", "--debug"],
        )
        .output()
        .expect("runs");
    let pid = scratch.pid();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let running = counter_goes_on();
    destroy(pid, &scratch.path("state"));

    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(comm.trim(), "sh");
    assert!(running, "the container counts on as without preloading");
    assert!(
        stderr(&output).contains("preloading stopped"),
        "{}",
        stderr(&output)
    );
}
