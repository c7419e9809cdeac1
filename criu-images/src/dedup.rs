//! Deduplication of a parent chain: punching out of older dumps the pages a newer dump holds
//! again, as `criu dedup` does, and page statistics for migration tooling.
//!
//! In a chain of incremental dumps every level has its own pagemap and pages file for the
//! same process (or shared memory object). A range a newer level holds `PE_PRESENT` is read
//! from that level on restore, never from an older one, so the older levels' copies of it
//! are dead weight:
//!
//! ```text
//!  addresses          0x1000  0x2000  0x3000  0x4000
//!  dir (level 0)      PRESENT PARENT  PRESENT PARENT      restore reads 0x1000 and 0x3000 here
//!  parent (level 1)   PRESENT PRESENT PRESENT PRESENT     ... and 0x2000, 0x4000 here
//!  pages-N.img        [hole ] [data ] [hole ] [data ]     what dedup leaves in the parent
//! ```
//!
//! [`plan`] opens every pagemap of the images directory through its parent chain (as
//! [`MemoryImage`] does), and for each older level intersects its present entries with the
//! union of the present entries of every newer level. The intersections become byte ranges
//! of that level's pages file, merged per file; each range is measured with
//! `SEEK_DATA`/`SEEK_HOLE`, so what an earlier dedup (or `restore --auto-dedup`, or a sparse
//! copy) already punched is not counted again. Before anything is punched the plan looks for
//! another images directory whose `parent` link leads to a level it would punch, and refuses.
//!
//! [`apply`] punches the ranges with `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`,
//! one pages file per rayon task. File sizes, and therefore every offset a pagemap computes,
//! stay as they were; pagemaps are never written. Punched ranges read as zeros afterwards.
//!
//! [`page_stats`] reads the present pages of the newest level of each pagemap and counts the
//! all-zero pages and the pages whose contents repeat another page's, the numbers a tool that
//! moves checkpoints uses to decide whether compressing or deduplicating the transfer pays.
//!
//! ```no_run
//! use criu_images::dedup::{self, DedupOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let plan = dedup::plan_with_options("/checkpoints/2".as_ref(), &DedupOptions::default())?;
//! println!("{} bytes can be freed", plan.freed_bytes());
//! let freed = dedup::apply(&plan)?;
//! println!("{freed} bytes freed");
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};
use rayon::prelude::*;
use serde::Serialize;
use thiserror::Error;

use crate::checkpoint::{Checkpoint, CheckpointError, default_page_size};
use crate::map::MappedFile;
use crate::memory::{MemoryError, MemoryImage};
use crate::pagemap::Pagemap;

/// The smallest page size any Linux architecture uses.
const MIN_PAGE_SIZE: u64 = 4096;

/// Why a dedup could not be planned or applied.
#[derive(Debug, Error)]
pub enum DedupError {
    /// The page size is not one a kernel uses.
    #[error("page size {page_size} is not a power of two of at least 4096 bytes")]
    BadPageSize {
        /// The page size asked for.
        page_size: u64,
    },
    /// The directory is not an images directory, or cannot be opened as one.
    #[error("cannot open the images directory {dir}")]
    Checkpoint {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: CheckpointError,
    },
    /// The page size was not given and the root process's core image does not tell it.
    #[error("cannot tell the page size of {dir} from its root process")]
    PageSize {
        /// The images directory.
        dir: PathBuf,
        /// Why the core image could not be read.
        #[source]
        source: CheckpointError,
    },
    /// A directory could not be listed.
    #[error("cannot list {dir}")]
    ListDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A pagemap, its pages file or a level of its parent chain could not be read.
    #[error("cannot read the memory of {pagemap}")]
    Memory {
        /// The pagemap of the images directory.
        pagemap: PathBuf,
        /// Why.
        #[source]
        source: MemoryError,
    },
    /// A pagemap entry does not start on a page boundary, so its pages cannot be punched
    /// without touching neighbouring pages.
    #[error(
        "{path}: entry {index}: address {vaddr:#x} is not a multiple of the page size \
         {page_size}"
    )]
    Unaligned {
        /// The pagemap.
        path: PathBuf,
        /// Index of the entry in the image (the head is 0).
        index: usize,
        /// Its address.
        vaddr: u64,
        /// The page size.
        page_size: u64,
    },
    /// Another images directory uses a parent level the plan would punch.
    #[error(
        "{parent} is also the parent of {child}, which may still need the pages dedup would \
         punch (force overrides this)"
    )]
    SharedParent {
        /// The parent level that would be punched.
        parent: PathBuf,
        /// The other images directory whose `parent` link leads there.
        child: PathBuf,
    },
    /// A pages file could not be inspected.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A pages file could not be opened for writing.
    #[error("cannot open {path} for writing")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A pages file changed size between the plan and its application.
    #[error("{path} is {found} bytes, but was {planned} bytes when the dedup was planned")]
    Changed {
        /// The file.
        path: PathBuf,
        /// Its size when planned.
        planned: u64,
        /// Its size now.
        found: u64,
    },
    /// The kernel refused to punch a range.
    #[error("cannot punch {len} bytes at offset {offset} of {path}")]
    Punch {
        /// The file.
        path: PathBuf,
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// The error from `fallocate`.
        #[source]
        source: Errno,
    },
}

/// How to plan a dedup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DedupOptions {
    /// Page size of the dumping machine; `None` takes the usual one of the root process's
    /// architecture.
    pub page_size: Option<u64>,
    /// Plan even when another images directory shares a parent level that would be punched.
    pub force: bool,
}

/// A byte range of a pages file, page aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PunchRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl PunchRange {
    /// The byte just past the range.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// What the plan punches in one pages file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PagesPlan {
    /// The pages file (canonical path).
    pub path: PathBuf,
    /// Name of the pagemap that names this pages file, as in the images directory.
    pub pagemap: String,
    /// Level of the chain the file belongs to: 1 is the parent, 2 the grandparent.
    pub level: usize,
    /// The file's size when planned; [`apply`] refuses a file whose size changed.
    pub size: u64,
    /// Ranges to punch, sorted, merged and page aligned.
    pub ranges: Vec<PunchRange>,
    /// Bytes the ranges cover.
    pub superseded_bytes: u64,
    /// Bytes of the ranges that still held data when planned; ranges already punched are
    /// not counted.
    pub freed_bytes: u64,
}

/// Another images directory whose `parent` link leads to a level the plan punches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SharedParent {
    /// The level that is punched.
    pub parent: PathBuf,
    /// The other images directory.
    pub child: PathBuf,
}

/// What a dedup of one images directory punches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DedupPlan {
    /// The images directory (canonical path).
    pub dir: PathBuf,
    /// The page size the pagemaps were read with.
    pub page_size: u64,
    /// The pages files with something to punch, by level and then path.
    pub files: Vec<PagesPlan>,
    /// Shared parents that [`DedupOptions::force`] overrode; empty otherwise.
    pub shared: Vec<SharedParent>,
}

impl DedupPlan {
    /// Whether there is nothing to punch.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Bytes every range covers, holes included.
    pub fn superseded_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.superseded_bytes).sum()
    }

    /// Bytes that still held data when planned: what [`apply`] frees.
    pub fn freed_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.freed_bytes).sum()
    }
}

/// Plans the dedup of the images directory `dir`, refusing when a parent level it would
/// punch is shared with another images directory; see [`plan_with_options`].
///
/// # Errors
///
/// As [`plan_with_options`].
pub fn plan(dir: &Path, page_size: Option<u64>) -> Result<DedupPlan, DedupError> {
    plan_with_options(
        dir,
        &DedupOptions {
            page_size,
            force: false,
        },
    )
}

/// Plans the dedup of the images directory `dir`: for every pagemap of `dir` (process ones,
/// `pagemap-<pid>.img`, and shared memory ones, `pagemap-shmem-<id>.img`), the byte ranges
/// of each older level's pages file whose addresses a newer level holds `PE_PRESENT`.
///
/// Every level counts as newer for the levels below it, so the plan punches what
/// `criu dedup` punches from `dir` and also what `dump --auto-dedup` would have punched when
/// each intermediate level was dumped. Only `PE_PRESENT` entries of the older levels are
/// punched: their `PE_PARENT` and lazy-only entries have no bytes in their pages file.
///
/// [`PagesPlan::freed_bytes`] counts only bytes that hold data now (`SEEK_DATA`), so running
/// the plan again after [`apply`] gives the same ranges and frees nothing. A file system
/// that cannot report holes reports every byte as data.
///
/// Other images directories are looked for next to every level of the chain (in the
/// directory holding it); one whose `parent` link resolves to a level with ranges to punch
/// makes the plan fail with [`DedupError::SharedParent`] unless `options.force` is set, in
/// which case it is listed in [`DedupPlan::shared`]. Layouts other than siblings are not seen.
///
/// # Errors
///
/// A bad page size, a directory without inventory, unreadable or broken pagemaps and pages
/// files, broken parent chains, entries not on page boundaries, and shared parents.
pub fn plan_with_options(dir: &Path, options: &DedupOptions) -> Result<DedupPlan, DedupError> {
    let dir = images_dir(dir)?;
    let page_size = page_size_of(&dir, options.page_size)?;

    let mut files: BTreeMap<PathBuf, PagesPlan> = BTreeMap::new();
    let mut chain: BTreeSet<PathBuf> = BTreeSet::from([dir.clone()]);
    for name in pagemap_names(&dir)? {
        plan_pagemap(&dir, &name, page_size, &mut files, &mut chain)?;
    }
    for file in files.values_mut() {
        measure(file)?;
    }

    let punched: BTreeSet<PathBuf> = files
        .values()
        .filter_map(|f| f.path.parent().map(Path::to_path_buf))
        .collect();
    let shared = sharers(&chain, &punched)?;
    if let Some(first) = shared.first()
        && !options.force
    {
        return Err(DedupError::SharedParent {
            parent: first.parent.clone(),
            child: first.child.clone(),
        });
    }

    let mut files: Vec<PagesPlan> = files.into_values().collect();
    files.sort_by(|a, b| (a.level, &a.path).cmp(&(b.level, &b.path)));
    Ok(DedupPlan {
        dir,
        page_size,
        files,
        shared,
    })
}

/// Adds the ranges the chain of the pagemap `name` supersedes to `files`, and the chain's
/// directories to `chain`. The maps of the chain are dropped before this returns.
fn plan_pagemap(
    dir: &Path,
    name: &str,
    page_size: u64,
    files: &mut BTreeMap<PathBuf, PagesPlan>,
    chain: &mut BTreeSet<PathBuf>,
) -> Result<(), DedupError> {
    let memory_error = |source| DedupError::Memory {
        pagemap: dir.join(name),
        source,
    };
    let Some(memory) = MemoryImage::open(dir, name, page_size).map_err(memory_error)? else {
        // Removed since the directory was listed: nothing of it to supersede.
        return Ok(());
    };
    let levels: Vec<(&Path, &Pagemap, &[u8])> = memory.levels().collect();
    for (level_dir, pagemap, _) in &levels {
        check_aligned(&level_dir.join(name), pagemap)?;
        chain.insert(level_dir.to_path_buf());
    }

    let pagemaps: Vec<&Pagemap> = levels.iter().map(|(_, pagemap, _)| *pagemap).collect();
    for (level, ranges) in superseded(&pagemaps).into_iter().enumerate() {
        if ranges.is_empty() {
            continue;
        }
        let (level_dir, pagemap, pages) = levels[level];
        let path = level_dir.join(format!("pages-{}.img", pagemap.pages_id));
        let file = files.entry(path.clone()).or_insert_with(|| PagesPlan {
            path,
            pagemap: name.to_owned(),
            level,
            size: pages.len() as u64,
            ranges: Vec::new(),
            superseded_bytes: 0,
            freed_bytes: 0,
        });
        // Two pagemaps naming one pages file would be a broken dump, but their ranges must
        // still come out as one sorted, disjoint list.
        file.ranges.extend(ranges);
        file.ranges = merge_ranges(std::mem::take(&mut file.ranges));
    }
    Ok(())
}

/// Fills in how many bytes the ranges of `file` cover and how many of them hold data.
fn measure(file: &mut PagesPlan) -> Result<(), DedupError> {
    let io_error = |source| DedupError::Io {
        path: file.path.clone(),
        source,
    };
    file.superseded_bytes = file.ranges.iter().map(|r| r.len).sum();
    let handle = File::open(&file.path).map_err(io_error)?;
    file.freed_bytes = data_bytes(&handle, &file.ranges).map_err(io_error)?;
    Ok(())
}

/// Punches every range of the plan, files in parallel, and returns the bytes freed.
///
/// Pages files are opened read-write here and nowhere else in the crate. Punching changes
/// bytes in place, which a live map of the same file would see change under it: nothing in
/// this process may hold a [`MemoryImage`] (or another map) of a planned pages file while
/// this runs; see [`MappedFile::open`].
///
/// # Errors
///
/// As [`apply_files`].
pub fn apply(plan: &DedupPlan) -> Result<u64, DedupError> {
    Ok(apply_files(plan)?.into_iter().sum())
}

/// Punches every range of the plan, files in parallel, and returns the bytes freed in each
/// file, in the plan's order.
///
/// Bytes freed are the bytes of the ranges that held data before minus those that still do
/// after (`SEEK_DATA`), so ranges punched already count nothing. File sizes never change,
/// pagemaps are never touched. A file whose size differs from the plan's is left alone.
///
/// # Errors
///
/// A pages file that cannot be opened for writing, changed size since the plan, or whose
/// file system cannot punch holes. Files other than the failing one may have been punched.
pub fn apply_files(plan: &DedupPlan) -> Result<Vec<u64>, DedupError> {
    plan.files.par_iter().map(punch_file).collect()
}

fn punch_file(file: &PagesPlan) -> Result<u64, DedupError> {
    let io_error = |source| DedupError::Io {
        path: file.path.clone(),
        source,
    };
    let handle = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file.path)
        .map_err(|source| DedupError::Open {
            path: file.path.clone(),
            source,
        })?;
    let found = handle.metadata().map_err(io_error)?.len();
    if found != file.size {
        return Err(DedupError::Changed {
            path: file.path.clone(),
            planned: file.size,
            found,
        });
    }

    let before = data_bytes(&handle, &file.ranges).map_err(io_error)?;
    let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    for range in &file.ranges {
        let punch_error = |source| DedupError::Punch {
            path: file.path.clone(),
            offset: range.offset,
            len: range.len,
            source,
        };
        // The ranges lie inside the file, whose size fits in off_t.
        let offset = i64::try_from(range.offset).map_err(|_| punch_error(Errno::EFBIG))?;
        let len = i64::try_from(range.len).map_err(|_| punch_error(Errno::EFBIG))?;
        fallocate(handle.as_fd(), mode, offset, len).map_err(punch_error)?;
    }
    let after = data_bytes(&handle, &file.ranges).map_err(io_error)?;
    Ok(before.saturating_sub(after))
}

/// Page statistics of the newest level of an images directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PageStats {
    /// The page size the pages were cut with.
    pub page_size: u64,
    /// Present pages, over every pagemap.
    pub pages: u64,
    /// Pages whose bytes are all zero.
    pub zero_pages: u64,
    /// Non-zero pages whose bytes equal those of another page counted before them.
    pub duplicate_pages: u64,
    /// Distinct non-zero page contents: `pages - zero_pages - duplicate_pages`.
    pub unique_pages: u64,
    /// `unique_pages` in bytes: what the pages take with zero pages dropped and every
    /// repeated page stored once.
    pub unique_bytes: u64,
}

/// Counts, over the present pages of the newest level of every pagemap of `dir` (pages kept
/// in parent levels are not read), the zero pages and the pages that repeat another page's
/// contents, in parallel.
///
/// Pages are grouped by CRC32 and the members of a group compared byte for byte, so two pages
/// that only share a checksum are never counted as duplicates.
///
/// # Errors
///
/// A bad page size, a directory without inventory, unreadable or broken pagemaps, and pages
/// files shorter than their pagemaps.
pub fn page_stats(dir: &Path, page_size: Option<u64>) -> Result<PageStats, DedupError> {
    let dir = images_dir(dir)?;
    let page_size = page_size_of(&dir, page_size)?;

    let mut newest = Vec::new();
    for name in pagemap_names(&dir)? {
        if let Some(level) = open_newest(&dir, &name, page_size)? {
            newest.push(level);
        }
    }

    let mut pages: Vec<&[u8]> = Vec::new();
    for (pagemap, file) in &newest {
        let bytes = file.bytes();
        for entry in pagemap.entries.iter().filter(|e| e.is_present()) {
            // Opening the level checked that the pages file holds every present entry.
            let start = entry.pages_offset as usize;
            let len = (entry.nr_pages * page_size) as usize;
            pages.extend(bytes[start..start + len].chunks_exact(page_size as usize));
        }
    }
    Ok(stats_of(&pages, page_size))
}

/// The statistics of `pages`, each `page_size` bytes long.
fn stats_of(pages: &[&[u8]], page_size: u64) -> PageStats {
    let fingerprints: Vec<Option<u32>> = pages
        .par_iter()
        .map(|page| (!is_zero(page)).then(|| crc32fast::hash(page)))
        .collect();
    let zero_pages = fingerprints.iter().filter(|f| f.is_none()).count() as u64;

    let mut keyed: Vec<(u32, usize)> = fingerprints
        .iter()
        .enumerate()
        .filter_map(|(index, crc)| crc.map(|crc| (crc, index)))
        .collect();
    keyed.par_sort_unstable();
    let groups: Vec<&[(u32, usize)]> = keyed.chunk_by(|a, b| a.0 == b.0).collect();
    let unique_pages = groups
        .par_iter()
        .map(|group| {
            let mut contents: Vec<&[u8]> = group.iter().map(|&(_, index)| pages[index]).collect();
            distinct_contents(&mut contents) as u64
        })
        .sum::<u64>();

    let total = pages.len() as u64;
    PageStats {
        page_size,
        pages: total,
        zero_pages,
        duplicate_pages: total - zero_pages - unique_pages,
        unique_pages,
        unique_bytes: unique_pages * page_size,
    }
}

/// The number of distinct contents among pages that share a CRC32: the confirming byte
/// compare. Sorting rather than comparing each page with every other keeps a group of many
/// colliding pages (which a crafted image could hold) from costing quadratic time.
fn distinct_contents(pages: &mut [&[u8]]) -> usize {
    if pages.len() < 2 {
        return pages.len();
    }
    pages.sort_unstable();
    1 + pages.windows(2).filter(|pair| pair[0] != pair[1]).count()
}

fn is_zero(page: &[u8]) -> bool {
    // Comparing eight bytes at a time is what keeps this from dominating the count.
    let words = page.chunks_exact(8);
    let rest = words.remainder();
    words
        .map(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .all(|w| w == 0)
        && rest.iter().all(|&b| b == 0)
}

/// A half-open address range `[start, end)`.
type Span = (u64, u64);

/// For each level of a chain (newest first), the ranges of its pages file that hold
/// addresses a newer level holds `PE_PRESENT`; always empty for level 0.
fn superseded(levels: &[&Pagemap]) -> Vec<Vec<PunchRange>> {
    let mut out = Vec::with_capacity(levels.len());
    let mut cover: Vec<Span> = Vec::new();
    for pagemap in levels {
        let mut ranges = Vec::new();
        let mut present = Vec::new();
        for entry in pagemap.entries.iter().filter(|e| e.is_present()) {
            let end = pagemap.end_of(entry);
            for (start, stop) in overlaps(&cover, entry.vaddr, end) {
                ranges.push(PunchRange {
                    offset: entry.pages_offset + (start - entry.vaddr),
                    len: stop - start,
                });
            }
            present.push((entry.vaddr, end));
        }
        out.push(merge_ranges(ranges));

        cover.extend(present);
        cover = merge_spans(cover);
    }
    out
}

/// The parts of `[start, end)` that `cover` (sorted, disjoint) holds.
fn overlaps(cover: &[Span], start: u64, end: u64) -> impl Iterator<Item = Span> + '_ {
    let first = cover.partition_point(|&(_, stop)| stop <= start);
    cover[first..]
        .iter()
        .take_while(move |&&(from, _)| from < end)
        .map(move |&(from, stop)| (from.max(start), stop.min(end)))
}

/// Sorts spans and joins the overlapping and adjacent ones.
fn merge_spans(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort_unstable();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// Sorts ranges and joins the overlapping and adjacent ones, so each becomes one punch.
fn merge_ranges(ranges: Vec<PunchRange>) -> Vec<PunchRange> {
    let spans = ranges.into_iter().map(|r| (r.offset, r.end())).collect();
    merge_spans(spans)
        .into_iter()
        .map(|(offset, end)| PunchRange {
            offset,
            len: end - offset,
        })
        .collect()
}

/// Bytes of `ranges` that hold data rather than a hole.
fn data_bytes(file: &File, ranges: &[PunchRange]) -> io::Result<u64> {
    let mut total = 0;
    for range in ranges {
        total += data_in(file, range.offset, range.end())?;
    }
    Ok(total)
}

fn data_in(file: &File, start: u64, end: u64) -> io::Result<u64> {
    let offset = |at: u64| i64::try_from(at).map_err(|_| io::Error::from(Errno::EFBIG));
    let mut total = 0;
    let mut at = start;
    while at < end {
        let data = match lseek(file.as_fd(), offset(at)?, Whence::SeekData) {
            Ok(data) => data as u64,
            // No data after `at`: the rest is a hole up to the end of the file.
            Err(Errno::ENXIO) => break,
            // A file system that cannot tell holes apart: count everything as data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(total + (end - at)),
            Err(errno) => return Err(errno.into()),
        };
        if data >= end {
            break;
        }
        let hole = lseek(file.as_fd(), offset(data)?, Whence::SeekHole)? as u64;
        total += hole.min(end) - data;
        at = hole;
    }
    Ok(total)
}

/// The canonical path of `dir`, once it is known to hold an inventory.
fn images_dir(dir: &Path) -> Result<PathBuf, DedupError> {
    Checkpoint::open(dir).map_err(|source| DedupError::Checkpoint {
        dir: dir.to_path_buf(),
        source,
    })?;
    fs::canonicalize(dir).map_err(|source| DedupError::ListDir {
        dir: dir.to_path_buf(),
        source,
    })
}

/// `page_size` if given and sound, else the usual page size of the root process's
/// architecture.
fn page_size_of(dir: &Path, page_size: Option<u64>) -> Result<u64, DedupError> {
    if let Some(page_size) = page_size {
        if page_size < MIN_PAGE_SIZE || !page_size.is_power_of_two() {
            return Err(DedupError::BadPageSize { page_size });
        }
        return Ok(page_size);
    }
    let page_size_error = |source| DedupError::PageSize {
        dir: dir.to_path_buf(),
        source,
    };
    let checkpoint = Checkpoint::open(dir).map_err(page_size_error)?;
    let tree = checkpoint.pstree().map_err(page_size_error)?;
    let root = tree.iter().find(|t| t.ppid == 0).map_or(0, |t| t.pid);
    let core = checkpoint.core(root).map_err(page_size_error)?;
    Ok(default_page_size(core.mtype))
}

/// The process and shared memory pagemaps of `dir`, sorted by name.
fn pagemap_names(dir: &Path) -> Result<Vec<String>, DedupError> {
    let list_error = |source| DedupError::ListDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(list_error)? {
        let entry = entry.map_err(list_error)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if is_pagemap_name(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// `pagemap-<pid>.img` or `pagemap-shmem-<id>.img`, the names `criu dedup` looks for.
fn is_pagemap_name(name: &str) -> bool {
    let Some(id) = name
        .strip_prefix("pagemap-")
        .and_then(|rest| rest.strip_suffix(".img"))
    else {
        return false;
    };
    let id = id.strip_prefix("shmem-").unwrap_or(id);
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())
}

/// Every entry of a level starts on a page boundary; CRIU writes nothing else, and a range
/// cut from an entry that does not would punch parts of pages the newer level does not hold.
fn check_aligned(path: &Path, pagemap: &Pagemap) -> Result<(), DedupError> {
    let misaligned = pagemap
        .entries
        .iter()
        .position(|e| e.vaddr % pagemap.page_size != 0);
    match misaligned {
        None => Ok(()),
        Some(position) => Err(DedupError::Unaligned {
            path: path.to_path_buf(),
            // The head is entry 0 of the image.
            index: position + 1,
            vaddr: pagemap.entries[position].vaddr,
            page_size: pagemap.page_size,
        }),
    }
}

/// Other images directories, next to any level of `chain`, whose `parent` link resolves to
/// one of the `punched` levels.
fn sharers(
    chain: &BTreeSet<PathBuf>,
    punched: &BTreeSet<PathBuf>,
) -> Result<Vec<SharedParent>, DedupError> {
    if punched.is_empty() {
        return Ok(Vec::new());
    }
    // Not yet handled: images directories elsewhere than next to a level (nested inside
    // one, or in another tree) whose `parent` link leads into the chain, because finding
    // them means walking the whole file system; callers that keep such layouts must check
    // them themselves before forcing or running a dedup.
    let holders: BTreeSet<&Path> = chain.iter().filter_map(|level| level.parent()).collect();
    let mut out = BTreeSet::new();
    for holder in holders {
        let list_error = |source| DedupError::ListDir {
            dir: holder.to_path_buf(),
            source,
        };
        for entry in fs::read_dir(holder).map_err(list_error)? {
            let entry = entry.map_err(list_error)?;
            // Entries that cannot be resolved (dangling links, vanished directories) lead
            // to no parent CRIU could restore from either.
            let Ok(sibling) = fs::canonicalize(entry.path()) else {
                continue;
            };
            if chain.contains(&sibling) || !sibling.is_dir() {
                continue;
            }
            let Ok(parent) = fs::canonicalize(sibling.join("parent")) else {
                continue;
            };
            if punched.contains(&parent) {
                out.insert(SharedParent {
                    parent,
                    child: sibling,
                });
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// The pagemap `name` of `dir` and its pages file, without following the parent chain, or
/// `None` when the pagemap is gone.
fn open_newest(
    dir: &Path,
    name: &str,
    page_size: u64,
) -> Result<Option<(Pagemap, MappedFile)>, DedupError> {
    let memory_error = |source| DedupError::Memory {
        pagemap: dir.join(name),
        source,
    };
    let path = dir.join(name);
    // SAFETY: the images are not modified while read (`MappedFile::open`'s contract); this
    // module only ever punches parent levels, never the directory whose newest level this
    // is, and the map is dropped before `page_stats` returns.
    let file = match unsafe { MappedFile::open(&path) } {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            let path = path.clone();
            return Err(memory_error(MemoryError::Io { path, source }));
        }
    };
    let pagemap = Pagemap::parse(file.bytes(), page_size).map_err(|source| {
        memory_error(MemoryError::Pagemap {
            path: path.clone(),
            source,
        })
    })?;

    let pages_path = dir.join(format!("pages-{}.img", pagemap.pages_id));
    let needed = pagemap.pages_len();
    // SAFETY: as above.
    let pages = match unsafe { MappedFile::open(&pages_path) } {
        Ok(pages) => pages,
        Err(e) if e.kind() == io::ErrorKind::NotFound && needed == 0 => MappedFile::empty(),
        Err(source) => {
            let path = pages_path;
            return Err(memory_error(MemoryError::Io { path, source }));
        }
    };
    let len = pages.bytes().len() as u64;
    if len < needed {
        let path = pages_path;
        return Err(memory_error(MemoryError::PagesTooShort {
            path,
            len,
            needed,
        }));
    }
    Ok(Some((pagemap, pages)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap::{PE_LAZY, PE_PARENT, PE_PRESENT, PagemapEntry};

    const PAGE: u64 = 4096;

    /// A pagemap of `(vaddr, nr_pages, flags)` entries, with offsets as CRIU lays them out.
    fn pagemap(entries: &[(u64, u64, u32)]) -> Pagemap {
        let mut offset = 0;
        let entries = entries
            .iter()
            .map(|&(vaddr, nr_pages, flags)| {
                let entry = PagemapEntry {
                    vaddr,
                    nr_pages,
                    flags,
                    pages_offset: offset,
                };
                if flags & PE_PRESENT != 0 {
                    offset += nr_pages * PAGE;
                }
                entry
            })
            .collect();
        Pagemap {
            pages_id: 1,
            entries,
            page_size: PAGE,
        }
    }

    fn range(offset: u64, len: u64) -> PunchRange {
        PunchRange { offset, len }
    }

    #[test]
    fn ranges_merge_when_they_overlap_or_touch() {
        let merged = merge_ranges(vec![
            range(0x5000, 0x1000),
            range(0x0, 0x2000),
            range(0x1000, 0x2000),
            range(0x3000, 0x1000),
            range(0x8000, 0x1000),
            range(0x8000, 0x800),
        ]);
        assert_eq!(
            merged,
            [
                range(0x0, 0x4000),
                range(0x5000, 0x1000),
                range(0x8000, 0x1000)
            ]
        );
        assert_eq!(merge_ranges(Vec::new()), []);
    }

    #[test]
    fn overlaps_are_clipped_to_the_query() {
        let cover = [(0x1000, 0x3000), (0x5000, 0x6000), (0x9000, 0xa000)];
        let got: Vec<Span> = overlaps(&cover, 0x2000, 0x5800).collect();
        assert_eq!(got, [(0x2000, 0x3000), (0x5000, 0x5800)]);
        assert_eq!(overlaps(&cover, 0x3000, 0x5000).count(), 0);
        assert_eq!(overlaps(&cover, 0x0, 0x1000).count(), 0);
        let whole: Vec<Span> = overlaps(&cover, 0x0, 0xb000).collect();
        assert_eq!(whole, cover);
    }

    #[test]
    fn every_level_is_punched_where_a_newer_one_is_present() {
        // The child holds 0x2000-0x4000 and 0x7000; the rest it keeps in the parent.
        let child = pagemap(&[
            (0x0, 2, PE_PARENT),
            (0x2000, 2, PE_PRESENT | PE_LAZY),
            (0x4000, 3, PE_PARENT),
            (0x7000, 1, PE_PRESENT),
        ]);
        // The parent holds 0x1000-0x5000 (its pages 0-3) and keeps 0x0 and 0x5000-0x8000 in
        // the grandparent.
        let parent = pagemap(&[
            (0x0, 1, PE_PARENT),
            (0x1000, 4, PE_PRESENT),
            (0x5000, 3, PE_PARENT),
        ]);
        // The grandparent holds everything; one lazy-only entry has no bytes to punch.
        let grandparent = pagemap(&[
            (0x0, 8, PE_PRESENT | PE_LAZY),
            (0x8000, 1, PE_LAZY),
            (0x9000, 1, PE_PRESENT),
        ]);
        let punched = superseded(&[&child, &parent, &grandparent]);

        assert_eq!(punched.len(), 3);
        assert!(punched[0].is_empty(), "the newest level is never punched");
        // 0x2000-0x4000 is the parent's pages 1 and 2.
        assert_eq!(punched[1], [range(0x1000, 0x2000)]);
        // The grandparent loses 0x1000-0x5000 (held by the parent) and 0x7000 (held by the
        // child), its pages 1-4 and 7; 0x0, 0x5000-0x7000 and 0x9000 stay.
        assert_eq!(punched[2], [range(0x1000, 0x4000), range(0x7000, 0x1000)]);
    }

    #[test]
    fn a_parent_entry_split_over_child_entries_is_punched_piece_by_piece() {
        let child = pagemap(&[(0x10000, 1, PE_PRESENT), (0x12000, 1, PE_PRESENT)]);
        // The parent's second entry starts at its page 2 (after a 2-page entry).
        let parent = pagemap(&[(0x0, 2, PE_PRESENT), (0x10000, 4, PE_PRESENT)]);
        let punched = superseded(&[&child, &parent]);
        assert_eq!(punched[1], [range(0x2000, 0x1000), range(0x4000, 0x1000)]);

        let apart = pagemap(&[(0x20000, 1, PE_PRESENT)]);
        assert!(superseded(&[&apart, &parent])[1].is_empty());
    }

    #[test]
    fn misaligned_entries_are_refused() {
        let map = pagemap(&[(0x1000, 1, PE_PRESENT), (0x2800, 1, PE_PRESENT)]);
        assert!(matches!(
            check_aligned(Path::new("pagemap-1.img"), &map),
            Err(DedupError::Unaligned {
                index: 2,
                vaddr: 0x2800,
                ..
            })
        ));
        assert!(check_aligned(Path::new("pagemap-1.img"), &pagemap(&[(0x1000, 1, 4)])).is_ok());
    }

    #[test]
    fn pagemap_names_are_the_ones_criu_dedup_reads() {
        assert!(is_pagemap_name("pagemap-13688.img"));
        assert!(is_pagemap_name("pagemap-shmem-1077.img"));
        assert!(!is_pagemap_name("pagemap-.img"));
        assert!(!is_pagemap_name("pagemap-shmem-.img"));
        assert!(!is_pagemap_name("pagemap-12.img.bak"));
        assert!(!is_pagemap_name("pages-1.img"));
    }

    fn page_of(byte: u8) -> Vec<u8> {
        let mut page = vec![byte; PAGE as usize];
        page[0] = byte.wrapping_add(1);
        page
    }

    #[test]
    fn stats_count_zero_and_repeated_pages() {
        let zero = vec![0u8; PAGE as usize];
        let a = page_of(1);
        let b = page_of(2);
        let mut nearly_zero = zero.clone();
        nearly_zero[PAGE as usize - 1] = 1;
        let pages: Vec<&[u8]> = vec![&a, &zero, &b, &a, &zero, &a, &nearly_zero];

        let stats = stats_of(&pages, PAGE);
        assert_eq!(
            stats,
            PageStats {
                page_size: PAGE,
                pages: 7,
                zero_pages: 2,
                duplicate_pages: 2,
                unique_pages: 3,
                unique_bytes: 3 * PAGE,
            }
        );
        assert_eq!(
            stats_of(&[], PAGE),
            PageStats {
                page_size: PAGE,
                ..PageStats::default()
            }
        );
    }

    #[test]
    fn the_byte_compare_separates_pages_that_share_a_crc() {
        // Three pages handed to the compare step as if their CRCs were equal: two distinct
        // contents, whatever the checksum said.
        let (a, b) = (page_of(7), page_of(8));
        let mut group: Vec<&[u8]> = vec![&a, &b, &a];
        assert_eq!(distinct_contents(&mut group), 2);
        let mut single: Vec<&[u8]> = vec![&a];
        assert_eq!(distinct_contents(&mut single), 1);
    }

    /// Rewrites the last four bytes of `page` so that its CRC32 is `target`. CRC32 is affine
    /// over GF(2): for messages of one length, flipping a set of bits changes the checksum by
    /// the XOR of what each bit alone changes it by, and the 32 bits of the tail reach every
    /// checksum, so the flips needed are the solution of a 32x32 linear system.
    fn force_crc(page: &mut [u8], target: u32) {
        let tail = page.len() - 4;
        page[tail..].fill(0);
        let base = crc32fast::hash(page);

        // An echelon basis of the bits' effects, each with the set of bits that makes it.
        let mut basis: [Option<(u32, u32)>; 32] = [None; 32];
        for bit in 0..32 {
            let mut flipped = page.to_vec();
            flipped[tail + bit / 8] ^= 1 << (bit % 8);
            let (mut effect, mut bits) = (crc32fast::hash(&flipped) ^ base, 1u32 << bit);
            for top in (0..32).rev() {
                if effect >> top & 1 == 0 {
                    continue;
                }
                match basis[top] {
                    Some((e, b)) => (effect, bits) = (effect ^ e, bits ^ b),
                    None => {
                        basis[top] = Some((effect, bits));
                        break;
                    }
                }
            }
        }

        let (mut want, mut flips) = (base ^ target, 0u32);
        for top in (0..32).rev() {
            if want >> top & 1 == 1 {
                let (e, b) = basis[top].expect("the tail bits reach every checksum");
                (want, flips) = (want ^ e, flips ^ b);
            }
        }
        page[tail..].copy_from_slice(&flips.to_le_bytes());
    }

    #[test]
    fn a_real_crc_collision_is_not_a_duplicate() {
        let a = page_of(3);
        let mut b = page_of(4);
        force_crc(&mut b, crc32fast::hash(&a));
        assert_eq!(
            crc32fast::hash(&a),
            crc32fast::hash(&b),
            "the collision is built"
        );
        assert_ne!(a, b);

        let stats = stats_of(&[&a, &b, &a], PAGE);
        assert_eq!(
            stats.duplicate_pages, 1,
            "only the second copy of a repeats"
        );
        assert_eq!(stats.unique_pages, 2);
    }

    #[test]
    fn holes_are_not_counted_as_data() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pages-1.img");
        fs::write(&path, vec![0x5a; 8 * PAGE as usize]).expect("write pages");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(file.as_fd(), mode, 2 * PAGE as i64, 3 * PAGE as i64).expect("punch");

        let all = [range(0, 8 * PAGE)];
        assert_eq!(data_bytes(&file, &all).expect("seek"), 5 * PAGE);
        let inside = [range(3 * PAGE, PAGE), range(4 * PAGE, 2 * PAGE)];
        assert_eq!(data_bytes(&file, &inside).expect("seek"), PAGE);
        assert_eq!(file.metadata().expect("stat").len(), 8 * PAGE);
    }
}
