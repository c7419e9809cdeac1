//! `crit x`: text listings of an images directory, in crit 4.1.1's exact layout.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use criu_images::checkpoint::Checkpoint;
use criu_images::pb::{self, FdTypes, FileEntry};
use criu_images::pyfmt;

use crate::output;

const VMA_AREA_REGULAR: u32 = 1 << 0;
const VMA_AREA_STACK: u32 = 1 << 1;
const VMA_AREA_VSYSCALL: u32 = 1 << 2;
const VMA_AREA_VDSO: u32 = 1 << 3;
const VMA_FILE_PRIVATE: u32 = 1 << 6;
const VMA_FILE_SHARED: u32 = 1 << 7;
const VMA_ANON_SHARED: u32 = 1 << 8;
const VMA_AREA_SYSVIPC: u32 = 1 << 10;
const VMA_AREA_SOCKET: u32 = 1 << 11;
const MAP_GROWSDOWN: u32 = 0x100;

fn open(dir: &Path) -> anyhow::Result<Checkpoint> {
    Checkpoint::open(dir).with_context(|| format!("cannot explore {}", dir.display()))
}

/// Names files the way crit's explorers do.
pub(crate) struct FileNames {
    files: HashMap<u32, FileEntry>,
}

impl FileNames {
    /// The file object with id `id`.
    pub(crate) fn get(&self, id: u32) -> Option<&FileEntry> {
        self.files.get(&id)
    }

    pub(crate) fn load(checkpoint: &Checkpoint) -> anyhow::Result<Self> {
        let files = checkpoint.files()?.into_iter().map(|f| (f.id, f)).collect();
        Ok(FileNames { files })
    }

    /// A regular file's path, as crit prints it for cwd, root, exe and file mappings.
    pub(crate) fn regular(&self, id: u32) -> String {
        match self.files.get(&id).and_then(|f| f.reg.as_ref()) {
            Some(reg) if !reg.name.is_empty() => reg.name.clone(),
            _ => "unknown path".to_owned(),
        }
    }

    pub(crate) fn describe(&self, fd_type: i32, id: u32) -> String {
        let file = self.files.get(&id);
        match FdTypes::try_from(fd_type) {
            Ok(FdTypes::Reg) => self.regular(id),
            Ok(FdTypes::Pipe) => match file.and_then(|f| f.pipe.as_ref()) {
                Some(pipe) => format!("pipe[{}]", pipe.pipe_id),
                None => "pipe[?]".to_owned(),
            },
            Ok(FdTypes::Unixsk) => match file.and_then(|f| f.usk.as_ref()) {
                Some(usk) => {
                    let name = if usk.name.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", pyfmt::quopri_encode(&usk.name))
                    };
                    format!("unix[{} ({}){}]", usk.ino, usk.peer, name)
                }
                None => "unix[?]".to_owned(),
            },
            Ok(other) => format!("{}.{id}", other.as_str_name()),
            Err(_) => format!("{fd_type}.{id}"),
        }
    }
}

/// `x ps`: the process tree.
pub fn ps(dir: &Path) -> anyhow::Result<()> {
    let checkpoint = open(dir)?;
    let tree = checkpoint.pstree()?;
    let mut comms = HashMap::new();
    for task in &tree {
        let core = checkpoint.core(task.pid)?;
        comms.insert(task.pid, core.tc.map(|tc| tc.comm).unwrap_or_default());
    }

    let mut out = format!("{:>7}{:>7}{:>7}   {}\n", "PID", "PGID", "SID", "COMM");
    // crit takes the last entry without a parent as the root and lists children in pstree
    // order.
    if let Some(root) = tree.iter().rev().find(|t| t.ppid == 0) {
        show_task(&tree, &comms, root, 0, &mut out);
    }
    output::write_out(None, out.as_bytes())
}

fn show_task(
    tree: &[pb::PstreeEntry],
    comms: &HashMap<u32, String>,
    task: &pb::PstreeEntry,
    depth: usize,
    out: &mut String,
) {
    let comm = comms.get(&task.pid).map_or("", String::as_str);
    let indent = " ".repeat(4 * depth);
    let _ = writeln!(
        out,
        "{:>7}{:>7}{:>7}   {indent}{comm}",
        task.pid, task.pgid, task.sid
    );
    // A malformed tree could be cyclic; no real tree is deeper than the pid space.
    if depth > 4_194_304 {
        return;
    }
    for child in tree
        .iter()
        .filter(|t| t.ppid == task.pid && t.pid != task.pid)
    {
        show_task(tree, comms, child, depth + 1, out);
    }
}

/// `x fds`: open files, cwd and root of each process.
pub fn fds(dir: &Path) -> anyhow::Result<()> {
    let checkpoint = open(dir)?;
    let names = FileNames::load(&checkpoint)?;
    let mut out = String::new();
    for task in checkpoint.pstree()? {
        let ids = checkpoint.ids(task.pid)?;
        let _ = writeln!(out, "{}", task.pid);
        for fd in checkpoint.fdinfo(ids.files_id)? {
            let _ = writeln!(out, "\t{:>7}: {}", fd.fd, names.describe(fd.r#type, fd.id));
        }
        let fs = checkpoint.fs(task.pid)?;
        let _ = writeln!(out, "\t{:>7}: {}", "cwd", names.regular(fs.cwd_id));
        let _ = writeln!(out, "\t{:>7}: {}", "root", names.regular(fs.root_id));
    }
    output::write_out(None, out.as_bytes())
}

/// `x mems`: the mappings of each process.
pub fn mems(dir: &Path) -> anyhow::Result<()> {
    let checkpoint = open(dir)?;
    let names = FileNames::load(&checkpoint)?;
    let tree = checkpoint.pstree()?;
    // crit numbers shared objects in order of first appearance across all processes.
    let mut object_ids: HashMap<u64, usize> = HashMap::new();
    output::with_out(None, |writer, _| {
        let mut out = String::with_capacity(1 << 17);
        for task in &tree {
            let mm = checkpoint.mm(task.pid)?;
            let _ = writeln!(out, "{}", task.pid);
            let _ = writeln!(out, "\t{:<36}    {}", "exe", names.regular(mm.exe_file_id));
            for vma in &mm.vmas {
                mems_line(&mut out, vma, &names, &mut object_ids);
                if out.len() >= 1 << 16 {
                    writer.write_all(out.as_bytes())?;
                    out.clear();
                }
            }
        }
        writer.write_all(out.as_bytes())?;
        Ok(())
    })
}

/// Appends crit's line for one mapping: range, protection, and what is mapped.
fn mems_line(
    out: &mut String,
    vma: &pb::VmaEntry,
    names: &FileNames,
    object_ids: &mut HashMap<u64, usize>,
) {
    let mut object = |shmid: u64| {
        let next = object_ids.len() + 1;
        *object_ids.entry(shmid).or_insert(next)
    };

    let line_start = out.len();
    out.push('\t');
    push_hex(out, vma.start, 8);
    out.push('-');
    push_hex(out, vma.end, 8);
    let width = out.len() - line_start - 1;
    out.push_str(&SPACES[..36usize.saturating_sub(width).min(SPACES.len())]);
    for (bit, c) in [(1, 'r'), (2, 'w'), (4, 'x')] {
        out.push(if vma.prot & bit != 0 { c } else { '-' });
    }

    let status = vma.status;
    if status & VMA_AREA_SYSVIPC != 0 {
        let _ = write!(out, " ips[{:x}]", object(vma.shmid));
    } else if status & VMA_ANON_SHARED != 0 {
        let _ = write!(out, " shmem[{:x}]", object(vma.shmid));
    } else if status & VMA_AREA_SOCKET != 0 {
        let _ = write!(out, " packet[{:x}]", object(vma.shmid));
    } else if status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED) != 0 {
        out.push(' ');
        out.push_str(&names.regular(vma.shmid as u32));
        if vma.pgoff != 0 {
            let _ = write!(out, " + {:#x}", vma.pgoff);
        }
        if status & VMA_FILE_SHARED != 0 {
            out.push_str(" (s)");
        }
    } else if status & VMA_AREA_STACK != 0 {
        out.push_str(" [stack]");
    } else if status & VMA_AREA_VSYSCALL != 0 {
        out.push_str(" [vsyscall]");
    } else if status & VMA_AREA_VDSO != 0 {
        out.push_str(" [vdso]");
    } else if vma.flags & MAP_GROWSDOWN != 0 {
        out.push_str(" [stack?]");
    }
    if status & VMA_AREA_REGULAR == 0 {
        out.push_str(" *");
    }
    out.push('\n');
}

const SPACES: &str = "                                        ";

/// Appends `text` left-aligned in `width` columns (formatting machinery pads a character at a
/// time, which dominated this listing).
fn push_left(out: &mut String, text: &str, width: usize) {
    out.push_str(text);
    out.push_str(&SPACES[..width.saturating_sub(text.len()).min(SPACES.len())]);
}

/// Appends `value` in lowercase hex, zero-padded to `min_width` digits.
fn push_hex(out: &mut String, value: u64, min_width: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buffer = [b'0'; 16];
    let mut start = buffer.len();
    let mut rest = value;
    loop {
        start -= 1;
        buffer[start] = DIGITS[(rest & 15) as usize];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    let start = start.min(buffer.len() - min_width.min(buffer.len()));
    out.extend(buffer[start..].iter().map(|&b| char::from(b)));
}

/// `x rss`: each pagemap entry beside the mappings it covers.
pub fn rss(dir: &Path) -> anyhow::Result<()> {
    let checkpoint = open(dir)?;
    let names = FileNames::load(&checkpoint)?;
    let tree = checkpoint.pstree()?;
    output::with_out(None, |writer, _| {
        let mut out = String::with_capacity(1 << 17);
        for task in &tree {
            rss_task(&checkpoint, &names, task.pid, &mut out, writer)?;
        }
        writer.write_all(out.as_bytes())?;
        Ok(())
    })
}

/// Appends the `x rss` lines of one process, handing full buffers to `writer`.
fn rss_task(
    checkpoint: &Checkpoint,
    names: &FileNames,
    pid: u32,
    out: &mut String,
    writer: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let dir = checkpoint.dir();
    let vmas = checkpoint.mm(pid)?.vmas;
    let memory = checkpoint
        .memory(pid)?
        .with_context(|| format!("no pagemap-{}.img in {}", pid, dir.display()))?;
    let _ = writeln!(out, "{}", pid);

    let mut vmi = 0usize;
    let mut previous: Option<usize> = None;
    for entry in &memory.pagemap().entries {
        // crit pads the "vaddr / pages" column to 24 characters, tab included.
        let line_start = out.len();
        out.push('\t');
        push_hex(out, entry.vaddr, 0);
        out.push_str(" / ");
        push_left(out, itoa::Buffer::new().format(entry.nr_pages), 8);
        let width = out.len() - line_start;
        out.push_str(&SPACES[..24usize.saturating_sub(width)]);

        while vmi < vmas.len() && vmas[vmi].end <= entry.vaddr {
            vmi += 1;
        }
        // crit assumes 4 KiB pages here whatever the architecture.
        let end = entry.vaddr.saturating_add(entry.nr_pages << 12);
        while vmi < vmas.len() && vmas[vmi].start < end {
            let vma = &vmas[vmi];
            if previous == Some(vmi) {
                out.push_str(" ~");
            } else {
                out.push(' ');
                push_hex(out, vma.start, 8);
                out.push_str(" / ");
                let pages = (vma.end - vma.start) >> 12;
                push_left(out, itoa::Buffer::new().format(pages), 8);
                if vma.status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED) != 0 {
                    let _ = write!(out, " {}", names.regular(vma.shmid as u32));
                }
                previous = Some(vmi);
            }
            out.push_str("\n\t");
            out.push_str(&SPACES[..23]);
            vmi += 1;
        }
        vmi = vmi.saturating_sub(1);
        out.push('\n');
        if out.len() >= 1 << 16 {
            writer.write_all(out.as_bytes())?;
            out.clear();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_matches_format() {
        for (value, width) in [
            (0u64, 0),
            (0, 8),
            (0x7f, 8),
            (0x5611_bb90_6000, 8),
            (u64::MAX, 0),
        ] {
            let mut out = String::new();
            push_hex(&mut out, value, width);
            assert_eq!(out, format!("{value:0width$x}"));
        }
    }

    #[test]
    fn left_padding_matches_format() {
        let mut out = String::new();
        push_left(&mut out, "12", 8);
        push_left(&mut out, "123456789", 8);
        assert_eq!(out, format!("{:<8}{:<8}", "12", "123456789"));
    }
}
