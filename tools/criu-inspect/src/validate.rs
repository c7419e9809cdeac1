//! `validate`: the checks a restore runs first, as a report.
//!
//! The checks themselves live in the image library ([`criu_images::validate`]); this prints
//! them for people, or as JSON (`docs/validate-json.md`), and turns them into the exit code:
//! 0 when nothing is wrong (warnings allowed), 1 when problems were found, 2 when the
//! directory could not be checked at all.

use std::path::Path;

use std::path::PathBuf;

use anyhow::Context as _;
use criu_images::checksum::{self, FileSum};
use criu_images::validate::{Host, Report, Severity, ValidateOptions, validate};

use crate::output::{self, InvalidInput};

/// What `validate` was asked.
#[derive(Debug)]
pub struct Request<'a> {
    /// The images directory.
    pub dir: &'a Path,
    /// Print JSON.
    pub json: bool,
    /// The restore will serve pages lazily.
    pub lazy_pages: bool,
    /// The dumping machine's page size, when not the architecture's usual one.
    pub page_size: Option<u64>,
    /// Read every file in full and checksum it.
    pub deep: bool,
    /// A manifest to verify against (if it exists) or to write (if not); implies `deep`.
    pub manifest: Option<PathBuf>,
}

/// What `--deep` found out besides the findings.
#[derive(Debug, Default)]
struct Deep {
    sums: Vec<FileSum>,
    /// The manifest written, when one was.
    written: Option<PathBuf>,
}

/// Validates the images directory and prints the report.
///
/// # Errors
///
/// [`InvalidInput`] when problems were found; an error without that mark when the directory
/// could not be read at all; write errors.
pub fn run(request: &Request<'_>) -> anyhow::Result<()> {
    let options = ValidateOptions {
        lazy_pages: request.lazy_pages,
        host: Some(Host::this()),
        page_size: request.page_size,
    };
    let mut report = validate(request.dir, &options);
    let readable = !report.findings.iter().any(|f| f.code == "images-dir");
    let deep = if (request.deep || request.manifest.is_some()) && readable {
        Some(deep_checks(request, &mut report)?)
    } else {
        None
    };

    output::with_out(None, |out, _| {
        if request.json {
            serde_json::to_writer_pretty(&mut *out, &json(&report, deep.as_ref()))?;
            out.write_all(b"\n")?;
        } else {
            write_text(out, &report, deep.as_ref())?;
        }
        Ok(())
    })?;

    if report.findings.iter().any(|f| f.code == "images-dir") {
        anyhow::bail!("cannot check {}", request.dir.display());
    }
    let errors = report.errors().count();
    if errors > 0 {
        let noun = if errors == 1 { "problem" } else { "problems" };
        return Err(InvalidInput(format!(
            "{errors} {noun} found in {}",
            request.dir.display()
        ))
        .into());
    }
    Ok(())
}

/// Checksums every file and, with a manifest, verifies it (or writes it when it does not
/// exist yet); differences become findings.
fn deep_checks(request: &Request<'_>, report: &mut Report) -> anyhow::Result<Deep> {
    let manifest = request.manifest.as_deref();
    let sums = checksum::checksum_dir(request.dir, manifest)?;
    let mut deep = Deep::default();
    if let Some(path) = manifest {
        if path.exists() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the manifest {}", path.display()))?;
            let expected = checksum::parse_manifest(&text)
                .map_err(|e| InvalidInput(format!("{}: {e}", path.display())))?;
            report.findings.extend(checksum::compare(&expected, &sums));
        } else {
            std::fs::write(path, checksum::manifest(&sums))
                .with_context(|| format!("cannot write the manifest {}", path.display()))?;
            deep.written = Some(path.to_path_buf());
        }
    }
    deep.sums = sums;
    Ok(deep)
}

/// The report as the documented JSON object.
fn json(report: &Report, deep: Option<&Deep>) -> serde_json::Value {
    let mut value = serde_json::json!({
        "dir": report.dir,
        "valid": !report.has_errors(),
        "images": report.images,
        "processes": report.processes,
        "findings": report.findings,
    });
    if let Some(deep) = deep {
        value["checksums"] = serde_json::json!(deep.sums);
        if let Some(written) = &deep.written {
            value["manifest_written"] = serde_json::json!(written);
        }
    }
    value
}

fn write_text(
    out: &mut dyn std::io::Write,
    report: &Report,
    deep: Option<&Deep>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: {} images, {} processes",
        report.dir.display(),
        report.images,
        report.processes
    )?;
    if let Some(deep) = deep {
        let rows: Vec<Vec<String>> = deep
            .sums
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    output::size(s.bytes),
                    format!("{:08x}", s.crc32),
                ]
            })
            .collect();
        writeln!(out)?;
        out.write_all(output::table(&["FILE", "SIZE", "CRC32"], &rows).as_bytes())?;
        if let Some(written) = &deep.written {
            writeln!(out, "manifest written to {}", written.display())?;
        }
    }
    if report.findings.is_empty() {
        return writeln!(out, "no problems found");
    }
    let width = report
        .findings
        .iter()
        .map(|f| f.code.len())
        .max()
        .unwrap_or(0);
    for finding in &report.findings {
        let severity = match finding.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        writeln!(out)?;
        writeln!(
            out,
            "{severity:<7} {:<width$}  {}",
            finding.code, finding.subject
        )?;
        writeln!(out, "        {}", finding.message)?;
        writeln!(out, "        fix: {}", finding.hint)?;
    }
    let errors = report.errors().count();
    let warnings = report.findings.len() - errors;
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    writeln!(out)?;
    writeln!(
        out,
        "{}, {}",
        plural(errors, "error"),
        plural(warnings, "warning")
    )
}
