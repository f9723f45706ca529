//! The host's pool of 2 MiB huge pages, as tests that back guests with huge pages see and
//! change it: `/sys/kernel/mm/hugepages/hugepages-2048kB` (the same numbers as /proc/meminfo's
//! HugePages_* lines).

use std::sync::{Mutex, MutexGuard};

const DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// One number of the pool (`nr_hugepages`, `free_hugepages`, `resv_hugepages`).
pub fn read(name: &str) -> u64 {
    let path = format!("{DIR}/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (the kernel needs CONFIG_HUGETLBFS with 2 MiB pages)"));
    text.trim().parse().unwrap_or_else(|_| panic!("{path}: {text:?} is not a number"))
}

/// Free pages no mapping has reserved yet.
pub fn available() -> u64 {
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

/// Serializes the tests of one process that change the pool.
static POOL: Mutex<()> = Mutex::new(());

/// The pool sized for a test: `nr_hugepages` set so that exactly `free` pages are available
/// (more or fewer than before), put back as it was when dropped. Tests holding one run one at
/// a time.
pub struct Reservation {
    before: u64,
    _serial: MutexGuard<'static, ()>,
}

impl Reservation {
    /// Panics saying why when the kernel cannot give the pages (no root, fragmented memory).
    pub fn exactly(free: u64) -> Reservation {
        let serial = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = read("nr_hugepages");
        let target = (before + free).saturating_sub(available());
        set(target);
        let got = available();
        let reservation = Reservation { before, _serial: serial };
        assert_eq!(
            got, free,
            "asked the kernel for {free} free 2 MiB huge pages (nr_hugepages {before} -> {target}) and got {got}: \
             not enough contiguous free memory, or no permission to write /proc/sys/vm/nr_hugepages"
        );
        reservation
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        set(self.before);
    }
}

fn set(pages: u64) {
    std::fs::write("/proc/sys/vm/nr_hugepages", pages.to_string())
        .unwrap_or_else(|e| panic!("writing {pages} to /proc/sys/vm/nr_hugepages: {e} (the tests run as root)"));
}
