//! `inspect`: the overview of a checkpoint a person reads first.
//!
//! The overview is gathered into one serialisable [`Overview`] and then printed either as an
//! aligned text report or as JSON (`--json`, documented in `docs/inspect-json.md`). Memory is
//! never read beyond the pages holding command lines, so a checkpoint of any size is
//! inspected in a few megabytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Context as _;
use criu_images::checkpoint::{Checkpoint, default_page_size};
use criu_images::kind::RawKind;
use criu_images::memory::MemoryImage;
use criu_images::pb::{self, FdTypes, Lsmtype};
use criu_images::pyfmt;
use serde::Serialize;

use crate::explore::FileNames;
use crate::output::{self, size};

/// Version of the JSON layout; bumped on any incompatible change.
const SCHEMA_VERSION: u32 = 1;

/// Longest command line read from a process's memory.
const MAX_CMDLINE: u64 = 64 * 1024;

/// Everything `inspect` reports.
#[derive(Debug, Serialize)]
struct Overview {
    schema_version: u32,
    images_dir: String,
    criu: CriuInfo,
    dump_stats: Option<DumpStats>,
    images: ImageTotals,
    processes: Vec<Process>,
    mounts: Vec<Mount>,
    namespaces: Vec<Namespace>,
    cgroups: Vec<CgroupSet>,
}

#[derive(Debug, Serialize)]
struct CriuInfo {
    /// From `dump.log`, when the dump left one in the images directory.
    version: Option<String>,
    image_version: u32,
    architecture: String,
    page_size: u64,
    lsm: String,
    plugins: Option<Vec<String>>,
    dump_run_id: Option<String>,
    incremental: bool,
}

#[derive(Debug, Serialize)]
struct DumpStats {
    freezing_time_us: u32,
    frozen_time_us: u32,
    memdump_time_us: u32,
    memwrite_time_us: u32,
    pages_scanned: u64,
    pages_skipped_parent: u64,
    pages_written: u64,
    pages_lazy: u64,
}

#[derive(Debug, Default, Serialize)]
struct ImageTotals {
    files: usize,
    protobuf_bytes: u64,
    pages_bytes: u64,
    other_raw_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Process {
    pid: u32,
    ppid: u32,
    pgid: u32,
    sid: u32,
    threads: Vec<u32>,
    comm: String,
    state: String,
    exit_code: u32,
    cmdline: Option<Vec<String>>,
    uid: Option<u32>,
    gid: Option<u32>,
    lsm_profile: Option<String>,
    namespaces: BTreeMap<String, u32>,
    cwd: String,
    root: String,
    memory: ProcessMemory,
    files: Vec<OpenFile>,
}

#[derive(Debug, Default, Serialize)]
struct ProcessMemory {
    vmas: usize,
    mapped_bytes: u64,
    pagemap_entries: usize,
    present_bytes: u64,
    parent_bytes: u64,
    lazy_bytes: u64,
    pages_file: Option<String>,
    parent_chain_depth: usize,
}

#[derive(Debug, Serialize)]
struct OpenFile {
    fd: u32,
    kind: String,
    object: String,
    selinux_label: Option<String>,
}

#[derive(Debug, Serialize)]
struct Mount {
    mnt_id: u32,
    parent_mnt_id: u32,
    mountpoint: String,
    fstype: String,
    source: String,
    root: String,
    options: String,
    external: Option<String>,
}

#[derive(Debug, Serialize)]
struct Namespace {
    kind: String,
    id: u32,
    pids: Vec<u32>,
}

#[derive(Debug, Serialize)]
struct CgroupSet {
    id: u32,
    controllers: BTreeMap<String, String>,
}

fn task_state(state: u32) -> String {
    match state {
        1 => "alive".into(),
        2 => "dead".into(),
        3 => "stopped".into(),
        6 => "zombie".into(),
        other => format!("state {other}"),
    }
}

fn fstype_name(fstype: u32, fsname: Option<&str>) -> String {
    const NAMES: &[&str] = &[
        "unsupported",
        "proc",
        "sysfs",
        "devtmpfs",
        "binfmt_misc",
        "tmpfs",
        "devpts",
        "simfs",
        "pstore",
        "securityfs",
        "fusectl",
        "debugfs",
        "cgroup",
        "aufs",
        "mqueue",
        "fuse",
        "auto",
        "overlay",
        "autofs",
        "tracefs",
    ];
    match (fstype, fsname) {
        (16, Some(name)) => name.to_owned(),
        (23, _) => "cgroup2".to_owned(),
        (n, _) => NAMES
            .get(n as usize)
            .map_or_else(|| format!("fstype {n}"), |s| (*s).to_owned()),
    }
}

/// The CRIU version from `dump.log`'s "Version: X" line, if the log is there.
fn criu_version(dir: &Path) -> Option<String> {
    let log = fs::read_to_string(dir.join("dump.log")).ok()?;
    log.lines().find_map(|line| {
        let (_, rest) = line.split_once("Version: ")?;
        Some(rest.split_whitespace().next()?.to_owned())
    })
}

fn image_totals(dir: &Path) -> anyhow::Result<ImageTotals> {
    let mut totals = ImageTotals::default();
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let metadata = entry.metadata()?;
        if !metadata.is_file() || !(name.ends_with(".img") || name.starts_with("stats-")) {
            continue;
        }
        totals.files += 1;
        match RawKind::from_file_name(&name) {
            Some(RawKind::Pages) => totals.pages_bytes += metadata.len(),
            Some(_) => totals.other_raw_bytes += metadata.len(),
            None => totals.protobuf_bytes += metadata.len(),
        }
    }
    Ok(totals)
}

/// The command line of a process, read from its dumped memory.
fn cmdline(memory: &MemoryImage, mm: &pb::MmEntry) -> Option<Vec<String>> {
    let len = mm.mm_arg_end.checked_sub(mm.mm_arg_start)?.min(MAX_CMDLINE);
    let bytes = memory.read_to_vec(mm.mm_arg_start, len).ok()?;
    let args: Vec<String> = bytes
        .split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    let trimmed: Vec<String> = match args.iter().rposition(|a| !a.is_empty()) {
        Some(last) => args[..=last].to_vec(),
        None => Vec::new(),
    };
    (!trimmed.is_empty()).then_some(trimmed)
}

fn process_memory(memory: Option<&MemoryImage>, mm: &pb::MmEntry) -> ProcessMemory {
    let mut out = ProcessMemory {
        vmas: mm.vmas.len(),
        mapped_bytes: mm.vmas.iter().map(|v| v.end.saturating_sub(v.start)).sum(),
        ..ProcessMemory::default()
    };
    if let Some(memory) = memory {
        let pagemap = memory.pagemap();
        out.pagemap_entries = pagemap.entries.len();
        out.present_bytes = pagemap.present_pages() * pagemap.page_size;
        out.parent_bytes = pagemap.parent_pages() * pagemap.page_size;
        out.lazy_bytes = pagemap.lazy_only_pages() * pagemap.page_size;
        out.pages_file = Some(format!("pages-{}.img", pagemap.pages_id));
        out.parent_chain_depth = memory.depth() - 1;
    }
    out
}

fn socket_description(file: &pb::FileEntry) -> Option<String> {
    if let Some(usk) = &file.usk {
        let kind = match usk.r#type {
            1 => "stream",
            2 => "dgram",
            5 => "seqpacket",
            _ => "unix",
        };
        let name = if usk.name.is_empty() {
            String::new()
        } else {
            format!(" {}", pyfmt::quopri_encode(&usk.name))
        };
        return Some(format!(
            "unix {kind} ino {} peer {}{name}",
            usk.ino, usk.peer
        ));
    }
    let isk = file.isk.as_ref()?;
    let proto = match isk.proto {
        6 => "tcp",
        17 => "udp",
        136 => "udplite",
        _ => "ip",
    };
    let address = |words: &[u32]| pyfmt::ip_address(words).unwrap_or_else(|| "?".into());
    Some(format!(
        "{proto}{} {}:{} -> {}:{}",
        if isk.family == 10 { "6" } else { "" },
        address(&isk.src_addr),
        isk.src_port,
        address(&isk.dst_addr),
        isk.dst_port
    ))
}

fn open_files(
    checkpoint: &Checkpoint,
    names: &FileNames,
    files_id: u32,
) -> anyhow::Result<Vec<OpenFile>> {
    let mut out = Vec::new();
    for fd in checkpoint.fdinfo(files_id)? {
        let kind = FdTypes::try_from(fd.r#type).map_or_else(
            |_| format!("type {}", fd.r#type),
            |t| t.as_str_name().to_owned(),
        );
        let object = names
            .get(fd.id)
            .and_then(socket_description)
            .unwrap_or_else(|| names.describe(fd.r#type, fd.id));
        out.push(OpenFile {
            fd: fd.fd,
            kind,
            object,
            selinux_label: fd.xattr_security_selinux,
        });
    }
    Ok(out)
}

fn gather(dir: &Path) -> anyhow::Result<Overview> {
    let checkpoint = Checkpoint::open(dir)?;
    let inventory = checkpoint.inventory()?;
    let tree = checkpoint.pstree()?;
    let root_core = tree
        .iter()
        .find(|t| t.ppid == 0)
        .map(|t| checkpoint.core(t.pid))
        .transpose()?;
    let march = root_core.as_ref().map_or(0, |c| c.mtype);
    let checkpoint = checkpoint.with_page_size(default_page_size(march));
    let names = FileNames::load(&checkpoint)?;

    let criu = CriuInfo {
        version: criu_version(dir),
        image_version: inventory.img_version,
        architecture: pb::core_entry::March::try_from(march).map_or_else(
            |_| format!("march {march}"),
            |m| m.as_str_name().to_lowercase(),
        ),
        page_size: checkpoint.page_size(),
        lsm: Lsmtype::try_from(inventory.lsmtype.unwrap_or(0)).map_or_else(
            |_| "unknown".into(),
            |l| match l {
                Lsmtype::NoLsm => "none".into(),
                other => other.as_str_name().to_lowercase(),
            },
        ),
        plugins: inventory.plugins_entry.map(|p| p.plugins),
        dump_run_id: inventory.dump_criu_run_id,
        incremental: dir.join("parent").exists(),
    };
    let dump_stats = checkpoint
        .dump_stats()?
        .and_then(|s| s.dump)
        .map(|d| DumpStats {
            freezing_time_us: d.freezing_time,
            frozen_time_us: d.frozen_time,
            memdump_time_us: d.memdump_time,
            memwrite_time_us: d.memwrite_time,
            pages_scanned: d.pages_scanned,
            pages_skipped_parent: d.pages_skipped_parent,
            pages_written: d.pages_written,
            pages_lazy: d.pages_lazy,
        });

    let mut processes = Vec::new();
    let mut namespaces: BTreeMap<(String, u32), Vec<u32>> = BTreeMap::new();
    let mut mount_namespaces = Vec::new();
    for task in &tree {
        let core = checkpoint.core(task.pid)?;
        let ids = checkpoint.ids(task.pid)?;
        let mm = checkpoint.mm(task.pid)?;
        let fs_entry = checkpoint.fs(task.pid)?;
        let memory = checkpoint.memory(task.pid)?;
        let tc = core.tc.clone().unwrap_or_default();
        let creds = core.thread_core.as_ref().and_then(|t| t.creds.as_ref());

        let mut task_namespaces = BTreeMap::new();
        for (kind, id) in [
            ("pid", ids.pid_ns_id),
            ("net", ids.net_ns_id),
            ("ipc", ids.ipc_ns_id),
            ("uts", ids.uts_ns_id),
            ("mnt", ids.mnt_ns_id),
            ("user", ids.user_ns_id),
            ("cgroup", ids.cgroup_ns_id),
            ("time", ids.time_ns_id),
        ] {
            if let Some(id) = id {
                task_namespaces.insert(kind.to_owned(), id);
                namespaces
                    .entry((kind.to_owned(), id))
                    .or_default()
                    .push(task.pid);
            }
        }
        if let Some(mnt) = ids.mnt_ns_id.filter(|id| !mount_namespaces.contains(id)) {
            mount_namespaces.push(mnt);
        }

        processes.push(Process {
            pid: task.pid,
            ppid: task.ppid,
            pgid: task.pgid,
            sid: task.sid,
            threads: task.threads.clone(),
            comm: tc.comm.clone(),
            state: task_state(tc.task_state),
            exit_code: tc.exit_code,
            cmdline: memory.as_ref().and_then(|m| cmdline(m, &mm)),
            uid: creds.map(|c| c.uid),
            gid: creds.map(|c| c.gid),
            lsm_profile: creds.and_then(|c| c.lsm_profile.clone()),
            namespaces: task_namespaces,
            cwd: names.regular(fs_entry.cwd_id),
            root: names.regular(fs_entry.root_id),
            memory: process_memory(memory.as_ref(), &mm),
            files: open_files(&checkpoint, &names, ids.files_id)?,
        });
    }

    let mut mounts = Vec::new();
    for id in mount_namespaces {
        for m in checkpoint.mounts(id)? {
            mounts.push(Mount {
                mnt_id: m.mnt_id,
                parent_mnt_id: m.parent_mnt_id,
                mountpoint: m.mountpoint,
                fstype: fstype_name(m.fstype, m.fsname.as_deref()),
                source: m.source,
                root: m.root,
                options: m.options,
                external: m.ext_key,
            });
        }
    }

    let cgroups = checkpoint
        .cgroup()?
        .map(|c| {
            c.sets
                .into_iter()
                .map(|set| CgroupSet {
                    id: set.id,
                    controllers: set.ctls.into_iter().map(|m| (m.name, m.path)).collect(),
                })
                .collect()
        })
        .unwrap_or_default();

    Ok(Overview {
        schema_version: SCHEMA_VERSION,
        images_dir: dir.display().to_string(),
        criu,
        dump_stats,
        images: image_totals(dir)?,
        processes,
        mounts,
        namespaces: namespaces
            .into_iter()
            .map(|((kind, id), pids)| Namespace { kind, id, pids })
            .collect(),
        cgroups,
    })
}

fn millis(us: u32) -> String {
    format!("{:.1} ms", f64::from(us) / 1000.0)
}

fn render(o: &Overview) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Checkpoint {}", o.images_dir);
    let mut facts: Vec<(&str, String)> = vec![
        (
            "CRIU",
            format!(
                "{} (images v{}{})",
                o.criu.version.as_deref().unwrap_or("version not recorded"),
                o.criu.image_version,
                if o.criu.incremental {
                    ", incremental: has a parent"
                } else {
                    ""
                }
            ),
        ),
        (
            "Architecture",
            format!("{}, {} pages", o.criu.architecture, size(o.criu.page_size)),
        ),
        ("LSM", o.criu.lsm.clone()),
        (
            "Images",
            format!(
                "{} files: {} metadata, {} pages, {} other",
                o.images.files,
                size(o.images.protobuf_bytes),
                size(o.images.pages_bytes),
                size(o.images.other_raw_bytes)
            ),
        ),
    ];
    if let Some(s) = &o.dump_stats {
        facts.push((
            "Dump",
            format!(
                "frozen {}, memory dump {}, write {}; {} pages written of {} scanned",
                millis(s.frozen_time_us),
                millis(s.memdump_time_us),
                millis(s.memwrite_time_us),
                s.pages_written,
                s.pages_scanned
            ),
        ));
    }
    if let Some(id) = &o.criu.dump_run_id {
        facts.push(("Run id", id.clone()));
    }
    for (key, value) in facts {
        let _ = writeln!(out, "  {key:<14}{value}");
    }

    out.push_str("\nProcesses\n");
    let rows: Vec<Vec<String>> = o
        .processes
        .iter()
        .map(|p| {
            vec![
                p.pid.to_string(),
                p.ppid.to_string(),
                p.threads.len().max(1).to_string(),
                p.state.clone(),
                p.uid.map_or_else(|| "-".into(), |u| u.to_string()),
                size(p.memory.mapped_bytes),
                size(p.memory.present_bytes),
                p.cmdline
                    .as_ref()
                    .map_or_else(|| format!("[{}]", p.comm), |c| one_line(&c.join(" "))),
            ]
        })
        .collect();
    let header = [
        "PID", "PPID", "THREADS", "STATE", "UID", "MAPPED", "DUMPED", "COMMAND",
    ];
    indent(&mut out, &output::table(&header, &rows));

    for p in &o.processes {
        let _ = writeln!(out, "\nProcess {} ({})", p.pid, p.comm);
        let m = &p.memory;
        let mut memory = format!(
            "{} VMAs, {} mapped; {} pagemap entries, {} dumped",
            m.vmas,
            size(m.mapped_bytes),
            m.pagemap_entries,
            size(m.present_bytes)
        );
        if m.parent_bytes > 0 {
            let _ = write!(
                memory,
                ", {} in {} parent dump(s)",
                size(m.parent_bytes),
                m.parent_chain_depth
            );
        }
        if m.lazy_bytes > 0 {
            let _ = write!(memory, ", {} lazy (not in the dump)", size(m.lazy_bytes));
        }
        if let Some(file) = &m.pages_file {
            let _ = write!(memory, " in {file}");
        }
        let namespaces: Vec<String> = p
            .namespaces
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        for (key, value) in [
            ("Memory", memory),
            ("Cwd", p.cwd.clone()),
            ("Root", p.root.clone()),
            ("Namespaces", namespaces.join(" ")),
            (
                "LSM profile",
                p.lsm_profile.clone().unwrap_or_else(|| "none".into()),
            ),
        ] {
            let _ = writeln!(out, "  {key:<14}{value}");
        }
        let rows: Vec<Vec<String>> = p
            .files
            .iter()
            .map(|f| vec![f.fd.to_string(), f.kind.clone(), f.object.clone()])
            .collect();
        if !rows.is_empty() {
            indent(&mut out, &output::table(&["FD", "TYPE", "OBJECT"], &rows));
        }
    }

    if !o.mounts.is_empty() {
        out.push_str("\nMounts\n");
        let rows: Vec<Vec<String>> = o
            .mounts
            .iter()
            .map(|m| {
                vec![
                    m.mnt_id.to_string(),
                    m.parent_mnt_id.to_string(),
                    m.mountpoint.clone(),
                    m.fstype.clone(),
                    m.source.clone(),
                    m.external
                        .as_ref()
                        .map_or_else(|| m.options.clone(), |k| format!("external {k}")),
                ]
            })
            .collect();
        indent(
            &mut out,
            &output::table(
                &["ID", "PARENT", "MOUNTPOINT", "FSTYPE", "SOURCE", "OPTIONS"],
                &rows,
            ),
        );
    }
    if !o.namespaces.is_empty() {
        out.push_str("\nNamespaces\n");
        let rows: Vec<Vec<String>> = o
            .namespaces
            .iter()
            .map(|n| {
                let pids: Vec<String> = n.pids.iter().map(u32::to_string).collect();
                vec![n.kind.clone(), n.id.to_string(), pids.join(" ")]
            })
            .collect();
        indent(&mut out, &output::table(&["KIND", "ID", "PIDS"], &rows));
    }
    if !o.cgroups.is_empty() {
        out.push_str("\nCgroups\n");
        let mut rows = Vec::new();
        for set in &o.cgroups {
            for (controller, path) in &set.controllers {
                rows.push(vec![set.id.to_string(), controller.clone(), path.clone()]);
            }
        }
        indent(
            &mut out,
            &output::table(&["SET", "CONTROLLER", "PATH"], &rows),
        );
    }
    out
}

/// Longest command shown in the process table; `--json` has it whole.
const COMMAND_WIDTH: usize = 72;

/// A command line fit for one table row: control characters escaped, long ones cut.
fn one_line(text: &str) -> String {
    let escaped: String = text.chars().flat_map(char::escape_debug).collect();
    let escaped = escaped.replace("\\\"", "\"").replace("\\'", "'");
    match escaped.char_indices().nth(COMMAND_WIDTH) {
        Some((cut, _)) => format!("{}...", &escaped[..cut]),
        None => escaped,
    }
}

fn indent(out: &mut String, text: &str) {
    for line in text.lines() {
        let _ = writeln!(out, "  {line}");
    }
}

/// Prints the overview of the checkpoint in `dir`.
pub fn run(dir: &Path, json: bool) -> anyhow::Result<()> {
    let overview = gather(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    let text = if json {
        let mut text = serde_json::to_string_pretty(&overview)?;
        text.push('\n');
        text
    } else {
        render(&overview)
    };
    output::write_out(None, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_fit_one_row() {
        assert_eq!(one_line("sh -c 'a\nb'"), "sh -c 'a\\nb'");
        assert_eq!(one_line("echo \"x\""), "echo \"x\"");
        let long = "x".repeat(100);
        assert_eq!(one_line(&long).len(), COMMAND_WIDTH + 3);
    }
}
