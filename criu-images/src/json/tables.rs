//! The renderings crit applies to integers under `--pretty`: device numbers, bit-flag names
//! and value names, in both directions.

use crate::pyfmt;

/// Python's `"0x%x" % n`.
pub(super) fn push_hex(out: &mut String, n: i128) {
    use std::fmt::Write as _;
    let _ = if n < 0 {
        write!(out, "-0x{:x}", -n)
    } else {
        write!(out, "0x{n:x}")
    };
}

/// The kernel's `dev_t` split: 12 bits of major above 20 bits of minor.
pub(super) fn kernel_dev(dev: u64) -> (u64, u64) {
    (dev >> 20, dev & 0xf_ffff)
}

/// glibc's `major()` and `minor()`.
pub(super) fn old_dev(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The kernel's `dev_t` from its parts.
pub(super) fn kernel_makedev(major: u64, minor: u64) -> u64 {
    (major << 20) | minor
}

/// glibc's `makedev()`.
pub(super) fn old_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
}

/// The bit-flag tables crit knows, in its order.
pub(super) fn flag_table(name: &str) -> Option<&'static [(&'static str, u64)]> {
    const PROT: &[(&str, u64)] = &[("PROT_READ", 0x1), ("PROT_WRITE", 0x2), ("PROT_EXEC", 0x4)];
    const MAP: &[(&str, u64)] = &[
        ("MAP_SHARED", 0x1),
        ("MAP_PRIVATE", 0x2),
        ("MAP_ANON", 0x20),
        ("MAP_GROWSDOWN", 0x100),
    ];
    const STATUS: &[(&str, u64)] = &[
        ("VMA_AREA_NONE", 0),
        ("VMA_AREA_REGULAR", 1 << 0),
        ("VMA_AREA_STACK", 1 << 1),
        ("VMA_AREA_VSYSCALL", 1 << 2),
        ("VMA_AREA_VDSO", 1 << 3),
        ("VMA_AREA_HEAP", 1 << 5),
        ("VMA_FILE_PRIVATE", 1 << 6),
        ("VMA_FILE_SHARED", 1 << 7),
        ("VMA_ANON_SHARED", 1 << 8),
        ("VMA_ANON_PRIVATE", 1 << 9),
        ("VMA_AREA_SYSVIPC", 1 << 10),
        ("VMA_AREA_SOCKET", 1 << 11),
        ("VMA_AREA_VVAR", 1 << 12),
        ("VMA_AREA_AIORING", 1 << 13),
        ("VMA_AREA_MEMFD", 1 << 14),
        ("VMA_AREA_SHSTK", 1 << 15),
        ("VMA_UNSUPP", 1 << 31),
    ];
    const OPEN: &[(&str, u64)] = &[
        ("O_WRONLY", 0o1),
        ("O_RDWR", 0o2),
        ("O_CREAT", 0o100),
        ("O_EXCL", 0o200),
        ("O_NOCTTY", 0o400),
        ("O_TRUNC", 0o1000),
        ("O_APPEND", 0o2000),
        ("O_NONBLOCK", 0o4000),
        ("O_DSYNC", 0o10000),
        ("FASYNC", 0o20000),
        ("O_DIRECT", 0o40000),
        ("O_LARGEFILE", 0o100000),
        ("O_DIRECTORY", 0o200000),
        ("O_NOFOLLOW", 0o400000),
        ("O_NOATIME", 0o1000000),
        ("O_CLOEXEC", 0o2000000),
    ];
    const SEALS: &[(&str, u64)] = &[
        ("F_SEAL_SEAL", 0x1),
        ("F_SEAL_SHRINK", 0x2),
        ("F_SEAL_GROW", 0x4),
        ("F_SEAL_WRITE", 0x8),
        ("F_SEAL_FUTURE_WRITE", 0x10),
    ];
    const PAGEMAP: &[(&str, u64)] = &[("PE_PARENT", 1), ("PE_LAZY", 2), ("PE_PRESENT", 4)];
    match name {
        "mmap.prot" => Some(PROT),
        "mmap.flags" => Some(MAP),
        "mmap.status" => Some(STATUS),
        "rfile.flags" => Some(OPEN),
        "seals.flags" => Some(SEALS),
        "pmap.flags" => Some(PAGEMAP),
        _ => None,
    }
}

/// crit's `map_flags`: the names of the set bits in table order joined by `" | "`, leftover
/// bits as one hex number, and the empty string for 0.
pub(super) fn push_flag_names(out: &mut String, n: i128, table: &[(&str, u64)]) {
    let value = n as u64;
    let mut first = true;
    let mut separator = |out: &mut String| {
        if !std::mem::take(&mut first) {
            out.push_str(" | ");
        }
    };
    for (name, bit) in table {
        if value & bit != 0 {
            separator(out);
            out.push_str(name);
        }
    }
    let known = table.iter().fold(0u64, |acc, (_, bit)| acc | bit);
    let rest = value & !known;
    if rest != 0 {
        separator(out);
        push_hex(out, i128::from(rest));
    }
}

/// [`push_flag_names`] into a new string.
#[cfg(test)]
fn flag_names(n: i128, table: &[(&str, u64)]) -> String {
    let mut out = String::new();
    push_flag_names(&mut out, n, table);
    out
}

/// crit's `unmap_flags`: the value of `"A | B | 0x10"`, names and literals alike; the empty
/// string is 0.
pub(super) fn flags_value(text: &str, table: &[(&str, u64)]) -> Option<i128> {
    if text.is_empty() {
        return Some(0);
    }
    text.split('|')
        .map(str::trim)
        .map(|token| {
            table
                .iter()
                .find(|(name, _)| *name == token)
                .map(|(_, bit)| i128::from(*bit))
                .or_else(|| pyfmt::parse_int(token))
        })
        .sum()
}

/// The value-to-name tables crit knows, keyed by table and field name. `task_state` uses the
/// kernel's numbering (3 stopped, 6 zombie), not crit 4.1.1's swapped one.
pub(super) fn dict_table(dict: &str, field: &str) -> Option<&'static [(i128, &'static str)]> {
    const TASK_STATE: &[(i128, &str)] = &[(1, "Alive"), (3, "Stopped"), (6, "Zombie")];
    const FAMILY: &[(i128, &str)] = &[
        (1, "UNIX"),
        (2, "INET"),
        (10, "INET6"),
        (16, "NETLINK"),
        (17, "PACKET"),
    ];
    const TYPE: &[(i128, &str)] = &[
        (1, "STREAM"),
        (2, "DGRAM"),
        (3, "RAW"),
        (5, "SEQPACKET"),
        (10, "PACKET"),
    ];
    const STATE: &[(i128, &str)] = &[
        (1, "ESTABLISHED"),
        (2, "SYN_SENT"),
        (3, "SYN_RECV"),
        (4, "FIN_WAIT1"),
        (5, "FIN_WAIT2"),
        (6, "TIME_WAIT"),
        (7, "CLOSE"),
        (8, "CLOSE_WAIT"),
        (9, "LAST_ACK"),
        (10, "LISTEN"),
    ];
    const PROTO: &[(i128, &str)] = &[(0, "IP"), (6, "TCP"), (17, "UDP"), (136, "UDPLITE")];
    match (dict, field) {
        ("gen", "task_state") => Some(TASK_STATE),
        ("sk", "family") => Some(FAMILY),
        ("sk", "type") => Some(TYPE),
        ("sk", "state") => Some(STATE),
        ("sk", "proto") => Some(PROTO),
        _ => None,
    }
}

/// The name a value-to-name table gives `n`, if any.
pub(super) fn dict_name(dict: &str, field: &str, n: i128) -> Option<&'static str> {
    dict_table(dict, field)?
        .iter()
        .find(|(v, _)| *v == n)
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_render_and_parse_back() {
        let table = flag_table("mmap.flags").expect("known table");
        assert_eq!(flag_names(0x8022, table), "MAP_PRIVATE | MAP_ANON | 0x8000");
        assert_eq!(flag_names(0, table), "");
        assert_eq!(
            flags_value("MAP_PRIVATE | MAP_ANON | 0x8000", table),
            Some(0x8022)
        );
        assert_eq!(flags_value("", table), Some(0));
        assert_eq!(flags_value("MAP_NOPE", table), None);
    }

    #[test]
    fn devices_split_both_ways() {
        assert_eq!(kernel_dev(48), (0, 48));
        assert_eq!(kernel_makedev(8, 1), 8 << 20 | 1);
        assert_eq!(old_dev(0x8803), (136, 3));
        assert_eq!(old_makedev(136, 3), 0x8803);
    }
}
