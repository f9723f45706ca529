//! Persistent dirty bitmaps against QEMU: bitmaps we make are listed by `qemu-img info`, kept
//! tracking by qemu-io's writes and readable by `qemu-img bitmap --merge`; bitmaps QEMU makes
//! keep tracking our writes; an image left open has its bitmaps marked in_use and never trusted.
mod common;
use common::*;
use ferro_block::ops::{self, BitmapActions};
use ferro_block::qcow2::Qcow2;
use ferro_block::{Access, CreateOptions, Format, create};
use serde_json::Value;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `qemu-img info`'s bitmaps: (name, granularity, flags).
fn qemu_bitmaps(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    qemu_bitmaps_with(img, false)
}

/// `qemu-img info`'s bitmaps, with `-U` if the image is open elsewhere.
fn qemu_bitmaps_with(img: &Path, force_share: bool) -> Vec<(String, u64, Vec<String>)> {
    let mut args = vec!["info", "--output=json", p(img)];
    if force_share {
        args.insert(1, "-U");
    }
    let v: Value = serde_json::from_str(&qemu_img_ok(&args)).expect("info json");
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else { return Vec::new() };
    list.iter()
        .map(|b| {
            let flags = b["flags"].as_array().expect("flags").iter().map(|f| f.as_str().expect("flag").to_string()).collect();
            (b["name"].as_str().expect("name").to_string(), b["granularity"].as_u64().expect("granularity"), flags)
        })
        .collect()
}

fn bitmap_ranges(img: &Path, name: &str) -> Vec<(u64, u64)> {
    Qcow2::open(img, Access::Read).expect("open").dirty_bitmap(name).expect("bitmap").ranges()
}

fn new_qcow2(path: &Path, size: u64) {
    create(path, &CreateOptions::new(Format::Qcow2, Some(size))).expect("create");
}

#[test]
fn our_bitmaps_are_qemus_bitmaps() {
    let s = TempDir::new("block-bitmaps-ours");
    let img = s.join("ours.qcow2");
    new_qcow2(&img, 64 * MIB);
    let add = BitmapActions { add: true, granularity: Some(65536), ..Default::default() };
    ops::bitmap(&img, None, "nightly", &add).expect("add nightly");
    let add_off = BitmapActions { add: true, granularity: Some(4096), enable: Some(false), ..Default::default() };
    ops::bitmap(&img, None, "frozen", &add_off).expect("add frozen");
    {
        let mut d = ferro_block::open(&img, None, false).expect("open for writing");
        d.write_at(&data(1, 4096), 3 * MIB + 100).expect("write");
        d.write_zeroes(10 * MIB, 2 * MIB).expect("write zeroes");
        d.discard(40 * MIB, 65536).expect("discard");
        // While we hold the image, QEMU sees our bitmaps in use.
        let busy = qemu_bitmaps_with(&img, true);
        assert_eq!(busy.len(), 2);
        assert!(busy.iter().all(|(_, _, f)| f.contains(&"in-use".to_string())), "open bitmaps not in use: {busy:?}");
    }
    assert_qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![("nightly".into(), 65536, vec!["auto".into()]), ("frozen".into(), 4096, vec![])],
        "qemu-img info lists our bitmaps"
    );
    let written = vec![(3 * MIB, 65536), (10 * MIB, 2 * MIB), (40 * MIB, 65536)];
    assert_eq!(bitmap_ranges(&img, "nightly"), written);
    assert_eq!(bitmap_ranges(&img, "frozen"), vec![], "a disabled bitmap tracks nothing");

    // QEMU writes to a copy: it marks our enabled bitmap where it wrote, and stores it so
    // that we read it back consistent.
    let copy = s.join("copy.qcow2");
    std::fs::copy(&img, &copy).expect("copy");
    qemu_io("qcow2", &copy, &["write -P 0x5a 20M 64k", "write 63M 512"]);
    assert_qemu_check_clean(&copy);
    let mut expect = written.clone();
    expect.insert(2, (20 * MIB, 65536));
    expect.push((63 * MIB, 65536));
    assert_eq!(bitmap_ranges(&copy, "nightly"), expect, "qemu-io's writes are in our bitmap");

    // QEMU reads our bitmap data: merged into a bitmap of an image QEMU made, it holds
    // exactly our ranges.
    let theirs = s.join("theirs.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p(&theirs), "64M"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "4096", p(&theirs), "merged"]);
    qemu_img_ok(&["bitmap", "--merge", "nightly", "-b", p(&img), "-F", "qcow2", p(&theirs), "merged"]);
    assert_eq!(bitmap_ranges(&theirs, "merged"), written, "QEMU read our bitmap as we wrote it");
}

#[test]
fn qemus_bitmaps_track_our_writes() {
    let s = TempDir::new("block-bitmaps-theirs");
    let img = s.join("theirs.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p(&img), "32M"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "8192", p(&img), "qb"]);
    qemu_img_ok(&["bitmap", "--add", p(&img), "qoff"]);
    qemu_img_ok(&["bitmap", "--disable", p(&img), "qoff"]);
    qemu_io("qcow2", &img, &["write 1M 4k"]);
    assert_eq!(bitmap_ranges(&img, "qb"), vec![(MIB, 8192)], "we read QEMU's bits where QEMU wrote");
    {
        let mut d = ferro_block::open(&img, None, false).expect("open for writing");
        d.write_at(&data(2, 100), 5 * MIB + 8190).expect("write");
        d.write_zeroes(31 * MIB, MIB).expect("zeroes");
    }
    assert_qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![("qb".into(), 8192, vec!["auto".into()]), ("qoff".into(), 4096, vec![])],
        "flags after our close"
    );
    assert_eq!(bitmap_ranges(&img, "qb"), vec![(MIB, 8192), (5 * MIB, 16384), (31 * MIB, MIB)]);
    assert_eq!(bitmap_ranges(&img, "qoff"), vec![]);
    // QEMU agrees: it copies our bits into a fresh bitmap of its own with the same result.
    qemu_img_ok(&["bitmap", "--add", "-g", "8192", p(&img), "check"]);
    qemu_img_ok(&["bitmap", "--merge", "qb", p(&img), "check"]);
    assert_eq!(bitmap_ranges(&img, "check"), bitmap_ranges(&img, "qb"));
}

#[test]
fn bitmap_verbs_like_qemu_img() {
    let s = TempDir::new("block-bitmaps-verbs");
    let img = s.join("v.qcow2");
    new_qcow2(&img, 8 * MIB);
    let act = |name: &str, a: BitmapActions| ops::bitmap(&img, None, name, &a);
    act("a", BitmapActions { add: true, ..Default::default() }).expect("add a");
    act("b", BitmapActions { add: true, enable: Some(false), ..Default::default() }).expect("add b");
    let err = act("a", BitmapActions { add: true, ..Default::default() }).expect_err("duplicate name");
    assert!(err.to_string().contains("exists already"), "{err}");
    let err = act("c", BitmapActions { add: true, granularity: Some(3000), ..Default::default() }).expect_err("bad granularity");
    assert!(err.to_string().contains("power of two"), "{err}");
    write(&img, 0, 4096);
    act("b", BitmapActions { merge: vec!["a".into()], ..Default::default() }).expect("merge a into b");
    assert_eq!(bitmap_ranges(&img, "b"), vec![(0, 65536)]);
    act("b", BitmapActions { enable: Some(true), ..Default::default() }).expect("enable b");
    act("a", BitmapActions { clear: true, enable: Some(false), ..Default::default() }).expect("clear and disable a");
    write(&img, 2 * MIB, 1);
    assert_eq!(bitmap_ranges(&img, "a"), vec![]);
    assert_eq!(bitmap_ranges(&img, "b"), vec![(0, 65536), (2 * MIB, 65536)]);
    act("a", BitmapActions { remove: true, ..Default::default() }).expect("remove a");
    assert_eq!(qemu_bitmaps(&img), vec![("b".into(), 65536, vec!["auto".into()])]);
    act("b", BitmapActions { remove: true, ..Default::default() }).expect("remove b");
    assert_eq!(qemu_bitmaps(&img), vec![]);
    assert_qemu_check_clean(&img);
    let report = ferro_block::qcow2::check::check(&img, false, Access::Read).expect("our check");
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{:?}", report.messages);
}

fn write(img: &Path, off: u64, len: usize) {
    let mut d = ferro_block::open(img, None, false).expect("open for writing");
    d.write_at(&data(off, len), off).expect("write");
}

#[test]
fn an_image_left_open_has_its_bitmaps_in_use() {
    let s = TempDir::new("block-bitmaps-crash");
    let open = s.join("open.qcow2");
    new_qcow2(&open, 8 * MIB);
    ops::bitmap(&open, None, "b", &BitmapActions { add: true, ..Default::default() }).expect("add");
    let mut d = ferro_block::open(&open, None, false).expect("open for writing");
    d.write_at(&data(3, 4096), MIB).expect("write");
    d.flush().expect("flush");
    // What a crash leaves: the file as it is while the image is open.
    let img = s.join("c.qcow2");
    std::fs::copy(&open, &img).expect("copy");
    drop(d);
    assert_eq!(qemu_bitmaps(&img), vec![("b".into(), 65536, vec!["in-use".into(), "auto".into()])]);
    let err = Qcow2::open(&img, Access::Read).expect("open").dirty_bitmap("b").expect_err("in-use bitmap read");
    assert!(err.to_string().contains("inconsistent"), "{err}");
    // It stays in_use through our next session (never trusted, never tracked), and can be removed.
    write(&img, 2 * MIB, 512);
    assert_eq!(qemu_bitmaps(&img), vec![("b".into(), 65536, vec!["in-use".into(), "auto".into()])]);
    let err = ops::bitmap(&img, None, "b", &BitmapActions { clear: true, ..Default::default() }).expect_err("clear in-use");
    assert!(err.to_string().contains("inconsistent"), "{err}");
    ops::bitmap(&img, None, "b", &BitmapActions { remove: true, ..Default::default() }).expect("remove");
    assert_eq!(qemu_bitmaps(&img), vec![]);
    assert_qemu_check_clean(&img);
}

#[test]
fn a_program_without_bitmap_support_makes_them_stale() {
    // Clearing autoclear bit 0 is what a bitmap-unaware writer does: the bitmaps are dropped.
    let s = TempDir::new("block-bitmaps-stale");
    let img = s.join("s.qcow2");
    new_qcow2(&img, 8 * MIB);
    ops::bitmap(&img, None, "b", &BitmapActions { add: true, ..Default::default() }).expect("add");
    let mut bytes = std::fs::read(&img).expect("read");
    bytes[88..96].copy_from_slice(&0u64.to_be_bytes());
    std::fs::write(&img, &bytes).expect("write");
    assert!(Qcow2::open(&img, Access::Read).expect("open").bitmaps().is_empty(), "stale bitmaps listed");
    write(&img, 0, 512);
    assert_qemu_check_clean(&img);
    assert_eq!(qemu_bitmaps(&img), vec![]);
}

#[test]
fn resize_follows_the_bitmaps() {
    let s = TempDir::new("block-bitmaps-resize");
    let img = s.join("r.qcow2");
    new_qcow2(&img, 8 * MIB);
    ops::bitmap(&img, None, "b", &BitmapActions { add: true, ..Default::default() }).expect("add");
    ops::resize(&img, None, ops::SizeChange::To(12 * MIB), false).expect("grow");
    assert_eq!(bitmap_ranges(&img, "b"), vec![(8 * MIB, 4 * MIB)], "the grown range counts as written");
    qemu_io("qcow2", &img, &["write 11M 4k"]);
    ops::resize(&img, None, ops::SizeChange::To(4 * MIB), true).expect("shrink");
    assert_eq!(bitmap_ranges(&img, "b"), vec![]);
    assert_qemu_check_clean(&img);
    assert_eq!(qemu_bitmaps(&img), vec![("b".into(), 65536, vec!["auto".into()])]);
    assert_eq!(ferro_block::open(&img, None, true).expect("open").size(), 4 * MIB);
}

#[test]
fn hostile_bitmap_metadata_is_refused_with_a_reason() {
    let s = TempDir::new("block-bitmaps-hostile");
    let good = s.join("good.qcow2");
    new_qcow2(&good, 8 * MIB);
    ops::bitmap(&good, None, "b", &BitmapActions { add: true, ..Default::default() }).expect("add");
    write(&good, 0, 512);
    let bytes = std::fs::read(&good).expect("read");
    let be64 = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    // Our header is 112 bytes; the bitmaps extension is the first one after it.
    assert_eq!(&bytes[112..116], &0x2385_2875u32.to_be_bytes());
    let dir = be64(128 + 8) as usize;
    let table = be64(dir) as usize;
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        ("granularity", Box::new(move |b: &mut Vec<u8>| b[dir + 17] = 63), "constraints"),
        ("name size", Box::new(move |b: &mut Vec<u8>| b[dir + 18..dir + 20].copy_from_slice(&[0xff, 0xff])), "past the directory"),
        ("directory offset", Box::new(|b: &mut Vec<u8>| b[136..144].copy_from_slice(&(1u64 << 40).to_be_bytes())), "past the end of the file"),
        ("bitmap count", Box::new(|b: &mut Vec<u8>| b[120..124].copy_from_slice(&2u32.to_be_bytes())), "the header names 2"),
        ("table entry", Box::new(move |b: &mut Vec<u8>| b[table..table + 8].copy_from_slice(&0x0100_0000_0000_0000u64.to_be_bytes())), "table entry"),
    ];
    for (what, damage, reason) in cases {
        let img = s.join(format!("{}.qcow2", what.replace(' ', "-")));
        let mut b = bytes.clone();
        damage(&mut b);
        std::fs::write(&img, &b).expect("write damaged image");
        let err = match ferro_block::open(&img, None, false) {
            Ok(_) => panic!("{what}: a damaged bitmap was opened for writing"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(reason), "{what}: {err}");
        assert_eq!(std::fs::read(&img).expect("read"), b, "{what}: a refused open changed the file");
    }
}
