//! `validate`: the checks a restore runs first, as a report.
//!
//! The checks themselves live in the image library ([`criu_images::validate`]); this prints
//! them for people, or as JSON (`docs/validate-json.md`), and turns them into the exit code:
//! 0 when nothing is wrong (warnings allowed), 1 when problems were found, 2 when the
//! directory could not be checked at all.

use std::path::Path;

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
    let report = validate(request.dir, &options);

    output::with_out(None, |out, _| {
        if request.json {
            serde_json::to_writer_pretty(&mut *out, &json(&report))?;
            out.write_all(b"\n")?;
        } else {
            write_text(out, &report)?;
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

/// The report as the documented JSON object.
fn json(report: &Report) -> serde_json::Value {
    serde_json::json!({
        "dir": report.dir,
        "valid": !report.has_errors(),
        "images": report.images,
        "processes": report.processes,
        "findings": report.findings,
    })
}

fn write_text(out: &mut dyn std::io::Write, report: &Report) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: {} images, {} processes",
        report.dir.display(),
        report.images,
        report.processes
    )?;
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
