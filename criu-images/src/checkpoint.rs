//! The checkpoint view: an images directory read as a whole.
//!
//! [`Checkpoint`] opens files lazily by the names CRIU gives them and decodes them into the
//! typed messages of [`crate::pb`]. CRIU treats a missing optional image as an empty one, and
//! so does this view; images every dump has (inventory, pstree, per-task core, ids and mm)
//! are errors when missing.

use std::io;
use std::path::{Path, PathBuf};

use prost::Message;
use thiserror::Error;

use crate::image::{Image, ImageError};
use crate::map::MappedFile;
use crate::memory::{MemoryError, MemoryImage};
use crate::pb;

/// Why a checkpoint could not be read.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// A file could not be opened or mapped.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The directory is not an images directory.
    #[error("{dir} is not a CRIU images directory: it has no inventory.img")]
    NotImagesDir {
        /// The directory.
        dir: PathBuf,
    },
    /// A required image is missing.
    #[error("{path} is missing")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// An image's framing is broken.
    #[error("bad image {path}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ImageError,
    },
    /// An image is of another kind than its name says.
    #[error("{path} has magic {found}, expected {expected}")]
    WrongKind {
        /// The file.
        path: PathBuf,
        /// The magic expected.
        expected: &'static str,
        /// The magic found.
        found: &'static str,
    },
    /// An entry does not decode as its message.
    #[error("{path}: entry {index} at offset {offset} is not a valid {message}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Index of the entry.
        index: usize,
        /// Offset of the entry.
        offset: usize,
        /// The message type.
        message: &'static str,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
    /// An image that must hold exactly one entry holds another number.
    #[error("{path} holds {count} entries, expected one")]
    EntryCount {
        /// The file.
        path: PathBuf,
        /// The number found.
        count: usize,
    },
    /// The image names no process tree root.
    #[error("{path} has no root process (an entry with ppid 0)")]
    NoRoot {
        /// The pstree file.
        path: PathBuf,
    },
    /// Memory could not be read.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// An images directory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    page_size: u64,
}

/// The page size of the dumping machine's architecture. The images do not record it; this is
/// the usual size per `core_entry.mtype`, and callers with other knowledge pass their own.
pub fn default_page_size(march: i32) -> u64 {
    match pb::core_entry::March::try_from(march) {
        Ok(pb::core_entry::March::Ppc64) => 65536,
        _ => 4096,
    }
}

impl Checkpoint {
    /// Opens the images directory `dir`, checking that it has an inventory.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::NotImagesDir`] without `inventory.img`, I/O errors reading the
    /// directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let dir = dir.as_ref().to_path_buf();
        let metadata = std::fs::metadata(&dir).map_err(|source| CheckpointError::Io {
            path: dir.clone(),
            source,
        })?;
        if !metadata.is_dir() {
            return Err(CheckpointError::NotImagesDir { dir });
        }
        if !dir.join("inventory.img").exists() {
            return Err(CheckpointError::NotImagesDir { dir });
        }
        Ok(Checkpoint {
            dir,
            page_size: 4096,
        })
    }

    /// Uses `page_size` for pagemaps instead of the default of 4096 bytes.
    pub fn with_page_size(mut self, page_size: u64) -> Self {
        self.page_size = page_size;
        self
    }

    /// The images directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The page size used for pagemaps.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Maps the image `name`, or `None` when the file does not exist.
    ///
    /// # Errors
    ///
    /// I/O errors other than a missing file.
    pub fn map(&self, name: &str) -> Result<Option<MappedFile>, CheckpointError> {
        let path = self.dir.join(name);
        // SAFETY: CRIU does not modify an images directory after the dump, and this crate
        // never writes to a file it maps; `MappedFile::open` documents the assumption.
        match unsafe { MappedFile::open(&path) } {
            Ok(map) => Ok(Some(map)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError::Io { path, source }),
        }
    }

    /// Decodes every entry of the image `name` as `M`; a missing image has no entries.
    ///
    /// # Errors
    ///
    /// I/O, framing and decoding errors, and an image of another kind than `magic`.
    pub fn entries<M: Message + Default>(
        &self,
        name: &str,
        magic: &'static str,
    ) -> Result<Vec<M>, CheckpointError> {
        let path = self.dir.join(name);
        let Some(map) = self.map(name)? else {
            return Ok(Vec::new());
        };
        let image_error = |source| CheckpointError::Image {
            path: path.clone(),
            source,
        };
        let image = Image::parse(map.bytes()).map_err(image_error)?;
        if !crate::magic::names(image.magic()).any(|n| n == magic) {
            return Err(CheckpointError::WrongKind {
                path,
                expected: magic,
                found: image.magic_name(),
            });
        }
        let mut out = Vec::new();
        for entry in image.entries().map_err(image_error)? {
            let entry = entry.map_err(image_error)?;
            let message = M::decode(entry.message).map_err(|source| CheckpointError::Decode {
                path: path.clone(),
                index: entry.index,
                offset: entry.offset,
                message: entry.message_type,
                source,
            })?;
            out.push(message);
        }
        Ok(out)
    }

    /// Decodes the single entry of the image `name`, which must exist.
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::entries`], plus a missing image or one without exactly one entry.
    pub fn single<M: Message + Default>(
        &self,
        name: &str,
        magic: &'static str,
    ) -> Result<M, CheckpointError> {
        let path = self.dir.join(name);
        if !path.exists() {
            return Err(CheckpointError::Missing { path });
        }
        let mut entries = self.entries::<M>(name, magic)?;
        if entries.len() != 1 {
            return Err(CheckpointError::EntryCount {
                path,
                count: entries.len(),
            });
        }
        Ok(entries.remove(0))
    }

    /// `inventory.img`.
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::single`].
    pub fn inventory(&self) -> Result<pb::InventoryEntry, CheckpointError> {
        self.single("inventory.img", "INVENTORY")
    }

    /// The process tree, in pstree order (the root first).
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::entries`], a missing pstree and a tree without a root.
    pub fn pstree(&self) -> Result<Vec<pb::PstreeEntry>, CheckpointError> {
        let path = self.dir.join("pstree.img");
        if !path.exists() {
            return Err(CheckpointError::Missing { path });
        }
        let tree: Vec<pb::PstreeEntry> = self.entries("pstree.img", "PSTREE")?;
        if !tree.iter().any(|p| p.ppid == 0) {
            return Err(CheckpointError::NoRoot { path });
        }
        Ok(tree)
    }

    /// `core-<tid>.img` of a thread.
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::single`].
    pub fn core(&self, tid: u32) -> Result<pb::CoreEntry, CheckpointError> {
        self.single(&format!("core-{tid}.img"), "CORE")
    }

    /// `ids-<pid>.img`: the kernel objects a task uses.
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::single`].
    pub fn ids(&self, pid: u32) -> Result<pb::TaskKobjIdsEntry, CheckpointError> {
        self.single(&format!("ids-{pid}.img"), "IDS")
    }

    /// `mm-<pid>.img`: the address space.
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::single`].
    pub fn mm(&self, pid: u32) -> Result<pb::MmEntry, CheckpointError> {
        self.single(&format!("mm-{pid}.img"), "MM")
    }

    /// `fs-<pid>.img`: root, cwd and umask.
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::single`].
    pub fn fs(&self, pid: u32) -> Result<pb::FsEntry, CheckpointError> {
        self.single(&format!("fs-{pid}.img"), "FS")
    }

    /// The open file descriptors of a file table, `fdinfo-<files_id>.img` (named by the
    /// `files_id` of the task's ids, not by its pid).
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::entries`].
    pub fn fdinfo(&self, files_id: u32) -> Result<Vec<pb::FdinfoEntry>, CheckpointError> {
        self.entries(&format!("fdinfo-{files_id}.img"), "FDINFO")
    }

    /// Every open file object, `files.img`.
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::entries`].
    pub fn files(&self) -> Result<Vec<pb::FileEntry>, CheckpointError> {
        self.entries("files.img", "FILES")
    }

    /// The mounts of a mount namespace, `mountpoints-<mnt_ns_id>.img`.
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::entries`].
    pub fn mounts(&self, mnt_ns_id: u32) -> Result<Vec<pb::MntEntry>, CheckpointError> {
        self.entries(&format!("mountpoints-{mnt_ns_id}.img"), "MNTS")
    }

    /// `cgroup.img`, if the dump has one.
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::entries`].
    pub fn cgroup(&self) -> Result<Option<pb::CgroupEntry>, CheckpointError> {
        Ok(self.entries("cgroup.img", "CGROUP")?.into_iter().next())
    }

    /// The UTS namespace `utsns-<id>.img`, if the dump has it.
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::entries`].
    pub fn utsns(&self, id: u32) -> Result<Option<pb::UtsnsEntry>, CheckpointError> {
        Ok(self
            .entries(&format!("utsns-{id}.img"), "UTSNS")?
            .into_iter()
            .next())
    }

    /// `stats-dump`, which CRIU writes into its work directory (the images directory unless
    /// the dump was given another).
    ///
    /// # Errors
    ///
    /// As [`Checkpoint::entries`].
    pub fn dump_stats(&self) -> Result<Option<pb::StatsEntry>, CheckpointError> {
        Ok(self.entries("stats-dump", "STATS")?.into_iter().next())
    }

    /// The memory of process `pid`, through the parent chain, or `None` when the dump has
    /// no pagemap for it.
    ///
    /// # Errors
    ///
    /// See [`MemoryImage::open`].
    pub fn memory(&self, pid: u32) -> Result<Option<MemoryImage>, CheckpointError> {
        Ok(MemoryImage::open(
            &self.dir,
            &format!("pagemap-{pid}.img"),
            self.page_size,
        )?)
    }

    /// The contents of a shared memory object (shared anonymous memory, memfd or System V
    /// segment), `pagemap-shmem-<shmid>.img`.
    ///
    /// # Errors
    ///
    /// See [`MemoryImage::open`].
    pub fn shmem(&self, shmid: u64) -> Result<Option<MemoryImage>, CheckpointError> {
        Ok(MemoryImage::open(
            &self.dir,
            &format!("pagemap-shmem-{shmid}.img"),
            self.page_size,
        )?)
    }
}
