//! Parent chains built from a real dump for the dedup tests: the parent is the full dump, the
//! child the same dump with part of every present entry switched to `PE_PARENT` and its pages
//! removed from the child's pages file. What stays present in the child is held by the parent
//! too, which is what dedup punches.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use criu_images::image::ImageWriter;
use criu_images::pagemap::{PE_PARENT, Pagemap};
use criu_images::{magic, wire};

/// The page size of every dump the tests use.
pub const PAGE: u64 = 4096;

/// `(offset, len)` byte ranges of a pages file.
pub type Ranges = Vec<(u64, u64)>;

/// Per pages file name, the ranges of the parent's copy that the child holds again.
pub type Kept = BTreeMap<String, Ranges>;

/// Copies the regular files of `from` into `to` (created), byte by byte: a copy tool may turn
/// zero pages into holes, and the tests count holes.
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create copy");
    for entry in fs::read_dir(from).expect("list dump") {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_file() {
            let bytes = fs::read(entry.path()).expect("read image");
            fs::write(to.join(entry.file_name()), bytes).expect("write image");
        }
    }
}

/// Makes `child/parent` point to `parent`, relative to the child as CRIU resolves it.
pub fn link_parent(child: &Path, parent_name: &str) {
    symlink(format!("../{parent_name}"), child.join("parent")).expect("parent link");
}

/// Every file of the directories, by path, with its bytes.
pub fn snapshot(dirs: &[&Path]) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for dir in dirs {
        for entry in fs::read_dir(dir).expect("list dir") {
            let entry = entry.expect("dir entry");
            if entry.file_type().expect("file type").is_file() {
                out.insert(entry.path(), fs::read(entry.path()).expect("read file"));
            }
        }
    }
    out
}

/// The process and shared memory pagemaps of `dir`, sorted.
pub fn pagemap_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list dump")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.starts_with("pagemap-") && n.ends_with(".img"))
        .collect();
    names.sort();
    names
}

/// Parses `dir/name`.
pub fn read_pagemap(dir: &Path, name: &str) -> Pagemap {
    Pagemap::parse(&fs::read(dir.join(name)).expect("pagemap"), PAGE).expect("pagemap parses")
}

fn varint_field(out: &mut Vec<u8>, number: u32, value: u64) {
    wire::write_tag(out, number, wire::WireType::Varint);
    wire::write_varint(out, value);
}

fn entry_message(vaddr: u64, nr_pages: u64, flags: u32) -> Vec<u8> {
    let mut message = Vec::new();
    varint_field(&mut message, 1, vaddr);
    varint_field(&mut message, 2, nr_pages);
    varint_field(&mut message, 4, u64::from(flags));
    message
}

/// Sorts `(offset, len)` ranges and joins the touching ones, as a dedup plan lists them.
pub fn merged(mut ranges: Ranges) -> Ranges {
    ranges.sort_unstable();
    let mut out: Ranges = Vec::new();
    for (offset, len) in ranges {
        match out.last_mut() {
            Some(last) if offset <= last.0 + last.1 => {
                last.1 = (offset + len).max(last.0 + last.1) - last.0;
            }
            _ => out.push((offset, len)),
        }
    }
    out
}

/// Rewrites every pagemap of `child`, a copy of a full dump, with the library's writer: of
/// each present entry the first half of its pages stays present (a one-page entry stays
/// present at every other position), the rest becomes a `PE_PARENT` entry and its pages
/// leave the child's pages file.
///
/// Returns, per pages file name, the byte ranges of the full dump's pages file (the parent's,
/// once linked) that the child holds again, merged.
pub fn split_child(child: &Path) -> Kept {
    let mut kept_ranges = BTreeMap::new();
    for name in pagemap_names(child) {
        let pagemap = read_pagemap(child, &name);
        let pages_name = format!("pages-{}.img", pagemap.pages_id);
        let pages = fs::read(child.join(&pages_name)).unwrap_or_default();

        let mut writer = ImageWriter::new(magic::PAGEMAP);
        let mut head = Vec::new();
        varint_field(&mut head, 1, u64::from(pagemap.pages_id));
        writer.message(&head).expect("small message");
        let mut child_pages = Vec::new();
        let mut kept = Vec::new();
        for (index, entry) in pagemap.entries.iter().enumerate() {
            if !entry.is_present() {
                let message = entry_message(entry.vaddr, entry.nr_pages, entry.flags);
                writer.message(&message).expect("small message");
                continue;
            }
            let keep = match entry.nr_pages {
                1 => u64::from(index % 2 == 1),
                n => n / 2,
            };
            if keep > 0 {
                let message = entry_message(entry.vaddr, keep, entry.flags);
                writer.message(&message).expect("small message");
                let start = entry.pages_offset as usize;
                child_pages.extend_from_slice(&pages[start..start + (keep * PAGE) as usize]);
                kept.push((entry.pages_offset, keep * PAGE));
            }
            if keep < entry.nr_pages {
                let vaddr = entry.vaddr + keep * PAGE;
                let message = entry_message(vaddr, entry.nr_pages - keep, PE_PARENT);
                writer.message(&message).expect("small message");
            }
        }
        fs::write(child.join(&name), writer.finish()).expect("write child pagemap");
        fs::write(child.join(&pages_name), child_pages).expect("write child pages");
        if !kept.is_empty() {
            kept_ranges.insert(pages_name, merged(kept));
        }
    }
    kept_ranges
}

/// `parent` (a copy of `full`) and `child` (a split copy linked to it) under `root`.
pub fn build_pair(full: &Path, root: &Path) -> (PathBuf, PathBuf, Kept) {
    let (parent, child) = (root.join("parent"), root.join("child"));
    copy_dir(full, &parent);
    copy_dir(full, &child);
    let kept = split_child(&child);
    link_parent(&child, "parent");
    (parent, child, kept)
}
