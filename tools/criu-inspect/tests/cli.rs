//! The command line's contract: exit codes, error messages and broken pipes.

mod common;

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn fixture() -> PathBuf {
    common::checkpoints().remove(0)
}

fn run(args: &[&str]) -> (i32, String, String) {
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

#[test]
fn invalid_input_exits_1_with_the_reason() {
    let temp = tempfile::tempdir().expect("temp dir");
    let bad = temp.path().join("bad.img");
    fs::write(
        &bad,
        [
            0x19, 0x43, 0x56, 0x54, 0x30, 0x30, 0x27, 0x50, 0xff, 0xff, 0, 0,
        ],
    )
    .expect("write");
    let (code, _, err) = run(&["decode", "-i", bad.to_str().expect("utf-8")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("entry 0 at offset 8: size 65535 runs past the end"),
        "{err}"
    );

    let pages = fs::read_dir(fixture())
        .expect("fixture")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pages-"))
        })
        .expect("a pages file");
    let (code, _, err) = run(&["decode", "-i", pages.to_str().expect("utf-8")]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown magic"), "{err}");

    let json = temp.path().join("x.json");
    fs::write(&json, r#"{"magic": "NOPE", "entries": []}"#).expect("write");
    let (code, _, err) = run(&["encode", "-i", json.to_str().expect("utf-8")]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown magic \"NOPE\""), "{err}");
}

#[test]
fn system_and_usage_errors_exit_2() {
    let (code, _, err) = run(&["decode", "-i", "/nonexistent/core-1.img"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read /nonexistent/core-1.img"), "{err}");
    let (code, _, _) = run(&["x", "/nonexistent", "ps"]);
    assert_eq!(code, 2);
    let (code, _, _) = run(&["x", "/tmp", "everything"]);
    assert_eq!(code, 2);
    let (code, _, _) = run(&["memparse", "/tmp", "--search", "a", "--regex", "b"]);
    assert_eq!(code, 2);
}

#[test]
fn a_directory_without_inventory_is_invalid_input() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (code, _, err) = run(&["inspect", temp.path().to_str().expect("utf-8")]);
    assert_eq!(code, 1);
    assert!(err.contains("has no inventory.img"), "{err}");
}

#[test]
fn a_closed_stdout_exits_0() {
    let dir = fixture();
    let mut child = Command::new(env!("CARGO_BIN_EXE_criu-inspect"))
        .args([
            "memparse",
            dir.to_str().expect("utf-8"),
            "--hexdump",
            "--pid",
        ])
        .arg(root_pid(&dir).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).expect("some output");
    drop(stdout);
    let status = child.wait().expect("exits");
    assert_eq!(status.code(), Some(0));
}

fn root_pid(dir: &Path) -> u32 {
    let (code, out, err) = run(&["x", dir.to_str().expect("utf-8"), "ps"]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("a root pid")
}

#[test]
fn inspect_reports_the_tree_and_json_is_stable() {
    let dir = fixture();
    let (code, out, err) = run(&["inspect", dir.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("Checkpoint "), "{out}");
    assert!(out.contains("\nProcesses\n"), "{out}");

    let (code, out, err) = run(&["inspect", "--json", dir.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    let value: serde_json::Value = serde_json::from_str(&out).expect("inspect --json is JSON");
    assert_eq!(value["schema_version"], 1);
    let processes = value["processes"].as_array().expect("processes list");
    assert!(!processes.is_empty());
    for key in [
        "pid",
        "ppid",
        "comm",
        "state",
        "cmdline",
        "memory",
        "files",
        "namespaces",
    ] {
        assert!(processes[0].get(key).is_some(), "process lacks {key}");
    }
    assert!(
        processes[0]["memory"]["present_bytes"]
            .as_u64()
            .is_some_and(|n| n > 0)
    );
}

#[test]
fn validate_exits_0_1_or_2_and_its_json_is_stable() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let clean = fixtures.join("runc-busybox");
    let (code, out, err) = run(&["validate", clean.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no problems found"), "{out}");

    let broken = fixtures.join("corrupt/pages-short");
    let (code, out, err) = run(&["validate", broken.to_str().expect("utf-8")]);
    assert_eq!(code, 1);
    assert!(out.contains("error   pages-size"), "{out}");
    assert!(out.contains("fix: "), "{out}");
    assert!(err.contains("1 problem found in"), "{err}");

    let (code, out, _) = run(&["validate", "--json", broken.to_str().expect("utf-8")]);
    assert_eq!(code, 1);
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["valid"], false);
    assert_eq!(report["processes"], 1);
    let finding = &report["findings"][0];
    assert_eq!(finding["code"], "pages-size");
    assert_eq!(finding["severity"], "error");
    for key in ["subject", "message", "hint"] {
        assert!(
            finding[key].as_str().is_some_and(|s| !s.is_empty()),
            "{key}"
        );
    }

    let (code, _, err) = run(&["validate", "/nonexistent/images"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot check /nonexistent/images"), "{err}");
}

#[test]
fn a_manifest_is_written_then_verified_and_catches_a_changed_file() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().join("checkpoint");
    fs::create_dir(&dir).expect("dir");
    for entry in fs::read_dir(fixtures.join("runc-busybox")).expect("fixture") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
    let manifest = temp.path().join("manifest.txt");
    let args = |json: bool| {
        let mut args = vec!["validate", dir.to_str().expect("utf-8")];
        args.extend(["--manifest", manifest.to_str().expect("utf-8")]);
        if json {
            args.push("--json");
        }
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run_owned = |args: Vec<String>| run(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let (code, out, err) = run_owned(args(false));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("manifest written to"), "{out}");
    let text = fs::read_to_string(&manifest).expect("manifest");
    assert!(text.starts_with("# criu-inspect manifest 1\n"));
    assert!(
        text.lines().any(|l| l.ends_with(" 69632 pages-1.img")),
        "{text}"
    );

    let (code, out, err) = run_owned(args(true));
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["valid"], true);
    let sums = report["checksums"].as_array().expect("checksums");
    assert!(
        sums.iter()
            .any(|s| s["name"] == "pages-1.img" && s["bytes"] == 69632)
    );

    // One flipped byte in the pages: the sizes still add up, only the checksum tells.
    let pages = dir.join("pages-1.img");
    let mut bytes = fs::read(&pages).expect("pages");
    bytes[100] ^= 0xff;
    fs::write(&pages, bytes).expect("write pages");
    let (code, out, _) = run_owned(args(true));
    assert_eq!(code, 1);
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let codes: Vec<&str> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter_map(|f| f["code"].as_str())
        .collect();
    assert_eq!(codes, ["manifest-mismatch"]);
}

#[test]
fn a_page_size_that_is_none_is_a_usage_error() {
    let dir = fixture();
    for command in ["validate", "memparse"] {
        for size in ["0", "1000", "12288", "four"] {
            let (code, _, err) = run(&[command, "--page-size", size, dir.to_str().expect("utf-8")]);
            assert_eq!(code, 2, "{command} --page-size {size}: {err}");
            assert!(err.contains("--page-size"), "{err}");
        }
    }
}
