//! Read-only memory maps of image files: the one place this crate uses `unsafe`.
//!
//! Pages files can be many gigabytes, so they are mapped, never read whole; the parsers then
//! work on the mapped `&[u8]` like on any other slice.

use std::fs::File;
use std::io;
use std::path::Path;

use memmap2::Mmap;

/// A file mapped read-only, or the empty slice for an empty file (which cannot be mapped).
#[derive(Debug)]
pub struct MappedFile {
    map: Option<Mmap>,
}

impl MappedFile {
    /// Maps the file at `path` read-only.
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
    /// Any error from opening, inspecting or mapping the file.
    pub unsafe fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(MappedFile { map: None });
        }
        // SAFETY: the file is opened read-only and mapped privately for reading; the caller
        // guarantees, per this function's contract, that it is neither truncated nor
        // modified while the map lives.
        let map = unsafe { Mmap::map(&file)? };
        Ok(MappedFile { map: Some(map) })
    }

    /// A map of nothing, standing for an empty or absent file.
    pub fn empty() -> Self {
        MappedFile { map: None }
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Hints the kernel that the whole file will be read soon (`MADV_WILLNEED`).
    ///
    /// # Errors
    ///
    /// The error from `madvise`.
    pub fn will_need(&self) -> io::Result<()> {
        match &self.map {
            Some(map) => map.advise(memmap2::Advice::WillNeed),
            None => Ok(()),
        }
    }
}
