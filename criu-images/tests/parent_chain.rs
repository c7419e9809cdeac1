//! Parent chains, built from a real dump the way an incremental dump lays them out: the child
//! keeps some entries and marks the others `PE_PARENT`, and its `parent` link points to a copy
//! holding the full pages. Reading through the chain must give the bytes of the original.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use criu_images::checkpoint::Checkpoint;
use criu_images::image::ImageWriter;
use criu_images::memory::{MemoryError, MemoryImage};
use criu_images::pagemap::{PE_PARENT, Pagemap};
use criu_images::{magic, wire};

fn varint_field(out: &mut Vec<u8>, number: u32, value: u64) {
    wire::write_tag(out, number, wire::WireType::Varint);
    wire::write_varint(out, value);
}

/// Writes `dir/pagemap-<pid>.img` and its pages file holding only the entries at odd
/// positions; even ones become `PE_PARENT`.
fn split_child(original: &Path, child: &Path, pid: u32) -> Pagemap {
    let name = format!("pagemap-{pid}.img");
    let pagemap = Pagemap::parse(&fs::read(original.join(&name)).expect("pagemap"), 4096)
        .expect("fixture pagemap parses");
    let pages = fs::read(original.join(format!("pages-{}.img", pagemap.pages_id))).expect("pages");

    let mut writer = ImageWriter::new(magic::PAGEMAP);
    let mut head = Vec::new();
    varint_field(&mut head, 1, u64::from(pagemap.pages_id));
    writer.message(&head).expect("small message");
    let mut child_pages = Vec::new();
    for (i, entry) in pagemap.entries.iter().enumerate() {
        let keep = i % 2 == 1 && entry.is_present();
        let flags = if keep {
            entry.flags
        } else if entry.is_present() {
            PE_PARENT
        } else {
            entry.flags
        };
        let mut message = Vec::new();
        varint_field(&mut message, 1, entry.vaddr);
        varint_field(&mut message, 2, entry.nr_pages);
        varint_field(&mut message, 4, u64::from(flags));
        writer.message(&message).expect("small message");
        if keep {
            let start = entry.pages_offset as usize;
            child_pages.extend_from_slice(&pages[start..start + entry.nr_pages as usize * 4096]);
        }
    }
    fs::write(child.join(&name), writer.finish()).expect("write child pagemap");
    fs::write(
        child.join(format!("pages-{}.img", pagemap.pages_id)),
        child_pages,
    )
    .expect("write pages");
    pagemap
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create copy");
    for entry in fs::read_dir(from).expect("list fixture") {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_file() {
            fs::copy(entry.path(), to.join(entry.file_name())).expect("copy image");
        }
    }
}

fn first_fixture() -> std::path::PathBuf {
    common::checkpoints()
        .into_iter()
        .next()
        .expect("at least one fixture checkpoint")
}

fn root_pid(dir: &Path) -> u32 {
    let tree = Checkpoint::open(dir)
        .expect("fixture opens")
        .pstree()
        .expect("pstree");
    tree.iter().find(|t| t.ppid == 0).expect("a root").pid
}

#[test]
fn parent_ranges_read_from_the_parent_dump() {
    let fixture = first_fixture();
    let pid = root_pid(&fixture);
    let temp = tempfile::tempdir().expect("temp dir");
    let (parent, child) = (temp.path().join("parent-dump"), temp.path().join("child"));
    copy_dir(&fixture, &parent);
    copy_dir(&fixture, &child);
    let pagemap = split_child(&fixture, &child, pid);
    symlink("../parent-dump", child.join("parent")).expect("parent link");

    let original = MemoryImage::open(&fixture, &format!("pagemap-{pid}.img"), 4096)
        .expect("original opens")
        .expect("original has a pagemap");
    let chained = Checkpoint::open(&child)
        .expect("child opens")
        .memory(pid)
        .expect("chain opens")
        .expect("child has a pagemap");
    assert_eq!(chained.depth(), 2);
    assert!(
        chained.pagemap().parent_pages() > 0,
        "the split moved pages to the parent"
    );

    for entry in pagemap.entries.iter().filter(|e| e.is_present()) {
        let len = entry.nr_pages * 4096;
        let want = original
            .read_to_vec(entry.vaddr, len)
            .expect("original reads");
        let got = chained.read_to_vec(entry.vaddr, len).expect("chain reads");
        assert!(
            want == got,
            "bytes at {:#x} differ through the chain",
            entry.vaddr
        );
    }
}

#[test]
fn loops_and_missing_parents_are_errors() {
    let fixture = first_fixture();
    let pid = root_pid(&fixture);
    let name = format!("pagemap-{pid}.img");
    let temp = tempfile::tempdir().expect("temp dir");

    let looped = temp.path().join("looped");
    copy_dir(&fixture, &looped);
    symlink(".", looped.join("parent")).expect("loop link");
    assert!(matches!(
        MemoryImage::open(&looped, &name, 4096),
        Err(MemoryError::ParentLoop { .. })
    ));

    let dangling = temp.path().join("dangling");
    copy_dir(&fixture, &dangling);
    symlink("../gone", dangling.join("parent")).expect("dangling link");
    assert!(matches!(
        MemoryImage::open(&dangling, &name, 4096),
        Err(MemoryError::MissingParent { .. })
    ));

    let orphan = temp.path().join("orphan");
    copy_dir(&fixture, &orphan);
    let pagemap = split_child(&fixture, &orphan, pid);
    let memory = MemoryImage::open(&orphan, &name, 4096)
        .expect("opens")
        .expect("has a pagemap");
    let in_parent = pagemap
        .entries
        .iter()
        .find(|e| e.is_present())
        .expect("a present entry");
    assert!(matches!(
        memory.read(in_parent.vaddr, 4096),
        Err(MemoryError::NoParent { .. })
    ));
}
