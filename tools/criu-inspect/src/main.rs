//! `criu-inspect`: look inside CRIU checkpoints.
//!
//! The crit commands (`decode`, `encode`, `show`, `info`, `x`) take crit's arguments and print
//! what crit 4.1.1 prints, so scripts written for crit keep working; `inspect`, `validate` and
//! `memparse` go further. Data goes to stdout, diagnostics to stderr.
//!
//! Exit codes: 0 success; 1 the input is invalid (a corrupt image, JSON that is not an image,
//! a checkpoint missing a required image); 2 a usage or system error (bad arguments, a file
//! that cannot be read or written). A closed stdout (`criu-inspect ... | head`) exits 0.

mod crit;
mod dedup;
mod explore;
mod inspect;
mod memparse;
mod output;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Inspect CRIU checkpoint images: crit-compatible decoding, checkpoint overviews and memory
/// search.
#[derive(Debug, Parser)]
#[command(name = "criu-inspect", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert an image from binary to JSON (as `crit decode`).
    Decode {
        /// Image to decode (stdin by default).
        #[arg(short = 'i', long = "in")]
        input: Option<PathBuf>,
        /// Where to write the JSON (stdout by default).
        #[arg(short = 'o', long = "out")]
        output: Option<PathBuf>,
        /// Indent, and render numbers in their field's format (hex, flags, devices, names).
        #[arg(long)]
        pretty: bool,
    },
    /// Convert an image from JSON to binary (as `crit encode`).
    Encode {
        /// JSON to encode (stdin by default).
        #[arg(short = 'i', long = "in")]
        input: Option<PathBuf>,
        /// Where to write the image (stdout by default).
        #[arg(short = 'o', long = "out")]
        output: Option<PathBuf>,
    },
    /// Print an image as pretty JSON (as `crit show`).
    Show {
        /// Image to show.
        #[arg(value_name = "IN")]
        input: PathBuf,
        /// Replace entry payloads (pipe data, socket queues, ...) by their size.
        #[arg(long)]
        nopl: bool,
    },
    /// Print an image's magic and entry count (as `crit info`).
    Info {
        /// Image to count.
        #[arg(value_name = "IN")]
        input: PathBuf,
    },
    /// Explore an images directory (as `crit x`).
    X {
        /// Images directory.
        dir: PathBuf,
        /// What to list.
        what: Explore,
    },
    /// Overview of a checkpoint: CRIU version and statistics, process tree with command
    /// lines, memory, files, sockets, mounts, namespaces, cgroups and LSM labels.
    Inspect {
        /// Images directory.
        dir: PathBuf,
        /// Print the overview as JSON (schema in docs/inspect-json.md).
        #[arg(long)]
        json: bool,
    },
    /// Check an images directory for what a restore needs, before CRIU runs: every image
    /// parses, every process has its images, memory is consistent with its parents, the host
    /// matches. Exits 0 when valid, 1 when problems were found, 2 when it could not check.
    Validate {
        /// Images directory.
        dir: PathBuf,
        /// Print the report as JSON (schema in docs/validate-json.md).
        #[arg(long)]
        json: bool,
        /// The restore will serve pages lazily (`restore --lazy-pages`).
        #[arg(long)]
        lazy_pages: bool,
        /// Page size of the dumping machine in bytes (default: the architecture's usual one).
        #[arg(long, value_parser = page_size)]
        page_size: Option<u64>,
        /// Also read every file in full: a CRC32 of each, in parallel.
        #[arg(long)]
        deep: bool,
        /// Verify the files against this manifest of CRC32s, or write it if it does not
        /// exist (implies --deep).
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
    },
    /// Memory of the checkpointed processes: sizes, hexdumps and search.
    Memparse {
        /// Images directory.
        dir: PathBuf,
        /// Process to dump or search (without it: a table of every process's memory).
        #[arg(short, long)]
        pid: Option<u32>,
        /// Search the memory for this string.
        #[arg(short, long, conflicts_with = "regex")]
        search: Option<String>,
        /// Search the memory for this regular expression.
        #[arg(short, long)]
        regex: Option<String>,
        /// Bytes of context printed around each match.
        #[arg(short, long, default_value_t = 32)]
        context: usize,
        /// Hexdump the process's dumped memory.
        #[arg(long)]
        hexdump: bool,
        /// Page size of the dumping machine in bytes (default: the architecture's usual one).
        #[arg(long, value_parser = page_size)]
        page_size: Option<u64>,
    },
    /// Punch out of the parent dumps the pages this dump holds again (as `criu dedup`): file
    /// sizes and pagemaps stay, the superseded ranges become holes. Reports the bytes freed
    /// per pages file and the page statistics of this dump. Refuses (exit 1) when another
    /// images directory next to the chain uses a parent that would be punched.
    Dedup {
        /// Images directory (the newest dump of the chain).
        dir: PathBuf,
        /// Report what would be freed; punch nothing.
        #[arg(long)]
        dry_run: bool,
        /// Punch parents that other images directories also use.
        #[arg(long)]
        force: bool,
        /// Print the report as JSON (schema in docs/dedup-json.md).
        #[arg(long)]
        json: bool,
        /// Page size of the dumping machine in bytes (default: the architecture's usual one).
        #[arg(long, value_parser = page_size)]
        page_size: Option<u64>,
    },
}

/// The `crit x` listings.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Explore {
    /// The process tree.
    Ps,
    /// Open files of each process.
    Fds,
    /// Memory mappings of each process.
    Mems,
    /// Dumped pages against mappings.
    Rss,
}

/// A `--page-size` value: a power of two of at least 4 KiB, as on every architecture CRIU
/// supports. A wrong one would make every pagemap look broken, and blame the images for it.
fn page_size(value: &str) -> Result<u64, String> {
    let size: u64 = value
        .parse()
        .map_err(|e| format!("{value:?} is not a number of bytes: {e}"))?;
    if size >= 4096 && size.is_power_of_two() {
        Ok(size)
    } else {
        Err(format!(
            "page size {size} is not a power of two of at least 4096 bytes (4096 on x86_64 \
             and most others, 65536 on ppc64)"
        ))
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Decode {
            input,
            output,
            pretty,
        } => crit::decode(input.as_deref(), output.as_deref(), pretty, false),
        Command::Encode { input, output } => crit::encode(input.as_deref(), output.as_deref()),
        Command::Show { input, nopl } => crit::decode(Some(&input), None, true, nopl),
        Command::Info { input } => crit::info(&input),
        Command::X { dir, what } => match what {
            Explore::Ps => explore::ps(&dir),
            Explore::Fds => explore::fds(&dir),
            Explore::Mems => explore::mems(&dir),
            Explore::Rss => explore::rss(&dir),
        },
        Command::Inspect { dir, json } => inspect::run(&dir, json),
        Command::Validate {
            dir,
            json,
            lazy_pages,
            page_size,
            deep,
            manifest,
        } => validate::run(&validate::Request {
            dir: &dir,
            json,
            lazy_pages,
            page_size,
            deep,
            manifest,
        }),
        Command::Memparse {
            dir,
            pid,
            search,
            regex,
            context,
            hexdump,
            page_size,
        } => {
            let query = match (search, regex) {
                (Some(text), _) => Some(memparse::Query::Text(text)),
                (None, Some(pattern)) => Some(memparse::Query::Regex(pattern)),
                (None, None) => None,
            };
            memparse::run(&memparse::Request {
                dir,
                pid,
                query,
                context,
                hexdump,
                page_size,
            })
        }
        Command::Dedup {
            dir,
            dry_run,
            force,
            json,
            page_size,
        } => dedup::run(&dedup::Request {
            dir: &dir,
            dry_run,
            force,
            json,
            page_size,
        }),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if output::is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("criu-inspect: {error:#}");
            ExitCode::from(output::exit_code(&error))
        }
    }
}
