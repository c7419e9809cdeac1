//! A zero-copy reader (and writer) for CRIU checkpoint images.
//!
//! CRIU writes a checkpoint as an *images directory*: one file per kind of state, most of them
//! a sequence of protobuf messages. Every such file is framed the same way (all words are
//! host-endian `u32`):
//!
//! ```text
//!  inventory.img                  every other protobuf image
//! +-----------------+            +-----------------+
//! | INVENTORY magic |            | head magic      |  IMG_COMMON, or IMG_SERVICE for stats
//! +-----------------+            +-----------------+
//! | size | message  |            | kind magic      |  PSTREE, CORE, PAGEMAP, ...
//! +-----------------+            +-----------------+
//!                                | size | message  |  entry 0
//!                                +-----------------+
//!                                | size | message  |  entry 1
//!                                | extra payload   |  (pipes-data, sk-queues, tcp-stream, ...)
//!                                +-----------------+
//!                                | ...             |  until the end of the file
//! ```
//!
//! There is no index, count or checksum: entries are found by walking the sizes. Raw images
//! (`pages-*.img`, tmpfs archives, iptables text) have no magic and are known by name.
//!
//! The crate reads from `&[u8]` throughout: [`image::Image`] frames a buffer into borrowed
//! [`image::Entry`] slices, [`pagemap::Pagemap`] indexes a pagemap, and [`json`] renders
//! entries as crit prints them. [`checkpoint::Checkpoint`] and [`memory::MemoryImage`] add
//! files: they map images with `memmap2` (the crate's only `unsafe`, in [`map`]) and never
//! read a pages file whole.
//!
//! ```no_run
//! use criu_images::checkpoint::Checkpoint;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let checkpoint = Checkpoint::open("/var/lib/checkpoint")?;
//! for task in checkpoint.pstree()? {
//!     let core = checkpoint.core(task.pid)?;
//!     let comm = core.tc.map(|tc| tc.comm).unwrap_or_default();
//!     println!("{} {comm}", task.pid);
//! }
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod checksum;
pub mod dedup;
pub mod image;
pub mod json;
pub mod kind;
pub mod magic;
pub mod map;
pub mod memory;
pub mod pagemap;
pub mod pyfmt;
pub mod schema;
pub mod validate;
pub mod wire;

/// The typed messages of every image kind, generated from `proto/`.
#[allow(missing_docs, clippy::all, clippy::pedantic, unused_qualifications)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/criu.rs"));
}
