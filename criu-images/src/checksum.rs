//! CRC32 checksums of every file of an images directory, and manifests of them, so a
//! checkpoint copied between hosts can be verified before it is restored.
//!
//! [`checksum_dir`] reads every file in full, in parallel: files are spread over threads, and
//! a large file (a pages file of gigabytes) is cut into chunks whose checksums are combined,
//! so one big file uses every core too. Files are mapped, not read into buffers.
//!
//! A manifest is plain text, one file a line, sorted by name:
//!
//! ```text
//! # criu-inspect manifest 1
//! 8c6e2a54 2304 core-1.img
//! 0d4f4c3a 69632 pages-1.img
//! ```
//!
//! The CRC32 is in hex, the size in bytes; the name is the rest of the line.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;
use thiserror::Error;

use crate::map::MappedFile;
use crate::validate::Finding;

/// The first line of a manifest.
const MANIFEST_HEADER: &str = "# criu-inspect manifest 1";

/// Files are checksummed in chunks of this many bytes, each on its own thread (small in unit
/// tests, so that chunking is tested on small files).
const CHUNK: usize = if cfg!(test) { 64 << 10 } else { 64 << 20 };

/// Why checksums could not be taken or a manifest not read.
#[derive(Debug, Error)]
pub enum ChecksumError {
    /// The directory could not be listed.
    #[error("cannot list {dir}")]
    List {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A manifest line is not `CRC32 SIZE NAME`.
    #[error("manifest line {line} is not \"CRC32 SIZE NAME\": {text:?}")]
    BadLine {
        /// The line number, from 1.
        line: usize,
        /// The line.
        text: String,
    },
    /// The manifest does not start with the manifest header.
    #[error("not a criu-inspect manifest: the first line is not {MANIFEST_HEADER:?}")]
    NotManifest,
}

/// The checksum of one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileSum {
    /// The file name inside the images directory.
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its CRC32 (IEEE).
    pub crc32: u32,
}

/// Whether a file belongs in a manifest: everything of the checkpoint, but not the logs and
/// statistics a restore adds to the directory when it is also CRIU's work directory.
fn belongs(name: &str) -> bool {
    !(name.ends_with(".log") || name == "stats-restore" || name.starts_with('.'))
}

/// Checksums every regular file of `dir` (not following symlinks, so a `parent` link and its
/// dump are left out), except `skip` and the files a restore writes there; sorted by name.
///
/// # Errors
///
/// A directory that cannot be listed or a file that cannot be read.
pub fn checksum_dir(dir: &Path, skip: Option<&Path>) -> Result<Vec<FileSum>, ChecksumError> {
    let list_error = |source| ChecksumError::List {
        dir: dir.to_path_buf(),
        source,
    };
    let skip = skip.and_then(|s| fs::canonicalize(s).ok());
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(list_error)? {
        let entry = entry.map_err(list_error)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let is_file = entry.file_type().map_err(list_error)?.is_file();
        let skipped = skip.is_some() && fs::canonicalize(entry.path()).ok() == skip;
        if is_file && belongs(&name) && !skipped {
            files.push(name);
        }
    }
    files.sort();
    files
        .par_iter()
        .map(|name| checksum_file(&dir.join(name), name))
        .collect()
}

fn checksum_file(path: &Path, name: &str) -> Result<FileSum, ChecksumError> {
    let read_error = |source| ChecksumError::Read {
        path: path.to_path_buf(),
        source,
    };
    // SAFETY: an images directory is not modified while it is verified; see the contract of
    // `MappedFile::open`, the crate's one assumption about the files it reads.
    let map = unsafe { MappedFile::open(path) }.map_err(read_error)?;
    let bytes = map.bytes();
    map.will_need().map_err(read_error)?;
    let crc32 = bytes
        .par_chunks(CHUNK)
        .map(|chunk| {
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(chunk);
            hasher
        })
        .reduce(crc32fast::Hasher::new, |mut left, right| {
            left.combine(&right);
            left
        })
        .finalize();
    Ok(FileSum {
        name: name.to_owned(),
        bytes: bytes.len() as u64,
        crc32,
    })
}

/// The manifest text of `sums`.
pub fn manifest(sums: &[FileSum]) -> String {
    let mut text = format!("{MANIFEST_HEADER}\n");
    for sum in sums {
        text.push_str(&format!("{:08x} {} {}\n", sum.crc32, sum.bytes, sum.name));
    }
    text
}

/// Reads a manifest written by [`manifest`].
///
/// # Errors
///
/// A text that does not start with the header, or a line that is not `CRC32 SIZE NAME`.
pub fn parse_manifest(text: &str) -> Result<Vec<FileSum>, ChecksumError> {
    let mut lines = text.lines();
    if lines.next() != Some(MANIFEST_HEADER) {
        return Err(ChecksumError::NotManifest);
    }
    let mut sums = Vec::new();
    for (index, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || ChecksumError::BadLine {
            line: index + 2,
            text: line.to_owned(),
        };
        let mut parts = line.splitn(3, ' ');
        let crc32 = parts
            .next()
            .and_then(|c| u32::from_str_radix(c, 16).ok())
            .ok_or_else(bad)?;
        let bytes = parts
            .next()
            .and_then(|b| b.parse::<u64>().ok())
            .ok_or_else(bad)?;
        let name = parts.next().filter(|n| !n.is_empty()).ok_or_else(bad)?;
        sums.push(FileSum {
            name: name.to_owned(),
            bytes,
            crc32,
        });
    }
    Ok(sums)
}

/// What differs between a manifest and the files as they are: changed and missing files are
/// errors (`manifest-mismatch`, `manifest-missing-file`), files the manifest does not know are
/// warnings (`manifest-extra-file`).
pub fn compare(manifest: &[FileSum], actual: &[FileSum]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for expected in manifest {
        match actual.iter().find(|a| a.name == expected.name) {
            None => findings.push(Finding::error(
                "manifest-missing-file",
                expected.name.clone(),
                "the manifest lists this file, and the images directory lacks it",
                "copy the checkpoint again in full",
            )),
            Some(found) if found != expected => findings.push(Finding::error(
                "manifest-mismatch",
                expected.name.clone(),
                format!(
                    "the file is {} bytes with CRC32 {:08x}; the manifest says {} bytes with \
                     CRC32 {:08x}",
                    found.bytes, found.crc32, expected.bytes, expected.crc32
                ),
                "the file changed or was damaged in transit: copy the checkpoint again",
            )),
            Some(_) => {}
        }
    }
    for found in actual {
        if !manifest.iter().any(|m| m.name == found.name) {
            findings.push(Finding::warning(
                "manifest-extra-file",
                found.name.clone(),
                "the images directory has this file, and the manifest does not list it",
                "check where it came from; a checkpoint gains no files by being copied",
            ));
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_checksums_equal_one_pass_and_manifests_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let big: Vec<u8> = (0..CHUNK * 2 + 12345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        fs::write(dir.path().join("pages-1.img"), &big).expect("write");
        fs::write(dir.path().join("core-1.img"), b"core").expect("write");
        fs::write(dir.path().join("restore.log"), b"log").expect("write");
        let sums = checksum_dir(dir.path(), None).expect("checksums");
        let names: Vec<&str> = sums.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["core-1.img", "pages-1.img"], "logs are left out");
        assert_eq!(sums[1].crc32, crc32fast::hash(&big));
        assert_eq!(sums[1].bytes, big.len() as u64);
        assert_eq!(parse_manifest(&manifest(&sums)).expect("parses"), sums);
        assert!(compare(&sums, &sums).is_empty());
    }

    #[test]
    fn differences_are_findings_and_bad_manifests_errors() {
        let sum = |name: &str, crc32| FileSum {
            name: name.into(),
            bytes: 4,
            crc32,
        };
        let manifest = [sum("a.img", 1), sum("b.img", 2)];
        let actual = [sum("a.img", 9), sum("c.img", 3)];
        let codes: Vec<_> = compare(&manifest, &actual).iter().map(|f| f.code).collect();
        assert_eq!(
            codes,
            [
                "manifest-mismatch",
                "manifest-missing-file",
                "manifest-extra-file"
            ]
        );
        assert!(matches!(
            parse_manifest("x"),
            Err(ChecksumError::NotManifest)
        ));
        let bad = format!("{MANIFEST_HEADER}\nzz 1 a.img\n");
        assert!(matches!(
            parse_manifest(&bad),
            Err(ChecksumError::BadLine { line: 2, .. })
        ));
    }
}
