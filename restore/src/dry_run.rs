//! `restore --dry-run`: everything a restore would do, found out without doing any of it.
//!
//! [`plan`] loads the bundle and the images as a restore does, runs the same validation, and
//! works out the CRIU request, the mount points to create, the external mounts, the
//! namespaces, the cgroups with the settings written into them and the hooks, without
//! creating a state directory, mounting or entering a cgroup. CRIU is only asked its version
//! and features, when the options need them. [`DryRun`]
//! serialises as the documented JSON of `--dry-run --json`; [`DryRun::text`] is the report for
//! people.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use criu_images::validate::{Finding, Severity, error_chain};
use oci_spec::runtime::Spec;
use serde::Serialize;
use serde_json::{Value, json};

use crate::cgroups::Cgroups;
use crate::container::{
    ExistingNamespace, Loaded, Options, RestoreError, criu_options, existing_namespaces, load,
    preflight_report, require_versions,
};
use crate::mounts::{self, MissingMountpoint};
use crate::rpc::messages::{CgMode, CriuOpts};

/// What a restore would do.
#[derive(Debug, Serialize)]
pub struct DryRun {
    /// The container id.
    pub id: String,
    /// Whether the restore would go ahead: validation found no error.
    pub valid: bool,
    /// Whether validation was skipped (`--skip-validation`).
    pub validation_skipped: bool,
    /// What validation found.
    pub findings: Vec<Finding>,
    /// The image fields the LSM options would rewrite (into a shadow images directory).
    pub rewrites: Vec<crate::lsm::Change>,
    /// The state directory the restore would create.
    pub state_dir: PathBuf,
    /// The request CRIU would be sent.
    pub criu_request: Value,
    /// Mount points that would be created in the rootfs.
    pub mountpoints: Vec<MissingMountpoint>,
    /// Namespaces the config names by path, and how CRIU would get each.
    pub namespaces: Vec<Value>,
    /// The container's cgroup in each hierarchy.
    pub cgroups: Vec<Value>,
    /// Cgroup files that would be written, in order.
    pub cgroup_settings: Vec<Value>,
    /// The hooks that would run, by kind.
    pub hooks: BTreeMap<&'static str, Vec<PathBuf>>,
    /// With `--lazy-pages`: `listening` when a daemon serves the work directory already, else
    /// the daemon the restore would start.
    pub lazy_pages_daemon: Option<String>,
}

/// Works out what restoring with `options` would do.
///
/// # Errors
///
/// What stops a restore before validation can even run: a bad id, a bundle without a config
/// or rootfs, an images directory without a checkpoint or `descriptors.json`.
pub fn plan(options: &Options) -> Result<DryRun, RestoreError> {
    let Loaded {
        spec,
        config_path,
        descriptors,
        rootfs,
    } = load(options)?;

    let mut findings = if options.skip_validation {
        Vec::new()
    } else {
        preflight_report(options, &spec, &rootfs).findings
    };
    // The one thing of CRIU a dry run asks: whether it can do what the options want.
    if let Err(error) = require_versions(&crate::rpc::Criu::new(&options.criu), options, &spec) {
        findings.push(Finding::error(
            "criu-unsuitable",
            options.criu.display().to_string(),
            error_chain(&error),
            "install a CRIU that supports the options (tools/install-deps installs 4.1.1), or \
             drop the options it lacks",
        ));
    }
    let state_dir = options.root.join(&options.id);
    if state_dir.exists() {
        findings.push(Finding::error(
            "id-in-use",
            state_dir.display().to_string(),
            format!("a container {} exists (or is being restored)", options.id),
            "restore under another id, or remove the old container's state first",
        ));
    }

    let (profile, context) = crate::container::lsm_options(options)?;
    // An image the rewrite cannot read is one more problem to report, beside the others.
    let rewrites = match (&profile, context) {
        (None, None) => Vec::new(),
        _ => match crate::lsm::plan(&options.image_path, profile.as_ref(), context) {
            Ok(plan) => plan.changes,
            Err(error) => {
                findings.push(Finding::error(
                    "rewrite-impossible",
                    options.image_path.display().to_string(),
                    error_chain(&error),
                    "fix the image named (copy the checkpoint again), or drop --lsm-profile \
                     and --lsm-mount-context",
                ));
                Vec::new()
            }
        },
    };

    // A restore reads the rewritten images from the shadow, and only when there are some.
    let shadow = state_dir.join("shadow-images");
    let images_dir = if rewrites.is_empty() {
        options.image_path.clone()
    } else {
        shadow
    };
    let criu_root = state_dir.join("criu-root");
    let mut opts = criu_options(options, &spec, &rootfs, &criu_root, &descriptors)?;
    let namespaces = namespaces(&spec, &config_path, &mut opts)?;
    let cgroups = Cgroups::plan(&spec, &options.id)?;
    opts.cg_root = cgroups.roots();
    let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
    let settings = match &resources {
        Some(resources) if options.cgroups_mode != crate::container::CgroupsMode::Strict => {
            cgroups.planned(resources)?
        }
        _ => Vec::new(),
    };

    Ok(DryRun {
        id: options.id.clone(),
        valid: !findings.iter().any(|f| f.severity == Severity::Error),
        validation_skipped: options.skip_validation,
        findings,
        rewrites,
        criu_request: describe_request(options, &opts, &images_dir),
        mountpoints: mounts::missing_mountpoints(
            &rootfs,
            spec.mounts().as_deref().unwrap_or_default(),
        )?,
        namespaces,
        cgroups: cgroups
            .dirs()
            .map(|(path, exists, relative)| {
                json!({"path": path, "exists": exists, "cgroup": relative})
            })
            .collect(),
        cgroup_settings: settings
            .into_iter()
            .map(|(file, value)| json!({"file": file, "value": value}))
            .collect(),
        hooks: hooks(&spec),
        lazy_pages_daemon: lazy_daemon(options, &images_dir),
        state_dir,
    })
}

/// The namespaces named by path, recorded in the request as a restore would (an inherited
/// descriptor is only named: it is opened when the restore runs).
fn namespaces(spec: &Spec, config: &Path, opts: &mut CriuOpts) -> Result<Vec<Value>, RestoreError> {
    let mut out = Vec::new();
    for (path, existing) in existing_namespaces(spec, config)? {
        match existing {
            ExistingNamespace::Inherit(key) => {
                out.push(json!({"path": path, "how": "inherit", "key": key}));
            }
            ExistingNamespace::Join(kind) => {
                opts.join_ns.push(crate::rpc::messages::JoinNamespace {
                    ns: kind.to_owned(),
                    ns_file: path.display().to_string(),
                    extra_opt: None,
                });
                out.push(json!({"path": path, "how": "join", "kind": kind}));
            }
        }
    }
    Ok(out)
}

fn lazy_daemon(options: &Options, images_dir: &Path) -> Option<String> {
    if !options.lazy_pages {
        return None;
    }
    let work_dir = options.work_path.as_ref().unwrap_or(&options.image_path);
    if crate::lazy::LazyDaemon::listening(work_dir) {
        return Some("listening".to_owned());
    }
    let mut command = format!(
        "{} lazy-pages --images-dir {} --work-dir {}",
        options.criu.display(),
        images_dir.display(),
        work_dir.display()
    );
    if let Some(server) = &options.page_server {
        command.push_str(&format!(
            " --page-server --address {} --port {}",
            server.host, server.port
        ));
    }
    Some(command)
}

fn hooks(spec: &Spec) -> BTreeMap<&'static str, Vec<PathBuf>> {
    let Some(hooks) = spec.hooks() else {
        return BTreeMap::new();
    };
    let paths = |list: &Option<Vec<oci_spec::runtime::Hook>>| -> Vec<PathBuf> {
        list.iter().flatten().map(|h| h.path().clone()).collect()
    };
    #[allow(deprecated)]
    let prestart = paths(hooks.prestart());
    [
        ("prestart", prestart),
        ("createRuntime", paths(hooks.create_runtime())),
        ("poststop", paths(hooks.poststop())),
    ]
    .into_iter()
    .filter(|(_, list)| !list.is_empty())
    .collect()
}

/// The request as CRIU would get it, every option that is set, by CRIU's field names.
fn describe_request(options: &Options, opts: &CriuOpts, images_dir: &Path) -> Value {
    let mut request = serde_json::Map::new();
    let mut put = |key: &str, value: Value| {
        request.insert(key.to_owned(), value);
    };
    put("images_dir", json!(images_dir));
    put(
        "work_dir",
        json!(options.work_path.as_ref().unwrap_or(&options.image_path)),
    );
    put("log_file", json!("restore.log"));
    put("log_level", json!(4));
    put("notify_scripts", json!(true));
    if let Some(root) = &opts.root {
        put("root", json!(root));
    }
    let flags = [
        ("evasive_devices", opts.evasive_devices),
        ("rst_sibling", opts.rst_sibling),
        ("manage_cgroups", opts.manage_cgroups),
        ("orphan_pts_master", opts.orphan_pts_master),
        ("shell_job", opts.shell_job),
        ("ext_unix_sk", opts.ext_unix_sk),
        ("tcp_established", opts.tcp_established),
        ("file_locks", opts.file_locks),
        ("auto_dedup", opts.auto_dedup),
        ("lazy_pages", opts.lazy_pages),
    ];
    for (name, value) in flags {
        if let Some(value) = value {
            put(name, json!(value));
        }
    }
    if let Some(mode) = opts.manage_cgroups_mode {
        let name = CgMode::try_from(mode)
            .map_or_else(|_| mode.to_string(), |m| format!("{m:?}").to_lowercase());
        put("manage_cgroups_mode", json!(name));
    }
    if let Some(mask) = opts.empty_ns {
        put("empty_ns", json!(format!("{mask:#x}")));
    }
    if let Some(profile) = &opts.lsm_profile {
        put("lsm_profile", json!(profile));
    }
    if let Some(context) = &opts.lsm_mount_context {
        put("lsm_mount_context", json!(context));
    }
    let ext_mnt: Vec<Value> = opts
        .ext_mnt
        .iter()
        .map(|m| json!({"key": m.key, "val": m.val}))
        .collect();
    put("ext_mnt", json!(ext_mnt));
    let inherit_fd: Vec<Value> = opts
        .inherit_fd
        .iter()
        .map(|f| json!({"key": f.key, "fd": f.fd}))
        .collect();
    put("inherit_fd", json!(inherit_fd));
    let join_ns: Vec<Value> = opts
        .join_ns
        .iter()
        .map(|j| json!({"ns": j.ns, "ns_file": j.ns_file}))
        .collect();
    put("join_ns", json!(join_ns));
    let cg_root: Vec<Value> = opts
        .cg_root
        .iter()
        .map(|c| json!({"ctrl": c.ctrl, "path": c.path}))
        .collect();
    put("cg_root", json!(cg_root));
    Value::Object(request)
}

impl DryRun {
    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let verdict = if self.valid {
            "would restore"
        } else {
            "would refuse to restore"
        };
        let _ = writeln!(out, "Dry run: {verdict} container {}", self.id);

        let _ = writeln!(out, "\nValidation");
        if self.validation_skipped {
            let _ = writeln!(out, "  skipped (--skip-validation)");
        } else if self.findings.is_empty() {
            let _ = writeln!(out, "  no problems found");
        }
        for f in &self.findings {
            let severity = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let _ = writeln!(
                out,
                "  {severity} {} ({}): {}",
                f.code, f.subject, f.message
            );
            let _ = writeln!(out, "    fix: {}", f.hint);
        }

        let _ = writeln!(
            out,
            "\nImage rewrites (into {})",
            self.state_dir.join("shadow-images").display()
        );
        if self.rewrites.is_empty() {
            let _ = writeln!(out, "  none: CRIU reads the images as they are");
        }
        for change in &self.rewrites {
            let _ = writeln!(
                out,
                "  {} entry {} {}: {:?} -> {:?}",
                change.image, change.entry, change.field, change.old, change.new
            );
        }

        let _ = writeln!(out, "\nState directory\n  {}", self.state_dir.display());

        let _ = writeln!(out, "\nCRIU request");
        if let Value::Object(request) = &self.criu_request {
            for (key, value) in request {
                match value {
                    Value::Array(items) if items.is_empty() => {}
                    Value::Array(items) => {
                        let _ = writeln!(out, "  {key}:");
                        for item in items {
                            let _ = writeln!(out, "    {}", compact(item));
                        }
                    }
                    other => {
                        let _ = writeln!(out, "  {key}: {}", compact(other));
                    }
                }
            }
        }

        let _ = writeln!(out, "\nMount points to create in the rootfs");
        if self.mountpoints.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for m in &self.mountpoints {
            let kind = if m.file { "file" } else { "directory" };
            let _ = writeln!(
                out,
                "  {} ({kind} {})",
                m.destination.display(),
                m.path.display()
            );
        }

        let _ = writeln!(out, "\nNamespaces");
        if self.namespaces.is_empty() {
            let _ = writeln!(out, "  all new (as checkpointed)");
        }
        for ns in &self.namespaces {
            let _ = writeln!(out, "  {}", compact(ns));
        }

        let _ = writeln!(out, "\nCgroups");
        for cgroup in &self.cgroups {
            let _ = writeln!(out, "  {}", compact(cgroup));
        }
        for setting in &self.cgroup_settings {
            let _ = writeln!(out, "  write {}", compact(setting));
        }

        if let Some(daemon) = &self.lazy_pages_daemon {
            let _ = writeln!(out, "\nLazy pages\n  daemon: {daemon}");
        }

        let _ = writeln!(out, "\nHooks");
        if self.hooks.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for (kind, paths) in &self.hooks {
            for path in paths {
                let _ = writeln!(out, "  {kind}: {}", path.display());
            }
        }
        out
    }
}

/// A JSON value on one line; strings without their quotes.
fn compact(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
