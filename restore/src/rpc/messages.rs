//! The messages of CRIU's RPC protocol (`criu swrk`), as prost types.
//!
//! Written from the facts of CRIU 4.1's RPC schema: names, field numbers and types must match
//! CRIU's for the wire format to work. `criu_opts` carries the fields a restore (and the
//! version and feature checks) use; CRIU ignores fields it is not sent, so the dump-only and
//! TLS fields are left out.

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ReqType {
    /// A malformed request, in responses.
    Empty = 0,
    /// Checkpoint.
    Dump = 1,
    /// Restore.
    Restore = 2,
    /// Check the kernel.
    Check = 3,
    /// Pre-dump.
    PreDump = 4,
    /// Run a page server.
    PageServer = 5,
    /// A notification from CRIU, or its acknowledgement.
    Notify = 6,
    /// Dump CPU information.
    CpuinfoDump = 7,
    /// Check CPU information.
    CpuinfoCheck = 8,
    /// Ask which optional features the kernel supports.
    FeatureCheck = 9,
    /// Ask CRIU's version.
    Version = 10,
    /// Wait for a pid.
    WaitPid = 11,
    /// Run a page server as a child.
    PageServerChld = 12,
    /// A single pre-dump.
    SinglePreDump = 13,
}

/// How CRIU treats cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CgMode {
    /// Leave cgroups alone.
    Ignore = 0,
    /// No cgroup handling at all.
    CgNone = 1,
    /// Restore properties only.
    Props = 2,
    /// Restore properties of cgroups CRIU creates.
    Soft = 3,
    /// Restore every property.
    Full = 4,
    /// Fail when cgroups differ.
    Strict = 5,
    /// CRIU's default.
    Default = 6,
}

/// A request to CRIU.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuReq {
    /// What is asked.
    #[prost(enumeration = "ReqType", required, tag = "1")]
    pub r#type: i32,
    /// Options of the action.
    #[prost(message, optional, tag = "2")]
    pub opts: Option<CriuOpts>,
    /// With a NOTIFY acknowledgement: whether the client handled it.
    #[prost(bool, optional, tag = "3")]
    pub notify_success: Option<bool>,
    /// Keep the connection for further requests.
    #[prost(bool, optional, tag = "4")]
    pub keep_open: Option<bool>,
    /// Features to check (FEATURE_CHECK).
    #[prost(message, optional, tag = "5")]
    pub features: Option<CriuFeatures>,
    /// A pid (WAIT_PID).
    #[prost(uint32, optional, tag = "6")]
    pub pid: Option<u32>,
}

/// CRIU's answer, or a notification.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuResp {
    /// The request answered, or NOTIFY.
    #[prost(enumeration = "ReqType", required, tag = "1")]
    pub r#type: i32,
    /// Whether the request succeeded.
    #[prost(bool, required, tag = "2")]
    pub success: bool,
    /// Result of a restore.
    #[prost(message, optional, tag = "4")]
    pub restore: Option<RestoreResp>,
    /// A notification.
    #[prost(message, optional, tag = "5")]
    pub notify: Option<Notify>,
    /// The errno of a failure.
    #[prost(int32, optional, tag = "7")]
    pub cr_errno: Option<i32>,
    /// Features the kernel supports (FEATURE_CHECK).
    #[prost(message, optional, tag = "8")]
    pub features: Option<CriuFeatures>,
    /// The first error CRIU logged, on failure.
    #[prost(string, optional, tag = "9")]
    pub cr_errmsg: Option<String>,
    /// CRIU's version (VERSION).
    #[prost(message, optional, tag = "10")]
    pub version: Option<CriuVersion>,
    /// A status (WAIT_PID).
    #[prost(int32, optional, tag = "11")]
    pub status: Option<i32>,
}

/// The result of a restore.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RestoreResp {
    /// Host pid of the restored root task.
    #[prost(int32, required, tag = "1")]
    pub pid: i32,
}

/// A notification: CRIU reached a point where the client may act.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Notify {
    /// Which point (`setup-namespaces`, `post-restore`, `orphan-pts-master`, ...).
    #[prost(string, optional, tag = "1")]
    pub script: Option<String>,
    /// Host pid of the root task, for `setup-namespaces` and `post-restore`.
    #[prost(int32, optional, tag = "2")]
    pub pid: Option<i32>,
}

/// CRIU's version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuVersion {
    /// Major number.
    #[prost(int32, required, tag = "1")]
    pub major_number: i32,
    /// Minor number.
    #[prost(int32, required, tag = "2")]
    pub minor_number: i32,
    /// Git commit of a development build.
    #[prost(string, optional, tag = "3")]
    pub gitid: Option<String>,
    /// Sublevel.
    #[prost(int32, optional, tag = "4")]
    pub sublevel: Option<i32>,
    /// Extra number.
    #[prost(int32, optional, tag = "5")]
    pub extra: Option<i32>,
    /// Release name.
    #[prost(string, optional, tag = "6")]
    pub name: Option<String>,
}

/// Optional kernel features.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuFeatures {
    /// Memory tracking (soft-dirty bits) for pre-dumps.
    #[prost(bool, optional, tag = "1")]
    pub mem_track: Option<bool>,
    /// Lazy pages (userfaultfd).
    #[prost(bool, optional, tag = "2")]
    pub lazy_pages: Option<bool>,
    /// A pidfd store for pid reuse detection.
    #[prost(bool, optional, tag = "3")]
    pub pidfd_store: Option<bool>,
}

/// An external mount: `key` in the images is `val` on this host.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExtMountMap {
    /// Key recorded at dump.
    #[prost(string, required, tag = "1")]
    pub key: String,
    /// Path on this host.
    #[prost(string, required, tag = "2")]
    pub val: String,
}

/// A namespace to join instead of creating it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JoinNamespace {
    /// Namespace kind (`net`, `ipc`, ...).
    #[prost(string, required, tag = "1")]
    pub ns: String,
    /// Path of the namespace file.
    #[prost(string, required, tag = "2")]
    pub ns_file: String,
    /// Extra option.
    #[prost(string, optional, tag = "3")]
    pub extra_opt: Option<String>,
}

/// A file descriptor of CRIU's own table that stands for a resource named `key`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InheritFd {
    /// Key recorded at dump (e.g. `pipe:[1234]`).
    #[prost(string, required, tag = "1")]
    pub key: String,
    /// Descriptor number in CRIU's process.
    #[prost(int32, required, tag = "2")]
    pub fd: i32,
}

/// Where a cgroup controller's root is.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CgroupRoot {
    /// Controller, or all when absent.
    #[prost(string, optional, tag = "1")]
    pub ctrl: Option<String>,
    /// Path of the root.
    #[prost(string, required, tag = "2")]
    pub path: String,
}

/// Options of a request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuOpts {
    /// Images directory, as a descriptor of the requesting process.
    #[prost(int32, required, tag = "1", default = "-1")]
    pub images_dir_fd: i32,
    /// Allow external unix sockets.
    #[prost(bool, optional, tag = "4")]
    pub ext_unix_sk: Option<bool>,
    /// Restore established TCP connections.
    #[prost(bool, optional, tag = "5")]
    pub tcp_established: Option<bool>,
    /// Allow device files that moved (runc always sets it).
    #[prost(bool, optional, tag = "6")]
    pub evasive_devices: Option<bool>,
    /// Restore a shell job.
    #[prost(bool, optional, tag = "7")]
    pub shell_job: Option<bool>,
    /// Restore file locks.
    #[prost(bool, optional, tag = "8")]
    pub file_locks: Option<bool>,
    /// Log verbosity, 0 to 4.
    #[prost(int32, optional, tag = "9", default = "2")]
    pub log_level: Option<i32>,
    /// Log file name inside the work directory.
    #[prost(string, optional, tag = "10")]
    pub log_file: Option<String>,
    /// Send notifications.
    #[prost(bool, optional, tag = "12")]
    pub notify_scripts: Option<bool>,
    /// Root of the restored tree.
    #[prost(string, optional, tag = "13")]
    pub root: Option<String>,
    /// Punch restored pages out of the pages files.
    #[prost(bool, optional, tag = "16")]
    pub auto_dedup: Option<bool>,
    /// Work directory, as a descriptor of the requesting process.
    #[prost(int32, optional, tag = "17")]
    pub work_dir_fd: Option<i32>,
    /// External mounts (older form of `external`).
    #[prost(message, repeated, tag = "23")]
    pub ext_mnt: Vec<ExtMountMap>,
    /// Manage cgroups (older form of `manage_cgroups_mode`).
    #[prost(bool, optional, tag = "24")]
    pub manage_cgroups: Option<bool>,
    /// Cgroup roots.
    #[prost(message, repeated, tag = "25")]
    pub cg_root: Vec<CgroupRoot>,
    /// Restore as a sibling of CRIU rather than a child.
    #[prost(bool, optional, tag = "26")]
    pub rst_sibling: Option<bool>,
    /// Descriptors that stand for external resources.
    #[prost(message, repeated, tag = "27")]
    pub inherit_fd: Vec<InheritFd>,
    /// How cgroups are managed; sent with explicit presence, since IGNORE is 0.
    #[prost(enumeration = "CgMode", optional, tag = "34")]
    pub manage_cgroups_mode: Option<i32>,
    /// External resources (`mnt[KEY]:VAL`, `net[INO]:KEY`, ...).
    #[prost(string, repeated, tag = "37")]
    pub external: Vec<String>,
    /// Namespaces (CLONE_* flags) to create empty.
    #[prost(uint32, optional, tag = "38")]
    pub empty_ns: Option<u32>,
    /// Namespaces to join.
    #[prost(message, repeated, tag = "39")]
    pub join_ns: Vec<JoinNamespace>,
    /// Restore lazily through a lazy-pages daemon.
    #[prost(bool, optional, tag = "48")]
    pub lazy_pages: Option<bool>,
    /// Send the master of orphaned ptys to the client.
    #[prost(bool, optional, tag = "50")]
    pub orphan_pts_master: Option<bool>,
    /// LSM profile to restore with.
    #[prost(string, optional, tag = "53")]
    pub lsm_profile: Option<String>,
    /// LSM mount context to restore with.
    #[prost(string, optional, tag = "63")]
    pub lsm_mount_context: Option<String>,
    /// Images directory as a path, used when `images_dir_fd` is -1.
    #[prost(string, optional, tag = "68")]
    pub images_dir: Option<String>,
}
