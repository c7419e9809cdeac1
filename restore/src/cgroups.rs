//! The container's cgroups: where they go, CRIU put into them, and the config's resource
//! limits written to them, as runc does before a restore.
//!
//! runc creates the container's cgroup in every hierarchy, moves the CRIU process into it
//! (the restored tasks are created there, since they are CRIU's children), writes the
//! config's `linux.resources`, and passes each cgroup to CRIU as a cgroup root. CRIU in its
//! default soft mode restores properties only of cgroups it creates itself, so without the
//! resources written here a restored container would run with no memory limit and no device
//! rules.
//!
//! v1 hierarchies get runc's v1 files. On a host with only the v2 hierarchy, it gets the v2
//! files with runc's conversions (`cpu.weight` from shares, `io.weight` from the block I/O
//! weight); the `unified` map is written to the v2 hierarchy as it is, on either kind of host.
//!
//! Not yet handled: device rules on cgroup v2, because the kernel enforces them only through
//! an eBPF program attached to the cgroup, which this crate does not build yet; they are
//! skipped with a warning. Block I/O throttles, network classes and RDMA limits are not
//! written either.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxResources, Spec};
use thiserror::Error;

use crate::rpc::messages::CgroupRoot;

/// Why the container's cgroups could not be set up.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// A file describing this process's cgroups could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A cgroup could not be created.
    #[error("cannot create the cgroup {path}")]
    Create {
        /// The cgroup.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A cgroup file refused a value.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The config asks for a limit whose controller this host does not offer.
    #[error(
        "config.json sets {what}, but the cgroup {path} has no {file}: is the {controller} \
         controller enabled?"
    )]
    Unavailable {
        /// The resource, as config.json names it.
        what: &'static str,
        /// The cgroup.
        path: PathBuf,
        /// The file that is missing.
        file: String,
        /// The controller that provides it.
        controller: &'static str,
    },
}

/// One cgroup hierarchy of this host.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The controllers bound to it as CRIU names them (`name=systemd` included); empty for
    /// the v2 hierarchy.
    pub controllers: Vec<String>,
    /// Whether it is the v2 hierarchy.
    pub v2: bool,
}

/// The cgroup hierarchies mounted in this process's mount namespace.
///
/// # Errors
///
/// `/proc/self/mountinfo` cannot be read.
pub fn hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut right = right.split_whitespace();
        let v2 = match right.next() {
            Some("cgroup") => false,
            Some("cgroup2") => true,
            _ => continue,
        };
        let super_options = right.nth(1).unwrap_or_default();
        let Some(mount_point) = left.split_whitespace().nth(4) else {
            continue;
        };
        let controllers = if v2 {
            Vec::new()
        } else {
            super_options
                .split(',')
                .filter(|o| !matches!(*o, "rw" | "ro" | "xattr" | "clone_children"))
                .filter(|o| !o.starts_with("release_agent"))
                .map(str::to_owned)
                .collect()
        };
        out.push(Hierarchy {
            mount_point: PathBuf::from(mount_point),
            controllers,
            v2,
        });
    }
    Ok(out)
}

/// The container's cgroup in one hierarchy.
#[derive(Debug, Clone)]
struct Dir {
    hierarchy: Hierarchy,
    /// The cgroup's directory.
    path: PathBuf,
    /// Its path inside the hierarchy.
    relative: String,
}

impl Dir {
    fn has(&self, controller: &str) -> bool {
        self.hierarchy.controllers.iter().any(|c| c == controller)
    }
}

/// The container's cgroup in each hierarchy.
#[derive(Debug)]
pub struct Cgroups {
    dirs: Vec<Dir>,
}

impl Cgroups {
    /// Where the container's cgroups go: `linux.cgroupsPath`, or, as runc 1.1.5 does without
    /// one, the id below this process's own cgroup in each hierarchy.
    ///
    /// # Errors
    ///
    /// This process's cgroups or mounts cannot be read.
    pub fn plan(spec: &Spec, id: &str) -> Result<Cgroups, CgroupError> {
        let configured = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .map(|p| p.display().to_string());
        let own = own_cgroups()?;
        let mut dirs = Vec::new();
        for hierarchy in hierarchies()? {
            let key = hierarchy.controllers.first().cloned().unwrap_or_default();
            let relative = match &configured {
                Some(path) => path.clone(),
                None => {
                    let base = own.get(&key).cloned().unwrap_or_else(|| "/".into());
                    format!("{}/{id}", base.trim_end_matches('/'))
                }
            };
            let path = hierarchy.mount_point.join(relative.trim_start_matches('/'));
            dirs.push(Dir {
                hierarchy,
                path,
                relative,
            });
        }
        Ok(Cgroups { dirs })
    }

    /// The cgroup roots CRIU restores into, one per hierarchy. The v2 hierarchy is named by
    /// the empty controller, which is how CRIU matches it (and how runc passes it).
    pub fn roots(&self) -> Vec<CgroupRoot> {
        self.dirs
            .iter()
            .map(|dir| CgroupRoot {
                ctrl: Some(dir.hierarchy.controllers.join(",")),
                path: dir.relative.clone(),
            })
            .collect()
    }

    /// The container's cgroup directories that exist now.
    pub fn existing(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.path.clone())
            .filter(|path| path.exists())
            .collect()
    }

    /// Creates the cgroups that do not exist yet and moves `pid` into each; adds the ones it
    /// created to `created`, also when it fails halfway.
    ///
    /// # Errors
    ///
    /// A cgroup that cannot be created or entered.
    pub fn enter(&self, pid: u32, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            if !dir.path.exists() {
                if dir.hierarchy.v2 {
                    enable_v2_controllers(&dir.hierarchy.mount_point, &dir.path);
                }
                fs::create_dir_all(&dir.path).map_err(|source| CgroupError::Create {
                    path: dir.path.clone(),
                    source,
                })?;
                created.push(dir.path.clone());
                if dir.has("cpuset") {
                    inherit_cpuset(&dir.path)?;
                }
            }
            write(&dir.path.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Writes the config's resource limits into every hierarchy, as runc does before a
    /// restore.
    ///
    /// # Errors
    ///
    /// A value the kernel refuses, or a limit whose controller is missing.
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        self.settings(&mut Settings { planned: None }, resources)
    }

    /// The files [`Cgroups::apply`] would write, with their values, in order; nothing is
    /// written. Files of cgroups that do not exist yet are listed without checking that the
    /// host offers them.
    ///
    /// # Errors
    ///
    /// A value that cannot be written at all (a bad `unified` key).
    pub fn planned(
        &self,
        resources: &LinuxResources,
    ) -> Result<Vec<(PathBuf, String)>, CgroupError> {
        let mut out = Settings {
            planned: Some(Vec::new()),
        };
        self.settings(&mut out, resources)?;
        Ok(out.planned.unwrap_or_default())
    }

    fn settings(&self, out: &mut Settings, resources: &LinuxResources) -> Result<(), CgroupError> {
        // With v1 hierarchies beside it the v2 one holds no controllers of theirs (runc's v1
        // manager leaves it alone); only the `unified` map, which names its files, goes there.
        let v2_only = self.dirs.iter().all(|dir| dir.hierarchy.v2);
        for dir in &self.dirs {
            if dir.hierarchy.v2 && v2_only {
                apply_v2(out, &dir.path, resources)?;
            } else if dir.hierarchy.v2 {
                apply_unified(out, &dir.path, resources)?;
            } else {
                apply_v1(out, dir, resources)?;
            }
        }
        Ok(())
    }

    /// Each hierarchy's cgroup directory, whether it exists, and its path in the hierarchy.
    pub fn dirs(&self) -> impl Iterator<Item = (&Path, bool, &str)> {
        self.dirs
            .iter()
            .map(|d| (d.path.as_path(), d.path.exists(), d.relative.as_str()))
    }
}

/// Writes `value` to a cgroup file.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

/// Where resource settings go: into the cgroup files, or into a list (a dry run).
struct Settings {
    planned: Option<Vec<(PathBuf, String)>>,
}

impl Settings {
    fn planning(&self) -> bool {
        self.planned.is_some()
    }

    /// Writes (or lists) `value` for the file `path`.
    fn set(&mut self, path: &Path, value: &str) -> Result<(), CgroupError> {
        match &mut self.planned {
            Some(list) => {
                list.push((path.to_path_buf(), value.to_owned()));
                Ok(())
            }
            None => write(path, value),
        }
    }

    /// Writes `value` to the first of `files` in `dir` that exists; a dry run takes the
    /// first when none exists yet (the cgroup is made later).
    fn set_any(
        &mut self,
        dir: &Path,
        files: &[&str],
        value: &str,
        what: &'static str,
        controller: &'static str,
    ) -> Result<(), CgroupError> {
        let existing = files.iter().map(|f| dir.join(f)).find(|p| p.exists());
        match existing {
            Some(path) => self.set(&path, value),
            None if self.planning() && !dir.exists() => self.set(&dir.join(files[0]), value),
            None => Err(CgroupError::Unavailable {
                what,
                path: dir.to_path_buf(),
                file: files.join(" or "),
                controller,
            }),
        }
    }
}

fn apply_v1(out: &mut Settings, dir: &Dir, r: &LinuxResources) -> Result<(), CgroupError> {
    let path = &dir.path;
    if dir.has("cpuset")
        && let Some(cpu) = r.cpu()
    {
        if let Some(cpus) = cpu.cpus() {
            out.set(&path.join("cpuset.cpus"), cpus)?;
        }
        if let Some(mems) = cpu.mems() {
            out.set(&path.join("cpuset.mems"), mems)?;
        }
    }
    if dir.has("devices") {
        for rule in device_rules(r) {
            let (file, line) = v1_device_rule(&rule);
            out.set(&path.join(file), &line)?;
        }
    }
    if dir.has("memory")
        && let Some(memory) = r.memory()
    {
        set_memory_v1(out, path, memory.limit(), memory.swap())?;
        if let Some(reservation) = memory.reservation() {
            write(
                &path.join("memory.soft_limit_in_bytes"),
                &reservation.to_string(),
            )?;
        }
        if let Some(swappiness) = memory.swappiness() {
            out.set(&path.join("memory.swappiness"), &swappiness.to_string())?;
        }
        if memory.disable_oom_killer() == Some(true) {
            out.set(&path.join("memory.oom_control"), "1")?;
        }
    }
    if dir.has("cpu")
        && let Some(cpu) = r.cpu()
    {
        if let Some(shares) = cpu.shares().filter(|&s| s != 0) {
            out.set(&path.join("cpu.shares"), &shares.to_string())?;
        }
        // The period first: a quota is checked against the period in force.
        if let Some(period) = cpu.period().filter(|&p| p != 0) {
            out.set(&path.join("cpu.cfs_period_us"), &period.to_string())?;
        }
        if let Some(quota) = cpu.quota().filter(|&q| q != 0) {
            out.set(&path.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        if let Some(period) = cpu.realtime_period().filter(|&p| p != 0) {
            out.set(&path.join("cpu.rt_period_us"), &period.to_string())?;
        }
        if let Some(runtime) = cpu.realtime_runtime().filter(|&r| r != 0) {
            out.set(&path.join("cpu.rt_runtime_us"), &runtime.to_string())?;
        }
    }
    if dir.has("pids")
        && let Some(pids) = r.pids()
        && pids.limit() != 0
    {
        out.set(&path.join("pids.max"), &pids_max(pids.limit()))?;
    }
    if dir.has("blkio")
        && let Some(weight) = r.block_io().as_ref().and_then(|b| b.weight())
        && weight != 0
    {
        let files = ["blkio.weight", "blkio.bfq.weight"];
        out.set_any(path, &files, &weight.to_string(), "blockIO.weight", "blkio")?;
    }
    if dir.has("hugetlb") {
        for limit in r.hugepage_limits().iter().flatten() {
            let file = format!("hugetlb.{}.limit_in_bytes", limit.page_size());
            out.set(&path.join(file), &limit.limit().to_string())?;
        }
    }
    Ok(())
}

/// The memory limit and the memory-plus-swap limit, in an order the kernel accepts: the
/// second may never be below the first, so whichever rises goes first.
fn set_memory_v1(
    out: &mut Settings,
    path: &Path,
    limit: Option<i64>,
    swap: Option<i64>,
) -> Result<(), CgroupError> {
    let limit_file = path.join("memory.limit_in_bytes");
    let swap_file = path.join("memory.memsw.limit_in_bytes");
    let Some(swap) = swap.filter(|&s| s != 0) else {
        if let Some(limit) = limit.filter(|&l| l != 0) {
            out.set(&limit_file, &limit.to_string())?;
        }
        return Ok(());
    };
    if !swap_file.exists() && !out.planning() {
        return Err(CgroupError::Unavailable {
            what: "memory.swap",
            path: path.to_path_buf(),
            file: "memory.memsw.limit_in_bytes".into(),
            controller: "memory (with swap accounting)",
        });
    }
    let current_swap: i64 = fs::read_to_string(&swap_file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(i64::MAX);
    let swap_rises = swap == -1 || swap > current_swap;
    if swap_rises {
        out.set(&swap_file, &swap.to_string())?;
    }
    if let Some(limit) = limit.filter(|&l| l != 0) {
        out.set(&limit_file, &limit.to_string())?;
    }
    if !swap_rises {
        out.set(&swap_file, &swap.to_string())?;
    }
    Ok(())
}

fn apply_v2(out: &mut Settings, path: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
    if let Some(cpu) = r.cpu() {
        if let Some(cpus) = cpu.cpus() {
            out.set_any(path, &["cpuset.cpus"], cpus, "cpu.cpus", "cpuset")?;
        }
        if let Some(mems) = cpu.mems() {
            out.set_any(path, &["cpuset.mems"], mems, "cpu.mems", "cpuset")?;
        }
        if let Some(shares) = cpu.shares().filter(|&s| s != 0) {
            let weight = cpu_weight(shares).to_string();
            out.set_any(path, &["cpu.weight"], &weight, "cpu.shares", "cpu")?;
        }
        if cpu.quota().is_some_and(|q| q != 0) || cpu.period().is_some_and(|p| p != 0) {
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_owned(),
            };
            let period = cpu.period().filter(|&p| p != 0).unwrap_or(100_000);
            let value = format!("{quota} {period}");
            out.set_any(path, &["cpu.max"], &value, "cpu.quota", "cpu")?;
        }
    }
    if r.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        tracing::warn!(
            cgroup = %path.display(),
            "the device rules of config.json are not enforced on cgroup v2 by this restore"
        );
    }
    if let Some(memory) = r.memory() {
        if let Some(limit) = memory.limit().filter(|&l| l != 0) {
            let value = v2_limit(limit);
            out.set_any(path, &["memory.max"], &value, "memory.limit", "memory")?;
        }
        if let Some(reservation) = memory.reservation().filter(|&l| l != 0) {
            let value = v2_limit(reservation);
            out.set_any(
                path,
                &["memory.low"],
                &value,
                "memory.reservation",
                "memory",
            )?;
        }
        // In v1 terms the swap limit covers memory and swap together; v2 limits swap alone.
        if let Some(swap) = memory.swap().filter(|&s| s != 0) {
            let value = match (swap, memory.limit()) {
                (-1, _) => "max".to_owned(),
                (swap, Some(limit)) if limit > 0 => swap.saturating_sub(limit).max(0).to_string(),
                (swap, _) => swap.to_string(),
            };
            out.set_any(path, &["memory.swap.max"], &value, "memory.swap", "memory")?;
        }
    }
    if let Some(pids) = r.pids()
        && pids.limit() != 0
    {
        let value = pids_max(pids.limit());
        out.set_any(path, &["pids.max"], &value, "pids.limit", "pids")?;
    }
    if let Some(weight) = r.block_io().as_ref().and_then(|b| b.weight())
        && weight != 0
    {
        let value = io_weight(weight).to_string();
        out.set_any(path, &["io.weight"], &value, "blockIO.weight", "io")?;
    }
    for limit in r.hugepage_limits().iter().flatten() {
        let file = format!("hugetlb.{}.max", limit.page_size());
        out.set_any(
            path,
            &[&file],
            &limit.limit().to_string(),
            "hugepageLimits",
            "hugetlb",
        )?;
    }
    // The unified map is written last: it overrides what was converted.
    apply_unified(out, path, r)
}

/// Writes the `unified` map as it is, each key a file of the v2 cgroup.
fn apply_unified(out: &mut Settings, path: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
    let unified: BTreeMap<_, _> = r.unified().iter().flatten().collect();
    for (key, value) in unified {
        if key.contains('/') || key.starts_with('.') {
            return Err(CgroupError::Write {
                path: path.join(key),
                value: value.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a cgroup file name"),
            });
        }
        out.set(&path.join(key), value)?;
    }
    Ok(())
}

/// `pids.max` for an OCI pids limit: a negative limit means no limit.
fn pids_max(limit: i64) -> String {
    if limit > 0 {
        limit.to_string()
    } else {
        "max".to_owned()
    }
}

/// A v2 memory limit: -1 means no limit.
fn v2_limit(limit: i64) -> String {
    if limit < 0 {
        "max".to_owned()
    } else {
        limit.to_string()
    }
}

/// runc's conversion of v1 CPU shares (2 to 262144) to a v2 weight (1 to 10000).
fn cpu_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// runc's conversion of a v1 block I/O weight (10 to 1000) to a v2 I/O weight (1 to 10000).
fn io_weight(weight: u16) -> u64 {
    let weight = u64::from(weight.clamp(10, 1000));
    1 + (weight - 10) * 9999 / 990
}

/// One device rule as runc applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DeviceRule {
    allow: bool,
    kind: char,
    major: Option<i64>,
    minor: Option<i64>,
    access: String,
}

/// The devices runc allows in every container, after the config's own rules: mknod of any
/// device, then the usual character devices (null, random, full, tty, zero, urandom, the pty
/// slaves, ptmx and tun).
const RUNC_ALLOWED: &[(char, Option<i64>, Option<i64>, &str)] = &[
    ('c', None, None, "m"),
    ('b', None, None, "m"),
    ('c', Some(1), Some(3), "rwm"),
    ('c', Some(1), Some(8), "rwm"),
    ('c', Some(1), Some(7), "rwm"),
    ('c', Some(5), Some(0), "rwm"),
    ('c', Some(1), Some(5), "rwm"),
    ('c', Some(1), Some(9), "rwm"),
    ('c', Some(136), None, "rwm"),
    ('c', Some(5), Some(2), "rwm"),
    ('c', Some(10), Some(200), "rwm"),
];

/// The config's device rules followed by runc's default allowed devices, or nothing when the
/// config has no rules (runc then leaves the devices cgroup alone).
fn device_rules(r: &LinuxResources) -> Vec<DeviceRule> {
    let Some(rules) = r.devices().as_ref().filter(|d| !d.is_empty()) else {
        return Vec::new();
    };
    let from_config = rules.iter().map(|rule: &LinuxDeviceCgroup| DeviceRule {
        allow: rule.allow(),
        kind: rule
            .typ()
            .map_or('a', |t| t.as_str().chars().next().unwrap_or('a')),
        major: rule.major().filter(|&m| m >= 0),
        minor: rule.minor().filter(|&m| m >= 0),
        access: rule.access().clone().unwrap_or_else(|| "rwm".into()),
    });
    let defaults = RUNC_ALLOWED
        .iter()
        .map(|&(kind, major, minor, access)| DeviceRule {
            allow: true,
            kind,
            major,
            minor,
            access: access.to_owned(),
        });
    from_config.chain(defaults).collect()
}

/// The v1 file and line for a device rule: `a` for every device, else `TYPE MAJOR:MINOR
/// ACCESS` with `*` for a wildcard.
fn v1_device_rule(rule: &DeviceRule) -> (&'static str, String) {
    let file = if rule.allow {
        "devices.allow"
    } else {
        "devices.deny"
    };
    if rule.kind == 'a' {
        return (file, "a".to_owned());
    }
    let number = |n: Option<i64>| n.map_or_else(|| "*".to_owned(), |n| n.to_string());
    let line = format!(
        "{} {}:{} {}",
        rule.kind,
        number(rule.major),
        number(rule.minor),
        rule.access
    );
    (file, line)
}

/// Enables, in every ancestor of `cgroup` below the v2 mount, the controllers it offers, so
/// the new cgroup gets their files (as runc does). A parent that refuses (it holds processes
/// of its own, say) keeps its settings; a limit that then lacks its file is reported when it
/// is written.
fn enable_v2_controllers(mount_point: &Path, cgroup: &Path) {
    let Ok(relative) = cgroup.strip_prefix(mount_point) else {
        return;
    };
    let mut current = mount_point.to_path_buf();
    for component in relative.parent().into_iter().flat_map(Path::components) {
        enable_offered(&current);
        current.push(component);
        if !current.exists() && fs::create_dir(&current).is_err() {
            return;
        }
    }
    enable_offered(&current);
}

fn enable_offered(cgroup: &Path) {
    let offered = fs::read_to_string(cgroup.join("cgroup.controllers")).unwrap_or_default();
    for controller in offered.split_whitespace() {
        let _ = fs::write(
            cgroup.join("cgroup.subtree_control"),
            format!("+{controller}"),
        );
    }
}

/// A new v1 cpuset cgroup starts with no CPUs and no memory nodes, and refuses tasks until it
/// has some: give it its parent's, as runc does.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    for name in ["cpuset.cpus", "cpuset.mems"] {
        let file = dir.join(name);
        let Some(parent) = dir.parent() else {
            continue;
        };
        if !file.exists()
            || !fs::read_to_string(&file)
                .unwrap_or_default()
                .trim()
                .is_empty()
        {
            continue;
        }
        let parent_file = parent.join(name);
        let value = fs::read_to_string(&parent_file).map_err(|source| CgroupError::Read {
            path: parent_file.clone(),
            source,
        })?;
        write(&file, value.trim())?;
    }
    Ok(())
}

/// This process's cgroup per controller, from `/proc/self/cgroup`; the v2 hierarchy's line
/// has no controllers and is keyed by the empty name.
fn own_cgroups() -> Result<BTreeMap<String, String>, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, cgroup) = (parts.next(), parts.next(), parts.next());
        if let (Some(controllers), Some(cgroup)) = (controllers, cgroup) {
            for controller in controllers.split(',') {
                out.insert(controller.to_owned(), cgroup.to_owned());
            }
        }
    }
    Ok(out)
}

/// Removes a cgroup this restore created, killing what is left in it first.
///
/// After a failed restore the cgroup can still hold tasks CRIU had forked: CRIU kills them,
/// but with `rst_sibling` the root task is this process's child, and until it is reaped a
/// v1 cgroup counts it and refuses to go (`EBUSY`). Anything in a cgroup the restore created
/// belongs to the container, so it is killed, every exited child is reaped, and the removal
/// is retried for a short while.
pub fn remove(cgroup: &Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // Only a real pid: kill(-1) or kill(0) would signal far more than the container.
            if pid > 1 {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        reap_exited_children();
        match fs::remove_dir(cgroup) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                tracing::warn!(cgroup = %cgroup.display(), "cannot remove the cgroup: {e}");
                return;
            }
        }
    }
}

/// Reaps every child that has exited, without waiting for the others.
fn reap_exited_children() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: serde_json::Value) -> LinuxResources {
        serde_json::from_value(json).expect("resources")
    }

    #[test]
    fn device_rules_are_the_configs_then_runcs_defaults() {
        let r = resources(serde_json::json!({"devices": [
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 4, "minor": -1, "access": "rw"}
        ]}));
        let lines: Vec<(&str, String)> = device_rules(&r).iter().map(v1_device_rule).collect();
        assert_eq!(lines[0], ("devices.deny", "a".to_owned()));
        assert_eq!(lines[1], ("devices.allow", "c 4:* rw".to_owned()));
        assert_eq!(lines[2], ("devices.allow", "c *:* m".to_owned()));
        assert!(lines.contains(&("devices.allow", "c 1:3 rwm".to_owned())));
        assert!(lines.contains(&("devices.allow", "c 136:* rwm".to_owned())));
        assert_eq!(lines.len(), 2 + RUNC_ALLOWED.len());
        assert!(device_rules(&resources(serde_json::json!({}))).is_empty());
    }

    #[test]
    fn v2_conversions_follow_runc() {
        assert_eq!(cpu_weight(2), 1);
        assert_eq!(cpu_weight(1024), 39);
        assert_eq!(cpu_weight(262_144), 10_000);
        assert_eq!(io_weight(10), 1);
        assert_eq!(io_weight(500), 4950);
        assert_eq!(io_weight(1000), 10_000);
        assert_eq!(pids_max(-1), "max");
        assert_eq!(pids_max(64), "64");
    }

    #[test]
    fn v2_limits_go_to_their_files_and_missing_controllers_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        for file in [
            "memory.max",
            "memory.swap.max",
            "pids.max",
            "cpu.max",
            "cpu.weight",
        ] {
            fs::write(dir.path().join(file), "").expect("file");
        }
        let r = resources(serde_json::json!({
            "memory": {"limit": 67108864, "swap": 134217728},
            "pids": {"limit": 32},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000},
            "unified": {"pids.max": "31"}
        }));
        apply_v2(&mut Settings { planned: None }, dir.path(), &r).expect("applies");
        let read = |f: &str| fs::read_to_string(dir.path().join(f)).expect(f);
        assert_eq!(read("memory.max"), "67108864");
        assert_eq!(read("memory.swap.max"), "67108864");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("cpu.weight"), "39");
        assert_eq!(read("pids.max"), "31", "the unified map has the last word");

        let r = resources(serde_json::json!({"blockIO": {"weight": 500}}));
        let error = apply_v2(&mut Settings { planned: None }, dir.path(), &r).expect_err("no io");
        assert!(
            matches!(
                error,
                CgroupError::Unavailable {
                    controller: "io",
                    ..
                }
            ),
            "{error}"
        );
        let r = resources(serde_json::json!({"unified": {"../escape": "1"}}));
        assert!(apply_v2(&mut Settings { planned: None }, dir.path(), &r).is_err());
    }
}
