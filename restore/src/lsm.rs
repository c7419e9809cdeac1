//! Offline rewriting of a checkpoint's LSM labels, into a shadow images directory.
//!
//! `runc restore --lsm-profile TYPE:LABEL` and `--lsm-mount-context CTX` ask for the restored
//! container to run under other labels than the ones it was dumped with, which a restore into
//! another pod or onto another host needs. CRIU can apply them itself (3.16 and newer), but it
//! applies a supplied SELinux label only since 4.1, and only to threads whose image already
//! holds a label. Rewriting the images instead works with any CRIU, also for a checkpoint
//! dumped without an LSM, and says beforehand exactly what changes.
//!
//! The user's images directory is never written. [`plan`] reads it and returns the changes as
//! a [`RewritePlan`]; [`write_shadow`] carries the same plan out into a new directory, where
//! the rewritten images are new files and everything else refers back to the original:
//!
//! ```text
//!  images/                                   shadow/
//!  inventory.img        --rewritten-->       inventory.img        lsmtype
//!  core-<tid>.img       --rewritten-->       core-<tid>.img       thread_core.creds.lsm_profile
//!  mountpoints-<id>.img --rewritten-->       mountpoints-<id>.img options: context="CTX"
//!  pages-1.img, descriptors.json, ... <----  hard links (absolute symlinks across file systems)
//!  parent -> ../dump-0                <----  parent -> /abs/path/dump-0
//! ```
//!
//! Edits are made on the protobuf wire. Only the messages on the path to a changed field are
//! re-encoded (`core_entry` -> `thread_core` -> `creds` -> `lsm_profile`); every other field
//! keeps its exact bytes, unknown fields included, and so do every other entry and payload.
//! A plan without changes is valid: the caller can then restore from the images as they are.
//!
//! # What CRIU does with the same options
//!
//! Read in CRIU's source (criu-dev, which matches 4.1.1 here):
//!
//! - `criu/config.c` (`--lsm-profile`, `--lsm-mount-context`) and `criu/cr-service.c`
//!   (`req->lsm_profile`, `req->lsm_mount_context`) store both strings verbatim; a profile
//!   also sets `lsm_supplied`.
//! - `criu/lsm.c` `lsm_check_opts`, run at the start of a restore, splits the profile at its
//!   first `:` (no `:` is "invalid argument %s for --lsm-profile"). The type is compared
//!   case-sensitively with `apparmor`, `selinux` and `none`; anything else is "unknown lsm %s".
//!   The label is the rest, colons included. `none` drops the label, whatever it is. A type
//!   other than the host's LSM is refused ("selinux LSM specified but selinux not supported by
//!   kernel").
//! - `criu/cr-restore.c` uses a supplied label only for a thread whose image holds a
//!   `lsm_profile`. For SELinux (`render_lsm_profile`, since commit ed6374b4 in 4.1) the
//!   supplied label replaces both the process label and, where the image has one, the
//!   sockcreate label. For AppArmor (`render_aa_profile` in `criu/apparmor.c`) a plain label
//!   becomes `changeprofile LABEL`; a label with namespaces or stacking is combined with the
//!   image's own profile, and the namespace policies are moved as well.
//! - `criu/lsm.c` `validate_lsm` refuses a thread with a profile when the inventory's
//!   `lsmtype` is neither `NO_LSM` nor the host's LSM.
//! - `criu/mount.c` `mount_update_lsm_context` changes only mounts whose options already hold
//!   `context=`. A quoted value is skipped to its closing quote (none is "Failed parsing mount
//!   option 'context'"), an unquoted one runs to the next `,`, and the options become
//!   `context="CTX"` followed by everything from that `,` on.
//!
//! The rewrite mirrors that, with four differences, each deliberate: the label goes to every
//! thread, also to threads dumped without one (what the option is for); an empty label or
//! mount context is refused rather than written; an AppArmor label with namespaces or stacking
//! is refused ([`LsmError::ApparmorNamespace`]), because its policies cannot be moved offline;
//! and only the option named exactly `context` is replaced, where CRIU's `strstr` would also
//! match inside `fscontext=`, `defcontext=` or `rootcontext=`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use criu_images::image::{self, Image, ImageError};
use criu_images::wire::{self, Value, WireError, WireType};
use nix::libc;
use serde::Serialize;
use thiserror::Error;

/// `inventory_entry.lsmtype` (enum lsmtype).
const INVENTORY_LSMTYPE: u32 = 6;
/// `core_entry.thread_core`.
const CORE_THREAD_CORE: u32 = 5;
/// `thread_core_entry.creds`.
const THREAD_CORE_CREDS: u32 = 10;
/// `creds_entry.lsm_profile`.
const CREDS_LSM_PROFILE: u32 = 15;
/// `creds_entry.lsm_sockcreate`.
const CREDS_LSM_SOCKCREATE: u32 = 16;
/// `mnt_entry.options`.
const MNT_OPTIONS: u32 = 9;

/// The option CRIU looks for in a mount's superblock options.
const CONTEXT_OPTION: &[u8] = b"context=";

/// The Linux security module a profile is meant for, as `--lsm-profile` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LsmKind {
    /// SELinux: the label is a context such as `system_u:system_r:container_t:s0`.
    Selinux,
    /// AppArmor: the label is a profile name.
    Apparmor,
    /// No LSM: the restored threads get no label.
    None,
}

impl LsmKind {
    /// The type as `--lsm-profile` spells it.
    pub fn name(self) -> &'static str {
        match self {
            LsmKind::Selinux => "selinux",
            LsmKind::Apparmor => "apparmor",
            LsmKind::None => "none",
        }
    }

    /// The inventory's `lsmtype` value for this kind (`NO_LSM` 0, `SELINUX` 1, `APPARMOR` 2).
    pub fn lsmtype(self) -> u64 {
        match self {
            LsmKind::None => 0,
            LsmKind::Selinux => 1,
            LsmKind::Apparmor => 2,
        }
    }
}

impl fmt::Display for LsmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name crit gives an `lsmtype` value, or the number for a value the enum lacks.
fn lsmtype_name(value: u64) -> String {
    match value {
        0 => "NO_LSM".to_owned(),
        1 => "SELINUX".to_owned(),
        2 => "APPARMOR".to_owned(),
        other => other.to_string(),
    }
}

/// A parsed `--lsm-profile TYPE:LABEL`.
///
/// Parsing follows CRIU's `lsm_check_opts` (see the module docs): the string is split at its
/// first `:`, the type is one of `selinux`, `apparmor` and `none` (case-sensitive), and the
/// label is the rest, colons included. A `none` profile keeps whatever label it was given, as
/// CRIU accepts one, but the label has no effect. Unlike CRIU, an empty SELinux or AppArmor
/// label is refused here: CRIU would accept it and then fail to write it at restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LsmProfile {
    /// The LSM the label is meant for.
    pub kind: LsmKind,
    /// The label, empty for `none:`.
    pub label: String,
}

impl FromStr for LsmProfile {
    type Err = LsmError;

    /// Parses `TYPE:LABEL`.
    ///
    /// # Errors
    ///
    /// [`LsmError::ProfileSyntax`] without a `:`, [`LsmError::UnknownLsm`] for a type other
    /// than `selinux`, `apparmor` and `none`, [`LsmError::EmptyLabel`] for `selinux:` or
    /// `apparmor:`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let Some((kind, label)) = value.split_once(':') else {
            return Err(LsmError::ProfileSyntax {
                value: value.to_owned(),
            });
        };

        let kind = match kind {
            "selinux" => LsmKind::Selinux,
            "apparmor" => LsmKind::Apparmor,
            "none" => LsmKind::None,
            other => {
                return Err(LsmError::UnknownLsm {
                    value: value.to_owned(),
                    kind: other.to_owned(),
                });
            }
        };
        if kind != LsmKind::None && label.is_empty() {
            return Err(LsmError::EmptyLabel {
                value: value.to_owned(),
            });
        }

        Ok(LsmProfile {
            kind,
            label: label.to_owned(),
        })
    }
}

impl fmt::Display for LsmProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.label)
    }
}

/// One field of one entry that the rewrite changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// File name of the image inside the images directory.
    pub image: String,
    /// Index of the entry in the image, from 0.
    pub entry: usize,
    /// The field, as a path from the entry's message: `thread_core.creds.lsm_profile`,
    /// `thread_core.creds.lsm_sockcreate`, `lsmtype` or `options`.
    pub field: &'static str,
    /// The value before: a string as it stands (an absent string field is empty), an
    /// `lsmtype` by its enum name.
    pub old: String,
    /// The value after, in the same form; empty when the field is removed.
    pub new: String,
}

/// Every change a rewrite makes, in image-name then entry order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct RewritePlan {
    /// The changes; none means the images can be used as they are.
    pub changes: Vec<Change>,
}

impl RewritePlan {
    /// Whether the plan changes nothing, so that no shadow images directory is needed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The file names of the images the plan rewrites, sorted, each once.
    pub fn images(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.changes.iter().map(|c| c.image.as_str()).collect();
        names.dedup();
        names
    }
}

/// Why an LSM profile or mount context could not be parsed, planned or written.
#[derive(Debug, Error)]
pub enum LsmError {
    /// The profile has no `:` between type and label.
    #[error(
        "invalid --lsm-profile {value:?}: expected TYPE:LABEL with TYPE selinux, apparmor or none"
    )]
    ProfileSyntax {
        /// The profile as given.
        value: String,
    },
    /// The profile's type is none CRIU knows.
    #[error(
        "unknown lsm {kind:?} in --lsm-profile {value:?}: the accepted types are selinux, \
         apparmor and none"
    )]
    UnknownLsm {
        /// The profile as given.
        value: String,
        /// The type before the first `:`.
        kind: String,
    },
    /// An SELinux or AppArmor profile without a label.
    #[error("--lsm-profile {value:?} has an empty label (none: asks for no profile)")]
    EmptyLabel {
        /// The profile as given.
        value: String,
    },
    /// An AppArmor label with namespaces or stacking, which CRIU combines with the image's
    /// own profile and whose namespace policies it moves; an image rewrite cannot do that.
    #[error(
        "apparmor label {label:?} names a namespace or a stack, which only CRIU can apply: \
         give it to CRIU instead of rewriting the images"
    )]
    ApparmorNamespace {
        /// The label.
        label: String,
    },
    /// A mount context that cannot be written as CRIU quotes it.
    #[error("invalid --lsm-mount-context {context:?}: it must be non-empty, without '\"' or NUL")]
    MountContext {
        /// The context as given.
        context: String,
    },
    /// An image or the images directory could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An image's framing is broken.
    #[error("corrupt image {path}")]
    Image {
        /// The image.
        path: PathBuf,
        /// What is wrong, with the entry index and offset.
        #[source]
        source: ImageError,
    },
    /// A file named like an image of one kind holds another kind.
    #[error("image {path} holds {found} entries, not {expected}")]
    WrongMagic {
        /// The image.
        path: PathBuf,
        /// The magic its name calls for.
        expected: &'static str,
        /// The magic it has.
        found: &'static str,
    },
    /// A message on the way to a field to change is not valid protobuf.
    #[error("image {path}, entry {entry} at offset {offset}: malformed {message}")]
    Malformed {
        /// The image.
        path: PathBuf,
        /// Index of the entry.
        entry: usize,
        /// Offset of the entry's size word.
        offset: usize,
        /// The message that is malformed.
        message: &'static str,
        /// What is wrong with it.
        #[source]
        source: WireError,
    },
    /// A field that should hold an embedded message holds a scalar.
    #[error("image {path}, entry {entry} at offset {offset}: {field} is not an embedded message")]
    WireType {
        /// The image.
        path: PathBuf,
        /// Index of the entry.
        entry: usize,
        /// Offset of the entry's size word.
        offset: usize,
        /// The field, as `message.field`.
        field: &'static str,
    },
    /// A thread's core entry has no credentials to hold a label.
    #[error(
        "image {path}, entry {entry} at offset {offset}: no thread_core.creds to hold the lsm \
         profile"
    )]
    NoCreds {
        /// The image.
        path: PathBuf,
        /// Index of the entry.
        entry: usize,
        /// Offset of the entry's size word.
        offset: usize,
    },
    /// A mount's `context=` option opens a quote it never closes.
    #[error(
        "image {path}, entry {entry} at offset {offset}: unterminated quote in the context= \
         option of {options:?}"
    )]
    MountOptions {
        /// The image.
        path: PathBuf,
        /// Index of the entry.
        entry: usize,
        /// Offset of the entry's size word.
        offset: usize,
        /// The mount's options.
        options: String,
    },
    /// The shadow images directory exists and holds something already, or is not a
    /// directory.
    #[error("shadow images directory {path} exists and is not an empty directory")]
    ShadowNotEmpty {
        /// The shadow images directory.
        path: PathBuf,
    },
    /// The shadow images directory or a file in it could not be created.
    #[error("cannot write {path}")]
    Write {
        /// The file, link or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Reads the images in `images` and returns every change rewriting them for `profile` and
/// `mount_context` would make, without writing anything.
///
/// With a profile, the inventory's `lsmtype` is set to the profile's LSM and every thread's
/// `creds.lsm_profile` (in each `core-<tid>.img`) to its label; for SELinux an existing
/// `lsm_sockcreate` gets the label too, as CRIU gives it; `none` removes both labels and sets
/// `NO_LSM`. With a mount context, the `context=` option of every mount in each
/// `mountpoints-<id>.img` that has one is set to `context="CTX"`. Values that already match
/// are no change. An empty plan is not an error.
///
/// The caller maps runc's empty `--lsm-profile ""` and `--lsm-mount-context ""` (which mean
/// "not given") to `None`.
///
/// # Errors
///
/// [`LsmError::ApparmorNamespace`] and [`LsmError::MountContext`] for options the rewrite
/// cannot apply; [`LsmError::Read`] for an unreadable directory or image (a missing
/// `inventory.img` included); [`LsmError::Image`], [`LsmError::WrongMagic`],
/// [`LsmError::Malformed`], [`LsmError::WireType`] and [`LsmError::MountOptions`] for corrupt
/// images; [`LsmError::NoCreds`] for a thread without credentials to label.
pub fn plan(
    images: &Path,
    profile: Option<&LsmProfile>,
    mount_context: Option<&str>,
) -> Result<RewritePlan, LsmError> {
    prepare(images, profile, mount_context).map(|prepared| prepared.plan)
}

/// Plans as [`plan`] does, then writes the result into `shadow`, a new images directory, and
/// returns the plan it carried out.
///
/// `shadow` must not exist yet (its parent must), or be an empty directory. The rewritten
/// images are new files there, with the originals' permissions. Every other entry of `images`
/// is linked: a file by a hard link, or by an absolute symlink to it where a hard link is
/// impossible (another file system); a directory by an absolute symlink; a symlink (such as
/// the `parent` link of an incremental dump) by an absolute symlink to the original's resolved
/// target, so that it points at the same place from its new directory. A shadow created here
/// gets the permissions of `images`. The original images are only read.
///
/// # Errors
///
/// Everything [`plan`] returns; [`LsmError::ShadowNotEmpty`] when `shadow` is in the way;
/// [`LsmError::Read`] for an entry of `images` that cannot be inspected; [`LsmError::Write`]
/// naming the path that could not be created. On an error, whatever this call created is
/// removed again.
pub fn write_shadow(
    images: &Path,
    shadow: &Path,
    profile: Option<&LsmProfile>,
    mount_context: Option<&str>,
) -> Result<RewritePlan, LsmError> {
    let prepared = prepare(images, profile, mount_context)?;

    let source = fs::canonicalize(images).map_err(read_error(images))?;
    let source_mode = fs::metadata(&source)
        .map_err(read_error(&source))?
        .permissions()
        .mode();
    // Listed before the shadow exists, so that a shadow inside the images directory is not
    // linked into itself.
    let listing = list(&source)?;

    let mut dir = ShadowDir::create(shadow, source_mode)?;
    let shadow_real = fs::canonicalize(&dir.path).map_err(read_error(&dir.path))?;
    for (name, bytes) in &prepared.images {
        let from = source.join(name);
        let mode = fs::metadata(&from)
            .map_err(read_error(&from))?
            .permissions()
            .mode();
        dir.write_image(name, bytes, mode)?;
    }
    for (name, file_type) in listing {
        if name
            .to_str()
            .is_some_and(|n| prepared.images.contains_key(n))
        {
            continue;
        }
        let from = source.join(&name);
        if file_type.is_dir() && fs::canonicalize(&from).is_ok_and(|real| real == shadow_real) {
            continue;
        }
        dir.link(&name, &from, file_type)?;
    }

    dir.finish();
    Ok(prepared.plan)
}

/// A plan with the rewritten images it was made from, keyed by file name.
struct Prepared {
    plan: RewritePlan,
    images: BTreeMap<String, Vec<u8>>,
}

/// Which images a rewrite touches.
#[derive(Clone, Copy)]
enum Target {
    Inventory,
    Core,
    Mounts,
}

impl Target {
    fn magic(self) -> &'static str {
        match self {
            Target::Inventory => "INVENTORY",
            Target::Core => "CORE",
            Target::Mounts => "MNTS",
        }
    }
}

/// Whether `name` is `<prefix><decimal>.img`.
fn is_numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(".img"))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks the options, reads the images they concern and computes both the plan and the
/// rewritten images, writing nothing; [`plan`] and [`write_shadow`] share it, so the plan
/// returned is exactly what is written.
fn prepare(
    images: &Path,
    profile: Option<&LsmProfile>,
    mount_context: Option<&str>,
) -> Result<Prepared, LsmError> {
    if let Some(profile) = profile {
        check_apparmor_label(profile)?;
    }
    if let Some(context) = mount_context
        && (context.is_empty() || context.contains(['"', '\0']))
    {
        return Err(LsmError::MountContext {
            context: context.to_owned(),
        });
    }

    let mut targets: Vec<(String, Target)> = Vec::new();
    if profile.is_some() || mount_context.is_some() {
        for (name, _) in list(images)? {
            let Some(name) = name.to_str() else { continue };
            if profile.is_some() && is_numbered(name, "core-") {
                targets.push((name.to_owned(), Target::Core));
            } else if mount_context.is_some() && is_numbered(name, "mountpoints-") {
                targets.push((name.to_owned(), Target::Mounts));
            }
        }
    }
    // The inventory is read even when the listing lacks it: a checkpoint without one is no
    // checkpoint, and its absence is worth an error naming the file.
    if profile.is_some() {
        targets.push(("inventory.img".to_owned(), Target::Inventory));
    }
    targets.sort_by(|a, b| a.0.cmp(&b.0));

    let mut prepared = Prepared {
        plan: RewritePlan::default(),
        images: BTreeMap::new(),
    };
    for (name, target) in targets {
        let path = images.join(&name);
        let data = fs::read(&path).map_err(read_error(&path))?;
        let edited = rewrite_image(&path, &data, target.magic(), |message| match target {
            Target::Inventory => profile.map_or(Ok(None), |p| edit_inventory(message, p.kind)),
            Target::Core => profile.map_or(Ok(None), |p| edit_core(message, p)),
            Target::Mounts => mount_context.map_or(Ok(None), |c| edit_mount(message, c)),
        })?;
        if let Some(RewrittenImage { bytes, changes }) = edited {
            prepared
                .plan
                .changes
                .extend(changes.into_iter().map(|(entry, change)| Change {
                    image: name.clone(),
                    entry,
                    field: change.field,
                    old: change.old,
                    new: change.new,
                }));
            prepared.images.insert(name, bytes);
        }
    }
    Ok(prepared)
}

/// Refuses AppArmor labels CRIU would treat as namespaced or stacked.
///
/// CRIU's `NEXT_AA_TOKEN` splits a label at `//&` (a stack) and `://` (a namespace's
/// profile), and a token that starts with `:` is a namespace; only a label that is one
/// profile token is applied as a plain `changeprofile LABEL`.
fn check_apparmor_label(profile: &LsmProfile) -> Result<(), LsmError> {
    let label = &profile.label;
    let plain = !label.starts_with(':') && !label.contains("//&") && !label.contains("://");
    if profile.kind == LsmKind::Apparmor && !plain {
        return Err(LsmError::ApparmorNamespace {
            label: label.clone(),
        });
    }
    Ok(())
}

fn read_error(path: &Path) -> impl FnOnce(io::Error) -> LsmError + '_ {
    move |source| LsmError::Read {
        path: path.to_owned(),
        source,
    }
}

fn write_error(path: &Path) -> impl FnOnce(io::Error) -> LsmError + '_ {
    move |source| LsmError::Write {
        path: path.to_owned(),
        source,
    }
}

/// The entries of a directory with their types (symlinks not followed), sorted by name.
fn list(dir: &Path) -> Result<Vec<(std::ffi::OsString, fs::FileType)>, LsmError> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_error(dir))? {
        let entry = entry.map_err(read_error(dir))?;
        let file_type = entry.file_type().map_err(read_error(&entry.path()))?;
        entries.push((entry.file_name(), file_type));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

// ---------------------------------------------------------------------------------------------
// Images and entries.

/// One field change inside an entry, before it is placed in its image.
#[derive(Debug, PartialEq, Eq)]
struct FieldChange {
    field: &'static str,
    old: String,
    new: String,
}

impl FieldChange {
    fn strings(field: &'static str, old: Option<&[u8]>, new: Option<&[u8]>) -> Self {
        let text = |v: Option<&[u8]>| String::from_utf8_lossy(v.unwrap_or_default()).into_owned();
        FieldChange {
            field,
            old: text(old),
            new: text(new),
        }
    }
}

/// An entry's new message and what changed in it.
type Edited = Option<(Vec<u8>, Vec<FieldChange>)>;

/// What is wrong inside one entry's message, before it is placed in its image.
#[derive(Debug, PartialEq, Eq)]
enum Fault {
    Wire {
        message: &'static str,
        source: WireError,
    },
    WireType {
        field: &'static str,
    },
    NoCreds,
    UnterminatedContext {
        options: String,
    },
}

impl Fault {
    fn place(self, path: &Path, entry: usize, offset: usize) -> LsmError {
        let path = path.to_owned();
        match self {
            Fault::Wire { message, source } => LsmError::Malformed {
                path,
                entry,
                offset,
                message,
                source,
            },
            Fault::WireType { field } => LsmError::WireType {
                path,
                entry,
                offset,
                field,
            },
            Fault::NoCreds => LsmError::NoCreds {
                path,
                entry,
                offset,
            },
            Fault::UnterminatedContext { options } => LsmError::MountOptions {
                path,
                entry,
                offset,
                options,
            },
        }
    }
}

fn malformed(message: &'static str) -> impl Fn(WireError) -> Fault {
    move |source| Fault::Wire { message, source }
}

/// Why [`image::rewrite`] stopped: the framing, or an edit.
enum RewriteFailure {
    Framing(ImageError),
    Edit(LsmError),
}

impl From<ImageError> for RewriteFailure {
    fn from(error: ImageError) -> Self {
        RewriteFailure::Framing(error)
    }
}

/// A rewritten image and its changes, by entry index.
struct RewrittenImage {
    bytes: Vec<u8>,
    changes: Vec<(usize, FieldChange)>,
}

/// Applies `edit` to every entry of the image `data`, which must be of kind `magic`; `None`
/// when nothing changed.
fn rewrite_image(
    path: &Path,
    data: &[u8],
    magic: &'static str,
    edit: impl Fn(&[u8]) -> Result<Edited, Fault>,
) -> Result<Option<RewrittenImage>, LsmError> {
    let framing = |source| LsmError::Image {
        path: path.to_owned(),
        source,
    };
    let image = Image::parse(data).map_err(framing)?;
    if image.magic_name() != magic {
        return Err(LsmError::WrongMagic {
            path: path.to_owned(),
            expected: magic,
            found: image.magic_name(),
        });
    }

    let mut changes = Vec::new();
    let bytes = image::rewrite::<RewriteFailure>(&image, |entry| {
        let edited = edit(entry.message)
            .map_err(|fault| RewriteFailure::Edit(fault.place(path, entry.index, entry.offset)))?;
        Ok(edited.map(|(message, fields)| {
            changes.extend(fields.into_iter().map(|field| (entry.index, field)));
            message
        }))
    })
    .map_err(|failure| match failure {
        RewriteFailure::Framing(source) => framing(source),
        RewriteFailure::Edit(error) => error,
    })?;

    Ok((!changes.is_empty()).then_some(RewrittenImage { bytes, changes }))
}

/// Sets the inventory's `lsmtype` to `kind`'s.
fn edit_inventory(message: &[u8], kind: LsmKind) -> Result<Edited, Fault> {
    let fields = spans(message).map_err(malformed("inventory_entry"))?;
    // CRIU reads an inventory without lsmtype as NO_LSM (criu/image.c), so an absent field
    // already says `none`.
    let old = last_varint(&fields, INVENTORY_LSMTYPE).unwrap_or(0);
    let new = kind.lsmtype();
    if old == new {
        return Ok(None);
    }

    let field = varint_field(INVENTORY_LSMTYPE, new);
    let change = FieldChange {
        field: "lsmtype",
        old: lsmtype_name(old),
        new: lsmtype_name(new),
    };
    Ok(Some((
        set_field(&fields, INVENTORY_LSMTYPE, Some(&field)),
        vec![change],
    )))
}

/// Sets one thread's `thread_core.creds.lsm_profile` (and `lsm_sockcreate`) for `profile`.
fn edit_core(message: &[u8], profile: &LsmProfile) -> Result<Edited, Fault> {
    let core = spans(message).map_err(malformed("core_entry"))?;
    let mut creds = Vec::new();
    for thread_core in embedded(&core, CORE_THREAD_CORE, "core_entry.thread_core")? {
        let thread_core = spans(thread_core).map_err(malformed("thread_core_entry"))?;
        creds.extend(embedded(
            &thread_core,
            THREAD_CORE_CREDS,
            "thread_core_entry.creds",
        )?);
    }

    // Repeated embedded messages merge, so the creds in effect are the concatenation of every
    // occurrence, and the last value of a field in it is the one CRIU reads.
    let merged = creds.concat();
    let merged = spans(&merged).map_err(malformed("creds_entry"))?;
    let old_profile = last_bytes(&merged, CREDS_LSM_PROFILE);
    let old_sockcreate = last_bytes(&merged, CREDS_LSM_SOCKCREATE);

    let label = Some(profile.label.as_bytes());
    let (new_profile, new_sockcreate) = match profile.kind {
        // CRIU gives a supplied SELinux label to the sockcreate attribute too, where the
        // image has one.
        LsmKind::Selinux => (label, old_sockcreate.and(label)),
        // sockcreate is an SELinux attribute; AppArmor has nothing to put there.
        LsmKind::Apparmor => (label, None),
        LsmKind::None => (None, None),
    };

    let mut changes = Vec::new();
    let mut edits: Vec<(u32, Option<Vec<u8>>)> = Vec::new();
    for (number, name, old, new) in [
        (
            CREDS_LSM_PROFILE,
            "thread_core.creds.lsm_profile",
            old_profile,
            new_profile,
        ),
        (
            CREDS_LSM_SOCKCREATE,
            "thread_core.creds.lsm_sockcreate",
            old_sockcreate,
            new_sockcreate,
        ),
    ] {
        if old != new {
            changes.push(FieldChange::strings(name, old, new));
            edits.push((number, new.map(|value| bytes_field(number, value))));
        }
    }
    if changes.is_empty() {
        return Ok(None);
    }
    if creds.is_empty() {
        return Err(Fault::NoCreds);
    }

    let rewritten = edit_embedded(&core, CORE_THREAD_CORE, |thread_core| {
        let thread_core = spans(thread_core).map_err(malformed("thread_core_entry"))?;
        edit_embedded(&thread_core, THREAD_CORE_CREDS, |creds| {
            let mut creds = creds.to_vec();
            for (number, field) in &edits {
                let fields = spans(&creds).map_err(malformed("creds_entry"))?;
                creds = set_field(&fields, *number, field.as_deref());
            }
            Ok(creds)
        })
    })?;
    Ok(Some((rewritten, changes)))
}

/// Sets the `context=` option of one mount's options, if it has one.
fn edit_mount(message: &[u8], context: &str) -> Result<Edited, Fault> {
    let fields = spans(message).map_err(malformed("mnt_entry"))?;
    let Some(options) = last_bytes(&fields, MNT_OPTIONS) else {
        return Ok(None);
    };
    let new =
        replace_context(options, context).map_err(|Unterminated| Fault::UnterminatedContext {
            options: String::from_utf8_lossy(options).into_owned(),
        })?;
    let Some(new) = new.filter(|new| new.as_slice() != options) else {
        return Ok(None);
    };

    let field = bytes_field(MNT_OPTIONS, &new);
    let change = FieldChange::strings("options", Some(options), Some(&new));
    Ok(Some((
        set_field(&fields, MNT_OPTIONS, Some(&field)),
        vec![change],
    )))
}

/// A quoted `context=` value without its closing quote.
#[derive(Debug, PartialEq, Eq)]
struct Unterminated;

/// Replaces the value of the `context=` option in a mount's options with `"context"`, as
/// CRIU's `mount_update_lsm_context` does; `None` when there is no such option.
///
/// The option is found at an option boundary only (the start, or after a `,` outside
/// quotes), so `fscontext=` and its kin are left alone.
fn replace_context(options: &[u8], context: &str) -> Result<Option<Vec<u8>>, Unterminated> {
    let Some(start) = context_option(options) else {
        return Ok(None);
    };
    let value = start + CONTEXT_OPTION.len();
    let rest = &options[value..];

    // Like CRIU: a value that opens a quote runs to the closing quote, any other to the next
    // comma; a lone `"` at the very end counts as unquoted.
    let value_end = if rest.first() == Some(&b'"') && rest.len() > 1 {
        let closing = rest[1..]
            .iter()
            .position(|&b| b == b'"')
            .ok_or(Unterminated)?;
        value + 1 + closing
    } else {
        value
    };
    let tail = options[value_end..]
        .iter()
        .position(|&b| b == b',')
        .map_or(&[][..], |comma| &options[value_end + comma..]);

    let mut out = Vec::with_capacity(value + context.len() + 2 + tail.len());
    out.extend_from_slice(&options[..value]);
    out.push(b'"');
    out.extend_from_slice(context.as_bytes());
    out.push(b'"');
    out.extend_from_slice(tail);
    Ok(Some(out))
}

/// Where the first option named `context` starts.
fn context_option(options: &[u8]) -> Option<usize> {
    let mut quoted = false;
    let mut option_start = true;
    for (i, &byte) in options.iter().enumerate() {
        if option_start && options[i..].starts_with(CONTEXT_OPTION) {
            return Some(i);
        }
        option_start = false;
        match byte {
            b'"' => quoted = !quoted,
            b',' if !quoted => option_start = true,
            _ => {}
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The wire: fields with the exact bytes that encode them.

/// One field of a message and the bytes that encode it, tag included.
#[derive(Debug)]
struct Span<'a> {
    number: u32,
    value: Value<'a>,
    raw: &'a [u8],
}

/// The fields of `message` in wire order, each with its own bytes, so that a field left alone
/// can be copied exactly as it was (non-minimal varints included).
fn spans(message: &[u8]) -> Result<Vec<Span<'_>>, WireError> {
    let mut out = Vec::new();
    let mut start = 0;
    for field in wire::fields(message) {
        let field = field?;
        // `fields` has just decoded this field from `start`, so measuring it again succeeds.
        let len = message
            .get(start..)
            .and_then(|rest| encoded_len(rest, &field.value))
            .ok_or(WireError::Varint { offset: start })?;
        out.push(Span {
            number: field.number,
            value: field.value,
            raw: &message[start..start + len],
        });
        start += len;
    }
    Ok(out)
}

/// How many bytes the field at the front of `rest`, whose value is `value`, takes.
fn encoded_len(rest: &[u8], value: &Value<'_>) -> Option<usize> {
    let (_, tag) = wire::read_varint(rest)?;
    let body = rest.get(tag..)?;
    let value_len = match value {
        Value::Varint(_) => wire::read_varint(body)?.1,
        Value::Fixed64(_) => 8,
        Value::Fixed32(_) => 4,
        Value::Bytes(bytes) => wire::read_varint(body)?.1 + bytes.len(),
    };
    Some(tag + value_len)
}

fn bytes_field(number: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    wire::write_tag(&mut out, number, WireType::LengthDelimited);
    wire::write_varint(&mut out, value.len() as u64);
    out.extend_from_slice(value);
    out
}

fn varint_field(number: u32, value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(11);
    wire::write_tag(&mut out, number, WireType::Varint);
    wire::write_varint(&mut out, value);
    out
}

/// The last length-delimited value of field `number` (protobuf's last-one-wins rule).
fn last_bytes<'a>(fields: &[Span<'a>], number: u32) -> Option<&'a [u8]> {
    fields.iter().rev().find_map(|span| match span.value {
        Value::Bytes(bytes) if span.number == number => Some(bytes),
        _ => None,
    })
}

/// The last varint value of field `number`.
fn last_varint(fields: &[Span<'_>], number: u32) -> Option<u64> {
    fields.iter().rev().find_map(|span| match span.value {
        Value::Varint(value) if span.number == number => Some(value),
        _ => None,
    })
}

/// The message with every occurrence of field `number` replaced by `field` (a whole encoded
/// field), or removed when `field` is `None`; every other field keeps its bytes.
///
/// An absent field is inserted before the first field with a higher number, where an encoder
/// writing fields in number order (protobuf-c, for these messages) puts it.
fn set_field(fields: &[Span<'_>], number: u32, field: Option<&[u8]>) -> Vec<u8> {
    let new = field.unwrap_or_default();
    let mut out = Vec::new();
    // A field that is there is replaced where it stands; only an absent one is inserted.
    let mut placed = fields.iter().any(|span| span.number == number);
    for span in fields {
        if span.number == number {
            out.extend_from_slice(new);
            continue;
        }
        if !placed && span.number > number {
            out.extend_from_slice(new);
            placed = true;
        }
        out.extend_from_slice(span.raw);
    }
    if !placed {
        out.extend_from_slice(new);
    }
    out
}

/// The bodies of every occurrence of the embedded message field `number`.
fn embedded<'a>(
    fields: &[Span<'a>],
    number: u32,
    name: &'static str,
) -> Result<Vec<&'a [u8]>, Fault> {
    fields
        .iter()
        .filter(|span| span.number == number)
        .map(|span| match span.value {
            Value::Bytes(body) => Ok(body),
            _ => Err(Fault::WireType { field: name }),
        })
        .collect()
}

/// The message with the body of every occurrence of embedded message field `number` replaced
/// by `edit`'s result, re-framed with its new length; every other field keeps its bytes.
fn edit_embedded(
    fields: &[Span<'_>],
    number: u32,
    mut edit: impl FnMut(&[u8]) -> Result<Vec<u8>, Fault>,
) -> Result<Vec<u8>, Fault> {
    let mut out = Vec::new();
    for span in fields {
        match span.value {
            Value::Bytes(body) if span.number == number => {
                out.extend_from_slice(&bytes_field(number, &edit(body)?));
            }
            _ => out.extend_from_slice(span.raw),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The shadow images directory.

/// The shadow images directory while it is filled. Dropped before [`ShadowDir::finish`], it
/// removes what it created: the whole directory if it made it, else the entries it added.
struct ShadowDir {
    path: PathBuf,
    created_dir: bool,
    created: Vec<PathBuf>,
    finished: bool,
}

impl ShadowDir {
    /// Takes `path` as the shadow: creates it with `mode`, or accepts it as an empty
    /// directory.
    fn create(path: &Path, mode: u32) -> Result<Self, LsmError> {
        let mut dir = ShadowDir {
            path: path.to_owned(),
            created_dir: false,
            created: Vec::new(),
            finished: false,
        };
        match fs::symlink_metadata(path) {
            Ok(meta) => {
                let empty = meta.is_dir()
                    && fs::read_dir(path)
                        .map_err(read_error(path))?
                        .next()
                        .is_none();
                if !empty {
                    return Err(LsmError::ShadowNotEmpty {
                        path: path.to_owned(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(path).map_err(write_error(path))?;
                dir.created_dir = true;
                // The shadow holds the same data as the images, so it is as closed as they are.
                fs::set_permissions(path, Permissions::from_mode(mode & 0o7777))
                    .map_err(write_error(path))?;
            }
            Err(e) => return Err(read_error(path)(e)),
        }
        Ok(dir)
    }

    /// Writes a rewritten image as a new file with the original's `mode`.
    fn write_image(&mut self, name: &str, bytes: &[u8], mode: u32) -> Result<(), LsmError> {
        let path = self.path.join(name);
        let mut file: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o7777)
            .open(&path)
            .map_err(write_error(&path))?;
        self.created.push(path.clone());

        file.write_all(bytes).map_err(write_error(&path))?;
        // `mode` at open is narrowed by the umask; the image gets exactly the original's.
        file.set_permissions(Permissions::from_mode(mode & 0o7777))
            .map_err(write_error(&path))
    }

    /// Makes `name` in the shadow refer to `from`, an entry of the images directory.
    fn link(
        &mut self,
        name: &std::ffi::OsStr,
        from: &Path,
        file_type: fs::FileType,
    ) -> Result<(), LsmError> {
        let to = self.path.join(name);
        if file_type.is_symlink() {
            let target = link_target(from)?;
            symlink(&target, &to).map_err(write_error(&to))?;
        } else if file_type.is_dir() {
            symlink(from, &to).map_err(write_error(&to))?;
        } else {
            match fs::hard_link(from, &to) {
                Ok(()) => {}
                Err(e) if cannot_hard_link(&e) => {
                    symlink(from, &to).map_err(write_error(&to))?;
                }
                Err(e) => return Err(write_error(&to)(e)),
            }
        }
        self.created.push(to);
        Ok(())
    }

    /// Keeps everything written.
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for ShadowDir {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The error that stopped the write is what the caller gets; a failed cleanup is only
        // worth a trace.
        if self.created_dir {
            if let Err(error) = fs::remove_dir_all(&self.path) {
                tracing::debug!(path = %self.path.display(), %error, "shadow cleanup failed");
            }
            return;
        }
        for path in self.created.iter().rev() {
            if let Err(error) = fs::remove_file(path) {
                tracing::debug!(path = %path.display(), %error, "shadow cleanup failed");
            }
        }
    }
}

/// Whether a hard link failed because none is possible there, rather than for a reason a
/// symlink would share: another file system, one without hard links, or too many links.
fn cannot_hard_link(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EXDEV | libc::EPERM | libc::EMLINK | libc::EOPNOTSUPP)
    )
}

/// Where the symlink `link` points, as an absolute path valid from any directory: its
/// resolved target, or for a dangling link its target made absolute against the link's
/// directory, so that it still names the same place.
fn link_target(link: &Path) -> Result<PathBuf, LsmError> {
    match fs::canonicalize(link) {
        Ok(target) => Ok(target),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let target = fs::read_link(link).map_err(read_error(link))?;
            let dir = link.parent().unwrap_or(Path::new("/"));
            Ok(dir.join(target))
        }
        Err(e) => Err(read_error(link)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn profile(value: &str) -> LsmProfile {
        value.parse().expect("valid profile")
    }

    // -- profiles -------------------------------------------------------------------------

    #[test]
    fn profiles_parse_as_criu_splits_them() {
        let selinux = profile("selinux:system_u:system_r:container_t:s0:c1,c2");
        assert_eq!(selinux.kind, LsmKind::Selinux);
        assert_eq!(selinux.label, "system_u:system_r:container_t:s0:c1,c2");
        assert_eq!(
            selinux.to_string(),
            "selinux:system_u:system_r:container_t:s0:c1,c2"
        );

        let apparmor = profile("apparmor:docker-default");
        assert_eq!(apparmor.kind, LsmKind::Apparmor);
        assert_eq!(apparmor.label, "docker-default");

        let none = profile("none:");
        assert_eq!((none.kind, none.label.as_str()), (LsmKind::None, ""));
        assert_eq!(none.to_string(), "none:");
        // CRIU accepts a label after none and ignores it.
        assert_eq!(profile("none:anything").kind, LsmKind::None);
    }

    #[test]
    fn bad_profiles_are_refused_by_variant() {
        for value in ["", "selinux", "container_t"] {
            let error = value.parse::<LsmProfile>();
            assert!(
                matches!(&error, Err(LsmError::ProfileSyntax { value: v }) if v == value),
                "{value:?}: {error:?}"
            );
        }
        for (value, kind) in [("smack:x", "smack"), ("SELinux:x", "SELinux"), (":x", "")] {
            match value.parse::<LsmProfile>() {
                Err(LsmError::UnknownLsm { value: v, kind: k }) => {
                    assert_eq!((v.as_str(), k.as_str()), (value, kind));
                }
                other => panic!("{value:?}: {other:?}"),
            }
        }
        for value in ["selinux:", "apparmor:"] {
            assert!(
                matches!(
                    value.parse::<LsmProfile>(),
                    Err(LsmError::EmptyLabel { .. })
                ),
                "{value:?}"
            );
        }

        let message = "smack:x"
            .parse::<LsmProfile>()
            .expect_err("bad")
            .to_string();
        assert!(message.contains("\"smack\""), "{message}");
        assert!(message.contains("selinux, apparmor and none"), "{message}");
    }

    #[test]
    fn namespaced_apparmor_labels_are_refused() {
        for label in [":ns:profile", "a//&b", "a://b"] {
            let p = profile(&format!("apparmor:{label}"));
            let error = check_apparmor_label(&p);
            assert!(
                matches!(&error, Err(LsmError::ApparmorNamespace { label: l }) if l == label),
                "{label}: {error:?}"
            );
        }
        // Child profiles and hats are one token; SELinux labels are never AppArmor's business.
        assert!(check_apparmor_label(&profile("apparmor:parent//hat")).is_ok());
        assert!(check_apparmor_label(&profile("selinux:a:b://c")).is_ok());
    }

    // -- the wire ---------------------------------------------------------------------------

    fn varint(number: u32, value: u64) -> Vec<u8> {
        varint_field(number, value)
    }

    fn bytes(number: u32, value: &[u8]) -> Vec<u8> {
        bytes_field(number, value)
    }

    /// An unknown field 99 with a non-minimal tag varint (`0x98 0x86 0x00` is 792 padded to
    /// three bytes), which a re-encoder would shorten.
    const PADDED_UNKNOWN: &[u8] = &[0x98, 0x86, 0x00, 0x2a];

    /// creds_entry { uid 1000, secbits 0, `extra`, no_new_privs 1, <unknown 40 bytes>,
    /// <unknown 99> }, in number order as CRIU writes it, unknown fields (a newer CRIU's) last.
    fn creds(extra: &[u8]) -> Vec<u8> {
        [
            varint(1, 1000),
            varint(13, 0),
            extra.to_vec(),
            varint(18, 1),
            bytes(40, b"opaque"),
            PADDED_UNKNOWN.to_vec(),
        ]
        .concat()
    }

    /// core_entry { mtype 1, <unknown 50>, thread_core { futex_rla 0, creds, <unknown fixed32
    /// 77>, comm }, tc { ... } }
    fn core(creds: &[u8]) -> Vec<u8> {
        let mut unknown_fixed = Vec::new();
        wire::write_tag(&mut unknown_fixed, 77, WireType::Fixed32);
        unknown_fixed.extend_from_slice(&7u32.to_le_bytes());
        let thread_core = [
            varint(1, 0),
            bytes(10, creds),
            unknown_fixed,
            bytes(13, b"sh"),
        ]
        .concat();
        [
            varint(1, 1),
            bytes(50, b"future"),
            bytes(5, &thread_core),
            bytes(3, &varint(1, 4)),
        ]
        .concat()
    }

    #[test]
    fn spans_keep_each_field_exact_bytes() {
        let message = creds(&[]);
        let fields = spans(&message).expect("valid");
        let numbers: Vec<u32> = fields.iter().map(|s| s.number).collect();
        assert_eq!(numbers, [1, 13, 18, 40, 99]);
        assert_eq!(fields[4].raw, PADDED_UNKNOWN);
        let joined: Vec<u8> = fields.iter().flat_map(|s| s.raw.iter().copied()).collect();
        assert_eq!(joined, message);

        assert!(matches!(
            spans(&message[..message.len() - 1]),
            Err(WireError::Varint { .. } | WireError::Truncated { .. })
        ));
    }

    #[test]
    fn setting_a_profile_inserts_only_that_field() {
        let label = "system_u:system_r:container_t:s0";
        let (rewritten, changes) =
            edit_core(&core(&creds(&[])), &profile(&format!("selinux:{label}")))
                .expect("edits")
                .expect("a change");

        // The new field sits before no_new_privs (18); every other byte, the unknown fields
        // and the padded tag included, is as it was.
        let expected = core(&creds(&bytes(15, label.as_bytes())));
        assert_eq!(rewritten, expected);
        assert_eq!(
            changes,
            [FieldChange {
                field: "thread_core.creds.lsm_profile",
                old: String::new(),
                new: label.to_owned(),
            }]
        );
    }

    #[test]
    fn replacing_and_removing_a_profile_touch_only_the_labels() {
        let dumped = [
            bytes(15, b"old_u:old_r:old_t:s0"),
            bytes(16, b"sock_u:sock_r:sock_t:s0"),
        ]
        .concat();
        let original = core(&creds(&dumped));

        let (selinux, changes) = edit_core(&original, &profile("selinux:new_u:new_r:new_t:s0"))
            .expect("edits")
            .expect("a change");
        let both = [
            bytes(15, b"new_u:new_r:new_t:s0"),
            bytes(16, b"new_u:new_r:new_t:s0"),
        ]
        .concat();
        assert_eq!(selinux, core(&creds(&both)));
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[1].field, "thread_core.creds.lsm_sockcreate");
        assert_eq!(changes[1].old, "sock_u:sock_r:sock_t:s0");

        let (apparmor, _) = edit_core(&original, &profile("apparmor:container-default"))
            .expect("edits")
            .expect("a change");
        assert_eq!(apparmor, core(&creds(&bytes(15, b"container-default"))));

        let (none, changes) = edit_core(&original, &profile("none:"))
            .expect("edits")
            .expect("a change");
        assert_eq!(none, core(&creds(&[])));
        assert_eq!(changes[0].new, "");

        // The same label again changes nothing.
        let same = core(&creds(&bytes(15, b"a:b:c:s0")));
        assert_eq!(edit_core(&same, &profile("selinux:a:b:c:s0")), Ok(None));
    }

    #[test]
    fn a_thread_without_creds_cannot_take_a_label() {
        let bare = [varint(1, 1), bytes(5, &varint(1, 0))].concat();
        assert_eq!(
            edit_core(&bare, &profile("selinux:a:b:c:s0")),
            Err(Fault::NoCreds)
        );
        assert_eq!(edit_core(&bare, &profile("none:")), Ok(None));

        let scalar = [varint(1, 1), varint(5, 3)].concat();
        assert_eq!(
            edit_core(&scalar, &profile("selinux:a:b:c:s0")),
            Err(Fault::WireType {
                field: "core_entry.thread_core"
            })
        );
        let cut = core(&creds(&[]));
        assert!(matches!(
            edit_core(&cut[..cut.len() - 2], &profile("none:")),
            Err(Fault::Wire {
                message: "core_entry",
                ..
            })
        ));
    }

    #[test]
    fn repeated_thread_cores_all_take_the_label() {
        // Repeated embedded messages merge; the label must win in the merged creds too.
        let first = bytes(5, &bytes(10, &bytes(15, b"x")));
        let second = bytes(5, &bytes(10, &varint(1, 0)));
        let message = [varint(1, 1), first, second].concat();
        let (rewritten, _) = edit_core(&message, &profile("selinux:y"))
            .expect("edits")
            .expect("a change");
        let expected = [
            varint(1, 1),
            bytes(5, &bytes(10, &bytes(15, b"y"))),
            bytes(5, &bytes(10, &[varint(1, 0), bytes(15, b"y")].concat())),
        ]
        .concat();
        assert_eq!(rewritten, expected);
    }

    #[test]
    fn inventory_lsmtype_follows_the_profile() {
        let inventory = [
            varint(1, 2),
            varint(6, 0),
            bytes(42, b"unknown"),
            varint(8, 9),
        ]
        .concat();
        let (rewritten, changes) = edit_inventory(&inventory, LsmKind::Selinux)
            .expect("edits")
            .expect("a change");
        assert_eq!(
            rewritten,
            [
                varint(1, 2),
                varint(6, 1),
                bytes(42, b"unknown"),
                varint(8, 9)
            ]
            .concat()
        );
        assert_eq!(
            (changes[0].old.as_str(), changes[0].new.as_str()),
            ("NO_LSM", "SELINUX")
        );
        assert_eq!(edit_inventory(&inventory, LsmKind::None), Ok(None));

        // An absent lsmtype is NO_LSM to CRIU; APPARMOR is inserted before field 8.
        let absent = [varint(1, 2), varint(8, 9)].concat();
        assert_eq!(edit_inventory(&absent, LsmKind::None), Ok(None));
        let (rewritten, _) = edit_inventory(&absent, LsmKind::Apparmor)
            .expect("edits")
            .expect("a change");
        assert_eq!(
            rewritten,
            [varint(1, 2), varint(6, 2), varint(8, 9)].concat()
        );
    }

    // -- mount contexts ---------------------------------------------------------------------

    fn replaced(options: &str) -> Option<String> {
        replace_context(options.as_bytes(), "system_u:object_r:new_t:s0:c1,c2")
            .expect("terminated")
            .map(|o| String::from_utf8(o).expect("utf-8"))
    }

    #[test]
    fn context_is_replaced_and_quoted_as_criu_does() {
        let new = "context=\"system_u:object_r:new_t:s0:c1,c2\"";
        assert_eq!(
            replaced("context=\"system_u:object_r:container_file_t:s0:c82,c137\",inode64"),
            Some(format!("{new},inode64"))
        );
        assert_eq!(
            replaced("rw,context=system_u:object_r:old_t:s0,size=65536k,mode=755"),
            Some(format!("rw,{new},size=65536k,mode=755"))
        );
        assert_eq!(
            replaced("size=1k,context=old_t"),
            Some(format!("size=1k,{new}"))
        );
        assert_eq!(replaced("context=\"a,b\""), Some(new.to_owned()));
        // A lone quote at the end is an unquoted value to CRIU.
        assert_eq!(
            replaced("mode=755,context=\""),
            Some(format!("mode=755,{new}"))
        );
        // Only the option named context, not fscontext and its kin.
        assert_eq!(
            replaced("fscontext=a:b:c:s0,context=\"x:y:z:s0\",defcontext=d:e:f:s0"),
            Some(format!("fscontext=a:b:c:s0,{new},defcontext=d:e:f:s0"))
        );
    }

    #[test]
    fn options_without_context_stay_as_they_are() {
        for options in [
            "",
            "size=65536k,mode=755",
            "fscontext=a:b:c:s0",
            "x=\"a,context=b\"",
        ] {
            assert_eq!(replaced(options), None, "{options:?}");
        }
        assert_eq!(
            replace_context(b"rw,context=\"abc,inode64", "x"),
            Err(Unterminated)
        );
    }

    #[test]
    fn a_mount_entry_changes_only_its_options() {
        let entry = [
            varint(1, 5),
            bytes(7, b"/dev/shm"),
            bytes(9, b"context=\"old\",size=1k"),
            bytes(60, b"unknown"),
        ]
        .concat();
        let (rewritten, changes) = edit_mount(&entry, "new").expect("edits").expect("a change");
        let expected = [
            varint(1, 5),
            bytes(7, b"/dev/shm"),
            bytes(9, b"context=\"new\",size=1k"),
            bytes(60, b"unknown"),
        ]
        .concat();
        assert_eq!(rewritten, expected);
        assert_eq!(changes[0].old, "context=\"old\",size=1k");
        assert_eq!(edit_mount(&expected, "new"), Ok(None));

        let broken = bytes(9, b"context=\"old");
        assert!(matches!(
            edit_mount(&broken, "new"),
            Err(Fault::UnterminatedContext { .. })
        ));
    }

    #[test]
    fn bad_mount_contexts_are_refused_before_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        for context in ["", "a\"b", "a\0b"] {
            assert!(
                matches!(
                    plan(dir.path(), None, Some(context)),
                    Err(LsmError::MountContext { .. })
                ),
                "{context:?}"
            );
        }
        // With nothing asked there is nothing to read, not even an inventory.
        assert_eq!(
            plan(dir.path(), None, None).expect("empty plan"),
            RewritePlan::default()
        );
        assert!(matches!(
            plan(dir.path(), Some(&profile("none:")), None),
            Err(LsmError::Read { path, .. }) if path.ends_with("inventory.img")
        ));
    }

    // -- the shadow directory ---------------------------------------------------------------

    #[test]
    fn an_unfinished_shadow_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shadow");
        {
            let mut shadow = ShadowDir::create(&path, 0o700).expect("created");
            shadow
                .write_image("core-1.img", b"abc", 0o600)
                .expect("written");
            assert_eq!(fs::read(path.join("core-1.img")).expect("file"), b"abc");
            assert_eq!(fs::metadata(&path).expect("dir").mode() & 0o777, 0o700);
        }
        assert!(!path.exists(), "a shadow this call made is removed whole");

        fs::create_dir(&path).expect("empty dir");
        {
            let mut shadow = ShadowDir::create(&path, 0o700).expect("accepted");
            shadow
                .write_image("inventory.img", b"x", 0o644)
                .expect("written");
        }
        assert!(path.is_dir(), "a directory the caller made stays");
        assert_eq!(
            fs::read_dir(&path).expect("dir").count(),
            0,
            "but loses what was added"
        );

        fs::write(path.join("other"), b"").expect("file");
        assert!(matches!(
            ShadowDir::create(&path, 0o700),
            Err(LsmError::ShadowNotEmpty { .. })
        ));
        assert!(matches!(
            ShadowDir::create(&path.join("other"), 0o700),
            Err(LsmError::ShadowNotEmpty { .. })
        ));
        assert!(path.join("other").exists());
    }

    #[test]
    fn files_on_another_file_system_are_symlinked() {
        let shm = Path::new("/dev/shm");
        let Ok(images) = tempfile::tempdir_in(shm) else {
            println!("skipped: /dev/shm is not writable");
            return;
        };
        let target = tempfile::tempdir().expect("tempdir");
        let images_dev = fs::metadata(images.path()).expect("dir").dev();
        if images_dev == fs::metadata(target.path()).expect("dir").dev() {
            println!("skipped: /dev/shm and the temporary directory share a file system");
            return;
        }

        fs::write(images.path().join("pages-1.img"), b"pages").expect("file");
        let shadow = target.path().join("shadow");
        let done = write_shadow(images.path(), &shadow, None, None).expect("shadow");
        assert!(done.is_empty());

        let link = shadow.join("pages-1.img");
        assert!(
            fs::symlink_metadata(&link)
                .expect("entry")
                .file_type()
                .is_symlink()
        );
        let points_to = fs::read_link(&link).expect("link");
        assert!(points_to.is_absolute(), "{}", points_to.display());
        assert_eq!(fs::read(&link).expect("through the link"), b"pages");
    }
}
