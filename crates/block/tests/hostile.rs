//! Hostile and damaged images: every case must give a clear error (naming the file) and never
//! a panic, a hang or a huge allocation. Ends with a short mutation fuzz run over the metadata.
mod common;
use common::*;
use ferro_block::{Access, CreateOptions, DiskImage, Format, create, open};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// A small valid image with data in a few clusters (64 KiB clusters, 4 MiB).
fn valid(s: &TempDir, name: &str) -> PathBuf {
    let q = s.join(name);
    create(&q, &CreateOptions::new(Format::Qcow2, Some(4 * MIB))).expect("create");
    let mut img = open(&q, None, false).expect("open");
    img.write_at(&data(1, 200_000), 10_000).expect("write");
    img.flush().expect("flush");
    q
}

fn patch(path: &Path, off: usize, bytes: &[u8]) {
    let mut v = std::fs::read(path).expect("read");
    if v.len() < off + bytes.len() {
        v.resize(off + bytes.len(), 0);
    }
    v[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, v).expect("write");
}

fn be64(path: &Path, off: usize) -> u64 {
    let v = std::fs::read(path).expect("read");
    u64::from_be_bytes(v[off..off + 8].try_into().expect("8 bytes"))
}

/// Opening (and if that works, reading everything) must fail with a message containing `want`.
fn expect_error(path: &Path, want: &str) {
    let err = match open(path, None, true) {
        Err(e) => e,
        Ok(mut img) => {
            let mut buf = vec![0u8; img.size().min(8 * MIB) as usize];
            match img.read_at(&mut buf, 0) {
                Err(e) => e,
                Ok(()) => panic!("{}: expected an error containing {want:?}", path.display()),
            }
        }
    };
    let msg = err.to_string();
    assert!(msg.contains(want), "error {msg:?} should contain {want:?}");
    assert!(msg.contains(path.file_name().and_then(|n| n.to_str()).expect("name")), "error {msg:?} should name the file");
}

#[test]
fn damaged_headers_and_tables_give_clear_errors() {
    let s = TempDir::new("block-hostile");
    let q = valid(&s, "truncated.qcow2");
    std::fs::write(&q, &std::fs::read(&q).expect("read")[..50]).expect("truncate");
    expect_error(&q, "shorter than the header");

    let q = valid(&s, "cut.qcow2");
    std::fs::write(&q, &std::fs::read(&q).expect("read")[..65536 + 100]).expect("truncate");
    expect_error(&q, "past the end");

    let q = valid(&s, "l1.qcow2");
    patch(&q, 40, &(1u64 << 40).to_be_bytes());
    expect_error(&q, "L1 table");

    let q = valid(&s, "huge.qcow2");
    patch(&q, 24, &(1u64 << 62).to_be_bytes());
    expect_error(&q, "too small for virtual size");

    let q = valid(&s, "l1size.qcow2");
    patch(&q, 36, &u32::MAX.to_be_bytes());
    expect_error(&q, "exceeds 32 MiB");

    let q = valid(&s, "reftable.qcow2");
    patch(&q, 56, &u32::MAX.to_be_bytes());
    expect_error(&q, "exceeds 8 MiB");

    let q = valid(&s, "cbits.qcow2");
    patch(&q, 20, &30u32.to_be_bytes());
    expect_error(&q, "cluster_bits");

    let q = valid(&s, "feature.qcow2");
    patch(&q, 72, &(1u64 << 40).to_be_bytes());
    expect_error(&q, "incompatible features");

    let q = valid(&s, "ext.qcow2");
    patch(&q, 112, &[0xe2, 0x79, 0x2a, 0xca, 0x7f, 0xff, 0xff, 0xff]);
    expect_error(&q, "header extension");

    let q = valid(&s, "bname.qcow2");
    patch(&q, 8, &60_000u64.to_be_bytes());
    patch(&q, 16, &5000u32.to_be_bytes());
    expect_error(&q, "backing file name of 5000 bytes");
    patch(&q, 16, &100u32.to_be_bytes());
    expect_error(&q, "backing file name contains NUL");

    // L2 entry pointing far past the end of the file, and one with reserved bits.
    let q = valid(&s, "l2.qcow2");
    let l1 = be64(&q, 40) as usize;
    let l2 = (be64(&q, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    patch(&q, l2, &((1u64 << 63) | (1u64 << 45)).to_be_bytes());
    expect_error(&q, "past the end of the file");
    patch(&q, l2, &((1u64 << 63) | (5 * 65536) | 0x10).to_be_bytes());
    expect_error(&q, "reserved bits");

    // Compressed entry with garbage data.
    let q = valid(&s, "zlib.qcow2");
    let l2 = (be64(&q, be64(&q, 40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    patch(&q, l2, &((1u64 << 62) | (6 * 65536)).to_be_bytes());
    expect_error(&q, "compressed cluster");

    // Refcount table pointing at the header: refused before anything is written through it.
    let q = valid(&s, "overlap.qcow2");
    patch(&q, 65536, &0u64.to_be_bytes());
    patch(&q, 65536, &512u64.to_be_bytes());
    assert!(open(&q, None, false).is_err());
    let q = valid(&s, "overlap2.qcow2");
    patch(&q, 65536, &65536u64.to_be_bytes());
    expect_error(&q, "used as both the refcount table and a refcount block");
}

const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The L2 entry of guest cluster `guest_cluster` (first L2 table).
fn l2_entry_pos(path: &Path, guest_cluster: usize) -> usize {
    (be64(path, be64(path, 40) as usize) & OFFSET_MASK) as usize + 8 * guest_cluster
}

/// Points the L2 entry of guest cluster `guest_cluster` at `host`.
fn point_l2_entry(path: &Path, guest_cluster: usize, host: u64) {
    patch(path, l2_entry_pos(path, guest_cluster), &(COPIED | host).to_be_bytes());
}

/// An L2 entry that points data into metadata or past the end of the file is refused by every
/// path that follows it (write in place, zero, discard, map, read, commit), with an error that
/// names the file and what the pointer leads into, and no metadata byte changes.
#[test]
fn data_pointers_into_metadata_are_refused_on_every_path() {
    let s = TempDir::new("block-l2-targets");
    let pristine = valid(&s, "pristine.qcow2");
    // Growing past one L2 table's reach moves the L1 table to the end of the file, right
    // after the last data cluster: a write running over that cluster's end must stop there.
    ferro_block::ops::resize(&pristine, None, ferro_block::ops::SizeChange::To(1 << 30), false).expect("grow");
    let cs = 65536u64;
    let data_hosts: Vec<u64> = (0..4).map(|i| be64(&pristine, l2_entry_pos(&pristine, i)) & OFFSET_MASK).collect();
    let last_data = *data_hosts.iter().max().expect("data");
    let reftable = be64(&pristine, 48);
    let refblock = be64(&pristine, reftable as usize) & OFFSET_MASK;
    let l1 = be64(&pristine, 40);
    assert_eq!(l1, last_data + cs, "the L1 table should follow the last data cluster");
    let l2 = be64(&pristine, l1 as usize) & OFFSET_MASK;
    let past_end = std::fs::metadata(&pristine).expect("stat").len() + 10 * cs;
    let targets = [
        (reftable, "the refcount table"),
        (refblock, "a refcount block"),
        (l1, "the L1 table"),
        (l2, "an L2 table"),
        (past_end, "past the end of the file"),
    ];
    type Op = fn(&mut dyn DiskImage) -> ferro_block::Result<()>;
    let ops: [(&str, Op); 7] = [
        ("write in place", |d| d.write_at(&[0xaa; 4096], 65536 + 100)),
        ("write across clusters", |d| d.write_at(&[0xbb; 3 * 65536], 1000)),
        ("write_zeroes", |d| d.write_zeroes(65536, 65536)),
        ("discard", |d| d.discard(65536, 2 * 65536)),
        ("partial write_zeroes", |d| d.write_zeroes(65536 + 512, 512)),
        ("block_status", |d| d.block_status(65536, 65536).map(|_| ())),
        ("read", |d| d.read_at(&mut [0u8; 65536], 65536 + 7)),
    ];
    // Everything but the guest's own data clusters must stay as it was.
    let metadata_of = |bytes: &[u8]| -> Vec<u8> {
        let mut v = bytes.to_vec();
        for &h in &data_hosts {
            v[h as usize..(h + cs) as usize].fill(0);
        }
        v
    };
    for (target, what) in targets {
        let q = s.join("target.qcow2");
        std::fs::copy(&pristine, &q).expect("copy");
        point_l2_entry(&q, 0, last_data);
        point_l2_entry(&q, 1, target);
        let before = metadata_of(&std::fs::read(&q).expect("read"));
        for (name, op) in ops {
            let mut img = open(&q, None, false).expect("open");
            let err = op(img.as_mut()).err().unwrap_or_else(|| panic!("{name} through a pointer to {what} succeeded"));
            drop(img);
            let msg = err.to_string();
            assert!(msg.contains("corrupt image") && msg.contains(what), "{name} -> {what}: {msg}");
            assert!(msg.contains("target.qcow2"), "{msg} should name the file");
            let after = std::fs::read(&q).expect("read");
            assert!(after.len() == before.len() && metadata_of(&after) == before, "{name} through a pointer to {what} changed metadata");
        }
        let map = ferro_block::ops::map(&q, None, false).expect_err("map must fail").to_string();
        assert!(map.contains(what), "map -> {what}: {map}");
    }

    // Commit reads the top image through the same lookups: the base gets no metadata bytes.
    let base = s.join("base.raw");
    std::fs::write(&base, data(4, 4 * MIB as usize)).expect("base");
    let top = s.join("top.qcow2");
    let mut o = CreateOptions::new(Format::Qcow2, None);
    o.backing_file = Some("base.raw".into());
    o.backing_format = Some(Format::Raw);
    create(&top, &o).expect("top");
    {
        let mut img = open(&top, None, false).expect("open top");
        img.write_at(&data(5, 3 * 65536), 0).expect("write top");
        img.flush().expect("flush");
    }
    point_l2_entry(&top, 1, reftable);
    let err = ferro_block::ops::commit(&top, None, false, &mut |_, _| {}).expect_err("commit must fail").to_string();
    assert!(err.contains("the refcount table"), "{err}");
    let (base_now, base_then) = (std::fs::read(&base).expect("base"), data(4, 4 * MIB as usize));
    assert!(base_now[65536..] == base_then[65536..], "commit copied metadata into the base");

    // An L1 entry that makes a refcount block double as an L2 table is refused at open, before
    // a write through it could overwrite refcounts.
    let q = s.join("l1-refblock.qcow2");
    std::fs::copy(&pristine, &q).expect("copy");
    patch(&q, l1 as usize, &(COPIED | refblock).to_be_bytes());
    let err = open(&q, None, false).err().expect("open must fail").to_string();
    assert!(err.contains("a refcount block") && err.contains("an L2 table"), "{err}");
}

#[test]
fn backing_loops_and_missing_backing_files() {
    let s = TempDir::new("block-loops");
    let a = s.join("a.qcow2");
    let b = s.join("b.qcow2");
    create(&a, &CreateOptions::new(Format::Qcow2, Some(MIB))).expect("a");
    let mut o = CreateOptions::new(Format::Qcow2, None);
    o.backing_file = Some("a.qcow2".into());
    o.backing_format = Some(Format::Qcow2);
    create(&b, &o).expect("b");
    // Point a at b: a -> b -> a.
    ferro_block::qcow2::Qcow2::open(&a, Access::Write).expect("open a").set_backing_file(Some("b.qcow2"), Some(Format::Qcow2)).expect("set");
    let e = open(&b, None, true).err().expect("loop must fail").to_string();
    assert!(e.contains("loop"), "{e}");
    // Self loop.
    ferro_block::qcow2::Qcow2::open(&a, Access::Write).expect("open a").set_backing_file(Some("a.qcow2"), None).expect("set");
    assert!(open(&a, None, true).err().expect("self loop").to_string().contains("loop"));
    // Missing backing file names it.
    ferro_block::qcow2::Qcow2::open(&a, Access::Write).expect("open a").set_backing_file(Some("gone.raw"), Some(Format::Raw)).expect("set");
    let e = open(&a, None, true).err().expect("missing").to_string();
    assert!(e.contains("gone.raw"), "{e}");
    // A chain deeper than the limit.
    let mut prev = "a0.raw".to_string();
    std::fs::write(s.join(&prev), [0u8; 512]).expect("base");
    for i in 1..=ferro_block::MAX_CHAIN_DEPTH + 1 {
        let name = format!("a{i}.qcow2");
        let mut o = CreateOptions::new(Format::Qcow2, Some(512));
        o.backing_file = Some(prev.clone());
        o.backing_format = Some(if i == 1 { Format::Raw } else { Format::Qcow2 });
        create(&s.join(&name), &o).expect("chain link");
        prev = name;
    }
    let e = open(s.join(&prev), None, true).err().expect("too deep").to_string();
    assert!(e.contains("deeper"), "{e}");
}

/// Deterministic mutation fuzzing of the metadata clusters: open, read, write, check. Any
/// result is fine except a panic (caught and reported with the seed).
#[test]
fn mutation_fuzz_never_panics() {
    let s = TempDir::new("block-fuzz");
    let base = valid(&s, "base.qcow2");
    let pristine = std::fs::read(&base).expect("read");
    let meta_len = pristine.len().min(6 * 65536);
    let q = s.join("m.qcow2");
    for seed in 0..300u64 {
        let mut v = pristine.clone();
        let r = data(seed + 1000, 64);
        let flips = 1 + (r[0] % 8) as usize;
        for k in 0..flips {
            let pos = u64::from_le_bytes(r[8 + k * 4..16 + k * 4].try_into().expect("8")) as usize;
            // Bias towards the header and table starts, where parsing happens.
            let pos = if r[k + 1] % 2 == 0 { pos % 128 } else { pos % meta_len };
            v[pos] = r[40 + k];
        }
        std::fs::write(&q, &v).expect("write mutant");
        let outcome = std::panic::catch_unwind(|| {
            if let Ok(mut img) = open(&q, None, false) {
                let n = img.size().min(4 * MIB) as usize;
                let mut buf = vec![0u8; n];
                let _ = img.read_at(&mut buf, 0);
                let _ = img.write_at(&[0x42; 5000], 60_000.min(img.size().saturating_sub(5000)));
                let _ = img.flush();
            }
            let _ = ferro_block::ops::check(&q, Some(Format::Qcow2), false, false);
        });
        assert!(outcome.is_ok(), "panic on mutant seed {seed}");
    }
}

#[allow(dead_code)]
fn assert_send(_: &dyn DiskImage) {}

/// An image whose header says it is empty but whose L2 table still maps data (a fuzzer's find):
/// asking the status of its zero bytes answers a zero-length extent and does not underflow
/// while cutting the (empty) data run.
#[test]
fn the_status_of_nothing_on_an_empty_image_with_mapped_data_is_empty() {
    let s = TempDir::new("block-empty-mapped");
    let q = valid(&s, "empty.qcow2");
    patch(&q, 24, &0u64.to_be_bytes());
    let mut img = open(&q, None, false).expect("an empty image with an L1 table opens");
    assert_eq!(img.size(), 0);
    let extent = img.block_status(0, 0).expect("status of nothing");
    assert_eq!(extent.len, 0, "{extent:?}");
}
