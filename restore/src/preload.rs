//! Reading the pages files ahead of CRIU (`--preload`).
//!
//! CRIU reads a process's pages one pagemap entry at a time and copies each into the new
//! process. With `--preload=on`, [`Preloader::start`] runs a thread beside it that keeps the
//! kernel reading a window of the pages files ahead of CRIU (`posix_fadvise(WILLNEED)`,
//! which queues the reads and returns): it watches how much of each file is already in the
//! page cache (`mincore`), which is how far CRIU has got, and asks for the next window
//! beyond that. Files are taken in the order CRIU reads them: the root task's pages first,
//! then the other tasks' in process tree order, then shared memory. Files already in the
//! page cache are skipped, and the thread stops as soon as CRIU is done
//! ([`Preloader::finish`]). It never delays CRIU's start: the order is worked out on the
//! thread.
//!
//! `--preload=auto` does not preload. Measured on this project's machines (a virtio disk
//! whose `read_ahead_kb` is 8192, and also with it set to 128), restoring a 1 GiB checkpoint
//! from a cold page cache, every strategy tried made CRIU slower, not faster: four threads
//! reading ahead in parallel chunks (about twice as slow), one thread asking for everything
//! at once (about 1.2 times), and this bounded window (no faster than the kernel's own
//! read-ahead; 1.40 times runc's cold time in `bench/restore-1g`, against 0.80 without).
//! CRIU reads each range with one large `preadv`, so the kernel already issues large
//! requests. `--preload=on` stays for storage where that does not hold.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criu_images::checkpoint::Checkpoint;
use criu_images::map::page_cache_residency;
use criu_images::memory::MemoryImage;
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

/// How far ahead of what is cached the thread asks the kernel to read.
const WINDOW: u64 = 64 << 20;

/// How long the thread waits when it is a window ahead.
const POLL: Duration = Duration::from_millis(2);

/// How long the cached part of a file may stand still before the thread gives up on it:
/// nobody (neither CRIU nor the kernel's read-ahead) is reading it any more.
const STALL: Duration = Duration::from_secs(2);

/// `--preload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreloadMode {
    /// The default: no preloading (see the module documentation for why).
    Auto,
    /// Preload.
    On,
    /// Never preload.
    Off,
}

/// What the thread shares with the restore.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    /// Bytes asked for so far.
    requested: AtomicU64,
}

/// Preloading in progress.
#[derive(Debug)]
pub struct Preloader {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
    started: Instant,
}

impl Preloader {
    /// Starts preloading the pages files of `images`, or returns `None` when `mode` says
    /// not to. Never fails: a checkpoint it cannot read is CRIU's to report.
    pub fn start(images: &Path, mode: PreloadMode) -> Option<Preloader> {
        if mode != PreloadMode::On {
            return None;
        }
        let shared = Arc::new(Shared::default());
        let images = images.to_path_buf();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            for path in pages_files_in_order(&images) {
                if thread_shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                read_ahead(&path, &thread_shared);
            }
        });
        Some(Preloader {
            shared,
            thread,
            started: Instant::now(),
        })
    }

    /// Stops preloading (CRIU is done) and waits for the thread, which stops after the
    /// request it is in.
    pub fn finish(self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        tracing::debug!(
            requested_mib = self.shared.requested.load(Ordering::SeqCst) >> 20,
            elapsed_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "preloading stopped"
        );
    }
}

/// Keeps the kernel reading a window ahead of the cached part of one file, until the whole
/// file has been asked for or CRIU is done.
fn read_ahead(path: &Path, shared: &Shared) {
    let Ok(file) = File::open(path) else {
        return;
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let mut asked = 0;
    let mut last_cached = 0;
    let mut moved = Instant::now();
    while asked < len && !shared.stop.load(Ordering::SeqCst) {
        let Ok((resident, pages)) = page_cache_residency(path) else {
            return;
        };
        if asked == 0 && pages > 0 && resident == pages {
            tracing::debug!(file = %path.display(), "already cached, not preloaded");
            return;
        }
        // What is cached is, near enough, what CRIU has read: it reads the file in order.
        let page = len.div_ceil(u64::try_from(pages.max(1)).unwrap_or(1));
        let cached = u64::try_from(resident).unwrap_or(0).saturating_mul(page);
        let target = cached.saturating_add(WINDOW).min(len);
        if cached != last_cached {
            last_cached = cached;
            moved = Instant::now();
        }
        if target <= asked {
            if moved.elapsed() > STALL {
                return;
            }
            std::thread::sleep(POLL);
            continue;
        }
        let (Ok(offset), Ok(count)) = (i64::try_from(asked), i64::try_from(target - asked)) else {
            return;
        };
        if posix_fadvise(
            &file,
            offset,
            count,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )
        .is_err()
        {
            return;
        }
        shared.requested.fetch_add(target - asked, Ordering::SeqCst);
        asked = target;
    }
}

/// The pages files of the root task's memory first, then of the other tasks in process tree
/// order, then of shared memory, each once; older levels of a parent chain after newer ones.
fn pages_files_in_order(images: &Path) -> Vec<PathBuf> {
    let Ok(checkpoint) = Checkpoint::open(images) else {
        return Vec::new();
    };
    let mut pagemaps: Vec<String> = checkpoint
        .pstree()
        .unwrap_or_default()
        .iter()
        .map(|task| format!("pagemap-{}.img", task.pid))
        .collect();
    let mut shmem: Vec<String> = std::fs::read_dir(images)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.starts_with("pagemap-shmem-"))
        .collect();
    shmem.sort();
    pagemaps.extend(shmem);

    let mut out: Vec<PathBuf> = Vec::new();
    for name in pagemaps {
        let Ok(Some(memory)) = MemoryImage::open(images, &name, checkpoint.page_size()) else {
            continue;
        };
        for (dir, pagemap, _) in memory.levels() {
            let path = dir.join(format!("pages-{}.img", pagemap.pages_id));
            if !out.contains(&path) {
                out.push(path);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_files_come_in_process_tree_order() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        let files = pages_files_in_order(&fixtures.join("runc-busybox"));
        let names: Vec<_> = files
            .iter()
            .filter_map(|p| p.file_name()?.to_str())
            .collect();
        assert_eq!(
            names,
            ["pages-1.img", "pages-2.img"],
            "pid 1's pages, then pid 15's"
        );

        let chain = pages_files_in_order(&fixtures.join("parent-chain/child"));
        let levels: Vec<_> = chain
            .iter()
            .filter_map(|p| p.parent()?.file_name()?.to_str())
            .collect();
        assert_eq!(
            levels,
            ["child", "parent"],
            "the child's pages, then the parent's"
        );
    }

    #[test]
    fn a_file_out_of_the_page_cache_is_read_ahead() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pages-1.img");
        let len = 3 * WINDOW / 2;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let file = File::open(&path).expect("open");
        file.sync_all().expect("sync");
        // Clean pages can be dropped from the page cache on request.
        let length = i64::try_from(len).expect("length");
        posix_fadvise(&file, 0, length, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
            .expect("drop from the cache");
        let (before, pages) = page_cache_residency(&path).expect("mincore");
        if before == pages {
            println!("skipped: the kernel kept the file cached");
            return;
        }

        let shared = Shared::default();
        read_ahead(&path, &shared);
        let requested = shared.requested.load(Ordering::SeqCst);
        assert!(
            requested > 0 && requested <= len,
            "asked for {requested} of {len} bytes"
        );
        // WILLNEED is a request: the kernel reads what it chooses to, but it reads.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (resident, _) = page_cache_residency(&path).expect("mincore");
            if resident > before {
                break;
            }
            assert!(Instant::now() < deadline, "nothing was read ahead");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Whatever the kernel left out, a read brings in; then the file counts as cached and
        // is not asked for again (unless the kernel has already reclaimed some of it).
        let _ = std::fs::read(&path).expect("read");
        let shared = Shared::default();
        let (resident, _) = page_cache_residency(&path).expect("mincore");
        read_ahead(&path, &shared);
        if resident == pages {
            assert_eq!(shared.requested.load(Ordering::SeqCst), 0);
        }
        assert!(Preloader::start(dir.path(), PreloadMode::Auto).is_none());
        assert!(Preloader::start(dir.path(), PreloadMode::Off).is_none());
    }
}
