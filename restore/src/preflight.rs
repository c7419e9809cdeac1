//! The checks a restore runs before it sets anything up: the images (the library's
//! [`criu_images::validate`]) and what the container around them needs from this host.
//!
//! CRIU finds most of these problems too, but late (after namespaces, cgroups and mounts were
//! made) and in words that do not say what to do. Every problem found here is reported at
//! once, each with a fix, in the same [`Finding`] form as the image checks:
//!
//! | code | severity | what |
//! |---|---|---|
//! | `bind-source-missing` | error | a bind mount's source does not exist |
//! | `bind-type-mismatch` | error | a bind mount of a file onto a directory, or the reverse |
//! | `rootfs-file-missing` | error | a file the processes have open is gone from the rootfs |
//! | `rootfs-file-size` | error | a file the processes have open changed size (CRIU: "bad size") |
//! | `lsm-unavailable` | error | an LSM profile this host's kernel does not run |
//! | `lsm-mount-context-unused` | warning | `--lsm-mount-context`, and no mount has a context |
//! | `pid-in-use` | error | a pid of the tree is taken in the pid namespace restored into |
//! | `auto-dedup-consumes` | warning | `--auto-dedup` will consume the checkpoint |

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use criu_images::checkpoint::Checkpoint;
use criu_images::pb;
use criu_images::validate::{Finding, Host, Report, ValidateOptions, validate};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::mounts;

/// What the checks need to know of the restore.
#[derive(Debug)]
pub struct Plan<'a> {
    /// The images directory.
    pub images: &'a Path,
    /// The bundle's config.
    pub spec: &'a Spec,
    /// The rootfs, resolved.
    pub rootfs: &'a Path,
    /// `--lazy-pages`.
    pub lazy_pages: bool,
    /// `--auto-dedup`.
    pub auto_dedup: bool,
    /// `--lsm-profile`.
    pub lsm_profile: Option<&'a str>,
    /// `--lsm-mount-context`.
    pub lsm_mount_context: Option<&'a str>,
}

/// Runs every check and returns the findings of the images and of the container together.
pub fn check(plan: &Plan<'_>) -> Report {
    let options = ValidateOptions {
        lazy_pages: plan.lazy_pages,
        host: Some(Host::this()),
        page_size: None,
    };
    let mut report = validate(plan.images, &options);
    // Container checks read the images; without a readable tree they have nothing to go on.
    let Ok(checkpoint) = Checkpoint::open(plan.images) else {
        return report;
    };

    check_bind_mounts(plan, &mut report);
    check_rootfs_files(plan, &checkpoint, &mut report);
    check_lsm(plan, &checkpoint, &mut report);
    check_pids(plan, &checkpoint, &mut report);
    if plan.auto_dedup {
        report.findings.push(Finding::warning(
            "auto-dedup-consumes",
            plan.images.display().to_string(),
            "--auto-dedup makes CRIU punch every restored page out of the pages files: the \
             checkpoint cannot be restored again afterwards",
            "copy the checkpoint first if it may be needed again, or drop --auto-dedup",
        ));
    }
    report
}

/// Every bind source exists, and is a directory exactly when its mount point in the rootfs
/// is one.
fn check_bind_mounts(plan: &Plan<'_>, report: &mut Report) {
    for m in plan.spec.mounts().iter().flatten() {
        let Some(source) = m.source().as_ref().filter(|_| mounts::is_bind(m)) else {
            continue;
        };
        let destination = m.destination();
        let source_meta = match fs::metadata(source) {
            Ok(meta) => meta,
            Err(error) => {
                report.findings.push(Finding::error(
                    "bind-source-missing",
                    source.display().to_string(),
                    format!(
                        "the source of the bind mount on {} cannot be found: {error}",
                        destination.display()
                    ),
                    "create it (the checkpoint expects the same file or directory the \
                     container had) or remove the mount from config.json",
                ));
                continue;
            }
        };
        let Ok(inside) = mounts::resolve_in_root(plan.rootfs, destination) else {
            continue;
        };
        let target = plan
            .rootfs
            .join(inside.strip_prefix("/").unwrap_or(&inside));
        if let Ok(target_meta) = fs::metadata(&target)
            && target_meta.is_dir() != source_meta.is_dir()
        {
            let kind = |dir: bool| if dir { "a directory" } else { "a file" };
            report.findings.push(Finding::error(
                "bind-type-mismatch",
                target.display().to_string(),
                format!(
                    "the bind mount on {} mounts {} ({}) on {} in the rootfs",
                    destination.display(),
                    source.display(),
                    kind(source_meta.is_dir()),
                    kind(target_meta.is_dir())
                ),
                "make the source the same kind of file as the mount point, or fix config.json",
            ));
        }
    }
}

/// The mount id of the container's root file system: the mount at `/` of the root task's
/// mount namespace.
fn root_mount(checkpoint: &Checkpoint) -> Option<u32> {
    let tree = checkpoint.pstree().ok()?;
    let root = tree.iter().find(|p| p.ppid == 0)?;
    let ids = checkpoint.ids(root.pid).ok()?;
    let mounts = checkpoint.mounts(ids.mnt_ns_id?).ok()?;
    mounts
        .iter()
        .find(|m| m.mountpoint == "/")
        .map(|m| m.mnt_id)
}

/// The regular files the processes have open on the root file system are in the rootfs, with
/// the size they had (CRIU refuses a file whose size changed). Deleted files, which CRIU
/// recreates from the images, are left out.
fn check_rootfs_files(plan: &Plan<'_>, checkpoint: &Checkpoint, report: &mut Report) {
    let Some(root_mnt) = root_mount(checkpoint) else {
        return;
    };
    let Ok(files) = checkpoint.files() else {
        return;
    };
    let remapped: HashSet<u32> = checkpoint
        .entries::<pb::RemapFilePathEntry>("remap-fpath.img", "REMAP_FPATH")
        .unwrap_or_default()
        .iter()
        .map(|r| r.orig_id)
        .collect();
    let mut seen = BTreeSet::new();
    for file in &files {
        let Some(reg) = &file.reg else {
            continue;
        };
        if reg.mnt_id != Some(root_mnt as i32) || remapped.contains(&reg.id) {
            continue;
        }
        if !seen.insert(reg.name.clone()) {
            continue;
        }
        let path = plan.rootfs.join(reg.name.trim_start_matches('/'));
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(_) => {
                report.findings.push(Finding::error(
                    "rootfs-file-missing",
                    path.display().to_string(),
                    format!(
                        "the checkpointed processes have {} open, and the rootfs lacks it",
                        reg.name
                    ),
                    "restore on the rootfs the container was checkpointed with (apply its \
                     rootfs changes first)",
                ));
                continue;
            }
        };
        if let Some(size) = reg.size
            && meta.is_file()
            && meta.len() != size
        {
            report.findings.push(Finding::error(
                "rootfs-file-size",
                path.display().to_string(),
                format!(
                    "{} was {size} bytes at checkpoint and is {} bytes now; CRIU refuses \
                     files that changed size",
                    reg.name,
                    meta.len()
                ),
                "restore on the rootfs the container was checkpointed with",
            ));
        }
    }
}

/// The LSMs this kernel runs, from `/sys/kernel/security/lsm` when securityfs is mounted,
/// else from the LSMs' own file systems.
fn host_lsms() -> BTreeSet<String> {
    if let Ok(list) = fs::read_to_string("/sys/kernel/security/lsm") {
        return list.trim().split(',').map(str::to_owned).collect();
    }
    let mut found = BTreeSet::new();
    if Path::new("/sys/fs/selinux/enforce").exists() {
        found.insert("selinux".to_owned());
    }
    if fs::read_to_string("/sys/module/apparmor/parameters/enabled").is_ok_and(|v| v.trim() == "Y")
    {
        found.insert("apparmor".to_owned());
    }
    found
}

/// The LSM the restored processes will be labelled for (the `--lsm-profile` type, else the
/// one recorded at dump) runs here, and a mount context has mounts to go to.
fn check_lsm(plan: &Plan<'_>, checkpoint: &Checkpoint, report: &mut Report) {
    let recorded = checkpoint
        .inventory()
        .ok()
        .and_then(|i| i.lsmtype)
        .and_then(|t| pb::Lsmtype::try_from(t).ok());
    let wanted = match plan.lsm_profile {
        Some(profile) => profile.split_once(':').map(|(kind, _)| kind.to_owned()),
        None => match recorded {
            Some(pb::Lsmtype::Selinux) => Some("selinux".to_owned()),
            Some(pb::Lsmtype::Apparmor) => Some("apparmor".to_owned()),
            _ => None,
        },
    };
    if let Some(kind) = wanted.filter(|k| k == "selinux" || k == "apparmor") {
        let running = host_lsms();
        if !running.contains(&kind) {
            let source = if plan.lsm_profile.is_some() {
                "--lsm-profile asks for"
            } else {
                "the checkpoint was made under"
            };
            let list = if running.is_empty() {
                "none".to_owned()
            } else {
                running.iter().cloned().collect::<Vec<_>>().join(", ")
            };
            report.findings.push(Finding::error(
                "lsm-unavailable",
                plan.lsm_profile
                    .map_or("inventory.img", |_| "--lsm-profile")
                    .to_owned(),
                format!("{source} {kind}, but this kernel runs no {kind} (its LSMs: {list})"),
                "restore on a host that runs it, or give --lsm-profile for an LSM this host \
                 runs",
            ));
        }
    }

    if plan.lsm_mount_context.is_some() {
        let any_context = fs::read_dir(plan.images)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| n.starts_with("mountpoints-") && n.ends_with(".img"))
            .flat_map(|n| {
                checkpoint
                    .entries::<pb::MntEntry>(&n, "MNTS")
                    .unwrap_or_default()
            })
            .any(|m| m.options.split(',').any(|o| o.starts_with("context=")));
        if !any_context {
            report.findings.push(Finding::warning(
                "lsm-mount-context-unused",
                "--lsm-mount-context",
                "no mount of the checkpoint has a context= option, so the mount context \
                 changes nothing",
                "drop --lsm-mount-context, or check that this is the checkpoint you meant",
            ));
        }
    }
}

/// The pids of the tree are free in the pid namespace the config restores into, when it
/// names one (a new namespace has every pid free).
fn check_pids(plan: &Plan<'_>, checkpoint: &Checkpoint, report: &mut Report) {
    let namespace = plan
        .spec
        .linux()
        .iter()
        .flat_map(|l| l.namespaces().iter().flatten())
        .find(|ns| ns.typ() == LinuxNamespaceType::Pid)
        .and_then(|ns| ns.path().clone());
    let Some(namespace) = namespace else {
        return;
    };
    let Ok(target) = fs::metadata(&namespace).map(|m| m.ino()) else {
        return;
    };
    let Ok(tree) = checkpoint.pstree() else {
        return;
    };
    let taken = pids_in_namespace(target);
    for task in &tree {
        let tids = std::iter::once(task.pid).chain(task.threads.iter().copied());
        for tid in tids.collect::<BTreeSet<_>>() {
            if let Some(holder) = taken.iter().find(|(inner, _)| *inner == tid) {
                report.findings.push(Finding::error(
                    "pid-in-use",
                    namespace.display().to_string(),
                    format!(
                        "pid {tid} of the checkpoint is taken in that namespace (by host pid \
                         {})",
                        holder.1
                    ),
                    "stop that process (or let it be reaped), or restore into a new pid \
                     namespace",
                ));
            }
        }
    }
}

/// (pid inside, host pid) of every process whose pid namespace has the inode `target`.
fn pids_in_namespace(target: u64) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(host_pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let proc_dir: PathBuf = entry.path();
        // Threads count too: CRIU needs every tid of the tree.
        let Ok(tasks) = fs::read_dir(proc_dir.join("task")) else {
            continue;
        };
        if fs::metadata(proc_dir.join("ns/pid")).map(|m| m.ino()).ok() != Some(target) {
            continue;
        }
        for task in tasks.filter_map(Result::ok) {
            let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(inner) = inner {
                out.push((inner, host_pid));
            }
        }
    }
    out
}
