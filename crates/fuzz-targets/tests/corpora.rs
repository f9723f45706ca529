//! Replays every committed corpus file of each fuzz target (`fuzz/corpus/<target>/`) through the
//! target's function, on the stable toolchain: an input that once crashed a target stays in its
//! corpus and fails this test if the bug comes back.

use std::path::PathBuf;

/// Runs every input of `target`'s corpus; returns how many `run` says got through to the code
/// under test (a seed corpus that never reaches it would fuzz nothing).
fn replay(target: &str, run: fn(&[u8]) -> bool) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("the corpus of {target} ({}): {e}", dir.display()));
    let (mut count, mut through) = (0, 0);
    for entry in entries {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        through += usize::from(run(&input));
        count += 1;
    }
    assert!(count > 0, "the corpus of {target} in {} is empty", dir.display());
    through
}

#[test]
fn virtqueue_corpus() {
    let served = replay("virtqueue", |input| ferro_fuzz_targets::virtqueue(input) > 0);
    assert!(served >= 2, "the seeds with a well-formed chain (one-chain, indirect) were not served");
}

#[test]
fn qcow2_corpus() {
    let opened = replay("qcow2", ferro_fuzz_targets::qcow2);
    assert!(opened >= 5, "only {opened} qcow2 seeds opened (all but the one whose backing file is missing should)");
}

#[test]
fn vmdk_corpus() {
    let opened = replay("vmdk", ferro_fuzz_targets::vmdk);
    assert_eq!(opened, 2, "the sparse and streamOptimized seeds should open");
}

#[test]
fn transport_corpus() {
    let served = replay("transport", |input| {
        let run = ferro_fuzz_targets::transport_settled(input, std::time::Duration::from_secs(2));
        run.accesses > 0 && run.used_index == 1
    });
    // The rng seeds (MMIO, PCI) and the block read and write seeds set up queue 0, kick it and get
    // their buffer back; the balloon, console and vsock seeds only configure (their queue 0 is
    // for what the host sends, and nothing does).
    assert!(served >= 5, "only {served} transport seeds had their buffer served");
    // Every seed's device was made (the console's and vsock's sockets bound) and driven.
    let driven = replay("transport", |input| ferro_fuzz_targets::transport(input).accesses > 0);
    assert_eq!(driven, 8, "only {driven} of the 8 transport seeds drove their device");
}

#[test]
fn disk_boot_corpus() {
    let found = replay("disk_boot", ferro_fuzz_targets::disk_boot);
    assert_eq!(found, 3, "the kernel on the whole-disk, MBR and GPT ext4 seeds should be found (not on the truncated one)");
}

#[test]
fn kernel_corpus() {
    use ferro_vmm::boot::EntryPoint;
    let pvh = replay("kernel", |input| matches!(ferro_fuzz_targets::kernel(input), Some(EntryPoint::Pvh { .. })));
    let linux = replay("kernel", |input| matches!(ferro_fuzz_targets::kernel(input), Some(EntryPoint::Linux64 { .. })));
    // PVH: the ELF64 and 32-bit ELF test guests; the 64-bit boot protocol: the ELF64 guest
    // without its note and the bzImage.
    assert_eq!((pvh, linux), (2, 2), "the kernel seeds should load: (PVH, 64-bit boot protocol)");
}

#[test]
fn definition_corpus() {
    let domains = replay("definition", |input| ferro_fuzz_targets::definition(input).domain);
    let started = replay("definition", |input| ferro_fuzz_targets::definition(input).domain_vm);
    let vm_json = replay("definition", |input| ferro_fuzz_targets::definition(input).vm_json);
    let networks = replay("definition", |input| ferro_fuzz_targets::definition(input).network);
    let daemon = replay("definition", |input| ferro_fuzz_targets::definition(input).daemon);
    assert!(domains >= 2 && started >= 2, "{domains} domain seeds accepted, {started} of them startable");
    assert!(vm_json >= 1 && networks >= 1 && daemon >= 1, "VMM configuration, network, ferrod.toml seeds accepted: {vm_json}, {networks}, {daemon}");
}
