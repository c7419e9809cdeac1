//! Checks of an images directory before it is restored: everything CRIU would trip over
//! late, found early and said plainly.
//!
//! [`validate`] reads the directory the way a restore does and collects [`Finding`]s instead
//! of stopping at the first problem: each has a stable code (for scripts and tests), a
//! severity, the image, entry or path concerned, what is wrong, and how to fix it. The checks
//! run in dependency order (an images directory without an inventory cannot be checked
//! further), and one broken image does not hide problems in the others.
//!
//! | code | severity | what |
//! |---|---|---|
//! | `images-dir` | error | the directory is missing or unreadable |
//! | `inventory-missing` | error | no `inventory.img` |
//! | `inventory-version` | error | an image version CRIU 4 does not read |
//! | `image-corrupt` | error | an image that does not parse completely |
//! | `pstree-missing` | error | no process tree |
//! | `task-image-missing` | error | a per-task image CRIU needs is missing |
//! | `file-missing` | error | a descriptor, working directory, root or executable names a file
//! `files.img` lacks |
//! | `pagemap-invalid` | error | a pagemap that does not parse (unsorted, overlapping, ...) |
//! | `pagemap-outside-vma` | error | dumped pages outside every mapping of the process |
//! | `pages-size` | error | a pages file longer or shorter than its present pages |
//! | `parent-missing` | error | a `parent` link that leads nowhere |
//! | `parent-loop` | error | a chain of `parent` links that comes back on itself |
//! | `parent-uncovered` | error | pages kept in the parent that the parent does not hold |
//! | `lazy-pages-needed` | error | pages only a lazy-pages restore can serve |
//! | `arch-mismatch` | error | images of another architecture than this host's |
//! | `page-size-mismatch` | error | images of another page size than this host's |
//!
//! Callers add checks of their own (a container runtime checks its bundle) as more findings
//! of the same shape.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checkpoint::{Checkpoint, CheckpointError, default_page_size};
use crate::image::Image;
use crate::json::{DecodeOptions, decode_to};
use crate::kind::{Layout, RawKind};
use crate::memory::{MemoryError, MemoryImage};
use crate::pagemap::Pagemap;
use crate::pb;

/// The inventory `img_version` of every image set CRIU 3 and 4 write (`CRTOOLS_IMAGES_V1_1`).
const IMAGES_V1_1: u32 = 2;

/// The `task_state` of a zombie, which has no memory to restore.
const TASK_ZOMBIE: u32 = 6;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The restore would fail or restore something wrong.
    Error,
    /// The restore can go on, but something deserves a look.
    Warning,
}

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// A stable identifier of the check, such as `pages-size`.
    pub code: &'static str,
    /// How bad it is.
    pub severity: Severity,
    /// The image, entry or path concerned.
    pub subject: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

impl Finding {
    /// An error finding.
    pub fn error(
        code: &'static str,
        subject: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Finding {
        Finding {
            code,
            severity: Severity::Error,
            subject: subject.into(),
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// A warning finding.
    pub fn warning(
        code: &'static str,
        subject: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Finding {
        Finding {
            severity: Severity::Warning,
            ..Finding::error(code, subject, message, hint)
        }
    }
}

/// The machine a checkpoint is to be restored on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Host {
    /// Its architecture, as `core_entry.mtype` numbers them.
    pub arch: pb::core_entry::March,
    /// Its page size in bytes.
    pub page_size: u64,
}

impl Host {
    /// This machine: the architecture this program was built for and the kernel's page size
    /// (from the auxiliary vector; 4 KiB if it cannot be read).
    pub fn this() -> Host {
        use pb::core_entry::March;

        let arch = match std::env::consts::ARCH {
            "x86_64" => March::X8664,
            "arm" => March::Arm,
            "aarch64" => March::Aarch64,
            "powerpc64" => March::Ppc64,
            "s390x" => March::S390,
            "mips" | "mips64" => March::Mips,
            "loongarch64" => March::Loongarch64,
            "riscv64" => March::Riscv64,
            _ => March::Unknown,
        };
        Host {
            arch,
            page_size: auxv_page_size().unwrap_or(4096),
        }
    }
}

/// `AT_PAGESZ` from `/proc/self/auxv`: pairs of native words, key then value.
fn auxv_page_size() -> Option<u64> {
    const AT_PAGESZ: u64 = 6;
    let auxv = fs::read("/proc/self/auxv").ok()?;
    let word = size_of::<usize>();
    let read = |bytes: &[u8]| -> u64 {
        let mut buf = [0u8; 8];
        buf[..word].copy_from_slice(bytes);
        u64::from_ne_bytes(buf)
    };
    auxv.chunks_exact(2 * word)
        .map(|pair| (read(&pair[..word]), read(&pair[word..])))
        .find(|&(key, _)| key == AT_PAGESZ)
        .map(|(_, value)| value)
}

/// What the restore will be asked, as far as the images are concerned.
#[derive(Clone, Copy, Debug, Default)]
pub struct ValidateOptions {
    /// The restore serves pages lazily (`--lazy-pages`).
    pub lazy_pages: bool,
    /// The machine to check against; `None` skips the host checks.
    pub host: Option<Host>,
    /// The page size the images were dumped with, when known better than from their
    /// architecture.
    pub page_size: Option<u64>,
}

/// What [`validate`] found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The images directory.
    pub dir: PathBuf,
    /// Images that were parsed.
    pub images: usize,
    /// Processes of the tree.
    pub processes: usize,
    /// The problems, in the order they were found.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether any finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// The error findings.
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
    }

    fn push(&mut self, finding: Finding) {
        self.findings.push(finding);
    }
}

/// Checks the images directory `dir` for what a restore needs; see the module documentation
/// for the checks. Problems are findings, never errors: the report is always complete as far
/// as the directory could be read.
pub fn validate(dir: &Path, options: &ValidateOptions) -> Report {
    let mut report = Report {
        dir: dir.to_path_buf(),
        ..Report::default()
    };
    let names = match list_dir(dir) {
        Ok(names) => names,
        Err(error) => {
            report.push(Finding::error(
                "images-dir",
                dir.display().to_string(),
                format!("cannot read the images directory: {error}"),
                "check --image-path: it must be the directory runc checkpoint or criu dump \
                 wrote",
            ));
            return report;
        }
    };
    if !names.contains("inventory.img") {
        report.push(Finding::error(
            "inventory-missing",
            dir.join("inventory.img").display().to_string(),
            "the directory holds no inventory.img, so it is no CRIU checkpoint (or an \
             incomplete copy of one)",
            "point --image-path at the checkpoint's images directory, or copy the checkpoint \
             again in full",
        ));
        return report;
    }

    let checkpoint = match Checkpoint::open(dir) {
        Ok(checkpoint) => checkpoint,
        Err(error) => {
            report.push(corrupt("inventory.img", &error));
            return report;
        }
    };
    let inventory = match checkpoint.inventory() {
        Ok(inventory) => Some(inventory),
        Err(error) => {
            report.push(corrupt("inventory.img", &error));
            None
        }
    };
    if let Some(inventory) = &inventory
        && inventory.img_version != IMAGES_V1_1
    {
        report.push(Finding::error(
            "inventory-version",
            "inventory.img",
            format!(
                "image version {} is not the version CRIU 3 and 4 write ({IMAGES_V1_1})",
                inventory.img_version
            ),
            "dump the process again with CRIU 3 or newer",
        ));
    }

    check_images(&checkpoint, &names, &mut report);

    let tree = match checkpoint.pstree() {
        Ok(tree) => tree,
        Err(CheckpointError::Missing { path }) => {
            report.push(Finding::error(
                "pstree-missing",
                path.display().to_string(),
                "the checkpoint has no process tree",
                "copy the checkpoint again in full",
            ));
            return report;
        }
        // Reported by the image check already.
        Err(_) => return report,
    };
    report.processes = tree.len();

    let cores = check_tasks(&checkpoint, &names, &tree, &mut report);
    check_files(&checkpoint, &names, &tree, &mut report);

    let march = cores.first().map_or(0, |core| core.mtype);
    let page_size = options
        .page_size
        .unwrap_or_else(|| default_page_size(march));
    let checkpoint = checkpoint.with_page_size(page_size);
    check_memory(&checkpoint, &names, &tree, options, &mut report);
    if let Some(host) = options.host {
        check_host(&cores, page_size, host, &mut report);
    }
    report
}

fn list_dir(dir: &Path) -> io::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str() {
            names.insert(name.to_owned());
        }
    }
    Ok(names)
}

fn corrupt(image: &str, error: &dyn std::error::Error) -> Finding {
    Finding::error(
        "image-corrupt",
        image,
        error_chain(error),
        "the image is damaged: copy the checkpoint again, or dump the process again",
    )
}

/// An error with its sources, as one line (`outer: inner: innermost`), the way a finding's
/// message states what went wrong.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Every protobuf image parses to its end: the framing, each entry's message, and the
/// payloads behind them. Pagemaps are parsed by the memory checks.
fn check_images(checkpoint: &Checkpoint, names: &BTreeSet<String>, report: &mut Report) {
    for name in names {
        let is_image = name.ends_with(".img") || name.starts_with("stats-");
        // The inventory was read and reported on already.
        if !is_image || RawKind::from_file_name(name).is_some() || name == "inventory.img" {
            continue;
        }
        let map = match checkpoint.map(name) {
            Ok(Some(map)) => map,
            Ok(None) => continue,
            Err(error) => {
                report.push(corrupt(name, &error));
                continue;
            }
        };
        report.images += 1;
        let image = match Image::parse(map.bytes()) {
            Ok(image) => image,
            Err(error) => {
                report.push(corrupt(name, &error));
                continue;
            }
        };
        if image.layout().is_ok_and(|l| l == Layout::Pagemap) {
            continue;
        }
        if let Err(error) = decode_to(&image, DecodeOptions::default(), &mut io::sink()) {
            report.push(corrupt(name, &error));
        }
    }
}

/// The per-task images CRIU reads: a core per thread and the ids of every task; the memory
/// and file system of every task that is not a zombie. Returns the main threads' cores.
fn check_tasks(
    checkpoint: &Checkpoint,
    names: &BTreeSet<String>,
    tree: &[pb::PstreeEntry],
    report: &mut Report,
) -> Vec<pb::CoreEntry> {
    let missing = |report: &mut Report, name: String, pid: u32| {
        report.push(Finding::error(
            "task-image-missing",
            name.clone(),
            format!("process {pid} of the tree has no {name}"),
            "the checkpoint is incomplete: copy it again in full",
        ));
    };
    let mut cores = Vec::new();
    for task in tree {
        let threads: Vec<u32> = if task.threads.is_empty() {
            vec![task.pid]
        } else {
            task.threads.clone()
        };
        for tid in &threads {
            let name = format!("core-{tid}.img");
            if !names.contains(&name) {
                missing(report, name, task.pid);
            }
        }
        let core = checkpoint.core(task.pid).ok();
        let zombie = core.as_ref().is_some_and(core_is_zombie);
        let mut needed = vec![format!("ids-{}.img", task.pid)];
        if !zombie {
            needed.push(format!("mm-{}.img", task.pid));
            needed.push(format!("pagemap-{}.img", task.pid));
        }
        for name in needed {
            if !names.contains(&name) {
                missing(report, name, task.pid);
            }
        }
        if let Some(core) = core {
            cores.push(core);
        }
    }
    cores
}

/// Every descriptor of every file table, and every task's working directory, root and
/// executable, names a file of `files.img`.
fn check_files(
    checkpoint: &Checkpoint,
    names: &BTreeSet<String>,
    tree: &[pb::PstreeEntry],
    report: &mut Report,
) {
    let Ok(files) = checkpoint.files() else {
        return;
    };
    let ids: HashSet<u32> = files.iter().map(|f| f.id).collect();
    let mut missing = |subject: String, what: String, id: u32| {
        if !ids.contains(&id) {
            report.push(Finding::error(
                "file-missing",
                subject,
                format!("{what} refers to file {id}, which files.img lacks"),
                "the checkpoint is incomplete or mixed from two dumps: copy it again",
            ));
        }
    };

    let mut tables = BTreeSet::new();
    for task in tree {
        if let Ok(task_ids) = checkpoint.ids(task.pid) {
            tables.insert(task_ids.files_id);
        }
        if let Ok(fs) = checkpoint.fs(task.pid) {
            let name = format!("fs-{}.img", task.pid);
            let pid = task.pid;
            missing(
                name.clone(),
                format!("the working directory of {pid}"),
                fs.cwd_id,
            );
            missing(name, format!("the root of {pid}"), fs.root_id);
        }
        if !is_zombie(checkpoint, task.pid)
            && let Ok(mm) = checkpoint.mm(task.pid)
        {
            let what = format!("the executable of {}", task.pid);
            missing(format!("mm-{}.img", task.pid), what, mm.exe_file_id);
        }
    }
    for files_id in tables {
        let name = format!("fdinfo-{files_id}.img");
        if !names.contains(&name) {
            continue;
        }
        let Ok(fds) = checkpoint.fdinfo(files_id) else {
            continue;
        };
        for (index, fd) in fds.iter().enumerate() {
            let subject = format!("{name} entry {index}");
            missing(subject, format!("descriptor {}", fd.fd), fd.id);
        }
    }
}

/// The memory of every live task: its pagemap parses, lies inside its mappings, its pages
/// file has exactly the present pages, its parent chain holds what it claims, and nothing
/// needs lazy pages unless they are asked for.
fn check_memory(
    checkpoint: &Checkpoint,
    names: &BTreeSet<String>,
    tree: &[pb::PstreeEntry],
    options: &ValidateOptions,
    report: &mut Report,
) {
    let page_size = checkpoint.page_size();
    for task in tree {
        let pagemap_name = format!("pagemap-{}.img", task.pid);
        if !names.contains(&pagemap_name) {
            continue;
        }
        if is_zombie(checkpoint, task.pid) {
            continue;
        }
        let memory = match MemoryImage::open(checkpoint.dir(), &pagemap_name, page_size) {
            Ok(Some(memory)) => memory,
            Ok(None) => continue,
            Err(error) => {
                report.push(memory_finding(&pagemap_name, &error));
                continue;
            }
        };
        if let Ok(mm) = checkpoint.mm(task.pid) {
            check_inside_vmas(&pagemap_name, memory.pagemap(), &mm.vmas, report);
        }
        check_levels(&pagemap_name, &memory, report);
        let lazy = memory.pagemap().lazy_only_pages();
        if lazy > 0 && !options.lazy_pages {
            report.push(Finding::error(
                "lazy-pages-needed",
                pagemap_name.clone(),
                format!("{lazy} pages were dumped for lazy migration and are not in the images"),
                "restore with --lazy-pages and a lazy-pages daemon that can reach the pages",
            ));
        }
    }
}

fn core_is_zombie(core: &pb::CoreEntry) -> bool {
    core.tc
        .as_ref()
        .is_some_and(|tc| tc.task_state == TASK_ZOMBIE)
}

fn is_zombie(checkpoint: &Checkpoint, pid: u32) -> bool {
    checkpoint.core(pid).is_ok_and(|core| core_is_zombie(&core))
}

fn memory_finding(pagemap: &str, error: &MemoryError) -> Finding {
    let (code, hint) = match error {
        MemoryError::Pagemap { .. } => (
            "pagemap-invalid",
            "the pagemap is damaged: copy the checkpoint again, or dump the process again",
        ),
        MemoryError::PagesTooShort { .. } => (
            "pages-size",
            "the pages file was cut short (an interrupted copy?): copy the checkpoint again",
        ),
        MemoryError::MissingParent { .. } => (
            "parent-missing",
            "copy the parent dump next to the checkpoint, where its parent link points",
        ),
        MemoryError::ParentLoop { .. } => (
            "parent-loop",
            "fix the parent links so that they lead back through older dumps only",
        ),
        MemoryError::NoParent { .. } | MemoryError::MissingInParent { .. } => (
            "parent-uncovered",
            "the parent dump is not the one this dump was made against: put the right \
             parent in place",
        ),
        _ => (
            "image-corrupt",
            "the memory images are unreadable: check permissions, or copy them again",
        ),
    };
    Finding::error(code, pagemap, error_chain(error), hint)
}

/// Every dumped range lies inside the process's mappings (adjacent mappings may share one
/// range).
fn check_inside_vmas(name: &str, pagemap: &Pagemap, vmas: &[pb::VmaEntry], report: &mut Report) {
    let mut spans: Vec<(u64, u64)> = vmas.iter().map(|v| (v.start, v.end)).collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    for (index, entry) in pagemap.entries.iter().enumerate() {
        let end = pagemap.end_of(entry);
        let inside = merged
            .iter()
            .any(|&(start, stop)| entry.vaddr >= start && end <= stop);
        if !inside {
            report.push(Finding::error(
                "pagemap-outside-vma",
                format!("{name} entry {index}"),
                format!(
                    "pages {:#x}-{end:#x} lie outside every mapping of the process",
                    entry.vaddr
                ),
                "the pagemap and mm images come from different dumps: copy the checkpoint \
                 again",
            ));
        }
    }
}

/// Each level's pages file holds exactly its present pages, and every range kept in a
/// parent is held by the next level.
fn check_levels(name: &str, memory: &MemoryImage, report: &mut Report) {
    let levels: Vec<_> = memory.levels().collect();
    for (depth, (dir, pagemap, pages)) in levels.iter().enumerate() {
        let needed = pagemap.pages_len();
        let len = pages.len() as u64;
        if len != needed {
            let pages_name = dir.join(format!("pages-{}.img", pagemap.pages_id));
            report.push(Finding::error(
                "pages-size",
                pages_name.display().to_string(),
                format!(
                    "the pages file is {len} bytes, but {name} has {needed} bytes of present \
                     pages"
                ),
                "the pages file does not belong to this pagemap: copy the checkpoint again",
            ));
        }
        let parent = levels.get(depth + 1).map(|(_, pagemap, _)| *pagemap);
        for entry in pagemap.entries.iter().filter(|e| e.in_parent()) {
            let end = pagemap.end_of(entry);
            let held = parent.is_some_and(|p| covers(p, entry.vaddr, end));
            if !held {
                report.push(Finding::error(
                    "parent-uncovered",
                    dir.join(name).display().to_string(),
                    format!(
                        "pages {:#x}-{end:#x} are kept in the parent dump, which does not \
                         hold them",
                        entry.vaddr
                    ),
                    "put the parent dump this one was made against where the parent link \
                     points",
                ));
            }
        }
    }
}

/// Whether the entries of `pagemap` cover `[start, end)` without a gap.
fn covers(pagemap: &Pagemap, start: u64, end: u64) -> bool {
    let mut at = start;
    for entry in &pagemap.entries[pagemap.first_ending_above(start)..] {
        if entry.vaddr > at {
            return false;
        }
        at = at.max(pagemap.end_of(entry));
        if at >= end {
            return true;
        }
    }
    at >= end
}

/// The images were dumped on a machine like this one.
fn check_host(cores: &[pb::CoreEntry], page_size: u64, host: Host, report: &mut Report) {
    let archs: BTreeSet<i32> = cores.iter().map(|c| c.mtype).collect();
    for arch in archs {
        if arch != host.arch as i32 {
            let name = |march: i32| {
                pb::core_entry::March::try_from(march).map_or_else(
                    |_| format!("architecture {march}"),
                    |m| m.as_str_name().into(),
                )
            };
            report.push(Finding::error(
                "arch-mismatch",
                "core-*.img",
                format!(
                    "the processes were dumped on {}, this host is {}",
                    name(arch),
                    name(host.arch as i32)
                ),
                "restore on a machine of the architecture the checkpoint was made on",
            ));
        }
    }
    if page_size != host.page_size {
        report.push(Finding::error(
            "page-size-mismatch",
            "pages-*.img",
            format!(
                "the images were dumped with {page_size}-byte pages, this host uses {}-byte \
                 pages",
                host.page_size
            ),
            "restore on a kernel with the page size the checkpoint was made with",
        ));
    }
}
