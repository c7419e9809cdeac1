//! Restoring a runc container: the bundle, mounts, namespaces, cgroups, stdio and console
//! around CRIU's own restore, and the state left for the restored container.
//!
//! The steps follow `runc restore` (see each function) and undo themselves on failure: a
//! [`Cleanup`] records what was created (state directory, the CRIU root mount, cgroups, the
//! restored process) and takes it back unless the restore completes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, IoSlice, Write as _};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use criu_images::validate::{Finding, Severity};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::unistd::Pid;
use oci_spec::runtime::{Hook, LinuxNamespaceType, LinuxResources, Spec};
use serde::Serialize;
use thiserror::Error;

use crate::cgroups::{self, CgroupError, Cgroups};
use crate::hooks::{self, HookError, HookState};
use crate::lazy::{self, LazyDaemon, LazyError, PageServer};
use crate::lsm::{self, LsmError, LsmProfile};
use crate::mounts::{self, MountError};
use crate::preflight;
use crate::preload::{PreloadMode, Preloader};
use crate::rpc::messages::{CgMode, CriuFeatures, CriuOpts, ExtMountMap, InheritFd, JoinNamespace};
use crate::rpc::{Criu, Notification, NotifyHandler, RestoreRequest, RpcError, Version};

/// `CLONE_NEWNET`, the one namespace `--empty-ns` accepts.
const CLONE_NEWNET: u32 = 0x4000_0000;

/// Why a container could not be restored.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// The container id is not one runc accepts.
    #[error(
        "invalid container id {0:?}: use letters, digits, '_', '+', '-' and '.', and not '.' or '..'"
    )]
    InvalidId(String),
    /// A container with this id exists (or is being restored).
    #[error("container {id} already exists (state in {dir})")]
    Exists {
        /// The id.
        id: String,
        /// Its state directory.
        dir: PathBuf,
    },
    /// The bundle's config.json is missing or invalid.
    #[error("cannot load the bundle's config {path}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// The config lacks something a restore needs.
    #[error("bundle config {path}: {problem}")]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The images directory has no checkpoint.
    #[error("{dir} holds no checkpoint (no inventory.img): check --image-path")]
    NoCheckpoint {
        /// The images directory.
        dir: PathBuf,
    },
    /// runc's `descriptors.json` is missing or malformed.
    #[error("cannot read {path}: a runc checkpoint records the container's stdio there")]
    Descriptors {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file system step failed.
    #[error("cannot {doing} {path}")]
    Io {
        /// What was being done.
        doing: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A system call failed.
    #[error("cannot {doing} {path}")]
    Sys {
        /// What was being done.
        doing: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The console socket could not be reached.
    #[error("cannot connect to the console socket {path}")]
    ConsoleSocket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Validation found problems that would make the restore fail.
    #[error("{}", invalid_message(.images, .findings))]
    Invalid {
        /// The images directory.
        images: PathBuf,
        /// The error findings.
        findings: Vec<Finding>,
    },
    /// The lazy-pages daemon could not be started.
    #[error(transparent)]
    Lazy(#[from] LazyError),
    /// The LSM options are malformed, or the images could not be rewritten for them.
    #[error(transparent)]
    Lsm(#[from] LsmError),
    /// The container's cgroups could not be set up.
    #[error(transparent)]
    Cgroups(#[from] CgroupError),
    /// The rootfs's mount points could not be prepared.
    #[error(transparent)]
    Mounts(#[from] MountError),
    /// CRIU failed.
    #[error(transparent)]
    Criu(#[from] RpcError),
    /// This host cannot do what an option asks.
    #[error("{what} is not possible here: {why}")]
    Unsupported {
        /// The option.
        what: &'static str,
        /// Why not.
        why: &'static str,
    },
    /// CRIU reported success without saying which process it restored.
    #[error("CRIU reported a successful restore but no pid for the container's init")]
    NoPid,
}

/// Every error finding, one per paragraph with its fix.
fn invalid_message(images: &Path, findings: &[Finding]) -> String {
    let count = findings.len();
    let noun = if count == 1 { "problem" } else { "problems" };
    let mut text = format!(
        "the checkpoint in {} cannot be restored: {count} {noun} found before starting CRIU",
        images.display()
    );
    for finding in findings {
        text.push_str(&format!(
            "\n  {} ({}): {}\n    fix: {}",
            finding.code, finding.subject, finding.message, finding.hint
        ));
    }
    text.push_str("\n(--skip-validation restores anyway)");
    text
}

/// How CRIU manages the container's cgroups (`--manage-cgroups-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupsMode {
    /// Restore properties only where CRIU creates the cgroup.
    Soft,
    /// Restore every property.
    Full,
    /// Fail when cgroups differ.
    Strict,
    /// Leave cgroups alone.
    Ignore,
}

/// Everything `restore` was asked, as runc's flags say it.
#[derive(Debug, Clone)]
pub struct Options {
    /// The container id.
    pub id: String,
    /// The bundle (config.json and rootfs).
    pub bundle: PathBuf,
    /// The images directory.
    pub image_path: PathBuf,
    /// CRIU's work directory (logs); the images directory when `None`.
    pub work_path: Option<PathBuf>,
    /// State directory root.
    pub root: PathBuf,
    /// The CRIU binary.
    pub criu: PathBuf,
    /// Return once the container runs.
    pub detach: bool,
    /// Where to write the restored init's host pid.
    pub pid_file: Option<PathBuf>,
    /// Where to send the console master of a terminal container.
    pub console_socket: Option<PathBuf>,
    /// `--tcp-established`.
    pub tcp_established: bool,
    /// `--ext-unix-sk`.
    pub ext_unix_sk: bool,
    /// `--shell-job`.
    pub shell_job: bool,
    /// `--file-locks`.
    pub file_locks: bool,
    /// `--manage-cgroups-mode`.
    pub cgroups_mode: CgroupsMode,
    /// `--empty-ns network`.
    pub empty_network: bool,
    /// `--auto-dedup`.
    pub auto_dedup: bool,
    /// `--lazy-pages`.
    pub lazy_pages: bool,
    /// `--page-server`: where a lazy-pages daemon started here fetches the pages from.
    pub page_server: Option<PageServer>,
    /// `--preload`: whether the pages files are read ahead of CRIU.
    pub preload: PreloadMode,
    /// `--lsm-profile`.
    pub lsm_profile: Option<String>,
    /// `--lsm-mount-context`.
    pub lsm_mount_context: Option<String>,
    /// `--skip-validation`: restore without checking first.
    pub skip_validation: bool,
}

/// What is left to undo if the restore does not complete.
#[derive(Debug, Default)]
struct Cleanup {
    state_dir: Option<PathBuf>,
    criu_root: Option<PathBuf>,
    cgroups: Vec<PathBuf>,
    pid: Option<i32>,
    /// The `poststop` hooks, once `prestart` hooks have run.
    poststop: Option<(Vec<Hook>, HookState)>,
    /// A lazy-pages daemon this restore started.
    lazy: Option<LazyDaemon>,
    /// CRIU's work directory, where a CRIU that was killed leaves its cgroup yard mounted.
    work_dir: Option<PathBuf>,
}

impl Cleanup {
    /// Takes back everything recorded, newest first.
    fn undo(&mut self) {
        // Only a real pid: kill(-1) or kill(0) would signal far more than the container.
        if let Some(pid) = self.pid.take().filter(|&pid| pid > 1) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        }
        // Nobody is left to ask it for pages.
        if let Some(mut daemon) = self.lazy.take() {
            daemon.stop();
        }
        self.release_root();
        if let Some(work_dir) = self.work_dir.take() {
            unmount_cgroup_yard(&work_dir);
        }
        for cgroup in self.cgroups.drain(..).rev() {
            cgroups::remove(&cgroup);
        }
        if let Some(dir) = self.state_dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
        if let Some((poststop, mut state)) = self.poststop.take() {
            state.status = "stopped";
            state.pid = 0;
            // The container is gone either way; a failing poststop hook cannot change that.
            if let Err(error) = hooks::run("poststop", &poststop, &state) {
                tracing::warn!(container = %state.id, "{error}");
            }
        }
    }

    /// Unmounts and removes the CRIU root; the restored tasks hold their own mounts.
    fn release_root(&mut self) {
        if let Some(root) = self.criu_root.take() {
            let _ = umount2(&root, MntFlags::MNT_DETACH);
            let _ = fs::remove_dir(root);
        }
    }
}

/// Unmounts the cgroup yard (`.criu.cgyard.*`) a CRIU that did not finish left mounted in its
/// work directory, deepest mounts first, and removes its directories.
fn unmount_cgroup_yard(work_dir: &Path) {
    let prefix = work_dir.join(".criu.cgyard.");
    let prefix = prefix.to_string_lossy();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|point| point.starts_with(prefix.as_ref()))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in &points {
        let _ = umount2(Path::new(point), MntFlags::MNT_DETACH);
    }
    for point in points.iter().rev() {
        let _ = fs::remove_dir(point);
    }
}

/// The OCI runtime state, plus what the restore set up (`<root>/<id>/state.json`).
#[derive(Debug, Serialize)]
struct State {
    #[serde(rename = "ociVersion")]
    oci_version: String,
    id: String,
    status: &'static str,
    pid: i32,
    bundle: PathBuf,
    annotations: BTreeMap<String, String>,
    created: u64,
    images_dir: PathBuf,
    work_dir: PathBuf,
    cgroup_paths: Vec<PathBuf>,
    namespace_paths: BTreeMap<String, PathBuf>,
    external_descriptors: Vec<String>,
}

/// runc's container id rule.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b))
}

pub(crate) fn io_error(doing: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RestoreError {
    let path = path.to_path_buf();
    move |source| RestoreError::Io {
        doing,
        path,
        source,
    }
}

/// Restores the container and returns the exit status for `restore`: 0 once a detached
/// container runs, the container's own status in the foreground.
///
/// # Errors
///
/// Every failure before or during CRIU's restore, after undoing what was set up.
pub fn restore(options: &Options) -> Result<i32, RestoreError> {
    let mut cleanup = Cleanup::default();
    let result = restore_steps(options, &mut cleanup);
    match result {
        Ok(status) => Ok(status),
        Err(error) => {
            cleanup.undo();
            Err(error)
        }
    }
}

/// What a restore reads before it checks or sets up anything.
pub(crate) struct Loaded {
    /// The bundle's config.
    pub(crate) spec: Spec,
    /// Where it was read from.
    pub(crate) config_path: PathBuf,
    /// The container's stdio as runc recorded it.
    pub(crate) descriptors: Vec<String>,
    /// The rootfs, resolved.
    pub(crate) rootfs: PathBuf,
}

/// Checks the id and reads the bundle's config, the checkpoint's stdio record and the rootfs.
pub(crate) fn load(options: &Options) -> Result<Loaded, RestoreError> {
    if !valid_id(&options.id) {
        return Err(RestoreError::InvalidId(options.id.clone()));
    }
    let config_path = options.bundle.join("config.json");
    let spec = Spec::load(&config_path).map_err(|source| RestoreError::Config {
        path: config_path.clone(),
        source,
    })?;
    if !options.image_path.join("inventory.img").is_file() {
        return Err(RestoreError::NoCheckpoint {
            dir: options.image_path.clone(),
        });
    }
    let descriptors = read_descriptors(&options.image_path)?;
    let rootfs = rootfs(&spec, &options.bundle, &config_path)?;
    Ok(Loaded {
        spec,
        config_path,
        descriptors,
        rootfs,
    })
}

fn restore_steps(options: &Options, cleanup: &mut Cleanup) -> Result<i32, RestoreError> {
    let Loaded {
        spec,
        config_path,
        descriptors,
        rootfs,
    } = load(options)?;
    validate(options, &spec, &rootfs)?;

    let (state_dir, criu_root) = prepare_state(options, &spec, &rootfs, cleanup)?;

    let mut opts = criu_options(options, &spec, &rootfs, &criu_root, &descriptors)?;
    let namespaces = namespace_files(&spec, &config_path, &mut opts)?;
    let cgroups = Cgroups::plan(&spec, &options.id)?;
    opts.cg_root = cgroups.roots();

    // Connected before CRIU starts, as runc does, so a wrong path fails early.
    let console = options
        .console_socket
        .as_ref()
        .map(|path| {
            UnixStream::connect(path).map_err(|source| RestoreError::ConsoleSocket {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;

    let work_dir = options
        .work_path
        .clone()
        .unwrap_or_else(|| options.image_path.clone());
    if let Some(work) = &options.work_path {
        fs::create_dir_all(work).map_err(io_error("create", work))?;
    }
    // With a shadow CRIU reads the rewritten images, and still works (and logs) where it
    // would have without one.
    let shadow = write_shadow(options, &state_dir)?;
    let request = RestoreRequest {
        images_dir: shadow.clone().unwrap_or_else(|| options.image_path.clone()),
        work_dir: Some(work_dir.clone()),
        log_file: "restore.log".into(),
        log_level: 4,
        opts,
        inherit_stdio: true,
    };
    let strict = options.cgroups_mode == CgroupsMode::Strict;
    let existing = cgroups.existing();
    let container_hooks = ContainerHooks::from_spec(&spec, &options.id, &options.bundle);
    let mut handler = Handler {
        cgroups: &cgroups,
        strict,
        created: Vec::new(),
        console,
        pid: None,
        hooks: &container_hooks,
        hooks_ran: false,
        resources: spec.linux().as_ref().and_then(|l| l.resources().as_ref()),
        lazy: None,
    };
    let criu = Criu::new(&options.criu);
    require_versions(&criu, options, &spec)?;
    tracing::debug!(
        container = %options.id,
        images = %options.image_path.display(),
        criu_root = %criu_root.display(),
        external_mounts = request.opts.ext_mnt.len(),
        inherited_fds = request.opts.inherit_fd.len(),
        "starting CRIU"
    );
    cleanup.work_dir = Some(work_dir.clone());
    let restored = run_criu(options, &criu, &request, &mut handler, &existing, cleanup)?;
    if let Some(shadow) = &shadow {
        // CRIU is done with the images; only links and rewritten copies go.
        let _ = fs::remove_dir_all(shadow);
    }
    drop(namespaces);
    cleanup.release_root();

    let pid = Some(restored.pid)
        .filter(|&pid| pid > 1)
        .or(cleanup.pid.filter(|&pid| pid > 1))
        .ok_or(RestoreError::NoPid)?;
    cleanup.pid = Some(pid);
    if let Some(pid_file) = &options.pid_file {
        write_pid_file(pid_file, pid)?;
    }
    let facts = Facts {
        spec: &spec,
        work_dir,
        cgroups: cgroups.existing(),
        descriptors,
    };
    record_state(options, &state_dir, pid, facts)?;

    tracing::info!(container = %options.id, pid, "restored");
    if options.detach {
        // The container now lives on its own; nothing is undone any more. A lazy-pages
        // daemon goes on serving it and exits once every page is delivered.
        if let Some(daemon) = cleanup.lazy.take() {
            daemon.release();
        }
        *cleanup = Cleanup::default();
        return Ok(0);
    }
    let status = crate::lifecycle::wait_foreground(pid);
    cleanup.pid = None;
    cleanup.undo();
    Ok(status)
}

/// Runs CRIU's restore with what it needs beside it (a lazy-pages daemon of its own when
/// none listens, preloading), and records in `cleanup` what the run left to undo: the
/// cgroups made for it, the restored pid, the `poststop` hooks once `prestart` ran.
fn run_criu(
    options: &Options,
    criu: &Criu,
    request: &RestoreRequest,
    handler: &mut Handler<'_>,
    existing: &[PathBuf],
    cleanup: &mut Cleanup,
) -> Result<crate::rpc::Restored, RestoreError> {
    let work_dir = request
        .work_dir
        .clone()
        .unwrap_or_else(|| request.images_dir.clone());
    if options.lazy_pages && !LazyDaemon::listening(&work_dir) {
        let daemon = LazyDaemon::start(
            &options.criu,
            &request.images_dir,
            &work_dir,
            options.page_server.as_ref(),
        )?;
        handler.lazy = Some(daemon.guard());
        cleanup.lazy = Some(daemon);
    }
    let preloader = Preloader::start(&request.images_dir, options.preload);
    let outcome = criu.restore(request, handler);
    if let Some(preloader) = preloader {
        preloader.finish();
    }
    if let Some(guard) = &handler.lazy {
        guard.done();
    }

    cleanup.cgroups.append(&mut handler.created);
    if handler.hooks_ran {
        cleanup.poststop = Some((handler.hooks.poststop.clone(), handler.hooks.state.clone()));
    }
    if handler.strict {
        // CRIU made them; they are the container's all the same.
        cleanup.cgroups.extend(
            handler
                .cgroups
                .existing()
                .into_iter()
                .filter(|d| !existing.contains(d)),
        );
    }
    cleanup.pid = handler.pid;
    match outcome {
        Ok(restored) => Ok(restored),
        // CRIU was stopped because its lazy-pages daemon died: the daemon's log says why.
        Err(error) => match cleanup.lazy.as_ref().and_then(LazyDaemon::failure) {
            Some(failure) => Err(failure.into()),
            None => Err(error.into()),
        },
    }
}

/// Runs the checks of [`preflight`] and refuses with every error they found; warnings are
/// logged. `--skip-validation` skips them, with a warning.
fn validate(options: &Options, spec: &Spec, rootfs: &Path) -> Result<(), RestoreError> {
    if options.skip_validation {
        tracing::warn!(
            images = %options.image_path.display(),
            "validation skipped (--skip-validation): problems will surface in CRIU instead"
        );
        return Ok(());
    }
    let report = preflight_report(options, spec, rootfs);
    for warning in report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
    {
        tracing::warn!(code = warning.code, subject = %warning.subject, "{}", warning.message);
    }
    let errors: Vec<Finding> = report.errors().cloned().collect();
    tracing::debug!(
        images = report.images,
        processes = report.processes,
        errors = errors.len(),
        "validated"
    );
    if errors.is_empty() {
        return Ok(());
    }
    Err(RestoreError::Invalid {
        images: options.image_path.clone(),
        findings: errors,
    })
}

/// The `--lsm-profile` and `--lsm-mount-context` of the options, parsed.
pub(crate) fn lsm_options(
    options: &Options,
) -> Result<(Option<LsmProfile>, Option<&str>), RestoreError> {
    let profile = options
        .lsm_profile
        .as_deref()
        .map(str::parse::<LsmProfile>)
        .transpose()?;
    Ok((profile, options.lsm_mount_context.as_deref()))
}

/// Rewrites the LSM labels the options ask for into a shadow images directory inside the
/// state directory, which links every unchanged image to the original; the user's images
/// are never written. Returns the shadow, or `None` when nothing needs rewriting.
fn write_shadow(options: &Options, state_dir: &Path) -> Result<Option<PathBuf>, RestoreError> {
    let (profile, context) = lsm_options(options)?;
    if profile.is_none() && context.is_none() {
        return Ok(None);
    }
    let plan = lsm::plan(&options.image_path, profile.as_ref(), context)?;
    if plan.is_empty() {
        return Ok(None);
    }
    let shadow = state_dir.join("shadow-images");
    let done = lsm::write_shadow(&options.image_path, &shadow, profile.as_ref(), context)?;
    tracing::debug!(
        shadow = %shadow.display(),
        changes = done.changes.len(),
        images = ?done.images(),
        "rewrote LSM labels into a shadow images directory"
    );
    Ok(Some(shadow))
}

/// The findings of [`preflight::check`] for this restore.
pub(crate) fn preflight_report(
    options: &Options,
    spec: &Spec,
    rootfs: &Path,
) -> criu_images::validate::Report {
    preflight::check(&preflight::Plan {
        images: &options.image_path,
        spec,
        rootfs,
        lazy_pages: options.lazy_pages,
        auto_dedup: options.auto_dedup,
        lsm_profile: options.lsm_profile.as_deref(),
        lsm_mount_context: options.lsm_mount_context.as_deref(),
    })
}

/// Creates the container's state directory (which doubles as the lock: creating it fails if
/// the id is taken), creates the mount points CRIU restores mounts on, and mounts the rootfs
/// at the CRIU root inside the state directory. Returns both paths.
fn prepare_state(
    options: &Options,
    spec: &Spec,
    rootfs: &Path,
    cleanup: &mut Cleanup,
) -> Result<(PathBuf, PathBuf), RestoreError> {
    fs::create_dir_all(&options.root).map_err(io_error("create", &options.root))?;
    let state_dir = options.root.join(&options.id);
    match fs::create_dir(&state_dir) {
        Ok(()) => cleanup.state_dir = Some(state_dir.clone()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(RestoreError::Exists {
                id: options.id.clone(),
                dir: state_dir,
            });
        }
        Err(e) => return Err(io_error("create", &state_dir)(e)),
    }

    // Before the CRIU root is mounted, so the bind mounts made for the time of preparation
    // never show in it.
    mounts::create_mountpoints(rootfs, spec.mounts().as_deref().unwrap_or_default())?;

    // CRIU needs the root to be a mount point whose parent is not overmounted (runc does the
    // same, at the same place).
    let criu_root = state_dir.join("criu-root");
    fs::create_dir(&criu_root).map_err(io_error("create", &criu_root))?;
    mount(
        Some(rootfs),
        &criu_root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|source| RestoreError::Sys {
        doing: "bind-mount the rootfs at",
        path: criu_root.clone(),
        source,
    })?;
    cleanup.criu_root = Some(criu_root.clone());

    Ok((state_dir, criu_root))
}

/// What the restore learnt, for the state file.
struct Facts<'a> {
    spec: &'a Spec,
    work_dir: PathBuf,
    cgroups: Vec<PathBuf>,
    descriptors: Vec<String>,
}

/// Writes `state.json` for the restored container.
fn record_state(
    options: &Options,
    state_dir: &Path,
    pid: i32,
    facts: Facts<'_>,
) -> Result<(), RestoreError> {
    let state = State {
        oci_version: facts.spec.version().clone(),
        id: options.id.clone(),
        status: "running",
        pid,
        bundle: options.bundle.clone(),
        annotations: facts
            .spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        images_dir: options.image_path.clone(),
        work_dir: facts.work_dir,
        cgroup_paths: facts.cgroups,
        namespace_paths: namespace_paths(facts.spec),
        external_descriptors: facts.descriptors,
    };
    write_state(state_dir, &state)
}

/// Checks, before anything is restored, that this CRIU can do what was asked: the versions
/// runc requires for the LSM options and for external namespaces, each named with the
/// version found and the one needed, and kernel support for `--lazy-pages` (which runc leaves
/// to CRIU to discover halfway through the restore).
pub(crate) fn require_versions(
    criu: &Criu,
    options: &Options,
    spec: &Spec,
) -> Result<(), RestoreError> {
    let namespace_path = |kind: LinuxNamespaceType| {
        spec.linux()
            .iter()
            .flat_map(|l| l.namespaces().iter().flatten())
            .any(|ns| ns.typ() == kind && ns.path().is_some())
    };
    let needs = [
        (
            options.lsm_profile.is_some(),
            Version::new(3, 16, 0),
            "--lsm-profile",
        ),
        (
            options.lsm_mount_context.is_some(),
            Version::new(3, 16, 0),
            "--lsm-mount-context",
        ),
        (
            namespace_path(LinuxNamespaceType::Network),
            Version::new(3, 11, 0),
            "restoring into the network namespace path of config.json",
        ),
        (
            namespace_path(LinuxNamespaceType::Pid),
            Version::new(3, 15, 0),
            "restoring into the pid namespace path of config.json",
        ),
    ];
    let mut found = None;
    for (wanted, needed, what) in needs {
        if !wanted {
            continue;
        }
        let version = match found {
            Some(version) => version,
            None => *found.insert(criu.version()?),
        };
        if version < needed {
            return Err(RpcError::TooOld {
                what: what.to_owned(),
                needed,
                found: version,
                path: criu.path().to_path_buf(),
            }
            .into());
        }
    }

    if options.lazy_pages {
        let asked = CriuFeatures {
            lazy_pages: Some(true),
            ..Default::default()
        };
        if criu.check_features(asked)?.lazy_pages != Some(true) {
            return Err(RestoreError::Unsupported {
                what: "--lazy-pages",
                why: "this kernel has no userfaultfd support for lazy pages (CRIU's \
                      feature check said no)",
            });
        }
    }
    Ok(())
}

/// The container's stdio as runc recorded it (`descriptors.json`).
fn read_descriptors(images: &Path) -> Result<Vec<String>, RestoreError> {
    let path = images.join("descriptors.json");
    let text = fs::read_to_string(&path).map_err(|source| RestoreError::Descriptors {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| RestoreError::Descriptors {
        path,
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

fn rootfs(spec: &Spec, bundle: &Path, config: &Path) -> Result<PathBuf, RestoreError> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| RestoreError::BadConfig {
            path: config.to_path_buf(),
            problem: "no root".into(),
        })?;
    let path = bundle.join(root.path());
    fs::canonicalize(&path).map_err(io_error("find the rootfs", &path))
}

/// The RPC options runc sends for a restore (its `criu_linux.go`), from the flags and the
/// bundle's mounts.
pub(crate) fn criu_options(
    options: &Options,
    spec: &Spec,
    rootfs: &Path,
    criu_root: &Path,
    descriptors: &[String],
) -> Result<CriuOpts, RestoreError> {
    let flag = |on: bool| on.then_some(true);
    let mode = match options.cgroups_mode {
        CgroupsMode::Soft => CgMode::Soft,
        CgroupsMode::Full => CgMode::Full,
        CgroupsMode::Strict => CgMode::Strict,
        CgroupsMode::Ignore => CgMode::Ignore,
    };
    let mut opts = CriuOpts {
        root: Some(criu_root.display().to_string()),
        evasive_devices: Some(true),
        rst_sibling: Some(true),
        manage_cgroups: Some(true),
        // Explicit presence: IGNORE is 0 and would otherwise not be sent at all.
        manage_cgroups_mode: Some(mode as i32),
        orphan_pts_master: Some(true),
        shell_job: flag(options.shell_job),
        ext_unix_sk: flag(options.ext_unix_sk),
        tcp_established: flag(options.tcp_established),
        file_locks: flag(options.file_locks),
        auto_dedup: flag(options.auto_dedup),
        lazy_pages: flag(options.lazy_pages),
        empty_ns: options.empty_network.then_some(CLONE_NEWNET),
        lsm_profile: options.lsm_profile.clone(),
        lsm_mount_context: options.lsm_mount_context.clone(),
        ..Default::default()
    };

    let mut external = |key: &str, value: &Path| {
        opts.ext_mnt.push(ExtMountMap {
            key: key.to_owned(),
            val: value.display().to_string(),
        });
    };
    for m in spec.mounts().iter().flatten() {
        let destination = m.destination().display().to_string();
        if mounts::is_bind(m) {
            // runc keyed the mount by its destination with symlinks resolved at dump.
            let key = mounts::resolve_in_root(rootfs, m.destination())?;
            if let Some(source) = m.source() {
                external(&key.display().to_string(), source);
            }
        } else if m.typ().as_deref() == Some("cgroup") {
            for hierarchy in cgroups::hierarchies()?.into_iter().filter(|h| !h.v2) {
                let name = hierarchy
                    .mount_point
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                if let Some(name) = name {
                    external(&format!("{destination}/{name}"), &hierarchy.mount_point);
                }
            }
        }
    }
    if let Some(linux) = spec.linux() {
        if linux.masked_paths().as_ref().is_some_and(|p| !p.is_empty()) {
            external("/dev/null", Path::new("/dev/null"));
        }
        for device in linux.devices().iter().flatten() {
            external(&device.path().display().to_string(), device.path());
        }
    }

    // Pipes among the container's stdio are CRIU's own fd 0, 1 or 2, which it inherits.
    for (fd, name) in descriptors.iter().enumerate() {
        if name.contains("pipe:") {
            opts.inherit_fd.push(InheritFd {
                key: name.clone(),
                fd: fd as i32,
            });
        }
    }
    Ok(opts)
}

/// Opens the network and pid namespaces the config names, for CRIU to inherit under runc's
/// keys, and asks CRIU to join the others. The returned files must stay open until CRIU is
/// done.
fn namespace_files(
    spec: &Spec,
    config: &Path,
    opts: &mut CriuOpts,
) -> Result<Vec<File>, RestoreError> {
    let mut files = Vec::new();
    for (path, existing) in existing_namespaces(spec, config)? {
        let key = match existing {
            ExistingNamespace::Join(kind) => {
                opts.join_ns.push(JoinNamespace {
                    ns: kind.to_owned(),
                    ns_file: path.display().to_string(),
                    extra_opt: None,
                });
                continue;
            }
            ExistingNamespace::Inherit(key) => key,
        };
        let path = &path;
        let file = File::open(path).map_err(io_error("open the namespace", path))?;
        // CRIU inherits the descriptor under the same number; the RPC client passes it on to
        // CRIU alone, so it stays close-on-exec here.
        opts.inherit_fd.push(InheritFd {
            key: key.to_owned(),
            fd: file.as_raw_fd(),
        });
        files.push(file);
    }
    Ok(files)
}

/// How CRIU is handed a namespace the config names by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExistingNamespace {
    /// Inherited as an open descriptor under runc's key (network and pid namespaces).
    Inherit(&'static str),
    /// Joined by CRIU (`join_ns`), with CRIU's name of the kind.
    Join(&'static str),
}

/// The namespaces the config names by path, and how each reaches CRIU.
pub(crate) fn existing_namespaces(
    spec: &Spec,
    config: &Path,
) -> Result<Vec<(PathBuf, ExistingNamespace)>, RestoreError> {
    let mut out = Vec::new();
    for ns in spec
        .linux()
        .iter()
        .flat_map(|l| l.namespaces().iter().flatten())
    {
        let Some(path) = ns.path() else {
            continue;
        };
        let existing = match ns.typ() {
            LinuxNamespaceType::Network => ExistingNamespace::Inherit("extRootNetNS"),
            LinuxNamespaceType::Pid => ExistingNamespace::Inherit("extRootPidNS"),
            LinuxNamespaceType::Ipc => ExistingNamespace::Join("ipc"),
            LinuxNamespaceType::Uts => ExistingNamespace::Join("uts"),
            LinuxNamespaceType::Mount => ExistingNamespace::Join("mnt"),
            LinuxNamespaceType::User => ExistingNamespace::Join("user"),
            LinuxNamespaceType::Time => ExistingNamespace::Join("time"),
            other => {
                return Err(RestoreError::BadConfig {
                    path: config.to_path_buf(),
                    problem: format!("cannot restore into an existing {other:?} namespace"),
                });
            }
        };
        out.push((path.clone(), existing));
    }
    Ok(out)
}

fn namespace_paths(spec: &Spec) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for ns in spec
        .linux()
        .iter()
        .flat_map(|l| l.namespaces().iter().flatten())
    {
        if let Some(path) = ns.path() {
            out.insert(format!("{:?}", ns.typ()).to_lowercase(), path.clone());
        }
    }
    out
}

/// Acts on CRIU's notifications during the restore.
struct Handler<'a> {
    cgroups: &'a Cgroups,
    strict: bool,
    created: Vec<PathBuf>,
    console: Option<UnixStream>,
    pid: Option<i32>,
    hooks: &'a ContainerHooks,
    /// Whether the `prestart` hooks were started, so `poststop` must run in the end.
    hooks_ran: bool,
    /// The config's cgroup limits.
    resources: Option<&'a LinuxResources>,
    /// The watch over a lazy-pages daemon this restore started.
    lazy: Option<lazy::Guard>,
}

/// The config's hooks that a restore runs, and the state they are given.
struct ContainerHooks {
    prestart: Vec<Hook>,
    create_runtime: Vec<Hook>,
    poststop: Vec<Hook>,
    state: HookState,
}

impl ContainerHooks {
    fn from_spec(spec: &Spec, id: &str, bundle: &Path) -> ContainerHooks {
        let hooks = spec.hooks().as_ref();
        let list = |pick: fn(&oci_spec::runtime::Hooks) -> &Option<Vec<Hook>>| {
            hooks.and_then(|h| pick(h).clone()).unwrap_or_default()
        };
        // `prestart` is deprecated in favour of `createRuntime`, but runc still runs it.
        #[allow(deprecated)]
        let prestart = list(oci_spec::runtime::Hooks::prestart);
        ContainerHooks {
            prestart,
            create_runtime: list(oci_spec::runtime::Hooks::create_runtime),
            poststop: list(oci_spec::runtime::Hooks::poststop),
            state: HookState {
                oci_version: spec.version().clone(),
                id: id.to_owned(),
                status: "creating",
                pid: 0,
                bundle: bundle.to_path_buf(),
                annotations: spec
                    .annotations()
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            },
        }
    }

    /// Runs the `prestart` and `createRuntime` hooks for the restored init `pid`.
    fn setup_namespaces(&self, pid: i32) -> Result<(), HookError> {
        let state = HookState {
            pid,
            ..self.state.clone()
        };
        hooks::run("prestart", &self.prestart, &state)?;
        hooks::run("createRuntime", &self.create_runtime, &state)
    }
}

impl NotifyHandler for Handler<'_> {
    fn started(&mut self, criu_pid: u32) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some(guard) = &self.lazy {
            guard.watch(criu_pid);
        }
        // The restored tasks are created in CRIU's cgroups, so CRIU goes in first. In strict
        // mode CRIU itself creates the cgroups and refuses existing ones ("Abort restore of
        // existing cgroups"), so there it is left where it is. (runc moves CRIU in every mode,
        // which makes its strict mode fail.)
        if !self.strict {
            self.cgroups.enter(criu_pid, &mut self.created)?;
            // CRIU restores properties only of cgroups it creates itself (soft mode) or of
            // all of them (full mode, which then overrides these): the config's limits go
            // in first, as runc writes them.
            if let Some(resources) = self.resources {
                self.cgroups.apply(resources)?;
            }
        }
        Ok(())
    }

    fn notify(
        &mut self,
        notification: &Notification<'_>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        tracing::debug!(script = notification.script, pid = ?notification.pid, "CRIU notification");
        match notification.script {
            // runc runs these hooks here: the tasks and their namespaces exist, nothing runs.
            "setup-namespaces" => {
                self.hooks_ran = true;
                self.hooks.setup_namespaces(notification.pid.unwrap_or(0))?;
            }
            "post-restore" => self.pid = notification.pid,
            "orphan-pts-master" => {
                let (Some(console), Some(fd)) = (&self.console, notification.fd) else {
                    return Err(
                        "CRIU sent a console master but no --console-socket was given".into(),
                    );
                };
                send_console(console, fd.as_raw_fd())?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Sends the console master to the console socket as runc does: the fd with the payload
/// `orphan-pts-master`.
fn send_console(console: &UnixStream, fd: RawFd) -> Result<(), nix::Error> {
    let payload = b"orphan-pts-master";
    let iov = [IoSlice::new(payload)];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(console.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
    Ok(())
}

/// Writes the pid file atomically: a new file beside it, then a rename.
fn write_pid_file(path: &Path, pid: i32) -> Result<(), RestoreError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .custom_flags(nix::fcntl::OFlag::O_SYNC.bits())
        .open(&temp)
        .map_err(io_error("create", &temp))?;
    file.write_all(pid.to_string().as_bytes())
        .map_err(io_error("write", &temp))?;
    fs::rename(&temp, path).map_err(io_error("rename the pid file to", path))
}

/// Writes `state.json` atomically.
fn write_state(dir: &Path, state: &State) -> Result<(), RestoreError> {
    let temp = dir.join("state.json.tmp");
    let path = dir.join("state.json");
    let text = serde_json::to_vec_pretty(state)
        .map_err(|e| io_error("encode", &path)(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    fs::write(&temp, text).map_err(io_error("write", &temp))?;
    fs::rename(&temp, &path).map_err(io_error("write", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            id: "c".into(),
            bundle: "/b".into(),
            image_path: "/i".into(),
            work_path: None,
            root: "/r".into(),
            criu: "criu".into(),
            detach: true,
            pid_file: None,
            console_socket: None,
            tcp_established: true,
            ext_unix_sk: true,
            shell_job: true,
            file_locks: true,
            cgroups_mode: CgroupsMode::Ignore,
            empty_network: true,
            auto_dedup: true,
            lazy_pages: true,
            page_server: None,
            preload: PreloadMode::Off,
            lsm_profile: Some("selinux:system_u:system_r:container_t:s0".into()),
            lsm_mount_context: Some("system_u:object_r:container_file_t:s0".into()),
            skip_validation: false,
        }
    }

    #[test]
    fn every_flag_reaches_the_criu_request_as_runc_sends_it() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": {"maskedPaths": ["/proc/kcore"]}
        }))
        .expect("spec");
        let descriptors = ["/dev/null".to_owned(), "pipe:[7]".to_owned()];
        let opts = criu_options(
            &options(),
            &spec,
            Path::new("/nonexistent"),
            Path::new("/r/c/criu-root"),
            &descriptors,
        )
        .expect("options");

        assert_eq!(opts.root.as_deref(), Some("/r/c/criu-root"));
        for flag in [
            opts.tcp_established,
            opts.ext_unix_sk,
            opts.shell_job,
            opts.file_locks,
            opts.auto_dedup,
            opts.lazy_pages,
            opts.evasive_devices,
            opts.rst_sibling,
            opts.manage_cgroups,
            opts.orphan_pts_master,
        ] {
            assert_eq!(flag, Some(true));
        }
        // IGNORE is 0 and is sent all the same.
        assert_eq!(opts.manage_cgroups_mode, Some(CgMode::Ignore as i32));
        assert_eq!(opts.empty_ns, Some(CLONE_NEWNET));
        assert_eq!(
            opts.lsm_profile.as_deref(),
            Some("selinux:system_u:system_r:container_t:s0")
        );
        assert_eq!(
            opts.lsm_mount_context.as_deref(),
            Some("system_u:object_r:container_file_t:s0")
        );
        let masked: Vec<_> = opts.ext_mnt.iter().map(|m| (&*m.key, &*m.val)).collect();
        assert_eq!(masked, [("/dev/null", "/dev/null")]);
        let inherited: Vec<_> = opts.inherit_fd.iter().map(|f| (&*f.key, f.fd)).collect();
        assert_eq!(
            inherited,
            [("pipe:[7]", 1)],
            "stdout is a pipe, CRIU's fd 1"
        );

        let plain = Options {
            tcp_established: false,
            lsm_profile: None,
            empty_network: false,
            ..options()
        };
        let opts =
            criu_options(&plain, &spec, Path::new("/x"), Path::new("/y"), &[]).expect("options");
        assert_eq!(opts.tcp_established, None);
        assert_eq!(opts.lsm_profile, None);
        assert_eq!(opts.empty_ns, None);
    }

    #[test]
    fn ids_follow_runc_rules() {
        assert!(valid_id("my-container_1.2+x"));
        for bad in ["", ".", "..", "a/b", "a b", "ü"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
