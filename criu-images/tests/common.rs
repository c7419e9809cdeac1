//! Helpers shared by the integration tests: where the fixtures are and which files in them
//! are protobuf images.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use criu_images::kind::RawKind;

/// The workspace's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Every images directory among the fixtures (a folder holding `inventory.img`), sorted.
pub fn checkpoints() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(fixtures())
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join("inventory.img").is_file())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The protobuf images of an images directory: `*.img` files that are not raw, plus the
/// stats files, sorted by name.
pub fn protobuf_images(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    (name.ends_with(".img") && RawKind::from_file_name(name).is_none())
                        || name.starts_with("stats-")
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}
