//! The container's mount points, prepared the way runc prepares them for CRIU.
//!
//! CRIU restores the container's mounts onto the rootfs, and fails when a mount point is
//! missing there, which happens whenever the rootfs is not the one the container ran on (a
//! fresh copy on another host, an image layer without the directories runc made at start).
//! runc therefore creates every mount point before CRIU runs, as `runc create` would, and so
//! does [`create_mountpoints`].
//!
//! Destinations are resolved with [`resolve_in_root`], which follows symlinks as the
//! container would see them: never out of the rootfs. The same resolved path is the key of
//! the bind mount in CRIU's external mount map, because runc used it as the key at dump.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use oci_spec::runtime::Mount;
use thiserror::Error;

/// How many symlinks one path may pass through before it is taken for a loop (Linux stops
/// at 40 per lookup; a rootfs path may cross several lookups' worth).
const MAX_LINKS: usize = 255;

/// Why the container's mount points could not be prepared.
#[derive(Debug, Error)]
pub enum MountError {
    /// A destination passes through too many symlinks.
    #[error("mount destination {destination}: too many symlinks (a loop?) inside the rootfs")]
    SymlinkLoop {
        /// The destination as the config names it.
        destination: PathBuf,
    },
    /// A destination could not be resolved inside the rootfs.
    #[error("mount destination {destination}: cannot resolve {path}")]
    Resolve {
        /// The destination as the config names it.
        destination: PathBuf,
        /// The rootfs path that failed.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A bind mount's source is missing or unreadable.
    #[error(
        "bind mount source {source_path} of {destination} is missing: create it or remove the \
         mount from config.json"
    )]
    MissingSource {
        /// The source on the host.
        source_path: PathBuf,
        /// The destination in the container.
        destination: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A mount point could not be created.
    #[error("cannot create the mount point for {destination} at {path}")]
    Create {
        /// The destination in the container.
        destination: PathBuf,
        /// The rootfs path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A bind source could not be mounted on its destination for the time of preparation.
    #[error("cannot bind-mount {source_path} on {path} to create the mount points below it")]
    Bind {
        /// The source on the host.
        source_path: PathBuf,
        /// The rootfs path.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// Whether the mount is a bind mount, by its type or its options (runc accepts both).
pub fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// The absolute path `path` names inside `root`, with every symlink on the way resolved as
/// if `root` were `/`: an absolute link target starts again at `root`, and `..` never climbs
/// above it. Components that do not exist are kept as they are, since they are about to be
/// created.
///
/// # Errors
///
/// [`MountError::SymlinkLoop`], or [`MountError::Resolve`] when a component cannot be
/// inspected (a regular file in the middle of the path, a permission error).
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, MountError> {
    let mut pending: VecDeque<OsString> = normal_components(path).collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let host: PathBuf = std::iter::once(root.as_os_str())
            .chain(resolved.iter().map(OsString::as_os_str))
            .chain(std::iter::once(name.as_os_str()))
            .collect();
        let meta = match fs::symlink_metadata(&host) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                resolved.push(name);
                continue;
            }
            Err(source) => {
                return Err(MountError::Resolve {
                    destination: path.to_path_buf(),
                    path: host,
                    source,
                });
            }
        };
        if !meta.file_type().is_symlink() {
            resolved.push(name);
            continue;
        }

        links += 1;
        if links > MAX_LINKS {
            return Err(MountError::SymlinkLoop {
                destination: path.to_path_buf(),
            });
        }
        let target = fs::read_link(&host).map_err(|source| MountError::Resolve {
            destination: path.to_path_buf(),
            path: host.clone(),
            source,
        })?;
        if target.is_absolute() {
            resolved.clear();
        }
        // The link's components are walked before the rest of the path.
        for component in normal_components(&target)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            pending.push_front(component);
        }
    }
    Ok(std::iter::once(OsString::from("/"))
        .chain(resolved)
        .collect())
}

/// The names and `..` of a path, without its root and `.` components.
fn normal_components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(name) => Some(name.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

/// Bind mounts made for the time of preparation, unmounted (lazily, newest first) when
/// dropped.
#[derive(Default)]
struct TemporaryBinds(Vec<PathBuf>);

impl Drop for TemporaryBinds {
    fn drop(&mut self) {
        for path in self.0.drain(..).rev() {
            let _ = umount2(&path, MntFlags::MNT_DETACH);
        }
    }
}

/// Creates every missing mount point of `mounts` in `rootfs`, as runc does before a restore:
/// a directory for every mount, except an empty file for a bind mount of a file. Mounts of
/// type `cgroup` and mounts below a `tmpfs` mount are skipped, since CRIU restores those
/// itself. A bind mount with other mounts below it is mounted for the time of preparation,
/// so their mount points are made where the container will see them: in its source.
///
/// # Errors
///
/// A destination that cannot be resolved, a bind mount source that is missing, or a mount
/// point that cannot be created.
pub fn create_mountpoints(rootfs: &Path, mounts: &[Mount]) -> Result<(), MountError> {
    let tmpfs = tmpfs_destinations(mounts);
    let mut binds = TemporaryBinds::default();

    for m in mounts {
        let destination = m.destination();
        // Resolved one mount at a time: a bind mount made for an earlier one changes where
        // a later destination leads.
        let Some(host) = mountpoint_in_rootfs(rootfs, m, &tmpfs)? else {
            continue;
        };

        let bind_source = m.source().as_ref().filter(|_| is_bind(m));
        let is_file = match bind_source {
            Some(source) => match fs::metadata(source) {
                Ok(meta) => !meta.is_dir(),
                Err(error) => {
                    return Err(MountError::MissingSource {
                        source_path: source.clone(),
                        destination: destination.clone(),
                        source: error,
                    });
                }
            },
            None => false,
        };
        create_mountpoint(&host, is_file).map_err(|source| MountError::Create {
            destination: destination.clone(),
            path: host.clone(),
            source,
        })?;

        let has_mounts_below = mounts
            .iter()
            .any(|o| o.destination() != destination && o.destination().starts_with(destination));
        if let Some(source) = bind_source.filter(|_| has_mounts_below && !is_file) {
            mount(
                Some(source.as_path()),
                &host,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|error| MountError::Bind {
                source_path: source.clone(),
                path: host.clone(),
                source: error,
            })?;
            binds.0.push(host);
        }
    }
    Ok(())
}

/// The destinations of the `tmpfs` mounts, below which CRIU restores the contents itself.
fn tmpfs_destinations(mounts: &[Mount]) -> Vec<&Path> {
    mounts
        .iter()
        .filter(|m| m.typ().as_deref() == Some("tmpfs"))
        .map(|m| m.destination().as_path())
        .collect()
}

/// Where the mount point of `m` is in `rootfs`, or `None` for the mounts whose points are
/// CRIU's to make (cgroup mounts, mounts below a tmpfs) and for a mount on `/`.
fn mountpoint_in_rootfs(
    rootfs: &Path,
    m: &Mount,
    tmpfs: &[&Path],
) -> Result<Option<PathBuf>, MountError> {
    let destination = m.destination();
    let below_tmpfs = tmpfs
        .iter()
        .any(|t| *t != destination && destination.starts_with(t));
    if m.typ().as_deref() == Some("cgroup") || below_tmpfs {
        return Ok(None);
    }
    let inside = resolve_in_root(rootfs, destination)?;
    let relative = inside.strip_prefix("/").unwrap_or(&inside);
    if relative.as_os_str().is_empty() {
        return Ok(None);
    }
    Ok(Some(rootfs.join(relative)))
}

/// A mount point that a restore would create.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MissingMountpoint {
    /// The mount's destination in the container.
    pub destination: PathBuf,
    /// Where it would be made.
    pub path: PathBuf,
    /// Whether it would be a file (a bind mount of a file) rather than a directory.
    pub file: bool,
}

/// The mount points [`create_mountpoints`] would create, without creating anything. Mount
/// points below a bind mount are listed where they are in the rootfs, not in the bind
/// source where they would really be made.
///
/// # Errors
///
/// As [`create_mountpoints`], for destinations that cannot be resolved or missing sources.
pub fn missing_mountpoints(
    rootfs: &Path,
    mounts: &[Mount],
) -> Result<Vec<MissingMountpoint>, MountError> {
    let tmpfs = tmpfs_destinations(mounts);
    let mut missing = Vec::new();
    for m in mounts {
        let destination = m.destination();
        let Some(path) = mountpoint_in_rootfs(rootfs, m, &tmpfs)? else {
            continue;
        };
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        let file = match m.source().as_ref().filter(|_| is_bind(m)) {
            Some(source) => fs::metadata(source).is_ok_and(|meta| !meta.is_dir()),
            None => false,
        };
        missing.push(MissingMountpoint {
            destination: destination.clone(),
            path,
            file,
        });
    }
    Ok(missing)
}

/// Creates a directory, or an empty file with its parent directories, unless something is
/// there already.
fn create_mountpoint(path: &Path, is_file: bool) -> io::Result<()> {
    if fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    if !is_file {
        return fs::create_dir_all(path);
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        fs::create_dir_all(root.join("srv/data")).expect("dirs");
        symlink("/srv", root.join("absolute")).expect("link");
        symlink("srv", root.join("relative")).expect("link");
        symlink("../../../../srv", root.join("climbing")).expect("link");
        symlink("loop-b", root.join("loop-a")).expect("link");
        symlink("loop-a", root.join("loop-b")).expect("link");

        let resolve = |p: &str| resolve_in_root(root, Path::new(p)).expect(p);
        assert_eq!(resolve("/absolute/data"), Path::new("/srv/data"));
        assert_eq!(resolve("/relative/data/new"), Path::new("/srv/data/new"));
        assert_eq!(resolve("/climbing/data"), Path::new("/srv/data"));
        assert_eq!(resolve("/../../etc/./x"), Path::new("/etc/x"));
        assert_eq!(resolve("/"), Path::new("/"));
        assert!(matches!(
            resolve_in_root(root, Path::new("/loop-a/x")),
            Err(MountError::SymlinkLoop { .. })
        ));
    }

    #[test]
    fn a_file_in_the_middle_of_a_destination_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join("file"), b"").expect("file");
        assert!(matches!(
            resolve_in_root(dir.path(), Path::new("/file/below")),
            Err(MountError::Resolve { .. })
        ));
    }

    fn mount_entry(json: serde_json::Value) -> Mount {
        serde_json::from_value(json).expect("a mount")
    }

    #[test]
    fn mount_points_are_made_by_type_and_skip_tmpfs_and_cgroup_children() {
        let dir = tempfile::tempdir().expect("temp dir");
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(rootfs.join("srv")).expect("rootfs");
        symlink("/srv", rootfs.join("link")).expect("link");
        let file_source = dir.path().join("marker");
        fs::write(&file_source, b"host").expect("source");
        let mounts = [
            mount_entry(serde_json::json!({"destination": "/proc", "type": "proc"})),
            mount_entry(serde_json::json!({"destination": "/dev", "type": "tmpfs"})),
            mount_entry(serde_json::json!({"destination": "/dev/pts", "type": "devpts"})),
            mount_entry(serde_json::json!({"destination": "/sys/fs/cgroup", "type": "cgroup"})),
            mount_entry(serde_json::json!({
                "destination": "/link/data", "type": "bind", "source": dir.path(),
                "options": ["rbind"]
            })),
            mount_entry(serde_json::json!({
                "destination": "/etc/marker", "source": file_source, "options": ["bind"]
            })),
        ];
        create_mountpoints(&rootfs, &mounts).expect("prepared");

        assert!(rootfs.join("proc").is_dir());
        assert!(rootfs.join("dev").is_dir());
        assert!(!rootfs.join("dev/pts").exists(), "below a tmpfs");
        assert!(!rootfs.join("sys").exists(), "cgroup mounts are CRIU's");
        assert!(rootfs.join("srv/data").is_dir(), "through the symlink");
        assert!(rootfs.join("etc/marker").is_file(), "a file for a file");
        assert_eq!(fs::read(rootfs.join("etc/marker")).expect("read"), b"");
        assert_eq!(fs::read(&file_source).expect("read"), b"host");
    }

    #[test]
    fn mount_points_below_a_bind_mount_are_made_in_its_source() {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: bind-mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let rootfs = dir.path().join("rootfs");
        let source = dir.path().join("volume");
        fs::create_dir_all(&rootfs).expect("rootfs");
        fs::create_dir_all(&source).expect("source");
        let mounts = [
            mount_entry(serde_json::json!({
                "destination": "/data", "type": "bind", "source": source, "options": ["rbind"]
            })),
            mount_entry(serde_json::json!({"destination": "/data/cache", "type": "tmpfs"})),
        ];
        create_mountpoints(&rootfs, &mounts).expect("prepared");

        assert!(source.join("cache").is_dir(), "made through the bind mount");
        assert!(
            !rootfs.join("data/cache").exists(),
            "and the bind mount is gone"
        );
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(
            !mountinfo.contains(&rootfs.display().to_string()),
            "{mountinfo}"
        );
    }

    #[test]
    fn a_missing_bind_source_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mounts = [mount_entry(serde_json::json!({
            "destination": "/data", "type": "bind", "source": "/nonexistent/source"
        }))];
        let error = create_mountpoints(dir.path(), &mounts).expect_err("missing source");
        assert!(matches!(error, MountError::MissingSource { .. }));
        assert!(
            error.to_string().contains("/nonexistent/source of /data"),
            "{error}"
        );
    }
}
