//! The checkpoint view on the real fixtures, and the corrupt variants in `fixtures/corrupt/`,
//! each of which must fail with its own error.

mod common;

use std::fs;
use std::path::PathBuf;

use criu_images::checkpoint::{Checkpoint, CheckpointError};
use criu_images::image::{Image, ImageError};
use criu_images::memory::{Chunk, MemoryError, MemoryImage};
use criu_images::pagemap::PagemapError;

fn fixture(name: &str) -> PathBuf {
    common::fixtures().join(name)
}

fn corrupt(name: &str) -> PathBuf {
    common::fixtures().join("corrupt").join(name)
}

/// Whether `needle` occurs in the dumped memory of `memory`.
fn contains(memory: &MemoryImage, needle: &[u8]) -> bool {
    let pagemap = memory.pagemap();
    pagemap.entries.iter().any(|entry| {
        let chunks = memory
            .read(entry.vaddr, entry.nr_pages * pagemap.page_size)
            .expect("readable");
        chunks.iter().any(|chunk| match chunk {
            Chunk::Data { bytes, .. } => bytes.windows(needle.len()).any(|w| w == needle),
            _ => false,
        })
    })
}

#[test]
fn process_tree_reads_as_a_tree_with_command_lines() {
    let checkpoint = Checkpoint::open(fixture("process-tree")).expect("opens");
    let tree = checkpoint.pstree().expect("pstree");
    assert!(tree.len() >= 4, "{} processes", tree.len());
    let root = tree.iter().find(|t| t.ppid == 0).expect("a root");
    assert!(tree.iter().filter(|t| t.ppid == root.pid).count() >= 2);

    for task in &tree {
        let core = checkpoint.core(task.pid).expect("core");
        assert_eq!(core.mtype, 1, "x86_64");
        let ids = checkpoint.ids(task.pid).expect("ids");
        checkpoint.fdinfo(ids.files_id).expect("fdinfo by files_id");
        let mm = checkpoint.mm(task.pid).expect("mm");
        let memory = checkpoint
            .memory(task.pid)
            .expect("memory")
            .expect("a pagemap");
        let len = mm.mm_arg_end - mm.mm_arg_start;
        let args = memory
            .read_to_vec(mm.mm_arg_start, len)
            .expect("argv readable");
        assert!(
            args.ends_with(b"\0"),
            "argv of {} is NUL-terminated",
            task.pid
        );
        let env_len = mm.mm_env_end - mm.mm_env_start;
        let env = memory
            .read_to_vec(mm.mm_env_start, env_len)
            .expect("environment readable");
        let env = String::from_utf8_lossy(&env);
        assert!(
            env.contains("FIXTURE_ENV=process-tree"),
            "environment of {}: {env}",
            task.pid
        );
    }
    let inventory = checkpoint.inventory().expect("inventory");
    assert_eq!(inventory.img_version, 2);
    assert!(
        checkpoint
            .dump_stats()
            .expect("stats")
            .and_then(|s| s.dump)
            .is_some()
    );
}

#[test]
fn memfd_and_shared_memory_contents_are_in_shmem_pagemaps() {
    let checkpoint = Checkpoint::open(fixture("memfd-shm")).expect("opens");
    let root = checkpoint.pstree().expect("pstree")[0].pid;
    let memory = checkpoint.memory(root).expect("memory").expect("a pagemap");
    assert!(contains(&memory, b"CRIU-FIXTURE-HEAP"));

    let mut found = Vec::new();
    for entry in fs::read_dir(fixture("memfd-shm")).expect("fixture") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some(id) = name
            .strip_prefix("pagemap-shmem-")
            .and_then(|n| n.strip_suffix(".img"))
        else {
            continue;
        };
        let shmem = checkpoint
            .shmem(id.parse().expect("numeric id"))
            .expect("opens")
            .expect("exists");
        for needle in [&b"CRIU-FIXTURE-MEMFD"[..], b"CRIU-FIXTURE-SHARED"] {
            if contains(&shmem, needle) {
                found.push(String::from_utf8_lossy(needle).into_owned());
            }
        }
    }
    found.sort();
    assert_eq!(found, ["CRIU-FIXTURE-MEMFD", "CRIU-FIXTURE-SHARED"]);
}

#[test]
fn runc_checkpoint_has_its_container_view() {
    let checkpoint = Checkpoint::open(fixture("runc-busybox")).expect("opens");
    let tree = checkpoint.pstree().expect("pstree");
    let root = tree.iter().find(|t| t.ppid == 0).expect("a root");
    assert_eq!(
        root.pid, 1,
        "the container's init is pid 1 in its namespace"
    );
    let ids = checkpoint.ids(root.pid).expect("ids");
    let mounts = checkpoint
        .mounts(ids.mnt_ns_id.expect("a mount namespace"))
        .expect("mounts");
    assert!(mounts.iter().any(|m| m.mountpoint.ends_with("/proc")));
    assert!(
        mounts.iter().any(|m| m.ext_key.is_some()),
        "runc passes external mounts"
    );
    let uts = checkpoint
        .utsns(ids.uts_ns_id.expect("a uts namespace"))
        .expect("utsns");
    assert!(uts.is_some());
    assert!(
        checkpoint
            .cgroup()
            .expect("cgroup")
            .is_some_and(|c| !c.sets.is_empty())
    );
    assert!(fixture("runc-busybox").join("descriptors.json").is_file());
}

fn image_error(path: PathBuf) -> ImageError {
    let data = fs::read(&path).expect("corrupt fixture readable");
    let image = match Image::parse(&data) {
        Ok(image) => image,
        Err(error) => return error,
    };
    let entries = image.entries().expect("a known kind");
    entries
        .filter_map(Result::err)
        .next()
        .expect("the corruption is found")
}

#[test]
fn framing_corruptions_are_named() {
    assert!(matches!(
        image_error(corrupt("truncated-entry-body").join("pstree.img")),
        ImageError::TruncatedEntry { .. }
    ));
    assert!(matches!(
        image_error(corrupt("truncated-size-word").join("pstree.img")),
        ImageError::TruncatedSize { available: 2, .. }
    ));
    assert_eq!(
        image_error(corrupt("bad-image-magic").join("pstree.img")),
        ImageError::UnknownMagic { magic: 0x1234_5678 }
    );
    assert_eq!(
        image_error(corrupt("bad-head-magic").join("pstree.img")),
        ImageError::UnknownMagic { magic: 0x1111_1111 }
    );
    let huge = image_error(corrupt("huge-entry-size").join("pstree.img"));
    assert!(matches!(
        huge,
        ImageError::TruncatedEntry {
            index: 0,
            offset: 8,
            size: 0x1000_0000,
            ..
        }
    ));
    assert_eq!(
        huge.to_string(),
        "entry 0 at offset 8: size 268435456 runs past the end of the image (90 bytes left)"
    );
}

#[test]
fn checkpoint_corruptions_are_named() {
    let empty = Checkpoint::open(corrupt("empty-inventory"))
        .expect("opens")
        .inventory();
    assert!(matches!(
        empty,
        Err(CheckpointError::Image {
            source: ImageError::TooShort { len: 0 },
            ..
        })
    ));

    let checkpoint = Checkpoint::open(corrupt("missing-core")).expect("opens");
    let tree = checkpoint.pstree().expect("pstree intact");
    let missing: Vec<u32> = tree
        .iter()
        .map(|t| t.pid)
        .filter(|&pid| checkpoint.core(pid).is_err())
        .collect();
    assert_eq!(missing.len(), 1);
    assert!(matches!(
        checkpoint.core(missing[0]),
        Err(CheckpointError::Missing { .. })
    ));

    let pages_short = Checkpoint::open(corrupt("pages-short")).expect("opens");
    let pid = pages_short.pstree().expect("pstree")[0].pid;
    let error = pages_short.memory(pid).expect_err("pages file is short");
    let CheckpointError::Memory(MemoryError::PagesTooShort { len, needed, .. }) = error else {
        panic!("expected PagesTooShort, got {error:?}");
    };
    assert_eq!(needed - len, 4096, "the fixture is one page short");

    let unsorted = Checkpoint::open(corrupt("pagemap-unsorted")).expect("opens");
    let pid = unsorted.pstree().expect("pstree")[0].pid;
    let error = unsorted.memory(pid).expect_err("entries out of order");
    assert!(matches!(
        error,
        CheckpointError::Memory(MemoryError::Pagemap {
            source: PagemapError::Unsorted { .. },
            ..
        })
    ));
}

#[test]
fn parent_chain_corruptions_are_named() {
    let looped = Checkpoint::open(corrupt("parent-loop").join("a")).expect("opens");
    let pid = looped.pstree().expect("pstree")[0].pid;
    assert!(matches!(
        looped.memory(pid),
        Err(CheckpointError::Memory(MemoryError::ParentLoop { .. }))
    ));

    let missing = Checkpoint::open(corrupt("parent-missing")).expect("opens");
    let pid = missing.pstree().expect("pstree")[0].pid;
    assert!(matches!(
        missing.memory(pid),
        Err(CheckpointError::Memory(MemoryError::MissingParent { .. }))
    ));
}

#[test]
fn the_shipped_parent_chain_reads_through() {
    let checkpoint = Checkpoint::open(fixture("parent-chain").join("child")).expect("opens");
    let pid = checkpoint.pstree().expect("pstree")[0].pid;
    let memory = checkpoint
        .memory(pid)
        .expect("chain opens")
        .expect("a pagemap");
    assert_eq!(memory.depth(), 2);
    assert!(memory.pagemap().parent_pages() > 0);
    assert!(contains(&memory, b"CRIU-FIXTURE-HEAP"));
}
