//! `inspect`: the overview of a checkpoint.

use std::path::Path;

/// Prints the overview of the checkpoint in `dir`.
pub fn run(dir: &Path, json: bool) -> anyhow::Result<()> {
    let _ = (dir, json);
    anyhow::bail!("inspect is not written yet")
}
