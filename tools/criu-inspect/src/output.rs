//! Writing results: stdout handling, exit codes and human formatting.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsFd as _;
use std::path::Path;

use anyhow::Context as _;

use criu_images::checkpoint::CheckpointError;
use criu_images::image::ImageError;
use criu_images::json::{DecodeError, EncodeError};
use criu_images::memory::MemoryError;
use criu_images::pagemap::PagemapError;

/// Marks an error caused by the input being invalid (exit code 1).
#[derive(Debug)]
pub struct InvalidInput(pub String);

impl std::fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidInput {}

/// Whether the error is stdout being closed by its reader.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// 1 when the input is invalid, 2 for usage and system errors.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    let invalid = error.chain().any(|cause| {
        cause.is::<InvalidInput>()
            || cause.is::<ImageError>()
            || cause.is::<DecodeError>()
            || cause.is::<EncodeError>()
            || cause.is::<PagemapError>()
            || cause.is::<serde_json::Error>()
            || cause
                .downcast_ref::<MemoryError>()
                .is_some_and(|e| !matches!(e, MemoryError::Io { .. }))
            || cause
                .downcast_ref::<CheckpointError>()
                .is_some_and(|e| !matches!(e, CheckpointError::Io { .. }))
    });
    if invalid { 1 } else { 2 }
}

/// Writes `bytes` to the file at `path`, or to stdout.
pub fn write_out(path: Option<&Path>, bytes: &[u8]) -> anyhow::Result<()> {
    match path {
        Some(path) => fs::write(path, bytes)
            .map_err(|e| anyhow::Error::new(e).context(format!("cannot write {}", path.display()))),
        None => {
            let mut stdout = io::stdout().lock();
            stdout.write_all(bytes)?;
            stdout.flush()?;
            Ok(())
        }
    }
}

/// Runs `write` with a buffered writer to the file at `path` (created or truncated), or to
/// stdout; `write` is told which. Everything is flushed before returning.
pub fn with_out(
    path: Option<&Path>,
    write: impl FnOnce(&mut dyn Write, bool) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    match path {
        Some(path) => {
            let context = || format!("cannot write {}", path.display());
            let file = fs::File::create(path).with_context(context)?;
            let mut writer = io::BufWriter::with_capacity(1 << 16, file);
            write(&mut writer, false)?;
            writer.flush().with_context(context)?;
        }
        None => {
            // A duplicate of fd 1 as a plain file: std's stdout is line-buffered and scans
            // every write for newlines, which large outputs pay for.
            let stdout = io::stdout();
            stdout.lock().flush()?;
            let file = fs::File::from(stdout.as_fd().try_clone_to_owned()?);
            let mut writer = io::BufWriter::with_capacity(1 << 16, file);
            write(&mut writer, true)?;
            writer.flush()?;
        }
    }
    Ok(())
}

/// Reads the file at `path`, or stdin.
pub fn read_in(path: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    match path {
        Some(path) => fs::read(path)
            .map_err(|e| anyhow::Error::new(e).context(format!("cannot read {}", path.display()))),
        None => {
            let mut data = Vec::new();
            io::Read::read_to_end(&mut io::stdin().lock(), &mut data)?;
            Ok(data)
        }
    }
}

/// A byte count for people: `512 B`, `4.0 KiB`, `1.5 MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Lays rows out in columns, each as wide as its widest cell; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == columns {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(4096), "4.0 KiB");
        assert_eq!(size(3 << 29), "1.5 GiB");
    }

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["PID", "COMM"],
            &[
                vec!["1".into(), "sh".into()],
                vec!["123".into(), "sleep".into()],
            ],
        );
        assert_eq!(text, "PID  COMM\n1    sh\n123  sleep\n");
    }
}
