//! `dedup`: punch out of parent dumps the pages a newer dump holds again, as `criu dedup`
//! does, and report what that frees along with the page statistics of the newest dump.
//!
//! The work is the image library's ([`criu_images::dedup`]): the plan is made first (and
//! refused when another images directory shares a parent it would punch), the statistics are
//! read from the newest level, which is never punched, and only then are the parent pages
//! files punched, in parallel. `--dry-run` stops after the plan. The report goes to stdout,
//! for people or as JSON (`docs/dedup-json.md`); warnings go to stderr.
//!
//! Exit codes: 0 done (or nothing to do), 1 invalid images or a shared parent refused, 2 a
//! usage or system error (a bad page size, files that cannot be read or punched).

use std::io::Write;
use std::path::Path;

use criu_images::dedup::{self, DedupError, DedupOptions, DedupPlan, PageStats};

use crate::output::{self, InvalidInput, size};

/// What `dedup` was asked.
#[derive(Debug)]
pub struct Request<'a> {
    /// The images directory whose parents are punched.
    pub dir: &'a Path,
    /// Plan and report only; punch nothing.
    pub dry_run: bool,
    /// Punch parents that other images directories share.
    pub force: bool,
    /// Print JSON.
    pub json: bool,
    /// The dumping machine's page size, when not the architecture's usual one.
    pub page_size: Option<u64>,
}

/// Plans the dedup, reads the page statistics, punches (unless a dry run) and prints the
/// report.
///
/// # Errors
///
/// [`InvalidInput`] for a shared parent and misaligned pagemaps; the library's errors, whose
/// chain tells invalid images from system errors; write errors.
pub fn run(request: &Request<'_>) -> anyhow::Result<()> {
    let options = DedupOptions {
        page_size: request.page_size,
        force: request.force,
    };
    let plan = dedup::plan_with_options(request.dir, &options).map_err(classify)?;
    for shared in &plan.shared {
        eprintln!(
            "criu-inspect: warning: punching {} although {} also uses it (--force)",
            shared.parent.display(),
            shared.child.display()
        );
    }
    let stats = dedup::page_stats(request.dir, Some(plan.page_size)).map_err(classify)?;

    let freed: Vec<u64> = if request.dry_run {
        plan.files.iter().map(|f| f.freed_bytes).collect()
    } else {
        dedup::apply_files(&plan).map_err(classify)?
    };

    output::with_out(None, |out, _| {
        if request.json {
            let value = json(request, &plan, &freed, &stats);
            serde_json::to_writer_pretty(&mut *out, &value)?;
            out.write_all(b"\n")?;
        } else {
            write_text(out, request, &plan, &freed, &stats)?;
        }
        Ok(())
    })
}

/// Marks the errors that mean the images (or their layout) are the problem, which carry no
/// library error the exit code would recognise; the others keep their chain.
fn classify(error: DedupError) -> anyhow::Error {
    match error {
        DedupError::SharedParent { .. } | DedupError::Unaligned { .. } => {
            InvalidInput(error.to_string()).into()
        }
        other => other.into(),
    }
}

/// The report as the documented JSON object.
fn json(
    request: &Request<'_>,
    plan: &DedupPlan,
    freed: &[u64],
    stats: &PageStats,
) -> serde_json::Value {
    let files: Vec<serde_json::Value> = plan
        .files
        .iter()
        .zip(freed)
        .map(|(file, &freed)| {
            serde_json::json!({
                "path": file.path,
                "pagemap": file.pagemap,
                "level": file.level,
                "size": file.size,
                "ranges": file.ranges,
                "superseded_bytes": file.superseded_bytes,
                "freed_bytes": freed,
            })
        })
        .collect();
    serde_json::json!({
        "dir": request.dir,
        "dry_run": request.dry_run,
        "page_size": plan.page_size,
        "files": files,
        "superseded_bytes": plan.superseded_bytes(),
        "freed_bytes": freed.iter().sum::<u64>(),
        "forced_shared": plan.shared,
        "page_stats": stats,
    })
}

fn write_text(
    out: &mut dyn Write,
    request: &Request<'_>,
    plan: &DedupPlan,
    freed: &[u64],
    stats: &PageStats,
) -> std::io::Result<()> {
    let mode = if request.dry_run {
        " (dry run: nothing punched)"
    } else {
        ""
    };
    writeln!(
        out,
        "{}: page size {}{mode}",
        request.dir.display(),
        plan.page_size
    )?;
    writeln!(out)?;

    if plan.is_empty() {
        writeln!(
            out,
            "nothing to punch: no parent dump holds pages that a newer dump holds again"
        )?;
    } else {
        let freed_header = if request.dry_run {
            "WOULD FREE"
        } else {
            "FREED"
        };
        let rows: Vec<Vec<String>> = plan
            .files
            .iter()
            .zip(freed)
            .map(|(file, &freed)| {
                vec![
                    file.path.display().to_string(),
                    file.level.to_string(),
                    file.ranges.len().to_string(),
                    size(file.superseded_bytes),
                    size(freed),
                ]
            })
            .collect();
        let header = ["PAGES FILE", "LEVEL", "RANGES", "SUPERSEDED", freed_header];
        out.write_all(output::table(&header, &rows).as_bytes())?;
        let total = freed.iter().sum::<u64>();
        let verb = if request.dry_run {
            "would be freed"
        } else {
            "freed"
        };
        writeln!(
            out,
            "total: {} superseded, {} {verb}",
            size(plan.superseded_bytes()),
            size(total)
        )?;
    }

    writeln!(out)?;
    writeln!(out, "pages of the newest dump:")?;
    let page_bytes = |pages: u64| size(pages * stats.page_size);
    let rows = vec![
        vec![
            "present".to_owned(),
            stats.pages.to_string(),
            page_bytes(stats.pages),
        ],
        vec![
            "zero".to_owned(),
            stats.zero_pages.to_string(),
            page_bytes(stats.zero_pages),
        ],
        vec![
            "duplicate".to_owned(),
            stats.duplicate_pages.to_string(),
            page_bytes(stats.duplicate_pages),
        ],
        vec![
            "unique".to_owned(),
            stats.unique_pages.to_string(),
            size(stats.unique_bytes),
        ],
    ];
    out.write_all(output::table(&["KIND", "PAGES", "SIZE"], &rows).as_bytes())
}
