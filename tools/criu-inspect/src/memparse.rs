//! `memparse`: how much memory each process has in the dump, a hexdump of one process's
//! memory, and search through it.
//!
//! Memory is read through [`MemoryImage`], so pages kept in parent dumps are found where they
//! are, pages that were never dumped are not invented, and the pages files are mapped rather
//! than read: searching a multi-gigabyte dump touches each page once, from several threads.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use criu_images::checkpoint::{Checkpoint, default_page_size};
use criu_images::memory::{Chunk, MemoryImage};
use rayon::prelude::*;
use regex::bytes::Regex;

use crate::output::{self, InvalidInput, size};

/// What to search for.
#[derive(Debug)]
pub enum Query {
    /// A literal string.
    Text(String),
    /// A regular expression.
    Regex(String),
}

/// The command's arguments.
#[derive(Debug)]
pub struct Request {
    /// The images directory.
    pub dir: PathBuf,
    /// Only this process.
    pub pid: Option<u32>,
    /// What to search for.
    pub query: Option<Query>,
    /// Bytes of context around a match.
    pub context: usize,
    /// Hexdump the memory of `pid`.
    pub hexdump: bool,
    /// Page size, when not the architecture's usual one.
    pub page_size: Option<u64>,
}

/// A run of contiguous addresses with the bytes the dump holds for it.
struct Run<'a> {
    addr: u64,
    bytes: Cow<'a, [u8]>,
}

/// Joins address-contiguous data chunks (which differ only when a range spans dumps of a
/// parent chain) so a match across them is found.
fn runs<'a>(chunks: &[Chunk<'a>]) -> Vec<Run<'a>> {
    let mut out: Vec<Run<'a>> = Vec::new();
    for chunk in chunks {
        let Chunk::Data { addr, bytes } = *chunk else {
            continue;
        };
        match out.last_mut() {
            Some(run) if run.addr + run.bytes.len() as u64 == addr => {
                run.bytes.to_mut().extend_from_slice(bytes);
            }
            _ => out.push(Run {
                addr,
                bytes: Cow::Borrowed(bytes),
            }),
        }
    }
    out
}

/// The whole dumped range of a process: from the first to the last pagemap entry.
fn all_memory(memory: &MemoryImage) -> anyhow::Result<Vec<Chunk<'_>>> {
    let pagemap = memory.pagemap();
    let (Some(first), Some(last)) = (pagemap.entries.first(), pagemap.entries.last()) else {
        return Ok(Vec::new());
    };
    let end = pagemap.end_of(last);
    Ok(memory.read(first.vaddr, end - first.vaddr)?)
}

fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '.'
            }
        })
        .collect()
}

fn open(request: &Request) -> anyhow::Result<Checkpoint> {
    let checkpoint = Checkpoint::open(&request.dir)?;
    let page_size = match request.page_size {
        Some(size) => size,
        None => {
            let tree = checkpoint.pstree()?;
            let root = tree.iter().find(|t| t.ppid == 0).map_or(0, |t| t.pid);
            default_page_size(checkpoint.core(root)?.mtype)
        }
    };
    Ok(checkpoint.with_page_size(page_size))
}

fn pids(checkpoint: &Checkpoint, only: Option<u32>) -> anyhow::Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    for task in checkpoint.pstree()? {
        if only.is_some_and(|pid| pid != task.pid) {
            continue;
        }
        let comm = checkpoint
            .core(task.pid)?
            .tc
            .map(|tc| tc.comm)
            .unwrap_or_default();
        out.push((task.pid, comm));
    }
    if let (Some(pid), true) = (only, out.is_empty()) {
        return Err(InvalidInput(format!(
            "process {pid} is not in the checkpoint's process tree"
        ))
        .into());
    }
    Ok(out)
}

/// Runs the command.
pub fn run(request: &Request) -> anyhow::Result<()> {
    let dir = request.dir.display();
    let checkpoint = open(request).with_context(|| format!("cannot read memory of {dir}"))?;
    match (&request.query, request.hexdump, request.pid) {
        (Some(query), _, pid) => search(&checkpoint, query, pid, request.context),
        (None, true, Some(pid)) => hexdump(&checkpoint, pid),
        (None, true, None) => Err(InvalidInput("--hexdump needs --pid".into()).into()),
        (None, false, pid) => sizes(&checkpoint, pid),
    }
    .with_context(|| format!("cannot read memory of {dir}"))
}

fn sizes(checkpoint: &Checkpoint, only: Option<u32>) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for (pid, comm) in pids(checkpoint, only)? {
        let memory = checkpoint.memory(pid)?;
        let mm = checkpoint.mm(pid)?;
        let mapped: u64 = mm.vmas.iter().map(|v| v.end.saturating_sub(v.start)).sum();
        let (dumped, parent, lazy) = memory.as_ref().map_or((0, 0, 0), |m| {
            let p = m.pagemap();
            (
                p.present_pages() * p.page_size,
                p.parent_pages() * p.page_size,
                p.lazy_only_pages() * p.page_size,
            )
        });
        rows.push(vec![
            pid.to_string(),
            comm,
            size(mapped),
            size(dumped),
            size(parent),
            size(lazy),
        ]);
    }
    let header = ["PID", "COMMAND", "MAPPED", "DUMPED", "IN PARENT", "LAZY"];
    output::write_out(None, output::table(&header, &rows).as_bytes())
}

fn hexdump(checkpoint: &Checkpoint, pid: u32) -> anyhow::Result<()> {
    pids(checkpoint, Some(pid))?;
    let Some(memory) = checkpoint.memory(pid)? else {
        return Err(InvalidInput(format!("process {pid} has no pagemap in the dump")).into());
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    writeln!(out, "{:<16}  {:<48} ASCII", "ADDRESS", "HEX")?;
    for chunk in all_memory(&memory)? {
        match chunk {
            Chunk::Data { addr, bytes } => {
                let mut previous: Option<&[u8]> = None;
                let mut starred = false;
                for (i, line) in bytes.chunks(16).enumerate() {
                    if previous == Some(line) {
                        if !starred {
                            writeln!(out, "*")?;
                            starred = true;
                        }
                        continue;
                    }
                    starred = false;
                    previous = Some(line);
                    let mut hex = String::with_capacity(48);
                    for (j, byte) in line.iter().enumerate() {
                        let _ = write!(hex, "{byte:02x}{}", if j == 7 { "  " } else { " " });
                    }
                    writeln!(
                        out,
                        "{:016x}  {hex:<48} |{}|",
                        addr + 16 * i as u64,
                        printable(line)
                    )?;
                }
            }
            Chunk::Lazy { addr, len } => {
                writeln!(
                    out,
                    "{addr:016x}  <{} of lazy pages, not in the dump>",
                    size(len)
                )?;
            }
            Chunk::Absent { .. } => {}
        }
    }
    out.flush()?;
    Ok(())
}

fn search(
    checkpoint: &Checkpoint,
    query: &Query,
    only: Option<u32>,
    context: usize,
) -> anyhow::Result<()> {
    let pattern = match query {
        Query::Text(text) => regex::escape(text),
        Query::Regex(pattern) => pattern.clone(),
    };
    let regex =
        Regex::new(&pattern).map_err(|e| InvalidInput(format!("bad regular expression: {e}")))?;

    let mut rows = Vec::new();
    for (pid, comm) in pids(checkpoint, only)? {
        let Some(memory) = checkpoint.memory(pid)? else {
            continue;
        };
        let chunks = all_memory(&memory)?;
        let mut matches: Vec<(u64, String)> = runs(&chunks)
            .par_iter()
            .flat_map_iter(|run| {
                regex
                    .find_iter(&run.bytes)
                    .map(|m| {
                        let before = m.start().saturating_sub(context);
                        let after = (m.end() + context).min(run.bytes.len());
                        let text = format!(
                            "{}[{}]{}",
                            printable(&run.bytes[before..m.start()]),
                            printable(m.as_bytes()),
                            printable(&run.bytes[m.end()..after])
                        );
                        (run.addr + m.start() as u64, text)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        matches.sort_by_key(|(addr, _)| *addr);
        for (addr, text) in matches {
            rows.push(vec![
                pid.to_string(),
                comm.clone(),
                format!("{addr:#x}"),
                text,
            ]);
        }
    }
    if rows.is_empty() {
        eprintln!("criu-inspect: no match for {pattern:?}");
        return Ok(());
    }
    output::write_out(
        None,
        output::table(&["PID", "COMMAND", "ADDRESS", "MATCH"], &rows).as_bytes(),
    )
}
