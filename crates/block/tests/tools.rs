//! The `ferro img` operations (ferro_block::ops) against qemu-img's own answers.
mod common;
use common::*;
use ferro_block::ops::{self, CheckOutcome, CompareOptions, CompareResult, ConvertOptions, SizeChange};
use ferro_block::{CreateOptions, Format, create, open};
use std::path::Path;

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn plain_compare() -> CompareOptions {
    CompareOptions { format_a: None, format_b: None, strict: false, force_share: false }
}

fn checked(path: &Path) -> ferro_block::qcow2::check::CheckReport {
    match ops::check(path, None, false, false).expect("check runs") {
        CheckOutcome::Checked(r) => r,
        CheckOutcome::NotSupported(f) => panic!("check unsupported for {f}"),
    }
}

/// qemu builds a chain with data, zero clusters and discards; used by several tests.
fn qemu_chain(s: &TempDir) -> std::path::PathBuf {
    let base = s.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p(&base), "8M"]);
    qemu_io("qcow2", &base, &["write -P 0x61 0 3M", "write -P 0x62 6M 512k"]);
    let top = s.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(&top)]);
    qemu_io("qcow2", &top, &["write -P 0x71 1M 64k", "write -z 2M 128k", "write -P 0x72 7M 4k"]);
    top
}

#[test]
fn map_and_info_match_qemu() {
    let s = TempDir::new("block-map");
    let top = qemu_chain(&s);
    let ours = ops::map_json(&ops::map(&top, None, false).expect("map"));
    let theirs = qemu_img_ok(&["map", "--output", "json", p(&top)]);
    // Entry by entry and field by field: qemu-img 8.1 and later add a "compressed" field that
    // 7.2 lacks and we do not emit (this chain has no compressed clusters).
    let ours: Vec<serde_json::Value> = serde_json::from_str(&ours).expect("our map is JSON");
    let theirs: Vec<serde_json::Value> = serde_json::from_str(&theirs).expect("qemu's map is JSON");
    assert_eq!(ours.len(), theirs.len(), "number of map entries");
    for (o, t) in ours.iter().zip(&theirs) {
        for k in ["start", "length", "depth", "present", "zero", "data", "offset"] {
            assert_eq!(o.get(k), t.get(k), "field {k} of {t}");
        }
        if let Some(c) = t.get("compressed") {
            assert_eq!(c, &serde_json::Value::Bool(false));
        }
    }

    let info = ops::info(&top, None, false, false).expect("info");
    let ours: serde_json::Value = ops::info_json(&info[0]).expect("json");
    let theirs: serde_json::Value = serde_json::from_str(&qemu_img_ok(&["info", "--output", "json", p(&top)])).expect("parse");
    for k in ["virtual-size", "format", "cluster-size", "backing-filename", "backing-filename-format", "dirty-flag", "format-specific", "actual-size"] {
        assert_eq!(ours[k], theirs[k], "field {k}");
    }
    let chain = ops::info(&top, None, true, false).expect("chain");
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].format, Format::Qcow2);
}

#[test]
fn check_finds_leaks_and_corruption_like_qemu() {
    let s = TempDir::new("block-check");
    let q = s.join("c.qcow2");
    create(&q, &CreateOptions::new(Format::Qcow2, Some(4 * MIB))).expect("create");
    {
        let mut img = open(&q, None, false).expect("open");
        img.write_at(&[1; 65536], 0).expect("write");
        img.flush().expect("flush");
    }
    let r = checked(&q);
    assert_eq!((r.corruptions, r.leaks, r.exit_code()), (0, 0, 0), "{r:?}");
    // Leak: an extra cluster at the end of the file with refcount 1 that nothing references
    // (refcount block 0 is cluster 2; the file has clusters 0..=5).
    let mut bytes = std::fs::read(&q).expect("read");
    assert_eq!(bytes.len(), 6 * 65536);
    bytes.resize(7 * 65536, 0);
    let rb = 2 * 65536;
    bytes[rb + 2 * 6..rb + 2 * 6 + 2].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(&q, &bytes).expect("write");
    let r = checked(&q);
    assert_eq!((r.corruptions, r.leaks, r.exit_code()), (0, 1, 3), "{r:?}");
    assert_eq!(qemu_img(&["check", p(&q)]).status.code(), Some(3));
    let CheckOutcome::Checked(fixed) = ops::check(&q, None, true, false).expect("repair") else { panic!("qcow2") };
    assert_eq!((fixed.leaks_fixed, fixed.leaks), (1, 0));
    assert_qemu_check_clean(&q);
    // Corruption: zero the refcount of the data cluster.
    let mut bytes = std::fs::read(&q).expect("read");
    let data_cluster = {
        let l1 = u64::from_be_bytes(bytes[40..48].try_into().expect("8 bytes")) as usize;
        let l2 = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().expect("8")) & 0x00ff_ffff_ffff_fe00;
        (u64::from_be_bytes(bytes[l2 as usize..l2 as usize + 8].try_into().expect("8")) & 0x00ff_ffff_ffff_fe00) / 65536
    } as usize;
    bytes[rb + 2 * data_cluster..rb + 2 * data_cluster + 2].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(&q, &bytes).expect("write");
    let r = checked(&q);
    assert!(r.corruptions >= 1 && r.exit_code() == 2, "{r:?}");
    assert_eq!(qemu_img(&["check", p(&q)]).status.code(), Some(2));
    // Raw has nothing to check (qemu-img exits 63).
    let raw = s.join("r.raw");
    create(&raw, &CreateOptions::new(Format::Raw, Some(MIB))).expect("raw");
    assert!(matches!(ops::check(&raw, None, false, false).expect("check"), CheckOutcome::NotSupported(Format::Raw)));
}

#[test]
fn convert_matches_qemu_convert_and_stays_sparse() {
    let s = TempDir::new("block-convert");
    let top = qemu_chain(&s);
    for (fmt, name) in [(Format::Qcow2, "out.qcow2"), (Format::Raw, "out.raw")] {
        let out = s.join(name);
        let opts = ConvertOptions { src_format: None, force_share: false, dst: CreateOptions::new(fmt, None) };
        ops::convert(&top, &out, &opts, &mut |_, _| {}).expect("convert");
        assert_qemu_identical(&top, &out);
        if fmt == Format::Qcow2 {
            assert_qemu_check_clean(&out);
            let r = checked(&out);
            // 3M + 512k + 4k of data at 64k clusters, no more.
            assert!(r.allocated_clusters <= 57, "converted image not sparse: {r:?}");
        }
    }
    // Compare against our own converted raw, and a mismatch is found at the right offset.
    let raw = s.join("out.raw");
    assert_eq!(ops::compare(&top, &raw, &plain_compare(), &mut |_, _| {}).expect("compare"), CompareResult::Identical);
    {
        let mut img = open(&raw, None, false).expect("open raw");
        img.write_at(&[0xee], 5 * MIB + 3).expect("write");
    }
    assert_eq!(
        ops::compare(&top, &raw, &plain_compare(), &mut |_, _| {}).expect("compare"),
        CompareResult::Mismatch(5 * MIB + 3)
    );
}

#[test]
fn commit_and_rebase_keep_content() {
    let s = TempDir::new("block-commit");
    let top = qemu_chain(&s);
    let before = qemu_read_all(&top, &s);
    // Safe rebase onto nothing: the image must now hold everything itself.
    let flat = s.join("flat.qcow2");
    std::fs::copy(&top, &flat).expect("copy");
    ops::rebase(&flat, None, None, false, &mut |_, _| {}).expect("rebase to none");
    assert_qemu_check_clean(&flat);
    assert!(!qemu_img_ok(&["info", p(&flat)]).contains("backing file"));
    assert_eq!(qemu_read_all(&flat, &s), before);
    // Safe rebase onto a different base: content unchanged, new name recorded.
    let other = s.join("other.raw");
    std::fs::write(&other, data(5, 8 * MIB as usize)).expect("other");
    let moved = s.join("moved.qcow2");
    std::fs::copy(&top, &moved).expect("copy");
    ops::rebase(&moved, Some("other.raw"), Some(Format::Raw), false, &mut |_, _| {}).expect("rebase");
    assert_qemu_check_clean(&moved);
    assert!(qemu_img_ok(&["info", p(&moved)]).contains("backing file: other.raw"));
    assert_eq!(qemu_read_all(&moved, &s), before);
    // Commit top into base: base now shows the merged content and top is empty.
    ops::commit(&top, None, false, &mut |_, _| {}).expect("commit");
    assert_qemu_check_clean(&top);
    assert_qemu_check_clean(&s.join("base.qcow2"));
    assert_eq!(qemu_read_all(&s.join("base.qcow2"), &s), before);
    assert_eq!(checked(&top).allocated_clusters, 0);
    assert_eq!(qemu_read_all(&top, &s), before);
}

#[test]
fn resize_grows_shrinks_and_sets_the_size() {
    let s = TempDir::new("block-rs");
    let q = s.join("r.qcow2");
    create(&q, &CreateOptions::new(Format::Qcow2, Some(MIB))).expect("create");
    assert_eq!(ops::resize(&q, None, SizeChange::Grow(MIB), false).expect("grow"), 2 * MIB);
    assert!(ops::resize(&q, None, SizeChange::Shrink(512 * 1024), false).is_err(), "shrink needs --shrink");
    assert_eq!(ops::resize(&q, None, SizeChange::Shrink(512 * 1024), true).expect("shrink"), 2 * MIB - 512 * 1024);
    assert!(ops::resize(&q, None, SizeChange::Shrink(4 * MIB), true).is_err(), "below zero");
    assert!(ops::resize(&q, None, SizeChange::Grow(u64::MAX), false).is_err(), "past 2^64");
    assert_eq!(ops::resize(&q, None, SizeChange::To(3 << 30), false).expect("abs"), 3 << 30);
    assert_qemu_check_clean(&q);
    assert!(qemu_img_ok(&["info", p(&q)]).contains("(3221225472 bytes)"));
}

#[test]
fn vmdk_input_converts_to_the_same_bytes_as_qemu() {
    let s = TempDir::new("block-vmdk");
    let raw = s.join("src.raw");
    let mut content = data(11, 5 * MIB as usize);
    content[MIB as usize..3 * MIB as usize].fill(0);
    content[4 * MIB as usize..4 * MIB as usize + 70_000].fill(0x3c);
    std::fs::write(&raw, &content).expect("raw");
    for sub in ["monolithicSparse", "streamOptimized"] {
        let vmdk = s.join(format!("{sub}.vmdk"));
        qemu_img_ok(&["convert", "-f", "raw", "-O", "vmdk", "-o", &format!("subformat={sub}"), p(&raw), p(&vmdk)]);
        let ours = s.join(format!("{sub}.qcow2"));
        let opts = ConvertOptions { src_format: None, force_share: false, dst: CreateOptions::new(Format::Qcow2, None) };
        ops::convert(&vmdk, &ours, &opts, &mut |_, _| {}).expect("convert vmdk");
        assert_qemu_check_clean(&ours);
        assert_eq!(qemu_read_all(&ours, &s), qemu_read_all(&vmdk, &s), "{sub}");
        assert_eq!(read_all(&vmdk), content, "{sub}");
    }
}

#[test]
fn stream_optimized_vmdk_output_reads_back_in_qemu_and_here() {
    let s = TempDir::new("block-vmdk-out");
    // 3 grain tables' worth (32 MiB each): data in the first, none in the second (its table is
    // left out), data and a last grain cut short in the third.
    let size = 70 * MIB as usize + 3 * 512;
    let mut content = vec![0u8; size];
    content[..3 * MIB as usize].copy_from_slice(&data(21, 3 * MIB as usize));
    content[5 * MIB as usize..5 * MIB as usize + 70_000].fill(0x5a);
    let tail = size - 2 * MIB as usize;
    content[tail..].copy_from_slice(&data(22, 2 * MIB as usize));
    let raw = s.join("src.raw");
    std::fs::write(&raw, &content).expect("raw");
    for adapter in ["ide", "lsilogic"] {
        let vmdk = s.join(format!("out-{adapter}.vmdk"));
        let mut dst = CreateOptions::new(Format::Vmdk, None);
        dst.subformat = Some("streamOptimized".into());
        dst.adapter_type = ferro_block::vmdk::Adapter::from_name(adapter).expect("adapter");
        ops::convert(&raw, &vmdk, &ConvertOptions { src_format: None, force_share: false, dst }, &mut |_, _| {}).expect("convert to vmdk");
        let info = qemu_img_ok(&["info", "--output", "json", p(&vmdk)]);
        let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info json");
        assert_eq!(info["format"], "vmdk", "{info}");
        assert_eq!(info["virtual-size"], size as u64, "{info}");
        assert_eq!(info["format-specific"]["data"]["create-type"], "streamOptimized", "{info}");
        assert_eq!(info["format-specific"]["data"]["extents"][0]["compressed"], true, "{info}");
        let check = qemu_img(&["check", p(&vmdk)]);
        assert!(check.status.success(), "qemu-img check: {}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
        // qemu-img's own conversion of our file gives the disk's bytes; so does our reader.
        let back = s.join(format!("back-{adapter}.raw"));
        qemu_img_ok(&["convert", "-f", "vmdk", "-O", "raw", p(&vmdk), p(&back)]);
        assert!(std::fs::read(&back).expect("read back") == content, "qemu-img reads our VMDK back as the disk ({adapter})");
        assert!(read_all(&vmdk) == content, "our reader reads our VMDK back ({adapter})");
        let descriptor = String::from_utf8_lossy(&std::fs::read(&vmdk).expect("vmdk")[512..4096]).into_owned();
        assert!(descriptor.contains(&format!("ddb.adapterType = \"{adapter}\"")), "{descriptor}");
        // Zero grains are not stored: far smaller than the 8 MiB of data it holds, uncompressed.
        let len = std::fs::metadata(&vmdk).expect("stat").len();
        assert!(len < 6 * MIB, "{len} bytes");
    }
    let mut dst = CreateOptions::new(Format::Vmdk, None);
    dst.subformat = Some("monolithicFlat".into());
    let e = ops::convert(&raw, &s.join("flat.vmdk"), &ConvertOptions { src_format: None, force_share: false, dst }, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("only subformat=streamOptimized"), "{e}");
}
