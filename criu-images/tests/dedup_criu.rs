//! A deduplicated chain restores with the real CRIU: a process holding known private and
//! shared memory is dumped, a parent and a child are built from the dump (the child keeps the
//! first half of every range, the rest in the parent), the parent's copy of what the child
//! holds is punched, and `criu restore` of the child brings back every byte of the pattern.
//! Needs root and CRIU; skipped with the reason printed when either is missing.

mod chain;

use std::fs;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use chain::{PAGE, build_pair};
use criu_images::dedup;
use criu_images::pb::core_entry::March;
use criu_images::validate::{Host, ValidateOptions, validate};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, geteuid};

/// Maps private and shared anonymous memory, fills both with a pattern the test recomputes
/// (private page 1 all zeros, private page 3 a copy of page 2, so the statistics have
/// something to find), reports where, and waits to be dumped. Every inherited descriptor
/// above 2 is closed first: CRIU would dump, and then fail to restore, a pipe to the test
/// harness.
const HOLD_C: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static unsigned char pattern(size_t page, size_t byte, unsigned salt)
{
	return (unsigned char)((page * 131 + byte * 7 + salt) % 251 + 1);
}

int main(int argc, char **argv)
{
	size_t pages, ps = (size_t)sysconf(_SC_PAGESIZE);
	unsigned char *priv, *shared;
	char tmp[4096];
	FILE *file;

	if (argc != 3)
		return 2;
	closefrom(3);
	pages = strtoul(argv[2], NULL, 10);
	priv = mmap(NULL, pages * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	shared = mmap(NULL, pages * ps, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (priv == MAP_FAILED || shared == MAP_FAILED)
		return 1;
	for (size_t i = 0; i < pages; i++)
		for (size_t j = 0; j < ps; j++) {
			priv[i * ps + j] = pattern(i, j, 1);
			shared[i * ps + j] = pattern(i, j, 2);
		}
	memset(priv + ps, 0, ps);
	memcpy(priv + 3 * ps, priv + 2 * ps, ps);

	snprintf(tmp, sizeof(tmp), "%s.tmp", argv[1]);
	file = fopen(tmp, "w");
	if (!file)
		return 1;
	fprintf(file, "%d %lu %lu\n", getpid(), (unsigned long)priv, (unsigned long)shared);
	fclose(file);
	rename(tmp, argv[1]);
	for (;;)
		pause();
}
"#;

/// Pages in each of the two regions.
const PAGES: u64 = 32;

/// The bytes the program writes, region by region.
fn expected(salt: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((PAGES * PAGE) as usize);
    for page in 0..PAGES {
        for byte in 0..PAGE {
            out.push(((page * 131 + byte * 7 + salt) % 251 + 1) as u8);
        }
    }
    if salt == 1 {
        let page = PAGE as usize;
        out[page..2 * page].fill(0);
        out.copy_within(2 * page..3 * page, 3 * page);
    }
    out
}

fn criu_available() -> bool {
    if !geteuid().is_root() {
        println!("skipped: CRIU needs root");
        return false;
    }
    let found = Command::new("criu")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!("skipped: criu is not installed (run tools/install-deps)");
    }
    found
}

/// Kills a process this test started or restored, by pid, when dropped.
struct Started {
    pid: i32,
    child: Option<Child>,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        if let Some(child) = &mut self.child {
            let _ = child.wait();
        }
        wait_gone(self.pid);
    }
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    // A zombie keeps its /proc entry until its parent (init, for a restored tree) reaps it.
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }
}

fn wait_for(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = fs::read_to_string(path) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        sleep(Duration::from_millis(10));
    }
}

fn criu(args: &[&str], dir: &Path) {
    let status = Command::new("criu")
        .args(args)
        .arg("-D")
        .arg(dir)
        .args(["-v4", "-o", "criu.log"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("criu runs");
    let log = fs::read_to_string(dir.join("criu.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    assert!(
        status.success(),
        "criu {args:?} failed; the end of its log, newest first:\n{}",
        tail.join("\n")
    );
}

fn read_memory(pid: i32, addr: u64) -> Vec<u8> {
    let mem = fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut out = vec![0u8; (PAGES * PAGE) as usize];
    mem.read_exact_at(&mut out, addr)
        .expect("read the restored memory");
    out
}

#[test]
fn a_deduplicated_chain_restores_with_criu() {
    if !criu_available() {
        return;
    }
    let temp = tempfile::tempdir().expect("temp dir");
    let root = temp.path();
    fs::write(root.join("hold.c"), HOLD_C).expect("write the program");
    let built = Command::new("gcc")
        .args(["-O2", "-static", "-o"])
        .arg(root.join("hold"))
        .arg(root.join("hold.c"))
        .status()
        .expect("gcc runs (install gcc to build the test program)");
    assert!(built.success(), "the test program builds");

    // Its own session, stdio on /dev/null and cwd /: plain `criu dump` takes it without
    // --shell-job, and the restore needs nothing of the test's.
    let ready = root.join("ready");
    let child = Command::new("setsid")
        .arg(root.join("hold"))
        .arg(&ready)
        .arg(PAGES.to_string())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the program");
    let mut started = Started {
        pid: child.id() as i32,
        child: Some(child),
    };
    let report = wait_for(&ready);
    let fields: Vec<u64> = report
        .split_whitespace()
        .map(|f| f.parse().expect("a number"))
        .collect();
    let (pid, private, shared) = (fields[0] as i32, fields[1], fields[2]);
    assert_eq!(pid, started.pid, "setsid ran the program in place");
    assert_eq!(
        read_memory(pid, private),
        expected(1),
        "the pattern is in place"
    );

    // The dump kills the process; reaping it frees its pid for the restore.
    let full = root.join("full");
    fs::create_dir(&full).expect("images dir");
    criu(&["dump", "-t", &pid.to_string()], &full);
    if let Some(mut child) = started.child.take() {
        child.wait().expect("reap the dumped process");
    }
    wait_gone(pid);
    // Released now, while the pid is free: the restored process gets the same pid, and a
    // guard dropped later would kill it.
    drop(started);

    let (parent, child_dir, kept) = build_pair(&full, root);
    assert!(
        kept.len() >= 2,
        "the split kept pages of the process and of the shared memory: {kept:?}"
    );
    let stats = dedup::page_stats(&full, None).expect("statistics of the full dump");
    assert!(stats.zero_pages >= 1, "{stats:?}");
    assert!(stats.duplicate_pages >= 1, "{stats:?}");

    let plan = dedup::plan(&child_dir, None).expect("plan");
    assert!(
        plan.files
            .iter()
            .any(|f| f.pagemap.starts_with("pagemap-shmem-")),
        "the shared memory's parent pages are punched too: {:#?}",
        plan.files
    );
    let freed = dedup::apply(&plan).expect("apply");
    let kept_bytes: u64 = kept.values().flatten().map(|&(_, len)| len).sum();
    assert_eq!(freed, kept_bytes);
    for (name, ranges) in &kept {
        let pages = fs::read(parent.join(name)).expect("parent pages");
        for &(offset, len) in ranges {
            let range = &pages[offset as usize..(offset + len) as usize];
            assert!(
                range.iter().all(|&b| b == 0),
                "{name} {offset}+{len} is punched"
            );
        }
    }
    let options = ValidateOptions {
        host: Some(Host {
            arch: March::X8664,
            page_size: PAGE,
        }),
        ..ValidateOptions::default()
    };
    let findings = validate(&child_dir, &options).findings;
    assert!(findings.is_empty(), "{findings:#?}");

    let pidfile = root.join("restored.pid");
    let pidfile_arg = pidfile.to_str().expect("a UTF-8 temp path");
    criu(
        &["restore", "--restore-detached", "--pidfile", pidfile_arg],
        &child_dir,
    );
    let restored: i32 = wait_for(&pidfile).trim().parse().expect("a pid");
    let restored_guard = Started {
        pid: restored,
        child: None,
    };
    assert_eq!(restored, pid, "CRIU restores the dumped pid");

    assert!(
        read_memory(restored, private) == expected(1),
        "the private pattern is back"
    );
    assert!(
        read_memory(restored, shared) == expected(2),
        "the shared pattern is back"
    );
    drop(restored_guard);
    wait_gone(restored);
    assert!(
        !Path::new(&format!("/proc/{restored}")).exists(),
        "the restored process is gone"
    );
}
