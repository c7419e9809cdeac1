//! Every validation check against a checkpoint that fails it: real fixtures, copied and then
//! damaged the way copies and mixed-up dumps get damaged. The clean fixtures pass.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use criu_images::image::{Image, ImageWriter, rewrite};
use criu_images::pb::core_entry::March;
use criu_images::validate::{Host, Report, Severity, ValidateOptions, validate};
use criu_images::wire::{self, Value};

fn x86_host() -> ValidateOptions {
    ValidateOptions {
        host: Some(Host {
            arch: March::X8664,
            page_size: 4096,
        }),
        ..ValidateOptions::default()
    }
}

fn codes(report: &Report) -> Vec<&'static str> {
    report.findings.iter().map(|f| f.code).collect()
}

/// A copy of `fixtures/<name>` in a fresh temporary directory, as `<tmp>/<name>`.
fn copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join(name);
    copy_dir(&common::fixtures().join(name), &dir);
    (tmp, dir)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("copy dir");
    for entry in fs::read_dir(from).expect("fixture") {
        let entry = entry.expect("entry");
        let path = entry.path();
        if path.is_dir() {
            continue;
        }
        fs::copy(&path, to.join(entry.file_name())).expect("copy image");
    }
}

/// The one file in `dir` whose name starts with `prefix`.
fn image_named(dir: &Path, prefix: &str) -> PathBuf {
    fs::read_dir(dir)
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("no {prefix}* in {}", dir.display()))
}

/// Re-encodes a message field by field, letting `edit` replace or drop each field.
fn edit_message(
    message: &[u8],
    mut edit: impl FnMut(u32, Value<'_>) -> Option<Value<'_>>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for field in wire::fields(message) {
        let field = field.expect("a valid message");
        let Some(value) = edit(field.number, field.value) else {
            continue;
        };
        wire::write_tag(&mut out, field.number, value.wire_type());
        match value {
            Value::Varint(v) => wire::write_varint(&mut out, v),
            Value::Fixed64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Fixed32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bytes(bytes) => {
                wire::write_varint(&mut out, bytes.len() as u64);
                out.extend_from_slice(bytes);
            }
        }
    }
    out
}

/// Rewrites the entries of the image at `path` for which `edit` gives new bytes.
fn edit_image(path: &Path, mut edit: impl FnMut(usize, &[u8]) -> Option<Vec<u8>>) {
    let bytes = fs::read(path).expect("image");
    let image = Image::parse(&bytes).expect("image parses");
    let out = rewrite::<criu_images::image::ImageError>(&image, |entry| {
        Ok(edit(entry.index, entry.message))
    })
    .expect("rewrite");
    fs::write(path, out).expect("write image");
}

#[test]
fn the_clean_fixtures_have_no_findings() {
    for dir in common::checkpoints() {
        let report = validate(&dir, &x86_host());
        assert!(
            report.findings.is_empty(),
            "{}: {:#?}",
            dir.display(),
            report.findings
        );
        assert!(report.images > 5, "{}", dir.display());
        assert!(report.processes >= 1, "{}", dir.display());
    }
    let report = validate(&common::fixtures().join("parent-chain/child"), &x86_host());
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

#[test]
fn a_missing_directory_or_inventory() {
    let report = validate(Path::new("/nonexistent/images"), &x86_host());
    assert_eq!(codes(&report), ["images-dir"]);
    let empty = tempfile::tempdir().expect("temp dir");
    let report = validate(empty.path(), &x86_host());
    assert_eq!(codes(&report), ["inventory-missing"]);
    assert!(report.has_errors());
}

#[test]
fn an_old_inventory_version() {
    let (_tmp, dir) = copy("file-locks");
    edit_image(&dir.join("inventory.img"), |_, message| {
        Some(edit_message(message, |number, value| match number {
            1 => Some(Value::Varint(1)),
            _ => Some(value),
        }))
    });
    let report = validate(&dir, &x86_host());
    assert_eq!(codes(&report), ["inventory-version"]);
    assert!(report.findings[0].message.contains("image version 1"));
}

#[test]
fn corrupt_images_are_named() {
    let report = validate(
        &common::fixtures().join("corrupt/empty-inventory"),
        &x86_host(),
    );
    assert_eq!(codes(&report), ["image-corrupt"]);
    assert_eq!(report.findings[0].subject, "inventory.img");

    let (_tmp, dir) = copy("pipes");
    let files = dir.join("files.img");
    let bytes = fs::read(&files).expect("files.img");
    fs::write(&files, &bytes[..bytes.len() - 3]).expect("truncate");
    let report = validate(&dir, &x86_host());
    let corrupt: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.code == "image-corrupt")
        .collect();
    assert_eq!(corrupt.len(), 1, "{:#?}", report.findings);
    assert_eq!(corrupt[0].subject, "files.img");
}

#[test]
fn a_missing_process_tree_or_task_image() {
    let (_tmp, dir) = copy("pipes");
    fs::remove_file(dir.join("pstree.img")).expect("remove pstree");
    assert_eq!(codes(&validate(&dir, &x86_host())), ["pstree-missing"]);

    let report = validate(
        &common::fixtures().join("corrupt/missing-core"),
        &x86_host(),
    );
    assert_eq!(codes(&report), ["task-image-missing"]);
    assert_eq!(report.findings[0].subject, "core-13487.img");

    let (_tmp, dir) = copy("pipes");
    fs::remove_file(dir.join("mm-13487.img")).expect("remove mm");
    let report = validate(&dir, &x86_host());
    assert!(
        codes(&report).contains(&"task-image-missing"),
        "{:#?}",
        report.findings
    );
}

/// Rebuilds `files.img` in `dir` without the file whose id is `id`.
fn drop_file(dir: &Path, id: u32) {
    use prost::Message as _;

    let files = dir.join("files.img");
    let bytes = fs::read(&files).expect("files.img");
    let image = Image::parse(&bytes).expect("files.img parses");
    let mut writer = ImageWriter::new(image.magic());
    for entry in image.entries().expect("entries") {
        let entry = entry.expect("entry");
        let file = criu_images::pb::FileEntry::decode(entry.message).expect("a file entry");
        if file.id != id {
            writer.message(entry.message).expect("frame");
        }
    }
    fs::write(&files, writer.finish()).expect("write files.img");
}

#[test]
fn a_descriptor_or_directory_without_its_file() {
    let (_tmp, dir) = copy("pipes");
    let checkpoint = criu_images::checkpoint::Checkpoint::open(&dir).expect("checkpoint");
    let fd = checkpoint.fdinfo(2).expect("fdinfo-2.img")[0].clone();
    drop_file(&dir, fd.id);
    let report = validate(&dir, &x86_host());
    let subjects: Vec<&str> = report.findings.iter().map(|f| f.subject.as_str()).collect();
    assert!(
        subjects.contains(&"fdinfo-2.img entry 0"),
        "{:#?}",
        report.findings
    );
    assert!(report.findings.iter().all(|f| f.code == "file-missing"));

    let (_tmp, dir) = copy("pipes");
    let checkpoint = criu_images::checkpoint::Checkpoint::open(&dir).expect("checkpoint");
    let cwd = checkpoint.fs(13485).expect("fs").cwd_id;
    drop_file(&dir, cwd);
    let report = validate(&dir, &x86_host());
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.code == "file-missing" && f.message.contains("working directory")),
        "{:#?}",
        report.findings
    );
}

#[test]
fn broken_pagemaps_and_pages() {
    let report = validate(
        &common::fixtures().join("corrupt/pagemap-unsorted"),
        &x86_host(),
    );
    assert_eq!(codes(&report), ["pagemap-invalid"]);
    let report = validate(&common::fixtures().join("corrupt/pages-short"), &x86_host());
    assert_eq!(codes(&report), ["pages-size"]);

    // A pages file with a page too many belongs to another dump.
    let (_tmp, dir) = copy("file-locks");
    let pages = dir.join("pages-1.img");
    let mut bytes = fs::read(&pages).expect("pages");
    bytes.extend_from_slice(&[0u8; 4096]);
    fs::write(&pages, bytes).expect("grow pages");
    let report = validate(&dir, &x86_host());
    assert_eq!(codes(&report), ["pages-size"]);
    assert!(report.findings[0].subject.ends_with("pages-1.img"));
}

#[test]
fn pages_outside_every_mapping() {
    let (_tmp, dir) = copy("file-locks");
    // An mm without its mappings: every dumped page then lies outside them.
    edit_image(&image_named(&dir, "mm-"), |_, message| {
        Some(edit_message(message, |number, value| {
            (number != 14).then_some(value)
        }))
    });
    let report = validate(&dir, &x86_host());
    assert!(!report.findings.is_empty());
    assert!(
        report
            .findings
            .iter()
            .all(|f| f.code == "pagemap-outside-vma"),
        "{:#?}",
        report.findings
    );
}

#[test]
fn parent_chains_that_do_not_hold() {
    let report = validate(
        &common::fixtures().join("corrupt/parent-missing"),
        &x86_host(),
    );
    assert_eq!(codes(&report), ["parent-missing"]);
    let report = validate(
        &common::fixtures().join("corrupt/parent-loop/a"),
        &x86_host(),
    );
    assert_eq!(codes(&report), ["parent-loop"]);

    // A parent from another dump: it has no pagemap of this process, so the pages the child
    // keeps in its parent are nowhere.
    let tmp = tempfile::tempdir().expect("temp dir");
    let child = tmp.path().join("child");
    copy_dir(&common::fixtures().join("parent-chain/child"), &child);
    copy_dir(
        &common::fixtures().join("file-locks"),
        &tmp.path().join("other"),
    );
    symlink("../other", child.join("parent")).expect("parent link");
    let report = validate(&child, &x86_host());
    assert!(!report.findings.is_empty());
    assert!(
        report.findings.iter().all(|f| f.code == "parent-uncovered"),
        "{:#?}",
        report.findings
    );
}

#[test]
fn lazy_only_pages_need_lazy_pages() {
    let (_tmp, dir) = copy("file-locks");
    // The pagemap's first entry after the head, marked as dumped for lazy migration only.
    edit_image(&image_named(&dir, "pagemap-"), |index, message| {
        (index == 1).then(|| {
            edit_message(message, |number, value| match number {
                4 => Some(Value::Varint(2)),
                _ => Some(value),
            })
        })
    });
    let report = validate(&dir, &x86_host());
    assert!(
        codes(&report).contains(&"lazy-pages-needed"),
        "{:#?}",
        report.findings
    );
    let lazy = ValidateOptions {
        lazy_pages: true,
        ..x86_host()
    };
    assert!(!codes(&validate(&dir, &lazy)).contains(&"lazy-pages-needed"));
}

#[test]
fn another_architecture_or_page_size() {
    let (_tmp, dir) = copy("file-locks");
    edit_image(&image_named(&dir, "core-"), |_, message| {
        Some(edit_message(message, |number, value| match number {
            1 => Some(Value::Varint(March::Aarch64 as u64)),
            _ => Some(value),
        }))
    });
    let report = validate(&dir, &x86_host());
    assert_eq!(codes(&report), ["arch-mismatch"]);
    assert!(
        report.findings[0].message.contains("AARCH64"),
        "{}",
        report.findings[0].message
    );

    let big_pages = ValidateOptions {
        host: Some(Host {
            arch: March::X8664,
            page_size: 65536,
        }),
        ..ValidateOptions::default()
    };
    let report = validate(&common::fixtures().join("file-locks"), &big_pages);
    assert_eq!(codes(&report), ["page-size-mismatch"]);
    assert_eq!(report.findings[0].severity, Severity::Error);
    assert!(
        validate(
            &common::fixtures().join("file-locks"),
            &ValidateOptions::default()
        )
        .findings
        .is_empty()
    );
}
