//! Where the fixtures are, for the command-line tests.

use std::fs;
use std::path::{Path, PathBuf};

/// Every images directory among the workspace's fixtures (a folder holding `inventory.img`),
/// sorted.
pub fn checkpoints() -> Vec<PathBuf> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&fixtures)
        .expect("fixtures folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("inventory.img").is_file())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no fixture checkpoints in {}",
        fixtures.display()
    );
    dirs
}
