//! Read-only memory maps of image files: the one place this crate uses `unsafe`.
//!
//! Pages files can be many gigabytes, so they are mapped, never read whole; the parsers then
//! work on the mapped `&[u8]` like on any other slice. Most other images are a few hundred
//! bytes, and for those one `read` is cheaper than a map, its page fault and its unmap, so
//! files up to [`READ_LIMIT`] bytes are read into memory instead.

use std::fs::File;
use std::io::{self, Read as _};
use std::path::Path;

use memmap2::Mmap;

/// Files up to this size are read rather than mapped.
pub const READ_LIMIT: u64 = 32 * 1024;

/// Where a file's bytes live.
#[derive(Debug)]
enum Backing {
    /// An empty file, which cannot be mapped.
    Empty,
    /// A small file, read whole.
    Read(Box<[u8]>),
    /// A read-only map of the file.
    Mapped(Mmap),
}

/// A file's bytes: mapped read-only, read whole when small, or the empty slice for an empty
/// file.
#[derive(Debug)]
pub struct MappedFile {
    backing: Backing,
}

impl MappedFile {
    /// Maps the file at `path` read-only, or reads it if it is small.
    ///
    /// # Safety
    ///
    /// The caller promises that nothing truncates or rewrites the file while the map, or any
    /// slice borrowed from it, is alive. A file truncated under a live map makes reads of the
    /// lost range raise `SIGBUS`; a file rewritten in place changes bytes that safe code
    /// already holds as `&[u8]`. CRIU never changes an images directory after the dump, and
    /// this workspace never writes to one it has mapped; the only writer that does is
    /// `criu restore --auto-dedup`, which must not run on a checkpoint that is being read.
    ///
    /// # Errors
    ///
    /// Any error from opening, inspecting, reading or mapping the file.
    pub unsafe fn open(path: &Path) -> io::Result<Self> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(MappedFile::empty());
        }
        if len <= READ_LIMIT {
            // A file that grew since the size was taken is read as far as it goes: the result
            // is what a map made a moment later would show.
            let mut bytes = Vec::with_capacity(len as usize);
            file.read_to_end(&mut bytes)?;
            let backing = if bytes.is_empty() {
                Backing::Empty
            } else {
                Backing::Read(bytes.into_boxed_slice())
            };
            return Ok(MappedFile { backing });
        }
        // SAFETY: the file is opened read-only and mapped privately for reading; the caller
        // guarantees, per this function's contract, that it is neither truncated nor
        // modified while the map lives.
        let map = unsafe { Mmap::map(&file)? };
        Ok(MappedFile {
            backing: Backing::Mapped(map),
        })
    }

    /// A map of nothing, standing for an empty or absent file.
    pub fn empty() -> Self {
        MappedFile {
            backing: Backing::Empty,
        }
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Empty => &[],
            Backing::Read(bytes) => bytes,
            Backing::Mapped(map) => map,
        }
    }

    /// How many of the file's pages are in the page cache, and how many pages it has (a
    /// file that was read is in memory whole).
    ///
    /// # Errors
    ///
    /// The error from `mincore`.
    pub fn resident(&self) -> io::Result<(usize, usize)> {
        let map = match &self.backing {
            Backing::Empty => return Ok((0, 0)),
            Backing::Read(_) => return Ok((1, 1)),
            Backing::Mapped(map) => map,
        };
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| usize::try_from(p).ok())
            .filter(|&p| p > 0)
            .unwrap_or(4096);
        let pages = map.len().div_ceil(page);
        let mut residency = vec![0u8; pages];
        // SAFETY: the address and length are those of a live mapping (page aligned, as mmap
        // returns it), and `residency` has one byte for each of its pages, which is what
        // mincore writes; the mapping's contents are not touched.
        let result = unsafe {
            nix::libc::mincore(
                map.as_ptr().cast_mut().cast(),
                map.len(),
                residency.as_mut_ptr(),
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((residency.iter().filter(|&&b| b & 1 == 1).count(), pages))
    }

    /// Hints the kernel that the whole file will be read soon (`MADV_WILLNEED`); a file that
    /// was read is in memory already.
    ///
    /// # Errors
    ///
    /// The error from `madvise`.
    pub fn will_need(&self) -> io::Result<()> {
        match &self.backing {
            Backing::Mapped(map) => map.advise(memmap2::Advice::WillNeed),
            Backing::Empty | Backing::Read(_) => Ok(()),
        }
    }
}

/// How many pages of the file at `path` are in the page cache, and how many pages it has:
/// a way to tell whether reading it will touch the disk. Safe, unlike [`MappedFile::open`],
/// because the file's contents are never read: a file truncated meanwhile only changes the
/// answer.
///
/// # Errors
///
/// Errors opening or mapping the file, or from `mincore`.
pub fn page_cache_residency(path: &Path) -> io::Result<(usize, usize)> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok((0, 0));
    }
    // SAFETY: the map is private to this function and only its residency is asked for; no
    // byte of it is read, so a concurrent truncation cannot fault.
    let map = unsafe { Mmap::map(&file)? };
    MappedFile {
        backing: Backing::Mapped(map),
    }
    .resident()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(bytes: &[u8]) -> MappedFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("image");
        std::fs::write(&path, bytes).expect("write");
        // SAFETY: the file lives in a private temporary directory nothing else writes to.
        unsafe { MappedFile::open(&path) }.expect("open")
    }

    #[test]
    fn small_large_and_empty_files_give_their_bytes() {
        assert_eq!(open(b"").bytes(), b"");
        assert_eq!(open(b"inventory").bytes(), b"inventory");
        let large: Vec<u8> = (0..READ_LIMIT as usize * 3).map(|i| i as u8).collect();
        let file = open(&large);
        assert!(matches!(file.backing, Backing::Mapped(_)));
        assert_eq!(file.bytes(), &large[..]);
        let (resident, pages) = file.resident().expect("mincore");
        assert_eq!(pages, (READ_LIMIT as usize * 3).div_ceil(4096));
        assert!(resident <= pages);
        let edge = vec![7u8; READ_LIMIT as usize];
        let file = open(&edge);
        assert!(matches!(file.backing, Backing::Read(_)));
        assert_eq!(file.bytes(), &edge[..]);
    }
}
