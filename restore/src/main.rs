//! `restore`: restores a runc container from a CRIU checkpoint, with `runc restore`'s options.
//!
//! Every option of `runc restore` is parsed (plus `--root`, `--criu`, `--log`, `--log-format`
//! and `--debug`), and the container is restored through CRIU's RPC protocol by the crate's
//! library.
//!
//! Exit codes: a detached restore exits 0 once the container runs; in the foreground the
//! command exits with the container's status (128 plus the signal when it was killed); 1 means
//! the restore failed or was refused by validation (and nothing of it is left behind); 2 is a
//! usage error. `--dry-run` exits 0 when the restore would go ahead and 1 when it would not.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use restore::container::{self, Options};
use restore::lifecycle;

/// Restore a container from a previous `runc checkpoint`.
#[derive(Debug, Parser)]
#[command(
    name = "restore",
    version,
    about,
    max_term_width = 100,
    args_override_self = true
)]
struct Cli {
    /// Path to an AF_UNIX socket which will receive a file descriptor referencing the master
    /// end of the console's pseudoterminal.
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    /// Path to get CRIU image files to restore from.
    #[arg(long, value_name = "PATH")]
    image_path: Option<PathBuf>,
    /// Path for saving CRIU work files and logs (default: the images directory).
    #[arg(long, value_name = "PATH")]
    work_path: Option<PathBuf>,
    /// Allow restoring established TCP connections.
    #[arg(long)]
    tcp_established: bool,
    /// Allow restoring external unix sockets.
    #[arg(long)]
    ext_unix_sk: bool,
    /// Allow restoring shell jobs.
    #[arg(long)]
    shell_job: bool,
    /// Allow restoring file locks.
    #[arg(long)]
    file_locks: bool,
    /// Cgroups mode.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = CgroupsMode::Soft)]
    manage_cgroups_mode: CgroupsMode,
    /// Path to the root of the bundle directory (default: the current directory).
    #[arg(short, long, value_name = "PATH")]
    bundle: Option<PathBuf>,
    /// Detach from the container's process.
    #[arg(short, long)]
    detach: bool,
    /// File to write the host pid of the restored init process to.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Do not become a subreaper for reparented processes.
    #[arg(long)]
    no_subreaper: bool,
    /// Do not use pivot_root to jail the process inside the rootfs.
    #[arg(long)]
    no_pivot: bool,
    /// Create a namespace, but do not restore its properties (only `network`).
    #[arg(long, value_name = "NAMESPACE", value_parser = ["network"])]
    empty_ns: Vec<String>,
    /// Enable auto deduplication of memory images: CRIU punches restored pages out of the
    /// pages files, consuming the checkpoint.
    #[arg(long)]
    auto_dedup: bool,
    /// Use lazy migration: pages are served on demand by a `criu lazy-pages` daemon (started
    /// for the restore unless one listens in the work directory already).
    #[arg(long)]
    lazy_pages: bool,
    /// With --lazy-pages: the daemon fetches the pages from this CRIU page server instead of
    /// the images directory (lazy migration from another host).
    #[arg(long, value_name = "HOST:PORT", requires = "lazy_pages")]
    page_server: Option<String>,
    /// LSM profile to restore with, as TYPE:LABEL (TYPE is apparmor, selinux or none).
    #[arg(long, value_name = "TYPE:LABEL")]
    lsm_profile: Option<String>,
    /// LSM mount context to use instead of the checkpointed one, for mounts that have one.
    #[arg(long, value_name = "CONTEXT")]
    lsm_mount_context: Option<String>,
    /// Read the pages files into the page cache ahead of CRIU, in the order CRIU reads
    /// them (auto: when they hold more than 64 MiB).
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = Preload::Auto)]
    preload: Preload,
    /// Do everything but the restore: validate, and report the image rewrites, the CRIU
    /// request, the mounts, namespaces, cgroups and hooks a restore would set up. Exits 0
    /// when the restore would go ahead, 1 when it would be refused.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: print the report as JSON (schema in docs/dry-run-json.md).
    #[arg(long, requires = "dry_run")]
    json: bool,
    /// Restore without checking the checkpoint and the container first (for emergencies:
    /// problems then surface in CRIU, later and less clearly).
    #[arg(long)]
    skip_validation: bool,
    /// Accepted and ignored, for callers that pass it to every runc command.
    #[arg(long, hide = true)]
    no_new_keyring: bool,
    /// Directory for container state.
    #[arg(long, value_name = "PATH", default_value = "/run/restore")]
    root: PathBuf,
    /// CRIU binary to run.
    #[arg(long, value_name = "PATH", default_value = "criu")]
    criu: PathBuf,
    /// Append logs to this file instead of writing them to stderr.
    #[arg(long, value_name = "PATH")]
    log: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log each step of the restore and CRIU's notifications.
    #[arg(long)]
    debug: bool,
    /// The container id to restore as.
    container_id: String,
}

/// How CRIU manages the container's cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CgroupsMode {
    /// Restore cgroup properties only where the cgroups are created by CRIU.
    Soft,
    /// Restore all cgroup properties.
    Full,
    /// Fail when cgroups differ from the checkpoint.
    Strict,
    /// Leave cgroups alone.
    Ignore,
}

/// When to preload the pages files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Preload {
    /// When the pages files are large.
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Plain text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Reports a command-line error. A missing option value is worded as getopt words it
/// ("requires an argument"), because podman probes runc for `--lsm-mount-context` support by
/// looking for that text.
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ErrorKind};

    if !error.use_stderr() {
        let _ = error.print();
        return ExitCode::SUCCESS;
    }
    let missing_value = error.kind() == ErrorKind::InvalidValue
        && error
            .get(ContextKind::InvalidValue)
            .is_some_and(|v| v.to_string().is_empty());
    match error.get(ContextKind::InvalidArg) {
        Some(arg) if missing_value => {
            let option = arg.to_string();
            let option = option.split_whitespace().next().unwrap_or_default();
            eprintln!("restore: option '{option}' requires an argument");
        }
        _ => {
            let _ = error.print();
        }
    }
    ExitCode::from(2)
}

fn options(cli: &Cli) -> anyhow::Result<Options> {
    let cwd = std::env::current_dir()?;
    Ok(Options {
        id: cli.container_id.clone(),
        bundle: cli.bundle.clone().unwrap_or_else(|| cwd.clone()),
        image_path: cli
            .image_path
            .clone()
            .unwrap_or_else(|| cwd.join("checkpoint")),
        work_path: cli.work_path.clone(),
        root: cli.root.clone(),
        criu: cli.criu.clone(),
        detach: cli.detach,
        pid_file: cli.pid_file.clone(),
        console_socket: cli.console_socket.clone(),
        tcp_established: cli.tcp_established,
        ext_unix_sk: cli.ext_unix_sk,
        shell_job: cli.shell_job,
        file_locks: cli.file_locks,
        cgroups_mode: match cli.manage_cgroups_mode {
            CgroupsMode::Soft => container::CgroupsMode::Soft,
            CgroupsMode::Full => container::CgroupsMode::Full,
            CgroupsMode::Strict => container::CgroupsMode::Strict,
            CgroupsMode::Ignore => container::CgroupsMode::Ignore,
        },
        empty_network: !cli.empty_ns.is_empty(),
        auto_dedup: cli.auto_dedup,
        lazy_pages: cli.lazy_pages,
        page_server: cli.page_server.as_deref().map(str::parse).transpose()?,
        preload: match cli.preload {
            Preload::Auto => restore::preload::PreloadMode::Auto,
            Preload::On => restore::preload::PreloadMode::On,
            Preload::Off => restore::preload::PreloadMode::Off,
        },
        // runc takes an empty value for no value.
        lsm_profile: cli.lsm_profile.clone().filter(|p| !p.is_empty()),
        lsm_mount_context: cli.lsm_mount_context.clone().filter(|c| !c.is_empty()),
        skip_validation: cli.skip_validation,
    })
}

/// Sends logs to `--log` (appended) or stderr, as text or JSON lines; `--debug` shows the
/// restore's steps and CRIU's notifications.
fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;

    let writer = match &cli.log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("cannot open the log file {}: {e}", path.display()))?;
            BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let level = if cli.debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_max_level(level);
    match cli.log_format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Prints what a restore would do; 0 when it would go ahead, 1 when it would be refused or
/// cannot even be planned.
fn dry_run(options: &Options, json: bool) -> ExitCode {
    let plan = match restore::dry_run::plan(options) {
        Ok(plan) => plan,
        Err(error) => {
            eprintln!("restore: {:#}", anyhow::Error::new(error));
            return ExitCode::from(1);
        }
    };
    let text = if json {
        match serde_json::to_string_pretty(&plan) {
            Ok(text) => text + "\n",
            Err(error) => {
                eprintln!("restore: cannot encode the dry run: {error}");
                return ExitCode::from(2);
            }
        }
    } else {
        plan.text()
    };
    // A closed stdout is the reader's choice, not a failure of the dry run.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    if plan.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    if let Err(error) = init_logging(&cli) {
        eprintln!("restore: {error:#}");
        return ExitCode::from(2);
    }
    let options = match options(&cli) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("restore: {error:#}");
            return ExitCode::from(2);
        }
    };
    // A profile CRIU would refuse is a usage error, found before anything else.
    if let Some(profile) = &options.lsm_profile
        && let Err(error) = profile.parse::<restore::lsm::LsmProfile>()
    {
        eprintln!("restore: {error}");
        return ExitCode::from(2);
    }
    if cli.dry_run {
        return dry_run(&options, cli.json);
    }
    if !cli.no_subreaper
        && let Err(error) = lifecycle::become_subreaper()
    {
        eprintln!("restore: warning: cannot become a subreaper: {error}");
    }
    match container::restore(&options) {
        // Exit statuses are 0 to 255; anything else is reported as 255.
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(255)),
        Err(error) => {
            let error = anyhow::Error::new(error);
            // The error goes to stderr for the caller; a log file gets it as well.
            if cli.log.is_some() {
                tracing::error!(container = %options.id, "restore failed: {error:#}");
            }
            eprintln!("restore: {error:#}");
            ExitCode::from(1)
        }
    }
}
