//! The magic numbers that open CRIU image files.
//!
//! Every protobuf image starts with a head magic (common or service) followed by the magic of
//! its kind; `inventory.img` has its kind magic alone. Several names share one value (a shmem
//! pagemap is framed exactly like a process pagemap), so a value maps to a list of names. The
//! first name of each value is the one crit prints in its JSON `magic` key.

/// Head magic of every protobuf image except the inventory and the service images.
pub const IMG_COMMON: u32 = 0x5456_4319;
/// Head magic of the service images (`stats-dump`, `stats-restore`, `irmap-cache`).
pub const IMG_SERVICE: u32 = 0x5510_5940;
/// Magic of `inventory.img`, which has no head magic.
pub const INVENTORY: u32 = 0x5831_3116;
/// Magic of pagemaps, both per process and for shared memory.
pub const PAGEMAP: u32 = 0x5608_4025;
/// Magic of the kernel data cache (`/run/criu.kdat`), which is never in an images directory.
pub const KDAT: u32 = 0x5702_3458;

/// Every named magic value, current and legacy. Where a value has several names, the one crit
/// 4.1.1 prints comes first.
const TABLE: &[(&str, u32)] = &[
    ("INVENTORY", INVENTORY),
    ("PSTREE", 0x5027_3030),
    ("FDINFO", 0x5621_3732),
    ("PAGEMAP", PAGEMAP),
    ("SHMEM_PAGEMAP", PAGEMAP),
    ("PAGES_OLD", PAGEMAP),
    ("SHM_PAGES_OLD", PAGEMAP),
    ("CORE", 0x5505_3847),
    ("IDS", 0x5443_2030),
    ("VMAS", 0x5412_3737),
    ("PIPES", 0x5651_3555),
    ("PIPES_DATA", 0x5645_3709),
    ("FIFO", 0x5836_4939),
    ("FIFO_DATA", 0x5933_3054),
    ("SIGACT", 0x5534_4201),
    ("UNIXSK", 0x5437_3943),
    ("INETSK", 0x5644_3851),
    ("PACKETSK", 0x6045_4618),
    ("ITIMERS", 0x5746_4056),
    ("POSIX_TIMERS", 0x5260_3957),
    ("SK_QUEUES", 0x5626_4026),
    ("UTSNS", 0x5447_3203),
    ("CREDS", 0x5402_3547),
    ("IPC_VAR", 0x5311_5007),
    ("IPCNS_SHM", 0x4628_3044),
    ("IPCNS_MSG", 0x5545_3737),
    ("IPCNS_SEM", 0x5957_3019),
    ("REG_FILES", 0x5036_3636),
    ("EXT_FILES", 0x5925_5641),
    ("FS", 0x5140_3912),
    ("MM", 0x5749_2820),
    ("REMAP_FPATH", 0x5913_3954),
    ("GHOST_FILE", 0x5258_3605),
    ("TCP_STREAM", 0x5146_5506),
    ("EVENTFD_FILE", 0x4452_3722),
    ("EVENTPOLL_FILE", 0x4502_3858),
    ("EVENTPOLL_TFD", 0x4443_3746),
    ("SIGNALFD", 0x5732_3820),
    ("INOTIFY_FILE", 0x4842_4431),
    ("INOTIFY_WD", 0x5456_2009),
    ("MNTS", 0x5556_3928),
    ("NETDEV", 0x5737_3951),
    ("NETNS", 0x5593_3752),
    ("TTY_FILES", 0x5943_3025),
    ("TTY_INFO", 0x5945_3036),
    ("TTY_DATA", 0x5941_3026),
    ("FILE_LOCKS", 0x5432_3616),
    ("RLIMIT", 0x5711_3925),
    ("FANOTIFY_FILE", 0x5509_6122),
    ("FANOTIFY_MARK", 0x5650_6035),
    ("SIGNAL", 0x5925_5647),
    ("PSIGNAL", 0x5925_5647),
    ("NETLINK_SK", 0x5800_5614),
    ("NS_FILES", 0x6139_4011),
    ("TUNFILE", 0x5714_3751),
    ("CGROUP", 0x5938_3330),
    ("TIMERFD", 0x5049_3712),
    ("CPUINFO", 0x6140_4013),
    ("USERNS", 0x5547_4906),
    ("SECCOMP", 0x6441_3049),
    ("BINFMT_MISC", 0x6734_3323),
    ("BINFMT_MISC_OLD", 0x6734_3323),
    ("AUTOFS", 0x4935_3943),
    ("FILES", 0x5630_3138),
    ("MEMFD_INODE", 0x4845_3499),
    ("TIMENS", 0x4311_4433),
    ("PIDNS", 0x6115_7326),
    ("BPFMAP_FILE", 0x5750_6142),
    ("BPFMAP_DATA", 0x6432_4033),
    ("APPARMOR", 0x5942_3047),
    ("PIDFD", 0x5443_5556),
    ("STATS", 0x5709_3306),
    ("IRMAP_CACHE", 0x5700_4059),
    ("KDAT", KDAT),
];

/// The name crit uses for a kind magic, or `None` for a value CRIU never defined.
pub fn name(value: u32) -> Option<&'static str> {
    TABLE.iter().find(|(_, v)| *v == value).map(|(n, _)| *n)
}

/// Every name CRIU has given a kind magic value, the crit name first.
pub fn names(value: u32) -> impl Iterator<Item = &'static str> {
    TABLE
        .iter()
        .filter(move |(_, v)| *v == value)
        .map(|(n, _)| *n)
}

/// The value of a kind magic by any of its names (`"PAGEMAP"`, `"SHMEM_PAGEMAP"`, ...).
pub fn value(name: &str) -> Option<u32> {
    TABLE.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// The head magic CRIU writes in front of a kind magic: none for the inventory, the service
/// magic for stats and the irmap cache, the common magic for everything else.
pub fn head_for(kind: u32) -> Option<u32> {
    match name(kind) {
        Some("INVENTORY") => None,
        Some("STATS" | "IRMAP_CACHE") => Some(IMG_SERVICE),
        _ => Some(IMG_COMMON),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_values_resolve_to_crit_names() {
        assert_eq!(name(PAGEMAP), Some("PAGEMAP"));
        assert_eq!(names(PAGEMAP).count(), 4);
        assert_eq!(name(0x5925_5647), Some("SIGNAL"));
        assert_eq!(value("SHMEM_PAGEMAP"), Some(PAGEMAP));
        assert_eq!(name(0x1234_5678), None);
    }

    #[test]
    fn head_magic_follows_the_kind() {
        assert_eq!(head_for(INVENTORY), None);
        assert_eq!(head_for(0x5709_3306), Some(IMG_SERVICE));
        assert_eq!(head_for(PAGEMAP), Some(IMG_COMMON));
    }
}
