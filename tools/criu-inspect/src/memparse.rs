//! `memparse`: memory sizes, hexdumps and search.

use std::path::PathBuf;

/// What to search for.
pub enum Query {
    /// A literal string.
    Text(String),
    /// A regular expression.
    Regex(String),
}

/// The command's arguments.
pub struct Request {
    pub dir: PathBuf,
    pub pid: Option<u32>,
    pub query: Option<Query>,
    pub context: usize,
    pub hexdump: bool,
    pub page_size: u64,
}

/// Runs the command.
pub fn run(request: &Request) -> anyhow::Result<()> {
    let _ = request;
    anyhow::bail!("memparse is not written yet")
}
