//! Reading a process's memory out of a dump, across the parent chain of incremental dumps.
//!
//! Level 0 is the images directory itself; level `n + 1` is the directory its `parent`
//! symlink points to (relative to the directory holding the link, as CRIU resolves it). Each
//! level has its own pagemap for the same process and its own pages file. A range marked
//! `PE_PARENT` at one level is read from the next, and may be split over several of its
//! entries. Pages files are mapped, and data comes back as slices of the maps.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::map::MappedFile;
use crate::pagemap::{Pagemap, PagemapError};

/// Why memory could not be read.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// A file of the chain could not be opened or mapped.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A pagemap of the chain is broken.
    #[error("bad pagemap {path}")]
    Pagemap {
        /// The pagemap file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: PagemapError,
    },
    /// A pages file is shorter than its pagemap needs.
    #[error("{path} is {len} bytes, but its pagemap needs {needed} bytes (image trimmed?)")]
    PagesTooShort {
        /// The pages file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// What the pagemap's present pages add up to.
        needed: u64,
    },
    /// The `parent` symlink points nowhere.
    #[error("parent link {link} points to {target}, which does not exist")]
    MissingParent {
        /// The link.
        link: PathBuf,
        /// Where it points.
        target: PathBuf,
    },
    /// Following `parent` links comes back to a directory already in the chain.
    #[error("parent link {link} leads back to {dir}, which is already in the chain")]
    ParentLoop {
        /// The link that closes the loop.
        link: PathBuf,
        /// The directory seen twice.
        dir: PathBuf,
    },
    /// A range is marked as kept in the parent dump, but there is no parent pagemap.
    #[error(
        "{len} bytes at {addr:#x} are in the parent dump, but {dir} has no parent pagemap \
             {pagemap}"
    )]
    NoParent {
        /// Directory of the level that refers to its parent.
        dir: PathBuf,
        /// Name of the pagemap looked for.
        pagemap: String,
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The parent pagemap does not cover a range the child says it holds.
    #[error("{len} bytes at {addr:#x} are missing from the parent pagemap in {dir}")]
    MissingInParent {
        /// Directory of the parent level.
        dir: PathBuf,
        /// Start of the missing range.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Part of the requested range was not dumped with its data.
    #[error("{len} bytes at {addr:#x} are {reason}")]
    Unavailable {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
        /// Why.
        reason: &'static str,
    },
    /// The requested range wraps around the address space.
    #[error("range of {len} bytes at {addr:#x} overflows the address space")]
    BadRange {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
}

/// A run of memory in a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// Dumped bytes, borrowed from a pages file.
    Data {
        /// First address.
        addr: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// Not in the pagemap: never touched or all zero for anonymous memory, the file's own
    /// contents for a file mapping, or not mapped at all.
    Absent {
        /// First address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Lazy pages that were never written to the dump; only a lazy-pages daemon or page server
    /// holding them can serve them.
    Lazy {
        /// First address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// One dump of the chain.
#[derive(Debug)]
struct Level {
    dir: PathBuf,
    pagemap: Pagemap,
    pages: MappedFile,
}

/// The memory of one process (or one shared memory object) across a chain of dumps.
#[derive(Debug)]
pub struct MemoryImage {
    pagemap_name: String,
    levels: Vec<Level>,
}

/// Where the `parent` link of `dir` leads, or `None` without one.
fn parent_of(dir: &Path) -> Result<Option<PathBuf>, MemoryError> {
    let link = dir.join("parent");
    match fs::symlink_metadata(&link) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(MemoryError::Io { path: link, source }),
        Ok(_) => {}
    }
    match fs::canonicalize(&link) {
        Ok(target) => Ok(Some(target)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let target = fs::read_link(&link).unwrap_or_default();
            Err(MemoryError::MissingParent { link, target })
        }
        Err(source) => Err(MemoryError::Io { path: link, source }),
    }
}

fn open_level(
    dir: &Path,
    pagemap_name: &str,
    page_size: u64,
) -> Result<Option<Level>, MemoryError> {
    let pagemap_path = dir.join(pagemap_name);
    // SAFETY: images are immutable while read; see `MappedFile::open`'s contract, which the
    // crate documents as its one assumption about the files it reads.
    let pagemap_file = match unsafe { MappedFile::open(&pagemap_path) } {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(MemoryError::Io {
                path: pagemap_path,
                source,
            });
        }
    };
    let pagemap =
        Pagemap::parse(pagemap_file.bytes(), page_size).map_err(|source| MemoryError::Pagemap {
            path: pagemap_path,
            source,
        })?;

    let pages_path = dir.join(format!("pages-{}.img", pagemap.pages_id));
    let needed = pagemap.pages_len();
    // SAFETY: as above.
    let pages = match unsafe { MappedFile::open(&pages_path) } {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound && needed == 0 => MappedFile::empty(),
        Err(source) => {
            return Err(MemoryError::Io {
                path: pages_path,
                source,
            });
        }
    };
    let len = pages.bytes().len() as u64;
    if len < needed {
        return Err(MemoryError::PagesTooShort {
            path: pages_path,
            len,
            needed,
        });
    }
    Ok(Some(Level {
        dir: dir.to_path_buf(),
        pagemap,
        pages,
    }))
}

impl MemoryImage {
    /// Opens `pagemap_name` (`pagemap-<pid>.img` or `pagemap-shmem-<id>.img`) in `dir` and in
    /// every parent dump that has it.
    ///
    /// Returns `None` when `dir` itself has no such pagemap.
    ///
    /// # Errors
    ///
    /// Unreadable files, broken pagemaps, pages files shorter than their pagemaps, dangling
    /// `parent` links and loops in the chain.
    pub fn open(
        dir: &Path,
        pagemap_name: &str,
        page_size: u64,
    ) -> Result<Option<Self>, MemoryError> {
        let Some(first) = open_level(dir, pagemap_name, page_size)? else {
            return Ok(None);
        };
        let mut seen = HashSet::new();
        seen.insert(fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
        let mut levels = vec![first];

        let mut current = dir.to_path_buf();
        while let Some(parent) = parent_of(&current)? {
            if !seen.insert(parent.clone()) {
                return Err(MemoryError::ParentLoop {
                    link: current.join("parent"),
                    dir: parent,
                });
            }
            // CRIU stops the chain at the first parent without this pagemap.
            let Some(level) = open_level(&parent, pagemap_name, page_size)? else {
                break;
            };
            levels.push(level);
            current = parent;
        }
        Ok(Some(MemoryImage {
            pagemap_name: pagemap_name.to_owned(),
            levels,
        }))
    }

    /// The pagemap of the newest dump.
    pub fn pagemap(&self) -> &Pagemap {
        &self.levels[0].pagemap
    }

    /// The number of dumps in the chain, this one included.
    pub fn depth(&self) -> usize {
        self.levels.len()
    }

    /// The pagemap and pages file of each level, newest first.
    pub fn levels(&self) -> impl Iterator<Item = (&Path, &Pagemap, &[u8])> {
        self.levels
            .iter()
            .map(|l| (l.dir.as_path(), &l.pagemap, l.pages.bytes()))
    }

    /// The memory in `[addr, addr + len)`, in address order, with parent ranges resolved.
    ///
    /// # Errors
    ///
    /// A range kept in a parent that the chain does not have.
    pub fn read(&self, addr: u64, len: u64) -> Result<Vec<Chunk<'_>>, MemoryError> {
        addr.checked_add(len)
            .ok_or(MemoryError::BadRange { addr, len })?;
        let mut pieces = Vec::new();
        self.read_level(0, addr, len, &mut pieces)?;
        Ok(pieces
            .into_iter()
            .map(|piece| match piece {
                Piece::Data {
                    addr,
                    level,
                    start,
                    len,
                } => Chunk::Data {
                    addr,
                    bytes: &self.levels[level].pages.bytes()[start..start + len],
                },
                Piece::Absent { addr, len } => Chunk::Absent { addr, len },
                Piece::Lazy { addr, len } => Chunk::Lazy { addr, len },
            })
            .collect())
    }

    fn read_level(
        &self,
        level: usize,
        addr: u64,
        len: u64,
        out: &mut Vec<Piece>,
    ) -> Result<(), MemoryError> {
        let Level { dir, pagemap, .. } = &self.levels[level];
        let end = addr + len;
        let mut cursor = addr;
        let mut index = pagemap.first_ending_above(addr);

        while cursor < end {
            let Some(entry) = pagemap.entries.get(index).filter(|e| e.vaddr < end) else {
                push_absent(level, dir, cursor, end - cursor, out)?;
                break;
            };
            if entry.vaddr > cursor {
                push_absent(level, dir, cursor, entry.vaddr - cursor, out)?;
                cursor = entry.vaddr;
            }
            let take = pagemap.end_of(entry).min(end) - cursor;

            if entry.is_present() {
                // Opening the level checked that the pages file covers every present entry, so
                // these offsets fit in the mapped file and hence in usize.
                let start = entry.pages_offset + (cursor - entry.vaddr);
                push_data(cursor, level, start as usize, take as usize, out);
            } else if entry.in_parent() {
                if level + 1 >= self.levels.len() {
                    return Err(MemoryError::NoParent {
                        dir: dir.clone(),
                        pagemap: self.pagemap_name.clone(),
                        addr: cursor,
                        len: take,
                    });
                }
                self.read_level(level + 1, cursor, take, out)?;
            } else if entry.is_lazy_only() {
                out.push(Piece::Lazy {
                    addr: cursor,
                    len: take,
                });
            } else {
                push_absent(level, dir, cursor, take, out)?;
            }
            cursor += take;
            index += 1;
        }
        Ok(())
    }

    /// The memory in `[addr, addr + len)` as one buffer, reading absent pages as zeros (as
    /// anonymous memory reads).
    ///
    /// # Errors
    ///
    /// As [`MemoryImage::read`], and [`MemoryError::Unavailable`] for lazy pages.
    pub fn read_to_vec(&self, addr: u64, len: u64) -> Result<Vec<u8>, MemoryError> {
        let mut out = Vec::new();
        for chunk in self.read(addr, len)? {
            match chunk {
                Chunk::Data { bytes, .. } => out.extend_from_slice(bytes),
                Chunk::Absent { len, .. } => out.resize(out.len() + len as usize, 0),
                Chunk::Lazy { addr, len } => {
                    return Err(MemoryError::Unavailable {
                        addr,
                        len,
                        reason: "lazy pages that are not in the dump",
                    });
                }
            }
        }
        Ok(out)
    }
}

/// A chunk before its bytes are sliced: data is kept as a range of a level's pages file so
/// that adjacent runs can be merged.
#[derive(Clone, Copy, Debug)]
enum Piece {
    Data {
        addr: u64,
        level: usize,
        start: usize,
        len: usize,
    },
    Absent {
        addr: u64,
        len: u64,
    },
    Lazy {
        addr: u64,
        len: u64,
    },
}

/// Records a range the level's pagemap does not have. In a parent level that is an error:
/// CRIU marks a range `PE_PARENT` only after checking the parent holds it.
fn push_absent(
    level: usize,
    dir: &Path,
    addr: u64,
    len: u64,
    out: &mut Vec<Piece>,
) -> Result<(), MemoryError> {
    if level > 0 {
        return Err(MemoryError::MissingInParent {
            dir: dir.to_path_buf(),
            addr,
            len,
        });
    }
    if let Some(Piece::Absent { addr: a, len: l }) = out.last_mut()
        && *a + *l == addr
    {
        *l += len;
        return Ok(());
    }
    out.push(Piece::Absent { addr, len });
    Ok(())
}

/// Appends data, merging it with the previous piece when the two are adjacent both in memory
/// and in the same pages file.
fn push_data(addr: u64, level: usize, start: usize, len: usize, out: &mut Vec<Piece>) {
    if let Some(Piece::Data {
        addr: a,
        level: l,
        start: s,
        len: n,
    }) = out.last_mut()
        && *l == level
        && *a + *n as u64 == addr
        && *s + *n == start
    {
        *n += len;
        return;
    }
    out.push(Piece::Data {
        addr,
        level,
        start,
        len,
    });
}
