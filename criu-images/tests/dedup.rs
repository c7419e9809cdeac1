//! Dedup of parent chains built from real dumps: the plan punches exactly the parent's copy
//! of what the child holds again, applying it zeroes those ranges and nothing else, the chain
//! still reads (and validates) as the original dump, and a parent another child uses is left
//! alone unless forced. Page statistics agree with a plain count.

mod chain;
mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use chain::{
    Kept, PAGE, Ranges, build_pair, copy_dir, link_parent, pagemap_names, read_pagemap, snapshot,
};
use criu_images::dedup::{self, DedupError, DedupOptions, SharedParent};
use criu_images::memory::{MemoryError, MemoryImage};
use criu_images::pb::core_entry::March;
use criu_images::validate::{Host, ValidateOptions, validate};

fn x86_host() -> ValidateOptions {
    ValidateOptions {
        host: Some(Host {
            arch: March::X8664,
            page_size: 4096,
        }),
        ..ValidateOptions::default()
    }
}

/// The ranges a plan lists for each pages file, by file name.
fn planned(plan: &dedup::DedupPlan) -> Kept {
    plan.files
        .iter()
        .map(|f| {
            let name = f
                .path
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned();
            (name, f.ranges.iter().map(|r| (r.offset, r.len)).collect())
        })
        .collect()
}

/// Every present range of `original`'s pagemaps reads the same through `child`'s chain.
fn assert_same_memory(original: &Path, child: &Path) {
    for name in pagemap_names(original) {
        let want = MemoryImage::open(original, &name, PAGE)
            .expect("original opens")
            .expect("original has the pagemap");
        let got = MemoryImage::open(child, &name, PAGE)
            .expect("chain opens")
            .expect("child has the pagemap");
        for entry in want.pagemap().entries.iter().filter(|e| e.is_present()) {
            let len = entry.nr_pages * PAGE;
            let expected = want.read_to_vec(entry.vaddr, len).expect("original reads");
            let actual = got.read_to_vec(entry.vaddr, len).expect("chain reads");
            assert!(
                expected == actual,
                "{name}: {len} bytes at {:#x} differ through the chain",
                entry.vaddr
            );
        }
    }
}

#[test]
fn the_plan_punches_exactly_the_parent_copy_of_what_the_child_holds() {
    // memfd-shm has a process pagemap and shared memory pagemaps; both kinds are deduped.
    let full = common::fixtures().join("memfd-shm");
    let temp = tempfile::tempdir().expect("temp dir");
    let (parent, child, kept) = build_pair(&full, temp.path());
    assert!(
        kept.len() >= 2,
        "the split kept pages of several pagemaps: {kept:?}"
    );

    let plan = dedup::plan(&child, None).expect("plan");
    assert_eq!(plan.page_size, PAGE, "x86_64 dumps default to 4 KiB pages");
    assert_eq!(planned(&plan), kept);
    assert!(
        plan.files
            .iter()
            .any(|f| f.pagemap.starts_with("pagemap-shmem-")),
        "{:#?}",
        plan.files
    );
    let parent = fs::canonicalize(&parent).expect("parent path");
    for file in &plan.files {
        assert_eq!(file.level, 1);
        assert_eq!(file.path.parent(), Some(parent.as_path()));
        let len = fs::metadata(&file.path).expect("pages file").len();
        assert_eq!(file.size, len);
        let covered: u64 = file.ranges.iter().map(|r| r.len).sum();
        assert_eq!(file.superseded_bytes, covered);
        // The copies were written byte by byte, so every range still holds data.
        assert_eq!(file.freed_bytes, covered);
        assert!(
            file.ranges
                .iter()
                .all(|r| r.offset % PAGE == 0 && r.len % PAGE == 0)
        );
    }
    let kept_bytes: u64 = kept.values().flatten().map(|&(_, len)| len).sum();
    assert_eq!(plan.freed_bytes(), kept_bytes);
    assert!(plan.shared.is_empty());
}

#[test]
fn apply_zeroes_those_ranges_and_keeps_every_other_byte() {
    let full = common::fixtures().join("memfd-shm");
    let temp = tempfile::tempdir().expect("temp dir");
    let (parent, child, kept) = build_pair(&full, temp.path());
    let before = snapshot(&[&parent, &child]);
    let blocks_before: BTreeMap<String, u64> = kept
        .keys()
        .map(|name| {
            (
                name.clone(),
                fs::metadata(parent.join(name)).expect("pages").blocks(),
            )
        })
        .collect();

    let plan = dedup::plan(&child, Some(PAGE)).expect("plan");
    let freed = dedup::apply(&plan).expect("apply");
    assert_eq!(freed, plan.freed_bytes());
    assert!(freed > 0);

    let after = snapshot(&[&parent, &child]);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (path, old) in &before {
        let new = &after[path];
        let name = path
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        let punched = kept.get(&name).filter(|_| path.starts_with(&parent));
        let Some(ranges) = punched else {
            assert!(old == new, "{} changed", path.display());
            continue;
        };
        assert_eq!(old.len(), new.len(), "{name} kept its size");
        let mut inside = vec![false; old.len()];
        for &(offset, len) in ranges {
            inside[offset as usize..(offset + len) as usize].fill(true);
        }
        for (at, (&was, &is)) in old.iter().zip(new).enumerate() {
            if inside[at] {
                assert_eq!(is, 0, "{name}: byte {at} was punched and reads as zero");
            } else {
                assert_eq!(was, is, "{name}: byte {at} outside the ranges is unchanged");
            }
        }
        let blocks = fs::metadata(path).expect("pages").blocks();
        assert!(
            blocks < blocks_before[&name],
            "{name}: blocks were released"
        );
    }

    assert_same_memory(&full, &child);
    let report = validate(&child, &x86_host());
    assert!(report.findings.is_empty(), "{:#?}", report.findings);

    // Planning again finds the same ranges, already holes: nothing is counted twice.
    let again = dedup::plan(&child, Some(PAGE)).expect("plan again");
    assert_eq!(planned(&again), kept);
    assert_eq!(again.freed_bytes(), 0);
    assert_eq!(again.superseded_bytes(), plan.superseded_bytes());
    assert_eq!(dedup::apply(&again).expect("apply again"), 0);
}

#[test]
fn a_parent_another_child_uses_is_refused_unless_forced() {
    let full = common::fixtures().join("file-locks");
    let temp = tempfile::tempdir().expect("temp dir");
    let (parent, child, _) = build_pair(&full, temp.path());

    // A dump made on top of the child is no reason to refuse: the child is never punched.
    let grandchild = temp.path().join("grandchild");
    fs::create_dir(&grandchild).expect("grandchild dir");
    link_parent(&grandchild, "child");
    dedup::plan(&child, Some(PAGE)).expect("a child of the child shares nothing punched");

    let other = temp.path().join("other-child");
    copy_dir(&child, &other);
    link_parent(&other, "parent");
    let before = snapshot(&[&parent, &child, &other]);
    let error = dedup::plan(&child, Some(PAGE)).expect_err("shared parent");
    let (parent, other) = (
        fs::canonicalize(&parent).expect("parent"),
        fs::canonicalize(&other).expect("other"),
    );
    match &error {
        DedupError::SharedParent {
            parent: p,
            child: c,
        } => {
            assert_eq!(p, &parent);
            assert_eq!(c, &other);
        }
        other => panic!("expected SharedParent, got {other:?}"),
    }
    assert!(
        error.to_string().contains("is also the parent of"),
        "{error}"
    );

    let forced = DedupOptions {
        page_size: Some(PAGE),
        force: true,
    };
    let plan = dedup::plan_with_options(&child, &forced).expect("forced plan");
    assert_eq!(
        plan.shared,
        [SharedParent {
            parent,
            child: other
        }]
    );
    assert!(!plan.is_empty());
    assert_eq!(
        before,
        snapshot(&[
            &temp.path().join("parent"),
            &child,
            &temp.path().join("other-child")
        ])
    );
}

#[test]
fn three_levels_punch_the_middle_and_the_bottom() {
    let full = common::fixtures().join("file-locks");
    let temp = tempfile::tempdir().expect("temp dir");
    // bottom <- middle (a full copy, every page present again) <- child (split).
    let (bottom, middle) = (temp.path().join("bottom"), temp.path().join("middle"));
    copy_dir(&full, &bottom);
    copy_dir(&full, &middle);
    link_parent(&middle, "bottom");
    let child = temp.path().join("child");
    copy_dir(&full, &child);
    let kept = chain::split_child(&child);
    link_parent(&child, "middle");

    let plan = dedup::plan(&child, Some(PAGE)).expect("plan");
    let by_level: Vec<(usize, String, Ranges)> = plan
        .files
        .iter()
        .map(|f| {
            let dir = f.path.parent().and_then(Path::file_name).expect("a dir");
            let ranges = f.ranges.iter().map(|r| (r.offset, r.len)).collect();
            (f.level, dir.to_string_lossy().into_owned(), ranges)
        })
        .collect();
    let pages_name = kept.keys().next().expect("one pages file").clone();
    let whole = fs::metadata(bottom.join(&pages_name)).expect("pages").len();
    assert_eq!(
        by_level,
        [
            (1, "middle".to_owned(), kept[&pages_name].clone()),
            (2, "bottom".to_owned(), vec![(0, whole)]),
        ]
    );

    dedup::apply(&plan).expect("apply");
    let bottom_pages = fs::read(bottom.join(&pages_name)).expect("bottom pages");
    assert_eq!(bottom_pages.len() as u64, whole);
    assert!(
        bottom_pages.iter().all(|&b| b == 0),
        "the bottom is superseded entirely"
    );
    assert_same_memory(&full, &child);
    assert!(validate(&child, &x86_host()).findings.is_empty());
}

#[test]
fn nothing_to_punch_and_errors() {
    let temp = tempfile::tempdir().expect("temp dir");
    let lone = temp.path().join("lone");
    copy_dir(&common::fixtures().join("pipes"), &lone);
    let plan = dedup::plan(&lone, None).expect("plan without parent");
    assert!(plan.is_empty());
    assert_eq!(dedup::apply(&plan).expect("apply nothing"), 0);

    assert!(matches!(
        dedup::plan(temp.path(), None),
        Err(DedupError::Checkpoint { .. })
    ));
    assert!(matches!(
        dedup::plan(&lone, Some(1000)),
        Err(DedupError::BadPageSize { page_size: 1000 })
    ));
    assert!(matches!(
        dedup::page_stats(&lone, Some(2048)),
        Err(DedupError::BadPageSize { page_size: 2048 })
    ));

    let looped = temp.path().join("looped");
    copy_dir(&common::fixtures().join("pipes"), &looped);
    std::os::unix::fs::symlink(".", looped.join("parent")).expect("loop link");
    assert!(matches!(
        dedup::plan(&looped, None),
        Err(DedupError::Memory {
            source: MemoryError::ParentLoop { .. },
            ..
        })
    ));
}

#[test]
fn a_pages_file_that_changed_since_the_plan_is_left_alone() {
    let full = common::fixtures().join("file-locks");
    let temp = tempfile::tempdir().expect("temp dir");
    let (_, child, _) = build_pair(&full, temp.path());
    let plan = dedup::plan(&child, Some(PAGE)).expect("plan");
    let path = &plan.files[0].path;
    let mut bytes = fs::read(path).expect("pages");
    bytes.extend_from_slice(&[1; PAGE as usize]);
    fs::write(path, &bytes).expect("grow pages");
    assert!(matches!(
        dedup::apply(&plan),
        Err(DedupError::Changed { planned, found, .. }) if found == planned + PAGE
    ));
    assert_eq!(fs::read(path).expect("pages"), bytes, "nothing was punched");
}

/// Zero, repeated and distinct pages of the newest level, counted the plain way: every page
/// compared by its whole contents.
fn plain_count(dir: &Path) -> (u64, u64, u64) {
    let (mut pages, mut zero) = (0, 0);
    let mut distinct: HashSet<Vec<u8>> = HashSet::new();
    for name in pagemap_names(dir) {
        let pagemap = read_pagemap(dir, &name);
        let data =
            fs::read(dir.join(format!("pages-{}.img", pagemap.pages_id))).unwrap_or_default();
        for entry in pagemap.entries.iter().filter(|e| e.is_present()) {
            let start = entry.pages_offset as usize;
            let run = &data[start..start + (entry.nr_pages * PAGE) as usize];
            for page in run.chunks(PAGE as usize) {
                pages += 1;
                if page.iter().all(|&b| b == 0) {
                    zero += 1;
                } else {
                    distinct.insert(page.to_vec());
                }
            }
        }
    }
    (pages, zero, distinct.len() as u64)
}

#[test]
fn page_stats_agree_with_a_plain_count() {
    let mut dirs = common::checkpoints();
    dirs.push(common::fixtures().join("parent-chain/child"));
    let mut repeated = 0;
    for dir in dirs {
        let stats = dedup::page_stats(&dir, None).expect("stats");
        let (pages, zero, distinct) = plain_count(&dir);
        let name = dir.display();
        assert_eq!(stats.page_size, PAGE, "{name}");
        assert_eq!(stats.pages, pages, "{name}");
        assert_eq!(stats.zero_pages, zero, "{name}");
        assert_eq!(stats.unique_pages, distinct, "{name}");
        assert_eq!(stats.duplicate_pages, pages - zero - distinct, "{name}");
        assert_eq!(stats.unique_bytes, distinct * PAGE, "{name}");
        repeated += stats.duplicate_pages + stats.zero_pages;
    }
    assert!(
        repeated > 0,
        "some fixture has zero or repeated pages to count"
    );
}
