//! The LSM rewrite on the committed runc checkpoint `fixtures/runc-busybox` (always a copy in
//! a temporary directory): the shadow images directory differs from the original only in the
//! labels asked for, as crit 4.1.1 decodes both, and the original stays byte for byte as it
//! was. The crit comparison is skipped, with the reason printed, only where crit is not
//! installed; CI installs it with `tools/install-deps`.
//!
//! The fixture was dumped without an LSM and none of its mounts carries `context=`, so the
//! copy gets two such mounts (one quoted, one not) and one `fscontext=` mount, edited in at
//! the wire level, before the rewrite runs on it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use criu_images::checkpoint::Checkpoint;
use criu_images::image::{self, Image, ImageError};
use criu_images::kind::RawKind;
use criu_images::wire::{self, Value, WireType};
use restore::lsm::{self, Change, LsmError, LsmProfile};
use serde_json::Value as Json;

const CRIT: &str = "/usr/local/bin/crit";
const LABEL: &str = "system_u:system_r:container_t:s0";
const CONTEXT: &str = "system_u:object_r:container_file_t:s0:c1,c2";

/// Mounts of the fixture given a context option, with the options they get and the options
/// the rewrite must turn them into (`None`: left alone).
const MOUNTS: &[(&str, &str, Option<&str>)] = &[
    (
        "/dev/shm",
        "context=\"system_u:object_r:container_file_t:s0:c82,c137\",size=65536k",
        Some("context=\"system_u:object_r:container_file_t:s0:c1,c2\",size=65536k"),
    ),
    (
        "/",
        "discard,context=system_u:object_r:container_file_t:s0,resv_strict,resuid=65534",
        Some(
            "discard,context=\"system_u:object_r:container_file_t:s0:c1,c2\",resv_strict,resuid=65534",
        ),
    ),
    ("/proc", "fscontext=system_u:object_r:proc_t:s0", None),
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name)
}

/// Copies a directory tree, recreating symlinks with their targets as they are.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir(to).expect("copy directory");
    for entry in fs::read_dir(from).expect("fixture directory") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        let file_type = entry.file_type().expect("file type");
        if file_type.is_symlink() {
            symlink(fs::read_link(entry.path()).expect("link"), &target).expect("symlink");
        } else if file_type.is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Every entry of a directory: its bytes (or link target), inode and modification time.
fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, u64, i64)> {
    fs::read_dir(dir)
        .expect("directory")
        .map(|entry| {
            let entry = entry.expect("entry");
            let meta = fs::symlink_metadata(entry.path()).expect("metadata");
            let contents = if meta.file_type().is_symlink() {
                fs::read_link(entry.path())
                    .expect("link")
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                fs::read(entry.path()).expect("contents")
            };
            let name = entry.file_name().into_string().expect("utf-8 name");
            (name, (contents, meta.ino(), meta.mtime()))
        })
        .collect()
}

/// Re-encodes one message with its `options` (field 9) replaced.
fn with_options(message: &[u8], options: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for field in wire::fields(message) {
        let field = field.expect("valid mnt_entry");
        match (field.number, field.value) {
            (9, _) => {
                wire::write_tag(&mut out, 9, WireType::LengthDelimited);
                wire::write_varint(&mut out, options.len() as u64);
                out.extend_from_slice(options.as_bytes());
            }
            (number, Value::Varint(v)) => {
                wire::write_tag(&mut out, number, WireType::Varint);
                wire::write_varint(&mut out, v);
            }
            (number, Value::Bytes(b)) => {
                wire::write_tag(&mut out, number, WireType::LengthDelimited);
                wire::write_varint(&mut out, b.len() as u64);
                out.extend_from_slice(b);
            }
            (number, Value::Fixed32(v)) => {
                wire::write_tag(&mut out, number, WireType::Fixed32);
                out.extend_from_slice(&v.to_le_bytes());
            }
            (number, Value::Fixed64(v)) => {
                wire::write_tag(&mut out, number, WireType::Fixed64);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

fn mountpoint(message: &[u8]) -> String {
    let found = wire::fields(message)
        .map(|f| f.expect("valid mnt_entry"))
        .find_map(|f| match (f.number, f.value) {
            (7, Value::Bytes(b)) => Some(String::from_utf8(b.to_vec()).expect("utf-8")),
            _ => None,
        });
    found.expect("a mountpoint")
}

/// Gives the copy's mountpoints image the options of [`MOUNTS`]; returns, by entry index,
/// the options before and the options the rewrite must produce.
fn add_contexts(images: &Path) -> BTreeMap<usize, (String, Option<String>)> {
    let path = images.join("mountpoints-13.img");
    let data = fs::read(&path).expect("mountpoints image");
    let image = Image::parse(&data).expect("valid image");
    let mut edited = BTreeMap::new();
    let rewritten = image::rewrite::<ImageError>(&image, |entry| {
        let at = mountpoint(entry.message);
        Ok(MOUNTS
            .iter()
            .find(|(m, _, _)| *m == at)
            .map(|(_, options, expected)| {
                edited.insert(
                    entry.index,
                    (options.to_string(), expected.map(str::to_owned)),
                );
                with_options(entry.message, options)
            }))
    })
    .expect("rewrites");
    assert_eq!(
        edited.len(),
        MOUNTS.len(),
        "every mount of MOUNTS is in the fixture"
    );
    fs::write(&path, rewritten).expect("write the copy's image");
    edited
}

/// The images directory crit can decode: every `.img` and `stats-*` that is not raw.
fn protobuf_images(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("directory")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|n| n.ends_with(".img") || n.starts_with("stats-"))
        .filter(|n| RawKind::from_file_name(n).is_none())
        .collect();
    names.sort();
    names
}

fn crit(path: &Path) -> Json {
    let out = Command::new(CRIT)
        .env(
            "PATH",
            format!(
                "/usr/local/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .args(["decode", "--pretty", "-i"])
        .arg(path)
        .output()
        .expect("crit runs");
    assert!(
        out.status.success(),
        "crit decode {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("crit prints JSON")
}

fn selinux() -> LsmProfile {
    format!("selinux:{LABEL}").parse().expect("valid profile")
}

fn expected_changes(mounts: &BTreeMap<usize, (String, Option<String>)>) -> Vec<Change> {
    let profile = |image: &str| Change {
        image: image.to_owned(),
        entry: 0,
        field: "thread_core.creds.lsm_profile",
        old: String::new(),
        new: LABEL.to_owned(),
    };
    let mut changes = vec![
        profile("core-1.img"),
        profile("core-15.img"),
        Change {
            image: "inventory.img".to_owned(),
            entry: 0,
            field: "lsmtype",
            old: "NO_LSM".to_owned(),
            new: "SELINUX".to_owned(),
        },
    ];
    for (&entry, (old, new)) in mounts {
        if let Some(new) = new {
            changes.push(Change {
                image: "mountpoints-13.img".to_owned(),
                entry,
                field: "options",
                old: old.clone(),
                new: new.clone(),
            });
        }
    }
    changes
}

#[test]
fn shadow_differs_from_the_original_only_in_the_labels() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    copy_dir(&fixture("runc-busybox"), &images);
    let mounts = add_contexts(&images);
    let before = snapshot(&images);

    let profile = selinux();
    let planned = lsm::plan(&images, Some(&profile), Some(CONTEXT)).expect("plan");
    let shadow = tmp.path().join("shadow");
    let done = lsm::write_shadow(&images, &shadow, Some(&profile), Some(CONTEXT)).expect("shadow");
    assert_eq!(planned, done, "the shadow carries out the plan");
    assert_eq!(done.changes, expected_changes(&mounts));
    assert_eq!(
        done.images(),
        [
            "core-1.img",
            "core-15.img",
            "inventory.img",
            "mountpoints-13.img"
        ]
    );
    let json = serde_json::to_value(&done).expect("serializes");
    assert_eq!(json["changes"][2]["field"], "lsmtype");

    // (a) The original is untouched: same bytes, same inodes, same times.
    assert_eq!(snapshot(&images), before);

    // (c) Every file not rewritten is a hard link to the original; the rewritten ones are
    // new files.
    let rewritten = done.images();
    let mut entries = 0;
    for (name, (_, inode, _)) in &before {
        let meta = fs::symlink_metadata(shadow.join(name)).expect("shadow has every entry");
        if rewritten.contains(&name.as_str()) {
            assert_ne!(meta.ino(), *inode, "{name} is a new file");
            assert_eq!(meta.nlink(), 1, "{name} is a new file");
        } else {
            assert!(
                meta.file_type().is_file(),
                "{name} is a hard link, not a symlink"
            );
            assert_eq!(meta.ino(), *inode, "{name} is a hard link to the original");
        }
        entries += 1;
    }
    assert_eq!(fs::read_dir(&shadow).expect("shadow").count(), entries);

    // (b) crit sees the same images but for the fields asked for.
    if !Path::new(CRIT).exists() {
        println!("skipped the crit comparison: {CRIT} is not installed (run tools/install-deps)");
        return;
    }
    let names = protobuf_images(&images);
    assert!(names.len() >= 20, "only {} protobuf images", names.len());
    for name in &names {
        let original = crit(&images.join(name));
        let mut shadowed = crit(&shadow.join(name));
        if name.starts_with("core-") {
            let creds = &mut shadowed["entries"][0]["thread_core"]["creds"];
            assert_eq!(creds["lsm_profile"], LABEL, "{name}");
            creds.as_object_mut().expect("creds").remove("lsm_profile");
        } else if name == "inventory.img" {
            assert_eq!(original["entries"][0]["lsmtype"], "NO_LSM");
            assert_eq!(shadowed["entries"][0]["lsmtype"], "SELINUX");
            shadowed["entries"][0]["lsmtype"] = original["entries"][0]["lsmtype"].clone();
        } else if name == "mountpoints-13.img" {
            for (&entry, (old, new)) in &mounts {
                assert_eq!(original["entries"][entry]["options"], old.as_str());
                let expected = new.as_deref().unwrap_or(old);
                assert_eq!(
                    shadowed["entries"][entry]["options"], expected,
                    "entry {entry}"
                );
                shadowed["entries"][entry]["options"] = old.as_str().into();
            }
        }
        assert_eq!(shadowed, original, "{name} differs beyond the labels");
    }
}

#[test]
fn no_options_plan_no_changes() {
    let images = fixture("runc-busybox");
    let planned = lsm::plan(&images, None, None).expect("plan");
    assert!(planned.is_empty(), "{planned:?}");

    // The fixture has no context= mount, and was dumped without an LSM, so none: already
    // holds.
    let none: LsmProfile = "none:".parse().expect("valid");
    assert!(
        lsm::plan(&images, Some(&none), Some(CONTEXT))
            .expect("plan")
            .is_empty()
    );
}

#[test]
fn none_sets_lsmtype_back_to_no_lsm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    copy_dir(&fixture("runc-busybox"), &images);
    let labelled = tmp.path().join("labelled");
    lsm::write_shadow(&images, &labelled, Some(&selinux()), None).expect("shadow");
    assert_eq!(
        Checkpoint::open(&labelled)
            .expect("open")
            .inventory()
            .expect("inventory")
            .lsmtype,
        Some(1)
    );

    let none: LsmProfile = "none:".parse().expect("valid");
    let cleared = tmp.path().join("cleared");
    let done = lsm::write_shadow(&labelled, &cleared, Some(&none), None).expect("shadow");
    let fields: Vec<(&str, &str, &str, &str)> = done
        .changes
        .iter()
        .map(|c| (c.image.as_str(), c.field, c.old.as_str(), c.new.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("core-1.img", "thread_core.creds.lsm_profile", LABEL, ""),
            ("core-15.img", "thread_core.creds.lsm_profile", LABEL, ""),
            ("inventory.img", "lsmtype", "SELINUX", "NO_LSM"),
        ]
    );

    let checkpoint = Checkpoint::open(&cleared).expect("open");
    assert_eq!(checkpoint.inventory().expect("inventory").lsmtype, Some(0));
    for tid in [1, 15] {
        let core = checkpoint.core(tid).expect("core");
        let creds = core.thread_core.and_then(|t| t.creds).expect("creds");
        assert_eq!(creds.lsm_profile, None, "core-{tid}.img");
    }

    // Setting the label and clearing it again gives the original bytes back, since the edits
    // touch nothing else.
    let original = snapshot(&images);
    let back = snapshot(&cleared);
    assert_eq!(original.len(), back.len());
    for (name, (bytes, _, _)) in &original {
        assert_eq!(&back[name].0, bytes, "{name}");
    }
}

#[test]
fn parent_link_points_at_the_same_parent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let chain = tmp.path().join("chain");
    copy_dir(&fixture("parent-chain"), &chain);
    let child = chain.join("child");
    assert_eq!(
        fs::read_link(child.join("parent")).expect("link"),
        Path::new("../parent")
    );

    let shadow = tmp.path().join("elsewhere/shadow");
    fs::create_dir(tmp.path().join("elsewhere")).expect("dir");
    lsm::write_shadow(&child, &shadow, Some(&selinux()), None).expect("shadow");

    let target = fs::read_link(shadow.join("parent")).expect("parent is a symlink");
    let parent = fs::canonicalize(chain.join("parent")).expect("parent");
    assert_eq!(
        target, parent,
        "absolute, at the original's resolved target"
    );
    assert_eq!(
        fs::canonicalize(shadow.join("parent")).expect("resolves"),
        parent
    );
    assert_eq!(
        fs::read_link(child.join("parent")).expect("link"),
        Path::new("../parent")
    );
}

#[test]
fn a_shadow_in_the_way_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let shadow = tmp.path().join("shadow");
    fs::create_dir(&shadow).expect("dir");
    fs::write(shadow.join("keep"), b"mine").expect("file");

    let error = lsm::write_shadow(&fixture("runc-busybox"), &shadow, Some(&selinux()), None)
        .expect_err("not empty");
    assert!(matches!(&error, LsmError::ShadowNotEmpty { path } if *path == shadow));
    assert!(
        error.to_string().contains(&shadow.display().to_string()),
        "{error}"
    );
    assert_eq!(fs::read_dir(&shadow).expect("dir").count(), 1);
    assert_eq!(fs::read(shadow.join("keep")).expect("file"), b"mine");

    // An empty directory is taken as it is.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).expect("dir");
    lsm::write_shadow(&fixture("runc-busybox"), &empty, Some(&selinux()), None).expect("shadow");
    assert!(empty.join("inventory.img").is_file());
}

#[test]
fn corrupt_images_are_named_and_leave_no_shadow() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    copy_dir(&fixture("runc-busybox"), &images);
    let core = images.join("core-15.img");
    let mut data = fs::read(&core).expect("core");
    data.pop();
    fs::write(&core, &data).expect("truncate");

    let shadow = tmp.path().join("shadow");
    let error = lsm::write_shadow(&images, &shadow, Some(&selinux()), None).expect_err("corrupt");
    match &error {
        LsmError::Image { path, source } => {
            assert_eq!(path, &core);
            assert!(
                matches!(
                    source,
                    ImageError::TruncatedEntry {
                        index: 0,
                        offset: 8,
                        ..
                    }
                ),
                "{source:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let chain = format!(
        "{error}: {}",
        std::error::Error::source(&error).expect("source")
    );
    assert!(
        chain.contains("core-15.img") && chain.contains("entry 0 at offset 8"),
        "{chain}"
    );
    assert!(!shadow.exists(), "nothing is written before the plan holds");

    fs::copy(images.join("pstree.img"), &core).expect("copy");
    assert!(matches!(
        lsm::plan(&images, Some(&selinux()), None),
        Err(LsmError::WrongMagic {
            expected: "CORE",
            found: "PSTREE",
            ..
        })
    ));
}
