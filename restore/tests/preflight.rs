//! The container checks of `restore`'s preflight, each against the runc busybox checkpoint
//! with the bundle around it broken the way bundles get broken. No CRIU is run; the bundle's
//! rootfs is recreated under /tmp/criu-fixtures by `fixtures/make-fixtures --prepare-only`
//! when it is missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use criu_images::validate::{Report, Severity};
use oci_spec::runtime::Spec;
use restore::preflight::{Plan, check};

const BUNDLE: &str = "/tmp/criu-fixtures/runc-busybox";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The fixture's bundle, made if needed; `None` (with the reason printed) when it cannot be.
fn fixture_rootfs() -> Option<PathBuf> {
    let rootfs = Path::new(BUNDLE).join("rootfs");
    if !rootfs.join("bin/busybox").exists() {
        let made = Command::new("bash")
            .arg(workspace().join("fixtures/make-fixtures"))
            .arg("--prepare-only")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            println!("skipped: fixtures/make-fixtures --prepare-only failed (needs root)");
            return None;
        }
    }
    Some(rootfs)
}

/// A copy of the checkpoint's rootfs and config that a test may break.
struct Bundle {
    dir: tempfile::TempDir,
    spec: Spec,
}

impl Bundle {
    fn new() -> Option<Bundle> {
        let rootfs = fixture_rootfs()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&rootfs)
            .arg(dir.path().join("rootfs"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(copied, "copy the rootfs");
        let spec = Spec::load(workspace().join("fixtures/runc-busybox.config.json"))
            .expect("fixture config");
        Some(Bundle { dir, spec })
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    fn images(&self) -> PathBuf {
        workspace().join("fixtures/runc-busybox")
    }

    fn edit(&mut self, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut json = serde_json::to_value(&self.spec).expect("spec to JSON");
        edit(&mut json);
        self.spec = serde_json::from_value(json).expect("an edited spec");
    }

    /// The findings for a restore with `--auto-dedup` as given and the LSM options
    /// (`--lsm-profile`, `--lsm-mount-context`).
    fn report(&self, auto_dedup: bool, lsm: (Option<&str>, Option<&str>)) -> Report {
        let images = self.images();
        let rootfs = self.rootfs();
        check(&Plan {
            images: &images,
            spec: &self.spec,
            rootfs: &rootfs,
            lazy_pages: false,
            auto_dedup,
            lsm_profile: lsm.0,
            lsm_mount_context: lsm.1,
        })
    }

    fn codes(&self, lsm: (Option<&str>, Option<&str>)) -> Vec<&'static str> {
        let report = self.report(false, lsm);
        report.findings.iter().map(|f| f.code).collect()
    }

    fn default_codes(&self) -> Vec<&'static str> {
        self.codes((None, None))
    }
}

#[test]
fn the_fixture_bundle_passes() {
    let Some(bundle) = Bundle::new() else {
        return;
    };
    assert_eq!(bundle.default_codes(), Vec::<&str>::new());
}

#[test]
fn bind_sources_must_exist_and_match_their_mount_point() {
    let Some(mut bundle) = Bundle::new() else {
        return;
    };
    let host = tempfile::tempdir().expect("temp dir");
    let file = host.path().join("a-file");
    fs::write(&file, "x").expect("file source");
    fs::create_dir_all(bundle.rootfs().join("data")).expect("a directory mount point");
    bundle.edit(|config| {
        let mounts = config["mounts"].as_array_mut().expect("mounts");
        mounts.push(serde_json::json!({
            "destination": "/data", "type": "bind", "source": file, "options": ["bind"]
        }));
        mounts.push(serde_json::json!({
            "destination": "/gone", "type": "bind", "source": "/nonexistent/source",
            "options": ["rbind"]
        }));
    });
    assert_eq!(
        bundle.default_codes(),
        ["bind-type-mismatch", "bind-source-missing"]
    );
}

#[test]
fn open_files_must_be_in_the_rootfs_with_their_size() {
    let Some(bundle) = Bundle::new() else {
        return;
    };
    let busybox = bundle.rootfs().join("bin/busybox");
    let mut bytes = fs::read(&busybox).expect("busybox");
    bytes.push(0);
    fs::write(&busybox, &bytes).expect("grow busybox");
    assert_eq!(bundle.default_codes(), ["rootfs-file-size"]);

    fs::remove_file(&busybox).expect("remove busybox");
    assert_eq!(bundle.default_codes(), ["rootfs-file-missing"]);
}

#[test]
fn an_lsm_this_host_lacks_is_refused_and_an_unused_context_is_a_warning() {
    let Some(bundle) = Bundle::new() else {
        return;
    };
    let lsms = fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    if lsms.split(',').any(|l| l.trim() == "selinux") || Path::new("/sys/fs/selinux").exists() {
        println!("skipped: this host runs SELinux, so a SELinux profile is no error here");
        return;
    }
    let profile = Some("selinux:system_u:system_r:container_t:s0");
    assert_eq!(bundle.codes((profile, None)), ["lsm-unavailable"]);
    assert_eq!(bundle.codes((Some("none:"), None)), Vec::<&str>::new());

    let context = Some("system_u:object_r:container_file_t:s0");
    let report = bundle.report(false, (None, context));
    let finding = &report.findings[0];
    assert_eq!(finding.code, "lsm-mount-context-unused");
    assert_eq!(finding.severity, Severity::Warning);
    assert!(!report.has_errors());
}

#[test]
fn pids_taken_in_the_target_pid_namespace_are_refused() {
    let Some(mut bundle) = Bundle::new() else {
        return;
    };
    // The namespace's init is pid 1 there, and pid 1 is the checkpoint's root.
    let mut holder = match Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "sleep", "60"])
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(holder) => holder,
        Err(error) => {
            println!("skipped: cannot run unshare: {error}");
            return;
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let init = loop {
        let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", holder.id()))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            break pid.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no pid namespace");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    bundle.edit(|config| {
        for ns in config["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
        {
            if ns["type"] == "pid" {
                ns["path"] = serde_json::json!(format!("/proc/{init}/ns/pid"));
            }
        }
    });
    let codes = bundle.default_codes();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(codes, ["pid-in-use"]);
}

#[test]
fn auto_dedup_is_a_warning_that_the_checkpoint_is_consumed() {
    let Some(bundle) = Bundle::new() else {
        return;
    };
    let report = bundle.report(true, (None, None));
    let codes: Vec<_> = report
        .findings
        .iter()
        .map(|f| (f.code, f.severity))
        .collect();
    assert_eq!(codes, [("auto-dedup-consumes", Severity::Warning)]);
    assert!(!report.has_errors());
}
