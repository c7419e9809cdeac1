//! `criu-inspect dedup` on copies of the `parent-chain` fixture: a dry run changes nothing, a
//! real run punches the parent's copy of what the child holds and leaves a chain that still
//! validates, a parent another child uses is refused (exit 1) unless forced, and bad
//! arguments exit 2.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use criu_images::pagemap::Pagemap;

const PAGE: u64 = 4096;

fn run(args: &[&Path]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_criu-inspect"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn arg(text: &str) -> &Path {
    Path::new(text)
}

/// Byte copies of `fixtures/parent-chain/{parent,child}` in `root`, the child linked to the
/// parent as in the fixture.
fn copy_chain(root: &Path) -> (PathBuf, PathBuf) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parent-chain");
    for level in ["parent", "child"] {
        let to = root.join(level);
        fs::create_dir(&to).expect("create copy");
        for entry in fs::read_dir(fixture.join(level)).expect("fixture") {
            let entry = entry.expect("entry");
            if entry.file_type().expect("file type").is_file() {
                let bytes = fs::read(entry.path()).expect("read image");
                fs::write(to.join(entry.file_name()), bytes).expect("write image");
            }
        }
    }
    symlink("../parent", root.join("child/parent")).expect("parent link");
    (root.join("parent"), root.join("child"))
}

fn snapshot(dirs: &[&Path]) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for dir in dirs {
        for entry in fs::read_dir(dir).expect("list dir") {
            let entry = entry.expect("entry");
            if entry.file_type().expect("file type").is_file() {
                out.insert(entry.path(), fs::read(entry.path()).expect("read"));
            }
        }
    }
    out
}

fn pagemap(dir: &Path) -> Pagemap {
    let name = fs::read_dir(dir)
        .expect("list dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("pagemap-"))
        .expect("a pagemap");
    Pagemap::parse(&fs::read(dir.join(name)).expect("pagemap"), PAGE).expect("parses")
}

/// The parent's pages-file ranges for the addresses the child holds present, merged: what
/// dedup must punch.
fn expected_ranges(parent: &Path, child: &Path) -> Vec<(u64, u64)> {
    let (parent, child) = (pagemap(parent), pagemap(child));
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for entry in child.entries.iter().filter(|e| e.is_present()) {
        for page in 0..entry.nr_pages {
            let addr = entry.vaddr + page * PAGE;
            let held = parent
                .find(addr)
                .expect("the parent holds the child's pages");
            assert!(held.is_present());
            let offset = held.pages_offset + (addr - held.vaddr);
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == offset => last.1 += PAGE,
                _ => ranges.push((offset, PAGE)),
            }
        }
    }
    ranges
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).expect("the report is JSON")
}

fn ranges_of(file: &serde_json::Value) -> Vec<(u64, u64)> {
    file["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| {
            let field = |name: &str| r[name].as_u64().expect("a number");
            (field("offset"), field("len"))
        })
        .collect()
}

#[test]
fn a_dry_run_reports_what_would_be_freed_and_changes_nothing() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (parent, child) = copy_chain(temp.path());
    let expected = expected_ranges(&parent, &child);
    let expected_bytes: u64 = expected.iter().map(|r| r.1).sum();
    let before = snapshot(&[&parent, &child]);

    let (code, out, err) = run(&[arg("dedup"), &child, arg("--dry-run")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dry run: nothing punched"), "{out}");
    assert!(out.contains("WOULD FREE"), "{out}");
    assert!(out.contains("parent/pages-1.img"), "{out}");
    assert!(out.contains(&format!(
        "{:.1} KiB would be freed",
        expected_bytes as f64 / 1024.0
    )));

    let (code, out, err) = run(&[arg("dedup"), &child, arg("--dry-run"), arg("--json")]);
    assert_eq!(code, 0, "{err}");
    let report = json(&out);
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["page_size"], PAGE);
    assert_eq!(report["freed_bytes"], expected_bytes);
    assert_eq!(report["superseded_bytes"], expected_bytes);
    let files = report["files"].as_array().expect("files");
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["level"], 1);
    assert_eq!(files[0]["pagemap"], "pagemap-13688.img");
    assert_eq!(ranges_of(&files[0]), expected);
    let child_pages = pagemap(&child).present_pages();
    assert_eq!(report["page_stats"]["pages"], child_pages);
    assert_eq!(report["forced_shared"], serde_json::json!([]));

    assert!(
        before == snapshot(&[&parent, &child]),
        "a dry run wrote nothing"
    );
}

#[test]
fn dedup_punches_the_parent_and_the_child_still_validates() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (parent, child) = copy_chain(temp.path());
    let expected = expected_ranges(&parent, &child);
    let pages = parent.join("pages-1.img");
    let old = fs::read(&pages).expect("parent pages");
    let child_before = snapshot(&[&child]);

    let (code, out, err) = run(&[arg("dedup"), &child, arg("--json")]);
    assert_eq!(code, 0, "{err}");
    let report = json(&out);
    assert_eq!(report["dry_run"], false);
    let expected_bytes: u64 = expected.iter().map(|r| r.1).sum();
    assert_eq!(report["freed_bytes"], expected_bytes);

    let new = fs::read(&pages).expect("parent pages");
    assert_eq!(new.len(), old.len(), "the pages file keeps its size");
    let mut at = 0;
    for &(offset, len) in &expected {
        let (offset, end) = (offset as usize, (offset + len) as usize);
        assert!(
            old[at..offset] == new[at..offset],
            "bytes {at}..{offset} unchanged"
        );
        assert!(
            new[offset..end].iter().all(|&b| b == 0),
            "{offset}..{end} punched"
        );
        at = end;
    }
    assert!(old[at..] == new[at..], "the tail is unchanged");
    assert!(
        child_before == snapshot(&[&child]),
        "the child is never written"
    );

    let (code, out, err) = run(&[arg("validate"), &child]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no problems found"), "{out}");

    let (code, out, err) = run(&[arg("dedup"), &child]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("0 B freed"),
        "a second run frees nothing: {out}"
    );
}

#[test]
fn a_shared_parent_is_refused_with_exit_1_unless_forced() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (parent, child) = copy_chain(temp.path());
    let other = temp.path().join("other-child");
    fs::create_dir(&other).expect("other child");
    for (name, bytes) in snapshot(&[&child]) {
        fs::write(other.join(name.file_name().expect("file")), bytes).expect("copy");
    }
    symlink("../parent", other.join("parent")).expect("parent link");
    let before = snapshot(&[&parent, &child, &other]);

    let (code, out, err) = run(&[arg("dedup"), &child]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("is also the parent of"), "{err}");
    assert!(err.contains("other-child"), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        before == snapshot(&[&parent, &child, &other]),
        "nothing punched"
    );

    let (code, out, err) = run(&[arg("dedup"), &child, arg("--force"), arg("--json")]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: punching"), "{err}");
    let report = json(&out);
    let shared = report["forced_shared"].as_array().expect("forced_shared");
    assert_eq!(shared.len(), 1);
    assert!(
        shared[0]["child"]
            .as_str()
            .expect("a path")
            .ends_with("other-child")
    );
    assert!(report["freed_bytes"].as_u64().expect("a number") > 0);
}

#[test]
fn bad_arguments_and_directories() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (_, child) = copy_chain(temp.path());
    let (code, _, err) = run(&[arg("dedup"), &child, arg("--page-size"), arg("1000")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("page size 1000"), "{err}");
    let (code, _, _) = run(&[arg("dedup"), arg("/nonexistent/images")]);
    assert_eq!(code, 2);
    let (code, _, err) = run(&[arg("dedup"), temp.path()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no inventory.img"), "{err}");
    let (code, _, _) = run(&[arg("dedup")]);
    assert_eq!(code, 2);
}
