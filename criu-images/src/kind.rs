//! What each image file holds: the protobuf message of each kind magic, the extra payload that
//! follows its entries, and the raw images that have no magic and are known by file name only.

/// The extra bytes CRIU writes after an entry's protobuf message. Their length is recorded
/// inside the message, so the framing has to read the message to find the next entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadRule {
    /// Nothing follows the message.
    None,
    /// `pipe_data_entry.bytes` bytes of pipe contents (pipes-data, fifo-data).
    PipeData,
    /// `sk_packet_entry.length` bytes of a queued socket packet (sk-queues).
    SocketQueue,
    /// `inq_len` bytes of the receive queue, then `outq_len` bytes of the send queue.
    TcpStream,
    /// `keys_bytes` of keys, then `values_bytes` of values (bpfmap-data).
    BpfMapData,
    /// `nsems` 16-bit semaphore values, zero-padded to a multiple of 8 bytes.
    IpcSemaphores,
    /// `qnum` messages, each a size word, an `ipc_msg`, and its text padded to 8 bytes.
    IpcMessages,
    /// `size` bytes of the segment padded to 4, only when `in_pagemaps` is false: modern CRIU
    /// stores the segment in a shmem pagemap instead.
    IpcSharedMemory,
}

/// How the entries of an image kind are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Every entry is the same message, each followed by the payload of the rule.
    Uniform {
        /// Protobuf message of every entry.
        message: &'static str,
        /// What follows each entry.
        payload: PayloadRule,
    },
    /// A `pagemap_head`, then `pagemap_entry`s.
    Pagemap,
    /// A `ghost_file_entry`; then, when its `chunks` field is set, `ghost_chunk_entry`s each
    /// followed by `len` bytes of file data; otherwise the file's contents up to the end.
    GhostFile,
}

/// The protobuf image kinds CRIU 4.1 reads or writes, by crit's magic name.
const KINDS: &[(&str, Layout)] = &[
    ("INVENTORY", uniform("inventory_entry")),
    ("CORE", uniform("core_entry")),
    ("IDS", uniform("task_kobj_ids_entry")),
    ("CREDS", uniform("creds_entry")),
    ("UTSNS", uniform("utsns_entry")),
    ("TIMENS", uniform("timens_entry")),
    ("PIDNS", uniform("pidns_entry")),
    ("IPC_VAR", uniform("ipc_var_entry")),
    ("FS", uniform("fs_entry")),
    ("GHOST_FILE", Layout::GhostFile),
    ("MM", uniform("mm_entry")),
    ("CGROUP", uniform("cgroup_entry")),
    (
        "TCP_STREAM",
        with_payload("tcp_stream_entry", PayloadRule::TcpStream),
    ),
    ("STATS", uniform("stats_entry")),
    ("PAGEMAP", Layout::Pagemap),
    ("PSTREE", uniform("pstree_entry")),
    ("REG_FILES", uniform("reg_file_entry")),
    ("NS_FILES", uniform("ns_file_entry")),
    ("EVENTFD_FILE", uniform("eventfd_file_entry")),
    ("EVENTPOLL_FILE", uniform("eventpoll_file_entry")),
    ("EVENTPOLL_TFD", uniform("eventpoll_tfd_entry")),
    ("SIGNALFD", uniform("signalfd_entry")),
    ("TIMERFD", uniform("timerfd_entry")),
    ("INOTIFY_FILE", uniform("inotify_file_entry")),
    ("INOTIFY_WD", uniform("inotify_wd_entry")),
    ("FANOTIFY_FILE", uniform("fanotify_file_entry")),
    ("FANOTIFY_MARK", uniform("fanotify_mark_entry")),
    ("VMAS", uniform("vma_entry")),
    ("PIPES", uniform("pipe_entry")),
    ("FIFO", uniform("fifo_entry")),
    ("SIGACT", uniform("sa_entry")),
    ("NETLINK_SK", uniform("netlink_sk_entry")),
    ("REMAP_FPATH", uniform("remap_file_path_entry")),
    ("MNTS", uniform("mnt_entry")),
    ("TTY_FILES", uniform("tty_file_entry")),
    ("TTY_INFO", uniform("tty_info_entry")),
    ("TTY_DATA", uniform("tty_data_entry")),
    ("RLIMIT", uniform("rlimit_entry")),
    ("TUNFILE", uniform("tunfile_entry")),
    ("EXT_FILES", uniform("ext_file_entry")),
    ("IRMAP_CACHE", uniform("irmap_cache_entry")),
    ("FILE_LOCKS", uniform("file_lock_entry")),
    ("FDINFO", uniform("fdinfo_entry")),
    ("UNIXSK", uniform("unix_sk_entry")),
    ("INETSK", uniform("inet_sk_entry")),
    ("PACKETSK", uniform("packet_sock_entry")),
    ("ITIMERS", uniform("itimer_entry")),
    ("POSIX_TIMERS", uniform("posix_timer_entry")),
    ("NETDEV", uniform("net_device_entry")),
    (
        "PIPES_DATA",
        with_payload("pipe_data_entry", PayloadRule::PipeData),
    ),
    (
        "FIFO_DATA",
        with_payload("pipe_data_entry", PayloadRule::PipeData),
    ),
    (
        "SK_QUEUES",
        with_payload("sk_packet_entry", PayloadRule::SocketQueue),
    ),
    (
        "IPCNS_SHM",
        with_payload("ipc_shm_entry", PayloadRule::IpcSharedMemory),
    ),
    (
        "IPCNS_SEM",
        with_payload("ipc_sem_entry", PayloadRule::IpcSemaphores),
    ),
    (
        "IPCNS_MSG",
        with_payload("ipc_msg_entry", PayloadRule::IpcMessages),
    ),
    ("NETNS", uniform("netns_entry")),
    ("USERNS", uniform("userns_entry")),
    ("SECCOMP", uniform("seccomp_entry")),
    ("AUTOFS", uniform("autofs_entry")),
    ("FILES", uniform("file_entry")),
    ("CPUINFO", uniform("cpuinfo_entry")),
    ("MEMFD_INODE", uniform("memfd_inode_entry")),
    ("BPFMAP_FILE", uniform("bpfmap_file_entry")),
    (
        "BPFMAP_DATA",
        with_payload("bpfmap_data_entry", PayloadRule::BpfMapData),
    ),
    ("APPARMOR", uniform("apparmor_entry")),
    // crit 4.1.1 has no handler for these two; they are decoded all the same.
    ("BINFMT_MISC", uniform("binfmt_misc_entry")),
    ("PIDFD", uniform("pidfd_entry")),
];

const fn uniform(message: &'static str) -> Layout {
    Layout::Uniform {
        message,
        payload: PayloadRule::None,
    }
}

const fn with_payload(message: &'static str, payload: PayloadRule) -> Layout {
    Layout::Uniform { message, payload }
}

/// The layout of the image kind crit names `magic_name`, or `None` for a magic with no
/// protobuf message (`KDAT`, and the `SIGNAL` images no CRIU since 1.x writes).
pub fn layout(magic_name: &str) -> Option<Layout> {
    KINDS
        .iter()
        .find(|(name, _)| *name == magic_name)
        .map(|(_, layout)| *layout)
}

/// Images that carry no magic at all. CRIU knows them by file name only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawKind {
    /// `pages-<id>.img`: page contents, addressed through a pagemap.
    Pages,
    /// `tmpfs-dev-<dev>.tar.gz.img` (and the legacy `tmpfs-<mnt>.tar.gz.img`): a gzip'd tar.
    TmpfsArchive,
    /// `ifaddr-<ns>.img`: iproute2's `ip addr save` stream.
    InterfaceAddresses,
    /// `route-<ns>.img`: iproute2's `ip route save` stream.
    Routes,
    /// `route6-<ns>.img`: iproute2's `ip -6 route save` stream.
    Routes6,
    /// `rule-<ns>.img`: iproute2's `ip rule save` stream.
    Rules,
    /// `iptables-<ns>.img`: `iptables-save` text.
    Iptables,
    /// `ip6tables-<ns>.img`: `ip6tables-save` text.
    Ip6tables,
    /// `nftables-<ns>.img`: `nft list ruleset` text.
    Nftables,
    /// `netns-ct-<ns>.img`: netlink conntrack messages.
    Conntrack,
    /// `netns-exp-<ns>.img`: netlink conntrack expectation messages.
    ConntrackExpectations,
    /// An image written by a CRIU plugin (`amdgpu-*`, `cuda-*`), in the plugin's own format.
    Plugin,
}

impl RawKind {
    /// The kind of a raw image, recognised by its file name.
    pub fn from_file_name(name: &str) -> Option<RawKind> {
        let prefixes: &[(&str, RawKind)] = &[
            ("pages-", RawKind::Pages),
            ("tmpfs-", RawKind::TmpfsArchive),
            ("ifaddr-", RawKind::InterfaceAddresses),
            ("route6-", RawKind::Routes6),
            ("route-", RawKind::Routes),
            ("rule-", RawKind::Rules),
            ("ip6tables-", RawKind::Ip6tables),
            ("iptables-", RawKind::Iptables),
            ("nftables-", RawKind::Nftables),
            ("netns-ct-", RawKind::Conntrack),
            ("netns-exp-", RawKind::ConntrackExpectations),
            ("amdgpu-", RawKind::Plugin),
            ("cuda-", RawKind::Plugin),
        ];
        if !name.ends_with(".img") {
            return None;
        }
        prefixes
            .iter()
            .find(|(prefix, _)| name.starts_with(prefix))
            .map(|(_, kind)| *kind)
    }

    /// A short description for listings.
    pub fn describe(self) -> &'static str {
        match self {
            RawKind::Pages => "memory pages",
            RawKind::TmpfsArchive => "tmpfs contents (tar.gz)",
            RawKind::InterfaceAddresses => "interface addresses (ip addr save)",
            RawKind::Routes => "IPv4 routes (ip route save)",
            RawKind::Routes6 => "IPv6 routes (ip -6 route save)",
            RawKind::Rules => "routing rules (ip rule save)",
            RawKind::Iptables => "iptables rules (text)",
            RawKind::Ip6tables => "ip6tables rules (text)",
            RawKind::Nftables => "nftables ruleset (text)",
            RawKind::Conntrack => "conntrack entries (netlink)",
            RawKind::ConntrackExpectations => "conntrack expectations (netlink)",
            RawKind::Plugin => "plugin data",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_images_are_known_by_name() {
        assert_eq!(RawKind::from_file_name("pages-1.img"), Some(RawKind::Pages));
        assert_eq!(
            RawKind::from_file_name("tmpfs-dev-42.tar.gz.img"),
            Some(RawKind::TmpfsArchive)
        );
        assert_eq!(
            RawKind::from_file_name("route6-9.img"),
            Some(RawKind::Routes6)
        );
        assert_eq!(RawKind::from_file_name("pagemap-1.img"), None);
        assert_eq!(RawKind::from_file_name("pages-1"), None);
    }

    #[test]
    fn every_crit_kind_has_a_layout() {
        assert_eq!(layout("PAGEMAP"), Some(Layout::Pagemap));
        assert!(matches!(
            layout("SK_QUEUES"),
            Some(Layout::Uniform {
                payload: PayloadRule::SocketQueue,
                ..
            })
        ));
        assert_eq!(layout("KDAT"), None);
    }
}
